//! CSV as DMS's `CsvDelimiter`, `CsvNullValue` and `CsvRowDelimiter` ask for it.
//!
//! Everything inside pgshift speaks one CSV: PostgreSQL's `COPY (format csv)` (`,` between
//! fields, a row ends with `\n`, NULL is an empty unquoted field, an empty string is `""`).
//! A stage with another dialect is written by transcoding each row on its way into the
//! object ([`crate::staging::encode::EncodedWriter`]) and read by transcoding it back on its
//! way out (`apply`): nothing between (the load's converter, the CDC encoder, the checksums of
//! rows) changes, and the default dialect costs nothing.
//!
//! A dialect keeps NULL and every string apart, as PostgreSQL's CSV does with `NULL 'x'`:
//! NULL is the null string unquoted; a value equal to the null string, an empty value, and one
//! holding the delimiter, a quote, CR, LF, or leading/trailing whitespace is quoted.

use serde::{Deserialize, Serialize};

use super::decode::CsvRows;
use crate::error::{Error, Result};

/// A CSV dialect (DMS's `CsvDelimiter`, `CsvNullValue`, `CsvRowDelimiter`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsvDialect {
    /// One ASCII character.
    pub delimiter: String,
    /// What NULL is written as (empty: an empty unquoted field).
    pub null_value: String,
    /// `\n` or `\r\n`.
    pub row_delimiter: String,
}

impl Default for CsvDialect {
    fn default() -> Self {
        CsvDialect {
            delimiter: ",".to_owned(),
            null_value: String::new(),
            row_delimiter: "\n".to_owned(),
        }
    }
}

impl CsvDialect {
    /// PostgreSQL's CSV: nothing to transcode.
    pub fn is_default(&self) -> bool {
        *self == CsvDialect::default()
    }

    /// A dialect from DMS's settings, checked: each error names the setting (`field(name)`).
    pub fn new(
        delimiter: &str,
        null_value: &str,
        row_delimiter: &str,
        field: impl Fn(&str) -> String,
    ) -> Result<CsvDialect> {
        // DMS's JSON is often written with the escapes spelt out.
        let unescape = |s: &str| {
            s.replace("\\t", "\t")
                .replace("\\r", "\r")
                .replace("\\n", "\n")
        };
        let (delimiter, row_delimiter) = (unescape(delimiter), unescape(row_delimiter));
        let d = delimiter.as_bytes();
        if d.len() != 1 || !(d[0] == b'\t' || d[0].is_ascii_punctuation()) || d[0] == b'"' {
            return Err(Error::config(
                field("CsvDelimiter"),
                format!("{delimiter:?} is not one ASCII punctuation character or a tab (nor '\"')"),
            ));
        }
        if !matches!(row_delimiter.as_str(), "\n" | "\r\n") {
            return Err(Error::config(
                field("CsvRowDelimiter"),
                format!("{row_delimiter:?}: rows end with \\n or \\r\\n"),
            ));
        }
        if null_value
            .bytes()
            .any(|b| b == d[0] || matches!(b, b'"' | b'\n' | b'\r'))
            || null_value.trim() != null_value
        {
            return Err(Error::config(
                field("CsvNullValue"),
                format!(
                    "{null_value:?} holds the delimiter, a quote, a line break or outer spaces: it could not be told from a value"
                ),
            ));
        }
        Ok(CsvDialect {
            delimiter,
            null_value: null_value.to_owned(),
            row_delimiter,
        })
    }

    fn delim(&self) -> u8 {
        self.delimiter.as_bytes().first().copied().unwrap_or(b',')
    }
}

/// Appends one field in a dialect (`delim`, `null`): quoted when it is empty, equal to the
/// null string or to `\.` (COPY's end-of-data line), holds the delimiter, a quote, CR or LF,
/// or starts or ends with whitespace.
pub fn put_field(out: &mut Vec<u8>, value: Option<&[u8]>, delim: u8, null: &[u8]) {
    let Some(v) = value else {
        out.extend_from_slice(null);
        return;
    };
    let quote = v.is_empty()
        || v == null
        || v == b"\\."
        || v.iter()
            .any(|&b| b == delim || matches!(b, b'"' | b'\n' | b'\r'))
        || v.first().is_some_and(u8::is_ascii_whitespace)
        || v.last().is_some_and(u8::is_ascii_whitespace);
    if !quote {
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

/// Parses one row of a dialect (with or without its row delimiter): an unquoted field equal
/// to `null` is NULL (with the default empty null, an empty unquoted field), a quoted one a
/// string with `""` unescaped.
pub fn parse_fields(
    row: &[u8],
    delim: u8,
    null: &[u8],
    out: &mut Vec<Option<Vec<u8>>>,
) -> Result<()> {
    out.clear();
    let row = row.strip_suffix(b"\n").unwrap_or(row);
    let row = row.strip_suffix(b"\r").unwrap_or(row);
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
            let end = memchr::memchr(delim, &row[i..]).map_or(row.len(), |o| i + o);
            let field = &row[i..end];
            out.push((field != null).then(|| field.to_vec()));
            i = end;
        }
        match row.get(i) {
            None => return Ok(()),
            Some(&b) if b == delim => i += 1,
            Some(_) => {
                return Err(Error::Source(
                    "CSV field with text after its closing quote".to_owned(),
                ));
            }
        }
    }
}

/// Which way a [`Transcoder`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// PostgreSQL's CSV → the dialect (writing the stage).
    ToDialect,
    /// The dialect → PostgreSQL's CSV (reading it back).
    ToStandard,
}

/// Transcodes a stream of CSV rows between PostgreSQL's CSV and a dialect, row by row (rows
/// may span the pieces fed; a quoted field may hold line breaks).
#[derive(Debug)]
pub struct Transcoder {
    dialect: CsvDialect,
    direction: Direction,
    rows: CsvRows,
    fields: Vec<Option<Vec<u8>>>,
}

impl Transcoder {
    pub fn new(dialect: CsvDialect, direction: Direction) -> Transcoder {
        Transcoder {
            dialect,
            direction,
            rows: CsvRows::new(),
            fields: Vec::new(),
        }
    }

    /// Feeds the next piece; appends the complete rows, transcoded, to `out`.
    pub fn feed(&mut self, piece: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let (d, fields) = (&self.dialect, &mut self.fields);
        let delim = d.delim();
        let (from, to, from_null, to_null, eol): (u8, u8, &[u8], &[u8], &[u8]) =
            match self.direction {
                Direction::ToDialect => (
                    b',',
                    delim,
                    b"",
                    d.null_value.as_bytes(),
                    d.row_delimiter.as_bytes(),
                ),
                Direction::ToStandard => (delim, b',', d.null_value.as_bytes(), b"", b"\n"),
            };
        self.rows.feed(piece, |row| {
            parse_fields(row, from, from_null, fields)?;
            for (i, f) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(to);
                }
                put_field(out, f.as_deref(), to, to_null);
            }
            out.extend_from_slice(eol);
            Ok(())
        })
    }

    /// Checks the stream ended on a row boundary.
    pub fn finish(&self) -> Result<()> {
        self.rows.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::decode::parse_csv_fields;

    fn dialect(d: &str, n: &str, r: &str) -> CsvDialect {
        CsvDialect::new(d, n, r, |s| s.to_owned()).unwrap()
    }

    fn transcode(d: &CsvDialect, dir: Direction, pieces: &[&[u8]]) -> Vec<u8> {
        let mut t = Transcoder::new(d.clone(), dir);
        let mut out = Vec::new();
        for p in pieces {
            t.feed(p, &mut out).unwrap();
        }
        t.finish().unwrap();
        out
    }

    #[test]
    fn a_dialect_keeps_nulls_strings_and_line_breaks_apart_both_ways() {
        // NULL, an empty string, the null string as a value, the delimiter, a quote, a
        // newline inside a value, outer spaces, `\.`.
        let standard: &[u8] =
            b"1,,\"\",NULL,a|b,\"q\"\"x\",\"l1\nl2\",\" s \",\"\\.\"\nI,2,x,\"\",y,z,w,v,u,t\n";
        for d in [
            dialect("|", "NULL", "\n"),
            dialect("\\t", "", "\\r\\n"),
            dialect(";", "\\N", "\r\n"),
        ] {
            // Split anywhere: rows and quoted line breaks survive piece boundaries.
            let whole = transcode(&d, Direction::ToDialect, &[standard]);
            for cut in [1, 7, 20, whole.len() - 1] {
                let back = transcode(&d, Direction::ToStandard, &[&whole[..cut], &whole[cut..]]);
                assert_eq!(back, standard, "{d:?} cut at {cut}");
            }
            // A reader of the dialect sees the same values as one of PostgreSQL's CSV.
            let rows = |bytes: &[u8]| {
                let mut rows = Vec::new();
                CsvRows::new()
                    .feed(bytes, |r| {
                        rows.push(r.to_vec());
                        Ok(())
                    })
                    .unwrap();
                rows
            };
            let (ours, theirs) = (rows(&whole), rows(standard));
            assert_eq!(ours.len(), 2);
            for (o, t) in ours.iter().zip(&theirs) {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                parse_fields(o, d.delim(), d.null_value.as_bytes(), &mut a).unwrap();
                parse_csv_fields(t, &mut b).unwrap();
                assert_eq!(a, b, "{d:?}");
                assert!(o.ends_with(d.row_delimiter.as_bytes()));
            }
        }
        let pipe = transcode(
            &dialect("|", "NULL", "\n"),
            Direction::ToDialect,
            &[b"1,,\"\",NULL,a|b\n"],
        );
        assert_eq!(pipe, b"1|NULL|\"\"|\"NULL\"|\"a|b\"\n");
    }

    #[test]
    fn bad_dialects_name_the_setting() {
        let name = |s: &str| format!("S3Settings.{s}");
        for (d, n, r, want) in [
            ("||", "", "\n", "CsvDelimiter"),
            ("a", "", "\n", "CsvDelimiter"),
            ("\"", "", "\n", "CsvDelimiter"),
            ("", "", "\n", "CsvDelimiter"),
            (",", "", "\r", "CsvRowDelimiter"),
            (",", "", ";", "CsvRowDelimiter"),
            ("|", "a|b", "\n", "CsvNullValue"),
            (",", " NULL", "\n", "CsvNullValue"),
            (",", "\"", "\n", "CsvNullValue"),
        ] {
            let err = CsvDialect::new(d, n, r, name).unwrap_err().to_string();
            assert!(err.contains(&name(want)), "{d:?} {n:?} {r:?}: {err}");
        }
        assert!(dialect(",", "", "\\n").is_default());
    }
}
