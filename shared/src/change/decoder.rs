//! pgoutput messages → the row changes to stage, pure (no I/O): a table's schema from its
//! Relation message (plus the catalog's primary key and type names), an UPDATE split into
//! D(old key) + I(new row) when it changes the primary key, unchanged TOAST values filled from
//! a full old row (REPLICA IDENTITY FULL), and the transactions a split peek's half keeps.

use std::collections::HashMap;
use std::sync::Arc;

use crate::lsn::Lsn;
use crate::pgoutput::{self, OldTuple, Value};
use crate::table::{ColumnSchema, TableSchema};

/// What the catalog adds to a Relation message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelationInfo {
    /// Primary-key column names in key order (empty without a primary key).
    pub primary_key: Vec<String>,
    /// `format_type` of each column of the message, in order.
    pub type_names: Vec<String>,
}

/// A relation as seen in this run.
#[derive(Debug, Clone)]
pub struct Relation {
    /// The source's schema (its tuples' columns).
    pub schema: Arc<TableSchema>,
    /// The schema as staged: the names transformation rules give it, removed columns left
    /// out (the same as `schema` without rules).
    pub staged: Arc<TableSchema>,
    /// The source columns staged, by index (`None`: all).
    pub keep: Option<Arc<Vec<usize>>>,
    pub selected: bool,
    /// Key of the stored schema version this shape matches (empty when not selected).
    pub version_key: String,
    /// Indexes of primary-key columns (empty without a primary key).
    pub pk: Vec<usize>,
}

/// A table's schema as of a Relation message: key columns are the primary key's when there is
/// one, else the replica identity's (flagged in the message). Returns it with the primary-key
/// column indexes.
pub fn table_schema(r: &pgoutput::Relation<'_>, info: &RelationInfo) -> (TableSchema, Vec<usize>) {
    let has_pk = !info.primary_key.is_empty();
    let columns: Vec<ColumnSchema> = r
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| ColumnSchema {
            name: c.name.to_owned(),
            type_name: info
                .type_names
                .get(i)
                .cloned()
                .unwrap_or_else(|| c.type_oid.to_string()),
            type_oid: c.type_oid,
            type_modifier: c.type_modifier,
            key: if has_pk {
                info.primary_key.iter().any(|p| p == c.name)
            } else {
                c.is_key()
            },
        })
        .collect();
    let pk = columns
        .iter()
        .enumerate()
        .filter(|(_, c)| has_pk && c.key)
        .map(|(i, _)| i)
        .collect();
    let schema = TableSchema {
        schema: r.namespace.to_owned(),
        table: r.name.to_owned(),
        columns,
        replica_identity: (r.replica_identity as char).to_string(),
    };
    (schema, pk)
}

/// The relations of a run, by relation id.
#[derive(Debug, Default)]
pub struct Relations {
    map: HashMap<u32, Relation>,
}

impl Relations {
    pub fn get(&self, rel_id: u32) -> Option<&Relation> {
        self.map.get(&rel_id)
    }

    /// Whether `schema` is what the run already has for `rel_id` (Relation messages repeat in
    /// every peek; only a changed one needs a schema version).
    pub fn is_current(&self, rel_id: u32, schema: &TableSchema) -> bool {
        self.map.get(&rel_id).is_some_and(|e| {
            e.schema.same_shape(schema)
                && e.schema.schema == schema.schema
                && e.schema.table == schema.table
        })
    }

    pub fn insert(&mut self, rel_id: u32, relation: Relation) {
        self.map.insert(rel_id, relation);
    }
}

/// The rows an UPDATE stages.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRows<'u, 'a> {
    /// The old key (or the whole old row under REPLICA IDENTITY FULL).
    pub old: Option<&'u [Value<'a>]>,
    pub old_is_full: bool,
    /// The new row, unchanged TOAST values filled from a full old row.
    pub new: Vec<Value<'a>>,
    /// The primary key changed: stage D(old) + I(new) instead of U.
    pub key_changed: bool,
}

/// Splits an UPDATE of a relation whose primary-key columns are `pk`.
pub fn update_rows<'u, 'a>(pk: &[usize], u: &'u pgoutput::Update<'a>) -> UpdateRows<'u, 'a> {
    let (old, old_is_full) = match &u.old {
        Some(OldTuple::Key(k)) => (Some(k.0.as_slice()), false),
        Some(OldTuple::Full(f)) => (Some(f.0.as_slice()), true),
        None => (None, false),
    };
    let mut new: Vec<Value<'a>> = u.new.0.clone();
    if let (true, Some(old)) = (old_is_full, old) {
        for (i, v) in new.iter_mut().enumerate() {
            if matches!(v, Value::UnchangedToast)
                && let Some(o @ (Value::Text(_) | Value::Binary(_) | Value::Null)) = old.get(i)
            {
                *v = *o;
            }
        }
    } else if let Some(old) = old {
        // A key column holding an unchanged TOASTed value: the server sends the old key (it
        // logs it when the key is stored out of line), and the key did not change.
        for (i, v) in new.iter_mut().enumerate() {
            if matches!(v, Value::UnchangedToast)
                && let Some(o @ (Value::Text(_) | Value::Binary(_))) = old.get(i)
            {
                *v = *o;
            }
        }
    }
    // Only a table with a primary key can have it changed; others stay updates.
    let key_changed = old.is_some_and(|old| {
        pk.iter().any(|&i| {
            let n = new.get(i).copied().unwrap_or(Value::Null);
            !matches!(n, Value::UnchangedToast) && old.get(i).copied().unwrap_or(Value::Null) != n
        })
    });
    UpdateRows {
        old,
        old_is_full,
        new,
        key_changed,
    }
}

/// The old row of a DELETE, and whether it is whole (REPLICA IDENTITY FULL).
pub fn delete_row<'u, 'a>(d: &'u pgoutput::Delete<'a>) -> (&'u [Value<'a>], bool) {
    match &d.old {
        OldTuple::Key(k) => (&k.0, false),
        OldTuple::Full(f) => (&f.0, true),
    }
}

/// Which transactions of a peek are staged from it: all, or one side of a split point (by
/// the commit record's position, which Begin carries as `final_lsn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    All,
    Below(Lsn),
    From(Lsn),
}

impl Keep {
    pub fn keeps(self, commit: Lsn) -> bool {
        match self {
            Keep::All => true,
            Keep::Below(at) => commit < at,
            Keep::From(at) => commit >= at,
        }
    }

    /// The second half of a split: what the first half did not keep.
    pub fn second_half(self) -> Keep {
        match self {
            Keep::Below(at) => Keep::From(at),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Column, Tuple, Update};

    fn relation<'a>(cols: &'a [(&'a str, bool)]) -> pgoutput::Relation<'a> {
        pgoutput::Relation {
            xid: None,
            rel_id: 7,
            namespace: "public",
            name: "t",
            replica_identity: b'd',
            columns: cols
                .iter()
                .map(|(n, k)| Column {
                    flags: u8::from(*k),
                    name: n,
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    #[test]
    fn keys_come_from_the_primary_key_else_the_replica_identity() {
        let cols = [("id", false), ("a", true)];
        let r = relation(&cols);
        let info = RelationInfo {
            primary_key: vec!["id".to_owned()],
            type_names: vec!["integer".to_owned(), "text".to_owned()],
        };
        let (s, pk) = table_schema(&r, &info);
        assert_eq!(pk, [0]);
        assert!(s.columns[0].key && !s.columns[1].key);
        assert_eq!(s.columns[0].type_name, "integer");
        let (s, pk) = table_schema(&r, &RelationInfo::default());
        assert!(pk.is_empty());
        assert!(!s.columns[0].key && s.columns[1].key);
        assert_eq!(
            s.columns[1].type_name, "25",
            "an unknown type reads as its oid"
        );
    }

    #[test]
    fn a_key_change_splits_and_toast_is_filled_from_a_full_old_row() {
        let u = Update {
            xid: None,
            rel_id: 7,
            old: Some(OldTuple::Full(Tuple(vec![
                Value::Text(b"1"),
                Value::Text(b"big"),
            ]))),
            new: Tuple(vec![Value::Text(b"2"), Value::UnchangedToast]),
        };
        let rows = update_rows(&[0], &u);
        assert!(rows.key_changed && rows.old_is_full);
        assert_eq!(rows.new, [Value::Text(b"2"), Value::Text(b"big")]);
        // Same key, key-only old row: an update keeping the TOAST mark.
        let u = Update {
            xid: None,
            rel_id: 7,
            old: None,
            new: Tuple(vec![Value::Text(b"2"), Value::UnchangedToast]),
        };
        let rows = update_rows(&[0], &u);
        assert!(!rows.key_changed && rows.old.is_none());
        assert_eq!(rows.new[1], Value::UnchangedToast);
        // Without a primary key nothing is a key change.
        let u = Update {
            xid: None,
            rel_id: 7,
            old: Some(OldTuple::Key(Tuple(vec![Value::Text(b"1"), Value::Null]))),
            new: Tuple(vec![Value::Text(b"2"), Value::Null]),
        };
        assert!(!update_rows(&[], &u).key_changed);
    }

    #[test]
    fn split_halves_partition_by_commit_position() {
        let at = Lsn(100);
        for commit in [Lsn(0), Lsn(99), Lsn(100), Lsn(101)] {
            let first = Keep::Below(at).keeps(commit);
            let second = Keep::Below(at).second_half().keeps(commit);
            assert!(first != second, "{commit}: exactly one half");
            assert!(Keep::All.keeps(commit));
        }
    }
}
