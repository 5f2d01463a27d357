//! Task status from the state store: load progress per table, the CDC checkpoint, the last
//! poll's lag and slot health, and, when a source is given, the live lag behind it.

use serde::{Deserialize, Serialize};

use crate::config::{PgConfig, check_task_name};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::source::{self, slot};
use crate::state::StateStore;
use crate::state::records::{self, ChunkId, PlanRecord, PollReport};
use crate::target::Applied;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableProgress {
    pub schema: String,
    pub table: String,
    pub chunks_done: usize,
    pub chunks: usize,
    pub rows: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub task: String,
    pub slot: Option<String>,
    pub l0: Option<Lsn>,
    /// `none`, `planned` or `complete`.
    pub load: String,
    pub tables: Vec<TableProgress>,
    pub checkpoint: Option<Lsn>,
    pub batches: u64,
    pub lease_owner: Option<String>,
    pub last_poll: Option<PollReport>,
    /// Live, when a source was given: WAL bytes between the checkpoint and the flush position.
    pub lag_bytes: Option<u64>,
    pub slot_retained_bytes: Option<i64>,
    pub slot_wal_status: Option<String>,
    /// The end of the last batch staged (what a target can be caught up with).
    #[serde(default)]
    pub last_batch_end: Option<Lsn>,
    /// When a target was given: where its apply stands.
    #[serde(default)]
    pub target: Option<TargetStatus>,
    /// Reloads of tables into the task (DMS's "reload table"), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reloads: Vec<crate::state::records::reload::ReloadEntry>,
}

/// Where a PG -> PG target's apply stands against what is staged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// `None`: apply never ran against this target.
    pub applied: Option<Applied>,
    /// WAL bytes of staged batches not applied yet.
    pub behind_bytes: Option<u64>,
    /// 0 when every staged batch is applied; else seconds since the source committed the last
    /// change the target has.
    pub lag_seconds: Option<f64>,
}

/// Reads a task's status; `source` adds live lag and slot health.
pub async fn run<St: StateStore>(
    state: &St,
    task: &str,
    source_cfg: Option<&PgConfig>,
) -> Result<TaskStatus> {
    check_task_name(task)?;
    let record = records::get_task(state, task).await?;
    let plan = records::get_plan(state, task).await?.map(|(p, _)| p);
    let cdc = records::get_cdc(state, task).await?;
    if record.is_none() && plan.is_none() && cdc.is_none() {
        return Err(Error::config(
            "task",
            format!("task {task} has no state in {}", state.describe()),
        ));
    }
    let tables = match &plan {
        Some(p) => load_progress(state, task, p).await?,
        None => Vec::new(),
    };
    let mut status = TaskStatus {
        task: task.to_owned(),
        slot: record.as_ref().map(|r| r.slot.clone()),
        l0: record.as_ref().map(|r| r.start_lsn),
        load: plan
            .as_ref()
            .map_or("none".to_owned(), |p| p.status.clone()),
        tables,
        checkpoint: cdc.as_ref().map(|c| Lsn(c.checkpoint)),
        batches: cdc.as_ref().map_or(0, |c| c.batch_seq),
        lease_owner: cdc.as_ref().and_then(|c| c.lease_owner.clone()),
        last_poll: cdc
            .as_ref()
            .and_then(|c| c.last_poll.clone())
            .and_then(|v| serde_json::from_value(v).ok()),
        lag_bytes: None,
        slot_retained_bytes: None,
        slot_wal_status: None,
        last_batch_end: cdc.as_ref().and_then(|c| c.last_batch_end),
        target: None,
        reloads: records::reload::get_index(state, task).await?.reloads,
    };
    if let (Some(cfg), Some(slot_name)) = (source_cfg, status.slot.clone()) {
        live_slot(&mut status, cfg, &slot_name).await?;
    }
    Ok(status)
}

/// Adds where a target's apply of the task stands.
pub async fn with_target(status: &mut TaskStatus, target: &PgConfig) -> Result<()> {
    let client = source::connect(target).await?;
    let applied = crate::target::applied(&client, &status.task).await?;
    let (behind_bytes, lag_seconds) = match (&applied, status.last_batch_end) {
        (Some(a), Some(end)) if a.position >= end => (Some(0), Some(0.0)),
        (Some(a), Some(end)) => (
            Some(end.bytes_since(a.position)),
            a.seconds_since_last_commit,
        ),
        (Some(_), None) => (Some(0), Some(0.0)),
        (None, _) => (None, None),
    };
    status.target = Some(TargetStatus {
        applied,
        behind_bytes,
        lag_seconds,
    });
    Ok(())
}

/// Chunks done and rows loaded per planned table.
async fn load_progress<St: StateStore>(
    state: &St,
    task: &str,
    plan: &PlanRecord,
) -> Result<Vec<TableProgress>> {
    let mut tables = Vec::new();
    for t in &plan.tables {
        let (mut done, mut rows) = (0, 0);
        for n in 0..t.chunks.len() as u32 {
            let id = ChunkId {
                schema: t.schema.clone(),
                table: t.table.clone(),
                n,
                reload: None,
            };
            if let Some(c) = records::get_chunk(state, task, &id).await?
                && c.status == "done"
            {
                done += 1;
                rows += c.rows;
            }
        }
        tables.push(TableProgress {
            schema: t.schema.clone(),
            table: t.table.clone(),
            chunks_done: done,
            chunks: t.chunks.len(),
            rows,
        });
    }
    Ok(tables)
}

/// Lag and slot health, read from the source now.
async fn live_slot(status: &mut TaskStatus, cfg: &PgConfig, slot_name: &str) -> Result<()> {
    let client = source::connect(cfg).await?;
    let flushed = slot::flush_lsn(&client).await?;
    let from = status.checkpoint.or(status.l0).unwrap_or(Lsn::ZERO);
    status.lag_bytes = Some(flushed.bytes_since(from));
    if let Some(s) = slot::slot_state(&client, slot_name).await? {
        status.slot_retained_bytes = Some(s.retained_bytes);
        status.slot_wal_status = Some(s.wal_status);
    } else {
        status.slot_wal_status = Some("missing".to_owned());
    }
    Ok(())
}
