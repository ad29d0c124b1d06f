//! Injecting each kind of fault into the cluster: signals to a pod, the killing of its
//! sessions, the crash restart of Postgres (or of a Citus coordinator or worker), and the
//! proxy's cuts and stalls of pod-c.

use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::{Backend, Cluster, sql_connect};
use crate::common::proxy::Mode;
use crate::schedule::{FaultKind, FaultRecord, nanos};
use crate::settings::{BUSY_LIMIT, EXIT_LIMIT, POD_NAMES, PROXIED, TTL};
use crate::violation::Violation;

impl Cluster {
    /// Injects one fault and returns its record once it has healed.
    pub(crate) async fn inject(
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
                tokio::task::block_in_place(|| self.db.server_mut().restart_immediate())
                    .expect("restart Postgres");
                if self.backend() == Backend::Citus {
                    record.note = "the coordinator".into();
                }
            }
            FaultKind::WorkerRestart => {
                let workers = self.db.workers_mut();
                let index = target;
                tokio::task::block_in_place(|| workers[index].restart_immediate())
                    .expect("restart a Citus worker");
                record.note = format!("worker {index}");
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
        if matches!(kind, FaultKind::PgRestart | FaultKind::WorkerRestart) {
            let outage = record.end_ns - record.start_ns;
            let what = std::mem::take(&mut record.note);
            record.note = format!(
                "{what}{}outage {} ms",
                if what.is_empty() { "" } else { ", " },
                outage / 1_000_000
            );
            // An outage within the documented tolerance (0.7 TTL) must change nothing; past it,
            // a run may legitimately lose its lease.
            if outage as f64 >= nanos(TTL) as f64 * proclog::pod::lease::FAULT_TOLERANCE {
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
            postgres_client_ports(self.pods[target].pid(), self.db.server().port())
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
