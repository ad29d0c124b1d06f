//! A pod on the in-memory registry: no database, the same worker, presence, readiness and
//! HTTP face as on Postgres (the storage seam is the registry and the cluster store).

use std::time::Duration;

use proclog::http::{HttpOptions, HttpServer};
use proclog::pod::{Pod, demo_engines};
use proclog::{
    InMemoryProcessRegistry, ProcessRegistration, Proclog, RegistryConfig, TerminalState,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_on_the_in_memory_registry_with_its_api() {
    let stack = Proclog::in_memory(
        InMemoryProcessRegistry::new(RegistryConfig::new("memory-pod")),
        Duration::from_secs(5),
    );
    let pod = Pod::builder(&stack)
        .engines(demo_engines())
        .heartbeat_every(Duration::from_millis(200))
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
    let base = format!("http://{}", http.address());
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let process = stack
        .registry()
        .register_process(ProcessRegistration::new(
            "steps",
            json!({"steps": 3, "delay_ms": 1}),
        ))
        .await
        .unwrap();
    let end = stack
        .driver()
        .await_terminal(&process.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(end.state, TerminalState::Completed);
    let events: Value = reqwest::get(format!("{base}/v1/processes/{}/events", process.id))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(events["events"].as_array().unwrap().len(), 5);
    let pods: Value = reqwest::get(format!("{base}/v1/pods"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(pods["pods"][0]["pod_id"], "memory-pod");
    assert_eq!(pods["pods"][0]["status"], "running");
    assert_eq!(
        pods["pods"][0]["address"],
        json!(http.address().to_string()),
        "the HTTP face advertised its address"
    );
    let console = reqwest::get(format!("{base}/")).await.unwrap();
    assert_eq!(console.status(), StatusCode::OK);
    pod.shutdown().await;
    http.shutdown().await;
    stack.shutdown().await;
}
