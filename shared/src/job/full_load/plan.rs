//! The full load's Plan step (see [`super`]): the slot first when CDC is on, then the
//! selected tables' schema versions (under their staged names), definitions and chunks, the
//! pre-data/post-data DDL, and the plan item with one `pending` item per chunk.

use crate::config::check_task_name;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::options::LoadOptions;
use crate::plan::{ChunkRange, ChunkSizing, Chunking, key_ranges, plan_table};
use crate::source::snapshot;
use crate::source::{self, Capture, PgSource, catalog, quote_ident};
use crate::staging::ObjectSink;
use crate::staging::encode::Encoding;
use crate::staging::layout::{self, SchemaVersions, chunk_key};
use crate::state::StateStore;
use crate::state::records::{self, ChunkId, PlanRecord, PlannedTable, StagedNames};
use crate::table::TableSchema;
use crate::task::ensure_task;

/// Plans the load (idempotent). Returns the plan and the chunk list.
pub async fn plan<S: ObjectSink, St: StateStore>(
    sink: &S,
    state: &St,
    opts: &LoadOptions,
) -> Result<(PlanRecord, Vec<ChunkId>)> {
    check_task_name(&opts.task)?;
    if let Some((plan, _)) = records::get_plan(state, &opts.task).await? {
        let ids = plan.chunk_ids();
        return Ok((plan, ids));
    }
    layout::check_writable(sink).await?;
    sink.sweep().await?;
    let mut cfg = opts.source.clone();
    cfg.application_name = "pgshift-plan".to_owned();
    let source = PgSource::from_control(&cfg, source::connect(&cfg).await?);
    let client = source.control();
    let server = catalog::server_info(client).await?;
    let sizing = ChunkSizing::from_mib(opts.chunk_mib, server.version_num)?;
    // Slot first, then data: every change after L0 reaches CDC.
    let l0 = if opts.cdc {
        let capture = Capture {
            selection: opts.selection.clone(),
            replica_identity_full: opts.replica_identity_full,
            allow_empty: opts.allow_empty,
            ddl: opts.capture_ddl,
            ddl_schema: opts.ddl_schema.clone(),
        };
        let task = ensure_task(&source, state, &opts.task, &capture, true, "full-load").await?;
        Some(task.start_lsn)
    } else {
        None
    };
    let tables = catalog::user_tables(client, &opts.selection).await?;
    check_tables(&tables, &opts.selection, &server)?;
    if !opts.allow_empty {
        let all = catalog::user_tables(client, &crate::selection::Selection::all()).await?;
        let found: Vec<(String, String)> = all.into_iter().map(|t| (t.schema, t.name)).collect();
        if let Some(e) = opts.selection.empty_rules_error(&found, "tables") {
            return Err(e);
        }
    }
    let schema_lsn = match l0 {
        Some(l) => l,
        None => snapshot::wal_position(client).await?,
    };
    let planned = plan_tables(sink, client, &tables, schema_lsn, sizing, opts, None).await?;
    // The schema as pg_dump's sections, for apply to build the target from.
    let has_root = tables.iter().any(|t| t.kind == 'p');
    let oids: Vec<u32> = tables
        .iter()
        .filter(|t| !(has_root && t.is_partition))
        .map(|t| t.oid)
        .collect();
    let ddl = crate::source::ddl::read(client, &oids).await?;
    layout::put_json(sink, crate::source::ddl::DDL_KEY, &ddl).await?;
    let plan = new_plan(opts, planned, l0, None);
    let format = opts.format;
    let plan = records::create_plan(state, &opts.task, plan, |id| {
        let (schema, table) = opts.selection.staged_table(&id.schema, &id.table);
        chunk_key(&schema, &table, id.n, format)
    })
    .await?;
    let ids = plan.chunk_ids();
    Ok((plan, ids))
}

/// A `planned` plan of `tables` in the options' format: the load's (`reload` none) or a
/// reload's (its R0, which is also its `l0`).
pub(crate) fn new_plan(
    opts: &LoadOptions,
    tables: Vec<PlannedTable>,
    l0: Option<Lsn>,
    reload: Option<Lsn>,
) -> PlanRecord {
    let csv = opts.format.encoding == Encoding::Csv;
    PlanRecord {
        tables,
        format: opts.format,
        // Parquet and JSON Lines rows have their op already.
        op_column: opts.load_op_column && csv,
        header: opts.csv_header && csv,
        csv: if csv {
            opts.csv_dialect.clone()
        } else {
            Default::default()
        },
        l0,
        status: "planned".to_owned(),
        reload,
    }
}

/// Each selected table's schema version written (at `schema_lsn`) and its chunks planned. A
/// reload's (`reload`: its R0) schema is written beside its chunks instead, never among the
/// versions CDC writes and compares with.
pub(crate) async fn plan_tables<S: ObjectSink>(
    sink: &S,
    client: &tokio_postgres::Client,
    tables: &[catalog::TableInfo],
    schema_lsn: Lsn,
    sizing: ChunkSizing,
    opts: &LoadOptions,
    reload: Option<Lsn>,
) -> Result<Vec<PlannedTable>> {
    let mut versions = SchemaVersions::new();
    let mut planned = Vec::new();
    // Partitions load through their root when it is selected (its COPY reads them all, and
    // CDC publishes through the root).
    let has_root = tables.iter().any(|t| t.kind == 'p');
    for t in tables.iter().filter(|t| !(has_root && t.is_partition)) {
        let cols = catalog::table_columns(client, t.oid, &t.display_name()).await?;
        let schema = TableSchema {
            schema: t.schema.clone(),
            table: t.name.clone(),
            columns: cols.columns.clone(),
            replica_identity: t.replica_identity.to_string(),
        };
        // Transformation rules: the names it is staged under, the columns read.
        let (staged, keep) = opts.selection.stage_schema(&schema)?;
        let schema_key = match reload {
            None => {
                versions
                    .version_for(sink, &staged, schema_lsn, opts.commit_ts_column)
                    .await?
            }
            Some(r0) => {
                let key = layout::reload_schema_key(&staged.schema, &staged.table, r0);
                let stored = layout::StoredSchema {
                    lsn: r0,
                    csv_cdc_layout: layout::csv_cdc_fields(&staged, opts.commit_ts_column, true),
                    schema: staged.clone(),
                    ddl: None,
                };
                layout::put_json(sink, &key, &stored).await?;
                key
            }
        };
        // Just before `schema_lsn`: the next WAL record (a change's, or a schema-change
        // message's) may start exactly there, and it changes what this reads.
        // A reload leaves the history to CDC: a definition recorded now would make CDC explain
        // the table's next Relation message as a schema change from it.
        let before = Lsn(schema_lsn.0.saturating_sub(1));
        if reload.is_none() {
            record_definition(sink, client, t.oid, before).await?;
        }
        let chunks = match opts.selection.load_ranges_for(&t.schema, &t.name) {
            Some(ranges) => user_ranges(client, t, &cols, ranges).await?,
            None => chunk_table(client, t, &cols, sizing, opts.chunking).await?,
        };
        let read: Vec<&crate::table::ColumnSchema> = match &keep {
            Some(keep) => keep.iter().map(|&i| &cols.columns[i]).collect(),
            None => cols.columns.iter().collect(),
        };
        planned.push(PlannedTable {
            types: read.iter().map(|c| (c.type_oid, c.type_modifier)).collect(),
            schema: t.schema.clone(),
            table: t.name.clone(),
            columns: read.iter().map(|c| c.name.clone()).collect(),
            chunks,
            estimated_rows: t.estimated_rows.max(0.0),
            staged_as: opts.selection.transforms_names().then(|| StagedNames {
                schema: staged.schema.clone(),
                table: staged.table.clone(),
                columns: staged.columns.iter().map(|c| c.name.clone()).collect(),
            }),
            schema_key: Some(schema_key),
        });
    }
    Ok(planned)
}

/// The table's definition at the load (attribute numbers, defaults, generated columns), where
/// CDC finds what a later schema change started from.
async fn record_definition<S: ObjectSink>(
    sink: &S,
    client: &tokio_postgres::Client,
    oid: u32,
    at: Lsn,
) -> Result<()> {
    let Some(row) = client
        .query_opt(crate::change::ddl::DEFINITION_SQL, &[&oid])
        .await
        .map_err(|e| Error::postgres("reading a table's definition", e))?
    else {
        return Ok(());
    };
    let definition = crate::change::ddl::parse_definition(row.get(0))?;
    let mut history = layout::relation_history(sink, oid).await?;
    history.record(at, Some(definition));
    layout::put_json(sink, &layout::relation_key(oid), &history).await
}

/// The selection matched what it names exactly, and every selected table is readable.
pub(crate) fn check_tables(
    tables: &[catalog::TableInfo],
    selection: &crate::selection::Selection,
    server: &catalog::ServerInfo,
) -> Result<()> {
    let found: Vec<(String, String)> = tables
        .iter()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .collect();
    if let Some(message) = selection.unmatched_message(&found) {
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
    Ok(())
}

/// The chunks a `table-settings` rule's `parallel-load` ranges ask for: `(-inf, b1)`,
/// `[b1, b2)`, ..., `[bn, +inf)` of its column. The column must be NOT NULL (a NULL is in no
/// range) and the table keyed (a row whose value moves between two chunks' snapshots is read
/// twice, and only a key makes the second copy harmless); the boundaries must increase.
async fn user_ranges(
    client: &tokio_postgres::Client,
    t: &catalog::TableInfo,
    cols: &catalog::Columns,
    ranges: &crate::selection::LoadRanges,
) -> Result<Vec<ChunkRange>> {
    let at = format!("table mappings (rule-id {})", ranges.id);
    let name = t.display_name();
    let Some(col) = cols.columns.iter().find(|c| c.name == ranges.column) else {
        return Err(Error::config(
            at,
            format!("{name} has no column {:?} to cut ranges on", ranges.column),
        ));
    };
    if cols.key_order.is_empty() || t.kind == 'p' {
        return Err(Error::config(
            at,
            format!(
                "{name} is loaded whole: parallel-load ranges need a table with a primary key (a partitioned table loads through its root)"
            ),
        ));
    }
    let not_null: bool = client
        .query_one(
            "select attnotnull from pg_attribute where attrelid = $1 and attname = $2",
            &[&t.oid, &ranges.column],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading {name}.{}", ranges.column), e))?
        .get(0);
    if !not_null {
        return Err(Error::config(
            at,
            format!(
                "{name}.{} may be NULL, and a NULL is in no range: cut on a NOT NULL column",
                ranges.column
            ),
        ));
    }
    // The server compares the boundaries as the column's type (and says which is not one).
    let increasing: bool = client
        .query_one(
            &format!(
                "select coalesce(bool_and(a < b), true) from (select v::{ty} as a, lead(v::{ty}) over (order by n) as b from unnest($1::text[]) with ordinality as u(v, n)) s where b is not null",
                ty = col.type_name
            ),
            &[&ranges.boundaries],
        )
        .await
        .map_err(|e| {
            Error::config(
                &at,
                format!(
                    "the boundaries are not all values of {name}.{} ({}): {}",
                    ranges.column,
                    col.type_name,
                    e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned())
                ),
            )
        })?
        .get(0);
    if !increasing {
        return Err(Error::config(
            at,
            "parallel-load.boundaries must increase (each range starts where the one before ends)",
        ));
    }
    let mut lows = vec![String::new()];
    lows.extend(ranges.boundaries.iter().cloned());
    Ok(crate::plan::key_ranges(&col.name, &col.type_name, &lows))
}

/// A table's chunks: ctid ranges (PostgreSQL 14+), primary-key ranges (before 14, or when
/// asked), or the whole table (a partitioned root, or no single-column key).
async fn chunk_table(
    client: &tokio_postgres::Client,
    t: &catalog::TableInfo,
    cols: &catalog::Columns,
    sizing: ChunkSizing,
    chunking: Chunking,
) -> Result<Vec<ChunkRange>> {
    // A keyless table is exported from one snapshot: its CDC changes the snapshot saw are
    // skipped by readers (no key to make a second copy harmless).
    if t.kind == 'p' || cols.key_order.is_empty() {
        return Ok(vec![ChunkRange::Whole]);
    }
    let by_key = chunking == Chunking::Keys || sizing.version_num < 140_000;
    if !by_key {
        return Ok(plan_table(t.pages, sizing));
    }
    // Primary-key ranges: before PostgreSQL 14 a ctid range scans the whole table.
    match cols.key_order.as_slice() {
        [key] if t.pages > sizing.pages_per_chunk => {
            let key = &cols.columns[*key];
            let buckets = ((t.pages + sizing.pages_per_chunk - 1) / sizing.pages_per_chunk) as i32;
            let lows =
                catalog::key_range_lows(client, &t.schema, &t.name, &key.name, buckets).await?;
            Ok(key_ranges(&key.name, &key.type_name, &lows))
        }
        _ => Ok(vec![ChunkRange::Whole]),
    }
}
