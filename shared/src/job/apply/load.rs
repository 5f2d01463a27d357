//! The staged full load applied to the target: in parallel over N connections, one transaction
//! per chunk that also records the chunk in `pgshift.loaded`, so a killed load resumes at the
//! chunk instead of from zero.
//!
//! # Effect order
//!
//! 0. `--target-prep create` with a staged schema (`source::ddl`): pre-data, statement by
//!    statement (`apply/schema.rs`); `truncate` and `keep`: every loaded table must exist.
//! 1. One transaction: `pgshift.loaded` created if missing; rows of an earlier load of the
//!    task (another L0) removed; the tables created if missing (`create`); when no chunk of this
//!    load is recorded yet, every loaded table truncated in one statement (a foreign key refuses
//!    a truncate of its referenced table alone; not with `keep`). A crash here leaves nothing
//!    half done.
//! 2. Each chunk not recorded yet, on one of N connections, in its own transaction: its file
//!    streamed (never held whole) with `COPY`, its size checked against the manifest, then its
//!    row in `pgshift.loaded`. A crash rolls back that chunk only; the rerun skips every
//!    recorded one. A table without a unique index on the target (pre-data builds keys only
//!    after the load) takes plain `COPY`; one loaded in a single chunk takes `TRUNCATE` + `COPY
//!    .. FREEZE` in that transaction (no vacuum needed after). A table with a unique index
//!    takes `COPY` into a temporary table and `INSERT .. ON CONFLICT DO NOTHING` (chunks are
//!    read at different moments: a row updated during the load can be in two; CDC from L0
//!    brings it to its final state).
//! 3. post-data in parallel (`create` with a staged schema: keys, after removing rows a plain
//!    load holds twice; indexes; `ANALYZE`; foreign keys), then one transaction: the task's
//!    `load_complete` and position L0 in `pgshift.applied`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::Client;

use super::changes::{has_key, jsonl_to_csv, quoted_keys};
use super::file::FileBytes;
use super::replica_role;
use super::schema::{self, SchemaRun, TargetPrep};
use super::target::{Tables, ensure_table};
use crate::config::PgConfig;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::source::ddl::{DDL_KEY, SchemaDdl};
use crate::source::{self, quote_ident, quote_qualified};
use crate::staging::ObjectSink;
use crate::staging::encode::Encoding;
use crate::staging::encode::parquet_read::ParquetRows;
use crate::staging::layout::{self, LoadManifest, StoredSchema};
use crate::table::TableSchema;

const LOADED: &str = "create table if not exists pgshift.loaded (task text not null, chunk text not null, \
 l0 text not null, rows bigint not null, loaded_at timestamptz not null default now(), primary key (task, chunk))";

/// What applying the load did.
#[derive(Debug, Default)]
pub(super) struct Loaded {
    pub(super) rows: u64,
    pub(super) l0: Lsn,
    /// Chunks loaded by this run.
    pub(super) chunks: u64,
    /// Chunks an earlier, killed run had loaded (skipped).
    pub(super) resumed: u64,
    /// The staged schema's statements run, and those the target refused.
    pub(super) schema: SchemaRun,
}

/// One table of the load, as the chunk workers need it.
pub(super) struct LoadTable {
    manifest: LoadManifest,
    name: String,
    copy: String,
    keyed: bool,
    insert: String,
    /// `COPY .. FREEZE` after a `TRUNCATE` in the chunk's transaction: a plain table of one
    /// chunk whose rows pgshift owns.
    freeze: bool,
}

impl LoadTable {
    /// A table of `schema` loaded from `m`'s chunks: straight into it when it has no unique
    /// index (`plain`), else through a temporary table and `ON CONFLICT DO NOTHING`.
    pub(super) fn new(
        m: LoadManifest,
        schema: &TableSchema,
        plain: bool,
        freeze: bool,
    ) -> LoadTable {
        let name = quote_qualified(&m.schema, &m.table);
        let cols: Vec<String> = m.columns.iter().map(|c| quote_ident(c)).collect();
        let keyed = has_key(schema);
        let into = if keyed && !plain {
            "pg_temp.pgshift_load"
        } else {
            &name
        };
        LoadTable {
            copy: format!(
                "copy {into} ({}) from stdin with (format csv{})",
                cols.join(", "),
                if freeze { ", freeze" } else { "" }
            ),
            insert: format!(
                "insert into {name} ({0}) overriding system value select {0} from pg_temp.pgshift_load on conflict ({1}) do nothing",
                cols.join(", "),
                quoted_keys(schema).join(", ")
            ),
            name,
            keyed: keyed && !plain,
            freeze,
            manifest: m,
        }
    }
}

/// Applies the staged load (if any) with `workers` connections; `None` without one.
pub(super) async fn apply_load<S: ObjectSink>(
    sink: &S,
    client: &mut Client,
    cfg: &PgConfig,
    task: &str,
    opts: super::ApplyOptions,
    tables: &mut Tables,
) -> Result<Option<Loaded>> {
    let (workers, prep, deadline) = (opts.load_workers, opts.target_prep, opts.deadline);
    let progress = opts.progress.clone();
    let keys = layout::load_manifest_keys(sink).await?;
    if keys.is_empty() {
        return Ok(None);
    }
    let mut manifests: Vec<(LoadManifest, StoredSchema)> = Vec::with_capacity(keys.len());
    let mut l0 = Lsn::ZERO;
    for key in keys {
        let m: LoadManifest = layout::get_json(sink, &key, "a load manifest").await?;
        if m.transformed && prep == TargetPrep::Create {
            return Err(Error::Staged(super::transformed_stage(&format!(
                "the load of {}.{}",
                m.schema, m.table
            ))));
        }
        if m.format.timestamp_ms {
            return Err(Error::Staged(super::millisecond_stage(&format!(
                "the load of {}.{}",
                m.schema, m.table
            ))));
        }
        if let Some(l) = m.l0 {
            l0 = l;
        }
        let stored = layout::first_schema(sink, &m.schema, &m.table).await?;
        manifests.push((m, stored));
    }
    let names: Vec<String> = manifests
        .iter()
        .map(|(m, _)| quote_qualified(&m.schema, &m.table))
        .collect();

    // 0. pre-data, or the user's tables checked.
    let mut schema = SchemaRun::default();
    let ddl: Option<SchemaDdl> = match sink.get(DDL_KEY).await? {
        Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| {
            Error::Staged(format!(
                "{DDL_KEY} in {} is malformed: {e}",
                sink.describe()
            ))
        })?),
        None => None,
    };
    match (prep, &ddl) {
        (TargetPrep::Create, Some(ddl)) => {
            schema.skipped.extend(ddl.skipped.iter().cloned());
            schema::pre_data(client, ddl, &mut schema).await?;
        }
        (TargetPrep::Create, None) => {}
        (TargetPrep::Truncate | TargetPrep::Keep, _) => {
            let missing = schema::missing_tables(client, &names).await?;
            if !missing.is_empty() {
                return Err(Error::config(
                    "target-prep",
                    format!(
                        "{} expects the tables in the target, which has no {}: create them, or use --target-prep create",
                        prep.as_str(),
                        missing.join(", ")
                    ),
                ));
            }
        }
    }

    // 1. Bookkeeping, tables, and the truncate of a load that has not started.
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::postgres("starting the load's preparation", e))?;
    tx.batch_execute(LOADED)
        .await
        .map_err(|e| Error::postgres("creating pgshift.loaded in the target", e))?;
    tx.execute(
        "delete from pgshift.loaded where task = $1 and l0 <> $2",
        &[&task, &l0.to_string()],
    )
    .await
    .map_err(|e| Error::postgres("clearing an earlier load's chunks", e))?;
    let done: HashSet<String> = tx
        .query("select chunk from pgshift.loaded where task = $1", &[&task])
        .await
        .map_err(|e| Error::postgres("reading the loaded chunks", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut plain = Vec::with_capacity(manifests.len());
    for ((_, stored), name) in manifests.iter().zip(&names) {
        if prep == TargetPrep::Create {
            ensure_table(&tx, &stored.schema).await?;
        }
        let relkind: String = tx
            .query_one(
                "select coalesce((select relkind::text from pg_class where oid = to_regclass($1)), '')",
                &[name],
            )
            .await
            .map_err(|e| Error::postgres(format!("looking for {name} in the target"), e))?
            .get(0);
        plain.push((!schema::has_unique_index(&tx, name).await?, relkind == "r"));
    }
    if done.is_empty() && prep != TargetPrep::Keep {
        tx.batch_execute(&format!("truncate {}", names.join(", ")))
            .await
            .map_err(|e| Error::postgres("truncating the tables to load in the target", e))?;
    }
    tx.commit()
        .await
        .map_err(|e| Error::postgres("committing the load's preparation", e))?;

    // 2. The chunks not loaded yet, on `workers` connections.
    let mut rows = 0;
    let mut work = VecDeque::new();
    let mut load_tables = Vec::with_capacity(manifests.len());
    let mut resumed = 0;
    let mut loaded = HashMap::new();
    for (t, (m, stored)) in manifests.into_iter().enumerate() {
        rows += m.rows;
        let (plain, ordinary) = plain[t];
        for (c, chunk) in m.chunks.iter().enumerate() {
            if done.contains(&chunk.key) {
                resumed += 1;
            } else {
                work.push_back((t, c));
            }
        }
        let name = quote_qualified(&m.schema, &m.table);
        let keyed = has_key(&stored.schema);
        let freeze = plain && ordinary && prep != TargetPrep::Keep && m.chunks.len() == 1;
        loaded.insert(
            name.clone(),
            (keyed && plain && m.chunks.len() > 1).then(|| quoted_keys(&stored.schema)),
        );
        load_tables.push(LoadTable::new(m, &stored.schema, plain, freeze));
        tables.known.insert(
            (stored.schema.schema.clone(), stored.schema.table.clone()),
            stored.schema,
        );
    }
    let chunks = work.len() as u64;
    if let Some(p) = &progress {
        p.chunks_total.store(chunks, Relaxed);
    }
    let progress = &progress;
    let work = Mutex::new(work);
    let workers_all = workers.max(1);
    let workers = workers.clamp(1, chunks.max(1) as usize);
    let l0_text = l0.to_string();
    let (work, load_tables, l0_text) = (&work, &load_tables, &l0_text);
    let mut running = Vec::with_capacity(workers);
    for _ in 0..workers {
        running.push(async move {
            let mut client = source::connect(cfg).await?;
            replica_role(&client).await?;
            loop {
                if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    return Ok(());
                }
                let next = work.lock().ok().and_then(|mut w| w.pop_front());
                let Some((t, c)) = next else {
                    return Ok::<(), Error>(());
                };
                load_chunk(sink, &mut client, &load_tables[t], c, task, l0_text).await?;
                if let Some(p) = progress {
                    let chunk = &load_tables[t].manifest.chunks[c];
                    p.rows.fetch_add(chunk.rows, Relaxed);
                    p.bytes.fetch_add(chunk.bytes, Relaxed);
                    p.chunks_done.fetch_add(1, Relaxed);
                }
            }
        });
    }
    futures_util::future::try_join_all(running).await?;
    let left = work.lock().map(|w| w.len()).unwrap_or(0);
    if left > 0 {
        return Err(Error::Deadline(format!(
            "{left} chunks of the load are left; the next run resumes at them"
        )));
    }

    // 3. post-data, then the load is complete.
    if let (TargetPrep::Create, Some(ddl)) = (prep, &ddl) {
        schema::post_data(cfg, ddl, workers_all, &loaded, &mut schema).await?;
    }
    client
        .execute(
            "update pgshift.applied set load_complete = true, position = $2, l0 = $2, updated_at = now() where task = $1",
            &[&task, &l0.to_string()],
        )
        .await
        .map_err(|e| Error::postgres("recording the load in pgshift.applied", e))?;
    Ok(Some(Loaded {
        rows,
        l0,
        chunks,
        resumed,
        schema,
    }))
}

/// Loads one chunk in its own transaction, recorded in `pgshift.loaded`.
async fn load_chunk<S: ObjectSink>(
    sink: &S,
    client: &mut Client,
    t: &LoadTable,
    c: usize,
    task: &str,
    l0: &str,
) -> Result<()> {
    let chunk = &t.manifest.chunks[c];
    let name = &t.name;
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::postgres(format!("starting a chunk of {name}"), e))?;
    tx.batch_execute("set constraints all deferred")
        .await
        .map_err(|e| Error::postgres("deferring the target's constraints", e))?;
    if t.freeze {
        tx.batch_execute(&format!("truncate only {name}"))
            .await
            .map_err(|e| Error::postgres(format!("emptying {name} for COPY FREEZE"), e))?;
    }
    copy_into(sink, &tx, t, c).await?;
    tx.execute(
        "insert into pgshift.loaded (task, chunk, l0, rows) values ($1, $2, $3, $4)",
        &[&task, &chunk.key, &l0, &(chunk.rows as i64)],
    )
    .await
    .map_err(|e| Error::postgres("recording a loaded chunk", e))?;
    tx.commit()
        .await
        .map_err(|e| Error::postgres(format!("committing a chunk of {name}"), e))
}

/// Chunk `c` of `t` copied into its table inside `tx`, its object checked against its manifest.
pub(super) async fn copy_into<S: ObjectSink>(
    sink: &S,
    tx: &tokio_postgres::Transaction<'_>,
    t: &LoadTable,
    c: usize,
) -> Result<()> {
    let chunk = &t.manifest.chunks[c];
    let name = &t.name;
    if t.keyed {
        tx.batch_execute(&format!(
            "drop table if exists pg_temp.pgshift_load; create temp table pgshift_load (like {name}) on commit drop"
        ))
        .await
        .map_err(|e| Error::postgres(format!("staging a chunk of {name}"), e))?;
    }
    let mut bytes = FileBytes::open(sink, &chunk.key, chunk.bytes, None)
        .await?
        .with_dialect(&t.manifest.csv);
    let copied = if t.manifest.format.encoding == Encoding::Parquet {
        copy_parquet_chunk(tx, t, &chunk.key, &mut bytes).await
    } else {
        copy_chunk(tx, t, &mut bytes).await
    };
    // An object that is not what its manifest says is named as such, whatever broke first.
    let checked = bytes.verify().await;
    match (copied, checked) {
        (_, Err(e)) | (Err(e), Ok(())) => return Err(e),
        (Ok(()), Ok(())) => {}
    }
    if t.keyed {
        tx.batch_execute(&format!("{}; drop table pg_temp.pgshift_load", t.insert))
            .await
            .map_err(|e| Error::postgres(format!("loading {name}"), e))?;
    }
    Ok(())
}

/// A Parquet chunk: spooled to a local temporary file (Parquet is read from its footer, so
/// it cannot stream), then read a record batch at a time into the table's `COPY` as CSV.
async fn copy_parquet_chunk(
    tx: &tokio_postgres::Transaction<'_>,
    t: &LoadTable,
    key: &str,
    bytes: &mut FileBytes,
) -> Result<()> {
    let spooled = bytes.spool().await?;
    let mut rows = ParquetRows::open(&spooled.0, key, &t.manifest.columns)?;
    let mut copy = TableCopy::start(tx, t).await?;
    while let Some(csv) = rows.next_csv()? {
        copy.send(Bytes::from(csv)).await?;
    }
    copy.finish().await
}

/// The table's `COPY .. FROM STDIN`, open, with errors that name the table.
struct TableCopy<'a> {
    name: &'a str,
    sink: std::pin::Pin<Box<tokio_postgres::CopyInSink<Bytes>>>,
}

impl<'a> TableCopy<'a> {
    async fn start(
        tx: &tokio_postgres::Transaction<'_>,
        t: &'a LoadTable,
    ) -> Result<TableCopy<'a>> {
        let sink = tx
            .copy_in::<_, Bytes>(&t.copy)
            .await
            .map_err(|e| Error::postgres(format!("starting COPY into {}", t.name), e))?;
        Ok(TableCopy {
            name: &t.name,
            sink: Box::pin(sink),
        })
    }

    async fn send(&mut self, bytes: Bytes) -> Result<()> {
        self.sink
            .send(bytes)
            .await
            .map_err(|e| Error::postgres(format!("copying into {}", self.name), e))
    }

    async fn finish(mut self) -> Result<()> {
        self.sink
            .as_mut()
            .finish()
            .await
            .map_err(|e| Error::postgres(format!("finishing COPY into {}", self.name), e))?;
        Ok(())
    }
}

/// Streams a chunk file into the table's `COPY` (JSON Lines converted line by line).
async fn copy_chunk(
    tx: &tokio_postgres::Transaction<'_>,
    t: &LoadTable,
    bytes: &mut FileBytes,
) -> Result<()> {
    let mut copy = TableCopy::start(tx, t).await?;
    let jsonl = t.manifest.format.encoding == Encoding::Jsonl;
    // CSV rows that start with an `Op` field (IncludeOpForFullLoad) lose it on the way in, a
    // header row (AddColumnName) is left out.
    let csv = t.manifest.format.encoding == Encoding::Csv;
    let (op_column, mut header) = (t.manifest.op_column, t.manifest.header);
    let mut op_rows = (csv && (op_column || header)).then(crate::staging::decode::CsvRows::new);
    let mut partial: Vec<u8> = Vec::new();
    while let Some(piece) = bytes.next().await? {
        let out = if let Some(rows) = op_rows.as_mut() {
            let mut csv = Vec::with_capacity(piece.len());
            rows.feed(&piece, |row| {
                if std::mem::take(&mut header) {
                    return Ok(());
                }
                if !op_column {
                    csv.extend_from_slice(row);
                    return Ok(());
                }
                let data = row.strip_prefix(b"I,").ok_or_else(|| {
                    Error::Staged(format!(
                        "{}: a row without its Op field (the load manifest says IncludeOpForFullLoad)",
                        t.name
                    ))
                })?;
                csv.extend_from_slice(data);
                Ok(())
            })?;
            Bytes::from(csv)
        } else if jsonl {
            partial.extend_from_slice(&piece);
            let Some(end) = memchr::memrchr(b'\n', &partial) else {
                continue;
            };
            let csv = jsonl_to_csv(&partial[..=end], &t.manifest.columns)?;
            partial.drain(..=end);
            Bytes::from(csv)
        } else {
            piece
        };
        copy.send(out).await?;
    }
    if !partial.is_empty() {
        let csv = jsonl_to_csv(&partial, &t.manifest.columns)?;
        copy.send(Bytes::from(csv)).await?;
    }
    if let Some(rows) = &op_rows {
        rows.finish()?;
    }
    copy.finish().await
}
