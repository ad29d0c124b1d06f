//! CONTRACT §12: every resource a client can hold on a pod is bounded, each bound answers
//! with a clear status, and the probes keep answering. Connections (idle and half-sent),
//! streams, and the label values of `/metrics`.

mod common;

use std::time::Duration;

use common::migrated_database_url;
use proclog::http::{HttpOptions, HttpServer, ServerLimits};
use proclog::pod::Pod;
use proclog::{AppendRequest, Disposition, ProcessRegistration, Proclog};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A stack, its pod and its HTTP face.
struct Served {
    stack: Proclog,
    pod: Pod,
    http: HttpServer,
}

impl Served {
    async fn shutdown(self) {
        self.pod.shutdown().await;
        self.http.shutdown().await;
        self.stack.shutdown().await;
    }
}

async fn pod_with(options: HttpOptions) -> (Served, String) {
    let url = migrated_database_url().await;
    let stack = Proclog::builder(&url)
        .pod_id(format!("limits-{}", uuid::Uuid::new_v4().simple()))
        .start()
        .await
        .unwrap();
    let pod = Pod::builder(&stack).concurrency(0).start().await.unwrap();
    let http = HttpServer::start(&stack, Some(&pod), "127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let base = format!("http://{}", http.address());
    (Served { stack, pod, http }, base)
}

/// A client that opens a new connection for every request, as a probe does.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn metric(client: &reqwest::Client, base: &str, name: &str) -> u64 {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// Before the cap, 1,100 idle sockets at a 1,024 file limit made probes and appends time out.
/// Now, past the connection cap, the oldest idle connection (never sent a byte, or sent half
/// a request head) is closed for each newcomer: probes and an append still get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_half_open_connections_past_the_cap_leave_probes_and_appends_answering() {
    let cap = 40;
    let (served, base) = pod_with(HttpOptions {
        limits: ServerLimits {
            max_connections: cap,
            // Long enough that no connection of this test is closed by the header timeout.
            header_read_timeout: Duration::from_secs(120),
            ..ServerLimits::default()
        },
        ..HttpOptions::default()
    })
    .await;
    let address = served.http.address();
    let mut held = Vec::new();
    for n in 0..(cap * 2) {
        let mut socket = TcpStream::connect(address).await.unwrap();
        if n % 2 == 1 {
            // Half a request head, never finished.
            socket
                .write_all(b"GET /v1/pods HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                .await
                .unwrap();
        }
        held.push(socket);
    }
    let client = fresh_client();
    for probe in ["/healthz", "/readyz"] {
        let answer = client.get(format!("{base}{probe}")).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{probe}");
    }
    let process = served
        .stack
        .registry()
        .register_process(
            ProcessRegistration::new("k", json!({})).with_disposition(Disposition::External),
        )
        .await
        .unwrap();
    let appended = client
        .post(format!("{base}/v1/processes/{}/events", process.id))
        .json(&json!({"event_type": "still-here", "payload": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(appended.status(), StatusCode::CREATED);
    assert!(metric(&client, &base, "proclog_http_connections").await <= cap as u64);
    assert!(metric(&client, &base, "proclog_http_connections_evicted_total").await >= cap as u64);
    // The oldest held sockets were closed by the pod: reading them ends.
    let mut first = held.remove(0);
    let mut buf = [0u8; 64];
    assert_eq!(first.read(&mut buf).await.unwrap_or(0), 0, "evicted");
    drop(held);
    let _ = served
        .stack
        .registry()
        .append_event(&process.id, AppendRequest::new("done", json!(1)))
        .await
        .unwrap();
    served.shutdown().await;
}

/// A request head that is not finished within the header timeout closes the connection;
/// a keep-alive connection idle that long is closed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_and_an_idle_keep_alive_connection_are_closed() {
    let (served, _base) = pod_with(HttpOptions {
        limits: ServerLimits {
            header_read_timeout: Duration::from_millis(300),
            ..ServerLimits::default()
        },
        ..HttpOptions::default()
    })
    .await;
    let address = served.http.address();
    let mut slow = TcpStream::connect(address).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(address).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    // Read until the pod closes each: the slow one gets no answer, the idle one its answer
    // and then the end. (The test's own bound only stops a hang.)
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut answer))
        .await
        .expect("the slow head is cut off")
        .ok();
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), idle.read_to_end(&mut answer))
        .await
        .expect("the idle connection is closed")
        .ok();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200 OK"));
    served.shutdown().await;
}

/// Streams and awaits beyond the cap are answered `503 too_many_streams`; a slot frees when a
/// stream ends. When every connection at the cap is serving a request, a newcomer gets
/// `503 too_many_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_and_busy_connections_past_their_caps_get_a_clear_503() {
    let (served, base) = pod_with(HttpOptions {
        max_streams: 2,
        limits: ServerLimits {
            max_connections: 3,
            ..ServerLimits::default()
        },
        ..HttpOptions::default()
    })
    .await;
    let process = served
        .stack
        .registry()
        .register_process(
            ProcessRegistration::new("k", json!({})).with_disposition(Disposition::External),
        )
        .await
        .unwrap();
    let client = fresh_client();
    let stream_url = format!("{base}/v1/processes/{}/stream", process.id);
    let first = client.get(&stream_url).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let second = client
        .get(format!(
            "{base}/v1/processes/{}/await?timeout_ms=60000",
            process.id
        ))
        .send();
    let second = tokio::spawn(second);
    // Wait until both hold their slot.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metric(&client, &base, "proclog_http_streams").await < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    let third = client.get(&stream_url).send().await.unwrap();
    assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_streams");

    // Two connections serve the stream and the await; a third serves a slow request body.
    let mut slow = TcpStream::connect(served.http.address()).await.unwrap();
    slow.write_all(
        format!(
            "POST /v1/processes/{}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{",
            process.id
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Wait until the three are open and serving (no idle connection left to evict).
    let stats = std::sync::Arc::clone(served.http.stats());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stats.in_flight.load(std::sync::atomic::Ordering::Relaxed) < 3
        || stats.open.load(std::sync::atomic::Ordering::Relaxed) > 3
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow request is never served"
        );
        tokio::task::yield_now().await;
    }
    {
        // A fourth connection is refused: every open one serves a request.
        let mut probe = TcpStream::connect(served.http.address()).await.unwrap();
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = probe.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.contains(r#""code":"too_many_connections""#),
            "{answer}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{answer}"
        );
    }
    drop(slow);
    drop(first);
    served
        .stack
        .registry()
        .complete_process(
            &process.id,
            proclog::Completion::new(proclog::TerminalState::Completed, json!({})),
        )
        .await
        .unwrap();
    let awaited = second.await.unwrap().unwrap();
    assert_eq!(awaited.status(), StatusCode::OK);
    // The slots are free again.
    let again = client.get(&stream_url).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    served.shutdown().await;
}

/// Before, the HTTP histogram was labelled with the raw request method, before
/// authentication: 5,000 invented methods grew a scrape from 37 KB to 24 MB. Now a method is
/// one of the standard ones or OTHER.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_do_not_grow_metrics() {
    let (served, base) = pod_with(HttpOptions {
        token: Some("secret".into()),
        ..HttpOptions::default()
    })
    .await;
    let client = reqwest::Client::new();
    let scrape = || async {
        client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let invent = |n: usize| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let method = reqwest::Method::from_bytes(format!("INVENTED{n}").as_bytes()).unwrap();
            for path in ["/v1/pods", "/healthz", "/v1/processes/x"] {
                client
                    .request(method.clone(), format!("{base}{path}"))
                    .send()
                    .await
                    .unwrap();
            }
        }
    };
    invent(0).await;
    scrape().await; // the scrape itself is a request of its own route
    let before = scrape().await;
    for n in 1..=300 {
        invent(n).await;
    }
    let after = scrape().await;
    let series = |text: &str| {
        text.lines()
            .filter(|line| line.starts_with("proclog_http_request_duration_seconds_count"))
            .map(|line| line.rsplit_once(' ').unwrap().0.to_owned())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(series(&before), series(&after), "no new label sets");
    assert!(
        series(&after)
            .iter()
            .any(|s| s.contains("method=\"OTHER\""))
    );
    assert!(!after.contains("INVENTED"));
    served.shutdown().await;
}
