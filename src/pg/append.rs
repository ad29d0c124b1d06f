//! [`AppendWriter`]: the statements that append events, under the registry and under the group
//! commit flushers alike (one writer, no call back into the registry).
//!
//! - Unkeyed appends (the common case) are one plain statement, [`APPEND_UNKEYED`]: it bumps
//!   `last_seq` under the process row's lock (only if the process is not terminal and the
//!   fence, if any, holds) and inserts the events at the seqs that yields. It returns only
//!   what the database decided; the events are rebuilt from the requests. When it writes
//!   nothing, a second round trip (`proclog.refuse_write`) names the reason.
//!   On distributed tables (Citus) the same statement is the body of `proclog.append_unkeyed`,
//!   a function Citus delegates to the worker of the process's shard ([`APPEND_DELEGATED`]);
//!   inline, Citus would pull the bumped row to the coordinator between the two statements,
//!   holding the row lock across the round trips.
//! - Appends with replay keys call `proclog.append_events`, which decides replays under the
//!   row lock (delegated the same way on Citus).
//! - Batches of several callers go through [`super::group`], which runs its statements on the
//!   same [`Db`].

use tokio_postgres::Row;

use super::convert::{JsonText, db_error, event_from_row, write_error};
use super::db::Db;
use crate::error::{ProcessError, ProcessResult};
use crate::model::{AppendOutcome, AppendRequest, ProcessEvent, ProcessId};

/// Appends unkeyed events in one statement (see the module doc). Returns nothing when
/// refused.
pub(crate) const APPEND_UNKEYED: &str = "
    WITH p AS (
        UPDATE proclog.processes
           SET last_seq = last_seq + cardinality($4::text[]),
               status = CASE WHEN status = 'pending' THEN 'running' ELSE status END,
               updated_at = now()
         WHERE process_id = $1
           AND terminal_state IS NULL
           AND proclog.fence_holds($3::uuid, lease_token, lease_expires_at)
        RETURNING last_seq, lease_generation)
    INSERT INTO proclog.events
           (process_id, seq, event_type, payload, writer, lease_generation)
    SELECT $1, p.last_seq - cardinality($4::text[]) + r.ord, r.t, r.p, $2,
           CASE WHEN $3::uuid IS NULL THEN NULL ELSE p.lease_generation END
      FROM p, unnest($4::text[], $5::jsonb[]) WITH ORDINALITY AS r(t, p, ord)
    RETURNING seq, occurred_at, lease_generation";

/// [`APPEND_UNKEYED`] as the schema's function, for distributed tables (see the module doc).
pub(crate) const APPEND_DELEGATED: &str = "
    SELECT seq, occurred_at, lease_generation
      FROM proclog.append_unkeyed($1, $2, $3, $4, $5)";

/// Appends with replay keys, decided under the process row lock by the schema's function.
const APPEND_KEYED: &str = "
    SELECT seq, event_type, payload, replay_key, occurred_at, writer, lease_generation, replayed
      FROM proclog.append_events($1, $2, $3, $4, $5, $6)";

/// Writes validated appends as the pod `writer`.
#[derive(Clone)]
pub(crate) struct AppendWriter {
    pub(crate) db: Db,
    pub(crate) writer: String,
    /// The tables are distributed: unkeyed appends call [`APPEND_DELEGATED`].
    pub(crate) delegated: bool,
}

impl AppendWriter {
    /// One caller's append as a statement of its own.
    pub(crate) async fn single(
        &self,
        id: &ProcessId,
        requests: Vec<AppendRequest>,
        payloads: &[JsonText],
    ) -> ProcessResult<Vec<AppendOutcome>> {
        if requests.iter().any(|r| r.replay_key.is_some()) {
            self.keyed(id, &requests, payloads).await
        } else {
            self.unkeyed(id, requests, payloads).await
        }
    }

    async fn unkeyed(
        &self,
        id: &ProcessId,
        requests: Vec<AppendRequest>,
        payloads: &[JsonText],
    ) -> ProcessResult<Vec<AppendOutcome>> {
        let token = requests[0].fence.map(|fence| fence.token);
        let types: Vec<&str> = requests.iter().map(|r| r.event_type.as_str()).collect();
        let mut rows = self
            .db
            .query(
                if self.delegated {
                    APPEND_DELEGATED
                } else {
                    APPEND_UNKEYED
                },
                &[&id.as_str(), &self.writer, &token, &types, &payloads],
            )
            .await?;
        if rows.len() != requests.len() {
            self.db
                .run("SELECT proclog.refuse_write($1)", &[&id.as_str()], |err| {
                    write_error(id, err)
                })
                .await?;
            return Err(ProcessError::Database(format!(
                "append to {id} wrote {} of {} events and no reason was found",
                rows.len(),
                requests.len()
            )));
        }
        rows.sort_by_key(|row| row.try_get::<_, i64>("seq").unwrap_or_default());
        requests
            .into_iter()
            .zip(&rows)
            .map(|(request, row)| {
                Ok(AppendOutcome {
                    event: self.stored(id, request, row)?,
                    replayed: false,
                })
            })
            .collect()
    }

    async fn keyed(
        &self,
        id: &ProcessId,
        requests: &[AppendRequest],
        payloads: &[JsonText],
    ) -> ProcessResult<Vec<AppendOutcome>> {
        let token = requests[0].fence.map(|fence| fence.token);
        let types: Vec<&str> = requests.iter().map(|r| r.event_type.as_str()).collect();
        let keys: Vec<Option<&str>> = requests.iter().map(|r| r.replay_key.as_deref()).collect();
        let rows = self
            .db
            .run(
                APPEND_KEYED,
                &[&id.as_str(), &self.writer, &token, &types, &payloads, &keys],
                |err| write_error(id, err),
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(AppendOutcome {
                    event: event_from_row(id, row)?,
                    replayed: row.try_get("replayed").map_err(db_error)?,
                })
            })
            .collect()
    }

    /// The event `request` became, from the row of what the database decided for it (`seq`,
    /// `occurred_at`, `lease_generation`).
    pub(crate) fn stored(
        &self,
        id: &ProcessId,
        request: AppendRequest,
        row: &Row,
    ) -> ProcessResult<ProcessEvent> {
        Ok(ProcessEvent {
            process_id: id.clone(),
            seq: row.try_get("seq").map_err(db_error)?,
            event_type: request.event_type,
            payload: request.payload,
            replay_key: request.replay_key,
            occurred_at: row.try_get("occurred_at").map_err(db_error)?,
            writer: self.writer.clone(),
            lease_generation: row.try_get("lease_generation").map_err(db_error)?,
        })
    }
}
