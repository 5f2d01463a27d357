//! A batch being assembled: one encoded file per table, opened on its first row, with its
//! counts and schema segments; finished into the files a manifest lists, or abandoned.

use std::collections::BTreeMap;

use crate::change::Op;
use crate::change::decoder::Relation;
use crate::error::Result;
use crate::lsn::Lsn;
use crate::pgoutput::Value;
use crate::staging::encode::{EncodedWriter, Format};
use crate::staging::layout::{BatchFile, SchemaSegment, XidRun, cdc_file_key};
use crate::staging::{ObjectSink, ObjectWriter};

struct TableFile<W: ObjectWriter> {
    writer: EncodedWriter<W>,
    key: String,
    schema: String,
    table: String,
    counts: [u64; 4],
    segments: Vec<SchemaSegment>,
    /// Rows by transaction, for a keyless table (readers skip what a chunk's snapshot saw).
    xids: Option<Vec<XidRun>>,
}

pub(super) struct Batch<W: ObjectWriter> {
    pub(super) start: Lsn,
    /// Set when a manifest for `start` exists: the batch must end exactly here.
    pub(super) must_end: Option<Lsn>,
    /// Open files by relation id.
    files: BTreeMap<u32, TableFile<W>>,
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
}

impl<W: ObjectWriter> Batch<W> {
    pub(super) fn empty(start: Lsn) -> Batch<W> {
        Batch {
            start,
            must_end: None,
            files: BTreeMap::new(),
            changes: 0,
            schema_changes: 0,
            bytes: 0,
            transactions: 0,
            first_commit: None,
            last_commit: Lsn::ZERO,
            last_end: Lsn::ZERO,
            last_commit_ts: 0,
            record_xids: false,
        }
    }

    /// Appends one encoded row of `rel` to its table's file (opened on its first row; a new
    /// schema version starts a segment), of transaction `xid`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn append<S: ObjectSink<Writer = W>>(
        &mut self,
        sink: &S,
        format: Format,
        rel_id: u32,
        rel: &Relation,
        op: Op,
        xid: u32,
        row: &[u8],
    ) -> Result<()> {
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
        file.writer.write_row(row).await?;
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
        self.bytes += row.len() as u64;
        Ok(())
    }

    /// The table file of `rel` in this batch, opened (empty) on first use.
    async fn file_for<S: ObjectSink<Writer = W>>(
        &mut self,
        sink: &S,
        format: Format,
        rel_id: u32,
        rel: &Relation,
    ) -> Result<&mut TableFile<W>> {
        let record_xids = self.record_xids;
        Ok(match self.files.entry(rel_id) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let schema = &rel.schema;
                let key = cdc_file_key(&schema.schema, &schema.table, self.start, format);
                let writer = sink.writer(&key).await?;
                e.insert(TableFile {
                    writer: EncodedWriter::new(writer, format),
                    key,
                    schema: schema.schema.clone(),
                    table: schema.table.clone(),
                    counts: [0; 4],
                    segments: vec![SchemaSegment {
                        key: rel.version_key.clone(),
                        first_row: 0,
                    }],
                    xids: (record_xids && rel.pk.is_empty()).then(Vec::new),
                })
            }
        })
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
        let file = self.file_for(sink, format, rel_id, rel).await?;
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

    /// Step 4's files: every table file completed, as the manifest lists them.
    pub(super) async fn finish_files(&mut self) -> Result<Vec<BatchFile>> {
        let mut files = Vec::with_capacity(self.files.len());
        for (_, f) in std::mem::take(&mut self.files) {
            let rows = f.writer.rows;
            let (bytes, checksum) = f.writer.finish_hashed().await?;
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
                checksum: Some(checksum),
                xids: f.xids.unwrap_or_default(),
            });
        }
        Ok(files)
    }

    /// Discards the batch's files (nothing of it becomes visible).
    pub(super) async fn abandon(self) {
        for (_, f) in self.files {
            f.writer.abort().await;
        }
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
