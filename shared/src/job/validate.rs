//! Validate a PG → PG copy: per table, row count and the order-independent checksum of
//! `COPY (SELECT <source columns> ...) TO STDOUT (FORMAT csv)` on source and target (the same
//! [`RowChecksum`] the full load records), and, where they differ, the first differing keys.
//! Reads only; run it once CDC has caught up and the target has applied it.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::config::PgConfig;
use crate::error::{Error, Result};
use crate::format::{CsvRows, RowChecksum, parse_csv_fields};
use crate::selection::Selection;
use crate::source::{self, catalog, quote_ident, quote_qualified};

/// One table's comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableCheck {
    pub schema: String,
    pub table: String,
    pub source_rows: u64,
    pub target_rows: Option<u64>,
    pub source_checksum: RowChecksum,
    pub target_checksum: Option<RowChecksum>,
    pub equal: bool,
    /// Up to ten keys whose rows differ (missing on one side or different values).
    pub differing_keys: Vec<String>,
}

/// The whole comparison; `equal` only when every table is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidateReport {
    pub equal: bool,
    pub tables: Vec<TableCheck>,
}

/// Key-level differences are listed for tables up to this many rows.
const KEY_DIFF_MAX_ROWS: u64 = 2_000_000;

/// Rows of a table as CSV lines: (key text, row checksum), plus count and sum.
async fn scan(
    client: &Client,
    schema: &str,
    table: &str,
    columns: &[String],
    key_cols: &[usize],
    keep: bool,
) -> Result<(u64, RowChecksum, BTreeMap<String, u64>)> {
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let sql = format!(
        "copy (select {} from {}) to stdout with (format csv)",
        cols.join(", "),
        quote_qualified(schema, table)
    );
    let stream = client
        .copy_out(&sql)
        .await
        .map_err(|e| Error::postgres(format!("reading {schema}.{table}"), e))?;
    let mut stream = std::pin::pin!(stream);
    let mut split = CsvRows::new();
    let mut sum = RowChecksum::default();
    let mut rows = 0u64;
    let mut keys = BTreeMap::new();
    let mut fields = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| Error::postgres(format!("reading {schema}.{table}"), e))?;
        split.feed(&piece, |row| {
            sum.add_row(row);
            rows += 1;
            if keep {
                parse_csv_fields(row, &mut fields)?;
                let key: Vec<String> = key_cols
                    .iter()
                    .map(|i| {
                        fields
                            .get(*i)
                            .cloned()
                            .flatten()
                            .map(|b| String::from_utf8_lossy(&b).into_owned())
                            .unwrap_or_default()
                    })
                    .collect();
                let mut one = RowChecksum::default();
                one.add_row(row);
                keys.insert(key.join(","), one.0);
            }
            Ok(())
        })?;
    }
    split.finish()?;
    Ok((rows, sum, keys))
}

/// Compares every selected source table with the target.
pub async fn run(
    source_cfg: &PgConfig,
    target_cfg: &PgConfig,
    selection: &Selection,
) -> Result<ValidateReport> {
    let mut scfg = source_cfg.clone();
    scfg.application_name = "pgshift-validate".to_owned();
    let mut tcfg = target_cfg.clone();
    tcfg.application_name = "pgshift-validate".to_owned();
    let src = source::connect(&scfg).await?;
    let tgt = source::connect(&tcfg).await?;
    let tables = catalog::user_tables(&src, selection).await?;
    let has_root = tables.iter().any(|t| t.kind == 'p');
    let mut out = Vec::new();
    for t in tables.iter().filter(|t| !(has_root && t.is_partition)) {
        let rows = src
            .query(
                "select a.attname::text, coalesce(a.attnum = any(i.indkey), false) from pg_attribute a \
                 left join pg_index i on i.indrelid = a.attrelid and i.indisprimary \
                 where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped order by a.attnum",
                &[&t.oid],
            )
            .await
            .map_err(|e| Error::postgres(format!("reading columns of {}", t.display_name()), e))?;
        let columns: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let mut key_cols: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.get::<_, bool>(1))
            .map(|(i, _)| i)
            .collect();
        if key_cols.is_empty() {
            key_cols = (0..columns.len()).collect();
        }
        let exists: bool = tgt
            .query_one(
                "select to_regclass($1) is not null",
                &[&quote_qualified(&t.schema, &t.name)],
            )
            .await
            .map_err(|e| Error::postgres("checking the target table", e))?
            .get(0);
        let small = (t.estimated_rows as u64) < KEY_DIFF_MAX_ROWS;
        let (srows, ssum, skeys) =
            scan(&src, &t.schema, &t.name, &columns, &key_cols, small).await?;
        if !exists {
            // Nothing was ever staged for an empty table that never changed: a missing target
            // table equals it; with rows on the source it is a difference.
            out.push(TableCheck {
                schema: t.schema.clone(),
                table: t.name.clone(),
                source_rows: srows,
                target_rows: None,
                source_checksum: ssum,
                target_checksum: None,
                equal: srows == 0,
                differing_keys: skeys.keys().take(10).cloned().collect(),
            });
            continue;
        }
        let (trows, tsum, tkeys) =
            scan(&tgt, &t.schema, &t.name, &columns, &key_cols, small).await?;
        let equal = srows == trows && ssum == tsum;
        let mut differing = Vec::new();
        if !equal {
            for (k, h) in &skeys {
                if tkeys.get(k) != Some(h) {
                    differing.push(k.clone());
                }
                if differing.len() >= 10 {
                    break;
                }
            }
            for k in tkeys.keys() {
                if differing.len() >= 10 {
                    break;
                }
                if !skeys.contains_key(k) {
                    differing.push(k.clone());
                }
            }
        }
        out.push(TableCheck {
            schema: t.schema.clone(),
            table: t.name.clone(),
            source_rows: srows,
            target_rows: Some(trows),
            source_checksum: ssum,
            target_checksum: Some(tsum),
            equal,
            differing_keys: differing,
        });
    }
    Ok(ValidateReport {
        equal: out.iter().all(|t| t.equal),
        tables: out,
    })
}
