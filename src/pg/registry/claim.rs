//! How `claim_runnable` takes work: one statement that locks its candidates, or (where the
//! table is distributed and rows of several shards cannot be locked in one statement) a scan
//! without locks, then a statement on each chosen process's own row.

use std::time::Duration;

use super::{PgProcessRegistry, ttl_millis};
use crate::error::ProcessResult;
use crate::pg::convert::process_columns;

/// How [`crate::ProcessRegistry::claim_runnable`] takes work. Both give the same guarantees:
/// a process is claimed by one pod at a time (each claim is a conditional update of its row
/// under its row lock), overdue deadlines first, then runnable work in the order it became
/// runnable; a row another claimer holds is skipped, never waited for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimStrategy {
    /// [`ClaimStrategy::PerProcess`] when `proclog.processes` is a Citus distributed table
    /// (read once, at the first call that needs to know; taken as distributed when that
    /// cannot be read), else [`ClaimStrategy::OneStatement`]. The default.
    Detect,
    /// One statement picks the candidates with `FOR UPDATE SKIP LOCKED` and claims them:
    /// one round trip on a single Postgres.
    OneStatement,
    /// A scan without locks picks up to twice `limit` candidates, in claim order; each is
    /// then claimed by a statement on its own row (`FOR UPDATE SKIP LOCKED`, its claimable
    /// conditions checked again under the lock), until `limit` are claimed. Every statement
    /// but the scan runs on one shard.
    PerProcess,
}

/// Claims one chosen process if it is still claimable: `$1` owner, `$2` TTL in
/// milliseconds, `$3` process id, `$4` the new lease token. The same conditions and updates
/// as the one-statement claim, for one row.
pub(super) const CLAIM_ONE: &str = concat!(
    "WITH candidate AS (
         SELECT process_id AS candidate_id, lease_owner AS old_owner,
                lease_generation AS old_generation, lease_expires_at AS old_expires_at,
                status AS old_status, attempts AS old_attempts
           FROM proclog.processes
          WHERE process_id = $3 AND terminal_state IS NULL
            AND (lease_expires_at IS NULL OR lease_expires_at <= now())
            AND (deadline <= now()
                 OR (disposition <> 'external' AND coalesce(wake_at, created_at) <= now()))
            FOR UPDATE SKIP LOCKED)
     UPDATE proclog.processes
        SET lease_owner = $1,
            lease_token = $4,
            lease_generation = lease_generation + 1,
            lease_expires_at = now() + $2::bigint * interval '1 millisecond',
            status = 'running',
            attempts = attempts + CASE WHEN old_status = 'waiting'
                                        AND old_attempts > 0 THEN 0 ELSE 1 END,
            wake_at = NULL,
            waiting_for = NULL,
            updated_at = now()
       FROM candidate
      WHERE process_id = $3 AND process_id = candidate_id
  RETURNING ",
    process_columns!(),
    ", lease_token, old_owner, old_generation, old_expires_at,
       (old_status = 'waiting' AND old_attempts > 0) AS resumed"
);

impl PgProcessRegistry {
    /// The strategy in force: the configured one, or the one the tables' layout calls for.
    pub(super) async fn claim_strategy(&self) -> ClaimStrategy {
        match self.claims {
            ClaimStrategy::Detect if self.distributed().await => ClaimStrategy::PerProcess,
            ClaimStrategy::Detect => ClaimStrategy::OneStatement,
            configured => configured,
        }
    }

    /// Whether `proclog.processes` is a Citus distributed table, read once and kept. While
    /// it cannot be read (the database unreachable), a call takes it as distributed, which is
    /// right on a single Postgres too, and the next call reads again.
    pub(in crate::pg) async fn distributed(&self) -> bool {
        match self
            .distributed
            .get_or_try_init(|| self.processes_are_distributed())
            .await
        {
            Ok(distributed) => *distributed,
            Err(err) => {
                tracing::debug!(error = %err, "cannot tell yet whether the tables are distributed");
                true
            }
        }
    }

    /// Whether `proclog.processes` is a Citus distributed table.
    async fn processes_are_distributed(&self) -> ProcessResult<bool> {
        let rows = self
            .query(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')",
                &[],
            )
            .await?;
        let citus: bool = rows.first().is_some_and(|row| row.get(0));
        if !citus {
            return Ok(false);
        }
        let rows = self
            .query(
                "SELECT EXISTS (SELECT 1 FROM pg_dist_partition
                                 WHERE logicalrelid = 'proclog.processes'::regclass)",
                &[],
            )
            .await?;
        Ok(rows.first().is_some_and(|row| row.get(0)))
    }

    /// Claims up to `limit` processes in claim order, with the strategy in force: those past
    /// their deadline in any queue (a claim that only fails them, whatever the limits), then
    /// runnable ones outside the `controlled` queues.
    pub(super) async fn claim_uncontrolled(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
        controlled: &[String],
    ) -> ProcessResult<Vec<tokio_postgres::Row>> {
        if self.claim_strategy().await == ClaimStrategy::PerProcess {
            return self
                .claim_runnable_per_process(owner, ttl, limit, controlled)
                .await;
        }
        let rows = self
            .query(
                concat!(
                    "WITH overdue AS (
                         SELECT process_id AS candidate_id, lease_owner AS old_owner,
                                lease_generation AS old_generation,
                                lease_expires_at AS old_expires_at,
                                status AS old_status, attempts AS old_attempts
                           FROM proclog.processes
                          WHERE terminal_state IS NULL AND deadline <= now()
                            AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                          ORDER BY deadline
                          LIMIT $3
                            FOR UPDATE SKIP LOCKED),
                     runnable AS (
                         SELECT process_id, lease_owner, lease_generation, lease_expires_at,
                                status, attempts
                           FROM proclog.processes
                          WHERE terminal_state IS NULL AND disposition <> 'external'
                            AND coalesce(wake_at, created_at) <= now()
                            AND (deadline IS NULL OR deadline > now())
                            AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                            AND coalesce(queue, kind) <> ALL ($4::text[])
                          ORDER BY coalesce(wake_at, created_at), process_id
                          LIMIT $3
                            FOR UPDATE SKIP LOCKED),
                     candidates AS (
                         SELECT * FROM overdue
                         UNION ALL SELECT * FROM runnable
                         LIMIT $3)
                     UPDATE proclog.processes
                        SET lease_owner = $1,
                            lease_token = gen_random_uuid(),
                            lease_generation = lease_generation + 1,
                            lease_expires_at = now() + $2::bigint * interval '1 millisecond',
                            status = 'running',
                            attempts = attempts + CASE WHEN old_status = 'waiting'
                                                        AND old_attempts > 0 THEN 0 ELSE 1 END,
                            wake_at = NULL,
                            waiting_for = NULL,
                            updated_at = now()
                       FROM candidates
                      WHERE process_id = candidate_id
                  RETURNING ",
                    process_columns!(),
                    ", lease_token, old_owner, old_generation,
                            old_expires_at,
                            (old_status = 'waiting' AND old_attempts > 0) AS resumed"
                ),
                &[&owner, &ttl_millis(ttl), &i64::from(limit), &controlled],
            )
            .await?;
        Ok(rows)
    }

    /// [`ClaimStrategy::PerProcess`].
    pub(super) async fn claim_runnable_per_process(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
        controlled: &[String],
    ) -> ProcessResult<Vec<tokio_postgres::Row>> {
        let scan = i64::from(limit) * 2;
        let mut candidates: Vec<String> = self
            .query(
                "SELECT process_id FROM proclog.processes
                  WHERE terminal_state IS NULL AND deadline <= now()
                    AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                  ORDER BY deadline, process_id
                  LIMIT $1",
                &[&scan],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if candidates.len() < limit as usize {
            let runnable = self
                .query(
                    "SELECT process_id FROM proclog.processes
                      WHERE terminal_state IS NULL AND disposition <> 'external'
                        AND coalesce(wake_at, created_at) <= now()
                        AND (deadline IS NULL OR deadline > now())
                        AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                        AND coalesce(queue, kind) <> ALL ($2::text[])
                      ORDER BY coalesce(wake_at, created_at), process_id
                      LIMIT $1",
                    &[&scan, &controlled],
                )
                .await?;
            for row in &runnable {
                let id: String = row.get(0);
                if !candidates.contains(&id) {
                    candidates.push(id);
                }
            }
        }
        let mut rows = Vec::with_capacity(limit as usize);
        for id in &candidates {
            if rows.len() >= limit as usize {
                break;
            }
            let token = uuid::Uuid::new_v4();
            match self
                .query(CLAIM_ONE, &[&owner, &ttl_millis(ttl), id, &token])
                .await
            {
                Ok(claimed) => rows.extend(claimed),
                // What is claimed already is answered (a lost answer would strand it until
                // its lease lapses); the failure is the answer only when nothing was.
                Err(err) if rows.is_empty() => return Err(err),
                Err(err) => {
                    tracing::debug!(error = %err, "a claim failed; answering the claims made");
                    break;
                }
            }
        }
        Ok(rows)
    }
}
