//! A pod facing a database that is not there: it waits for it at start, and its probes answer
//! within a bound while the database is unreachable or stalled. Real `proclog pod` processes
//! reach Postgres through a TCP proxy the test controls.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::migrated_database_url;
use common::pods::PodProcess;
use common::proxy::{Mode, TcpProxy};
use reqwest::StatusCode;

/// Safety cap on every wait (never a timing assertion).
const CAP: Duration = Duration::from_secs(60);

/// A proxy in front of the database of `url`, and the same URL through the proxy.
async fn proxied(url: &str) -> (TcpProxy, String) {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let port = config.get_ports()[0];
    let upstream: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let proxy = TcpProxy::start(upstream).await;
    let through = url.replacen(&format!(":{port}/"), &format!(":{}/", proxy.port()), 1);
    assert_ne!(through, url);
    (proxy, through)
}

async fn status_of(client: &reqwest::Client, url: &str) -> StatusCode {
    client
        .get(url)
        .timeout(CAP)
        .send()
        .await
        .expect("the probe answers")
        .status()
}

async fn wait_for_status(client: &reqwest::Client, url: &str, wanted: StatusCode) {
    let deadline = tokio::time::Instant::now() + CAP;
    loop {
        if let Ok(response) = client.get(url).timeout(CAP).send().await
            && response.status() == wanted
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} never answered {wanted}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_started_before_its_database_waits_for_it() {
    let url = migrated_database_url().await;
    let (proxy, through) = proxied(&url).await;
    proxy.set_mode(Mode::Drop);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::env::temp_dir().join(format!("proclog-test-early-{port}.log"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_proclog"))
        .args([
            "pod",
            "--pod-id",
            "early",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--startup-timeout-ms", "120000"])
        .env("DATABASE_URL", &through)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // It keeps trying, and says so.
    let deadline = tokio::time::Instant::now() + CAP;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("database not reachable yet")
    {
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "the pod gave up: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(tokio::time::Instant::now() < deadline, "no retry logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.set_mode(Mode::Pass);
    let client = reqwest::Client::new();
    wait_for_status(
        &client,
        &format!("http://127.0.0.1:{port}/readyz"),
        StatusCode::OK,
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_gives_up_at_its_startup_deadline_with_a_clear_error() {
    let url = migrated_database_url().await;
    let (proxy, through) = proxied(&url).await;
    proxy.set_mode(Mode::Drop);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_proclog"))
            .args(["pod", "--pod-id", "late", "--listen", "127.0.0.1:0"])
            .args(["--startup-timeout-ms", "500"])
            .env("DATABASE_URL", &through)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("database not reachable after"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_the_database_is_stalled_and_readiness_comes_back() {
    let url = migrated_database_url().await;
    let (proxy, through) = proxied(&url).await;
    let pod = PodProcess::start(&through, "stalled", &["--concurrency", "0"]).await;
    let client = reqwest::Client::new();
    proxy.set_mode(Mode::Stall);
    assert_eq!(
        status_of(&client, &format!("{}/readyz", pod.url)).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        status_of(&client, &format!("{}/healthz", pod.url)).await,
        StatusCode::OK,
        "liveness never depends on the database"
    );
    proxy.set_mode(Mode::Drop);
    assert_eq!(
        status_of(&client, &format!("{}/readyz", pod.url)).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    proxy.set_mode(Mode::Pass);
    wait_for_status(&client, &format!("{}/readyz", pod.url), StatusCode::OK).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pod_settings_are_refused_at_start() {
    let long_id = "p".repeat(119);
    let cases: [(&[&str], &str); 6] = [
        (&["--concurrency", "5000"], "--concurrency"),
        (&["--pod-id", &long_id], "pod id"),
        (&["--poll-ms", "0"], "--poll-ms"),
        (&["--lease-ttl-ms", "0"], "lease ttl"),
        (&["--grace-ms", "18446744073709551615"], "--grace-ms"),
        (&["--max-payload-bytes", "0"], "--max-payload-bytes"),
    ];
    for (flags, expected) in cases {
        let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        let output = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_proclog"))
                .args(["pod", "--listen", "127.0.0.1:0"])
                .args(&flags)
                .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{expected}: {stderr}");
        assert!(
            stderr.contains("bad setting") && stderr.contains(expected),
            "{expected}: {stderr}"
        );
    }
}
