//! The `proclog` client commands against a real pod, and the pod's JSON logs.

mod common;

use std::process::{Command, Output};

use common::migrated_database_url;
use common::pods::PodProcess;
use serde_json::Value;

fn proclog(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_proclog"))
        .args(args)
        .env("PROCLOG_URL", url)
        .env_remove("PROCLOG_API_TOKEN")
        .output()
        .expect("run proclog")
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
    assert!(String::from_utf8_lossy(&first.stdout).contains("applied now: [1, 2]"));
    let again = migrate(database).await.unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("applied now: []"));
    let bad = migrate("postgres://[nope".into()).await.unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad database url"));
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
    let cancelled = json_of(&run(args(&["cancel", "cli-2", "--reason", "testing"])).await);
    assert_eq!(cancelled["status"], "cancelled");
    let pruned = json_of(&run(args(&["prune", "--older-than-secs", "0"])).await);
    assert_eq!(pruned["pruned"]["processes"], 2);

    // Errors: a clear message and a non-zero exit.
    let missing = run(args(&["get", "cli-1"])).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not_found"));
    let bad_input = run(args(&["start", "steps", "--input", "{not json"])).await;
    assert!(!bad_input.status.success());
    assert!(String::from_utf8_lossy(&bad_input.stderr).contains("--input is not JSON"));
    let unreachable = proclog("http://127.0.0.1:9", &["get", "x"]);
    assert!(!unreachable.status.success());

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
