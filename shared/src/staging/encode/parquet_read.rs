//! Staged Parquet read back as `COPY (format csv)` rows: the inverse of [`super::parquet`], for
//! apply to load a Parquet full load. Every value becomes PostgreSQL's own input text:
//! integers and floats as Rust prints them (shortest exact form; NaN and ±Infinity by name),
//! booleans `t`/`f`, dates and timestamps as ISO text (the type's minimum/maximum back to
//! `-infinity`/`infinity`, year 0 and before back to `BC`), timestamptz with `+00`, decimals
//! at their scale (or the `<column>__special` text: NaN, ±Infinity), strings as they are.
//! The file is read from a local path, a record batch at a time: memory is one batch.

use std::fs::File;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type,
    TimestampMicrosecondType,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::csv_field;
use super::parquet::BATCH_ROWS;
use crate::error::{Error, Result};

/// A staged Parquet chunk, read as CSV rows of the given columns.
pub struct ParquetRows {
    name: String,
    columns: Vec<String>,
    reader: ParquetRecordBatchReader,
}

fn pq_err(name: &str) -> impl Fn(parquet::errors::ParquetError) -> Error + '_ {
    move |e| Error::Staged(format!("{name}: not a readable Parquet file: {e}"))
}

impl ParquetRows {
    /// Opens `path` (named `name` in messages) to read `columns` from it.
    pub fn open(path: &Path, name: &str, columns: &[String]) -> Result<ParquetRows> {
        let file = File::open(path).map_err(|e| Error::io(format!("opening {name}"), e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(pq_err(name))?
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(pq_err(name))?;
        Ok(ParquetRows {
            name: name.to_owned(),
            columns: columns.to_vec(),
            reader,
        })
    }

    /// The next batch of rows as CSV bytes; `None` at the end.
    pub fn next_csv(&mut self) -> Result<Option<Vec<u8>>> {
        let Some(batch) = self.reader.next() else {
            return Ok(None);
        };
        let batch = batch.map_err(|e| {
            Error::Staged(format!("{}: not a readable Parquet file: {e}", self.name))
        })?;
        batch_to_csv(&batch, &self.columns, &self.name).map(Some)
    }
}

/// One record batch as CSV rows of `columns` (the staged columns, in order).
pub fn batch_to_csv(batch: &RecordBatch, columns: &[String], name: &str) -> Result<Vec<u8>> {
    let schema = batch.schema();
    let mut cols: Vec<(&ArrayRef, Option<&ArrayRef>)> = Vec::with_capacity(columns.len());
    for c in columns {
        let idx = schema
            .index_of(c)
            .map_err(|_| Error::Staged(format!("{name}: Parquet file has no column {c:?}")))?;
        let special = schema
            .index_of(&format!("{c}__special"))
            .ok()
            .map(|i| batch.column(i));
        cols.push((batch.column(idx), special));
    }
    let mut out = Vec::with_capacity(batch.num_rows() * 16 * columns.len().max(1));
    let mut text = String::new();
    for row in 0..batch.num_rows() {
        for (j, (array, special)) in cols.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            text.clear();
            if value_text(array, *special, row, &mut text, name, &columns[j])? {
                csv_field(&mut out, Some(text.as_bytes()));
            }
        }
        out.push(b'\n');
    }
    Ok(out)
}

/// Writes the value at `row` as PostgreSQL input text; false for NULL.
fn value_text(
    array: &ArrayRef,
    special: Option<&ArrayRef>,
    row: usize,
    out: &mut String,
    name: &str,
    column: &str,
) -> Result<bool> {
    use std::fmt::Write;
    if array.is_null(row) {
        if let Some(s) = special.filter(|s| !s.is_null(row))
            && let Some(s) = s.as_string_opt::<i32>()
        {
            out.push_str(s.value(row));
            return Ok(true);
        }
        return Ok(false);
    }
    let _ = match array.data_type() {
        DataType::Int16 => write!(out, "{}", array.as_primitive::<Int16Type>().value(row)),
        DataType::Int32 => write!(out, "{}", array.as_primitive::<Int32Type>().value(row)),
        DataType::Int64 => write!(out, "{}", array.as_primitive::<Int64Type>().value(row)),
        DataType::Float32 => float(
            out,
            f64::from(array.as_primitive::<Float32Type>().value(row)),
            |o| write!(o, "{}", array.as_primitive::<Float32Type>().value(row)),
        ),
        DataType::Float64 => {
            let v = array.as_primitive::<Float64Type>().value(row);
            float(out, v, |o| write!(o, "{v}"))
        }
        DataType::Boolean => {
            out.push_str(if array.as_boolean().value(row) {
                "t"
            } else {
                "f"
            });
            Ok(())
        }
        DataType::Date32 => {
            date(out, array.as_primitive::<Date32Type>().value(row));
            Ok(())
        }
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            timestamp(
                out,
                array.as_primitive::<TimestampMicrosecondType>().value(row),
                tz.is_some(),
            );
            Ok(())
        }
        DataType::Decimal128(_, scale) => {
            decimal(
                out,
                array.as_primitive::<Decimal128Type>().value(row),
                *scale,
            );
            Ok(())
        }
        DataType::Utf8 => {
            out.push_str(array.as_string::<i32>().value(row));
            Ok(())
        }
        other => {
            return Err(Error::Staged(format!(
                "{name}: column {column:?} is Parquet {other}, which pgshift does not stage"
            )));
        }
    };
    Ok(true)
}

fn float(
    out: &mut String,
    v: f64,
    finite: impl FnOnce(&mut String) -> std::fmt::Result,
) -> std::fmt::Result {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "Infinity" } else { "-Infinity" });
    } else {
        finite(out)?;
    }
    Ok(())
}

fn ymd(out: &mut String, days: i64) -> bool {
    use std::fmt::Write;
    let (y, m, d) = crate::change::civil_from_days(days);
    let bc = y <= 0;
    let _ = write!(out, "{:04}-{m:02}-{d:02}", if bc { 1 - y } else { y });
    bc
}

fn date(out: &mut String, days: i32) {
    match days {
        i32::MAX => out.push_str("infinity"),
        i32::MIN => out.push_str("-infinity"),
        d => {
            if ymd(out, i64::from(d)) {
                out.push_str(" BC");
            }
        }
    }
}

fn timestamp(out: &mut String, micros: i64, with_zone: bool) {
    use std::fmt::Write;
    match micros {
        i64::MAX => return out.push_str("infinity"),
        i64::MIN => return out.push_str("-infinity"),
        _ => {}
    }
    let days = micros.div_euclid(86_400_000_000);
    let of_day = micros.rem_euclid(86_400_000_000);
    let bc = ymd(out, days);
    let secs = of_day / 1_000_000;
    let _ = write!(
        out,
        " {:02}:{:02}:{:02}.{:06}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        of_day % 1_000_000
    );
    if with_zone {
        out.push_str("+00");
    }
    if bc {
        out.push_str(" BC");
    }
}

fn decimal(out: &mut String, v: i128, scale: i8) {
    use std::fmt::Write;
    let neg = v < 0;
    let digits = v.unsigned_abs().to_string();
    let scale = usize::try_from(scale).unwrap_or(0);
    if neg {
        out.push('-');
    }
    if scale == 0 {
        out.push_str(&digits);
        return;
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    let _ = write!(out, "{int}.{frac}");
}

#[cfg(test)]
mod tests {
    use super::super::parquet::ParquetEncoder;
    use super::*;

    /// Every staged kind written by the encoder reads back as text PostgreSQL takes for the
    /// same value.
    #[test]
    fn the_encoders_values_read_back_as_postgres_input() {
        let columns: Vec<String> = ["i2", "i4", "i8", "f4", "f8", "b", "d", "ts", "tz", "n", "t"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let types = [
            (21, -1),
            (23, -1),
            (20, -1),
            (700, -1),
            (701, -1),
            (16, -1),
            (1082, -1),
            (1114, -1),
            (1184, -1),
            (1700, ((10 << 16) | 2) + 4),
            (25, -1),
        ];
        let rows: &[&[Option<&str>]] = &[
            &[
                Some("-32768"),
                Some("7"),
                Some("9223372036854775807"),
                Some("1.5"),
                Some("0.1"),
                Some("t"),
                Some("2024-02-29"),
                Some("2024-02-29 23:59:59.000001"),
                Some("1999-12-31 00:00:00+00"),
                Some("-12345678.05"),
                Some("a,\"b\"\nc"),
            ],
            &[
                None,
                None,
                None,
                Some("NaN"),
                Some("-Infinity"),
                Some("f"),
                Some("0044-03-15 BC"),
                Some("infinity"),
                Some("-infinity"),
                Some("NaN"),
                Some(""),
            ],
            &[
                Some("0"),
                Some("-1"),
                Some("0"),
                Some("Infinity"),
                Some("1e+20"),
                None,
                Some("-infinity"),
                Some("0001-01-01 00:00:00 BC"),
                None,
                Some("0.01"),
                None,
            ],
        ];
        let mut enc = ParquetEncoder::new("s", "t", &columns, &types).unwrap();
        for r in rows {
            let fields: Vec<Option<Vec<u8>>> =
                r.iter().map(|v| v.map(|s| s.as_bytes().to_vec())).collect();
            enc.push_row(&fields).unwrap();
        }
        let mut bytes = enc.take_output();
        bytes.extend(enc.finish().unwrap());
        let path = std::env::temp_dir().join(format!("pgshift-pq-{}.parquet", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let mut rows_read = ParquetRows::open(&path, "t.parquet", &columns).unwrap();
        let csv = String::from_utf8(rows_read.next_csv().unwrap().unwrap()).unwrap();
        assert!(rows_read.next_csv().unwrap().is_none());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            csv,
            "-32768,7,9223372036854775807,1.5,0.1,t,2024-02-29,2024-02-29 23:59:59.000001,1999-12-31 00:00:00.000000+00,-12345678.05,\"a,\"\"b\"\"\nc\"\n\
             ,,,NaN,-Infinity,f,0044-03-15 BC,infinity,-infinity,NaN,\"\"\n\
             0,-1,0,Infinity,100000000000000000000,,-infinity,0001-01-01 00:00:00.000000 BC,,0.01,\n"
        );
        let err = ParquetRows::open(&path, "gone.parquet", &columns)
            .err()
            .expect("a missing file is an error");
        assert!(err.to_string().contains("gone.parquet"), "{err}");
    }
}
