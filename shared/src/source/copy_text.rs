//! PostgreSQL `COPY .. TO STDOUT` text output turned into the exact bytes of `COPY (format
//! csv)`, and the order-independent row checksum the load and `validate` compare.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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

#[cfg(test)]
mod load_tests {
    use super::*;
    use crate::staging::decode::{CsvRows, parse_csv_fields};
    use crate::staging::encode::load_json_row;

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
