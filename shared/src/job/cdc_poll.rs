//! The CDC poller: drains the task's logical replication slot into staged files, exactly once.
//!
//! # Effect order (DESIGN §4; never reorder)
//!
//! 1. **Lease.** A conditional write on the task's `cdc` item takes the lease when it is free,
//!    expired or ours. Another live owner → the run exits cleanly ([`Outcome::LeaseHeld`]).
//! 2. **Checkpoint.** `C` (a commit end LSN) is read. A missing slot, or one whose WAL is lost,
//!    is a terminal error telling the user to re-run the full load. A slot behind `C` (a crash
//!    between steps 5 and 6 last time) is advanced to `C` first; a slot *ahead* of `C` would
//!    mean changes nobody staged are gone, which is a terminal error too.
//! 3. **Peek** up to `U`, the WAL flush position taken at start once it has reached the insert
//!    position (the peek cannot see past the flush position), in few large peeks (`upto_nchanges` only bounds a runaway backlog).
//!    The peek runs as `COPY (select lsn, data from pg_logical_slot_peek_binary_changes(..)) TO
//!    STDOUT (FORMAT binary)` (its values bound through `set_config`, [`slot::start_peek`]):
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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::change::{ColumnSchema, Op, RowChange, TableSchema, pg_now};
use crate::config::{PgConfig, check_task_name, slot_name};
use crate::error::{Error, Result};
use crate::format::{EncodedWriter, Encoding, Format, cdc_csv_row, cdc_json_row};
use crate::lsn::Lsn;
use crate::pgoutput::{self, Message, OldTuple, Value};
use crate::selection::Selection;
use crate::source::slot::{self, SlotState};
use crate::source::{self, catalog};
use crate::stage::ObjectSink;
use crate::state::{StateStore, from_doc, now_ms, to_doc};

/// Where a test can make the job stop as if the process died (no clean-up at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failpoint {
    /// After the peek returned its first rows, before any file.
    AfterPeek,
    /// After the first table file of a batch is complete.
    AfterFirstFile,
    /// After every file of a batch, before the manifest.
    AfterFiles,
    /// After the manifest, before the checkpoint moves.
    AfterManifest,
    /// After the checkpoint moved, before the slot advances.
    AfterCheckpoint,
    /// Not a stop: the second session of a split peek fails once its slot copy exists, and
    /// the run must go on with one session.
    SplitPeekFails,
}

/// What a poll run is asked to do.
#[derive(Debug, Clone)]
pub struct CdcOptions {
    pub task: String,
    pub source: PgConfig,
    pub format: Format,
    /// Add the commit timestamp column to CSV rows.
    pub commit_ts_column: bool,
    /// Tables to stage (changes of others are skipped).
    pub selection: Selection,
    pub max_batch_changes: u64,
    pub max_batch_bytes: u64,
    /// `upto_nchanges` of one peek.
    pub max_peek_changes: i32,
    /// Backends one peek may use: 1, or 2 to split a large drain between two sessions
    /// decoding at once (module docs, step 3).
    pub peek_sessions: u8,
    /// A drain covering less WAL than this is never split.
    pub split_min_wal_bytes: u64,
    /// The invocation's end: uncommitted work is abandoned after it.
    pub deadline: Option<Instant>,
    /// Stop at the first commit boundary this long before the deadline.
    pub safety_margin: Duration,
    pub lease_ttl: Duration,
    /// Who runs (the Lambda request id, or host and pid).
    pub owner: String,
    /// `logical_decoding_work_mem` of the peek session.
    pub decoding_work_mem: String,
    /// Create the publication and slot when the task has none (a CDC-only task).
    pub create_if_missing: bool,
    pub failpoint: Option<Failpoint>,
}

impl CdcOptions {
    pub fn new(task: impl Into<String>, source: PgConfig, owner: impl Into<String>) -> CdcOptions {
        CdcOptions {
            task: task.into(),
            source,
            format: Format::default(),
            commit_ts_column: false,
            selection: Selection::all(),
            max_batch_changes: 250_000,
            max_batch_bytes: 256 << 20,
            max_peek_changes: 4_000_000,
            peek_sessions: 2,
            split_min_wal_bytes: 16 << 20,
            deadline: None,
            safety_margin: Duration::from_secs(20),
            lease_ttl: Duration::from_secs(900),
            owner: owner.into(),
            decoding_work_mem: "256MB".to_owned(),
            create_if_missing: true,
            failpoint: None,
        }
    }
}

/// The task item (`sk = task`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub slot: String,
    pub publication: String,
    /// The slot's consistent point: CDC starts here (`L0`).
    pub start_lsn: Lsn,
    pub database: String,
    /// `cdc` for a CDC-only task, `full-load` when the full load created it.
    pub created_by: String,
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
}

/// How a run ended.
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

/// One file of a batch, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchFile {
    pub key: String,
    pub schema: String,
    pub table: String,
    pub rows: u64,
    pub bytes: u64,
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub truncates: u64,
    /// Schema versions used, each with the first row it applies to.
    pub schema_versions: Vec<SchemaSegment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaSegment {
    pub key: String,
    pub first_row: u64,
}

/// `_manifests/cdc/<C>-<E>.json`: the commit record of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchManifest {
    pub task: String,
    pub batch_seq: u64,
    /// The checkpoint the batch starts from.
    pub start_lsn: Lsn,
    /// The checkpoint after it: the last commit's end LSN.
    pub end_lsn: Lsn,
    pub first_commit_lsn: Lsn,
    pub last_commit_lsn: Lsn,
    pub last_commit_ts: String,
    pub transactions: u64,
    pub changes: u64,
    pub format: Format,
    pub commit_ts_column: bool,
    pub files: Vec<BatchFile>,
}

/// What a run did.
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
        }
    }
}

/// Manifest key of a batch.
pub fn manifest_key(start: Lsn, end: Lsn) -> String {
    format!("_manifests/cdc/{}-{}.json", start.key_hex(), end.key_hex())
}

/// A schema or table name as one object-key segment: `/`, `%`, control characters and the
/// names `.`/`..` are percent-encoded; everything else (case included) is kept.
pub fn key_segment(name: &str) -> String {
    if name == "." || name == ".." {
        return name.bytes().map(|b| format!("%{b:02X}")).collect();
    }
    let mut out = String::with_capacity(name.len());
    for ch in name.chars() {
        if ch == '/' || ch == '%' || ch == '\\' || ch.is_control() {
            let mut buf = [0u8; 4];
            for b in ch.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// `<schema>/<table>` as a key prefix.
pub fn table_prefix(schema: &str, table: &str) -> String {
    format!("{}/{}", key_segment(schema), key_segment(table))
}

fn failpoint(opts: &CdcOptions, here: Failpoint) -> Result<()> {
    if opts.failpoint == Some(here) {
        return Err(Error::Source(format!("failpoint {here:?} reached")));
    }
    Ok(())
}

/// Reads the task item, creating the publication, slot and item for a CDC-only task.
pub async fn ensure_task<St: StateStore>(
    state: &St,
    client: &Client,
    task: &str,
    selection: &Selection,
    create: bool,
    created_by: &str,
) -> Result<TaskRecord> {
    if let Some(v) = state.get(task, "task").await? {
        return from_doc(v.doc, "task");
    }
    if !create {
        return Err(Error::Source(format!(
            "task {task} has no slot yet: run the full load with CDC (pgshift full-load --cdc) or a CDC-only task (pgshift cdc)"
        )));
    }
    let server = catalog::server_info(client).await?;
    let tables = catalog::user_tables(client, selection).await?;
    let name = slot_name(task);
    slot::ensure_publication(client, &name, server.superuser, &tables, server.version_num).await?;
    let (start_lsn, _) = slot::create_slot(client, &name, &server.database).await?;
    let record = TaskRecord {
        slot: name.clone(),
        publication: name,
        start_lsn,
        database: server.database,
        created_by: created_by.to_owned(),
    };
    match state.put(task, "task", &to_doc(&record)?, None).await {
        Ok(_) => Ok(record),
        // Another worker created it first: use theirs (the slot is shared by name).
        Err(Error::Conflict(_)) => match state.get(task, "task").await? {
            Some(v) => from_doc(v.doc, "task"),
            None => Err(Error::Conflict(format!(
                "task {task} vanished while being created"
            ))),
        },
        Err(e) => Err(e),
    }
}

/// Takes the lease (step 1). Returns the record and its version, or who holds it.
async fn acquire_lease<St: StateStore>(
    state: &St,
    opts: &CdcOptions,
    start: Lsn,
) -> Result<std::result::Result<(CdcRecord, u64), Outcome>> {
    for _ in 0..5 {
        let now = now_ms();
        let expires = now + opts.lease_ttl.as_millis() as u64;
        let (mut rec, expected) = match state.get(&opts.task, "cdc").await? {
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
        if let Some(owner) = &rec.lease_owner
            && *owner != opts.owner
            && rec.lease_expires_ms > now
        {
            return Ok(Err(Outcome::LeaseHeld {
                owner: owner.clone(),
                expires_ms: rec.lease_expires_ms,
            }));
        }
        rec.lease_owner = Some(opts.owner.clone());
        rec.lease_expires_ms = expires;
        match state.put(&opts.task, "cdc", &to_doc(&rec)?, expected).await {
            Ok(version) => return Ok(Ok((rec, version))),
            Err(Error::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::Conflict(format!(
        "could not take the lease of task {}",
        opts.task
    )))
}

/// Runs one poll: lease, drain, release.
fn parquet_for_cdc() -> Error {
    Error::config(
        "format",
        "parquet is written by the full load only; CDC stages csv or jsonl",
    )
}

pub async fn run<S: ObjectSink, St: StateStore>(
    sink: &S,
    state: &St,
    opts: &CdcOptions,
) -> Result<PollReport> {
    check_task_name(&opts.task)?;
    if opts.format.encoding == Encoding::Parquet {
        return Err(parquet_for_cdc());
    }
    let started = Instant::now();
    let mut cfg = opts.source.clone();
    cfg.application_name = "pgshift-cdc".to_owned();
    // The peek session is opened alongside (its handshake overlaps the control work).
    let mut peek_cfg = opts.source.clone();
    peek_cfg.application_name = "pgshift-cdc-peek".to_owned();
    let (control, peek) = tokio::join!(source::connect(&cfg), source::connect(&peek_cfg));
    let control = control?;
    let task = ensure_task(
        state,
        &control,
        &opts.task,
        &opts.selection,
        opts.create_if_missing,
        "cdc",
    )
    .await?;
    let (rec, version) = match acquire_lease(state, opts, task.start_lsn).await? {
        Ok(pair) => pair,
        Err(outcome) => {
            tracing::info!(task = %opts.task, ?outcome, "another poller holds the lease");
            let mut report = PollReport::new(&opts.task, &task.slot, outcome, Lsn::ZERO, Lsn::ZERO);
            report.elapsed_ms = started.elapsed().as_millis() as u64;
            return Ok(report);
        }
    };
    let mut poller = Poller {
        sink,
        state,
        opts,
        task,
        control,
        peek: Some(peek),
        rec,
        version,
        relations: HashMap::new(),
        stored_schemas: HashMap::new(),
        type_names: HashMap::new(),
        row_buf: Vec::with_capacity(1024),
    };
    // The drain future is large (S3 writers per table): keep it on the heap.
    let result = Box::pin(poller.drain(started)).await;
    let is_failpoint = matches!(&result, Err(Error::Source(m)) if m.starts_with("failpoint"));
    if !is_failpoint {
        // Release the lease, recording the run (best effort: it expires anyway).
        let mut rec = poller.rec.clone();
        rec.lease_owner = None;
        rec.lease_expires_ms = 0;
        if let Ok(report) = &result {
            rec.last_poll = serde_json::to_value(report).ok();
        }
        if let Ok(doc) = to_doc(&rec) {
            let _ = state
                .put(&opts.task, "cdc", &doc, Some(poller.version))
                .await;
        }
    }
    result
}

/// A relation as seen in this run.
struct RelEntry {
    schema: Arc<TableSchema>,
    selected: bool,
    /// Key of the stored schema version this shape matches.
    version_key: String,
    /// Indexes of primary-key columns (empty without a primary key).
    pk: Vec<usize>,
}

struct TableFile<W: crate::stage::ObjectWriter> {
    writer: EncodedWriter<W>,
    key: String,
    schema: String,
    table: String,
    counts: [u64; 4],
    segments: Vec<SchemaSegment>,
}

struct Batch<W: crate::stage::ObjectWriter> {
    start: Lsn,
    /// Set when a manifest for `start` exists: the batch must end exactly here.
    must_end: Option<Lsn>,
    /// Open files by relation id.
    files: BTreeMap<u32, TableFile<W>>,
    changes: u64,
    bytes: u64,
    transactions: u64,
    first_commit: Option<Lsn>,
    last_commit: Lsn,
    last_end: Lsn,
    last_commit_ts: i64,
}

struct Txn {
    xid: u32,
    commit_ts: i64,
    final_lsn: Lsn,
}

/// Which transactions of a peek are staged from it: all, or one side of a split point (by
/// the commit record's position, which Begin carries as `final_lsn`).
#[derive(Debug, Clone, Copy)]
enum Keep {
    All,
    Below(Lsn),
    From(Lsn),
}

impl Keep {
    fn keeps(self, commit: Lsn) -> bool {
        match self {
            Keep::All => true,
            Keep::Below(at) => commit < at,
            Keep::From(at) => commit >= at,
        }
    }
}

/// Where a peek's reading stands.
struct Cursor<W: crate::stage::ObjectWriter> {
    batch: Batch<W>,
    txn: Option<Txn>,
    /// Inside a transaction the other half of a split peek stages.
    skipping: bool,
    keep: Keep,
    stopped_early: bool,
    last_commit_ts: Option<i64>,
}

/// What the second session of a split peek needs (owned: it runs as its own task).
struct SecondHalfPlan {
    cfg: PgConfig,
    slot: String,
    publication: String,
    /// The split point: the copy is advanced here.
    from: Lsn,
    to: Lsn,
    max_changes: i32,
    timeout: Duration,
    decoding_work_mem: String,
    fail: bool,
}

/// The second half of a split peek, opening in the background: its own session, a
/// temporary copy of the slot advanced to the split point, and the peek from there to the
/// target. Dropping it stops the task (and with it the session and the copy).
struct SecondHalf {
    task: tokio::task::JoinHandle<Result<(Client, tokio_postgres::CopyOutStream)>>,
    pid: Arc<std::sync::atomic::AtomicI32>,
}

impl SecondHalf {
    fn open(plan: SecondHalfPlan) -> SecondHalf {
        let pid = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let seen = pid.clone();
        let task = tokio::spawn(async move {
            let mut cfg = plan.cfg;
            cfg.application_name = "pgshift-cdc-peek2".to_owned();
            let client = source::connect(&cfg).await?;
            slot::prepare_peek_session(&client, &plan.decoding_work_mem).await?;
            let (copy, backend) = slot::copy_temporary(&client, &plan.slot).await?;
            seen.store(backend, std::sync::atomic::Ordering::Relaxed);
            if plan.fail {
                return Err(Error::Source("failpoint: split peek".to_owned()));
            }
            slot::advance(&client, &copy, plan.from).await?;
            let peek = slot::Peek {
                slot: &copy,
                publication: &plan.publication,
                upto: plan.to,
                max_changes: plan.max_changes,
                timeout: plan.timeout,
            };
            let rows = slot::start_peek(&client, &peek).await?;
            Ok((client, rows))
        });
        SecondHalf { task, pid }
    }

    async fn join(mut self) -> Result<(Client, tokio_postgres::CopyOutStream)> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(Error::Source(format!("the second peek task failed: {e}"))),
        }
    }

    /// Stops a second half nobody will read: the task, and the backend's decode.
    async fn cancel(self, control: &Client) {
        self.task.abort();
        let pid = self.pid.load(std::sync::atomic::Ordering::Relaxed);
        if pid != 0 {
            let _ = control
                .execute("select pg_cancel_backend($1)", &[&pid])
                .await;
        }
    }
}

impl Drop for SecondHalf {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Poller<'a, S: ObjectSink, St: StateStore> {
    sink: &'a S,
    state: &'a St,
    opts: &'a CdcOptions,
    task: TaskRecord,
    control: Client,
    /// The peek session (connected in [`run`]; a failed connect surfaces when it is needed).
    peek: Option<Result<Client>>,
    rec: CdcRecord,
    version: u64,
    relations: HashMap<u32, RelEntry>,
    /// Latest stored schema version per table prefix: (key, schema).
    stored_schemas: HashMap<String, Option<(String, TableSchema)>>,
    type_names: HashMap<(u32, i32), String>,
    /// The encoded row being written (reused for every change).
    row_buf: Vec<u8>,
}

impl<S: ObjectSink, St: StateStore> Poller<'_, S, St> {
    fn checkpoint(&self) -> Lsn {
        Lsn(self.rec.checkpoint)
    }

    fn soft_deadline_passed(&self) -> bool {
        self.opts
            .deadline
            .is_some_and(|d| Instant::now() + self.opts.safety_margin >= d)
    }

    fn hard_deadline_passed(&self) -> bool {
        self.opts.deadline.is_some_and(|d| Instant::now() >= d)
    }

    async fn slot_state(&self) -> Result<SlotState> {
        let name = &self.task.slot;
        let state = slot::slot_state(&self.control, name).await?.ok_or_else(|| {
            Error::Source(format!(
                "replication slot {name} of task {} does not exist (dropped?): changes since the checkpoint cannot be recovered; re-run the full load with CDC",
                self.opts.task
            ))
        })?;
        if state.wal_status == "lost" {
            return Err(Error::Source(format!(
                "replication slot {name} lost WAL it needed (wal_status = lost, max_slot_wal_keep_size exceeded): changes were lost on the source; re-run the full load with CDC"
            )));
        }
        Ok(state)
    }

    async fn drain(&mut self, started: Instant) -> Result<PollReport> {
        let opts = self.opts;
        let start_checkpoint = self.checkpoint();
        // Step 2: the slot must be at the checkpoint.
        let state = self.slot_state().await?;
        let confirmed = state.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
        if confirmed < start_checkpoint {
            slot::advance(&self.control, &self.task.slot, start_checkpoint).await?;
        } else if confirmed > start_checkpoint {
            return Err(Error::Source(format!(
                "slot {} is at {confirmed}, past the checkpoint {start_checkpoint}: something else consumed it and those changes were never staged; re-run the full load with CDC",
                self.task.slot
            )));
        }
        let target = slot::drain_target(&self.control, Duration::from_secs(2)).await?;
        let mut report = PollReport::new(
            &opts.task,
            &self.task.slot,
            Outcome::Drained,
            start_checkpoint,
            target,
        );
        report.slot_retained_bytes = state.retained_bytes;
        report.slot_safe_wal_size = state.safe_wal_size;
        report.slot_wal_status = state.wal_status.clone();
        let mut last_commit_ts: Option<i64> = None;

        let peek_client = self.peek.take().unwrap_or_else(|| {
            Err(Error::Source(
                "the peek session was already used".to_owned(),
            ))
        })?;
        let server_version =
            slot::prepare_peek_session(&peek_client, &opts.decoding_work_mem).await?;
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
            // The peek may use what is left before the deadline, no more.
            let timeout = match opts.deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
                None => opts.source.statement_timeout,
            };
            let split = if split_allowed {
                self.split_point(target).await?
            } else {
                None
            };
            // The second half starts first: its session, slot copy and advance overlap the
            // first half's decode.
            let mut second = split.map(|at| {
                SecondHalf::open(SecondHalfPlan {
                    cfg: opts.source.clone(),
                    slot: self.task.slot.clone(),
                    publication: self.task.publication.clone(),
                    from: at,
                    to: target,
                    max_changes: opts.max_peek_changes,
                    timeout,
                    decoding_work_mem: opts.decoding_work_mem.clone(),
                    fail: opts.failpoint == Some(Failpoint::SplitPeekFails),
                })
            });
            let copy = slot::start_peek(
                &peek_client,
                &slot::Peek {
                    slot: &self.task.slot,
                    publication: &self.task.publication,
                    upto: split.unwrap_or(target),
                    max_changes: opts.max_peek_changes,
                    timeout,
                },
            )
            .await?;
            tracing::debug!(task = %opts.task, elapsed_ms = started.elapsed().as_millis() as u64, split = ?split, "peek started (the server decodes before the first row)");
            let mut cursor = Cursor {
                batch: self.new_batch().await?,
                txn: None,
                skipping: false,
                keep: match split {
                    Some(at) => Keep::Below(at),
                    None => Keep::All,
                },
                stopped_early: false,
                last_commit_ts: None,
            };
            let mut stream: std::pin::Pin<Box<tokio_postgres::CopyOutStream>> = Box::pin(copy);
            // Keeps the second half's session open while its rows are read.
            let mut _second_session: Option<Client> = None;
            let mut row_count: i64 = 0;
            let mut incomplete = false;
            let mut first = true;
            loop {
                let mut rows = slot::PeekRows::new();
                let mut part_rows: i64 = 0;
                'stream: while let Some(piece) = stream.next().await {
                    let piece = match piece {
                        Ok(p) => p,
                        // The server cut the peek at the time left (its statement_timeout): a clean stop,
                        // the open batch abandoned, committed ones kept.
                        Err(e)
                            if opts.deadline.is_some()
                                && e.code()
                                    == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) =>
                        {
                            tracing::info!(task = %opts.task, "the peek reached the deadline");
                            report.outcome = Outcome::DeadlineReached;
                            cursor.stopped_early = true;
                            break 'stream;
                        }
                        Err(e) => {
                            return Err(Error::postgres(
                                format!("reading changes of slot {}", self.task.slot),
                                e,
                            ));
                        }
                    };
                    rows.push(piece);
                    while let Some((lsn, data)) = rows.next_row()? {
                        if first {
                            failpoint(opts, Failpoint::AfterPeek)?;
                            first = false;
                        }
                        part_rows += 1;
                        let msg = pgoutput::decode(&data, false)
                            .map_err(|e| Error::Source(format!("{e} at {lsn}")))?;
                        if self.on_message(msg, lsn, &mut cursor, &mut report).await? {
                            break 'stream;
                        }
                    }
                }
                row_count += part_rows;
                if cursor.stopped_early {
                    break;
                }
                rows.finish()?;
                if cursor.txn.is_some() {
                    return Err(Error::Source(
                        "the peek ended inside a transaction".to_owned(),
                    ));
                }
                if part_rows >= i64::from(opts.max_peek_changes) {
                    // Cut by `upto_nchanges`: the rest comes next peek. A backlog this large
                    // is read by one session from here on: a second half waiting beyond a
                    // cut first half is decoded for nothing.
                    incomplete = true;
                    if second.is_some() {
                        split_allowed = false;
                    }
                    break;
                }
                let Some(half) = second.take() else { break };
                match half.join().await {
                    Ok((session, rest)) => {
                        report.split_peeks += 1;
                        report.split_at = split;
                        _second_session = Some(session);
                        stream = Box::pin(rest);
                        cursor.keep = match cursor.keep {
                            Keep::Below(at) => Keep::From(at),
                            other => other,
                        };
                    }
                    Err(e) => {
                        tracing::warn!(task = %opts.task, error = %e, "the second peek session failed; going on with one session");
                        split_allowed = false;
                        incomplete = true;
                        break;
                    }
                }
            }
            if let Some(half) = second.take() {
                half.cancel(&self.control).await;
            }
            tracing::debug!(task = %opts.task, rows = row_count, elapsed_ms = started.elapsed().as_millis() as u64, "peek read");
            let stopped_early = cursor.stopped_early;
            if let Some(ts) = cursor.last_commit_ts {
                last_commit_ts = Some(ts);
            }
            if !stopped_early && cursor.batch.transactions > 0 {
                if let Some(ts) = self.commit_batch(cursor.batch, &mut report).await? {
                    last_commit_ts = Some(ts);
                }
            } else {
                self.abandon(cursor.batch).await;
            }
            let stopped = stopped_early || report.outcome == Outcome::DeadlineReached;
            let drained = !stopped && !incomplete;
            if drained && self.checkpoint() < target {
                // Everything up to the target was read: the stretch after the last commit
                // (or an idle one) moves the checkpoint to the target too.
                self.move_checkpoint(target).await?;
            }
            // Step 6, once per peek, to the last checkpoint.
            if !report.batches.is_empty() {
                failpoint(opts, Failpoint::AfterCheckpoint)?;
            }
            self.advance_slot().await?;
            if stopped || drained {
                break;
            }
            report.outcome = Outcome::MoreWaiting;
        }
        if report.outcome == Outcome::MoreWaiting && self.checkpoint() >= target {
            report.outcome = Outcome::Drained;
        }
        report.checkpoint = self.checkpoint();
        report.latency_secs = match (last_commit_ts, &report.outcome) {
            (Some(ts), _) => ((pg_now() - ts).max(0) as f64) / 1e6,
            _ => 0.0,
        };
        let after = slot::slot_state(&self.control, &self.task.slot).await?;
        if let Some(s) = after {
            report.slot_retained_bytes = s.retained_bytes;
            report.slot_safe_wal_size = s.safe_wal_size;
            report.slot_wal_status = s.wal_status;
        }
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            task = %opts.task,
            slot = %self.task.slot,
            checkpoint = %report.checkpoint,
            target = %report.target,
            changes = report.changes,
            bytes = report.bytes_staged,
            batches = report.batches.len(),
            "cdc poll finished"
        );
        Ok(report)
    }

    /// Where the second half of a split peek starts, when this drain is worth splitting: a
    /// large enough stretch of WAL, PostgreSQL 12 or later (slot copies) and a free slot.
    async fn split_point(&self, target: Lsn) -> Result<Option<Lsn>> {
        let from = self.checkpoint();
        let span = target.0.saturating_sub(from.0);
        if span < self.opts.split_min_wal_bytes.max(2) {
            return Ok(None);
        }
        if slot::slot_usage(&self.control, &self.task.slot)
            .await?
            .free()
            < 1
        {
            tracing::info!(task = %self.opts.task, "no free replication slot for a split peek; one session");
            return Ok(None);
        }
        // The second session does more per byte (an advance and a skipping decode of the
        // first stretch): the first takes 60% of the span.
        Ok(Some(Lsn(from.0 + span / 10 * 6)))
    }

    /// One peek row. Returns true when the run must stop here (a deadline at a commit).
    async fn on_message(
        &mut self,
        msg: Message<'_>,
        lsn: Lsn,
        cur: &mut Cursor<S::Writer>,
        report: &mut PollReport,
    ) -> Result<bool> {
        if cur.skipping {
            // A transaction the other half of a split peek stages. Relation messages still
            // count: this session will not repeat them for the transactions that follow.
            match msg {
                Message::Commit(_) => cur.skipping = false,
                Message::Relation(r) => self.on_relation(&r, lsn).await?,
                _ => {}
            }
            return Ok(false);
        }
        let opts = self.opts;
        match msg {
            Message::Begin(b) => {
                if !cur.keep.keeps(b.final_lsn) {
                    cur.skipping = true;
                    return Ok(false);
                }
                cur.txn = Some(Txn {
                    xid: b.xid,
                    commit_ts: b.commit_ts,
                    final_lsn: b.final_lsn,
                });
            }
            Message::Commit(c) => {
                if cur.txn.take().is_none() {
                    return Err(Error::Source(format!("commit at {lsn} without a begin")));
                }
                let batch = &mut cur.batch;
                batch.transactions += 1;
                batch.first_commit.get_or_insert(c.commit_lsn);
                batch.last_commit = c.commit_lsn;
                batch.last_end = c.end_lsn;
                batch.last_commit_ts = c.commit_ts;
                let cut = match batch.must_end {
                    Some(end) if c.end_lsn == end => true,
                    Some(end) if c.end_lsn > end => {
                        return Err(Error::Source(format!(
                            "manifest {} ends at {end}, which is not a commit boundary of slot {}",
                            manifest_key(batch.start, end),
                            self.task.slot
                        )));
                    }
                    Some(_) => false,
                    None => {
                        batch.changes >= opts.max_batch_changes
                            || batch.bytes >= opts.max_batch_bytes
                    }
                };
                let stop = self.soft_deadline_passed();
                if cut || stop {
                    let done = std::mem::replace(&mut cur.batch, self.placeholder_batch());
                    if let Some(ts) = self.commit_batch(done, report).await? {
                        cur.last_commit_ts = Some(ts);
                    }
                    if stop {
                        report.outcome = Outcome::DeadlineReached;
                        cur.stopped_early = true;
                        return Ok(true);
                    }
                    cur.batch = self.new_batch().await?;
                }
            }
            Message::Relation(r) => self.on_relation(&r, lsn).await?,
            Message::Insert(i) => {
                let t = txn_of(&cur.txn, lsn)?;
                self.stage_insert(&mut cur.batch, t, lsn, &i.new.0, i.rel_id)
                    .await?;
            }
            Message::Update(u) => {
                let t = txn_of(&cur.txn, lsn)?;
                self.stage_update(&mut cur.batch, t, lsn, u).await?;
            }
            Message::Delete(d) => {
                let t = txn_of(&cur.txn, lsn)?;
                let (old, full) = match &d.old {
                    OldTuple::Key(k) => (&k.0, false),
                    OldTuple::Full(f) => (&f.0, true),
                };
                self.stage(
                    &mut cur.batch,
                    t,
                    lsn,
                    d.rel_id,
                    Op::Delete,
                    Some(old),
                    full,
                    None,
                )
                .await?;
            }
            Message::Truncate(tr) => {
                let t = txn_of(&cur.txn, lsn)?;
                for rel in &tr.rel_ids {
                    self.stage(
                        &mut cur.batch,
                        t,
                        lsn,
                        *rel,
                        Op::Truncate,
                        None,
                        false,
                        None,
                    )
                    .await?;
                }
            }
            Message::Origin(_) | Message::Type(_) | Message::Message(_) => {}
            Message::StreamStart(_)
            | Message::StreamStop
            | Message::StreamCommit(_)
            | Message::StreamAbort(_) => {
                return Err(Error::Source(format!(
                    "unexpected streaming message at {lsn}: pgshift peeks with protocol 1"
                )));
            }
        }
        Ok(false)
    }

    async fn advance_slot(&self) -> Result<()> {
        let cp = self.checkpoint();
        let state = self.slot_state().await?;
        if state.confirmed_flush_lsn.unwrap_or(Lsn::ZERO) < cp {
            slot::advance(&self.control, &self.task.slot, cp).await?;
        }
        Ok(())
    }

    /// Step 5 without data: move the checkpoint to `to`.
    async fn move_checkpoint(&mut self, to: Lsn) -> Result<()> {
        if to <= self.checkpoint() {
            return Ok(());
        }
        let mut rec = self.rec.clone();
        rec.checkpoint = to.0;
        rec.checkpoint_lsn = to;
        let version = self
            .state
            .put(&self.opts.task, "cdc", &to_doc(&rec)?, Some(self.version))
            .await
            .map_err(|e| match e {
                Error::Conflict(m) => {
                    Error::Conflict(format!("lost the lease of task {}: {m}", self.opts.task))
                }
                other => other,
            })?;
        self.rec = rec;
        self.version = version;
        Ok(())
    }

    fn placeholder_batch(&self) -> Batch<S::Writer> {
        Batch {
            start: self.checkpoint(),
            must_end: None,
            files: BTreeMap::new(),
            changes: 0,
            bytes: 0,
            transactions: 0,
            first_commit: None,
            last_commit: Lsn::ZERO,
            last_end: Lsn::ZERO,
            last_commit_ts: 0,
        }
    }

    /// A batch starting at the checkpoint, bound to an existing manifest's end if there is one.
    async fn new_batch(&self) -> Result<Batch<S::Writer>> {
        let mut b = self.placeholder_batch();
        let prefix = format!("_manifests/cdc/{}-", b.start.key_hex());
        let existing = self.sink.list(&prefix).await?;
        b.must_end = existing
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix)?.strip_suffix(".json"))
            .filter_map(|e| Lsn::from_key_hex(e).ok())
            .min();
        Ok(b)
    }

    async fn abandon(&self, batch: Batch<S::Writer>) {
        for (_, f) in batch.files {
            f.writer.abort().await;
        }
    }

    /// Steps 4 and 5 for a complete batch. Returns the last commit timestamp.
    async fn commit_batch(
        &mut self,
        batch: Batch<S::Writer>,
        report: &mut PollReport,
    ) -> Result<Option<i64>> {
        if batch.transactions == 0 {
            return Ok(None);
        }
        let opts = self.opts;
        let end = batch.last_end;
        let mut files = Vec::with_capacity(batch.files.len());
        let mut first_done = false;
        for (_, f) in batch.files {
            let rows = f.writer.rows;
            let bytes = f.writer.finish().await?;
            if !first_done {
                first_done = true;
                failpoint(opts, Failpoint::AfterFirstFile)?;
            }
            files.push(BatchFile {
                key: f.key,
                schema: f.schema,
                table: f.table,
                rows,
                bytes,
                inserts: f.counts[0],
                updates: f.counts[1],
                deletes: f.counts[2],
                truncates: f.counts[3],
                schema_versions: f.segments,
            });
        }
        failpoint(opts, Failpoint::AfterFiles)?;
        let manifest = BatchManifest {
            task: opts.task.clone(),
            batch_seq: self.rec.batch_seq + 1,
            start_lsn: batch.start,
            end_lsn: end,
            first_commit_lsn: batch.first_commit.unwrap_or(batch.last_commit),
            last_commit_lsn: batch.last_commit,
            last_commit_ts: format!(
                "{}Z",
                crate::change::format_pg_timestamp(batch.last_commit_ts, 'T')
            ),
            transactions: batch.transactions,
            changes: batch.changes,
            format: opts.format,
            commit_ts_column: opts.commit_ts_column,
            files,
        };
        let key = manifest_key(batch.start, end);
        let body =
            serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Source(e.to_string()))?;
        self.sink.put(&key, Bytes::from(body)).await?;
        failpoint(opts, Failpoint::AfterManifest)?;
        if self.hard_deadline_passed() {
            // Abandon before step 5: the next run re-commits the same manifest.
            return Err(Error::Source(
                "deadline passed before the checkpoint could move".to_owned(),
            ));
        }
        // Step 5.
        let mut rec = self.rec.clone();
        rec.checkpoint = end.0;
        rec.checkpoint_lsn = end;
        rec.batch_seq += 1;
        let version = self
            .state
            .put(&opts.task, "cdc", &to_doc(&rec)?, Some(self.version))
            .await
            .map_err(|e| match e {
                Error::Conflict(m) => {
                    Error::Conflict(format!("lost the lease of task {}: {m}", opts.task))
                }
                other => other,
            })?;
        self.rec = rec;
        self.version = version;
        report.batches.push(key);
        report.transactions += manifest.transactions;
        report.changes += manifest.changes;
        report.rows_staged += manifest.files.iter().map(|f| f.rows).sum::<u64>();
        report.bytes_staged += manifest.files.iter().map(|f| f.bytes).sum::<u64>();
        tracing::info!(task = %opts.task, start = %batch.start, end = %end, changes = manifest.changes, "batch committed");
        Ok(Some(batch.last_commit_ts))
    }

    async fn on_relation(&mut self, r: &pgoutput::Relation<'_>, lsn: Lsn) -> Result<()> {
        let selected = self.opts.selection.selects(r.namespace, r.name);
        let pk_names = if selected {
            slot::primary_key_columns(&self.control, r.rel_id).await?
        } else {
            Vec::new()
        };
        let missing: Vec<(u32, i32)> = r
            .columns
            .iter()
            .map(|c| (c.type_oid, c.type_modifier))
            .filter(|t| !self.type_names.contains_key(t))
            .collect();
        if selected && !missing.is_empty() {
            let names = slot::type_names(&self.control, &missing).await?;
            for (t, n) in missing.into_iter().zip(names) {
                self.type_names.insert(t, n);
            }
        }
        let has_pk = !pk_names.is_empty();
        let columns: Vec<ColumnSchema> = r
            .columns
            .iter()
            .map(|c| ColumnSchema {
                name: c.name.to_owned(),
                type_name: self
                    .type_names
                    .get(&(c.type_oid, c.type_modifier))
                    .cloned()
                    .unwrap_or_else(|| c.type_oid.to_string()),
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
                key: if has_pk {
                    pk_names.iter().any(|p| p == c.name)
                } else {
                    c.is_key()
                },
            })
            .collect();
        let pk: Vec<usize> = columns
            .iter()
            .enumerate()
            .filter(|(_, c)| has_pk && c.key)
            .map(|(i, _)| i)
            .collect();
        let schema = TableSchema {
            schema: r.namespace.to_owned(),
            table: r.name.to_owned(),
            columns,
            replica_identity: (r.replica_identity as char).to_string(),
        };
        if let Some(existing) = self.relations.get(&r.rel_id)
            && existing.schema.same_shape(&schema)
            && existing.schema.schema == schema.schema
            && existing.schema.table == schema.table
        {
            return Ok(()); // Relation messages repeat in every peek.
        }
        let version_key = if selected {
            self.schema_version(&schema, lsn).await?
        } else {
            String::new()
        };
        self.relations.insert(
            r.rel_id,
            RelEntry {
                schema: Arc::new(schema),
                selected,
                version_key,
                pk,
            },
        );
        Ok(())
    }

    /// The stored schema version matching `schema`, writing a new one at `lsn` if it differs.
    async fn schema_version(&mut self, schema: &TableSchema, lsn: Lsn) -> Result<String> {
        let prefix = format!("{}/_schema/", table_prefix(&schema.schema, &schema.table));
        if !self.stored_schemas.contains_key(&prefix) {
            let keys = self.sink.list(&prefix).await?;
            let latest = match keys.last() {
                None => None,
                Some(k) => match self.sink.get(k).await? {
                    Some(body) => serde_json::from_slice::<StoredSchema>(&body)
                        .ok()
                        .map(|s| (k.clone(), s.schema)),
                    None => None,
                },
            };
            self.stored_schemas.insert(prefix.clone(), latest);
        }
        if let Some(Some((key, stored))) = self.stored_schemas.get(&prefix)
            && stored.same_shape(schema)
        {
            return Ok(key.clone());
        }
        let key = format!("{prefix}{}.json", lsn.key_hex());
        let csv_layout = {
            let mut cols = vec!["Op".to_owned()];
            if self.opts.commit_ts_column {
                cols.push("commit_ts".to_owned());
            }
            cols.extend(schema.columns.iter().map(|c| c.name.clone()));
            cols.push("unchanged_toast".to_owned());
            cols
        };
        let stored = StoredSchema {
            lsn,
            schema: schema.clone(),
            csv_cdc_layout: csv_layout,
        };
        let body = serde_json::to_vec_pretty(&stored).map_err(|e| Error::Source(e.to_string()))?;
        self.sink.put(&key, Bytes::from(body)).await?;
        self.stored_schemas
            .insert(prefix, Some((key.clone(), schema.clone())));
        Ok(key)
    }

    async fn stage_insert(
        &mut self,
        batch: &mut Batch<S::Writer>,
        t: &Txn,
        lsn: Lsn,
        new: &[Value<'_>],
        rel_id: u32,
    ) -> Result<()> {
        self.stage(batch, t, lsn, rel_id, Op::Insert, None, false, Some(new))
            .await
    }

    async fn stage_update(
        &mut self,
        batch: &mut Batch<S::Writer>,
        t: &Txn,
        lsn: Lsn,
        u: pgoutput::Update<'_>,
    ) -> Result<()> {
        let Some(rel) = self.relations.get(&u.rel_id) else {
            return Err(Error::Source(format!(
                "change at {lsn} for relation {} before its Relation message",
                u.rel_id
            )));
        };
        if !rel.selected {
            return Ok(());
        }
        let (old, full) = match &u.old {
            Some(OldTuple::Key(k)) => (Some(k.0.as_slice()), false),
            Some(OldTuple::Full(f)) => (Some(f.0.as_slice()), true),
            None => (None, false),
        };
        // Fill unchanged TOAST values from a full old row.
        let mut new: Vec<Value<'_>> = u.new.0.clone();
        if let (true, Some(old)) = (full, old) {
            for (i, v) in new.iter_mut().enumerate() {
                if matches!(v, Value::UnchangedToast)
                    && let Some(o @ (Value::Text(_) | Value::Binary(_) | Value::Null)) = old.get(i)
                {
                    *v = *o;
                }
            }
        }
        // Only a table with a primary key can have it changed; others stay updates.
        let key_changed = old.is_some_and(|old| {
            rel.pk.iter().any(|&i| {
                let n = new.get(i).copied().unwrap_or(Value::Null);
                !matches!(n, Value::UnchangedToast)
                    && old.get(i).copied().unwrap_or(Value::Null) != n
            })
        });
        if key_changed {
            self.stage(batch, t, lsn, u.rel_id, Op::Delete, old, full, None)
                .await?;
            self.stage(batch, t, lsn, u.rel_id, Op::Insert, None, false, Some(&new))
                .await
        } else {
            self.stage(batch, t, lsn, u.rel_id, Op::Update, old, full, Some(&new))
                .await
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn stage(
        &mut self,
        batch: &mut Batch<S::Writer>,
        t: &Txn,
        lsn: Lsn,
        rel_id: u32,
        op: Op,
        old: Option<&[Value<'_>]>,
        old_is_full: bool,
        new: Option<&[Value<'_>]>,
    ) -> Result<()> {
        let Some(rel) = self.relations.get(&rel_id) else {
            return Err(Error::Source(format!(
                "change at {lsn} for relation {rel_id} before its Relation message"
            )));
        };
        if !rel.selected {
            return Ok(());
        }
        let (sink, opts) = (self.sink, self.opts);
        let change = RowChange {
            op,
            table: &rel.schema,
            lsn,
            commit_lsn: t.final_lsn,
            xid: t.xid,
            commit_ts: t.commit_ts,
            old,
            old_is_full,
            new,
        };
        let row = &mut self.row_buf;
        row.clear();
        match opts.format.encoding {
            Encoding::Csv => cdc_csv_row(&change, opts.commit_ts_column, row),
            Encoding::Jsonl => cdc_json_row(&change, row)?,
            Encoding::Parquet => return Err(parquet_for_cdc()),
        }
        if !batch.files.contains_key(&rel_id) {
            let schema = &rel.schema;
            let key = format!(
                "{}/cdc/{}.{}",
                table_prefix(&schema.schema, &schema.table),
                batch.start.key_hex(),
                opts.format.ext()
            );
            let writer = sink.writer(&key).await?;
            batch.files.insert(
                rel_id,
                TableFile {
                    writer: EncodedWriter::new(writer, opts.format),
                    key,
                    schema: schema.schema.clone(),
                    table: schema.table.clone(),
                    counts: [0; 4],
                    segments: vec![SchemaSegment {
                        key: rel.version_key.clone(),
                        first_row: 0,
                    }],
                },
            );
        }
        let Some(file) = batch.files.get_mut(&rel_id) else {
            return Err(Error::Source("table file vanished".to_owned()));
        };
        if file
            .segments
            .last()
            .is_some_and(|s| s.key != rel.version_key)
        {
            file.segments.push(SchemaSegment {
                key: rel.version_key.clone(),
                first_row: file.writer.rows,
            });
        }
        let row = &self.row_buf;
        file.writer.write_row(row).await?;
        file.counts[match op {
            Op::Insert => 0,
            Op::Update => 1,
            Op::Delete => 2,
            Op::Truncate => 3,
        }] += 1;
        batch.changes += 1;
        batch.bytes += row.len() as u64;
        Ok(())
    }
}

fn txn_of(txn: &Option<Txn>, lsn: Lsn) -> Result<&Txn> {
    txn.as_ref()
        .ok_or_else(|| Error::Source(format!("change at {lsn} outside a transaction")))
}

/// `<schema>/<table>/_schema/<lsn>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSchema {
    /// Where this version starts.
    pub lsn: Lsn,
    #[serde(flatten)]
    pub schema: TableSchema,
    /// The columns of a CDC CSV row, in order.
    pub csv_cdc_layout: Vec<String>,
}

/// CloudWatch Embedded Metric Format line for a poll (DMS metric names where they exist).
pub fn emf_line(report: &PollReport) -> String {
    serde_json::json!({
        "_aws": {
            "Timestamp": now_ms(),
            "CloudWatchMetrics": [{
                "Namespace": "pgshift",
                "Dimensions": [["Task"]],
                "Metrics": [
                    {"Name": "CDCLatencySource", "Unit": "Seconds"},
                    {"Name": "CDCIncomingChanges", "Unit": "Count"},
                    {"Name": "CDCRowsStaged", "Unit": "Count"},
                    {"Name": "CDCBytesStaged", "Unit": "Bytes"},
                    {"Name": "SlotRetainedBytes", "Unit": "Bytes"},
                    {"Name": "SlotSafeWalSize", "Unit": "Bytes"}
                ]
            }]
        },
        "Task": report.task,
        "CDCLatencySource": report.latency_secs,
        "CDCIncomingChanges": report.changes,
        "CDCRowsStaged": report.rows_staged,
        "CDCBytesStaged": report.bytes_staged,
        "SlotRetainedBytes": report.slot_retained_bytes,
        "SlotSafeWalSize": report.slot_safe_wal_size.unwrap_or(-1),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_segments_keep_case_and_escape_separators() {
        assert_eq!(key_segment("Table1"), "Table1");
        assert_eq!(key_segment("a/b"), "a%2Fb");
        assert_eq!(key_segment("100%"), "100%25");
        assert_eq!(key_segment("."), "%2E");
        assert_eq!(key_segment(".."), "%2E%2E");
        assert_eq!(key_segment("s p.\"q\""), "s p.\"q\"");
    }

    #[test]
    fn manifest_keys_sort_by_lsn() {
        let a = manifest_key(Lsn(0xFF), Lsn(0x100));
        let b = manifest_key(Lsn(0x1_0000_0000), Lsn(0x1_0000_0001));
        assert!(a < b);
        assert_eq!(a, "_manifests/cdc/00000000000000FF-0000000000000100.json");
    }

    #[test]
    fn emf_names_dms_metrics() {
        let mut report = PollReport::new("t", "s", Outcome::Drained, Lsn(1), Lsn(2));
        report.changes = 5;
        report.rows_staged = 5;
        report.bytes_staged = 10;
        report.slot_retained_bytes = 100;
        report.latency_secs = 1.5;
        let v: serde_json::Value = serde_json::from_str(&emf_line(&report)).unwrap();
        assert_eq!(v["CDCLatencySource"], 1.5);
        assert_eq!(v["CDCIncomingChanges"], 5);
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"],
            "CDCLatencySource"
        );
    }
}
