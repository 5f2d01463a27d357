//! Task status from the state store: load progress per table, the CDC checkpoint, the last
//! poll's lag and slot health, and, when a source is given, the live lag behind it.

use serde::{Deserialize, Serialize};

use crate::config::{PgConfig, check_task_name};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::source::{self, slot};
use crate::state::records::{CdcRecord, ChunkRecord, PlanRecord, PollReport, TaskRecord};
use crate::state::{StateStore, from_doc};

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
}

/// Reads a task's status; `source` adds live lag and slot health.
pub async fn run<St: StateStore>(
    state: &St,
    task: &str,
    source_cfg: Option<&PgConfig>,
) -> Result<TaskStatus> {
    check_task_name(task)?;
    let record: Option<TaskRecord> = match state.get(task, "task").await? {
        Some(v) => Some(from_doc(v.doc, "task")?),
        None => None,
    };
    let plan: Option<PlanRecord> = match state.get(task, "plan").await? {
        Some(v) => Some(from_doc(v.doc, "plan")?),
        None => None,
    };
    let cdc: Option<CdcRecord> = match state.get(task, "cdc").await? {
        Some(v) => Some(from_doc(v.doc, "cdc")?),
        None => None,
    };
    if record.is_none() && plan.is_none() && cdc.is_none() {
        return Err(Error::config(
            "task",
            format!("task {task} has no state in {}", state.describe()),
        ));
    }
    let mut tables = Vec::new();
    if let Some(p) = &plan {
        for t in &p.tables {
            let mut done = 0;
            let mut rows = 0;
            for n in 0..t.chunks.len() {
                if let Some(v) = state
                    .get(task, &format!("chunk#{}.{}#{n}", t.schema, t.table))
                    .await?
                {
                    let c: ChunkRecord = from_doc(v.doc, "chunk")?;
                    if c.status == "done" {
                        done += 1;
                        rows += c.rows;
                    }
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
    }
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
    };
    if let (Some(cfg), Some(slot_name)) = (source_cfg, &status.slot) {
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
    }
    Ok(status)
}
