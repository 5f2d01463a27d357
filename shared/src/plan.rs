//! Pure chunk planning for the full load.
//!
//! A table is cut into ranges of heap pages (`ctid` ranges, which PostgreSQL 14+ reads with a
//! TID range scan) sized from `pg_class.relpages`, so each chunk reads only its pages and fits
//! well inside one Lambda invocation. The last chunk is open-ended, so rows in pages added after
//! planning are still read. Small tables are one chunk. Before PostgreSQL 14 a ctid range would
//! scan the whole table for every chunk, so there (or when asked) a table with a single-column
//! primary key is cut into key ranges from `ntile` buckets; other tables are one chunk.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The rows one chunk reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChunkRange {
    /// The whole table.
    Whole,
    /// Heap pages `[start, end)`; `end: None` means to the end of the table.
    Pages { start: i64, end: Option<i64> },
    /// Primary-key values `[lower, upper)` of a single-column key (open ends are `None`),
    /// as the key type's text; used before PostgreSQL 14 or when asked.
    Keys {
        column: String,
        type_name: String,
        lower: Option<String>,
        upper: Option<String>,
    },
}

/// How tables are cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Chunking {
    /// Heap page ranges on PostgreSQL 14+, primary-key ranges before.
    #[default]
    Auto,
    /// Primary-key ranges (tables without a single-column primary key stay one chunk).
    Keys,
}

/// A SQL literal of `value` cast to `type_name` (values come from the server's own output).
pub fn literal(value: &str, type_name: &str) -> String {
    format!("'{}'::{type_name}", value.replace('\'', "''"))
}

/// `WHERE` clause of a key range `[lower, upper)` on the quoted column `key`.
pub fn key_range_where(
    key: &str,
    type_name: &str,
    lower: Option<&str>,
    upper: Option<&str>,
) -> String {
    let mut conds = Vec::new();
    if let Some(l) = lower {
        conds.push(format!("{key} >= {}", literal(l, type_name)));
    }
    if let Some(u) = upper {
        conds.push(format!("{key} < {}", literal(u, type_name)));
    }
    if conds.is_empty() {
        String::new()
    } else {
        format!(" where {}", conds.join(" and "))
    }
}

/// Key ranges from the sorted lower bounds of `ntile` buckets: the first is open below, the
/// last open above, so rows outside the sampled values are still covered.
pub fn key_ranges(column: &str, type_name: &str, lows: &[String]) -> Vec<ChunkRange> {
    if lows.len() <= 1 {
        return vec![ChunkRange::Whole];
    }
    (0..lows.len())
        .map(|i| ChunkRange::Keys {
            column: column.to_owned(),
            type_name: type_name.to_owned(),
            lower: if i == 0 { None } else { Some(lows[i].clone()) },
            upper: lows.get(i + 1).cloned(),
        })
        .collect()
}

impl ChunkRange {
    /// The `WHERE` clause that selects the range (empty for the whole table).
    pub fn where_clause(&self) -> String {
        match self {
            ChunkRange::Whole => String::new(),
            ChunkRange::Pages { start, end: None } => format!(" where ctid >= '({start},0)'::tid"),
            ChunkRange::Pages {
                start,
                end: Some(end),
            } => format!(" where ctid >= '({start},0)'::tid and ctid < '({end},0)'::tid"),
            ChunkRange::Keys {
                column,
                type_name,
                lower,
                upper,
            } => key_range_where(
                &crate::source::quote_ident(column),
                type_name,
                lower.as_deref(),
                upper.as_deref(),
            ),
        }
    }
}

/// Planning settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSizing {
    /// Target heap pages per chunk (8 KiB each).
    pub pages_per_chunk: i64,
    /// `server_version_num`.
    pub version_num: i32,
}

impl ChunkSizing {
    /// From a target chunk size in MiB of heap (1 to 65536).
    pub fn from_mib(mib: u64, version_num: i32) -> Result<ChunkSizing> {
        if !(1..=65_536).contains(&mib) {
            return Err(Error::config(
                "chunk size",
                format!("{mib} MiB is not between 1 and 65536 MiB"),
            ));
        }
        Ok(ChunkSizing {
            pages_per_chunk: (mib as i64) * 128,
            version_num,
        })
    }
}

/// Cuts a table of `relpages` pages into chunk ranges.
pub fn plan_table(relpages: i64, sizing: ChunkSizing) -> Vec<ChunkRange> {
    let per = sizing.pages_per_chunk.max(1);
    if sizing.version_num < 140_000 || relpages <= per {
        return vec![ChunkRange::Whole];
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start + per < relpages {
        out.push(ChunkRange::Pages {
            start,
            end: Some(start + per),
        });
        start += per;
    }
    out.push(ChunkRange::Pages { start, end: None });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizing(pages: i64) -> ChunkSizing {
        ChunkSizing {
            pages_per_chunk: pages,
            version_num: 150_000,
        }
    }

    #[test]
    fn small_tables_are_one_chunk() {
        assert_eq!(plan_table(0, sizing(10)), vec![ChunkRange::Whole]);
        assert_eq!(plan_table(10, sizing(10)), vec![ChunkRange::Whole]);
    }

    #[test]
    fn ranges_cover_every_page_once_and_the_last_is_open() {
        let plan = plan_table(25, sizing(10));
        assert_eq!(
            plan,
            vec![
                ChunkRange::Pages {
                    start: 0,
                    end: Some(10)
                },
                ChunkRange::Pages {
                    start: 10,
                    end: Some(20)
                },
                ChunkRange::Pages {
                    start: 20,
                    end: None
                },
            ]
        );
        assert_eq!(
            plan[1].where_clause(),
            " where ctid >= '(10,0)'::tid and ctid < '(20,0)'::tid"
        );
        assert_eq!(plan[2].where_clause(), " where ctid >= '(20,0)'::tid");
    }

    #[test]
    fn key_ranges_are_open_at_both_ends_and_quoted() {
        let lows = vec!["1".to_owned(), "o'k".to_owned(), "z".to_owned()];
        let r = key_ranges("Id", "text", &lows);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].where_clause(), " where \"Id\" < 'o''k'::text");
        assert_eq!(
            r[1].where_clause(),
            " where \"Id\" >= 'o''k'::text and \"Id\" < 'z'::text"
        );
        assert_eq!(r[2].where_clause(), " where \"Id\" >= 'z'::text");
        assert_eq!(
            key_ranges("id", "int", &["1".to_owned()]),
            vec![ChunkRange::Whole]
        );
    }

    #[test]
    fn before_14_a_table_is_one_chunk() {
        let s = ChunkSizing {
            pages_per_chunk: 10,
            version_num: 130_000,
        };
        assert_eq!(plan_table(1000, s), vec![ChunkRange::Whole]);
    }

    #[test]
    fn impossible_sizes_are_rejected() {
        assert!(ChunkSizing::from_mib(0, 150_000).is_err());
        assert!(
            ChunkSizing::from_mib(1 << 20, 150_000)
                .unwrap_err()
                .to_string()
                .contains("chunk size")
        );
        assert_eq!(
            ChunkSizing::from_mib(1, 150_000).unwrap().pages_per_chunk,
            128
        );
    }

    proptest::proptest! {
        #[test]
        fn plans_are_contiguous(relpages in 0i64..100_000, per in 1i64..5_000) {
            let plan = plan_table(relpages, sizing(per));
            let mut next = 0;
            for (i, r) in plan.iter().enumerate() {
                match r {
                    ChunkRange::Whole => proptest::prop_assert_eq!(plan.len(), 1),
                    ChunkRange::Keys { .. } => proptest::prop_assert!(false, "page plans have no key ranges"),
                    ChunkRange::Pages { start, end } => {
                        proptest::prop_assert_eq!(*start, next);
                        match end {
                            Some(e) => { proptest::prop_assert!(*e > *start); next = *e; }
                            None => proptest::prop_assert_eq!(i, plan.len() - 1),
                        }
                    }
                }
            }
        }
    }
}
