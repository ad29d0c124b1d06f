//! `proclog up`: a local cluster of pods in one command, on a throwaway Postgres unless
//! `DATABASE_URL` names one. Ctrl-C (or SIGTERM) stops the pods gracefully, then the database,
//! and removes what it created.

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

use super::{CliError, CliResult};
use crate::local_citus::LocalCitus;
use crate::local_pg::{LocalPostgres, LocalPostgresOptions};

/// Database created in the throwaway cluster.
const DATABASE: &str = "proclog";
/// How long stopping pods may take before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a pod may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Clone, Debug)]
pub struct UpArgs {
    /// Number of pods.
    #[arg(long, default_value_t = 3)]
    pods: usize,
    /// Port of the first pod; the others take the following ports.
    #[arg(long, default_value_t = 8080)]
    base_port: u16,
    /// Use this database instead of starting a throwaway one.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Lease TTL of the pods, in milliseconds.
    #[arg(long, default_value_t = 15_000)]
    lease_ttl_ms: u64,
    /// Processes each pod runs at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Start a throwaway Citus cluster instead: a coordinator and this many workers, with
    /// proclog's tables distributed (needs the citus extension installed).
    #[arg(long, default_value_t = 0, conflicts_with = "database_url")]
    citus_workers: usize,
}

/// The throwaway database `up` started, if any.
enum Local {
    Postgres(LocalPostgres),
    Citus(LocalCitus),
}

impl Local {
    fn dir(&self) -> &std::path::Path {
        match self {
            Local::Postgres(pg) => pg.dir(),
            Local::Citus(citus) => citus.coordinator().dir(),
        }
    }

    async fn stop(self) -> CliResult {
        tokio::task::spawn_blocking(move || match self {
            Local::Postgres(pg) => pg.stop(),
            Local::Citus(citus) => citus.stop(),
        })
        .await??;
        Ok(())
    }
}

struct Pod {
    name: String,
    port: u16,
    url: String,
    child: Child,
}

pub async fn run(args: UpArgs) -> CliResult {
    if args.pods == 0 {
        return Err(CliError::usage("--pods must be at least 1").into());
    }
    let last_port = u16::try_from(args.pods - 1)
        .ok()
        .and_then(|extra| args.base_port.checked_add(extra));
    if last_port.is_none() {
        return Err(CliError::usage(format!(
            "--base-port {} leaves no room for {} pods",
            args.base_port, args.pods
        ))
        .into());
    }
    if args.citus_workers > 0 && !LocalCitus::available() {
        return Err(CliError::usage(
            "--citus-workers needs the citus extension installed next to the PostgreSQL server binaries",
        )
        .into());
    }
    let (database_url, local) = match &args.database_url {
        Some(url) => (url.clone(), None),
        None if args.citus_workers > 0 => {
            println!(
                "starting a throwaway Citus cluster (a coordinator and {} workers) ...",
                args.citus_workers
            );
            let options = LocalPostgresOptions {
                durable: true,
                ..Default::default()
            };
            let cluster = LocalCitus::start(args.citus_workers, &options).await?;
            (cluster.url(), Some(Local::Citus(cluster)))
        }
        None => {
            println!("starting a throwaway Postgres ...");
            let local = tokio::task::spawn_blocking(|| {
                LocalPostgres::start(&LocalPostgresOptions {
                    durable: true,
                    ..Default::default()
                })
            })
            .await??;
            create_database(&local.url("postgres")).await?;
            (local.url(DATABASE), Some(Local::Postgres(local)))
        }
    };
    let pool = crate::pg::connect_pool(&database_url, 1)?;
    let report = crate::pg::migrate(&pool).await?;
    drop(pool);
    if report.citus.distributed {
        println!("on Citus: proclog.processes and proclog.events are distributed by process_id");
    }

    let mut pods = Vec::with_capacity(args.pods);
    if let Err(err) = start_pods(&args, &database_url, &mut pods).await {
        // Leave nothing behind: the pods that did start, the throwaway database.
        return Err(match stop(&mut pods, local).await {
            Ok(()) => err,
            Err(stop_err) => format!("{err} (and stopping what started failed: {stop_err})").into(),
        });
    }

    println!();
    println!("proclog is up: {} pods", pods.len());
    for pod in &pods {
        println!(
            "  {:<6} {}  (pid {})",
            pod.name,
            pod.url,
            pod.child.id().unwrap_or_default()
        );
    }
    // Never the password: the banner ends up in terminals' scrollback and CI logs.
    let printable_url = crate::pg::redacted(&database_url);
    match &local {
        Some(Local::Citus(citus)) => println!(
            "  database: {printable_url}  (throwaway Citus coordinator with {} workers, in {})",
            citus.workers().len(),
            citus.coordinator().dir().display()
        ),
        Some(pg) => println!(
            "  database: {printable_url}  (throwaway, in {})",
            pg.dir().display()
        ),
        None => println!("  database: {printable_url}"),
    }
    println!();
    if let Some(first) = pods.first() {
        println!(
            "Open the console: {}/   (every pod serves it: pods, processes, live timelines)",
            first.url
        );
    }
    println!(
        "Start a process:  proclog start steps --input '{{\"steps\": 20, \"delay_ms\": 500}}'"
    );
    println!("Watch it live:    proclog tail <id>");
    println!(
        "Query over SQL:   psql '{printable_url}' -c 'SELECT process_id, seq, event_type, writer FROM proclog.events ORDER BY occurred_at DESC LIMIT 20'"
    );
    println!(
        "Kill a pod:       kill -9 <pid>   (its processes resume on another pod after the lease TTL, {} ms)",
        args.lease_ttl_ms
    );
    println!("Stop everything:  Ctrl-C");
    println!("ready");

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut running: Vec<usize> = (0..pods.len()).collect();
    loop {
        let waits: Vec<_> = pods
            .iter_mut()
            .enumerate()
            .filter(|(index, _)| running.contains(index))
            .map(|(index, pod)| Box::pin(async move { (index, pod.child.wait().await) }))
            .collect();
        let next_exit = async move {
            if waits.is_empty() {
                std::future::pending().await
            } else {
                futures::future::select_all(waits).await.0
            }
        };
        let (index, status) = tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            exit = next_exit => exit,
        };
        running.retain(|i| *i != index);
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        println!("{} exited: {status}", pods[index].name);
    }

    println!("stopping ...");
    stop(&mut pods, local).await?;
    println!("stopped");
    Ok(())
}

/// Spawns the pods (each pushed to `pods` at once, so a failure can stop it) and waits until
/// every one is ready.
async fn start_pods(args: &UpArgs, database_url: &str, pods: &mut Vec<Pod>) -> CliResult {
    let exe = std::env::current_exe()?;
    for n in 1..=args.pods {
        let name = format!("pod-{n}");
        // Cannot overflow: checked in `run`.
        let port = args.base_port + (n - 1) as u16;
        let mut command = Command::new(&exe);
        command
            .arg("pod")
            .arg("--demo-engines")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--pod-id", &name])
            .args(["--lease-ttl-ms", &args.lease_ttl_ms.to_string()])
            .args(["--concurrency", &args.concurrency.to_string()])
            .env("DATABASE_URL", database_url)
            .stdin(Stdio::null());
        // SAFETY: prctl is async-signal-safe; the pods die with `up`, even on kill -9.
        unsafe {
            command.as_std_mut().pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        pods.push(Pod {
            name,
            port,
            url: format!("http://127.0.0.1:{port}"),
            child,
        });
    }
    for pod in pods.iter_mut() {
        wait_ready(pod).await?;
    }
    Ok(())
}

/// Stops the pods (SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]), then the throwaway database.
async fn stop(pods: &mut [Pod], local: Option<Local>) -> CliResult {
    for pod in pods.iter() {
        // `None` once the child was reaped: its pid may belong to another process by now.
        if let Some(pid) = pod.child.id() {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
    for pod in pods.iter_mut() {
        if tokio::time::timeout(STOP_TIMEOUT, pod.child.wait())
            .await
            .is_err()
        {
            let _ = pod.child.kill().await;
        }
    }
    if let Some(local) = local {
        local.stop().await?;
    }
    Ok(())
}

async fn create_database(admin_url: &str) -> CliResult {
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
        .await?;
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// What one `/readyz` answer says about a pod.
#[derive(Debug, PartialEq, Eq)]
enum Readiness {
    Ready,
    /// The pod answers but is not ready yet (its database, its listener).
    NotYet,
    /// Something else answers on the pod's port: what it calls itself, if anything.
    Foreign(Option<String>),
}

/// Reads a `/readyz` answer (`{"ready": .., "pod": "<pod id>", ..}`) of the pod `name`.
fn readiness(name: &str, status: reqwest::StatusCode, body: &[u8]) -> Readiness {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    match body.get("pod").and_then(Value::as_str) {
        Some(pod) if pod == name => {
            if status.is_success() && body["ready"] == true {
                Readiness::Ready
            } else {
                Readiness::NotYet
            }
        }
        other => Readiness::Foreign(other.map(str::to_owned)),
    }
}

/// Waits until `pod` answers `/readyz` as itself and ready. Fails as soon as its process exits
/// or another program answers on its port (a pod that cannot bind its port exits, and the
/// other program's answers must not be taken for its own).
async fn wait_ready(pod: &mut Pod) -> CliResult {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    let mut pause =
        crate::backoff::Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    loop {
        let mut ready = false;
        if let Ok(response) = client.get(format!("{}/readyz", pod.url)).send().await {
            let status = response.status();
            let body = response.bytes().await.unwrap_or_default();
            match readiness(&pod.name, status, &body) {
                Readiness::Ready => ready = true,
                Readiness::NotYet => {}
                Readiness::Foreign(other) => {
                    let other = other.map_or_else(
                        || "it is not a proclog pod".to_owned(),
                        |other| format!("it is pod {other:?}"),
                    );
                    return Err(format!(
                        "{} cannot serve on port {}: another program answers there ({other})",
                        pod.name, pod.port
                    )
                    .into());
                }
            }
        }
        // Also after a ready answer: it must come from the pod that is still running.
        if let Some(status) = pod.child.try_wait()? {
            return Err(format!(
                "{} exited before it was ready ({status}); is port {} in use? (its log is above)",
                pod.name, pod.port
            )
            .into());
        }
        if ready {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{} on port {} did not become ready within {} s",
                pod.name,
                pod.port,
                READY_TIMEOUT.as_secs()
            )
            .into());
        }
        tokio::time::sleep(pause.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    #[test]
    fn readiness_needs_the_pods_own_name() {
        let ready = br#"{"ready": true, "pod": "pod-1", "database": {"ok": true}}"#;
        assert_eq!(readiness("pod-1", StatusCode::OK, ready), Readiness::Ready);
        let starting = br#"{"ready": false, "pod": "pod-1"}"#;
        assert_eq!(
            readiness("pod-1", StatusCode::SERVICE_UNAVAILABLE, starting),
            Readiness::NotYet
        );
        assert_eq!(
            readiness("pod-2", StatusCode::OK, ready),
            Readiness::Foreign(Some("pod-1".into()))
        );
        assert_eq!(
            readiness("pod-1", StatusCode::OK, b"<html>hello</html>"),
            Readiness::Foreign(None)
        );
    }
}
