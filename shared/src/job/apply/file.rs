//! One staged CDC file of a batch: its bytes read in pieces and verified against its manifest
//! ([`FileBytes`], also used for load chunks), and its changes applied in commit order inside
//! the batch's transaction — in set-based runs ([`super::batch::Run`]) between the changes that
//! need their order kept, which go row by row.

use std::collections::HashMap;

use bytes::Bytes;
use tokio_postgres::types::{ToSql, Type};

use super::batch::Run;
use super::changes::{self, Change, Changes, change_statements, is_partial_insert, move_row};
use super::target::{self, Tables, apply_schema_change, sync_columns};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::source::quote_qualified;
use crate::staging::dialect::{CsvDialect, Direction, Transcoder};
use crate::staging::encode::Encoding;
use crate::staging::encode::parquet_read::ParquetRows;
use crate::staging::layout::{self, BatchFile, BatchManifest, StoredSchema};
use crate::staging::{ObjectReader, ObjectSink};
use crate::table::TableSchema;

/// The schema versions a batch file's rows use.
pub(super) async fn file_schemas<S: ObjectSink>(
    sink: &S,
    file: &BatchFile,
) -> Result<Vec<(u64, StoredSchema)>> {
    let mut schemas = Vec::new();
    for seg in &file.schema_versions {
        let s: StoredSchema = serde_json::from_slice(&layout::get_required(sink, &seg.key).await?)
            .map_err(|e| Error::Source(format!("{}: {e}", seg.key)))?;
        schemas.push((seg.first_row, s));
    }
    if schemas.is_empty() {
        return Err(Error::Source(format!(
            "{}: no schema version in the manifest",
            file.key
        )));
    }
    Ok(schemas)
}

/// Reads one file of a batch and applies its changes inside `tx`, but its last set-based run,
/// which is returned (to run while the next file is read).
pub(super) async fn read_file<S: ObjectSink>(
    sink: &S,
    tx: &tokio_postgres::Transaction<'_>,
    m: &BatchManifest,
    file: &BatchFile,
    snapshot: Option<&(crate::staging::layout::Snapshot, Lsn)>,
    tables: &mut Tables,
    statements: &mut HashMap<String, tokio_postgres::Statement>,
) -> Result<(u64, u64, Option<Run>)> {
    let mut schemas = file_schemas(sink, file).await?;
    target::ensure_types(tx, &schemas, (m.start_lsn, m.end_lsn), &mut *tables).await?;
    target::resolve_types(tx, &mut schemas, &mut *tables).await?;
    let seen = super::seen_rows(m, file, snapshot)?;
    let mut bytes = if m.format.encoding == Encoding::Parquet {
        // One schema version per Parquet file: its rows use the last.
        let columns: Vec<String> = schemas
            .last()
            .map(|(_, s)| s.schema.columns.iter().map(|c| c.name.clone()).collect())
            .unwrap_or_default();
        FileBytes::open_parquet_cdc(sink, file, &columns).await?
    } else {
        FileBytes::open(sink, &file.key, file.bytes, file.checksum.as_deref())
            .await?
            .with_dialect(&m.csv)
    };
    let mut changes = Changes::new(m, file, &schemas);
    // An object that is not what its manifest says is named as such, whatever broke
    // first.
    let applied_file = apply_file(
        tx,
        (m.start_lsn, m.end_lsn),
        file,
        &schemas,
        &seen,
        &mut bytes,
        &mut changes,
        tables,
        statements,
    )
    .await;
    let checked = bytes.verify().await;
    match (applied_file, checked) {
        (_, Err(e)) | (Err(e), Ok(())) => Err(e),
        (Ok(counts), Ok(())) => Ok(counts),
    }
}

/// A staged batch file's bytes as they are read (never whole): counted and hashed for the
/// check against its manifest, decompressed when gzipped.
pub(super) struct FileBytes {
    key: String,
    /// The size and checksum its manifest gives.
    want_bytes: u64,
    want_checksum: Option<String>,
    reader: ObjectReader,
    read: u64,
    hash: xxhash_rust::xxh3::Xxh3,
    gz: Option<flate2::write::GzDecoder<Vec<u8>>>,
    done: bool,
    /// A Parquet CDC file: read back as CSV rows (`op`, the columns, `unchanged`) after it
    /// is spooled whole.
    parquet: Option<ParquetCdc>,
    /// A CSV dialect (DMS's CsvDelimiter / CsvNullValue / CsvRowDelimiter) read back as
    /// PostgreSQL's CSV.
    dialect: Option<Transcoder>,
}

struct ParquetCdc {
    columns: Vec<String>,
    rows: Option<(Spooled, ParquetRows)>,
    ended: bool,
}

/// A local file removed when dropped.
pub(super) struct Spooled(pub(super) std::path::PathBuf);

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

static SPOOLED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl FileBytes {
    pub(super) async fn open<S: ObjectSink>(
        sink: &S,
        key: &str,
        want_bytes: u64,
        want_checksum: Option<&str>,
    ) -> Result<FileBytes> {
        let reader = sink.reader(key).await?.ok_or_else(|| {
            Error::Staged(format!(
                "{key} is listed in a manifest but missing from {}",
                sink.describe()
            ))
        })?;
        Ok(FileBytes {
            key: key.to_owned(),
            want_bytes,
            want_checksum: want_checksum.map(str::to_owned),
            reader,
            read: 0,
            hash: xxhash_rust::xxh3::Xxh3::new(),
            gz: key
                .ends_with(".gz")
                .then(|| flate2::write::GzDecoder::new(Vec::new())),
            done: false,
            parquet: None,
            dialect: None,
        })
    }

    /// A CSV file written in `dialect`: its pieces are PostgreSQL's CSV all the same.
    pub(super) fn with_dialect(mut self, dialect: &CsvDialect) -> FileBytes {
        self.dialect = (!dialect.is_default())
            .then(|| Transcoder::new(dialect.clone(), Direction::ToStandard));
        self
    }

    /// A staged Parquet CDC file of `columns` (its schema version's), whose pieces are CSV
    /// rows as a CSV CDC file has them without a commit time: `op`, the columns, `unchanged`.
    pub(super) async fn open_parquet_cdc<S: ObjectSink>(
        sink: &S,
        file: &BatchFile,
        columns: &[String],
    ) -> Result<FileBytes> {
        let mut bytes =
            FileBytes::open(sink, &file.key, file.bytes, file.checksum.as_deref()).await?;
        let mut all = Vec::with_capacity(columns.len() + 2);
        all.push("op".to_owned());
        all.extend_from_slice(columns);
        all.push("unchanged".to_owned());
        bytes.parquet = Some(ParquetCdc {
            columns: all,
            rows: None,
            ended: false,
        });
        Ok(bytes)
    }

    /// Whether every piece has been read.
    pub(super) fn ended(&self) -> bool {
        match &self.parquet {
            Some(p) => p.ended,
            None => self.done,
        }
    }

    /// Writes the whole object to a local temporary file (Parquet is read from its footer).
    pub(super) async fn spool(&mut self) -> Result<Spooled> {
        use tokio::io::AsyncWriteExt;
        let n = SPOOLED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let spooled = Spooled(
            std::env::temp_dir().join(format!("pgshift-apply-{}-{n}.parquet", std::process::id())),
        );
        let key = self.key.clone();
        let failed = |e| Error::io(format!("spooling {key} to {}", spooled.0.display()), e);
        let mut file = tokio::fs::File::create(&spooled.0).await.map_err(&failed)?;
        while let Some(piece) = self.next_raw_piece().await? {
            file.write_all(&piece).await.map_err(&failed)?;
        }
        file.flush().await.map_err(&failed)?;
        drop(file);
        Ok(spooled)
    }

    async fn raw(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        let piece = self.reader.next().await?;
        match &piece {
            Some(b) => {
                self.read += b.len() as u64;
                self.hash.update(b);
            }
            None => self.done = true,
        }
        Ok(piece)
    }

    /// The next piece of the file's (decompressed) bytes — of a Parquet CDC file, CSV rows —;
    /// `None` at its end.
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>> {
        if self
            .parquet
            .as_ref()
            .is_some_and(|p| p.rows.is_none() && !p.ended)
        {
            let spooled = self.spool().await?;
            if let Some(p) = self.parquet.as_mut() {
                let rows = ParquetRows::open(&spooled.0, &self.key, &p.columns)?;
                p.rows = Some((spooled, rows));
            }
        }
        if let Some(p) = self.parquet.as_mut() {
            let next = match p.rows.as_mut() {
                Some((_, rows)) => rows.next_csv()?,
                None => None,
            };
            if next.is_none() {
                p.ended = true;
                p.rows = None;
            }
            return Ok(next.map(Bytes::from));
        }
        if self.dialect.is_none() {
            return self.next_raw_piece().await;
        }
        loop {
            let piece = self.next_raw_piece().await?;
            let Some(t) = self.dialect.as_mut() else {
                return Ok(piece);
            };
            let Some(piece) = piece else {
                t.finish()
                    .map_err(|e| Error::Staged(format!("{}: {e}", self.key)))?;
                return Ok(None);
            };
            let mut out = Vec::with_capacity(piece.len() + piece.len() / 8);
            t.feed(&piece, &mut out)
                .map_err(|e| Error::Staged(format!("{}: {e}", self.key)))?;
            if !out.is_empty() {
                return Ok(Some(Bytes::from(out)));
            }
        }
    }

    /// The next piece of the object's (decompressed) bytes; `None` at its end.
    async fn next_raw_piece(&mut self) -> Result<Option<Bytes>> {
        use std::io::Write;
        let key = self.key.clone();
        loop {
            let piece = self.raw().await?;
            let Some(gz) = self.gz.as_mut() else {
                return Ok(piece);
            };
            match piece {
                Some(b) => gz
                    .write_all(&b)
                    .map_err(|e| Error::io(format!("decompressing {key}"), e))?,
                None => gz
                    .try_finish()
                    .map_err(|e| Error::io(format!("decompressing {key}"), e))?,
            }
            let out = std::mem::take(gz.get_mut());
            if !out.is_empty() {
                return Ok(Some(Bytes::from(out)));
            }
            if self.done {
                return Ok(None);
            }
        }
    }

    /// Reads what is left and checks the whole object is what its manifest says (its size,
    /// and its checksum when the manifest has one).
    pub(super) async fn verify(mut self) -> Result<()> {
        while self.raw().await?.is_some() {}
        let (key, want) = (&self.key, self.want_bytes);
        if self.read != want {
            return Err(Error::Staged(format!(
                "{key} has {} bytes, its manifest says {want}: the object was cut or changed",
                self.read
            )));
        }
        if let Some(want) = &self.want_checksum {
            let got = format!("{:016x}", self.hash.digest());
            if &got != want {
                return Err(Error::Staged(format!(
                    "{key} does not match its manifest's checksum ({got}, want {want}): the object was changed"
                )));
            }
        }
        Ok(())
    }
}

/// Applies one batch file's changes inside the batch's transaction; returns how many were
/// applied and how many of those set-based, and its last run, copied or not, for the caller
/// to apply (while it reads the next file).
#[allow(clippy::too_many_arguments)]
pub(super) async fn apply_file(
    tx: &tokio_postgres::Transaction<'_>,
    batch: (Lsn, Lsn),
    file: &BatchFile,
    schemas: &[(u64, StoredSchema)],
    seen: &[bool],
    bytes: &mut FileBytes,
    changes: &mut Changes<'_>,
    tables: &mut Tables,
    statements: &mut HashMap<String, tokio_postgres::Statement>,
) -> Result<(u64, u64, Option<Run>)> {
    let (mut applied, mut set_based) = (0u64, 0u64);
    let mut current = usize::MAX;
    let mut run: Option<Run> = None;
    // A keyed delete is held one row: the next may be the insert of its key change.
    let mut held: Option<Change> = None;
    let mut rows = 0u64;
    // Schema versions are brought in one after another, each before its first row (several
    // may start at one row, or after the last).
    let mut next_segment = 0usize;
    let names: Vec<String> = schemas
        .iter()
        .map(|(_, s)| quote_qualified(&s.schema.schema, &s.schema.table))
        .collect();
    loop {
        let (si, change) = match changes.next_change(bytes.ended()) {
            Some(next) => next?,
            None if bytes.ended() => break,
            None => {
                if let Some(piece) = bytes.next().await? {
                    changes.feed(&piece);
                }
                continue;
            }
        };
        let row = rows;
        rows += 1;
        if seen.get(row as usize).copied().unwrap_or(false) {
            continue; // already in the load's snapshot
        }
        if next_segment < schemas.len() && schemas[next_segment].0 <= row {
            let ctx = (batch, &mut held, &mut run, &mut set_based);
            next_segment = bring_in(tx, schemas, ctx, current, next_segment, row, tables).await?;
            current = next_segment - 1;
        }
        if si != current {
            return Err(Error::Staged(format!(
                "{}: row {row} has schema version {si}, its segments say {current}",
                file.key
            )));
        }
        let schema = &schemas[si].1.schema;
        let name = &names[si];
        applied += 1;
        if let Some(d) = held.take() {
            if is_partial_insert(schema, &change) {
                if let Some(r) = run.take() {
                    r.apply(tx).await?;
                }
                let [moved, insert] = move_row(schema, name, &d, &change)?;
                if execute(tx, statements, name, &moved).await? == 0 {
                    execute(tx, statements, name, &insert).await?;
                }
                continue;
            }
            push(&mut run, schema, &d, &mut set_based);
        }
        if Run::takes(schema, &change) {
            if change.op == "D" {
                held = Some(change);
                continue;
            }
            push(&mut run, schema, &change, &mut set_based);
            if let Some(r) = run.as_mut().filter(|r| r.full()) {
                r.copy(tx).await?;
            }
            continue;
        }
        if let Some(r) = run.take() {
            r.apply(tx).await?;
        }
        if change.op == "T" {
            truncate(tx, name).await?;
            continue;
        }
        for statement in change_statements(schema, name, &change, &file.key)? {
            execute(tx, statements, name, &statement).await?;
        }
    }
    if next_segment < schemas.len() {
        let ctx = (batch, &mut held, &mut run, &mut set_based);
        bring_in(tx, schemas, ctx, current, next_segment, u64::MAX, tables).await?;
        current = schemas.len() - 1;
    }
    if let (Some(d), Some((_, s))) = (held.take(), schemas.get(current)) {
        push(&mut run, &s.schema, &d, &mut set_based);
    }
    if rows != file.rows {
        return Err(Error::Staged(format!(
            "{} has {rows} rows, its manifest says {}",
            file.key, file.rows
        )));
    }
    // Copied now: what is left of the run is one request, sent before the next file is read.
    if let Some(r) = run.as_mut() {
        r.finish_copy(tx).await?;
    }
    Ok((applied, set_based, run))
}

type Pending<'a> = (
    (Lsn, Lsn),
    &'a mut Option<Change>,
    &'a mut Option<Run>,
    &'a mut u64,
);

/// Brings in every schema version from `next` that starts at or before `row`: what the
/// current one holds back is applied first, then each version in order — a schema change of
/// this batch as its operations say, any other by its columns. Returns the next version.
async fn bring_in(
    tx: &tokio_postgres::Transaction<'_>,
    schemas: &[(u64, StoredSchema)],
    (batch, held, run, set_based): Pending<'_>,
    current: usize,
    mut next: usize,
    row: u64,
    tables: &mut Tables,
) -> Result<usize> {
    if current != usize::MAX {
        let before = &schemas[current].1.schema;
        if let Some(d) = held.take() {
            push(run, before, &d, set_based);
        }
        if let Some(r) = run.take() {
            r.apply(tx).await?;
        }
    }
    while next < schemas.len() && schemas[next].0 <= row {
        let stored = &schemas[next].1;
        match &stored.ddl {
            // Its position is in [start, end): a change can sit right at the checkpoint.
            Some(change) if batch.0 <= change.lsn && change.lsn < batch.1 => {
                apply_schema_change(tx, tables, &stored.schema, change).await?;
            }
            _ => sync_columns(tx, tables, &stored.schema).await?,
        }
        next += 1;
    }
    Ok(next)
}

/// Adds a change to the file's current run (started if none).
fn push(run: &mut Option<Run>, schema: &TableSchema, change: &Change, set_based: &mut u64) {
    run.get_or_insert_with(|| Run::new(schema, &quote_qualified(&schema.schema, &schema.table)))
        .push(change);
    *set_based += 1;
}

/// Runs one row-by-row statement (prepared once per batch), returning the rows it touched.
async fn execute(
    tx: &tokio_postgres::Transaction<'_>,
    statements: &mut HashMap<String, tokio_postgres::Statement>,
    name: &str,
    (sql, values): &changes::Statement,
) -> Result<u64> {
    if !statements.contains_key(sql) {
        let types = vec![Type::TEXT; values.len()];
        let st = tx
            .prepare_typed(sql, &types)
            .await
            .map_err(|e| Error::postgres(format!("preparing a change for {name}"), e))?;
        statements.insert(sql.clone(), st);
    }
    let params: Vec<&(dyn ToSql + Sync)> =
        values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    tx.execute(&statements[sql], &params)
        .await
        .map_err(|e| Error::postgres(format!("applying a change to {name}"), e))
}

/// A staged truncate. The source truncated every table a foreign key ties to this one in the
/// same statement, but the batch applies them one file at a time, and the target refuses to
/// truncate a table another one references on its own (whatever the replication role). Then
/// the rows are deleted instead (in the replica role no foreign-key trigger fires; the
/// referencing table's own truncate follows in the batch): the same end state, never a
/// cascade into a table the source kept.
pub(super) async fn truncate(tx: &tokio_postgres::Transaction<'_>, name: &str) -> Result<()> {
    tx.batch_execute("savepoint pgshift_truncate")
        .await
        .map_err(|e| Error::postgres(format!("truncating {name}"), e))?;
    match tx.batch_execute(&format!("truncate {name}")).await {
        Ok(()) => tx.batch_execute("release savepoint pgshift_truncate").await,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED) => {
            tx.batch_execute(&format!(
                "rollback to savepoint pgshift_truncate; delete from {name}; release savepoint pgshift_truncate"
            ))
            .await
        }
        Err(e) => Err(e),
    }
    .map_err(|e| Error::postgres(format!("truncating {name}"), e))
}
