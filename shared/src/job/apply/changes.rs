//! Staged CDC rows read back (CSV or JSON Lines) and turned into the statements that apply
//! them to the target, pure (no I/O).

use std::borrow::Cow;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::source::quote_ident;
use crate::staging::decode::parse_csv_fields;
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

/// A column's name in a decoded change: shared with the schema's (a change costs no copy of
/// its names).
pub(super) type Name = Arc<str>;

/// Column values of a change, by name.
pub(super) type Values = Vec<(Name, Option<String>)>;

/// One staged CDC change, decoded for applying.
pub(super) struct Change {
    /// `I`, `U`, `D`, `T` (anything else is kept to be named in an error).
    pub(super) op: Cow<'static, str>,
    /// Key column values (old key for U and D).
    pub(super) key: Values,
    /// New row: present columns only (unchanged TOAST ones are absent).
    pub(super) after: Values,
    /// Old row under REPLICA IDENTITY FULL (JSON Lines only).
    pub(super) before: Values,
}

/// The op field's text, borrowed when it is one of the four.
fn op_of(text: &str) -> Cow<'static, str> {
    match text {
        "I" => Cow::Borrowed("I"),
        "U" => Cow::Borrowed("U"),
        "D" => Cow::Borrowed("D"),
        "T" => Cow::Borrowed("T"),
        other => Cow::Owned(other.to_owned()),
    }
}

pub(super) type Statement = (String, Vec<Option<String>>);

/// `DELETE` of exactly one row whose columns' text equals `row` (tables without a key:
/// duplicates are possible, and not every type has `=`).
pub(super) fn delete_one(name: &str, row: &[(Name, Option<String>)]) -> Result<Statement> {
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

/// A primary-key change whose new row left an unchanged TOAST value out (the server sends
/// the old key only, without REPLICA IDENTITY FULL): staged as D(old key) + I(new row without
/// that column), applied as one `UPDATE` that moves the row, so the value stays. The second
/// statement inserts the new row when the old one is not in the target.
pub(super) fn move_row(
    schema: &TableSchema,
    name: &str,
    delete: &Change,
    insert_row: &Change,
) -> Result<[Statement; 2]> {
    let n = insert_row.after.len();
    let set: Vec<String> = insert_row
        .after
        .iter()
        .enumerate()
        .map(|(i, (c, _))| Ok(format!("{} = {}", quote_ident(c), cast(schema, i, c)?)))
        .collect::<Result<_>>()?;
    let conds: Vec<String> = delete
        .key
        .iter()
        .enumerate()
        .map(|(i, (c, _))| Ok(format!("{} = {}", quote_ident(c), cast(schema, n + i, c)?)))
        .collect::<Result<_>>()?;
    let mut values: Vec<Option<String>> = insert_row.after.iter().map(|(_, v)| v.clone()).collect();
    values.extend(delete.key.iter().map(|(_, v)| v.clone()));
    Ok([
        (
            format!(
                "update {name} set {} where {}",
                set.join(", "),
                conds.join(" and ")
            ),
            values,
        ),
        insert(schema, name, insert_row, "")?,
    ])
}

/// Whether an insert leaves columns out: the new row of a key change with an unchanged TOAST
/// value (see [`move_row`]).
pub(super) fn is_partial_insert(schema: &TableSchema, change: &Change) -> bool {
    change.op == "I" && change.after.len() < schema.columns.len()
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
            "insert into {name} ({}) overriding system value values ({}){conflict}",
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
    // Key columns included: the source's spelling of an equal key value (`5.000`, `5`) wins
    // (not integer ones: never spelt two ways, and an identity column cannot be set).
    let updates: Vec<String> = change
        .after
        .iter()
        .filter(|(c, _)| {
            !schema
                .columns
                .iter()
                .any(|k| k.key && *k.name == **c && !k.spellings_differ())
        })
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
    match (change.op.as_ref(), has_key(schema)) {
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

/// A staged CDC file's changes, decoded one at a time as its bytes arrive (only the current
/// piece of the file is held), each with the index of the schema version its row uses.
pub(super) struct Changes<'a> {
    key: &'a str,
    buf: Vec<u8>,
    pos: usize,
    row: u64,
    jsonl: bool,
    offset: usize,
    schemas: &'a [(u64, StoredSchema)],
    fields: Vec<Option<Vec<u8>>>,
    /// Each schema version's column names, shared by its changes.
    names: Vec<Vec<Name>>,
    /// The file's first row is its header (AddColumnName), not a change.
    skip_header: bool,
}

impl<'a> Changes<'a> {
    pub(super) fn new(
        m: &BatchManifest,
        file: &'a BatchFile,
        schemas: &'a [(u64, StoredSchema)],
    ) -> Changes<'a> {
        Changes {
            key: &file.key,
            buf: Vec::new(),
            pos: 0,
            row: 0,
            jsonl: m.format.encoding == Encoding::Jsonl,
            // Parquet comes back as CSV without the commit time (it has its own column).
            offset: if m.commit_ts_column && m.format.encoding != Encoding::Parquet {
                2
            } else {
                1
            },
            schemas,
            fields: Vec::new(),
            names: schemas
                .iter()
                .map(|(_, s)| {
                    s.schema
                        .columns
                        .iter()
                        .map(|c| Name::from(c.name.as_str()))
                        .collect()
                })
                .collect(),
            skip_header: m.header && m.format.encoding == Encoding::Csv,
        }
    }

    /// The next bytes of the file.
    pub(super) fn feed(&mut self, data: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next change; `None` when the bytes fed so far hold no whole row (at the `end` of
    /// the file: when there is none left).
    pub(super) fn next_change(&mut self, end: bool) -> Option<Result<(usize, Change)>> {
        let line = loop {
            let rest = &self.buf[self.pos..];
            if rest.is_empty() {
                return None;
            }
            let len = if self.jsonl {
                memchr::memchr(b'\n', rest).map(|o| o + 1)
            } else {
                csv_row_end(rest)
            };
            let len = match len {
                Some(len) => len,
                None if !end => return None,
                // A last JSON line may lack its newline; a CSV row may not.
                None if self.jsonl => rest.len(),
                None => {
                    self.pos = self.buf.len();
                    return Some(Err(Error::Staged(format!(
                        "{}: the file ends inside a row",
                        self.key
                    ))));
                }
            };
            let (start, blank) = (self.pos, rest[0] == b'\n');
            self.pos += len;
            if std::mem::take(&mut self.skip_header) {
                continue;
            }
            if !(self.jsonl && blank) {
                break start..start + len;
            }
        };
        let line = &self.buf[line];
        let i = self.row;
        self.row += 1;
        let si = schema_index(self.schemas, i);
        Some(if self.jsonl {
            jsonl_change(self.key, line).map(|c| (si, c))
        } else {
            let (cols, offset) = (&self.schemas[si].1.schema.columns, self.offset);
            let names = &self.names[si];
            csv_change(self.key, i, line, (cols, names), offset, &mut self.fields).map(|c| (si, c))
        })
    }
}

/// The length of the first CSV row of `rest` (with its newline; a newline inside quotes is
/// data), or `None` when it does not end.
fn csv_row_end(rest: &[u8]) -> Option<usize> {
    let mut in_quotes = false;
    let mut pos = 0;
    while let Some(off) = memchr::memchr2(b'"', b'\n', &rest[pos..]) {
        let at = pos + off;
        pos = at + 1;
        if rest[at] == b'"' {
            in_quotes = !in_quotes;
        } else if !in_quotes {
            return Some(pos);
        }
    }
    None
}

fn jsonl_change(key: &str, line: &[u8]) -> Result<Change> {
    let obj = |x: &serde_json::Value| -> Values {
        x.as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (Name::from(k.as_str()), v.as_str().map(str::to_owned)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let v: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| Error::Staged(format!("{key}: malformed line: {e}")))?;
    Ok(Change {
        op: op_of(v["op"].as_str().unwrap_or("")),
        key: obj(&v["key"]),
        after: obj(&v["after"]),
        before: obj(&v["before"]),
    })
}

/// A field's bytes as text (its buffer kept when it is UTF-8, as staged text always is).
fn into_text(field: Vec<u8>) -> String {
    String::from_utf8(field).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn csv_change(
    key: &str,
    i: u64,
    row: &[u8],
    (cols, names): (&[ColumnSchema], &[Name]),
    offset: usize,
    fields: &mut Vec<Option<Vec<u8>>>,
) -> Result<Change> {
    parse_csv_fields(row, fields)?;
    if fields.len() != cols.len() + offset + 1 {
        return Err(Error::Staged(format!(
            "{key} row {i}: {} fields for {} columns",
            fields.len(),
            cols.len()
        )));
    }
    // The unchanged-TOAST field: 1-based column numbers, `;`-separated.
    let unchanged: Vec<usize> = fields[cols.len() + offset]
        .as_deref()
        .map(|f| {
            f.split(|b| *b == b';')
                .filter_map(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok())
                .collect()
        })
        .unwrap_or_default();
    let op = op_of(
        fields[0]
            .as_deref()
            .map_or("", |f| std::str::from_utf8(f).unwrap_or("")),
    );
    // The key's values are copies; the row's take the fields' buffers.
    let key_values: Values = cols
        .iter()
        .zip(names)
        .enumerate()
        .filter(|(_, (c, _))| c.key)
        .map(|(j, (_, n))| {
            let v = fields[j + offset]
                .as_deref()
                .map(|f| String::from_utf8_lossy(f).into_owned());
            (n.clone(), v)
        })
        .collect();
    let after: Values = names
        .iter()
        .enumerate()
        .filter(|(j, _)| !unchanged.contains(&(j + 1)))
        .map(|(j, n)| (n.clone(), fields[j + offset].take().map(into_text)))
        .collect();
    Ok(Change {
        op,
        after,
        key: key_values,
        before: Vec::new(),
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::staging::encode::Format;
    use crate::table::ColumnSchema;

    fn schema() -> StoredSchema {
        let col = |name: &str, key| ColumnSchema {
            name: name.to_owned(),
            type_name: "text".to_owned(),
            type_oid: 25,
            type_modifier: -1,
            key,
        };
        StoredSchema {
            lsn: Lsn(1),
            schema: TableSchema {
                schema: "public".to_owned(),
                table: "t".to_owned(),
                columns: vec![col("id", true), col("body", false)],
                replica_identity: "d".to_owned(),
            },
            ddl: None,
            csv_cdc_layout: Vec::new(),
        }
    }

    fn manifest(format: &str) -> (BatchManifest, BatchFile) {
        let file = BatchFile {
            key: "public/t/cdc/x".to_owned(),
            schema: "public".to_owned(),
            table: "t".to_owned(),
            rows: 3,
            bytes: 0,
            inserts: 2,
            updates: 1,
            deletes: 0,
            truncates: 0,
            schema_versions: Vec::new(),
            checksum: None,
            xids: Vec::new(),
        };
        let m = BatchManifest {
            task: "t".to_owned(),
            batch_seq: 0,
            start_lsn: Lsn(1),
            end_lsn: Lsn(2),
            first_commit_lsn: Lsn(1),
            last_commit_lsn: Lsn(2),
            last_commit_ts: String::new(),
            transaction_file: None,
            transactions: 1,
            changes: 3,
            format: Format::parse(format, "format").unwrap(),
            commit_ts_column: false,
            files: vec![file.clone()],
            prev_end_lsn: None,
            after_load: false,
            cdc_ops: Default::default(),
            op_field: true,
            header: false,
            csv: Default::default(),
            transformed: false,
        };
        (m, file)
    }

    type Seen = Vec<(
        String,
        Vec<(String, Option<String>)>,
        Vec<(String, Option<String>)>,
    )>;

    /// Decodes `body` fed in pieces of `piece` bytes.
    fn decode(format: &str, body: &[u8], piece: usize) -> Result<Seen> {
        let (m, file) = manifest(format);
        let schemas = [(0, schema())];
        let mut changes = Changes::new(&m, &file, &schemas);
        let mut pieces = body.chunks(piece);
        let mut out = Vec::new();
        let mut end = false;
        loop {
            match changes.next_change(end) {
                Some(c) => {
                    let (_, c) = c?;
                    let owned = |v: Values| -> Vec<(String, Option<String>)> {
                        v.into_iter().map(|(n, v)| (n.to_string(), v)).collect()
                    };
                    out.push((c.op.into_owned(), owned(c.key), owned(c.after)));
                }
                None if end => return Ok(out),
                None => match pieces.next() {
                    Some(p) => changes.feed(p),
                    None => end = true,
                },
            }
        }
    }

    #[test]
    fn changes_decode_alike_however_the_file_is_cut_into_pieces() {
        let csv = b"I,1,\"two\nlines, \"\"quoted\"\"\",\nU,1,,2\nI,2,,\n";
        let whole = decode("csv", csv, csv.len()).unwrap();
        assert_eq!(whole.len(), 3);
        assert_eq!(
            whole[0].2[1].1.as_deref(),
            Some("two\nlines, \"quoted\""),
            "a quoted newline is data"
        );
        assert_eq!(whole[1].2.len(), 1, "the unchanged body is left out");
        assert_eq!(whole[2].2[1].1, None, "NULL");
        for piece in [1, 2, 7] {
            assert_eq!(
                decode("csv", csv, piece).unwrap(),
                whole,
                "pieces of {piece}"
            );
        }
        // A CSV file cut inside a row is an error, not a shorter file.
        let err = decode("csv", &csv[..csv.len() - 3], 5).unwrap_err();
        assert!(err.to_string().contains("ends inside a row"), "{err}");

        // JSON Lines: blank lines skipped, a last line without its newline read.
        let jsonl = b"{\"op\":\"I\",\"after\":{\"id\":\"1\",\"body\":\"a\\nb\"}}\n\n{\"op\":\"D\",\"key\":{\"id\":\"1\"}}";
        let whole = decode("jsonl", jsonl, jsonl.len()).unwrap();
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[1].0, "D");
        for piece in [1, 3, 10] {
            assert_eq!(
                decode("jsonl", jsonl, piece).unwrap(),
                whole,
                "pieces of {piece}"
            );
        }
    }
}
