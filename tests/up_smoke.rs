//! `proclog up`: starts a throwaway Postgres and pods, serves `/readyz`, and stops cleanly on
//! Ctrl-C (SIGINT), leaving no process and no directory behind; refuses to report ready when
//! another program answers on a pod's port.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    assert_eq!(output.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--pods must be at least 1"));
}

/// Answers every HTTP request on `port` of 127.0.0.1 with `200 OK` and a `/readyz`-like body
/// naming another pod, until the runtime ends.
async fn foreign_responder(port: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("occupy the port");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                let body = r#"{"ready":true,"pod":"someone-else"}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
}

/// Command lines of `proclog pod` processes listening on one of `ports`.
fn pods_on_ports(ports: &[u16]) -> Vec<String> {
    let listens: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|raw| {
            raw.split(|b| *b == 0)
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect::<Vec<_>>()
        })
        .filter(|args| args.iter().any(|a| a == "pod") && args.iter().any(|a| listens.contains(a)))
        .map(|args| args.join(" "))
        .collect()
}

enum Seen {
    Line(String),
    Exit(std::io::Result<ExitStatus>),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_fails_clearly_when_another_program_answers_on_a_pod_port() {
    let database = common::migrated_database_url().await;
    let base = free_ports(2);
    let taken = base + 1;
    foreign_responder(taken).await;

    let mut child = Command::new(env!("CARGO_BIN_EXE_proclog"))
        .args(["up", "--pods", "2", "--base-port", &base.to_string()])
        .env("DATABASE_URL", &database)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (seen_tx, seen_rx) = mpsc::channel();
    let lines_tx = seen_tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(Seen::Line(line));
        }
    });
    std::thread::spawn(move || {
        let _ = seen_tx.send(Seen::Exit(child.wait()));
    });
    // The pods inherit `up`'s stderr: it ends when `up` and every pod are gone.
    let (stderr_tx, stderr_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = stderr_tx.send(text);
    });

    let status = tokio::task::spawn_blocking(move || {
        loop {
            match seen_rx.recv_timeout(Duration::from_secs(120)) {
                Ok(Seen::Exit(status)) => return status.unwrap(),
                Ok(Seen::Line(line)) if line == "ready" => {
                    // SAFETY: kill(2) of our own child; it stops its pods.
                    unsafe { libc::kill(pid, libc::SIGINT) };
                    panic!(
                        "proclog up reported ready with port {taken} answered by another program"
                    );
                }
                Ok(Seen::Line(_)) => {}
                Err(_) => {
                    // SAFETY: kill(2) of our own child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    panic!("proclog up neither failed nor reported ready");
                }
            }
        }
    })
    .await
    .unwrap();
    let stderr =
        tokio::task::spawn_blocking(move || stderr_rx.recv_timeout(Duration::from_secs(60)))
            .await
            .unwrap()
            .expect("no pod is left holding up's stderr");

    assert_eq!(status.code(), Some(1), "{stderr}");
    // The pods' own errors come first; `up`'s is the last line.
    let error = stderr
        .lines()
        .last()
        .filter(|line| line.starts_with("proclog: "))
        .unwrap_or_else(|| panic!("an error line in:\n{stderr}"));
    assert!(error.contains("pod-2"), "{error}");
    assert!(error.contains("another program answers there"), "{error}");
    assert!(error.contains(&format!("port {taken}")), "{error}");
    let left = pods_on_ports(&[base, taken]);
    assert!(left.is_empty(), "pods left behind: {left:?}");
}
