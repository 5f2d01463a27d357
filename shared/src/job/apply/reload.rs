//! Reloads (DMS's "reload table"; staged by `job::full_load::reload`) applied to the target.
//!
//! A complete reload from R0 is applied once the target's position is at or past R0, between
//! two batches, in one target transaction: the table's rows replaced by the reload's chunks
//! (emptied as a staged truncate is; kept with `--target-prep keep`), then the table's files
//! of every batch that ended after R0 up to the position re-applied in commit order (upserts
//! by key; a table reloaded from one snapshot skips the transactions that snapshot saw), then
//! the reload recorded in `pgshift.reloads`. A crash rolls all of it back; the rerun does it
//! again. Later batches skip, for that table, what its reload's snapshot saw. Of several
//! reloads of a table not applied yet, the newest is applied and the older ones are left.
//!
//! A reload whose table changed shape (a column added, dropped, retyped) or had a schema
//! change while it ran is refused with an error saying to reload it again: its chunks and the
//! changes after R0 would not be of one shape.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use super::file::{file_schemas, truncate};
use super::load::{LoadTable, copy_into};
use super::schema::{self, TargetPrep};
use super::target::{Tables, ensure_table};
use super::{batch, read_file};
use crate::change::ddl::SchemaOp;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::source::quote_qualified;
use crate::staging::ObjectSink;
use crate::staging::layout::{
    self, BatchManifest, LoadManifest, RELOAD_MANIFESTS, Snapshot, StoredSchema,
};

/// The reloads in the stage and those this target applied.
#[derive(Debug, Default)]
pub(super) struct Reloads {
    /// Staged reload manifests, in R0 order.
    staged: Vec<(Lsn, String)>,
    /// Manifests this target applied.
    applied: HashSet<String>,
    /// The load the target holds: reloads of an earlier incarnation of the task (before it
    /// was started over) are not this one's.
    l0: Option<Lsn>,
}

/// What applying reloads did.
#[derive(Debug, Default)]
pub(super) struct Reloaded {
    pub(super) tables: Vec<String>,
    pub(super) rows: u64,
    pub(super) replayed: u64,
}

/// The table a manifest key is of: what follows `_manifests/reload/<R0>/`.
fn table_part(key: &str) -> &str {
    key.strip_prefix(RELOAD_MANIFESTS)
        .and_then(|k| k.split_once('/'))
        .map_or(key, |(_, t)| t)
}

impl Reloads {
    /// What the target applied, and the stage's reloads.
    pub(super) async fn read<S: ObjectSink>(
        sink: &S,
        client: &Client,
        task: &str,
    ) -> Result<Reloads> {
        let applied = client
            .query(
                "select manifest from pgshift.reloads where task = $1",
                &[&task],
            )
            .await
            .map_err(|e| Error::postgres("reading the applied reloads", e))?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let l0: Option<String> = client
            .query_one("select l0 from pgshift.applied where task = $1", &[&task])
            .await
            .map_err(|e| Error::postgres("reading the applied position", e))?
            .get(0);
        let l0 = l0.and_then(|t| t.parse().ok());
        Ok(Reloads {
            staged: layout::reload_manifest_keys(sink).await?,
            applied,
            l0,
        })
    }

    /// The stage listed again (reloads finished since).
    pub(super) async fn refresh<S: ObjectSink>(&mut self, sink: &S) -> Result<()> {
        self.staged = layout::reload_manifest_keys(sink).await?;
        Ok(())
    }

    /// The reloads to apply at `position`: per table the newest staged one, once the target
    /// is at or past it and unless it applied it (an older one is superseded, applied or not).
    fn due(&self, position: Lsn) -> Vec<(Lsn, String)> {
        let mut newest: HashMap<&str, (Lsn, &String)> = HashMap::new();
        for (r0, key) in &self.staged {
            if self.l0.is_some_and(|l0| *r0 < l0) {
                continue;
            }
            newest.insert(table_part(key), (*r0, key));
        }
        let mut due: Vec<(Lsn, String)> = newest
            .into_values()
            .filter(|(r0, key)| *r0 <= position && !self.applied.contains(*key))
            .map(|(r0, key)| (r0, key.clone()))
            .collect();
        due.sort();
        due
    }

    /// The snapshots of the single-snapshot reloads this target applied (the newest of each
    /// table), over `snapshots` (the load's): later batches skip what they saw.
    pub(super) async fn snapshots<S: ObjectSink>(
        &self,
        sink: &S,
        snapshots: &mut HashMap<(String, String), (Snapshot, Lsn)>,
    ) -> Result<()> {
        for (_, key) in self.staged.iter().filter(|(_, k)| self.applied.contains(k)) {
            let m: LoadManifest = layout::get_json(sink, key, "a reload manifest").await?;
            set_snapshot(key, &m, snapshots)?;
        }
        Ok(())
    }
}

/// A table's snapshot after its reload: the reload's when it was read from one, else none.
fn set_snapshot(
    key: &str,
    m: &LoadManifest,
    snapshots: &mut HashMap<(String, String), (Snapshot, Lsn)>,
) -> Result<()> {
    let id = (m.schema.clone(), m.table.clone());
    match m.chunks.as_slice() {
        [chunk] => match (&chunk.snapshot, chunk.snapshot_lsn) {
            (Some(text), Some(lsn)) => {
                let snap = Snapshot::parse(text)
                    .ok_or_else(|| Error::Staged(format!("{key}: malformed snapshot {text:?}")))?;
                snapshots.insert(id, (snap, lsn));
            }
            _ => {
                snapshots.remove(&id);
            }
        },
        _ => {
            snapshots.remove(&id);
        }
    }
    Ok(())
}

/// Applies the reloads due at `position` (see the module docs).
pub(super) async fn apply_due<S: ObjectSink>(
    sink: &S,
    client: &mut Client,
    (task, position): (&str, Lsn),
    prep: TargetPrep,
    reloads: &mut Reloads,
    tables: &mut Tables,
    snapshots: &mut HashMap<(String, String), (Snapshot, Lsn)>,
) -> Result<Reloaded> {
    let mut done = Reloaded::default();
    let due = reloads.due(position);
    if due.is_empty() {
        return Ok(done);
    }
    let batches = layout::batch_manifest_keys(sink).await?;
    for (r0, key) in due {
        let m: LoadManifest = layout::get_json(sink, &key, "a reload manifest").await?;
        let (rows, replayed) = apply_one(
            sink,
            client,
            task,
            (r0, &key),
            &m,
            position,
            prep,
            &batches,
            tables,
        )
        .await?;
        tracing::info!(task, table = %format!("{}.{}", m.schema, m.table), r0 = %r0, rows, replayed, "reload applied");
        set_snapshot(&key, &m, snapshots)?;
        reloads.applied.insert(key);
        done.tables.push(format!("{}.{}", m.schema, m.table));
        done.rows += rows;
        done.replayed += replayed;
    }
    Ok(done)
}

#[allow(clippy::too_many_arguments)]
async fn apply_one<S: ObjectSink>(
    sink: &S,
    client: &mut Client,
    task: &str,
    (r0, key): (Lsn, &str),
    m: &LoadManifest,
    position: Lsn,
    prep: TargetPrep,
    batches: &[String],
    tables: &mut Tables,
) -> Result<(u64, u64)> {
    let what = format!("the reload of {}.{} from {r0}", m.schema, m.table);
    if m.transformed && prep == TargetPrep::Create {
        return Err(Error::Staged(super::transformed_stage(&what)));
    }
    if m.format.timestamp_ms {
        return Err(Error::Staged(super::millisecond_stage(&what)));
    }
    let schema_key = m
        .schema_key
        .as_deref()
        .ok_or_else(|| Error::Staged(format!("{key} names no schema version")))?;
    let stored: StoredSchema = layout::get_json(sink, schema_key, "a schema version").await?;
    // The batches after R0 the target applied, each following the one before.
    let ends: HashSet<Lsn> = batches
        .iter()
        .filter_map(|k| layout::batch_range(k))
        .map(|(_, e)| e)
        .collect();
    let mut window = Vec::new();
    for k in batches {
        let Some((_, end)) = layout::batch_range(k) else {
            continue;
        };
        if end <= r0 || end > position {
            continue;
        }
        let bm: BatchManifest = layout::get_json(sink, k, "a batch manifest").await?;
        if let Some(prev) = bm.prev_end_lsn
            && !ends.contains(&prev)
            && prev > r0
        {
            return Err(Error::Staged(format!(
                "{k} follows a batch that ended at {prev}, whose manifest is missing from {}: {what} cannot re-apply the changes after it",
                sink.describe()
            )));
        }
        let files: Vec<_> = bm
            .files
            .iter()
            .filter(|f| f.schema == m.schema && f.table == m.table)
            .cloned()
            .collect();
        for f in &files {
            for (_, s) in file_schemas(sink, f).await? {
                // A table that joined the publication is announced as created (`if not
                // exists`): no change of shape.
                let changed = s.ddl.as_ref().is_some_and(|d| {
                    bm.start_lsn <= d.lsn
                        && d.lsn < bm.end_lsn
                        && d.lsn > r0
                        && !d
                            .ops
                            .iter()
                            .all(|op| matches!(op, SchemaOp::CreateTable { .. }))
                });
                if changed || !same_columns(&s.schema, &stored.schema) {
                    return Err(Error::Staged(format!(
                        "{what}: the table's schema changed at or after {} while it was reloaded: run the reload again (its rows and the changes after it must be of one shape)",
                        s.lsn
                    )));
                }
            }
        }
        if !files.is_empty() {
            window.push((bm, files));
        }
    }
    let snapshot = match m.chunks.as_slice() {
        [chunk] => match (&chunk.snapshot, chunk.snapshot_lsn) {
            (Some(text), Some(lsn)) => Some((
                Snapshot::parse(text)
                    .ok_or_else(|| Error::Staged(format!("{key}: malformed snapshot {text:?}")))?,
                lsn,
            )),
            _ => None,
        },
        _ => None,
    };
    let name = quote_qualified(&m.schema, &m.table);
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::postgres(format!("starting {what}"), e))?;
    tx.batch_execute("set constraints all deferred")
        .await
        .map_err(|e| Error::postgres("deferring the target's constraints", e))?;
    match prep {
        TargetPrep::Create => ensure_table(&tx, &stored.schema).await?,
        TargetPrep::Truncate | TargetPrep::Keep => {
            if !schema::missing_tables(&tx, std::slice::from_ref(&name))
                .await?
                .is_empty()
            {
                return Err(Error::config(
                    "target-prep",
                    format!(
                        "{} expects the tables in the target, which has no {name}: create it to apply {what}",
                        prep.as_str()
                    ),
                ));
            }
        }
    }
    if prep != TargetPrep::Keep {
        truncate(&tx, &name).await?;
    }
    let plain = !schema::has_unique_index(&tx, &name).await?;
    let load = LoadTable::new(m.clone(), &stored.schema, plain, false);
    for c in 0..m.chunks.len() {
        copy_into(sink, &tx, &load, c).await?;
    }
    tables.known.insert(
        (stored.schema.schema.clone(), stored.schema.table.clone()),
        stored.schema.clone(),
    );
    let mut statements = HashMap::new();
    let mut replayed = 0;
    for (bm, files) in &window {
        for f in files {
            let (n, _, run): (u64, u64, Option<batch::Run>) =
                read_file(sink, &tx, bm, f, snapshot.as_ref(), tables, &mut statements).await?;
            if let Some(r) = run {
                r.apply(&tx).await?;
            }
            replayed += n;
        }
    }
    tx.execute(
        "insert into pgshift.reloads (task, manifest, r0, rows, replayed) values ($1, $2, $3, $4, $5)",
        &[&task, &key, &r0.to_string(), &(m.rows as i64), &(replayed as i64)],
    )
    .await
    .map_err(|e| Error::postgres("recording the reload in pgshift.reloads", e))?;
    tx.commit()
        .await
        .map_err(|e| Error::postgres(format!("committing {what}"), e))?;
    Ok((m.rows, replayed))
}

/// The same columns (names and types; what CDC marks as the key may differ from the catalog's,
/// as under REPLICA IDENTITY FULL).
fn same_columns(a: &crate::table::TableSchema, b: &crate::table::TableSchema) -> bool {
    a.columns.len() == b.columns.len()
        && a.columns.iter().zip(&b.columns).all(|(x, y)| {
            x.name == y.name && x.type_oid == y.type_oid && x.type_modifier == y.type_modifier
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::layout::reload_manifest_key;

    #[test]
    fn the_newest_reload_of_a_table_is_due_once_the_target_reaches_it() {
        let k = |r0: u64, t: &str| (Lsn(r0), reload_manifest_key(Lsn(r0), "public", t));
        let mut r = Reloads {
            staged: vec![k(0x10, "a"), k(0x20, "a"), k(0x20, "b"), k(0x40, "a")],
            applied: HashSet::new(),
            l0: Some(Lsn(0x8)),
        };
        assert!(
            r.due(Lsn(0x0F)).is_empty(),
            "not before the target reaches R0"
        );
        assert_eq!(
            r.due(Lsn(0x30)),
            [k(0x20, "b")],
            "the newest per table: a's at 0x40 waits for the target, its older ones are superseded"
        );
        r.applied.insert(k(0x20, "b").1);
        assert!(r.due(Lsn(0x30)).is_empty(), "applied once");
        assert_eq!(r.due(Lsn(0x40)), [k(0x40, "a")]);
        r.applied.insert(k(0x40, "a").1);
        assert!(r.due(Lsn(0x50)).is_empty());
        r.l0 = Some(Lsn(0x30));
        assert!(
            r.due(Lsn(0x40)).is_empty(),
            "reloads from before the target's load belong to the task before it started over"
        );
    }
}
