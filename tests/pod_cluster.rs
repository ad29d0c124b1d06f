//! CONTRACT §6 with real processes: several `proclog pod` binaries on one Postgres, killed
//! with SIGKILL, paused with SIGSTOP, stopped with SIGTERM. Every check is made over SQL.

mod common;

use std::time::Duration;

use common::pods::{PodProcess, wait_for_sql};
use common::{migrated_database_url, sql_client};
use proclog::pg::{PgProcessRegistry, connect_pool};
use proclog::{Disposition, ProcessId, ProcessRegistration, ProcessRegistry, RegistryConfig};
use serde_json::json;

/// Safety cap on waits for conditions (never a timing assertion).
const CAP: Duration = Duration::from_secs(180);

async fn register_steps(
    url: &str,
    prefix: &str,
    count: usize,
    steps: u64,
    delay_ms: u64,
    disposition: impl Fn(usize) -> Disposition,
) -> Vec<ProcessId> {
    let registry =
        PgProcessRegistry::new(connect_pool(url, 4).unwrap(), RegistryConfig::new("test"));
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let record = registry
            .register_process(
                ProcessRegistration::new("steps", json!({"steps": steps, "delay_ms": delay_ms}))
                    .with_id(ProcessId::new(format!("{prefix}-{n:03}")).unwrap())
                    .with_disposition(disposition(n)),
            )
            .await
            .unwrap();
        ids.push(record.id);
    }
    ids
}

/// The invariants every log must satisfy, whatever happened: gapless from 1, exactly one
/// terminal event and it is last, and no event written under a generation older than the
/// latest `process.started` before it (no zombie writes).
async fn assert_logs_sound(client: &tokio_postgres::Client) {
    let gaps: i64 = client
        .query_one(
            "SELECT count(*) FROM (
                 SELECT p.process_id FROM proclog.processes p
                   JOIN proclog.events e USING (process_id)
                  GROUP BY p.process_id, p.last_seq
                 HAVING count(*) <> p.last_seq OR max(e.seq) <> p.last_seq
                     OR min(e.seq) <> 1) bad",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gaps, 0, "every log is gapless from 1");
    let terminal_problems: i64 = client
        .query_one(
            "SELECT count(*) FROM proclog.processes p
              WHERE (SELECT count(*) FROM proclog.events e
                      WHERE e.process_id = p.process_id
                        AND e.event_type IN ('process.completed', 'process.failed',
                                             'process.cancelled', 'process.abandoned'))
                    <> CASE WHEN p.terminal_state IS NULL THEN 0 ELSE 1 END
                 OR (p.terminal_state IS NOT NULL AND p.terminal_seq <> p.last_seq)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        terminal_problems, 0,
        "one terminal event per ended process, and it is last"
    );
    let zombies: i64 = client
        .query_one(
            "SELECT count(*) FROM proclog.events e
              WHERE e.lease_generation IS NOT NULL
                AND e.lease_generation < (
                    SELECT max(s.lease_generation) FROM proclog.events s
                     WHERE s.process_id = e.process_id AND s.seq < e.seq
                       AND s.event_type = 'process.started')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(zombies, 0, "no write under a superseded lease");
}

/// The log of `id`, one event a line, for a failure message.
async fn log_text(client: &tokio_postgres::Client, id: &str) -> String {
    client
        .query(
            "SELECT format('%s %s %s gen=%s %s %s', seq, occurred_at, event_type, writer,
                           lease_generation, left(payload::text, 120))
               FROM proclog.events WHERE process_id = $1 ORDER BY seq",
            &[&id],
        )
        .await
        .map(|rows| {
            rows.iter()
                .map(|row| row.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|err| err.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_pod_loses_nothing_and_its_work_is_recovered() {
    kill_9_of_a_pod(&migrated_database_url().await, "2000", "25").await;
}

/// The same on distributed tables: the pods reach a Citus coordinator (two workers), claim
/// process by process, and each process's writes run on its shard. Three Postgres servers
/// share the two cores with the pods here, so the pods run fewer processes at once, under a
/// longer TTL (at 75 runs renewing every 200 ms, renewals came late and live pods lost
/// leases to overload, not to the kill).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_pod_on_citus_loses_nothing_and_its_work_is_recovered() {
    let Some(store) = common::CitusStore::new().await else {
        return;
    };
    kill_9_of_a_pod(&store.url, "5000", "10").await;
}

/// Three pods (lease TTL `ttl_ms`, `concurrency` runs each) run 200 processes (both
/// dispositions); one is SIGKILLed mid-run: every log
/// sound, its `rerun` processes completed by a second attempt, its `abandon` ones abandoned
/// with the evidence, nothing else abandoned.
async fn kill_9_of_a_pod(url: &str, ttl_ms: &str, concurrency: &str) {
    let url = url.to_owned();
    let flags = [
        "--lease-ttl-ms",
        ttl_ms,
        "--poll-ms",
        "200",
        "--concurrency",
        concurrency,
    ];
    let pods = [
        PodProcess::start(&url, "pod-1", &flags).await,
        PodProcess::start(&url, "pod-2", &flags).await,
        PodProcess::start(&url, "pod-3", &flags).await,
    ];
    let ids = register_steps(&url, "job", 200, 6, 150, |n| {
        if n % 3 == 0 {
            Disposition::Abandon
        } else {
            Disposition::Rerun
        }
    })
    .await;
    let client = sql_client(&url).await;
    // Kill pod-2 while it holds leases of both dispositions, early in their runs (at most two
    // of six steps written): a process about to end could end between this check and the
    // kill, leaving one disposition untested.
    wait_for_sql(
        &client,
        "SELECT count(DISTINCT disposition) = 2 FROM (
             SELECT p.process_id, p.disposition, count(*) AS steps
               FROM proclog.processes p JOIN proclog.events e USING (process_id)
              WHERE p.lease_owner = 'pod-2' AND p.lease_expires_at > now()
                AND e.event_type = 'step' AND e.writer = 'pod-2'
              GROUP BY p.process_id, p.disposition) held
          WHERE steps <= 2",
        CAP,
    )
    .await;
    pods[1].signal(libc::SIGKILL);

    wait_for_sql(
        &client,
        "SELECT coalesce(bool_and(terminal_state IS NOT NULL), false) FROM proclog.processes",
        CAP,
    )
    .await;
    assert_eq!(ids.len(), 200);
    assert_logs_sound(&client).await;

    // Processes pod-2 was running when it died: started by pod-2, not ended by pod-2.
    let orphans = client
        .query(
            "SELECT p.process_id, p.disposition, p.terminal_state, p.output
               FROM proclog.processes p
              WHERE EXISTS (SELECT 1 FROM proclog.events e WHERE e.process_id = p.process_id
                             AND e.event_type = 'process.started' AND e.writer = 'pod-2')
                AND NOT EXISTS (SELECT 1 FROM proclog.events e
                                 WHERE e.process_id = p.process_id AND e.seq = p.terminal_seq
                                   AND e.writer = 'pod-2')",
            &[],
        )
        .await
        .unwrap();
    assert!(!orphans.is_empty(), "pod-2 died holding work");
    let (mut reruns, mut abandoned) = (0, 0);
    for row in &orphans {
        let id: String = row.get(0);
        let disposition: String = row.get(1);
        let state: String = row.get(2);
        let output: serde_json::Value = row.get(3);
        match disposition.as_str() {
            "rerun" => {
                reruns += 1;
                assert_eq!(state, "completed", "{id} was rerun to completion");
                let restarted: bool = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM proclog.events later
                                  WHERE later.process_id = $1 AND later.event_type = 'process.started'
                                    AND later.writer <> 'pod-2'
                                    AND later.lease_generation > (
                                        SELECT max(lease_generation) FROM proclog.events dead
                                         WHERE dead.process_id = $1 AND dead.writer = 'pod-2'
                                           AND dead.event_type = 'process.started'))",
                        &[&id],
                    )
                    .await
                    .unwrap()
                    .get(0);
                assert!(
                    restarted,
                    "{id} has a second process.started with a higher generation"
                );
                if output["attempt"] != json!(2) {
                    panic!(
                        "{id} completed by attempt {}, not its second; its log:\n{}",
                        output["attempt"],
                        log_text(&client, &id).await
                    );
                }
            }
            "abandon" => {
                abandoned += 1;
                assert_eq!(state, "abandoned", "{id} is abandoned");
                assert_eq!(
                    output["lost_owner"],
                    json!("pod-2"),
                    "{id} evidence: {output}"
                );
                assert!(output["lost_generation"].as_i64().unwrap() >= 1);
            }
            other => panic!("unexpected disposition {other}"),
        }
    }
    assert!(
        reruns > 0 && abandoned > 0,
        "both dispositions were exercised"
    );
    // Nothing else was abandoned: only a lost owner leads there.
    let abandoned_total: i64 = client
        .query_one(
            "SELECT count(*) FROM proclog.processes WHERE terminal_state = 'abandoned'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if abandoned_total != abandoned {
        let lost = client
            .query(
                "SELECT process_id, output::text FROM proclog.processes
                  WHERE terminal_state = 'abandoned' AND output->>'lost_owner' <> 'pod-2'",
                &[],
            )
            .await
            .unwrap();
        let lost: Vec<String> = lost
            .iter()
            .map(|row| format!("{} {}", row.get::<_, String>(0), row.get::<_, String>(1)))
            .collect();
        let logs: Vec<String> = pods
            .iter()
            .map(|pod| {
                let text = std::fs::read_to_string(&pod.log).unwrap_or_default();
                let warnings: Vec<&str> = text
                    .lines()
                    .filter(|line| line.contains("WARN") || line.contains("ERROR"))
                    .take(20)
                    .collect();
                format!("{}:\n{}", pod.name, warnings.join("\n"))
            })
            .collect();
        panic!(
            "{abandoned_total} abandoned, {abandoned} of them pod-2's; the others:\n{}\n{}",
            lost.join("\n"),
            logs.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_pod_whose_lease_was_taken_cannot_write_again() {
    let url = migrated_database_url().await;
    let flags = ["--lease-ttl-ms", "1000", "--poll-ms", "100"];
    let mut paused = PodProcess::start(&url, "pod-paused", &flags).await;
    let ids = register_steps(&url, "slow", 1, 40, 100, |_| Disposition::Rerun).await;
    let id = ids[0].as_str().to_owned();
    let client = sql_client(&url).await;
    wait_for_sql(
        &client,
        &format!(
            "SELECT count(*) >= 3 FROM proclog.events
              WHERE process_id = '{id}' AND event_type = 'step'"
        ),
        CAP,
    )
    .await;
    paused.signal(libc::SIGSTOP);
    let _taker = PodProcess::start(&url, "pod-taker", &flags).await;
    // The taker claims after the TTL and writes under generation 2.
    wait_for_sql(
        &client,
        &format!(
            "SELECT count(*) >= 2 FROM proclog.events
              WHERE process_id = '{id}' AND writer = 'pod-taker'"
        ),
        CAP,
    )
    .await;
    paused.signal(libc::SIGCONT);
    wait_for_sql(
        &client,
        &format!(
            "SELECT terminal_state IS NOT NULL FROM proclog.processes WHERE process_id = '{id}'"
        ),
        CAP,
    )
    .await;
    let takeover_seq: i64 = client
        .query_one(
            "SELECT min(seq) FROM proclog.events WHERE process_id = $1 AND writer = 'pod-taker'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    let late_writes: i64 = client
        .query_one(
            "SELECT count(*) FROM proclog.events
              WHERE process_id = $1 AND writer = 'pod-paused' AND seq > $2",
            &[&id, &takeover_seq],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        late_writes, 0,
        "the resumed pod wrote nothing after the takeover"
    );
    let final_writer: String = client
        .query_one(
            "SELECT writer FROM proclog.events e JOIN proclog.processes p USING (process_id)
              WHERE e.process_id = $1 AND e.seq = p.terminal_seq",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(final_writer, "pod-taker");
    assert_logs_sound(&client).await;
    // The resumed pod is still alive and well: it simply lost that process.
    assert!(paused.child.try_wait().unwrap().is_none());
    paused.signal(libc::SIGTERM);
    assert!(paused.wait_exit().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_hands_running_processes_to_another_pod_without_waiting_for_the_ttl() {
    let url = migrated_database_url().await;
    // A TTL far longer than the test: a takeover can only come from the release. The staying
    // pod's safety poll is as long: only the leaving pod's work hint can wake it in time.
    let leaving_flags = [
        "--lease-ttl-ms",
        "600000",
        "--poll-ms",
        "100",
        "--grace-ms",
        "300",
    ];
    let staying_flags = ["--lease-ttl-ms", "600000", "--poll-ms", "600000"];
    let mut leaving = PodProcess::start(&url, "pod-leaving", &leaving_flags).await;
    register_steps(&url, "long", 3, 25, 100, |_| Disposition::Rerun).await;
    let client = sql_client(&url).await;
    wait_for_sql(
        &client,
        "SELECT count(*) = 3 FROM proclog.events
          WHERE event_type = 'process.started' AND writer = 'pod-leaving'",
        CAP,
    )
    .await;
    let _staying = PodProcess::start(&url, "pod-staying", &staying_flags).await;
    leaving.signal(libc::SIGTERM);
    let status = leaving.wait_exit().await;
    assert!(
        status.success(),
        "graceful exit: {status}\n{}",
        leaving.log_text()
    );
    wait_for_sql(
        &client,
        "SELECT count(*) = 3 FROM proclog.events
          WHERE event_type = 'process.started' AND writer = 'pod-staying'
            AND payload -> 'recovered_from' = 'null'::jsonb",
        CAP,
    )
    .await;
    wait_for_sql(
        &client,
        "SELECT coalesce(bool_and(coalesce(terminal_state = 'completed', false)), false)
           FROM proclog.processes",
        CAP,
    )
    .await;
    assert_logs_sound(&client).await;
    let leases_released: i64 = client
        .query_one(
            "SELECT count(*) FROM proclog.events
              WHERE writer = 'pod-staying' AND event_type = 'process.started'
                AND lease_generation = 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        leases_released, 3,
        "each process continued under the next generation"
    );
}
