//! The poller's schema changes (DESIGN §12): the event trigger's transactional logical
//! messages, decoded between the data changes, and — where none came (PostgreSQL 12/13,
//! capture off or not permitted) — a Relation message whose columns differ, explained from the
//! catalog. Each becomes a schema version with its meaning ([`crate::change::ddl`]) and a
//! segment of the table's file at the next row, so apply runs it in order with the rows.

use std::sync::Arc;

use super::Poller;
use super::batch::Batch;
use crate::change::ddl::{self, ChangeOrigin, DdlMessage, SchemaChange, SchemaOp, TableDefinition};
use crate::change::decoder::Relation;
use crate::error::Result;
use crate::lsn::Lsn;
use crate::pgoutput::LogicalMessage;
use crate::source::CdcSource;
use crate::staging::ObjectSink;
use crate::staging::layout::{self, RelationHistory};
use crate::state::StateStore;
use crate::table::TableSchema;

impl<Src: CdcSource, S: ObjectSink, St: StateStore> Poller<'_, Src, S, St> {
    /// A logical message inside a transaction: this task's schema-change messages are staged,
    /// others (other tasks', other applications') are left alone.
    pub(super) async fn on_logical_message(
        &mut self,
        m: &LogicalMessage<'_>,
        lsn: Lsn,
        batch: Option<&mut Batch<S::Writer>>,
    ) -> Result<()> {
        if m.flags & 1 == 0 || m.prefix != ddl::message_prefix(&self.task.publication) {
            return Ok(());
        }
        match ddl::parse_message(m.content, lsn)? {
            DdlMessage::Changed { tag, definition } => {
                let sel = &self.opts.selection;
                let selected = sel.selects(&definition.schema, &definition.table)
                    || definition
                        .root
                        .as_ref()
                        .is_some_and(|r| sel.selects(&r.schema, &r.table));
                if !selected {
                    return Ok(());
                }
                let prev = self.history(definition.relid).await?.before(lsn).cloned();
                if prev.as_ref() == Some(&definition) {
                    return Ok(()); // an ALTER that changed nothing pgshift carries
                }
                let change = SchemaChange {
                    lsn,
                    tag,
                    origin: ChangeOrigin::Message,
                    ops: ddl::diff(prev.as_ref(), &definition),
                    definition: Some((*definition).clone()),
                    types: Vec::new(),
                };
                let rel = self.record_change(definition.row_schema(), change).await?;
                match batch {
                    Some(b) => {
                        b.schema_change(self.sink, self.opts.format, definition.relid, &rel)
                            .await
                    }
                    None => Ok(()),
                }
            }
            DdlMessage::Dropped { tag, dropped } => {
                if !self.opts.selection.selects(&dropped.schema, &dropped.table) {
                    return Ok(());
                }
                let Some(prev) = self.history(dropped.relid).await?.before(lsn).cloned() else {
                    return Ok(()); // never staged: nothing to drop downstream
                };
                let mut schema = prev.row_schema();
                schema.schema = dropped.schema.clone();
                schema.table = dropped.table.clone();
                let change = SchemaChange {
                    lsn,
                    tag,
                    origin: ChangeOrigin::Message,
                    ops: vec![SchemaOp::DropTable],
                    definition: None,
                    types: Vec::new(),
                };
                let rel = self
                    .record_change_of(dropped.relid, schema, change, None)
                    .await?;
                match batch {
                    Some(b) => {
                        b.schema_change(self.sink, self.opts.format, dropped.relid, &rel)
                            .await
                    }
                    None => Ok(()),
                }
            }
        }
    }

    /// A Relation message of a selected table whose columns match no stored version and no
    /// message: what changed, from the catalog's definition now, when it still has these
    /// columns (else `None`: a later change moved on, and the version carries no meaning).
    pub(super) async fn catalog_change(
        &mut self,
        rel_id: u32,
        schema: &TableSchema,
        lsn: Lsn,
    ) -> Result<Option<Relation>> {
        let Some(definition) = self.source.table_definition(rel_id).await? else {
            return Ok(None);
        };
        let now = definition.row_schema();
        if !now.same_shape(schema) || now.schema != schema.schema || now.table != schema.table {
            tracing::warn!(task = %self.opts.task, table = %definition.qualified(), %lsn, "the table changed again since this change: its new columns are staged without what the change meant");
            return Ok(None);
        }
        let prev = self.history(rel_id).await?.before(lsn).cloned();
        let change = SchemaChange {
            lsn,
            tag: "ALTER TABLE".to_owned(),
            origin: ChangeOrigin::Catalog,
            ops: ddl::diff(prev.as_ref(), &definition),
            definition: Some(definition),
            types: Vec::new(),
        };
        // The Relation message's own schema (its type names) is the version's.
        Ok(Some(
            self.record_change_of(rel_id, schema.clone(), change, None)
                .await?,
        ))
    }

    /// A partitioned root's partitions, from the catalog, when some were added since its
    /// stored definition (no messages: nothing else says so when the rows come through the
    /// root). Only additions: they are harmless ahead of their rows; a detach is not seen.
    pub(super) async fn catalog_partitions(
        &mut self,
        rel_id: u32,
        schema: &TableSchema,
        lsn: Lsn,
    ) -> Result<Option<Relation>> {
        let Some(definition) = self.source.table_definition(rel_id).await? else {
            return Ok(None);
        };
        if definition.kind != "p" {
            return Ok(None);
        }
        let Some(prev) = self.history(rel_id).await?.before(lsn).cloned() else {
            return Ok(None);
        };
        let mut ops: Vec<SchemaOp> = ddl::diff(Some(&prev), &definition)
            .into_iter()
            .filter(|o| matches!(o, SchemaOp::AttachPartition { .. }))
            .collect();
        // Partitioned partitions, level by level: theirs added since their own definition.
        let mut level: Vec<TableDefinition> = vec![definition.clone()];
        while let Some(parent) = level.pop() {
            for p in parent
                .partitions
                .iter()
                .flatten()
                .filter(|p| p.key.is_some())
            {
                let Some(child) = self.source.table_definition(p.relid).await? else {
                    continue;
                };
                let mut history = self.history(p.relid).await?;
                let before = history.before(lsn).cloned();
                let known: Vec<u32> = before
                    .as_ref()
                    .and_then(|b| b.partitions.as_ref())
                    .map(|ps| ps.iter().map(|q| q.relid).collect())
                    .unwrap_or_default();
                for q in child.partitions.iter().flatten() {
                    if !known.contains(&q.relid) {
                        ops.push(SchemaOp::AttachPartition {
                            schema: q.schema.clone(),
                            table: q.table.clone(),
                            bound: q.bound.clone(),
                            key: q.key.clone(),
                            parent: Some(child.qualified()),
                        });
                    }
                }
                if before.as_ref() != Some(&child) {
                    history.record(lsn, Some(child.clone()));
                    layout::put_json(self.sink, &layout::relation_key(p.relid), &history).await?;
                    self.histories.insert(p.relid, history);
                }
                level.push(child);
            }
        }
        if ops.is_empty() {
            return Ok(None);
        }
        let change = SchemaChange {
            lsn,
            tag: "ALTER TABLE".to_owned(),
            origin: ChangeOrigin::Catalog,
            ops,
            definition: Some(definition),
            types: Vec::new(),
        };
        Ok(Some(
            self.record_change_of(rel_id, schema.clone(), change, None)
                .await?,
        ))
    }

    async fn record_change(
        &mut self,
        schema: TableSchema,
        change: SchemaChange,
    ) -> Result<Relation> {
        let def = change.definition.clone();
        let relid = def.as_ref().map_or(0, |d| d.relid);
        self.record_change_of(relid, schema, change, def).await
    }

    /// Writes the version (and the relation's history), and makes it the relation's current
    /// one for the rows that follow.
    async fn record_change_of(
        &mut self,
        relid: u32,
        schema: TableSchema,
        change: SchemaChange,
        definition: Option<TableDefinition>,
    ) -> Result<Relation> {
        let lsn = change.lsn;
        let definition = definition.or_else(|| change.definition.clone());
        // The relation's history keeps the source's names; the version is staged under the
        // transformation rules' (the same without rules).
        let (staged, keep) = self.opts.selection.stage_schema(&schema)?;
        let mut change = self
            .opts
            .selection
            .stage_change(change, (&schema.schema, &schema.table));
        if change.needs_types() && relid != 0 {
            change.types = self.source.type_ddl(relid).await?;
        }
        let version_key = self
            .versions
            .version_for_change(self.sink, &staged, lsn, self.opts.commit_ts_column, change)
            .await?;
        let mut history = self.history(relid).await?;
        history.record(lsn, definition.clone());
        layout::put_json(self.sink, &layout::relation_key(relid), &history).await?;
        self.histories.insert(relid, history);
        let has_pk = definition
            .as_ref()
            .is_some_and(|d| !d.primary_key.is_empty());
        let pk = if has_pk {
            schema.key_indexes().collect()
        } else {
            Vec::new()
        };
        let rel = Relation {
            schema: Arc::new(schema),
            staged: Arc::new(staged),
            keep: keep.map(Arc::new),
            selected: true,
            version_key,
            pk,
        };
        self.relations.insert(relid, rel.clone());
        Ok(rel)
    }

    /// A relation's history (cached for the run).
    async fn history(&mut self, relid: u32) -> Result<RelationHistory> {
        if let Some(h) = self.histories.get(&relid) {
            return Ok(h.clone());
        }
        let h = layout::relation_history(self.sink, relid).await?;
        self.histories.insert(relid, h.clone());
        Ok(h)
    }
}
