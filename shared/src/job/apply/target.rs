//! The target's tables: created from a staged schema, columns kept in step with schema
//! versions (add, drop, rename of key columns).

use std::collections::HashMap;

use super::changes::{has_key, quoted_keys};
use crate::change::ddl::{SchemaChange, SchemaOp};
use crate::error::{Error, Result};
use crate::source::{quote_ident, quote_qualified};
use crate::table::TableSchema;

/// Target tables as this run knows them: columns in order and primary key.
#[derive(Default)]
pub(super) struct Tables {
    pub(super) known: HashMap<(String, String), TableSchema>,
    /// Whether the target has a type (by the source's name for it).
    pub(super) types: HashMap<String, bool>,
}

/// The user types this batch's schema changes bring (created on the source after the load),
/// made before any row needs them: schemas, extensions (a refused one is a warning: its
/// columns are then text), then types the target lacks, dependencies first.
pub(super) async fn ensure_types(
    tx: &tokio_postgres::Transaction<'_>,
    schemas: &[(u64, crate::staging::layout::StoredSchema)],
    batch: (crate::lsn::Lsn, crate::lsn::Lsn),
    tables: &mut Tables,
) -> Result<()> {
    use crate::source::ddl::DdlKind;
    for (_, stored) in schemas {
        let Some(change) = &stored.ddl else { continue };
        if !(batch.0 <= change.lsn && change.lsn < batch.1) {
            continue;
        }
        if !change.types.is_empty() {
            tables.types.clear(); // what the target has is about to change
        }
        for item in &change.types {
            let what = format!(
                "creating {} for {}.{}",
                item.object, stored.schema.schema, stored.schema.table
            );
            match item.kind {
                DdlKind::Schema => tx.batch_execute(&item.sql).await,
                DdlKind::Extension => {
                    tx.batch_execute("savepoint pgshift_extension")
                        .await
                        .map_err(|e| Error::postgres(what.clone(), e))?;
                    match tx.batch_execute(&item.sql).await {
                        Ok(()) => tx.batch_execute("release savepoint pgshift_extension").await,
                        Err(e) => {
                            tracing::warn!(extension = %item.object, error = %e, "the target refused an extension a new column uses: its columns are text");
                            tx.batch_execute("rollback to savepoint pgshift_extension").await
                        }
                    }
                }
                DdlKind::Type => {
                    if target_type(tx, &item.object).await? == "text" {
                        tx.batch_execute(&item.sql).await
                    } else {
                        Ok(())
                    }
                }
                _ => Ok(()),
            }
            .map_err(|e| Error::postgres(what, e))?;
        }
    }
    Ok(())
}

/// Columns of a type the target lacks (one created on the source after the load, or dropped
/// there since) are read and written as text, as the table was made with them.
pub(super) async fn resolve_types(
    tx: &tokio_postgres::Transaction<'_>,
    schemas: &mut [(u64, crate::staging::layout::StoredSchema)],
    tables: &mut Tables,
) -> Result<()> {
    for (_, stored) in schemas.iter_mut() {
        for c in stored.schema.columns.iter_mut() {
            let have = match tables.types.get(&c.type_name) {
                Some(h) => *h,
                None => {
                    let h = target_type(tx, &c.type_name).await? != "text" || c.type_name == "text";
                    tables.types.insert(c.type_name.clone(), h);
                    h
                }
            };
            if !have {
                c.type_name = "text".to_owned();
            }
        }
    }
    Ok(())
}

/// The column type to create in the target: the source's, or `text` when the target does not
/// have it (an extension or user type not created there; values are its text output).
pub(super) async fn target_type(
    client: &impl tokio_postgres::GenericClient,
    type_name: &str,
) -> Result<String> {
    let known: bool = client
        .query_one("select to_regtype($1) is not null", &[&type_name])
        .await
        .map_err(|e| Error::postgres("checking a column type in the target", e))?
        .get(0);
    Ok(if known {
        type_name.to_owned()
    } else {
        "text".to_owned()
    })
}

/// Creates the target table from a staged schema when it does not exist.
pub(super) async fn ensure_table(
    client: &impl tokio_postgres::GenericClient,
    schema: &TableSchema,
) -> Result<()> {
    let mut cols = Vec::with_capacity(schema.columns.len());
    for c in &schema.columns {
        cols.push(format!(
            "{} {}",
            quote_ident(&c.name),
            target_type(client, &c.type_name).await?
        ));
    }
    let pk: Vec<String> = quoted_keys(schema);
    let pk = if !has_key(schema) {
        String::new()
    } else {
        format!(", primary key ({})", pk.join(", "))
    };
    let sql = format!(
        "create schema if not exists {}; create table if not exists {} ({}{pk})",
        quote_ident(&schema.schema),
        quote_qualified(&schema.schema, &schema.table),
        cols.join(", ")
    );
    client.batch_execute(&sql).await.map_err(|e| {
        Error::postgres(
            format!("creating {}.{} in the target", schema.schema, schema.table),
            e,
        )
    })
}

/// Brings a target table in step with a new schema version of it (inside the batch's
/// transaction): created when this run has not seen it, else columns renamed, added or
/// dropped, and a unique index on new key columns.
pub(super) async fn sync_columns(
    tx: &tokio_postgres::Transaction<'_>,
    tables: &mut Tables,
    schema: &TableSchema,
) -> Result<()> {
    let id = (schema.schema.clone(), schema.table.clone());
    let Some(known) = tables.known.get(&id) else {
        // Not seen by this run: the target's table as it is (an earlier run may have left
        // it at an older version), given the columns it lacks; none is dropped on a guess.
        match target_columns(tx, &schema.schema, &schema.table).await? {
            None => ensure_table(tx, schema).await?,
            Some(have) => {
                let name = quote_qualified(&schema.schema, &schema.table);
                for c in schema.columns.iter().filter(|c| !have.contains(&c.name)) {
                    let ty = target_type(tx, &c.type_name).await?;
                    tx.batch_execute(&format!(
                        "alter table {name} add column if not exists {} {ty}",
                        quote_ident(&c.name)
                    ))
                    .await
                    .map_err(|e| {
                        Error::postgres(format!("adding column {} to {name}", c.name), e)
                    })?;
                }
            }
        }
        tables.known.insert(id, schema.clone());
        return Ok(());
    };
    if known.same_shape(schema) {
        return Ok(());
    }
    let name = quote_qualified(&schema.schema, &schema.table);
    if renamed(known, schema) {
        rename_columns(tx, &name, known, schema).await?;
    } else {
        if let Some(sql) = key_index(&name, known, schema) {
            tx.batch_execute(&sql)
                .await
                .map_err(|e| Error::postgres(format!("indexing the new key of {name}"), e))?;
        }
        add_and_drop_columns(tx, &name, known, schema).await?;
    }
    tables.known.insert(id, schema.clone());
    Ok(())
}

/// Relation messages carry no attribute numbers, so a rename and a drop plus an add of the
/// same type look alike. Only key columns are taken as renamed (a primary key does not
/// silently lose a column); other changes are adds and drops by name.
fn renamed(known: &TableSchema, schema: &TableSchema) -> bool {
    known.columns.len() == schema.columns.len()
        && known.columns.iter().zip(&schema.columns).all(|(a, b)| {
            a.type_oid == b.type_oid
                && a.type_modifier == b.type_modifier
                && (a.name == b.name || (a.key && b.key))
        })
        && known
            .columns
            .iter()
            .zip(&schema.columns)
            .any(|(a, b)| a.name != b.name)
}

/// New key columns (a replica identity index appeared): upserts need a unique index on them.
fn key_index(name: &str, known: &TableSchema, schema: &TableSchema) -> Option<String> {
    let key_names = |t: &TableSchema| {
        t.columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };
    let (old_keys, new_keys) = (key_names(known), key_names(schema));
    if !has_key(schema) || old_keys == new_keys || known.columns.len() != schema.columns.len() {
        return None;
    }
    let cols: Vec<String> = new_keys.iter().map(|c| quote_ident(c)).collect();
    Some(format!(
        "create unique index if not exists {} on {name} ({})",
        quote_ident(&format!("{}_pgshift_{}", schema.table, new_keys.join("_"))),
        cols.join(", ")
    ))
}

async fn rename_columns(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
    known: &TableSchema,
    schema: &TableSchema,
) -> Result<()> {
    for (old, new) in known.columns.iter().zip(&schema.columns) {
        if old.name != new.name {
            tx.batch_execute(&format!(
                "alter table {name} rename column {} to {}",
                quote_ident(&old.name),
                quote_ident(&new.name)
            ))
            .await
            .map_err(|e| Error::postgres(format!("renaming column {} of {name}", old.name), e))?;
        }
    }
    Ok(())
}

async fn add_and_drop_columns(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
    known: &TableSchema,
    schema: &TableSchema,
) -> Result<()> {
    for c in &schema.columns {
        if !known.columns.iter().any(|k| k.name == c.name) {
            let ty = target_type(tx, &c.type_name).await?;
            tx.batch_execute(&format!(
                "alter table {name} add column if not exists {} {ty}",
                quote_ident(&c.name)
            ))
            .await
            .map_err(|e| Error::postgres(format!("adding column {} to {name}", c.name), e))?;
        }
    }
    for k in &known.columns {
        if !schema.columns.iter().any(|c| c.name == k.name) {
            tx.batch_execute(&format!(
                "alter table {name} drop column if exists {}",
                quote_ident(&k.name)
            ))
            .await
            .map_err(|e| Error::postgres(format!("dropping column {} from {name}", k.name), e))?;
        }
    }
    Ok(())
}

/// The target table's columns that rows are written to (generated ones left out); `None`
/// when it does not exist.
async fn target_columns(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    table: &str,
) -> Result<Option<Vec<String>>> {
    let rel = quote_qualified(schema, table);
    let rows = tx
        .query(
            "select a.attname::text from pg_attribute a where a.attrelid = to_regclass($1) \
             and a.attnum > 0 and not a.attisdropped and a.attgenerated = '' order by a.attnum",
            &[&rel],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading the columns of {rel} in the target"), e))?;
    if rows.is_empty() {
        let exists: bool = tx
            .query_one("select to_regclass($1) is not null", &[&rel])
            .await
            .map_err(|e| Error::postgres(format!("looking for {rel} in the target"), e))?
            .get(0);
        return Ok(exists.then(Vec::new));
    }
    Ok(Some(rows.into_iter().map(|r| r.get(0)).collect()))
}

/// A schema change of this batch (DESIGN §12), run as its operations say, inside the batch's
/// transaction; `schema` is the table's row shape after it.
pub(super) async fn apply_schema_change(
    tx: &tokio_postgres::Transaction<'_>,
    tables: &mut Tables,
    schema: &TableSchema,
    change: &SchemaChange,
) -> Result<()> {
    let name = quote_qualified(&schema.schema, &schema.table);
    let run = |sql: String, what: String| async move {
        tx.batch_execute(&sql)
            .await
            .map_err(|e| Error::postgres(format!("{what} ({} at {})", change.tag, change.lsn), e))
    };
    let col = |c: &str| quote_ident(c);
    for op in &change.ops {
        match op {
            SchemaOp::CreateTable { sql } => {
                run(
                    format!(
                        "create schema if not exists {}",
                        quote_ident(&schema.schema)
                    ),
                    format!("creating {name}"),
                )
                .await?;
                ensure_sequences(tx, sql).await?;
                run(
                    "savepoint pgshift_create".to_owned(),
                    format!("creating {name}"),
                )
                .await?;
                match tx.batch_execute(sql).await {
                    Ok(()) => {
                        run(
                            "release savepoint pgshift_create".to_owned(),
                            format!("creating {name}"),
                        )
                        .await?
                    }
                    // A type created on the source after the load (the load's pre-data carried
                    // the others): the table is made with the columns pgoutput sends, such
                    // columns as text, and a warning.
                    Err(e)
                        if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) =>
                    {
                        tracing::warn!(table = %name, error = %e, "a type of a table created after the load is missing on the target: its columns of that type are made text");
                        run(
                            "rollback to savepoint pgshift_create".to_owned(),
                            format!("creating {name}"),
                        )
                        .await?;
                        ensure_table(tx, schema).await?;
                    }
                    Err(e) => {
                        return Err(Error::postgres(
                            format!("creating {name} ({} at {})", change.tag, change.lsn),
                            e,
                        ));
                    }
                }
            }
            SchemaOp::RenameTable {
                from_schema,
                from_table,
            } => {
                let from = quote_qualified(from_schema, from_table);
                if target_columns(tx, from_schema, from_table).await?.is_none()
                    || target_columns(tx, &schema.schema, &schema.table)
                        .await?
                        .is_some()
                {
                    continue; // already where it belongs
                }
                if from_schema != &schema.schema {
                    run(
                        format!(
                            "create schema if not exists {0}; alter table {from} set schema {0}",
                            quote_ident(&schema.schema)
                        ),
                        format!("moving {from} to schema {}", schema.schema),
                    )
                    .await?;
                }
                if from_table != &schema.table {
                    let moved = quote_qualified(&schema.schema, from_table);
                    run(
                        format!("alter table {moved} rename to {}", col(&schema.table)),
                        format!("renaming {moved} to {}", schema.table),
                    )
                    .await?;
                }
                if let Some(k) = tables
                    .known
                    .remove(&(from_schema.clone(), from_table.clone()))
                {
                    tables
                        .known
                        .insert((schema.schema.clone(), schema.table.clone()), k);
                }
            }
            SchemaOp::DropTable => {
                run(
                    format!("drop table if exists {name}"),
                    format!("dropping {name}"),
                )
                .await?;
                tables
                    .known
                    .remove(&(schema.schema.clone(), schema.table.clone()));
                return Ok(());
            }
            SchemaOp::AddColumn {
                column,
                type_name,
                definition,
                existing_rows,
                default,
                generated,
            } => {
                ensure_sequences(tx, definition).await?;
                let sql = match existing_rows {
                    Some(v) if !generated => {
                        let not_null = if definition.ends_with(" not null") {
                            " not null"
                        } else {
                            ""
                        };
                        let then = match default {
                            Some(d) => format!("set default {d}"),
                            None => "drop default".to_owned(),
                        };
                        format!(
                            "alter table {name} add column if not exists {c} {type_name} default {v}::{type_name}{not_null}; \
                             alter table {name} alter column {c} {then}",
                            c = col(column),
                            v = quote_literal(v)
                        )
                    }
                    _ => format!("alter table {name} add column if not exists {definition}"),
                };
                run(sql, format!("adding column {column} to {name}")).await?;
            }
            SchemaOp::DropColumn { column } => {
                run(
                    format!("alter table {name} drop column if exists {}", col(column)),
                    format!("dropping column {column} from {name}"),
                )
                .await?;
            }
            SchemaOp::RenameColumn { from, to } => {
                let have = target_columns(tx, &schema.schema, &schema.table)
                    .await?
                    .unwrap_or_default();
                if !have.contains(from) || have.contains(to) {
                    continue; // already renamed (a change the catalog explained late)
                }
                run(
                    format!(
                        "alter table {name} rename column {} to {}",
                        col(from),
                        col(to)
                    ),
                    format!("renaming column {from} of {name} to {to}"),
                )
                .await?;
            }
            SchemaOp::AlterType {
                column,
                type_name,
                using,
            } => {
                run(
                    format!(
                        "alter table {name} alter column {} type {type_name} using {using}",
                        col(column)
                    ),
                    format!("changing the type of {column} of {name} to {type_name}"),
                )
                .await?;
            }
            SchemaOp::SetDefault { column, default } => {
                ensure_sequences(tx, default.as_deref().unwrap_or("")).await?;
                let what = match default {
                    Some(d) => format!("set default {d}"),
                    None => "drop default".to_owned(),
                };
                run(
                    format!("alter table {name} alter column {} {what}", col(column)),
                    format!("changing the default of {column} of {name}"),
                )
                .await?;
            }
            SchemaOp::SetNotNull { column, not_null } => {
                let what = if *not_null {
                    "set not null"
                } else {
                    "drop not null"
                };
                run(
                    format!("alter table {name} alter column {} {what}", col(column)),
                    format!("changing NOT NULL of {column} of {name}"),
                )
                .await?;
            }
            SchemaOp::AttachPartition {
                schema: ps,
                table: pt,
                bound,
                key,
                parent,
            } => {
                let name = parent.clone().unwrap_or_else(|| name.clone());
                let part = quote_qualified(ps, pt);
                let attached = is_partition_of(tx, &part, &name).await?;
                if attached {
                    continue;
                }
                let sql = if target_columns(tx, ps, pt).await?.is_some() {
                    format!("alter table {name} attach partition {part} {bound}")
                } else {
                    let key = key
                        .as_ref()
                        .map(|k| format!(" partition by {k}"))
                        .unwrap_or_default();
                    format!(
                        "create schema if not exists {}; create table {part} partition of {name} {bound}{key}",
                        quote_ident(ps)
                    )
                };
                run(sql, format!("adding partition {part} to {name}")).await?;
            }
            SchemaOp::DetachPartition {
                schema: ps,
                table: pt,
            } => {
                let part = quote_qualified(ps, pt);
                let attached = is_partition_of(tx, &part, &name).await?;
                if attached {
                    run(
                        format!("alter table {name} detach partition {part}"),
                        format!("detaching partition {part} from {name}"),
                    )
                    .await?;
                }
            }
            SchemaOp::SetKey { columns } => {
                let cols: Vec<String> = columns.iter().map(|c| col(c)).collect();
                let index = quote_ident(&format!("{}_pgshift_{}", schema.table, columns.join("_")));
                run(
                    format!(
                        "create unique index if not exists {index} on {name} ({})",
                        cols.join(", ")
                    ),
                    format!("indexing the new key of {name}"),
                )
                .await?;
            }
            SchemaOp::SetPrimaryKey { columns } => {
                let current: Option<String> = tx
                    .query_opt(
                        "select conname::text from pg_constraint where conrelid = to_regclass($1) and contype = 'p'",
                        &[&name],
                    )
                    .await
                    .map_err(|e| Error::postgres(format!("reading the primary key of {name}"), e))?
                    .map(|r| r.get(0));
                let mut sql = String::new();
                if let Some(c) = current {
                    sql.push_str(&format!("alter table {name} drop constraint {};", col(&c)));
                }
                if !columns.is_empty() {
                    let cols: Vec<String> = columns.iter().map(|c| col(c)).collect();
                    sql.push_str(&format!(
                        "alter table {name} add primary key ({})",
                        cols.join(", ")
                    ));
                }
                run(sql, format!("changing the primary key of {name}")).await?;
            }
        }
    }
    tables.known.insert(
        (schema.schema.clone(), schema.table.clone()),
        schema.clone(),
    );
    Ok(())
}

/// The sequences a default draws from (`nextval('name'::regclass)`, as the catalog prints a
/// serial column's), created when the target lacks them; `cutover` sets their values.
async fn ensure_sequences(tx: &tokio_postgres::Transaction<'_>, sql: &str) -> Result<()> {
    for name in sequences_in(sql) {
        tx.batch_execute(&format!("create sequence if not exists {name}"))
            .await
            .map_err(|e| Error::postgres(format!("creating sequence {name}"), e))?;
    }
    Ok(())
}

/// The sequence names in `nextval('..'::regclass)` calls (the literal's text: a name the
/// catalog already quoted).
fn sequences_in(sql: &str) -> Vec<String> {
    const OPEN: &str = "nextval('";
    let mut out = Vec::new();
    let mut rest = sql;
    while let Some(i) = rest.find(OPEN) {
        rest = &rest[i + OPEN.len()..];
        let mut name = String::new();
        let mut chars = rest.char_indices().peekable();
        let mut end = None;
        while let Some((at, ch)) = chars.next() {
            if ch == '\'' {
                if chars.peek().is_some_and(|(_, c)| *c == '\'') {
                    chars.next();
                    name.push('\'');
                } else {
                    end = Some(at + 1);
                    break;
                }
            } else {
                name.push(ch);
            }
        }
        let Some(end) = end else { break };
        rest = &rest[end..];
        if rest.starts_with("::regclass)") && !name.is_empty() {
            out.push(name);
        }
    }
    out
}

/// Whether the target's `part` is a partition of `parent` (both qualified and quoted).
async fn is_partition_of(
    tx: &tokio_postgres::Transaction<'_>,
    part: &str,
    parent: &str,
) -> Result<bool> {
    Ok(tx
        .query_one(
            "select exists (select 1 from pg_inherits where inhrelid = to_regclass($1) and inhparent = to_regclass($2))",
            &[&part, &parent],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading the partitions of {parent}"), e))?
        .get(0))
}

/// A string literal (standard-conforming strings).
fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sequences_named_by_defaults_are_found() {
        assert_eq!(
            super::sequences_in(
                "create table t (id integer default nextval('t_id_seq'::regclass), b bigint default nextval('\"S\".\"b seq\"'::regclass))"
            ),
            ["t_id_seq", "\"S\".\"b seq\""]
        );
        assert!(super::sequences_in("default 'nextval(' || x").is_empty());
        assert_eq!(
            super::sequences_in("nextval('\"a \"\"b\"\".\"it''s_id_seq\"'::regclass)"),
            ["\"a \"\"b\"\".\"it's_id_seq\""]
        );
    }
}
