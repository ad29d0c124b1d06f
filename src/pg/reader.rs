//! Read-only access for people: `proclog grant-reader ROLE`.
//!
//! A reader role may `SELECT` from every table of the `proclog` schema, now and after later
//! migrations, and nothing else: it cannot write a table, and the schema's functions run with
//! the caller's rights (`SECURITY INVOKER`), so calling them writes nothing either.

use deadpool_postgres::Pool;

use super::convert::{db_error, pool_error};
use crate::error::ProcessError;

/// SQLSTATE of "role does not exist".
const UNDEFINED_OBJECT: &str = "42704";

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

/// Grants `role` (which must exist) read-only access to the proclog schema and returns.
/// Idempotent. Tables added later are readable too: by default privileges when they are
/// created by the role that ran this (run it as the role that migrates), and in any case
/// because the role is recorded and every migration grants it the schema's tables again.
pub async fn grant_reader(pool: &Pool, role: &str) -> Result<(), ProcessError> {
    check_role_name(role)?;
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(db_error)?;
    // Concurrent GRANTs on one object fail ("tuple concurrently updated"): pods starting
    // together take turns, with each other and with migrations (which grant again).
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&super::migrate::MIGRATION_LOCK_KEY],
    )
    .await
    .map_err(db_error)?;
    let grants = format!(
        "GRANT USAGE ON SCHEMA proclog TO \"{role}\";
         GRANT SELECT ON ALL TABLES IN SCHEMA proclog TO \"{role}\";
         ALTER DEFAULT PRIVILEGES IN SCHEMA proclog GRANT SELECT ON TABLES TO \"{role}\";"
    );
    if let Err(err) = tx.batch_execute(&grants).await {
        if err.code().map(|c| c.code()) == Some(UNDEFINED_OBJECT) {
            return Err(ProcessError::InvalidInput(format!(
                "role {role:?} does not exist: create it first (CREATE ROLE {role} LOGIN PASSWORD '...')"
            )));
        }
        return Err(db_error(err));
    }
    tx.execute(
        "INSERT INTO proclog.readers (role_name) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&role],
    )
    .await
    .map_err(db_error)?;
    tx.commit().await.map_err(db_error)
}

/// Grants every recorded reader `SELECT` on every proclog table again (after migrations added
/// tables). Roles that were dropped since are skipped.
pub(crate) async fn regrant_readers(
    tx: &deadpool_postgres::Transaction<'_>,
) -> Result<(), ProcessError> {
    let roles = tx
        .query(
            "SELECT r.role_name FROM proclog.readers r
               JOIN pg_roles g ON g.rolname = r.role_name",
            &[],
        )
        .await
        .map_err(db_error)?;
    for row in roles {
        let role: String = row.get(0);
        if check_role_name(&role).is_err() {
            continue;
        }
        tx.batch_execute(&format!(
            "GRANT USAGE ON SCHEMA proclog TO \"{role}\";
             GRANT SELECT ON ALL TABLES IN SCHEMA proclog TO \"{role}\";"
        ))
        .await
        .map_err(db_error)?;
    }
    Ok(())
}
