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

/// Days since 1970-01-01 of a proleptic Gregorian date (the inverse of [`civil_from_days`]).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A point in time as a user writes it — `2026-12-02T10:00:00`, with a space for the `T`,
/// fractional seconds (up to 6 digits) and `Z` or an offset (`+01:00`, `-0530`, `+01`) allowed;
/// without an offset it is UTC, as DMS reads `commit_time:` — to microseconds since
/// 2000-01-01 UTC (PostgreSQL's commit timestamps). `None` when it is not one.
pub fn parse_utc_timestamp(text: &str) -> Option<i64> {
    let t = text.trim();
    let date = t.get(..10)?;
    let rest = t.get(10..)?;
    let rest = rest.strip_prefix('T').or_else(|| rest.strip_prefix(' '))?;
    let mut dp = date.split('-');
    let (y, m, d) = (dp.next()?, dp.next()?, dp.next()?);
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let num = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (y, m, d) = (num(y)?, num(m)?, num(d)?);
    let month_days = [
        31,
        28 + i64::from(y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)),
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&m) || d < 1 || d > month_days[(m - 1) as usize] {
        return None;
    }
    // The offset: `Z`, or a sign after the seconds.
    let (time, offset_secs) = if let Some(time) = rest.strip_suffix('Z') {
        (time, 0)
    } else if let Some(at) = rest.rfind(['+', '-']) {
        let (time, off) = rest.split_at(at);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let digits: String = off[1..].chars().filter(|c| *c != ':').collect();
        let (h, mi) = match digits.len() {
            2 => (num(&digits)?, 0),
            4 => (num(&digits[..2])?, num(&digits[2..])?),
            _ => return None,
        };
        if h > 15 || mi > 59 {
            return None;
        }
        (time, sign * (h * 3600 + mi * 60))
    } else {
        (rest, 0)
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut hp = hms.split(':');
    let (h, mi, s) = (hp.next()?, hp.next()?, hp.next()?);
    if hp.next().is_some() || h.len() != 2 || mi.len() != 2 || s.len() != 2 {
        return None;
    }
    let (h, mi, s) = (num(h)?, num(mi)?, num(s)?);
    if h > 23 || mi > 59 || s > 59 || frac.len() > 6 || (time.contains('.') && frac.is_empty()) {
        return None;
    }
    let micros = if frac.is_empty() {
        0
    } else {
        num(&format!("{frac:0<6}"))?
    };
    let unix_secs = days_from_civil(y, m, d) * 86_400 + h * 3600 + mi * 60 + s - offset_secs;
    Some(unix_secs * 1_000_000 + micros - crate::pgoutput::PG_EPOCH_OFFSET_MICROS)
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
    fn user_times_parse_as_utc_unless_they_say_otherwise() {
        let at = |t| parse_utc_timestamp(t).map(|v| format_pg_timestamp(v, 'T'));
        let want = Some("2026-12-02T10:00:00.000000".to_owned());
        for t in [
            "2026-12-02T10:00:00",
            "2026-12-02 10:00:00",
            "2026-12-02T10:00:00Z",
            "2026-12-02T11:00:00+01:00",
            "2026-12-02T11:00:00+0100",
            "2026-12-02T11:00:00+01",
            "2026-12-02T04:30:00-05:30",
            " 2026-12-02T10:00:00.000 ",
        ] {
            assert_eq!(at(t), want, "{t}");
        }
        assert_eq!(
            at("2024-02-29T23:59:59.5"),
            Some("2024-02-29T23:59:59.500000".to_owned())
        );
        assert_eq!(
            at("1999-12-31T23:59:59.999999"),
            Some("1999-12-31T23:59:59.999999".to_owned())
        );
        assert_eq!(parse_utc_timestamp("2000-01-01T00:00:00"), Some(0));
        for bad in [
            "2026-12-02",
            "2026-12-02T10:00",
            "2026-02-29T10:00:00",
            "2026-13-01T10:00:00",
            "2026-12-02T24:00:00",
            "2026-12-02T10:00:00.",
            "2026-12-02T10:00:00.1234567",
            "2026-12-02T10:00:00+1",
            "2026-12-02T10:00:00+99:00",
            "26-12-02T10:00:00",
            "2026-12-02X10:00:00",
            "2026-12-02T10:00:00 UTC",
            "2026-1२-02T10:00:00",
            "",
        ] {
            assert_eq!(parse_utc_timestamp(bad), None, "{bad}");
        }
    }

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
