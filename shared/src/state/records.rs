//! The task's state records (DESIGN §6) and their transitions, each written once:
//!
//! | item (`sk`)          | record          | transitions                                        |
//! |----------------------|-----------------|----------------------------------------------------|
//! | `task`               | [`TaskRecord`]  | created once ([`create_task`]; a racing creator's wins) |
//! | `cdc`                | [`CdcRecord`]   | lease taken / released ([`Lease`]); checkpoint C → E, never backwards ([`Lease::move_checkpoint`]) |
//! | `plan`               | [`PlanRecord`]  | `planned` → `complete`                              |
//! | `chunk#<s>.<t>#<n>`  | [`ChunkRecord`] | `pending` → `running(owner, lease)` → `done` ([`claim_chunk`], [`complete_chunk`]) |
//! | `reloads`            | [`reload::ReloadIndex`] | a reload `starting` → `planned(R0)` → `complete` |
//! | `reload#<R0>#plan`, `reload#<R0>#chunk#..` | [`PlanRecord`], [`ChunkRecord`] | as the load's |
//!
//! Every write is conditional on the version read, so a lost race is a conflict, never a
//! silent overwrite.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{StateStore, from_doc, now_ms, to_doc};
use crate::error::{Error, Result};
use crate::lsn::Lsn;

/// The task item (`sk = task`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub slot: String,
    pub publication: String,
    /// The slot's consistent point: CDC starts here (`L0`).
    pub start_lsn: Lsn,
    pub database: String,
    /// `cdc` for a CDC-only task, `full-load` when the full load created it, `native-start`
    /// when it took over its user's slot and publication.
    pub created_by: String,
    /// The slot and publication are the user's (DMS's native start): pgshift never changes
    /// nor drops them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopted: bool,
}

/// The CDC item (`sk = cdc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CdcRecord {
    /// The checkpoint as a number (conditions compare numerically).
    pub checkpoint: u64,
    /// The same, as `X/Y`.
    pub checkpoint_lsn: Lsn,
    pub batch_seq: u64,
    pub lease_owner: Option<String>,
    pub lease_expires_ms: u64,
    #[serde(default)]
    pub last_poll: Option<serde_json::Value>,
    /// Where the last committed batch ended (its manifest's `end_lsn`).
    #[serde(default)]
    pub last_batch_end: Option<Lsn>,
    /// With events on: every batch ending at or before this was announced (`Batch Committed`);
    /// the next poll re-announces the ones after it. `None` with events off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announced_through: Option<Lsn>,
    /// A stop by commit time (`CdcStopPosition` `commit_time:`) this task reached: the time
    /// (µs since 2000-01-01 UTC) and the checkpoint where its first later transaction began.
    /// Later polls with the same stop time rest there without decoding past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_found: Option<StopFound>,
    /// The time in the newest transaction file's name (`CDC_TXN-<ms>`, ms since the Unix
    /// epoch; PreserveTransactions): the next batch's file is named later, so names sort in
    /// commit order even when commit timestamps do not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn_file_ms: Option<i64>,
}

/// Where a stop by commit time was found (see [`CdcRecord::stop_found`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopFound {
    pub commit_time: i64,
    pub lsn: Lsn,
}

/// How a poll run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// Everything up to the target was staged.
    Drained,
    /// Another poller holds the lease; nothing was done.
    LeaseHeld { owner: String, expires_ms: u64 },
    /// The deadline came first; the next run continues from the checkpoint.
    DeadlineReached,
    /// The peek stopped at `upto_nchanges`; more is waiting.
    MoreWaiting,
}

/// What a poll run did (kept in the `cdc` item as `last_poll`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PollReport {
    pub task: String,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub slot: String,
    pub start_checkpoint: Lsn,
    pub checkpoint: Lsn,
    /// The WAL flush position the run drained to.
    pub target: Lsn,
    pub peeks: u32,
    /// Peeks decoded by two sessions at once.
    #[serde(default)]
    pub split_peeks: u32,
    /// Where the last split peek's second session started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_at: Option<Lsn>,
    pub batches: Vec<String>,
    pub transactions: u64,
    pub changes: u64,
    pub rows_staged: u64,
    pub bytes_staged: u64,
    pub slot_retained_bytes: i64,
    pub slot_safe_wal_size: Option<i64>,
    pub slot_wal_status: String,
    /// Seconds between the last staged commit and now (0 when nothing was waiting).
    pub latency_secs: f64,
    pub elapsed_ms: u64,
    /// Events put on the bus, and those whose put failed (re-announced by a later poll).
    #[serde(default)]
    pub events_put: u64,
    #[serde(default)]
    pub events_failed: u64,
    /// The stop position (`CdcStopPosition`) this task has reached: nothing more is staged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<Lsn>,
}

impl PollReport {
    /// A report with nothing done yet.
    pub fn new(
        task: &str,
        slot: &str,
        outcome: Outcome,
        checkpoint: Lsn,
        target: Lsn,
    ) -> PollReport {
        PollReport {
            task: task.to_owned(),
            outcome,
            slot: slot.to_owned(),
            start_checkpoint: checkpoint,
            checkpoint,
            target,
            peeks: 0,
            split_peeks: 0,
            split_at: None,
            batches: Vec::new(),
            transactions: 0,
            changes: 0,
            rows_staged: 0,
            bytes_staged: 0,
            slot_retained_bytes: 0,
            slot_safe_wal_size: None,
            slot_wal_status: String::new(),
            latency_secs: 0.0,
            elapsed_ms: 0,
            stopped_at: None,
            events_put: 0,
            events_failed: 0,
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC (in N s)` for a time in epoch milliseconds, as people read it.
pub fn human_time(epoch_ms: u64) -> String {
    let micros_since_2000 = (epoch_ms as i64 - 946_684_800_000) * 1000;
    let at = crate::change::format_pg_timestamp(micros_since_2000, ' ');
    let at = at.split('.').next().unwrap_or(&at).to_owned();
    let now = now_ms();
    if epoch_ms > now {
        format!("{at} UTC (in {} s)", (epoch_ms - now).div_ceil(1000))
    } else {
        format!("{at} UTC")
    }
}

/// This process as a lease owner: `cli-<host>-<pid>`.
pub fn local_owner() -> String {
    format!("cli-{}-{}", local_host(), std::process::id())
}

fn local_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "local".to_owned())
}

/// Whether a lease holder is a process of this host that no longer runs (a killed CLI run):
/// its lease is taken over at once instead of waiting for it to expire. Owners of other hosts
/// (and Lambda request ids) are never judged dead.
pub fn holder_is_dead_here(owner: &str) -> bool {
    let Some((host, pid)) = owner
        .strip_prefix("cli-")
        .and_then(|rest| rest.rsplit_once('-'))
    else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    host == local_host()
        && pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Reads the task item.
pub async fn get_task<St: StateStore>(state: &St, task: &str) -> Result<Option<TaskRecord>> {
    match state.get(task, "task").await? {
        Some(v) => Ok(Some(from_doc(v.doc, "task")?)),
        None => Ok(None),
    }
}

/// Stores a new task item; when another worker stored one first, theirs is returned (the
/// slot is shared by name).
pub async fn create_task<St: StateStore>(
    state: &St,
    task: &str,
    record: TaskRecord,
) -> Result<TaskRecord> {
    match state.put(task, "task", &to_doc(&record)?, None).await {
        Ok(_) => Ok(record),
        Err(Error::Conflict(_)) => get_task(state, task)
            .await?
            .ok_or_else(|| Error::Conflict(format!("task {task} vanished while being created"))),
        Err(e) => Err(e),
    }
}

/// Reads the `cdc` item.
pub async fn get_cdc<St: StateStore>(state: &St, task: &str) -> Result<Option<CdcRecord>> {
    match state.get(task, "cdc").await? {
        Some(v) => Ok(Some(from_doc(v.doc, "cdc")?)),
        None => Ok(None),
    }
}

/// How far CDC has staged a task: the checkpoint, or the target of a poll that drained
/// everything (a drain ending on a commit leaves the checkpoint at it, short of the WAL
/// after); `None` before its first poll.
pub async fn staged_through<St: StateStore>(state: &St, task: &str) -> Result<Option<Lsn>> {
    Ok(get_cdc(state, task).await?.map(|c| {
        let drained = c
            .last_poll
            .and_then(|v| serde_json::from_value::<PollReport>(v).ok())
            .filter(|p| matches!(p.outcome, Outcome::Drained))
            .map_or(Lsn::ZERO, |p| p.target);
        Lsn(c.checkpoint).max(drained)
    }))
}

/// The poller's lease on the `cdc` item, and the checkpoint it moves.
#[derive(Debug, Clone)]
pub struct Lease {
    pub task: String,
    pub rec: CdcRecord,
    version: u64,
    ttl: Duration,
}

impl Lease {
    /// Takes the lease when it is free, expired, `owner`'s, held by a dead process of this
    /// host, or `force`d (a new item starts at `start`). `Err(Outcome::LeaseHeld)` when another
    /// live owner has it.
    pub async fn acquire<St: StateStore>(
        state: &St,
        task: &str,
        owner: &str,
        ttl: Duration,
        start: Lsn,
        force: bool,
    ) -> Result<std::result::Result<Lease, Outcome>> {
        for _ in 0..5 {
            let now = now_ms();
            let (mut rec, expected) = match state.get(task, "cdc").await? {
                None => (
                    CdcRecord {
                        checkpoint: start.0,
                        checkpoint_lsn: start,
                        ..CdcRecord::default()
                    },
                    None,
                ),
                Some(v) => (from_doc::<CdcRecord>(v.doc, "cdc")?, Some(v.version)),
            };
            if let Some(holder) = &rec.lease_owner
                && holder != owner
                && rec.lease_expires_ms > now
                && !force
                && !holder_is_dead_here(holder)
            {
                return Ok(Err(Outcome::LeaseHeld {
                    owner: holder.clone(),
                    expires_ms: rec.lease_expires_ms,
                }));
            }
            rec.lease_owner = Some(owner.to_owned());
            rec.lease_expires_ms = now + ttl.as_millis() as u64;
            match state.put(task, "cdc", &to_doc(&rec)?, expected).await {
                Ok(version) => {
                    return Ok(Ok(Lease {
                        task: task.to_owned(),
                        rec,
                        version,
                        ttl,
                    }));
                }
                Err(Error::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict(format!(
            "could not take the lease of task {task}"
        )))
    }

    /// The checkpoint `C`.
    pub fn checkpoint(&self) -> Lsn {
        Lsn(self.rec.checkpoint)
    }

    /// Step 5 of the effect order: `C → to`, conditional on the version read with the lease
    /// (so on the stored value still being `C` and the lease still ours). Never backwards; a
    /// committed batch also counts in `batch_seq`.
    pub async fn move_checkpoint<St: StateStore>(
        &mut self,
        state: &St,
        to: Lsn,
        batch: bool,
    ) -> Result<()> {
        if to <= self.checkpoint() {
            return Ok(());
        }
        let mut rec = self.rec.clone();
        rec.checkpoint = to.0;
        rec.checkpoint_lsn = to;
        if batch {
            rec.batch_seq += 1;
            rec.last_batch_end = Some(to);
        }
        // Each move renews the lease: a long drain keeps it while it makes progress.
        rec.lease_expires_ms = now_ms() + self.ttl.as_millis() as u64;
        self.write(state, rec).await
    }

    /// Records where a stop by commit time was found (at the checkpoint, under the lease).
    pub async fn record_stop<St: StateStore>(
        &mut self,
        state: &St,
        commit_time: i64,
    ) -> Result<()> {
        let mut rec = self.rec.clone();
        rec.stop_found = Some(StopFound {
            commit_time,
            lsn: self.checkpoint(),
        });
        self.write(state, rec).await
    }

    /// Renews the lease (at each peek: a drain that makes progress keeps a short lease).
    pub async fn renew<St: StateStore>(&mut self, state: &St) -> Result<()> {
        let mut rec = self.rec.clone();
        rec.lease_expires_ms = now_ms() + self.ttl.as_millis() as u64;
        self.write(state, rec).await
    }

    /// Writes `rec` under the lease: conditional on the version it holds (a lost race means
    /// another poller took the lease).
    async fn write<St: StateStore>(&mut self, state: &St, rec: CdcRecord) -> Result<()> {
        let version = state
            .put(&self.task, "cdc", &to_doc(&rec)?, Some(self.version))
            .await
            .map_err(|e| match e {
                Error::Conflict(m) => {
                    Error::Conflict(format!("lost the lease of task {}: {m}", self.task))
                }
                other => other,
            })?;
        self.rec = rec;
        self.version = version;
        Ok(())
    }

    /// Gives the lease back, recording the run (best effort: it expires anyway).
    pub async fn release<St: StateStore>(self, state: &St, report: Option<&PollReport>) {
        let mut rec = self.rec;
        rec.lease_owner = None;
        rec.lease_expires_ms = 0;
        if let Some(report) = report {
            rec.last_poll = serde_json::to_value(report).ok();
        }
        if let Ok(doc) = to_doc(&rec) {
            let _ = state.put(&self.task, "cdc", &doc, Some(self.version)).await;
        }
    }
}

/// Deletes the task's state (chunk items, plan, CDC checkpoint, then the task item, so a
/// partial reset is finished by a rerun): the task starts over with its next full load. Only
/// with nothing running for the task (teardown refuses while its slot is active).
pub async fn reset_task<St: StateStore>(state: &St, task: &str) -> Result<Vec<String>> {
    let mut deleted = Vec::new();
    if let Some((plan, _)) = get_plan(state, task).await? {
        for id in plan.chunk_ids() {
            state.delete(task, &id.state_key()).await?;
        }
        deleted.push(format!(
            "the plan and its {} chunks",
            plan.chunk_ids().len()
        ));
        state.delete(task, "plan").await?;
    }
    if let Some(reloads) = reload::reset(state, task).await? {
        deleted.push(reloads);
    }
    if get_cdc(state, task).await?.is_some() {
        state.delete(task, "cdc").await?;
        deleted.push("the CDC checkpoint".to_owned());
    }
    if get_task(state, task).await?.is_some() {
        state.delete(task, "task").await?;
        deleted.push("the task record".to_owned());
    }
    Ok(deleted)
}

/// The WAL position past every single-snapshot chunk of the task's load (a keyless table's is
/// one) and of its reloads: CDC batches that start later hold no transaction a load snapshot
/// saw, so they need not list rows by transaction. `None` without a load or reload.
pub async fn snapshot_horizon<St: StateStore>(state: &St, task: &str) -> Result<Option<Lsn>> {
    let reloads = reload::get_index(state, task).await?.horizon();
    let Some((plan, _)) = get_plan(state, task).await? else {
        return Ok(reloads);
    };
    let mut horizon = reloads;
    for t in plan.tables.iter().filter(|t| t.chunks.len() == 1) {
        let id = ChunkId {
            schema: t.schema.clone(),
            table: t.table.clone(),
            n: 0,
            reload: None,
        };
        match get_chunk(state, task, &id)
            .await?
            .map(|c| (c.status, c.snapshot_lsn))
        {
            Some((status, Some(lsn))) if status == "done" => {
                horizon = horizon.max(Some(lsn));
            }
            // Not exported yet: its snapshot is still to come, after anything staged now.
            _ => return Ok(Some(Lsn(u64::MAX))),
        }
    }
    Ok(horizon)
}

mod load;
pub use load::{
    ChunkId, ChunkRecord, Claim, PlanRecord, PlannedTable, StagedNames, claim_chunk,
    complete_chunk, complete_plan, create_plan, get_chunk, get_plan, get_plan_of, plan_key,
};

pub mod reload;

#[cfg(test)]
mod tests;
