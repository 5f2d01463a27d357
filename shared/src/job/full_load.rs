//! The full load: Plan → ExportChunk × N (in parallel) → Finish (DESIGN §3).
//!
//! # Effect order
//!
//! **Plan.** With CDC on, the publication and slot are created first and the slot's consistent
//! point `L0` recorded in the task item (a clear error if an old transaction blocks slot
//! creation past `lock_timeout`). Then the selected tables are listed, cut into chunks
//! ([`crate::plan`]), each table's schema written beside its data, and the plan item plus one
//! `pending` item per chunk stored. A plan that exists is returned as it is: Plan is idempotent.
//!
//! **ExportChunk.** The chunk item moves `pending → running(owner, lease)` with a conditional
//! write (a live lease held by another worker is a transient conflict: retry later). In its own
//! REPEATABLE READ READ ONLY transaction the worker records `pg_current_wal_lsn()` (the chunk's
//! start), then streams `COPY (SELECT * FROM t WHERE ctid range) TO STDOUT` (text; turned into
//! the exact bytes of `FORMAT csv` client-side, [`crate::format::TextToCsv`]) into the encoder
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
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::change::{ColumnSchema, TableSchema};
use crate::config::{PgConfig, check_task_name};
use crate::error::{Error, Result};
use crate::format::parquet::ParquetEncoder;
use crate::format::{
    EncodedWriter, Encoding, Format, RowChecksum, TextToCsv, load_json_row, parse_csv_fields,
};
use crate::job::cdc_poll::{self, StoredSchema, table_prefix};
use crate::lsn::Lsn;
use crate::plan::{ChunkRange, ChunkSizing, Chunking, key_ranges, plan_table};
use crate::selection::Selection;
use crate::source::{self, catalog, quote_ident, quote_qualified};
use crate::stage::ObjectSink;
use crate::state::{StateStore, from_doc, now_ms, to_doc};

/// What the load is asked to do.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub task: String,
    pub source: PgConfig,
    pub format: Format,
    pub selection: Selection,
    /// Target heap size of a chunk, MiB.
    pub chunk_mib: u64,
    /// Create the publication and slot first (CDC from `L0`).
    pub cdc: bool,
    pub owner: String,
    pub lease_ttl: Duration,
    /// Test hook: stop an export as if killed after this many bytes were written.
    pub kill_after_bytes: Option<u64>,
    /// Page ranges (PostgreSQL 14+) or primary-key ranges.
    pub chunking: Chunking,
}

impl LoadOptions {
    pub fn new(task: impl Into<String>, source: PgConfig, owner: impl Into<String>) -> LoadOptions {
        LoadOptions {
            task: task.into(),
            source,
            format: Format::default(),
            selection: Selection::all(),
            chunk_mib: 256,
            cdc: false,
            owner: owner.into(),
            lease_ttl: Duration::from_secs(900),
            kill_after_bytes: None,
            chunking: Chunking::Auto,
        }
    }
}

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
}

/// The `plan` item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRecord {
    pub tables: Vec<PlannedTable>,
    pub format: Format,
    /// The slot's consistent point when CDC is on.
    pub l0: Option<Lsn>,
    /// `planned` or `complete`.
    pub status: String,
}

/// A chunk's identity (the Map state's item).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkId {
    pub schema: String,
    pub table: String,
    pub n: u32,
}

impl ChunkId {
    fn state_key(&self) -> String {
        format!("chunk#{}.{}#{}", self.schema, self.table, self.n)
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
}

/// The object key of a chunk: `<schema>/<table>/LOAD<n:08X>.<ext>` (DMS naming).
pub fn chunk_key(schema: &str, table: &str, n: u32, format: Format) -> String {
    format!(
        "{}/LOAD{:08X}.{}",
        table_prefix(schema, table),
        n + 1,
        format.ext()
    )
}

/// `_manifests/load/<schema>.<table>.json` (names with `/` escaped as in data keys).
pub fn load_manifest_key(schema: &str, table: &str) -> String {
    format!(
        "_manifests/load/{}.{}.json",
        cdc_poll::key_segment(schema),
        cdc_poll::key_segment(table)
    )
}

/// A table's load manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadManifest {
    pub task: String,
    pub schema: String,
    pub table: String,
    pub format: Format,
    pub columns: Vec<String>,
    pub l0: Option<Lsn>,
    pub rows: u64,
    pub bytes: u64,
    pub checksum: RowChecksum,
    pub chunks: Vec<ChunkRecord>,
}

const COLUMNS: &str = "select a.attname::text, a.atttypid, a.atttypmod, format_type(a.atttypid, nullif(a.atttypmod, -1)), \
 coalesce(a.attnum = any(i.indkey), false) \
 from pg_attribute a left join pg_index i on i.indrelid = a.attrelid and i.indisprimary \
 where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped order by a.attnum";

/// Plans the load (idempotent). Returns the plan and the chunk list.
pub async fn plan<S: ObjectSink, St: StateStore>(
    sink: &S,
    state: &St,
    opts: &LoadOptions,
) -> Result<(PlanRecord, Vec<ChunkId>)> {
    check_task_name(&opts.task)?;
    if let Some(v) = state.get(&opts.task, "plan").await? {
        let plan: PlanRecord = from_doc(v.doc, "plan")?;
        let ids = chunk_ids(&plan);
        return Ok((plan, ids));
    }
    let mut cfg = opts.source.clone();
    cfg.application_name = "pgshift-plan".to_owned();
    let client = source::connect(&cfg).await?;
    let server = catalog::server_info(&client).await?;
    let sizing = ChunkSizing::from_mib(opts.chunk_mib, server.version_num)?;
    // Slot first, then data: every change after L0 reaches CDC.
    let l0 = if opts.cdc {
        let task = cdc_poll::ensure_task(
            state,
            &client,
            &opts.task,
            &opts.selection,
            true,
            "full-load",
        )
        .await?;
        Some(task.start_lsn)
    } else {
        None
    };
    let tables = catalog::user_tables(&client, &opts.selection).await?;
    let found: Vec<(String, String)> = tables
        .iter()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .collect();
    if let Some(message) = opts.selection.unmatched_message(&found) {
        return Err(Error::config(
            "tables",
            format!("{message} (names are case-sensitive)"),
        ));
    }
    if let Some(t) = tables.iter().find(|t| !t.can_select) {
        return Err(Error::Source(format!(
            "{} cannot read {}: GRANT SELECT ON {} TO {}",
            server.user,
            t.display_name(),
            t.quoted(),
            quote_ident(&server.user)
        )));
    }
    let schema_lsn = match l0 {
        Some(l) => l,
        None => slot_free_lsn(&client).await?,
    };
    let mut planned = Vec::new();
    // Partitions load through their root when it is selected (its COPY reads them all, and
    // CDC publishes through the root).
    let has_root = tables.iter().any(|t| t.kind == 'p');
    for t in tables.iter().filter(|t| !(has_root && t.is_partition)) {
        let rows = client
            .query(COLUMNS, &[&t.oid])
            .await
            .map_err(|e| Error::postgres(format!("reading columns of {}", t.display_name()), e))?;
        let columns: Vec<ColumnSchema> = rows
            .iter()
            .map(|r| ColumnSchema {
                name: r.get(0),
                type_oid: r.get(1),
                type_modifier: r.get(2),
                type_name: r.get(3),
                key: r.get(4),
            })
            .collect();
        let schema = TableSchema {
            schema: t.schema.clone(),
            table: t.name.clone(),
            columns: columns.clone(),
            replica_identity: t.replica_identity.to_string(),
        };
        write_schema(sink, &schema, schema_lsn).await?;
        let pk: Vec<&ColumnSchema> = columns.iter().filter(|c| c.key).collect();
        let by_key = opts.chunking == Chunking::Keys || sizing.version_num < 140_000;
        let chunks = if t.kind == 'p' {
            vec![ChunkRange::Whole]
        } else if by_key {
            // Primary-key ranges: before PostgreSQL 14 a ctid range scans the whole table.
            match pk.as_slice() {
                [key] if t.pages > sizing.pages_per_chunk => {
                    let buckets =
                        ((t.pages + sizing.pages_per_chunk - 1) / sizing.pages_per_chunk) as i32;
                    let lows =
                        catalog::key_range_lows(&client, &t.schema, &t.name, &key.name, buckets)
                            .await?;
                    key_ranges(&key.name, &key.type_name, &lows)
                }
                _ => vec![ChunkRange::Whole],
            }
        } else {
            plan_table(t.pages, sizing)
        };
        planned.push(PlannedTable {
            types: columns
                .iter()
                .map(|c| (c.type_oid, c.type_modifier))
                .collect(),
            schema: t.schema.clone(),
            table: t.name.clone(),
            columns: columns.into_iter().map(|c| c.name).collect(),
            chunks,
            estimated_rows: t.estimated_rows.max(0.0),
        });
    }
    let plan = PlanRecord {
        tables: planned,
        format: opts.format,
        l0,
        status: "planned".to_owned(),
    };
    let ids = chunk_ids(&plan);
    for id in &ids {
        let table = plan
            .tables
            .iter()
            .find(|t| t.schema == id.schema && t.table == id.table)
            .ok_or_else(|| Error::Source("planned table vanished".to_owned()))?;
        let record = ChunkRecord {
            schema: id.schema.clone(),
            table: id.table.clone(),
            n: id.n,
            range: table.chunks[id.n as usize].clone(),
            status: "pending".to_owned(),
            owner: None,
            lease_expires_ms: 0,
            attempts: 0,
            key: chunk_key(&id.schema, &id.table, id.n, opts.format),
            rows: 0,
            bytes: 0,
            checksum: RowChecksum::default(),
            start_lsn: None,
        };
        match state
            .put(&opts.task, &id.state_key(), &to_doc(&record)?, None)
            .await
        {
            Ok(_) | Err(Error::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    match state.put(&opts.task, "plan", &to_doc(&plan)?, None).await {
        Ok(_) => Ok((plan, ids)),
        // Planned concurrently: the stored plan wins.
        Err(Error::Conflict(_)) => {
            let v = state
                .get(&opts.task, "plan")
                .await?
                .ok_or_else(|| Error::Conflict("plan vanished".to_owned()))?;
            let plan: PlanRecord = from_doc(v.doc, "plan")?;
            let ids = chunk_ids(&plan);
            Ok((plan, ids))
        }
        Err(e) => Err(e),
    }
}

async fn slot_free_lsn(client: &tokio_postgres::Client) -> Result<Lsn> {
    let text: String = client
        .query_one(
            "select (case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end)::text",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("reading the WAL position", e))?
        .get(0);
    text.parse()
        .map_err(|e: crate::lsn::LsnParseError| Error::Source(e.to_string()))
}

/// Writes the table's schema version at `lsn` unless the latest stored one has the same shape.
async fn write_schema<S: ObjectSink>(sink: &S, schema: &TableSchema, lsn: Lsn) -> Result<()> {
    let prefix = format!("{}/_schema/", table_prefix(&schema.schema, &schema.table));
    if let Some(last) = sink.list(&prefix).await?.last()
        && let Some(body) = sink.get(last).await?
        && let Ok(stored) = serde_json::from_slice::<StoredSchema>(&body)
        && stored.schema.same_shape(schema)
    {
        return Ok(());
    }
    let mut layout = vec!["Op".to_owned()];
    layout.extend(schema.columns.iter().map(|c| c.name.clone()));
    layout.push("unchanged_toast".to_owned());
    let stored = StoredSchema {
        lsn,
        schema: schema.clone(),
        csv_cdc_layout: layout,
    };
    let body = serde_json::to_vec_pretty(&stored).map_err(|e| Error::Source(e.to_string()))?;
    sink.put(
        &format!("{prefix}{}.json", lsn.key_hex()),
        Bytes::from(body),
    )
    .await
}

/// Every chunk of a plan, table by table.
pub fn chunk_ids(plan: &PlanRecord) -> Vec<ChunkId> {
    plan.tables
        .iter()
        .flat_map(|t| {
            (0..t.chunks.len() as u32).map(|n| ChunkId {
                schema: t.schema.clone(),
                table: t.table.clone(),
                n,
            })
        })
        .collect()
}

/// A worker's source session, kept from one chunk to the next (the CLI's workers export many
/// chunks each; a Lambda invocation exports one). Reusing it saves, per chunk, a backend
/// start, the TLS handshake, the SCRAM exchange and the catalog-cache warm-up — tens of
/// milliseconds during which the server would otherwise send nothing. Every chunk still has
/// its own snapshot (its own `repeatable read` transaction); a session that failed mid-chunk
/// is dropped, never reused.
#[derive(Default)]
pub struct ChunkSession {
    client: Option<tokio_postgres::Client>,
    /// Sessions opened (for tests and diagnostics).
    pub connects: u32,
}

/// Starts a chunk's snapshot. JIT is off: it would compile each chunk's scan anew (the plan
/// cost passes `jit_above_cost` on any big table) for a query that only moves tuples.
const BEGIN_CHUNK: &str =
    "set jit = off; start transaction isolation level repeatable read read only";

impl ChunkSession {
    /// A session in a fresh chunk snapshot: the kept one, or a new one when there is none or
    /// the kept one no longer answers (closed by the server, a network cut between chunks).
    async fn begin(&mut self, opts: &LoadOptions) -> Result<tokio_postgres::Client> {
        if let Some(kept) = self.client.take().filter(|c| !c.is_closed())
            && kept.batch_execute(BEGIN_CHUNK).await.is_ok()
        {
            return Ok(kept);
        }
        let mut cfg = opts.source.clone();
        cfg.application_name = "pgshift-full-load".to_owned();
        self.connects += 1;
        let client = source::connect(&cfg).await?;
        client
            .batch_execute(BEGIN_CHUNK)
            .await
            .map_err(|e| Error::postgres("starting the chunk's snapshot", e))?;
        Ok(client)
    }
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
    let key = id.state_key();
    let stored = state.get(&opts.task, &key).await?.ok_or_else(|| {
        Error::event(
            "chunk",
            format!(
                "{}.{} chunk {} is not in the plan of task {}",
                id.schema, id.table, id.n, opts.task
            ),
        )
    })?;
    let mut record: ChunkRecord = from_doc(stored.doc, "chunk")?;
    if record.status == "done" {
        return Ok(record);
    }
    let now = now_ms();
    if record.status == "running"
        && record.owner.as_deref() != Some(&opts.owner)
        && record.lease_expires_ms > now
    {
        return Err(Error::Conflict(format!(
            "chunk {} is being exported by {} until {}",
            key,
            record.owner.as_deref().unwrap_or("?"),
            record.lease_expires_ms
        )));
    }
    record.status = "running".to_owned();
    record.owner = Some(opts.owner.clone());
    record.lease_expires_ms = now + opts.lease_ttl.as_millis() as u64;
    record.attempts += 1;
    let version = state
        .put(&opts.task, &key, &to_doc(&record)?, Some(stored.version))
        .await?;

    let plan: PlanRecord = match state.get(&opts.task, "plan").await? {
        Some(v) => from_doc(v.doc, "plan")?,
        None => return Err(Error::Source(format!("task {} has no plan", opts.task))),
    };
    let table = plan
        .tables
        .iter()
        .find(|t| t.schema == id.schema && t.table == id.table)
        .ok_or_else(|| Error::Source(format!("{}.{} is not in the plan", id.schema, id.table)))?;
    let (rows, bytes, checksum, start_lsn) =
        Box::pin(copy_chunk(sink, opts, plan.format, table, &record, session)).await?;
    record.status = "done".to_owned();
    record.rows = rows;
    record.bytes = bytes;
    record.checksum = checksum;
    record.start_lsn = Some(start_lsn);
    record.lease_expires_ms = 0;
    state
        .put(&opts.task, &key, &to_doc(&record)?, Some(version))
        .await
        .map_err(|e| match e {
            Error::Conflict(m) => Error::Conflict(format!(
                "chunk {key} was taken over while exporting (lease expired): {m}"
            )),
            other => other,
        })?;
    Ok(record)
}

async fn copy_chunk<S: ObjectSink>(
    sink: &S,
    opts: &LoadOptions,
    format: Format,
    table: &PlannedTable,
    record: &ChunkRecord,
    session: &mut ChunkSession,
) -> Result<(u64, u64, RowChecksum, Lsn)> {
    let client = session.begin(opts).await?;
    let start_lsn = slot_free_lsn(&client).await?;
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(c)).collect();
    let sql = format!(
        "copy (select {} from {}{}) to stdout",
        cols.join(", "),
        quote_qualified(&table.schema, &table.table),
        record.range.where_clause()
    );
    let stream = client.copy_out(&sql).await.map_err(|e| {
        Error::postgres(
            format!("starting COPY of {}.{}", table.schema, table.table),
            e,
        )
    })?;
    let mut stream = std::pin::pin!(stream);
    let writer = sink.writer(&record.key).await?;
    let mut out = EncodedWriter::new(writer, format);
    // Text from the server, CSV from here (see TextToCsv for why).
    let mut conv = TextToCsv::new(table.columns.len());
    let mut csv = Vec::with_capacity(1 << 16);
    let mut checksum = RowChecksum::default();
    let mut rows = 0u64;
    let mut fields = Vec::new();
    let mut encoded = Vec::with_capacity(1 << 16);
    let mut parquet = match format.encoding {
        Encoding::Parquet => Some(ParquetEncoder::new(
            &table.schema,
            &table.table,
            &table.columns,
            &table.types,
        )?),
        _ => None,
    };
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| {
            Error::postgres(
                format!("reading COPY of {}.{}", table.schema, table.table),
                e,
            )
        })?;
        let before = rows;
        encoded.clear();
        csv.clear();
        conv.feed(&piece, &mut csv, |row| {
            checksum.add_row(row);
            rows += 1;
            match format.encoding {
                Encoding::Csv => {}
                Encoding::Jsonl => {
                    parse_csv_fields(row, &mut fields)?;
                    load_json_row(
                        &table.schema,
                        &table.table,
                        &table.columns,
                        &fields,
                        &mut encoded,
                    )?;
                }
                Encoding::Parquet => {
                    parse_csv_fields(row, &mut fields)?;
                    if let Some(p) = parquet.as_mut() {
                        p.push_row(&fields)?;
                    }
                }
            }
            Ok(())
        })?;
        match format.encoding {
            Encoding::Csv => out.write_rows(&csv, rows - before).await?,
            Encoding::Jsonl => out.write_rows(&encoded, rows - before).await?,
            Encoding::Parquet => {
                let bytes = parquet
                    .as_mut()
                    .map(ParquetEncoder::take_output)
                    .unwrap_or_default();
                out.write_rows(&bytes, rows - before).await?;
            }
        }
        if let Some(limit) = opts.kill_after_bytes
            && out.raw_bytes >= limit
        {
            // As if the process died: no clean-up of the upload, no state change.
            return Err(Error::Source(format!(
                "killed after {} bytes (test hook)",
                out.raw_bytes
            )));
        }
    }
    if let Some(p) = parquet.take() {
        let tail = p.finish()?;
        out.write_rows(&tail, 0).await?;
    }
    conv.finish()?;
    let bytes = out.finish().await?;
    // A read-only snapshot: the commit only ends it. A session whose commit fails is dropped.
    if client.batch_execute("commit").await.is_ok() {
        session.client = Some(client);
    }
    Ok((rows, bytes, checksum, start_lsn))
}

/// Checks every chunk is done, writes the per-table manifests, marks the plan complete.
pub async fn finish<S: ObjectSink, St: StateStore>(
    sink: &S,
    state: &St,
    task: &str,
) -> Result<Vec<LoadManifest>> {
    check_task_name(task)?;
    let stored = state
        .get(task, "plan")
        .await?
        .ok_or_else(|| Error::Source(format!("task {task} has no plan")))?;
    let mut plan: PlanRecord = from_doc(stored.doc, "plan")?;
    let mut manifests = Vec::new();
    let mut not_done = Vec::new();
    for t in &plan.tables {
        let mut chunks = Vec::new();
        for n in 0..t.chunks.len() as u32 {
            let id = ChunkId {
                schema: t.schema.clone(),
                table: t.table.clone(),
                n,
            };
            let rec: ChunkRecord = match state.get(task, &id.state_key()).await? {
                Some(v) => from_doc(v.doc, "chunk")?,
                None => {
                    not_done.push(format!("{}.{}#{n} (missing)", t.schema, t.table));
                    continue;
                }
            };
            if rec.status != "done" {
                not_done.push(format!("{}.{}#{n} ({})", t.schema, t.table, rec.status));
            }
            chunks.push(rec);
        }
        let checksum = chunks
            .iter()
            .fold(RowChecksum::default(), |a, c| a.combine(c.checksum));
        manifests.push(LoadManifest {
            task: task.to_owned(),
            schema: t.schema.clone(),
            table: t.table.clone(),
            format: plan.format,
            columns: t.columns.clone(),
            l0: plan.l0,
            rows: chunks.iter().map(|c| c.rows).sum(),
            bytes: chunks.iter().map(|c| c.bytes).sum(),
            checksum,
            chunks,
        });
    }
    if !not_done.is_empty() {
        let shown: Vec<&String> = not_done.iter().take(10).collect();
        return Err(Error::Source(format!(
            "{} chunks are not done: {}",
            not_done.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for m in &manifests {
        let body = serde_json::to_vec_pretty(m).map_err(|e| Error::Source(e.to_string()))?;
        sink.put(&load_manifest_key(&m.schema, &m.table), Bytes::from(body))
            .await?;
    }
    if plan.status != "complete" {
        plan.status = "complete".to_owned();
        match state
            .put(task, "plan", &to_doc(&plan)?, Some(stored.version))
            .await
        {
            Ok(_) | Err(Error::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(manifests)
}

/// The full-load function's event: one of the state machine's three steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FullLoadEvent {
    Plan,
    ExportChunk { chunk: ChunkId },
    Finish,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    action: Action,
    #[serde(default)]
    chunk: Option<ChunkId>,
}

#[derive(Deserialize)]
enum Action {
    Plan,
    ExportChunk,
    Finish,
}

impl FullLoadEvent {
    /// Parses `{"action": "Plan" | "ExportChunk" | "Finish", "chunk": {..}}`, naming the field
    /// that is wrong.
    pub fn from_json(value: serde_json::Value) -> Result<FullLoadEvent> {
        let raw: RawEvent = crate::job::parse_event(value)?;
        match (raw.action, raw.chunk) {
            (Action::Plan, None) => Ok(FullLoadEvent::Plan),
            (Action::Finish, None) => Ok(FullLoadEvent::Finish),
            (Action::ExportChunk, Some(chunk)) => Ok(FullLoadEvent::ExportChunk { chunk }),
            (Action::ExportChunk, None) => Err(Error::event(
                "chunk",
                "ExportChunk needs the chunk to export",
            )),
            (_, Some(_)) => Err(Error::event("chunk", "only ExportChunk takes a chunk")),
        }
    }
}

/// Plans of more chunks than this go to the Map state as an S3 object (Distributed Map).
pub const INLINE_CHUNK_LIMIT: usize = 1000;

/// The Plan step's result for the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanOutput {
    pub task: String,
    pub chunk_count: usize,
    /// The chunks, when at most [`INLINE_CHUNK_LIMIT`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Vec<ChunkId>>,
    /// Otherwise the staged JSON array of chunks, for the Distributed Map's ItemReader.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_manifest: Option<ChunkManifestRef>,
    pub max_concurrency: u32,
    pub l0: Option<Lsn>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkManifestRef {
    pub bucket: String,
    pub key: String,
}

/// Key of the staged chunk list of a large plan.
pub const CHUNK_LIST_KEY: &str = "_manifests/load/_chunks.json";

/// Progress of a local run, shared by its workers.
#[derive(Debug, Default)]
pub struct Progress {
    pub rows: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
    pub chunks_done: std::sync::atomic::AtomicU64,
    pub chunks_total: std::sync::atomic::AtomicU64,
}

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
    use std::sync::atomic::Ordering::Relaxed;
    let started = Instant::now();
    let (plan, ids) = plan(sink, state, opts).await?;
    progress.chunks_total.store(ids.len() as u64, Relaxed);
    let queue = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(
        ids.clone(),
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
    if let Some(e) = first_err {
        return Err(e);
    }
    let manifests = finish(sink, state, &opts.task).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_and_name_bad_fields() {
        let e = FullLoadEvent::from_json(serde_json::json!({"action": "Plan"})).unwrap();
        assert_eq!(e, FullLoadEvent::Plan);
        let e = FullLoadEvent::from_json(
            serde_json::json!({"action": "ExportChunk", "chunk": {"schema": "s", "table": "t", "n": 3}}),
        )
        .unwrap();
        assert!(matches!(e, FullLoadEvent::ExportChunk { chunk } if chunk.n == 3));
        for (bad, want) in [
            (serde_json::json!({"action": "Explode"}), "Explode"),
            (
                serde_json::json!({"action": "ExportChunk", "chunk": {"schema": "s", "table": "t", "n": -1}}),
                "chunk.n",
            ),
            (serde_json::json!({"action": "ExportChunk"}), "chunk"),
            (serde_json::json!("Plan"), "must be a JSON object"),
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
