//! Controlled queues in memory (see [`crate::queue`]): the same rules as Postgres's, decided
//! under the registry's locks (queues before processes).

use std::collections::{BTreeSet, HashMap, VecDeque};

use chrono::{DateTime, TimeDelta, Utc};

use super::Entry;
use crate::model::{Disposition, ProcessId};
use crate::queue::{Counted, KeyLoad, MAX_KEY_VISITS, MAX_LOAD_KEYS, QueueLimits, QueueRecord};

/// A controlled queue: its row, and its recent starts (for rate limits).
pub(super) struct QueueState {
    pub(super) record: QueueRecord,
    starts: VecDeque<(String, DateTime<Utc>)>,
}

impl QueueState {
    pub(super) fn new(record: QueueRecord) -> Self {
        Self {
            record,
            starts: VecDeque::new(),
        }
    }

    fn recent_starts(&self, key: Option<&str>, period_ms: u64, at: DateTime<Utc>) -> u64 {
        let since = at - TimeDelta::milliseconds(period_ms as i64);
        self.starts
            .iter()
            .filter(|(started_key, started)| {
                *started > since && key.is_none_or(|key| key == started_key)
            })
            .count() as u64
    }
}

/// A key's first claimable processes, with their priorities.
type Heads = Vec<(ProcessId, i16)>;

/// The key a process is counted under (`""`: none).
fn key_of(entry: &Entry) -> &str {
    entry.record.concurrency_key.as_deref().unwrap_or("")
}

/// Whether `entry` may be claimed now (the rule of `claim_runnable`).
pub(super) fn claimable(entry: &Entry, at: DateTime<Utc>) -> bool {
    overdue(entry, at) || runnable(entry, at)
}

/// Whether `entry` is past its deadline without a live lease (claimed only to be failed,
/// whatever the limits).
pub(super) fn overdue(entry: &Entry, at: DateTime<Utc>) -> bool {
    let record = &entry.record;
    record.terminal.is_none()
        && !entry.lease_is_live(at)
        && record.deadline.is_some_and(|deadline| deadline <= at)
}

/// Whether `entry` is runnable now (and not past its deadline) without a live lease.
pub(super) fn runnable(entry: &Entry, at: DateTime<Utc>) -> bool {
    let record = &entry.record;
    record.terminal.is_none()
        && !entry.lease_is_live(at)
        && record.disposition != Disposition::External
        && entry.wake.unwrap_or(record.created_at) <= at
        && record.deadline.is_none_or(|deadline| deadline > at)
}

/// Chooses up to `free` processes of the controlled queues for `owner`, within their limits,
/// recording their starts and the keys served; `round` rotates the queue served first. The
/// caller claims every chosen process at once (nothing else runs between).
pub(super) fn choose(
    queues: &mut HashMap<String, QueueState>,
    processes: &HashMap<ProcessId, Entry>,
    owner: &str,
    free: usize,
    at: DateTime<Utc>,
    round: u64,
) -> Vec<ProcessId> {
    let mut names: Vec<String> = queues.keys().cloned().collect();
    names.sort();
    if !names.is_empty() {
        let start = (round % names.len() as u64) as usize;
        names.rotate_left(start);
    }
    let mut chosen = Vec::new();
    for name in names {
        if chosen.len() >= free {
            break;
        }
        let state = queues.get_mut(&name).expect("listed");
        let more = choose_in_queue(state, processes, owner, free - chosen.len(), at);
        chosen.extend(more);
    }
    chosen
}

fn choose_in_queue(
    state: &mut QueueState,
    processes: &HashMap<ProcessId, Entry>,
    owner: &str,
    free: usize,
    at: DateTime<Utc>,
) -> Vec<ProcessId> {
    let limits: QueueLimits = state.record.limits.clone();
    let period = limits.longest_period().unwrap_or(0);
    let since = at - TimeDelta::milliseconds(period as i64);
    state.starts.retain(|(_, started)| *started > since);
    let queue = state.record.queue.clone();
    let in_queue: Vec<&Entry> = processes
        .values()
        .filter(|entry| entry.record.queue == queue && entry.record.terminal.is_none())
        .collect();
    let mut by_key: HashMap<&str, Counted> = HashMap::new();
    let mut total = Counted::default();
    for entry in in_queue.iter().filter(|entry| entry.lease_is_live(at)) {
        let counted = by_key.entry(key_of(entry)).or_default();
        counted.running += 1;
        total.running += 1;
        if entry
            .record
            .lease
            .as_ref()
            .is_some_and(|lease| lease.owner == owner)
        {
            counted.mine += 1;
            total.mine += 1;
        }
    }
    if let Some(rate) = limits.queue.rate {
        total.recent_starts = state.recent_starts(None, rate.period_ms, at);
    }
    if !limits.queue.admits(&total) {
        return Vec::new();
    }
    let keys: Vec<String> = in_queue
        .iter()
        .map(|entry| key_of(entry).to_owned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let cursor = state.record.cursor_key.clone();
    // The keys visited, within their limits, with their first claimable processes.
    let mut visited: Vec<(String, Counted, Heads)> = Vec::new();
    let mut last_visited: Option<String> = None;
    for key in crate::queue::round_robin(&keys, cursor.as_deref())
        .into_iter()
        .take(MAX_KEY_VISITS)
    {
        if visited.len() >= free {
            break;
        }
        last_visited = Some(key.clone());
        let key_limits = limits.of_key(key);
        let mut counted = by_key.get(key.as_str()).copied().unwrap_or_default();
        if let Some(rate) = key_limits.rate {
            counted.recent_starts = state.recent_starts(Some(key), rate.period_ms, at);
        }
        if !key_limits.admits(&counted) {
            continue;
        }
        let mut heads: Vec<&Entry> = in_queue
            .iter()
            .copied()
            .filter(|entry| key_of(entry) == key && runnable(entry, at))
            .collect();
        heads.sort_by(|a, b| {
            let since = |entry: &Entry| entry.wake.unwrap_or(entry.record.created_at);
            (-a.record.priority, since(a), &a.record.id).cmp(&(
                -b.record.priority,
                since(b),
                &b.record.id,
            ))
        });
        if !heads.is_empty() {
            let ids = heads
                .into_iter()
                .take(free)
                .map(|entry| (entry.record.id.clone(), entry.record.priority))
                .collect();
            visited.push((key.clone(), counted, ids));
        }
    }
    let mut chosen = Vec::new();
    let mut last_served: Option<String> = None;
    let rounds = visited
        .iter()
        .map(|(_, _, ids)| ids.len())
        .max()
        .unwrap_or(0);
    'rounds: for round in 0..rounds {
        let mut order: Vec<usize> = (0..visited.len())
            .filter(|&n| round < visited[n].2.len())
            .collect();
        order.sort_by_key(|&n| std::cmp::Reverse(visited[n].2[round].1));
        for n in order {
            let (key, counted, ids) = &mut visited[n];
            if chosen.len() >= free || !limits.queue.admits(&total) {
                break 'rounds;
            }
            if !limits.of_key(key).admits(counted) {
                continue;
            }
            chosen.push(ids[round].0.clone());
            total.claimed();
            counted.claimed();
            last_served = Some(key.clone());
            if limits.queue.rate.is_some() || limits.of_key(key).rate.is_some() {
                state.starts.push_back((key.clone(), at));
            }
        }
    }
    if let Some(key) = last_served.or(last_visited) {
        state.record.cursor_key = Some(key);
    }
    chosen
}

/// A queue's keys with running or ready work, the busiest first.
pub(super) fn load(
    queue: &str,
    processes: &HashMap<ProcessId, Entry>,
    at: DateTime<Utc>,
) -> Vec<KeyLoad> {
    let mut by_key: HashMap<&str, KeyLoad> = HashMap::new();
    for entry in processes
        .values()
        .filter(|entry| entry.record.queue == queue && entry.record.terminal.is_none())
    {
        let running = entry.lease_is_live(at);
        let ready = !running && claimable(entry, at);
        if !running && !ready {
            continue;
        }
        let load = by_key.entry(key_of(entry)).or_insert_with(|| KeyLoad {
            key: key_of(entry).to_owned(),
            running: 0,
            ready: 0,
        });
        load.running += u64::from(running);
        load.ready += u64::from(ready);
    }
    let mut keys: Vec<KeyLoad> = by_key.into_values().collect();
    crate::queue::sort_load(&mut keys);
    keys.truncate(MAX_LOAD_KEYS);
    keys
}
