//! The errors of the registry, one variant per way an operation can be refused.

use crate::model::{ProcessId, TerminalState};

/// Why a registry operation did not happen. Every refusal writes nothing.
///
/// Callers match on the variant; the HTTP layer maps each to a stable code and status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProcessError {
    /// No process has this id.
    #[error("process {0} not found")]
    NotFound(ProcessId),
    /// No schedule has this id.
    #[error("schedule {0} not found")]
    ScheduleNotFound(String),
    /// No queue of this name has limits.
    #[error("queue {0} has no limits")]
    QueueNotFound(String),
    /// The id is registered with different content.
    #[error("process {id} is already registered with different content")]
    Conflict {
        /// The id in question.
        id: ProcessId,
    },
    /// The replay key is stored for this process with a different type or payload.
    #[error("replay key {replay_key:?} of process {id} is stored with different content")]
    ReplayConflict {
        /// The process.
        id: ProcessId,
        /// The key that conflicted.
        replay_key: String,
    },
    /// The process is terminal: its log is sealed.
    #[error("process {id} is {state}: its log is sealed")]
    ProcessTerminal {
        /// The process.
        id: ProcessId,
        /// How it ended.
        state: TerminalState,
    },
    /// A different completion was asked of a process that already ended.
    #[error("process {id} already ended as {state}")]
    AlreadyTerminal {
        /// The process.
        id: ProcessId,
        /// How it ended.
        state: TerminalState,
    },
    /// The lease the write was fenced by is not the current live lease (expired, released or
    /// superseded by a newer generation).
    #[error("lease on process {id} is lost (expired or superseded)")]
    LeaseLost {
        /// The process.
        id: ProcessId,
    },
    /// A payload or input is larger than the configured limit.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Its serialized size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// A singleton start policy with `refuse` found a process of its key that has not ended.
    #[error("a process of start key {key:?} has not ended: {existing}")]
    StartRefused {
        /// The start key.
        key: String,
        /// The process of the key that has not ended.
        existing: ProcessId,
    },
    /// Malformed input: a bad id, type, kind, owner, key, limit or state.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The database could not be reached or asked for a retry: connection refused or lost,
    /// pool exhausted, a timeout, a server shutting down or recovering, a serialization
    /// failure or deadlock. Nothing is known to have been written; a write may or may not
    /// have committed when its answer was lost, so retry writes with replay keys.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database answered with an error proclog did not expect.
    #[error("database error: {0}")]
    Database(String),
    /// A stored JSON value of this process cannot be read back (a row written by hand over
    /// SQL beyond what proclog accepts, e.g. nested deeper than [`crate::validate::MAX_JSON_DEPTH`]
    /// allows on write). Only reads of this process's row or of that event fail; nothing
    /// retries it. Repair or delete the row over SQL.
    #[error(
        "process {id}: {location} cannot be read back ({reason}); repair or delete it over SQL"
    )]
    Undecodable {
        /// The process whose row holds the value.
        id: ProcessId,
        /// Which value: `input`, `output`, or `event <seq> payload`.
        location: String,
        /// Why decoding failed.
        reason: String,
    },
}

impl ProcessError {
    /// True when the same call may succeed if tried again: only
    /// [`ProcessError::Unavailable`]. Every other variant is a decision (not found, terminal,
    /// lease lost, conflict, bad input) or an unexpected database answer, which a retry would
    /// only repeat.
    pub fn is_transient(&self) -> bool {
        matches!(self, ProcessError::Unavailable(_))
    }

    /// A short, stable, machine-readable code for the variant (used by the HTTP API).
    pub fn code(&self) -> &'static str {
        match self {
            ProcessError::NotFound(_)
            | ProcessError::ScheduleNotFound(_)
            | ProcessError::QueueNotFound(_) => "not_found",
            ProcessError::Conflict { .. } => "conflict",
            ProcessError::ReplayConflict { .. } => "replay_conflict",
            ProcessError::ProcessTerminal { .. } => "process_terminal",
            ProcessError::AlreadyTerminal { .. } => "already_terminal",
            ProcessError::StartRefused { .. } => "start_refused",
            ProcessError::LeaseLost { .. } => "lease_lost",
            ProcessError::PayloadTooLarge { .. } => "payload_too_large",
            ProcessError::InvalidInput(_) => "invalid_input",
            ProcessError::Unavailable(_) => "unavailable",
            ProcessError::Database(_) => "database_error",
            ProcessError::Undecodable { .. } => "undecodable",
        }
    }
}

/// Shorthand for results of registry operations.
pub type ProcessResult<T> = Result<T, ProcessError>;
