//! The raw-SQL baselines: the cheapest correct statements for the same work, with the same
//! durability, as prepared statements over the same kind of pool.

use deadpool_postgres::Pool;
use serde_json::Value;

pub type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// One event appended with its per-process seq allocated in the same transaction (one
/// statement: bump `last_seq` under the row lock, insert at it).
pub const APPEND: &str = "WITH p AS (
        UPDATE proclog.processes SET last_seq = last_seq + 1
         WHERE process_id = $1 AND terminal_state IS NULL
        RETURNING last_seq)
    INSERT INTO proclog.events (process_id, seq, event_type, payload, writer)
    SELECT $1, p.last_seq, $2, $3, $4 FROM p";

/// The naive design: the same append, plus `pg_notify` inside the append's transaction.
pub const APPEND_NOTIFY_INLINE: &str = "WITH p AS (
        UPDATE proclog.processes SET last_seq = last_seq + 1
         WHERE process_id = $1 AND terminal_state IS NULL
        RETURNING last_seq),
    i AS (
        INSERT INTO proclog.events (process_id, seq, event_type, payload, writer)
        SELECT $1, p.last_seq, $2, $3, $4 FROM p
        RETURNING seq)
    SELECT pg_notify('proclog_bench', $1 || ':' || i.seq) FROM i";

/// N events in one statement, consecutive seqs.
pub const APPEND_BATCH: &str = "WITH p AS (
        UPDATE proclog.processes SET last_seq = last_seq + cardinality($2::text[])
         WHERE process_id = $1 AND terminal_state IS NULL
        RETURNING last_seq)
    INSERT INTO proclog.events (process_id, seq, event_type, payload, writer)
    SELECT $1, p.last_seq - cardinality($2::text[]) + r.ord, r.t, r.p, $4
      FROM p, unnest($2::text[], $3::jsonb[]) WITH ORDINALITY AS r(t, p, ord)";

/// Events after a seq, in order.
pub const READ: &str = "SELECT seq, event_type, payload, replay_key, occurred_at, writer,
        lease_generation
   FROM proclog.events WHERE process_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

pub async fn append(pool: &Pool, sql: &str, id: &str, payload: &Value) -> BenchResult<u64> {
    let client = pool.get().await?;
    let statement = client.prepare_cached(sql).await?;
    client
        .execute(&statement, &[&id, &"bench", payload, &"baseline"])
        .await?;
    Ok(1)
}

pub async fn append_batch(pool: &Pool, id: &str, payloads: &[Value]) -> BenchResult<u64> {
    let client = pool.get().await?;
    let statement = client.prepare_cached(APPEND_BATCH).await?;
    let types: Vec<&str> = payloads.iter().map(|_| "bench").collect();
    let inserted = client
        .execute(&statement, &[&id, &types, &payloads, &"baseline"])
        .await?;
    Ok(inserted)
}

pub async fn read(pool: &Pool, id: &str, limit: i64) -> BenchResult<u64> {
    let client = pool.get().await?;
    let statement = client.prepare_cached(READ).await?;
    let rows = client.query(&statement, &[&id, &0i64, &limit]).await?;
    // Decode like the registry does, so both sides pay for the same work.
    for row in &rows {
        let _: i64 = row.get(0);
        let _: String = row.get(1);
        let _: Value = row.get(2);
        let _: Option<String> = row.get(3);
        let _: chrono::DateTime<chrono::Utc> = row.get(4);
        let _: String = row.get(5);
        let _: Option<i64> = row.get(6);
    }
    Ok(rows.len() as u64)
}
