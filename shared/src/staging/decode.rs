//! Reading staged CSV back: rows (quoted newlines kept) and fields (NULL apart from empty).

use crate::error::{Error, Result};

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

/// Parses one CSV row (without or with its newline) into fields: an unquoted empty field is
/// NULL, a quoted one a (possibly empty) string with `""` unescaped (PostgreSQL's CSV: the
/// default dialect of [`super::dialect::parse_fields`]).
pub fn parse_csv_fields(row: &[u8], out: &mut Vec<Option<Vec<u8>>>) -> Result<()> {
    super::dialect::parse_fields(row, b',', b"", out)
}
