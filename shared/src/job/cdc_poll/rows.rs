//! The poller's rows: a Relation message becomes the relation's schema (and its stored
//! version), a change becomes encoded rows in the batch (an UPDATE of the primary key as
//! D + I, TOAST filled from a full old row; both in [`crate::change::decoder`]).

use std::sync::Arc;

use super::Poller;
use super::Txn;
use super::batch::{Batch, Encoded, Row};
use crate::change::Op;
use crate::change::RowChange;
use crate::change::decoder::{self, Relation, RelationInfo};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::pgoutput;
use crate::source::CdcSource;
use crate::staging::ObjectSink;
use crate::staging::encode::{Encoding, cdc_csv_row, cdc_json_row, transaction_csv_row};
use crate::state::StateStore;

impl<Src: CdcSource, S: ObjectSink, St: StateStore> Poller<'_, Src, S, St> {
    pub(super) async fn on_relation(&mut self, r: &pgoutput::Relation<'_>, lsn: Lsn) -> Result<()> {
        let selected = self.opts.selection.selects(r.namespace, r.name);
        let info = if selected {
            let types: Vec<(u32, i32)> = r
                .columns
                .iter()
                .map(|c| (c.type_oid, c.type_modifier))
                .collect();
            self.source.relation_info(r.rel_id, &types).await?
        } else {
            RelationInfo::default()
        };
        let (schema, pk) = decoder::table_schema(r, &info);
        if self.relations.is_current(r.rel_id, &schema) {
            return Ok(()); // Relation messages repeat in every peek.
        }
        // Transformation rules: the names it is staged under, the columns staged.
        let (staged, keep) = if selected {
            self.opts.selection.stage_schema(&schema)?
        } else {
            (schema.clone(), None)
        };
        let version_key = if selected {
            match self
                .versions
                .current(self.sink, &staged, self.opts.commit_ts_column)
                .await?
            {
                // Partitions created or attached under a root whose rows come through it
                // (PostgreSQL 13 without messages): created on the target before its rows.
                Some(key) if !self.ddl_messages => {
                    match self.catalog_partitions(r.rel_id, &schema, lsn).await? {
                        Some(rel) => rel.version_key,
                        None => key,
                    }
                }
                Some(key) => key,
                // New columns no schema-change message explained: the catalog says what
                // they mean when it still has them.
                None => match self.catalog_change(r.rel_id, &schema, lsn).await? {
                    Some(rel) => rel.version_key,
                    None => {
                        self.versions
                            .version_for(self.sink, &staged, lsn, self.opts.commit_ts_column)
                            .await?
                    }
                },
            }
        } else {
            String::new()
        };
        self.relations.insert(
            r.rel_id,
            Relation {
                schema: Arc::new(schema),
                staged: Arc::new(staged),
                keep: keep.map(Arc::new),
                selected,
                version_key,
                pk,
            },
        );
        Ok(())
    }

    pub(super) async fn stage_update(
        &mut self,
        batch: &mut Batch<S::Writer>,
        t: &Txn,
        lsn: Lsn,
        u: &pgoutput::Update<'_>,
    ) -> Result<()> {
        let rel = self.relation(u.rel_id, lsn)?;
        if !rel.selected {
            return Ok(());
        }
        let rows = decoder::update_rows(&rel.pk, u);
        // A filtered stage (CdcInsertsOnly / CdcInsertsAndUpdates) writes an update, a key
        // change included, as one U of the new row, as DMS does — or not at all.
        let filtered = !self.opts.cdc_ops.is_all();
        if filtered && !self.opts.cdc_ops.keeps(Op::Update) {
            return Ok(());
        }
        // CSV and Parquet rows carry no old row: an update of a table without a primary key
        // (captured under REPLICA IDENTITY FULL) is staged as D(old row) + I(new row) there,
        // the only form a reader (apply) can find the row by. JSON Lines keeps the U with its
        // `before`.
        let keyless_without_before =
            rel.pk.is_empty() && rows.old_is_full && self.opts.format.encoding != Encoding::Jsonl;
        if !filtered && (rows.key_changed || keyless_without_before) {
            let del = Row::new(Op::Delete, u.rel_id, rows.old, rows.old_is_full, None);
            self.stage(batch, t, lsn, del).await?;
            let ins = Row::new(Op::Insert, u.rel_id, None, false, Some(&rows.new));
            self.stage(batch, t, lsn, ins).await
        } else {
            let upd = Row::new(
                Op::Update,
                u.rel_id,
                rows.old,
                rows.old_is_full,
                Some(&rows.new),
            );
            self.stage(batch, t, lsn, upd).await
        }
    }

    fn relation(&self, rel_id: u32, lsn: Lsn) -> Result<&Relation> {
        self.relations.get(rel_id).ok_or_else(|| {
            Error::Protocol(format!(
                "change at {lsn} for relation {rel_id} before its Relation message"
            ))
        })
    }

    /// Encodes one row change into its table's file of the batch.
    pub(super) async fn stage(
        &mut self,
        batch: &mut Batch<S::Writer>,
        t: &Txn,
        lsn: Lsn,
        row: Row<'_, '_>,
    ) -> Result<()> {
        let Some(rel) = self.relations.get(row.rel_id) else {
            return Err(Error::Protocol(format!(
                "change at {lsn} for relation {} before its Relation message",
                row.rel_id
            )));
        };
        // CdcInsertsOnly / CdcInsertsAndUpdates: the other changes are not staged.
        if !rel.selected || !self.opts.cdc_ops.keeps(row.op) {
            return Ok(());
        }
        let (sink, opts) = (self.sink, self.opts);
        // Columns transformation rules remove are not staged.
        let keep = rel.keep.as_deref().map(Vec::as_slice);
        let (old, new) = (project(keep, row.old), project(keep, row.new));
        let change = RowChange {
            op: row.op,
            table: &rel.staged,
            lsn,
            commit_lsn: t.final_lsn,
            xid: t.xid,
            commit_ts: t.commit_ts,
            old: if rel.keep.is_some() {
                old.as_deref()
            } else {
                row.old
            },
            old_is_full: row.old_is_full,
            new: if rel.keep.is_some() {
                new.as_deref()
            } else {
                row.new
            },
        };
        let buf = &mut self.row_buf;
        buf.clear();
        let encoded = match opts.format.encoding {
            Encoding::Csv => {
                cdc_csv_row(&change, opts.op_field(), opts.commit_ts_column, buf);
                Encoded::Bytes(buf)
            }
            Encoding::Jsonl => {
                cdc_json_row(&change, buf)?;
                Encoded::Bytes(buf)
            }
            Encoding::Parquet => Encoded::Change(&change),
        };
        batch
            .append(sink, opts.format, row.rel_id, rel, row.op, t.xid, encoded)
            .await?;
        if opts.cdc_path.is_some() {
            let buf = &mut self.txn_buf;
            buf.clear();
            transaction_csv_row(&change, opts.op_field(), opts.commit_ts_column, buf);
            batch.append_txn(sink, buf).await?;
        }
        Ok(())
    }
}

/// The values of the columns `keep` lists (`None` without a row or without a projection).
fn project<'v>(
    keep: Option<&[usize]>,
    row: Option<&[pgoutput::Value<'v>]>,
) -> Option<Vec<pgoutput::Value<'v>>> {
    let (keep, row) = (keep?, row?);
    Some(keep.iter().filter_map(|&i| row.get(i).copied()).collect())
}
