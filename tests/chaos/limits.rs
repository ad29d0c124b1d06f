//! The invariant of queue limits (CONTRACT §10), sampled over SQL while the round runs:
//!
//! - p. no limit exceeded: every 50 ms, the live leases of the limited queue, of each of its
//!   keys and of each pod in it are counted on the database; no sample may exceed the
//!   queue's concurrency, a key's, or the per-pod limit, whatever the faults do (a crashed
//!   database, a stopped pod whose leases lapse, cut connections in the middle of a claim).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::violation::Violation;

/// The limited queue of the round.
pub(crate) const QUEUE: &str = "chaos-limited";
const QUEUE_CONCURRENCY: i64 = 3;
const KEY_CONCURRENCY: i64 = 1;
const POD_CONCURRENCY: i64 = 2;
const KEYS: usize = 4;

/// The queue's limits, as `PUT /v1/queues/chaos-limited` takes them.
pub(crate) fn limits_body() -> Value {
    json!({
        "queue": {"concurrency": QUEUE_CONCURRENCY, "per_pod": POD_CONCURRENCY},
        "each_key": {"concurrency": KEY_CONCURRENCY},
    })
}

/// A `Limited` process: `steps` in the queue, under one of four keys (by its id).
pub(crate) fn registration(id: &str) -> Value {
    let key = id.bytes().map(usize::from).sum::<usize>() % KEYS;
    json!({
        "id": id, "kind": "steps", "input": {"steps": 6, "delay_ms": 150},
        "disposition": "rerun", "queue": QUEUE, "concurrency_key": format!("tenant-{key}"),
    })
}

/// What the sampler saw.
#[derive(Debug, Default)]
pub(crate) struct Sampled {
    pub(crate) samples: u64,
    pub(crate) failed_samples: u64,
    pub(crate) peak_queue: i64,
    pub(crate) peak_key: i64,
    pub(crate) peak_pod: i64,
    pub(crate) violations: Vec<Violation>,
}

/// Samples the queue's live leases every 50 ms until `stop` (reconnecting while the
/// database is down).
pub(crate) async fn sample(url: String, stop: CancellationToken) -> Sampled {
    const RULE: &str = "p. no limit exceeded";
    let mut sampled = Sampled::default();
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.is_cancelled() {
        if client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    Some(client)
                }
                Err(_) => None,
            };
        }
        let rows = match &client {
            Some(client) => client
                .query(
                    "SELECT concurrency_key, lease_owner, count(*), now()::text
                       FROM proclog.processes
                      WHERE coalesce(queue, kind) = $1 AND terminal_state IS NULL
                        AND lease_expires_at > now()
                      GROUP BY 1, 2",
                    &[&QUEUE],
                )
                .await
                .ok(),
            None => None,
        };
        let Some(rows) = rows else {
            sampled.failed_samples += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (mut total, mut keys, mut pods) = (0i64, HashMap::new(), HashMap::new());
        let mut at = String::new();
        for row in &rows {
            let (key, owner, count): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
            at = row.get(3);
            total += count;
            *keys.entry(key).or_insert(0i64) += count;
            *pods.entry(owner).or_insert(0i64) += count;
        }
        sampled.samples += 1;
        sampled.peak_queue = sampled.peak_queue.max(total);
        if total > QUEUE_CONCURRENCY {
            sampled.violations.push(Violation::new(
                RULE,
                QUEUE,
                format!("{total} live leases at {at}, limit {QUEUE_CONCURRENCY}"),
            ));
        }
        for (key, count) in keys {
            sampled.peak_key = sampled.peak_key.max(count);
            if count > KEY_CONCURRENCY {
                sampled.violations.push(Violation::new(
                    RULE,
                    &key,
                    format!("{count} live leases of key {key} at {at}, limit {KEY_CONCURRENCY}"),
                ));
            }
        }
        for (pod, count) in pods {
            sampled.peak_pod = sampled.peak_pod.max(count);
            if count > POD_CONCURRENCY {
                sampled.violations.push(Violation::new(
                    RULE,
                    &pod,
                    format!("{count} live leases of pod {pod} at {at}, limit {POD_CONCURRENCY}"),
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sampled
}
