//! The small notices pods exchange over Postgres NOTIFY. Hints only: never a payload, never
//! trusted without reading the log or the terminal column.

use serde::{Deserialize, Serialize};

use crate::model::{ProcessEvent, ProcessId};

/// The NOTIFY channel of event notices.
pub const EVENTS_CHANNEL: &str = "proclog_events";
/// The NOTIFY channel of completion hints (payload: a [`TerminalHint`]).
pub const TERMINAL_CHANNEL: &str = "proclog_terminal";
/// The NOTIFY channel of work hints: runnable processes may exist (payload: the sending pod).
pub const WORK_CHANNEL: &str = "proclog_work";

/// "Process `process_id` has an event `seq` of `event_type`, written by `pod`."
///
/// Serialized as JSON; at most about 1 KiB (ids, types and pod ids are at most 128
/// characters), far below NOTIFY's 8000-byte payload cap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventNotice {
    /// The process.
    pub process_id: ProcessId,
    /// The event's seq.
    pub seq: i64,
    /// The event's type.
    pub event_type: String,
    /// The pod that wrote it.
    pub pod: String,
    /// When the writer was told the append committed: its wall clock, in microseconds since
    /// the Unix epoch. Receivers measure notice latency from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at_us: Option<i64>,
}

impl EventNotice {
    /// The notice of `event` written by `pod`.
    pub fn of(event: &ProcessEvent, pod: &str) -> Self {
        Self {
            process_id: event.process_id.clone(),
            seq: event.seq,
            event_type: event.event_type.clone(),
            pod: pod.to_owned(),
            sent_at_us: Some(chrono::Utc::now().timestamp_micros()),
        }
    }

    /// The NOTIFY payload.
    pub fn to_payload(&self) -> String {
        serde_json::to_string(self).expect("a notice serializes")
    }

    /// Parses a NOTIFY payload; `None` for anything malformed (ignored by listeners).
    pub fn from_payload(payload: &str) -> Option<Self> {
        serde_json::from_str(payload).ok()
    }
}

/// "Process `process_id` was completed through `pod`": wakes waiters on other pods, which then
/// read the terminal column.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalHint {
    /// The process.
    pub process_id: ProcessId,
    /// The pod that completed it.
    pub pod: String,
}

impl TerminalHint {
    /// The NOTIFY payload.
    pub fn to_payload(&self) -> String {
        serde_json::to_string(self).expect("a hint serializes")
    }

    /// Parses a NOTIFY payload; `None` for anything malformed (ignored by listeners).
    pub fn from_payload(payload: &str) -> Option<Self> {
        serde_json::from_str(payload).ok()
    }
}
