//! The checks of the selected tables: replica identity, TOAST, partitions, case-colliding
//! names, lossy types, and what the selection matched.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use super::{Check, CheckOptions, NAMES_SHOWN, Status, names};
use crate::error::{Error, Result};
use crate::source::catalog::{ServerInfo, TableInfo};

pub(super) fn replica_identity_check(tables: &[TableInfo]) -> Check {
    let missing: Vec<&TableInfo> = tables
        .iter()
        .filter(|t| t.kind == 'r' && !t.has_replica_identity())
        .collect();
    if missing.is_empty() {
        return Check::pass(
            "replica_identity",
            "every selected table has a primary key or replica identity",
        );
    }
    let fixes: Vec<String> = missing
        .iter()
        .take(NAMES_SHOWN)
        .map(|t| format!("ALTER TABLE {} REPLICA IDENTITY FULL;", t.quoted()))
        .collect();
    Check::new(
        "replica_identity",
        Status::Warn,
        format!(
            "{} tables have no primary key and no usable replica identity: {}. They are published for insert and truncate only, so UPDATE and DELETE on them never fail on the source, and are not captured",
            missing.len(),
            names(&missing)
        ),
        format!(
            "to capture their updates and deletes, add a primary key, or {}",
            fixes.join(" ")
        ),
    )
}

pub(super) fn toast_check(tables: &[TableInfo]) -> Check {
    let affected: Vec<&TableInfo> = tables
        .iter()
        .filter(|t| t.kind == 'r' && t.has_toastable && t.replica_identity != 'f')
        .collect();
    if affected.is_empty() {
        return Check::pass(
            "toast_replica_identity",
            "no TOAST-able columns without REPLICA IDENTITY FULL",
        );
    }
    let fixes: Vec<String> = affected
        .iter()
        .take(NAMES_SHOWN)
        .map(|t| format!("ALTER TABLE {} REPLICA IDENTITY FULL;", t.quoted()))
        .collect();
    Check::new(
        "toast_replica_identity",
        Status::Warn,
        format!(
            "{} tables have TOAST-able columns without REPLICA IDENTITY FULL: {} (an update that leaves a large value unchanged does not carry it; pgshift marks it unchanged instead of writing a placeholder)",
            affected.len(),
            names(&affected)
        ),
        format!("to stage full rows: {}", fixes.join(" ")),
    )
}

pub(super) fn partitions_check(server: &ServerInfo, tables: &[TableInfo]) -> Check {
    let parents: Vec<&TableInfo> = tables.iter().filter(|t| t.kind == 'p').collect();
    if parents.is_empty() {
        return Check::pass("partitioned_tables", "no partitioned tables selected");
    }
    if server.version_num >= 130_000 {
        Check::new(
            "partitioned_tables",
            Status::Warn,
            format!(
                "partitioned tables: {} (changes are published under the root with publish_via_partition_root; partitions are loaded through the root)",
                names(&parents)
            ),
            "select the root tables, not the partitions, so rows are not staged twice",
        )
    } else {
        Check::new(
            "partitioned_tables",
            Status::Warn,
            format!(
                "partitioned tables before PostgreSQL 13: {} (changes arrive per partition)",
                names(&parents)
            ),
            "select the partitions themselves, or upgrade to PostgreSQL 13+",
        )
    }
}

pub(super) fn case_collision_check(tables: &[TableInfo]) -> Check {
    let mut groups: BTreeMap<String, Vec<&TableInfo>> = BTreeMap::new();
    for t in tables {
        groups
            .entry(format!(
                "{}.{}",
                t.schema.to_lowercase(),
                t.name.to_lowercase()
            ))
            .or_default()
            .push(t);
    }
    let clashes: Vec<String> = groups
        .values()
        .filter(|g| g.len() > 1)
        .map(|g| {
            g.iter()
                .map(|t| t.display_name())
                .collect::<Vec<_>>()
                .join(" / ")
        })
        .collect();
    if clashes.is_empty() {
        return Check::pass("case_collisions", "no table names that differ only in case");
    }
    Check::new(
        "case_collisions",
        Status::Warn,
        format!(
            "table names that differ only in case: {} (pgshift keeps them apart; case-insensitive consumers such as Glue/Athena do not)",
            clashes.join("; ")
        ),
        "rename one of each pair, or exclude one with a selection rule",
    )
}

const LOSSY_TYPES: &str = "select n.nspname::text, c.relname::text, a.attname::text, \
 format_type(a.atttypid, a.atttypmod), t.typname::text, tn.nspname::text \
 from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace \
 join pg_type t on t.oid = a.atttypid join pg_namespace tn on tn.oid = t.typnamespace \
 where a.attnum > 0 and not a.attisdropped and c.relkind in ('r', 'p') \
 and n.nspname <> 'information_schema' and n.nspname !~ '^pg_' \
 and (t.typname in ('money', 'regclass', 'regproc', 'regprocedure', 'regoper', 'regoperator', 'regtype', \
      'regconfig', 'regdictionary', 'regnamespace', 'regrole', 'regcollation') \
      or tn.nspname not in ('pg_catalog', 'information_schema')) \
 order by 1, 2, a.attnum";

pub(super) async fn types_check(client: &Client, opts: &CheckOptions) -> Result<Check> {
    let rows = client
        .query(LOSSY_TYPES, &[])
        .await
        .map_err(|e| Error::postgres("reading column types", e))?;
    let mut notes = Vec::new();
    for r in &rows {
        let (schema, table): (String, String) = (r.get(0), r.get(1));
        if !opts.selection.selects(&schema, &table) {
            continue;
        }
        let (column, ty, typname, typschema): (String, String, String, String) =
            (r.get(2), r.get(3), r.get(4), r.get(5));
        let why = if typname == "money" {
            "text depends on lc_monetary"
        } else if typname.starts_with("reg") && typschema == "pg_catalog" {
            "an OID shown as a name; may not resolve on a target"
        } else {
            "a user-defined or extension type, staged as its text output; a target needs the same type"
        };
        notes.push(format!("{schema}.{table}.{column} {ty} ({why})"));
    }
    if notes.is_empty() {
        return Ok(Check::pass(
            "data_types",
            "every selected column has a built-in, exactly staged type",
        ));
    }
    let shown = notes.len().min(NAMES_SHOWN);
    let more = if notes.len() > shown {
        format!(" and {} more", notes.len() - shown)
    } else {
        String::new()
    };
    Ok(Check::new(
        "data_types",
        Status::Warn,
        format!(
            "{} columns may need care: {}{more}",
            notes.len(),
            notes[..shown].join("; ")
        ),
        "stage as text is exact for these; on a PostgreSQL target create the same extensions and types first",
    ))
}

pub(super) fn table_selection_check(tables: &[TableInfo], opts: &CheckOptions) -> Check {
    let found: Vec<(String, String)> = tables
        .iter()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .collect();
    if let Some(message) = opts.selection.unmatched_message(&found) {
        return Check::new(
            "table_selection",
            Status::Fail,
            message,
            "fix the names in the table mapping (names are case-sensitive)",
        );
    }
    if tables.is_empty() {
        return Check::new(
            "table_selection",
            Status::Warn,
            "no table is selected",
            "check the schema-name and table-name patterns of the table mapping",
        );
    }
    Check::pass(
        "table_selection",
        format!("{} tables selected", tables.len()),
    )
}
