//! The full load: Plan → ExportChunk × N (in parallel) → Finish (DESIGN §3).
//!
//! # Effect order
//!
//! **Plan.** With CDC on, the publication and slot are created first and the slot's consistent
//! point `L0` recorded in the task item (a clear error if an old transaction blocks slot
//! creation past `lock_timeout`). Then the selected tables are listed, cut into chunks
//! ([`crate::plan`]), each table's schema written beside its data, the tables' DDL staged as
//! pg_dump's pre-data and post-data sections ([`crate::source::ddl`]), and the plan item plus one
//! `pending` item per chunk stored. A plan that exists is returned as it is: Plan is idempotent.
//!
//! **ExportChunk.** The chunk item moves `pending → running(owner, lease)` with a conditional
//! write (a live lease held by another worker is a transient conflict: retry later). In its own
//! REPEATABLE READ READ ONLY transaction the worker records `pg_current_wal_lsn()` (the chunk's
//! start), then streams `COPY (SELECT * FROM t WHERE ctid range) TO STDOUT` (text; turned into
//! the exact bytes of `FORMAT csv` client-side, [`crate::source::copy_text::TextToCsv`]) into the encoder
//! and a (multipart) upload of `LOAD<n:08X>.<ext>`, counting rows and summing an
//! order-independent checksum. The CLI's workers keep their session from chunk to chunk
//! ([`ChunkSession`]); each chunk still has its own snapshot. Only after the object is
//! complete does the item move to `done` (conditional on the version it wrote). A crash anywhere leaves the chunk `running` until its
//! lease expires; the retry rewrites the same key. A chunk already `done` returns its result.
//!
//! **Finish.** Every chunk must be `done`; per-table manifests
//! (`_manifests/load/<schema>.<table>.json`: chunks, rows, checksums, `L0`) are written and the
//! plan marked complete. A consumer applies the load, then CDC from `L0` as upserts in commit
//! order: rows seen twice are harmless, rows that moved between chunks come back through CDC.

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::config::check_task_name;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::options::LoadOptions;
use crate::source::copy_text::{RowChecksum, TextToCsv};
use crate::source::snapshot::{self, ChunkSession};
use crate::staging::ObjectSink;
use crate::staging::decode::parse_csv_fields;
use crate::staging::encode::parquet::ParquetEncoder;
use crate::staging::encode::{EncodedWriter, Encoding, Format, load_json_row};
use crate::staging::layout::{self, LoadManifest, load_manifest_key};
use crate::state::StateStore;
use crate::state::records::{self, ChunkId, ChunkRecord, Claim, PlanRecord, PlannedTable};

/// Every chunk of a plan, table by table.
pub fn chunk_ids(plan: &PlanRecord) -> Vec<ChunkId> {
    plan.chunk_ids()
}

/// Exports one chunk (idempotent; see the module docs for the state transitions).
pub async fn export_chunk<S: ObjectSink, St: StateStore>(
    sink: &S,
    state: &St,
    opts: &LoadOptions,
    id: &ChunkId,
) -> Result<ChunkRecord> {
    export_chunk_in(sink, state, opts, id, &mut ChunkSession::default()).await
}

/// [`export_chunk`] on a session kept by the caller across chunks.
pub async fn export_chunk_in<S: ObjectSink, St: StateStore>(
    sink: &S,
    state: &St,
    opts: &LoadOptions,
    id: &ChunkId,
    session: &mut ChunkSession,
) -> Result<ChunkRecord> {
    check_task_name(&opts.task)?;
    let (mut record, version) = match records::claim_chunk(
        state,
        &opts.task,
        id,
        &opts.owner,
        opts.lease_ttl,
        opts.force_lease,
    )
    .await?
    {
        Claim::Done(record) => return Ok(record),
        Claim::Claimed { record, version } => (record, version),
    };
    let (plan, _) = records::get_plan_of(state, &opts.task, id.reload)
        .await?
        .ok_or_else(|| Error::Source(format!("task {} has no plan", opts.task)))?;
    let table = plan.table(&id.schema, &id.table)?;
    let done = Box::pin(copy_chunk(sink, opts, &plan, table, &record, session)).await?;
    record.rows = done.rows;
    record.bytes = done.bytes;
    record.checksum = done.checksum;
    record.start_lsn = Some(done.start_lsn);
    record.snapshot = Some(done.snapshot.0);
    record.snapshot_lsn = Some(done.snapshot.1);
    records::complete_chunk(state, &opts.task, record, version).await
}

/// What a chunk's export wrote.
struct Exported {
    rows: u64,
    bytes: u64,
    checksum: RowChecksum,
    start_lsn: Lsn,
    snapshot: (String, Lsn),
}

/// Turns COPY text into the chunk's encoding, row by row, counting and summing the rows.
struct ChunkEncoder<'t> {
    table: &'t PlannedTable,
    format: Format,
    /// CSV rows get an `Op` field, `I`, first.
    op_column: bool,
    conv: TextToCsv,
    csv: Vec<u8>,
    encoded: Vec<u8>,
    fields: Vec<Option<Vec<u8>>>,
    parquet: Option<ParquetEncoder>,
    checksum: RowChecksum,
    rows: u64,
}

impl<'t> ChunkEncoder<'t> {
    fn new(table: &'t PlannedTable, format: Format, op_column: bool) -> Result<ChunkEncoder<'t>> {
        let parquet = match format.encoding {
            Encoding::Parquet => {
                let (schema, name, columns) = table.staged();
                Some(ParquetEncoder::with_unit(
                    schema,
                    name,
                    columns,
                    &table.types,
                    format.timestamp_ms,
                )?)
            }
            _ => None,
        };
        Ok(ChunkEncoder {
            table,
            format,
            op_column,
            // Text from the server, CSV from here (see TextToCsv for why).
            conv: TextToCsv::new(table.columns.len()),
            csv: Vec::with_capacity(1 << 16),
            encoded: Vec::with_capacity(1 << 16),
            fields: Vec::new(),
            parquet,
            checksum: RowChecksum::default(),
            rows: 0,
        })
    }

    /// Encodes the rows of one piece of the COPY stream; returns the bytes to write and how
    /// many rows they hold.
    fn feed(&mut self, piece: &[u8]) -> Result<(&[u8], u64)> {
        let before = self.rows;
        self.encoded.clear();
        self.csv.clear();
        let (t, format, op_column) = (self.table, self.format, self.op_column);
        let (checksum, rows, fields, encoded, parquet) = (
            &mut self.checksum,
            &mut self.rows,
            &mut self.fields,
            &mut self.encoded,
            &mut self.parquet,
        );
        self.conv.feed(piece, &mut self.csv, |row| {
            checksum.add_row(row);
            *rows += 1;
            match format.encoding {
                Encoding::Csv if op_column => {
                    encoded.extend_from_slice(b"I,");
                    encoded.extend_from_slice(row);
                    Ok(())
                }
                Encoding::Csv => Ok(()),
                Encoding::Jsonl => {
                    parse_csv_fields(row, fields)?;
                    let (schema, name, columns) = t.staged();
                    load_json_row(schema, name, columns, fields, encoded)
                }
                Encoding::Parquet => {
                    parse_csv_fields(row, fields)?;
                    match parquet.as_mut() {
                        Some(p) => p.push_row(fields),
                        None => Ok(()),
                    }
                }
            }
        })?;
        let count = self.rows - before;
        Ok(match format.encoding {
            Encoding::Csv if self.op_column => (&self.encoded, count),
            Encoding::Csv => (&self.csv, count),
            Encoding::Jsonl => (&self.encoded, count),
            Encoding::Parquet => {
                self.encoded = self
                    .parquet
                    .as_mut()
                    .map(ParquetEncoder::take_output)
                    .unwrap_or_default();
                (&self.encoded, count)
            }
        })
    }

    /// The encoding's tail (Parquet's footer), after the stream checked complete.
    fn finish(self) -> Result<(Vec<u8>, u64, RowChecksum)> {
        self.conv.finish()?;
        let tail = match self.parquet {
            Some(p) => p.finish()?,
            None => Vec::new(),
        };
        Ok((tail, self.rows, self.checksum))
    }
}

async fn copy_chunk<S: ObjectSink>(
    sink: &S,
    opts: &LoadOptions,
    plan: &PlanRecord,
    table: &PlannedTable,
    record: &ChunkRecord,
    session: &mut ChunkSession,
) -> Result<Exported> {
    let client = session.begin(&opts.source).await?;
    let start_lsn = snapshot::wal_position(&client).await?;
    let snapshot = snapshot::current_snapshot(&client).await?;
    let stream = snapshot::copy_chunk(
        &client,
        &table.schema,
        &table.table,
        &table.columns,
        &record.range,
    )
    .await?;
    let mut stream = std::pin::pin!(stream);
    let format = plan.format;
    let mut out =
        EncodedWriter::new(sink.writer(&record.key).await?, format).with_dialect(&plan.csv);
    let mut enc = ChunkEncoder::new(table, format, plan.op_column)?;
    if plan.header {
        let op = plan.op_column.then(|| "Op".to_owned());
        let names: Vec<String> = op
            .into_iter()
            .chain(table.staged().2.iter().cloned())
            .collect();
        out.write_rows(&crate::staging::encode::csv_header(&names), 0)
            .await?;
    }
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| {
            Error::postgres(
                format!("reading COPY of {}.{}", table.schema, table.table),
                e,
            )
        })?;
        let (bytes, rows) = enc.feed(&piece)?;
        out.write_rows(bytes, rows).await?;
    }
    let (tail, rows, checksum) = enc.finish()?;
    out.write_rows(&tail, 0).await?;
    let bytes = out.finish().await?;
    session.end(client).await;
    Ok(Exported {
        rows,
        bytes,
        checksum,
        start_lsn,
        snapshot,
    })
}

/// Checks every chunk is done, writes the per-table manifests, marks the plan complete; then
/// announces `Table Loaded` for each table and `Load Finished` (events never fail the load).
pub async fn finish<S: ObjectSink, St: StateStore>(
    sink: &S,
    state: &St,
    task: &str,
    events: &crate::events::Events,
) -> Result<Vec<LoadManifest>> {
    check_task_name(task)?;
    let manifests = write_manifests(sink, state, task, None).await?;
    announce_loaded(sink, task, &manifests, events, None).await;
    Ok(manifests)
}

/// `Table Loaded` for each table and `Load Finished` (a reload's with its position); events
/// never fail the load.
pub(crate) async fn announce_loaded<S: ObjectSink>(
    sink: &S,
    task: &str,
    manifests: &[LoadManifest],
    events: &crate::events::Events,
    reload: Option<Lsn>,
) {
    if events.enabled() {
        use crate::events::{LoadFinished, TableLoaded, VERSION};
        let stage = sink.describe();
        let mut all: Vec<crate::events::Event> = manifests
            .iter()
            .map(|m| {
                TableLoaded {
                    version: VERSION,
                    task: task.to_owned(),
                    stage: stage.clone(),
                    schema: m.schema.clone(),
                    table: m.table.clone(),
                    manifest_key: match reload {
                        Some(r0) => layout::reload_manifest_key(r0, &m.schema, &m.table),
                        None => load_manifest_key(&m.schema, &m.table),
                    },
                    rows: m.rows,
                    bytes: m.bytes,
                    chunks: m.chunks.len(),
                    l0: m.l0,
                }
                .event()
            })
            .collect();
        all.push(
            LoadFinished {
                version: VERSION,
                task: task.to_owned(),
                stage,
                tables: manifests.len(),
                rows: manifests.iter().map(|m| m.rows).sum(),
                bytes: manifests.iter().map(|m| m.bytes).sum(),
                l0: manifests.first().and_then(|m| m.l0),
                reload,
            }
            .event(),
        );
        events.announce(&all).await;
    }
}

/// Checks every chunk of the load's plan (`None`) or a reload's is done, writes the per-table
/// manifests and marks the plan complete.
pub(crate) async fn write_manifests<S: ObjectSink, St: StateStore>(
    sink: &S,
    state: &St,
    task: &str,
    reload: Option<Lsn>,
) -> Result<Vec<LoadManifest>> {
    let (plan, version) = records::get_plan_of(state, task, reload)
        .await?
        .ok_or_else(|| Error::Source(format!("task {task} has no plan")))?;
    let mut manifests = Vec::new();
    let mut not_done = Vec::new();
    for t in &plan.tables {
        let mut chunks = Vec::new();
        for n in 0..t.chunks.len() as u32 {
            let id = ChunkId {
                schema: t.schema.clone(),
                table: t.table.clone(),
                n,
                reload,
            };
            let Some(rec) = records::get_chunk(state, task, &id).await? else {
                not_done.push(format!("{}.{}#{n} (missing)", t.schema, t.table));
                continue;
            };
            if rec.status != "done" {
                not_done.push(format!("{}.{}#{n} ({})", t.schema, t.table, rec.status));
            }
            chunks.push(rec);
        }
        let checksum = chunks
            .iter()
            .fold(RowChecksum::default(), |a, c| a.combine(c.checksum));
        let (schema, name, columns) = t.staged();
        manifests.push(LoadManifest {
            task: task.to_owned(),
            schema: schema.to_owned(),
            table: name.to_owned(),
            format: plan.format,
            op_column: plan.op_column,
            header: plan.header,
            csv: plan.csv.clone(),
            transformed: t.staged_as.is_some(),
            columns: columns.to_vec(),
            l0: plan.l0,
            schema_key: reload.and(t.schema_key.clone()),
            rows: chunks.iter().map(|c| c.rows).sum(),
            bytes: chunks.iter().map(|c| c.bytes).sum(),
            checksum,
            chunks,
        });
    }
    if !not_done.is_empty() {
        let shown: Vec<&str> = not_done.iter().take(10).map(String::as_str).collect();
        return Err(Error::Source(format!(
            "{} chunks are not done: {}",
            not_done.len(),
            shown.join(", ")
        )));
    }
    for m in &manifests {
        let key = match reload {
            Some(r0) => layout::reload_manifest_key(r0, &m.schema, &m.table),
            None => load_manifest_key(&m.schema, &m.table),
        };
        layout::put_json(sink, &key, m).await?;
    }
    records::complete_plan(state, task, plan, version).await?;
    Ok(manifests)
}

pub use crate::progress::Progress;

/// What a local run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    pub task: String,
    pub tables: usize,
    pub chunks: usize,
    pub rows: u64,
    pub bytes: u64,
    pub l0: Option<Lsn>,
    pub elapsed_ms: u64,
    pub rows_per_sec: f64,
}

/// Plan, export every chunk with `parallel` workers, finish: the CLI's full load.
pub async fn run_local<S: ObjectSink + Clone, St: StateStore + Clone>(
    sink: &S,
    state: &St,
    opts: &LoadOptions,
    parallel: usize,
    progress: Arc<Progress>,
) -> Result<LoadReport> {
    let started = Instant::now();
    let (plan, ids) = match plan(sink, state, opts).await {
        Ok(planned) => planned,
        Err(e) => return Err(load_failed(opts, e).await),
    };
    if let Err(e) = export_all(sink, state, opts, &ids, parallel, progress).await {
        return Err(load_failed(opts, e).await);
    }
    let manifests = match finish(sink, state, &opts.task, &opts.events).await {
        Ok(m) => m,
        Err(e) => return Err(load_failed(opts, e).await),
    };
    let rows: u64 = manifests.iter().map(|m| m.rows).sum();
    let elapsed = started.elapsed();
    Ok(LoadReport {
        task: opts.task.clone(),
        tables: manifests.len(),
        chunks: ids.len(),
        rows,
        bytes: manifests.iter().map(|m| m.bytes).sum(),
        l0: plan.l0,
        elapsed_ms: elapsed.as_millis() as u64,
        rows_per_sec: rows as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}

/// Exports `ids` with `parallel` workers, each keeping its source session from chunk to chunk;
/// the first error stops handing out chunks (running exports finish) and is returned.
pub(crate) async fn export_all<S: ObjectSink + Clone, St: StateStore + Clone>(
    sink: &S,
    state: &St,
    opts: &LoadOptions,
    ids: &[ChunkId],
    parallel: usize,
    progress: Arc<Progress>,
) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    progress.chunks_total.store(ids.len() as u64, Relaxed);
    let queue = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(
        ids.to_vec(),
    )));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..parallel.max(1) {
        let (sink, state, opts, queue, progress) = (
            sink.clone(),
            state.clone(),
            opts.clone(),
            queue.clone(),
            progress.clone(),
        );
        workers.spawn(async move {
            let mut session = ChunkSession::default();
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some(id) = next else {
                    return Ok::<(), Error>(());
                };
                let rec = export_chunk_in(&sink, &state, &opts, &id, &mut session).await?;
                progress.rows.fetch_add(rec.rows, Relaxed);
                progress.bytes.fetch_add(rec.bytes, Relaxed);
                progress.chunks_done.fetch_add(1, Relaxed);
            }
        });
    }
    let mut first_err = None;
    while let Some(done) = workers.join_next().await {
        let result = done
            .map_err(|e| Error::Source(format!("export worker failed: {e}")))
            .and_then(|r| r);
        if let Err(e) = result
            && first_err.is_none()
        {
            first_err = Some(e);
            // Stop handing out chunks; running exports finish.
            if let Ok(mut q) = queue.lock() {
                q.clear();
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Announces a failed load (`Task State Changed`), returning its error.
async fn load_failed(opts: &LoadOptions, e: Error) -> Error {
    use crate::events::{Job, TaskStateChanged};
    opts.events
        .announce(&[TaskStateChanged::from_error(&opts.task, Job::Load, &e).event()])
        .await;
    e
}

mod plan;
pub mod reload;
mod step;

pub use plan::plan;

pub use step::{ChunkManifestRef, FullLoadEvent, INLINE_CHUNK_LIMIT, PlanOutput, plan_output};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::layout::{chunk_key, load_manifest_key};

    #[test]
    fn events_parse_and_name_bad_fields() {
        let e = FullLoadEvent::from_json(serde_json::json!({"action": "Plan"})).unwrap();
        assert_eq!(e, FullLoadEvent::Plan);
        let e = FullLoadEvent::from_json(
            serde_json::json!({"action": "ExportChunk", "chunk": {"schema": "s", "table": "t", "n": 3}}),
        )
        .unwrap();
        assert!(matches!(e, FullLoadEvent::ExportChunk { chunk } if chunk.n == 3));
        let e = FullLoadEvent::from_json(
            serde_json::json!({"action": "Plan", "reload": ["public.orders", "\"S\".t"]}),
        )
        .unwrap();
        assert_eq!(
            e,
            FullLoadEvent::PlanReload {
                tables: vec![
                    ("public".to_owned(), "orders".to_owned()),
                    ("S".to_owned(), "t".to_owned())
                ]
            }
        );
        let e = FullLoadEvent::from_json(
            serde_json::json!({"action": "Finish", "reload": "16/B374D848"}),
        )
        .unwrap();
        assert_eq!(
            e,
            FullLoadEvent::FinishReload {
                r0: "16/B374D848".parse().unwrap()
            }
        );
        let chunk = serde_json::json!({"schema": "s", "table": "t", "n": 0, "reload": "0/10"});
        let e =
            FullLoadEvent::from_json(serde_json::json!({"action": "ExportChunk", "chunk": chunk}))
                .unwrap();
        assert!(
            matches!(e, FullLoadEvent::ExportChunk { chunk } if chunk.reload == Some(Lsn(0x10)))
        );
        for (bad, want) in [
            (serde_json::json!({"action": "Explode"}), "Explode"),
            (
                serde_json::json!({"action": "ExportChunk", "chunk": {"schema": "s", "table": "t", "n": -1}}),
                "chunk.n",
            ),
            (serde_json::json!({"action": "ExportChunk"}), "chunk"),
            (serde_json::json!("Plan"), "must be a JSON object"),
            (
                serde_json::json!({"action": "Plan", "reload": "public.t"}),
                "reload",
            ),
            (
                serde_json::json!({"action": "Plan", "reload": ["orders"]}),
                "reload",
            ),
            (
                serde_json::json!({"action": "Finish", "reload": "soon"}),
                "reload",
            ),
            (
                serde_json::json!({"action": "ExportChunk", "reload": "0/1", "chunk": {"schema": "s", "table": "t", "n": 1}}),
                "reload",
            ),
        ] {
            let err = FullLoadEvent::from_json(bad.clone())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn keys_follow_dms_naming() {
        let f = Format::default();
        assert_eq!(
            chunk_key("public", "Orders", 0, f),
            "public/Orders/LOAD00000001.csv"
        );
        assert_eq!(chunk_key("a/b", "t", 255, f), "a%2Fb/t/LOAD00000100.csv");
        assert_eq!(
            load_manifest_key("public", "t"),
            "_manifests/load/public.t.json"
        );
    }
}
