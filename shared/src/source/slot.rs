//! The task's publication and logical replication slot: create or reuse, health, advance, and
//! the peek that reads changes without consuming them.
//!
//! Positions: the peek reads WAL only up to the server's *flush* position, so the drain target
//! `U` is `pg_current_wal_flush_lsn()`; taking `pg_current_wal_lsn()` (the write position)
//! would let an empty drain move the checkpoint past commits that are written but not yet
//! flushed (`synchronous_commit = off`) and lose them.

use tokio_postgres::Client;

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

/// Version-aware without branching: `wal_status` and `safe_wal_size` exist from PostgreSQL 13,
/// so they are read through `to_jsonb` of the row (absent on 12: empty and NULL).
const SLOT_STATE: &str = "select s.slot_name::text, coalesce(s.plugin::text, ''), coalesce(s.database::text, ''), s.active, \
 s.restart_lsn::text, s.confirmed_flush_lsn::text, coalesce(to_jsonb(s) ->> 'wal_status', ''), \
 (to_jsonb(s) ->> 'safe_wal_size')::int8, \
 coalesce(pg_wal_lsn_diff(pg_current_wal_flush_lsn(), s.restart_lsn), 0)::int8 \
 from pg_replication_slots s where s.slot_name = $1";

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
/// up to `wal_writer_delay` later). Rather than wait for the WAL writer, the session commits
/// a transaction holding one transactional logical message (prefix `pgshift.flush`, empty;
/// pgoutput does not pass messages on unless asked) with `synchronous_commit = on`: its
/// commit flushes the WAL up to it (some 100 bytes of WAL and one xid; PostgreSQL 15+, whose
/// pgoutput skips the empty transaction; before 15, on a standby, or when it is refused, the
/// wait alone). Waits at most `max_wait`, then takes what is flushed.
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
    let mut flushed = flush_lsn(client).await?;
    // Before 15, pgoutput passes on empty transactions: the flush would be a transaction of
    // its own in every poll.
    let skips_empty: bool = flushed < inserted
        && client
            .query_one(
                "select current_setting('server_version_num')::int >= 150000",
                &[],
            )
            .await
            .map_err(|e| Error::postgres("reading the server version", e))?
            .get(0);
    if skips_empty
        && client
            .batch_execute(
                "begin; set local synchronous_commit = on; select pg_logical_emit_message(true, 'pgshift.flush', ''); commit",
            )
            .await
            .is_err()
    {
        // A standby (no xid there) or a read-only session: the WAL writer will flush.
        let _ = client.batch_execute("rollback").await;
    }
    loop {
        if flushed >= inserted || started.elapsed() >= max_wait {
            return Ok(flushed);
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        flushed = flush_lsn(client).await?;
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
            let state = settled_slot(client, slot).await?;
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

/// Drops the slot (teardown); false when it did not exist. An active slot (a running peek)
/// is an error naming it.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<bool> {
    let dropped = client
        .query_opt(
            "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| Error::postgres(format!("dropping replication slot {slot}"), e))?;
    Ok(dropped.is_some())
}

/// The state of a slot that exists, once it has a confirmed position (a slot another session
/// is still creating has none until it reaches its consistent point).
async fn settled_slot(client: &Client, slot: &str) -> Result<SlotState> {
    for _ in 0..600 {
        let state = slot_state(client, slot)
            .await?
            .ok_or_else(|| Error::Source(format!("slot {slot} vanished while being reused")))?;
        if state.confirmed_flush_lsn.is_some() {
            return Ok(state);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(Error::Source(format!(
        "slot {slot} is being created by another session and has no consistent point after a minute; a long-running transaction blocks it (pgshift test-endpoint lists them)"
    )))
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
