//! [`Db`]: how proclog runs a statement on a pool: a cached prepared statement (one round trip
//! once warm), errors mapped to [`ProcessError`], and an optional client-side bound on the
//! round trip (past it the call is `Unavailable` and its connection is discarded).

use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::convert::{db_error, pool_error};
use crate::error::{ProcessError, ProcessResult};

/// A pool and the bound on each of its calls. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Db {
    pool: Pool,
    call_timeout: Option<Duration>,
}

impl Db {
    pub(crate) fn new(pool: Pool) -> Self {
        Self {
            pool,
            call_timeout: None,
        }
    }

    pub(crate) fn with_call_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.call_timeout = timeout;
        self
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    pub(crate) fn call_timeout(&self) -> Option<Duration> {
        self.call_timeout
    }

    /// `call` on a pooled connection within the call bound; a call cut by the bound discards
    /// its connection (it may still carry the unanswered statement).
    async fn bounded<T>(
        &self,
        call: impl AsyncFnOnce(&Object) -> ProcessResult<T>,
    ) -> ProcessResult<T> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let Some(limit) = self.call_timeout else {
            return call(&client).await;
        };
        match tokio::time::timeout(limit, call(&client)).await {
            Ok(result) => result,
            Err(_) => {
                drop(Object::take(client));
                Err(ProcessError::Unavailable(format!(
                    "no answer from the database within {limit:?}"
                )))
            }
        }
    }

    /// `call` in a transaction that begins once this session holds the session-level
    /// advisory lock `key` (waiting at most `lock_wait`), committed when it returns `Ok`; the
    /// lock is released only after the commit has returned (on Citus, after the workers'
    /// commits too), so the next holder sees everything this one wrote. The whole is within
    /// the call bound; after any failure the connection is discarded, which releases the lock.
    pub(crate) async fn transaction_under_lock<T>(
        &self,
        key: i64,
        lock_wait: Duration,
        call: impl AsyncFnOnce(&deadpool_postgres::Transaction<'_>) -> ProcessResult<T>,
    ) -> ProcessResult<T> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let outcome = {
            let work = async {
                client
                    .batch_execute(&format!("SET lock_timeout = {}", lock_wait.as_millis()))
                    .await
                    .map_err(db_error)?;
                client
                    .execute("SELECT pg_advisory_lock($1)", &[&key])
                    .await
                    .map_err(db_error)?;
                client
                    .batch_execute("RESET lock_timeout")
                    .await
                    .map_err(db_error)?;
                let tx = client.transaction().await.map_err(db_error)?;
                let result = call(&tx).await?;
                tx.commit().await.map_err(db_error)?;
                client
                    .execute("SELECT pg_advisory_unlock($1)", &[&key])
                    .await
                    .map_err(db_error)?;
                Ok(result)
            };
            match self.call_timeout {
                None => work.await,
                Some(limit) => tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
                    Err(ProcessError::Unavailable(format!(
                        "no answer from the database within {limit:?}"
                    )))
                }),
            }
        };
        if outcome.is_err() {
            drop(Object::take(client));
        }
        outcome
    }

    /// Runs `sql`, mapping a database error with `on_error` and a pool failure to
    /// `Unavailable`.
    pub(crate) async fn run(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        on_error: impl FnOnce(tokio_postgres::Error) -> ProcessError,
    ) -> ProcessResult<Vec<Row>> {
        self.bounded(async |client: &Object| {
            let statement = client.prepare_cached(sql).await.map_err(db_error)?;
            client.query(&statement, params).await.map_err(on_error)
        })
        .await
    }

    /// [`Self::run`] for statements whose errors carry no process-specific meaning.
    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> ProcessResult<Vec<Row>> {
        self.run(sql, params, db_error).await
    }

    /// Runs `sql` and decodes its rows one at a time with `decode` (which also gives each
    /// row's size in bytes), stopping once the rows taken reach `budget` bytes: a page held
    /// to a byte budget in memory even when the statement's own cut (by stored, possibly
    /// compressed sizes) lets more through. Rows not taken are discarded as they arrive.
    /// Returns the rows taken and whether any were left.
    pub(crate) async fn query_page<T>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        budget: usize,
        mut decode: impl FnMut(&Row) -> ProcessResult<(T, usize)>,
    ) -> ProcessResult<(Vec<T>, bool)> {
        self.bounded(async |client: &Object| {
            let statement = client.prepare_cached(sql).await.map_err(db_error)?;
            let rows = client
                .query_raw(&statement, params.iter().copied())
                .await
                .map_err(db_error)?;
            futures::pin_mut!(rows);
            let mut taken = Vec::new();
            let mut bytes = 0usize;
            while let Some(row) = futures::TryStreamExt::try_next(&mut rows)
                .await
                .map_err(db_error)?
            {
                if bytes >= budget {
                    return Ok((taken, true));
                }
                let (item, size) = decode(&row)?;
                bytes = bytes.saturating_add(size);
                taken.push(item);
            }
            Ok((taken, false))
        })
        .await
    }
}
