//! Postgres-specific guarantees: the migrator, the schema's shape and constraints, error
//! kinds that only a real database can produce, and the README's SQL examples.

mod common;

use proclog::pg::{MigrationError, connect_pool, migrate, migrate::latest_version};
use proclog::{
    AppendRequest, Completion, PgProcessRegistry, ProcessError, ProcessId, ProcessRegistration,
    ProcessRegistry, RegistryConfig, TerminalState,
};
use serde_json::json;

use common::{fresh_database_url, migrated_database_url, sql_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pods_migrating_at_once_apply_each_migration_once() {
    let url = fresh_database_url().await;
    let mut runs = Vec::new();
    for _ in 0..6 {
        let pool = connect_pool(&url, 1).unwrap();
        runs.push(tokio::spawn(async move { migrate(&pool).await }));
    }
    let mut applied_by = 0;
    for run in runs {
        let report = run.await.unwrap().expect("every pod's migration succeeds");
        assert_eq!(report.version, latest_version());
        if !report.applied.is_empty() {
            applied_by += 1;
        }
    }
    assert_eq!(applied_by, 1, "exactly one pod applied the migrations");
    let client = sql_client(&url).await;
    let rows = client
        .query(
            "SELECT version FROM proclog.schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, (1..=latest_version()).collect::<Vec<_>>());
    let pool = connect_pool(&url, 1).unwrap();
    assert_eq!(
        proclog::pg::migrate::schema_version(&pool).await.unwrap(),
        latest_version()
    );
}

#[tokio::test]
async fn a_database_with_a_newer_schema_is_refused() {
    let url = migrated_database_url().await;
    let client = sql_client(&url).await;
    client
        .execute(
            "INSERT INTO proclog.schema_migrations (version, name) VALUES ($1, 'from the future')",
            &[&(latest_version() + 1)],
        )
        .await
        .unwrap();
    let pool = connect_pool(&url, 1).unwrap();
    match migrate(&pool).await {
        Err(MigrationError::SchemaTooNew { found, known }) => {
            assert_eq!((found, known), (latest_version() + 1, latest_version()));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

#[tokio::test]
async fn schema_version_of_an_empty_database_is_zero() {
    let url = fresh_database_url().await;
    let pool = connect_pool(&url, 1).unwrap();
    assert_eq!(
        proclog::pg::migrate::schema_version(&pool).await.unwrap(),
        0
    );
}

/// Bookkeeping tables (schema versions, reader and writer roles, pods) hold no process data: in a distributed
/// deployment they are reference tables, copied to every node. Start keys, schedules and
/// queues are keyed by what they name (a key, a schedule, a queue) and stay on the
/// coordinator (`queue_starts` has no key: a claim appends to it and prunes it by time).
#[tokio::test]
async fn every_table_is_keyed_by_process_id_first() {
    let url = migrated_database_url().await;
    let client = sql_client(&url).await;
    let rows = client
        .query(
            "SELECT c.relname, a.attname
               FROM pg_index i
               JOIN pg_class c ON c.oid = i.indrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]
              WHERE n.nspname = 'proclog' AND i.indisprimary
                AND c.relname NOT IN ('schema_migrations', 'readers', 'writers', 'pods',
                                      'start_keys', 'schedules', 'queues')
              ORDER BY c.relname",
            &[],
        )
        .await
        .unwrap();
    let keys: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        keys,
        [
            ("events".to_owned(), "process_id".to_owned()),
            ("processes".to_owned(), "process_id".to_owned())
        ]
    );
}

/// The rule a hand-written statement broke, by the name its error gives.
async fn broken_rule(client: &tokio_postgres::Client, sql: &str, id: &str) -> String {
    let error = client
        .execute(sql, &[&id])
        .await
        .expect_err("the schema refuses the statement");
    let db = error.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "23514", "check_violation: {db}");
    db.constraint().expect("the rule's name").to_owned()
}

#[tokio::test]
async fn the_schema_rejects_a_broken_terminal_column() {
    let url = migrated_database_url().await;
    let registry = PgProcessRegistry::new(connect_pool(&url, 2).unwrap(), RegistryConfig::new("p"));
    let live = registry
        .register_process(ProcessRegistration::new("demo", json!(null)))
        .await
        .unwrap();
    registry
        .append_event(&live.id, AppendRequest::new("x", json!(1)))
        .await
        .unwrap();
    let ended = registry
        .register_process(ProcessRegistration::new("demo", json!(null)))
        .await
        .unwrap();
    registry
        .complete_process(
            &ended.id,
            Completion::new(TerminalState::Completed, json!("ok")),
        )
        .await
        .unwrap();
    let client = sql_client(&url).await;
    let live = live.id.as_str();
    let ended = ended.id.as_str();
    let cases = [
        // A terminal state without the rest of the terminal column.
        (
            "UPDATE proclog.processes SET status = 'completed', terminal_state = 'completed'
              WHERE process_id = $1",
            live,
            "terminal_column_whole",
        ),
        // A terminal status without the terminal column.
        (
            "UPDATE proclog.processes SET status = 'completed' WHERE process_id = $1",
            live,
            "terminal_matches_status",
        ),
        (
            "UPDATE proclog.processes SET status = 'finished' WHERE process_id = $1",
            live,
            "processes_status_check",
        ),
        (
            "UPDATE proclog.processes SET lease_token = gen_random_uuid() WHERE process_id = $1",
            live,
            "lease_whole",
        ),
        // The counter of a log never goes back (that would reuse seqs).
        (
            "UPDATE proclog.processes SET last_seq = last_seq - 1 WHERE process_id = $1",
            live,
            "processes_last_seq_never_decreases",
        ),
        (
            "UPDATE proclog.processes SET lease_generation = -1 WHERE process_id = $1",
            live,
            "processes_lease_generation_check",
        ),
        // A terminal process is sealed: its log does not grow and its terminal column is final.
        (
            "UPDATE proclog.processes SET last_seq = last_seq + 1 WHERE process_id = $1",
            ended,
            "terminal_is_sealed",
        ),
        (
            "UPDATE proclog.processes SET output = '\"other\"' WHERE process_id = $1",
            ended,
            "terminal_is_final",
        ),
        (
            "UPDATE proclog.processes SET status = 'running', terminal_state = NULL,
                    terminal_seq = NULL, output = NULL, completed_at = NULL
              WHERE process_id = $1",
            ended,
            "terminal_is_final",
        ),
        (
            "INSERT INTO proclog.processes (process_id, kind, input, disposition)
             VALUES ($1 || '-new', 'demo', 'null', 'sometimes')",
            live,
            "processes_disposition_check",
        ),
        // A waiting process runs nowhere: it holds no lease.
        (
            "UPDATE proclog.processes SET status = 'waiting', lease_owner = 'pod',
                    lease_token = gen_random_uuid(), lease_expires_at = now() + interval '1 min'
              WHERE process_id = $1",
            live,
            "waiting_holds_no_lease",
        ),
        (
            "UPDATE proclog.processes SET retries = -1 WHERE process_id = $1",
            live,
            "processes_attempts_check",
        ),
    ];
    for (sql, id, rule) in cases {
        assert_eq!(broken_rule(&client, sql, id).await, rule, "{sql}");
    }
    // A gap in a log is impossible to write: seq must be positive and unique per process.
    let result = client
        .execute(
            "INSERT INTO proclog.events (process_id, seq, event_type, payload, writer)
             VALUES ($1, 0, 'x', 'null', 'w')",
            &[&live],
        )
        .await;
    assert!(result.is_err());
    let result = client
        .execute(
            "INSERT INTO proclog.events (process_id, seq, event_type, payload, writer)
             VALUES ($1, 1, 'x', 'null', 'w')",
            &[&live],
        )
        .await;
    assert!(result.is_err(), "seq 1 is taken");
}

#[tokio::test]
async fn deleting_a_process_deletes_its_events() {
    let url = migrated_database_url().await;
    let registry = PgProcessRegistry::new(connect_pool(&url, 2).unwrap(), RegistryConfig::new("p"));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let process = registry
            .register_process(ProcessRegistration::new("demo", json!(null)))
            .await
            .unwrap();
        registry
            .append_events(
                &process.id,
                vec![
                    AppendRequest::new("a", json!(1)),
                    AppendRequest::new("b", json!(2)),
                ],
            )
            .await
            .unwrap();
        ids.push(process.id.as_str().to_owned());
    }
    let client = sql_client(&url).await;
    let deleted = client
        .execute(
            "DELETE FROM proclog.processes WHERE process_id = ANY ($1)",
            &[&&ids[..2]],
        )
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    let left: Vec<String> = client
        .query("SELECT DISTINCT process_id FROM proclog.events", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(left, [ids[2].clone()], "the third process keeps its log");
}

/// The row rules run where the guarded columns change, never on an append: after a
/// process's first append (pending -> running), appends run no row check at all.
#[tokio::test]
async fn appends_run_no_row_check() {
    let url = migrated_database_url().await;
    let registry = PgProcessRegistry::new(connect_pool(&url, 2).unwrap(), RegistryConfig::new("p"));
    let process = registry
        .register_process(ProcessRegistration::new("demo", json!(null)))
        .await
        .unwrap();
    let id = process.id.as_str();
    let mut client = sql_client(&url).await;
    let transaction = client.transaction().await.unwrap();
    transaction
        .batch_execute("SET LOCAL track_functions = 'pl'")
        .await
        .unwrap();
    let checks = async |transaction: &tokio_postgres::Transaction<'_>| -> i64 {
        transaction
            .query_one(
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_xact_user_functions
                  WHERE schemaname = 'proclog' AND funcname = 'check_process_row'",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    };
    let append = "SELECT seq FROM proclog.append_events($1, 'w', NULL, ARRAY['e'],
                                                     ARRAY['1'::jsonb], NULL)";
    transaction.query(append, &[&id]).await.unwrap();
    assert_eq!(
        checks(&transaction).await,
        1,
        "the first append starts the process"
    );
    for _ in 0..5 {
        transaction.query(append, &[&id]).await.unwrap();
    }
    assert_eq!(checks(&transaction).await, 1, "later appends check nothing");
    transaction
        .query(
            "SELECT 1 FROM proclog.complete_process($1, 'w', NULL, 'completed', '1')",
            &[&id],
        )
        .await
        .unwrap();
    assert!(checks(&transaction).await > 1, "completion checks the row");
}

#[tokio::test]
async fn an_unreachable_database_is_an_error_never_absent() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pool = connect_pool(&format!("postgres://proclog@127.0.0.1:{port}/nothing"), 1).unwrap();
    let registry = PgProcessRegistry::new(pool, RegistryConfig::new("p"));
    let id = ProcessId::new("anything").unwrap();
    let result = registry.get_process(&id).await;
    assert!(
        matches!(result, Err(ProcessError::Unavailable(_))),
        "{result:?}"
    );
    let result = registry
        .append_event(&id, AppendRequest::new("x", json!(1)))
        .await;
    assert!(
        matches!(result, Err(ProcessError::Unavailable(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn an_unmigrated_database_is_a_database_error() {
    let url = fresh_database_url().await;
    let registry = PgProcessRegistry::new(connect_pool(&url, 1).unwrap(), RegistryConfig::new("p"));
    let result = registry.get_process(&ProcessId::new("x").unwrap()).await;
    match result {
        Err(ProcessError::Database(message)) => assert!(message.contains("42P01"), "{message}"),
        other => panic!("expected a database error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_malformed_url_is_invalid_input() {
    let result = connect_pool("postgres://[not a url", 1);
    assert!(matches!(result, Err(ProcessError::InvalidInput(_))));
}

/// The SQL examples of README.md, verbatim (the test checks the README still holds them).
const README_QUERIES: [&str; 3] = [
    "SELECT seq, event_type, payload, occurred_at
  FROM proclog.events
 WHERE process_id = 'order-42'
 ORDER BY seq;",
    "SELECT status, count(*)
  FROM proclog.processes
 GROUP BY status
 ORDER BY status;",
    "SELECT event_type, count(*) AS events
  FROM proclog.events
 GROUP BY event_type
 ORDER BY events DESC, event_type;",
];

#[tokio::test]
async fn readme_sql_examples_work() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    for query in README_QUERIES {
        assert!(
            readme.contains(query),
            "README.md no longer shows:\n{query}"
        );
    }
    let url = migrated_database_url().await;
    let registry = PgProcessRegistry::new(connect_pool(&url, 2).unwrap(), RegistryConfig::new("p"));
    let order = ProcessId::new("order-42").unwrap();
    registry
        .register_process(ProcessRegistration::new("steps", json!({})).with_id(order.clone()))
        .await
        .unwrap();
    registry
        .append_events(
            &order,
            vec![
                AppendRequest::new("step", json!({"n": 1})),
                AppendRequest::new("step", json!({"n": 2})),
            ],
        )
        .await
        .unwrap();
    registry
        .complete_process(
            &order,
            Completion::new(TerminalState::Completed, json!("ok")),
        )
        .await
        .unwrap();
    registry
        .register_process(ProcessRegistration::new("steps", json!({})))
        .await
        .unwrap();
    let client = sql_client(&url).await;

    let events = client.query(README_QUERIES[0], &[]).await.unwrap();
    let types: Vec<(i64, String)> = events.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        types,
        [
            (1, "step".to_owned()),
            (2, "step".to_owned()),
            (3, "process.completed".to_owned())
        ]
    );
    let by_status = client.query(README_QUERIES[1], &[]).await.unwrap();
    let counts: Vec<(String, i64)> = by_status.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        counts,
        [("completed".to_owned(), 1), ("pending".to_owned(), 1)]
    );
    let by_type = client.query(README_QUERIES[2], &[]).await.unwrap();
    let counts: Vec<(String, i64)> = by_type.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        counts,
        [("step".to_owned(), 2), ("process.completed".to_owned(), 1)]
    );
}

/// One round trip per append: counted on the server with `pg_stat_statements` (each
/// statement of a warm, prepared connection is one round trip of the extended protocol).
#[tokio::test]
async fn an_append_is_one_statement_on_the_server() {
    let url = migrated_database_url().await;
    let client = sql_client(&url).await;
    let available: bool = client
        .query_one(
            "SELECT current_setting('shared_preload_libraries') LIKE '%pg_stat_statements%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if !available {
        eprintln!("skipped: the server does not preload pg_stat_statements");
        return;
    }
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .unwrap();
    let registry = PgProcessRegistry::new(connect_pool(&url, 1).unwrap(), RegistryConfig::new("p"));
    let process = registry
        .register_process(ProcessRegistration::new("demo", json!(null)))
        .await
        .unwrap();
    // Warm the connection (the first use of a statement also prepares it).
    registry
        .append_event(&process.id, AppendRequest::new("warm", json!(0)))
        .await
        .unwrap();
    let database: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    let count_appends = "SELECT coalesce(sum(calls), 0)::bigint, count(*)
           FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
          WHERE d.datname = $1 AND s.query NOT LIKE '%pg_stat_statements%'
            AND s.query NOT LIKE 'SELECT current_database()%'";
    client
        .execute("SELECT pg_stat_statements_reset()", &[])
        .await
        .unwrap();
    for n in 1..=50 {
        registry
            .append_event(&process.id, AppendRequest::new("step", json!(n)))
            .await
            .unwrap();
    }
    let row = client.query_one(count_appends, &[&database]).await.unwrap();
    let (calls, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(
        (calls, distinct),
        (50, 1),
        "50 appends are 50 executions of one statement, nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_role_can_read_every_table_and_write_none() {
    let url = migrated_database_url().await;
    let admin = sql_client(&url).await;
    let role = format!("reader_{}", uuid::Uuid::new_v4().simple());
    let pool = connect_pool(&url, 1).unwrap();
    let missing = proclog::pg::grant_reader(&pool, &role).await;
    assert!(
        matches!(missing, Err(ProcessError::InvalidInput(_))),
        "{missing:?}"
    );
    let bad_name = proclog::pg::grant_reader(&pool, "x\"; DROP TABLE proclog.events; --").await;
    assert!(
        matches!(bad_name, Err(ProcessError::InvalidInput(_))),
        "{bad_name:?}"
    );
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN"))
        .await
        .unwrap();
    proclog::pg::grant_reader(&pool, &role).await.unwrap();
    proclog::pg::grant_reader(&pool, &role).await.unwrap(); // idempotent
    let registry = PgProcessRegistry::new(pool.clone(), RegistryConfig::new("w"));
    let id = ProcessId::new("read-me").unwrap();
    registry
        .register_process(ProcessRegistration::new("k", json!({})).with_id(id.clone()))
        .await
        .unwrap();
    registry
        .append_event(&id, AppendRequest::new("t", json!(1)))
        .await
        .unwrap();
    let mut reader_config: tokio_postgres::Config = url.parse().unwrap();
    reader_config.user(&role);
    let (reader, connection) = reader_config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("the reader logs in");
    tokio::spawn(connection);
    let events: i64 = reader
        .query_one("SELECT count(*) FROM proclog.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 1);
    for table in ["processes", "events", "schema_migrations", "readers"] {
        reader
            .query(&format!("SELECT * FROM proclog.{table} LIMIT 1"), &[])
            .await
            .unwrap_or_else(|err| panic!("{table}: {err}"));
    }
    for write in [
        "DELETE FROM proclog.events",
        "UPDATE proclog.processes SET status = 'failed'",
        "INSERT INTO proclog.readers VALUES ('x')",
        "SELECT * FROM proclog.append_events('read-me', 'r', NULL, ARRAY['t'], ARRAY['1'::jsonb], NULL)",
    ] {
        let refused = reader.batch_execute(write).await;
        assert!(refused.is_err(), "{write} was allowed");
    }
    let after: i64 = admin
        .query_one("SELECT count(*) FROM proclog.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, 1);
    // A table added later (by the role that granted, which is the one that migrates) is
    // readable at once.
    admin
        .batch_execute("CREATE TABLE proclog.later (x int)")
        .await
        .unwrap();
    reader
        .query("SELECT * FROM proclog.later", &[])
        .await
        .expect("a table added later is readable");
    let refused = reader
        .batch_execute("INSERT INTO proclog.later VALUES (1)")
        .await;
    assert!(refused.is_err());
}

/// A prune deletes in bounded batches, each its own transaction: at most 1,000 processes
/// and 50,000 events; a longer log is deleted in slices, then its row. Rows locked by someone
/// else are skipped, not waited for. Triggers of the test's own record each DELETE
/// statement's transaction and what it deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prune_deletes_in_bounded_batches_of_their_own() {
    use futures::StreamExt;
    let url = migrated_database_url().await;
    let pool = connect_pool(&url, 8).unwrap();
    let registry = std::sync::Arc::new(PgProcessRegistry::new(pool, RegistryConfig::new("pruner")));
    let ended = |registry: std::sync::Arc<PgProcessRegistry>, events: usize| async move {
        let record = registry
            .register_process(ProcessRegistration::new("retention", json!(null)))
            .await
            .unwrap();
        for chunk in (0..events).collect::<Vec<_>>().chunks(10_000) {
            let batch = chunk
                .iter()
                .map(|n| AppendRequest::new("test.filler", json!(n)))
                .collect();
            registry.append_events(&record.id, batch).await.unwrap();
        }
        registry
            .complete_process(
                &record.id,
                Completion::new(TerminalState::Completed, json!(null)),
            )
            .await
            .unwrap();
        record.id
    };
    // Two big logs first (oldest), then 2,100 small ones: 2 + 1 + 1,000 + 1,000 + 100.
    let big = [
        ended(registry.clone(), 60_000).await,
        ended(registry.clone(), 60_000).await,
    ];
    let small: Vec<ProcessId> = futures::stream::iter(0..2_100)
        .map(|_| ended(registry.clone(), 1))
        .buffer_unordered(8)
        .collect()
        .await;
    let client = sql_client(&url).await;
    let cutoff: chrono::DateTime<chrono::Utc> =
        client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    // Kept: one that ended after the cutoff, one that has not ended.
    let later = ended(registry.clone(), 1).await;
    let live = registry
        .register_process(ProcessRegistration::new("retention", json!(null)))
        .await
        .unwrap()
        .id;
    client
        .batch_execute(
            "CREATE TABLE public.prune_batches (txid bigint, processes bigint, events bigint);
             CREATE FUNCTION public.note_prune_batch() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO public.prune_batches
                 SELECT txid_current(), count(*), coalesce(sum(last_seq), 0) FROM old_rows;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER note_prune_batch AFTER DELETE ON proclog.processes
                 REFERENCING OLD TABLE AS old_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION public.note_prune_batch();
             CREATE TABLE public.pruned_events (txid bigint, events bigint);
             CREATE FUNCTION public.note_pruned_events() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO public.pruned_events SELECT txid_current(), count(*) FROM old_rows;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER note_pruned_events AFTER DELETE ON proclog.events
                 REFERENCING OLD TABLE AS old_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION public.note_pruned_events();",
        )
        .await
        .unwrap();

    // Someone holds one of the small processes' rows: the prune goes round it.
    let mut holder = sql_client(&url).await;
    let holding = holder.transaction().await.unwrap();
    holding
        .execute(
            "SELECT 1 FROM proclog.processes WHERE process_id = $1 FOR UPDATE",
            &[&small[0].as_str()],
        )
        .await
        .unwrap();
    let report = registry.prune_terminal_processes(cutoff).await.unwrap();
    // A log is its appends and its terminal event (registration writes none).
    assert_eq!(report.processes, 2 + 2_099);
    assert_eq!(report.events, 2 * 60_001 + 2_099 * 2);
    assert!(registry.get_process(&small[0]).await.unwrap().is_some());
    holding.rollback().await.unwrap();
    let report = registry.prune_terminal_processes(cutoff).await.unwrap();
    assert_eq!(
        (report.processes, report.events),
        (1, 2),
        "the held one, once free"
    );
    let per_transaction: Vec<i64> = client
        .query(
            "SELECT sum(events)::bigint FROM public.pruned_events GROUP BY txid",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        per_transaction.iter().all(|&events| events <= 50_000),
        "no transaction deletes more than 50,000 events: {per_transaction:?}"
    );
    assert_eq!(
        per_transaction.iter().sum::<i64>(),
        2 * 60_001 + 2_100 * 2,
        "every pruned event is counted once"
    );
    let batches: Vec<(i64, i64, i64)> = client
        .query(
            "SELECT txid, processes, events FROM public.prune_batches ORDER BY txid",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let txids: std::collections::HashSet<i64> = batches.iter().map(|b| b.0).collect();
    assert_eq!(txids.len(), batches.len(), "one transaction per batch");
    let deleting: Vec<(i64, i64)> = batches
        .iter()
        .filter(|b| b.1 > 0)
        .map(|b| (b.1, b.2))
        .collect();
    assert_eq!(
        deleting,
        vec![
            (1, 60_001),
            (1, 60_001),
            (1_000, 2_000),
            (1_000, 2_000),
            (99, 198),
            (1, 2)
        ],
        "the long logs' rows alone (their events sliced before), batches of 1,000, the held one"
    );
    for id in big.iter().chain(&small) {
        assert!(registry.get_process(id).await.unwrap().is_none(), "{id}");
    }
    for id in [&later, &live] {
        assert!(registry.get_process(id).await.unwrap().is_some(), "{id}");
    }
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM proclog.events WHERE process_id <> ALL ($1)",
            &[&vec![later.as_str(), live.as_str()]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the pruned logs went with their processes");
}
