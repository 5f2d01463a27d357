//! Apply staged data to a target PostgreSQL (PG → PG migration, DESIGN §7).
//!
//! # Effect order
//!
//! 1. The target gets `pgshift.applied (task, load_complete, position, batches)`: the applied
//!    position lives in the target, written in the same transaction as the data it covers.
//! 2. **Load** (once): in one transaction, every table of the load manifests is created from
//!    its staged schema if missing, truncated, filled with `COPY FROM` from its chunk files, and
//!    the task's row set to `load_complete`, `position = L0`. A crash rolls all of it back.
//! 3. **CDC**: the batch manifests are read in LSN order; a batch whose end is at or before the
//!    position is skipped (already applied). Each batch is one transaction: its tables' changes
//!    in commit order (inserts and updates as upserts by primary key, deletes by key, truncates),
//!    columns added or dropped where a schema version changes, and the position moved to the
//!    batch's end, conditional on it still being the batch's start. A crash mid-batch rolls the
//!    batch back; the rerun applies it once. Unchanged TOAST values are left out of the update,
//!    so the target keeps its current value.
//!
//! Tables are applied one after another inside a batch (each in commit order); the target
//! tables pgshift creates have no foreign keys, so the end state is the source's.

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::SinkExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};

use crate::config::{PgConfig, check_task_name};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::source::{self, quote_ident, quote_qualified};
use crate::staging::ObjectSink;
use crate::staging::decode::{CsvRows, parse_csv_fields};
use crate::staging::encode::Encoding;
use crate::staging::layout::{self, BatchFile, BatchManifest, LoadManifest, StoredSchema};
use crate::table::{ColumnSchema, TableSchema};

/// What an apply run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub task: String,
    pub load_applied: bool,
    pub load_rows: u64,
    pub batches_applied: u64,
    pub changes_applied: u64,
    pub position: Lsn,
}

const BOOKKEEPING: &str = "create schema if not exists pgshift; \
 create table if not exists pgshift.applied (task text primary key, load_complete boolean not null default false, \
 position text not null default '0/0', batches bigint not null default 0, updated_at timestamptz not null default now())";

fn gunzip(key: &str, body: Bytes) -> Result<Vec<u8>> {
    if !key.ends_with(".gz") {
        return Ok(body.to_vec());
    }
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_end(&mut out)
        .map_err(|e| Error::io(format!("decompressing {key}"), e))?;
    Ok(out)
}

/// Applies everything staged that the target has not applied yet.
pub async fn run<S: ObjectSink>(sink: &S, target: &PgConfig, task: &str) -> Result<ApplyReport> {
    check_task_name(task)?;
    let mut cfg = target.clone();
    cfg.application_name = "pgshift-apply".to_owned();
    let mut client = source::connect(&cfg).await?;
    client
        .batch_execute(BOOKKEEPING)
        .await
        .map_err(|e| Error::postgres("creating pgshift.applied in the target", e))?;
    client
        .execute(
            "insert into pgshift.applied (task) values ($1) on conflict do nothing",
            &[&task],
        )
        .await
        .map_err(|e| Error::postgres("registering the task in the target", e))?;
    let row = client
        .query_one(
            "select load_complete, position from pgshift.applied where task = $1",
            &[&task],
        )
        .await
        .map_err(|e| Error::postgres("reading the applied position", e))?;
    let mut report = ApplyReport {
        task: task.to_owned(),
        ..ApplyReport::default()
    };
    let load_complete: bool = row.get(0);
    let position_text: String = row.get(1);
    report.position = position_text
        .parse()
        .map_err(|e: crate::lsn::LsnParseError| Error::Source(format!("pgshift.applied: {e}")))?;
    let mut tables = Tables::default();
    if !load_complete
        && let Some((rows, l0)) = apply_load(sink, &mut client, task, &mut tables).await?
    {
        report.load_applied = true;
        report.load_rows = rows;
        report.position = l0;
    }
    for key in layout::batch_manifest_keys(sink).await? {
        let m: BatchManifest = layout::get_json(sink, &key, "a batch manifest").await?;
        if m.end_lsn <= report.position {
            continue;
        }
        if m.start_lsn < report.position {
            return Err(Error::Source(format!(
                "{key} starts at {} but the target is at {}: batches overlap",
                m.start_lsn, report.position
            )));
        }
        let changes =
            apply_batch(sink, &mut client, task, &m, report.position, &mut tables).await?;
        report.batches_applied += 1;
        report.changes_applied += changes;
        report.position = m.end_lsn;
    }
    Ok(report)
}

/// Target tables as this run knows them: columns in order and primary key.
#[derive(Default)]
struct Tables {
    known: HashMap<(String, String), TableSchema>,
}

/// The column type to create in the target: the source's, or `text` when the target does not
/// have it (an extension or user type not created there; values are its text output).
async fn target_type(
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

/// The key columns, quoted, in table order.
fn quoted_keys(schema: &TableSchema) -> Vec<String> {
    schema
        .columns
        .iter()
        .filter(|c| c.key)
        .map(|c| quote_ident(&c.name))
        .collect()
}

/// Whether the table has a primary key to upsert by. Without one, REPLICA IDENTITY FULL marks
/// every column as key, which is no key at all.
fn has_key(schema: &TableSchema) -> bool {
    let keys = schema.columns.iter().filter(|c| c.key).count();
    keys > 0 && !(schema.replica_identity == "f" && keys == schema.columns.len())
}

/// Creates the target table from a staged schema when it does not exist.
async fn ensure_table(
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

async fn apply_load<S: ObjectSink>(
    sink: &S,
    client: &mut Client,
    task: &str,
    tables: &mut Tables,
) -> Result<Option<(u64, Lsn)>> {
    let keys = layout::load_manifest_keys(sink).await?;
    if keys.is_empty() {
        return Ok(None);
    }
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::postgres("starting the load transaction", e))?;
    let mut rows = 0;
    let mut l0 = Lsn::ZERO;
    for key in keys {
        let m: LoadManifest = layout::get_json(sink, &key, "a load manifest").await?;
        if m.format.encoding == Encoding::Parquet {
            return Err(Error::config(
                "format",
                "apply reads csv or jsonl staging; this load is parquet",
            ));
        }
        let stored = layout::first_schema(sink, &m.schema, &m.table).await?;
        ensure_table(&tx, &stored.schema).await?;
        let name = quote_qualified(&m.schema, &m.table);
        tx.batch_execute(&format!("truncate {name}"))
            .await
            .map_err(|e| Error::postgres(format!("truncating {name}"), e))?;
        let cols: Vec<String> = m.columns.iter().map(|c| quote_ident(c)).collect();
        let keys: Vec<String> = quoted_keys(&stored.schema);
        let keyed = has_key(&stored.schema);
        // Chunks are read at different moments: a row updated during the load can be in two
        // chunks. Keyed tables load through a temporary table keeping one version per key;
        // CDC from L0 then brings every row to its final state.
        let into = if keyed {
            tx.batch_execute(&format!(
                "drop table if exists pg_temp.pgshift_load; create temp table pgshift_load (like {name}) on commit drop"
            ))
            .await
            .map_err(|e| Error::postgres(format!("staging the load of {name}"), e))?;
            "pg_temp.pgshift_load".to_owned()
        } else {
            name.clone()
        };
        let copy = format!(
            "copy {into} ({}) from stdin with (format csv)",
            cols.join(", ")
        );
        for chunk in &m.chunks {
            let body = gunzip(&chunk.key, layout::get_required(sink, &chunk.key).await?)?;
            let csv = if m.format.encoding == Encoding::Jsonl {
                jsonl_to_csv(&body, &m.columns)?
            } else {
                body
            };
            let sink_in = tx
                .copy_in::<_, Bytes>(&copy)
                .await
                .map_err(|e| Error::postgres(format!("starting COPY into {name}"), e))?;
            let mut sink_in = std::pin::pin!(sink_in);
            sink_in
                .send(Bytes::from(csv))
                .await
                .map_err(|e| Error::postgres(format!("copying into {name}"), e))?;
            sink_in
                .as_mut()
                .finish()
                .await
                .map_err(|e| Error::postgres(format!("finishing COPY into {name}"), e))?;
        }
        if keyed {
            tx.batch_execute(&format!(
                "insert into {name} ({0}) select {0} from pg_temp.pgshift_load on conflict ({1}) do nothing; drop table pg_temp.pgshift_load",
                cols.join(", "),
                keys.join(", ")
            ))
            .await
            .map_err(|e| Error::postgres(format!("loading {name}"), e))?;
        }
        rows += m.rows;
        if let Some(l) = m.l0 {
            l0 = l;
        }
        tables
            .known
            .insert((m.schema.clone(), m.table.clone()), stored.schema);
    }
    tx.execute(
        "update pgshift.applied set load_complete = true, position = $2, updated_at = now() where task = $1",
        &[&task, &l0.to_string()],
    )
    .await
    .map_err(|e| Error::postgres("recording the load in pgshift.applied", e))?;
    tx.commit()
        .await
        .map_err(|e| Error::postgres("committing the load", e))?;
    Ok(Some((rows, l0)))
}

/// JSON Lines full-load rows back to COPY CSV.
fn jsonl_to_csv(body: &[u8], columns: &[String]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len());
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line)
            .map_err(|e| Error::Source(format!("a staged JSON line is malformed: {e}")))?;
        for (i, c) in columns.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            crate::staging::encode::csv_field(&mut out, v["after"][c].as_str().map(str::as_bytes));
        }
        out.push(b'\n');
    }
    Ok(out)
}

/// One staged CDC change, decoded for applying.
struct Change {
    op: String,
    /// Key column values (old key for U and D).
    key: Vec<(String, Option<String>)>,
    /// New row: present columns only (unchanged TOAST ones are absent).
    after: Vec<(String, Option<String>)>,
    /// Old row under REPLICA IDENTITY FULL (JSON Lines only).
    before: Vec<(String, Option<String>)>,
}

type Statement = (String, Vec<Option<String>>);

/// `DELETE` of exactly one row whose columns' text equals `row` (tables without a key:
/// duplicates are possible, and not every type has `=`).
fn delete_one(name: &str, row: &[(String, Option<String>)]) -> Result<Statement> {
    if row.is_empty() {
        return Err(Error::Source(format!(
            "{name}: a delete without a key or old row cannot be applied"
        )));
    }
    let conds: Vec<String> = row
        .iter()
        .enumerate()
        // format('%s', ..) is the type's output function, the text the value was staged as
        // (a cast to text would trim char(n) padding).
        .map(|(i, (c, _))| {
            let (col, p) = (quote_ident(c), i + 1);
            format!("(${p}::text is null and {col} is null or format('%s', {col}) = ${p}::text)")
        })
        .collect();
    Ok((
        format!(
            "delete from {name} where ctid = (select ctid from {name} where {} limit 1)",
            conds.join(" and ")
        ),
        row.iter().map(|(_, v)| v.clone()).collect(),
    ))
}

/// The statements that apply one change, with their text parameters.
fn change_statements(
    schema: &TableSchema,
    name: &str,
    change: &Change,
    file: &str,
) -> Result<Vec<Statement>> {
    let keyed = has_key(schema);
    let cast = |i: usize, c: &str| -> Result<String> {
        Ok(format!(
            "${}::text::{}",
            i + 1,
            column(schema, c)?.type_name
        ))
    };
    // Deletes the row the change's key (old key for updates) names.
    let delete_by_key = || -> Result<Statement> {
        let conds: Vec<String> = change
            .key
            .iter()
            .enumerate()
            .map(|(i, (c, _))| Ok(format!("{} = {}", quote_ident(c), cast(i, c)?)))
            .collect::<Result<_>>()?;
        Ok((
            format!("delete from {name} where {}", conds.join(" and ")),
            change.key.iter().map(|(_, v)| v.clone()).collect(),
        ))
    };
    let insert = |conflict: String| -> Result<Statement> {
        let cols: Vec<String> = change.after.iter().map(|(c, _)| quote_ident(c)).collect();
        let params: Vec<String> = change
            .after
            .iter()
            .enumerate()
            .map(|(i, (c, _))| cast(i, c))
            .collect::<Result<_>>()?;
        Ok((
            format!(
                "insert into {name} ({}) values ({}){conflict}",
                cols.join(", "),
                params.join(", ")
            ),
            change.after.iter().map(|(_, v)| v.clone()).collect(),
        ))
    };
    match (change.op.as_str(), keyed) {
        ("T", _) => Ok(vec![(format!("truncate {name}"), Vec::new())]),
        ("D", true) => Ok(vec![delete_by_key()?]),
        ("D", false) => Ok(vec![delete_one(
            name,
            if change.before.is_empty() {
                &change.key
            } else {
                &change.before
            },
        )?]),
        ("I" | "U", true) => {
            let keys: Vec<String> = quoted_keys(schema);
            let updates: Vec<String> = change
                .after
                .iter()
                .filter(|(c, _)| !schema.columns.iter().any(|k| k.key && k.name == *c))
                .map(|(c, _)| format!("{0} = excluded.{0}", quote_ident(c)))
                .collect();
            let conflict = if updates.is_empty() {
                format!(" on conflict ({}) do nothing", keys.join(", "))
            } else {
                format!(
                    " on conflict ({}) do update set {}",
                    keys.join(", "),
                    updates.join(", ")
                )
            };
            // An update whose old key differs from the new row's (a replica-identity key
            // changed on a table without a primary key) removes the old row first.
            let moved = change.op == "U"
                && change
                    .key
                    .iter()
                    .any(|(k, old)| change.after.iter().any(|(c, new)| c == k && new != old));
            let mut out = Vec::new();
            if moved {
                out.push(delete_by_key()?);
            }
            out.push(insert(conflict)?);
            Ok(out)
        }
        ("I", false) => Ok(vec![insert(String::new())?]),
        ("U", false) => {
            if change.before.is_empty() {
                return Err(Error::Source(format!(
                    "{name} has no primary key: applying its updates needs the old row, which JSON Lines staging carries (REPLICA IDENTITY FULL); CSV does not"
                )));
            }
            Ok(vec![
                delete_one(name, &change.before)?,
                insert(String::new())?,
            ])
        }
        (other, _) => Err(Error::Source(format!("{file}: unknown op {other:?}"))),
    }
}

fn read_changes(
    m: &BatchManifest,
    file: &BatchFile,
    body: &[u8],
    schemas: &[(u64, StoredSchema)],
) -> Result<Vec<(usize, Change)>> {
    let mut out = Vec::new();
    if m.format.encoding == Encoding::Jsonl {
        for (i, line) in body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .enumerate()
        {
            let v: serde_json::Value = serde_json::from_slice(line)
                .map_err(|e| Error::Source(format!("{}: malformed line: {e}", file.key)))?;
            let obj = |x: &serde_json::Value| -> Vec<(String, Option<String>)> {
                x.as_object()
                    .map(|o| {
                        o.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned)))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            out.push((
                schema_index(schemas, i as u64),
                Change {
                    op: v["op"].as_str().unwrap_or("").to_owned(),
                    key: obj(&v["key"]),
                    after: obj(&v["after"]),
                    before: obj(&v["before"]),
                },
            ));
        }
        return Ok(out);
    }
    let mut rows = Vec::new();
    let mut split = CsvRows::new();
    split.feed(body, |r| {
        rows.push(r.to_vec());
        Ok(())
    })?;
    split.finish()?;
    let mut fields = Vec::new();
    let offset = if m.commit_ts_column { 2 } else { 1 };
    for (i, row) in rows.iter().enumerate() {
        parse_csv_fields(row, &mut fields)?;
        let si = schema_index(schemas, i as u64);
        let cols = &schemas[si].1.schema.columns;
        if fields.len() != cols.len() + offset + 1 {
            return Err(Error::Source(format!(
                "{} row {i}: {} fields for {} columns",
                file.key,
                fields.len(),
                cols.len()
            )));
        }
        let text =
            |f: &Option<Vec<u8>>| f.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        let unchanged: Vec<usize> = text(&fields[cols.len() + offset])
            .unwrap_or_default()
            .split(';')
            .filter_map(|n| n.parse::<usize>().ok())
            .collect();
        let op = text(&fields[0]).unwrap_or_default();
        let after = cols
            .iter()
            .enumerate()
            .filter(|(j, _)| !unchanged.contains(&(j + 1)))
            .map(|(j, c)| (c.name.clone(), text(&fields[j + offset])))
            .collect();
        let key = cols
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(j, c)| (c.name.clone(), text(&fields[j + offset])))
            .collect();
        out.push((
            si,
            Change {
                op,
                key,
                after,
                before: Vec::new(),
            },
        ));
    }
    Ok(out)
}

fn schema_index(schemas: &[(u64, StoredSchema)], row: u64) -> usize {
    schemas
        .iter()
        .rposition(|(first, _)| *first <= row)
        .unwrap_or(0)
}

/// Makes the target's columns match `schema`: renames of key columns (same positions and
/// types), or adds new columns and drops removed ones.
async fn sync_columns(
    tx: &tokio_postgres::Transaction<'_>,
    tables: &mut Tables,
    schema: &TableSchema,
) -> Result<()> {
    let id = (schema.schema.clone(), schema.table.clone());
    let Some(known) = tables.known.get(&id) else {
        ensure_table(tx, schema).await?;
        tables.known.insert(id, schema.clone());
        return Ok(());
    };
    if known.same_shape(schema) {
        return Ok(());
    }
    let name = quote_qualified(&schema.schema, &schema.table);
    // New key columns (a replica identity index appeared): upserts need a unique index on them.
    let key_names = |t: &TableSchema| {
        t.columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };
    let (old_keys, new_keys) = (key_names(known), key_names(schema));
    let key_index =
        if has_key(schema) && old_keys != new_keys && known.columns.len() == schema.columns.len() {
            let cols: Vec<String> = new_keys.iter().map(|c| quote_ident(c)).collect();
            Some(format!(
                "create unique index if not exists {} on {name} ({})",
                quote_ident(&format!("{}_pgshift_{}", schema.table, new_keys.join("_"))),
                cols.join(", ")
            ))
        } else {
            None
        };
    // Relation messages carry no attribute numbers, so a rename and a drop plus an add of the
    // same type look alike. Only key columns are taken as renamed (a primary key does not
    // silently lose a column); other changes are adds and drops by name.
    let renamed = known.columns.len() == schema.columns.len()
        && known.columns.iter().zip(&schema.columns).all(|(a, b)| {
            a.type_oid == b.type_oid
                && a.type_modifier == b.type_modifier
                && (a.name == b.name || (a.key && b.key))
        })
        && known
            .columns
            .iter()
            .zip(&schema.columns)
            .any(|(a, b)| a.name != b.name);
    if renamed {
        for (old, new) in known.columns.iter().zip(&schema.columns) {
            if old.name != new.name {
                tx.batch_execute(&format!(
                    "alter table {name} rename column {} to {}",
                    quote_ident(&old.name),
                    quote_ident(&new.name)
                ))
                .await
                .map_err(|e| {
                    Error::postgres(format!("renaming column {} of {name}", old.name), e)
                })?;
            }
        }
        tables.known.insert(id, schema.clone());
        return Ok(());
    }
    if let Some(sql) = &key_index {
        tx.batch_execute(sql)
            .await
            .map_err(|e| Error::postgres(format!("indexing the new key of {name}"), e))?;
    }
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
    tables.known.insert(id, schema.clone());
    Ok(())
}

fn column<'a>(schema: &'a TableSchema, name: &str) -> Result<&'a ColumnSchema> {
    schema
        .columns
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| {
            Error::Source(format!(
                "{}.{} has no column {name}",
                schema.schema, schema.table
            ))
        })
}

async fn apply_batch<S: ObjectSink>(
    sink: &S,
    client: &mut Client,
    task: &str,
    m: &BatchManifest,
    position: Lsn,
    tables: &mut Tables,
) -> Result<u64> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::postgres("starting a batch transaction", e))?;
    let mut applied = 0u64;
    let mut statements: HashMap<String, tokio_postgres::Statement> = HashMap::new();
    for file in &m.files {
        let mut schemas = Vec::new();
        for seg in &file.schema_versions {
            let s: StoredSchema =
                serde_json::from_slice(&layout::get_required(sink, &seg.key).await?)
                    .map_err(|e| Error::Source(format!("{}: {e}", seg.key)))?;
            schemas.push((seg.first_row, s));
        }
        if schemas.is_empty() {
            return Err(Error::Source(format!(
                "{}: no schema version in the manifest",
                file.key
            )));
        }
        let body = gunzip(&file.key, layout::get_required(sink, &file.key).await?)?;
        let changes = read_changes(m, file, &body, &schemas)?;
        let mut current = usize::MAX;
        for (si, change) in changes {
            let schema = &schemas[si].1.schema;
            if si != current {
                sync_columns(&tx, tables, schema).await?;
                current = si;
            }
            let name = quote_qualified(&schema.schema, &schema.table);
            for (sql, values) in change_statements(schema, &name, &change, &file.key)? {
                if !statements.contains_key(&sql) {
                    let types = vec![Type::TEXT; values.len()];
                    let st = tx.prepare_typed(&sql, &types).await.map_err(|e| {
                        Error::postgres(format!("preparing a change for {name}"), e)
                    })?;
                    statements.insert(sql.clone(), st);
                }
                let params: Vec<&(dyn ToSql + Sync)> =
                    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                tx.execute(&statements[&sql], &params)
                    .await
                    .map_err(|e| Error::postgres(format!("applying a change to {name}"), e))?;
            }
            applied += 1;
        }
    }
    let moved = tx
        .execute(
            "update pgshift.applied set position = $2, batches = batches + 1, updated_at = now() where task = $1 and position = $3",
            &[&task, &m.end_lsn.to_string(), &position.to_string()],
        )
        .await
        .map_err(|e| Error::postgres("moving the applied position", e))?;
    if moved != 1 {
        return Err(Error::Conflict(format!(
            "another apply of task {task} moved the target's position"
        )));
    }
    tx.commit()
        .await
        .map_err(|e| Error::postgres("committing a batch", e))?;
    Ok(applied)
}
