//! The names proclog reserves for itself: event types under `process.` and the formats of the
//! replay keys it derives. One place, so that the writer of a name and its readers (the run,
//! the schema's statements, the console, a host's tests) cannot drift apart.

/// Event types with this prefix are written by proclog only; a caller's append of one is
/// `InvalidInput`.
pub const EVENT_PREFIX: &str = "process.";

/// Written when a run starts: `{attempt, pod, generation, recovered_from}`.
pub const STARTED: &str = "process.started";

/// A cancellation request: `{reason, by}`.
pub const CANCEL_REQUESTED: &str = "process.cancel_requested";

/// A message sent to the process: `{topic, payload}` (see [`crate::Message`]).
pub const MESSAGE: &str = "process.message";

/// A run suspended the process: `{reason, ..., wake_at, topic}` (see
/// [`crate::ProcessRegistry::suspend`]).
pub const WAITING: &str = "process.waiting";

/// A step's stored output: `{name, output}`, key [`step_key`].
pub const STEP: &str = "process.step";

/// A durable timer: `{name, duration_ms}` or `{name, until}`, key [`timer_key`]; it is due
/// at the event's `occurred_at` plus `duration_ms`, or at `until`.
pub const TIMER: &str = "process.timer";

/// A receipt: the `n`th receive of `topic` in a run took the message at `message_seq`
/// (`{topic, n, message_seq}`) or timed out (`{topic, n, timed_out: true}`); key
/// [`receipt_key`].
pub const RECEIVED: &str = "process.received";

/// A spawned child: `{name, child}`, key [`spawn_key`].
pub const SPAWNED: &str = "process.spawned";

/// The topic of the [`MESSAGE`] a parent gets when a child ends: payload `{child, state}`,
/// key [`child_ended_key`]. A run joining its children waits for it.
pub const CHILD_TOPIC: &str = "process.child";

/// The event types a run replays: steps, timers and receipts.
pub const JOURNAL: &[&str] = &[STEP, TIMER, RECEIVED, SPAWNED];

/// The replay key of step `name`: `proclog:step:<name>`.
pub fn step_key(name: &str) -> String {
    format!("proclog:step:{name}")
}

/// The replay key of timer `name`: `proclog:timer:<name>`.
pub fn timer_key(name: &str) -> String {
    format!("proclog:timer:{name}")
}

/// The replay key of the `n`th receive of `topic`: `proclog:recv:<topic>:<n>`.
pub fn receipt_key(topic: &str, n: u64) -> String {
    format!("proclog:recv:{topic}:{n}")
}

/// The replay key of the timeout timer of the `n`th receive of `topic`:
/// `proclog:recv-timeout:<topic>:<n>`.
pub fn receive_timeout_key(topic: &str, n: u64) -> String {
    format!("proclog:recv-timeout:{topic}:{n}")
}

/// The replay key of the spawn of child `name`: `proclog:spawn:<name>`.
pub fn spawn_key(name: &str) -> String {
    format!("proclog:spawn:{name}")
}

/// The replay key of the message telling a parent that `child` ended:
/// `proclog:child:<child>`.
pub fn child_ended_key(child: &str) -> String {
    format!("proclog:child:{child}")
}

/// The replay key of a message sent with the caller's key: `proclog:msg:<key>`.
pub fn message_key(key: &str) -> String {
    format!("proclog:msg:{key}")
}

/// The replay key of the suspension of the run under lease `generation`.
pub fn waiting_key(generation: i64) -> String {
    format!("{RUN_KEY_PREFIX}{generation}:waiting")
}

/// Prefix of the replay keys proclog derives for a run's writes.
pub const RUN_KEY_PREFIX: &str = "proclog:g";

/// The replay key of a run's `process.started` under lease `generation`:
/// `proclog:g<generation>:started`.
pub fn started_key(generation: i64) -> String {
    format!("{RUN_KEY_PREFIX}{generation}:started")
}

/// The replay key of the `n`th unkeyed append of the run under lease `generation`:
/// `proclog:g<generation>:<n>`. Unique per run, stable across that run's retries.
pub fn run_append_key(generation: i64, n: u64) -> String {
    format!("{RUN_KEY_PREFIX}{generation}:{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_distinct_per_generation_and_append() {
        assert_eq!(started_key(3), "proclog:g3:started");
        assert_eq!(run_append_key(3, 1), "proclog:g3:1");
        assert_ne!(run_append_key(3, 1), run_append_key(31, 1));
        assert!(STARTED.starts_with(EVENT_PREFIX) && CANCEL_REQUESTED.starts_with(EVENT_PREFIX));
    }
}
