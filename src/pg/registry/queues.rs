//! Claims of controlled queues (see [`crate::queue`]): one transaction, begun once the session
//! holds the advisory lock of controlled claims ([`CLAIMS_LOCK`], released only after the
//! commit has returned), counts each queue's live leases and recent starts, visits its keys
//! round-robin from the one visited last, and claims each chosen process with a statement on
//! its own row. Every statement on `processes` is a
//! claim of one process or a bounded, indexed scan of one queue (the next key after another;
//! a key's first runnable processes; the queue's live leases), so it runs per shard on Citus.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::Row;

use super::claim::CLAIM_ONE;
use super::{PgProcessRegistry, ttl_millis};
use crate::error::{ProcessError, ProcessResult};
use crate::pg::convert::db_error;
use crate::queue::{Counted, MAX_KEY_VISITS, QueueLimits};

type Tx<'a> = deadpool_postgres::Transaction<'a>;

/// The session-level advisory lock every controlled claim holds, from before its transaction
/// begins until after its commit has returned. A row lock would not do on Citus: the
/// coordinator commits (releasing its row locks) before the workers commit the claims, so
/// a claimer that got the row's lock in between could count leases not visible yet.
const CLAIMS_LOCK: i64 = 0x7072_6f63_6c6f_6751;

/// Longest wait for [`CLAIMS_LOCK`]: a claimer stalled holding it holds every other claimer
/// of controlled queues at most this long (they then give up this claim and try again).
const CLAIMS_LOCK_WAIT: Duration = Duration::from_secs(5);

/// The first key of a queue with live work (`$2` is `''`: every key is `>=` it).
const FIRST_KEY: &str = "SELECT min(concurrency_key) FROM proclog.processes
  WHERE coalesce(queue, kind) = $1 AND concurrency_key >= $2 AND terminal_state IS NULL";

/// The next key of a queue with live work after `$2`.
const NEXT_KEY: &str = "SELECT min(concurrency_key) FROM proclog.processes
  WHERE coalesce(queue, kind) = $1 AND concurrency_key > $2 AND terminal_state IS NULL";

/// Up to `$3` claimable processes of one key, in claim order: runnable now (not `external`,
/// not past a deadline: those are failed by the other claim, whatever the limits); higher
/// priority first, then the order they became runnable.
const KEY_HEADS: &str = "SELECT process_id, priority FROM proclog.processes
  WHERE coalesce(queue, kind) = $1 AND concurrency_key = $2 AND terminal_state IS NULL
    AND (lease_expires_at IS NULL OR lease_expires_at <= now())
    AND disposition <> 'external' AND coalesce(wake_at, created_at) <= now()
    AND (deadline IS NULL OR deadline > now())
  ORDER BY priority DESC, coalesce(wake_at, created_at), process_id
  LIMIT $3";

/// A queue's live leases by key, and those of pod `$2`.
const LIVE_LEASES: &str = "SELECT concurrency_key, count(*) AS running,
       count(*) FILTER (WHERE lease_owner = $2) AS mine
  FROM proclog.processes
 WHERE coalesce(queue, kind) = $1 AND terminal_state IS NULL AND lease_expires_at > now()
 GROUP BY concurrency_key";

impl PgProcessRegistry {
    /// The controlled queues' names (all of them: [`crate::queue::MAX_QUEUES`] bounds them,
    /// give or take a few set at the same instant).
    pub(super) async fn controlled_queues(&self) -> ProcessResult<Vec<String>> {
        Ok(self
            .query("SELECT queue FROM proclog.queues ORDER BY queue", &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }

    /// Claims up to `limit` processes of the controlled queues for `owner`, within their
    /// limits; `round` rotates which queue is served first.
    pub(super) async fn claim_controlled(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
        round: u64,
    ) -> ProcessResult<Vec<Row>> {
        self.db
            .transaction_under_lock(CLAIMS_LOCK, CLAIMS_LOCK_WAIT, async |tx: &Tx<'_>| {
                // A claimer whose client vanishes mid-claim holds the lock this long at most.
                tx.batch_execute("SET LOCAL idle_in_transaction_session_timeout = '30s'")
                    .await
                    .map_err(db_error)?;
                let queues = tx
                    .query(
                        "SELECT queue, limits, cursor_key FROM proclog.queues ORDER BY queue",
                        &[],
                    )
                    .await
                    .map_err(db_error)?;
                let mut claimed = Vec::new();
                let start = if queues.is_empty() {
                    0
                } else {
                    (round % queues.len() as u64) as usize
                };
                for row in queues[start..].iter().chain(&queues[..start]) {
                    let free = limit as usize - claimed.len();
                    if free == 0 {
                        break;
                    }
                    let queue: String = row.get("queue");
                    let limits: serde_json::Value = row.get("limits");
                    let limits: QueueLimits = match serde_json::from_value(limits) {
                        Ok(limits) => limits,
                        Err(err) => {
                            tracing::error!(queue, error = %err, "unreadable queue limits (written by hand?): its work is held");
                            continue;
                        }
                    };
                    let cursor: Option<String> = row.get("cursor_key");
                    let queue_claim = QueueClaim {
                        tx,
                        queue: &queue,
                        limits: &limits,
                        owner,
                        ttl,
                    };
                    claimed.extend(queue_claim.claim(cursor.as_deref(), free).await?);
                }
                Ok(claimed)
            })
            .await
    }
}

/// One controlled queue's share of a claim, inside the claim's transaction.
struct QueueClaim<'a> {
    tx: &'a Tx<'a>,
    queue: &'a str,
    limits: &'a QueueLimits,
    owner: &'a str,
    ttl: Duration,
}

/// A key visited by a claim: what its limits count, and its first claimable processes with
/// their priorities.
struct Visited {
    key: String,
    counted: Counted,
    heads: Vec<(String, i16)>,
}

impl QueueClaim<'_> {
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> ProcessResult<Vec<Row>> {
        let statement = self.tx.prepare_cached(sql).await.map_err(db_error)?;
        self.tx.query(&statement, params).await.map_err(db_error)
    }

    /// Claims up to `free` of the queue's processes, keys round-robin from after `cursor`.
    async fn claim(&self, cursor: Option<&str>, free: usize) -> ProcessResult<Vec<Row>> {
        // Starts older than every period are forgotten (all of them once no rate applies).
        let period = millis(self.limits.longest_period().unwrap_or(0));
        self.query(
            "DELETE FROM proclog.queue_starts
              WHERE queue = $1 AND started_at <= now() - $2::bigint * interval '1 millisecond'",
            &[&self.queue, &period],
        )
        .await?;
        let mut by_key: HashMap<String, Counted> = HashMap::new();
        let mut total = Counted::default();
        for row in self.query(LIVE_LEASES, &[&self.queue, &self.owner]).await? {
            let (running, mine): (i64, i64) = (row.get("running"), row.get("mine"));
            let counted = Counted {
                running: running as u64,
                mine: mine as u64,
                recent_starts: 0,
            };
            total.running += counted.running;
            total.mine += counted.mine;
            by_key.insert(row.get("concurrency_key"), counted);
        }
        if let Some(rate) = self.limits.queue.rate {
            total.recent_starts = self.recent_starts(None, rate.period_ms).await?;
        }
        if !self.limits.queue.admits(&total) {
            return Ok(Vec::new());
        }
        let (visited, last_visited) = self.visit_keys(cursor, free, &mut by_key).await?;
        self.claim_round_robin(visited, last_visited, free, total)
            .await
    }

    /// Visits the queue's keys with live work from after `cursor` (wrapping around once),
    /// keeping those within their limits that have claimable work, until `free` are kept or
    /// [`MAX_KEY_VISITS`] were visited; returns them and the last key visited.
    async fn visit_keys(
        &self,
        cursor: Option<&str>,
        free: usize,
        by_key: &mut HashMap<String, Counted>,
    ) -> ProcessResult<(Vec<Visited>, Option<String>)> {
        let mut kept = Vec::new();
        let mut position: Option<String> = cursor.map(str::to_owned);
        let mut wrapped = cursor.is_none();
        let fetch = free as i64;
        for _ in 0..MAX_KEY_VISITS {
            if kept.len() >= free {
                break;
            }
            let rows = match &position {
                Some(after) => self.query(NEXT_KEY, &[&self.queue, after]).await?,
                None => self.query(FIRST_KEY, &[&self.queue, &""]).await?,
            };
            let next: Option<String> = rows.first().and_then(|row| row.get(0));
            let Some(key) = next else {
                if wrapped {
                    break;
                }
                wrapped = true;
                position = None;
                continue;
            };
            if wrapped && cursor.is_some_and(|cursor| key.as_str() > cursor) {
                break;
            }
            position = Some(key.clone());
            let limits = self.limits.of_key(&key);
            let mut counted = by_key.remove(&key).unwrap_or_default();
            if let Some(rate) = limits.rate {
                counted.recent_starts = self.recent_starts(Some(&key), rate.period_ms).await?;
            }
            if !limits.admits(&counted) {
                continue;
            }
            let heads: Vec<(String, i16)> = self
                .query(KEY_HEADS, &[&self.queue, &key, &fetch])
                .await?
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
            if !heads.is_empty() {
                kept.push(Visited {
                    key,
                    counted,
                    heads,
                });
            }
        }
        Ok((kept, position))
    }

    /// Claims the visited keys' processes one per key per round (within a round, the keys
    /// whose next process has the higher priority first, then in visiting order), while the
    /// queue's and each key's limits admit more. Moves the cursor to the last key served, or
    /// when none was, to the last key visited (so that keys past those that could not be
    /// served get their turn).
    async fn claim_round_robin(
        &self,
        mut visited: Vec<Visited>,
        last_visited: Option<String>,
        free: usize,
        mut total: Counted,
    ) -> ProcessResult<Vec<Row>> {
        let mut claimed = Vec::new();
        let mut last_served: Option<String> = None;
        let ttl = ttl_millis(self.ttl);
        let rounds = visited.iter().map(|key| key.heads.len()).max().unwrap_or(0);
        'rounds: for round in 0..rounds {
            let mut order: Vec<usize> = (0..visited.len())
                .filter(|&n| round < visited[n].heads.len())
                .collect();
            order.sort_by_key(|&n| std::cmp::Reverse(visited[n].heads[round].1));
            for n in order {
                let key = &mut visited[n];
                if claimed.len() >= free || !self.limits.queue.admits(&total) {
                    break 'rounds;
                }
                let id = &key.heads[round].0;
                if !self.limits.of_key(&key.key).admits(&key.counted) {
                    continue;
                }
                let token = uuid::Uuid::new_v4();
                let rows = self
                    .query(CLAIM_ONE, &[&self.owner, &ttl, id, &token])
                    .await?;
                if rows.is_empty() {
                    continue;
                }
                claimed.extend(rows);
                total.claimed();
                key.counted.claimed();
                last_served = Some(key.key.clone());
                if self.limits.queue.rate.is_some() || self.limits.of_key(&key.key).rate.is_some() {
                    self.query(
                        "INSERT INTO proclog.queue_starts (queue, concurrency_key, process_id)
                         VALUES ($1, $2, $3)",
                        &[&self.queue, &key.key, id],
                    )
                    .await?;
                }
            }
        }
        if let Some(key) = last_served.or(last_visited) {
            self.query(
                "UPDATE proclog.queues SET cursor_key = $2 WHERE queue = $1",
                &[&self.queue, &key],
            )
            .await?;
        }
        Ok(claimed)
    }

    /// Starts within the last `period_ms` of the queue, or of one of its keys.
    async fn recent_starts(&self, key: Option<&str>, period_ms: u64) -> ProcessResult<u64> {
        let period = millis(period_ms);
        let rows = match key {
            Some(key) => {
                self.query(
                    "SELECT count(*) FROM proclog.queue_starts
                      WHERE queue = $1 AND concurrency_key = $2
                        AND started_at > now() - $3::bigint * interval '1 millisecond'",
                    &[&self.queue, &key, &period],
                )
                .await?
            }
            None => {
                self.query(
                    "SELECT count(*) FROM proclog.queue_starts
                      WHERE queue = $1
                        AND started_at > now() - $2::bigint * interval '1 millisecond'",
                    &[&self.queue, &period],
                )
                .await?
            }
        };
        let count: i64 = rows
            .first()
            .map(|row| row.get(0))
            .ok_or_else(|| ProcessError::Database("count returned no row".into()))?;
        Ok(count as u64)
    }
}

fn millis(period_ms: u64) -> i64 {
    i64::try_from(period_ms).expect("validated bound")
}
