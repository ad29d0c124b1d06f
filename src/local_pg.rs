//! A throwaway local Postgres cluster: `initdb` into a temporary directory, a server on a free
//! loopback port, and removal of everything when it stops.
//!
//! Used by the test harness, the benchmarks and `proclog up`. When run as root, the server runs
//! as an unprivileged user (`PROCLOG_PG_USER`, else `postgres`, else `nobody`), since Postgres
//! refuses to run as root. The server is tied to this process: it receives SIGINT (fast
//! shutdown) when this process dies, even by `kill -9`, and leftover directories of dead
//! processes are removed by the next start.
//!
//! For fault tests the server can be stopped and started again in place, on the same port and
//! data directory ([`LocalPostgres::stop_server`], [`LocalPostgres::start_server`]), or crashed
//! and restarted with crash recovery ([`LocalPostgres::restart_immediate`]); connection URLs
//! stay valid throughout.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The superuser role created by `initdb` (trust authentication on loopback).
pub const SUPERUSER: &str = "proclog";

const DIR_PREFIX: &str = "proclog-pg-";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How the throwaway server is tuned.
#[derive(Clone, Debug, Default)]
pub struct LocalPostgresOptions {
    /// Keep `fsync` on (benchmarks, `proclog up`). Off, the server is faster and loses data
    /// only if the *machine* crashes, which a test never does.
    pub durable: bool,
    /// Extra `-c name=value` server settings.
    pub settings: Vec<(String, String)>,
}

/// A running throwaway cluster. Dropping it stops the server and deletes its directory.
pub struct LocalPostgres {
    bin: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    account: Option<Account>,
    options: LocalPostgresOptions,
    port: u16,
    /// The running server: its pid and the thread that spawned it and waits for it.
    server: Option<Server>,
    /// Set once the directory has been deleted (the cluster is gone for good).
    removed: bool,
}

/// One run of the `postgres` server process.
struct Server {
    pid: u32,
    keeper: JoinHandle<io::Result<ExitStatus>>,
}

/// The OS account the server runs as.
#[derive(Clone, Copy)]
struct Account {
    uid: libc::uid_t,
    gid: libc::gid_t,
}

impl LocalPostgres {
    /// Creates and starts a cluster; returns once it accepts connections.
    pub fn start(options: &LocalPostgresOptions) -> io::Result<Self> {
        let bin = find_bin_dir()?;
        remove_stale_dirs();
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        fs::create_dir_all(&dir)?;
        let account = server_account()?;
        if let Some(account) = account {
            std::os::unix::fs::chown(&dir, Some(account.uid), Some(account.gid))?;
        }
        let data = dir.join("data");
        let initdb_log = File::create(dir.join("initdb.log"))?;
        let status = as_account(Command::new(bin.join("initdb")), account, false)
            .current_dir(&dir)
            .args(["-D", path_str(&data)?, "-A", "trust", "-U", SUPERUSER])
            // Collation pinned to C: the same text ordering (and the same speed) on every
            // machine, whatever the host's locale.
            .args(["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
            .stdout(initdb_log.try_clone()?)
            .stderr(initdb_log)
            .status()?;
        if !status.success() {
            let log = fs::read_to_string(dir.join("initdb.log")).unwrap_or_default();
            let _ = fs::remove_dir_all(&dir);
            return Err(io::Error::other(format!(
                "initdb failed ({status}):\n{log}"
            )));
        }
        let mut cluster = LocalPostgres {
            bin,
            dir,
            data,
            account,
            options: options.clone(),
            port: 0,
            server: None,
            removed: false,
        };
        // A free port may be taken by someone else before the server binds it: try others.
        let mut last_error = None;
        for _ in 0..5 {
            match free_port().and_then(|port| cluster.launch(port)) {
                Ok(()) => return Ok(cluster),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// Starts the server on `port` and returns once it accepts connections. On failure no
    /// server is left running.
    fn launch(&mut self, port: u16) -> io::Result<()> {
        let log_path = self.dir.join("postgres.log");
        // Appended to, so that the log of every run of the server (restarts) is kept.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut command = as_account(Command::new(self.bin.join("postgres")), self.account, true);
        command
            .current_dir(&self.dir)
            .args(["-D", path_str(&self.data)?, "-p", &port.to_string()])
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ])
            .args(["-c", "max_connections=300"])
            // The server's own libpq connections (Citus's to other nodes) look for client
            // certificates under $HOME, which must be a directory the server's account may
            // read, not the caller's (root's) home.
            .env("HOME", &self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if !self.options.durable {
            command.args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
        }
        for (name, value) in &self.options.settings {
            command.args(["-c", &format!("{name}={value}")]);
        }
        // The server is spawned by a thread that lives exactly as long as the server, so the
        // parent-death signal fires when this process dies, never earlier.
        let (pid_tx, pid_rx) = mpsc::channel();
        let keeper = std::thread::Builder::new()
            .name(format!("postgres-{port}"))
            .spawn(move || {
                let mut child = match command.spawn() {
                    Ok(child) => child,
                    Err(err) => {
                        let _ = pid_tx.send(Err(err));
                        return Err(io::Error::other("postgres did not start"));
                    }
                };
                let _ = pid_tx.send(Ok(child.id()));
                child.wait()
            })?;
        let pid = match pid_rx.recv() {
            Ok(Ok(pid)) => pid,
            Ok(Err(err)) => {
                let _ = keeper.join();
                return Err(err);
            }
            Err(_) => return Err(io::Error::other("postgres keeper thread died")),
        };
        self.port = port;
        self.server = Some(Server { pid, keeper });
        if let Err(err) = self.wait_ready(&log_path) {
            self.signal_and_wait(libc::SIGQUIT);
            return Err(err);
        }
        Ok(())
    }

    fn wait_ready(&self, log_path: &Path) -> io::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut pause = Duration::from_millis(10);
        loop {
            if self.server.as_ref().is_none_or(|s| s.keeper.is_finished()) {
                let log = fs::read_to_string(log_path).unwrap_or_default();
                return Err(io::Error::other(format!("postgres exited:\n{log}")));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", SUPERUSER, "-d", "postgres"])
                .status()?;
            if ready.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other("postgres did not become ready in time"));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Sends `signal` to the server, if one runs, and waits until it has exited.
    fn signal_and_wait(&mut self, signal: libc::c_int) {
        let Some(server) = self.server.take() else {
            return;
        };
        // A finished keeper has reaped the server: its pid may belong to someone else now.
        if !server.keeper.is_finished() {
            // SAFETY: plain syscall on a pid we spawned and the keeper has not yet reaped.
            unsafe { libc::kill(server.pid as libc::pid_t, signal) };
        }
        let _ = server.keeper.join();
    }

    /// Stops the server with a fast shutdown (SIGINT: sessions are cut, a checkpoint is
    /// written) and waits until it has exited, keeping the data directory and the port
    /// number, so that [`LocalPostgres::start_server`] can bring the same cluster back. A
    /// no-op when the server is not running.
    pub fn stop_server(&mut self) {
        self.signal_and_wait(libc::SIGINT);
    }

    /// Starts the server again on the same data directory and the same port (so every URL
    /// from [`LocalPostgres::url`] keeps working) and returns once it accepts connections. A
    /// no-op when it runs already. If the port is taken meanwhile, it retries for a few
    /// seconds, then fails: the port is never changed.
    pub fn start_server(&mut self) -> io::Result<()> {
        if self.server.is_some() {
            return Ok(());
        }
        if self.removed {
            return Err(io::Error::other("the cluster was stopped and deleted"));
        }
        let mut last_error = None;
        for attempt in 0..10 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            match self.launch(self.port) {
                Ok(()) => return Ok(()),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// Crashes and restarts the server: an immediate shutdown (SIGQUIT: every session is cut
    /// at once, no checkpoint), then a start on the same data directory and port, which runs
    /// crash recovery from the WAL. Returns once the server accepts connections again; every
    /// URL from [`LocalPostgres::url`] stays valid, every committed transaction survives (the
    /// machine does not crash, so even `fsync = off` loses nothing).
    pub fn restart_immediate(&mut self) -> io::Result<()> {
        self.signal_and_wait(libc::SIGQUIT);
        self.start_server()
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the cluster and its logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A connection URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server (fast shutdown), waits for it and deletes its directory.
    pub fn stop(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        self.signal_and_wait(libc::SIGINT);
        if std::mem::replace(&mut self.removed, true) {
            return Ok(());
        }
        fs::remove_dir_all(&self.dir)
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn path_str(path: &Path) -> io::Result<&str> {
    path.to_str()
        .ok_or_else(|| io::Error::other(format!("non-UTF-8 path {}", path.display())))
}

/// The directory holding `initdb` and `postgres`: `PROCLOG_PG_BIN`, else where `initdb` on
/// `PATH` really lives, else the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PROCLOG_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("initdb"))
            .find(|candidate| candidate.is_file())
    });
    if let Some(initdb) = on_path {
        let real = fs::canonicalize(&initdb)?;
        if let Some(dir) = real.parent()
            && dir.join("postgres").is_file()
        {
            return Ok(dir.to_owned());
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no PostgreSQL server binaries: install postgresql or set PROCLOG_PG_BIN",
        )
    })
}

/// A command for `program` that runs as the account Postgres itself runs as here (an
/// unprivileged user when we are root), dies with this process, and owns `dir` (chowned).
/// For companions of the throwaway cluster that also refuse root, such as a connection pooler.
pub fn server_user_command(program: &Path, dir: &Path) -> io::Result<Command> {
    let account = server_account()?;
    if let Some(account) = account {
        std::os::unix::fs::chown(dir, Some(account.uid), Some(account.gid))?;
    }
    let mut command = as_account(Command::new(program), account, true);
    command.current_dir(dir);
    Ok(command)
}

/// The account to run the server as: `None` (ourselves) unless we are root.
fn server_account() -> io::Result<Option<Account>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let preferred = std::env::var("PROCLOG_PG_USER").ok();
    for name in preferred
        .iter()
        .map(String::as_str)
        .chain(["postgres", "nobody"])
    {
        let c_name = CString::new(name).map_err(io::Error::other)?;
        // SAFETY: getpwnam returns NULL or a pointer to a static record we copy at once.
        let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
        if !entry.is_null() {
            // SAFETY: non-null entries point to a valid passwd record.
            let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
            return Ok(Some(Account { uid, gid }));
        }
    }
    Err(io::Error::other(
        "running as root and no unprivileged user (postgres, nobody) exists to run Postgres",
    ))
}

/// Prepares `command` to drop to `account` and, for the server, to die with its parent.
fn as_account(mut command: Command, account: Option<Account>, tie_to_parent: bool) -> Command {
    // SAFETY: the closure only makes async-signal-safe syscalls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if let Some(account) = account
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(account.gid) != 0
                    || libc::setuid(account.uid) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            // Set after the uid change, which would clear it.
            if tie_to_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Removes cluster directories left by processes that no longer exist.
fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
        if !alive {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
