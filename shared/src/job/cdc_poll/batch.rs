//! A batch being assembled: one encoded file per table, opened on its first row, with its
//! counts and schema segments; finished into the files a manifest lists, or abandoned.
//! Parquet holds one schema per file: a table whose columns change after rows of the batch
//! continues in a new file (a part), listed after the one before it.
//! With PreserveTransactions, every staged row is also written, in commit order, to the
//! batch's one transaction file (`<CdcPath>/CDC_TXN-<ms>.csv`).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::change::decoder::Relation;
use crate::change::{Op, RowChange};
use crate::error::Result;
use crate::lsn::Lsn;
use crate::pgoutput::Value;
use crate::staging::dialect::CsvDialect;
use crate::staging::encode::parquet::ParquetEncoder;
use crate::staging::encode::{EncodedWriter, Encoding, Format, csv_header};
use crate::staging::layout::{
    BatchFile, DatePartition, SchemaSegment, TransactionFile, XidRun, cdc_part_key, csv_cdc_fields,
    transaction_file_key, transaction_file_ms,
};
use crate::staging::{ObjectSink, ObjectWriter};
use crate::table::TableSchema;

/// A row for a table's file: encoded already (CSV, JSON Lines), or a change for its Parquet
/// encoder.
pub(super) enum Encoded<'a> {
    Bytes(&'a [u8]),
    Change(&'a RowChange<'a>),
}

struct TableFile<W: ObjectWriter> {
    writer: EncodedWriter<W>,
    format: Format,
    /// Parquet: the file's encoder, made at its first row for that row's schema version.
    parquet: Option<ParquetEncoder>,
    /// The schema of the file's latest version (an empty Parquet file is written with it).
    latest: Arc<TableSchema>,
    /// 0 for the table's first file of the batch, then 1, 2, ...
    part: u32,
    /// Its CSV header row is written (AddColumnName).
    header_written: bool,
    key: String,
    schema: String,
    table: String,
    counts: [u64; 4],
    segments: Vec<SchemaSegment>,
    /// Rows by transaction, for a keyless table (readers skip what a chunk's snapshot saw).
    xids: Option<Vec<XidRun>>,
}

/// The batch's transaction file (PreserveTransactions), opened on its first row.
struct TxnFile<W: ObjectWriter> {
    writer: EncodedWriter<W>,
    key: String,
    unix_ms: i64,
}

pub(super) struct Batch<W: ObjectWriter> {
    pub(super) start: Lsn,
    /// Set when a manifest for `start` exists: the batch must end exactly here.
    pub(super) must_end: Option<Lsn>,
    /// Open files by relation id.
    files: BTreeMap<u32, TableFile<W>>,
    /// Parquet parts completed when their table's columns changed, by (relation id, part).
    parts: BTreeMap<(u32, u32), BatchFile>,
    pub(super) changes: u64,
    /// Schema changes staged (each a segment of its table's file).
    pub(super) schema_changes: u64,
    pub(super) bytes: u64,
    pub(super) transactions: u64,
    pub(super) first_commit: Option<Lsn>,
    pub(super) last_commit: Lsn,
    pub(super) last_end: Lsn,
    pub(super) last_commit_ts: i64,
    /// List a keyless table's rows by transaction (only while a load snapshot may have seen
    /// them: see `records::snapshot_horizon`).
    pub(super) record_xids: bool,
    /// Files in date folders by their first transaction's commit date (DatePartitionEnabled).
    pub(super) date_partition: Option<DatePartition>,
    /// The commit time of the transaction being staged.
    pub(super) txn_commit_ts: i64,
    /// CSV files start with a header row (AddColumnName): (commit time column, Op field).
    /// A file then holds one schema version, as in Parquet.
    pub(super) csv_header: Option<(bool, bool)>,
    /// CSV files in this dialect (CsvDelimiter / CsvNullValue / CsvRowDelimiter).
    pub(super) dialect: CsvDialect,
    /// PreserveTransactions: the transaction files' folder, and the time in the task's
    /// previous file name (this batch's is later).
    pub(super) txn_path: Option<String>,
    pub(super) txn_previous_ms: Option<i64>,
    /// Gzip the transaction file (CompressionType GZIP).
    pub(super) txn_gzip: bool,
    /// The transaction file's CSV dialect (the tables' files have theirs only when CSV).
    pub(super) txn_dialect: CsvDialect,
    /// Boxed: a writer is large (an S3 part buffer's state), the batch lives on the stack.
    txn: Option<Box<TxnFile<W>>>,
}

impl<W: ObjectWriter> Batch<W> {
    pub(super) fn empty(start: Lsn) -> Batch<W> {
        Batch {
            start,
            must_end: None,
            files: BTreeMap::new(),
            parts: BTreeMap::new(),
            changes: 0,
            schema_changes: 0,
            bytes: 0,
            transactions: 0,
            first_commit: None,
            last_commit: Lsn::ZERO,
            last_end: Lsn::ZERO,
            last_commit_ts: 0,
            record_xids: false,
            date_partition: None,
            txn_commit_ts: 0,
            csv_header: None,
            dialect: CsvDialect::default(),
            txn_path: None,
            txn_previous_ms: None,
            txn_gzip: false,
            txn_dialect: CsvDialect::default(),
            txn: None,
        }
    }

    /// Appends one row, encoded as the transaction file's CSV, to the batch's transaction file
    /// (opened on the first, named by the commit time of the transaction being staged).
    pub(super) async fn append_txn<S: ObjectSink<Writer = W>>(
        &mut self,
        sink: &S,
        row: &[u8],
    ) -> Result<()> {
        if self.txn.is_none() {
            let Some(path) = &self.txn_path else {
                return Ok(());
            };
            let unix_ms = transaction_file_ms(self.txn_commit_ts, self.txn_previous_ms);
            let key = transaction_file_key(path, unix_ms, self.txn_gzip);
            let format = Format {
                encoding: Encoding::Csv,
                gzip: self.txn_gzip,
                timestamp_ms: false,
            };
            let writer = EncodedWriter::new(sink.writer(&key).await?, format)
                .with_dialect(&self.txn_dialect);
            self.txn = Some(Box::new(TxnFile {
                writer,
                key,
                unix_ms,
            }));
        }
        let txn = self
            .txn
            .as_mut()
            .expect("the transaction file was just opened");
        // Not counted in the batch's size limit: the tables' files carry the same rows.
        txn.writer.write_row(row).await
    }

    /// The transaction file completed, as the manifest lists it (none when nothing was staged
    /// or PreserveTransactions is off).
    pub(super) async fn finish_txn(&mut self) -> Result<Option<TransactionFile>> {
        let Some(txn) = self.txn.take().map(|t| *t) else {
            return Ok(None);
        };
        let rows = txn.writer.rows;
        let (bytes, checksum) = txn.writer.finish_hashed().await?;
        Ok(Some(TransactionFile {
            key: txn.key,
            unix_ms: txn.unix_ms,
            rows,
            bytes,
            checksum,
        }))
    }

    /// Appends one row of `rel` to its table's file (opened on its first row; a new schema
    /// version starts a segment, or in Parquet a new part), of transaction `xid`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn append<S: ObjectSink<Writer = W>>(
        &mut self,
        sink: &S,
        format: Format,
        rel_id: u32,
        rel: &Relation,
        op: Op,
        xid: u32,
        row: Encoded<'_>,
    ) -> Result<()> {
        self.new_part_if_changed(sink, format, rel_id, rel).await?;
        let header = self.csv_header;
        let file = self.file_for(sink, format, rel_id, rel).await?;
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
        file.latest = rel.staged.clone();
        if let Some((ts, op)) = header
            && !file.header_written
        {
            file.header_written = true;
            let names = csv_cdc_fields(&rel.staged, ts, op);
            file.writer.write_rows(&csv_header(&names), 0).await?;
        }
        let len = match row {
            Encoded::Bytes(row) => {
                file.writer.write_row(row).await?;
                row.len()
            }
            Encoded::Change(change) => {
                let enc = match &mut file.parquet {
                    Some(enc) => enc,
                    None => file
                        .parquet
                        .insert(ParquetEncoder::for_cdc(&rel.staged, format.timestamp_ms)?),
                };
                enc.push_change(change)?;
                let out = enc.take_output();
                if out.is_empty() {
                    file.writer.rows += 1;
                } else {
                    file.writer.write_rows(&out, 1).await?;
                }
                // What the batch's size limit counts: about the row's CSV size.
                change
                    .new
                    .or(change.old)
                    .map_or(0, |r| r.iter().map(value_len).sum::<usize>())
                    + rel.staged.columns.len()
                    + 2
            }
        };
        if let Some(runs) = &mut file.xids {
            match runs.last_mut() {
                Some(run) if run.xid == xid => run.rows += 1,
                _ => runs.push(XidRun { xid, rows: 1 }),
            }
        }
        file.counts[match op {
            Op::Insert => 0,
            Op::Update => 1,
            Op::Delete => 2,
            Op::Truncate => 3,
        }] += 1;
        self.changes += 1;
        self.bytes += len as u64;
        Ok(())
    }

    /// Parquet: when `rel`'s open file has rows of another schema version, completes it (a
    /// part of the manifest) so the next row or change starts the table's next file.
    async fn new_part_if_changed<S: ObjectSink<Writer = W>>(
        &mut self,
        sink: &S,
        format: Format,
        rel_id: u32,
        rel: &Relation,
    ) -> Result<()> {
        if format.encoding != Encoding::Parquet && self.csv_header.is_none() {
            return Ok(());
        }
        let Some(file) = self.files.get(&rel_id) else {
            return Ok(());
        };
        let other = file
            .segments
            .last()
            .is_some_and(|s| s.key != rel.version_key);
        if !(other && file.writer.rows > 0) {
            return Ok(());
        }
        if let Some(file) = self.files.remove(&rel_id) {
            let part = file.part;
            let done = file.finish(self.csv_header).await?;
            self.parts.insert((rel_id, part), done);
            let next = self.open(sink, format, rel, part + 1).await?;
            self.files.insert(rel_id, next);
        }
        Ok(())
    }

    async fn open<S: ObjectSink<Writer = W>>(
        &self,
        sink: &S,
        format: Format,
        rel: &Relation,
        part: u32,
    ) -> Result<TableFile<W>> {
        let schema = &rel.staged;
        let date = self.date_partition.map(|d| d.path(self.txn_commit_ts));
        let key = cdc_part_key(
            &schema.schema,
            &schema.table,
            self.start,
            format,
            part,
            date.as_deref(),
        );
        let writer = sink.writer(&key).await?;
        Ok(TableFile {
            writer: EncodedWriter::new(writer, format).with_dialect(&self.dialect),
            format,
            parquet: None,
            latest: rel.staged.clone(),
            part,
            header_written: false,
            key,
            schema: schema.schema.clone(),
            table: schema.table.clone(),
            counts: [0; 4],
            segments: vec![SchemaSegment {
                key: rel.version_key.clone(),
                first_row: 0,
            }],
            xids: (self.record_xids && rel.pk.is_empty()).then(Vec::new),
        })
    }

    /// The table file of `rel` in this batch, opened (empty) on first use.
    async fn file_for<S: ObjectSink<Writer = W>>(
        &mut self,
        sink: &S,
        format: Format,
        rel_id: u32,
        rel: &Relation,
    ) -> Result<&mut TableFile<W>> {
        if !self.files.contains_key(&rel_id) {
            let file = self.open(sink, format, rel, 0).await?;
            self.files.insert(rel_id, file);
        }
        Ok(self
            .files
            .get_mut(&rel_id)
            .expect("the table's file was just opened"))
    }

    /// A schema change of `rel` (its new version in `rel.version_key`): a segment of its file
    /// starting at the next row, the file opened (with no rows yet) if need be, so the change
    /// is applied in order with the table's rows even when no row follows it in the batch.
    pub(super) async fn schema_change<S: ObjectSink<Writer = W>>(
        &mut self,
        sink: &S,
        format: Format,
        rel_id: u32,
        rel: &Relation,
    ) -> Result<()> {
        self.schema_changes += 1;
        self.new_part_if_changed(sink, format, rel_id, rel).await?;
        let file = self.file_for(sink, format, rel_id, rel).await?;
        file.latest = rel.staged.clone();
        let first_row = file.writer.rows;
        match file.segments.last() {
            // A file just opened for this change starts at it.
            Some(last) if last.first_row == first_row && last.key == rel.version_key => {}
            _ => file.segments.push(SchemaSegment {
                key: rel.version_key.clone(),
                first_row,
            }),
        }
        Ok(())
    }

    /// Step 4's files: every table file completed, as the manifest lists them (a table's
    /// Parquet parts in order).
    pub(super) async fn finish_files(&mut self) -> Result<Vec<BatchFile>> {
        let mut files = std::mem::take(&mut self.parts);
        for (rel_id, f) in std::mem::take(&mut self.files) {
            let part = f.part;
            files.insert((rel_id, part), f.finish(self.csv_header).await?);
        }
        Ok(files.into_values().collect())
    }

    /// Discards the batch's files (nothing of it becomes visible).
    pub(super) async fn abandon(self) {
        for (_, f) in self.files {
            f.writer.abort().await;
        }
        if let Some(txn) = self.txn {
            txn.writer.abort().await;
        }
    }
}

impl<W: ObjectWriter> TableFile<W> {
    /// Completes the object (a Parquet file's footer written, an empty one with its latest
    /// schema) as its manifest entry.
    async fn finish(mut self, header: Option<(bool, bool)>) -> Result<BatchFile> {
        if let Some((ts, op)) = header
            && !self.header_written
        {
            let names = csv_cdc_fields(&self.latest, ts, op);
            self.writer.write_rows(&csv_header(&names), 0).await?;
        }
        if self.format.encoding == Encoding::Parquet {
            let enc = match self.parquet.take() {
                Some(enc) => enc,
                None => ParquetEncoder::for_cdc(&self.latest, self.format.timestamp_ms)?,
            };
            let tail = enc.finish()?;
            self.writer.write_rows(&tail, 0).await?;
        }
        let rows = self.writer.rows;
        let (bytes, checksum) = self.writer.finish_hashed().await?;
        Ok(BatchFile {
            key: self.key,
            schema: self.schema,
            table: self.table,
            rows,
            bytes,
            inserts: self.counts[0],
            updates: self.counts[1],
            deletes: self.counts[2],
            truncates: self.counts[3],
            schema_versions: self.segments,
            checksum: Some(checksum),
            xids: self.xids.unwrap_or_default(),
        })
    }
}

/// A value's size in bytes as text (0 for NULL and an unchanged TOAST value).
fn value_len(v: &Value<'_>) -> usize {
    match v {
        Value::Text(t) | Value::Binary(t) => t.len(),
        Value::Null | Value::UnchangedToast => 0,
    }
}

/// One row change to stage, before it meets its relation.
pub(super) struct Row<'r, 'v> {
    pub(super) op: Op,
    pub(super) rel_id: u32,
    pub(super) old: Option<&'r [Value<'v>]>,
    pub(super) old_is_full: bool,
    pub(super) new: Option<&'r [Value<'v>]>,
}

impl<'r, 'v> Row<'r, 'v> {
    pub(super) fn new(
        op: Op,
        rel_id: u32,
        old: Option<&'r [Value<'v>]>,
        old_is_full: bool,
        new: Option<&'r [Value<'v>]>,
    ) -> Row<'r, 'v> {
        Row {
            op,
            rel_id,
            old,
            old_is_full,
            new,
        }
    }
}
