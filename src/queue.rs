//! Queues with limits (CONTRACT §10): which work a pod may claim, and in which order.
//!
//! Every process belongs to a queue (by default its kind's) and may carry a concurrency key
//! (a tenant, an account) and a priority. A queue is *controlled* once it has limits
//! ([`QueueLimits`], a row of `proclog.queues`, changed at run time over HTTP, the CLI or
//! [`crate::ClusterStore::set_queue`]); the work of other queues is claimed as before, oldest
//! first. A controlled queue's work is claimed one claim at a time under the queue row's lock:
//! the claimer counts the queue's live leases (and, under a rate limit, its recent starts)
//! over SQL, then takes work only while every limit that applies stays within bounds, so no
//! limit is exceeded whatever the number of pods racing. Its keys are served round-robin, from
//! the key after the one served last ([`QueueRecord::cursor_key`]): a key with one runnable
//! process waits for a free slot, never behind another key's backlog. Within a key, higher
//! priority first, then the order work became runnable.
//!
//! What counts as running is a live lease: a process waiting (a timer, a message, its
//! children) holds none and takes no slot. A process past its deadline in a controlled queue
//! is claimed (only to be failed) under the same limits. A host's own
//! [`crate::ProcessRegistry::claim`] of one process is not held to them (it is counted).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::ProcessError;

/// Most controlled queues.
pub const MAX_QUEUES: usize = 1_000;

/// Largest page of [`crate::ClusterStore::list_queues`].
pub const MAX_QUEUE_PAGE: u32 = 100;

/// Most named keys with limits of their own in one queue.
pub const MAX_KEY_LIMITS: usize = 1_000;

/// Largest `starts` of a rate limit (starts are remembered one row each for the period).
pub const MAX_RATE_STARTS: u32 = 10_000;

/// Longest rate-limit period: a day.
pub const MAX_RATE_PERIOD_MILLIS: u64 = 24 * 3_600_000;

/// Largest concurrency limit.
pub const MAX_CONCURRENCY: u32 = 1_000_000;

/// Most keys one claim visits in one queue (keys with runnable work at their limits are
/// passed over; the next claim goes on from the last key this one served, or visited when it
/// served none).
pub const MAX_KEY_VISITS: usize = 256;

/// Priorities run from `-MAX_PRIORITY` to `MAX_PRIORITY`; the default is 0.
pub const MAX_PRIORITY: i16 = 100;

/// Longest concurrency key, in characters.
pub const MAX_KEY_CHARS: usize = 256;

/// Starts per period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// At most this many claims (starts and resumptions of runs) within any `period_ms`:
    /// 1 to [`MAX_RATE_STARTS`].
    pub starts: u32,
    /// The sliding window, in milliseconds: 1 to [`MAX_RATE_PERIOD_MILLIS`].
    pub period_ms: u64,
}

/// The limits of one scope (a queue as a whole, each of its keys, or one key). A limit that is
/// absent does not apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Live leases at once, across every pod (0 holds the work).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Live leases at once held by one pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_pod: Option<u32>,
    /// Claims per sliding period, across every pod.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::model::optional_object"
    )]
    pub rate: Option<RateLimit>,
}

impl Limits {
    fn validate(&self, scope: &str) -> Result<(), ProcessError> {
        for (what, value) in [("concurrency", self.concurrency), ("per_pod", self.per_pod)] {
            if value.is_some_and(|value| value > MAX_CONCURRENCY) {
                return Err(invalid(format!(
                    "{scope}: {what} must be at most {MAX_CONCURRENCY}"
                )));
            }
        }
        if let Some(rate) = self.rate {
            if rate.starts == 0 || rate.starts > MAX_RATE_STARTS {
                return Err(invalid(format!(
                    "{scope}: rate.starts must be 1 to {MAX_RATE_STARTS} (to hold the work, set concurrency 0)"
                )));
            }
            if rate.period_ms == 0 || rate.period_ms > MAX_RATE_PERIOD_MILLIS {
                return Err(invalid(format!(
                    "{scope}: rate.period_ms must be 1 to {MAX_RATE_PERIOD_MILLIS}"
                )));
            }
        }
        Ok(())
    }

    /// Whether one more claim stays within these limits, given what is counted.
    pub fn admits(&self, counted: &Counted) -> bool {
        self.concurrency
            .is_none_or(|limit| counted.running < u64::from(limit))
            && self
                .per_pod
                .is_none_or(|limit| counted.mine < u64::from(limit))
            && self
                .rate
                .is_none_or(|rate| counted.recent_starts < u64::from(rate.starts))
    }

    fn period(&self) -> Option<u64> {
        self.rate.map(|rate| rate.period_ms)
    }
}

/// What the limits of a queue count for one scope at a claim.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    /// Live leases.
    pub running: u64,
    /// Live leases of the claiming pod.
    pub mine: u64,
    /// Claims within the scope's rate period.
    pub recent_starts: u64,
}

impl Counted {
    /// Counts one more claim by the claiming pod.
    pub fn claimed(&mut self) {
        self.running += 1;
        self.mine += 1;
        self.recent_starts += 1;
    }
}

/// A controlled queue's limits: for the queue as a whole, for each of its keys, and for
/// named keys (which take the place of `each_key` for them). Work without a key is counted
/// under the key `""` for `each_key`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct QueueLimits {
    /// The queue as a whole.
    #[serde(default, deserialize_with = "crate::model::object")]
    pub queue: Limits,
    /// Each key, unless named in `keys`.
    #[serde(default, deserialize_with = "crate::model::object")]
    pub each_key: Limits,
    /// Named keys' own limits (at most [`MAX_KEY_LIMITS`]).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "crate::model::object_values"
    )]
    pub keys: BTreeMap<String, Limits>,
}

impl QueueLimits {
    /// Checks every limit and key (`InvalidInput` saying which is wrong).
    pub fn validate(&self) -> Result<(), ProcessError> {
        self.queue.validate("queue")?;
        self.each_key.validate("each_key")?;
        if self.keys.len() > MAX_KEY_LIMITS {
            return Err(invalid(format!(
                "at most {MAX_KEY_LIMITS} keys may have limits of their own"
            )));
        }
        for (key, limits) in &self.keys {
            concurrency_key(key)?;
            limits.validate(&format!("keys.{key}"))?;
        }
        Ok(())
    }

    /// The limits of `key` (its own, else `each_key`).
    pub fn of_key(&self, key: &str) -> &Limits {
        self.keys.get(key).unwrap_or(&self.each_key)
    }

    /// Whether any limit of this queue counts starts.
    pub fn rate_limited(&self) -> bool {
        self.longest_period().is_some()
    }

    /// The longest rate period of any scope, in milliseconds: starts older than this are
    /// forgotten.
    pub fn longest_period(&self) -> Option<u64> {
        [self.queue.period(), self.each_key.period()]
            .into_iter()
            .chain(self.keys.values().map(Limits::period))
            .flatten()
            .max()
    }
}

/// A controlled queue as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct QueueRecord {
    /// The queue's name.
    pub queue: String,
    /// Its limits.
    pub limits: QueueLimits,
    /// The key served last; the next claim starts after it.
    #[serde(default)]
    pub cursor_key: Option<String>,
    /// When its limits were last set.
    pub updated_at: DateTime<Utc>,
}

/// What one key of a queue holds now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct KeyLoad {
    /// The key (`""`: work without a key).
    pub key: String,
    /// Processes with a live lease.
    pub running: u64,
    /// Processes runnable now without a lease (waiting for a slot).
    pub ready: u64,
}

/// A queue with its limits and its load, for operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct QueueView {
    /// The queue as stored.
    #[serde(flatten)]
    pub record: QueueRecord,
    /// Its keys with running or ready work, the busiest first (at most
    /// [`MAX_LOAD_KEYS`]).
    pub keys: Vec<KeyLoad>,
}

/// Most keys a [`QueueView`] lists.
pub const MAX_LOAD_KEYS: usize = 200;

/// Orders a queue's keys for operators: the busiest (running and ready) first, then by key.
pub fn sort_load(keys: &mut [KeyLoad]) {
    keys.sort_by(|a, b| (b.running + b.ready, &a.key).cmp(&(a.running + a.ready, &b.key)));
}

/// Checks a page size of queues: 1 to [`MAX_QUEUE_PAGE`].
pub fn page_limit(limit: u32) -> Result<(), ProcessError> {
    if !(1..=MAX_QUEUE_PAGE).contains(&limit) {
        return Err(invalid(format!(
            "limit must be 1 to {MAX_QUEUE_PAGE}, got {limit}"
        )));
    }
    Ok(())
}

/// Checks a queue name: 1 to 128 characters from `[A-Za-z0-9._:-]` (as a kind).
pub fn queue_name(name: &str) -> Result<(), ProcessError> {
    crate::validate::kind(name).map_err(|_| {
        invalid(format!(
            "a queue name is 1 to 128 characters from [A-Za-z0-9._:-], got {name:?}"
        ))
    })
}

/// Checks a concurrency key: 1 to [`MAX_KEY_CHARS`] printable characters.
pub fn concurrency_key(key: &str) -> Result<(), ProcessError> {
    let chars = key.chars().count();
    if chars == 0 || chars > MAX_KEY_CHARS || key.chars().any(char::is_control) {
        return Err(invalid(format!(
            "a concurrency key is 1 to {MAX_KEY_CHARS} printable characters, got {key:?}"
        )));
    }
    Ok(())
}

/// Checks a priority: [`MAX_PRIORITY`] either way.
pub fn priority(priority: i16) -> Result<(), ProcessError> {
    if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&priority) {
        return Err(invalid(format!(
            "priority must be -{MAX_PRIORITY} to {MAX_PRIORITY}, got {priority}"
        )));
    }
    Ok(())
}

fn invalid(message: String) -> ProcessError {
    ProcessError::InvalidInput(message)
}

/// The keys of a queue in round-robin order: those after `cursor`, then from the first up to
/// and including `cursor`.
pub fn round_robin<'a>(keys: &'a [String], cursor: Option<&str>) -> Vec<&'a String> {
    let split = cursor.map_or(0, |cursor| {
        keys.partition_point(|key| key.as_str() <= cursor)
    });
    keys[split..].iter().chain(keys[..split].iter()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_admit_until_each_bound() {
        let limits = Limits {
            concurrency: Some(2),
            per_pod: Some(1),
            rate: Some(RateLimit {
                starts: 3,
                period_ms: 1_000,
            }),
        };
        let mut counted = Counted::default();
        assert!(limits.admits(&counted));
        counted.claimed();
        assert!(!limits.admits(&counted), "per pod 1");
        counted.mine = 0;
        assert!(limits.admits(&counted));
        counted.running = 2;
        assert!(!limits.admits(&counted), "concurrency 2");
        counted.running = 0;
        counted.recent_starts = 3;
        assert!(!limits.admits(&counted), "rate 3");
        let hold = Limits {
            concurrency: Some(0),
            ..Limits::default()
        };
        assert!(!hold.admits(&Counted::default()), "0 holds the work");
        assert!(Limits::default().admits(&Counted {
            running: u64::MAX - 1,
            mine: u64::MAX - 1,
            recent_starts: u64::MAX - 1,
        }));
    }

    #[test]
    fn named_keys_take_the_place_of_each_key() {
        let mut limits = QueueLimits::default();
        limits.each_key.concurrency = Some(1);
        limits.keys.insert(
            "big".into(),
            Limits {
                concurrency: Some(5),
                ..Limits::default()
            },
        );
        assert_eq!(limits.of_key("big").concurrency, Some(5));
        assert_eq!(limits.of_key("small").concurrency, Some(1));
        assert!(!limits.rate_limited());
        limits.keys.get_mut("big").unwrap().rate = Some(RateLimit {
            starts: 1,
            period_ms: 60_000,
        });
        limits.queue.rate = Some(RateLimit {
            starts: 1,
            period_ms: 1_000,
        });
        assert_eq!(limits.longest_period(), Some(60_000));
    }

    #[test]
    fn bad_limits_are_refused_with_their_place() {
        let mut limits = QueueLimits::default();
        limits.each_key.rate = Some(RateLimit {
            starts: 0,
            period_ms: 1,
        });
        let err = limits.validate().unwrap_err().to_string();
        assert!(err.contains("each_key: rate.starts"), "{err}");
        let mut limits = QueueLimits::default();
        limits.queue.rate = Some(RateLimit {
            starts: 1,
            period_ms: MAX_RATE_PERIOD_MILLIS + 1,
        });
        assert!(limits.validate().is_err());
        let mut limits = QueueLimits::default();
        limits.queue.concurrency = Some(MAX_CONCURRENCY + 1);
        assert!(limits.validate().is_err());
        let mut limits = QueueLimits::default();
        limits.keys.insert(String::new(), Limits::default());
        assert!(limits.validate().is_err(), "an empty key");
        let mut limits = QueueLimits::default();
        for n in 0..=MAX_KEY_LIMITS {
            limits.keys.insert(format!("k{n}"), Limits::default());
        }
        assert!(limits.validate().is_err(), "too many keys");
        assert!(queue_name("a b").is_err());
        assert!(concurrency_key("tab\there").is_err());
        assert!(priority(101).is_err() && priority(-101).is_err() && priority(-100).is_ok());
    }

    #[test]
    fn limits_are_read_from_objects_only() {
        let parse = |text: &str| serde_json::from_str::<QueueLimits>(text);
        assert!(
            parse(r#"{"queue": {"concurrency": 2, "rate": {"starts": 1, "period_ms": 5}}}"#)
                .is_ok()
        );
        assert!(parse(r#"{"keys": {"a": {"per_pod": 1}}}"#).is_ok());
        for array in [
            r#"{"queue": [null, null]}"#,
            r#"{"each_key": [1]}"#,
            r#"{"keys": {"a": [1]}}"#,
            r#"{"queue": {"rate": [1, 1000]}}"#,
        ] {
            assert!(parse(array).is_err(), "{array}");
        }
    }

    #[test]
    fn round_robin_goes_on_after_the_cursor_and_wraps() {
        let keys: Vec<String> = ["", "a", "b", "c"].map(String::from).to_vec();
        let order = |cursor| -> Vec<&str> {
            round_robin(&keys, cursor)
                .into_iter()
                .map(String::as_str)
                .collect()
        };
        assert_eq!(order(None), ["", "a", "b", "c"]);
        assert_eq!(order(Some("a")), ["b", "c", "", "a"]);
        assert_eq!(order(Some("c")), ["", "a", "b", "c"]);
        assert_eq!(order(Some("bb")), ["c", "", "a", "b"], "a key since gone");
    }
}
