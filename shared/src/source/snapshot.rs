//! Snapshot chunks: a worker's session kept across chunks, each chunk in its own
//! `repeatable read` snapshot, and the chunk's `COPY .. TO STDOUT` (text; see
//! [`super::copy_text::TextToCsv`]).

use tokio_postgres::{Client, CopyOutStream};

use super::{quote_ident, quote_qualified};
use crate::config::PgConfig;
use crate::error::{Error, Result};
use crate::lsn::{Lsn, LsnParseError};
use crate::plan::ChunkRange;

/// The WAL position now (the replay position on a standby).
const WAL_POSITION: &str = "select (case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end)::text";

/// The flushed WAL position now (the replay position on a standby).
const FLUSHED_POSITION: &str = "select (case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_flush_lsn() end)::text";

/// The WAL position now: where a snapshot taken now starts (and what a schema version
/// written without a slot is stamped with).
pub async fn wal_position(client: &Client) -> Result<Lsn> {
    position(client, WAL_POSITION).await
}

/// The flushed WAL position (a standby's replay position): a commit before it is on disk, so
/// a snapshot taken after this sees it in all but the instant before its transaction leaves
/// the running set (a reload's R0).
pub async fn flushed_position(client: &Client) -> Result<Lsn> {
    position(client, FLUSHED_POSITION).await
}

async fn position(client: &Client, sql: &str) -> Result<Lsn> {
    let text: String = client
        .query_one(sql, &[])
        .await
        .map_err(|e| Error::postgres("reading the WAL position", e))?
        .get(0);
    text.parse()
        .map_err(|e: LsnParseError| Error::Protocol(e.to_string()))
}

/// The chunk's snapshot, as `txid_current_snapshot()` prints it (every supported version),
/// and the WAL insert position after it (every transaction it saw committed before that).
pub async fn current_snapshot(client: &Client) -> Result<(String, Lsn)> {
    let row = client
        .query_one(
            "select txid_current_snapshot()::text, pg_current_wal_insert_lsn()::text",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("reading the chunk's snapshot", e))?;
    let lsn: String = row.get(1);
    let lsn = lsn
        .parse()
        .map_err(|e: LsnParseError| Error::Protocol(e.to_string()))?;
    Ok((row.get(0), lsn))
}

/// A worker's source session, kept from one chunk to the next (the CLI's workers export many
/// chunks each; a Lambda invocation exports one). Reusing it saves, per chunk, a backend
/// start, the TLS handshake, the SCRAM exchange and the catalog-cache warm-up — tens of
/// milliseconds during which the server would otherwise send nothing. Every chunk still has
/// its own snapshot (its own `repeatable read` transaction); a session that failed mid-chunk
/// is dropped, never reused.
#[derive(Default)]
pub struct ChunkSession {
    client: Option<Client>,
    /// Sessions opened (for tests and diagnostics).
    pub connects: u32,
}

/// Starts a chunk's snapshot. JIT is off: it would compile each chunk's scan anew (the plan
/// cost passes `jit_above_cost` on any big table) for a query that only moves tuples.
const BEGIN_CHUNK: &str =
    "set jit = off; start transaction isolation level repeatable read read only";

impl ChunkSession {
    /// A session in a fresh chunk snapshot: the kept one, or a new one when there is none or
    /// the kept one no longer answers (closed by the server, a network cut between chunks).
    pub async fn begin(&mut self, source: &PgConfig) -> Result<Client> {
        if let Some(kept) = self.client.take().filter(|c| !c.is_closed())
            && kept.batch_execute(BEGIN_CHUNK).await.is_ok()
        {
            return Ok(kept);
        }
        let mut cfg = source.clone();
        cfg.application_name = "pgshift-full-load".to_owned();
        self.connects += 1;
        let client = super::connect(&cfg).await?;
        client
            .batch_execute(BEGIN_CHUNK)
            .await
            .map_err(|e| Error::postgres("starting the chunk's snapshot", e))?;
        Ok(client)
    }

    /// Ends the chunk's read-only snapshot and keeps the session for the next chunk (a
    /// session whose commit fails is dropped).
    pub async fn end(&mut self, client: Client) {
        if client.batch_execute("commit").await.is_ok() {
            self.client = Some(client);
        }
    }
}

/// Starts `COPY (select <columns> from <table> <range>) TO STDOUT` (text format).
pub async fn copy_chunk(
    client: &Client,
    schema: &str,
    table: &str,
    columns: &[String],
    range: &ChunkRange,
) -> Result<CopyOutStream> {
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let sql = format!(
        "copy (select {} from {}{}) to stdout",
        cols.join(", "),
        quote_qualified(schema, table),
        range.where_clause()
    );
    client
        .copy_out(&sql)
        .await
        .map_err(|e| Error::postgres(format!("starting COPY of {schema}.{table}"), e))
}
