//! The pods table, the web console's pages and actions, and `/metrics` parsed by a
//! Prometheus text parser, against in-process pods on a real Postgres.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use proclog::http::HttpServer;
use proclog::pod::{Pod, demo_engines};
use proclog::{ProcessId, ProcessRegistration, Proclog, testing};
use reqwest::StatusCode;
use serde_json::{Value, json};

use common::sql_client;

/// Safety cap on every wait (never a timing assertion).
const CAP: Duration = Duration::from_secs(60);

async fn start_pod(
    url: &str,
    name: &str,
    concurrency: usize,
    token: Option<&str>,
) -> (Proclog, Pod, HttpServer) {
    let stack = Proclog::builder(url)
        .pod_id(name)
        .lease_ttl(Duration::from_millis(1500))
        .start()
        .await
        .unwrap();
    let pod = Pod::builder(&stack)
        .engines(demo_engines())
        .concurrency(concurrency)
        .poll_interval(Duration::from_millis(200))
        .heartbeat_every(Duration::from_millis(200))
        .grace(Duration::from_millis(500));
    let pod = pod.start().await.unwrap();
    let http = HttpServer::start(
        &stack,
        Some(&pod),
        "127.0.0.1:0".parse().unwrap(),
        proclog::http::HttpOptions {
            token: token.map(str::to_owned),
            demo_form: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    (stack, pod, http)
}

/// A pod on a runtime of its own, which can vanish without any shutdown (as if killed).
struct Doomed {
    runtime: tokio::runtime::Runtime,
    kept: (Proclog, Pod, HttpServer),
    base: String,
}

impl Doomed {
    async fn start(url: &str, name: &str, concurrency: usize) -> Self {
        let (url, name) = (url.to_owned(), name.to_owned());
        tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let kept = runtime.block_on(start_pod(&url, &name, concurrency, None));
            let base = base(&kept.2);
            Self {
                runtime,
                kept,
                base,
            }
        })
        .await
        .unwrap()
    }

    /// Drops the runtime and everything on it: no shutdown, no goodbye.
    async fn vanish(self) {
        std::mem::forget(self.kept);
        let runtime = self.runtime;
        tokio::task::spawn_blocking(move || runtime.shutdown_background())
            .await
            .unwrap();
    }
}

fn base(http: &HttpServer) -> String {
    format!("http://{}", http.address())
}

/// Polls `check` until it returns `Some`, at most [`CAP`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + CAP;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn pod_status(url: &str, pod: &str) -> Option<String> {
    sql_client(url)
        .await
        .query_opt(
            "SELECT status FROM proclog.pod_status WHERE pod_id = $1",
            &[&pod],
        )
        .await
        .unwrap()
        .map(|row| row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pods_register_heartbeat_stop_and_go_stale() {
    let url = testing::migrated_database_url().await.unwrap();
    let (stack_a, pod_a, http_a) = start_pod(&url, "pod-a", 2, None).await;
    assert_eq!(pod_status(&url, "pod-a").await.as_deref(), Some("running"));
    let client = sql_client(&url).await;
    let row = client
        .query_one(
            "SELECT address, version, concurrency, heartbeat_at FROM proclog.pods
              WHERE pod_id = 'pod-a'",
            &[],
        )
        .await
        .unwrap();
    let address: Option<String> = row.get(0);
    assert_eq!(address, Some(http_a.address().to_string()));
    assert_eq!(row.get::<_, String>(1), env!("CARGO_PKG_VERSION"));
    assert_eq!(row.get::<_, i32>(2), 2);
    let first: chrono::DateTime<chrono::Utc> = row.get(3);
    // Heartbeats move the row forward on the database clock.
    eventually("a heartbeat", || async {
        let now: chrono::DateTime<chrono::Utc> = sql_client(&url)
            .await
            .query_one(
                "SELECT heartbeat_at FROM proclog.pods WHERE pod_id = 'pod-a'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (now > first).then_some(())
    })
    .await;

    // A clean stop marks the row stopped.
    pod_a.shutdown().await;
    http_a.shutdown().await;
    stack_a.shutdown().await;
    assert_eq!(pod_status(&url, "pod-a").await.as_deref(), Some("stopped"));

    // A pod whose process vanishes (runtime dropped: no shutdown) goes stale: gone.
    let doomed = Doomed::start(&url, "pod-b", 1).await;
    assert_eq!(pod_status(&url, "pod-b").await.as_deref(), Some("running"));
    doomed.vanish().await;
    eventually("pod-b shown as gone", || async {
        (pod_status(&url, "pod-b").await.as_deref() == Some("gone")).then_some(())
    })
    .await;

    // The same pod id started again is a new incarnation: running, new started_at.
    let (stack_b, pod_b, http_b) = start_pod(&url, "pod-b", 1, None).await;
    assert_eq!(pod_status(&url, "pod-b").await.as_deref(), Some("running"));
    let listed: Value = reqwest::get(format!("{}/v1/pods", base(&http_b)))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let statuses: HashMap<String, String> = listed["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pod| {
            (
                pod["pod_id"].as_str().unwrap().to_owned(),
                pod["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(statuses["pod-a"], "stopped");
    assert_eq!(statuses["pod-b"], "running");
    pod_b.shutdown().await;
    http_b.shutdown().await;
    stack_b.shutdown().await;
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_lists_shows_starts_and_cancels() {
    let url = testing::migrated_database_url().await.unwrap();
    // Concurrency 0: nothing runs here, so a started demo stays cancellable.
    let (stack, pod, http) = start_pod(&url, "console-pod", 0, None).await;
    let client = no_redirects();
    let home = base(&http);

    let page = client.get(&home).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"data-pod="console-pod""#), "{html}");
    assert!(html.contains("/ui/assets/console.js"));

    // Start a demo process from the form: redirected to its page.
    let started = client
        .post(format!("{home}/ui/demo"))
        .form(&[("steps", "3"), ("delay_ms", "10"), ("disposition", "rerun")])
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::SEE_OTHER);
    let location = started.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("/ui/processes/"), "{location}");
    let id = location.trim_start_matches("/ui/processes/").to_owned();

    let page = client
        .get(format!("{home}{location}"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"id="timeline""#));
    assert!(html.contains(&format!(r#"data-process="{id}""#)));
    assert!(html.contains("cancel-form"));

    // The list shows it, and filters by status and kind.
    let html = client
        .get(format!("{home}/?status=pending&kind=steps"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains(&format!(r#"data-process="{id}""#)), "{html}");
    let html = client
        .get(format!("{home}/?status=completed"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!html.contains(&format!(r#"data-process="{id}""#)));

    // Cancel it from its page.
    let cancelled = client
        .post(format!("{home}/ui/processes/{id}/cancel"))
        .form(&[("reason", "not needed <b>now</b>")])
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), StatusCode::SEE_OTHER);
    let html = client
        .get(format!("{home}/ui/processes/{id}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains(r#"id="status">cancelled"#), "{html}");
    assert!(html.contains("process.cancelled"));
    assert!(!html.contains("<b>now</b>"), "user text is escaped: {html}");
    assert!(
        !html.contains("cancel-form"),
        "an ended process has no cancel button"
    );

    // Another site cannot make a browser act here (cross-site request forgery).
    for (header, value) in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
    ] {
        let forged = client
            .post(format!("{home}/ui/demo"))
            .header(header, value)
            .form(&[("steps", "1")])
            .send()
            .await
            .unwrap();
        assert_eq!(forged.status(), StatusCode::FORBIDDEN, "{header}: {value}");
    }
    let own = client
        .post(format!("{home}/ui/demo"))
        .header("origin", &home)
        .header("sec-fetch-site", "same-origin")
        .form(&[("steps", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        own.status(),
        StatusCode::SEE_OTHER,
        "the console's own form works"
    );

    // Bad input: clear pages, nothing written.
    let missing = client
        .get(format!("{home}/ui/processes/no-such-process"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert!(missing.text().await.unwrap().contains("No process"));
    let bad = client
        .get(format!("{home}/ui/processes/bad%20id"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let again = client
        .post(format!("{home}/ui/processes/{id}/cancel"))
        .form(&[("reason", "twice")])
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT, "already ended");
    let hostile = client
        .get(format!(
            "{home}/?before=not-a-cursor&status=%3Cscript%3E&kind={}",
            "k".repeat(5000)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(hostile.status(), StatusCode::OK);
    assert!(!hostile.text().await.unwrap().contains("<script>"));
    let asset = client
        .get(format!("{home}/ui/assets/../../etc/passwd"))
        .send()
        .await
        .unwrap();
    assert_eq!(asset.status(), StatusCode::NOT_FOUND);

    pod.shutdown().await;

    http.shutdown().await;
    stack.shutdown().await;
}

/// A waiting process on the console: what it waits for, the message form that wakes it, and
/// the panel of what later runs replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_shows_a_wait_and_its_message_form_wakes_it() {
    let url = testing::migrated_database_url().await.unwrap();
    let (stack, pod, http) = start_pod(&url, "console-waits", 2, None).await;
    let client = no_redirects();
    let home = base(&http);
    let record = stack
        .registry()
        .register_process(
            ProcessRegistration::new(
                "order",
                json!({"work_ms": 1, "ship_after_ms": 10, "declines": 0}),
            )
            .timeout(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    let id = record.id.clone();
    let page_of = |client: reqwest::Client, home: String, id: ProcessId| async move {
        client
            .get(format!("{home}/ui/processes/{id}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let html = eventually("the order waits for approval", || {
        let page = page_of(client.clone(), home.clone(), id.clone());
        async move {
            let html = page.await;
            html.contains(r#"id="status">waiting"#).then_some(html)
        }
    })
    .await;
    assert!(
        html.contains(r#"<dd id="waits">a message of <code>approve</code>"#),
        "{html}"
    );
    assert!(html.contains(r#"id="deadline""#));
    assert!(html.contains("message-form"));
    assert!(
        html.contains(r#"id="steps""#),
        "the stored step is listed: {html}"
    );
    assert!(html.contains("<td>reserve</td>"));
    let overview = client
        .get(format!("{home}/?status=waiting"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(overview.contains(&format!(r#"data-process="{id}""#)));

    let bad = client
        .post(format!("{home}/ui/processes/{id}/messages"))
        .form(&[("topic", "approve"), ("payload", "{not json")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let sent = client
        .post(format!("{home}/ui/processes/{id}/messages"))
        .form(&[("topic", "approve"), ("payload", r#"{"by": "console"}"#)])
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::SEE_OTHER);
    let end = stack
        .driver()
        .await_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(end.state, proclog::TerminalState::Completed);
    let html = page_of(client.clone(), home.clone(), id.clone()).await;
    assert!(html.contains("1 later run(s) since"), "{html}");
    assert!(
        !html.contains("message-form"),
        "an ended process takes no message"
    );
    pod.shutdown().await;
    http.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_token_the_console_asks_for_it_once() {
    let url = testing::migrated_database_url().await.unwrap();
    let (stack, pod, http) = start_pod(&url, "guarded", 0, Some("s3cret")).await;
    let client = no_redirects();
    let home = base(&http);
    let page = client.get(&home).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::SEE_OTHER);
    assert_eq!(page.headers()["location"], "/ui/login");
    let demo = client
        .post(format!("{home}/ui/demo"))
        .form(&[("steps", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(demo.status(), StatusCode::UNAUTHORIZED);
    let wrong = client
        .post(format!("{home}/ui/login"))
        .form(&[("token", "guess")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(!wrong.headers().contains_key("set-cookie"));
    let right = client
        .post(format!("{home}/ui/login"))
        .form(&[("token", "s3cret")])
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::SEE_OTHER);
    let cookie = right.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    assert!(
        !cookie.contains("s3cret"),
        "the cookie never carries the token: {cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let page = client
        .get(&home)
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    // The cookie opens /v1 too (the page's event stream uses it); nothing else does.
    let pods = client
        .get(format!("{home}/v1/pods"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(pods.status(), StatusCode::OK);
    let pods = client.get(format!("{home}/v1/pods")).send().await.unwrap();
    assert_eq!(pods.status(), StatusCode::UNAUTHORIZED);
    // The cookie opens reads of /v1, never writes: those need the token itself.
    let write = client
        .post(format!("{home}/v1/processes"))
        .header("cookie", &pair)
        .json(&json!({"kind": "k"}))
        .send()
        .await
        .unwrap();
    assert_eq!(write.status(), StatusCode::UNAUTHORIZED);
    // A cookie made up from the token itself is refused too.
    let forged = client
        .get(&home)
        .header("cookie", "proclog_token=s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::SEE_OTHER);
    // The session ends: Max-Age bounds it in the browser, and its expiry is part of what
    // the HMAC covers, so an old cookie (or one whose expiry was pushed back) is refused.
    assert!(cookie.contains("Max-Age=43200"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain http: {cookie}");
    let value = pair.split_once('=').unwrap().1;
    let (expires, tag) = value.split_once('.').unwrap();
    let extended = format!(
        "proclog_token={}.{tag}",
        expires.parse::<i64>().unwrap() + 3600
    );
    let expired = "proclog_token=1000.0000";
    for stale in [extended.as_str(), expired] {
        let page = client
            .get(&home)
            .header("cookie", stale)
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), StatusCode::SEE_OTHER, "{stale}");
    }
    // Behind TLS (a proxy that says so), the cookie is Secure.
    let secure = client
        .post(format!("{home}/ui/login"))
        .header("x-forwarded-proto", "https")
        .form(&[("token", "s3cret")])
        .send()
        .await
        .unwrap();
    assert!(
        secure.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("; Secure")
    );
    // Signing out clears the cookie.
    let page = client
        .get(&home)
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert!(page.text().await.unwrap().contains("/ui/logout"));
    let out = client
        .post(format!("{home}/ui/logout"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert_eq!(out.headers()["location"], "/ui/login");
    let cleared = out.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cleared.starts_with("proclog_token=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    pod.shutdown().await;
    http.shutdown().await;
    stack.shutdown().await;
}

type Exposition = openmetrics_parser::MetricsExposition<
    openmetrics_parser::OpenMetricsType,
    openmetrics_parser::OpenMetricsValue,
>;

/// `/metrics`, parsed by an OpenMetrics parser (the format Prometheus scrapes from it).
async fn scrape(base: &str) -> Exposition {
    let response = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();
    openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|err| panic!("a valid OpenMetrics exposition ({err:?}):\n{text}"))
}

/// The observation count of histogram `name`, summed over the label sets matching `labels`.
fn histogram_count(scrape: &Exposition, name: &str, labels: &[(&str, &str)]) -> u64 {
    let Some(family) = scrape.families.get(name) else {
        panic!("{name} is exported")
    };
    family
        .iter_samples()
        .filter(|sample| {
            let set = sample.get_labelset().unwrap();
            labels
                .iter()
                .all(|(key, value)| set.get_label_value(key) == Some(*value))
        })
        .map(|sample| match &sample.value {
            openmetrics_parser::OpenMetricsValue::Histogram(histogram) => {
                histogram.count.unwrap_or(0)
            }
            other => panic!("{name} is a histogram, not {other:?}"),
        })
        .sum()
}

/// The value of counter or gauge `name` (counters by family name, without `_total`).
fn counter(scrape: &Exposition, name: &str) -> f64 {
    let family = scrape
        .families
        .get(name)
        .unwrap_or_else(|| panic!("{name} is exported"));
    let sample = family.iter_samples().next().expect("one sample");
    match &sample.value {
        openmetrics_parser::OpenMetricsValue::Counter(counter) => counter.value.as_f64(),
        openmetrics_parser::OpenMetricsValue::Gauge(gauge) => gauge.as_f64(),
        other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_and_each_histogram_moves_with_its_event() {
    let url = testing::migrated_database_url().await.unwrap();
    // Pod A runs processes; pod B only serves (its waiters and notices are what move).
    let (stack_a, pod_a, http_a) = start_pod(&url, "metrics-a", 4, None).await;
    let (stack_b, pod_b, http_b) = start_pod(&url, "metrics-b", 0, None).await;
    stack_a.listener_ready().await;
    stack_b.listener_ready().await;
    let (a, b) = (base(&http_a), base(&http_b));
    let http = reqwest::Client::new();

    let before_a = scrape(&a).await;
    let before_b = scrape(&b).await;
    for name in [
        "proclog_append_duration_seconds",
        "proclog_notice_latency_seconds",
        "proclog_await_wake_seconds",
        "proclog_claim_to_start_seconds",
        "proclog_takeover_seconds",
    ] {
        assert_eq!(
            histogram_count(&before_a, name, &[]),
            0,
            "{name} starts at 0"
        );
    }
    assert_eq!(counter(&before_a, "proclog_appended_events"), 0.0);
    assert_eq!(
        histogram_count(&before_b, "proclog_notice_latency_seconds", &[]),
        0
    );

    // An external process appended to through pod A: append latency on A, a notice on B.
    let created = http
        .post(format!("{a}/v1/processes"))
        .json(&json!({"id": "m-1", "kind": "k", "disposition": "external"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let appended = http
        .post(format!("{a}/v1/processes/m-1/events"))
        .json(&json!({"event_type": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(appended.status(), StatusCode::CREATED);
    let after = scrape(&a).await;
    assert_eq!(
        histogram_count(&after, "proclog_append_duration_seconds", &[]),
        1
    );
    assert_eq!(counter(&after, "proclog_appended_events"), 1.0);
    assert!(
        histogram_count(
            &after,
            "proclog_http_request_duration_seconds",
            &[
                ("route", "/v1/processes/{id}/events"),
                ("method", "POST"),
                ("status", "201")
            ]
        ) >= 1,
        "requests are recorded by route template, method and status"
    );
    eventually("the notice reaches pod B", || async {
        (histogram_count(&scrape(&b).await, "proclog_notice_latency_seconds", &[]) >= 1)
            .then_some(())
    })
    .await;

    // A waiter on pod B, woken by a completion through pod A.
    let waiter = {
        let (http, b) = (http.clone(), b.clone());
        tokio::spawn(async move {
            http.get(format!("{b}/v1/processes/m-1/await?timeout_ms=30000"))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    eventually("the waiter is registered", || async {
        (counter(&scrape(&b).await, "proclog_await_waiters") == 1.0).then_some(())
    })
    .await;
    let completed = http
        .post(format!("{a}/v1/processes/m-1/complete"))
        .json(&json!({"state": "completed", "output": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(completed.status(), StatusCode::OK);
    assert_eq!(waiter.await.unwrap(), StatusCode::OK);
    assert_eq!(
        histogram_count(&scrape(&b).await, "proclog_await_wake_seconds", &[]),
        1
    );

    // A demo run on pod A: claim to start.
    let demo = http
        .post(format!("{a}/v1/processes"))
        .json(&json!({"id": "m-2", "kind": "steps", "input": {"steps": 1, "delay_ms": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(demo.status(), StatusCode::CREATED);
    eventually("the run starts", || async {
        (histogram_count(&scrape(&a).await, "proclog_claim_to_start_seconds", &[]) >= 1)
            .then_some(())
    })
    .await;
    assert_eq!(
        histogram_count(&scrape(&a).await, "proclog_takeover_seconds", &[]),
        0
    );

    pod_b.shutdown().await;

    http_b.shutdown().await;
    stack_b.shutdown().await;
    pod_a.shutdown().await;
    http_a.shutdown().await;
    stack_a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_moves_the_takeover_histogram() {
    let url = testing::migrated_database_url().await.unwrap();
    // Pod A runs a long demo, then vanishes without a word (runtime dropped).
    let doomed = Doomed::start(&url, "doomed", 1).await;
    let a = doomed.base.clone();
    let created = reqwest::Client::new()
        .post(format!("{a}/v1/processes"))
        .json(&json!({"id": "t-1", "kind": "steps", "input": {"steps": 200, "delay_ms": 50}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let client = sql_client(&url).await;
    eventually("pod A runs it", || async {
        let owner: Option<String> = client
            .query_one(
                "SELECT lease_owner FROM proclog.processes WHERE process_id = 't-1'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (owner.as_deref() == Some("doomed")).then_some(())
    })
    .await;
    doomed.vanish().await;
    // Pod B takes it over once the lease lapses.
    let (stack_b, pod_b, http_b) = start_pod(&url, "survivor", 1, None).await;
    let b = base(&http_b);
    eventually("the takeover is recorded", || async {
        (histogram_count(&scrape(&b).await, "proclog_takeover_seconds", &[]) >= 1).then_some(())
    })
    .await;
    pod_b.shutdown().await;
    http_b.shutdown().await;
    stack_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_page_shows_its_parent_and_its_children() {
    let url = testing::migrated_database_url().await.unwrap();
    let (stack, pod, http) = start_pod(&url, "pod-tree", 1, None).await;
    let registry = stack.registry();
    let parent = registry
        .register_process(
            ProcessRegistration::new("tree", json!(null))
                .with_id(ProcessId::new("tree-root").unwrap())
                .with_disposition(proclog::Disposition::External),
        )
        .await
        .unwrap();
    for name in ["leaf-a", "leaf-<b>"] {
        let id = ProcessId::new(name.replace(['<', '>'], "_")).unwrap();
        registry
            .register_process(
                ProcessRegistration::new("tree", json!(name))
                    .with_id(id)
                    .with_parent(parent.id.clone())
                    .with_disposition(proclog::Disposition::External),
            )
            .await
            .unwrap();
    }
    let client = reqwest::Client::new();
    let home = base(&http);
    let page = client
        .get(format!("{home}/ui/processes/tree-root"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"id="children""#), "{page}");
    assert!(page.contains(r#"<a href="/ui/processes/leaf-a">leaf-a</a>"#));
    assert!(page.contains(r#"<a href="/ui/processes/leaf-_b_">leaf-_b_</a>"#));
    let leaf = client
        .get(format!("{home}/ui/processes/leaf-a"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        leaf.contains(r#"<dd id="parent"><a href="/ui/processes/tree-root">tree-root</a></dd>"#),
        "{leaf}"
    );
    assert!(
        !leaf.contains(r#"id="children""#),
        "a leaf has no children panel"
    );
    // A spawn is listed with the steps: its name and its child.
    let fan = registry
        .register_process(
            ProcessRegistration::new("fanout", json!({"children": 1, "steps": 1, "delay_ms": 10}))
                .with_id(ProcessId::new("fan").unwrap()),
        )
        .await
        .unwrap();
    stack.driver().await_terminal(&fan.id, CAP).await.unwrap();
    let page = client
        .get(format!("{home}/ui/processes/fan"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(r#"<tr class="child"><td>child</td><td>c0</td>"#),
        "{page}"
    );
    assert!(page.contains("<code>fan.c0</code>"), "{page}");
    http.shutdown().await;
    pod.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_schedules_page_lists_pauses_resumes_triggers_and_deletes() {
    let url = testing::migrated_database_url().await.unwrap();
    let (stack, pod, http) = start_pod(&url, "pod-sched", 1, None).await;
    let spec: proclog::schedule::ScheduleSpec = serde_json::from_value(json!({
        "id": "nightly<x>".replace(['<', '>'], "_"), "cron": "0 2 * * *", "kind": "steps",
        "input": {"steps": 1}, "disposition": "external"
    }))
    .unwrap();
    proclog::pod::scheduler::create_schedule(
        stack.cluster().as_ref(),
        stack.registry().as_ref(),
        &spec,
    )
    .await
    .unwrap();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let home = base(&http);
    let page = |client: reqwest::Client| {
        let home = home.clone();
        async move {
            client
                .get(format!("{home}/ui/schedules"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let html = page(client.clone()).await;
    assert!(
        html.contains(r#"<tr data-schedule="nightly_x_">"#),
        "{html}"
    );
    assert!(html.contains(r#"action="/ui/schedules/nightly_x_/pause""#));
    let post = |action: &str| {
        client
            .post(format!("{home}/ui/schedules/nightly_x_/{action}"))
            .form(&[("go", "1")])
            .send()
    };
    assert_eq!(post("pause").await.unwrap().status(), StatusCode::SEE_OTHER);
    let html = page(client.clone()).await;
    assert!(
        html.contains("<td>paused</td>") && html.contains("/resume"),
        "{html}"
    );
    assert_eq!(
        post("resume").await.unwrap().status(),
        StatusCode::SEE_OTHER
    );
    let triggered = post("trigger").await.unwrap();
    assert_eq!(triggered.status(), StatusCode::SEE_OTHER);
    let location = triggered.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with("/ui/processes/nightly_x_.manual."),
        "{location}"
    );
    assert_eq!(
        post("explode").await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post("delete").await.unwrap().status(),
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        post("delete").await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert!(page(client.clone()).await.contains("No schedules yet"));
    http.shutdown().await;
    pod.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queues_page_shows_limits_and_the_work_of_each_key() {
    let url = testing::migrated_database_url().await.unwrap();
    let (stack, pod, http) = start_pod(&url, "pod-queues", 1, None).await;
    let home = base(&http);
    let page = || async {
        reqwest::get(format!("{home}/ui/queues"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert!(page().await.contains("No queue has limits"));
    let limits: proclog::queue::QueueLimits = serde_json::from_value(json!({
        "queue": {"concurrency": 0}, "each_key": {"per_pod": 2},
        "keys": {"<b>tenant</b>": {"rate": {"starts": 5, "period_ms": 60000}}}
    }))
    .unwrap();
    stack
        .cluster()
        .set_queue("outbound", &limits)
        .await
        .unwrap();
    for key in ["<b>tenant</b>", "<b>tenant</b>", "plain"] {
        stack
            .registry()
            .register_process(
                proclog::ProcessRegistration::new("steps", json!({"steps": 1}))
                    .in_queue("outbound")
                    .with_concurrency_key(key),
            )
            .await
            .unwrap();
    }
    let html = page().await;
    assert!(
        html.contains(r#"<article class="queue" data-queue="outbound">"#),
        "{html}"
    );
    assert!(
        html.contains("queue: 0 at once · each key: 2 per pod · 0 running, 3 ready"),
        "{html}"
    );
    assert!(
        html.contains("<code>&lt;b&gt;tenant&lt;/b&gt;</code>: 5 per 60000 ms"),
        "{html}"
    );
    assert!(
        html.contains("<tr><td>&lt;b&gt;tenant&lt;/b&gt;</td><td>0</td><td>2</td></tr>"),
        "{html}"
    );
    assert!(!html.contains("<b>tenant</b>"), "escaped");
    // A process's page names its queue, key and priority.
    let placed = stack
        .registry()
        .register_process(
            proclog::ProcessRegistration::new("steps", json!({"steps": 1}))
                .in_queue("outbound")
                .with_concurrency_key("<i>k</i>")
                .with_priority(-7),
        )
        .await
        .unwrap();
    let process_page = reqwest::get(format!("{home}/ui/processes/{}", placed.id))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        process_page.contains(r#"<dd id="queue"><a href="/ui/queues">outbound</a>, key <code>&lt;i&gt;k&lt;/i&gt;</code>, priority -7</dd>"#),
        "{process_page}"
    );
    http.shutdown().await;
    pod.shutdown().await;
    stack.shutdown().await;
}
