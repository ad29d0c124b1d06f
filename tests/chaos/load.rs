//! The load client: the plan of each process, the life the client gives it (registration,
//! then a cancellation, or appends and a completion), and the ledger of every write it saw
//! acknowledged.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::{Api, Outcome, error_code};
use crate::schedule::Rng;
use crate::settings::GIVE_UP;
use crate::violation::Violation;

/// What the client does with one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Plan {
    /// `steps`, disposition `rerun`: ends completed.
    Steps,
    /// `steps`, disposition `abandon`: completed, or abandoned after its owner's fault.
    StepsAbandon,
    /// `fail`: ends failed.
    Fail,
    /// `steps` the client cancels a little later: ends cancelled (or completed).
    Cancel,
    /// `external`: the client appends to it and completes it.
    External,
    /// `order` (durable execution): steps, a receive the client answers with a message, one
    /// retryable failure, a durable timer; ends completed.
    Order,
    /// `order` nobody approves, with a deadline: ends failed, "deadline exceeded".
    OrderDeadline,
    /// `fanout` (children): spawns three `steps` children, joins them; ends completed.
    Fanout,
    /// `steps` in the limited queue (see `limits`), under one of its keys: ends completed.
    Limited,
}

/// The `fanout` input of the chaos round: three children as long as a `Steps` process.
pub(crate) const FANOUT_CHILDREN: usize = 3;

/// The `order` input of the chaos round: its timer is longer than a pod's suspend
/// threshold (2 s), so it suspends; one retryable failure before the charge.
pub(crate) const ORDER_INPUT: &str = r#"{"work_ms": 100, "ship_after_ms": 2500, "declines": 1}"#;
/// The deadline of an `OrderDeadline` process, from its registration.
pub(crate) const ORDER_TIMEOUT_MS: u64 = 3000;

impl Plan {
    fn pick(rng: &mut Rng) -> Self {
        match rng.below(30) {
            0..=5 => Plan::Steps,
            6..=9 => Plan::StepsAbandon,
            10..=11 => Plan::Fail,
            12..=14 => Plan::Cancel,
            15..=19 => Plan::External,
            20..=23 => Plan::Order,
            24 => Plan::OrderDeadline,
            25..=26 => Plan::Fanout,
            _ => Plan::Limited,
        }
    }

    fn registration(self, id: &str) -> Value {
        let steps = json!({"steps": 6, "delay_ms": 300});
        let (kind, input, disposition) = match self {
            Plan::Steps | Plan::Cancel => ("steps", steps, "rerun"),
            Plan::StepsAbandon => ("steps", steps, "abandon"),
            Plan::Fail => ("fail", json!({"message": "planned failure"}), "rerun"),
            Plan::External => ("external-notes", json!({}), "external"),
            Plan::Fanout => (
                "fanout",
                json!({"children": FANOUT_CHILDREN, "steps": 6, "delay_ms": 300}),
                "rerun",
            ),
            Plan::Order => (
                "order",
                serde_json::from_str(ORDER_INPUT).expect("valid"),
                "rerun",
            ),
            Plan::Limited => {
                return crate::limits::registration(id);
            }
            Plan::OrderDeadline => {
                return json!({
                    "id": id, "kind": "order", "input": {"work_ms": 100},
                    "disposition": "rerun", "timeout_ms": ORDER_TIMEOUT_MS,
                });
            }
        };
        json!({"id": id, "kind": kind, "input": input, "disposition": disposition})
    }
}

/// How the cancellation of a `Cancel` process was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CancelAnswer {
    /// 2xx: the request was written while the process was live.
    Acknowledged,
    /// 409 `process_terminal`; `retried`: the answer came to a retry, so an earlier attempt
    /// may have cancelled it.
    Terminal { retried: bool },
    /// No usable answer.
    Unknown,
}

/// One process as the client planned and saw it.
#[derive(Clone, Debug)]
pub(crate) struct Planned {
    pub(crate) plan: Plan,
    pub(crate) registration: Value,
    pub(crate) registered: bool,
    pub(crate) cancel: Option<CancelAnswer>,
    pub(crate) completed: bool,
}

/// An acknowledged append.
#[derive(Clone, Debug)]
pub(crate) struct AckedAppend {
    pub(crate) process: String,
    pub(crate) seq: i64,
    pub(crate) event_type: String,
    pub(crate) payload: Value,
    pub(crate) replay_key: String,
    pub(crate) replayed: bool,
}

/// Everything the client was told.
#[derive(Default)]
pub(crate) struct Ledger {
    pub(crate) processes: BTreeMap<String, Planned>,
    pub(crate) appends: Vec<AckedAppend>,
    pub(crate) violations: Vec<Violation>,
}

/// Keeps registering processes (a few per second) until `stop`, then waits for the
/// processes' lives (cancellations, appends, completions) to end.
pub(crate) async fn run_load(
    api: Api,
    ledger: Arc<Mutex<Ledger>>,
    seed: u64,
    stop: CancellationToken,
) {
    let mut rng = Rng::new(seed ^ 0x10AD_10AD_10AD_10AD);
    let mut lives = JoinSet::new();
    for n in 0u64.. {
        let plan = Plan::pick(&mut rng);
        let id = format!("chaos-{seed}-{n:05}");
        ledger.lock().unwrap().processes.insert(
            id.clone(),
            Planned {
                plan,
                registration: plan.registration(&id),
                registered: false,
                cancel: None,
                completed: false,
            },
        );
        let life = live(
            api.clone(),
            Arc::clone(&ledger),
            id,
            Rng::new(rng.next_u64()),
        );
        lives.spawn(life);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(rng.millis(250, 550)) => {}
        }
        while lives.try_join_next().is_some() {}
    }
    while lives.join_next().await.is_some() {}
}

/// Records a write the client could not get acknowledged.
fn unacknowledged(ledger: &Mutex<Ledger>, id: &str, what: &str, outcome: Outcome) {
    let violation = match outcome {
        Outcome::Acked(_) => return,
        Outcome::Refused(status, body) => {
            Violation::new("unexpected refusal", id, format!("{what}: {status} {body}"))
        }
        Outcome::GaveUp(error) => Violation::new(
            "write never acknowledged",
            id,
            format!("{what}: still failing after {GIVE_UP:?}: {error}"),
        ),
    };
    ledger.lock().unwrap().violations.push(violation);
}

/// The client's part in one process's life.
async fn live(api: Api, ledger: Arc<Mutex<Ledger>>, id: String, mut rng: Rng) {
    let (plan, registration) = {
        let ledger = ledger.lock().unwrap();
        let planned = &ledger.processes[&id];
        (planned.plan, planned.registration.clone())
    };
    match api.post("/v1/processes", &registration).await.0 {
        Outcome::Acked(_) => {
            let mut ledger = ledger.lock().unwrap();
            ledger.processes.get_mut(&id).expect("planned").registered = true;
        }
        other => return unacknowledged(&ledger, &id, "register", other),
    }
    match plan {
        Plan::Cancel => cancel_later(&api, &ledger, &id, &mut rng).await,
        Plan::External => append_and_complete(&api, &ledger, &id, &mut rng).await,
        Plan::Order => approve_later(&api, &ledger, &id, &mut rng).await,
        Plan::Steps
        | Plan::StepsAbandon
        | Plan::Fail
        | Plan::OrderDeadline
        | Plan::Fanout
        | Plan::Limited => {}
    }
}

async fn cancel_later(api: &Api, ledger: &Mutex<Ledger>, id: &str, rng: &mut Rng) {
    tokio::time::sleep(rng.millis(200, 1200)).await;
    let path = format!("/v1/processes/{id}/cancel");
    let (outcome, attempts) = api.post(&path, &json!({"reason": "chaos"})).await;
    let answer = match outcome {
        Outcome::Acked(_) => CancelAnswer::Acknowledged,
        Outcome::Refused(409, body) if error_code(&body) == "process_terminal" => {
            CancelAnswer::Terminal {
                retried: attempts > 1,
            }
        }
        other => {
            unacknowledged(ledger, id, "cancel", other);
            CancelAnswer::Unknown
        }
    };
    let mut ledger = ledger.lock().unwrap();
    ledger.processes.get_mut(id).expect("planned").cancel = Some(answer);
}

/// Sends the `approve` message a little later (keyed: a retry stores it once), recorded in
/// the ledger as an acknowledged write.
async fn approve_later(api: &Api, ledger: &Mutex<Ledger>, id: &str, rng: &mut Rng) {
    tokio::time::sleep(rng.millis(100, 1500)).await;
    let payload = json!({"by": "chaos"});
    let body = json!({"topic": "approve", "payload": payload, "replay_key": "approve"});
    let answer = match api
        .post(&format!("/v1/processes/{id}/messages"), &body)
        .await
        .0
    {
        Outcome::Acked(answer) => answer,
        other => return unacknowledged(ledger, id, "message approve", other),
    };
    let event = &answer["event"];
    let stored = json!({"topic": "approve", "payload": payload});
    let mut ledger = ledger.lock().unwrap();
    match event["seq"].as_i64() {
        Some(seq) if event["payload"] == stored => ledger.appends.push(AckedAppend {
            process: id.to_owned(),
            seq,
            event_type: "process.message".into(),
            payload: stored,
            replay_key: "proclog:msg:approve".into(),
            replayed: answer["replayed"].as_bool().unwrap_or(false),
        }),
        _ => ledger.violations.push(Violation::new(
            "a. acknowledged write",
            id,
            format!("the approve message was answered with another event: {answer}"),
        )),
    }
}

/// Appends 2 to 5 `note` events with replay keys, then completes the process.
async fn append_and_complete(api: &Api, ledger: &Mutex<Ledger>, id: &str, rng: &mut Rng) {
    let notes = 2 + rng.below(4);
    for n in 0..notes {
        tokio::time::sleep(rng.millis(100, 400)).await;
        if !append_note(api, ledger, id, n).await {
            return;
        }
    }
    let completion = json!({"state": "completed", "output": {"notes": notes}});
    match api
        .post(&format!("/v1/processes/{id}/complete"), &completion)
        .await
        .0
    {
        Outcome::Acked(_) => {
            let mut ledger = ledger.lock().unwrap();
            ledger.processes.get_mut(id).expect("planned").completed = true;
        }
        other => unacknowledged(ledger, id, "complete", other),
    }
}

/// One keyed append, recorded in the ledger when acknowledged; false when it was not.
async fn append_note(api: &Api, ledger: &Mutex<Ledger>, id: &str, n: u64) -> bool {
    let replay_key = format!("note-{n}");
    let payload = json!({"n": n, "process": id});
    let body = json!({"event_type": "note", "payload": payload, "replay_key": replay_key});
    let (outcome, attempts) = api.post(&format!("/v1/processes/{id}/events"), &body).await;
    api.stats
        .append_retries
        .fetch_add(u64::from(attempts.saturating_sub(1)), Ordering::Relaxed);
    let answer = match outcome {
        Outcome::Acked(answer) => answer,
        other => {
            unacknowledged(ledger, id, &format!("append {replay_key}"), other);
            return false;
        }
    };
    let event = &answer["event"];
    let mut ledger = ledger.lock().unwrap();
    if event["event_type"] != json!("note") || event["payload"] != payload {
        ledger.violations.push(Violation::new(
            "a. acknowledged write",
            id,
            format!("append {replay_key} was answered with another event: {answer}"),
        ));
    }
    let Some(seq) = event["seq"].as_i64() else {
        ledger.violations.push(Violation::new(
            "a. acknowledged write",
            id,
            format!("append {replay_key} acknowledged without a seq: {answer}"),
        ));
        return false;
    };
    ledger.appends.push(AckedAppend {
        process: id.to_owned(),
        seq,
        event_type: "note".into(),
        payload,
        replay_key,
        replayed: answer["replayed"].as_bool().unwrap_or(false),
    });
    true
}
