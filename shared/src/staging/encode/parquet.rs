//! Parquet (DESIGN §5): typed columns after `op`, `commit_lsn`, `commit_ts`, for the full load
//! (`I`, no position or time) and for CDC, whose files end with one more column, `unchanged`:
//! the 1-based ordinals of the columns whose unchanged TOAST value is not in the row, joined by
//! `;` (null when every value is there), as CSV's last field. A CDC file holds one schema
//! version: the poller starts a new file when a table's columns change within a batch.
//!
//! Types: `int2/int4/int8` → Int16/32/64; `float4/float8` → Float32/64 (NaN and ±Infinity
//! kept as IEEE values); `bool` → Boolean; `date` → Date32; `timestamp` → Timestamp(µs);
//! `timestamptz` → Timestamp(µs, UTC); `numeric(p,s)` with p ≤ 38 → Decimal128(p,s) plus a
//! `<column>__special` string column that holds `NaN`, `Infinity` or `-Infinity` where the
//! decimal is null for that reason (lossless); everything else (unconstrained numeric, text,
//! json, arrays, ranges, ...) → UTF-8 string of PostgreSQL's text output. `±infinity` dates and
//! timestamps are stored as the type's minimum/maximum, as PostgreSQL itself stores them; BC
//! dates use the proleptic Gregorian calendar (year 1 BC = year 0).
//!
//! Rows arrive as the fields of `COPY .. (format csv)`. Batches of [`BATCH_ROWS`] rows are
//! written into row groups of at most [`ROW_GROUP_ROWS`] rows; the encoded bytes are taken out
//! after each batch, so memory stays bounded whatever the chunk size.

use std::io::Write;
use std::sync::{Arc, Mutex};

use arrow_array::builder::{
    BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder, Float64Builder, Int16Builder,
    Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::change::{Op, RowChange, days_from_civil};

/// A column of timestamps as written: microseconds, or truncated to milliseconds (toward the
/// past, as a floor, so a value never moves after its true time).
fn timestamps(
    micros: arrow_array::TimestampMicrosecondArray,
    tz: Option<Arc<str>>,
    millis: bool,
) -> ArrayRef {
    if !millis {
        return Arc::new(micros.with_timezone_opt(tz));
    }
    let ms: arrow_array::TimestampMillisecondArray = micros
        .iter()
        .map(|v| v.map(|us| us.div_euclid(1000)))
        .collect();
    Arc::new(ms.with_timezone_opt(tz))
}
use crate::error::{Error, Result};
use crate::pgoutput::Value;
use crate::table::TableSchema;

/// Rows per record batch.
pub const BATCH_ROWS: usize = 8192;
/// Rows per row group.
pub const ROW_GROUP_ROWS: usize = 128 * 1024;

/// How one PostgreSQL column is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    I16,
    I32,
    I64,
    F32,
    F64,
    Bool,
    Date,
    Timestamp,
    TimestampTz,
    Decimal { precision: u8, scale: i8 },
    Text,
}

fn kind_of(type_oid: u32, type_modifier: i32) -> Kind {
    match type_oid {
        21 => Kind::I16,
        23 => Kind::I32,
        20 => Kind::I64,
        700 => Kind::F32,
        701 => Kind::F64,
        16 => Kind::Bool,
        1082 => Kind::Date,
        1114 => Kind::Timestamp,
        1184 => Kind::TimestampTz,
        1700 if type_modifier >= 4 => {
            let precision = ((type_modifier - 4) >> 16) & 0xffff;
            let scale = (type_modifier - 4) & 0xffff;
            if (1..=38).contains(&precision) && scale <= precision {
                Kind::Decimal {
                    precision: precision as u8,
                    scale: scale as i8,
                }
            } else {
                Kind::Text
            }
        }
        _ => Kind::Text,
    }
}

enum Builder {
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Bool(BooleanBuilder),
    Date(Date32Builder),
    Ts(TimestampMicrosecondBuilder, Option<Arc<str>>),
    Dec(Decimal128Builder, StringBuilder, u8, i8),
    Text(StringBuilder),
}

/// Growable bytes shared with the Parquet writer, drained after each batch.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("parquet buffer poisoned"))?
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Microseconds from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A CDC file's per-row columns: the change's op, commit position and time, unchanged TOAST.
struct CdcColumns {
    op: StringBuilder,
    commit_lsn: StringBuilder,
    commit_ts: TimestampMicrosecondBuilder,
    unchanged: StringBuilder,
}

impl CdcColumns {
    fn new() -> CdcColumns {
        CdcColumns {
            op: StringBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS),
            commit_lsn: StringBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS * 12),
            commit_ts: TimestampMicrosecondBuilder::with_capacity(BATCH_ROWS),
            unchanged: StringBuilder::new(),
        }
    }
}

/// A Parquet file being written row by row.
pub struct ParquetEncoder {
    name: String,
    columns: Vec<String>,
    kinds: Vec<Kind>,
    builders: Vec<Builder>,
    schema: SchemaRef,
    writer: ArrowWriter<SharedBuf>,
    out: SharedBuf,
    rows_in_batch: usize,
    rows: u64,
    /// Set for a CDC file.
    cdc: Option<CdcColumns>,
    /// The ordinals of one row's unchanged values, reused.
    ordinals: String,
    /// Timestamps written in milliseconds (truncated; DMS's ParquetTimestampInMillisecond).
    millis: bool,
}

fn pq_err(e: impl std::fmt::Display) -> Error {
    Error::Source(format!("parquet: {e}"))
}

impl ParquetEncoder {
    /// `types` are (type oid, type modifier) per column, as `pg_attribute` has them.
    pub fn new(
        schema: &str,
        table: &str,
        columns: &[String],
        types: &[(u32, i32)],
    ) -> Result<ParquetEncoder> {
        ParquetEncoder::with_columns(schema, table, columns, types, false, false)
    }

    /// [`ParquetEncoder::new`] with timestamps in milliseconds when `millis`.
    pub fn with_unit(
        schema: &str,
        table: &str,
        columns: &[String],
        types: &[(u32, i32)],
        millis: bool,
    ) -> Result<ParquetEncoder> {
        ParquetEncoder::with_columns(schema, table, columns, types, false, millis)
    }

    /// A CDC file of `table` at its schema version (the relation's column types); timestamps
    /// in milliseconds when `millis`.
    pub fn for_cdc(table: &TableSchema, millis: bool) -> Result<ParquetEncoder> {
        let columns: Vec<String> = table.columns.iter().map(|c| c.name.clone()).collect();
        let types: Vec<(u32, i32)> = table
            .columns
            .iter()
            .map(|c| (c.type_oid, c.type_modifier))
            .collect();
        ParquetEncoder::with_columns(&table.schema, &table.table, &columns, &types, true, millis)
    }

    fn with_columns(
        schema: &str,
        table: &str,
        columns: &[String],
        types: &[(u32, i32)],
        cdc: bool,
        millis: bool,
    ) -> Result<ParquetEncoder> {
        let unit = if millis {
            TimeUnit::Millisecond
        } else {
            TimeUnit::Microsecond
        };
        if columns.len() != types.len() {
            return Err(Error::Source(format!(
                "{schema}.{table}: column types missing from the plan"
            )));
        }
        let kinds: Vec<Kind> = types.iter().map(|(o, m)| kind_of(*o, *m)).collect();
        let utc: Arc<str> = Arc::from("UTC");
        let mut fields = vec![
            Field::new("op", DataType::Utf8, false),
            Field::new("commit_lsn", DataType::Utf8, true),
            Field::new(
                "commit_ts",
                DataType::Timestamp(unit, Some(utc.clone())),
                true,
            ),
        ];
        for (name, kind) in columns.iter().zip(&kinds) {
            let dt = match kind {
                Kind::I16 => DataType::Int16,
                Kind::I32 => DataType::Int32,
                Kind::I64 => DataType::Int64,
                Kind::F32 => DataType::Float32,
                Kind::F64 => DataType::Float64,
                Kind::Bool => DataType::Boolean,
                Kind::Date => DataType::Date32,
                Kind::Timestamp => DataType::Timestamp(unit, None),
                Kind::TimestampTz => DataType::Timestamp(unit, Some(utc.clone())),
                Kind::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
                Kind::Text => DataType::Utf8,
            };
            fields.push(Field::new(name, dt, true));
            if matches!(kind, Kind::Decimal { .. }) {
                fields.push(Field::new(format!("{name}__special"), DataType::Utf8, true));
            }
        }
        if cdc {
            fields.push(Field::new("unchanged", DataType::Utf8, true));
        }
        let schema_ref: SchemaRef = Arc::new(Schema::new(fields));
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        let out = SharedBuf::default();
        let writer =
            ArrowWriter::try_new(out.clone(), schema_ref.clone(), Some(props)).map_err(pq_err)?;
        let mut enc = ParquetEncoder {
            name: format!("{schema}.{table}"),
            columns: columns.to_vec(),
            kinds,
            builders: Vec::new(),
            schema: schema_ref,
            writer,
            out,
            rows_in_batch: 0,
            rows: 0,
            cdc: cdc.then(CdcColumns::new),
            ordinals: String::new(),
            millis,
        };
        enc.builders = enc.new_builders()?;
        Ok(enc)
    }

    fn new_builders(&self) -> Result<Vec<Builder>> {
        self.kinds
            .iter()
            .map(|k| {
                Ok(match k {
                    Kind::I16 => Builder::I16(Int16Builder::with_capacity(BATCH_ROWS)),
                    Kind::I32 => Builder::I32(Int32Builder::with_capacity(BATCH_ROWS)),
                    Kind::I64 => Builder::I64(Int64Builder::with_capacity(BATCH_ROWS)),
                    Kind::F32 => Builder::F32(Float32Builder::with_capacity(BATCH_ROWS)),
                    Kind::F64 => Builder::F64(Float64Builder::with_capacity(BATCH_ROWS)),
                    Kind::Bool => Builder::Bool(BooleanBuilder::with_capacity(BATCH_ROWS)),
                    Kind::Date => Builder::Date(Date32Builder::with_capacity(BATCH_ROWS)),
                    Kind::Timestamp => {
                        Builder::Ts(TimestampMicrosecondBuilder::with_capacity(BATCH_ROWS), None)
                    }
                    Kind::TimestampTz => Builder::Ts(
                        TimestampMicrosecondBuilder::with_capacity(BATCH_ROWS),
                        Some(Arc::from("UTC")),
                    ),
                    Kind::Decimal { precision, scale } => Builder::Dec(
                        Decimal128Builder::with_capacity(BATCH_ROWS)
                            .with_precision_and_scale(*precision, *scale)
                            .map_err(pq_err)?,
                        StringBuilder::new(),
                        *precision,
                        *scale,
                    ),
                    Kind::Text => Builder::Text(StringBuilder::new()),
                })
            })
            .collect()
    }

    /// Appends one row (the CSV fields of COPY: `None` is NULL).
    pub fn push_row(&mut self, fields: &[Option<Vec<u8>>]) -> Result<()> {
        if fields.len() != self.builders.len() {
            return Err(Error::Source(format!(
                "{}: COPY row has {} fields for {} columns",
                self.name,
                fields.len(),
                self.builders.len()
            )));
        }
        self.push_fields(fields.iter().map(|f| f.as_deref()))?;
        self.end_row()
    }

    /// Appends one CDC change (a file made by [`ParquetEncoder::for_cdc`] for its table's
    /// current schema version): the row a CSV file would hold — the new row of an insert or
    /// update, the old row (key or full) of a delete, nothing of a truncate — with its op,
    /// commit position and time, and the ordinals of its unchanged TOAST values.
    pub fn push_change(&mut self, change: &RowChange<'_>) -> Result<()> {
        if self.cdc.is_none() {
            return Err(Error::Source(format!(
                "{}: a full-load Parquet file takes no changes",
                self.name
            )));
        }
        let row = match change.op {
            Op::Insert | Op::Update => change.new,
            Op::Delete => change.old,
            Op::Truncate => None,
        };
        let n = self.builders.len();
        if row.is_some_and(|r| r.len() != n) {
            return Err(Error::Source(format!(
                "{}: change at {} has {} values for {n} columns",
                self.name,
                change.lsn,
                row.map_or(0, <[Value<'_>]>::len)
            )));
        }
        let values = (0..n).map(|i| match row.and_then(|r| r.get(i)) {
            Some(Value::Text(t) | Value::Binary(t)) => Some(*t),
            _ => None,
        });
        self.push_fields(values)?;
        self.ordinals.clear();
        for i in change.unchanged() {
            if !self.ordinals.is_empty() {
                self.ordinals.push(';');
            }
            self.ordinals.push_str(&(i + 1).to_string());
        }
        if let Some(c) = self.cdc.as_mut() {
            c.op.append_value(change.op.as_str());
            c.commit_lsn.append_value(change.commit_lsn.to_string());
            c.commit_ts
                .append_value(change.commit_ts.saturating_add(PG_EPOCH_UNIX_MICROS));
            if self.ordinals.is_empty() {
                c.unchanged.append_null();
            } else {
                c.unchanged.append_value(&self.ordinals);
            }
        }
        self.end_row()
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Appends one value per column (`None` is NULL); [`Self::end_row`] completes the row.
    fn push_fields<'f>(&mut self, fields: impl Iterator<Item = Option<&'f [u8]>>) -> Result<()> {
        for (i, (b, f)) in self.builders.iter_mut().zip(fields).enumerate() {
            let bad = |what: &str| {
                Error::Source(format!(
                    "{}.{}: row {} is not a valid {what}",
                    self.name,
                    self.columns[i],
                    self.rows + 1
                ))
            };
            let text = match f {
                None => None,
                Some(v) => Some(std::str::from_utf8(v).map_err(|_| bad("UTF-8 text"))?),
            };
            match (b, text) {
                (Builder::I16(b), t) => {
                    b.append_option(t.map(|t| t.parse().map_err(|_| bad("int2"))).transpose()?)
                }
                (Builder::I32(b), t) => {
                    b.append_option(t.map(|t| t.parse().map_err(|_| bad("int4"))).transpose()?)
                }
                (Builder::I64(b), t) => {
                    b.append_option(t.map(|t| t.parse().map_err(|_| bad("int8"))).transpose()?)
                }
                (Builder::F32(b), t) => b.append_option(
                    t.map(|t| t.parse().map_err(|_| bad("float4")))
                        .transpose()?,
                ),
                (Builder::F64(b), t) => b.append_option(
                    t.map(|t| t.parse().map_err(|_| bad("float8")))
                        .transpose()?,
                ),
                (Builder::Bool(b), t) => b.append_option(
                    t.map(|t| match t {
                        "t" => Ok(true),
                        "f" => Ok(false),
                        _ => Err(bad("boolean")),
                    })
                    .transpose()?,
                ),
                (Builder::Date(b), t) => b.append_option(
                    t.map(|t| parse_date(t).ok_or_else(|| bad("date")))
                        .transpose()?,
                ),
                (Builder::Ts(b, tz), t) => b.append_option(
                    t.map(|t| parse_timestamp(t, tz.is_some()).ok_or_else(|| bad("timestamp")))
                        .transpose()?,
                ),
                (Builder::Dec(b, special, _, scale), t) => match t {
                    None => {
                        b.append_null();
                        special.append_null();
                    }
                    Some(s @ ("NaN" | "Infinity" | "-Infinity")) => {
                        b.append_null();
                        special.append_value(s);
                    }
                    Some(s) => {
                        b.append_value(parse_decimal(s, *scale).ok_or_else(|| bad("numeric"))?);
                        special.append_null();
                    }
                },
                (Builder::Text(b), t) => b.append_option(t),
            }
        }
        Ok(())
    }

    fn end_row(&mut self) -> Result<()> {
        self.rows += 1;
        self.rows_in_batch += 1;
        if self.rows_in_batch >= BATCH_ROWS {
            self.write_batch()?;
        }
        Ok(())
    }

    fn write_batch(&mut self) -> Result<()> {
        if self.rows_in_batch == 0 {
            return Ok(());
        }
        let n = self.rows_in_batch;
        let fresh = self.new_builders()?;
        let builders = std::mem::replace(&mut self.builders, fresh);
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        let mut unchanged = None;
        if let Some(c) = self.cdc.as_mut() {
            let mut c = std::mem::replace(c, CdcColumns::new());
            arrays.push(Arc::new(c.op.finish()));
            arrays.push(Arc::new(c.commit_lsn.finish()));
            arrays.push(timestamps(
                c.commit_ts.finish(),
                Some("UTC".into()),
                self.millis,
            ));
            unchanged = Some(c.unchanged.finish());
        } else {
            let mut op = StringBuilder::with_capacity(n, n);
            for _ in 0..n {
                op.append_value("I");
            }
            arrays.push(Arc::new(op.finish()));
            let mut lsn = StringBuilder::new();
            lsn.append_nulls(n);
            arrays.push(Arc::new(lsn.finish()));
            let mut ts = TimestampMicrosecondBuilder::with_capacity(n);
            ts.append_nulls(n);
            arrays.push(timestamps(ts.finish(), Some("UTC".into()), self.millis));
        }
        for b in builders {
            match b {
                Builder::I16(mut b) => arrays.push(Arc::new(b.finish())),
                Builder::I32(mut b) => arrays.push(Arc::new(b.finish())),
                Builder::I64(mut b) => arrays.push(Arc::new(b.finish())),
                Builder::F32(mut b) => arrays.push(Arc::new(b.finish())),
                Builder::F64(mut b) => arrays.push(Arc::new(b.finish())),
                Builder::Bool(mut b) => arrays.push(Arc::new(b.finish())),
                Builder::Date(mut b) => arrays.push(Arc::new(b.finish())),
                Builder::Ts(mut b, tz) => arrays.push(timestamps(b.finish(), tz, self.millis)),
                Builder::Dec(mut b, mut s, p, sc) => {
                    arrays.push(Arc::new(
                        b.finish().with_precision_and_scale(p, sc).map_err(pq_err)?,
                    ));
                    arrays.push(Arc::new(s.finish()));
                }
                Builder::Text(mut b) => arrays.push(Arc::new(b.finish())),
            }
        }
        if let Some(u) = unchanged {
            arrays.push(Arc::new(u));
        }
        let batch = RecordBatch::try_new(self.schema.clone(), arrays).map_err(pq_err)?;
        self.writer.write(&batch).map_err(pq_err)?;
        self.rows_in_batch = 0;
        Ok(())
    }

    /// Encoded bytes ready to upload.
    pub fn take_output(&mut self) -> Vec<u8> {
        self.out
            .0
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default()
    }

    /// Writes what is pending and the footer; returns the last bytes.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        self.write_batch()?;
        let out = self.out.clone();
        self.writer.close().map_err(pq_err)?;
        Ok(out
            .0
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default())
    }
}

/// `YYYY-MM-DD[ BC]` → (days since 1970-01-01); `infinity` → i32::MAX, `-infinity` → i32::MIN.
fn parse_date(t: &str) -> Option<i32> {
    match t {
        "infinity" => return Some(i32::MAX),
        "-infinity" => return Some(i32::MIN),
        _ => {}
    }
    let (t, bc) = match t.strip_suffix(" BC") {
        Some(d) => (d, true),
        None => (t, false),
    };
    let days = civil_days(t, bc)?;
    i32::try_from(days).ok()
}

fn civil_days(date: &str, bc: bool) -> Option<i64> {
    let mut parts = date.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if bc { 1 - y } else { y };
    Some(days_from_civil(y, m, d))
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][+00][ BC]` → µs since 1970-01-01 UTC (sessions run in UTC).
fn parse_timestamp(t: &str, with_zone: bool) -> Option<i64> {
    match t {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (t, bc) = match t.strip_suffix(" BC") {
        Some(d) => (d, true),
        None => (t, false),
    };
    let (date, time) = t.split_once(' ')?;
    let time = if with_zone {
        // The session's timezone is UTC, so the offset is +00 (sub-hour offsets never occur).
        time.strip_suffix("+00")?
    } else {
        time
    };
    let (hms, frac) = match time.split_once('.') {
        Some((h, f)) => (h, f),
        None => (time, ""),
    };
    let mut hp = hms.splitn(3, ':');
    let h: i64 = hp.next()?.parse().ok()?;
    let mi: i64 = hp.next()?.parse().ok()?;
    let s: i64 = hp.next()?.parse().ok()?;
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    let days = civil_days(date, bc)?;
    days.checked_mul(86_400_000_000)?
        .checked_add(((h * 60 + mi) * 60 + s) * 1_000_000 + micros)
}

/// A numeric's text at `scale` fraction digits → the unscaled i128.
fn parse_decimal(t: &str, scale: i8) -> Option<i128> {
    let (neg, digits) = match t.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, t),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let scale = usize::try_from(scale).ok()?;
    if frac.len() > scale
        || int.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let mut v: i128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        v = v.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
    }
    for _ in frac.len()..scale {
        v = v.checked_mul(10)?;
    }
    Some(if neg { -v } else { v })
}

#[cfg(test)]
mod tests;
