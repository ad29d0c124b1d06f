//! The small notices pods exchange over Postgres NOTIFY. Hints only: never a payload, never
//! trusted without reading the log or the terminal column.
//!
//! A pod sends its notices **packed**: one NOTIFY payload carries every notice a send round
//! gathered (one line per process, up to [`MAX_PACK_BYTES`]), in plain text that a listener
//! reads in one pass without allocating, and skips whole when it is its own pod's or when
//! nobody on its pod watches anything:
//!
//! ```text
//! p1 <stamp: microseconds since the Unix epoch> <pod id>
//! <e|c|t> <seq> <process id>
//! ...
//! ```
//!
//! `e`: the process has events up to `seq`; `c`: one of them is a cancellation request; `t`:
//! it was completed (seq 0). Process ids have no spaces and pod ids no line breaks, so every
//! field is found by splitting. The JSON notices of earlier versions ([`EventNotice`],
//! [`TerminalHint`]) are still understood, so a pod of this version hears pods of earlier
//! ones; pods of earlier versions ignore packed payloads, so during a rolling upgrade they hear
//! the upgraded pods only through their safety polls (1 s) until they are upgraded too.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::model::ProcessId;

/// The NOTIFY channel of event notices (packed, see the module documentation).
pub const EVENTS_CHANNEL: &str = "proclog_events";
/// The NOTIFY channel of completion hints as earlier versions sent them (payload: a
/// [`TerminalHint`]); completions now travel packed on [`EVENTS_CHANNEL`].
pub const TERMINAL_CHANNEL: &str = "proclog_terminal";
/// The NOTIFY channel of work hints: runnable processes may exist (payload: the sending pod).
pub const WORK_CHANNEL: &str = "proclog_work";

/// Most bytes of one packed payload: below Postgres's NOTIFY payload cap of 8000 bytes, with
/// room for the largest header and line.
pub const MAX_PACK_BYTES: usize = 7_900;

/// The tag that opens a packed payload (its format's version).
const PACK_TAG: &str = "p1";

/// What a notice says of its process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoticeKind {
    /// It was completed.
    Terminal,
    /// It has new events.
    Event,
    /// It has new events, among them a cancellation request.
    CancelRequested,
}

impl NoticeKind {
    fn flag(self) -> char {
        match self {
            Self::Terminal => 't',
            Self::Event => 'e',
            Self::CancelRequested => 'c',
        }
    }

    fn from_flag(flag: &str) -> Option<Self> {
        match flag {
            "t" => Some(Self::Terminal),
            "e" => Some(Self::Event),
            "c" => Some(Self::CancelRequested),
            _ => None,
        }
    }

    /// The notice of an event of type `event_type`.
    pub fn of_event_type(event_type: &str) -> Self {
        if event_type == crate::reserved::CANCEL_REQUESTED {
            Self::CancelRequested
        } else {
            Self::Event
        }
    }
}

/// One process's notice, as packed: what happened and the highest seq seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedNotice<'a> {
    /// The process (as sent: [`ProcessId::new`] checks it before use).
    pub process_id: &'a str,
    /// Its highest event seq among the notices packed (0 when only completed).
    pub seq: i64,
    /// What happened; of several, the one that wakes the most (a cancellation request,
    /// then events, then a completion).
    pub kind: NoticeKind,
}

/// Packs `notices` of pod `pod`, stamped `stamp_us` (when the oldest was acknowledged), into
/// as few payloads as [`MAX_PACK_BYTES`] allows: one line per process, in order of first
/// appearance. The empty list gives no payload.
pub fn pack<'a>(
    pod: &str,
    stamp_us: i64,
    notices: impl IntoIterator<Item = PackedNotice<'a>>,
) -> Vec<String> {
    let mut merged: Vec<PackedNotice<'a>> = Vec::new();
    let mut index: HashMap<&'a str, usize> = HashMap::new();
    for notice in notices {
        match index.get(notice.process_id) {
            Some(&at) => {
                let kept = &mut merged[at];
                kept.seq = kept.seq.max(notice.seq);
                kept.kind = kept.kind.max_wake(notice.kind);
            }
            None => {
                index.insert(notice.process_id, merged.len());
                merged.push(notice);
            }
        }
    }
    let header = format!("{PACK_TAG} {stamp_us} {pod}\n");
    let mut payloads = Vec::new();
    let mut current = String::new();
    for notice in merged {
        let mut line = String::with_capacity(notice.process_id.len() + 24);
        let _ = writeln!(
            line,
            "{} {} {}",
            notice.kind.flag(),
            notice.seq,
            notice.process_id
        );
        if !current.is_empty() && current.len() + line.len() > MAX_PACK_BYTES {
            payloads.push(std::mem::take(&mut current));
        }
        if current.is_empty() {
            current.push_str(&header);
        }
        current.push_str(&line);
    }
    if !current.is_empty() {
        payloads.push(current);
    }
    payloads
}

impl NoticeKind {
    /// Of two kinds for one process, the one that wakes the most.
    fn max_wake(self, other: Self) -> Self {
        let rank = |kind: Self| match kind {
            Self::Terminal => 0,
            Self::Event => 1,
            Self::CancelRequested => 2,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// A packed payload, parsed lazily: the header at once, the lines when iterated.
#[derive(Clone, Copy, Debug)]
pub struct Pack<'a> {
    /// When the oldest notice in it was acknowledged to its writer (the sender's clock).
    pub stamp_us: i64,
    /// The pod that sent it.
    pub pod: &'a str,
    lines: &'a str,
}

impl<'a> Pack<'a> {
    /// Parses a payload's header; `None` when it is not a packed payload.
    pub fn parse(payload: &'a str) -> Option<Self> {
        let (header, lines) = payload.split_once('\n')?;
        let rest = header.strip_prefix(PACK_TAG)?.strip_prefix(' ')?;
        let (stamp, pod) = rest.split_once(' ')?;
        Some(Self {
            stamp_us: stamp.parse().ok()?,
            pod,
            lines,
        })
    }

    /// How many lines (notices) it carries, without parsing them.
    pub fn len(&self) -> usize {
        self.lines.lines().count()
    }

    /// Whether it carries no line.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its notices; malformed lines are skipped.
    pub fn notices(&self) -> impl Iterator<Item = PackedNotice<'a>> + 'a {
        self.lines.lines().filter_map(|line| {
            let mut fields = line.splitn(3, ' ');
            let kind = NoticeKind::from_flag(fields.next()?)?;
            let seq = fields.next()?.parse().ok()?;
            let process_id = fields.next().filter(|id| !id.is_empty())?;
            Some(PackedNotice {
                process_id,
                seq,
                kind,
            })
        })
    }
}

/// "Process `process_id` has an event `seq` of `event_type`, written by `pod`", as earlier
/// versions sent it (still understood by listeners).
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
    /// Parses a NOTIFY payload; `None` for anything malformed (ignored by listeners).
    pub fn from_payload(payload: &str) -> Option<Self> {
        serde_json::from_str(payload).ok()
    }
}

/// "Process `process_id` was completed through `pod`", as earlier versions sent it on
/// [`TERMINAL_CHANNEL`] (still understood by listeners): wakes waiters on other pods, which
/// then read the terminal column.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalHint {
    /// The process.
    pub process_id: ProcessId,
    /// The pod that completed it.
    pub pod: String,
}

impl TerminalHint {
    /// Parses a NOTIFY payload; `None` for anything malformed (ignored by listeners).
    pub fn from_payload(payload: &str) -> Option<Self> {
        serde_json::from_str(payload).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(id: &str, seq: i64, kind: NoticeKind) -> PackedNotice<'_> {
        PackedNotice {
            process_id: id,
            seq,
            kind,
        }
    }

    #[test]
    fn a_pack_round_trips_one_line_per_process_keeping_the_strongest_wake() {
        let payloads = pack(
            "pod a:1",
            1_700_000_000_000_000,
            [
                notice("order-1", 3, NoticeKind::Event),
                notice("order-2", 0, NoticeKind::Terminal),
                notice("order-1", 5, NoticeKind::CancelRequested),
                notice("order-1", 4, NoticeKind::Event),
                notice("order-2", 9, NoticeKind::Event),
            ],
        );
        assert_eq!(payloads.len(), 1);
        let pack = Pack::parse(&payloads[0]).expect("a packed payload");
        assert_eq!(pack.pod, "pod a:1", "a pod id may hold spaces");
        assert_eq!(pack.stamp_us, 1_700_000_000_000_000);
        assert_eq!(pack.len(), 2);
        let notices: Vec<_> = pack.notices().collect();
        assert_eq!(
            notices,
            [
                notice("order-1", 5, NoticeKind::CancelRequested),
                notice("order-2", 9, NoticeKind::Event),
            ]
        );
    }

    #[test]
    fn many_notices_split_into_payloads_under_the_notify_cap() {
        let ids: Vec<String> = (0..2_000).map(|n| format!("{n:0>120}")).collect();
        let pod = "p".repeat(crate::validate::MAX_POD_ID_CHARS);
        let payloads = pack(
            &pod,
            i64::MAX,
            ids.iter()
                .map(|id| notice(id, i64::MAX, NoticeKind::CancelRequested)),
        );
        assert!(payloads.len() > 1);
        let mut seen = 0;
        for payload in &payloads {
            assert!(payload.len() <= MAX_PACK_BYTES, "{} bytes", payload.len());
            let pack = Pack::parse(payload).expect("packed");
            assert_eq!(pack.pod, pod);
            seen += pack.notices().count();
        }
        assert_eq!(seen, ids.len(), "every notice in exactly one payload");
        assert!(pack("pod", 0, []).is_empty());
    }

    #[test]
    fn malformed_payloads_and_lines_are_skipped() {
        for payload in [
            "",
            "p1",
            "p1 x pod\n",
            "p2 1 pod\ne 1 a\n",
            "{\"process_id\":1}",
        ] {
            assert!(Pack::parse(payload).is_none(), "{payload:?}");
        }
        let pack = Pack::parse("p1 7 pod\ne 1 a\nx 1 b\ne one c\ne 2\ne 3 \nt 0 d\n").unwrap();
        let ids: Vec<&str> = pack.notices().map(|n| n.process_id).collect();
        assert_eq!(ids, ["a", "d"]);
    }
}
