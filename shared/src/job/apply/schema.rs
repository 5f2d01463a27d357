//! The target's schema from the staged sections (`source::ddl`), as `pg_restore` would build
//! it: pre-data before the load, post-data after it in parallel. `--target-prep` (DMS's
//! `TargetTablePrepMode`) says whether pgshift builds it at all.
//!
//! # Effect order
//!
//! - **pre-data**, one statement at a time: what the target has is kept (types and constraints
//!   by name; tables, sequences, schemas and extensions `if not exists`). A statement the target
//!   refuses (a type from an extension it lacks, a default calling a function it lacks) is
//!   named in the report's `schema_skipped`; a table that cannot be created as the source has
//!   it is created with its columns only (types the target lacks as `text`).
//! - **post-data**, after every chunk: each table's keys, unique and exclusion constraints and
//!   indexes on one of N connections (a table's items one after another, tables in parallel),
//!   the loaded tables analyzed, then the foreign keys. A table loaded in several chunks by
//!   plain `COPY` can hold a row twice (chunks are read at different moments and a row updated
//!   in between moves pages): when its key is refused as not unique, the extra copies are
//!   removed (CDC from L0 brings the row to its final state, whichever copy is kept) and the
//!   key added again. A primary key that still cannot be built is an error (CDC needs it);
//!   another item the target refuses is named in `schema_skipped`. Everything is idempotent:
//!   a rerun after a crash adds only what is missing.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::Mutex;

use tokio_postgres::Client;

use crate::config::PgConfig;
use crate::error::{Error, Result};
use crate::source;
use crate::source::ddl::{DdlItem, DdlKind, SchemaDdl};

/// How apply prepares the target's tables (DMS's `TargetTablePrepMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetPrep {
    /// pgshift builds the schema (pre-data, load, post-data); existing tables are kept and
    /// truncated before the load.
    #[default]
    Create,
    /// The user brought the schema: every loaded table must exist; it is truncated.
    Truncate,
    /// The user brought the schema and its rows: every loaded table must exist; rows already
    /// there are kept (a loaded row with the same key does not replace them).
    Keep,
}

impl FromStr for TargetPrep {
    type Err = Error;
    fn from_str(s: &str) -> Result<TargetPrep> {
        match s {
            "create" => Ok(TargetPrep::Create),
            "truncate" => Ok(TargetPrep::Truncate),
            "keep" => Ok(TargetPrep::Keep),
            other => Err(Error::config(
                "target-prep",
                format!("{other:?} is not one of create, truncate, keep"),
            )),
        }
    }
}

impl TargetPrep {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetPrep::Create => "create",
            TargetPrep::Truncate => "truncate",
            TargetPrep::Keep => "keep",
        }
    }
}

/// What building the schema did.
#[derive(Debug, Default)]
pub(super) struct SchemaRun {
    /// Statements run (items the target already had are not counted).
    pub(super) items: u64,
    /// Items the target refused, with why.
    pub(super) skipped: Vec<String>,
}

fn pg_err(what: String) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |e| Error::postgres(what, e)
}

/// Whether the target already has an item (by name for types, constraints and indexes).
async fn present(client: &Client, item: &DdlItem) -> Result<bool> {
    let row = match item.kind {
        DdlKind::Type => {
            client
                .query_one("select to_regtype($1) is not null", &[&item.object])
                .await
        }
        DdlKind::Index => {
            client
                .query_one("select to_regclass($1) is not null", &[&item.object])
                .await
        }
        DdlKind::PrimaryKey
        | DdlKind::Unique
        | DdlKind::Exclusion
        | DdlKind::ForeignKey
        | DdlKind::Check => {
            client
                .query_one(
                    "select exists (select 1 from pg_constraint where conrelid = to_regclass($1) and quote_ident(conname) = $2)",
                    &[&item.table.clone().unwrap_or_default(), &item.object],
                )
                .await
        }
        _ => return Ok(false),
    };
    Ok(row
        .map_err(pg_err(format!("looking for {} in the target", item.object)))?
        .get(0))
}

fn describe(item: &DdlItem) -> String {
    let kind = match item.kind {
        DdlKind::Schema => "schema",
        DdlKind::Extension => "extension",
        DdlKind::Type => "type",
        DdlKind::Sequence => "sequence",
        DdlKind::Table => "table",
        DdlKind::Check => "check constraint",
        DdlKind::Alter => "statement on",
        DdlKind::PrimaryKey => "primary key",
        DdlKind::Unique => "unique constraint",
        DdlKind::Exclusion => "exclusion constraint",
        DdlKind::Index => "index",
        DdlKind::ForeignKey => "foreign key",
    };
    match &item.table {
        Some(t) if t != &item.object => format!("{kind} {} of {t}", item.object),
        _ => format!("{kind} {}", item.object),
    }
}

/// The reason a statement was refused, without the statement (no values in messages).
fn refusal(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_owned())
}

/// Runs pre-data; returns the tables whose `create` the target refused (created later with
/// their columns only).
pub(super) async fn pre_data(
    client: &Client,
    ddl: &SchemaDdl,
    run: &mut SchemaRun,
) -> Result<Vec<String>> {
    let mut failed_tables = Vec::new();
    for item in &ddl.pre_data {
        if present(client, item).await? {
            continue;
        }
        match client.batch_execute(&item.sql).await {
            Ok(()) => run.items += 1,
            Err(e) if e.as_db_error().is_some() => {
                let why = refusal(&e);
                tracing::warn!(item = %describe(item), why, "the target refused a pre-data statement");
                if item.kind == DdlKind::Table {
                    run.skipped.push(format!(
                        "{}: {why}; created with its columns only",
                        describe(item)
                    ));
                    failed_tables.push(item.object.clone());
                } else {
                    run.skipped.push(format!("{}: {why}", describe(item)));
                }
            }
            Err(e) => return Err(Error::postgres(format!("creating {}", describe(item)), e)),
        }
    }
    Ok(failed_tables)
}

/// One table's post-data work.
struct TableWork {
    table: String,
    items: Vec<DdlItem>,
    /// Its key columns (quoted) when it was loaded by plain `COPY` in several chunks.
    dedupe: Option<Vec<String>>,
    analyze: bool,
}

/// Runs post-data on `workers` connections: per table (keys, indexes, analyze), then the
/// foreign keys. `loaded` are the loaded tables (quoted), each with its key columns when it
/// may hold a row twice.
pub(super) async fn post_data(
    cfg: &PgConfig,
    ddl: &SchemaDdl,
    workers: usize,
    loaded: &HashMap<String, Option<Vec<String>>>,
    run: &mut SchemaRun,
) -> Result<()> {
    let mut per_table: Vec<TableWork> = Vec::new();
    let mut fks = VecDeque::new();
    for item in &ddl.post_data {
        if item.kind == DdlKind::ForeignKey {
            fks.push_back(TableWork {
                table: item.table.clone().unwrap_or_default(),
                items: vec![item.clone()],
                dedupe: None,
                analyze: false,
            });
            continue;
        }
        let table = item.table.clone().unwrap_or_default();
        match per_table.iter_mut().find(|w| w.table == table) {
            Some(w) => w.items.push(item.clone()),
            None => per_table.push(TableWork {
                dedupe: loaded.get(&table).cloned().flatten(),
                analyze: loaded.contains_key(&table),
                table,
                items: vec![item.clone()],
            }),
        }
    }
    for table in loaded.keys() {
        if !per_table.iter().any(|w| &w.table == table) {
            per_table.push(TableWork {
                table: table.clone(),
                items: Vec::new(),
                dedupe: None,
                analyze: true,
            });
        }
    }
    // The biggest work first is unknown here; tables keep the source's order.
    let out = Mutex::new(SchemaRun::default());
    for phase in [per_table.into_iter().collect::<VecDeque<_>>(), fks] {
        let n = workers.clamp(1, phase.len().max(1));
        let queue = Mutex::new(phase);
        let (queue, out) = (&queue, &out);
        let mut running = Vec::with_capacity(n);
        for _ in 0..n {
            running.push(async move {
                let client = source::connect(cfg).await?;
                client
                    .batch_execute(
                        "set lock_timeout = 0; set maintenance_work_mem = '256MB'; set session_replication_role = default",
                    )
                    .await
                    .map_err(pg_err("preparing a post-data session".to_owned()))?;
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                    let Some(work) = next else {
                        return Ok::<(), Error>(());
                    };
                    let mut local = SchemaRun::default();
                    table_work(&client, &work, &mut local).await?;
                    if let Ok(mut o) = out.lock() {
                        o.items += local.items;
                        o.skipped.append(&mut local.skipped);
                    }
                }
            });
        }
        futures_util::future::try_join_all(running).await?;
    }
    let done = out.into_inner().unwrap_or_default();
    run.items += done.items;
    run.skipped.extend(done.skipped);
    Ok(())
}

async fn table_work(client: &Client, work: &TableWork, run: &mut SchemaRun) -> Result<()> {
    for item in &work.items {
        if present(client, item).await? {
            continue;
        }
        let mut result = client.batch_execute(&item.sql).await;
        if let (Err(e), Some(keys)) = (&result, &work.dedupe)
            && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
        {
            let removed = dedupe(client, &work.table, keys).await?;
            tracing::info!(table = %work.table, removed, "rows loaded twice removed before building a unique index");
            result = client.batch_execute(&item.sql).await;
        }
        match result {
            Ok(()) => run.items += 1,
            Err(e) if item.kind == DdlKind::PrimaryKey || e.as_db_error().is_none() => {
                return Err(Error::postgres(format!("adding {}", describe(item)), e));
            }
            Err(e) => {
                let why = refusal(&e);
                tracing::warn!(item = %describe(item), why, "the target refused a post-data statement");
                run.skipped.push(format!("{}: {why}", describe(item)));
            }
        }
    }
    if work.analyze {
        client
            .batch_execute(&format!("analyze {}", work.table))
            .await
            .map_err(pg_err(format!("analyzing {}", work.table)))?;
    }
    Ok(())
}

/// Removes all but one row of each key of a table loaded by plain `COPY` in several chunks.
async fn dedupe(client: &Client, table: &str, keys: &[String]) -> Result<u64> {
    let keys = keys.join(", ");
    client
        .execute(
            &format!(
                "delete from {table} t using (select tableoid, ctid, row_number() over (partition by {keys} order by ctid) as n from {table}) d \
                 where d.n > 1 and t.tableoid = d.tableoid and t.ctid = d.ctid"
            ),
            &[],
        )
        .await
        .map_err(pg_err(format!("removing rows of {table} loaded twice")))
}

/// The loaded tables the target lacks (for `--target-prep truncate|keep`).
pub(super) async fn missing_tables(
    client: &impl tokio_postgres::GenericClient,
    tables: &[String],
) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for t in tables {
        let there: bool = client
            .query_one("select to_regclass($1) is not null", &[t])
            .await
            .map_err(pg_err(format!("looking for {t} in the target")))?
            .get(0);
        if !there {
            missing.push(t.clone());
        }
    }
    Ok(missing)
}

/// Whether a target table has a unique index (a load into it needs `ON CONFLICT`); one
/// without is loaded by plain `COPY`.
pub(super) async fn has_unique_index(
    client: &impl tokio_postgres::GenericClient,
    table: &str,
) -> Result<bool> {
    Ok(client
        .query_one(
            "select exists (select 1 from pg_index where indrelid = to_regclass($1) and indisunique)",
            &[&table],
        )
        .await
        .map_err(pg_err(format!("reading the indexes of {table} in the target")))?
        .get(0))
}
