//! The console in a real browser: headless Chromium, driven through chromedriver by
//! fantoccini, against two real `proclog pod` processes on a throwaway Postgres.
//!
//! It lists both pods, streams a process's events live, shows the takeover after the owner is
//! killed with SIGKILL (a new writer and generation on the timeline, the killed pod gone), and
//! cancels a process from the page. A screenshot of each state is written to
//! `target/browser-artifacts/` (or `$PROCLOG_BROWSER_ARTIFACTS`).
//!
//! Needs `chromium` and `chromedriver` (Debian: `chromium`, `chromium-driver`); without them
//! it passes with a note, except under `CI`, where `.ci/run` installs them.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// Safety cap on every wait (never a timing assertion).
const CAP: Duration = Duration::from_secs(90);

fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (SIGKILL) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct PodProcess {
    name: String,
    port: u16,
    /// Killed with SIGKILL when the pod is dropped.
    _child: Killed,
}

impl PodProcess {
    fn start(url: &str, name: &str) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_proclog"))
            .args([
                "pod",
                "--demo-engines",
                "--pod-id",
                name,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args([
                "--lease-ttl-ms",
                "3000",
                "--heartbeat-ms",
                "300",
                "--poll-ms",
                "200",
            ])
            .args(["--concurrency", "4", "--grace-ms", "500"])
            .env("DATABASE_URL", url)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            name: name.to_owned(),
            port,
            _child: Killed(child),
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

async fn until_ready(http: &reqwest::Client, pod: &PodProcess) {
    let deadline = tokio::time::Instant::now() + CAP;
    loop {
        if let Ok(response) = http.get(format!("{}/readyz", pod.base())).send().await
            && response.status().is_success()
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never got ready",
            pod.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn artifacts() -> PathBuf {
    let dir = std::env::var_os("PROCLOG_BROWSER_ARTIFACTS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.unwrap();
    let path = artifacts().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
}

/// Waits until `script` (a JavaScript expression) is truthy in the page.
async fn until(browser: &Client, what: &str, script: &str) {
    let deadline = tokio::time::Instant::now() + CAP;
    loop {
        let value = browser
            .execute(&format!("return Boolean({script});"), vec![])
            .await
            .unwrap();
        if value == json!(true) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            let html = browser.source().await.unwrap_or_default();
            panic!("gave up waiting: {what}\n{html}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text(browser: &Client, script: &str) -> String {
    browser
        .execute(&format!("return String({script});"), vec![])
        .await
        .unwrap()
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_shows_pods_a_live_timeline_a_takeover_and_cancels() {
    let (Some(chromedriver), Some(chromium)) = (
        find(&["chromedriver"]),
        find(&["chromium", "chromium-browser", "google-chrome"]),
    ) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have chromium and chromedriver (.ci/run installs them)"
        );
        eprintln!("skipped: chromium and chromedriver are not installed");
        return;
    };
    let url = proclog::testing::migrated_database_url().await.unwrap();
    let pod_a = PodProcess::start(&url, "browser-a");
    let pod_b = PodProcess::start(&url, "browser-b");
    let http = reqwest::Client::new();
    until_ready(&http, &pod_a).await;
    until_ready(&http, &pod_b).await;

    let driver_port = free_port();
    let _driver = Killed(
        Command::new(&chromedriver)
            .arg(format!("--port={driver_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let profile = tempdir();
    let capabilities = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", format!("--user-data-dir={}", profile.display())],
        }
    });
    let capabilities = match capabilities {
        serde_json::Value::Object(map) => map,
        _ => unreachable!(),
    };
    let deadline = tokio::time::Instant::now() + CAP;
    let browser = loop {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities.clone())
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
        {
            Ok(client) => break client,
            Err(err) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no chromedriver: {err}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };

    // 1. Both pods are listed as running.
    browser.goto(&pod_a.base()).await.unwrap();
    until(
        &browser,
        "both pods running",
        r#"document.querySelector('tr[data-pod="browser-a"][data-status="running"]')
           && document.querySelector('tr[data-pod="browser-b"][data-status="running"]')"#,
    )
    .await;
    screenshot(&browser, "1-pods").await;

    // 2. A demo process started from the page streams its events live.
    browser
        .find(Locator::Css("#demo-form input[name=steps]"))
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
    browser
        .find(Locator::Css("#demo-form input[name=steps]"))
        .await
        .unwrap()
        .send_keys("150")
        .await
        .unwrap();
    let delay = browser
        .find(Locator::Css("#demo-form input[name=delay_ms]"))
        .await
        .unwrap();
    delay.clear().await.unwrap();
    delay.send_keys("200").await.unwrap();
    browser
        .find(Locator::Css("#demo-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &browser,
        "the process page",
        "document.getElementById('timeline')",
    )
    .await;
    let id = text(
        &browser,
        "document.getElementById('timeline').dataset.process",
    )
    .await;
    let first_rows: usize = text(
        &browser,
        "document.querySelectorAll('#timeline tbody tr').length",
    )
    .await
    .parse()
    .unwrap();
    until(
        &browser,
        "events streaming in",
        &format!(
            "document.querySelectorAll('#timeline tbody tr').length >= {}",
            first_rows + 3
        ),
    )
    .await;
    screenshot(&browser, "2-streaming").await;

    // 3. Kill the owner with SIGKILL; the other pod takes over. Watch from the survivor.
    let client = sql_client(&url).await;
    let owner: String = loop {
        let owner: Option<String> = client
            .query_one(
                "SELECT lease_owner FROM proclog.processes WHERE process_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        if let Some(owner) = owner {
            break owner;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The page is on the owner: when it dies, the page moves to the other pod by itself.
    let (owner_pod, survivor) = if owner == "browser-a" {
        (pod_a, pod_b)
    } else {
        (pod_b, pod_a)
    };
    browser
        .goto(&format!("{}/ui/processes/{id}", owner_pod.base()))
        .await
        .unwrap();
    until(
        &browser,
        "the owner's page",
        "document.getElementById('timeline')",
    )
    .await;
    let killed_name = owner_pod.name.clone();
    drop(owner_pod); // SIGKILL
    until(
        &browser,
        "the page moved to the surviving pod",
        &format!("window.location.port === '{}'", survivor.port),
    )
    .await;
    until(
        &browser,
        "the takeover on the timeline",
        &format!(
            r#"Array.from(document.querySelectorAll('#timeline tbody tr.takeover'))
                 .some(row => row.dataset.writer === '{}' && Number(row.dataset.generation) >= 2)"#,
            survivor.name
        ),
    )
    .await;
    until(
        &browser,
        "the record shows the new owner",
        &format!(
            r#"document.getElementById('lease') && document.getElementById('lease').textContent.startsWith('{}')
               && Number(document.getElementById('generation').textContent) >= 2"#,
            survivor.name
        ),
    )
    .await;
    browser
        .execute(
            "document.querySelector('#timeline tbody tr.takeover').scrollIntoView({block: 'center'});",
            vec![],
        )
        .await
        .unwrap();
    screenshot(&browser, "3-takeover-timeline").await;
    browser.goto(&survivor.base()).await.unwrap();
    until(
        &browser,
        "the killed pod shown as gone",
        &format!(r#"document.querySelector('tr[data-pod="{killed_name}"][data-status="gone"]')"#),
    )
    .await;
    screenshot(&browser, "4-takeover-pods").await;

    // 4. Cancel a process from its page.
    let created = http
        .post(format!("{}/v1/processes", survivor.base()))
        .json(&json!({"id": "browser-cancel", "kind": "steps",
                      "input": {"steps": 1000, "delay_ms": 500}}))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success());
    browser
        .goto(&format!("{}/ui/processes/browser-cancel", survivor.base()))
        .await
        .unwrap();
    browser
        .find(Locator::Css("#cancel-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &browser,
        "the process cancelled",
        "document.getElementById('status') && document.getElementById('status').textContent === 'cancelled'",
    )
    .await;
    until(
        &browser,
        "the terminal event on the timeline",
        r#"Array.from(document.querySelectorAll('#timeline tbody tr td:nth-child(2)'))
             .some(cell => cell.textContent === 'process.cancelled')"#,
    )
    .await;
    screenshot(&browser, "5-cancelled").await;
    let state: Option<String> = client
        .query_one(
            "SELECT terminal_state FROM proclog.processes WHERE process_id = 'browser-cancel'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state.as_deref(), Some("cancelled"));

    browser.close().await.unwrap();
    drop(survivor);
    let _ = std::fs::remove_dir_all(profile);
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("proclog-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn sql_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}
