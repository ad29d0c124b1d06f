//! Real `proclog pod` processes for crash tests: spawned from the built binary, killed with
//! real signals.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `proclog pod` child process. Killed (SIGKILL) on drop if still running.
pub struct PodProcess {
    pub name: String,
    pub url: String,
    pub child: Child,
    pub log: PathBuf,
    /// The HTTP port (kept across [`PodProcess::restart`]).
    pub port: u16,
    /// The `DATABASE_URL` it was started with.
    pub database_url: String,
    /// The extra `proclog pod` flags it was started with.
    pub flags: Vec<String>,
    /// The `proclog` executable it runs (kept across [`PodProcess::restart`]).
    pub binary: PathBuf,
}

/// Spawns `binary pod` with its output appended to `log`.
fn spawn_pod(
    binary: &Path,
    database_url: &str,
    name: &str,
    port: u16,
    flags: &[String],
    log: &Path,
) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(binary)
        .arg("pod")
        .arg("--demo-engines")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--pod-id", name])
        .args(flags)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("spawn proclog pod")
}

/// A port of 127.0.0.1 free at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PodProcess {
    /// Starts pod `name` on `database_url` with extra `proclog pod` flags, and waits until it
    /// is ready.
    pub async fn start(database_url: &str, name: &str, flags: &[&str]) -> Self {
        Self::start_on_port(database_url, name, free_port(), flags).await
    }

    /// [`PodProcess::start`] with the HTTP API on `port` of 127.0.0.1.
    pub async fn start_on_port(database_url: &str, name: &str, port: u16, flags: &[&str]) -> Self {
        let binary = Path::new(env!("CARGO_BIN_EXE_proclog"));
        Self::start_binary(binary, database_url, name, port, flags).await
    }

    /// [`PodProcess::start_on_port`] running the `proclog` executable at `binary` (e.g. a
    /// copy taken at the start of a long test, which a concurrent rebuild cannot replace).
    pub async fn start_binary(
        binary: &Path,
        database_url: &str,
        name: &str,
        port: u16,
        flags: &[&str],
    ) -> Self {
        let log = std::env::temp_dir().join(format!(
            "proclog-test-{}-{name}-{port}.log",
            std::process::id()
        ));
        std::fs::File::create(&log).unwrap();
        let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        let child = spawn_pod(binary, database_url, name, port, &flags, &log);
        let pod = Self {
            name: name.to_owned(),
            url: format!("http://127.0.0.1:{port}"),
            child,
            log,
            port,
            database_url: database_url.to_owned(),
            flags,
            binary: binary.to_owned(),
        };
        pod.wait_ready().await;
        pod
    }

    /// Starts the same pod again (same id, port, database and flags; the log is appended to)
    /// and waits until it is ready. A pod still running is killed (SIGKILL) first.
    pub async fn restart(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        tokio::task::block_in_place(|| self.child.wait().unwrap());
        self.child = spawn_pod(
            &self.binary,
            &self.database_url,
            &self.name,
            self.port,
            &self.flags,
            &self.log,
        );
        self.wait_ready().await;
    }

    /// Pauses the pod (SIGSTOP).
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Resumes a paused pod (SIGCONT).
    pub fn cont(&self) {
        self.signal(libc::SIGCONT);
    }

    /// True while the child process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `limit` for the pod to exit (polling, so it needs no blocking thread).
    pub async fn wait_exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            if let Ok(response) = client.get(format!("{}/readyz", self.url)).send().await
                && response.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} did not become ready:\n{}", self.name, self.log_text());
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` to the pod.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) of our own child.
        assert_eq!(
            unsafe { libc::kill(self.pid(), signal) },
            0,
            "kill {}",
            self.name
        );
    }

    /// Waits for the pod to exit and returns its status (needs the multi-threaded runtime).
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::task::block_in_place(|| self.child.wait().unwrap())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Polls `check` (an SQL scalar that becomes true) until it holds; panics after `limit`.
pub async fn wait_for_sql(client: &tokio_postgres::Client, sql: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let done: bool = client.query_one(sql, &[]).await.unwrap().get(0);
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never held within {limit:?}: {sql}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
