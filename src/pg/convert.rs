//! Conversions between Postgres rows, errors and parameters and the proclog model.

use std::error::Error as StdError;

use bytes::{BufMut, BytesMut};
use tokio_postgres::Row;
use tokio_postgres::error::DbError;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use crate::error::ProcessError;
use crate::model::{
    LeaseInfo, ProcessEvent, ProcessId, ProcessRecord, TerminalRecord, TerminalState,
};

/// SQLSTATEs raised by the schema's functions (see `migrations/`).
pub(crate) mod sqlstate {
    /// No such process.
    pub const NOT_FOUND: &str = "PLNF0";
    /// The process is terminal; DETAIL is its state.
    pub const TERMINAL: &str = "PLTM0";
    /// The fence is not the current live lease.
    pub const LEASE_LOST: &str = "PLLL0";
    /// The replay key is stored with other content; DETAIL is the key.
    pub const REPLAY_CONFLICT: &str = "PLRC0";
    /// A different completion of a terminal process; DETAIL is its state.
    pub const ALREADY_TERMINAL: &str = "PLAT0";
    /// A singleton start refused; DETAIL is the process of the key that has not ended.
    pub const START_REFUSED: &str = "PLSK0";
}

/// JSON already serialized (and measured against the payload limit), sent as `json`/`jsonb`
/// without a second serialization.
#[derive(Debug)]
pub(crate) struct JsonText(pub Vec<u8>);

impl ToSql for JsonText {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(1); // jsonb binary format version
        }
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON || *ty == Type::JSONB
    }

    to_sql_checked!();
}

/// The columns of `proclog.processes` that [`process_from_row`] reads, by name (a macro, so
/// that statements can be built with `concat!` at compile time).
macro_rules! process_columns {
    () => {
        "process_id, kind, input, disposition, status, last_seq, created_at, updated_at, \
         lease_owner, lease_generation, lease_expires_at, terminal_state, terminal_seq, output, \
         completed_at, attempts, started_at, cancel_request, \
         CASE WHEN isfinite(wake_at) THEN wake_at END AS wake_at, waiting_for, deadline, \
         retries, retry_policy, trace_parent, parent_id, has_children, \
         coalesce(queue, kind) AS queue, concurrency_key, priority"
    };
}
pub(crate) use process_columns;

/// [`process_columns!`] as a constant, for statements built at run time.
pub(crate) const PROCESS_COLUMNS: &str = process_columns!();

/// The columns of `proclog.events` (without `process_id`) that [`event_from_row`] reads, by
/// name.
macro_rules! event_columns {
    () => {
        "seq, event_type, payload, replay_key, occurred_at, writer, lease_generation"
    };
}
pub(crate) use event_columns;

/// A `json`/`jsonb` value with the size of its text, read in one pass.
struct SizedJson(serde_json::Value, usize);

impl<'a> tokio_postgres::types::FromSql<'a> for SizedJson {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        let text = if *ty == Type::JSONB {
            match raw.split_first() {
                Some((1, text)) => text,
                _ => return Err("unsupported jsonb format version".into()),
            }
        } else {
            raw
        };
        Ok(SizedJson(serde_json::from_slice(text)?, text.len()))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON || *ty == Type::JSONB
    }
}

/// A JSON column of process `id`'s row (`location` names it in the error): a value that
/// cannot be decoded is [`ProcessError::Undecodable`], which fails this read alone.
pub(crate) fn json_at(
    row: &Row,
    column: &str,
    id: &ProcessId,
    location: impl FnOnce() -> String,
) -> Result<serde_json::Value, ProcessError> {
    sized_json_at(row, column, id, location).map(|(value, _)| value)
}

/// [`json_at`], with the size of the value's text in bytes.
fn sized_json_at(
    row: &Row,
    column: &str,
    id: &ProcessId,
    location: impl FnOnce() -> String,
) -> Result<(serde_json::Value, usize), ProcessError> {
    row.try_get::<_, SizedJson>(column)
        .map(|SizedJson(value, size)| (value, size))
        .map_err(|err| undecodable(id, location(), &err))
}

/// The error of a JSON value of `id`'s row that cannot be decoded.
fn undecodable(id: &ProcessId, location: String, err: &tokio_postgres::Error) -> ProcessError {
    let reason = std::error::Error::source(err).map_or_else(|| err.to_string(), |s| s.to_string());
    ProcessError::Undecodable {
        id: id.clone(),
        location,
        reason,
    }
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> ProcessError {
    ProcessError::Database(format!("unexpected {what} in the database: {err}"))
}

/// `(id, terminal column)` from a row of `process_id, terminal_state, terminal_seq, output,
/// completed_at`.
pub(crate) fn terminal_from_row(
    row: &Row,
) -> Result<(ProcessId, Option<TerminalRecord>), ProcessError> {
    let id: String = row.try_get("process_id").map_err(db_error)?;
    let id = ProcessId::new(id).map_err(|err| corrupt("process id", err))?;
    let terminal = terminal_at(row, &id)?;
    Ok((id, terminal))
}

/// The terminal column from the columns `terminal_state, terminal_seq, output, completed_at`.
fn terminal_at(row: &Row, id: &ProcessId) -> Result<Option<TerminalRecord>, ProcessError> {
    sized_terminal_at(row, id).map(|(terminal, _)| terminal)
}

/// [`terminal_at`], with the size of the output's text in bytes (0 when none).
fn sized_terminal_at(
    row: &Row,
    id: &ProcessId,
) -> Result<(Option<TerminalRecord>, usize), ProcessError> {
    let state: Option<String> = row.try_get("terminal_state").map_err(db_error)?;
    let Some(state) = state else {
        return Ok((None, 0));
    };
    let (output, size) = sized_json_at(row, "output", id, || "output".into())?;
    let terminal = TerminalRecord {
        state: state
            .parse::<TerminalState>()
            .map_err(|err| corrupt("terminal state", err))?,
        seq: row.try_get("terminal_seq").map_err(db_error)?,
        output,
        completed_at: row.try_get("completed_at").map_err(db_error)?,
    };
    Ok((Some(terminal), size))
}

/// A process record from a row of [`PROCESS_COLUMNS`].
pub(crate) fn process_from_row(row: &Row) -> Result<ProcessRecord, ProcessError> {
    sized_process_from_row(row).map(|(record, _)| record)
}

/// [`process_from_row`], with the size of its input's and output's text in bytes.
pub(crate) fn sized_process_from_row(row: &Row) -> Result<(ProcessRecord, usize), ProcessError> {
    let id: String = row.try_get("process_id").map_err(db_error)?;
    let id = ProcessId::new(id).map_err(|err| corrupt("process id", err))?;
    let disposition: String = row.try_get("disposition").map_err(db_error)?;
    let status: String = row.try_get("status").map_err(db_error)?;
    let lease_owner: Option<String> = row.try_get("lease_owner").map_err(db_error)?;
    let lease_expires_at = row.try_get("lease_expires_at").map_err(db_error)?;
    let (terminal, output_size) = sized_terminal_at(row, &id)?;
    let lease_generation = row.try_get("lease_generation").map_err(db_error)?;
    let (input, input_size) = sized_json_at(row, "input", &id, || "input".into())?;
    let cancel_request = row
        .try_get::<_, Option<SizedJson>>("cancel_request")
        .map_err(|err| undecodable(&id, "cancel_request".into(), &err))?
        .map(|SizedJson(value, _)| value);
    let retry_policy = row
        .try_get::<_, Option<SizedJson>>("retry_policy")
        .map_err(|err| undecodable(&id, "retry_policy".into(), &err))?
        .map(|SizedJson(value, _)| serde_json::from_value(value))
        .transpose()
        .map_err(|err| ProcessError::Undecodable {
            id: id.clone(),
            location: "retry_policy".into(),
            reason: err.to_string(),
        })?;
    let record = ProcessRecord {
        input,
        id,
        kind: row.try_get("kind").map_err(db_error)?,
        disposition: disposition
            .parse()
            .map_err(|err| corrupt("disposition", err))?,
        status: status.parse().map_err(|err| corrupt("status", err))?,
        last_seq: row.try_get("last_seq").map_err(db_error)?,
        created_at: row.try_get("created_at").map_err(db_error)?,
        updated_at: row.try_get("updated_at").map_err(db_error)?,
        lease_generation,
        attempts: row.try_get("attempts").map_err(db_error)?,
        lease: match (lease_owner, lease_expires_at) {
            (Some(owner), Some(expires_at)) => Some(LeaseInfo {
                owner,
                generation: lease_generation,
                expires_at,
            }),
            _ => None,
        },
        terminal,
        started_at: row.try_get("started_at").map_err(db_error)?,
        cancel_request,
        wake_at: row.try_get("wake_at").map_err(db_error)?,
        waiting_for: row.try_get("waiting_for").map_err(db_error)?,
        deadline: row.try_get("deadline").map_err(db_error)?,
        retries: row.try_get("retries").map_err(db_error)?,
        retry_policy,
        trace_parent: row.try_get("trace_parent").map_err(db_error)?,
        parent: row
            .try_get::<_, Option<String>>("parent_id")
            .map_err(db_error)?
            .map(|parent| ProcessId::new(parent).map_err(|err| corrupt("parent id", err)))
            .transpose()?,
        has_children: row.try_get("has_children").map_err(db_error)?,
        queue: row.try_get("queue").map_err(db_error)?,
        concurrency_key: Some(
            row.try_get::<_, String>("concurrency_key")
                .map_err(db_error)?,
        )
        .filter(|key| !key.is_empty()),
        priority: row.try_get("priority").map_err(db_error)?,
    };
    Ok((record, input_size + output_size))
}

/// An event of `process_id` from a row with the columns of [`event_columns!`].
pub(crate) fn event_from_row(
    process_id: &ProcessId,
    row: &Row,
) -> Result<ProcessEvent, ProcessError> {
    sized_event_from_row(process_id, row).map(|(event, _)| event)
}

/// [`event_from_row`], with the size of the payload's text in bytes.
pub(crate) fn sized_event_from_row(
    process_id: &ProcessId,
    row: &Row,
) -> Result<(ProcessEvent, usize), ProcessError> {
    let seq: i64 = row.try_get("seq").map_err(db_error)?;
    let (payload, size) = sized_json_at(row, "payload", process_id, || {
        format!("event {seq} payload")
    })?;
    let event = ProcessEvent {
        process_id: process_id.clone(),
        seq,
        event_type: row.try_get("event_type").map_err(db_error)?,
        payload,
        replay_key: row.try_get("replay_key").map_err(db_error)?,
        occurred_at: row.try_get("occurred_at").map_err(db_error)?,
        writer: row.try_get("writer").map_err(db_error)?,
        lease_generation: row.try_get("lease_generation").map_err(db_error)?,
    };
    Ok((event, size))
}

fn terminal_detail(db: &DbError) -> Result<TerminalState, ProcessError> {
    terminal_state_detail(db.detail())
}

/// The terminal state named by a refusal's detail.
pub(crate) fn terminal_state_detail(detail: Option<&str>) -> Result<TerminalState, ProcessError> {
    detail
        .unwrap_or_default()
        .parse()
        .map_err(|err| corrupt("terminal state", err))
}

/// Maps a database error raised while writing to `id` to the registry's error.
pub(crate) fn write_error(id: &ProcessId, err: tokio_postgres::Error) -> ProcessError {
    let Some(db) = err.as_db_error() else {
        return db_error(err);
    };
    match db.code().code() {
        sqlstate::NOT_FOUND => ProcessError::NotFound(id.clone()),
        sqlstate::TERMINAL => match terminal_detail(db) {
            Ok(state) => ProcessError::ProcessTerminal {
                id: id.clone(),
                state,
            },
            Err(err) => err,
        },
        sqlstate::ALREADY_TERMINAL => match terminal_detail(db) {
            Ok(state) => ProcessError::AlreadyTerminal {
                id: id.clone(),
                state,
            },
            Err(err) => err,
        },
        sqlstate::LEASE_LOST => ProcessError::LeaseLost { id: id.clone() },
        sqlstate::REPLAY_CONFLICT => ProcessError::ReplayConflict {
            id: id.clone(),
            replay_key: db.detail().unwrap_or_default().to_owned(),
        },
        _ => db_error(err),
    }
}

/// Maps an error of `proclog.start_process` for start key `key`.
pub(crate) fn start_error(key: &str, err: tokio_postgres::Error) -> ProcessError {
    let refused = err
        .as_db_error()
        .filter(|db| db.code().code() == sqlstate::START_REFUSED)
        .map(|db| ProcessId::new(db.detail().unwrap_or_default()));
    match refused {
        Some(Ok(existing)) => ProcessError::StartRefused {
            key: key.to_owned(),
            existing,
        },
        Some(Err(err)) => ProcessError::Database(format!("start_process refused: {err}")),
        None => db_error(err),
    }
}

/// Maps a database error with no process-specific meaning: a lost or refused connection is
/// `Unavailable`, anything else `Database`.
pub(crate) fn db_error(err: tokio_postgres::Error) -> ProcessError {
    if err.is_closed() || err.as_db_error().is_none() && err.source().is_some_and(is_io) {
        return ProcessError::Unavailable(err.to_string());
    }
    match err.as_db_error() {
        Some(db) if is_unavailable_state(db.code().code()) => {
            ProcessError::Unavailable(format!("{}: {}", db.code().code(), db.message()))
        }
        Some(db) => ProcessError::Database(format!("{}: {}", db.code().code(), db.message())),
        None => ProcessError::Database(err.to_string()),
    }
}

fn is_io(err: &(dyn StdError + 'static)) -> bool {
    err.is::<std::io::Error>()
}

/// Connection exceptions (08), insufficient resources (53), operator intervention (57:
/// shutdown, crash recovery, terminated backends, statement timeouts), system errors (58),
/// serialization failures (40001), deadlocks (40P01) and a read-only server (25006: a
/// primary being demoted, or a failover not yet finished) mean "try again".
pub(crate) fn is_unavailable_state(code: &str) -> bool {
    ["08", "53", "57", "58"]
        .iter()
        .any(|class| code.starts_with(class))
        || matches!(code, "40001" | "40P01" | "25006")
}

/// Maps a pool checkout failure.
pub(crate) fn pool_error(err: deadpool_postgres::PoolError) -> ProcessError {
    match err {
        deadpool_postgres::PoolError::Backend(err) => db_error(err),
        other => ProcessError::Unavailable(other.to_string()),
    }
}
