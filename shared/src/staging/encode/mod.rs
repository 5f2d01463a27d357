//! Staged file formats (DESIGN §5): DMS-compatible CSV and JSON Lines, optionally gzip, written
//! row by row into an [`ObjectWriter`] with bounded buffers.
//!
//! CSV: no header; a CDC row is `Op` (`I`/`U`/`D`/`T`), the commit timestamp when asked
//! (`YYYY-MM-DD HH:MM:SS.ffffff`, UTC), the table's columns in order, then one more field: the
//! 1-based ordinals of columns whose unchanged TOAST value is not in the row, joined by `;`
//! (empty for almost every row). That last field is pgshift's addition: DMS writes a
//! placeholder as data there, which a consumer cannot tell from a real value. Values are
//! PostgreSQL's text output; NULL is an empty unquoted field, an empty string is `""`.
//!
//! JSON Lines: one object per change with `op`, `schema`, `table`, `lsn`, `commit_lsn`, `xid`,
//! `commit_ts` (RFC 3339), `key`, `before`, `after`, `unchanged`; every value is the text output
//! as a JSON string, or null.

use std::io::Write as _;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};

use crate::change::{Op, RowChange, format_pg_timestamp};
use crate::error::{Error, Result};
use crate::pgoutput::Value;
use crate::staging::ObjectWriter;
use crate::staging::dialect::{CsvDialect, Direction, Transcoder};

pub mod parquet;
pub mod parquet_read;

/// Row encoding of staged files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Csv,
    Jsonl,
    /// Typed columns (full load and CDC; no gzip: Snappy inside).
    Parquet,
}

/// A staged file format: encoding plus optional gzip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Format {
    pub encoding: Encoding,
    pub gzip: bool,
    /// Parquet timestamps in milliseconds (DMS's `ParquetTimestampInMillisecond`), truncated:
    /// a stage a reader needing that unit can read, and `apply` cannot (it lost precision).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timestamp_ms: bool,
}

impl Default for Format {
    fn default() -> Self {
        Format {
            encoding: Encoding::Csv,
            gzip: false,
            timestamp_ms: false,
        }
    }
}

impl Format {
    /// Parses `csv`, `csv.gz`, `jsonl`, `jsonl.gz` or `parquet`.
    pub fn parse(s: &str, field: &str) -> Result<Format> {
        let (enc, gzip) = match s.strip_suffix(".gz") {
            Some(e) => (e, true),
            None => (s, false),
        };
        let encoding = match enc {
            "csv" => Encoding::Csv,
            "jsonl" => Encoding::Jsonl,
            "parquet" if !gzip => Encoding::Parquet,
            "parquet" => {
                return Err(Error::config(
                    field,
                    "parquet is compressed inside (snappy): use parquet, not parquet.gz",
                ));
            }
            other => {
                return Err(Error::config(
                    field,
                    format!("{other:?} is not one of csv, csv.gz, jsonl, jsonl.gz, parquet"),
                ));
            }
        };
        Ok(Format {
            encoding,
            gzip,
            timestamp_ms: false,
        })
    }

    /// The file extension (`csv`, `jsonl.gz`, ...).
    pub fn ext(self) -> &'static str {
        match (self.encoding, self.gzip) {
            (Encoding::Csv, false) => "csv",
            (Encoding::Csv, true) => "csv.gz",
            (Encoding::Jsonl, false) => "jsonl",
            (Encoding::Jsonl, true) => "jsonl.gz",
            (Encoding::Parquet, _) => "parquet",
        }
    }
}

/// Appends one CSV field (quoted when needed; NULL is empty and unquoted): PostgreSQL's CSV,
/// the default dialect of [`crate::staging::dialect::put_field`].
pub fn csv_field(out: &mut Vec<u8>, value: Option<&[u8]>) {
    crate::staging::dialect::put_field(out, value, b',', b"");
}

fn value_bytes<'v>(v: &Value<'v>) -> Option<&'v [u8]> {
    match v {
        Value::Text(t) | Value::Binary(t) => Some(t),
        Value::Null | Value::UnchangedToast => None,
    }
}

/// A CSV header row (DMS's `AddColumnName`): the names, quoted when needed, and a newline.
pub fn csv_header(names: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        csv_field(&mut out, Some(name.as_bytes()));
    }
    out.push(b'\n');
    out
}

/// One row of a transaction file (DMS's `PreserveTransactions`): `Op` (when CDC rows carry
/// it), the table's and its schema's staged names, then the row's fields as in its table's
/// CDC file (the commit time with `TimestampColumnName`, the columns, the unchanged-TOAST
/// ordinals).
pub fn transaction_csv_row(
    change: &RowChange<'_>,
    op_field: bool,
    commit_ts_column: bool,
    out: &mut Vec<u8>,
) {
    if op_field {
        out.extend_from_slice(change.op.as_str().as_bytes());
        out.push(b',');
    }
    csv_field(out, Some(change.table.table.as_bytes()));
    out.push(b',');
    csv_field(out, Some(change.table.schema.as_bytes()));
    out.push(b',');
    cdc_csv_row(change, false, commit_ts_column, out);
}

/// Encodes one CDC change as a CSV row (with its newline); without its `Op` field when
/// `op_field` is false (a filtered stage, as DMS writes it).
pub fn cdc_csv_row(
    change: &RowChange<'_>,
    op_field: bool,
    commit_ts_column: bool,
    out: &mut Vec<u8>,
) {
    if op_field {
        out.extend_from_slice(change.op.as_str().as_bytes());
    }
    if commit_ts_column {
        if op_field {
            out.push(b',');
        }
        out.extend_from_slice(format_pg_timestamp(change.commit_ts, ' ').as_bytes());
    }
    let mut first = !op_field && !commit_ts_column;
    let row = match change.op {
        Op::Insert | Op::Update => change.new,
        Op::Delete => change.old,
        Op::Truncate => None,
    };
    for i in 0..change.table.columns.len() {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        csv_field(out, row.and_then(|r| r.get(i)).and_then(value_bytes));
    }
    if !first {
        out.push(b',');
    }
    let mut first = true;
    for i in change.unchanged() {
        if !first {
            out.push(b';');
        }
        first = false;
        out.extend_from_slice((i + 1).to_string().as_bytes());
    }
    out.push(b'\n');
}

fn json_str(out: &mut Vec<u8>, bytes: &[u8], what: &dyn Fn() -> String) -> Result<()> {
    let s = std::str::from_utf8(bytes).map_err(|_| {
        Error::Source(format!(
            "{} is not valid UTF-8: pgshift stages UTF8 databases",
            what()
        ))
    })?;
    serde_json::to_writer(&mut *out, s).map_err(|e| Error::Source(e.to_string()))
}

fn json_row(
    out: &mut Vec<u8>,
    change: &RowChange<'_>,
    row: &[Value<'_>],
    only: Option<&[usize]>,
) -> Result<()> {
    out.push(b'{');
    let mut first = true;
    let cols = &change.table.columns;
    let indexes: Vec<usize> = match only {
        Some(ix) => ix.to_vec(),
        None => (0..cols.len()).collect(),
    };
    for i in indexes {
        let Some(col) = cols.get(i) else { continue };
        let v = row.get(i).copied().unwrap_or(Value::Null);
        if matches!(v, Value::UnchangedToast) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        serde_json::to_writer(&mut *out, &col.name).map_err(|e| Error::Source(e.to_string()))?;
        out.push(b':');
        match value_bytes(&v) {
            None => out.extend_from_slice(b"null"),
            Some(b) => json_str(out, b, &|| {
                format!(
                    "{}.{}.{}",
                    change.table.schema, change.table.table, col.name
                )
            })?,
        }
    }
    out.push(b'}');
    Ok(())
}

/// Encodes one CDC change as a JSON line (with its newline).
pub fn cdc_json_row(change: &RowChange<'_>, out: &mut Vec<u8>) -> Result<()> {
    let t = change.table;
    // Fields in DESIGN order: op, schema, table, lsn, commit_lsn, xid, commit_ts, key, ...
    let json_err = |e: serde_json::Error| Error::Source(e.to_string());
    out.extend_from_slice(b"{\"op\":\"");
    out.extend_from_slice(change.op.as_str().as_bytes());
    out.extend_from_slice(b"\",\"schema\":");
    serde_json::to_writer(&mut *out, &t.schema).map_err(json_err)?;
    out.extend_from_slice(b",\"table\":");
    serde_json::to_writer(&mut *out, &t.table).map_err(json_err)?;
    out.extend_from_slice(
        format!(
            ",\"lsn\":\"{}\",\"commit_lsn\":\"{}\",\"xid\":{},\"commit_ts\":\"{}Z\"",
            change.lsn,
            change.commit_lsn,
            change.xid,
            format_pg_timestamp(change.commit_ts, 'T')
        )
        .as_bytes(),
    );
    out.extend_from_slice(b",\"key\":");
    let key_ix: Vec<usize> = t.key_indexes().collect();
    match (change.op, change.old.or(change.new)) {
        (Op::Update | Op::Delete, Some(row)) if !key_ix.is_empty() => {
            let source = change.old.unwrap_or(row);
            json_row(out, change, source, Some(&key_ix))?;
        }
        _ => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"before\":");
    match (change.old_is_full, change.old) {
        (true, Some(old)) => json_row(out, change, old, None)?,
        _ => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"after\":");
    match (change.op, change.new) {
        (Op::Insert | Op::Update, Some(new)) => json_row(out, change, new, None)?,
        _ => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"unchanged\":[");
    let mut first = true;
    for i in change.unchanged() {
        if !first {
            out.push(b',');
        }
        first = false;
        serde_json::to_writer(&mut *out, &t.columns[i].name)
            .map_err(|e| Error::Source(e.to_string()))?;
    }
    out.extend_from_slice(b"]}\n");
    Ok(())
}

/// Compressed bytes buffered before they are handed to the object writer.
const FLUSH_BYTES: usize = 256 << 10;

/// An object being written row by row, gzip-compressed when the format says so.
pub struct EncodedWriter<W: ObjectWriter> {
    inner: W,
    gz: Option<GzEncoder<Vec<u8>>>,
    /// xxh3-64 of the bytes stored (what a reader verifies).
    hash: xxhash_rust::xxh3::Xxh3,
    /// Uncompressed bytes written.
    pub raw_bytes: u64,
    pub rows: u64,
    /// Rows rewritten into a CSV dialect (DMS's CsvDelimiter / CsvNullValue /
    /// CsvRowDelimiter) on their way in, and the buffer they are rewritten into.
    dialect: Option<(Transcoder, Vec<u8>)>,
}

impl<W: ObjectWriter> EncodedWriter<W> {
    pub fn new(inner: W, format: Format) -> EncodedWriter<W> {
        EncodedWriter {
            inner,
            gz: format
                .gzip
                .then(|| GzEncoder::new(Vec::with_capacity(FLUSH_BYTES), Compression::fast())),
            hash: xxhash_rust::xxh3::Xxh3::new(),
            raw_bytes: 0,
            rows: 0,
            dialect: None,
        }
    }

    /// CSV rows written in `dialect` (PostgreSQL's CSV, the default, as they come).
    pub fn with_dialect(mut self, dialect: &CsvDialect) -> EncodedWriter<W> {
        self.dialect = (!dialect.is_default()).then(|| {
            (
                Transcoder::new(dialect.clone(), Direction::ToDialect),
                Vec::new(),
            )
        });
        self
    }

    /// Appends one encoded row.
    pub async fn write_row(&mut self, row: &[u8]) -> Result<()> {
        self.write_rows(row, 1).await
    }

    /// Appends `rows` complete encoded rows.
    pub async fn write_rows(&mut self, row: &[u8], rows: u64) -> Result<()> {
        let Some((t, buf)) = self.dialect.as_mut() else {
            return self.write_encoded(row, rows).await;
        };
        let mut out = std::mem::take(buf);
        out.clear();
        t.feed(row, &mut out)?;
        let written = self.write_encoded(&out, rows).await;
        if let Some((_, buf)) = self.dialect.as_mut() {
            *buf = out;
        }
        written
    }

    async fn write_encoded(&mut self, row: &[u8], rows: u64) -> Result<()> {
        self.raw_bytes += row.len() as u64;
        self.rows += rows;
        // Uncompressed rows go straight to the writer, which buffers its own part / block.
        let Some(gz) = &mut self.gz else {
            self.hash.update(row);
            return self.inner.write(row).await;
        };
        gz.write_all(row).map_err(|e| Error::io("compressing", e))?;
        if gz.get_ref().len() >= FLUSH_BYTES {
            let data = std::mem::take(gz.get_mut());
            self.hash.update(&data);
            self.inner.write(&data).await?;
        }
        Ok(())
    }

    /// Completes the object; returns the stored (possibly compressed) size.
    pub async fn finish(self) -> Result<u64> {
        Ok(self.finish_hashed().await?.0)
    }

    /// Completes the object; returns the stored size and the xxh3-64 (16 hex digits) of the
    /// stored bytes.
    pub async fn finish_hashed(mut self) -> Result<(u64, String)> {
        if let Some((t, _)) = &self.dialect {
            t.finish()?;
        }
        if let Some(gz) = self.gz.take() {
            let rest = gz.finish().map_err(|e| Error::io("compressing", e))?;
            if !rest.is_empty() {
                self.hash.update(&rest);
                self.inner.write(&rest).await?;
            }
        }
        let hash = format!("{:016x}", self.hash.digest());
        Ok((self.inner.finish().await?, hash))
    }

    pub async fn abort(self) {
        self.inner.abort().await;
    }
}

/// A full-load row as a JSON line: `{"op":"I","schema":..,"table":..,"after":{..}}`.
pub fn load_json_row(
    schema: &str,
    table: &str,
    columns: &[String],
    fields: &[Option<Vec<u8>>],
    out: &mut Vec<u8>,
) -> Result<()> {
    let json_err = |e: serde_json::Error| Error::Source(e.to_string());
    out.extend_from_slice(b"{\"op\":\"I\",\"schema\":");
    serde_json::to_writer(&mut *out, schema).map_err(json_err)?;
    out.extend_from_slice(b",\"table\":");
    serde_json::to_writer(&mut *out, table).map_err(json_err)?;
    out.extend_from_slice(b",\"after\":{");
    if fields.len() != columns.len() {
        return Err(Error::Source(format!(
            "{schema}.{table}: COPY row has {} fields for {} columns",
            fields.len(),
            columns.len()
        )));
    }
    for (i, (col, v)) in columns.iter().zip(fields).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, col).map_err(json_err)?;
        out.push(b':');
        match v {
            None => out.extend_from_slice(b"null"),
            Some(b) => json_str(out, b, &|| format!("{schema}.{table}.{col}"))?,
        }
    }
    out.extend_from_slice(b"}}\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::table::{ColumnSchema, TableSchema};

    fn table() -> TableSchema {
        let col = |name: &str, key: bool| ColumnSchema {
            name: name.to_owned(),
            type_name: "text".to_owned(),
            type_oid: 25,
            type_modifier: -1,
            key,
        };
        TableSchema {
            schema: "public".to_owned(),
            table: "t".to_owned(),
            columns: vec![col("id", true), col("a", false), col("big", false)],
            replica_identity: "d".to_owned(),
        }
    }

    #[test]
    fn csv_quotes_only_when_needed() {
        let mut out = Vec::new();
        for v in [
            Some(&b"plain"[..]),
            None,
            Some(b""),
            Some(b"a,b"),
            Some(b"say \"hi\""),
            Some(b" pad"),
        ] {
            csv_field(&mut out, v);
            out.push(b'|');
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "plain||\"\"|\"a,b\"|\"say \"\"hi\"\"\"|\" pad\"|"
        );
    }

    #[test]
    fn csv_marks_unchanged_toast_instead_of_a_placeholder() {
        let t = table();
        let new = [Value::Text(b"1"), Value::Null, Value::UnchangedToast];
        let change = RowChange {
            op: Op::Update,
            table: &t,
            lsn: Lsn(1),
            commit_lsn: Lsn(2),
            xid: 7,
            commit_ts: 0,
            old: None,
            old_is_full: false,
            new: Some(&new),
        };
        let mut out = Vec::new();
        cdc_csv_row(&change, true, true, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "U,2000-01-01 00:00:00.000000,1,,,3\n"
        );

        let mut out = Vec::new();
        cdc_json_row(&change, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["after"], serde_json::json!({"id": "1", "a": null}));
        assert_eq!(v["unchanged"], serde_json::json!(["big"]));
        assert_eq!(v["key"], serde_json::json!({"id": "1"}));
        assert_eq!(v["before"], serde_json::Value::Null);
        assert_eq!(v["commit_ts"], "2000-01-01T00:00:00.000000Z");
        assert_eq!(v["lsn"], "0/1");
    }

    #[test]
    fn json_rejects_invalid_utf8_with_the_column_named() {
        let t = table();
        let new = [Value::Text(b"1"), Value::Text(&[0xff, 0xfe]), Value::Null];
        let change = RowChange {
            op: Op::Insert,
            table: &t,
            lsn: Lsn(1),
            commit_lsn: Lsn(2),
            xid: 7,
            commit_ts: 0,
            old: None,
            old_is_full: false,
            new: Some(&new),
        };
        let err = cdc_json_row(&change, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("public.t.a"), "{err}");
    }

    #[test]
    fn formats_parse() {
        assert_eq!(
            Format::parse("jsonl.gz", "--format").unwrap().ext(),
            "jsonl.gz"
        );
        assert!(
            Format::parse("xml", "--format")
                .unwrap_err()
                .to_string()
                .contains("--format")
        );
    }
}
