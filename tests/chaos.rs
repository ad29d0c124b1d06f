//! The chaos suite: CONTRACT §6 and §6a under a seeded schedule of faults.
//!
//! One round starts its own throwaway Postgres (it is crashed and restarted during the
//! round), three real `proclog pod` processes (`pod-a` and `pod-b` connected directly, `pod-c`
//! through a TCP proxy that can cut or stall its traffic), and a load client that keeps
//! registering processes over HTTP (`steps` with dispositions `rerun` and `abandon`, `fail`,
//! `steps` it cancels, `external` ones it appends to and completes itself), retrying every
//! write idempotently and recording every acknowledged write in a ledger.
//!
//! Meanwhile, one fault at a time, chosen and paced by the seed: SIGKILL, SIGSTOP past the
//! lease TTL, or SIGTERM of a pod (killed and drained pods are restarted under the same pod
//! id); `pg_terminate_backend` of every session of a pod, five times in a row; an immediate
//! (crash) restart of Postgres; a cut of pod-c's connections; a stall of pod-c's traffic
//! shorter, then longer, than the TTL. After each fault every pod must answer `/readyz` again
//! on its own. At the end the load stops, every process is driven to a terminal state, and the
//! invariants are checked over SQL and over the engines' journals (`--demo-journal`): every
//! acknowledged write present exactly once; logs dense, sealed by one terminal event; no
//! write under a superseded lease; `abandon` runs at most once; every process ends as its
//! engine decided; reruns and abandonments only after a disruptive fault of the previous
//! owner; never two engines of one process at once. Every violation is reported (with the
//! seed) and the test fails once with all of them.
//!
//! The short round (45 s of faults) runs with the other tests:
//!
//! ```text
//! cargo test --test chaos -- --nocapture
//! ```
//!
//! The long form:
//!
//! ```text
//! PROCLOG_CHAOS_SECS=1800 cargo test --release --test chaos -- --nocapture
//! ```
//!
//! `PROCLOG_CHAOS_SEED=<n>` replays the schedule of a round (the seed is printed at the start
//! and in every failure); the interleaving with the real processes is of course not
//! replayed. `PROCLOG_CHAOS_REPORT=<path>` also writes the summary as JSON;
//! `PROCLOG_CHAOS_KEEP=1` keeps the journals and the pods' and Postgres's logs of a passing
//! round too (a failing round always keeps them).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::pods::{PodProcess, free_port};
use common::proxy::{Mode, TcpProxy};
use proclog::local_pg::{LocalPostgres, LocalPostgresOptions, SUPERUSER};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Lease TTL of the pods.
const TTL: Duration = Duration::from_millis(5000);
/// Flags of every pod (besides its journal).
const POD_FLAGS: [&str; 8] = [
    "--lease-ttl-ms",
    "5000",
    "--poll-ms",
    "500",
    "--grace-ms",
    "2000",
    "--concurrency",
    "8",
];
/// The pods; the last one reaches Postgres through the proxy.
const POD_NAMES: [&str; 3] = ["pod-a", "pod-b", "pod-c"];
/// Index of the pod behind the proxy.
const PROXIED: usize = 2;
/// How long after a disruptive fault's end a takeover is still its consequence.
const TAKEOVER_SLACK: Duration = Duration::from_secs(5);
/// Bound on a pod's return to readiness after a fault.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// Bound on every process reaching a terminal state once the faults stop.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);
/// Bound on a pod's exit after SIGTERM (grace 2 s, then the HTTP server's close).
const EXIT_LIMIT: Duration = Duration::from_secs(30);
/// One HTTP request of the load client: after this it tries another pod.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);
/// The load client gives a write up (a violation) after retrying it this long.
const GIVE_UP: Duration = Duration::from_secs(90);
/// Bound on the load client's last requests once the load stops.
const LOAD_DRAIN_LIMIT: Duration = Duration::from_secs(150);
/// Bound on the wait for the target of a fault to hold work.
const BUSY_LIMIT: Duration = Duration::from_secs(10);
/// Bound on reaching the chaos cluster over SQL.
const SQL_LIMIT: Duration = Duration::from_secs(60);
/// Terminal event types.
const TERMINAL_TYPES: [&str; 4] = [
    "process.completed",
    "process.failed",
    "process.cancelled",
    "process.abandoned",
];

/// The seed of the running round, for every failure message.
static SEED: OnceLock<u64> = OnceLock::new();

fn seed_tag() -> String {
    match SEED.get() {
        Some(seed) => format!("seed={seed}"),
        None => "seed=?".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Settings, randomness, clock
// ---------------------------------------------------------------------------------------------

/// What a round is asked to do, from the environment.
struct Settings {
    seed: u64,
    fault_time: Duration,
    report: Option<PathBuf>,
    keep: bool,
}

impl Settings {
    fn from_env() -> Self {
        let seed = match std::env::var("PROCLOG_CHAOS_SEED") {
            Ok(raw) if !raw.trim().is_empty() => raw
                .trim()
                .parse()
                .expect("PROCLOG_CHAOS_SEED must be an unsigned 64-bit integer"),
            _ => Rng::new(now_ns() as u64).next_u64() >> 16,
        };
        let secs = match std::env::var("PROCLOG_CHAOS_SECS") {
            Ok(raw) if !raw.trim().is_empty() => raw
                .trim()
                .parse()
                .expect("PROCLOG_CHAOS_SECS must be a number of seconds"),
            _ => 45,
        };
        let report = std::env::var_os("PROCLOG_CHAOS_REPORT")
            .filter(|path| !path.is_empty())
            .map(PathBuf::from);
        Self {
            seed,
            fault_time: Duration::from_secs(secs),
            report,
            keep: std::env::var_os("PROCLOG_CHAOS_KEEP").is_some_and(|v| !v.is_empty()),
        }
    }
}

/// SplitMix64: tiny, seedable, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is negligible here).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A duration uniform in `lo..=hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Wall-clock nanoseconds since the Unix epoch (the clock of the journals and, on this one
/// machine, of the database).
fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as i64)
}

fn nanos(duration: Duration) -> i64 {
    duration.as_nanos() as i64
}

/// Prints the seed before any panic's message, whatever panics.
fn announce_seed_on_panic(seed: u64) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("chaos: seed {seed} (replay with PROCLOG_CHAOS_SEED={seed})");
        previous(info);
    }));
}

// ---------------------------------------------------------------------------------------------
// Violations
// ---------------------------------------------------------------------------------------------

/// One broken invariant.
#[derive(Clone, Debug)]
struct Violation {
    invariant: &'static str,
    process: String,
    detail: String,
}

impl Violation {
    fn new(invariant: &'static str, process: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            invariant,
            process: process.into(),
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] {}: {}: {}",
            seed_tag(),
            self.invariant,
            self.process,
            self.detail
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum FaultKind {
    Kill,
    Pause,
    Term,
    TerminateBackends,
    PgRestart,
    ProxyDrop,
    ProxyStallShort,
    ProxyStallLong,
    /// Not scheduled: a pod that did not become ready again was restarted by hand.
    UnreadyRestart,
    /// Not scheduled: a pod exited on its own and was restarted.
    UnexpectedExit,
}

impl FaultKind {
    const SCHEDULED: [FaultKind; 8] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Term,
        FaultKind::TerminateBackends,
        FaultKind::PgRestart,
        FaultKind::ProxyDrop,
        FaultKind::ProxyStallShort,
        FaultKind::ProxyStallLong,
    ];

    fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "sigkill",
            FaultKind::Pause => "sigstop_past_ttl",
            FaultKind::Term => "sigterm",
            FaultKind::TerminateBackends => "terminate_backends",
            FaultKind::PgRestart => "pg_restart_immediate",
            FaultKind::ProxyDrop => "proxy_drop",
            FaultKind::ProxyStallShort => "proxy_stall_short",
            FaultKind::ProxyStallLong => "proxy_stall_past_ttl",
            FaultKind::UnreadyRestart => "restart_of_unready_pod",
            FaultKind::UnexpectedExit => "unexpected_exit",
        }
    }

    /// Faults aimed at any pod (the proxy faults always hit pod-c, Postgres restarts all).
    fn picks_a_pod(self) -> bool {
        matches!(
            self,
            FaultKind::Kill | FaultKind::Pause | FaultKind::Term | FaultKind::TerminateBackends
        )
    }

    /// Whether the target pod loses its leases (CONTRACT §6a: killed, stopped or cut off past
    /// its TTL, or drained).
    fn disruptive(self) -> bool {
        matches!(
            self,
            FaultKind::Kill
                | FaultKind::Pause
                | FaultKind::Term
                | FaultKind::ProxyStallLong
                | FaultKind::UnreadyRestart
                | FaultKind::UnexpectedExit
        )
    }
}

/// One injected fault, with wall-clock instants (ns since the Unix epoch).
#[derive(Clone, Debug)]
struct FaultRecord {
    kind: FaultKind,
    pod: Option<String>,
    start_ns: i64,
    end_ns: i64,
    /// Pods that may legitimately lose their leases because of it.
    disrupted: Vec<String>,
    note: String,
}

impl FaultRecord {
    fn begin(kind: FaultKind, pod: Option<&str>) -> Self {
        Self {
            kind,
            pod: pod.map(str::to_owned),
            start_ns: now_ns(),
            end_ns: 0,
            disrupted: Vec::new(),
            note: String::new(),
        }
    }

    /// Closes the record; a disruptive fault disrupts its pod.
    fn end(mut self) -> Self {
        self.end_ns = now_ns();
        if self.kind.disruptive()
            && let Some(pod) = &self.pod
        {
            self.disrupted.push(pod.clone());
        }
        self
    }

    /// Whether a takeover at `at_ns` from `pod` is explained by this fault: `pod` was
    /// disrupted and `at_ns` is in `[start, end + TTL + slack]`.
    fn explains(&self, pod: &str, at_ns: i64) -> bool {
        self.disrupted.iter().any(|p| p == pod)
            && at_ns >= self.start_ns
            && at_ns <= self.end_ns + nanos(TTL + TAKEOVER_SLACK)
    }

    fn to_json(&self) -> Value {
        json!({
            "kind": self.kind.name(),
            "pod": self.pod,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "disruptive_for": self.disrupted,
            "note": self.note,
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} {} ({} ms){}{}",
            self.kind.name(),
            self.pod.as_deref().unwrap_or("-"),
            (self.end_ns - self.start_ns) / 1_000_000,
            if self.disrupted.is_empty() {
                ""
            } else {
                ", disruptive"
            },
            if self.note.is_empty() {
                String::new()
            } else {
                format!(", {}", self.note)
            }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

/// Postgres, the proxy and the three pods of one round.
struct Cluster {
    pg: LocalPostgres,
    proxy: TcpProxy,
    pods: Vec<PodProcess>,
    http: reqwest::Client,
    /// When every pod was last seen running and ready.
    healthy_since_ns: i64,
}

impl Cluster {
    /// Starts and migrates a throwaway Postgres, the proxy and the pods, whose journals go to
    /// `dir`.
    async fn start(dir: &Path) -> Self {
        let pg =
            tokio::task::block_in_place(|| LocalPostgres::start(&LocalPostgresOptions::default()))
                .expect("start a throwaway Postgres (is postgresql installed?)");
        let direct = pg.url("postgres");
        let pool = proclog::pg::connect_pool(&direct, 1).expect("pool");
        proclog::pg::migrate(&pool).await.expect("migrate");
        drop(pool);
        let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], pg.port()))).await;
        let proxied = format!("postgres://{SUPERUSER}@127.0.0.1:{}/postgres", proxy.port());
        // Every (re)start runs this copy: a rebuild of the crate during the round (another
        // build on the machine) must not mix binaries, let alone schema versions.
        let binary = dir.join("proclog");
        std::fs::copy(env!("CARGO_BIN_EXE_proclog"), &binary).expect("copy the pod binary");
        let mut pods = Vec::new();
        for (index, name) in POD_NAMES.iter().enumerate() {
            let url = if index == PROXIED { &proxied } else { &direct };
            let journal = dir.join(format!("{name}.journal"));
            let journal = journal.to_str().expect("UTF-8 temp dir");
            let mut flags = POD_FLAGS.to_vec();
            flags.extend(["--demo-journal", journal]);
            pods.push(PodProcess::start_binary(&binary, url, name, free_port(), &flags).await);
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("HTTP client");
        Self {
            pg,
            proxy,
            pods,
            http,
            healthy_since_ns: now_ns(),
        }
    }

    fn direct_url(&self) -> String {
        self.pg.url("postgres")
    }

    fn pod_urls(&self) -> Vec<String> {
        self.pods.iter().map(|pod| pod.url.clone()).collect()
    }

    /// Injects seeded faults for `duration`, each followed by the wait for every pod's
    /// readiness; returns the fault log.
    async fn run_faults(
        &mut self,
        seed: u64,
        duration: Duration,
        violations: &mut Vec<Violation>,
    ) -> Vec<FaultRecord> {
        let mut rng = Rng::new(seed);
        let mut bag = Vec::new();
        let mut log = Vec::new();
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            tokio::time::sleep(rng.millis(2000, 4000)).await;
            if bag.is_empty() {
                bag = FaultKind::SCHEDULED.to_vec();
                rng.shuffle(&mut bag);
            }
            let kind = bag.pop().expect("refilled");
            let target = if kind.picks_a_pod() {
                rng.below(POD_NAMES.len() as u64) as usize
            } else {
                PROXIED
            };
            let record = self.inject(kind, target, violations).await;
            println!("chaos: fault {}", record.describe());
            log.push(record);
            self.recover(violations, &mut log).await;
        }
        log
    }

    /// Injects one fault and returns its record once it has healed.
    async fn inject(
        &mut self,
        kind: FaultKind,
        target: usize,
        violations: &mut Vec<Violation>,
    ) -> FaultRecord {
        let name = POD_NAMES[target];
        let pod_name = (kind.picks_a_pod()
            || matches!(
                kind,
                FaultKind::ProxyDrop | FaultKind::ProxyStallShort | FaultKind::ProxyStallLong
            ))
        .then_some(name);
        // A fault of an idle pod shows little: give it work to lose first (bounded).
        let idle = pod_name.is_some() && !self.await_busy(target).await;
        let mut record = FaultRecord::begin(kind, pod_name);
        match kind {
            FaultKind::Kill => self.kill(target).await,
            FaultKind::Pause => self.pause(target).await,
            FaultKind::Term => record.note = self.terminate(target, violations).await,
            FaultKind::TerminateBackends => record.note = self.cut_sessions(target).await,
            FaultKind::PgRestart => {
                tokio::task::block_in_place(|| self.pg.restart_immediate())
                    .expect("restart Postgres");
            }
            FaultKind::ProxyDrop => self.proxy.drop_connections(),
            FaultKind::ProxyStallShort => self.stall(Duration::from_secs(1)).await,
            FaultKind::ProxyStallLong => self.stall(TTL + Duration::from_secs(3)).await,
            FaultKind::UnreadyRestart | FaultKind::UnexpectedExit => {
                unreachable!("not scheduled")
            }
        }
        let mut record = record.end();
        if idle {
            record.note = format!("target idle; {}", record.note);
        }
        if kind == FaultKind::PgRestart {
            let outage = record.end_ns - record.start_ns;
            record.note = format!("outage {} ms", outage / 1_000_000);
            // A database outage as long as the TTL may legitimately cost every lease.
            if outage >= nanos(TTL) {
                record.note.push_str(", longer than the TTL");
                record.disrupted = POD_NAMES.iter().map(|n| n.to_string()).collect();
            }
        }
        record
    }

    /// Waits (up to [`BUSY_LIMIT`]) until the pod holds a live lease on a `steps` process;
    /// false if it never did.
    async fn await_busy(&self, target: usize) -> bool {
        let client = sql_connect(&self.direct_url()).await;
        let deadline = Instant::now() + BUSY_LIMIT;
        loop {
            let busy = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM proclog.processes
                                     WHERE lease_owner = $1 AND lease_expires_at > now()
                                       AND kind = 'steps' AND terminal_state IS NULL)",
                    &[&POD_NAMES[target]],
                )
                .await
                .is_ok_and(|row| row.get(0));
            if busy {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn kill(&mut self, target: usize) {
        let pod = &mut self.pods[target];
        pod.signal(libc::SIGKILL);
        pod.restart().await;
    }

    async fn pause(&mut self, target: usize) {
        let pod = &self.pods[target];
        pod.stop();
        tokio::time::sleep(TTL + Duration::from_secs(2)).await;
        pod.cont();
    }

    /// SIGTERM, wait for the exit (a graceful one is required), restart.
    async fn terminate(&mut self, target: usize, violations: &mut Vec<Violation>) -> String {
        let pod = &mut self.pods[target];
        pod.signal(libc::SIGTERM);
        let note = match pod.wait_exit_within(EXIT_LIMIT).await {
            Some(status) if status.success() => format!("exited {status}"),
            Some(status) => {
                violations.push(Violation::new(
                    "graceful stop",
                    &pod.name,
                    format!("exited with {status} after SIGTERM"),
                ));
                format!("exited {status}")
            }
            None => {
                violations.push(Violation::new(
                    "graceful stop",
                    &pod.name,
                    format!("still running {EXIT_LIMIT:?} after SIGTERM"),
                ));
                "did not exit".into()
            }
        };
        pod.restart().await;
        note
    }

    /// `pg_terminate_backend` of every session of the pod, five times 300 ms apart.
    async fn cut_sessions(&self, target: usize) -> String {
        let mut counts = Vec::new();
        for round in 0..5 {
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            counts.push(self.terminate_backends(target).await);
        }
        let by_name: usize = counts.iter().map(|c| c.0).sum();
        let total: usize = counts.iter().map(|c| c.1).sum();
        format!("{total} sessions terminated, {by_name} of them identified by application_name")
    }

    /// Terminates the pod's sessions, found by application name or by client port (the
    /// pod's own sockets to Postgres, or the proxy's upstream sockets for pod-c). Returns how
    /// many matched by name, and how many were terminated.
    async fn terminate_backends(&self, target: usize) -> (usize, usize) {
        let name = POD_NAMES[target];
        let ports: Vec<i32> = if target == PROXIED {
            self.proxy.upstream_client_ports()
        } else {
            postgres_client_ports(self.pods[target].pid(), self.pg.port())
        }
        .into_iter()
        .map(i32::from)
        .collect();
        let pattern = format!("^proclog(-[a-z]+)*-{name}(-probe)?$");
        let client = sql_connect(&self.direct_url()).await;
        let rows = client
            .query(
                "SELECT application_name ~ $1, pg_terminate_backend(pid)
                   FROM pg_stat_activity
                  WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'
                    AND (application_name ~ $1 OR client_port = ANY($2))",
                &[&pattern, &ports],
            )
            .await;
        match rows {
            Ok(rows) => {
                let by_name = rows.iter().filter(|row| row.get::<_, bool>(0)).count();
                (by_name, rows.len())
            }
            Err(err) => {
                println!("chaos: terminating the sessions of {name} failed: {err}");
                (0, 0)
            }
        }
    }

    async fn stall(&self, duration: Duration) {
        self.proxy.set_mode(Mode::Stall);
        tokio::time::sleep(duration).await;
        self.proxy.set_mode(Mode::Pass);
    }

    /// After a fault: every pod must be running and ready again without help. A pod that
    /// exited or stays unready is a violation; it is restarted (and logged as a disruptive
    /// fault) so that the round goes on.
    async fn recover(&mut self, violations: &mut Vec<Violation>, log: &mut Vec<FaultRecord>) {
        let fault = log.last().map(FaultRecord::describe).unwrap_or_default();
        for index in 0..self.pods.len() {
            let name = self.pods[index].name.clone();
            let kind = if !self.pods[index].is_running() {
                violations.push(Violation::new(
                    "pod exited unexpectedly",
                    &name,
                    format!("found exited after fault {fault}"),
                ));
                FaultKind::UnexpectedExit
            } else if let Err(last) = self.wait_ready(index).await {
                violations.push(Violation::new(
                    "pod not ready again after fault",
                    &name,
                    format!("not ready {READY_LIMIT:?} after fault {fault}; /readyz: {last}"),
                ));
                FaultKind::UnreadyRestart
            } else {
                continue;
            };
            // It may have failed at any instant since it was last seen healthy.
            let mut record = FaultRecord::begin(kind, Some(&name));
            record.start_ns = self.healthy_since_ns;
            self.pods[index].restart().await;
            log.push(record.end());
        }
        self.healthy_since_ns = now_ns();
    }

    /// Polls the pod's `/readyz` until it answers 2xx; after [`READY_LIMIT`], the last
    /// answer.
    async fn wait_ready(&self, index: usize) -> Result<(), String> {
        let url = format!("{}/readyz", self.pods[index].url);
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let request = self.http.get(&url).timeout(Duration::from_secs(2));
            let last = match request.send().await {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => {
                    let status = response.status();
                    format!("{status} {}", response.text().await.unwrap_or_default())
                }
                Err(err) => err.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Copies the pods' logs and the Postgres log into `dir` (kept after a failure).
    fn keep_logs(&self, dir: &Path) {
        for pod in &self.pods {
            let _ = std::fs::copy(&pod.log, dir.join(format!("{}.log", pod.name)));
        }
        let _ = std::fs::copy(self.pg.dir().join("postgres.log"), dir.join("postgres.log"));
    }
}

/// Local ports of the sockets process `pid` holds to `127.0.0.1:pg_port` (from `/proc`): the
/// `client_port`s of its sessions in `pg_stat_activity`.
fn postgres_client_ports(pid: i32, pg_port: u16) -> Vec<u16> {
    let inodes: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter_map(|link| {
            let link = link.to_str()?.to_owned();
            link.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                continue;
            }
            let port_of = |address: &str| {
                address
                    .rsplit(':')
                    .next()
                    .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            };
            let inode: Option<u64> = fields[9].parse().ok();
            if port_of(fields[2]) == Some(pg_port) && inode.is_some_and(|i| inodes.contains(&i)) {
                ports.extend(port_of(fields[1]));
            }
        }
    }
    ports
}

/// A plain SQL connection to the chaos cluster, retried while Postgres restarts.
async fn sql_connect(url: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + SQL_LIMIT;
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                return client;
            }
            Err(err) => {
                assert!(
                    Instant::now() < deadline,
                    "[{}] cannot reach the chaos cluster over SQL: {err}",
                    seed_tag()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The load client and its ledger
// ---------------------------------------------------------------------------------------------

/// What the client does with one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Plan {
    /// `steps`, disposition `rerun`: ends completed.
    Steps,
    /// `steps`, disposition `abandon`: completed, or abandoned after its owner's fault.
    StepsAbandon,
    /// `fail`: ends failed.
    Fail,
    /// `steps` the client cancels a little later: ends cancelled (or completed).
    Cancel,
    /// `external`: the client appends to it and completes it.
    External,
}

impl Plan {
    fn pick(rng: &mut Rng) -> Self {
        match rng.below(20) {
            0..=5 => Plan::Steps,
            6..=9 => Plan::StepsAbandon,
            10..=11 => Plan::Fail,
            12..=14 => Plan::Cancel,
            _ => Plan::External,
        }
    }

    fn registration(self, id: &str) -> Value {
        let steps = json!({"steps": 6, "delay_ms": 300});
        let (kind, input, disposition) = match self {
            Plan::Steps | Plan::Cancel => ("steps", steps, "rerun"),
            Plan::StepsAbandon => ("steps", steps, "abandon"),
            Plan::Fail => ("fail", json!({"message": "planned failure"}), "rerun"),
            Plan::External => ("external-notes", json!({}), "external"),
        };
        json!({"id": id, "kind": kind, "input": input, "disposition": disposition})
    }
}

/// How the cancellation of a `Cancel` process was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CancelAnswer {
    /// 2xx: the request was written while the process was live.
    Acknowledged,
    /// 409 `process_terminal`; `retried`: the answer came to a retry, so an earlier attempt
    /// may have cancelled it.
    Terminal { retried: bool },
    /// No usable answer.
    Unknown,
}

/// One process as the client planned and saw it.
#[derive(Clone, Debug)]
struct Planned {
    plan: Plan,
    registration: Value,
    registered: bool,
    cancel: Option<CancelAnswer>,
    completed: bool,
}

/// An acknowledged append.
#[derive(Clone, Debug)]
struct AckedAppend {
    process: String,
    seq: i64,
    event_type: String,
    payload: Value,
    replay_key: String,
    replayed: bool,
}

/// Everything the client was told.
#[derive(Default)]
struct Ledger {
    processes: BTreeMap<String, Planned>,
    appends: Vec<AckedAppend>,
    violations: Vec<Violation>,
}

/// Counters of the client.
#[derive(Default)]
struct ClientStats {
    requests: AtomicU64,
    retries: AtomicU64,
    append_retries: AtomicU64,
    gave_up: AtomicU64,
}

/// The answer to a write, after retries.
enum Outcome {
    /// 2xx with its body.
    Acked(Value),
    /// 4xx with its body: a decision, not retried.
    Refused(u16, Value),
    /// Still failing (5xx, connection error, timeout) after [`GIVE_UP`].
    GaveUp(String),
}

/// The HTTP side of the client: round-robin over the pods, moving on when one fails.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    pods: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    stats: Arc<ClientStats>,
}

impl Api {
    fn new(pods: Vec<String>) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("HTTP client");
        Self {
            http,
            pods: Arc::new(pods),
            next: Arc::new(AtomicUsize::new(0)),
            stats: Arc::new(ClientStats::default()),
        }
    }

    /// POSTs `body` to `path`, resending the same request to the next pod on a 5xx, a
    /// connection error or a timeout, until it is answered or [`GIVE_UP`] has passed.
    /// Returns the outcome and the number of attempts.
    async fn post(&self, path: &str, body: &Value) -> (Outcome, u32) {
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + GIVE_UP;
        let mut pause = Duration::from_millis(100);
        let mut attempts = 0u32;
        loop {
            let base = &self.pods[(first + attempts as usize) % self.pods.len()];
            attempts += 1;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            if attempts > 1 {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            let error = match self.send(base, path, body).await {
                Ok(outcome) => return (outcome, attempts),
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                self.stats.gave_up.fetch_add(1, Ordering::Relaxed);
                return (Outcome::GaveUp(error), attempts);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// One attempt: `Ok` for an answer to keep (2xx, 4xx), `Err` for one to retry.
    async fn send(&self, base: &str, path: &str, body: &Value) -> Result<Outcome, String> {
        let response = self
            .http
            .post(format!("{base}{path}"))
            .json(body)
            .send()
            .await
            .map_err(|err| format!("{base}: {err}"))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|err| format!("{base}: body: {err}"))?;
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            Ok(Outcome::Acked(answer))
        } else if status.is_client_error() {
            Ok(Outcome::Refused(status.as_u16(), answer))
        } else {
            Err(format!("{base}: {status} {answer}"))
        }
    }
}

/// The error code of an API error body.
fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// Keeps registering processes (a few per second) until `stop`, then waits for the
/// processes' lives (cancellations, appends, completions) to end.
async fn run_load(api: Api, ledger: Arc<Mutex<Ledger>>, seed: u64, stop: CancellationToken) {
    let mut rng = Rng::new(seed ^ 0x10AD_10AD_10AD_10AD);
    let mut lives = JoinSet::new();
    for n in 0u64.. {
        let plan = Plan::pick(&mut rng);
        let id = format!("chaos-{seed}-{n:05}");
        ledger.lock().unwrap().processes.insert(
            id.clone(),
            Planned {
                plan,
                registration: plan.registration(&id),
                registered: false,
                cancel: None,
                completed: false,
            },
        );
        let life = live(
            api.clone(),
            Arc::clone(&ledger),
            id,
            Rng::new(rng.next_u64()),
        );
        lives.spawn(life);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(rng.millis(250, 550)) => {}
        }
        while lives.try_join_next().is_some() {}
    }
    while lives.join_next().await.is_some() {}
}

/// Records a write the client could not get acknowledged.
fn unacknowledged(ledger: &Mutex<Ledger>, id: &str, what: &str, outcome: Outcome) {
    let violation = match outcome {
        Outcome::Acked(_) => return,
        Outcome::Refused(status, body) => {
            Violation::new("unexpected refusal", id, format!("{what}: {status} {body}"))
        }
        Outcome::GaveUp(error) => Violation::new(
            "write never acknowledged",
            id,
            format!("{what}: still failing after {GIVE_UP:?}: {error}"),
        ),
    };
    ledger.lock().unwrap().violations.push(violation);
}

/// The client's part in one process's life.
async fn live(api: Api, ledger: Arc<Mutex<Ledger>>, id: String, mut rng: Rng) {
    let (plan, registration) = {
        let ledger = ledger.lock().unwrap();
        let planned = &ledger.processes[&id];
        (planned.plan, planned.registration.clone())
    };
    match api.post("/v1/processes", &registration).await.0 {
        Outcome::Acked(_) => {
            let mut ledger = ledger.lock().unwrap();
            ledger.processes.get_mut(&id).expect("planned").registered = true;
        }
        other => return unacknowledged(&ledger, &id, "register", other),
    }
    match plan {
        Plan::Cancel => cancel_later(&api, &ledger, &id, &mut rng).await,
        Plan::External => append_and_complete(&api, &ledger, &id, &mut rng).await,
        Plan::Steps | Plan::StepsAbandon | Plan::Fail => {}
    }
}

async fn cancel_later(api: &Api, ledger: &Mutex<Ledger>, id: &str, rng: &mut Rng) {
    tokio::time::sleep(rng.millis(200, 1200)).await;
    let path = format!("/v1/processes/{id}/cancel");
    let (outcome, attempts) = api.post(&path, &json!({"reason": "chaos"})).await;
    let answer = match outcome {
        Outcome::Acked(_) => CancelAnswer::Acknowledged,
        Outcome::Refused(409, body) if error_code(&body) == "process_terminal" => {
            CancelAnswer::Terminal {
                retried: attempts > 1,
            }
        }
        other => {
            unacknowledged(ledger, id, "cancel", other);
            CancelAnswer::Unknown
        }
    };
    let mut ledger = ledger.lock().unwrap();
    ledger.processes.get_mut(id).expect("planned").cancel = Some(answer);
}

/// Appends 2 to 5 `note` events with replay keys, then completes the process.
async fn append_and_complete(api: &Api, ledger: &Mutex<Ledger>, id: &str, rng: &mut Rng) {
    let notes = 2 + rng.below(4);
    for n in 0..notes {
        tokio::time::sleep(rng.millis(100, 400)).await;
        if !append_note(api, ledger, id, n).await {
            return;
        }
    }
    let completion = json!({"state": "completed", "output": {"notes": notes}});
    match api
        .post(&format!("/v1/processes/{id}/complete"), &completion)
        .await
        .0
    {
        Outcome::Acked(_) => {
            let mut ledger = ledger.lock().unwrap();
            ledger.processes.get_mut(id).expect("planned").completed = true;
        }
        other => unacknowledged(ledger, id, "complete", other),
    }
}

/// One keyed append, recorded in the ledger when acknowledged; false when it was not.
async fn append_note(api: &Api, ledger: &Mutex<Ledger>, id: &str, n: u64) -> bool {
    let replay_key = format!("note-{n}");
    let payload = json!({"n": n, "process": id});
    let body = json!({"event_type": "note", "payload": payload, "replay_key": replay_key});
    let (outcome, attempts) = api.post(&format!("/v1/processes/{id}/events"), &body).await;
    api.stats
        .append_retries
        .fetch_add(u64::from(attempts.saturating_sub(1)), Ordering::Relaxed);
    let answer = match outcome {
        Outcome::Acked(answer) => answer,
        other => {
            unacknowledged(ledger, id, &format!("append {replay_key}"), other);
            return false;
        }
    };
    let event = &answer["event"];
    let mut ledger = ledger.lock().unwrap();
    if event["event_type"] != json!("note") || event["payload"] != payload {
        ledger.violations.push(Violation::new(
            "a. acknowledged write",
            id,
            format!("append {replay_key} was answered with another event: {answer}"),
        ));
    }
    let Some(seq) = event["seq"].as_i64() else {
        ledger.violations.push(Violation::new(
            "a. acknowledged write",
            id,
            format!("append {replay_key} acknowledged without a seq: {answer}"),
        ));
        return false;
    };
    ledger.appends.push(AckedAppend {
        process: id.to_owned(),
        seq,
        event_type: "note".into(),
        payload,
        replay_key,
        replayed: answer["replayed"].as_bool().unwrap_or(false),
    });
    true
}

// ---------------------------------------------------------------------------------------------
// The end of a round: drain, settle
// ---------------------------------------------------------------------------------------------

/// Waits (bounded) for the load client's last requests.
async fn finish_load(load: tokio::task::JoinHandle<()>, violations: &mut Vec<Violation>) {
    let abort = load.abort_handle();
    if tokio::time::timeout(LOAD_DRAIN_LIMIT, load).await.is_err() {
        abort.abort();
        violations.push(Violation::new(
            "load drained",
            "-",
            format!("the client's requests were still running {LOAD_DRAIN_LIMIT:?} after the load stopped"),
        ));
    }
}

/// Completes every `external` process still open (one whose completion was never
/// acknowledged, or whose registration was committed but not acknowledged).
async fn complete_open_externals(
    api: &Api,
    client: &tokio_postgres::Client,
    violations: &mut Vec<Violation>,
) {
    let rows = client
        .query(
            "SELECT process_id FROM proclog.processes
              WHERE disposition = 'external' AND terminal_state IS NULL",
            &[],
        )
        .await
        .expect("list open external processes");
    for row in rows {
        let id: String = row.get(0);
        let completion = json!({"state": "completed", "output": {"notes": "completed at the end"}});
        let path = format!("/v1/processes/{id}/complete");
        match api.post(&path, &completion).await.0 {
            Outcome::Acked(_) => {}
            Outcome::Refused(status, body) => violations.push(Violation::new(
                "unexpected refusal",
                &id,
                format!("final completion: {status} {body}"),
            )),
            Outcome::GaveUp(error) => violations.push(Violation::new(
                "write never acknowledged",
                &id,
                format!("final completion: {error}"),
            )),
        }
    }
}

/// Waits (bounded) until no process is left without a terminal state.
async fn await_all_terminal(client: &tokio_postgres::Client, violations: &mut Vec<Violation>) {
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        let open: Vec<String> = client
            .query(
                "SELECT process_id FROM proclog.processes WHERE terminal_state IS NULL
                  ORDER BY process_id",
                &[],
            )
            .await
            .expect("list open processes")
            .iter()
            .map(|row| row.get(0))
            .collect();
        if open.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for id in open {
                violations.push(Violation::new(
                    "every process ends",
                    id,
                    format!("not terminal {SETTLE_LIMIT:?} after the faults stopped"),
                ));
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The invariants
// ---------------------------------------------------------------------------------------------

/// A process row as stored.
struct ProcessRow {
    kind: String,
    input: Value,
    disposition: String,
    last_seq: i64,
    terminal_state: Option<String>,
    terminal_seq: Option<i64>,
    output: Option<Value>,
}

/// An event as stored.
struct EventRow {
    seq: i64,
    event_type: String,
    payload: Value,
    replay_key: Option<String>,
    occurred_ns: i64,
    generation: Option<i64>,
}

/// Every process and every event of the round.
struct Snapshot {
    processes: BTreeMap<String, ProcessRow>,
    /// Each log in seq order.
    events: HashMap<String, Vec<EventRow>>,
}

impl Snapshot {
    async fn load(client: &tokio_postgres::Client) -> Self {
        let processes = client
            .query(
                "SELECT process_id, kind, input, disposition, last_seq, terminal_state,
                        terminal_seq, output
                   FROM proclog.processes",
                &[],
            )
            .await
            .expect("read the processes")
            .into_iter()
            .map(|row| {
                let process = ProcessRow {
                    kind: row.get(1),
                    input: row.get(2),
                    disposition: row.get(3),
                    last_seq: row.get(4),
                    terminal_state: row.get(5),
                    terminal_seq: row.get(6),
                    output: row.get(7),
                };
                (row.get(0), process)
            })
            .collect();
        let mut events: HashMap<String, Vec<EventRow>> = HashMap::new();
        let rows = client
            .query(
                "SELECT process_id, seq, event_type, payload, replay_key, occurred_at,
                        lease_generation
                   FROM proclog.events ORDER BY process_id, seq",
                &[],
            )
            .await
            .expect("read the events");
        for row in rows {
            let occurred: chrono::DateTime<chrono::Utc> = row.get(5);
            events.entry(row.get(0)).or_default().push(EventRow {
                seq: row.get(1),
                event_type: row.get(2),
                payload: row.get(3),
                replay_key: row.get(4),
                occurred_ns: occurred.timestamp_nanos_opt().unwrap_or(i64::MAX),
                generation: row.get(6),
            });
        }
        Self { processes, events }
    }

    fn log(&self, id: &str) -> &[EventRow] {
        self.events.get(id).map_or(&[], Vec::as_slice)
    }
}

/// a. Every acknowledged append is stored exactly once at its seq; every acknowledged
/// registration exists as registered.
fn check_ledger(ledger: &Ledger, snapshot: &Snapshot) -> Vec<Violation> {
    const NAME: &str = "a. acknowledged write";
    let mut violations = Vec::new();
    for append in &ledger.appends {
        let log = snapshot.log(&append.process);
        let at_seq = log.iter().find(|e| e.seq == append.seq);
        let copies = log
            .iter()
            .filter(|e| e.event_type == append.event_type && e.payload == append.payload)
            .count();
        let keyed = log
            .iter()
            .filter(|e| e.replay_key.as_deref() == Some(append.replay_key.as_str()))
            .count();
        let matches = at_seq.is_some_and(|e| {
            e.event_type == append.event_type
                && e.payload == append.payload
                && e.replay_key.as_deref() == Some(append.replay_key.as_str())
        });
        if !matches || copies != 1 || keyed != 1 {
            violations.push(Violation::new(
                NAME,
                &append.process,
                format!(
                    "append {} acknowledged at seq {} (replayed: {}): stored there: {}, \
                     copies of its content: {copies}, events with its key: {keyed}",
                    append.replay_key,
                    append.seq,
                    append.replayed,
                    at_seq.map_or("nothing".into(), |e| format!(
                        "{} {}",
                        e.event_type, e.payload
                    )),
                ),
            ));
        }
    }
    for (id, planned) in ledger.processes.iter().filter(|(_, p)| p.registered) {
        let registration = &planned.registration;
        match snapshot.processes.get(id) {
            None => violations.push(Violation::new(
                NAME,
                id,
                "acknowledged registration is missing",
            )),
            Some(row)
                if json!(row.kind) != registration["kind"]
                    || row.input != registration["input"]
                    || json!(row.disposition) != registration["disposition"] =>
            {
                violations.push(Violation::new(
                    NAME,
                    id,
                    format!(
                        "stored as {} {} {}, registered as {registration}",
                        row.kind, row.input, row.disposition
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    violations
}

/// b. Every log is dense from 1 to `last_seq`.
fn check_dense(snapshot: &Snapshot) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (id, row) in &snapshot.processes {
        let log = snapshot.log(id);
        let dense = log.iter().zip(1..).all(|(event, seq)| event.seq == seq);
        if !dense || log.len() as i64 != row.last_seq {
            let seqs: Vec<i64> = log.iter().map(|e| e.seq).collect();
            violations.push(Violation::new(
                "b. dense log",
                id,
                format!("last_seq {} but seqs {seqs:?}", row.last_seq),
            ));
        }
    }
    violations
}

/// c. Exactly one terminal event, the last one, matching the terminal column.
fn check_terminal(snapshot: &Snapshot) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (id, row) in &snapshot.processes {
        let log = snapshot.log(id);
        let terminal: Vec<&EventRow> = log
            .iter()
            .filter(|e| TERMINAL_TYPES.contains(&e.event_type.as_str()))
            .collect();
        let Some(state) = &row.terminal_state else {
            continue; // reported by "every process ends"
        };
        let sound = terminal.len() == 1
            && terminal[0].event_type == format!("process.{state}")
            && row.terminal_seq == Some(row.last_seq)
            && terminal[0].seq == row.last_seq;
        if !sound {
            let found: Vec<String> = terminal
                .iter()
                .map(|e| format!("{}@{}", e.event_type, e.seq))
                .collect();
            violations.push(Violation::new(
                "c. one terminal event, last",
                id,
                format!(
                    "state {state}, terminal_seq {:?}, last_seq {}, terminal events {found:?}",
                    row.terminal_seq, row.last_seq
                ),
            ));
        }
    }
    violations
}

/// d. No event written under a generation older than one already seen in the same log.
fn check_generations(snapshot: &Snapshot) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (id, log) in &snapshot.events {
        let mut highest: Option<(i64, i64)> = None; // (generation, seq)
        for event in log {
            let Some(generation) = event.generation else {
                continue;
            };
            match highest {
                Some((top, seq)) if generation < top => violations.push(Violation::new(
                    "d. no write under a superseded lease",
                    id,
                    format!(
                        "{} at seq {} under generation {generation}, after generation {top} \
                         at seq {seq}",
                        event.event_type, event.seq
                    ),
                )),
                Some((top, _)) if generation == top => {}
                _ => highest = Some((generation, event.seq)),
            }
        }
    }
    violations
}

/// e. An `abandon` process never starts twice.
fn check_abandon_once(snapshot: &Snapshot) -> Vec<Violation> {
    snapshot
        .processes
        .iter()
        .filter(|(_, row)| row.disposition == "abandon")
        .filter_map(|(id, _)| {
            let starts: Vec<i64> = snapshot
                .log(id)
                .iter()
                .filter(|e| e.event_type == "process.started")
                .map(|e| e.seq)
                .collect();
            (starts.len() > 1).then(|| {
                Violation::new(
                    "e. abandon runs at most once",
                    id,
                    format!("process.started at seqs {starts:?}"),
                )
            })
        })
        .collect()
}

/// The terminal states a process may end in, given its plan and what the client was told
/// (`abandoned` of an `abandon` process is further checked by [`check_takeovers`]).
fn allowed_states(planned: &Planned) -> &'static [&'static str] {
    match planned.plan {
        Plan::Steps => &["completed"],
        Plan::StepsAbandon => &["completed", "abandoned"],
        Plan::Fail => &["failed"],
        Plan::External => &["completed"],
        Plan::Cancel => match planned.cancel {
            Some(CancelAnswer::Acknowledged) => &["cancelled"],
            Some(CancelAnswer::Terminal { retried: false }) => &["completed"],
            _ => &["cancelled", "completed"],
        },
    }
}

/// Whether an acknowledged cancellation legitimately lost the race with the engine: the
/// process completed and the request was written after the engine's last step (its work was
/// done; only the completion was still on its way).
fn cancelled_too_late(planned: &Planned, state: &str, log: &[EventRow]) -> bool {
    let request = log
        .iter()
        .find(|e| e.event_type == "process.cancel_requested")
        .map(|e| e.seq);
    let last_step = log
        .iter()
        .filter(|e| e.event_type == "step")
        .map(|e| e.seq)
        .max();
    planned.plan == Plan::Cancel
        && state == "completed"
        && matches!((request, last_step), (Some(request), Some(step)) if request > step)
}

/// f. Every process ends in the state its engine decided (or as cancelled on request).
fn check_outcomes(ledger: &Ledger, snapshot: &Snapshot) -> Vec<Violation> {
    const NAME: &str = "f. ends as decided";
    let mut violations = Vec::new();
    for (id, row) in &snapshot.processes {
        let Some(planned) = ledger.processes.get(id) else {
            violations.push(Violation::new(
                NAME,
                id,
                "a process the client never registered",
            ));
            continue;
        };
        let Some(state) = row.terminal_state.as_deref() else {
            continue; // reported by "every process ends"
        };
        let allowed = allowed_states(planned);
        let output = row.output.clone().unwrap_or(Value::Null);
        if !allowed.contains(&state) && !cancelled_too_late(planned, state, snapshot.log(id)) {
            violations.push(Violation::new(
                NAME,
                id,
                format!(
                    "{:?} (cancel answer {:?}) ended {state}, expected one of {allowed:?}; \
                     output {output}",
                    planned.plan, planned.cancel
                ),
            ));
            continue;
        }
        let output_ok = match state {
            "completed" if row.kind == "steps" => output["steps"] == json!(6),
            "failed" => output["error"] == json!("planned failure"),
            _ => true,
        };
        if !output_ok {
            violations.push(Violation::new(
                NAME,
                id,
                format!("ended {state} with an unexpected output {output}"),
            ));
        }
    }
    violations
}

/// g. A process is rerun or abandoned only when the owner of its previous attempt had a
/// disruptive fault around that instant.
fn check_takeovers(snapshot: &Snapshot, faults: &[FaultRecord]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let explained = |pod: &str, at_ns: i64| faults.iter().any(|f| f.explains(pod, at_ns));
    for (id, log) in &snapshot.events {
        let mut owner: Option<String> = None;
        for event in log {
            match event.event_type.as_str() {
                "process.started" => {
                    if let Some(previous) = &owner
                        && !explained(previous, event.occurred_ns)
                    {
                        violations.push(Violation::new(
                            "g. rerun only after its owner's fault",
                            id,
                            format!(
                                "process.started at seq {} ({}) after an attempt of {previous}, \
                                 which had no disruptive fault then",
                                event.seq, event.payload
                            ),
                        ));
                    }
                    owner = event.payload["pod"].as_str().map(str::to_owned);
                }
                "process.abandoned" => {
                    let payload = &event.payload;
                    let lost = payload["lost_owner"]
                        .as_str()
                        .or(payload["pod"].as_str())
                        .map(str::to_owned)
                        .or(owner.clone());
                    let justified = lost
                        .as_deref()
                        .is_some_and(|p| explained(p, event.occurred_ns));
                    if !justified {
                        violations.push(Violation::new(
                            "g. abandoned only after its owner's fault",
                            id,
                            format!(
                                "process.abandoned at seq {} ({payload}), previous owner {lost:?} \
                                 had no disruptive fault then",
                                event.seq
                            ),
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    violations
}

/// One line of a demo engine journal.
#[derive(Deserialize)]
struct JournalLine {
    process_id: String,
    pod: String,
    generation: i64,
    what: String,
    at_ns: i64,
}

/// What one generation (run) of a process did, from the journals.
#[derive(Default)]
struct RunSpan {
    pod: String,
    start_ns: Option<i64>,
    last_effect_ns: Option<i64>,
}

/// What the journals held.
#[derive(Default)]
struct JournalStats {
    lines: usize,
    malformed: usize,
    processes: usize,
}

/// Reads every pod's journal into runs per process and generation.
fn read_journals(dir: &Path) -> (HashMap<String, BTreeMap<i64, RunSpan>>, JournalStats) {
    let mut runs: HashMap<String, BTreeMap<i64, RunSpan>> = HashMap::new();
    let mut stats = JournalStats::default();
    for name in POD_NAMES {
        let text = std::fs::read_to_string(dir.join(format!("{name}.journal"))).unwrap_or_default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            stats.lines += 1;
            let Ok(entry) = serde_json::from_str::<JournalLine>(line) else {
                stats.malformed += 1; // e.g. the last line of a killed pod
                continue;
            };
            let run = runs
                .entry(entry.process_id)
                .or_default()
                .entry(entry.generation)
                .or_default();
            run.pod = entry.pod;
            match entry.what.as_str() {
                "start" => {
                    run.start_ns = Some(entry.at_ns);
                    run.last_effect_ns = run.last_effect_ns.max(Some(entry.at_ns));
                }
                "step" => run.last_effect_ns = run.last_effect_ns.max(Some(entry.at_ns)),
                _ => {}
            }
        }
    }
    stats.processes = runs.len();
    (runs, stats)
}

/// h. Never two engines of one process at once: every effect of a generation precedes the
/// start of every later generation.
fn check_journals(dir: &Path, snapshot: &Snapshot) -> (Vec<Violation>, JournalStats) {
    const NAME: &str = "h. one engine at a time";
    let (runs, stats) = read_journals(dir);
    let mut violations = Vec::new();
    for (id, generations) in &runs {
        let mut latest: Option<(i64, i64, &str)> = None; // (effect, generation, pod)
        for (generation, run) in generations {
            if let (Some(start), Some((effect, earlier, pod))) = (run.start_ns, latest)
                && effect >= start
            {
                violations.push(Violation::new(
                    NAME,
                    id,
                    format!(
                        "generation {earlier} on {pod} acted {} ms after generation \
                         {generation} started on {}",
                        (effect - start) as f64 / 1e6,
                        run.pod
                    ),
                ));
            }
            if let Some(effect) = run.last_effect_ns
                && latest.is_none_or(|(top, _, _)| effect > top)
            {
                latest = Some((effect, *generation, &run.pod));
            }
        }
    }
    let steps_started = snapshot
        .events
        .iter()
        .filter(|(id, _)| {
            snapshot
                .processes
                .get(*id)
                .is_some_and(|p| p.kind == "steps")
        })
        .any(|(_, log)| log.iter().any(|e| e.event_type == "process.started"));
    if steps_started && stats.lines == 0 {
        violations.push(Violation::new(
            NAME,
            "-",
            "steps processes ran but the journals are empty (--demo-journal)",
        ));
    }
    (violations, stats)
}

/// Every invariant over the database and the ledger.
fn check_all(ledger: &Ledger, snapshot: &Snapshot, faults: &[FaultRecord]) -> Vec<Violation> {
    let mut violations = check_ledger(ledger, snapshot);
    violations.extend(check_dense(snapshot));
    violations.extend(check_terminal(snapshot));
    violations.extend(check_generations(snapshot));
    violations.extend(check_abandon_once(snapshot));
    violations.extend(check_outcomes(ledger, snapshot));
    violations.extend(check_takeovers(snapshot, faults));
    violations
}

// ---------------------------------------------------------------------------------------------
// The summary
// ---------------------------------------------------------------------------------------------

/// Everything the summary reports.
struct Round<'a> {
    settings: &'a Settings,
    faults: &'a [FaultRecord],
    ledger: &'a Ledger,
    stats: &'a ClientStats,
    snapshot: &'a Snapshot,
    journal: &'a JournalStats,
    violations: &'a [Violation],
}

fn count_by<'a>(items: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(item.to_owned()).or_insert(0) += 1;
    }
    counts
}

impl Round<'_> {
    fn to_json(&self) -> Value {
        let ledger = self.ledger;
        let cancels = |wanted: fn(&Option<CancelAnswer>) -> bool| {
            ledger
                .processes
                .values()
                .filter(|p| wanted(&p.cancel))
                .count()
        };
        let states = count_by(
            self.snapshot
                .processes
                .values()
                .map(|p| p.terminal_state.as_deref().unwrap_or("not terminal")),
        );
        let starts_by_pod = count_by(self.snapshot.events.values().flat_map(|log| {
            log.iter()
                .filter(|e| e.event_type == "process.started")
                .map(|e| e.payload["pod"].as_str().unwrap_or("?"))
        }));
        let reruns = self
            .snapshot
            .events
            .values()
            .filter(|log| {
                log.iter()
                    .filter(|e| e.event_type == "process.started")
                    .count()
                    > 1
            })
            .count();
        json!({
            "seed": self.settings.seed,
            "fault_secs": self.settings.fault_time.as_secs(),
            "faults": count_by(self.faults.iter().map(|f| f.kind.name())),
            "fault_log": self.faults.iter().map(FaultRecord::to_json).collect::<Vec<_>>(),
            "writes": {
                "registrations_acknowledged":
                    ledger.processes.values().filter(|p| p.registered).count(),
                "appends_acknowledged": ledger.appends.len(),
                "appends_acknowledged_as_replays":
                    ledger.appends.iter().filter(|a| a.replayed).count(),
                "cancels_acknowledged":
                    cancels(|c| *c == Some(CancelAnswer::Acknowledged)),
                "cancels_answered_terminal":
                    cancels(|c| matches!(c, Some(CancelAnswer::Terminal { .. }))),
                "completions_acknowledged":
                    ledger.processes.values().filter(|p| p.completed).count(),
                "requests": self.stats.requests.load(Ordering::Relaxed),
                "requests_retried": self.stats.retries.load(Ordering::Relaxed),
                "appends_retried": self.stats.append_retries.load(Ordering::Relaxed),
                "given_up": self.stats.gave_up.load(Ordering::Relaxed),
            },
            "processes": {
                "total": self.snapshot.processes.len(),
                "by_final_state": states,
                "rerun": reruns,
                "runs_started_by_pod": starts_by_pod,
                "by_plan": count_by(ledger.processes.values().map(|p| plan_name(p.plan))),
            },
            "journal": {
                "lines": self.journal.lines,
                "malformed_lines": self.journal.malformed,
                "processes": self.journal.processes,
            },
            "violations": self.violations.len(),
            "violation_list": self.violations.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
    }
}

fn plan_name(plan: Plan) -> &'static str {
    match plan {
        Plan::Steps => "steps_rerun",
        Plan::StepsAbandon => "steps_abandon",
        Plan::Fail => "fail",
        Plan::Cancel => "steps_cancelled",
        Plan::External => "external",
    }
}

/// The summary as Markdown tables (for RELIABILITY.md).
fn print_summary(report: &Value) {
    println!(
        "\n## Chaos round: seed {}, {} s of faults\n",
        report["seed"], report["fault_secs"]
    );
    print_table("fault", "injected", &report["faults"]);
    print_table("write", "count", &report["writes"]);
    print_table(
        "final state",
        "processes",
        &report["processes"]["by_final_state"],
    );
    print_table("process plan", "processes", &report["processes"]["by_plan"]);
    print_table(
        "pod",
        "runs started",
        &report["processes"]["runs_started_by_pod"],
    );
    println!(
        "processes: {} ({} rerun at least once); journal lines: {} ({} malformed); \
         invariant violations: {}\n",
        report["processes"]["total"],
        report["processes"]["rerun"],
        report["journal"]["lines"],
        report["journal"]["malformed_lines"],
        report["violations"]
    );
}

fn print_table(key: &str, value: &str, map: &Value) {
    println!("| {key} | {value} |\n| --- | ---: |");
    if let Some(map) = map.as_object() {
        for (name, count) in map {
            println!("| {name} | {count} |");
        }
    }
    println!();
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_round() {
    let settings = Settings::from_env();
    let seed = settings.seed;
    let _ = SEED.set(seed);
    announce_seed_on_panic(seed);
    println!(
        "chaos: seed {seed}, {} s of faults (replay with PROCLOG_CHAOS_SEED={seed})",
        settings.fault_time.as_secs()
    );
    let dir = std::env::temp_dir().join(format!("proclog-chaos-{}-{seed}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("chaos directory");

    let mut cluster = Cluster::start(&dir).await;
    let api = Api::new(cluster.pod_urls());
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop_load = CancellationToken::new();
    let load = tokio::spawn(run_load(
        api.clone(),
        Arc::clone(&ledger),
        seed,
        stop_load.clone(),
    ));

    let mut violations = Vec::new();
    let faults = cluster
        .run_faults(seed, settings.fault_time, &mut violations)
        .await;
    stop_load.cancel();
    finish_load(load, &mut violations).await;
    let client = sql_connect(&cluster.direct_url()).await;
    complete_open_externals(&api, &client, &mut violations).await;
    await_all_terminal(&client, &mut violations).await;

    let snapshot = Snapshot::load(&client).await;
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    violations.extend(ledger.violations.iter().cloned());
    violations.extend(check_all(&ledger, &snapshot, &faults));
    let (journal_violations, journal) = check_journals(&dir, &snapshot);
    violations.extend(journal_violations);

    let report = Round {
        settings: &settings,
        faults: &faults,
        ledger: &ledger,
        stats: &api.stats,
        snapshot: &snapshot,
        journal: &journal,
        violations: &violations,
    }
    .to_json();
    print_summary(&report);
    if let Some(path) = &settings.report {
        let text = serde_json::to_string_pretty(&report).expect("report JSON");
        std::fs::write(path, text).expect("write PROCLOG_CHAOS_REPORT");
    }
    if violations.is_empty() && !settings.keep {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    cluster.keep_logs(&dir);
    let _ = std::fs::remove_file(dir.join("proclog")); // the pods' binary: large, and rebuilt
    if violations.is_empty() {
        println!("chaos: journals and logs kept in {}", dir.display());
        return;
    }
    let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
    panic!(
        "chaos round with seed {seed} broke {} invariant(s) (journals and logs kept in {}):\n{}",
        violations.len(),
        dir.display(),
        list.join("\n")
    );
}

/// `LocalPostgres::restart_immediate` crashes the server and brings it back on the same URL,
/// with every committed row; `stop_server`/`start_server` do the same with a clean stop.
#[test]
fn restart_immediate_keeps_committed_data_and_the_url() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut pg = LocalPostgres::start(&LocalPostgresOptions::default()).expect("start Postgres");
    let url = pg.url("postgres");
    runtime.block_on(async {
        let client = sql_connect(&url).await;
        client
            .batch_execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (1), (2), (3)")
            .await
            .unwrap();
    });

    pg.restart_immediate().expect("restart");
    assert_eq!(pg.url("postgres"), url, "same URL after the restart");
    let log = std::fs::read_to_string(pg.dir().join("postgres.log")).unwrap();
    assert!(
        log.contains("not properly shut down"),
        "the restart ran crash recovery:\n{log}"
    );
    let sum = |url: String| {
        runtime.block_on(async move {
            let client = sql_connect(&url).await;
            let row = client
                .query_one("SELECT sum(n) FROM kept", &[])
                .await
                .unwrap();
            row.get::<_, i64>(0)
        })
    };
    assert_eq!(sum(url.clone()), 6, "committed rows survive the crash");

    pg.stop_server();
    let refused = runtime.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls));
    assert!(refused.is_err(), "no server after stop_server");
    pg.start_server().expect("start again");
    assert_eq!(sum(url), 6, "and survive a clean stop and start");
    pg.stop().expect("stop and delete");
}
