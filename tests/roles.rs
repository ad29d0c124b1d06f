//! CONTRACT §12, least privilege: the schema's owner migrates; a pod runs as a writer role
//! that can do its work and cannot change the schema; a reader role reads and can change
//! nothing, through any table, function or trigger.

mod common;

use std::time::Duration;

use common::{fresh_database_url, sql_client, table_checksum};
use proclog::pg::roles::{WRITER_FUNCTIONS, WRITER_TABLE_PRIVILEGES};
use proclog::pg::{MigrationError, connect_pool};
use proclog::pod::{Pod, demo_engines};
use proclog::{AppendRequest, Completion, ProcessId, ProcessRegistration, Proclog, TerminalState};
use serde_json::json;

/// `url` (the superuser's) with `role` as the user.
fn as_role(url: &str, role: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{role}@{host}")
}

/// A database with three roles: `owner` (not a superuser) migrated it and granted `pod` the
/// writer's rights and `reader` the reader's. Returns (superuser url, owner, pod, reader urls).
async fn database_with_roles() -> (String, String, String, String) {
    let admin_url = fresh_database_url().await;
    let admin = sql_client(&admin_url).await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let [owner, pod, reader] = ["owner", "pod", "reader"].map(|r| format!("{r}_{suffix}"));
    let database: String = admin
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    admin
        .batch_execute(&format!(
            "CREATE ROLE {owner} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB;
             CREATE ROLE {pod} LOGIN NOSUPERUSER;
             CREATE ROLE {reader} LOGIN NOSUPERUSER;
             GRANT CREATE ON DATABASE \"{database}\" TO {owner};"
        ))
        .await
        .unwrap();
    let owner_url = as_role(&admin_url, &owner);
    let owner_pool = connect_pool(&owner_url, 1).unwrap();
    proclog::pg::migrate(&owner_pool)
        .await
        .expect("the owner migrates");
    proclog::pg::grant_writer(&owner_pool, &pod).await.unwrap();
    proclog::pg::grant_writer(&owner_pool, &pod).await.unwrap(); // idempotent
    proclog::pg::grant_reader(&owner_pool, &reader)
        .await
        .unwrap();
    (
        admin_url.clone(),
        owner_url,
        as_role(&admin_url, &pod),
        as_role(&admin_url, &reader),
    )
}

/// Every way we know to write through SQL, each of which must be refused for the role.
fn attacks() -> Vec<String> {
    [
        "CREATE TABLE proclog.mine (x int)",
        "CREATE FUNCTION proclog.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE VIEW proclog.mine AS SELECT 1",
        "ALTER TABLE proclog.events ADD COLUMN mine int",
        "ALTER TABLE proclog.processes DISABLE TRIGGER ALL",
        "DROP TABLE proclog.events",
        "DROP FUNCTION proclog.fence_holds(uuid, uuid, timestamptz)",
        "TRUNCATE proclog.events",
        "TRUNCATE proclog.processes",
        "CREATE INDEX mine ON proclog.events (writer)",
        "CREATE TRIGGER mine AFTER INSERT ON proclog.events FOR EACH ROW EXECUTE FUNCTION proclog.check_process_row()",
        "COMMENT ON TABLE proclog.events IS 'mine'",
        "ALTER FUNCTION proclog.append_events(text, text, uuid, text[], jsonb[], text[]) SECURITY DEFINER",
        "DELETE FROM proclog.schema_migrations",
        "INSERT INTO proclog.schema_migrations VALUES (99, 'mine')",
        "INSERT INTO proclog.readers VALUES ('mine')",
        "INSERT INTO proclog.writers VALUES ('mine')",
        "UPDATE proclog.events SET payload = '1'",
        // The finding of the security review: a SECURITY DEFINER trigger function put on a
        // table of the attacker's deleted every log. Now nobody but the owner may attach it.
        "CREATE TEMP TABLE victims (process_id text);
         CREATE TRIGGER steal AFTER DELETE ON victims REFERENCING OLD TABLE AS removed
             FOR EACH STATEMENT EXECUTE FUNCTION proclog.delete_events_of_deleted();
         INSERT INTO victims SELECT process_id FROM proclog.processes;
         DELETE FROM victims",
        // Named like a Citus shard of processes (which the guards accept), but not in proclog.
        "CREATE TEMP TABLE processes_102008 (process_id text);
         CREATE TRIGGER steal AFTER DELETE ON processes_102008 REFERENCING OLD TABLE AS removed
             FOR EACH STATEMENT EXECUTE FUNCTION proclog.delete_events_of_deleted();
         INSERT INTO processes_102008 SELECT process_id FROM proclog.processes;
         DELETE FROM processes_102008",
        "CREATE TEMP TABLE rows_of_mine (x int);
         CREATE TRIGGER mine BEFORE INSERT ON rows_of_mine
             FOR EACH ROW EXECUTE FUNCTION proclog.check_process_row()",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Every write a reader could try: DML on every table and every function.
fn reader_attacks() -> Vec<String> {
    let mut sql = attacks();
    sql.extend([
        "DELETE FROM proclog.events".to_string(),
        "DELETE FROM proclog.processes".into(),
        "DELETE FROM proclog.pods".into(),
        "UPDATE proclog.processes SET status = 'failed'".into(),
        "INSERT INTO proclog.processes (process_id, kind, input, disposition) VALUES ('x', 'k', '{}', 'rerun')".into(),
        "INSERT INTO proclog.events (process_id, seq, event_type, payload, writer) VALUES ('x', 1, 't', '1', 'w')".into(),
        "INSERT INTO proclog.pods (pod_id, incarnation, version, concurrency, state, heartbeat_every) VALUES ('p', gen_random_uuid(), 'v', 1, 'running', '1s')".into(),
        "SELECT * FROM proclog.processes FOR UPDATE".into(),
        "SELECT * FROM proclog.append_events('p1', 'r', NULL, ARRAY['t'], ARRAY['1'::jsonb], NULL)".into(),
        "SELECT * FROM proclog.append_group('r', ARRAY['p1'], ARRAY[NULL::uuid], ARRAY[1], ARRAY[1], ARRAY['t'], ARRAY['1'::jsonb], NULL)".into(),
        "SELECT * FROM proclog.complete_process('p1', 'r', NULL, 'failed', '{}')".into(),
        "SELECT proclog.refuse_write('p1')".into(),
        "SELECT * FROM proclog.write_refusal('p1')".into(),
        "SELECT proclog.fence_holds(NULL, NULL, NULL)".into(),
        "SELECT * FROM proclog.start_process('x', 'k', 'null', 'rerun', NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'singleton', 'key', 0, false, NULL, '', 0::smallint)".into(),
        "INSERT INTO proclog.start_keys (kind, start_key, process_id, policy) VALUES ('k', 'key', 'x', 'singleton')".into(),
        "DELETE FROM proclog.start_keys".into(),
        "INSERT INTO proclog.schedules (schedule_id, cron, time_zone, kind, disposition, overlap, catch_up, catch_up_limit, missed_after_ms) VALUES ('s', '* * * * *', 'UTC', 'k', 'rerun', 'skip', 'skip_missed', 1, 0)".into(),
        "UPDATE proclog.schedules SET paused = true".into(),
        "DELETE FROM proclog.schedules".into(),
        "INSERT INTO proclog.queues (queue, limits) VALUES ('q', '{}')".into(),
        "UPDATE proclog.queues SET cursor_key = 'k'".into(),
        "DELETE FROM proclog.queues".into(),
        "INSERT INTO proclog.queue_starts (queue, concurrency_key, process_id) VALUES ('q', '', 'x')".into(),
        "DELETE FROM proclog.queue_starts".into(),
    ]);
    // A writer may lock what it may update (Postgres's rule); a reader may not block writers.
    sql.extend(
        [
            "processes",
            "events",
            "pods",
            "start_keys",
            "schedules",
            "queues",
            "queue_starts",
        ]
        .iter()
        .map(|table| format!("BEGIN; LOCK TABLE proclog.{table} IN EXCLUSIVE MODE; COMMIT")),
    );
    sql
}

async fn refused_all(url: &str, role: &str, attempts: &[String]) {
    let client = sql_client(url).await;
    for attempt in attempts {
        match client.batch_execute(attempt).await {
            Ok(()) => panic!("{role} was allowed: {attempt}"),
            Err(err) => {
                // Leave no aborted transaction behind for the next attempt.
                client.batch_execute("ROLLBACK").await.unwrap();
                let code = err.code().map(|c| c.code().to_owned()).unwrap_or_default();
                // 42501: insufficient privilege. 42P01/42883 cannot occur for objects that
                // exist; anything else would be a refusal for another reason.
                assert_eq!(code, "42501", "{role}: {attempt}: {err}");
            }
        }
    }
}

/// Writes a process with events, another completed one, so that attacks have rows to hit.
async fn some_history(url: &str) {
    let stack = Proclog::builder(url)
        .pod_id("history")
        .migrate(false)
        .start()
        .await
        .unwrap();
    let registry = stack.registry();
    for id in ["p1", "p2"] {
        let id = ProcessId::new(id).unwrap();
        registry
            .register_process(
                ProcessRegistration::new("external-kind", json!({}))
                    .with_id(id.clone())
                    .with_disposition(proclog::Disposition::External),
            )
            .await
            .unwrap();
        registry
            .append_events(
                &id,
                vec![
                    AppendRequest::new("a", json!(1)),
                    AppendRequest::new("b", json!(2)).with_replay_key("k"),
                ],
            )
            .await
            .unwrap();
    }
    registry
        .complete_process(
            &ProcessId::new("p2").unwrap(),
            Completion::new(TerminalState::Completed, json!({})),
        )
        .await
        .unwrap();
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reader_can_change_nothing() {
    let (admin_url, _owner, pod_url, reader_url) = database_with_roles().await;
    some_history(&pod_url).await;
    let before = table_checksum(&admin_url).await;
    let reader = sql_client(&reader_url).await;
    for table in [
        "processes",
        "events",
        "pods",
        "schema_migrations",
        "readers",
        "writers",
    ] {
        reader
            .query(&format!("SELECT * FROM proclog.{table}"), &[])
            .await
            .unwrap_or_else(|err| panic!("the reader reads {table}: {err}"));
    }
    reader
        .query("SELECT * FROM proclog.pod_status", &[])
        .await
        .expect("the reader reads the pods view");
    refused_all(&reader_url, "the reader", &reader_attacks()).await;
    assert_eq!(table_checksum(&admin_url).await, before, "nothing changed");
    // No proclog function is executable by the reader (or by PUBLIC).
    let executable: Vec<String> = sql_client(&admin_url)
        .await
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
              WHERE p.pronamespace = 'proclog'::regnamespace
                AND (has_function_privilege($1, p.oid, 'EXECUTE')
                     OR has_function_privilege('public', p.oid, 'EXECUTE'))",
            &[&reader_url
                .split("://")
                .nth(1)
                .unwrap()
                .split('@')
                .next()
                .unwrap()],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        executable.is_empty(),
        "executable by the reader: {executable:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_runs_as_the_writer_role_and_cannot_change_the_schema() {
    let (admin_url, owner_url, pod_url, _reader) = database_with_roles().await;
    // The whole stack and a pod run as the writer: start (the schema is current, so no DDL),
    // presence, claims, runs, renewals, completion, cancellation, prune.
    let stack = Proclog::builder(&pod_url)
        .pod_id("writer-pod")
        .lease_ttl(Duration::from_secs(5))
        .start()
        .await
        .expect("a writer starts on a current schema");
    let pod = Pod::builder(&stack)
        .engines(demo_engines())
        .poll_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    let registry = stack.registry();
    let done = registry
        .register_process(ProcessRegistration::new(
            "steps",
            json!({"steps": 3, "delay_ms": 1}),
        ))
        .await
        .unwrap();
    let slow = registry
        .register_process(ProcessRegistration::new(
            "steps",
            json!({"steps": 1000, "delay_ms": 50}),
        ))
        .await
        .unwrap();
    stack.services().work.notify_one();
    let terminal = stack
        .driver()
        .await_terminal(&done.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(terminal.state, TerminalState::Completed);
    let mut events = stack.subscriptions().subscribe(slow.id.clone(), 0);
    use futures::StreamExt;
    while let Some(event) = events.next().await {
        if event.unwrap().event_type == "step" {
            break;
        }
    }
    proclog::pod::cancel_process(
        registry.as_ref(),
        &slow.id,
        "writer-pod",
        json!("enough"),
        None,
    )
    .await
    .unwrap();
    let cancelled = stack
        .driver()
        .await_terminal(&slow.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cancelled.state, TerminalState::Cancelled);
    let pruned = registry
        .prune_terminal_processes(chrono::Utc::now() + chrono::TimeDelta::days(1))
        .await
        .expect("the writer prunes, events included");
    assert_eq!(pruned.processes, 2);
    pod.shutdown().await;
    stack.shutdown().await;
    let left: i64 = sql_client(&admin_url)
        .await
        .query_one("SELECT count(*) FROM proclog.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "prune took the logs with the processes");

    some_history(&pod_url).await;
    let before = table_checksum(&admin_url).await;
    refused_all(&pod_url, "the writer", &attacks()).await;
    assert_eq!(table_checksum(&admin_url).await, before, "nothing changed");

    // A schema behind this binary: the writer may not migrate it and says who must.
    let admin = sql_client(&admin_url).await;
    let latest = proclog::pg::migrate::latest_version();
    admin
        .execute(
            "DELETE FROM proclog.schema_migrations WHERE version = $1",
            &[&latest],
        )
        .await
        .unwrap();
    let refused = proclog::pg::migrate(&connect_pool(&pod_url, 1).unwrap()).await;
    assert!(
        matches!(refused, Err(MigrationError::NotOwner { found, .. }) if found == latest - 1),
        "{refused:?}"
    );
    assert!(refused.unwrap_err().to_string().contains("proclog migrate"));
    // The owner can (here: the last migration again would fail on existing objects, so put
    // the row back as it was).
    let owner = sql_client(&owner_url).await;
    owner
        .execute(
            "INSERT INTO proclog.schema_migrations (version, name) VALUES ($1, 'x')",
            &[&latest],
        )
        .await
        .expect("the owner writes its own table");
}

#[tokio::test]
async fn the_writer_has_exactly_the_listed_privileges() {
    let (admin_url, _owner, pod_url, _reader) = database_with_roles().await;
    let pod_role = pod_url
        .split("://")
        .nth(1)
        .unwrap()
        .split('@')
        .next()
        .unwrap();
    let admin = sql_client(&admin_url).await;
    // Functions: EXECUTE on exactly WRITER_FUNCTIONS (a new function must be listed, or the
    // pods cannot call it: this test names it).
    let executable: Vec<String> = admin
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
              WHERE p.pronamespace = 'proclog'::regnamespace
                AND has_function_privilege($1, p.oid, 'EXECUTE')
              ORDER BY 1",
            &[&pod_role],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut expected: Vec<String> = Vec::new();
    for function in WRITER_FUNCTIONS {
        let canonical: String = admin
            .query_one(&format!("SELECT '{function}'::regprocedure::text"), &[])
            .await
            .unwrap()
            .get(0);
        expected.push(canonical);
    }
    expected.sort();
    assert_eq!(executable, expected);
    // Tables: SELECT on all; writes only as listed; never TRUNCATE, REFERENCES or TRIGGER.
    let tables: Vec<String> = admin
        .query(
            "SELECT 'proclog.' || c.relname FROM pg_class c
              WHERE c.relnamespace = 'proclog'::regnamespace AND c.relkind IN ('r', 'v')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    for table in &tables {
        let listed = WRITER_TABLE_PRIVILEGES
            .iter()
            .find(|(name, _)| name == table)
            .map_or("", |(_, privileges)| privileges);
        for privilege in [
            "SELECT",
            "INSERT",
            "UPDATE",
            "DELETE",
            "TRUNCATE",
            "REFERENCES",
            "TRIGGER",
        ] {
            let has: bool = admin
                .query_one(
                    "SELECT has_table_privilege($1, $2, $3)",
                    &[&pod_role, table, &privilege],
                )
                .await
                .unwrap()
                .get(0);
            let want = privilege == "SELECT" || listed.contains(privilege);
            assert_eq!(has, want, "{pod_role} {privilege} on {table}");
        }
    }
}
