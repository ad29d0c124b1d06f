//! Property tests: validation rules against their definitions, and random interleavings of
//! appends, replays, batches, leases and completions applied to the Postgres registry and the
//! in-memory model side by side. Both must answer every operation identically.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use proclog::{
    AppendOutcome, AppendRequest, ClaimOutcome, Completion, InMemoryProcessRegistry, Lease,
    PgProcessRegistry, ProcessError, ProcessId, ProcessRegistration, ProcessRegistry,
    RegistryConfig, TerminalState, validate,
};
use proptest::prelude::*;
use serde_json::json;

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._:-".contains(c)
}

proptest! {
    #[test]
    fn process_ids_are_1_to_128_chars_of_the_id_alphabet(candidate in "\\PC{0,140}|[A-Za-z0-9._:-]{0,140}") {
        let expected = (1..=128).contains(&candidate.chars().count())
            && candidate.chars().all(is_id_char);
        let accepted = ProcessId::new(candidate.clone()).is_ok();
        prop_assert_eq!(accepted, expected, "{:?}", candidate);
        if let Ok(id) = ProcessId::new(candidate.clone()) {
            prop_assert_eq!(id.as_str(), candidate.as_str());
            // Serde round trip validates too.
            let back: ProcessId = serde_json::from_value(json!(candidate)).unwrap();
            prop_assert_eq!(back, id);
        } else {
            prop_assert!(serde_json::from_value::<ProcessId>(json!(candidate)).is_err());
        }
    }

    #[test]
    fn event_types_are_printable_and_not_reserved(candidate in "(process\\.)?[\\PC\t\n\u{0}]{0,130}") {
        let chars = candidate.chars().count();
        let expected = (1..=128).contains(&chars)
            && !candidate.chars().any(char::is_control)
            && !candidate.starts_with("process.");
        prop_assert_eq!(validate::user_event_type(&candidate).is_ok(), expected, "{:?}", candidate);
    }
}

#[test]
fn generated_ids_are_valid_and_time_ordered() {
    let ids: Vec<ProcessId> = (0..100).map(|_| ProcessId::generate()).collect();
    for id in &ids {
        ProcessId::new(id.as_str()).expect("a generated id validates");
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, ids, "UUIDv7 ids sort by creation time");
}

/// One operation of a random interleaving, on one process.
#[derive(Clone, Debug)]
enum Op {
    Append {
        ty: u8,
        payload: u8,
        key: Option<u8>,
    },
    Batch(Vec<(u8, u8, Option<u8>)>),
    FencedAppend {
        payload: u8,
    },
    Claim {
        owner: u8,
    },
    Release,
    Complete {
        state: u8,
        output: u8,
        fenced: bool,
    },
    EventsAfter {
        after: u8,
        limit: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let key = proptest::option::weighted(0.5, 0u8..4);
    prop_oneof![
        4 => (0u8..3, 0u8..6, key.clone()).prop_map(|(ty, payload, key)| Op::Append { ty, payload, key }),
        2 => proptest::collection::vec((0u8..3, 0u8..6, key), 1..4).prop_map(Op::Batch),
        2 => (0u8..6).prop_map(|payload| Op::FencedAppend { payload }),
        1 => (0u8..2).prop_map(|owner| Op::Claim { owner }),
        1 => Just(Op::Release),
        1 => (0u8..4, 0u8..4, any::<bool>()).prop_map(|(state, output, fenced)| Op::Complete { state, output, fenced }),
        1 => (0u8..6, 1u8..4).prop_map(|(after, limit)| Op::EventsAfter { after, limit }),
    ]
}

/// An event as compared: seq, type, payload, key, lease generation, replayed.
type SeenEvent = (
    i64,
    String,
    serde_json::Value,
    Option<String>,
    Option<i64>,
    bool,
);

/// What an operation answered, without the parts that legitimately differ (times, tokens).
#[derive(Debug, PartialEq)]
enum Answer {
    Events(Vec<SeenEvent>),
    Claimed(i64),
    Busy(String),
    Done,
    Ended(String, i64, serde_json::Value),
    /// The whole error, not only its code.
    Refused(String),
}

fn events(outcomes: Vec<AppendOutcome>) -> Answer {
    Answer::Events(
        outcomes
            .into_iter()
            .map(|o| {
                let e = o.event;
                (
                    e.seq,
                    e.event_type,
                    e.payload,
                    e.replay_key,
                    e.lease_generation,
                    o.replayed,
                )
            })
            .collect(),
    )
}

fn refused(err: ProcessError) -> Answer {
    Answer::Refused(format!("{}: {err}", err.code()))
}

/// 0, 1 and 2 as JSON integers for `n < 3`, and as the same values written as floats
/// (`0.0`, `1.0`, `2.0`) above: equal content under jsonb equality.
fn number(n: u8) -> serde_json::Value {
    if n < 3 {
        json!(n)
    } else {
        json!(f64::from(n - 3))
    }
}

fn request(ty: u8, payload: u8, key: Option<u8>) -> AppendRequest {
    let request = AppendRequest::new(format!("type-{ty}"), json!({"p": number(payload)}));
    match key {
        Some(key) => request.with_replay_key(format!("key-{key}")),
        None => request,
    }
}

async fn apply(
    registry: &dyn ProcessRegistry,
    id: &ProcessId,
    lease: &mut Option<Lease>,
    op: &Op,
) -> Answer {
    let result = match op {
        Op::Append { ty, payload, key } => registry
            .append_event(id, request(*ty, *payload, *key))
            .await
            .map(|o| events(vec![o])),
        Op::Batch(items) => registry
            .append_events(
                id,
                items.iter().map(|(t, p, k)| request(*t, *p, *k)).collect(),
            )
            .await
            .map(events),
        Op::FencedAppend { payload } => {
            let Some(held) = lease.as_ref() else {
                return Answer::Refused("no lease held".into());
            };
            registry
                .append_event(id, request(9, *payload, None).fenced(held))
                .await
                .map(|o| events(vec![o]))
        }
        Op::Claim { owner } => registry
            .claim(id, &format!("owner-{owner}"), Duration::from_secs(600))
            .await
            .map(|outcome| match outcome {
                ClaimOutcome::Acquired(granted) => {
                    let generation = granted.generation;
                    *lease = Some(granted);
                    Answer::Claimed(generation)
                }
                ClaimOutcome::Busy { holder, .. } => Answer::Busy(holder),
            }),
        Op::Release => match lease.take() {
            Some(held) => registry.release(&held).await.map(|()| Answer::Done),
            None => return Answer::Refused("no lease held".into()),
        },
        Op::Complete {
            state,
            output,
            fenced,
        } => {
            let state = TerminalState::ALL[*state as usize];
            let mut completion = Completion::new(state, json!({"o": number(*output)}));
            if *fenced {
                let Some(held) = lease.as_ref() else {
                    return Answer::Refused("no lease held".into());
                };
                completion = completion.fenced(held);
            }
            registry
                .complete_process(id, completion)
                .await
                .map(|record| {
                    let terminal = record.terminal.expect("terminal");
                    Answer::Ended(terminal.state.to_string(), terminal.seq, terminal.output)
                })
        }
        Op::EventsAfter { after, limit } => registry
            .events_after(id, i64::from(*after), u32::from(*limit))
            .await
            .map(|page| {
                Answer::Events(
                    page.into_iter()
                        .map(|e| {
                            (
                                e.seq,
                                e.event_type,
                                e.payload,
                                e.replay_key,
                                e.lease_generation,
                                false,
                            )
                        })
                        .collect(),
                )
            }),
    };
    result.unwrap_or_else(refused)
}

struct Witnesses {
    runtime: tokio::runtime::Runtime,
    /// Group commit off: every append a statement of its own.
    pg: Arc<PgProcessRegistry>,
    /// Group commit's statement for every append.
    pg_group: Arc<PgProcessRegistry>,
    memory: Arc<InMemoryProcessRegistry>,
}

fn witnesses() -> &'static Witnesses {
    static WITNESSES: OnceLock<Witnesses> = OnceLock::new();
    WITNESSES.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (pg, pg_group) = runtime.block_on(async {
            let url = common::migrated_database_url().await;
            let pool = proclog::pg::connect_pool(&url, 4).unwrap();
            let single = PgProcessRegistry::new(pool.clone(), RegistryConfig::new("witness"))
                .with_group_commit(None);
            // Every append through the group commit statement, even alone.
            let grouped = PgProcessRegistry::new(pool, RegistryConfig::new("witness"))
                .with_group_commit(Some(proclog::pg::GroupCommitOptions {
                    group_single_appends: true,
                    ..Default::default()
                }));
            (single, grouped)
        });
        Witnesses {
            runtime,
            pg: Arc::new(pg),
            pg_group: Arc::new(pg_group),
            memory: Arc::new(InMemoryProcessRegistry::new(RegistryConfig::new("witness"))),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn postgres_and_the_model_answer_every_interleaving_alike(ops in proptest::collection::vec(op(), 1..25)) {
        let w = witnesses();
        // The same interleaving against Postgres without and with group commit.
        for pg in [&w.pg, &w.pg_group] {
        w.runtime.block_on(async {
            let id = ProcessId::generate();
            let registration = ProcessRegistration::new("prop", json!(null)).with_id(id.clone());
            pg.register_process(registration.clone()).await.unwrap();
            w.memory.register_process(registration).await.unwrap();
            let (mut pg_lease, mut mem_lease) = (None, None);
            for (step, op) in ops.iter().enumerate() {
                let from_pg = apply(&**pg, &id, &mut pg_lease, op).await;
                let from_model = apply(&*w.memory, &id, &mut mem_lease, op).await;
                prop_assert_eq!(&from_pg, &from_model, "step {} {:?}", step, op);
            }
            let pg_log = pg.events_after(&id, 0, 1000).await.unwrap();
            let model_log = w.memory.events_after(&id, 0, 1000).await.unwrap();
            let strip = |log: Vec<proclog::ProcessEvent>| {
                log.into_iter()
                    .map(|e| (e.seq, e.event_type, e.payload, e.replay_key, e.lease_generation))
                    .collect::<Vec<_>>()
            };
            let pg_log = strip(pg_log);
            prop_assert_eq!(&pg_log, &strip(model_log));
            let seqs: Vec<i64> = pg_log.iter().map(|e| e.0).collect();
            prop_assert_eq!(seqs, (1..=pg_log.len() as i64).collect::<Vec<_>>(), "dense log");
            if let Some(terminal_at) = pg_log.iter().position(|e| e.1.starts_with("process.")) {
                prop_assert_eq!(terminal_at, pg_log.len() - 1, "the terminal event is last");
            }
            let pg_record = pg.get_process(&id).await.unwrap().unwrap();
            let model_record = w.memory.get_process(&id).await.unwrap().unwrap();
            prop_assert_eq!(pg_record.status, model_record.status);
            prop_assert_eq!(pg_record.last_seq, model_record.last_seq);
            prop_assert_eq!(pg_record.lease_generation, model_record.lease_generation);
            prop_assert_eq!(
                pg_record.terminal.map(|t| (t.state, t.seq, t.output)),
                model_record.terminal.map(|t| (t.state, t.seq, t.output))
            );
            Ok(())
        })?;
        }
    }
}
