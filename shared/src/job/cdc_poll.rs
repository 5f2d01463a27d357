//! The CDC poller: drains the task's logical replication slot into staged files, exactly once.
//!
//! The job only sequences the effect order over the three seams: the source
//! ([`CdcSource`]: the peek, the slot), pure change decoding ([`crate::change::decoder`]),
//! staging ([`crate::staging::layout`] names every object) and state
//! ([`crate::state::records`]: the lease and the checkpoint move).
//!
//! # Effect order (DESIGN §4; never reorder)
//!
//! 1. **Lease.** A conditional write on the task's `cdc` item takes the lease when it is free,
//!    expired or ours. Another live owner → the run exits cleanly ([`Outcome::LeaseHeld`]).
//! 2. **Checkpoint.** `C` (a commit end LSN) is read. A missing slot, or one whose WAL is lost,
//!    is a terminal error telling the user how to start the task over. A slot behind `C` (a crash
//!    between steps 5 and 6 last time) is advanced to `C` first; a slot *ahead* of `C` would
//!    mean changes nobody staged are gone, which is a terminal error too.
//! 3. **Peek** up to `U`, the WAL flush position taken at start once it has reached the insert
//!    position (the peek cannot see past the flush position), in few large peeks (`upto_nchanges` only bounds a runaway backlog).
//!    The peek runs as `COPY (select lsn, data from pg_logical_slot_peek_binary_changes(..)) TO
//!    STDOUT (FORMAT binary)` (its values bound through `set_config`, [`crate::source::peek::start_peek`]):
//!    rows stream from the server with less work per row than a query's DataRows; client
//!    memory is bounded whatever the transaction size. The session's `statement_timeout` is
//!    the time left before the deadline: a peek the server cuts there is a clean stop.
//!
//!    **Split peek.** A peek materializes its whole output before the first row, on one
//!    backend. When the drain covers at least [`CdcOptions::split_min_wal_bytes`] of WAL
//!    (and `peek_sessions` is 2, the server is 12 or later and has a free slot), two backends
//!    decode at once: the peek session reads the task's slot up to the split point `M` (60% of
//!    the way from `C` to `U`), and a second session makes a *temporary* copy of the slot
//!    (`pg_copy_logical_replication_slot`, dropped by PostgreSQL with the session), advances
//!    the copy to `M` (a fast-forward decode) and peeks it from `M` to `U`. PostgreSQL skips,
//!    on the copy, every transaction whose commit record starts before `M`; the first peek
//!    includes exactly those; the client filters both by each transaction's commit position
//!    (`final_lsn` of Begin) as well, so the two halves partition the transactions exactly.
//!    Rows are read in order, the first half then the second, into the same batches: what is
//!    staged is byte for byte what one session stages. The task's slot is peeked and
//!    advanced (step 6) as before; only the throw-away copy moves early. If the second
//!    session fails, its half is read by the next peek, with one session.
//!    Batches are cut only at commit boundaries, by change count and bytes. If a manifest for
//!    a batch starting at `C` already exists (a crash after step 4 last time), the batch is cut
//!    exactly at that manifest's end, so the retry rewrites the same files and the same
//!    manifest: a consumer never sees two different batches starting at `C`.
//! 4. **Files, then manifest.** Each table's changes go to `<schema>/<table>/cdc/<C>.<ext>`,
//!    then `_manifests/cdc/<C>-<E>.json` lists the files, counts and LSNs. A retry from `C`
//!    overwrites the same keys with the same content.
//! 5. **Checkpoint `C → E`**, conditional on the version read with the lease (so on the stored
//!    value still being `C` and the lease still ours). It never moves backwards.
//! 6. **`pg_replication_slot_advance(slot, E)`.** This runs once per peek, for the last batch
//!    committed (each advance re-decodes from `restart_lsn`, so once per batch would multiply
//!    the server's work); step 2 covers a crash in between.
//!
//! When everything up to `U` was read, the checkpoint and the slot move to `U` even with no
//! change staged: an idle database (or one busy only in other databases) never pins WAL.
//!
//! Deadline: at a commit boundary past the soft deadline (the deadline minus a margin) the
//! current batch is committed and the run stops; if the hard deadline passes before step 5, the
//! batch is abandoned and the next run redoes it. Nothing is lost; a consumer may see a file
//! rewritten with the same content, never a gap.
//!
//! Change semantics: an UPDATE that changes the primary key is staged as D(old key) +
//! I(new row); TRUNCATE as a `T` record per table; unchanged TOAST values are marked per row and
//! filled from the old row under REPLICA IDENTITY FULL; a Relation message whose columns differ
//! from the stored schema writes `<schema>/<table>/_schema/<lsn>.json` and the manifest says at
//! which row of each file a schema version starts.

use batch::{Batch, Row};
use std::time::{Duration, Instant};

use crate::change::decoder::{self, Keep, Relations};
use crate::change::{Op, format_pg_timestamp, pg_now};
use crate::config::check_task_name;
use crate::error::{Error, Result};
use crate::events::BatchCommitted;
use crate::lsn::{Lsn, StopPosition};
use crate::options::CdcOptions;
use crate::pgoutput::{self, Message};
use crate::source::publication::peek_names;
use crate::source::{CdcSource, PeekRequest, PeekStream, PgSource};
use crate::staging::encode::Encoding;
use crate::staging::layout::{self, BatchManifest, SchemaVersions, manifest_key};
use crate::staging::{ObjectSink, ObjectWriter};
use crate::state::StateStore;
use crate::state::records::{Lease, TaskRecord};
use crate::state::records::{Outcome, PollReport};
use crate::task::{adopt_task, ensure_task};
use events::{failed, lag_change};

/// The way to start a task over once its slot cannot serve it (tested: `tests/src/safety.rs`).
fn start_over(task: &str) -> String {
    format!(
        "start the task over: pgshift teardown --task {task} --source <url> --state <state> --reset --yes, then pgshift full-load --task {task} --cdc (apply then reloads the target)"
    )
}

/// Runs one poll against the PostgreSQL source of `opts`: lease, drain, release.
pub async fn run<S: ObjectSink, St: StateStore>(
    sink: &S,
    state: &St,
    opts: &CdcOptions,
) -> Result<PollReport> {
    check_task_name(&opts.task)?;
    let source = match PgSource::connect(&opts.source).await {
        Ok(source) => source,
        Err(e) => return Err(failed(opts, e).await),
    };
    poll(&source, sink, state, opts).await
}

/// Runs one poll over any source: lease, drain, release.
pub async fn poll<Src: CdcSource, S: ObjectSink, St: StateStore>(
    source: &Src,
    sink: &S,
    state: &St,
    opts: &CdcOptions,
) -> Result<PollReport> {
    match Box::pin(poll_once(source, sink, state, opts)).await {
        Ok(report) => Ok(report),
        Err(e) => Err(failed(opts, e).await),
    }
}

async fn poll_once<Src: CdcSource, S: ObjectSink, St: StateStore>(
    source: &Src,
    sink: &S,
    state: &St,
    opts: &CdcOptions,
) -> Result<PollReport> {
    check_task_name(&opts.task)?;
    let started = Instant::now();
    if opts.create_if_missing
        && crate::state::records::get_task(state, &opts.task)
            .await?
            .is_none()
    {
        layout::check_writable(sink).await?;
    }
    let task = match &opts.native_start {
        Some(native) => adopt_task(source, state, &opts.task, native).await?,
        None => {
            ensure_task(
                source,
                state,
                &opts.task,
                &opts.capture(),
                opts.create_if_missing,
                "cdc",
            )
            .await?
        }
    };
    let lease = match Lease::acquire(
        state,
        &opts.task,
        &opts.owner,
        opts.lease_ttl,
        task.start_lsn,
        opts.force_lease,
    )
    .await?
    {
        Ok(lease) => lease,
        Err(outcome) => {
            tracing::info!(task = %opts.task, ?outcome, "another poller holds the lease");
            let mut report = PollReport::new(&opts.task, &task.slot, outcome, Lsn::ZERO, Lsn::ZERO);
            report.elapsed_ms = started.elapsed().as_millis() as u64;
            return Ok(report);
        }
    };
    sink.sweep().await?;
    let mut poller = Poller {
        source,
        sink,
        state,
        opts,
        task,
        lease,
        relations: Relations::default(),
        versions: SchemaVersions::new().with_op_field(opts.op_field()),
        publications: String::new(),
        // Read once the drain target is known (`begin_drain`): a reload that starts before
        // that target is seen.
        xid_horizon: None,
        row_buf: Vec::with_capacity(1024),
        txn_buf: Vec::new(),
        messages: false,
        ddl_messages: false,
        histories: std::collections::HashMap::new(),
    };
    let before = poller
        .lease
        .rec
        .last_poll
        .clone()
        .and_then(|v| serde_json::from_value::<PollReport>(v).ok());
    // The drain future is large (S3 writers per table): keep it on the heap.
    let mut result = Box::pin(poller.drain(started)).await;
    // An injected fault stands for a process that died: it releases nothing.
    if matches!(result, Err(Error::Injected(_))) {
        return result;
    }
    if let Ok(report) = result.as_mut()
        && opts.events.enabled()
        && let Some(mut change) = lag_change(opts, before.as_ref(), report)
    {
        change.slot = Some(poller.task.slot.clone());
        change.slot_retained_bytes = Some(report.slot_retained_bytes);
        let sent = opts.events.announce(&[change.event()]).await;
        report.events_put += sent.put;
        report.events_failed += sent.failed;
    }
    poller.lease.release(state, result.as_ref().ok()).await;
    result
}

struct Txn {
    xid: u32,
    commit_ts: i64,
    final_lsn: Lsn,
    /// The batch's changes and schema changes at its begin: a transaction that staged
    /// neither (only other applications' messages, or tables not selected) is not a batch's.
    staged_before: (u64, u64),
}

/// Where a peek's reading stands.
struct Cursor<W: ObjectWriter> {
    batch: Batch<W>,
    txn: Option<Txn>,
    /// Inside a transaction the other half of a split peek stages.
    skipping: bool,
    keep: Keep,
    stopped_early: bool,
    /// The first transaction committed after a stop time began: nothing more is read.
    stop_reached: bool,
    last_commit_ts: Option<i64>,
}

/// How one peek's reading ended.
struct PeekEnd {
    /// Cut by `upto_nchanges`, or a second half that failed: more is waiting.
    incomplete: bool,
}

struct Poller<'a, Src: CdcSource, S: ObjectSink, St: StateStore> {
    source: &'a Src,
    sink: &'a S,
    state: &'a St,
    opts: &'a CdcOptions,
    task: TaskRecord,
    lease: Lease,
    relations: Relations,
    versions: SchemaVersions,
    /// The peek's `publication_names`.
    publications: String,
    /// Batches starting before this may hold transactions a load snapshot saw.
    xid_horizon: Option<Lsn>,
    /// The encoded row being written (reused for every change).
    row_buf: Vec<u8>,
    /// The same row for the transaction file (PreserveTransactions).
    txn_buf: Vec<u8>,
    /// Peeks decode logical messages (PostgreSQL 14+): the schema-change messages.
    messages: bool,
    /// The task's trigger sends schema-change messages (else the catalog explains changes).
    ddl_messages: bool,
    /// Relations' definitions by id (`_manifests/schema/relations/`), read once a run.
    histories: std::collections::HashMap<u32, layout::RelationHistory>,
}

impl<Src: CdcSource, S: ObjectSink, St: StateStore> Poller<'_, Src, S, St> {
    fn checkpoint(&self) -> Lsn {
        self.lease.checkpoint()
    }

    /// Past the soft deadline, or asked to stop (SIGINT/SIGTERM of the CLI): the run stops
    /// at the next commit boundary, releasing its lease.
    fn soft_deadline_passed(&self) -> bool {
        self.opts
            .deadline
            .is_some_and(|d| Instant::now() + self.opts.safety_margin >= d)
            || self
                .opts
                .stop
                .as_ref()
                .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The WAL position staging stops at: a stop given as a position, or a stop by commit
    /// time found by an earlier poll (for the same time, at the checkpoint).
    fn stop_lsn(&self) -> Option<Lsn> {
        match self.opts.stop_position? {
            StopPosition::Lsn(l) => Some(l),
            StopPosition::CommitTime(t) => self
                .lease
                .rec
                .stop_found
                .filter(|f| f.commit_time == t && f.lsn >= self.checkpoint())
                .map(|f| f.lsn),
        }
    }

    /// A stop by commit time not found yet: the first transaction committed after it ends
    /// the drain before it.
    pub(super) fn stop_time_pending(&self) -> Option<i64> {
        match self.opts.stop_position? {
            StopPosition::CommitTime(t) if self.stop_lsn().is_none() => Some(t),
            _ => None,
        }
    }

    fn hard_deadline_passed(&self) -> bool {
        self.opts.deadline.is_some_and(|d| Instant::now() >= d)
    }

    async fn drain(&mut self, started: Instant) -> Result<PollReport> {
        let opts = self.opts;
        let (mut report, target, server_version) = self.begin_drain().await?;
        self.reannounce(&mut report).await?;
        let mut last_commit_ts: Option<i64> = None;
        // A split that failed once is not tried again in this run.
        let mut split_allowed = opts.peek_sessions >= 2 && server_version >= 120_000;
        loop {
            if self.checkpoint() >= target {
                break;
            }
            if self.soft_deadline_passed() {
                report.outcome = Outcome::DeadlineReached;
                break;
            }
            report.peeks += 1;
            self.lease.renew(self.state).await?;
            let split = if split_allowed {
                self.split_point(target).await?
            } else {
                None
            };
            let mut cursor = Cursor {
                batch: self.new_batch().await?,
                txn: None,
                skipping: false,
                keep: split.map_or(Keep::All, Keep::Below),
                stopped_early: false,
                stop_reached: false,
                last_commit_ts: None,
            };
            let end = self
                .read_peek(target, split, &mut cursor, &mut report)
                .await?;
            if end.incomplete && split.is_some() {
                split_allowed = false;
            }
            let stopped_early = cursor.stopped_early;
            if let Some(ts) = cursor.last_commit_ts {
                last_commit_ts = Some(ts);
            }
            if !stopped_early && cursor.batch.transactions > 0 {
                if let Some(ts) = Box::pin(self.commit_batch(cursor.batch, &mut report)).await? {
                    last_commit_ts = Some(ts);
                }
            } else {
                cursor.batch.abandon().await;
            }
            if cursor.stop_reached
                && let Some(t) = self.stop_time_pending()
            {
                // Recorded at the checkpoint the batch above moved to: later polls rest here.
                self.lease.record_stop(self.state, t).await?;
            }
            let stopped =
                stopped_early || cursor.stop_reached || report.outcome == Outcome::DeadlineReached;
            let drained = !stopped && !end.incomplete;
            if drained && self.checkpoint() < target {
                // Everything up to the target was read: the stretch after the last commit
                // (or an idle one) moves the checkpoint to the target too.
                self.lease
                    .move_checkpoint(self.state, target, false)
                    .await?;
            }
            // Step 6, once per peek, to the last checkpoint.
            self.advance_slot().await?;
            if stopped || drained {
                break;
            }
            report.outcome = Outcome::MoreWaiting;
        }
        self.finish_report(&mut report, last_commit_ts, started)
            .await?;
        Ok(report)
    }

    /// Before the loop: the publications synced, the peek session prepared, the slot at the
    /// checkpoint (step 2), the drain target taken. Returns the report begun, the target and
    /// the server's version.
    async fn begin_drain(&mut self) -> Result<(PollReport, Lsn, i32)> {
        let opts = self.opts;
        // The publications follow the selection; up to where the insert-only one exists
        // (an earlier version's task) the main one is read alone (`source::publication`).
        // A native start's publication is its user's: checked, never changed.
        let pubs = if self.task.adopted {
            self.source
                .adopted_publication(&self.task.publication, &opts.capture())
                .await?
        } else {
            self.source
                .sync_publications(&self.task.publication, &opts.capture())
                .await?
        };
        let server_version = self.source.prepare_peeks(&opts.decoding_work_mem).await?;
        self.messages = server_version >= 140_000;
        self.ddl_messages = self.messages && opts.capture_ddl && pubs.follows;
        let state = self.align_slot(pubs.since).await?;
        let mut target = self.source.drain_target().await?;
        // After the target: a reload writes its entry before reading its position, so one
        // whose position is before the target is listed here, and this drain's batches list
        // rows by transaction for it.
        self.xid_horizon = crate::state::records::snapshot_horizon(self.state, &opts.task).await?;
        if let Some(stop) = self.stop_lsn() {
            target = target.min(stop.max(self.checkpoint()));
        }
        self.publications = match pubs.since {
            Some(since) if self.checkpoint() >= since => peek_names(&self.task.publication, true),
            Some(since) => {
                target = target.min(since);
                peek_names(&self.task.publication, false)
            }
            None => peek_names(&self.task.publication, false),
        };
        let mut report = PollReport::new(
            &opts.task,
            &self.task.slot,
            Outcome::Drained,
            self.checkpoint(),
            target,
        );
        report.slot_retained_bytes = state.retained_bytes;
        report.slot_safe_wal_size = state.safe_wal_size;
        report.slot_wal_status = state.wal_status.clone();
        Ok((report, target, server_version))
    }

    async fn finish_report(
        &self,
        report: &mut PollReport,
        last_commit_ts: Option<i64>,
        started: Instant,
    ) -> Result<()> {
        if report.outcome == Outcome::MoreWaiting && self.checkpoint() >= report.target {
            report.outcome = Outcome::Drained;
        }
        report.checkpoint = self.checkpoint();
        if let Some(stop) = self.stop_lsn()
            && report.checkpoint >= stop
        {
            report.stopped_at = Some(stop);
        }
        report.latency_secs = match last_commit_ts {
            Some(ts) => ((pg_now() - ts).max(0) as f64) / 1e6,
            None => 0.0,
        };
        if let Some(s) = self.source.slot_state(&self.task.slot).await? {
            report.slot_retained_bytes = s.retained_bytes;
            report.slot_safe_wal_size = s.safe_wal_size;
            report.slot_wal_status = s.wal_status;
        }
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            task = %self.opts.task,
            slot = %self.task.slot,
            checkpoint = %report.checkpoint,
            target = %report.target,
            changes = report.changes,
            bytes = report.bytes_staged,
            batches = report.batches.len(),
            "cdc poll finished"
        );
        Ok(())
    }

    async fn advance_slot(&self) -> Result<()> {
        let cp = self.checkpoint();
        let state = self.slot_state().await?;
        if state.confirmed_flush_lsn.unwrap_or(Lsn::ZERO) < cp {
            self.source.advance(&self.task.slot, cp).await?;
        }
        Ok(())
    }

    /// A batch starting at the checkpoint, bound to an existing manifest's end if there is one.
    async fn new_batch(&self) -> Result<Batch<S::Writer>> {
        let mut b = Batch::empty(self.checkpoint());
        b.record_xids = self.xid_horizon.is_some_and(|h| b.start < h);
        b.date_partition = self.opts.date_partition;
        if self.opts.format.encoding == Encoding::Csv {
            if self.opts.csv_header {
                b.csv_header = Some((self.opts.commit_ts_column, self.opts.op_field()));
            }
            b.dialect = self.opts.csv_dialect.clone();
        }
        if let Some(path) = &self.opts.cdc_path {
            // Transaction files are CSV whatever the format, as DMS writes them.
            b.txn_path = Some(path.clone());
            b.txn_previous_ms = self.lease.rec.txn_file_ms;
            b.txn_gzip = self.opts.format.gzip;
            b.txn_dialect = self.opts.csv_dialect.clone();
        }
        let existing = self.sink.list(&layout::manifest_prefix(b.start)).await?;
        b.must_end = layout::existing_batch_end(&existing, b.start);
        Ok(b)
    }

    /// Steps 4 and 5 for a complete batch. Returns the last commit timestamp.
    async fn commit_batch(
        &mut self,
        mut batch: Batch<S::Writer>,
        report: &mut PollReport,
    ) -> Result<Option<i64>> {
        if batch.transactions == 0 {
            return Ok(None);
        }
        let opts = self.opts;
        let end = batch.last_end;
        let files = batch.finish_files().await?;
        let transaction_file = batch.finish_txn().await?;
        let manifest = BatchManifest {
            task: opts.task.clone(),
            batch_seq: self.lease.rec.batch_seq + 1,
            start_lsn: batch.start,
            end_lsn: end,
            first_commit_lsn: batch.first_commit.unwrap_or(batch.last_commit),
            last_commit_lsn: batch.last_commit,
            last_commit_ts: format!("{}Z", format_pg_timestamp(batch.last_commit_ts, 'T')),
            transactions: batch.transactions,
            changes: batch.changes,
            format: opts.format,
            commit_ts_column: opts.commit_ts_column,
            files,
            prev_end_lsn: self.lease.rec.last_batch_end,
            after_load: self.task.created_by == "full-load",
            cdc_ops: opts.cdc_ops,
            op_field: opts.op_field(),
            header: opts.csv_header && opts.format.encoding == Encoding::Csv,
            csv: if opts.format.encoding == Encoding::Csv {
                opts.csv_dialect.clone()
            } else {
                Default::default()
            },
            transformed: opts.selection.transforms_names(),
            transaction_file,
        };
        let key = manifest_key(batch.start, end);
        layout::put_json(self.sink, &key, &manifest).await?;
        if self.hard_deadline_passed() {
            // Abandon before step 5: the next run re-commits the same manifest.
            return Err(Error::Deadline(
                "the deadline passed before the checkpoint could move".to_owned(),
            ));
        }
        // Every batch before this one was announced (idle stretches between are no batches).
        let announced_before = self
            .lease
            .rec
            .announced_through
            .is_some_and(|a| manifest.prev_end_lsn.is_none_or(|p| a >= p));
        // Step 5 (it records the transaction file's time: the next file is named later).
        if let Some(t) = &manifest.transaction_file {
            self.lease.rec.txn_file_ms = Some(t.unix_ms);
        }
        self.lease.move_checkpoint(self.state, end, true).await?;
        // The record is durable: announce it (a failed put is re-announced by a later poll).
        if opts.events.enabled() {
            let event =
                BatchCommitted::from_manifest(&self.sink.describe(), &key, &manifest, false);
            let sent = opts.events.announce(&[event.event()]).await;
            report.events_put += sent.put;
            report.events_failed += sent.failed;
            if sent.failed == 0 && announced_before {
                // Carried by the lease's next write (the next batch, or the release).
                self.lease.rec.announced_through = Some(end);
            }
        }
        report.batches.push(key);
        report.transactions += manifest.transactions;
        report.changes += manifest.changes;
        report.rows_staged += manifest.files.iter().map(|f| f.rows).sum::<u64>();
        report.bytes_staged += manifest.files.iter().map(|f| f.bytes).sum::<u64>()
            + manifest.transaction_file.as_ref().map_or(0, |t| t.bytes);
        tracing::info!(task = %opts.task, start = %batch.start, end = %end, changes = manifest.changes, "batch committed");
        Ok(Some(batch.last_commit_ts))
    }
}

fn txn_of(txn: &Option<Txn>, lsn: Lsn) -> Result<&Txn> {
    txn.as_ref()
        .ok_or_else(|| Error::Protocol(format!("change at {lsn} outside a transaction")))
}

mod align;
mod batch;
mod ddl;
mod events;
mod metrics;
mod read;
mod rows;

pub use metrics::emf_line;
#[cfg(test)]
mod tests;
