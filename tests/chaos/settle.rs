//! The end of a round: the load client's last requests, the completion of every `external`
//! process still open, and the wait for every process to reach a terminal state.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::api::{Api, Outcome};
use crate::settings::{LOAD_DRAIN_LIMIT, SETTLE_LIMIT};
use crate::violation::Violation;

/// Waits (bounded) for the load client's last requests.
pub(crate) async fn finish_load(
    load: tokio::task::JoinHandle<()>,
    violations: &mut Vec<Violation>,
) {
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
pub(crate) async fn complete_open_externals(
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
pub(crate) async fn await_all_terminal(
    client: &tokio_postgres::Client,
    violations: &mut Vec<Violation>,
) {
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
