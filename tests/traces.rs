//! Traces over OTLP: a process registered over HTTP with a `traceparent` is run in a `run`
//! span of that trace, one per run (its resume included), with a `step` span per executed
//! step (not per replayed one) and a `wait` span per wait, exported as OTLP/HTTP JSON to a
//! collector the test runs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use proclog::http::{HttpOptions, HttpServer};
use proclog::pod::{EngineResult, Pod, ProcessEngine, RunContext};
use proclog::telemetry::Telemetry;
use proclog::{InMemoryProcessRegistry, ProcessId, Proclog, RegistryConfig, TerminalState};
use serde_json::{Value, json};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT: &str = "b7ad6b7169203331";

struct Traced;

#[proclog::async_trait]
impl ProcessEngine for Traced {
    async fn run(&self, run: RunContext) -> EngineResult {
        let _: u32 = run.step("first", || async { Ok(1) }).await?;
        run.sleep("pause", Duration::from_millis(300)).await?;
        let _: u32 = run.step("second", || async { Ok(2) }).await?;
        Ok(Value::Null)
    }
}

/// Every span the collector received: `(name, trace id, span id, parent span id)`.
fn spans(batches: &[Value]) -> Vec<(String, String, String, String)> {
    let text = |value: &Value| value.as_str().unwrap_or_default().to_lowercase();
    batches
        .iter()
        .flat_map(|batch| {
            batch["resourceSpans"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|resource| {
            resource["scopeSpans"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|scope| scope["spans"].as_array().cloned().unwrap_or_default())
        .map(|span| {
            (
                text(&span["name"]),
                text(&span["traceId"]),
                text(&span["spanId"]),
                text(&span["parentSpanId"]),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_steps_and_waits_are_spans_of_the_registering_requests_trace() {
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = Arc::clone(&received);
    let collector = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let sink = Arc::clone(&sink);
            async move {
                if let Ok(batch) = serde_json::from_slice::<Value>(&body) {
                    sink.lock().unwrap().push(batch);
                }
                axum::Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, collector).into_future());

    let telemetry = Telemetry::otlp(&endpoint, Duration::from_millis(100)).unwrap();
    tracing_subscriber::registry()
        .with(telemetry.layer())
        .init();

    let stack = Proclog::in_memory(
        InMemoryProcessRegistry::new(RegistryConfig::new("traced-pod")),
        Duration::from_secs(5),
    );
    let pod = Pod::builder(&stack)
        .engine("traced", Traced)
        .suspend_after(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let http = HttpServer::start(
        &stack,
        Some(&pod),
        "127.0.0.1:0".parse().unwrap(),
        HttpOptions::default(),
    )
    .await
    .unwrap();
    let registered: Value = reqwest::Client::new()
        .post(format!("http://{}/v1/processes", http.address()))
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .json(&json!({"kind": "traced", "input": null}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        registered["trace_parent"],
        format!("00-{TRACE}-{PARENT}-01")
    );
    let id = ProcessId::new(registered["id"].as_str().unwrap()).unwrap();
    let end = stack
        .driver()
        .await_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(end.state, TerminalState::Completed);

    // Both runs (the first suspends at the pause, the second resumes) have ended: wait for
    // their spans to be exported.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let found = loop {
        telemetry.flush();
        let found = spans(&received.lock().unwrap());
        if found.iter().filter(|span| span.0 == "run").count() >= 2 {
            break found;
        }
        assert!(tokio::time::Instant::now() < deadline, "spans: {found:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let runs: Vec<&(String, String, String, String)> =
        found.iter().filter(|span| span.0 == "run").collect();
    assert_eq!(runs.len(), 2, "{found:?}");
    for run in &runs {
        assert_eq!(run.1, TRACE, "the run continues the request's trace");
        assert_eq!(run.3, PARENT, "as a child of the request's span");
    }
    let run_ids: Vec<&str> = runs.iter().map(|run| run.2.as_str()).collect();
    let steps: Vec<&(String, String, String, String)> =
        found.iter().filter(|span| span.0 == "step").collect();
    assert_eq!(
        steps.len(),
        2,
        "one span per executed step; the replayed one has none: {found:?}"
    );
    let waits: Vec<&(String, String, String, String)> =
        found.iter().filter(|span| span.0 == "wait").collect();
    assert!(!waits.is_empty(), "{found:?}");
    for child in steps.iter().chain(&waits) {
        assert_eq!(child.1, TRACE);
        assert!(
            run_ids.contains(&child.3.as_str()),
            "a child of a run: {child:?}"
        );
    }
    pod.shutdown().await;
    http.shutdown().await;
    stack.shutdown().await;
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();
}

#[test]
fn a_bad_endpoint_is_refused() {
    assert!(Telemetry::otlp("collector:4318", Duration::from_secs(1)).is_err());
}
