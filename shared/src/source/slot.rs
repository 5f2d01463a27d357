//! The task's publication and logical replication slot: create or reuse, health, advance, and
//! the peek that reads changes without consuming them.
//!
//! Positions: the peek reads WAL only up to the server's *flush* position, so the drain target
//! `U` is `pg_current_wal_flush_lsn()`; taking `pg_current_wal_lsn()` (the write position)
//! would let an empty drain move the checkpoint past commits that are written but not yet
//! flushed (`synchronous_commit = off`) and lose them.

use bytes::{Bytes, BytesMut};
use tokio_postgres::Client;

use super::catalog::TableInfo;
use super::{quote_ident, quote_qualified};
use crate::error::{Error, Result};
use crate::lsn::Lsn;

/// What the server says of a slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotState {
    pub name: String,
    pub plugin: String,
    pub database: String,
    pub active: bool,
    pub restart_lsn: Option<Lsn>,
    pub confirmed_flush_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost` (PostgreSQL 13+; empty before).
    pub wal_status: String,
    /// Bytes that can still be written before the slot is in danger (13+).
    pub safe_wal_size: Option<i64>,
    /// WAL the slot keeps from being removed: flush position minus `restart_lsn`.
    pub retained_bytes: i64,
}

fn lsn_col(row: &tokio_postgres::Row, i: usize) -> Result<Option<Lsn>> {
    let text: Option<String> = row.get(i);
    text.map(|t| {
        t.parse()
            .map_err(|e: crate::lsn::LsnParseError| Error::Source(e.to_string()))
    })
    .transpose()
}

const SLOT_STATE: &str = "select slot_name::text, coalesce(plugin::text, ''), coalesce(database::text, ''), active, \
 restart_lsn::text, confirmed_flush_lsn::text, coalesce(wal_status, ''), safe_wal_size, \
 coalesce(pg_wal_lsn_diff(pg_current_wal_flush_lsn(), restart_lsn), 0)::int8 \
 from pg_replication_slots where slot_name = $1";

/// Reads a slot's state; `None` when it does not exist.
pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>> {
    let Some(row) = client
        .query_opt(SLOT_STATE, &[&slot])
        .await
        .map_err(|e| Error::postgres(format!("reading slot {slot}"), e))?
    else {
        return Ok(None);
    };
    Ok(Some(SlotState {
        name: row.get(0),
        plugin: row.get(1),
        database: row.get(2),
        active: row.get(3),
        restart_lsn: lsn_col(&row, 4)?,
        confirmed_flush_lsn: lsn_col(&row, 5)?,
        wal_status: row.get(6),
        safe_wal_size: row.get(7),
        retained_bytes: row.get(8),
    }))
}

/// The server's WAL flush position: how far a peek can read.
pub async fn flush_lsn(client: &Client) -> Result<Lsn> {
    let text: String = client
        .query_one("select pg_current_wal_flush_lsn()::text", &[])
        .await
        .map_err(|e| Error::postgres("reading the WAL flush position", e))?
        .get(0);
    text.parse()
        .map_err(|e: crate::lsn::LsnParseError| Error::Source(e.to_string()))
}

/// The drain target: the flush position once it has reached the WAL insert position seen now
/// (with `synchronous_commit = off` a commit is inserted before the WAL writer flushes it,
/// up to `wal_writer_delay` later). Waits at most `max_wait`, then takes what is flushed.
pub async fn drain_target(client: &Client, max_wait: std::time::Duration) -> Result<Lsn> {
    let text: String = client
        .query_one("select pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| Error::postgres("reading the WAL insert position", e))?
        .get(0);
    let inserted: Lsn = text
        .parse()
        .map_err(|e: crate::lsn::LsnParseError| Error::Source(e.to_string()))?;
    let started = std::time::Instant::now();
    loop {
        let flushed = flush_lsn(client).await?;
        if flushed >= inserted || started.elapsed() >= max_wait {
            return Ok(flushed);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Creates the publication unless it exists (an existing one is reused, never replaced).
/// `FOR ALL TABLES` when `all_tables` (a superuser), else `FOR TABLE` the given tables;
/// partitioned tables publish through their root (PostgreSQL 13+).
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    all_tables: bool,
    tables: &[TableInfo],
    version_num: i32,
) -> Result<bool> {
    let exists = client
        .query_opt("select 1 from pg_publication where pubname = $1", &[&name])
        .await
        .map_err(|e| Error::postgres("reading publications", e))?
        .is_some();
    if exists {
        return Ok(false);
    }
    let target = if all_tables {
        "for all tables".to_owned()
    } else {
        let list: Vec<String> = tables
            .iter()
            .filter(|t| !t.is_partition)
            .map(|t| quote_qualified(&t.schema, &t.name))
            .collect();
        if list.is_empty() {
            return Err(Error::Source(
                "no table is selected, and without superuser the publication must list tables"
                    .to_owned(),
            ));
        }
        format!("for table {}", list.join(", "))
    };
    let with = if version_num >= 130_000 {
        " with (publish_via_partition_root = true)"
    } else {
        ""
    };
    let sql = format!("create publication {} {target}{with}", quote_ident(name));
    match client.batch_execute(&sql).await {
        Ok(()) => Ok(true),
        // Created concurrently by another worker: reuse it.
        Err(e) if e.code().is_some_and(|c| c.code() == "42710") => Ok(false),
        Err(e) => Err(Error::postgres(format!("creating publication {name}"), e)),
    }
}

/// Creates the logical slot (pgoutput) and returns its consistent point. A slot that already
/// exists is reused when it fits (pgoutput, this database) and its confirmed position returned.
pub async fn create_slot(client: &Client, slot: &str, database: &str) -> Result<(Lsn, bool)> {
    let created = client
        .query_one(
            "select lsn::text from pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await;
    match created {
        Ok(row) => {
            let text: String = row.get(0);
            let lsn = text
                .parse()
                .map_err(|e: crate::lsn::LsnParseError| Error::Source(e.to_string()))?;
            Ok((lsn, true))
        }
        Err(e) if e.code().is_some_and(|c| c.code() == "42710") => {
            let state = slot_state(client, slot)
                .await?
                .ok_or_else(|| Error::Source(format!("slot {slot} vanished while being reused")))?;
            if state.plugin != "pgoutput" || state.database != database {
                return Err(Error::Source(format!(
                    "slot {slot} exists with plugin {} in database {}: drop it or choose another task name",
                    state.plugin, state.database
                )));
            }
            let lsn = state
                .confirmed_flush_lsn
                .ok_or_else(|| Error::Source(format!("slot {slot} has no confirmed position")))?;
            Ok((lsn, false))
        }
        Err(e)
            if e.code()
                .is_some_and(|c| c.code() == "55P03" || c.code() == "57014") =>
        {
            Err(Error::Source(format!(
                "creating slot {slot} waited too long for running transactions to finish; end long-running or prepared transactions (pgshift test-endpoint lists them) and retry"
            )))
        }
        Err(e) => Err(Error::postgres(format!("creating slot {slot}"), e)),
    }
}

/// Moves the slot's confirmed position to `to` (never backwards: a no-op when already there).
pub async fn advance(client: &Client, slot: &str, to: Lsn) -> Result<()> {
    client
        .query_one(
            "select end_lsn::text from pg_replication_slot_advance($1, $2::text::pg_lsn)",
            &[&slot, &to.to_string()],
        )
        .await
        .map_err(|e| Error::postgres(format!("advancing slot {slot} to {to}"), e))?;
    Ok(())
}

/// Replication slots in use against `max_replication_slots`, and whether `slot` is one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotUsage {
    pub used: i64,
    pub max: i64,
    pub exists: bool,
}

impl SlotUsage {
    /// Slots that can still be created.
    pub fn free(&self) -> i64 {
        self.max - self.used
    }
}

/// Counts the server's replication slots (see [`SlotUsage`]).
pub async fn slot_usage(client: &Client, slot: &str) -> Result<SlotUsage> {
    let row = client
        .query_one(
            "select count(*), current_setting('max_replication_slots')::int8, \
             count(*) filter (where slot_name::text = $1) > 0 from pg_replication_slots",
            &[&slot],
        )
        .await
        .map_err(|e| Error::postgres("counting replication slots", e))?;
    Ok(SlotUsage {
        used: row.get(0),
        max: row.get(1),
        exists: row.get(2),
    })
}

/// Copies `slot` into a temporary slot of this session (same `restart_lsn`, confirmed
/// position and catalog horizon; PostgreSQL drops it when the session ends or fails). It is
/// named `pgshift__split_<backend pid>`: no other live session's copy has that pid, and no
/// task's slot starts `pgshift__` (task names start with a letter). Returns the name and pid.
pub async fn copy_temporary(client: &Client, slot: &str) -> Result<(String, i32)> {
    let row = client
        .query_one(
            "select (pg_copy_logical_replication_slot($1, 'pgshift__split_' || pg_backend_pid(), true)).slot_name::text, pg_backend_pid()",
            &[&slot],
        )
        .await
        .map_err(|e| Error::postgres(format!("copying slot {slot} into a temporary slot"), e))?;
    Ok((row.get(0), row.get(1)))
}

/// Prepares a session for peeking: `logical_decoding_work_mem` raised (PostgreSQL 13+, where
/// it exists) so transactions decode in memory. Returns `server_version_num`.
pub async fn prepare_peek_session(client: &Client, decoding_work_mem: &str) -> Result<i32> {
    let version: i32 = client
        .query_one("select current_setting('server_version_num')::int4", &[])
        .await
        .map_err(|e| Error::postgres("reading the server version", e))?
        .get(0);
    if version >= 130_000 {
        client
            .execute(
                "select set_config('logical_decoding_work_mem', $1, false)",
                &[&decoding_work_mem],
            )
            .await
            .map_err(|e| Error::postgres("setting logical_decoding_work_mem", e))?;
    }
    Ok(version)
}

/// One peek of `slot` (or of its temporary copy), as bound by [`PEEK_BIND`].
#[derive(Debug, Clone)]
pub struct Peek<'a> {
    pub slot: &'a str,
    pub publication: &'a str,
    /// Up to this WAL position.
    pub upto: Lsn,
    /// About how many changes at most (checked between transactions).
    pub max_changes: i32,
    /// The session's `statement_timeout` (0 = none).
    pub timeout: std::time::Duration,
}

/// Starts a peek: binds its values, then opens the binary COPY whose rows [`PeekRows`] splits.
/// The stream's first piece comes once the server has decoded the whole range.
pub async fn start_peek(client: &Client, peek: &Peek<'_>) -> Result<tokio_postgres::CopyOutStream> {
    client
        .execute(
            PEEK_BIND,
            &[
                &peek.slot,
                &peek.upto.to_string(),
                &peek.max_changes.to_string(),
                &peek.publication,
                &peek.timeout.as_millis().to_string(),
            ],
        )
        .await
        .map_err(|e| Error::postgres("binding the peek", e))?;
    client
        .copy_out(PEEK_COPY)
        .await
        .map_err(|e| Error::postgres(format!("peeking slot {}", peek.slot), e))
}

/// Binds the peek's values for [`PEEK_COPY`] (COPY takes no parameters; the values travel
/// as bound arguments of `set_config`, never inside the statement text): the slot, the upper
/// LSN, about how many changes at most (checked between transactions), the publication, and
/// the session's `statement_timeout` in milliseconds (what is left before the deadline).
const PEEK_BIND: &str = "select set_config('pgshift.peek_slot', $1, false), \
 set_config('pgshift.peek_upto', $2, false), set_config('pgshift.peek_changes', $3, false), \
 set_config('pgshift.peek_publication', $4, false), set_config('statement_timeout', $5, false)";

/// The peek, pgoutput protocol 1, as binary COPY: `(lsn, data)` rows ([`PeekRows`]). COPY
/// sends rows with less work per row on both sides than a query's DataRow messages (the
/// server streams the decoded tuplestore; this is most of the run after the decode itself).
const PEEK_COPY: &str = "copy (select lsn, data from pg_logical_slot_peek_binary_changes(\
 current_setting('pgshift.peek_slot'), current_setting('pgshift.peek_upto')::pg_lsn, \
 current_setting('pgshift.peek_changes')::int4, 'proto_version', '1', \
 'publication_names', current_setting('pgshift.peek_publication'))) to stdout with (format binary)";

const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Splits the binary COPY of [`PEEK_COPY`] into `(lsn, data)` rows, whatever the pieces the
/// stream arrives in. A row inside one piece is a slice of it (no copy); one spanning pieces
/// is joined (PostgreSQL sends each row of COPY TO as one CopyData message, so joins are rare:
/// the header, or a client that splits messages). Every read is checked: malformed bytes are errors naming what is wrong.
#[derive(Debug, Default)]
pub struct PeekRows {
    pending: Bytes,
    header_read: bool,
    ended: bool,
}

impl PeekRows {
    pub fn new() -> PeekRows {
        PeekRows::default()
    }

    /// Adds the next piece of the stream.
    pub fn push(&mut self, piece: Bytes) {
        if self.pending.is_empty() {
            self.pending = piece;
        } else {
            let mut joined = BytesMut::with_capacity(self.pending.len() + piece.len());
            joined.extend_from_slice(&self.pending);
            joined.extend_from_slice(&piece);
            self.pending = joined.freeze();
        }
    }

    /// The next complete row, `None` when more bytes are needed (or the trailer was read).
    pub fn next_row(&mut self) -> Result<Option<(Lsn, Bytes)>> {
        let p = &self.pending;
        if !self.header_read {
            if p.len() < COPY_SIGNATURE.len() + 8 {
                return Ok(None);
            }
            if !p.starts_with(COPY_SIGNATURE) {
                return Err(Error::Source(
                    "the peek's COPY output does not start with the binary COPY signature"
                        .to_owned(),
                ));
            }
            let at = COPY_SIGNATURE.len();
            let flags = be_u32(p, at);
            if flags & (1 << 16) != 0 {
                return Err(Error::Source(
                    "the peek's COPY output carries OIDs (unexpected)".to_owned(),
                ));
            }
            let ext = be_u32(p, at + 4) as usize;
            let body = at + 8 + ext;
            if p.len() < body {
                return Ok(None);
            }
            self.pending = p.slice(body..);
            self.header_read = true;
            return self.next_row();
        }
        if p.len() < 2 {
            return Ok(None);
        }
        let fields = i16::from_be_bytes([p[0], p[1]]);
        if self.ended || fields == -1 {
            if self.ended || p.len() > 2 {
                return Err(Error::Source(format!(
                    "{} bytes after the end of the peek's COPY output",
                    if self.ended { p.len() } else { p.len() - 2 }
                )));
            }
            self.ended = true;
            self.pending = Bytes::new();
            return Ok(None);
        }
        if fields != 2 {
            return Err(Error::Source(format!(
                "a row of the peek's COPY output has {fields} fields, expected 2 (lsn, data)"
            )));
        }
        if p.len() < 2 + 4 + 8 + 4 {
            return Ok(None);
        }
        let lsn_len = be_u32(p, 2) as i32;
        if lsn_len != 8 {
            return Err(Error::Source(format!(
                "a row of the peek's COPY output has an LSN of {lsn_len} bytes, expected 8"
            )));
        }
        let lsn = Lsn(u64::from_be_bytes([
            p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13],
        ]));
        let data_len = be_u32(p, 14) as i32;
        let Ok(data_len) = usize::try_from(data_len) else {
            return Err(Error::Source(format!(
                "the change at {lsn} in the peek's COPY output has no data (length {data_len})"
            )));
        };
        let end = 18 + data_len;
        if p.len() < end {
            return Ok(None);
        }
        let data = p.slice(18..end);
        self.pending = p.slice(end..);
        Ok(Some((lsn, data)))
    }

    /// Checks the stream ended with the trailer and nothing after it.
    pub fn finish(&self) -> Result<()> {
        if self.ended && self.pending.is_empty() {
            Ok(())
        } else if !self.ended && self.pending.is_empty() && !self.header_read {
            Err(Error::Source("the peek's COPY output is empty".to_owned()))
        } else {
            Err(Error::Source(format!(
                "the peek's COPY output ended inside a row ({} bytes pending)",
                self.pending.len()
            )))
        }
    }
}

/// A big-endian u32 at `at` (the caller checked the length).
fn be_u32(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

/// Primary-key column names of a relation, in key order (empty when it has none).
pub async fn primary_key_columns(client: &Client, rel_id: u32) -> Result<Vec<String>> {
    let rows = client
        .query(
            "select a.attname::text from pg_index i \
             join lateral unnest(i.indkey) with ordinality k(attnum, ord) on true \
             join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum \
             where i.indrelid = $1 and i.indisprimary order by k.ord",
            &[&rel_id],
        )
        .await
        .map_err(|e| Error::postgres("reading primary keys", e))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// `format_type` for (type oid, modifier) pairs, in order. A type dropped since the change was
/// written (the peek decodes history, this query sees the present) reads as `text`.
pub async fn type_names(client: &Client, types: &[(u32, i32)]) -> Result<Vec<String>> {
    let oids: Vec<u32> = types.iter().map(|t| t.0).collect();
    let mods: Vec<i32> = types.iter().map(|t| t.1).collect();
    let rows = client
        .query(
            "select case when exists (select 1 from pg_type where oid = t) then format_type(t, nullif(m, -1)) else 'text' end \
             from unnest($1::oid[], $2::int4[]) with ordinality u(t, m, o) order by o",
            &[&oids, &mods],
        )
        .await
        .map_err(|e| Error::postgres("reading column types", e))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

#[cfg(test)]
mod peek_rows_tests {
    use super::*;

    fn copy_bytes(rows: &[(u64, &[u8])]) -> Vec<u8> {
        let mut b = COPY_SIGNATURE.to_vec();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&4u32.to_be_bytes());
        b.extend_from_slice(b"ext!");
        for (lsn, data) in rows {
            b.extend_from_slice(&2i16.to_be_bytes());
            b.extend_from_slice(&8i32.to_be_bytes());
            b.extend_from_slice(&lsn.to_be_bytes());
            b.extend_from_slice(&(data.len() as i32).to_be_bytes());
            b.extend_from_slice(data);
        }
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b
    }

    fn split(bytes: &[u8], cuts: &[usize]) -> Result<Vec<(Lsn, Vec<u8>)>> {
        let mut r = PeekRows::new();
        let mut out = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            r.push(Bytes::copy_from_slice(&bytes[from..cut]));
            from = cut;
            while let Some((lsn, data)) = r.next_row()? {
                out.push((lsn, data.to_vec()));
            }
        }
        r.finish()?;
        Ok(out)
    }

    #[test]
    fn rows_come_out_whatever_the_pieces() {
        let rows: &[(u64, &[u8])] = &[(0x1_0000_0010, b"B..."), (0x1_0000_0020, b""), (7, b"C")];
        let bytes = copy_bytes(rows);
        let want: Vec<(Lsn, Vec<u8>)> = rows.iter().map(|(l, d)| (Lsn(*l), d.to_vec())).collect();
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                assert_eq!(split(&bytes, &[a, b]).unwrap(), want, "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn malformed_copy_output_is_an_error() {
        let good = copy_bytes(&[(1, b"x")]);
        let mut bad_sig = good.clone();
        bad_sig[0] = b'X';
        let mut three = good.clone();
        three[23..25].copy_from_slice(&3i16.to_be_bytes());
        let mut short_lsn = good.clone();
        short_lsn[25..29].copy_from_slice(&4i32.to_be_bytes());
        let mut null_data = good.clone();
        null_data[37..41].copy_from_slice(&(-1i32).to_be_bytes());
        let mut oids = good.clone();
        oids[11..15].copy_from_slice(&(1u32 << 16).to_be_bytes());
        let mut trailing = good.clone();
        trailing.push(0);
        for (bytes, want) in [
            (bad_sig, "signature"),
            (three, "3 fields"),
            (short_lsn, "LSN of 4 bytes"),
            (null_data, "has no data"),
            (oids, "OIDs"),
            (trailing, "after the end"),
            (good[..good.len() - 3].to_vec(), "ended inside a row"),
            (Vec::new(), "is empty"),
        ] {
            let err = split(&bytes, &[]).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let len = (seed % 64) as usize;
            let mut bytes = copy_bytes(&[(1, b"abc")])[..19].to_vec();
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push(seed as u8);
            }
            let _ = split(&bytes, &[(seed % 40) as usize % (bytes.len() + 1)]);
        }
    }
}
