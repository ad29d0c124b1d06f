//! The seeded schedule of a round: the PRNG, the wall clock its records are kept in, the
//! kinds of fault, how the round draws and paces them, and the record each fault leaves.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::cluster::{Backend, Cluster};
use crate::settings::{POD_NAMES, PROXIED, TAKEOVER_SLACK, TTL};
use crate::violation::Violation;

/// SplitMix64: tiny, seedable, good enough to pick faults.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is negligible here).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A duration uniform in `lo..=hi` milliseconds.
    pub(crate) fn millis(&mut self, lo: u64, hi: u64) -> Duration {
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
pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as i64)
}

pub(crate) fn nanos(duration: Duration) -> i64 {
    duration.as_nanos() as i64
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum FaultKind {
    Kill,
    Pause,
    Term,
    TerminateBackends,
    /// An immediate (crash) restart of the server the pods reach: Postgres, or the Citus
    /// coordinator.
    PgRestart,
    /// An immediate restart of a Citus worker (Citus rounds only).
    WorkerRestart,
    ProxyDrop,
    ProxyStallShort,
    ProxyStallLong,
    /// Not scheduled: a pod that did not become ready again was restarted by hand.
    UnreadyRestart,
    /// Not scheduled: a pod exited on its own and was restarted.
    UnexpectedExit,
}

impl FaultKind {
    const SCHEDULED_ON_POSTGRES: [FaultKind; 8] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Term,
        FaultKind::TerminateBackends,
        FaultKind::PgRestart,
        FaultKind::ProxyDrop,
        FaultKind::ProxyStallShort,
        FaultKind::ProxyStallLong,
    ];

    /// The faults a round on `backend` draws from: on Citus, worker restarts too.
    pub(crate) fn scheduled(backend: Backend) -> Vec<FaultKind> {
        let mut kinds = Self::SCHEDULED_ON_POSTGRES.to_vec();
        if backend == Backend::Citus {
            kinds.push(FaultKind::WorkerRestart);
        }
        kinds
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "sigkill",
            FaultKind::Pause => "sigstop_past_ttl",
            FaultKind::Term => "sigterm",
            FaultKind::TerminateBackends => "terminate_backends",
            FaultKind::PgRestart => "pg_restart_immediate",
            FaultKind::WorkerRestart => "citus_worker_restart_immediate",
            FaultKind::ProxyDrop => "proxy_drop",
            FaultKind::ProxyStallShort => "proxy_stall_short",
            FaultKind::ProxyStallLong => "proxy_stall_past_ttl",
            FaultKind::UnreadyRestart => "restart_of_unready_pod",
            FaultKind::UnexpectedExit => "unexpected_exit",
        }
    }

    /// Faults aimed at any pod (the proxy faults always hit pod-c, Postgres restarts all).
    pub(crate) fn picks_a_pod(self) -> bool {
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
pub(crate) struct FaultRecord {
    pub(crate) kind: FaultKind,
    pub(crate) pod: Option<String>,
    pub(crate) start_ns: i64,
    pub(crate) end_ns: i64,
    /// Pods that may legitimately lose their leases because of it.
    pub(crate) disrupted: Vec<String>,
    pub(crate) note: String,
}

impl FaultRecord {
    pub(crate) fn begin(kind: FaultKind, pod: Option<&str>) -> Self {
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
    pub(crate) fn end(mut self) -> Self {
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
    pub(crate) fn explains(&self, pod: &str, at_ns: i64) -> bool {
        self.disrupted.iter().any(|p| p == pod)
            && at_ns >= self.start_ns
            && at_ns <= self.end_ns + nanos(TTL + TAKEOVER_SLACK)
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "kind": self.kind.name(),
            "pod": self.pod,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "disruptive_for": self.disrupted,
            "note": self.note,
        })
    }

    pub(crate) fn describe(&self) -> String {
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

impl Cluster {
    /// Injects seeded faults for `duration`, each followed by the wait for every pod's
    /// readiness; returns the fault log.
    pub(crate) async fn run_faults(
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
                let first = log.is_empty();
                bag = FaultKind::scheduled(self.backend());
                rng.shuffle(&mut bag);
                if first {
                    // The database's restarts come first, so that even a short round has
                    // crashed every kind of node (the bag is drawn from its end).
                    bag.sort_by_key(|kind| {
                        matches!(kind, FaultKind::PgRestart | FaultKind::WorkerRestart)
                    });
                }
            }
            let kind = bag.pop().expect("refilled");
            let target = if kind.picks_a_pod() {
                rng.below(POD_NAMES.len() as u64) as usize
            } else if kind == FaultKind::WorkerRestart {
                rng.below(self.db.workers_mut().len() as u64) as usize
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
}
