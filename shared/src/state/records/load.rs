//! The full load's (and a reload's) plan and chunk items: `plan` / `reload#<R0>#plan`
//! ([`PlanRecord`], `planned` → `complete`) and `chunk#<s>.<t>#<n>` /
//! `reload#<R0>#chunk#..` ([`ChunkRecord`], `pending` → `running(owner, lease)` → `done`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::plan::ChunkRange;
use crate::source::copy_text::RowChecksum;
use crate::staging::encode::Format;
use crate::state::{StateStore, from_doc, now_ms, to_doc};

use super::holder_is_dead_here;

/// One table of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedTable {
    pub schema: String,
    pub table: String,
    pub columns: Vec<String>,
    /// (type oid, type modifier) per column, for typed formats.
    #[serde(default)]
    pub types: Vec<(u32, i32)>,
    pub chunks: Vec<ChunkRange>,
    pub estimated_rows: f64,
    /// The names transformation rules stage it under (absent: the source's); `columns` are
    /// the source's columns read (those rules did not remove).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_as: Option<StagedNames>,
    /// The key of the schema version its rows have (absent in plans before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_key: Option<String>,
}

/// A planned table's staged names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedNames {
    pub schema: String,
    pub table: String,
    pub columns: Vec<String>,
}

impl PlannedTable {
    /// Its schema, table and column names as staged.
    pub fn staged(&self) -> (&str, &str, &[String]) {
        match &self.staged_as {
            Some(n) => (&n.schema, &n.table, &n.columns),
            None => (&self.schema, &self.table, &self.columns),
        }
    }
}

/// The `plan` item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRecord {
    pub tables: Vec<PlannedTable>,
    pub format: Format,
    /// CSV load rows start with an `Op` field, `I` (DMS's `IncludeOpForFullLoad`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub op_column: bool,
    /// CSV files start with a header row of column names (DMS's `AddColumnName`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub header: bool,
    /// The CSV dialect (DMS's `CsvDelimiter`, `CsvNullValue`, `CsvRowDelimiter`; absent:
    /// PostgreSQL's CSV).
    #[serde(
        default,
        skip_serializing_if = "crate::staging::dialect::CsvDialect::is_default"
    )]
    pub csv: crate::staging::dialect::CsvDialect,
    /// The slot's consistent point when CDC is on (a reload's: its position R0).
    pub l0: Option<Lsn>,
    /// `planned` or `complete`.
    pub status: String,
    /// A reload's plan (its position R0): its items are `reload#<R0>#..`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<Lsn>,
}

impl PlanRecord {
    /// Every chunk of the plan, table by table.
    pub fn chunk_ids(&self) -> Vec<ChunkId> {
        self.tables
            .iter()
            .flat_map(|t| {
                (0..t.chunks.len() as u32).map(|n| ChunkId {
                    schema: t.schema.clone(),
                    table: t.table.clone(),
                    n,
                    reload: self.reload,
                })
            })
            .collect()
    }

    /// The planned table of a chunk.
    pub fn table(&self, schema: &str, table: &str) -> Result<&PlannedTable> {
        self.tables
            .iter()
            .find(|t| t.schema == schema && t.table == table)
            .ok_or_else(|| Error::Event {
                field: "chunk".to_owned(),
                reason: format!("{schema}.{table} is not in the plan"),
            })
    }
}

/// Reads the `plan` item.
pub async fn get_plan<St: StateStore>(state: &St, task: &str) -> Result<Option<(PlanRecord, u64)>> {
    get_plan_of(state, task, None).await
}

/// The plan item of the load (`None`) or of a reload from R0: `plan`, `reload#<R0>#plan`.
pub fn plan_key(reload: Option<Lsn>) -> String {
    match reload {
        Some(r0) => format!("reload#{}#plan", r0.key_hex()),
        None => "plan".to_owned(),
    }
}

/// Reads the load's plan (`None`) or a reload's.
pub async fn get_plan_of<St: StateStore>(
    state: &St,
    task: &str,
    reload: Option<Lsn>,
) -> Result<Option<(PlanRecord, u64)>> {
    match state.get(task, &plan_key(reload)).await? {
        Some(v) => Ok(Some((from_doc(v.doc, "plan")?, v.version))),
        None => Ok(None),
    }
}

/// Stores a new plan with one `pending` item per chunk. A plan stored concurrently wins and
/// is returned.
pub async fn create_plan<St: StateStore>(
    state: &St,
    task: &str,
    plan: PlanRecord,
    chunk_key: impl Fn(&ChunkId) -> String,
) -> Result<PlanRecord> {
    for id in plan.chunk_ids() {
        let table = plan.table(&id.schema, &id.table)?;
        let record = ChunkRecord {
            schema: id.schema.clone(),
            table: id.table.clone(),
            n: id.n,
            range: table.chunks[id.n as usize].clone(),
            status: "pending".to_owned(),
            owner: None,
            lease_expires_ms: 0,
            attempts: 0,
            key: chunk_key(&id),
            rows: 0,
            bytes: 0,
            checksum: RowChecksum::default(),
            start_lsn: None,
            snapshot: None,
            snapshot_lsn: None,
            reload: plan.reload,
        };
        match state
            .put(task, &id.state_key(), &to_doc(&record)?, None)
            .await
        {
            Ok(_) | Err(Error::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    match state
        .put(task, &plan_key(plan.reload), &to_doc(&plan)?, None)
        .await
    {
        Ok(_) => Ok(plan),
        Err(Error::Conflict(_)) => get_plan_of(state, task, plan.reload)
            .await?
            .map(|(p, _)| p)
            .ok_or_else(|| Error::Conflict("plan vanished".to_owned())),
        Err(e) => Err(e),
    }
}

/// Marks the plan complete (a concurrent finisher's write is as good).
pub async fn complete_plan<St: StateStore>(
    state: &St,
    task: &str,
    mut plan: PlanRecord,
    version: u64,
) -> Result<()> {
    if plan.status == "complete" {
        return Ok(());
    }
    plan.status = "complete".to_owned();
    match state
        .put(task, &plan_key(plan.reload), &to_doc(&plan)?, Some(version))
        .await
    {
        Ok(_) | Err(Error::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A chunk's identity (the Map state's item).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkId {
    pub schema: String,
    pub table: String,
    pub n: u32,
    /// A reload's chunk (its R0); absent for the load's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<Lsn>,
}

impl ChunkId {
    /// The chunk's item: `chunk#<schema>.<table>#<n>` (names escaped: no two tables share
    /// an item); a reload's `reload#<R0>#chunk#<schema>.<table>#<n>`.
    pub fn state_key(&self) -> String {
        let key = format!(
            "chunk#{}#{}",
            crate::staging::layout::state_table_key(&self.schema, &self.table),
            self.n
        );
        match self.reload {
            Some(r0) => format!("reload#{}#{key}", r0.key_hex()),
            None => key,
        }
    }
}

/// The `chunk#..` item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkRecord {
    pub schema: String,
    pub table: String,
    pub n: u32,
    pub range: ChunkRange,
    /// `pending`, `running` or `done`.
    pub status: String,
    pub owner: Option<String>,
    pub lease_expires_ms: u64,
    pub attempts: u32,
    pub key: String,
    pub rows: u64,
    pub bytes: u64,
    pub checksum: RowChecksum,
    pub start_lsn: Option<Lsn>,
    /// The chunk's snapshot (`txid_current_snapshot()`): CDC changes of transactions it saw
    /// are already in the chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The WAL insert position read after the snapshot was taken: every transaction it saw
    /// committed before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_lsn: Option<Lsn>,
    /// A reload's chunk (its R0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<Lsn>,
}

/// Reads a chunk item.
pub async fn get_chunk<St: StateStore>(
    state: &St,
    task: &str,
    id: &ChunkId,
) -> Result<Option<ChunkRecord>> {
    match state.get(task, &id.state_key()).await? {
        Some(v) => Ok(Some(from_doc(v.doc, "chunk")?)),
        None => Ok(None),
    }
}

/// The result of claiming a chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// Already exported: its result.
    Done(ChunkRecord),
    /// Ours to export until the lease expires; complete it with this version.
    Claimed { record: ChunkRecord, version: u64 },
}

/// `pending → running(owner, lease)`, or a running chunk whose lease expired (or is ours, or
/// a dead process's of this host, or `force`d) taken over. A live lease of another worker is
/// [`Error::LeaseHeld`] (transient: retry later).
pub async fn claim_chunk<St: StateStore>(
    state: &St,
    task: &str,
    id: &ChunkId,
    owner: &str,
    ttl: Duration,
    force: bool,
) -> Result<Claim> {
    let key = id.state_key();
    let stored = state.get(task, &key).await?.ok_or_else(|| {
        Error::event(
            "chunk",
            format!(
                "{}.{} chunk {} is not in the plan of task {task}",
                id.schema, id.table, id.n
            ),
        )
    })?;
    let mut record: ChunkRecord = from_doc(stored.doc, "chunk")?;
    if record.status == "done" {
        return Ok(Claim::Done(record));
    }
    let now = now_ms();
    if record.status == "running"
        && record.owner.as_deref() != Some(owner)
        && record.lease_expires_ms > now
        && !force
        && !record.owner.as_deref().is_some_and(holder_is_dead_here)
    {
        return Err(Error::LeaseHeld {
            what: format!("chunk {key}"),
            owner: record.owner.clone().unwrap_or_default(),
            until_ms: record.lease_expires_ms,
        });
    }
    record.status = "running".to_owned();
    record.owner = Some(owner.to_owned());
    record.lease_expires_ms = now + ttl.as_millis() as u64;
    record.attempts += 1;
    let version = state
        .put(task, &key, &to_doc(&record)?, Some(stored.version))
        .await?;
    Ok(Claim::Claimed { record, version })
}

/// `running → done` with the export's result, conditional on the version the claim wrote (a
/// worker whose lease expired and was taken over gets a conflict and its result is dropped).
pub async fn complete_chunk<St: StateStore>(
    state: &St,
    task: &str,
    mut record: ChunkRecord,
    version: u64,
) -> Result<ChunkRecord> {
    let id = ChunkId {
        schema: record.schema.clone(),
        table: record.table.clone(),
        n: record.n,
        reload: record.reload,
    };
    record.status = "done".to_owned();
    record.lease_expires_ms = 0;
    state
        .put(task, &id.state_key(), &to_doc(&record)?, Some(version))
        .await
        .map_err(|e| match e {
            Error::Conflict(m) => Error::Conflict(format!(
                "chunk {} was taken over while exporting (lease expired): {m}",
                id.state_key()
            )),
            other => other,
        })?;
    Ok(record)
}
