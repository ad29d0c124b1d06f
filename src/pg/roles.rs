//! Who may do what in the `proclog` schema: `proclog grant-reader ROLE` and
//! `proclog grant-writer ROLE`.
//!
//! - The **owner** runs the migrations and owns every table and function.
//! - A **writer** (the pods' role) may read every table and write exactly what proclog's
//!   statements write ([`WRITER_TABLE_PRIVILEGES`], [`WRITER_FUNCTIONS`]); it cannot create,
//!   alter, drop or truncate anything, nor add triggers.
//! - A **reader** may `SELECT` from every table and nothing else: no write, no function.
//!
//! PUBLIC may execute no proclog function (schema version 7, and again after every
//! migration). Both kinds of role are recorded (`proclog.readers`, `proclog.writers`) and
//! granted again after every migration, so tables and functions added later are covered.

use deadpool_postgres::{Pool, Transaction};

use super::convert::{db_error, pool_error};
use crate::error::ProcessError;

/// SQLSTATE of "role does not exist".
const UNDEFINED_OBJECT: &str = "42704";

/// The table privileges of a writer beyond `SELECT` on every table: registration, appends,
/// claims, renewals, completion and prune write `processes` and `events` (prune deletes a
/// log through the statement trigger `processes_delete_events`, which runs with the caller's
/// rights); presence writes `pods`; starts under a policy write `start_keys`; schedules
/// (created, paused, produced over HTTP and by pods) write `schedules`; queue limits (set over
/// HTTP) and claims of controlled queues (their round-robin cursor, their recent starts)
/// write `queues` and `queue_starts`.
pub const WRITER_TABLE_PRIVILEGES: &[(&str, &str)] = &[
    ("proclog.processes", "INSERT, UPDATE, DELETE"),
    ("proclog.events", "INSERT, DELETE"),
    ("proclog.pods", "INSERT, UPDATE, DELETE"),
    ("proclog.start_keys", "INSERT, UPDATE, DELETE"),
    ("proclog.schedules", "INSERT, UPDATE, DELETE"),
    ("proclog.queues", "INSERT, UPDATE, DELETE"),
    ("proclog.queue_starts", "INSERT, DELETE"),
];

/// The functions proclog's statements call (trigger functions need no grant: a trigger runs
/// its function whoever fires it).
pub const WRITER_FUNCTIONS: &[&str] = &[
    "proclog.fence_holds(uuid, uuid, timestamptz)",
    "proclog.refuse_write(text)",
    "proclog.write_refusal(text)",
    "proclog.append_events(text, text, uuid, text[], jsonb[], text[])",
    "proclog.append_unkeyed(text, text, uuid, text[], jsonb[])",
    "proclog.append_group(text, text[], uuid[], int[], int[], text[], jsonb[], text[])",
    "proclog.complete_process(text, text, uuid, text, jsonb)",
    "proclog.suspend_process(text, text, uuid, text, timestamptz, bigint, text, bigint, boolean, jsonb)",
    "proclog.start_process(text, text, jsonb, text, timestamptz, bigint, timestamptz, bigint, jsonb, text, text, text, text, bigint, boolean, text, text, smallint)",
];

/// Which rights a role is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `SELECT` on every table.
    Reader,
    /// What a pod needs: see [`WRITER_TABLE_PRIVILEGES`] and [`WRITER_FUNCTIONS`].
    Writer,
}

impl Access {
    fn table(self) -> &'static str {
        match self {
            Access::Reader => "proclog.readers",
            Access::Writer => "proclog.writers",
        }
    }

    /// The GRANT statements for `role` (already checked by [`check_role_name`]).
    fn grants(self, role: &str) -> String {
        let mut sql = format!(
            "GRANT USAGE ON SCHEMA proclog TO \"{role}\";
             GRANT SELECT ON ALL TABLES IN SCHEMA proclog TO \"{role}\";"
        );
        if self == Access::Writer {
            for (table, privileges) in WRITER_TABLE_PRIVILEGES {
                sql.push_str(&format!("GRANT {privileges} ON {table} TO \"{role}\";"));
            }
            for function in WRITER_FUNCTIONS {
                sql.push_str(&format!(
                    "GRANT EXECUTE ON FUNCTION {function} TO \"{role}\";"
                ));
            }
        }
        sql
    }
}

/// A role name proclog accepts: 1 to 63 characters from `[A-Za-z0-9_]`, not starting with a
/// digit (an unquoted Postgres identifier; it is quoted anyway).
pub fn check_role_name(role: &str) -> Result<(), ProcessError> {
    let ok = (1..=63).contains(&role.len())
        && role.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !role.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ProcessError::InvalidInput(format!(
            "role name {role:?} must be 1 to 63 characters from [A-Za-z0-9_], not starting with a digit"
        )))
    }
}

/// Grants `role` (which must exist) read-only access to the proclog schema. Idempotent.
/// Run it as the role that migrates: tables added later are readable too, by default
/// privileges when that role creates them, and in any case because the role is recorded and
/// every migration grants it the schema's tables again.
pub async fn grant_reader(pool: &Pool, role: &str) -> Result<(), ProcessError> {
    grant(pool, role, Access::Reader).await
}

/// Grants `role` (which must exist) what a pod needs and nothing more: `SELECT` on every
/// table, the writes of [`WRITER_TABLE_PRIVILEGES`] and `EXECUTE` on [`WRITER_FUNCTIONS`].
/// The role cannot change the schema: pods running as it find the schema current (or wait
/// for the owner to migrate it). Idempotent; run it as the role that migrates.
pub async fn grant_writer(pool: &Pool, role: &str) -> Result<(), ProcessError> {
    grant(pool, role, Access::Writer).await
}

/// Grants `role` (which must exist) the rights of `access`; see [`grant_reader`] and
/// [`grant_writer`]. Idempotent.
pub async fn grant(pool: &Pool, role: &str, access: Access) -> Result<(), ProcessError> {
    check_role_name(role)?;
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(db_error)?;
    // Concurrent GRANTs on one object fail ("tuple concurrently updated"): grants take
    // turns, with each other and with migrations (which grant again).
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&super::migrate::MIGRATION_LOCK_KEY],
    )
    .await
    .map_err(db_error)?;
    let mut grants = access.grants(role);
    if access == Access::Reader {
        grants.push_str(&format!(
            "ALTER DEFAULT PRIVILEGES IN SCHEMA proclog GRANT SELECT ON TABLES TO \"{role}\";"
        ));
    }
    if let Err(err) = tx.batch_execute(&grants).await {
        if err.code().map(|c| c.code()) == Some(UNDEFINED_OBJECT) {
            return Err(ProcessError::InvalidInput(format!(
                "role {role:?} does not exist: create it first (CREATE ROLE {role} LOGIN PASSWORD '...')"
            )));
        }
        return Err(db_error(err));
    }
    tx.execute(
        &format!(
            "INSERT INTO {} (role_name) VALUES ($1) ON CONFLICT DO NOTHING",
            access.table()
        ),
        &[&role],
    )
    .await
    .map_err(db_error)?;
    tx.commit().await.map_err(db_error)
}

/// After migrations: takes from PUBLIC the right to execute any proclog function (new ones
/// included, whoever created them), and grants every recorded reader and writer its rights
/// again (on the tables and functions the migrations added). Roles dropped since are skipped.
pub(crate) async fn reapply_privileges(tx: &Transaction<'_>) -> Result<(), ProcessError> {
    tx.batch_execute("REVOKE ALL ON ALL FUNCTIONS IN SCHEMA proclog FROM PUBLIC")
        .await
        .map_err(db_error)?;
    for access in [Access::Reader, Access::Writer] {
        let roles = tx
            .query(
                &format!(
                    "SELECT r.role_name FROM {} r JOIN pg_roles g ON g.rolname = r.role_name",
                    access.table()
                ),
                &[],
            )
            .await
            .map_err(db_error)?;
        for row in roles {
            let role: String = row.get(0);
            if check_role_name(&role).is_err() {
                continue;
            }
            tx.batch_execute(&access.grants(&role))
                .await
                .map_err(db_error)?;
        }
    }
    Ok(())
}
