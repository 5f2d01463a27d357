//! Reload tables into a running task (DMS's "reload table", Debezium's incremental snapshot):
//! a fresh chunked load of some of the task's tables while its CDC keeps flowing — to repair a
//! target, or to bring in a table added to the selection after the load.
//!
//! # Effect order
//!
//! 1. The task must exist (its slot holds every change from its checkpoint on) and select each
//!    table; the publication is brought to the selection (a newly selected table joins it).
//! 2. An entry `starting` in the task's `reloads` item, **then** the position R0 read (the
//!    source's flushed WAL position, or one byte past the task's newest reload's R0 when the
//!    flushed position has not moved since — R0 names the reload's items and objects, so it is
//!    unique per task, reserved in the entry's conditional write): every CDC poll that can stage past R0 reads the entry and
//!    lists its batches' rows by transaction, so readers can skip what a reload's snapshot saw.
//! 3. The tables' schema versions at R0 and their chunks planned as the load's
//!    ([`super::plan`]), stored as the plan `reload#<R0>#plan` with `pending` chunk items; the
//!    entry moves to `planned`. A rerun for the same tables resumes this reload.
//! 4. Each chunk exported as the load's (own REPEATABLE READ snapshot, its start and snapshot
//!    recorded) to `<schema>/<table>/reload-<R0>/LOAD<n>.<ext>`.
//! 5. Every chunk done: manifests `_manifests/reload/<R0>/<schema>.<table>.json` (the load's
//!    manifest, `l0` = R0, with the key of the columns read), the plan complete, the entry
//!    `complete` with the WAL position past its single-snapshot chunks; `Table Loaded` and
//!    `Load Finished` (with `reload`: R0) announced.
//!
//! A consumer (and `apply`) that has applied CDC through a position at or past R0 replaces the
//! table's rows with the reload's, then re-applies the table's changes of every batch ending
//! after R0 up to its position, in commit order — upserts by key, and for a table loaded from
//! one snapshot (a keyless one) only the transactions that snapshot did not see — and goes on.
//! The argument is the load's: rows seen twice are harmless, rows that moved between chunks
//! come back through CDC.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::plan::{check_tables, new_plan, plan_tables};
use crate::config::check_task_name;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::options::LoadOptions;
use crate::plan::ChunkSizing;
use crate::source::{self, CdcSource, PgSource, catalog, snapshot};
use crate::staging::ObjectSink;
use crate::staging::layout::{self, LoadManifest, reload_chunk_key};
use crate::state::StateStore;
use crate::state::now_ms;
use crate::state::records::reload::{self as index, ReloadEntry};
use crate::state::records::{self, ChunkId, PlanRecord};

/// What a reload did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadReport {
    pub task: String,
    /// Its position: a target applies it once it has applied CDC through here.
    pub r0: Lsn,
    pub tables: Vec<String>,
    pub chunks: usize,
    /// Chunks an earlier, interrupted run of this reload had exported.
    pub resumed: usize,
    pub rows: u64,
    pub bytes: u64,
    pub elapsed_ms: u64,
    pub rows_per_sec: f64,
}

/// Parses `schema.table` names (a name with a dot or capitals in double quotes, as in SQL:
/// `"Sales"."order.items"`; unquoted ones are taken as written).
pub fn parse_tables(list: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in list.iter().flat_map(|l| l.split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let bad = |why: &str| Error::config("reload", format!("{item:?}: {why}"));
        let parts = split_name(item).ok_or_else(|| bad("unbalanced double quotes"))?;
        match parts.as_slice() {
            [s, t] if !s.is_empty() && !t.is_empty() => {
                let t = (s.clone(), t.clone());
                if !out.contains(&t) {
                    out.push(t);
                }
            }
            _ => {
                return Err(bad(
                    "name a table as schema.table (double quotes around a name with a dot)",
                ));
            }
        }
    }
    if out.is_empty() {
        return Err(Error::config("reload", "names no table"));
    }
    Ok(out)
}

/// `a.b`, `"a.b".c`, `"a""b".c` split at the dots outside quotes; `None` when a quote is open.
fn split_name(s: &str) -> Option<Vec<String>> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                parts.last_mut()?.push('"');
            }
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(String::new()),
            c => parts.last_mut()?.push(c),
        }
    }
    (!quoted).then_some(parts)
}

/// Plans the reload of `tables` (or finds the unfinished one of exactly these tables). Returns
/// its plan, its chunks and whether it was resumed.
pub async fn plan<S: ObjectSink, St: StateStore>(
    sink: &S,
    state: &St,
    opts: &LoadOptions,
    tables: &[(String, String)],
) -> Result<(PlanRecord, Vec<ChunkId>, bool)> {
    check_task_name(&opts.task)?;
    let task = records::get_task(state, &opts.task).await?.ok_or_else(|| {
        Error::Source(format!(
            "task {} has no CDC in {}: a reload goes into a running task (start it with `pgshift full-load --cdc` or `pgshift cdc`)",
            opts.task,
            state.describe()
        ))
    })?;
    let names: Vec<String> = tables.iter().map(|(s, t)| format!("{s}.{t}")).collect();
    for (s, t) in tables {
        if !opts.selection.selects(s, t) {
            return Err(Error::config(
                "reload",
                format!(
                    "{s}.{t} is not in the task's selection (--tables): add it there (CDC then publishes it) and reload it"
                ),
            ));
        }
    }
    layout::check_writable(sink).await?;
    let mut cfg = opts.source.clone();
    cfg.application_name = "pgshift-reload".to_owned();
    let source = PgSource::from_control(&cfg, source::connect(&cfg).await?);
    let client = source.control();
    let server = catalog::server_info(client).await?;
    let sizing = ChunkSizing::from_mib(opts.chunk_mib, server.version_num)?;
    let found: Vec<catalog::TableInfo> = catalog::user_tables(client, &opts.selection)
        .await?
        .into_iter()
        .filter(|t| tables.contains(&(t.schema.clone(), t.name.clone())))
        .collect();
    if let Some((s, t)) = tables
        .iter()
        .find(|(s, t)| !found.iter().any(|f| &f.schema == s && &f.name == t))
    {
        return Err(Error::config(
            "reload",
            format!("the source has no table {s}.{t} (names are case-sensitive)"),
        ));
    }
    if let Some(p) = found.iter().find(|t| t.is_partition) {
        return Err(Error::config(
            "reload",
            format!(
                "{} is a partition: reload its partitioned table (CDC publishes partitions through it)",
                p.display_name()
            ),
        ));
    }
    check_tables(&found, &crate::selection::Selection::all(), &server)?;
    // An unfinished reload of these tables is resumed while the columns it reads are still
    // there as they were; otherwise it is abandoned for a new one.
    if let Some(entry) = index::get_index(state, &opts.task)
        .await?
        .unfinished(&names)
        && let Some(r0) = entry.r0
        && let Some((plan, _)) = records::get_plan_of(state, &opts.task, Some(r0)).await?
    {
        if still_readable(client, &plan, &found).await? {
            tracing::info!(task = %opts.task, r0 = %r0, "resuming the unfinished reload of these tables");
            let ids = plan.chunk_ids();
            return Ok((plan, ids, true));
        }
        tracing::warn!(task = %opts.task, r0 = %r0, "the unfinished reload of these tables read columns that changed since: abandoned for a new one");
        index::update_index(state, &opts.task, |i| {
            for e in i.reloads.iter_mut().filter(|e| e.r0 == Some(r0)) {
                e.status = "abandoned".to_owned();
            }
            Ok(())
        })
        .await?;
    }
    // The publication follows the selection (a table selected since the load joins it); an
    // adopted one is its user's and must already publish the tables.
    let capture = source::Capture {
        selection: opts.selection.clone(),
        replica_identity_full: opts.replica_identity_full,
        allow_empty: opts.allow_empty,
        ddl: opts.capture_ddl,
        ddl_schema: opts.ddl_schema.clone(),
    };
    let pubs = if task.adopted {
        source
            .adopted_publication(&task.publication, &capture)
            .await?
    } else {
        source
            .sync_publications(&task.publication, &capture)
            .await?
    };
    if let Some(t) = names.iter().find(|n| pubs.skipped.contains(n)) {
        return Err(Error::Source(format!(
            "publication {} does not publish {t}: its changes would not reach CDC, so a reload could not converge",
            task.publication
        )));
    }
    // The entry first, then R0: a poll that can stage past R0 sees the entry.
    let (owner, started_ms) = (opts.owner.clone(), now_ms());
    index::update_index(state, &opts.task, |i| {
        i.drop_stale();
        i.reloads.push(ReloadEntry {
            started_by: owner.clone(),
            started_ms,
            status: "starting".to_owned(),
            r0: None,
            tables: names.clone(),
            horizon: None,
        });
        Ok(())
    })
    .await?;
    // R0 is the flushed position, made unique among the task's reloads in the same
    // conditional write (with `synchronous_commit = off` the flushed position may not have
    // moved since the last reload; a reload's items and objects are named by R0).
    let flushed = snapshot::flushed_position(client).await?;
    let r0 = index::update_index(state, &opts.task, |i| {
        let r0 = i.next_position(flushed);
        if let Some(e) = i
            .reloads
            .iter_mut()
            .find(|e| e.started_by == owner && e.started_ms == started_ms)
        {
            e.r0 = Some(r0);
        }
        Ok(r0)
    })
    .await?;
    let planned = plan_tables(sink, client, &found, r0, sizing, opts, Some(r0)).await?;
    let plan = new_plan(opts, planned, Some(r0), Some(r0));
    let format = opts.format;
    let plan = records::create_plan(state, &opts.task, plan, |id| {
        let (schema, table) = opts.selection.staged_table(&id.schema, &id.table);
        reload_chunk_key(&schema, &table, r0, id.n, format)
    })
    .await?;
    index::update_index(state, &opts.task, |i| {
        if let Some(e) = i
            .reloads
            .iter_mut()
            .find(|e| e.started_by == owner && e.started_ms == started_ms)
        {
            e.status = "planned".to_owned();
            e.r0 = Some(r0);
        }
        Ok(())
    })
    .await?;
    tracing::info!(task = %opts.task, r0 = %r0, tables = ?names, "reload planned");
    let ids = plan.chunk_ids();
    Ok((plan, ids, false))
}

/// Whether every planned table still has the columns (names and types) its chunks read.
async fn still_readable(
    client: &tokio_postgres::Client,
    plan: &PlanRecord,
    found: &[catalog::TableInfo],
) -> Result<bool> {
    for t in &plan.tables {
        let Some(info) = found
            .iter()
            .find(|f| f.schema == t.schema && f.name == t.table)
        else {
            return Ok(false);
        };
        let now = catalog::table_columns(client, info.oid, &info.display_name()).await?;
        let same = t.columns.iter().zip(&t.types).all(|(name, (oid, typmod))| {
            now.columns
                .iter()
                .any(|c| &c.name == name && c.type_oid == *oid && c.type_modifier == *typmod)
        });
        if !same || t.columns.len() != t.types.len() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Every chunk done: the reload's manifests written, its plan and entry complete; then `Table
/// Loaded` per table and `Load Finished` with `reload` announced (an event-driven apply runs).
pub async fn finish<S: ObjectSink, St: StateStore>(
    sink: &S,
    state: &St,
    task: &str,
    r0: Lsn,
    events: &crate::events::Events,
) -> Result<Vec<LoadManifest>> {
    check_task_name(task)?;
    let manifests = super::write_manifests(sink, state, task, Some(r0)).await?;
    let horizon = manifests
        .iter()
        .filter(|m| m.chunks.len() == 1)
        .filter_map(|m| m.chunks[0].snapshot_lsn)
        .max();
    index::update_index(state, task, |i| {
        for e in i.reloads.iter_mut().filter(|e| e.r0 == Some(r0)) {
            e.status = "complete".to_owned();
            e.horizon = horizon;
        }
        Ok(())
    })
    .await?;
    super::announce_loaded(sink, task, &manifests, events, Some(r0)).await;
    Ok(manifests)
}

/// Plan, export every chunk with `parallel` workers, finish: the CLI's reload.
pub async fn run_local<S: ObjectSink + Clone, St: StateStore + Clone>(
    sink: &S,
    state: &St,
    opts: &LoadOptions,
    tables: &[(String, String)],
    parallel: usize,
    progress: Arc<super::Progress>,
) -> Result<ReloadReport> {
    let started = Instant::now();
    let (plan, ids, resumed) = plan(sink, state, opts, tables).await?;
    let r0 = plan
        .reload
        .ok_or_else(|| Error::Source("a reload's plan without its position".to_owned()))?;
    let mut done_before = 0;
    if resumed {
        for id in &ids {
            if records::get_chunk(state, &opts.task, id)
                .await?
                .is_some_and(|c| c.status == "done")
            {
                done_before += 1;
            }
        }
    }
    super::export_all(sink, state, opts, &ids, parallel, progress).await?;
    let manifests = finish(sink, state, &opts.task, r0, &opts.events).await?;
    let rows: u64 = manifests.iter().map(|m| m.rows).sum();
    let elapsed = started.elapsed();
    Ok(ReloadReport {
        task: opts.task.clone(),
        r0,
        tables: manifests
            .iter()
            .map(|m| format!("{}.{}", m.schema, m.table))
            .collect(),
        chunks: ids.len(),
        resumed: done_before,
        rows,
        bytes: manifests.iter().map(|m| m.bytes).sum(),
        elapsed_ms: elapsed.as_millis() as u64,
        rows_per_sec: rows as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_parse_as_sql_writes_them() {
        let got = parse_tables(&[
            "public.orders, \"Sales\".\"order.items\"".to_owned(),
            "a.\"b\"\"c\"".to_owned(),
            "public.orders".to_owned(),
        ])
        .unwrap();
        assert_eq!(
            got,
            [
                ("public".to_owned(), "orders".to_owned()),
                ("Sales".to_owned(), "order.items".to_owned()),
                ("a".to_owned(), "b\"c".to_owned()),
            ]
        );
        for bad in ["orders", "a.b.c", "\"a.b", ".t", "s.", " , "] {
            let err = parse_tables(&[bad.to_owned()]).unwrap_err().to_string();
            assert!(err.contains("reload"), "{bad}: {err}");
        }
    }
}
