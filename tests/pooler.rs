//! CONTRACT §4: behind a pooler in transaction mode LISTEN does not work. The listener detects
//! it (its probe never arrives), says so, and the pod falls back to polling; subscribers still
//! receive every event exactly once, in order. Uses a real PgBouncer (`.ci/run` installs it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use proclog::pg::{ListenerOptions, ListenerStatus};
use proclog::pod_services::{PodServices, PodServicesOptions};
use proclog::{AppendRequest, Completion, ProcessRegistration, TerminalState};
use serde_json::json;

fn find_pgbouncer() -> Option<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")]);
    candidates
        .map(|dir| dir.join("pgbouncer"))
        .find(|path| path.is_file())
}

/// A PgBouncer in transaction mode in front of the server of `url`; killed on drop.
struct Bouncer {
    port: u16,
    child: std::process::Child,
    dir: PathBuf,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_bouncer(program: &Path, url: &str) -> Bouncer {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let server_port = config.get_ports()[0];
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("proclog-bouncer-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("userlist.txt"), "\"proclog\" \"\"\n").unwrap();
    let ini = format!(
        "[databases]\n* = host=127.0.0.1 port={server_port} user=proclog\n\
         [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
         auth_type = trust\nauth_file = {dir}/userlist.txt\npool_mode = transaction\n\
         default_pool_size = 4\nmax_client_conn = 50\nlogfile = {dir}/pgbouncer.log\n\
         ignore_startup_parameters = extra_float_digits,options\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
    let mut child = proclog::local_pg::server_user_command(program, &dir)
        .unwrap()
        .arg(dir.join("pgbouncer.ini"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgbouncer");
    // Wait until it accepts connections.
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Bouncer { port, child, dir };
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("pgbouncer did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_behind_a_transaction_pooler_falls_back_to_polling() {
    let Some(program) = find_pgbouncer() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install pgbouncer"
        );
        eprintln!("skipped: pgbouncer is not installed");
        return;
    };
    let url = common::migrated_database_url().await;
    let bouncer = start_bouncer(&program, &url);
    let database = url.rsplit('/').next().unwrap();
    let pooled = format!("postgres://proclog@127.0.0.1:{}/{database}", bouncer.port);

    let writer = PodServices::start(&url, "pod-direct", PodServicesOptions::default()).unwrap();
    assert_eq!(writer.listener_ready().await, ListenerStatus::Listening);
    let pooled_pod = PodServices::start(
        &url,
        "pod-pooled",
        PodServicesOptions {
            listener_database_url: Some(pooled),
            listener: ListenerOptions {
                probe_timeout: Duration::from_millis(1500),
                relisten_interval: Duration::from_millis(200),
                ..ListenerOptions::default()
            },
            ..PodServicesOptions::default()
        },
    )
    .unwrap();
    match pooled_pod.listener_ready().await {
        ListenerStatus::Polling { reason } => {
            assert!(reason.contains("did not arrive"), "{reason}")
        }
        other => panic!("expected the polling fallback, got {other:?}"),
    }

    // Without notices, the subscription still delivers everything, via its safety poll.
    let id = writer
        .registry
        .register_process(ProcessRegistration::new("demo", json!(null)))
        .await
        .unwrap()
        .id;
    let stream = pooled_pod
        .subscriptions
        .clone()
        .with_safety_poll(Duration::from_millis(50))
        .subscribe(id.clone(), 0);
    let reader = tokio::spawn(stream.map(|item| item.unwrap().seq).collect::<Vec<i64>>());
    for n in 0..25 {
        writer
            .registry
            .append_event(&id, AppendRequest::new("step", json!(n)))
            .await
            .unwrap();
    }
    writer
        .registry
        .complete_process(&id, Completion::new(TerminalState::Completed, json!(null)))
        .await
        .unwrap();
    assert_eq!(reader.await.unwrap(), (1..=26).collect::<Vec<_>>());
    // And await_terminal still answers, from the column.
    let end = pooled_pod
        .driver
        .await_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(end.seq, 26);
    assert_eq!(pooled_pod.link.counters().received, 0);
    // A listener that fell back to polling keeps trying LISTEN (the pooler may go away),
    // and stays in the polling state meanwhile.
    let sessions = || pooled_pod.link.counters().sessions;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while sessions() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "LISTEN was never tried again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        pooled_pod.link.status(),
        ListenerStatus::Polling { .. }
    ));
}
