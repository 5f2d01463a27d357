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
use crate::stage::ObjectWriter;

pub mod parquet;

/// Row encoding of staged files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Csv,
    Jsonl,
    /// Full load only.
    Parquet,
}

/// A staged file format: encoding plus optional gzip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Format {
    pub encoding: Encoding,
    pub gzip: bool,
}

impl Default for Format {
    fn default() -> Self {
        Format {
            encoding: Encoding::Csv,
            gzip: false,
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
        Ok(Format { encoding, gzip })
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

/// Appends one CSV field (quoted when needed; NULL is empty and unquoted).
pub fn csv_field(out: &mut Vec<u8>, value: Option<&[u8]>) {
    let Some(v) = value else { return };
    let needs_quotes = v.is_empty()
        || v.iter().any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r'))
        || v.first().is_some_and(|b| b.is_ascii_whitespace())
        || v.last().is_some_and(|b| b.is_ascii_whitespace());
    if !needs_quotes {
        out.extend_from_slice(v);
        return;
    }
    out.push(b'"');
    for &b in v {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
}

fn value_bytes<'v>(v: &Value<'v>) -> Option<&'v [u8]> {
    match v {
        Value::Text(t) | Value::Binary(t) => Some(t),
        Value::Null | Value::UnchangedToast => None,
    }
}

/// Encodes one CDC change as a CSV row (with its newline).
pub fn cdc_csv_row(change: &RowChange<'_>, commit_ts_column: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(change.op.as_str().as_bytes());
    if commit_ts_column {
        out.push(b',');
        out.extend_from_slice(format_pg_timestamp(change.commit_ts, ' ').as_bytes());
    }
    let row = match change.op {
        Op::Insert | Op::Update => change.new,
        Op::Delete => change.old,
        Op::Truncate => None,
    };
    for i in 0..change.table.columns.len() {
        out.push(b',');
        csv_field(out, row.and_then(|r| r.get(i)).and_then(value_bytes));
    }
    out.push(b',');
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
    /// Uncompressed bytes written.
    pub raw_bytes: u64,
    pub rows: u64,
}

impl<W: ObjectWriter> EncodedWriter<W> {
    pub fn new(inner: W, format: Format) -> EncodedWriter<W> {
        EncodedWriter {
            inner,
            gz: format
                .gzip
                .then(|| GzEncoder::new(Vec::with_capacity(FLUSH_BYTES), Compression::fast())),
            raw_bytes: 0,
            rows: 0,
        }
    }

    /// Appends one encoded row.
    pub async fn write_row(&mut self, row: &[u8]) -> Result<()> {
        self.write_rows(row, 1).await
    }

    /// Appends `rows` complete encoded rows.
    pub async fn write_rows(&mut self, row: &[u8], rows: u64) -> Result<()> {
        self.raw_bytes += row.len() as u64;
        self.rows += rows;
        // Uncompressed rows go straight to the writer, which buffers its own part / block.
        let Some(gz) = &mut self.gz else {
            return self.inner.write(row).await;
        };
        gz.write_all(row).map_err(|e| Error::io("compressing", e))?;
        if gz.get_ref().len() >= FLUSH_BYTES {
            let data = std::mem::take(gz.get_mut());
            self.inner.write(&data).await?;
        }
        Ok(())
    }

    /// Completes the object; returns the stored (possibly compressed) size.
    pub async fn finish(mut self) -> Result<u64> {
        if let Some(gz) = self.gz.take() {
            let rest = gz.finish().map_err(|e| Error::io("compressing", e))?;
            if !rest.is_empty() {
                self.inner.write(&rest).await?;
            }
        }
        self.inner.finish().await
    }

    pub async fn abort(self) {
        self.inner.abort().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{ColumnSchema, TableSchema};
    use crate::lsn::Lsn;

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
        cdc_csv_row(&change, true, &mut out);
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

/// Splits PostgreSQL `COPY .. (format csv)` output into rows: a newline ends a row unless it
/// is inside quotes. Rows may span the chunks the stream arrives in.
#[derive(Debug, Default)]
pub struct CsvRows {
    in_quotes: bool,
    partial: Vec<u8>,
}

impl CsvRows {
    pub fn new() -> CsvRows {
        CsvRows::default()
    }

    /// Feeds the next piece of the stream; `row` gets each complete row (with its newline).
    pub fn feed(&mut self, chunk: &[u8], mut row: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let mut start = 0;
        let mut pos = 0;
        while let Some(off) = memchr::memchr2(b'"', b'\n', &chunk[pos..]) {
            let at = pos + off;
            pos = at + 1;
            if chunk[at] == b'"' {
                self.in_quotes = !self.in_quotes;
                continue;
            }
            if self.in_quotes {
                continue;
            }
            if self.partial.is_empty() {
                row(&chunk[start..pos])?;
            } else {
                self.partial.extend_from_slice(&chunk[start..pos]);
                let whole = std::mem::take(&mut self.partial);
                row(&whole)?;
            }
            start = pos;
        }
        self.partial.extend_from_slice(&chunk[start..]);
        Ok(())
    }

    /// Checks the stream ended on a row boundary.
    pub fn finish(&self) -> Result<()> {
        if self.partial.is_empty() && !self.in_quotes {
            Ok(())
        } else {
            Err(Error::Source(format!(
                "COPY output ended inside a row ({} bytes pending)",
                self.partial.len()
            )))
        }
    }
}

/// Turns PostgreSQL `COPY .. TO STDOUT` text-format output into exactly the bytes
/// `COPY .. TO STDOUT (format csv)` gives for the same rows.
///
/// The full load asks the server for text and converts here: the server's CSV writer costs
/// it ~15–25% more CPU than its text writer, and the server is the bottleneck of a chunk
/// export, while this pass is a memchr scan that copies clean fields through.
///
/// Text format: fields split by tab, rows end at a newline, `\N` is NULL, and a value's
/// backslash, tab, newline, carriage return, backspace, form feed and vertical tab are
/// escaped with a backslash (COPY TO writes no other escapes; any other is an error). CSV
/// (PostgreSQL's rules, default options): NULL is nothing, a value is quoted when it is empty,
/// contains `,` `"` CR or LF, or is `\.` alone in a one-column row; inside quotes `"` doubles.
#[derive(Debug)]
pub struct TextToCsv {
    columns: usize,
    partial: Vec<u8>,
    value: Vec<u8>,
}

impl TextToCsv {
    pub fn new(columns: usize) -> TextToCsv {
        TextToCsv {
            columns,
            partial: Vec::new(),
            value: Vec::new(),
        }
    }

    /// Feeds the next piece of the stream: appends each complete row's CSV (with its newline)
    /// to `out` and passes it to `row`. Rows may span pieces.
    pub fn feed(
        &mut self,
        piece: &[u8],
        out: &mut Vec<u8>,
        mut row: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', piece) {
            let at = out.len();
            if self.partial.is_empty() {
                self.convert_row(&piece[start..end], out)?;
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(&piece[start..end]);
                let converted = self.convert_row(&whole, out);
                whole.clear();
                self.partial = whole;
                converted?;
            }
            out.push(b'\n');
            row(&out[at..])?;
            start = end + 1;
        }
        self.partial.extend_from_slice(&piece[start..]);
        Ok(())
    }

    /// Checks the stream ended on a row boundary.
    pub fn finish(&self) -> Result<()> {
        if self.partial.is_empty() {
            Ok(())
        } else {
            Err(Error::Source(format!(
                "COPY output ended inside a row ({} bytes pending)",
                self.partial.len()
            )))
        }
    }

    fn convert_row(&mut self, text: &[u8], out: &mut Vec<u8>) -> Result<()> {
        // Most rows have no escape, comma or quote anywhere: their fields go through as they
        // are (an empty one still needs its quotes).
        if self.columns == 0 && text.is_empty() {
            return Ok(()); // `select from t`: an empty line per row in both formats
        }
        let clean = memchr::memchr3(b'\\', b',', b'"', text).is_none()
            && memchr::memchr(b'\r', text).is_none();
        let mut fields = 0usize;
        let mut start = 0;
        let ends = memchr::memchr_iter(b'\t', text).chain(std::iter::once(text.len()));
        for end in ends {
            if fields > 0 {
                out.push(b',');
            }
            fields += 1;
            let field = &text[start..end];
            if !clean {
                self.convert_field(field, out)?;
            } else if field.is_empty() {
                out.extend_from_slice(b"\"\"");
            } else {
                out.extend_from_slice(field);
            }
            start = end + 1;
        }
        if fields != self.columns {
            return Err(Error::Source(format!(
                "COPY text row has {fields} fields, expected {}",
                self.columns
            )));
        }
        Ok(())
    }

    fn convert_field(&mut self, field: &[u8], out: &mut Vec<u8>) -> Result<()> {
        if field == b"\\N" {
            return Ok(()); // NULL
        }
        let value: &[u8] = if memchr::memchr(b'\\', field).is_some() {
            unescape_text(field, &mut self.value)?;
            &self.value
        } else {
            field
        };
        let quote = value.is_empty()
            || memchr::memchr3(b',', b'"', b'\n', value).is_some()
            || memchr::memchr(b'\r', value).is_some()
            || (self.columns == 1 && value == b"\\.");
        if !quote {
            out.extend_from_slice(value);
            return Ok(());
        }
        out.push(b'"');
        let mut from = 0;
        for q in memchr::memchr_iter(b'"', value) {
            out.extend_from_slice(&value[from..=q]);
            out.push(b'"');
            from = q + 1;
        }
        out.extend_from_slice(&value[from..]);
        out.push(b'"');
        Ok(())
    }
}

/// Undoes COPY text escaping of one field into `out`.
fn unescape_text(field: &[u8], out: &mut Vec<u8>) -> Result<()> {
    out.clear();
    let mut from = 0;
    for at in memchr::memchr_iter(b'\\', field) {
        if at < from {
            continue; // the escaped character of the previous escape was a backslash
        }
        out.extend_from_slice(&field[from..at]);
        let c = match field.get(at + 1) {
            Some(b'\\') => b'\\',
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            Some(b'b') => 0x08,
            Some(b'f') => 0x0c,
            Some(b'v') => 0x0b,
            Some(other) => {
                return Err(Error::Source(format!(
                    "COPY text output has an unexpected escape \\{}",
                    char::from(*other).escape_default()
                )));
            }
            None => {
                return Err(Error::Source(
                    "COPY text output has a field ending in a lone backslash".to_owned(),
                ));
            }
        };
        out.push(c);
        from = at + 2;
    }
    out.extend_from_slice(&field[from..]);
    Ok(())
}

/// The order-independent checksum of a set of rows: the wrapping sum of each row's xxh3-64
/// (the row's CSV text without its newline). The same rows in any order give the same sum.
/// Serialized as 16 hex digits (JSON numbers above 2^53 lose precision in many readers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowChecksum(pub u64);

impl Serialize for RowChecksum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for RowChecksum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        u64::from_str_radix(&s, 16)
            .map(RowChecksum)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a 16-digit hex checksum")))
    }
}

impl RowChecksum {
    pub fn add_row(&mut self, row_with_newline: &[u8]) {
        let row = row_with_newline
            .strip_suffix(b"\n")
            .unwrap_or(row_with_newline);
        self.0 = self.0.wrapping_add(xxhash_rust::xxh3::xxh3_64(row));
    }

    pub fn combine(self, other: RowChecksum) -> RowChecksum {
        RowChecksum(self.0.wrapping_add(other.0))
    }

    /// 16 hex digits, as manifests show it.
    pub fn hex(self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Parses one CSV row (without or with its newline) into fields: an unquoted empty field is
/// NULL, a quoted one a (possibly empty) string with `""` unescaped.
pub fn parse_csv_fields(row: &[u8], out: &mut Vec<Option<Vec<u8>>>) -> Result<()> {
    out.clear();
    let row = row.strip_suffix(b"\n").unwrap_or(row);
    let mut i = 0;
    loop {
        if row.get(i) == Some(&b'"') {
            let mut value = Vec::new();
            i += 1;
            loop {
                match row.get(i) {
                    None => return Err(Error::Source("unterminated quoted CSV field".to_owned())),
                    Some(b'"') if row.get(i + 1) == Some(&b'"') => {
                        value.push(b'"');
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(&b) => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
            out.push(Some(value));
        } else {
            let end = memchr::memchr(b',', &row[i..]).map_or(row.len(), |o| i + o);
            let field = &row[i..end];
            out.push(if field.is_empty() {
                None
            } else {
                Some(field.to_vec())
            });
            i = end;
        }
        match row.get(i) {
            None => return Ok(()),
            Some(b',') => i += 1,
            Some(_) => {
                return Err(Error::Source(
                    "CSV field with text after its closing quote".to_owned(),
                ));
            }
        }
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
mod load_tests {
    use super::*;

    fn text_to_csv(columns: usize, text: &[u8], cut: usize) -> Result<Vec<Vec<u8>>> {
        let mut conv = TextToCsv::new(columns);
        let mut out = Vec::new();
        let mut rows = Vec::new();
        for piece in [&text[..cut], &text[cut..]] {
            conv.feed(piece, &mut out, |r| {
                rows.push(r.to_vec());
                Ok(())
            })?;
        }
        conv.finish()?;
        assert_eq!(out, rows.concat(), "out holds the rows in order");
        Ok(rows)
    }

    #[test]
    fn text_rows_become_the_csv_copy_gives() {
        // (text field, csv field) as PostgreSQL 15 writes them for the same value.
        let cases: &[(&[u8], &[u8])] = &[
            (b"plain", b"plain"),
            (b"\\N", b""),
            (b"", b"\"\""),
            (b"a,b", b"\"a,b\""),
            (b"say \"hi\"", b"\"say \"\"hi\"\"\""),
            (b"two\\nlines", b"\"two\nlines\""),
            (b"cr\\rhere", b"\"cr\rhere\""),
            (b"tab\\there", b"tab\there"),
            (b"back\\\\slash", b"back\\slash"),
            (b"\\\\N", b"\\N"),
            (b"\\\\.", b"\\."),
            (b"ctl\\b\\f\\v", b"ctl\x08\x0c\x0b"),
            (b"\\\\\\n", b"\"\\\n\""),
            ("ünï\u{1F600}".as_bytes(), "ünï\u{1F600}".as_bytes()),
            (b" spaced ", b" spaced "),
        ];
        for (text, csv) in cases {
            let mut row = b"1\t".to_vec();
            row.extend_from_slice(text);
            row.extend_from_slice(b"\t\\N\n");
            let mut want = b"1,".to_vec();
            want.extend_from_slice(csv);
            want.extend_from_slice(b",\n");
            for cut in 0..=row.len() {
                let rows = text_to_csv(3, &row, cut).unwrap();
                assert_eq!(
                    rows,
                    vec![want.clone()],
                    "{} cut at {cut}",
                    String::from_utf8_lossy(text)
                );
            }
        }
        // A one-column row whose value is `\.` is quoted (it would read as end-of-data).
        assert_eq!(
            text_to_csv(1, b"\\\\.\n", 0).unwrap(),
            vec![b"\"\\.\"\n".to_vec()]
        );
        assert_eq!(
            text_to_csv(2, b"\\\\.\t\\\\.\n", 3).unwrap(),
            vec![b"\\.,\\.\n".to_vec()]
        );
        // Several rows, one NULL-only row, an empty-string-only row, zero columns.
        assert_eq!(
            text_to_csv(1, b"a\n\\N\n\nb\n", 5).unwrap(),
            vec![
                b"a\n".to_vec(),
                b"\n".to_vec(),
                b"\"\"\n".to_vec(),
                b"b\n".to_vec()
            ]
        );
        assert_eq!(
            text_to_csv(0, b"\n\n", 1).unwrap(),
            vec![b"\n".to_vec(), b"\n".to_vec()]
        );
    }

    #[test]
    fn malformed_text_rows_are_errors() {
        for (columns, text, want) in [
            (2, &b"1\n"[..], "has 1 fields, expected 2"),
            (1, b"1\t2\n", "has 2 fields, expected 1"),
            (1, b"bad\\q\n", "unexpected escape \\q"),
            (1, b"end\\\n", "lone backslash"),
            (1, b"no newline", "ended inside a row"),
        ] {
            let err = text_to_csv(columns, text, 0).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn rows_split_on_unquoted_newlines_across_chunks() {
        let data = b"1,\"a\nb\",x\n2,\"\"\"q\"\"\",\n3,,\"\"\n";
        for cut in 0..data.len() {
            let mut rows = Vec::new();
            let mut s = CsvRows::new();
            s.feed(&data[..cut], |r| {
                rows.push(r.to_vec());
                Ok(())
            })
            .unwrap();
            s.feed(&data[cut..], |r| {
                rows.push(r.to_vec());
                Ok(())
            })
            .unwrap();
            s.finish().unwrap();
            assert_eq!(
                rows,
                vec![
                    b"1,\"a\nb\",x\n".to_vec(),
                    b"2,\"\"\"q\"\"\",\n".to_vec(),
                    b"3,,\"\"\n".to_vec()
                ],
                "cut {cut}"
            );
        }
        let mut s = CsvRows::new();
        s.feed(b"1,\"open", |_| Ok(())).unwrap();
        assert!(s.finish().is_err());
    }

    #[test]
    fn fields_keep_null_and_empty_apart() {
        let mut f = Vec::new();
        parse_csv_fields(b"1,,\"\",\"a,\"\"b\"\"\",x y\n", &mut f).unwrap();
        assert_eq!(
            f,
            vec![
                Some(b"1".to_vec()),
                None,
                Some(vec![]),
                Some(b"a,\"b\"".to_vec()),
                Some(b"x y".to_vec())
            ]
        );
        assert!(parse_csv_fields(b"\"a\"b", &mut f).is_err());
        let mut out = Vec::new();
        load_json_row(
            "s",
            "t",
            &["a".into(), "b".into(), "c".into()],
            &[Some(b"1".to_vec()), None, Some(vec![])],
            &mut out,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"op\":\"I\",\"schema\":\"s\",\"table\":\"t\",\"after\":{\"a\":\"1\",\"b\":null,\"c\":\"\"}}\n"
        );
    }

    #[test]
    fn checksum_ignores_order() {
        let mut a = RowChecksum::default();
        let mut b = RowChecksum::default();
        for r in [&b"1,x\n"[..], b"2,y\n", b"3,z\n"] {
            a.add_row(r);
        }
        for r in [&b"3,z"[..], b"1,x", b"2,y"] {
            b.add_row(r);
        }
        assert_eq!(a, b);
        let mut c = RowChecksum::default();
        c.add_row(b"1,x");
        assert_ne!(a, c);
    }
}
