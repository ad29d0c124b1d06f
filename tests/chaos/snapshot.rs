//! What the database holds at the end of a round: every process row and every event, read
//! once for the invariants and the summary.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

/// A process row as stored.
pub(crate) struct ProcessRow {
    pub(crate) kind: String,
    pub(crate) input: Value,
    pub(crate) disposition: String,
    pub(crate) last_seq: i64,
    pub(crate) terminal_state: Option<String>,
    pub(crate) terminal_seq: Option<i64>,
    pub(crate) output: Option<Value>,
    pub(crate) retries: i32,
    /// The deadline and the completion, in ns since the epoch (database clock).
    pub(crate) deadline_ns: Option<i64>,
    pub(crate) completed_ns: Option<i64>,
    /// The process whose run started it (a child), if any.
    pub(crate) parent_id: Option<String>,
}

/// An event as stored.
pub(crate) struct EventRow {
    pub(crate) seq: i64,
    pub(crate) event_type: String,
    pub(crate) payload: Value,
    pub(crate) replay_key: Option<String>,
    pub(crate) occurred_ns: i64,
    pub(crate) generation: Option<i64>,
}

/// Every process and every event of the round.
pub(crate) struct Snapshot {
    pub(crate) processes: BTreeMap<String, ProcessRow>,
    /// Each log in seq order.
    pub(crate) events: HashMap<String, Vec<EventRow>>,
}

fn nanos(at: Option<chrono::DateTime<chrono::Utc>>) -> Option<i64> {
    at.and_then(|at| at.timestamp_nanos_opt())
}

impl Snapshot {
    pub(crate) async fn load(client: &tokio_postgres::Client) -> Self {
        let processes = client
            .query(
                "SELECT process_id, kind, input, disposition, last_seq, terminal_state,
                        terminal_seq, output, retries, deadline, completed_at, parent_id
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
                    retries: row.get(8),
                    deadline_ns: nanos(row.get(9)),
                    completed_ns: nanos(row.get(10)),
                    parent_id: row.get(11),
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

    pub(crate) fn log(&self, id: &str) -> &[EventRow] {
        self.events.get(id).map_or(&[], Vec::as_slice)
    }
}
