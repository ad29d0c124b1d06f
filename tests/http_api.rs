//! CONTRACT §8: every endpoint, every error status, bad bodies, tokens, SSE.

mod common;

use std::sync::Arc;

use common::migrated_database_url;
use proclog::http::{ApiState, HttpOptions, router};
use proclog::pod_services::{PodServices, PodServicesOptions};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Server {
    base: String,
    database: String,
    client: reqwest::Client,
    _services: Arc<PodServices>,
}

impl Server {
    async fn start(url: &str, token: Option<&str>) -> Self {
        Self::start_with(url, token, 64 * 1024).await
    }

    async fn start_with(url: &str, token: Option<&str>, max_body: usize) -> Self {
        Self::start_options(
            url,
            HttpOptions {
                token: token.map(str::to_owned),
                max_body_bytes: max_body,
                ..HttpOptions::default()
            },
        )
        .await
    }

    async fn start_options(url: &str, options: HttpOptions) -> Self {
        let services = Arc::new(
            PodServices::start(
                url,
                "pod-http",
                PodServicesOptions {
                    max_payload_bytes: 1024,
                    ..PodServicesOptions::default()
                },
            )
            .unwrap(),
        );
        let state = ApiState::new(Arc::clone(&services), None, &options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(axum::serve(listener, router(state, options.max_body_bytes)).into_future());
        Self {
            base,
            database: url.to_owned(),
            client: reqwest::Client::new(),
            _services: services,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.client.request(method, self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Registers an `external` process of kind `k` (nobody runs it).
    async fn external(&self, id: &str) {
        let (status, body) = self
            .post(
                "/v1/processes",
                json!({"id": id, "kind": "k", "disposition": "external"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let mut request = self.client.post(self.url(path)).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

fn code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn process_lifecycle_over_http() {
    let server = Server::start(&migrated_database_url().await, None).await;
    let (status, record) = server
        .post(
            "/v1/processes",
            json!({"id": "order-1", "kind": "steps", "input": {"n": 1}, "disposition": "external"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{record}");
    assert_eq!(record["status"], json!("pending"));
    let (status, again) = server
        .post(
            "/v1/processes",
            json!({"id": "order-1", "kind": "steps", "input": {"n": 1}, "disposition": "external"}),
        )
        .await;
    assert_eq!(
        (status, &again),
        (StatusCode::CREATED, &record),
        "idempotent"
    );
    let (status, body) = server
        .post(
            "/v1/processes",
            json!({"id": "order-1", "kind": "other", "disposition": "external"}),
        )
        .await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "conflict"));

    let (status, got) = server.get("/v1/processes/order-1").await;
    assert_eq!(
        (status, got["kind"].clone()),
        (StatusCode::OK, json!("steps"))
    );

    let (status, one) = server
        .post(
            "/v1/processes/order-1/events",
            json!({"event_type": "paid", "payload": {"eur": 5}, "replay_key": "pay-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{one}");
    assert_eq!(
        (one["event"]["seq"].clone(), one["replayed"].clone()),
        (json!(1), json!(false))
    );
    let (status, replay) = server
        .post(
            "/v1/processes/order-1/events",
            json!({"event_type": "paid", "payload": {"eur": 5}, "replay_key": "pay-1"}),
        )
        .await;
    assert_eq!(
        (status, replay["replayed"].clone()),
        (StatusCode::OK, json!(true))
    );
    let (status, body) = server
        .post(
            "/v1/processes/order-1/events",
            json!({"event_type": "paid", "payload": {"eur": 6}, "replay_key": "pay-1"}),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "replay_conflict")
    );
    let (status, batch) = server
        .post(
            "/v1/processes/order-1/events",
            json!({"events": [
                {"event_type": "shipped", "payload": {}},
                {"event_type": "delivered"}
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{batch}");
    let seqs: Vec<i64> = batch["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["event"]["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 3]);

    let (status, events) = server
        .get("/v1/processes/order-1/events?after=1&limit=1")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(events["events"].as_array().unwrap().len(), 1);
    assert_eq!(events["events"][0]["event_type"], json!("shipped"));

    let (status, ended) = server
        .post(
            "/v1/processes/order-1/complete",
            json!({"state": "completed", "output": {"ok": true}}),
        )
        .await;
    assert_eq!(
        (status, ended["status"].clone()),
        (StatusCode::OK, json!("completed"))
    );
    let (status, same) = server
        .post(
            "/v1/processes/order-1/complete",
            json!({"state": "completed", "output": {"ok": true}}),
        )
        .await;
    assert_eq!((status, same), (StatusCode::OK, ended));
    let (status, body) = server
        .post(
            "/v1/processes/order-1/complete",
            json!({"state": "failed", "output": null}),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "already_terminal")
    );
    let (status, body) = server
        .post(
            "/v1/processes/order-1/events",
            json!({"event_type": "late"}),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "process_terminal")
    );

    let (status, terminal) = server
        .get("/v1/processes/order-1/await?timeout_ms=1000")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (terminal["state"].clone(), terminal["seq"].clone()),
        (json!("completed"), json!(4))
    );
    let (status, body) = server.post("/v1/processes/order-1/cancel", json!({})).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "process_terminal")
    );

    let (status, page) = server
        .get("/v1/processes?status=completed&kind=steps")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["processes"].as_array().unwrap().len(), 1);
    assert_eq!(page["next_cursor"], Value::Null);

    let (status, pruned) = server
        .post("/v1/prune", json!({"older_than_secs": 0}))
        .await;
    assert_eq!(status, StatusCode::OK, "{pruned}");
    assert_eq!(pruned["pruned"], json!({"processes": 1, "events": 4}));
    let (status, body) = server.get("/v1/processes/order-1").await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listing_pages_with_a_cursor() {
    let server = Server::start(&migrated_database_url().await, None).await;
    for n in 0..5 {
        server.external(&format!("p{n}")).await;
    }
    let mut seen = Vec::new();
    let mut path = "/v1/processes?limit=2".to_owned();
    loop {
        let (status, page) = server.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(
            page["processes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                path = format!("/v1/processes?limit=2&cursor={}", urlencode(cursor));
            }
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, ["p0", "p1", "p2", "p3", "p4"]);
}

fn urlencode(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clear_errors_and_write_nothing() {
    let server = Server::start(&migrated_database_url().await, None).await;
    server.external("p").await;
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "/v1/processes",
            json!({"kind": "has space"}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes",
            json!({"kind": 42}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes",
            json!({"input": {}}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes",
            json!({"id": "bad id!", "kind": "k"}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes",
            json!({"kind": "k", "disposition": "sometimes"}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes",
            json!({"kind": "k", "input": "x".repeat(2000)}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "/v1/processes/p/events",
            json!({"event_type": "process.started"}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes/p/events",
            json!({"event_type": 7}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes/p/events",
            json!({"events": []}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes/p/events",
            json!({"event_type": "x", "payload": "y".repeat(2000)}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "/v1/processes/missing/events",
            json!({"event_type": "x"}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/processes/bad%20id/events",
            json!({"event_type": "x"}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes/p/complete",
            json!({"state": "done"}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes/missing/complete",
            json!({"state": "completed"}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/processes/missing/cancel",
            json!({}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/prune",
            json!({}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/prune",
            json!({"older_than_secs": 1, "before": "2020-01-01T00:00:00Z"}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
    ];
    for (path, body, expected_status, expected_code) in cases {
        let (status, answer) = server.post(path, body.clone()).await;
        assert_eq!(
            (status, code(&answer)),
            (expected_status, expected_code),
            "POST {path} {body}"
        );
    }
    let gets = [
        ("/v1/processes/missing", StatusCode::NOT_FOUND, "not_found"),
        (
            "/v1/processes/bad%20id",
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes?status=sleeping",
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes?limit=0",
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes?cursor=garbage",
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes/p/events?after=-1",
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes/p/events?limit=abc",
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            "/v1/processes/missing/events",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/processes/missing/stream",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/processes/missing/await?timeout_ms=10",
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "/v1/processes/p/await?timeout_ms=10",
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
        ),
        (
            "/v1/processes/p/await?timeout_ms=999999999",
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        ("/v2/nothing", StatusCode::NOT_FOUND, "no_route"),
    ];
    for (path, expected_status, expected_code) in gets {
        let (status, answer) = server.get(path).await;
        assert_eq!(
            (status, code(&answer)),
            (expected_status, expected_code),
            "GET {path}"
        );
    }
    let (status, answer) = server
        .post_raw("/v1/processes", Some("application/json"), "{not json")
        .await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::BAD_REQUEST, "invalid_json")
    );
    let (status, answer) = server
        .post_raw("/v1/processes", None, r#"{"kind":"k"}"#)
        .await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let (status, answer) = server
        .post_raw("/v1/processes/p/cancel", Some("application/json"), "{oops")
        .await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::BAD_REQUEST, "invalid_json")
    );
    // Over the body limit (64 KiB here): refused before being read whole.
    let huge = format!(r#"{{"kind":"k","input":"{}"}}"#, "x".repeat(200 * 1024));
    let (status, answer) = server
        .post_raw("/v1/processes", Some("application/json"), huge)
        .await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );

    // Nothing was written by any refused request.
    let (_, events) = server.get("/v1/processes/p/events").await;
    assert_eq!(events["events"], json!([]));
    let (_, page) = server.get("/v1/processes").await;
    assert_eq!(page["processes"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_over_http_ends_a_process_nobody_runs() {
    let server = Server::start(&migrated_database_url().await, None).await;
    server.external("c").await;
    let (status, record) = server
        .post(
            "/v1/processes/c/cancel",
            json!({"reason": "no longer needed"}),
        )
        .await;
    assert_eq!(
        (status, record["status"].clone()),
        (StatusCode::OK, json!("cancelled"))
    );
    // An empty body is a cancel without a reason, but only as JSON: a form or a bare POST
    // from another site's page is refused (it could cancel processes of a tokenless pod).
    server.external("d").await;
    let before = common::table_checksum(&server.database).await;
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let (status, body) = server
            .post_raw("/v1/processes/d/cancel", content_type, "")
            .await;
        assert_eq!(
            status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert_eq!(code(&body), "unsupported_media_type");
    }
    assert_eq!(common::table_checksum(&server.database).await, before);
    let (status, record) = server
        .post_raw("/v1/processes/d/cancel", Some("application/json"), "")
        .await;
    assert_eq!(
        (status, record["status"].clone()),
        (StatusCode::OK, json!("cancelled"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_over_http_are_stored_once_and_refused_when_they_must_be() {
    let server = Server::start(&migrated_database_url().await, None).await;
    // A process that waits for nothing yet: the message is stored in its log.
    let (status, record) = server
        .post(
            "/v1/processes",
            json!({"id": "m", "kind": "k", "start_in_ms": 3_600_000, "timeout_ms": 7_200_000,
                   "retry": {"max_attempts": 3}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{record}");
    assert_eq!(record["status"], "pending");
    assert!(record["wake_at"].is_string() && record["deadline"].is_string());
    assert_eq!(record["retry_policy"]["max_attempts"], 3);
    let message = json!({"topic": "approve", "payload": {"by": "ann"}, "replay_key": "k1"});
    let (status, first) = server
        .post("/v1/processes/m/messages", message.clone())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["event"]["event_type"], "process.message");
    assert_eq!(
        first["event"]["payload"],
        json!({"topic": "approve", "payload": {"by": "ann"}})
    );
    let (status, again) = server.post("/v1/processes/m/messages", message).await;
    assert_eq!(status, StatusCode::OK, "a retry with the key: {again}");
    assert_eq!(again["replayed"], true);
    assert_eq!(again["event"]["seq"], first["event"]["seq"]);

    let before = common::table_checksum(&server.database).await;
    for (body, status, error) in [
        (
            json!({"topic": "approve", "payload": 2, "replay_key": "k1"}),
            StatusCode::CONFLICT,
            "replay_conflict",
        ),
        (
            json!({"topic": "no spaces"}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            json!({"payload": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            json!({"topic": "t", "extra": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            json!({"topic": "t", "payload": "x".repeat(2000)}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ] {
        let (got, answer) = server.post("/v1/processes/m/messages", body.clone()).await;
        assert_eq!((got, code(&answer)), (status, error), "{body}: {answer}");
    }
    let (status, answer) = server
        .post("/v1/processes/nobody/messages", json!({"topic": "t"}))
        .await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::NOT_FOUND, "not_found")
    );
    server
        .post(
            "/v1/processes/m/complete",
            json!({"state": "completed", "output": null}),
        )
        .await;
    let after_completion = common::table_checksum(&server.database).await;
    let (status, answer) = server
        .post("/v1/processes/m/messages", json!({"topic": "t"}))
        .await;
    assert_eq!(
        (status, code(&answer)),
        (StatusCode::CONFLICT, "process_terminal")
    );
    assert_eq!(
        common::table_checksum(&server.database).await,
        after_completion
    );
    assert_ne!(before, after_completion);
    // Registration schedules out of range are refused.
    for body in [
        json!({"kind": "k", "start_in_ms": 1, "start_at": "2030-01-01T00:00:00Z"}),
        json!({"kind": "k", "timeout_ms": u64::MAX}),
        json!({"kind": "k", "retry": {"max_attempts": 0}}),
        json!({"kind": "k", "retry": {"max_attempts": 2, "jitter": 3}}),
    ] {
        let (status, answer) = server.post("/v1/processes", body.clone()).await;
        assert_eq!(
            (status, code(&answer)),
            (StatusCode::BAD_REQUEST, "invalid_input"),
            "{body}"
        );
    }
}

/// A page on another site can make a browser send requests to a pod it reaches: with
/// DNS rebinding under its own host name, or cross-origin. Neither writes anything; a listed
/// origin may; every answer carries the anti-framing and no-sniff headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_on_another_site_can_neither_rebind_nor_write() {
    let server = Server::start_options(
        &migrated_database_url().await,
        HttpOptions {
            access: proclog::http::AccessPolicy::from_lists(
                "proclog.internal",
                "https://app.example",
            ),
            ..HttpOptions::default()
        },
    )
    .await;
    server.external("victim").await;
    let before = common::table_checksum(&server.database).await;
    let send = |method: reqwest::Method, path: &str, headers: &[(&str, &str)]| {
        let mut request = server
            .client
            .request(method, server.url(path))
            .header("content-type", "application/json")
            .body("{}");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };
    // DNS rebinding: the browser names the attacker's host.
    for path in [
        "/v1/processes/victim",
        "/v1/processes/victim/cancel",
        "/",
        "/metrics",
    ] {
        let method = if path.ends_with("cancel") {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let answer = send(method, path, &[("host", "rebind.attacker.example")])
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::FORBIDDEN, "{path}");
        if path.starts_with("/v1") {
            let body: Value = answer.json().await.unwrap();
            assert_eq!(code(&body), "host_not_allowed");
        }
    }
    // The probes answer any host; a configured name is accepted.
    for probe in ["/healthz", "/readyz"] {
        let answer = send(
            reqwest::Method::GET,
            probe,
            &[("host", "rebind.attacker.example")],
        )
        .await
        .unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{probe}");
    }
    let named = send(
        reqwest::Method::GET,
        "/v1/processes/victim",
        &[("host", "proclog.internal:8080")],
    )
    .await
    .unwrap();
    assert_eq!(named.status(), StatusCode::OK);
    // Cross-site writes, by what browsers say about them.
    for headers in [
        &[("origin", "https://evil.example")][..],
        &[("sec-fetch-site", "cross-site")][..],
        &[
            ("sec-fetch-site", "same-site"),
            ("origin", "http://sub.example"),
        ][..],
        &[("origin", "null")][..],
    ] {
        let answer = send(
            reqwest::Method::POST,
            "/v1/processes/victim/cancel",
            headers,
        )
        .await
        .unwrap();
        assert_eq!(answer.status(), StatusCode::FORBIDDEN, "{headers:?}");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(code(&body), "cross_origin");
    }
    assert_eq!(
        common::table_checksum(&server.database).await,
        before,
        "nothing written"
    );
    // A listed origin gets its preflight answered and may write.
    let preflight = server
        .client
        .request(
            reqwest::Method::OPTIONS,
            server.url("/v1/processes/victim/cancel"),
        )
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,authorization",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let unlisted = server
        .client
        .request(
            reqwest::Method::OPTIONS,
            server.url("/v1/processes/victim/cancel"),
        )
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(
        unlisted
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    let allowed = send(
        reqwest::Method::POST,
        "/v1/processes/victim/cancel",
        &[
            ("origin", "https://app.example"),
            ("sec-fetch-site", "cross-site"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(allowed.status(), StatusCode::OK);
    // The same origin (the console) and clients that are not browsers write as before.
    server.external("same").await;
    let same = send(
        reqwest::Method::POST,
        "/v1/processes/same/cancel",
        &[("origin", &server.base), ("sec-fetch-site", "same-origin")],
    )
    .await
    .unwrap();
    assert_eq!(same.status(), StatusCode::OK);
    // A pod without the demo engines offers no demo form and refuses to start one.
    let home = send(reqwest::Method::GET, "/", &[])
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(home.contains("proclog") && !home.contains("demo-form"));
    let demo = server
        .client
        .post(server.url("/ui/demo"))
        .form(&[("steps", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(demo.status(), StatusCode::NOT_FOUND);
    // Headers on every answer, refusals included.
    for path in ["/", "/healthz", "/v1/processes/victim", "/v1/nothing-here"] {
        let answer = send(reqwest::Method::GET, path, &[]).await.unwrap();
        let headers = answer.headers();
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert!(
            headers["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("frame-ancestors 'none'"),
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_stream_delivers_every_event_then_ends() {
    let server = Server::start(&migrated_database_url().await, None).await;
    server.external("s").await;
    server
        .post("/v1/processes/s/events", json!({"event_type": "before"}))
        .await;
    let response = server
        .client
        .get(server.url("/v1/processes/s/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let reader = tokio::spawn(response.text()); // completes only when the stream ends
    for n in 0..20 {
        let (status, _) = server
            .post(
                "/v1/processes/s/events",
                json!({"event_type": "tick", "payload": n}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    server
        .post(
            "/v1/processes/s/complete",
            json!({"state": "completed", "output": "fin"}),
        )
        .await;
    let body = reader.await.unwrap().unwrap();
    let ids: Vec<i64> = body
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(ids, (1..=22).collect::<Vec<_>>());
    let data: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|v| serde_json::from_str(v).unwrap())
        .collect();
    assert_eq!(
        data.last().unwrap()["event_type"],
        json!("process.completed")
    );
    assert!(body.contains("event: tick"));

    // Resuming with Last-Event-ID gives the rest only.
    let rest = server
        .client
        .get(server.url("/v1/processes/s/stream"))
        .header("Last-Event-ID", "20")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let ids: Vec<&str> = rest
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(ids, ["21", "22"]);
    let bad = server
        .client
        .get(server.url("/v1/processes/s/stream"))
        .header("Last-Event-ID", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bearer_token_guards_v1_only() {
    let server = Server::start(&migrated_database_url().await, Some("s3cret")).await;
    let (status, body) = server.get("/v1/processes").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let wrong = server
        .client
        .get(server.url("/v1/processes"))
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.headers()["www-authenticate"], "Bearer");
    let right = server
        .client
        .get(server.url("/v1/processes"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::OK);
    let (status, _) = server.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_readiness_and_metrics() {
    let server = Server::start(&migrated_database_url().await, None).await;
    server._services.listener_ready().await;
    let (status, health) = server.get("/healthz").await;
    assert_eq!((status, health), (StatusCode::OK, json!({"status": "ok"})));
    let (status, ready) = server.get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["ready"], json!(true));
    server.external("m").await;
    server
        .post("/v1/processes/m/events", json!({"event_type": "x"}))
        .await;
    let metrics = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "proclog_appended_events_total 1",
        "proclog_notices_sent_total",
        "proclog_notices_dropped_total",
        "proclog_listener_reconnects_total",
        "proclog_listener_up 1",
        "proclog_await_waiters 0",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_database_is_503() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Server::start(&format!("postgres://proclog@127.0.0.1:{port}/none"), None).await;
    let (status, body) = server.get("/v1/processes/x").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    );
    let (status, body) = server.post("/v1/processes", json!({"kind": "k"})).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    );
    let (status, ready) = server.get("/readyz").await;
    assert_eq!(
        (status, ready["ready"].clone()),
        (StatusCode::SERVICE_UNAVAILABLE, json!(false))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_shows_an_unreachable_database_instead_of_a_blank_page() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Server::start(&format!("postgres://proclog@127.0.0.1:{port}/none"), None).await;
    for path in [
        "/",
        "/?fragment=1",
        "/ui/processes/x",
        "/ui/processes/x?fragment=1",
    ] {
        let response = server.client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html"),
            "{path}: a page, not JSON"
        );
        let html = response.text().await.unwrap();
        assert!(
            html.contains("The database is not answering"),
            "{path}: {html}"
        );
    }
    // The pods list over the API says the same in its own format.
    let (status, body) = server.get("/v1/pods").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_numbers_and_dates_are_refused_and_write_nothing() {
    let url = migrated_database_url().await;
    let server = Server::start(&url, None).await;
    server.external("ended").await;
    let (status, _) = server
        .post(
            "/v1/processes/ended/complete",
            json!({"state": "completed", "output": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let before = common::table_checksum(&url).await;
    let prunes = [
        json!({"older_than_secs": u64::MAX}),
        json!({"older_than_secs": 10_000_000_000_000u64}),
        json!({"older_than_secs": 1_000_000_000_000u64}),
        json!({"older_than_secs": -1}),
        json!({"older_than_secs": 1e30}),
        json!({"before": "-5000-01-01T00:00:00Z"}),
        json!({"before": "+20000-01-01T00:00:00Z"}),
        json!({"before": "2020-01-01T00:00:00Z", "older_than_secs": 1}),
    ];
    for body in prunes {
        let (status, answer) = server.post("/v1/prune", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {answer}");
        assert!(answer["error"]["code"].is_string(), "{answer}");
    }
    for query in [
        "created_after=-5000-01-01T00:00:00Z",
        "created_before=%2B20000-01-01T00:00:00Z",
        "limit=4294967296",
        "cursor=-5000-01-01T00:00:00Z%7Cx",
    ] {
        let (status, answer) = server.get(&format!("/v1/processes?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query} -> {answer}");
    }
    for path in [
        "/v1/processes/ended/events?after=-1",
        "/v1/processes/ended/events?after=99999999999999999999",
        "/v1/processes/ended/events?limit=0",
        "/v1/processes/ended/await?timeout_ms=18446744073709551615",
    ] {
        let (status, answer) = server.get(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} -> {answer}");
    }
    assert_eq!(
        common::table_checksum(&url).await,
        before,
        "nothing was written"
    );
    // A sane prune still works and removes the ended process.
    let (status, answer) = server
        .post("/v1/prune", json!({"older_than_secs": 0}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["pruned"]["processes"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_error_answer_is_json_whatever_produced_it() {
    let url = migrated_database_url().await;
    let server = Server::start_with(&url, None, 4096).await;
    server.external("p").await;
    let before = common::table_checksum(&url).await;
    let client = &server.client;
    // Wrong method: 405 in the JSON format, with Allow kept.
    let response = client
        .delete(server.url("/v1/processes/p"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(response.headers().contains_key("allow"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(code(&body), "method_not_allowed");
    // A path that is not UTF-8.
    let (status, body) = server.get("/v1/processes/%FF").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["code"].is_string(), "{body}");
    // A body over the limit on an endpoint that reads raw bytes.
    let (status, body) = server
        .post_raw(
            "/v1/processes/p/cancel",
            Some("application/json"),
            format!(r#"{{"reason":"{}"}}"#, "x".repeat(10_000)),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    // Unknown fields of a cancel request are refused, not ignored.
    let (status, body) = server
        .post("/v1/processes/p/cancel", json!({"reasons": "typo"}))
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
    assert_eq!(
        common::table_checksum(&url).await,
        before,
        "nothing was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bearer_scheme_is_case_insensitive() {
    let server = Server::start(&migrated_database_url().await, Some("s3cret")).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let response = server
            .client
            .get(server.url("/v1/processes"))
            .header("authorization", format!("{scheme} s3cret"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{scheme}");
    }
    let response = server
        .client
        .get(server.url("/v1/processes"))
        .header("authorization", "Basic s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_of_ended_processes_end_instead_of_reconnecting_forever() {
    let server = Server::start(&migrated_database_url().await, None).await;
    server.external("done").await;
    server
        .post("/v1/processes/done/events", json!({"event_type": "x"}))
        .await;
    server
        .post(
            "/v1/processes/done/complete",
            json!({"state": "completed", "output": null}),
        )
        .await;
    // The terminal event is seq 2: from 2 on, nothing will ever come.
    for (after, header) in [
        (Some(2), None),
        (Some(5), None),
        (None, Some("2")),
        (None, Some("40")),
    ] {
        let mut request = server.client.get(match after {
            Some(after) => server.url(&format!("/v1/processes/done/stream?after={after}")),
            None => server.url("/v1/processes/done/stream"),
        });
        if let Some(id) = header {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::NO_CONTENT,
            "{after:?} {header:?}"
        );
    }
    // Before the end, the stream delivers the rest and ends.
    let text = server
        .client
        .get(server.url("/v1/processes/done/stream?after=1"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("process.completed"), "{text}");
    // A running process cannot be resumed past its last event.
    server.external("running").await;
    let (status, body) = server.get("/v1/processes/running/stream?after=3").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_cancel_with_a_replay_key_is_written_once() {
    let url = migrated_database_url().await;
    let server = Server::start(&url, None).await;
    server.external("c").await;
    for _ in 0..3 {
        let (status, body) = server
            .post(
                "/v1/processes/c/cancel",
                json!({"reason": "stop", "replay_key": "cancel-1"}),
            )
            .await;
        assert!(
            status == StatusCode::OK || code(&body) == "process_terminal",
            "{status} {body}"
        );
    }
    let requests: i64 = common::sql_client(&url)
        .await
        .query_one(
            "SELECT count(*) FROM proclog.events
              WHERE process_id = 'c' AND event_type = 'process.cancel_requested'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn await_during_a_database_outage_is_503_not_a_timeout() {
    let url = migrated_database_url().await;
    let config: tokio_postgres::Config = url.parse().unwrap();
    let port = config.get_ports()[0];
    let proxy = common::proxy::TcpProxy::start(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let through = url.replacen(&format!(":{port}/"), &format!(":{}/", proxy.port()), 1);
    let server = Server::start(&through, None).await;
    server.external("w").await;
    proxy.set_mode(common::proxy::Mode::Drop);
    let (status, body) = server.get("/v1/processes/w/await?timeout_ms=1500").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        "{body}"
    );
    proxy.set_mode(common::proxy::Mode::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openapi_document_describes_every_route_and_is_public() {
    let server = Server::start(&migrated_database_url().await, Some("s3cret")).await;
    let (status, doc) = server.get("/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK, "served without the token");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/v1/processes", &["get", "post"][..]),
        ("/v1/processes/{id}", &["get"]),
        ("/v1/processes/{id}/events", &["get", "post"]),
        ("/v1/events", &["post"]),
        ("/v1/processes/{id}/stream", &["get"]),
        ("/v1/processes/{id}/complete", &["post"]),
        ("/v1/processes/{id}/cancel", &["post"]),
        ("/v1/processes/{id}/messages", &["post"]),
        ("/v1/processes/{id}/await", &["get"]),
        ("/v1/prune", &["post"]),
        ("/v1/pods", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
    ] {
        for method in methods {
            let operation = &paths[path][*method];
            assert!(operation.is_object(), "{method} {path} is described");
            if path.starts_with("/v1") {
                assert!(
                    operation["responses"]["400"].is_object(),
                    "{method} {path} documents its errors"
                );
            }
        }
    }
    if let Ok(out) = std::env::var("PROCLOG_OPENAPI_OUT") {
        std::fs::write(out, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    }
}

/// The deepest value accepted goes in and comes back out through every HTTP path (register,
/// get, list, append, events, stream, complete, await); one level deeper is refused on every
/// write and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_deepest_accepted_value_round_trips_over_http() {
    let server = Server::start_with(&migrated_database_url().await, None, 1 << 20).await;
    let nested = |depth: usize| {
        (0..depth).fold(json!("bottom"), |inner, level| {
            if level % 2 == 0 {
                json!([inner])
            } else {
                json!({"l": inner})
            }
        })
    };
    let deep = nested(proclog::validate::MAX_JSON_DEPTH);
    let too_deep = nested(proclog::validate::MAX_JSON_DEPTH + 1);
    let before = common::table_checksum(&server.database).await;
    let (status, _) = server
        .post(
            "/v1/processes",
            json!({"id": "deep", "kind": "k", "input": too_deep, "disposition": "external"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(common::table_checksum(&server.database).await, before);
    let (status, record) = server
        .post(
            "/v1/processes",
            json!({"id": "deep", "kind": "k", "input": deep, "disposition": "external"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(record["input"], deep);
    let (status, _) = server
        .post(
            "/v1/processes/deep/events",
            json!({"event_type": "t", "payload": too_deep}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = server
        .post(
            "/v1/processes/deep/events",
            json!({"event_type": "t", "payload": deep}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, got) = server.get("/v1/processes/deep").await;
    assert_eq!(got["input"], deep);
    let (_, listed) = server.get("/v1/processes").await;
    assert_eq!(listed["processes"][0]["input"], deep);
    let (_, page) = server.get("/v1/processes/deep/events").await;
    assert_eq!(page["events"][0]["payload"], deep);
    let (status, _) = server
        .post(
            "/v1/processes/deep/complete",
            json!({"state": "completed", "output": too_deep}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = server
        .post(
            "/v1/processes/deep/complete",
            json!({"state": "completed", "output": deep}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, terminal) = server.get("/v1/processes/deep/await?timeout_ms=1000").await;
    assert_eq!(terminal["output"], deep);
    let stream = server
        .client
        .get(server.url("/v1/processes/deep/stream"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data: Vec<Value> = stream
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["payload"], deep);
    assert_eq!(data[1]["payload"], deep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn children_are_listed_under_their_parent_and_cancelled_with_it() {
    let server = Server::start(&migrated_database_url().await, None).await;
    server.external("mother").await;
    for n in 0..3 {
        let (status, body) = server
            .post(
                "/v1/processes",
                json!({"id": format!("kid-{n}"), "kind": "k", "disposition": "external", "parent": "mother"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["parent"], "mother");
    }
    server.external("stranger").await;
    let (status, page) = server.get("/v1/processes/mother/children?limit=2").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let ids = |page: &Value| -> Vec<String> {
        page["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&page), ["kid-0", "kid-1"]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, rest) = server
        .get(&format!(
            "/v1/processes/mother/children?limit=2&cursor={}",
            urlencode(cursor)
        ))
        .await;
    assert_eq!(ids(&rest), ["kid-2"]);
    let (_, filtered) = server.get("/v1/processes?parent=mother&limit=10").await;
    assert_eq!(ids(&filtered), ["kid-0", "kid-1", "kid-2"]);

    let (status, body) = server.get("/v1/processes/nobody/children").await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, body) = server.get("/v1/processes?parent=bad%20id").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
    let before = common::table_checksum(&server.database).await;
    let (status, body) = server
        .post(
            "/v1/processes",
            json!({"id": "orphan", "kind": "k", "parent": "nobody"}),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_input"),
        "{body}"
    );
    assert_eq!(common::table_checksum(&server.database).await, before);

    let (status, record) = server
        .post("/v1/processes/mother/cancel", json!({"reason": "stop"}))
        .await;
    assert_eq!(
        (status, &record["status"]),
        (StatusCode::OK, &json!("cancelled"))
    );
    let (_, kids) = server.get("/v1/processes/mother/children").await;
    for kid in kids["processes"].as_array().unwrap() {
        assert_eq!(kid["status"], "cancelled", "{kid}");
    }
    let (_, stranger) = server.get("/v1/processes/stranger").await;
    assert_eq!(stranger["status"], "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn start_policies_over_http_say_what_happened() {
    let server = Server::start(&migrated_database_url().await, None).await;
    let start = |input: Value, policy: Value| json!({"kind": "hook", "input": input, "disposition": "external", "start_policy": policy});
    let post = |body: Value| {
        let request = server.client.post(server.url("/v1/processes")).json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let header = response.headers()["proclog-start"]
                .to_str()
                .unwrap()
                .to_owned();
            let body: Value = response.json().await.unwrap();
            (status, header, body)
        }
    };
    let dedup = json!({"policy": "deduplicate", "key": "delivery-1", "window_ms": 60000});
    let (status, header, first) = post(start(json!(1), dedup.clone())).await;
    assert_eq!(
        (status, header.as_str()),
        (StatusCode::CREATED, "created"),
        "{first}"
    );
    assert_eq!(first["start"], "created");
    let (status, header, second) = post(start(json!(2), dedup)).await;
    assert_eq!((status, header.as_str()), (StatusCode::OK, "deduplicated"));
    assert_eq!(
        (&second["id"], &second["start"]),
        (&first["id"], &json!("deduplicated"))
    );

    let single = json!({"policy": "singleton", "key": "tenant-1", "refuse": true});
    let (status, _, one) = post(start(json!(1), single.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{one}");
    let before = common::table_checksum(&server.database).await;
    let (status, body) = server.post("/v1/processes", start(json!(2), single)).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "start_refused")
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(one["id"].as_str().unwrap()),
        "the refusal names the process: {body}"
    );
    for bad in [
        json!({"policy": "deduplicate", "key": "k"}),
        json!({"policy": "sometimes", "key": "k"}),
        json!({"policy": "debounce", "key": "k", "window_ms": 0}),
        json!({"policy": "singleton", "key": ""}),
    ] {
        let (status, body) = server
            .post("/v1/processes", start(json!(3), bad.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    assert_eq!(common::table_checksum(&server.database).await, before);
    // A registration without a policy says it too, in the header only.
    let (status, header, plain) =
        post(json!({"id": "plain", "kind": "k", "disposition": "external"})).await;
    assert_eq!((status, header.as_str()), (StatusCode::CREATED, "created"));
    assert!(plain.get("start").is_none());
    let (_, header, _) = post(json!({"id": "plain", "kind": "k", "disposition": "external"})).await;
    assert_eq!(header, "existing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schedules_over_http() {
    let server = Server::start(&migrated_database_url().await, None).await;
    let spec = json!({"id": "nightly", "cron": "0 2 * * *", "time_zone": "Europe/Berlin",
                      "kind": "report", "input": {"full": true}, "catch_up": "run_once"});
    let (status, made) = server.post("/v1/schedules", spec.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    assert_eq!(
        (&made["overlap"], &made["paused"]),
        (&json!("skip"), &json!(false))
    );
    assert!(made["next_due_at"].is_string());
    let (status, again) = server.post("/v1/schedules", spec).await;
    assert_eq!((status, &again), (StatusCode::CREATED, &made));
    let (status, body) = server
        .post(
            "/v1/schedules",
            json!({"id": "nightly", "cron": "0 3 * * *", "kind": "report"}),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
    for bad in [
        json!({"id": "x", "cron": "every day", "kind": "k"}),
        json!({"id": "x", "cron": "* * * * *", "kind": "k", "time_zone": "Nowhere"}),
        json!({"id": "x", "cron": "* * * * *", "kind": "k", "overlap": "sometimes"}),
        json!({"id": "x", "cron": "* * * * *"}),
        json!({"id": "x", "cron": "* * * * *", "kind": "k", "unknown": 1}),
    ] {
        let (status, body) = server.post("/v1/schedules", bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (status, page) = server.get("/v1/schedules").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["schedules"].as_array().unwrap().len(), 1);
    let (status, paused) = server.post("/v1/schedules/nightly/pause", json!({})).await;
    assert_eq!((status, &paused["paused"]), (StatusCode::OK, &json!(true)));
    let (_, resumed) = server.post("/v1/schedules/nightly/resume", json!({})).await;
    assert_eq!(resumed["paused"], false);
    let (status, process) = server
        .post("/v1/schedules/nightly/trigger", json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{process}");
    assert_eq!(
        (&process["kind"], &process["input"]),
        (&json!("report"), &json!({"full": true}))
    );
    // A write without JSON (a form from another page) is refused.
    let (status, _) = server
        .post_raw(
            "/v1/schedules/nightly/pause",
            Some("application/x-www-form-urlencoded"),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, body) = server.get("/v1/schedules/none-such").await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, body) = server.get("/v1/schedules/bad%20id").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
    let (status, body) = server.get("/v1/schedules?limit=0").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
    let (status, body) = server
        .call(reqwest::Method::DELETE, "/v1/schedules/nightly", None)
        .await;
    assert_eq!(
        (status, &body["deleted"]),
        (StatusCode::OK, &json!("nightly"))
    );
    let (status, _) = server
        .call(reqwest::Method::DELETE, "/v1/schedules/nightly", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_limits_over_http() {
    let server = Server::start(&migrated_database_url().await, None).await;
    let (status, page) = server.get("/v1/queues").await;
    assert_eq!((status, &page["queues"]), (StatusCode::OK, &json!([])));
    let limits = json!({"queue": {"concurrency": 0, "rate": {"starts": 10, "period_ms": 1000}},
                        "each_key": {"per_pod": 1}, "keys": {"tenant-7": {"concurrency": 3}}});
    let (status, set) = server
        .call(
            reqwest::Method::PUT,
            "/v1/queues/mail",
            Some(limits.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(set["queue"], "mail");
    assert_eq!(set["limits"], limits);
    // Work registered in the queue waits: concurrency 0 holds it.
    let (status, process) = server
        .post(
            "/v1/processes",
            json!({"kind": "send", "queue": "mail", "concurrency_key": "tenant-7", "priority": 5}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{process}");
    assert_eq!(
        (
            &process["queue"],
            &process["concurrency_key"],
            &process["priority"]
        ),
        (&json!("mail"), &json!("tenant-7"), &json!(5))
    );
    let (status, view) = server.get("/v1/queues/mail").await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(
        view["keys"],
        json!([{"key": "tenant-7", "running": 0, "ready": 1}])
    );
    let (status, page) = server.get("/v1/queues").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["queues"][0]["queue"], "mail");
    for bad in [
        json!({"queue": {"concurrency": -1}}),
        json!({"queue": {"rate": {"starts": 0, "period_ms": 1000}}}),
        json!({"each_key": {"rate": {"starts": 1, "period_ms": 0}}}),
        json!({"keys": {"": {}}}),
        json!({"unknown": 1}),
        json!([]),
    ] {
        let (status, body) = server
            .call(reqwest::Method::PUT, "/v1/queues/mail", Some(bad.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (status, body) = server
        .call(
            reqwest::Method::PUT,
            "/v1/queues/bad%20name",
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_input")
    );
    for bad in [
        json!({"kind": "send", "queue": "bad name"}),
        json!({"kind": "send", "concurrency_key": ""}),
        json!({"kind": "send", "priority": 101}),
        json!({"kind": "send", "priority": 40000}),
    ] {
        let (status, body) = server.post("/v1/processes", bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (status, body) = server.get("/v1/queues/none-such").await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    // The limits stand after the refusals.
    let (_, view) = server.get("/v1/queues/mail").await;
    assert_eq!(view["limits"], limits);
    let (status, body) = server
        .call(reqwest::Method::DELETE, "/v1/queues/mail", None)
        .await;
    assert_eq!((status, &body["deleted"]), (StatusCode::OK, &json!("mail")));
    let (status, body) = server
        .call(reqwest::Method::DELETE, "/v1/queues/mail", None)
        .await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
}

/// `POST /v1/events`: appends to many processes in one request, each answered on its own, in
/// request order; one process's appends together and in order; a request that breaks a rule
/// refused whole, naming the append, with nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_of_appends_to_many_processes_answers_each_append() {
    let server = Server::start(&migrated_database_url().await, None).await;
    for id in ["b-1", "b-2", "b-done"] {
        server.external(id).await;
    }
    let (status, _) = server
        .post(
            "/v1/processes/b-done/complete",
            json!({"state": "completed"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server
        .post(
            "/v1/events",
            json!({"appends": [
                {"process_id": "b-1", "event_type": "a", "payload": {"n": 1}},
                {"process_id": "b-2", "event_type": "a", "replay_key": "k-1"},
                {"process_id": "b-1", "event_type": "b", "payload": {"n": 2}},
                {"process_id": "missing", "event_type": "a"},
                {"process_id": "b-done", "event_type": "a"},
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().unwrap();
    let statuses: Vec<u64> = results
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [201, 201, 201, 404, 409], "{body}");
    assert_eq!(
        (
            results[0]["event"]["seq"].as_i64(),
            results[2]["event"]["seq"].as_i64()
        ),
        (Some(1), Some(2)),
        "one process's appends in request order"
    );
    assert_eq!(results[2]["event"]["payload"], json!({"n": 2}));
    assert_eq!(results[3]["error"]["code"], "not_found");
    assert_eq!(results[4]["error"]["code"], "process_terminal");

    // A retry with the same replay key answers 200 with the stored event.
    let retry = json!({"appends": [{"process_id": "b-2", "event_type": "a", "replay_key": "k-1"}]});
    let (_, again) = server.post("/v1/events", retry).await;
    assert_eq!(again["results"][0]["status"], 200, "{again}");
    assert_eq!(again["results"][0]["replayed"], true);
    assert_eq!(again["results"][0]["event"], results[1]["event"]);

    // Refused whole, nothing written: empty, too many, not a batch, a malformed append, two
    // appends to one process that cannot be written together.
    let many: Vec<Value> = (0..1001)
        .map(|_| json!({"process_id": "b-1", "event_type": "a"}))
        .collect();
    let ok = json!({"process_id": "b-1", "event_type": "a"});
    let fence = json!({"token": "00000000-0000-0000-0000-000000000001", "generation": 1});
    for (bad, names) in [
        (json!({"appends": []}), ""),
        (json!({"appends": many}), ""),
        (json!({"appends": [ok, {"event_type": "a"}]}), ""),
        (json!([ok]), ""),
        (
            json!({"appends": [ok, {"process_id": "not an id", "event_type": "a"}]}),
            "appends[1]",
        ),
        (
            json!({"appends": [ok, {"process_id": "b-2", "event_type": "process.completed"}]}),
            "appends[1]",
        ),
        (
            json!({"appends": [ok, {"process_id": "b-2", "event_type": "a", "replay_key": "proclog:x"}]}),
            "appends[1]",
        ),
        (
            json!({"appends": [ok, {"process_id": "b-1", "event_type": "a", "fence": fence}]}),
            "appends[1]",
        ),
        (
            json!({"appends": [
            {"process_id": "b-2", "event_type": "a", "replay_key": "k-2"}, ok,
            {"process_id": "b-2", "event_type": "b", "replay_key": "k-2"}]}),
            "appends[2]",
        ),
        (json!({"appends": [ok], "extra": 1}), ""),
    ] {
        let (status, body) = server.post("/v1/events", bad).await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::BAD_REQUEST, "invalid_input"),
            "{body}"
        );
        assert!(
            body["error"]["message"].as_str().unwrap().contains(names),
            "{body}"
        );
    }
    let (status, body) = server
        .post_raw("/v1/events", Some("application/json"), "{")
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_json")
    );
    let (status, _) = server
        .post_raw("/v1/events", Some("text/plain"), "{}")
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    for (id, count) in [("b-1", 2), ("b-2", 1)] {
        let (_, events) = server.get(&format!("/v1/processes/{id}/events")).await;
        assert_eq!(
            events["events"].as_array().unwrap().len(),
            count,
            "{id}: {events}"
        );
    }
}
