//! `proclog up`: starts a throwaway Postgres and pods, serves `/readyz`, and stops cleanly on
//! Ctrl-C (SIGINT), leaving no process and no directory behind.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A base port with `count` free consecutive ports after it.
fn free_ports(count: u16) -> u16 {
    loop {
        let base = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if base > u16::MAX - count {
            continue;
        }
        let all_free = (0..count).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if all_free {
            return base;
        }
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_serves_and_stops_cleanly() {
    let base = free_ports(2);
    let mut child = Command::new(env!("CARGO_BIN_EXE_proclog"))
        .args(["up", "--pods", "2", "--base-port", &base.to_string()])
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut banner = Vec::new();
    loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("proclog up prints its banner");
        if line == "ready" {
            break;
        }
        banner.push(line);
    }
    let banner = banner.join("\n");
    let pids: Vec<i32> = banner
        .lines()
        .filter_map(|l| l.split("(pid ").nth(1))
        .map(|rest| rest.trim_end_matches(')').parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{banner}");
    let data_dir: PathBuf = banner
        .lines()
        .find_map(|l| l.split("(throwaway, in ").nth(1))
        .map(|rest| PathBuf::from(rest.trim_end_matches(')')))
        .expect("the throwaway database directory is shown");
    assert!(data_dir.exists());
    assert!(banner.contains("psql 'postgres://"), "{banner}");
    assert!(banner.contains("kill -9"), "{banner}");

    let client = reqwest::Client::new();
    for port in [base, base + 1] {
        let response = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "proclog up exits cleanly: {status}");
    for pid in pids {
        assert!(!alive(pid), "pod {pid} is gone");
    }
    assert!(!data_dir.exists(), "the throwaway database is removed");
}

#[test]
fn up_refuses_zero_pods() {
    let output = Command::new(env!("CARGO_BIN_EXE_proclog"))
        .args(["up", "--pods", "0"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--pods must be at least 1"));
}
