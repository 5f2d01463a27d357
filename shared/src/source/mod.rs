//! The PostgreSQL source, and the seam jobs use to reach it.
//!
//! - [`CdcSource`]: what the CDC poller needs of a source (create the replication, the slot's
//!   state, advance, the drain target, relation details, the peek), with the PostgreSQL
//!   implementation [`PgSource`], an in-memory one ([`MemorySource`], for job-level tests) and
//!   a fault-injecting wrapper ([`UnreliableSource`]).
//! - [`connect()`]: sessions (TLS, SCRAM, classification of failures); `secret`: a DMS-shaped secret in
//!   Secrets Manager → connection settings.
//! - [`catalog`]: server facts, the tables, the ONE columns query; [`checks`]: the endpoint
//!   checks; [`slot`]: publication and slot SQL; [`peek`]: the (split) peek;
//!   [`snapshot`]: chunk sessions and their COPY; [`copy_text`]: COPY text → CSV, checksums.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::change::decoder::RelationInfo;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::selection::Selection;

pub mod catalog;
pub mod checks;
pub mod connect;
pub mod copy_text;
pub mod ddl;
pub mod follow;
mod memory;
pub mod peek;
mod pg;
pub mod publication;
mod secret;
pub mod slot;
pub mod snapshot;
mod unreliable;

pub use catalog::{ServerInfo, TableInfo};
pub use connect::connect;
pub use memory::{MemoryChange, MemorySource};
pub use pg::PgSource;
pub use publication::Publications;
pub use slot::SlotState;
pub use unreliable::{SourceFault, UnreliableSource};

/// What creating a task's replication gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    /// The slot's consistent point (`L0`).
    pub start_lsn: Lsn,
    pub database: String,
}

/// What a task captures: its selection, and whether pgshift may set REPLICA IDENTITY FULL on
/// selected tables without a key (so their updates and deletes are captured too; it costs the
/// source the whole old row in the WAL of each). Off, such tables are captured insert-only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capture {
    pub selection: Selection,
    pub replica_identity_full: bool,
    /// Selection rules may match no table (a task for tables that do not exist yet).
    pub allow_empty: bool,
    /// Capture schema changes with the event trigger's messages (DMS's `captureDDLs`).
    pub ddl: bool,
    /// The schema of the trigger functions (DMS's `ddlArtifactsSchema`); empty: `public`.
    pub ddl_schema: String,
}

/// Whether a user's slot can serve an adopted task ([`CdcSource::adopt_replication`]);
/// returns the task's start. `flush` is the source's WAL flush position.
pub fn check_adoption(
    slot: &str,
    publication: &str,
    state: Option<&SlotState>,
    publication_exists: bool,
    database: &str,
    start: Option<Lsn>,
    flush: Lsn,
) -> Result<Lsn> {
    let how = format!(
        "create the publication first, then the slot: create publication {publication} for table ...; select pg_create_logical_replication_slot('{slot}', 'pgoutput')"
    );
    let Some(s) = state else {
        return Err(Error::Source(format!(
            "replication slot {slot} does not exist ({how})"
        )));
    };
    if s.plugin != "pgoutput" {
        return Err(Error::Source(format!(
            "replication slot {slot} decodes with {:?}; pgshift reads pgoutput slots ({how})",
            s.plugin
        )));
    }
    if s.database != database {
        return Err(Error::Source(format!(
            "replication slot {slot} belongs to database {:?}, not {database:?}",
            s.database
        )));
    }
    if s.active {
        return Err(Error::Source(format!(
            "replication slot {slot} is in use by another process: stop what reads it first"
        )));
    }
    if s.wal_status == "lost" {
        return Err(Error::SlotLost(format!(
            "replication slot {slot} has lost WAL it needs; it cannot serve a task"
        )));
    }
    if !publication_exists {
        return Err(Error::Source(format!(
            "publication {publication} does not exist ({how})"
        )));
    }
    let confirmed = s.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
    match start {
        None => Ok(confirmed),
        Some(at) if at < confirmed => Err(Error::Source(format!(
            "the start position {at} is before slot {slot}'s confirmed position {confirmed}: the changes before it are gone from the slot; start at {confirmed} or later"
        ))),
        Some(at) if at > flush => Err(Error::Source(format!(
            "the start position {at} is past the source's WAL ({flush})"
        ))),
        Some(at) => Ok(at),
    }
}

/// One peek (see the CDC poller's module docs, step 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekRequest {
    pub slot: String,
    pub publication: String,
    /// Up to this WAL position.
    pub upto: Lsn,
    /// About how many changes at most (checked between transactions).
    pub max_changes: i32,
    /// The time the server may take (the time left before the deadline, or the session's
    /// statement timeout).
    pub timeout: Duration,
    /// Whether `timeout` is the deadline's: a peek cut there is [`crate::Error::Deadline`].
    pub deadline: bool,
    /// Split at this position: the first half reads transactions committed before it, a
    /// second session those from it on.
    pub split: Option<Lsn>,
    /// Decode logical messages too (the schema-change messages; PostgreSQL 14+).
    pub messages: bool,
}

/// What the CDC poller needs of a source.
pub trait CdcSource: Send + Sync {
    type Peek: PeekStream;

    /// Creates the task's publications (the selected tables) and slot `name`, or reuses them.
    fn create_replication(
        &self,
        name: &str,
        capture: &Capture,
    ) -> impl Future<Output = Result<Replication>> + Send;
    /// Takes over a slot and publication the user made (DMS's native start): the slot must
    /// be a pgoutput slot of this database that no one is reading, the publication must
    /// exist; the task starts at `start` (checked against the slot; the slot is advanced to
    /// it) or the slot's confirmed position. Nothing is created.
    fn adopt_replication(
        &self,
        slot: &str,
        publication: &str,
        start: Option<Lsn>,
    ) -> impl Future<Output = Result<Replication>> + Send;
    /// An adopted task's publication, checked and never changed: selected tables it does
    /// not publish are `skipped`.
    fn adopted_publication(
        &self,
        publication: &str,
        capture: &Capture,
    ) -> impl Future<Output = Result<Publications>> + Send;
    /// Brings the task's publications to the selection (and keeps following it).
    fn sync_publications(
        &self,
        name: &str,
        capture: &Capture,
    ) -> impl Future<Output = Result<Publications>> + Send;
    /// Drops the slot, publications and follow trigger of the task whose names are `name`
    /// (teardown, and a first run that could not record the task). Returns what it dropped.
    fn drop_replication(&self, name: &str) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// The slot's state; `None` when it does not exist.
    fn slot_state(&self, slot: &str) -> impl Future<Output = Result<Option<SlotState>>> + Send;
    /// Moves the slot's confirmed position to `to` (never backwards).
    fn advance(&self, slot: &str, to: Lsn) -> impl Future<Output = Result<()>> + Send;
    /// How far a drain may read now (the flush position once it reached the insert position).
    fn drain_target(&self) -> impl Future<Output = Result<Lsn>> + Send;
    /// Replication slots that can still be created (a split peek needs one).
    fn free_slots(&self, slot: &str) -> impl Future<Output = Result<i64>> + Send;
    /// The primary key and type names of a relation of the peek.
    fn relation_info(
        &self,
        rel_id: u32,
        types: &[(u32, i32)],
    ) -> impl Future<Output = Result<RelationInfo>> + Send;
    /// A relation's definition now ([`crate::change::ddl::DEFINITION_SQL`]); `None` when it
    /// no longer exists (or the source cannot say).
    fn table_definition(
        &self,
        rel_id: u32,
    ) -> impl Future<Output = Result<Option<crate::change::ddl::TableDefinition>>> + Send;
    /// The user types a relation's columns use, as statements creating them (dependencies
    /// first); empty when it uses none (or the source cannot say).
    fn type_ddl(
        &self,
        rel_id: u32,
    ) -> impl Future<Output = Result<Vec<crate::source::ddl::DdlItem>>> + Send;
    /// Prepares the peek session; returns `server_version_num`.
    fn prepare_peeks(&self, decoding_work_mem: &str) -> impl Future<Output = Result<i32>> + Send;
    /// Starts a peek.
    fn peek(&self, req: &PeekRequest) -> impl Future<Output = Result<Self::Peek>> + Send;
}

/// The rows of one peek, `(lsn, pgoutput message)`, a half at a time.
pub trait PeekStream: Send {
    /// The next row of the current half; `None` when the half ended (checked complete).
    fn next_row(&mut self) -> impl Future<Output = Result<Option<(Lsn, Bytes)>>> + Send;
    /// After a half ended: `Some(split)` when the second half's rows follow, `None` when
    /// there is none, an error when the second half failed (the next peek reads its rows).
    fn next_half(&mut self) -> impl Future<Output = Result<Option<Lsn>>> + Send;
    /// Stops a second half nobody will read.
    fn cancel(self) -> impl Future<Output = ()> + Send;
}

/// Quotes an identifier the way `quote_ident` does, always (so case and odd characters survive).
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for ch in name.chars() {
        if ch == '"' {
            out.push('"');
        }
        out.push(ch);
    }
    out.push('"');
    out
}

/// `"schema"."table"`.
pub fn quote_qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_every_identifier() {
        assert_eq!(quote_ident("t"), "\"t\"");
        assert_eq!(quote_ident("Table1"), "\"Table1\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_qualified("s.x", "t y"), "\"s.x\".\"t y\"");
    }
}
