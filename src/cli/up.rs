//! `proclog up`: a local cluster of pods in one command, on a throwaway Postgres unless
//! `DATABASE_URL` names one. Ctrl-C (or SIGTERM) stops the pods gracefully, then the database,
//! and removes what it created.

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

use super::CliResult;
use crate::local_pg::{LocalPostgres, LocalPostgresOptions};

/// Database created in the throwaway cluster.
const DATABASE: &str = "proclog";
/// How long stopping pods may take before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(clap::Args, Clone, Debug)]
pub struct UpArgs {
    /// Number of pods.
    #[arg(long, default_value_t = 3)]
    pods: usize,
    /// Port of the first pod; the others take the following ports.
    #[arg(long, default_value_t = 8080)]
    base_port: u16,
    /// Use this database instead of starting a throwaway one.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Lease TTL of the pods, in milliseconds.
    #[arg(long, default_value_t = 15_000)]
    lease_ttl_ms: u64,
    /// Processes each pod runs at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

struct Pod {
    name: String,
    url: String,
    child: Child,
}

pub async fn run(args: UpArgs) -> CliResult {
    if args.pods == 0 {
        return Err("--pods must be at least 1".into());
    }
    let (database_url, local) = match &args.database_url {
        Some(url) => (url.clone(), None),
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
            (local.url(DATABASE), Some(local))
        }
    };
    let pool = crate::pg::connect_pool(&database_url, 1)?;
    crate::pg::migrate(&pool).await?;
    drop(pool);

    let exe = std::env::current_exe()?;
    let mut pods = Vec::with_capacity(args.pods);
    for n in 1..=args.pods {
        let name = format!("pod-{n}");
        let port = args.base_port + (n as u16 - 1);
        let mut command = Command::new(&exe);
        command
            .arg("pod")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--pod-id", &name])
            .args(["--lease-ttl-ms", &args.lease_ttl_ms.to_string()])
            .args(["--concurrency", &args.concurrency.to_string()])
            .env("DATABASE_URL", &database_url)
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
            url: format!("http://127.0.0.1:{port}"),
            child,
        });
    }
    for pod in &pods {
        wait_ready(&pod.url).await?;
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
    match &local {
        Some(pg) => println!(
            "  database: {database_url}  (throwaway, in {})",
            pg.dir().display()
        ),
        None => println!("  database: {database_url}"),
    }
    println!();
    println!(
        "Start a process:  proclog start steps --input '{{\"steps\": 20, \"delay_ms\": 500}}'"
    );
    println!("Watch it live:    proclog tail <id>");
    println!(
        "Query over SQL:   psql '{database_url}' -c 'SELECT process_id, seq, event_type, writer FROM proclog.events ORDER BY occurred_at DESC LIMIT 20'"
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
    for pod in &pods {
        if let Some(pid) = pod.child.id() {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
    for pod in &mut pods {
        if tokio::time::timeout(STOP_TIMEOUT, pod.child.wait())
            .await
            .is_err()
        {
            let _ = pod.child.kill().await;
        }
    }
    if let Some(local) = local {
        tokio::task::spawn_blocking(move || local.stop()).await??;
    }
    println!("stopped");
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

async fn wait_ready(url: &str) -> CliResult {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut pause =
        crate::backoff::Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    loop {
        if let Ok(response) = client.get(format!("{url}/readyz")).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{url} did not become ready").into());
        }
        tokio::time::sleep(pause.next_delay()).await;
    }
}
