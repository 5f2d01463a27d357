//! Apply staged data to a target PostgreSQL (PG → PG migration, DESIGN §7).
//!
//! # Effect order
//!
//! 1. The target gets `pgshift.applied (task, load_complete, position, batches)`: the applied
//!    position lives in the target, written in the same transaction as the data it covers.
//! 2. **Load** (once; `apply/load.rs`): the source's schema built as pg_restore would
//!    (`apply/schema.rs`: pre-data, then the load, then post-data in parallel; or the user's
//!    tables with `--target-prep truncate|keep`), the tables truncated together, each chunk in
//!    its own transaction on one of N connections, recorded in `pgshift.loaded` (a crash loses
//!    at most the chunks in flight; the rerun skips the recorded ones), then the task's row
//!    set to `load_complete`, `position = L0`.
//! 3. **CDC**: the batch manifests are read in LSN order; a batch whose end is at or before the
//!    position is skipped (already applied). Each batch is one transaction: each table's
//!    changes in commit order, in runs applied set-based (`apply/batch.rs`: copied into a
//!    temporary table, reduced to the net effect per key, then one delete, one update and one
//!    insert) between the changes that need their order kept (truncates, schema versions with
//!    their columns added or dropped, a keyless table's updates and deletes), which go row by
//!    row; then the position moves to the batch's end, conditional on it still being the
//!    batch's start. A crash mid-batch rolls the batch back; the rerun applies it once.
//!    Unchanged TOAST values are left out of the update, so the target keeps its current
//!    value (or the one an earlier change of the batch gave it).
//!
//! Tables are applied one after another inside a batch (each in commit order), as a native
//! subscriber does: with `session_replication_role = replica`, so a target that has foreign
//! keys (brought by the user) does not check them against a half-applied batch.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::config::{PgConfig, check_task_name};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::source;
use crate::staging::ObjectSink;
use crate::staging::layout::{self, BatchFile, BatchManifest, LoadManifest, Snapshot};
use crate::state::StateStore;
use crate::state::records;

/// What an apply run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub task: String,
    pub load_applied: bool,
    pub load_rows: u64,
    /// Load chunks applied by this run, and those a killed earlier run had applied.
    #[serde(default)]
    pub load_chunks: u64,
    #[serde(default)]
    pub load_chunks_resumed: u64,
    pub batches_applied: u64,
    pub changes_applied: u64,
    /// Of those, the changes applied set-based (the rest went row by row).
    #[serde(default)]
    pub changes_set_based: u64,
    pub position: Lsn,
    /// Statements of the staged schema run on the target (pre-data and post-data).
    #[serde(default)]
    pub schema_items: u64,
    /// What of the staged schema the target refused, with why (and what was not carried).
    #[serde(default)]
    pub schema_skipped: Vec<String>,
    /// The deadline came before every staged batch was applied (the next run goes on).
    #[serde(default)]
    pub stopped_at_deadline: bool,
    /// Tables whose reload (DMS's "reload table") this run applied, their rows, and the
    /// changes after each reload's position re-applied over them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reloads_applied: Vec<String>,
    #[serde(default)]
    pub reload_rows: u64,
    #[serde(default)]
    pub reload_changes_replayed: u64,
}

/// How apply runs.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Target connections loading chunks at once.
    pub load_workers: usize,
    /// How the target's tables are prepared for the load.
    pub target_prep: TargetPrep,
    /// Stop cleanly before this (a Lambda's time): no chunk or batch is started after it; what
    /// was applied stays, the next run resumes at the chunk or batch.
    pub deadline: Option<std::time::Instant>,
    /// Counts the load's chunks (total and done), rows and bytes as they load, for a progress
    /// display.
    pub progress: Option<std::sync::Arc<crate::progress::Progress>>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            load_workers: 2,
            target_prep: TargetPrep::Create,
            deadline: None,
            progress: None,
        }
    }
}

/// Applies everything staged that the target has not applied yet.
pub async fn run<S: ObjectSink>(sink: &S, target: &PgConfig, task: &str) -> Result<ApplyReport> {
    run_with(sink, target, task, ApplyOptions::default()).await
}

/// [`run`], with options.
pub async fn run_with<S: ObjectSink>(
    sink: &S,
    target: &PgConfig,
    task: &str,
    opts: ApplyOptions,
) -> Result<ApplyReport> {
    let mut report = ApplyReport {
        task: task.to_owned(),
        ..ApplyReport::default()
    };
    let mut session = Session::open(sink, target, task, opts, &mut report).await?;
    session.apply_pending(sink, &mut report).await?;
    Ok(report)
}

/// Whether the stage holds CDC batches of a task whose full load is not staged yet (its
/// `Load Finished` is to come): nothing can be applied before it.
pub async fn waiting_for_load<S: ObjectSink>(sink: &S) -> Result<bool> {
    if !layout::load_manifest_keys(sink).await?.is_empty() {
        return Ok(false);
    }
    let keys = layout::batch_manifest_keys(sink).await?;
    Ok(require_no_load(sink, &keys).await.is_err())
}

/// A target connection set up to apply a task's batches (kept across [`run_until`]'s rounds).
struct Session {
    client: Client,
    task: String,
    tables: Tables,
    snapshots: HashMap<(String, String), (Snapshot, Lsn)>,
    /// The target has the task's load (or it has none): later rounds only apply batches.
    load_complete: bool,
    deadline: Option<std::time::Instant>,
    /// How the target's tables came to be: a stage under transformation rules goes into
    /// tables the user made (`truncate` / `keep`), never into ones built from the source.
    target_prep: TargetPrep,
    /// Staged reloads and those the target applied.
    reloads: reload::Reloads,
}

impl Session {
    /// Connects, creates the bookkeeping, and applies the load if the target lacks it.
    async fn open<S: ObjectSink>(
        sink: &S,
        target: &PgConfig,
        task: &str,
        opts: ApplyOptions,
        report: &mut ApplyReport,
    ) -> Result<Session> {
        check_task_name(task)?;
        let mut cfg = target.clone();
        cfg.application_name = "pgshift-apply".to_owned();
        let mut client = source::connect(&cfg).await?;
        let (mut load_complete, position) = open_target(sink, &client, task).await?;
        replica_role(&client).await?;
        report.position = position;
        let mut tables = Tables::default();
        if !load_complete {
            match load::apply_load(sink, &mut client, &cfg, task, opts.clone(), &mut tables).await?
            {
                Some(loaded) => {
                    report.load_applied = true;
                    report.load_rows += loaded.rows;
                    report.load_chunks += loaded.chunks;
                    report.load_chunks_resumed += loaded.resumed;
                    report.position = loaded.l0;
                    report.schema_items += loaded.schema.items;
                    report.schema_skipped.extend(loaded.schema.skipped);
                    load_complete = true;
                }
                None => require_no_load(sink, &layout::batch_manifest_keys(sink).await?).await?,
            }
        }
        let reloads = reload::Reloads::read(sink, &client, task).await?;
        let mut snapshots = load_snapshots(sink).await?;
        reloads.snapshots(sink, &mut snapshots).await?;
        Ok(Session {
            client,
            task: task.to_owned(),
            tables,
            snapshots,
            load_complete,
            deadline: opts.deadline,
            target_prep: opts.target_prep,
            reloads,
        })
    }

    /// Applies every staged batch after `report.position`, moving it.
    async fn apply_pending<S: ObjectSink>(
        &mut self,
        sink: &S,
        report: &mut ApplyReport,
    ) -> Result<()> {
        self.reloads.refresh(sink).await?;
        self.apply_reloads(sink, report).await?;
        let keys = layout::batch_manifest_keys(sink).await?;
        let ends: std::collections::HashSet<Lsn> = keys
            .iter()
            .filter_map(|k| layout::batch_range(k))
            .map(|(_, e)| e)
            .collect();
        for key in pending_batches(&keys, report.position)? {
            if self
                .deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
            {
                report.stopped_at_deadline = true;
                break;
            }
            let m: BatchManifest = layout::get_json(sink, &key, "a batch manifest").await?;
            // The chain: the batch before this one must be in the stage.
            if let Some(prev) = m.prev_end_lsn
                && !ends.contains(&prev)
            {
                return Err(Error::Staged(format!(
                    "{key} follows a batch that ended at {prev}, whose manifest is missing from {}: staged data was lost or removed",
                    sink.describe()
                )));
            }
            if m.transformed && self.target_prep == TargetPrep::Create {
                return Err(Error::Staged(transformed_stage(&format!(
                    "the batch from {}",
                    m.start_lsn
                ))));
            }
            let at = Applying {
                task: &self.task,
                position: report.position,
                snapshots: &self.snapshots,
            };
            let (changes, set_based) =
                apply_batch(sink, &mut self.client, &m, &at, &mut self.tables).await?;
            report.batches_applied += 1;
            report.changes_applied += changes;
            report.changes_set_based += set_based;
            report.position = m.end_lsn;
            self.apply_reloads(sink, report).await?;
        }
        Ok(())
    }

    /// The reloads due at the target's position, applied.
    async fn apply_reloads<S: ObjectSink>(
        &mut self,
        sink: &S,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let done = reload::apply_due(
            sink,
            &mut self.client,
            (&self.task, report.position),
            self.target_prep,
            &mut self.reloads,
            &mut self.tables,
            &mut self.snapshots,
        )
        .await?;
        report.reloads_applied.extend(done.tables);
        report.reload_rows += done.rows;
        report.reload_changes_replayed += done.replayed;
        Ok(())
    }
}

/// Where [`run_until`] stops, and how it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Until {
    /// The WAL position the target must hold everything up to.
    pub position: Lsn,
    /// Between apply runs.
    pub every: std::time::Duration,
    /// At most, for CDC to stage up to the position.
    pub wait: std::time::Duration,
}

/// Applies until the target holds everything the source committed up to `until`: batches are
/// applied as they are staged while CDC (another process, or the scheduled Lambda) moves the
/// checkpoint, every `every`; done once what CDC staged (read before an apply run, so every
/// batch up to it is in the stage) or the target's position is at or past `until`.
pub async fn run_until<S: ObjectSink, St: StateStore>(
    sink: &S,
    state: &St,
    target: &PgConfig,
    task: &str,
    until: &Until,
    opts: ApplyOptions,
) -> Result<ApplyReport> {
    let Until {
        position: until,
        every,
        wait,
    } = *until;
    let mut total = ApplyReport {
        task: task.to_owned(),
        ..ApplyReport::default()
    };
    let started = std::time::Instant::now();
    // One connection for every round once the target has the load.
    let mut session: Option<Session> = None;
    loop {
        let checkpoint = records::staged_through(state, task).await?;
        let mut s = match session.take() {
            Some(s) if s.load_complete => s,
            _ => Session::open(sink, target, task, opts.clone(), &mut total).await?,
        };
        s.apply_pending(sink, &mut total).await?;
        session = Some(s);
        if checkpoint.is_some_and(|c| c >= until) || total.position >= until {
            return Ok(total);
        }
        // A task whose CDC has not polled yet has no checkpoint: wait for it; one that
        // pgshift never created for CDC cannot get there.
        if checkpoint.is_none() && records::get_task(state, task).await?.is_none() {
            return Err(Error::config(
                "until",
                format!(
                    "task {task} has no state in {}: run `pgshift full-load --cdc` or `pgshift cdc` (or their Lambdas) to stage changes up to {until}",
                    state.describe()
                ),
            ));
        }
        let staged = checkpoint.unwrap_or(Lsn::ZERO);
        if started.elapsed() >= wait {
            return Err(Error::Source(format!(
                "the target of task {task} is at {}, CDC staged through {staged}, not yet {until} after {} s: is `pgshift cdc --follow` (or the scheduled poller) running?",
                total.position,
                wait.as_secs()
            )));
        }
        tracing::info!(task, target = %total.position, staged = %staged, until = %until, "waiting for CDC to stage up to the position");
        tokio::time::sleep(every).await;
    }
}

mod batch;
mod changes;
mod file;
mod load;
mod reload;
mod schema;
mod target;

pub use schema::TargetPrep;

use file::read_file;
use target::Tables;

/// Runs the session as PostgreSQL's own subscriber does (`session_replication_role =
/// replica`): the target's foreign keys and user triggers do not fire for what apply writes,
/// so tables may be loaded and batches applied table by table whatever their references (the
/// source already enforced them). It takes a superuser (or, on 15+, `GRANT SET ON PARAMETER
/// session_replication_role`); without it, deferrable constraints are deferred to commit and
/// a target with other foreign keys gets them checked statement by statement.
async fn replica_role(client: &Client) -> Result<bool> {
    // Room for a batch's temporary tables and its folds' sorts in memory (the defaults, 8 MB
    // and 4 MB, spill a 40,000-change run to disk).
    client
        .batch_execute("set temp_buffers = '128MB'; set work_mem = '64MB'")
        .await
        .map_err(|e| Error::postgres("sizing the apply session's memory", e))?;
    match client
        .batch_execute("set session_replication_role = replica")
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            tracing::warn!(
                "the target role may not set session_replication_role: its foreign keys and triggers fire during apply (deferrable constraints are deferred to each commit)"
            );
            Ok(false)
        }
        Err(e) => Err(Error::postgres(
            "setting session_replication_role on the target",
            e,
        )),
    }
}

/// The target's bookkeeping created if missing, and where it stands: whether the load is
/// applied (a task started over stages a load from a new L0: then it is not) and its position.
async fn open_target<S: ObjectSink>(sink: &S, client: &Client, task: &str) -> Result<(bool, Lsn)> {
    client
        .batch_execute(crate::target::BOOKKEEPING)
        .await
        .map_err(|e| Error::postgres("creating pgshift.applied in the target", e))?;
    client
        .execute(
            "insert into pgshift.applied (task) values ($1) on conflict do nothing",
            &[&task],
        )
        .await
        .map_err(|e| Error::postgres("registering the task in the target", e))?;
    let row = client
        .query_one(
            "select load_complete, position, l0 from pgshift.applied where task = $1",
            &[&task],
        )
        .await
        .map_err(|e| Error::postgres("reading the applied position", e))?;
    let mut load_complete: bool = row.get(0);
    let position_text: String = row.get(1);
    let applied_l0: Option<String> = row.get(2);
    let position = position_text
        .parse()
        .map_err(|e: crate::lsn::LsnParseError| Error::Source(format!("pgshift.applied: {e}")))?;
    // A task started over (teardown --reset, a new full load) stages a load from a new L0:
    // the target is reloaded from it (the load truncates what it loads).
    if load_complete
        && let Some(l0) = staged_load_l0(sink).await?
        && applied_l0.is_some_and(|a| a != l0.to_string())
    {
        tracing::info!(task, l0 = %l0, "a new full load was staged: reloading the target");
        load_complete = false;
    }
    Ok((load_complete, position))
}

/// The L0 of the staged load (from its first table's manifest), if a load is staged.
async fn staged_load_l0<S: ObjectSink>(sink: &S) -> Result<Option<Lsn>> {
    let Some(key) = layout::load_manifest_keys(sink).await?.into_iter().next() else {
        return Ok(None);
    };
    let m: LoadManifest = layout::get_json(sink, &key, "a load manifest").await?;
    Ok(m.l0)
}

/// Without load manifests, batches that say the task began with a full load mean the load's
/// manifests are gone: an error, not a target without its rows.
async fn require_no_load<S: ObjectSink>(sink: &S, keys: &[String]) -> Result<()> {
    let Some(first) = keys.first() else {
        return Ok(());
    };
    let m: BatchManifest = layout::get_json(sink, first, "a batch manifest").await?;
    if m.after_load {
        return Err(Error::Staged(format!(
            "the task began with a full load, but its load manifests ({}) are missing from {}",
            layout::LOAD_MANIFESTS,
            sink.describe()
        )));
    }
    Ok(())
}

/// The batches a target at `position` has not applied, in order: those ending after it,
/// each starting where the one before ended or later (idle stretches leave gaps). A batch
/// straddling the position means two batches overlap: an error, never a guess.
fn pending_batches(keys: &[String], position: Lsn) -> Result<Vec<String>> {
    let mut at = position;
    let mut out = Vec::new();
    for key in keys {
        let (start, end) = layout::batch_range(key)
            .ok_or_else(|| Error::Staged(format!("{key} is not a batch manifest key")))?;
        if end <= position {
            continue;
        }
        if start < at {
            return Err(Error::Staged(format!(
                "{key} starts at {start} but the target is at {at}: batches overlap"
            )));
        }
        out.push(key.clone());
        at = end;
    }
    Ok(out)
}

/// What a batch is applied against: the task, the target's position, and the load's
/// single-snapshot tables.
struct Applying<'a> {
    task: &'a str,
    position: Lsn,
    snapshots: &'a HashMap<(String, String), (Snapshot, Lsn)>,
}

/// The tables the load exported from one snapshot (keyless ones always are), with that
/// snapshot and the WAL position after it: CDC changes of transactions it saw are skipped.
async fn load_snapshots<S: ObjectSink>(
    sink: &S,
) -> Result<HashMap<(String, String), (Snapshot, Lsn)>> {
    let mut out = HashMap::new();
    for key in layout::load_manifest_keys(sink).await? {
        let m: LoadManifest = layout::get_json(sink, &key, "a load manifest").await?;
        if let [chunk] = m.chunks.as_slice()
            && let (Some(text), Some(lsn)) = (&chunk.snapshot, chunk.snapshot_lsn)
        {
            let snap = Snapshot::parse(text)
                .ok_or_else(|| Error::Staged(format!("{key}: malformed snapshot {text:?}")))?;
            out.insert((m.schema.clone(), m.table.clone()), (snap, lsn));
        }
    }
    Ok(out)
}

/// Which rows of a file the load's snapshot already holds (their transaction committed
/// before the chunk was read): only for a batch that starts before the snapshot's position.
pub(super) fn seen_rows(
    m: &BatchManifest,
    file: &BatchFile,
    snapshot: Option<&(Snapshot, Lsn)>,
) -> Result<Vec<bool>> {
    let Some((snap, lsn)) = snapshot else {
        return Ok(Vec::new());
    };
    if m.start_lsn >= *lsn || file.xids.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen = Vec::with_capacity(file.rows as usize);
    for run in &file.xids {
        let saw = snap.saw(run.xid);
        seen.extend(std::iter::repeat_n(saw, run.rows as usize));
    }
    if seen.len() as u64 != file.rows {
        return Err(Error::Staged(format!(
            "{}: its transaction runs cover {} rows, the file has {}",
            file.key,
            seen.len(),
            file.rows
        )));
    }
    Ok(seen)
}

/// Why a stage written under transformation rules is not applied.
pub(crate) fn transformed_stage(what: &str) -> String {
    format!(
        "{what} was staged under transformation rules (names changed, columns left out): apply cannot build such a target from the source's schema; create the target's tables under the staged names and apply with --target-prep truncate (or keep)"
    )
}

/// Why a stage with millisecond Parquet timestamps is not applied.
pub(crate) fn millisecond_stage(what: &str) -> String {
    format!(
        "{what} was staged with S3Settings.ParquetTimestampInMillisecond: its timestamps lost their microseconds, which cannot make a target equal to the source; stage this task without it to apply it"
    )
}

/// Applies one batch in one target transaction: each file's changes in commit order, in runs
/// applied set-based ([`batch::Run`]) between the changes that need order (truncates, schema
/// versions, a keyless table's updates and deletes, key moves of a non-primary replica
/// identity), which are applied row by row; then the applied position moves to its end.
async fn apply_batch<S: ObjectSink>(
    sink: &S,
    client: &mut Client,
    m: &BatchManifest,
    at: &Applying<'_>,
    tables: &mut Tables,
) -> Result<(u64, u64)> {
    let (task, position) = (at.task, at.position);
    if m.format.timestamp_ms {
        return Err(Error::Staged(millisecond_stage(&format!(
            "the batch from {}",
            m.start_lsn
        ))));
    }
    if !m.cdc_ops.is_all() {
        return Err(Error::Staged(format!(
            "the batch from {} was staged with S3Settings.{}: it holds only some of the changes, which cannot make a target equal to the source; stage this task without it to apply it",
            m.start_lsn,
            m.cdc_ops.setting()
        )));
    }
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::postgres("starting a batch transaction", e))?;
    tx.batch_execute("set constraints all deferred")
        .await
        .map_err(|e| Error::postgres("deferring the target's constraints", e))?;
    let (mut applied, mut set_based) = (0u64, 0u64);
    let mut statements: HashMap<String, tokio_postgres::Statement> = HashMap::new();
    // A file's last run executes while the next file is read and decoded: its statements are
    // sent first, so the target runs them before anything of the next file (another table,
    // with its own temporary tables); reading overlaps the target's work.
    let mut pending: Option<batch::Run> = None;
    // Files with schema changes and no rows first: partitions created or attached (their rows
    // come through the root's file) and tables created, before the rows that need them.
    // A table's Parquet parts keep their order (an empty later part is a schema change after
    // the earlier part's rows).
    let mut files: Vec<&BatchFile> = m.files.iter().collect();
    let parts = |f: &BatchFile| {
        m.files
            .iter()
            .filter(|o| o.schema == f.schema && o.table == f.table)
            .count()
    };
    files.sort_by_key(|f| f.rows > 0 || parts(f) > 1);
    for file in files {
        let last = pending.take();
        let previous = async {
            match last {
                Some(r) => r.apply(&tx).await,
                None => Ok(()),
            }
        };
        let snapshot = at.snapshots.get(&(file.schema.clone(), file.table.clone()));
        let this = read_file(sink, &tx, m, file, snapshot, tables, &mut statements);
        let (done, read) = futures_util::future::join(previous, this).await;
        done?;
        let (n, s, run) = read?;
        applied += n;
        set_based += s;
        pending = run;
    }
    if let Some(r) = pending {
        r.apply(&tx).await?;
    }
    let moved = tx
        .execute(
            "update pgshift.applied set position = $2, batches = batches + 1, updated_at = now(), last_commit_ts = coalesce(nullif($4, '')::timestamptz, last_commit_ts) where task = $1 and position = $3",
            &[&task, &m.end_lsn.to_string(), &position.to_string(), &m.last_commit_ts],
        )
        .await
        .map_err(|e| Error::postgres("moving the applied position", e))?;
    if moved != 1 {
        return Err(Error::Conflict(format!(
            "another apply of task {task} moved the target's position"
        )));
    }
    tx.commit()
        .await
        .map_err(|e| Error::postgres("committing a batch", e))?;
    Ok((applied, set_based))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::MemorySink;
    use crate::staging::layout::manifest_key;
    use bytes::Bytes;

    #[tokio::test]
    async fn a_rerun_resumes_after_the_applied_position_and_never_applies_twice() {
        let sink = MemorySink::new();
        let batches = [(0x10, 0x20), (0x20, 0x30), (0x38, 0x40)];
        for (a, b) in batches {
            sink.put(&manifest_key(Lsn(a), Lsn(b)), Bytes::from_static(b"{}"))
                .await
                .unwrap();
        }
        let keys = layout::batch_manifest_keys(&sink).await.unwrap();
        let pending = |at: u64| pending_batches(&keys, Lsn(at));
        assert_eq!(pending(0x10).unwrap().len(), 3, "from the load's L0");
        assert_eq!(
            pending(0x20).unwrap(),
            [
                manifest_key(Lsn(0x20), Lsn(0x30)),
                manifest_key(Lsn(0x38), Lsn(0x40))
            ],
            "a crash after the first batch resumes with the second"
        );
        assert_eq!(pending(0x30).unwrap().len(), 1, "an idle gap is fine");
        assert!(
            pending(0x40).unwrap().is_empty(),
            "everything applied: nothing twice"
        );
        let err = pending(0x18).unwrap_err();
        assert!(
            matches!(err, Error::Staged(_)) && err.to_string().contains("overlap"),
            "{err}"
        );
        // Two manifests for overlapping stretches are refused too.
        sink.put(
            &manifest_key(Lsn(0x2C), Lsn(0x50)),
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        let keys = layout::batch_manifest_keys(&sink).await.unwrap();
        assert!(pending_batches(&keys, Lsn(0x20)).is_err());
    }
}
