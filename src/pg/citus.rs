//! proclog on Citus: detected, not configured. A database whose `citus` extension is
//! installed, reached on its coordinator, gets `processes` and `events` distributed by
//! process id, co-located (every statement on one process then runs on one shard, with its
//! triggers firing there); `pods` becomes a reference table (replicated to every node, as
//! the pods view joins it with `processes`); `readers`, `writers` and `schema_migrations`
//! stay on the coordinator. [`crate::pg::migrate()`] does it after the
//! migrations, once, under the migration lock; a plain Postgres is left alone.

use deadpool_postgres::Pool;

use super::convert::{db_error, pool_error};
use super::migrate::MigrationError;

/// The tables distributed by process id, in order (the first is the co-location anchor).
pub const DISTRIBUTED_TABLES: &[&str] = &["proclog.processes", "proclog.events"];

/// The small tables joined with distributed ones, replicated to every node (Citus reference
/// tables): `pods` (the view `pod_status` counts each pod's leases in `processes`).
pub const REFERENCE_TABLES: &[&str] = &["proclog.pods"];

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
        distributed_now: Vec::new(),
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
    Ok(layout)
}
