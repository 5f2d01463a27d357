//! A task's reloads (DMS's "reload table", Debezium's incremental snapshot): the `reloads`
//! item lists them; each has a plan and chunk items of its own (`reload#<R0>#plan`,
//! `reload#<R0>#chunk#..`), moved as the load's are.
//!
//! An entry is written (`starting`) before the reload reads its position R0, so every CDC
//! poll whose drain target is past R0 reads it (see [`super::snapshot_horizon`]) and lists
//! its batches' rows by transaction: a reader can then skip what a reload's snapshot saw.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::state::{StateStore, from_doc, now_ms, to_doc};

/// The `reloads` item.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadIndex {
    pub reloads: Vec<ReloadEntry>,
}

/// One reload of some tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadEntry {
    /// Who started it, and when (it is named so until its position is read).
    pub started_by: String,
    pub started_ms: u64,
    /// `starting` (no position yet), `planned`, `complete`, `abandoned` (its columns changed
    /// before it was complete: a new reload of its tables took its place).
    pub status: String,
    /// Its position R0: CDC stages every change after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r0: Option<Lsn>,
    /// The tables, `schema.table` as the source names them.
    pub tables: Vec<String>,
    /// Complete: the WAL position past its single-snapshot chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub horizon: Option<Lsn>,
}

impl ReloadEntry {
    /// Starting for longer than [`STALE_START_MS`]: its reload died before reading R0.
    pub fn is_stale(&self) -> bool {
        self.status == "starting" && now_ms().saturating_sub(self.started_ms) > STALE_START_MS
    }
}

/// An entry `starting` for longer than this belongs to a reload that died before reading its
/// position: the next reload drops it.
pub const STALE_START_MS: u64 = 3_600_000;

const KEY: &str = "reloads";

/// Reads the `reloads` item (empty without one).
pub async fn get_index<St: StateStore>(state: &St, task: &str) -> Result<ReloadIndex> {
    Ok(match state.get(task, KEY).await? {
        Some(v) => from_doc(v.doc, "reloads")?,
        None => ReloadIndex::default(),
    })
}

/// Changes the `reloads` item with a conditional write, read again on a lost race.
pub async fn update_index<St: StateStore, T>(
    state: &St,
    task: &str,
    mut change: impl FnMut(&mut ReloadIndex) -> Result<T>,
) -> Result<T> {
    for _ in 0..20 {
        let (mut index, version) = match state.get(task, KEY).await? {
            Some(v) => (from_doc::<ReloadIndex>(v.doc, "reloads")?, Some(v.version)),
            None => (ReloadIndex::default(), None),
        };
        let out = change(&mut index)?;
        match state.put(task, KEY, &to_doc(&index)?, version).await {
            Ok(_) => return Ok(out),
            Err(Error::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::Conflict(format!(
        "task {task}: the reloads item kept changing under this writer"
    )))
}

impl ReloadIndex {
    /// The WAL position CDC lists rows by transaction up to, for reloads: past every complete
    /// one's single-snapshot chunks, and unbounded while one is starting or planned (its
    /// snapshots are still to come).
    pub fn horizon(&self) -> Option<Lsn> {
        let mut h = None;
        for r in &self.reloads {
            match r.status.as_str() {
                "complete" => h = h.max(r.horizon),
                "abandoned" => {}
                "starting" if r.is_stale() => {}
                _ => return Some(Lsn(u64::MAX)),
            }
        }
        h
    }

    /// The position for a new reload: `flushed`, or just past the newest reload's when that
    /// is not behind it (no commit ends between two adjacent byte positions, so the reload
    /// still divides the WAL where `flushed` does).
    pub fn next_position(&self, flushed: Lsn) -> Lsn {
        let newest = self.reloads.iter().filter_map(|r| r.r0).max();
        match newest {
            Some(n) if n >= flushed => Lsn(n.0 + 1),
            _ => flushed,
        }
    }

    /// Drops entries whose reload died before reading its position.
    pub fn drop_stale(&mut self) {
        self.reloads.retain(|r| !r.is_stale());
    }

    /// The unfinished reload of exactly these tables, to resume.
    pub fn unfinished(&self, tables: &[String]) -> Option<&ReloadEntry> {
        self.reloads
            .iter()
            .find(|r| r.status == "planned" && r.tables == tables)
    }
}

/// Deletes every reload's plan and chunks and the `reloads` item (a task started over).
pub async fn reset<St: StateStore>(state: &St, task: &str) -> Result<Option<String>> {
    let index = get_index(state, task).await?;
    if index.reloads.is_empty() && state.get(task, KEY).await?.is_none() {
        return Ok(None);
    }
    for r in &index.reloads {
        let Some(r0) = r.r0 else { continue };
        if let Some((plan, _)) = super::get_plan_of(state, task, Some(r0)).await? {
            for id in plan.chunk_ids() {
                state.delete(task, &id.state_key()).await?;
            }
            state.delete(task, &super::plan_key(Some(r0))).await?;
        }
    }
    state.delete(task, KEY).await?;
    Ok(Some(format!("{} reloads", index.reloads.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(status: &str, horizon: Option<u64>) -> ReloadEntry {
        ReloadEntry {
            started_by: "me".to_owned(),
            started_ms: now_ms(),
            status: status.to_owned(),
            r0: Some(Lsn(0x100)),
            tables: vec!["public.t".to_owned()],
            horizon: horizon.map(Lsn),
        }
    }

    #[test]
    fn the_horizon_is_open_while_a_reload_runs() {
        let mut index = ReloadIndex::default();
        assert_eq!(index.horizon(), None);
        index.reloads.push(entry("complete", Some(0x200)));
        index.reloads.push(entry("complete", None));
        assert_eq!(index.horizon(), Some(Lsn(0x200)));
        index.reloads.push(entry("starting", None));
        assert_eq!(index.horizon(), Some(Lsn(u64::MAX)));
        index.reloads[2].status = "planned".to_owned();
        assert_eq!(index.horizon(), Some(Lsn(u64::MAX)));
        index.reloads[2].status = "abandoned".to_owned();
        assert_eq!(index.horizon(), Some(Lsn(0x200)));
    }

    #[test]
    fn each_reload_gets_its_own_position() {
        let mut index = ReloadIndex::default();
        assert_eq!(index.next_position(Lsn(0x100)), Lsn(0x100));
        index.reloads.push(entry("planned", None));
        // The flushed position has not moved since (synchronous_commit = off): just past it.
        assert_eq!(index.next_position(Lsn(0x100)), Lsn(0x101));
        index.reloads.push(ReloadEntry {
            r0: Some(Lsn(0x101)),
            ..entry("abandoned", None)
        });
        assert_eq!(index.next_position(Lsn(0x100)), Lsn(0x102));
        assert_eq!(index.next_position(Lsn(0x300)), Lsn(0x300));
        index.reloads.push(ReloadEntry {
            r0: None,
            ..entry("starting", None)
        });
        assert_eq!(index.next_position(Lsn(0x101)), Lsn(0x102));
    }

    #[test]
    fn a_reload_that_died_starting_is_dropped_later() {
        let mut index = ReloadIndex::default();
        let mut old = entry("starting", None);
        old.started_ms -= STALE_START_MS + 1;
        index.reloads.push(old);
        index.reloads.push(entry("starting", None));
        index.reloads.push(entry("planned", None));
        index.drop_stale();
        assert_eq!(index.reloads.len(), 2);
        assert!(index.unfinished(&["public.t".to_owned()]).is_some());
        assert!(index.unfinished(&["public.u".to_owned()]).is_none());
    }
}
