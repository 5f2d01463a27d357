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
