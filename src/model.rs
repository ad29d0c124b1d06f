//! The data model of proclog: processes, their events, terminal states and leases.
//!
//! Everything here is plain data. Validation of caller-supplied values lives in
//! [`crate::validate`]; the operations over these types live in [`crate::registry`].

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::ProcessError;
use crate::validate;

/// The identifier of a process: 1 to 128 characters from `[A-Za-z0-9._:-]`.
///
/// A `ProcessId` can only be built through [`ProcessId::new`] (which validates) or
/// [`ProcessId::generate`] (a UUIDv7), so holding one proves the id is well formed.
///
/// ```
/// use proclog::{ProcessError, ProcessId};
///
/// let id = ProcessId::new("order:42.v1_x-y").unwrap();
/// assert_eq!(id.as_str(), "order:42.v1_x-y");
/// assert!(matches!(ProcessId::new("has space"), Err(ProcessError::InvalidInput(_))));
/// assert!(ProcessId::new("x".repeat(129)).is_err());
/// assert_eq!(ProcessId::generate().as_str().len(), 36);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(transparent)]
#[cfg_attr(feature = "http", schema(value_type = String, pattern = "^[A-Za-z0-9._:-]{1,128}$", example = "order-42"))]
pub struct ProcessId(String);

impl ProcessId {
    /// Validates `id` and wraps it; a malformed id is [`ProcessError::InvalidInput`].
    pub fn new(id: impl Into<String>) -> Result<Self, ProcessError> {
        let id = id.into();
        validate::process_id(&id)?;
        Ok(Self(id))
    }

    /// A fresh, time-ordered id (UUIDv7 in its hyphenated form).
    pub fn generate() -> Self {
        Self(Uuid::now_v7().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lookups by `&str` in maps keyed by process id (hashing and equality are the text's).
impl std::borrow::Borrow<str> for ProcessId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ProcessId {
    type Err = ProcessError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for ProcessId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        ProcessId::new(raw).map_err(serde::de::Error::custom)
    }
}

/// Whether two JSON values are the same content, by the rule of Postgres `jsonb` equality,
/// which every registry applies to replays, re-registrations and repeated completions:
/// numbers compare by value (`1`, `1.0` and `1e0` are equal), object keys in any order, arrays
/// in order, strings exactly.
///
/// ```
/// use proclog::json_equal;
/// use serde_json::json;
///
/// assert!(json_equal(&json!({"x": 1, "y": [2]}), &json!({"y": [2.0], "x": 1.0})));
/// assert!(!json_equal(&json!({"x": 1}), &json!({"x": "1"})));
/// assert!(!json_equal(&json!([1, 2]), &json!([2, 1])));
/// ```
pub fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
                (Some(x), Some(y), _, _) => x == y,
                (_, _, Some(x), Some(y)) => x == y,
                _ if x.is_f64() || y.is_f64() => x.as_f64() == y.as_f64(),
                // One is above i64::MAX, the other negative.
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_equal(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(key, value)| y.get(key).is_some_and(|other| json_equal(value, other)))
        }
        _ => a == b,
    }
}

/// Declares a text-backed enum with its canonical lower-case names, used both in the
/// database (`text` columns with `CHECK` constraints) and on the wire.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The canonical text form, as stored in the database.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ProcessError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(ProcessError::InvalidInput(format!(
                        concat!("unknown ", stringify!($name), " {:?}"), other
                    ))),
                }
            }
        }
    };
}

text_enum! {
    /// Where a process is in its life. Terminal states are absorbing.
    ProcessStatus {
        /// Registered, never started.
        Pending => "pending",
        /// Claimed by an owner or written to; not yet terminal.
        Running => "running",
        /// Waiting without a pod (a timer, a message, a retry's backoff): claimable again
        /// once its `wake_at` has come (a message of the topic it waits for brings it now).
        Waiting => "waiting",
        /// Ended successfully.
        Completed => "completed",
        /// Ended with an error.
        Failed => "failed",
        /// Ended because cancellation was requested.
        Cancelled => "cancelled",
        /// Ended because its owner was lost and its disposition is `abandon`.
        Abandoned => "abandoned",
    }
}

text_enum! {
    /// The four ways a process can end.
    TerminalState {
        /// Ended successfully.
        Completed => "completed",
        /// Ended with an error.
        Failed => "failed",
        /// Ended because cancellation was requested.
        Cancelled => "cancelled",
        /// Ended because its owner was lost (disposition `abandon`).
        Abandoned => "abandoned",
    }
}

text_enum! {
    /// What happens to a process when its owner is lost (its lease expires).
    #[derive(Default)]
    Disposition {
        /// Another pod claims it and runs it again (the default).
        #[default]
        Rerun => "rerun",
        /// Another pod completes it as `abandoned`, with evidence.
        Abandon => "abandon",
        /// Pods never run it; API clients append and complete it.
        External => "external",
    }
}

impl TerminalState {
    /// The reserved event type of the terminal event, e.g. `process.completed`.
    pub fn event_type(self) -> &'static str {
        match self {
            TerminalState::Completed => "process.completed",
            TerminalState::Failed => "process.failed",
            TerminalState::Cancelled => "process.cancelled",
            TerminalState::Abandoned => "process.abandoned",
        }
    }
}

impl From<TerminalState> for ProcessStatus {
    fn from(state: TerminalState) -> Self {
        match state {
            TerminalState::Completed => ProcessStatus::Completed,
            TerminalState::Failed => ProcessStatus::Failed,
            TerminalState::Cancelled => ProcessStatus::Cancelled,
            TerminalState::Abandoned => ProcessStatus::Abandoned,
        }
    }
}

impl ProcessStatus {
    /// True for the four absorbing states.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            ProcessStatus::Pending | ProcessStatus::Running | ProcessStatus::Waiting
        )
    }
}

/// What a caller supplies to create a process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct ProcessRegistration {
    /// The id to use; a UUIDv7 is generated when absent.
    #[serde(default)]
    pub id: Option<ProcessId>,
    /// Which engine runs it: 1 to 128 characters from `[A-Za-z0-9._:-]`.
    #[cfg_attr(feature = "http", schema(pattern = "^[A-Za-z0-9._:-]{1,128}$"))]
    pub kind: String,
    /// Free-form JSON input for the engine (subject to the payload limit).
    #[serde(default)]
    pub input: Value,
    /// What happens when its owner is lost.
    #[serde(default)]
    pub disposition: Disposition,
    /// Not claimed before this instant (at most one of `start_at` and `start_in_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<DateTime<Utc>>,
    /// Not claimed before this many milliseconds after registration (database clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_in_ms: Option<u64>,
    /// Past this instant the process ends `failed` with reason `deadline exceeded`, whatever
    /// it is doing (at most one of `deadline` and `timeout_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// The deadline as milliseconds after registration (database clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// How a retryable failure is retried (default: the engine kind's policy, else none).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_object"
    )]
    pub retry: Option<RetryPolicy>,
    /// The W3C `traceparent` (`00-<trace id>-<span id>-<flags>`) whose trace the process's
    /// runs continue (over HTTP, the request's `traceparent` header when this is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
    /// The process that starts this one, recorded as its parent (it must exist): when this
    /// one ends, the parent's log gets a `process.child` message, and cancelling the parent
    /// requests cancellation of this one. A run's [`crate::RunContext::spawn`] sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ProcessId>,
    /// What this start does when other starts of the same key (within its kind) came before
    /// it: see [`StartPolicy`]. [`crate::ProcessRegistry::start_process`] says what happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_policy: Option<StartPolicy>,
    /// The queue it is claimed from (default: its kind's): 1 to 128 characters from
    /// `[A-Za-z0-9._:-]`. A queue with limits ([`crate::queue`]) holds its work to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "http", schema(pattern = "^[A-Za-z0-9._:-]{1,128}$"))]
    pub queue: Option<String>,
    /// Its concurrency key within the queue (a tenant, an account): 1 to 256 printable
    /// characters. A queue's keys are served round-robin, and may have limits of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    /// Higher is claimed first among its key's runnable work: -100 to 100, default 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i16,
}

fn is_zero(value: &i16) -> bool {
    *value == 0
}

/// A start policy (CONTRACT §10): how a registration treats earlier starts of the same
/// `key` among processes of its kind. A retried start (the same id as the key's process) is
/// answered with that process whatever the policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
pub enum StartPolicy {
    /// At most one start per key within `window_ms` of the last accepted one: a start within
    /// the window is answered with that process ([`StartDecision::Deduplicated`]), whatever
    /// its state.
    Deduplicate {
        /// The de-duplication key: 1 to 256 printable characters.
        key: String,
        /// The window, in milliseconds (1 ms to 30 days).
        window_ms: u64,
    },
    /// At most one process of the key that has not ended: a start while one has not ended is
    /// answered with it ([`StartDecision::Running`]) or, with `refuse`, refused
    /// (`StartRefused`, naming it).
    Singleton {
        /// The key: 1 to 256 printable characters.
        key: String,
        /// Refuse the start instead of answering the process that has not ended.
        #[serde(default)]
        refuse: bool,
    },
    /// The start is delayed by `window_ms`; a later start of the key while that process has
    /// not started yet replaces its input and delays it again by the window (its deadline,
    /// if any, moves by as much) ([`StartDecision::Debounced`]): the last start of a burst
    /// wins, once the burst has been quiet for the window. Its id stays the first start's;
    /// a retry of the first start with its original input then conflicts (its content
    /// changed): retry with the key instead of the id.
    Debounce {
        /// The key: 1 to 256 printable characters.
        key: String,
        /// The quiet period, in milliseconds (1 ms to 30 days).
        window_ms: u64,
    },
}

impl StartPolicy {
    /// The policy's key.
    pub fn key(&self) -> &str {
        match self {
            StartPolicy::Deduplicate { key, .. }
            | StartPolicy::Singleton { key, .. }
            | StartPolicy::Debounce { key, .. } => key,
        }
    }

    /// Its name as stored: `deduplicate`, `singleton`, `debounce`.
    pub fn name(&self) -> &'static str {
        match self {
            StartPolicy::Deduplicate { .. } => "deduplicate",
            StartPolicy::Singleton { .. } => "singleton",
            StartPolicy::Debounce { .. } => "debounce",
        }
    }

    /// Its window in milliseconds (0 for a singleton).
    pub fn window_ms(&self) -> u64 {
        match self {
            StartPolicy::Deduplicate { window_ms, .. }
            | StartPolicy::Debounce { window_ms, .. } => *window_ms,
            StartPolicy::Singleton { .. } => 0,
        }
    }
}

/// What a start did ([`crate::ProcessRegistry::start_process`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StartDecision {
    /// A new process was registered.
    Created,
    /// The process was registered before with the same id and content (a retried start).
    Existing,
    /// A start of the same key within the de-duplication window came first: its process.
    Deduplicated,
    /// A process of the same singleton key has not ended: that process.
    Running,
    /// A process of the same debounce key had not started: its input is this start's now,
    /// and it starts a window from now.
    Debounced,
}

impl StartDecision {
    /// Its name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            StartDecision::Created => "created",
            StartDecision::Existing => "existing",
            StartDecision::Deduplicated => "deduplicated",
            StartDecision::Running => "running",
            StartDecision::Debounced => "debounced",
        }
    }
}

/// A start's answer: the process that stands for it and what happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct StartOutcome {
    /// The process: new, or the one an earlier start made.
    pub process: ProcessRecord,
    /// What happened.
    pub decision: StartDecision,
}

/// How failures an engine marks retryable are retried: after a backoff, the process runs
/// again with its steps memoized, up to `max_attempts` runs in all; then it ends `failed`.
///
/// The `n`th retry (1, 2, ...) waits `min(initial_delay_ms * factor^(n-1), max_delay_ms)`,
/// shortened by a random share of at most `jitter` (0 to 1), on the database clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Runs in all, the first included: 1 to 1,000 (1: no retry).
    pub max_attempts: u32,
    /// The first retry's delay, in milliseconds (at most a day).
    #[serde(default = "RetryPolicy::default_initial_delay_ms")]
    pub initial_delay_ms: u64,
    /// How much each delay grows over the previous one: 1 to 10.
    #[serde(default = "RetryPolicy::default_factor")]
    pub factor: f64,
    /// The longest delay, in milliseconds (at most a day).
    #[serde(default = "RetryPolicy::default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// The share of each delay drawn at random and taken off (0 to 1).
    #[serde(default)]
    pub jitter: f64,
}

impl RetryPolicy {
    fn default_initial_delay_ms() -> u64 {
        1_000
    }

    fn default_factor() -> f64 {
        2.0
    }

    fn default_max_delay_ms() -> u64 {
        60_000
    }

    /// Up to `max_attempts` runs, 1 s doubling to a minute, no jitter.
    pub fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts,
            initial_delay_ms: Self::default_initial_delay_ms(),
            factor: Self::default_factor(),
            max_delay_ms: Self::default_max_delay_ms(),
            jitter: 0.0,
        }
    }

    /// The delay before retry `n` (1-based) with `random` in `[0, 1)` drawn for its jitter.
    pub fn delay(&self, n: u32, random: f64) -> std::time::Duration {
        let exponent = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = (self.initial_delay_ms as f64 * self.factor.powi(exponent))
            .min(self.max_delay_ms as f64);
        let jittered = base * (1.0 - self.jitter.clamp(0.0, 1.0) * random.clamp(0.0, 1.0));
        std::time::Duration::from_millis(jittered.max(0.0) as u64)
    }
}

/// A message for a process ([`crate::ProcessRegistry::send_message`]): stored in its log as
/// `process.message {topic, payload}`, received by a run's `recv(topic)` in log order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// What it is about: 1 to 128 characters from `[A-Za-z0-9._:-]`.
    pub topic: String,
    /// Any JSON value, within the payload limit.
    #[serde(default)]
    pub payload: Value,
    /// Sending again with the same key stores nothing new and answers with the stored
    /// message (other content under the key is a replay conflict).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_key: Option<String>,
}

impl Message {
    /// A message of `topic` carrying `payload`, without a replay key.
    pub fn new(topic: impl Into<String>, payload: Value) -> Self {
        Self {
            topic: topic.into(),
            payload,
            replay_key: None,
        }
    }

    /// The same message with a replay key.
    pub fn with_replay_key(mut self, key: impl Into<String>) -> Self {
        self.replay_key = Some(key.into());
        self
    }
}

/// How a run suspends its process ([`crate::ProcessRegistry::suspend`]): the process becomes
/// `waiting`, holding no lease, until its wake time or a message of `topic`.
#[derive(Clone, Debug, PartialEq)]
pub struct Suspension {
    /// Wake at this instant (database clock) ...
    pub wake_at: Option<DateTime<Utc>>,
    /// ... or this long from now (database clock); neither: only a message wakes it.
    pub delay: Option<std::time::Duration>,
    /// Wake when a message of this topic is stored after `after_seq` (at once if one is).
    pub topic: Option<String>,
    /// The seq after which messages of `topic` count (the last one received).
    pub after_seq: i64,
    /// A failure retry: counted in [`ProcessRecord::retries`].
    pub retry: bool,
    /// Why, recorded in the `process.waiting` event (a JSON object).
    pub reason: Value,
}

impl ProcessRegistration {
    /// A registration of `kind` with a JSON `input`, a generated id and the default disposition.
    pub fn new(kind: impl Into<String>, input: Value) -> Self {
        Self {
            id: None,
            kind: kind.into(),
            input,
            disposition: Disposition::default(),
            start_at: None,
            start_in_ms: None,
            deadline: None,
            timeout_ms: None,
            retry: None,
            trace_parent: None,
            parent: None,
            start_policy: None,
            queue: None,
            concurrency_key: None,
            priority: 0,
        }
    }

    /// The same registration in `queue` (instead of its kind's).
    pub fn in_queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// The same registration with a concurrency key (see [`crate::queue`]).
    pub fn with_concurrency_key(mut self, key: impl Into<String>) -> Self {
        self.concurrency_key = Some(key.into());
        self
    }

    /// The same registration with a priority (higher first, -100 to 100).
    pub fn with_priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// The same registration under a start policy.
    pub fn with_start_policy(mut self, policy: StartPolicy) -> Self {
        self.start_policy = Some(policy);
        self
    }

    /// The same registration, recorded as a child of `parent`.
    pub fn with_parent(mut self, parent: ProcessId) -> Self {
        self.parent = Some(parent);
        self
    }

    /// The same registration, not started before `delay` has passed (database clock).
    pub fn start_in(mut self, delay: std::time::Duration) -> Self {
        self.start_at = None;
        self.start_in_ms = Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// The same registration, not started before `at`.
    pub fn start_at(mut self, at: DateTime<Utc>) -> Self {
        self.start_in_ms = None;
        self.start_at = Some(at);
        self
    }

    /// The same registration, ended `failed` if it has not ended `timeout` after it was
    /// registered (database clock).
    pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
        self.deadline = None;
        self.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// The same registration, ended `failed` if it has not ended at `deadline`.
    pub fn deadline(mut self, deadline: DateTime<Utc>) -> Self {
        self.timeout_ms = None;
        self.deadline = Some(deadline);
        self
    }

    /// The same registration with its own retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// The same registration with an explicit id.
    pub fn with_id(mut self, id: ProcessId) -> Self {
        self.id = Some(id);
        self
    }

    /// The same registration with another disposition.
    pub fn with_disposition(mut self, disposition: Disposition) -> Self {
        self.disposition = disposition;
        self
    }
}

/// The durable terminal column of a process: set once, in the completing transaction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct TerminalRecord {
    /// How the process ended.
    pub state: TerminalState,
    /// The seq of the terminal event, always the last event of the log.
    pub seq: i64,
    /// The output given at completion (also the terminal event's payload).
    pub output: Value,
    /// When it ended (database clock).
    pub completed_at: DateTime<Utc>,
}

/// The lease currently recorded on a process (live or expired, see [`LeaseInfo::expires_at`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct LeaseInfo {
    /// Who holds or last held it.
    pub owner: String,
    /// Its generation.
    pub generation: i64,
    /// It is live while `expires_at` is after the database clock's now.
    pub expires_at: DateTime<Utc>,
}

/// A process as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct ProcessRecord {
    /// Its id.
    pub id: ProcessId,
    /// Which engine runs it.
    pub kind: String,
    /// Its input.
    pub input: Value,
    /// What happens when its owner is lost.
    pub disposition: Disposition,
    /// Where it is in its life.
    pub status: ProcessStatus,
    /// The seq of the last event in its log (0 when the log is empty).
    pub last_seq: i64,
    /// When it was registered (database clock).
    pub created_at: DateTime<Utc>,
    /// When it was last written (database clock).
    pub updated_at: DateTime<Utc>,
    /// The generation of the latest lease ever granted (0 if never claimed).
    pub lease_generation: i64,
    /// Runs started by pods: the attempt number of the latest run (0 if never run).
    pub attempts: i32,
    /// The lease currently recorded, if any (released leases are cleared).
    pub lease: Option<LeaseInfo>,
    /// The terminal column; `None` until the process ends.
    pub terminal: Option<TerminalRecord>,
    /// When its first `process.started` was written (`None`: no run ever started it).
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    /// The first cancellation request made of it (`{reason, by}`), if any: its owner stops
    /// the run and completes it `cancelled`.
    #[serde(default)]
    pub cancel_request: Option<Value>,
    /// Not claimed before this instant (a delayed start, a timer, a retry's backoff, a
    /// receive's timeout). `None`: claimable now, unless the process is `waiting` for a
    /// message alone (`waiting_for` set): then only a message wakes it.
    #[serde(default)]
    pub wake_at: Option<DateTime<Utc>>,
    /// The message topic it waits for, while `waiting` on one.
    #[serde(default)]
    pub waiting_for: Option<String>,
    /// Past this instant it ends `failed` with reason `deadline exceeded`.
    #[serde(default)]
    pub deadline: Option<DateTime<Utc>>,
    /// Failure retries made (crash reruns are counted in `attempts`).
    #[serde(default)]
    pub retries: i32,
    /// The retry policy given at registration (`None`: the engine kind's).
    #[serde(default)]
    pub retry_policy: Option<RetryPolicy>,
    /// The `traceparent` its runs' spans continue, given at registration.
    #[serde(default)]
    pub trace_parent: Option<String>,
    /// The process that started it ([`ProcessRegistration::parent`]), if any.
    #[serde(default)]
    pub parent: Option<ProcessId>,
    /// Whether a child was ever registered with it as its parent.
    #[serde(default)]
    pub has_children: bool,
    /// The queue it is claimed from (its kind's unless it was registered in another).
    #[serde(default)]
    pub queue: String,
    /// Its concurrency key, if any.
    #[serde(default)]
    pub concurrency_key: Option<String>,
    /// Its priority (higher is claimed first among its key's work).
    #[serde(default)]
    pub priority: i16,
}

/// One event of a process log, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct ProcessEvent {
    /// The process it belongs to.
    pub process_id: ProcessId,
    /// Its position: 1, 2, 3, ... per process, dense.
    pub seq: i64,
    /// Its type (types starting with `process.` are written by proclog only).
    pub event_type: String,
    /// Its JSON payload.
    pub payload: Value,
    /// The idempotency key it was appended with, if any.
    pub replay_key: Option<String>,
    /// When it was written (database clock).
    pub occurred_at: DateTime<Utc>,
    /// The writer (pod id) that appended it.
    pub writer: String,
    /// The generation of the lease it was written under, for fenced writes.
    pub lease_generation: Option<i64>,
}

impl ProcessEvent {
    /// True for the `process.<terminal state>` event that ends a log.
    pub fn is_terminal(&self) -> bool {
        TerminalState::ALL
            .iter()
            .any(|state| state.event_type() == self.event_type)
    }
}

/// Proof of a lease, carried by fenced writes: the write is refused unless this token is the
/// process's current, live lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct LeaseFence {
    /// The token of the acquisition (unique per acquisition).
    pub token: Uuid,
    /// The generation of the acquisition (recorded on every event written under it).
    pub generation: i64,
}

/// One event to append.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct AppendRequest {
    /// Its type: 1 to 128 printable characters, not starting with `process.`.
    #[cfg_attr(feature = "http", schema(min_length = 1, max_length = 128))]
    pub event_type: String,
    /// Its JSON payload (subject to the payload limit).
    #[serde(default)]
    pub payload: Value,
    /// An idempotency key: a retry with the same key and content returns the stored event.
    /// 1 to 256 printable characters.
    #[serde(default)]
    #[cfg_attr(feature = "http", schema(min_length = 1, max_length = 256))]
    pub replay_key: Option<String>,
    /// When set, the append is fenced by this lease (refused with `LeaseLost` otherwise).
    #[serde(default)]
    pub fence: Option<LeaseFence>,
    /// Set only by proclog itself for its own `process.*` events; never from the wire.
    #[serde(skip)]
    pub(crate) reserved: bool,
    /// Set only by proclog itself when it derived the replay key (`proclog:...`) of a
    /// caller's event; never from the wire.
    #[serde(skip)]
    pub(crate) derived_key: bool,
}

impl AppendRequest {
    /// An unfenced, unkeyed append of `event_type` with `payload`.
    pub fn new(event_type: impl Into<String>, payload: Value) -> Self {
        Self {
            event_type: event_type.into(),
            payload,
            replay_key: None,
            fence: None,
            reserved: false,
            derived_key: false,
        }
    }

    /// An event of proclog's own reserved `process.*` namespace (e.g. `process.started`);
    /// terminal types are refused, those are written by `complete_process` only.
    pub(crate) fn reserved(event_type: &str, payload: Value) -> Self {
        Self {
            reserved: true,
            ..Self::new(event_type, payload)
        }
    }

    /// Whether this is one of proclog's own reserved events.
    pub fn is_reserved(&self) -> bool {
        self.reserved
    }

    /// The same request with a replay key proclog derived (`proclog:...`).
    pub(crate) fn with_derived_key(mut self, key: String) -> Self {
        self.replay_key = Some(key);
        self.derived_key = true;
        self
    }

    /// The same request with an idempotency key.
    pub fn with_replay_key(mut self, key: impl Into<String>) -> Self {
        self.replay_key = Some(key.into());
        self
    }

    /// The same request fenced by `lease`.
    pub fn fenced(mut self, lease: &Lease) -> Self {
        self.fence = Some(lease.fence());
        self
    }
}

/// The answer to an append: the stored event, and whether it was already stored (a replay).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct AppendOutcome {
    /// The event as stored.
    pub event: ProcessEvent,
    /// True when the replay key matched an event stored earlier: nothing new was written.
    pub replayed: bool,
}

/// How a process ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct Completion {
    /// The terminal state to enter.
    pub state: TerminalState,
    /// The output (stored in the terminal column and as the terminal event's payload).
    #[serde(default)]
    pub output: Value,
    /// When set, the completion is fenced by this lease.
    #[serde(default)]
    pub fence: Option<LeaseFence>,
}

impl Completion {
    /// An unfenced completion.
    pub fn new(state: TerminalState, output: Value) -> Self {
        Self {
            state,
            output,
            fence: None,
        }
    }

    /// The same completion fenced by `lease`.
    pub fn fenced(mut self, lease: &Lease) -> Self {
        self.fence = Some(lease.fence());
        self
    }
}

/// A granted lease on a process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct Lease {
    /// The process it covers.
    pub process_id: ProcessId,
    /// Who holds it.
    pub owner: String,
    /// Unique per acquisition.
    pub token: Uuid,
    /// Increases on every acquisition of this process's lease, never goes back.
    pub generation: i64,
    /// Live while this is after the database clock's now.
    pub expires_at: DateTime<Utc>,
}

impl Lease {
    /// The fence that writes under this lease carry.
    pub fn fence(&self) -> LeaseFence {
        LeaseFence {
            token: self.token,
            generation: self.generation,
        }
    }
}

/// The answer to a claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimOutcome {
    /// The lease was granted.
    Acquired(Lease),
    /// Someone else holds a live lease.
    Busy {
        /// The current holder.
        holder: String,
        /// When its lease expires unless renewed.
        expires_at: DateTime<Utc>,
    },
}

/// Which processes [`crate::ProcessRegistry::list_processes`] returns, and from where.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct ProcessFilter {
    /// Only processes in this status.
    #[serde(default)]
    pub status: Option<ProcessStatus>,
    /// Only processes of this kind.
    #[serde(default)]
    pub kind: Option<String>,
    /// Only processes created at or after this instant.
    #[serde(default)]
    pub created_after: Option<DateTime<Utc>>,
    /// Only processes created before this instant.
    #[serde(default)]
    pub created_before: Option<DateTime<Utc>>,
    /// Only the children of this process ([`ProcessRecord::parent`]).
    #[serde(default)]
    pub parent: Option<ProcessId>,
    /// Continue after this cursor (from [`ProcessPage::next`]).
    #[serde(default)]
    pub after: Option<ListCursor>,
    /// Page size; `None` means the default (100). At most 1,000.
    #[serde(default)]
    pub limit: Option<u32>,
}

/// A keyset position in the listing order `(created_at, id)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct ListCursor {
    /// `created_at` of the last process of the previous page.
    pub created_at: DateTime<Utc>,
    /// Its id.
    pub id: ProcessId,
}

/// One page of a listing, in `(created_at, id)` order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct ProcessPage {
    /// The processes of this page.
    pub processes: Vec<ProcessRecord>,
    /// Where the next page starts; `None` when this page is the last.
    pub next: Option<ListCursor>,
}

/// A process claimed by a pod to run, from [`crate::ProcessRegistry::claim_runnable`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct RunnableClaim {
    /// The lease granted to the pod.
    pub lease: Lease,
    /// The process after the claim (`attempts` already counts this run).
    pub process: ProcessRecord,
    /// Set when the previous owner was lost: its lease expired without being released.
    pub lost_owner: Option<LostOwner>,
    /// True when the process was `waiting` (it suspended itself cleanly): this run resumes
    /// it, it is no crash rerun, and `attempts` was not incremented.
    #[serde(default)]
    pub resumed: bool,
}

/// The owner a process lost: evidence for recovery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct LostOwner {
    /// Who held the lease.
    pub owner: String,
    /// Its generation.
    pub generation: i64,
    /// When it expired.
    pub expired_at: DateTime<Utc>,
}

/// What a prune removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct PruneReport {
    /// Terminal processes deleted.
    pub processes: u64,
    /// Events deleted with them.
    pub events: u64,
}

/// Deserializes a struct only from a JSON object (serde's derive also takes an array of the
/// fields in order, which no client means and the API's schema does not allow).
pub(crate) fn object<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let map = serde_json::Map::<String, Value>::deserialize(deserializer)?;
    serde_json::from_value(Value::Object(map)).map_err(serde::de::Error::custom)
}

/// [`object`] for an optional field (`null` is `None`).
pub(crate) fn optional_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    Option::<serde_json::Map<String, Value>>::deserialize(deserializer)?
        .map(|map| serde_json::from_value(Value::Object(map)).map_err(serde::de::Error::custom))
        .transpose()
}

/// [`object`] for every value of a map.
pub(crate) fn object_values<'de, D, T>(
    deserializer: D,
) -> Result<std::collections::BTreeMap<String, T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    std::collections::BTreeMap::<String, serde_json::Map<String, Value>>::deserialize(deserializer)?
        .into_iter()
        .map(|(key, map)| {
            serde_json::from_value(Value::Object(map))
                .map(|value| (key, value))
                .map_err(serde::de::Error::custom)
        })
        .collect()
}
