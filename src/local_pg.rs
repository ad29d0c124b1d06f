//! A throwaway local Postgres cluster: `initdb` into a temporary directory, a server on a free
//! loopback port, and removal of everything when it stops.
//!
//! Used by the test harness, the benchmarks and `proclog up`. When run as root, the server runs
//! as an unprivileged user (`PROCLOG_PG_USER`, else `postgres`, else `nobody`), since Postgres
//! refuses to run as root. The server is tied to this process: it receives SIGINT (fast
//! shutdown) when this process dies, even by `kill -9`, and leftover directories of dead
//! processes are removed by the next start.

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
    dir: PathBuf,
    port: u16,
    pid: u32,
    keeper: Option<JoinHandle<io::Result<ExitStatus>>>,
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
            .args(["-E", "UTF8", "--no-sync", "--no-instructions"])
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
        let mut last_error = None;
        for _ in 0..5 {
            match Self::launch(&bin, &dir, &data, account, options) {
                Ok(server) => return Ok(server),
                Err(err) => last_error = Some(err),
            }
        }
        let _ = fs::remove_dir_all(&dir);
        Err(last_error.expect("at least one attempt"))
    }

    fn launch(
        bin: &Path,
        dir: &Path,
        data: &Path,
        account: Option<Account>,
        options: &LocalPostgresOptions,
    ) -> io::Result<Self> {
        let port = free_port()?;
        let log_path = dir.join("postgres.log");
        let log = File::create(&log_path)?;
        let mut command = as_account(Command::new(bin.join("postgres")), account, true);
        command
            .current_dir(dir)
            .args(["-D", path_str(data)?, "-p", &port.to_string()])
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ])
            .args(["-c", "max_connections=300"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if !options.durable {
            command.args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
        }
        for (name, value) in &options.settings {
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
        let pid = pid_rx
            .recv()
            .map_err(|_| io::Error::other("postgres keeper thread died"))??;
        let server = LocalPostgres {
            dir: dir.to_owned(),
            port,
            pid,
            keeper: Some(keeper),
        };
        server.wait_ready(bin, &log_path)?;
        Ok(server)
    }

    fn wait_ready(&self, bin: &Path, log_path: &Path) -> io::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut pause = Duration::from_millis(10);
        loop {
            if self.keeper.as_ref().is_some_and(|k| k.is_finished()) {
                let log = fs::read_to_string(log_path).unwrap_or_default();
                return Err(io::Error::other(format!("postgres exited:\n{log}")));
            }
            let ready = Command::new(bin.join("pg_isready"))
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
        let Some(keeper) = self.keeper.take() else {
            return Ok(());
        };
        // SAFETY: plain syscall on a pid we spawned and have not yet reaped.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGINT) };
        let _ = keeper.join();
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
