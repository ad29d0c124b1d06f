//! The `proclog` client commands against a real pod, and the pod's JSON logs.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::migrated_database_url;
use common::pods::PodProcess;
use common::proxy::TcpProxy;
use serde_json::{Value, json};

/// Longest a `proclog` client command may run in these tests (a hang fails instead of
/// blocking the suite).
const LIMIT: Duration = Duration::from_secs(120);

/// `proclog` with `args` talking to `url`, without the caller's token or timeout.
fn client_command(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_proclog"));
    command
        .args(args)
        .env("PROCLOG_URL", url)
        .env_remove("PROCLOG_API_TOKEN")
        .env_remove("PROCLOG_CLIENT_TIMEOUT_MS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `command` to its end, killing it and failing after [`LIMIT`].
fn output_within_limit(mut command: Command) -> Output {
    let child = command.spawn().expect("run proclog");
    let pid = child.id() as i32;
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    match done_rx.recv_timeout(LIMIT) {
        Ok(output) => output.expect("wait for proclog"),
        Err(_) => {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{command:?} did not end within {LIMIT:?}");
        }
    }
}

fn proclog(url: &str, args: &[&str]) -> Output {
    output_within_limit(client_command(url, args))
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts that `output` failed with exit code `code` and one line on stderr, and returns it.
fn failure(output: &Output, code: i32) -> String {
    let stderr = stderr_of(output);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("proclog: "), "{stderr}");
    stderr
}

fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

#[tokio::test]
async fn migrate_applies_the_schema_once_and_reports_bad_urls() {
    let database = common::fresh_database_url().await;
    let migrate = |url: String| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_proclog"))
                .args(["migrate", "--database-url", &url])
                .output()
                .unwrap()
        })
    };
    let first = migrate(database.clone()).await.unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let versions: Vec<i32> = proclog::pg::migrate::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        stdout.contains(&format!("applied now: {versions:?}")),
        "{stdout}"
    );
    let again = migrate(database).await.unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("applied now: []"));
    let bad = migrate("postgres://[nope".into()).await.unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad database url"));
}

#[tokio::test]
async fn grant_reader_gives_an_existing_role_read_access_and_refuses_bad_names() {
    let url = common::migrated_database_url().await;
    let role = format!("analyst_{}", uuid::Uuid::new_v4().simple());
    let grant = |role: String, url: String| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_proclog"))
                .args(["grant-reader", &role, "--database-url", &url])
                .output()
                .unwrap()
        })
    };
    let missing = grant(role.clone(), url.clone()).await.unwrap();
    assert!(failure(&missing, 1).contains("does not exist"));
    let bad = grant("robert'); drop".into(), url.clone()).await.unwrap();
    assert!(failure(&bad, 2).contains("role name"));
    common::sql_client(&url)
        .await
        .batch_execute(&format!("CREATE ROLE {role} LOGIN"))
        .await
        .unwrap();
    let granted = grant(role.clone(), url.clone()).await.unwrap();
    assert!(granted.status.success(), "{}", stderr_of(&granted));
    let can_read: bool = common::sql_client(&url)
        .await
        .query_one(
            "SELECT has_table_privilege($1, 'proclog.events', 'SELECT')
                AND NOT has_table_privilege($1, 'proclog.events', 'INSERT')",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(can_read);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_drive_a_process_and_pod_logs_carry_ids() {
    let database = migrated_database_url().await;
    let pod = PodProcess::start(
        &database,
        "pod-cli",
        &["--log-format", "json", "--poll-ms", "100"],
    )
    .await;
    let url = pod.url.clone();
    let run = move |args: Vec<String>| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                proclog(&url, &args)
            })
            .await
            .unwrap()
        }
    };
    let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let started = json_of(
        &run(args(&[
            "start",
            "steps",
            "--id",
            "cli-1",
            "--input",
            r#"{"steps": 3, "delay_ms": 10}"#,
        ]))
        .await,
    );
    assert_eq!(started["id"], "cli-1");
    let terminal = json_of(&run(args(&["await", "cli-1", "--timeout-ms", "60000"])).await);
    assert_eq!(terminal["state"], "completed");
    let record = json_of(&run(args(&["get", "cli-1"])).await);
    assert_eq!(record["status"], "completed");
    let events = json_of(&run(args(&["events", "cli-1", "--after", "1", "--limit", "2"])).await);
    let seqs: Vec<i64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 3]);
    // tail of an ended process prints the whole log, one JSON event per line, and returns.
    let tail = run(args(&["tail", "cli-1"])).await;
    assert!(tail.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&tail.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "started, 3 steps, completed");
    assert_eq!(lines[4]["event_type"], "process.completed");

    // Cancel one nobody runs; prune what has ended.
    json_of(
        &run(args(&[
            "start",
            "steps",
            "--id",
            "cli-2",
            "--disposition",
            "external",
        ]))
        .await,
    );
    // A child of it, listed under it, and a start policy that answers the first start.
    let child = json_of(
        &run(args(&[
            "start",
            "steps",
            "--id",
            "cli-2.a",
            "--parent",
            "cli-2",
            "--disposition",
            "external",
            "--start-policy",
            "deduplicate",
            "--start-key",
            "k1",
            "--window-ms",
            "60000",
        ]))
        .await,
    );
    assert_eq!(
        (&child["parent"], &child["start"]),
        (&json!("cli-2"), &json!("created"))
    );
    let again = json_of(
        &run(args(&[
            "start",
            "steps",
            "--parent",
            "cli-2",
            "--disposition",
            "external",
            "--start-policy",
            "deduplicate",
            "--start-key",
            "k1",
            "--window-ms",
            "60000",
        ]))
        .await,
    );
    assert_eq!(
        (&again["id"], &again["start"]),
        (&json!("cli-2.a"), &json!("deduplicated"))
    );
    let children = json_of(&run(args(&["children", "cli-2"])).await);
    assert_eq!(children["processes"][0]["id"], "cli-2.a");
    let no_window = run(args(&[
        "start",
        "steps",
        "--start-policy",
        "debounce",
        "--start-key",
        "k",
    ]))
    .await;
    assert!(String::from_utf8_lossy(&no_window.stderr).contains("needs --window-ms"));
    let cancelled = json_of(&run(args(&["cancel", "cli-2", "--reason", "testing"])).await);
    assert_eq!(cancelled["status"], "cancelled");
    let child = json_of(&run(args(&["get", "cli-2.a"])).await);
    assert_eq!(child["status"], "cancelled", "the cancel reached the child");
    let pruned = json_of(&run(args(&["prune", "--older-than-secs", "0"])).await);
    assert_eq!(pruned["pruned"]["processes"], 3);
    // Schedules: made, listed, paused, run now, deleted (the URL after the subcommand too).
    let made = json_of(
        &run(args(&[
            "schedule",
            "create",
            "cli-nightly",
            "--cron",
            "0 2 * * *",
            "--kind",
            "steps",
            "--time-zone",
            "Europe/Berlin",
            "--catch-up",
            "run_once",
        ]))
        .await,
    );
    assert_eq!(
        (&made["catch_up"], &made["time_zone"]),
        (&json!("run_once"), &json!("Europe/Berlin"))
    );
    let listed = json_of(&run(args(&["schedule", "list"])).await);
    assert_eq!(listed["schedules"][0]["id"], "cli-nightly");
    let paused = json_of(&run(args(&["schedule", "pause", "cli-nightly"])).await);
    assert_eq!(paused["paused"], true);
    let manual = json_of(&run(args(&["schedule", "trigger", "cli-nightly"])).await);
    assert!(
        manual["id"]
            .as_str()
            .unwrap()
            .starts_with("cli-nightly.manual.")
    );
    let deleted = json_of(
        &run(args(&[
            "schedule",
            "delete",
            "cli-nightly",
            "--url",
            &pod.url,
        ]))
        .await,
    );
    assert_eq!(deleted["deleted"], "cli-nightly");
    let gone = run(args(&["schedule", "get", "cli-nightly"])).await;
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not_found"));
    let bad = run(args(&[
        "schedule", "create", "x", "--cron", "never", "--kind", "k",
    ]))
    .await;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid_input"));

    // Queue limits: set, shown with the work they hold, removed.
    let set = json_of(
        &run(args(&[
            "queue",
            "set",
            "cli-queue",
            "--concurrency",
            "0",
            "--key-concurrency",
            "2",
            "--rate",
            "10/1000",
            "--keys",
            r#"{"big": {"concurrency": 5}}"#,
        ]))
        .await,
    );
    assert_eq!(
        set["limits"],
        json!({"queue": {"concurrency": 0, "rate": {"starts": 10, "period_ms": 1000}},
               "each_key": {"concurrency": 2}, "keys": {"big": {"concurrency": 5}}})
    );
    let held = json_of(
        &run(args(&[
            "start",
            "steps",
            "--queue",
            "cli-queue",
            "--concurrency-key",
            "big",
            "--priority",
            "-5",
        ]))
        .await,
    );
    assert_eq!(
        (&held["queue"], &held["concurrency_key"], &held["priority"]),
        (&json!("cli-queue"), &json!("big"), &json!(-5))
    );
    let shown = json_of(&run(args(&["queue", "get", "cli-queue"])).await);
    assert_eq!(
        shown["keys"],
        json!([{"key": "big", "running": 0, "ready": 1}])
    );
    let listed = json_of(&run(args(&["queue", "list"])).await);
    assert_eq!(listed["queues"][0]["queue"], "cli-queue");
    let bad_rate = run(args(&["queue", "set", "cli-queue", "--rate", "ten"])).await;
    assert!(!bad_rate.status.success());
    assert!(String::from_utf8_lossy(&bad_rate.stderr).contains("STARTS/PERIOD_MS"));
    let deleted = json_of(&run(args(&["queue", "delete", "cli-queue"])).await);
    assert_eq!(deleted["deleted"], "cli-queue");
    let gone = run(args(&["queue", "get", "cli-queue"])).await;
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not_found"));

    // Errors: a clear message and a non-zero exit.
    let missing = run(args(&["get", "cli-1"])).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not_found"));
    let bad_input = run(args(&["start", "steps", "--input", "{not json"])).await;
    assert!(!bad_input.status.success());
    assert!(String::from_utf8_lossy(&bad_input.stderr).contains("--input is not JSON"));
    let unreachable = proclog("http://127.0.0.1:9", &["get", "x"]);
    let stderr = failure(&unreachable, 3);
    assert!(stderr.contains("could not reach the pod at http://127.0.0.1:9/v1/processes/x"));

    // Every log line about the process run carries its id and the pod.
    let log = pod.log_text();
    let run_lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["span"]["process_id"] == "cli-1")
        .collect();
    assert!(!run_lines.is_empty(), "JSON log lines of the run:\n{log}");
    assert!(run_lines.iter().all(|l| l["span"]["pod"] == "pod-cli"));
}

/// The `order` demo (durable execution) driven from the command line: it waits for a
/// message without a pod, `proclog send` wakes it, a retried send stores nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proclog_send_wakes_an_order_waiting_for_approval() {
    let database = migrated_database_url().await;
    let pod = PodProcess::start(&database, "pod-send", &["--poll-ms", "100"]).await;
    let url = pod.url.clone();
    let run = move |args: &[&str]| {
        let url = url.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                proclog(&url, &args)
            })
            .await
            .unwrap()
        }
    };
    let started = json_of(
        &run(&[
            "start",
            "order",
            "--id",
            "order-1",
            "--input",
            r#"{"work_ms": 10, "ship_after_ms": 100, "declines": 1}"#,
            "--timeout-ms",
            "600000",
        ])
        .await,
    );
    assert!(started["deadline"].is_string());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let record = json_of(&run(&["get", "order-1"]).await);
        if record["status"] == "waiting" {
            assert_eq!(record["waiting_for"], "approve");
            assert!(record["lease"].is_null(), "a waiting process holds no pod");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never waited: {record}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let bad = run(&["send", "order-1", "approve", "--payload", "{nope"]).await;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--payload is not JSON"));
    let args = [
        "send",
        "order-1",
        "approve",
        "--payload",
        r#"{"by": "cli"}"#,
        "--key",
        "approval-1",
    ];
    let sent = json_of(&run(&args).await);
    assert_eq!(sent["replayed"], false);
    let again = json_of(&run(&args).await);
    assert_eq!(again["replayed"], true);
    assert_eq!(again["event"]["seq"], sent["event"]["seq"]);
    let terminal = json_of(&run(&["await", "order-1", "--timeout-ms", "60000"]).await);
    assert_eq!(terminal["state"], "completed", "{terminal}");
    assert_eq!(terminal["output"]["charge"]["approval"]["by"], "cli");
    let record = json_of(&run(&["get", "order-1"]).await);
    assert_eq!(record["retries"], 1, "one declined charge, retried");
    assert_eq!(record["attempts"], 1);
    let late = run(&["send", "order-1", "approve"]).await;
    assert!(!late.status.success());
    assert!(String::from_utf8_lossy(&late.stderr).contains("process_terminal"));
}

#[test]
fn client_requests_time_out_when_the_pod_never_answers() {
    // Accepts TCP connections (the kernel completes the handshake) but never reads or answers:
    // a stopped pod.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", silent.local_addr().unwrap().port());

    let get = proclog(&url, &["get", "x", "--request-timeout-ms", "300"]);
    let stderr = failure(&get, 3);
    assert!(stderr.contains("timed out"), "{stderr}");
    assert!(
        stderr.contains(&format!("{url}/v1/processes/x ")),
        "{stderr}"
    );

    // The environment sets it too; `tail` bounds connecting and the pod's first answer.
    let mut tail = client_command(&url, &["tail", "x"]);
    tail.env("PROCLOG_CLIENT_TIMEOUT_MS", "300");
    let stderr = failure(&output_within_limit(tail), 3);
    assert!(stderr.contains("timed out"), "{stderr}");
    assert!(
        stderr.contains(&format!("{url}/v1/processes/x/stream")),
        "{stderr}"
    );

    // `await` allows its own timeout plus the request timeout.
    let args = [
        "await",
        "x",
        "--timeout-ms",
        "200",
        "--request-timeout-ms",
        "300",
    ];
    let stderr = failure(&proclog(&url, &args), 3);
    assert!(stderr.contains("timed out after 500 ms"), "{stderr}");
    assert!(
        stderr.contains(&format!("{url}/v1/processes/x/await")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_exit_with_documented_codes() {
    let database = migrated_database_url().await;
    let pod = PodProcess::start(&database, "pod-codes", &[]).await;
    let url = pod.url.clone();
    let run = |args: &[&str]| {
        let url = url.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            proclog(&url, &args)
        })
    };

    // 1: the pod's JSON error, as `<status> <code>: <message>`.
    let missing = run(&["get", "nobody"]).await.unwrap();
    let stderr = failure(&missing, 1);
    assert!(stderr.starts_with("proclog: 404 not_found: "), "{stderr}");

    // Ids are percent-encoded: ':' reaches the pod as part of the id.
    let started = run(&[
        "start",
        "steps",
        "--id",
        "a:b.c-d_e",
        "--disposition",
        "external",
    ]);
    let started = started.await.unwrap();
    assert!(started.status.success(), "{}", stderr_of(&started));
    let record = run(&["get", "a:b.c-d_e"]).await.unwrap();
    assert_eq!(json_of(&record)["id"], "a:b.c-d_e");

    // 2: invalid input refused before any request; `..` never becomes `404 no_route`.
    for id in ["..", ".", "a/b", "a?b"] {
        let refused = run(&["get", id]).await.unwrap();
        let stderr = failure(&refused, 2);
        assert!(!stderr.contains("no_route"), "{stderr}");
        assert!(stderr.contains(&format!("{id:?}")), "{stderr}");
    }
    let bad_id = run(&["start", "steps", "--id", "has space"]).await.unwrap();
    failure(&bad_id, 2);
    let bad_input = run(&["start", "steps", "--input", "{not json"])
        .await
        .unwrap();
    assert!(failure(&bad_input, 2).contains("--input is not JSON"));

    // 4: `await` whose process does not end in time.
    let waited = run(&["await", "a:b.c-d_e", "--timeout-ms", "100"])
        .await
        .unwrap();
    let stderr = failure(&waited, 4);
    assert!(stderr.starts_with("proclog: 408 timeout: "), "{stderr}");

    // The table is in `proclog --help`.
    let help = run(&["--help"]).await.unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    for line in [
        "Exit codes:",
        "  2  usage",
        "  3  the pod could not be reached",
        "  4  `await`",
    ] {
        assert!(help.contains(line), "{line:?} in:\n{help}");
    }
}

/// Registers an external process `id` (nobody runs it) and appends `events` through the API.
async fn external_process(url: &str, id: &str, events: &[Value]) {
    let client = reqwest::Client::new();
    let registered = client
        .post(format!("{url}/v1/processes"))
        .json(&json!({"kind": "steps", "id": id, "disposition": "external"}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    let appended = client
        .post(format!("{url}/v1/processes/{id}/events"))
        .json(&json!({"events": events}))
        .send()
        .await
        .unwrap();
    assert_eq!(appended.status(), 201, "{}", appended.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_keeps_multibyte_text_whole_across_reads() {
    let database = migrated_database_url().await;
    let pod = PodProcess::start(&database, "pod-utf8", &[]).await;
    // Large events of 3-byte characters: the network reads split them at arbitrary bytes.
    let texts: Vec<String> = (0..31)
        .map(|i| format!("{i}行目：{}", "日本語のテキストは壊れない。".repeat(1500)))
        .collect();
    let events: Vec<Value> = texts
        .iter()
        .map(|text| json!({"event_type": "note", "payload": {"text": text}}))
        .collect();
    external_process(&pod.url, "utf8-1", &events).await;
    let completed = reqwest::Client::new()
        .post(format!("{}/v1/processes/utf8-1/complete", pod.url))
        .json(&json!({"state": "completed", "output": {"lines": 31}}))
        .send()
        .await
        .unwrap();
    assert_eq!(completed.status(), 200);

    let url = pod.url.clone();
    let tail = tokio::task::spawn_blocking(move || proclog(&url, &["tail", "utf8-1"]))
        .await
        .unwrap();
    assert!(tail.status.success(), "{}", stderr_of(&tail));
    let stdout = String::from_utf8(tail.stdout).expect("UTF-8 output");
    assert!(!stdout.contains('\u{fffd}'), "no replacement characters");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let notes: Vec<&str> = lines
        .iter()
        .filter(|event| event["event_type"] == "note")
        .map(|event| event["payload"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(notes, texts);
    assert_eq!(lines.last().unwrap()["event_type"], "process.completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_reports_a_dropped_stream() {
    let database = migrated_database_url().await;
    let pod = PodProcess::start(&database, "pod-drop", &[]).await;
    external_process(&pod.url, "drop-1", &[json!({"event_type": "note"})]).await;
    let proxy = TcpProxy::start(([127, 0, 0, 1], pod.port).into()).await;
    let url = format!("http://127.0.0.1:{}", proxy.port());

    let mut tail = client_command(&url, &["tail", "drop-1"])
        .spawn()
        .expect("run proclog tail");
    let pid = tail.id() as i32;
    let stdout = tail.stdout.take().unwrap();
    let (line_tx, line_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    // The stream is open once the first event is printed; then the connection is cut.
    let first = tokio::task::spawn_blocking(move || line_rx.recv_timeout(LIMIT))
        .await
        .unwrap();
    if first.is_err() {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("tail printed nothing");
    }
    proxy.drop_connections();

    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(tail.wait_with_output());
    });
    let output = tokio::task::spawn_blocking(move || done_rx.recv_timeout(LIMIT))
        .await
        .unwrap();
    let Ok(output) = output else {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("tail did not notice the cut");
    };
    let stderr = failure(&output.unwrap(), 3);
    let expected = format!(
        "proclog: the stream from {url}/v1/processes/drop-1/stream?after=0 ended before the process did: "
    );
    assert!(stderr.starts_with(&expected), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_exits_0_only_when_the_endpoint_answers_200() {
    let database = migrated_database_url().await;
    let pod = PodProcess::start(&database, "pod-probe", &[]).await;
    let url = pod.url.clone();
    let probe = move |target: String| {
        tokio::task::spawn_blocking(move || proclog("", &["probe", "--url", &target]))
    };
    let ready = probe(format!("{url}/readyz")).await.unwrap();
    assert!(ready.status.success(), "stderr: {}", stderr_of(&ready));
    // Any other status fails, with the status on stderr.
    let missing = probe(format!("{url}/no-such-page")).await.unwrap();
    assert!(failure(&missing, 1).contains("404"));
    // Nothing listening: fails too, naming the URL.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        format!("http://127.0.0.1:{port}/readyz")
    };
    let unreachable = probe(closed.clone()).await.unwrap();
    assert!(failure(&unreachable, 1).contains(&closed));
}

/// Secrets are never printed: not by `--help` (which shows the environment's values of the
/// other settings), not by `proclog up`'s banner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_never_printed() {
    let database = migrated_database_url().await;
    // Trust authentication ignores the password; the URL carries one all the same.
    let with_password = database.replacen("://proclog@", "://proclog:hunter2-pw@", 1);
    assert_ne!(with_password, database);
    for args in [
        &["pod", "--help"][..],
        &["up", "--help"],
        &["migrate", "--help"],
        &["grant-writer", "--help"],
        &["start", "--help"],
    ] {
        let mut command = client_command("http://127.0.0.1:1", args);
        command
            .env("DATABASE_URL", &with_password)
            .env("PROCLOG_LISTENER_DATABASE_URL", &with_password)
            .env("PROCLOG_API_TOKEN", "token-hunter2");
        let output = output_within_limit(command);
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{args:?}");
        assert!(
            !text.contains("hunter2"),
            "{args:?} prints a secret:\n{text}"
        );
    }
    let port = common::pods::free_port();
    let mut up = Command::new(env!("CARGO_BIN_EXE_proclog"))
        .args(["up", "--pods", "1", "--base-port", &port.to_string()])
        .env("DATABASE_URL", &with_password)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    let banner = tokio::task::spawn_blocking(move || {
        let mut banner = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let ready = line == "ready";
            banner.push(line);
            if ready {
                break;
            }
        }
        banner.join("\n")
    });
    let banner = tokio::time::timeout(LIMIT, banner).await.unwrap().unwrap();
    // SAFETY: kill(2) of our own child: up stops its pod.
    unsafe { libc::kill(up.id() as i32, libc::SIGINT) };
    tokio::task::block_in_place(|| up.wait().unwrap());
    assert!(banner.ends_with("ready"), "{banner}");
    assert!(
        !banner.contains("hunter2"),
        "the banner prints the password:\n{banner}"
    );
    assert!(banner.contains("proclog:***@"), "{banner}");
}

/// `proclog up --citus-workers` where the server binaries have no Citus (here: a directory
/// with none) is a usage error naming what is missing, and starts nothing; with
/// `--database-url` it is refused as a conflict.
#[test]
fn up_with_citus_workers_needs_citus_and_no_database_url() {
    let empty = std::env::temp_dir().join(format!("proclog-no-citus-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let mut command = client_command("http://127.0.0.1:9", &["up", "--citus-workers", "1"]);
    command
        .env("PROCLOG_PG_BIN", &empty)
        .env_remove("DATABASE_URL");
    let output = output_within_limit(command);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("citus extension"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("starting"));

    let output = output_within_limit(client_command(
        "http://127.0.0.1:9",
        &[
            "up",
            "--citus-workers",
            "1",
            "--database-url",
            "postgres://x@127.0.0.1/x",
        ],
    ));
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot be used with"));
    let _ = std::fs::remove_dir_all(&empty);
}
