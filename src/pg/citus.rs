//! proclog on Citus: detected, not configured. A database whose `citus` extension is
//! installed, reached on its coordinator, gets `processes` and `events` distributed by
//! process id, co-located (every statement on one process then runs on one shard, with its
//! triggers firing there); `pods` becomes a reference table (replicated to every node, as
//! the pods view joins it with `processes`); `readers`, `writers` and `schema_migrations`
//! stay on the coordinator. The functions that write one process under its row lock
//! ([`DELEGATED_FUNCTIONS`]) are distributed by their process id, so that Citus delegates
//! each call whole to the worker holding the process's shard. [`crate::pg::migrate()`] does
//! it after the migrations, once, under the migration lock; a plain Postgres is left alone.
//!
//! A delegated call evaluates `now()` on its worker, a router statement on the coordinator:
//! lease expiry is compared on both, so the nodes' clocks must agree (NTP), as the pods'
//! clocks need not agree with them.

use deadpool_postgres::Pool;

use super::convert::{db_error, pool_error};
use super::migrate::MigrationError;

/// The tables distributed by process id, in order (the first is the co-location anchor).
pub const DISTRIBUTED_TABLES: &[&str] = &["proclog.processes", "proclog.events"];

/// The small tables joined with distributed ones, replicated to every node (Citus reference
/// tables): `pods` (the view `pod_status` counts each pod's leases in `processes`).
pub const REFERENCE_TABLES: &[&str] = &["proclog.pods"];

/// The functions on one process (their first argument, `p_process_id`), distributed by it
/// and co-located with [`DISTRIBUTED_TABLES`]: a call is delegated to the worker holding that
/// process's shard and runs there whole, its row locks never held across a round trip to
/// the coordinator.
pub const DELEGATED_FUNCTIONS: &[&str] = &[
    "proclog.append_unkeyed(text, text, uuid, text[], jsonb[])",
    "proclog.append_events(text, text, uuid, text[], jsonb[], text[])",
    "proclog.complete_process(text, text, uuid, text, jsonb)",
    "proclog.suspend_process(text, text, uuid, text, timestamptz, bigint, text, bigint, boolean, jsonb)",
    "proclog.write_refusal(text)",
    "proclog.refuse_write(text)",
];

/// What [`distribute`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CitusLayout {
    /// The database is a Citus coordinator (the extension is installed and this node is the
    /// coordinator).
    pub coordinator: bool,
    /// [`DISTRIBUTED_TABLES`] are distributed after the run.
    pub distributed: bool,
    /// Tables distributed or replicated by this run ([`DISTRIBUTED_TABLES`],
    /// [`REFERENCE_TABLES`]; empty when they were already, or on a plain Postgres).
    pub distributed_now: Vec<String>,
    /// [`DELEGATED_FUNCTIONS`] distributed by this run (empty when they were already).
    pub delegated_now: Vec<String>,
}

/// Distributes [`DISTRIBUTED_TABLES`] when the database is a Citus coordinator and they are
/// not distributed yet. Idempotent and safe from many pods at once (the migration lock).
pub(crate) async fn distribute(pool: &Pool, lock_key: i64) -> Result<CitusLayout, MigrationError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let coordinator: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await
        .map_err(db_error)?
        .get(0);
    if !coordinator {
        return Ok(CitusLayout::default());
    }
    let coordinator: bool = client
        .query_one("SELECT citus_is_coordinator()", &[])
        .await
        .map_err(db_error)?
        .get(0);
    if !coordinator {
        return Ok(CitusLayout::default());
    }
    let mut layout = CitusLayout {
        coordinator: true,
        distributed: true,
        ..CitusLayout::default()
    };
    let tx = client.transaction().await.map_err(db_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key])
        .await
        .map_err(db_error)?;
    // The row rules and the state triggers fire on the shards (see migration 0010).
    tx.batch_execute("SET LOCAL citus.enable_unsafe_triggers = on")
        .await
        .map_err(db_error)?;
    for table in DISTRIBUTED_TABLES {
        let distributed: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_dist_partition
                                 WHERE logicalrelid = $1::text::regclass)",
                &[table],
            )
            .await
            .map_err(db_error)?
            .get(0);
        if distributed {
            continue;
        }
        tx.execute(
            "SELECT create_distributed_table($1::text::regclass, 'process_id',
                                             colocate_with => $2)",
            &[
                table,
                &if *table == DISTRIBUTED_TABLES[0] {
                    "default"
                } else {
                    DISTRIBUTED_TABLES[0]
                },
            ],
        )
        .await
        .map_err(db_error)?;
        tracing::info!(table, "distributed by process_id on Citus");
        layout.distributed_now.push((*table).to_owned());
    }
    for table in REFERENCE_TABLES {
        let placed: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_dist_partition
                                 WHERE logicalrelid = $1::text::regclass)",
                &[table],
            )
            .await
            .map_err(db_error)?
            .get(0);
        if !placed {
            tx.execute(
                "SELECT create_reference_table($1::text::regclass)",
                &[table],
            )
            .await
            .map_err(db_error)?;
            tracing::info!(table, "replicated to every node (a Citus reference table)");
            layout.distributed_now.push((*table).to_owned());
        }
    }
    tx.commit().await.map_err(db_error)?;
    // In a transaction of its own: Citus refuses function commands after the parallel
    // operations of create_distributed_table in the same transaction.
    let tx = client.transaction().await.map_err(db_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key])
        .await
        .map_err(db_error)?;
    for function in DELEGATED_FUNCTIONS {
        let delegated: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_dist_object
                                 WHERE classid = 'pg_proc'::regclass
                                   AND objid = $1::text::regprocedure
                                   AND distribution_argument_index = 0)",
                &[function],
            )
            .await
            .map_err(db_error)?
            .get(0);
        if !delegated {
            tx.execute(
                "SELECT create_distributed_function($1::text::regprocedure, '$1',
                                                 colocate_with => $2::text)",
                &[function, &DISTRIBUTED_TABLES[0]],
            )
            .await
            .map_err(db_error)?;
            tracing::info!(function, "delegated to the worker of its process on Citus");
            layout.delegated_now.push((*function).to_owned());
        }
        // Citus makes the workers' copies with the coordinator's grants but not its revokes:
        // PUBLIC would keep EXECUTE there. Revoked again, and Citus carries it to every node.
        tx.batch_execute(&format!("REVOKE ALL ON FUNCTION {function} FROM PUBLIC"))
            .await
            .map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)?;
    Ok(layout)
}
