//! CDC file keys (a batch's file per table, its later parts, date folders) and which changes
//! CDC stages: the part of the layout DMS's CDC settings shape.

use serde::{Deserialize, Serialize};

use super::table_prefix;
use crate::lsn::Lsn;
use crate::staging::encode::Format;

/// `<schema>/<table>/cdc/<C>.<ext>`.
pub fn cdc_file_key(schema: &str, table: &str, start: Lsn, format: Format) -> String {
    format!(
        "{}/cdc/{}.{}",
        table_prefix(schema, table),
        start.key_hex(),
        format.ext()
    )
}

/// A table's file of a batch: part 0 at [`cdc_file_key`], a later part (Parquet, after the
/// table's columns changed within the batch) at `<schema>/<table>/cdc/<C>_<part+1:04>.<ext>`
/// — after part 0 and before the next batch in name order. With date partitions (DMS's
/// `DatePartitionEnabled`) the date folders come after `cdc/`: `cdc/2026/12/02/<C>.<ext>`.
pub fn cdc_part_key(
    schema: &str,
    table: &str,
    start: Lsn,
    format: Format,
    part: u32,
    date: Option<&str>,
) -> String {
    let folder = match date {
        Some(d) if !d.is_empty() => format!("{}/cdc/{d}", table_prefix(schema, table)),
        _ => format!("{}/cdc", table_prefix(schema, table)),
    };
    if part == 0 {
        return format!("{folder}/{}.{}", start.key_hex(), format.ext());
    }
    format!(
        "{folder}/{}_{:04}.{}",
        start.key_hex(),
        part + 1,
        format.ext()
    )
}

/// A batch's transaction file (DMS's `PreserveTransactions`): `<cdc_path>/CDC_TXN-<time>.csv`
/// (`.csv.gz` with GZIP), its time `yyyyMMddHHmmssSSS` UTC of `unix_ms`, as DMS names them.
/// Always CSV, whatever the data format, as in DMS.
pub fn transaction_file_key(cdc_path: &str, unix_ms: i64, gzip: bool) -> String {
    let secs = unix_ms.div_euclid(1000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = crate::change::civil_from_days(days);
    format!(
        "{cdc_path}/CDC_TXN-{y:04}{m:02}{d:02}{:02}{:02}{:02}{:03}.{}",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        unix_ms.rem_euclid(1000),
        if gzip { "csv.gz" } else { "csv" }
    )
}

/// The time in a batch's transaction file name: its first staged transaction's commit time
/// (µs since 2000-01-01), in ms since the Unix epoch — or 1 ms after the task's previous
/// file when that is not earlier, so names sort in commit order (commit timestamps need not).
pub fn transaction_file_ms(first_commit_ts: i64, previous_ms: Option<i64>) -> i64 {
    let ms = (first_commit_ts + crate::pgoutput::PG_EPOCH_OFFSET_MICROS).div_euclid(1000);
    match previous_ms {
        Some(p) if p >= ms => p + 1,
        _ => ms,
    }
}

/// The transaction file of a batch, as its manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionFile {
    pub key: String,
    /// The time in its name (ms since the Unix epoch).
    pub unix_ms: i64,
    pub rows: u64,
    pub bytes: u64,
    /// xxh3-64 of the stored bytes.
    pub checksum: String,
}

/// The order of a date partition's parts (DMS's `DatePartitionSequence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateSequence {
    Yyyymmdd,
    Yyyymmddhh,
    Yyyymm,
    Mmyyyydd,
    Ddmmyyyy,
}

/// CDC files in date folders by their transaction's commit date, UTC (DMS's
/// `DatePartitionEnabled`, `DatePartitionSequence`, `DatePartitionDelimiter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatePartition {
    pub sequence: DateSequence,
    /// `/` (SLASH), `_` (UNDERSCORE), `-` (DASH) or nothing (NONE).
    pub delimiter: &'static str,
}

impl DatePartition {
    /// The folder of a commit at `commit_ts` (microseconds since 2000-01-01 UTC).
    pub fn path(&self, commit_ts: i64) -> String {
        let secs = commit_ts.div_euclid(1_000_000) + 946_684_800;
        let days = secs.div_euclid(86_400);
        let hour = secs.rem_euclid(86_400) / 3600;
        let (y, m, d) = crate::change::civil_from_days(days);
        let (y, m, d, h) = (
            format!("{y:04}"),
            format!("{m:02}"),
            format!("{d:02}"),
            format!("{hour:02}"),
        );
        let parts: Vec<&str> = match self.sequence {
            DateSequence::Yyyymmdd => vec![&y, &m, &d],
            DateSequence::Yyyymmddhh => vec![&y, &m, &d, &h],
            DateSequence::Yyyymm => vec![&y, &m],
            DateSequence::Mmyyyydd => vec![&m, &y, &d],
            DateSequence::Ddmmyyyy => vec![&d, &m, &y],
        };
        parts.join(self.delimiter)
    }
}

/// Which changes CDC stages (DMS's `CdcInsertsOnly`, `CdcInsertsAndUpdates`): every one, or
/// only inserts (and updates) for an append-only consumer. A stage that is not `All` cannot
/// be applied to a target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CdcOps {
    #[default]
    All,
    InsertsOnly,
    InsertsAndUpdates,
}

impl CdcOps {
    /// Whether changes of `op` are staged.
    pub fn keeps(self, op: crate::change::Op) -> bool {
        use crate::change::Op;
        match self {
            CdcOps::All => true,
            CdcOps::InsertsOnly => op == Op::Insert,
            CdcOps::InsertsAndUpdates => matches!(op, Op::Insert | Op::Update),
        }
    }

    pub fn is_all(&self) -> bool {
        *self == CdcOps::All
    }

    /// The DMS setting that asked for it.
    pub fn setting(self) -> &'static str {
        match self {
            CdcOps::All => "none",
            CdcOps::InsertsOnly => "CdcInsertsOnly",
            CdcOps::InsertsAndUpdates => "CdcInsertsAndUpdates",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_files_are_named_as_dms_names_them_and_sort_in_commit_order() {
        // 2020-11-17 15:30:46.033 UTC, as in DMS's example (CDC_TXN-20201117153046033.csv).
        let unix_ms = 1_605_627_046_033;
        assert_eq!(
            transaction_file_key("txn", unix_ms, false),
            "txn/CDC_TXN-20201117153046033.csv"
        );
        assert_eq!(
            transaction_file_key("a/b", unix_ms, true),
            "a/b/CDC_TXN-20201117153046033.csv.gz"
        );
        let pg_us = (unix_ms * 1000 + 999) - crate::pgoutput::PG_EPOCH_OFFSET_MICROS;
        assert_eq!(transaction_file_ms(pg_us, None), unix_ms);
        assert_eq!(transaction_file_ms(pg_us, Some(unix_ms - 5)), unix_ms);
        // A commit time not after the previous file's (same ms, or a clock step back): 1 ms on.
        assert_eq!(transaction_file_ms(pg_us, Some(unix_ms)), unix_ms + 1);
        assert_eq!(transaction_file_ms(pg_us, Some(unix_ms + 40)), unix_ms + 41);
    }
}
