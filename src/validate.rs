//! Validation of caller-supplied values. Every registry implementation calls these before
//! touching storage, so a malformed request is refused identically everywhere and writes nothing.

use std::time::Duration;

use serde_json::Value;

use chrono::{DateTime, Utc};

use crate::error::ProcessError;
use crate::model::{AppendRequest, Completion, ProcessFilter, ProcessRegistration};

/// Longest process id, kind, event type and lease owner, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest replay key, in characters.
pub const MAX_REPLAY_KEY_CHARS: usize = 256;
/// Most events in one `append_events` call.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// Default limit of one payload (or input, or output), serialized, in bytes.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// Default byte budget of one page of events (see `RegistryConfig::max_page_bytes`).
pub const DEFAULT_MAX_PAGE_BYTES: usize = 1024 * 1024;
/// Deepest nesting of arrays and objects accepted in a payload, input, output or reason.
/// `serde_json` refuses to read values nested 128 levels or more, so anything deeper could be
/// stored but never read back; this bound keeps every stored value readable, with room to
/// spare for a host that wraps a value in a few levels of its own.
pub const MAX_JSON_DEPTH: usize = 64;
/// Event types with this prefix are written by proclog only (see [`crate::reserved`]).
pub const RESERVED_EVENT_PREFIX: &str = crate::reserved::EVENT_PREFIX;
/// Shortest lease TTL accepted.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(1);
/// Longest lease TTL accepted.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Largest page of `list_processes`, and its default.
pub const MAX_LIST_LIMIT: u32 = 1_000;
/// Page size of `list_processes` when none is given.
pub const DEFAULT_LIST_LIMIT: u32 = 100;
/// Most payload bytes, summed, in one `append_events` call (each payload is also held to the
/// per-payload limit).
pub const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;
/// Earliest instant accepted in a filter or cutoff: 0001-01-01T00:00:00Z.
pub const MIN_TIMESTAMP: &str = "0001-01-01T00:00:00Z";
/// Latest instant accepted in a filter or cutoff: 9999-12-31T23:59:59Z. Postgres stores a far
/// wider range; this bound keeps every instant from outside well inside it and inside chrono's.
pub const MAX_TIMESTAMP: &str = "9999-12-31T23:59:59Z";

fn invalid(message: String) -> ProcessError {
    ProcessError::InvalidInput(message)
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

fn identifier(what: &str, value: &str) -> Result<(), ProcessError> {
    let chars = value.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(invalid(format!(
            "{what} must be 1 to {MAX_NAME_CHARS} characters, got {chars}"
        )));
    }
    if let Some(bad) = value.chars().find(|c| !is_id_char(*c)) {
        return Err(invalid(format!(
            "{what} {value:?} contains {bad:?}; allowed are [A-Za-z0-9._:-]"
        )));
    }
    Ok(())
}

fn printable(what: &str, value: &str, max_chars: usize) -> Result<(), ProcessError> {
    let chars = value.chars().count();
    if chars == 0 || chars > max_chars {
        return Err(invalid(format!(
            "{what} must be 1 to {max_chars} characters, got {chars}"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} {value:?} contains a control character"
        )));
    }
    Ok(())
}

/// A process id: 1 to 128 characters from `[A-Za-z0-9._:-]`.
pub fn process_id(id: &str) -> Result<(), ProcessError> {
    identifier("process id", id)
}

/// A schedule id: 1 to 64 characters from `[A-Za-z0-9._:-]` (the ids of its processes add a
/// due time to it).
pub fn schedule_id(id: &str) -> Result<(), ProcessError> {
    identifier("schedule id", id)?;
    if id.len() > 64 {
        return Err(invalid(format!(
            "schedule id must be 1 to 64 characters, got {}",
            id.len()
        )));
    }
    Ok(())
}

/// A process kind: same alphabet and length as an id.
pub fn kind(kind: &str) -> Result<(), ProcessError> {
    identifier("kind", kind)
}

/// An event type as written by a caller: 1 to 128 printable characters, not reserved.
pub fn user_event_type(event_type: &str) -> Result<(), ProcessError> {
    printable("event type", event_type, MAX_NAME_CHARS)?;
    if event_type.starts_with(RESERVED_EVENT_PREFIX) {
        return Err(invalid(format!(
            "event type {event_type:?} is reserved: types starting with {RESERVED_EVENT_PREFIX:?} are written by proclog"
        )));
    }
    Ok(())
}

/// An event type proclog writes for itself: in the reserved namespace, not terminal.
fn reserved_event_type(event_type: &str) -> Result<(), ProcessError> {
    printable("event type", event_type, MAX_NAME_CHARS)?;
    let terminal = crate::model::TerminalState::ALL
        .iter()
        .any(|state| state.event_type() == event_type);
    if !event_type.starts_with(RESERVED_EVENT_PREFIX) || terminal {
        return Err(invalid(format!(
            "{event_type:?} is not a non-terminal reserved event type"
        )));
    }
    Ok(())
}

/// A lease owner (pod id): 1 to 128 printable characters.
pub fn owner(owner: &str) -> Result<(), ProcessError> {
    printable("lease owner", owner, MAX_NAME_CHARS)
}

/// Longest pod id: a pod also claims as `canceller:<pod id>`, which must fit an owner.
pub const MAX_POD_ID_CHARS: usize = MAX_NAME_CHARS - "canceller:".len();
/// Most processes one pod runs at once (also the largest claim batch).
pub const MAX_CONCURRENCY: usize = MAX_LIST_LIMIT as usize;

/// A pod id: 1 to [`MAX_POD_ID_CHARS`] printable characters.
pub fn pod_id(id: &str) -> Result<(), ProcessError> {
    printable("pod id", id, MAX_POD_ID_CHARS)
}

/// The writer recorded on events (a pod id): same rule as a lease owner.
pub fn writer(writer: &str) -> Result<(), ProcessError> {
    printable("writer", writer, MAX_NAME_CHARS)
}

/// An instant from outside (a filter bound, a prune cutoff): between [`MIN_TIMESTAMP`] and
/// [`MAX_TIMESTAMP`].
pub fn timestamp(what: &str, at: DateTime<Utc>) -> Result<(), ProcessError> {
    let bound = |text: &str| {
        DateTime::parse_from_rfc3339(text)
            .expect("valid constant")
            .with_timezone(&Utc)
    };
    if at < bound(MIN_TIMESTAMP) || at > bound(MAX_TIMESTAMP) {
        return Err(invalid(format!(
            "{what} must be between {MIN_TIMESTAMP} and {MAX_TIMESTAMP}, got {at}"
        )));
    }
    Ok(())
}

/// A listing filter: page size (returned, defaulted), kind, creation bounds.
pub fn list_filter(filter: &ProcessFilter) -> Result<u32, ProcessError> {
    if let Some(kind) = &filter.kind {
        self::kind(kind)?;
    }
    if let Some(at) = filter.created_after {
        timestamp("created_after", at)?;
    }
    if let Some(at) = filter.created_before {
        timestamp("created_before", at)?;
    }
    if let Some(cursor) = &filter.after {
        timestamp("cursor", cursor.created_at)?;
    }
    list_limit(filter.limit)
}

/// A replay key: 1 to 256 printable characters.
pub fn replay_key(key: &str) -> Result<(), ProcessError> {
    printable("replay key", key, MAX_REPLAY_KEY_CHARS)
}

/// Replay keys with this prefix are proclog's own (steps, timers, receipts, a run's derived
/// keys): a caller's key may not take one, or it could pre-empt a step or a suspension.
pub const RESERVED_KEY_PREFIX: &str = "proclog:";

/// A replay key given by a caller (an append, a cancellation): a [`replay_key`] outside
/// proclog's own namespace.
pub fn caller_replay_key(key: &str) -> Result<(), ProcessError> {
    replay_key(key)?;
    if key.starts_with(RESERVED_KEY_PREFIX) {
        return Err(invalid(format!(
            "replay key {key:?} is reserved: keys starting with {RESERVED_KEY_PREFIX:?} are proclog's own"
        )));
    }
    Ok(())
}

/// A lease TTL: between [`MIN_LEASE_TTL`] and [`MAX_LEASE_TTL`].
pub fn lease_ttl(ttl: Duration) -> Result<(), ProcessError> {
    if ttl < MIN_LEASE_TTL || ttl > MAX_LEASE_TTL {
        return Err(invalid(format!(
            "lease ttl must be between {MIN_LEASE_TTL:?} and {MAX_LEASE_TTL:?}, got {ttl:?}"
        )));
    }
    Ok(())
}

/// Serializes `value` and checks it against `limit` bytes, returning the bytes so that the
/// caller stores exactly what was measured.
pub fn payload_bytes(value: &Value, limit: usize) -> Result<Vec<u8>, ProcessError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|err| invalid(format!("payload is not serializable: {err}")))?;
    if bytes.len() > limit {
        return Err(ProcessError::PayloadTooLarge {
            size: bytes.len(),
            limit,
        });
    }
    if let Some(depth) = depth_over_limit(&bytes) {
        return Err(invalid(format!(
            "payload nests {depth} levels of arrays and objects; at most {MAX_JSON_DEPTH} are accepted"
        )));
    }
    // Postgres jsonb cannot store U+0000; the escape only appears in the text if some string
    // may hold one, so the walk is rare.
    if bytes.windows(6).any(|w| w == b"\\u0000") && holds_nul(value) {
        return Err(invalid(
            "payload contains the character U+0000, which cannot be stored".into(),
        ));
    }
    Ok(bytes)
}

/// The deepest nesting of arrays and objects in serialized JSON when it is over
/// [`MAX_JSON_DEPTH`], read off the bytes in one pass (brackets inside strings do not
/// count). A level takes two bytes, so a short text is answered without the scan.
fn depth_over_limit(bytes: &[u8]) -> Option<usize> {
    if bytes.len() <= 2 * MAX_JSON_DEPTH {
        return None;
    }
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &byte in bytes {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    (deepest > MAX_JSON_DEPTH).then_some(deepest)
}

fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// A registration's kind and input size.
pub fn registration(
    registration: &ProcessRegistration,
    payload_limit: usize,
) -> Result<Vec<u8>, ProcessError> {
    kind(&registration.kind)?;
    if registration.start_at.is_some() && registration.start_in_ms.is_some() {
        return Err(invalid(
            "give a start time or a start delay (start_at, start_in_ms), not both".into(),
        ));
    }
    if registration.deadline.is_some() && registration.timeout_ms.is_some() {
        return Err(invalid(
            "give a deadline or a timeout (deadline, timeout_ms), not both".into(),
        ));
    }
    if let Some(at) = registration.start_at {
        timestamp("start_at", at)?;
    }
    if let Some(at) = registration.deadline {
        timestamp("deadline", at)?;
    }
    for (what, millis) in [
        ("start_in_ms", registration.start_in_ms),
        ("timeout_ms", registration.timeout_ms),
    ] {
        if let Some(millis) = millis {
            duration_millis(what, millis, MAX_SCHEDULE_MILLIS)?;
        }
    }
    if let Some(policy) = &registration.retry {
        retry_policy(policy)?;
    }
    if let Some(parent) = &registration.parent {
        process_id(parent.as_str())?;
        if registration.id.as_ref() == Some(parent) {
            return Err(invalid(format!(
                "process {parent} cannot be its own parent"
            )));
        }
    }
    if let Some(policy) = &registration.start_policy {
        start_policy(policy)?;
    }
    if let Some(queue) = &registration.queue {
        crate::queue::queue_name(queue)?;
    }
    if let Some(key) = &registration.concurrency_key {
        crate::queue::concurrency_key(key)?;
    }
    crate::queue::priority(registration.priority)?;
    if let Some(traceparent) = &registration.trace_parent
        && !is_traceparent(traceparent)
    {
        return Err(invalid(format!(
            "trace_parent must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>), got {traceparent:?}"
        )));
    }
    payload_bytes(&registration.input, payload_limit)
}

/// Longest start key, in characters.
pub const MAX_START_KEY_CHARS: usize = 256;

/// Longest start policy window: 30 days.
pub const MAX_START_WINDOW_MILLIS: u64 = 30 * 24 * 60 * 60 * 1000;

/// A start policy: a printable key of 1 to [`MAX_START_KEY_CHARS`] characters, a window of
/// 1 ms to [`MAX_START_WINDOW_MILLIS`] where the policy has one.
pub fn start_policy(policy: &crate::model::StartPolicy) -> Result<(), ProcessError> {
    printable("start key", policy.key(), MAX_START_KEY_CHARS)?;
    if !matches!(policy, crate::model::StartPolicy::Singleton { .. }) {
        let window = policy.window_ms();
        if window == 0 || window > MAX_START_WINDOW_MILLIS {
            return Err(invalid(format!(
                "a {} window must be 1 to {MAX_START_WINDOW_MILLIS} ms, got {window}",
                policy.name()
            )));
        }
    }
    Ok(())
}

/// Whether `value` is a W3C `traceparent` of version 00 with non-zero ids.
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |part: &str, len: usize| {
        part.len() == len
            && part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
}

/// Longest start delay, timeout, sleep or receive timeout: 100 years, in milliseconds.
pub const MAX_SCHEDULE_MILLIS: u64 = 100 * 366 * 24 * 60 * 60 * 1000;
/// Longest retry delay: a day, in milliseconds.
pub const MAX_RETRY_DELAY_MILLIS: u64 = 24 * 60 * 60 * 1000;
/// Most runs a retry policy may allow.
pub const MAX_RETRY_ATTEMPTS: u32 = 1_000;

/// A duration in milliseconds, at most `max`.
pub fn duration_millis(what: &str, millis: u64, max: u64) -> Result<(), ProcessError> {
    if millis > max {
        return Err(invalid(format!(
            "{what} must be at most {max} ms, got {millis}"
        )));
    }
    Ok(())
}

/// A retry policy: 1 to [`MAX_RETRY_ATTEMPTS`] runs, delays up to
/// [`MAX_RETRY_DELAY_MILLIS`], a factor from 1 to 10 and a jitter from 0 to 1.
pub fn retry_policy(policy: &crate::model::RetryPolicy) -> Result<(), ProcessError> {
    if policy.max_attempts == 0 || policy.max_attempts > MAX_RETRY_ATTEMPTS {
        return Err(invalid(format!(
            "retry max_attempts must be 1 to {MAX_RETRY_ATTEMPTS}, got {}",
            policy.max_attempts
        )));
    }
    duration_millis(
        "retry initial_delay_ms",
        policy.initial_delay_ms,
        MAX_RETRY_DELAY_MILLIS,
    )?;
    duration_millis(
        "retry max_delay_ms",
        policy.max_delay_ms,
        MAX_RETRY_DELAY_MILLIS,
    )?;
    if !(1.0..=10.0).contains(&policy.factor) {
        return Err(invalid(format!(
            "retry factor must be 1 to 10, got {}",
            policy.factor
        )));
    }
    if !(0.0..=1.0).contains(&policy.jitter) {
        return Err(invalid(format!(
            "retry jitter must be 0 to 1, got {}",
            policy.jitter
        )));
    }
    Ok(())
}

/// A suspension: a valid topic, a delay or wake time in range, a reason within
/// `payload_limit`. Returns the reason as the JSON object the `process.waiting` event
/// starts from (a reason that is no object is put under `"reason"`), serialized.
pub fn suspension(
    suspension: &crate::model::Suspension,
    payload_limit: usize,
) -> Result<Vec<u8>, ProcessError> {
    if let Some(topic) = &suspension.topic {
        durable_name("topic", topic)?;
    }
    if let Some(delay) = suspension.delay {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        duration_millis("wait", millis, MAX_SCHEDULE_MILLIS)?;
    }
    if let Some(at) = suspension.wake_at {
        timestamp("wake_at", at)?;
    }
    if suspension.after_seq < 0 {
        return Err(invalid(format!(
            "after_seq must be 0 or more, got {}",
            suspension.after_seq
        )));
    }
    let reason = match &suspension.reason {
        Value::Object(_) => suspension.reason.clone(),
        other => serde_json::json!({ "reason": other }),
    };
    payload_bytes(&reason, payload_limit)
}

/// Longest replay key of a message (it is stored under `proclog:msg:<key>`).
pub const MAX_MESSAGE_KEY_CHARS: usize = MAX_REPLAY_KEY_CHARS - 16;

/// A message topic, step name or timer name: same alphabet and length as an id.
pub fn durable_name(what: &str, name: &str) -> Result<(), ProcessError> {
    identifier(what, name)
}

/// A message: a valid topic, a payload within `payload_limit`, a valid replay key.
pub fn message(message: &crate::model::Message, payload_limit: usize) -> Result<(), ProcessError> {
    durable_name("message topic", &message.topic)?;
    if let Some(key) = &message.replay_key {
        printable("message replay key", key, MAX_MESSAGE_KEY_CHARS)?;
    }
    payload_bytes(&message.payload, payload_limit).map(|_| ())
}

/// A batch of appends by `writer`: non-empty, at most [`MAX_BATCH_EVENTS`] events and
/// [`MAX_BATCH_BYTES`] of payloads, every type and key valid, keys distinct within the batch,
/// every request carrying the same fence. Returns each payload serialized.
pub fn append_batch(
    writer_id: &str,
    requests: &[AppendRequest],
    payload_limit: usize,
) -> Result<Vec<Vec<u8>>, ProcessError> {
    writer(writer_id)?;
    if requests.is_empty() {
        return Err(invalid("append_events needs at least one event".into()));
    }
    if requests.len() > MAX_BATCH_EVENTS {
        return Err(invalid(format!(
            "append_events takes at most {MAX_BATCH_EVENTS} events, got {}",
            requests.len()
        )));
    }
    let fence = requests[0].fence;
    let mut keys = std::collections::HashSet::new();
    let mut payloads = Vec::with_capacity(requests.len());
    for request in requests {
        if request.is_reserved() {
            reserved_event_type(&request.event_type)?;
        } else {
            user_event_type(&request.event_type)?;
        }
        if let Some(key) = &request.replay_key {
            replay_key(key)?;
            if !request.is_reserved() && !request.derived_key {
                caller_replay_key(key)?;
            }
            if !keys.insert(key.as_str()) {
                return Err(invalid(format!(
                    "replay key {key:?} appears twice in one batch"
                )));
            }
        }
        if request.fence != fence {
            return Err(invalid(
                "every event of one append_events call must carry the same lease fence".into(),
            ));
        }
        payloads.push(payload_bytes(&request.payload, payload_limit)?);
    }
    let total: usize = payloads.iter().map(Vec::len).sum();
    if total > MAX_BATCH_BYTES {
        return Err(ProcessError::PayloadTooLarge {
            size: total,
            limit: MAX_BATCH_BYTES,
        });
    }
    Ok(payloads)
}

/// A completion by `writer`: the writer and the output's size. Returns the output serialized.
pub fn completion(
    writer_id: &str,
    completion: &Completion,
    payload_limit: usize,
) -> Result<Vec<u8>, ProcessError> {
    writer(writer_id)?;
    payload_bytes(&completion.output, payload_limit)
}

/// A lease claim: the owner and the TTL.
pub fn claim(owner_id: &str, ttl: Duration) -> Result<(), ProcessError> {
    owner(owner_id)?;
    lease_ttl(ttl)
}

/// A `claim_runnable` call: the owner, the TTL, and a batch size of 1 to [`MAX_LIST_LIMIT`].
pub fn claim_runnable(owner_id: &str, ttl: Duration, limit: u32) -> Result<(), ProcessError> {
    claim(owner_id, ttl)?;
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(invalid(format!(
            "claim limit must be 1 to {MAX_LIST_LIMIT}, got {limit}"
        )));
    }
    Ok(())
}

/// A list page size: `None` is the default, otherwise 1 to [`MAX_LIST_LIMIT`].
pub fn list_limit(limit: Option<u32>) -> Result<u32, ProcessError> {
    match limit {
        None => Ok(DEFAULT_LIST_LIMIT),
        Some(n) if (1..=MAX_LIST_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(invalid(format!(
            "limit must be 1 to {MAX_LIST_LIMIT}, got {n}"
        ))),
    }
}

/// An `events_after` page size: 1 to [`MAX_BATCH_EVENTS`]; `after_seq` not negative.
pub fn events_after(after_seq: i64, limit: u32) -> Result<(), ProcessError> {
    if after_seq < 0 {
        return Err(invalid(format!("after_seq must be >= 0, got {after_seq}")));
    }
    if limit == 0 || limit as usize > MAX_BATCH_EVENTS {
        return Err(invalid(format!(
            "limit must be 1 to {MAX_BATCH_EVENTS}, got {limit}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reserved_appends_take_only_non_terminal_proclog_types() {
        let ok = AppendRequest::reserved("process.started", json!({}));
        assert!(append_batch("w", &[ok], DEFAULT_MAX_PAYLOAD_BYTES).is_ok());
        for bad in ["process.completed", "process.abandoned", "step", ""] {
            let request = AppendRequest::reserved(bad, json!({}));
            let result = append_batch("w", &[request], DEFAULT_MAX_PAYLOAD_BYTES);
            assert!(
                matches!(result, Err(ProcessError::InvalidInput(_))),
                "{bad:?}"
            );
        }
        // The wire cannot set the flag: it is skipped by serde.
        let from_wire: AppendRequest =
            serde_json::from_value(json!({"event_type": "process.started", "reserved": true}))
                .unwrap();
        assert!(!from_wire.is_reserved());
    }

    #[test]
    fn writers_and_instants_from_outside_are_bounded() {
        let ok = AppendRequest::new("step", json!({}));
        for bad in ["", "pod\0a", &"w".repeat(129)] {
            let result = append_batch(bad, std::slice::from_ref(&ok), DEFAULT_MAX_PAYLOAD_BYTES);
            assert!(
                matches!(result, Err(ProcessError::InvalidInput(_))),
                "{bad:?}"
            );
        }
        let far: DateTime<Utc> = "-5000-01-01T00:00:00Z".parse().unwrap();
        assert!(timestamp("t", far).is_err());
        let edge: DateTime<Utc> = MAX_TIMESTAMP.parse().unwrap();
        assert!(timestamp("t", edge).is_ok());
    }

    fn nested(depth: usize) -> Value {
        (0..depth).fold(json!("x[{\\\"]"), |inner, i| {
            if i % 2 == 0 {
                json!([inner])
            } else {
                json!({"k[": inner})
            }
        })
    }

    #[test]
    fn json_is_accepted_up_to_the_depth_bound() {
        let limit = DEFAULT_MAX_PAYLOAD_BYTES;
        assert!(payload_bytes(&nested(MAX_JSON_DEPTH), limit).is_ok());
        let refused = payload_bytes(&nested(MAX_JSON_DEPTH + 1), limit);
        assert!(
            matches!(&refused, Err(ProcessError::InvalidInput(m)) if m.contains("65 levels")),
            "{refused:?}"
        );
        // Brackets inside strings are text, not nesting.
        let text = json!({"a": "[".repeat(1000), "b": "{\\\"[".repeat(100)});
        assert!(payload_bytes(&text, limit).is_ok());
        // The deepest value accepted can be read back by serde_json.
        let bytes = payload_bytes(&nested(MAX_JSON_DEPTH), limit).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&bytes).unwrap(),
            nested(MAX_JSON_DEPTH)
        );
    }

    #[test]
    fn a_batch_is_held_to_a_total_size() {
        let big = AppendRequest::new("step", json!("x".repeat(DEFAULT_MAX_PAYLOAD_BYTES - 10)));
        let count = MAX_BATCH_BYTES / DEFAULT_MAX_PAYLOAD_BYTES + 1;
        let batch = vec![big; count];
        let result = append_batch("w", &batch, DEFAULT_MAX_PAYLOAD_BYTES);
        assert!(
            matches!(
                result,
                Err(ProcessError::PayloadTooLarge {
                    limit: MAX_BATCH_BYTES,
                    ..
                })
            ),
            "{result:?}"
        );
    }
}
