//! The schema migrator: applies `migrations/*.sql` in order, once, under an advisory lock.
//!
//! Migrations are embedded in the binary. All pending migrations are applied in one
//! transaction that first takes a transaction-scoped advisory lock, so pods starting together
//! apply each migration exactly once and a failed migration leaves nothing behind. A database
//! that records a version this binary does not know is refused.

use deadpool_postgres::Pool;

use super::convert::{db_error, pool_error};
use crate::error::ProcessError;

/// One embedded migration.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Its version (the number its file name starts with), strictly increasing.
    pub version: i32,
    /// Its file name.
    pub name: &'static str,
    /// Its SQL.
    pub sql: &'static str,
}

/// Every migration this binary knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_registry.sql",
        sql: include_str!("../../migrations/0001_registry.sql"),
    },
    Migration {
        version: 2,
        name: "0002_pods.sql",
        sql: include_str!("../../migrations/0002_pods.sql"),
    },
    Migration {
        version: 3,
        name: "0003_readers.sql",
        sql: include_str!("../../migrations/0003_readers.sql"),
    },
    Migration {
        version: 4,
        name: "0004_group_commit.sql",
        sql: include_str!("../../migrations/0004_group_commit.sql"),
    },
    Migration {
        version: 5,
        name: "0005_hot_path.sql",
        sql: include_str!("../../migrations/0005_hot_path.sql"),
    },
    Migration {
        version: 6,
        name: "0006_pod_presence.sql",
        sql: include_str!("../../migrations/0006_pod_presence.sql"),
    },
    Migration {
        version: 7,
        name: "0007_least_privilege.sql",
        sql: include_str!("../../migrations/0007_least_privilege.sql"),
    },
    Migration {
        version: 8,
        name: "0008_process_state.sql",
        sql: include_str!("../../migrations/0008_process_state.sql"),
    },
    Migration {
        version: 9,
        name: "0009_durable_execution.sql",
        sql: include_str!("../../migrations/0009_durable_execution.sql"),
    },
    Migration {
        version: 10,
        name: "0010_citus_shards.sql",
        sql: include_str!("../../migrations/0010_citus_shards.sql"),
    },
    Migration {
        version: 11,
        name: "0011_citus_delegation.sql",
        sql: include_str!("../../migrations/0011_citus_delegation.sql"),
    },
    Migration {
        version: 12,
        name: "0012_children.sql",
        sql: include_str!("../../migrations/0012_children.sql"),
    },
    Migration {
        version: 13,
        name: "0013_start_policies.sql",
        sql: include_str!("../../migrations/0013_start_policies.sql"),
    },
    Migration {
        version: 14,
        name: "0014_schedules.sql",
        sql: include_str!("../../migrations/0014_schedules.sql"),
    },
    Migration {
        version: 15,
        name: "0015_queues.sql",
        sql: include_str!("../../migrations/0015_queues.sql"),
    },
];

/// The schema version this binary expects.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Key of the advisory lock that serialises migrators (any fixed 64-bit number).
pub(crate) const MIGRATION_LOCK_KEY: i64 = 0x7072_6f63_6c6f_6701; // "proclog\x01"

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The database records a schema version newer than this binary knows.
    #[error(
        "the database schema is at version {found}, newer than the {known} this proclog knows: upgrade proclog"
    )]
    SchemaTooNew {
        /// Version recorded in the database.
        found: i32,
        /// Latest version this binary knows.
        known: i32,
    },
    /// The schema needs migrations and the connected role may not apply them (a pod's
    /// writer role): the owner must run `proclog migrate`.
    #[error(
        "the database schema is at version {found} and this proclog needs {known}, but the connected role may not change the schema ({detail}): run `proclog migrate` as the schema's owner"
    )]
    NotOwner {
        /// Version recorded in the database.
        found: i32,
        /// Latest version this binary knows.
        known: i32,
        /// What the database said.
        detail: String,
    },
    /// The database refused or failed.
    #[error(transparent)]
    Database(#[from] ProcessError),
}

/// SQLSTATE of "insufficient privilege".
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// What a migration run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this run (empty when the schema was current).
    pub applied: Vec<i32>,
    /// The schema version after the run.
    pub version: i32,
    /// On a Citus coordinator: the layout, and the tables this run distributed.
    pub citus: super::citus::CitusLayout,
}

/// Applies every pending migration. Safe to call from many pods at once.
///
/// A current schema is recognised with one read, without a lock or any DDL, so a role that
/// may not change the schema (a pod's writer role, see [`crate::pg::roles`]) starts on it.
/// When migrations are pending and the role may not apply them, the answer is
/// [`MigrationError::NotOwner`] and nothing is written.
pub async fn migrate(pool: &Pool) -> Result<MigrationReport, MigrationError> {
    let known = latest_version();
    let current = schema_version(pool).await?;
    if current > known {
        return Err(MigrationError::SchemaTooNew {
            found: current,
            known,
        });
    }
    if current == known {
        return Ok(MigrationReport {
            applied: Vec::new(),
            version: current,
            citus: distribute_if_owner(pool).await?,
        });
    }
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(db_error)?;
    // Any refusal for want of a privilege, at any step, means "not the owner".
    let refused = |found: i32| {
        move |err: tokio_postgres::Error| match err.as_db_error() {
            Some(db) if db.code().code() == INSUFFICIENT_PRIVILEGE => MigrationError::NotOwner {
                found,
                known,
                detail: db.message().to_owned(),
            },
            _ => MigrationError::Database(db_error(err)),
        }
    };
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(db_error)?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS proclog;
         CREATE TABLE IF NOT EXISTS proclog.schema_migrations (
             version    integer     NOT NULL PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now());",
    )
    .await
    .map_err(refused(current))?;
    // Read again under the lock: another migrator may have finished meanwhile.
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM proclog.schema_migrations",
            &[],
        )
        .await
        .map_err(db_error)?
        .get(0);
    if current > known {
        return Err(MigrationError::SchemaTooNew {
            found: current,
            known,
        });
    }
    let mut applied = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        tx.batch_execute(migration.sql)
            .await
            .map_err(refused(current))?;
        tx.execute(
            "INSERT INTO proclog.schema_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await
        .map_err(refused(current))?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied migration"
        );
        applied.push(migration.version);
    }
    if !applied.is_empty() {
        super::roles::reapply_privileges(&tx).await?;
    }
    tx.commit().await.map_err(db_error)?;
    // The pool may hold one connection: hand this one back first.
    drop(client);
    Ok(MigrationReport {
        applied,
        version: current.max(known),
        citus: super::citus::distribute(pool, MIGRATION_LOCK_KEY).await?,
    })
}

/// On a current schema: distributes the tables on a Citus coordinator where they are not
/// yet, when the role may (a pod's writer role may not: then the tables stay as they are,
/// with a warning, and the pod starts).
async fn distribute_if_owner(pool: &Pool) -> Result<super::citus::CitusLayout, MigrationError> {
    match super::citus::distribute(pool, MIGRATION_LOCK_KEY).await {
        Err(MigrationError::Database(ProcessError::Database(message)))
            if message.starts_with(INSUFFICIENT_PRIVILEGE) =>
        {
            tracing::warn!(%message, "the tables are not distributed on this Citus coordinator, and this role may not distribute them: run `proclog migrate` as the schema's owner");
            Ok(super::citus::CitusLayout {
                coordinator: true,
                distributed: false,
                ..Default::default()
            })
        }
        other => other,
    }
}

/// The schema version recorded in the database (0 when proclog was never migrated there).
pub async fn schema_version(pool: &Pool) -> Result<i32, ProcessError> {
    let client = pool.get().await.map_err(pool_error)?;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('proclog.schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(db_error)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM proclog.schema_migrations",
            &[],
        )
        .await
        .map_err(db_error)?;
    Ok(row.get(0))
}
