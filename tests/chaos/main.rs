//! The chaos suite: CONTRACT §6 and §6a under a seeded schedule of faults.
//!
//! One round starts its own throwaway Postgres (it is crashed and restarted during the
//! round), three real `proclog pod` processes (`pod-a` and `pod-b` connected directly, `pod-c`
//! through a TCP proxy that can cut or stall its traffic), and a load client that keeps
//! registering processes over HTTP (`steps` with dispositions `rerun` and `abandon`, `fail`,
//! `steps` it cancels, `external` ones it appends to and completes itself, `order` processes
//! of durable execution that it approves with a message, `order` processes nobody approves
//! that end at their deadline, and `fanout` processes that spawn three children and join
//! them, and `steps` in a queue with limits per queue, key and pod), retrying every write
//! idempotently and recording every acknowledged write (messages
//! included) in a ledger. A schedule due every two seconds (`run_all`) runs through the round
//! and is paused when the load stops.
//!
//! Meanwhile, one fault at a time, chosen and paced by the seed: SIGKILL, SIGSTOP past the
//! lease TTL, or SIGTERM of a pod (killed and drained pods are restarted under the same pod
//! id); `pg_terminate_backend` of every session of a pod, five times in a row; an immediate
//! (crash) restart of Postgres; a cut of pod-c's connections; a stall of pod-c's traffic
//! shorter, then longer, than the TTL. After each fault every pod must answer `/readyz` again
//! on its own. At the end the load stops, every process is driven to a terminal state, and the
//! invariants are checked over SQL and over the engines' journals (`--demo-journal`): every
//! acknowledged write present exactly once; logs dense, sealed by one terminal event; no
//! write under a superseded lease; `abandon` runs at most once; every process ends as its
//! engine decided; reruns and abandonments only after a disruptive fault of the previous
//! owner; never two engines of one process at once; and for durable execution (see
//! `durable`): a stored step never executed again, no timer early, every acknowledged message
//! received once and in order, retries by the policy, deadlines kept within one TTL; and for
//! composition (see `composition`): no child spawned twice, every due time of the schedule
//! made exactly its process; and for queues (see `limits`): no limit of the round's limited
//! queue ever exceeded, sampled over SQL every 50 ms. Every violation is reported (with the seed) and the test fails
//! once with all of them.
//!
//! A second round runs the same on Citus (`chaos_round_on_citus`, when the extension is
//! installed): the pods reach a coordinator with two workers and the tables distributed, and
//! the faults add an immediate restart of a worker (`citus_worker_restart_immediate`); the
//! Postgres restart is the coordinator's. The two rounds run one after the other.
//!
//! The short rounds (45 s of faults each) run with the other tests:
//!
//! ```text
//! cargo test --test chaos -- --nocapture
//! ```
//!
//! The long forms:
//!
//! ```text
//! PROCLOG_CHAOS_SECS=1800 cargo test --release --test chaos chaos_round_on_postgres -- --nocapture
//! PROCLOG_CHAOS_SECS=1800 cargo test --release --test chaos chaos_round_on_citus -- --nocapture
//! ```
//!
//! `PROCLOG_CHAOS_SEED=<n>` replays the schedule of a round (the seed is printed at the start
//! and in every failure); the interleaving with the real processes is of course not
//! replayed. `PROCLOG_CHAOS_REPORT=<path>` also writes the summary as JSON;
//! `PROCLOG_CHAOS_KEEP=1` keeps the journals and the pods' and Postgres's logs of a passing
//! round too (a failing round always keeps them).

#[path = "../common/mod.rs"]
mod common;

mod api;
mod cluster;
mod composition;
mod durable;
mod faults;
mod invariants;
mod journals;
mod limits;
mod load;
mod report;
mod schedule;
mod settings;
mod settle;
mod snapshot;
mod violation;

use std::sync::{Arc, Mutex};

use proclog::local_pg::{LocalPostgres, LocalPostgresOptions};
use tokio_util::sync::CancellationToken;

use crate::api::{Api, Outcome};
use crate::cluster::{Backend, Cluster, sql_connect};
use crate::invariants::check_all;
use crate::journals::check_journals;
use crate::load::{Ledger, run_load};
use crate::report::{Round, print_summary};
use crate::settings::{Settings, announce_seed_on_panic};
use crate::settle::{await_all_terminal, complete_open_externals, finish_load};
use crate::snapshot::Snapshot;
use crate::violation::Violation;

/// One round at a time: two at once on two cores would starve the pods of their leases.
static ONE_ROUND_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_round_on_postgres() {
    let _turn = ONE_ROUND_AT_A_TIME.lock().await;
    chaos_round(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_round_on_citus() {
    if !common::citus_installed() {
        return;
    }
    let _turn = ONE_ROUND_AT_A_TIME.lock().await;
    chaos_round(Backend::Citus).await;
}

async fn chaos_round(backend: Backend) {
    let settings = Settings::from_env();
    let seed = settings.seed;
    announce_seed_on_panic(seed);
    println!(
        "chaos: {backend:?}, seed {seed}, {} s of faults (replay with PROCLOG_CHAOS_SEED={seed})",
        settings.fault_time.as_secs()
    );
    let dir = std::env::temp_dir().join(format!(
        "proclog-chaos-{}-{}-{seed}",
        format!("{backend:?}").to_lowercase(),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("chaos directory");

    let mut cluster = Cluster::start(&dir, backend).await;
    let api = Api::new(cluster.pod_urls());
    let mut violations = Vec::new();
    // A schedule runs through the round; its due times are checked by o.
    if !matches!(
        api.post("/v1/schedules", &composition::schedule_spec())
            .await
            .0,
        Outcome::Acked(_)
    ) {
        violations.push(Violation::new(
            "unexpected refusal",
            composition::SCHEDULE_ID,
            "the schedule was not created",
        ));
    }
    // A limited queue runs through the round; its limits are checked by p.
    let queue = format!("/v1/queues/{}", limits::QUEUE);
    if !matches!(
        api.request(reqwest::Method::PUT, &queue, &limits::limits_body())
            .await
            .0,
        Outcome::Acked(_)
    ) {
        violations.push(Violation::new(
            "unexpected refusal",
            limits::QUEUE,
            "the queue's limits were not set",
        ));
    }
    let stop_sampling = CancellationToken::new();
    let sampler = tokio::spawn(limits::sample(cluster.direct_url(), stop_sampling.clone()));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop_load = CancellationToken::new();
    let load = tokio::spawn(run_load(
        api.clone(),
        Arc::clone(&ledger),
        seed,
        stop_load.clone(),
    ));

    let faults = cluster
        .run_faults(seed, settings.fault_time, &mut violations)
        .await;
    stop_load.cancel();
    finish_load(load, &mut violations).await;
    let pause = format!("/v1/schedules/{}/pause", composition::SCHEDULE_ID);
    if !matches!(
        api.post(&pause, &serde_json::json!({})).await.0,
        Outcome::Acked(_)
    ) {
        violations.push(Violation::new(
            "unexpected refusal",
            composition::SCHEDULE_ID,
            "the schedule was not paused",
        ));
    }
    let client = sql_connect(&cluster.direct_url()).await;
    complete_open_externals(&api, &client, &mut violations).await;
    await_all_terminal(&client, &mut violations).await;
    stop_sampling.cancel();
    let sampled = sampler.await.expect("the sampler");
    println!(
        "chaos: limited queue sampled {} times ({} while the database was away): peaks {} of {} (queue), {} of 1 (a key), {} of 2 (a pod)",
        sampled.samples,
        sampled.failed_samples,
        sampled.peak_queue,
        3,
        sampled.peak_key,
        sampled.peak_pod
    );
    violations.extend(sampled.violations);

    let snapshot = Snapshot::load(&client).await;
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    violations.extend(ledger.violations.iter().cloned());
    violations.extend(check_all(&ledger, &snapshot, &faults));
    violations.extend(durable::check_stored_steps(&dir, &snapshot));
    let (journal_violations, journal) = check_journals(&dir, &snapshot);
    violations.extend(journal_violations);

    let report = Round {
        settings: &settings,
        backend,
        faults: &faults,
        ledger: &ledger,
        stats: &api.stats,
        snapshot: &snapshot,
        journal: &journal,
        violations: &violations,
    }
    .to_json();
    print_summary(&report);
    if let Some(path) = &settings.report {
        let text = serde_json::to_string_pretty(&report).expect("report JSON");
        std::fs::write(path, text).expect("write PROCLOG_CHAOS_REPORT");
    }
    if violations.is_empty() && !settings.keep {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    cluster.keep_logs(&dir);
    let _ = std::fs::remove_file(dir.join("proclog")); // the pods' binary: large, and rebuilt
    if violations.is_empty() {
        println!("chaos: journals and logs kept in {}", dir.display());
        return;
    }
    let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
    panic!(
        "chaos round with seed {seed} broke {} invariant(s) (journals and logs kept in {}):\n{}",
        violations.len(),
        dir.display(),
        list.join("\n")
    );
}

/// `LocalPostgres::restart_immediate` crashes the server and brings it back on the same URL,
/// with every committed row; `stop_server`/`start_server` do the same with a clean stop.
#[test]
fn restart_immediate_keeps_committed_data_and_the_url() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut pg = LocalPostgres::start(&LocalPostgresOptions::default()).expect("start Postgres");
    let url = pg.url("postgres");
    runtime.block_on(async {
        let client = sql_connect(&url).await;
        client
            .batch_execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (1), (2), (3)")
            .await
            .unwrap();
    });

    pg.restart_immediate().expect("restart");
    assert_eq!(pg.url("postgres"), url, "same URL after the restart");
    let log = std::fs::read_to_string(pg.dir().join("postgres.log")).unwrap();
    assert!(
        log.contains("not properly shut down"),
        "the restart ran crash recovery:\n{log}"
    );
    let sum = |url: String| {
        runtime.block_on(async move {
            let client = sql_connect(&url).await;
            let row = client
                .query_one("SELECT sum(n) FROM kept", &[])
                .await
                .unwrap();
            row.get::<_, i64>(0)
        })
    };
    assert_eq!(sum(url.clone()), 6, "committed rows survive the crash");

    pg.stop_server();
    let refused = runtime.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls));
    assert!(refused.is_err(), "no server after stop_server");
    pg.start_server().expect("start again");
    assert_eq!(sum(url), 6, "and survive a clean stop and start");
    pg.stop().expect("stop and delete");
}
