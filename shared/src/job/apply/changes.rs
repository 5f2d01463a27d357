//! Staged CDC rows read back (CSV or JSON Lines) and turned into the statements that apply
//! them to the target, pure (no I/O).

use crate::error::{Error, Result};
use crate::source::quote_ident;
use crate::staging::decode::{CsvRows, parse_csv_fields};
use crate::staging::encode::Encoding;
use crate::staging::layout::{BatchFile, BatchManifest, StoredSchema};
use crate::table::{ColumnSchema, TableSchema};

/// JSON Lines full-load rows back to COPY CSV.
pub(super) fn jsonl_to_csv(body: &[u8], columns: &[String]) -> Result<Vec<u8>> {
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
pub(super) struct Change {
    op: String,
    /// Key column values (old key for U and D).
    key: Vec<(String, Option<String>)>,
    /// New row: present columns only (unchanged TOAST ones are absent).
    after: Vec<(String, Option<String>)>,
    /// Old row under REPLICA IDENTITY FULL (JSON Lines only).
    before: Vec<(String, Option<String>)>,
}

pub(super) type Statement = (String, Vec<Option<String>>);

/// `DELETE` of exactly one row whose columns' text equals `row` (tables without a key:
/// duplicates are possible, and not every type has `=`).
pub(super) fn delete_one(name: &str, row: &[(String, Option<String>)]) -> Result<Statement> {
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

/// `$n::text::<type>` for parameter `i` of column `c`.
fn cast(schema: &TableSchema, i: usize, c: &str) -> Result<String> {
    Ok(format!(
        "${}::text::{}",
        i + 1,
        column(schema, c)?.type_name
    ))
}

/// Deletes the row the change's key (old key for updates) names.
fn delete_by_key(schema: &TableSchema, name: &str, change: &Change) -> Result<Statement> {
    let conds: Vec<String> = change
        .key
        .iter()
        .enumerate()
        .map(|(i, (c, _))| Ok(format!("{} = {}", quote_ident(c), cast(schema, i, c)?)))
        .collect::<Result<_>>()?;
    Ok((
        format!("delete from {name} where {}", conds.join(" and ")),
        change.key.iter().map(|(_, v)| v.clone()).collect(),
    ))
}

/// Inserts the change's new row, with `conflict` (an `on conflict` clause, or nothing).
fn insert(schema: &TableSchema, name: &str, change: &Change, conflict: &str) -> Result<Statement> {
    let cols: Vec<String> = change.after.iter().map(|(c, _)| quote_ident(c)).collect();
    let params: Vec<String> = change
        .after
        .iter()
        .enumerate()
        .map(|(i, (c, _))| cast(schema, i, c))
        .collect::<Result<_>>()?;
    Ok((
        format!(
            "insert into {name} ({}) values ({}){conflict}",
            cols.join(", "),
            params.join(", ")
        ),
        change.after.iter().map(|(_, v)| v.clone()).collect(),
    ))
}

/// An insert or update of a keyed table: an upsert by key (an update whose old key differs
/// from the new row's first removes the old row).
fn upsert(schema: &TableSchema, name: &str, change: &Change) -> Result<Vec<Statement>> {
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
    // A replica-identity key changed on a table without a primary key.
    let moved = change.op == "U"
        && change
            .key
            .iter()
            .any(|(k, old)| change.after.iter().any(|(c, new)| c == k && new != old));
    let mut out = Vec::new();
    if moved {
        out.push(delete_by_key(schema, name, change)?);
    }
    out.push(insert(schema, name, change, &conflict)?);
    Ok(out)
}

/// The statements that apply one staged change.
pub(super) fn change_statements(
    schema: &TableSchema,
    name: &str,
    change: &Change,
    file: &str,
) -> Result<Vec<Statement>> {
    match (change.op.as_str(), has_key(schema)) {
        ("T", _) => Ok(vec![(format!("truncate {name}"), Vec::new())]),
        ("D", true) => Ok(vec![delete_by_key(schema, name, change)?]),
        ("D", false) => {
            let row = if change.before.is_empty() {
                &change.key
            } else {
                &change.before
            };
            Ok(vec![delete_one(name, row)?])
        }
        ("I" | "U", true) => upsert(schema, name, change),
        ("I", false) => Ok(vec![insert(schema, name, change, "")?]),
        ("U", false) => {
            if change.before.is_empty() {
                return Err(Error::Source(format!(
                    "{name} has no primary key: applying its updates needs the old row, which JSON Lines staging carries (REPLICA IDENTITY FULL); CSV does not"
                )));
            }
            Ok(vec![
                delete_one(name, &change.before)?,
                insert(schema, name, change, "")?,
            ])
        }
        (other, _) => Err(Error::Staged(format!("{file}: unknown op {other:?}"))),
    }
}

pub(super) fn read_changes(
    m: &BatchManifest,
    file: &BatchFile,
    body: &[u8],
    schemas: &[(u64, StoredSchema)],
) -> Result<Vec<(usize, Change)>> {
    if m.format.encoding == Encoding::Jsonl {
        read_jsonl(file, body, schemas)
    } else {
        read_csv(m, file, body, schemas)
    }
}

fn read_jsonl(
    file: &BatchFile,
    body: &[u8],
    schemas: &[(u64, StoredSchema)],
) -> Result<Vec<(usize, Change)>> {
    let obj = |x: &serde_json::Value| -> Vec<(String, Option<String>)> {
        x.as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for (i, line) in body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let v: serde_json::Value = serde_json::from_slice(line)
            .map_err(|e| Error::Staged(format!("{}: malformed line: {e}", file.key)))?;
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
    Ok(out)
}

fn read_csv(
    m: &BatchManifest,
    file: &BatchFile,
    body: &[u8],
    schemas: &[(u64, StoredSchema)],
) -> Result<Vec<(usize, Change)>> {
    let mut rows = Vec::new();
    let mut split = CsvRows::new();
    split.feed(body, |r| {
        rows.push(r.to_vec());
        Ok(())
    })?;
    split.finish()?;
    let mut out = Vec::new();
    let mut fields = Vec::new();
    let offset = if m.commit_ts_column { 2 } else { 1 };
    let text = |f: &Option<Vec<u8>>| f.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
    for (i, row) in rows.iter().enumerate() {
        parse_csv_fields(row, &mut fields)?;
        let si = schema_index(schemas, i as u64);
        let cols = &schemas[si].1.schema.columns;
        if fields.len() != cols.len() + offset + 1 {
            return Err(Error::Staged(format!(
                "{} row {i}: {} fields for {} columns",
                file.key,
                fields.len(),
                cols.len()
            )));
        }
        let unchanged: Vec<usize> = text(&fields[cols.len() + offset])
            .unwrap_or_default()
            .split(';')
            .filter_map(|n| n.parse::<usize>().ok())
            .collect();
        let values = |keep: &dyn Fn(usize, &ColumnSchema) -> bool| {
            cols.iter()
                .enumerate()
                .filter(|(j, c)| keep(*j, c))
                .map(|(j, c)| (c.name.clone(), text(&fields[j + offset])))
                .collect()
        };
        let change = Change {
            op: text(&fields[0]).unwrap_or_default(),
            after: values(&|j, _| !unchanged.contains(&(j + 1))),
            key: values(&|_, c| c.key),
            before: Vec::new(),
        };
        out.push((si, change));
    }
    Ok(out)
}

pub(super) fn schema_index(schemas: &[(u64, StoredSchema)], row: u64) -> usize {
    schemas
        .iter()
        .rposition(|(first, _)| *first <= row)
        .unwrap_or(0)
}

pub(super) fn column<'a>(schema: &'a TableSchema, name: &str) -> Result<&'a ColumnSchema> {
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

/// The key columns, quoted, in table order.
pub(super) fn quoted_keys(schema: &TableSchema) -> Vec<String> {
    schema
        .columns
        .iter()
        .filter(|c| c.key)
        .map(|c| quote_ident(&c.name))
        .collect()
}

/// Whether the table has a primary key to upsert by. Without one, REPLICA IDENTITY FULL marks
/// every column as key, which is no key at all.
pub(super) fn has_key(schema: &TableSchema) -> bool {
    let keys = schema.columns.iter().filter(|c| c.key).count();
    keys > 0 && !(schema.replica_identity == "f" && keys == schema.columns.len())
}
