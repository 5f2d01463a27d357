//! Validate a PG → PG copy: per table and per primary-key range, row count and the
//! order-independent checksum of `COPY (SELECT <source columns> ...) TO STDOUT (FORMAT csv)` on
//! source and target (the same [`RowChecksum`] the full load records), and, where they differ,
//! the differing ranges and the first differing keys. Ranges are cut on the source by `ntile`
//! over a single-column primary key (the load's ctid chunks mean nothing on the target); other
//! tables are one range. Reads only; run it once CDC has caught up and the target applied it.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::config::PgConfig;
use crate::error::{Error, Result};
use crate::selection::Selection;
use crate::source::copy_text::RowChecksum;
use crate::source::{self, catalog, quote_ident, quote_qualified};
use crate::staging::decode::{CsvRows, parse_csv_fields};

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
    /// Primary-key ranges compared (1 when the table is not cut).
    pub ranges: usize,
    /// The ranges whose count or checksum differ.
    pub differing_ranges: Vec<RangeCheck>,
    /// Up to ten keys whose rows differ (missing on one side or different values).
    pub differing_keys: Vec<String>,
    /// Columns missing on the target, only on the target, or of another type there.
    #[serde(default)]
    pub schema_differences: Vec<String>,
}

/// One primary-key range `[lower, upper)` (open ends are `None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RangeCheck {
    pub lower: Option<String>,
    pub upper: Option<String>,
    pub source_rows: u64,
    pub target_rows: u64,
}

/// Rows per compared range by default.
pub const DEFAULT_RANGE_ROWS: u64 = 100_000;

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
    filter: &str,
) -> Result<(u64, RowChecksum, BTreeMap<String, u64>)> {
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let sql = format!(
        "copy (select {} from {}{filter}) to stdout with (format csv)",
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
    run_with_ranges(source_cfg, target_cfg, selection, DEFAULT_RANGE_ROWS).await
}

/// [`run`] with ranges of about `range_rows` rows.
pub async fn run_with_ranges(
    source_cfg: &PgConfig,
    target_cfg: &PgConfig,
    selection: &Selection,
    range_rows: u64,
) -> Result<ValidateReport> {
    run_with_progress(source_cfg, target_cfg, selection, range_rows, None).await
}

/// [`run_with_ranges`], counting for a progress display: the tables (total, and checked) and
/// the source rows compared so far.
pub async fn run_with_progress(
    source_cfg: &PgConfig,
    target_cfg: &PgConfig,
    selection: &Selection,
    range_rows: u64,
    progress: Option<&crate::progress::Progress>,
) -> Result<ValidateReport> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut scfg = source_cfg.clone();
    scfg.application_name = "pgshift-validate".to_owned();
    let mut tcfg = target_cfg.clone();
    tcfg.application_name = "pgshift-validate".to_owned();
    let src = source::connect(&scfg).await?;
    let tgt = source::connect(&tcfg).await?;
    let tables = catalog::user_tables(&src, selection).await?;
    let has_root = tables.iter().any(|t| t.kind == 'p');
    let mut out = Vec::new();
    let checked: Vec<_> = tables
        .iter()
        .filter(|t| !(has_root && t.is_partition))
        .collect();
    if let Some(p) = progress {
        p.chunks_total.store(checked.len() as u64, Relaxed);
    }
    for t in checked {
        out.push(check_table(&src, &tgt, t, selection, range_rows, progress).await?);
        if let Some(p) = progress {
            p.chunks_done.fetch_add(1, Relaxed);
        }
    }
    Ok(ValidateReport {
        equal: out.iter().all(|t| t.equal),
        tables: out,
    })
}

/// A table's key ranges: `[lower, upper)` bounds and the key (quoted) and its type to cut
/// them with; one open range when the table is not cut.
type Ranges = (
    Vec<(Option<String>, Option<String>)>,
    Option<(String, String)>,
);

/// Primary-key ranges of about `range_rows` rows, cut on the source (single-column keys).
async fn key_ranges(
    src: &Client,
    t: &catalog::TableInfo,
    cols: &catalog::Columns,
    range_rows: u64,
) -> Result<Ranges> {
    let whole = (vec![(None, None)], None);
    let [key] = cols.key_order.as_slice() else {
        return Ok(whole);
    };
    if t.estimated_rows <= range_rows as f64 {
        return Ok(whole);
    }
    let key = &cols.columns[*key];
    let buckets = (t.estimated_rows / range_rows as f64).ceil().max(1.0) as i32;
    let lows = catalog::key_range_lows(src, &t.schema, &t.name, &key.name, buckets).await?;
    if lows.len() <= 1 {
        return Ok(whole);
    }
    let bounds = (0..lows.len())
        .map(|i| {
            (
                if i == 0 { None } else { Some(lows[i].clone()) },
                lows.get(i + 1).cloned(),
            )
        })
        .collect();
    Ok((
        bounds,
        Some((quote_ident(&key.name), key.type_name.clone())),
    ))
}

/// One side's scan of a table: rows, checksum, and per-key row checksums (small tables).
#[derive(Default)]
struct Side {
    rows: u64,
    sum: RowChecksum,
    keys: BTreeMap<String, u64>,
}

async fn check_table(
    src: &Client,
    tgt: &Client,
    t: &catalog::TableInfo,
    selection: &Selection,
    range_rows: u64,
    progress: Option<&crate::progress::Progress>,
) -> Result<TableCheck> {
    let cols = catalog::table_columns(src, t.oid, &t.display_name()).await?;
    // Under transformation rules the target holds the staged names, without removed columns.
    let (staged, keep) = selection.stage_schema(&crate::table::TableSchema {
        schema: t.schema.clone(),
        table: t.name.clone(),
        columns: cols.columns.clone(),
        replica_identity: t.replica_identity.to_string(),
    })?;
    let read: Vec<usize> = keep.unwrap_or_else(|| (0..cols.columns.len()).collect());
    let columns: Vec<String> = read.iter().map(|&i| cols.columns[i].name.clone()).collect();
    let target_columns: Vec<String> = staged.columns.iter().map(|c| c.name.clone()).collect();
    let (tschema, ttable) = (staged.schema.as_str(), staged.table.as_str());
    let key_cols: Vec<usize> = if cols.key_order.is_empty() {
        (0..columns.len()).collect()
    } else {
        cols.key_order
            .iter()
            .filter_map(|k| read.iter().position(|i| i == k))
            .collect()
    };
    let exists: bool = tgt
        .query_one(
            "select to_regclass($1) is not null",
            &[&quote_qualified(tschema, ttable)],
        )
        .await
        .map_err(|e| Error::postgres("checking the target table", e))?
        .get(0);
    let schema_differences = if exists {
        column_differences(tgt, tschema, ttable, &staged.columns).await?
    } else {
        Vec::new()
    };
    // Without a source column on the target its rows cannot be compared: counted only.
    let comparable = !schema_differences
        .iter()
        .any(|d| d.contains("missing on the target"));
    let small = (t.estimated_rows as u64) < KEY_DIFF_MAX_ROWS;
    let (bounds, key_sql) = key_ranges(src, t, &cols, range_rows).await?;
    let (mut s, mut d) = (Side::default(), Side::default());
    let mut differing_ranges = Vec::new();
    // The key's name on the target (the same without transformation rules).
    let target_key = cols
        .key_order
        .first()
        .and_then(|k| read.iter().position(|i| i == k))
        .map(|p| quote_ident(&target_columns[p]));
    for (lower, upper) in &bounds {
        let (f, tf) = match (&key_sql, &target_key) {
            (Some((key, ty)), Some(tkey)) => (
                crate::plan::key_range_where(key, ty, lower.as_deref(), upper.as_deref()),
                crate::plan::key_range_where(tkey, ty, lower.as_deref(), upper.as_deref()),
            ),
            _ => (String::new(), String::new()),
        };
        let (r, sum, keys) = scan(src, &t.schema, &t.name, &columns, &key_cols, small, &f).await?;
        if let Some(p) = progress {
            p.rows.fetch_add(r, std::sync::atomic::Ordering::Relaxed);
        }
        s.rows += r;
        s.sum = s.sum.combine(sum);
        s.keys.extend(keys);
        if !exists {
            continue;
        }
        if !comparable {
            d.rows += count_rows(tgt, tschema, ttable, &tf).await?;
            continue;
        }
        let (tr, tsm, tk) =
            scan(tgt, tschema, ttable, &target_columns, &key_cols, small, &tf).await?;
        d.rows += tr;
        d.sum = d.sum.combine(tsm);
        d.keys.extend(tk);
        if r != tr || sum != tsm {
            differing_ranges.push(RangeCheck {
                lower: lower.clone(),
                upper: upper.clone(),
                source_rows: r,
                target_rows: tr,
            });
        }
    }
    // Nothing was ever staged for an empty table that never changed: a missing target table
    // equals it; with rows on the source it is a difference.
    let equal = if exists {
        schema_differences.is_empty() && s.rows == d.rows && s.sum == d.sum
    } else {
        s.rows == 0
    };
    let differing_keys = match (exists, equal) {
        (false, _) => s.keys.keys().take(10).cloned().collect(),
        (true, true) => Vec::new(),
        (true, false) if !comparable => Vec::new(),
        (true, false) => differing_keys(&s.keys, &d.keys),
    };
    Ok(TableCheck {
        schema: t.schema.clone(),
        table: t.name.clone(),
        source_rows: s.rows,
        target_rows: exists.then_some(d.rows),
        source_checksum: s.sum,
        target_checksum: exists.then_some(d.sum),
        equal,
        ranges: bounds.len(),
        differing_ranges,
        differing_keys,
        schema_differences,
    })
}

/// How the target table's columns differ from the source's (by name; types by `format_type`).
async fn column_differences(
    tgt: &Client,
    schema: &str,
    table: &str,
    source: &[crate::table::ColumnSchema],
) -> Result<Vec<String>> {
    let name = quote_qualified(schema, table);
    let oid: u32 = tgt
        .query_one("select to_regclass($1)::oid", &[&name])
        .await
        .map_err(|e| Error::postgres("checking the target table", e))?
        .get(0);
    let target = catalog::table_columns(tgt, oid, &name).await?;
    let mut out = Vec::new();
    for c in source {
        match target.columns.iter().find(|x| x.name == c.name) {
            None => out.push(format!(
                "column {} ({}) missing on the target",
                quote_ident(&c.name),
                c.type_name
            )),
            Some(x) if x.type_name != c.type_name => out.push(format!(
                "column {}: {} on the source, {} on the target",
                quote_ident(&c.name),
                c.type_name,
                x.type_name
            )),
            Some(_) => {}
        }
    }
    for x in &target.columns {
        if !source.iter().any(|c| c.name == x.name) {
            out.push(format!(
                "column {} ({}) only on the target",
                quote_ident(&x.name),
                x.type_name
            ));
        }
    }
    Ok(out)
}

/// The target's rows in a range (when its columns cannot be compared).
async fn count_rows(tgt: &Client, schema: &str, table: &str, filter: &str) -> Result<u64> {
    // `filter` is empty or ` where ..` (as for `scan`).
    let sql = format!(
        "select count(*) from {}{filter}",
        quote_qualified(schema, table)
    );
    let n: i64 = tgt
        .query_one(&sql, &[])
        .await
        .map_err(|e| Error::postgres("counting target rows", e))?
        .get(0);
    Ok(n as u64)
}

/// Up to ten keys whose rows differ: missing on the target or different, then extra there.
fn differing_keys(source: &BTreeMap<String, u64>, target: &BTreeMap<String, u64>) -> Vec<String> {
    let changed = source
        .iter()
        .filter(|(k, h)| target.get(*k) != Some(*h))
        .map(|(k, _)| k.clone());
    let extra = target.keys().filter(|k| !source.contains_key(*k)).cloned();
    changed.chain(extra).take(10).collect()
}
