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
