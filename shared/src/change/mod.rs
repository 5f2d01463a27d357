//! Row changes, pure (no I/O): one change of one row borrowing its values from the decoded
//! message, and [`decoder`] turning pgoutput messages into them.

use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;
use crate::pgoutput::Value;
use crate::table::TableSchema;

/// The kind of a staged change (`Op` in DMS files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "I")]
    Insert,
    #[serde(rename = "U")]
    Update,
    #[serde(rename = "D")]
    Delete,
    #[serde(rename = "T")]
    Truncate,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "I",
            Op::Update => "U",
            Op::Delete => "D",
            Op::Truncate => "T",
        }
    }
}

/// One row change in commit order.
#[derive(Debug, Clone)]
pub struct RowChange<'a> {
    pub op: Op,
    pub table: &'a TableSchema,
    /// LSN of the change's WAL record.
    pub lsn: Lsn,
    /// LSN of the transaction's commit record.
    pub commit_lsn: Lsn,
    pub xid: u32,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_ts: i64,
    /// The old row: key columns only (others null), or the whole row under REPLICA IDENTITY
    /// FULL (`old_is_full`).
    pub old: Option<&'a [Value<'a>]>,
    pub old_is_full: bool,
    /// The new row (inserts and updates), with unchanged TOAST values filled from a full old
    /// row where there is one.
    pub new: Option<&'a [Value<'a>]>,
}

impl RowChange<'_> {
    /// Indexes of new-row columns whose unchanged TOAST value is not in the change.
    pub fn unchanged(&self) -> impl Iterator<Item = usize> + '_ {
        self.new
            .unwrap_or(&[])
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(v, Value::UnchangedToast))
            .map(|(i, _)| i)
    }

    /// The value of key column `i`: from the old row when there is one, else the new row.
    pub fn key_value(&self, i: usize) -> Value<'_> {
        self.old
            .or(self.new)
            .and_then(|row| row.get(i).copied())
            .unwrap_or(Value::Null)
    }
}

/// (year, month, day) of a day count since 1970-01-01, proleptic Gregorian (year 0 is 1 BC;
/// Howard Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Formats microseconds since 2000-01-01 UTC as `YYYY-MM-DD?HH:MM:SS.ffffff` with `sep`
/// between date and time (`T` for RFC 3339, a space for DMS CSV).
pub fn format_pg_timestamp(micros_since_2000: i64, sep: char) -> String {
    let unix_micros = micros_since_2000.saturating_add(crate::pgoutput::PG_EPOCH_OFFSET_MICROS);
    let secs = unix_micros.div_euclid(1_000_000);
    let frac = unix_micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}{sep}{:02}:{:02}:{:02}.{frac:06}",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// Microseconds since 2000-01-01 UTC, now.
pub fn pg_now() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - crate::pgoutput::PG_EPOCH_OFFSET_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_like_postgres() {
        assert_eq!(format_pg_timestamp(0, 'T'), "2000-01-01T00:00:00.000000");
        // 2024-02-29 12:34:56.789012 UTC
        let unix = 1_709_210_096_789_012i64;
        assert_eq!(
            format_pg_timestamp(unix - crate::pgoutput::PG_EPOCH_OFFSET_MICROS, ' '),
            "2024-02-29 12:34:56.789012"
        );
        assert_eq!(format_pg_timestamp(-1, 'T'), "1999-12-31T23:59:59.999999");
    }
}

pub mod ddl;
pub mod decoder;
