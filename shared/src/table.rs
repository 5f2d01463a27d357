//! A table's schema as the catalog and the WAL describe it: used by every layer (source,
//! change, staging, apply).

use serde::{Deserialize, Serialize};

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnSchema {
    pub name: String,
    /// `format_type` of the column (`numeric(12,2)`, `text[]`, ...).
    #[serde(rename = "type")]
    pub type_name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Part of the primary key (or, without one, of the replica identity).
    pub key: bool,
}

impl ColumnSchema {
    /// Whether two equal values of its type can be spelt differently (`5` and `5.000`, `A`
    /// and `a` under a case-insensitive collation): then a key's new spelling must be written
    /// even when an equal key is already there. Integer keys cannot (and an identity column,
    /// which is one, cannot be set).
    pub fn spellings_differ(&self) -> bool {
        !matches!(self.type_oid, 20 | 21 | 23 | 26)
    }
}

/// A table as of one schema version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSchema {
    pub schema: String,
    pub table: String,
    pub columns: Vec<ColumnSchema>,
    /// `relreplident`: `d`, `n`, `f` or `i`.
    pub replica_identity: String,
}

impl TableSchema {
    /// Indexes of the key columns.
    pub fn key_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
    }

    /// Same columns (names and types) as `other`: no new schema version needed.
    pub fn same_shape(&self, other: &TableSchema) -> bool {
        self.columns.len() == other.columns.len()
            && self.columns.iter().zip(&other.columns).all(|(a, b)| {
                a.name == b.name
                    && a.type_oid == b.type_oid
                    && a.type_modifier == b.type_modifier
                    && a.key == b.key
            })
    }
}
