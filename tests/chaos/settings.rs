//! The round's parameters: its fixed timings and pod flags, what the environment asks of it
//! (seed, length, report, kept logs), and the seed that tags every failure message.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use crate::schedule::{Rng, now_ns};

/// Lease TTL of the pods.
pub(crate) const TTL: Duration = Duration::from_millis(5000);
/// Flags of every pod (besides its journal).
pub(crate) const POD_FLAGS: [&str; 8] = [
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
pub(crate) const POD_NAMES: [&str; 3] = ["pod-a", "pod-b", "pod-c"];
/// Index of the pod behind the proxy.
pub(crate) const PROXIED: usize = 2;
/// How long after a disruptive fault's end a takeover is still its consequence.
pub(crate) const TAKEOVER_SLACK: Duration = Duration::from_secs(5);
/// Bound on a pod's return to readiness after a fault.
pub(crate) const READY_LIMIT: Duration = Duration::from_secs(60);
/// Bound on every process reaching a terminal state once the faults stop.
pub(crate) const SETTLE_LIMIT: Duration = Duration::from_secs(120);
/// Bound on a pod's exit after SIGTERM (grace 2 s, then the HTTP server's close).
pub(crate) const EXIT_LIMIT: Duration = Duration::from_secs(30);
/// One HTTP request of the load client: after this it tries another pod.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);
/// The load client gives a write up (a violation) after retrying it this long.
pub(crate) const GIVE_UP: Duration = Duration::from_secs(90);
/// Bound on the load client's last requests once the load stops.
pub(crate) const LOAD_DRAIN_LIMIT: Duration = Duration::from_secs(150);
/// Bound on the wait for the target of a fault to hold work.
pub(crate) const BUSY_LIMIT: Duration = Duration::from_secs(10);
/// Bound on reaching the chaos cluster over SQL.
pub(crate) const SQL_LIMIT: Duration = Duration::from_secs(60);
/// Terminal event types.
pub(crate) const TERMINAL_TYPES: [&str; 4] = [
    "process.completed",
    "process.failed",
    "process.cancelled",
    "process.abandoned",
];

/// The seed of the running round, for every failure message.
pub(crate) static SEED: Mutex<Option<u64>> = Mutex::new(None);

pub(crate) fn seed_tag() -> String {
    match *SEED.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) {
        Some(seed) => format!("seed={seed}"),
        None => "seed=?".into(),
    }
}

/// What a round is asked to do, from the environment.
pub(crate) struct Settings {
    pub(crate) seed: u64,
    pub(crate) fault_time: Duration,
    pub(crate) report: Option<PathBuf>,
    pub(crate) keep: bool,
}

impl Settings {
    pub(crate) fn from_env() -> Self {
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

/// Sets the seed of the running round and, once per binary, a panic hook that prints it
/// before any panic's message, whatever panics.
pub(crate) fn announce_seed_on_panic(seed: u64) {
    *SEED.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(seed);
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            eprintln!(
                "chaos: {} (replay with PROCLOG_CHAOS_SEED=<seed>)",
                seed_tag()
            );
            previous(info);
        }));
    });
}
