//! Schema changes (DESIGN §12), pure (no I/O): a table's definition as the source's catalog
//! gives it ([`DEFINITION_SQL`], read by the task's event trigger at `ddl_command_end` and sent
//! as a transactional logical message, or read by the poller when a Relation message differs
//! and no message explained it), and the meaning of a change as the difference between two
//! definitions of one relation ([`diff`]): columns are matched by attribute number, so a
//! rename is a rename (never a drop and an add that lose the values), and the relation by its
//! id, so `ALTER TABLE .. RENAME` / `SET SCHEMA` move the table instead of starting another.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::source::{quote_ident, quote_qualified};
use crate::table::{ColumnSchema, TableSchema};

/// The logical messages of task publication `publication` start with this.
pub fn message_prefix(publication: &str) -> String {
    format!("pgshift_ddl:{publication}")
}

/// One relation's definition as JSON text, for the relation id `$1` (an `oid`): used as is by
/// the event trigger (`execute .. using`) and by the poller and the full load.
pub const DEFINITION_SQL: &str = r#"select json_build_object(
 'relid', c.oid::int8, 'schema', n.nspname, 'table', c.relname, 'kind', c.relkind,
 'replica_identity', c.relreplident,
 'partition_of', (select quote_ident(pn.nspname) || '.' || quote_ident(pc.relname) from pg_inherits i
   join pg_class pc on pc.oid = i.inhparent join pg_namespace pn on pn.oid = pc.relnamespace
   where i.inhrelid = c.oid and c.relispartition),
 'partition_bound', case when c.relispartition then pg_get_expr(c.relpartbound, c.oid) end,
 'partition_key', case when c.relkind = 'p' then pg_get_partkeydef(c.oid) end,
 'root', (select json_build_object('schema', rn.nspname, 'table', rc.relname) from pg_class rc
   join pg_namespace rn on rn.oid = rc.relnamespace
   where c.relispartition and rc.oid = pg_partition_root(c.oid)),
 'partitions', case when c.relkind = 'p' then coalesce((select json_agg(json_build_object(
   'relid', pc.oid::int8, 'schema', pn.nspname, 'table', pc.relname,
   'bound', pg_get_expr(pc.relpartbound, pc.oid),
   'key', case when pc.relkind = 'p' then pg_get_partkeydef(pc.oid) end) order by pc.oid)
   from pg_inherits i join pg_class pc on pc.oid = i.inhrelid
   join pg_namespace pn on pn.oid = pc.relnamespace where i.inhparent = c.oid), '[]'::json) end,
 'primary_key', coalesce((select json_agg(a.attname order by k.ord) from pg_index i
   join lateral unnest(i.indkey) with ordinality k(attnum, ord) on true
   join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
   where i.indrelid = c.oid and i.indisprimary and k.ord <= i.indnkeyatts), '[]'::json),
 'identity_key', coalesce((select json_agg(a.attname order by k.ord) from pg_index i
   join lateral unnest(i.indkey) with ordinality k(attnum, ord) on true
   join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
   where i.indrelid = c.oid and i.indisreplident and k.ord <= i.indnkeyatts), '[]'::json),
 'columns', coalesce((select json_agg(json_build_object(
   'attnum', a.attnum, 'name', a.attname, 'type', format_type(a.atttypid, nullif(a.atttypmod, -1)),
   'type_oid', a.atttypid::int8, 'type_modifier', a.atttypmod, 'not_null', a.attnotnull,
   'default', case when a.attgenerated = '' then pg_get_expr(ad.adbin, ad.adrelid) end,
   'generated', case when a.attgenerated <> '' then pg_get_expr(ad.adbin, ad.adrelid) end,
   'stored', a.attgenerated = 's',
   'identity', case when a.attidentity <> '' then a.attidentity::text end,
   'collation', (select quote_ident(cn.nspname) || '.' || quote_ident(co.collname) from pg_collation co
      join pg_namespace cn on cn.oid = co.collnamespace
      where co.oid = a.attcollation and a.attcollation <> ty.typcollation),
   'missing', case when a.atthasmissing then (a.attmissingval::text::text[])[1] end
   ) order by a.attnum) from pg_attribute a join pg_type ty on ty.oid = a.atttypid
   left join pg_attrdef ad on ad.adrelid = a.attrelid and ad.adnum = a.attnum
   where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped), '[]'::json)
)::text from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = $1"#;

/// One column of a definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefColumn {
    pub attnum: i16,
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    pub not_null: bool,
    /// The default expression (`pg_get_expr`), not for generated columns.
    #[serde(default)]
    pub default: Option<String>,
    /// A generated column's expression.
    #[serde(default)]
    pub generated: Option<String>,
    #[serde(default)]
    pub stored: bool,
    /// `a` (always) or `d` (by default) for identity columns.
    #[serde(default)]
    pub identity: Option<String>,
    /// A collation other than the type's, qualified and quoted.
    #[serde(default)]
    pub collation: Option<String>,
    /// The value rows that existed when the column was added got (`attmissingval`).
    #[serde(default)]
    pub missing: Option<String>,
}

/// A relation's definition at one point of the WAL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDefinition {
    pub relid: u32,
    pub schema: String,
    pub table: String,
    /// `relkind`: `r` or `p`.
    pub kind: String,
    pub replica_identity: String,
    #[serde(default)]
    pub primary_key: Vec<String>,
    #[serde(default)]
    pub identity_key: Vec<String>,
    pub columns: Vec<DefColumn>,
    /// A partition's parent, qualified and quoted, and its bound (`FOR VALUES ..`).
    #[serde(default)]
    pub partition_of: Option<String>,
    #[serde(default)]
    pub partition_bound: Option<String>,
    /// A partitioned table's key (`RANGE (k)`).
    #[serde(default)]
    pub partition_key: Option<String>,
    /// A partition's top-most root (its rows are published through it).
    #[serde(default)]
    pub root: Option<Root>,
    /// A partitioned table's direct partitions.
    #[serde(default)]
    pub partitions: Option<Vec<PartitionDef>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    pub schema: String,
    pub table: String,
}

/// One partition of a partitioned table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionDef {
    pub relid: u32,
    pub schema: String,
    pub table: String,
    /// `FOR VALUES ..` or `DEFAULT`.
    pub bound: String,
    /// Its own partition key when it is partitioned too.
    #[serde(default)]
    pub key: Option<String>,
}

impl TableDefinition {
    /// The columns pgoutput sends (generated ones are left out), keyed as a Relation message
    /// with the catalog's primary key makes them.
    pub fn row_schema(&self) -> TableSchema {
        let columns = self
            .columns
            .iter()
            .filter(|c| c.generated.is_none())
            .map(|c| ColumnSchema {
                name: c.name.clone(),
                type_name: c.type_name.clone(),
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
                key: if !self.primary_key.is_empty() {
                    self.primary_key.contains(&c.name)
                } else {
                    match self.replica_identity.as_str() {
                        "f" => true,
                        "i" => self.identity_key.contains(&c.name),
                        _ => false,
                    }
                },
            })
            .collect();
        TableSchema {
            schema: self.schema.clone(),
            table: self.table.clone(),
            columns,
            replica_identity: self.replica_identity.clone(),
        }
    }

    pub fn qualified(&self) -> String {
        quote_qualified(&self.schema, &self.table)
    }

    /// `CREATE TABLE IF NOT EXISTS` with the columns (defaults, identity, generated
    /// expressions, `NOT NULL`) and the primary key.
    pub fn create_sql(&self) -> String {
        if let (Some(parent), Some(bound)) = (&self.partition_of, &self.partition_bound) {
            let key = self
                .partition_key
                .as_ref()
                .map(|k| format!(" partition by {k}"))
                .unwrap_or_default();
            return format!(
                "create table if not exists {} partition of {parent} {bound}{key}",
                self.qualified()
            );
        }
        let mut parts: Vec<String> = self.columns.iter().map(column_definition).collect();
        if !self.primary_key.is_empty() {
            let pk: Vec<String> = self.primary_key.iter().map(|c| quote_ident(c)).collect();
            parts.push(format!("primary key ({})", pk.join(", ")));
        } else if self.replica_identity == "i" && !self.identity_key.is_empty() {
            // The replica identity index: what apply's upserts match rows on.
            let key: Vec<String> = self.identity_key.iter().map(|c| quote_ident(c)).collect();
            parts.push(format!("unique ({})", key.join(", ")));
        }
        let partitioned = match &self.partition_key {
            Some(k) if self.kind == "p" => format!(" partition by {k}"),
            _ => String::new(),
        };
        format!(
            "create table if not exists {} ({}){partitioned}",
            self.qualified(),
            parts.join(", ")
        )
    }

    fn column(&self, attnum: i16) -> Option<&DefColumn> {
        self.columns.iter().find(|c| c.attnum == attnum)
    }
}

/// `name type [collate] [identity | generated | default] [not null]`.
pub fn column_definition(c: &DefColumn) -> String {
    let mut s = format!("{} {}", quote_ident(&c.name), c.type_name);
    if let Some(coll) = &c.collation {
        s.push_str(&format!(" collate {coll}"));
    }
    match (&c.identity, &c.generated, &c.default) {
        (Some(i), _, _) if i == "a" => s.push_str(" generated always as identity"),
        (Some(_), _, _) => s.push_str(" generated by default as identity"),
        (None, Some(g), _) if c.stored => s.push_str(&format!(" generated always as ({g}) stored")),
        (None, Some(g), _) => s.push_str(&format!(" generated always as ({g})")),
        (None, None, Some(d)) => s.push_str(&format!(" default {d}")),
        (None, None, None) => {}
    }
    if c.not_null {
        s.push_str(" not null");
    }
    s
}

/// What a schema change did, in the order apply runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SchemaOp {
    /// A table the stage had not seen (created after the load, or newly selected).
    CreateTable {
        sql: String,
    },
    /// Renamed or moved: it was `from_schema.from_table`; now the version's table.
    RenameTable {
        from_schema: String,
        from_table: String,
    },
    DropTable,
    /// `definition` is the column as it is now; rows that existed got `existing_rows`
    /// (PostgreSQL's `attmissingval`: a non-volatile default evaluated once at the ALTER).
    AddColumn {
        column: String,
        type_name: String,
        definition: String,
        #[serde(default)]
        existing_rows: Option<String>,
        #[serde(default)]
        default: Option<String>,
        #[serde(default)]
        generated: bool,
    },
    DropColumn {
        column: String,
    },
    RenameColumn {
        from: String,
        to: String,
    },
    /// Existing values converted with `using` (the source's USING clause is not in the
    /// catalog: a plain cast, which is what `ALTER COLUMN .. TYPE` does without one).
    AlterType {
        column: String,
        type_name: String,
        using: String,
    },
    SetDefault {
        column: String,
        default: Option<String>,
    },
    SetNotNull {
        column: String,
        not_null: bool,
    },
    /// The primary key is now these columns (none: dropped).
    SetPrimaryKey {
        columns: Vec<String>,
    },
    /// Without a primary key, rows are now identified by these columns (the replica
    /// identity index): upserts need a unique index on them.
    SetKey {
        columns: Vec<String>,
    },
    /// A partition created or attached (the version's table is its parent): attached when
    /// the target has the table, else created as a partition.
    AttachPartition {
        schema: String,
        table: String,
        bound: String,
        #[serde(default)]
        key: Option<String>,
        /// The parent when it is not the version's table (a sub-partition), quoted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<String>,
    },
    /// A partition detached: it stays a table of its own.
    DetachPartition {
        schema: String,
        table: String,
    },
}

/// Where a change was learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOrigin {
    /// The event trigger's logical message, in order with the data.
    Message,
    /// The catalog, read when a Relation message differed (no message: PostgreSQL 12/13,
    /// capture off or not permitted): what happened between two shapes is collapsed into one
    /// change, and a change that altered no sent column (a default) is not seen.
    Catalog,
}

/// A schema version's meaning (stored in the version as `ddl`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaChange {
    /// The message's (or Relation message's) WAL position.
    pub lsn: Lsn,
    /// The command tag (`ALTER TABLE`, `CREATE TABLE`, `DROP TABLE`, ..).
    pub tag: String,
    pub origin: ChangeOrigin,
    pub ops: Vec<SchemaOp>,
    /// The table after the change (none for a drop).
    #[serde(default)]
    pub definition: Option<TableDefinition>,
    /// The user types (schemas, extensions) its columns use, for a target that lacks them
    /// (created on the source after the load); run before the operations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<crate::source::ddl::DdlItem>,
}

impl SchemaChange {
    /// Whether it brings columns whose types the target may lack.
    pub fn needs_types(&self) -> bool {
        self.ops.iter().any(|o| {
            matches!(
                o,
                SchemaOp::CreateTable { .. }
                    | SchemaOp::AddColumn { .. }
                    | SchemaOp::AlterType { .. }
                    | SchemaOp::AttachPartition { .. }
            )
        })
    }
}

/// A decoded message of the event trigger.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum DdlMessage {
    Changed {
        tag: String,
        definition: Box<TableDefinition>,
    },
    Dropped {
        tag: String,
        dropped: Dropped,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Dropped {
    pub relid: u32,
    pub schema: String,
    pub table: String,
}

/// Parses a message's content; malformed content is an error naming where it was.
pub fn parse_message(content: &[u8], lsn: Lsn) -> Result<DdlMessage> {
    serde_json::from_slice(content)
        .map_err(|e| Error::Protocol(format!("schema-change message at {lsn} is malformed: {e}")))
}

/// Parses a definition read with [`DEFINITION_SQL`].
pub fn parse_definition(text: &str) -> Result<TableDefinition> {
    serde_json::from_str(text)
        .map_err(|e| Error::Source(format!("a table definition is malformed: {e}")))
}

/// The meaning of going from `prev` to `new` (same relation id): a table not seen before is
/// created; otherwise the table is moved/renamed first, then columns dropped, renamed,
/// retyped, added, their defaults and `NOT NULL` changed, and the primary key last.
pub fn diff(prev: Option<&TableDefinition>, new: &TableDefinition) -> Vec<SchemaOp> {
    let Some(prev) = prev else {
        return vec![SchemaOp::CreateTable {
            sql: new.create_sql(),
        }];
    };
    let mut ops = Vec::new();
    if prev.schema != new.schema || prev.table != new.table {
        ops.push(SchemaOp::RenameTable {
            from_schema: prev.schema.clone(),
            from_table: prev.table.clone(),
        });
    }
    for old in &prev.columns {
        if new.column(old.attnum).is_none() {
            ops.push(SchemaOp::DropColumn {
                column: old.name.clone(),
            });
        }
    }
    for c in &new.columns {
        let Some(old) = prev.column(c.attnum) else {
            continue;
        };
        if old.name != c.name {
            ops.push(SchemaOp::RenameColumn {
                from: old.name.clone(),
                to: c.name.clone(),
            });
        }
        if (old.type_oid, old.type_modifier) != (c.type_oid, c.type_modifier) {
            ops.push(SchemaOp::AlterType {
                column: c.name.clone(),
                type_name: c.type_name.clone(),
                using: format!("{}::{}", quote_ident(&c.name), c.type_name),
            });
        }
        if old.default != c.default && c.generated.is_none() && c.identity.is_none() {
            ops.push(SchemaOp::SetDefault {
                column: c.name.clone(),
                default: c.default.clone(),
            });
        }
        if old.not_null != c.not_null && !(c.not_null && new.primary_key.contains(&c.name)) {
            ops.push(SchemaOp::SetNotNull {
                column: c.name.clone(),
                not_null: c.not_null,
            });
        }
    }
    for c in &new.columns {
        if prev.column(c.attnum).is_none() {
            ops.push(SchemaOp::AddColumn {
                column: c.name.clone(),
                type_name: c.type_name.clone(),
                definition: column_definition(c),
                existing_rows: c.missing.clone(),
                default: c.default.clone(),
                generated: c.generated.is_some() || c.identity.is_some(),
            });
        }
    }
    let (was, now) = (
        prev.partitions.clone().unwrap_or_default(),
        new.partitions.clone().unwrap_or_default(),
    );
    for p in &was {
        if !now.iter().any(|n| n.relid == p.relid) {
            ops.push(SchemaOp::DetachPartition {
                schema: p.schema.clone(),
                table: p.table.clone(),
            });
        }
    }
    for p in &now {
        if !was.iter().any(|w| w.relid == p.relid) {
            ops.push(SchemaOp::AttachPartition {
                schema: p.schema.clone(),
                table: p.table.clone(),
                bound: p.bound.clone(),
                key: p.key.clone(),
                parent: None,
            });
        }
    }
    if new.partition_of.is_some() {
        // A partition's keys are its parent's (an attach brings them).
    } else if prev.primary_key != new.primary_key {
        ops.push(SchemaOp::SetPrimaryKey {
            columns: new.primary_key.clone(),
        });
    } else if new.primary_key.is_empty() {
        let keys = |d: &TableDefinition| -> Vec<String> {
            d.row_schema()
                .columns
                .into_iter()
                .filter(|c| c.key)
                .map(|c| c.name)
                .collect()
        };
        let (before, after) = (keys(prev), keys(new));
        if before != after && new.replica_identity == "i" {
            ops.push(SchemaOp::SetKey { columns: after });
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(attnum: i16, name: &str, ty: &str, oid: u32) -> DefColumn {
        DefColumn {
            attnum,
            name: name.to_owned(),
            type_name: ty.to_owned(),
            type_oid: oid,
            type_modifier: -1,
            not_null: false,
            default: None,
            generated: None,
            stored: false,
            identity: None,
            collation: None,
            missing: None,
        }
    }

    fn def(columns: Vec<DefColumn>) -> TableDefinition {
        TableDefinition {
            relid: 7,
            schema: "public".to_owned(),
            table: "t".to_owned(),
            kind: "r".to_owned(),
            replica_identity: "d".to_owned(),
            primary_key: vec!["id".to_owned()],
            identity_key: Vec::new(),
            columns,
            partition_of: None,
            partition_bound: None,
            partition_key: None,
            root: None,
            partitions: None,
        }
    }

    #[test]
    fn columns_are_matched_by_number_so_a_rename_keeps_its_values() {
        let before = def(vec![
            col(1, "id", "integer", 23),
            col(2, "a", "integer", 23),
        ]);
        let mut after = before.clone();
        after.columns[1].name = "b".to_owned();
        after.columns[1].type_name = "bigint".to_owned();
        after.columns[1].type_oid = 20;
        let mut added = col(3, "c", "integer", 23);
        added.not_null = true;
        added.default = Some("0".to_owned());
        added.missing = Some("0".to_owned());
        after.columns.push(added);
        let ops = diff(Some(&before), &after);
        assert_eq!(
            ops,
            vec![
                SchemaOp::RenameColumn {
                    from: "a".to_owned(),
                    to: "b".to_owned()
                },
                SchemaOp::AlterType {
                    column: "b".to_owned(),
                    type_name: "bigint".to_owned(),
                    using: "\"b\"::bigint".to_owned()
                },
                SchemaOp::AddColumn {
                    column: "c".to_owned(),
                    type_name: "integer".to_owned(),
                    definition: "\"c\" integer default 0 not null".to_owned(),
                    existing_rows: Some("0".to_owned()),
                    default: Some("0".to_owned()),
                    generated: false,
                },
            ]
        );
    }

    #[test]
    fn a_moved_table_is_renamed_and_an_unseen_one_created() {
        let before = def(vec![col(1, "id", "integer", 23)]);
        let mut after = before.clone();
        after.schema = "archive".to_owned();
        assert_eq!(
            diff(Some(&before), &after),
            vec![SchemaOp::RenameTable {
                from_schema: "public".to_owned(),
                from_table: "t".to_owned()
            }]
        );
        match &diff(None, &after)[..] {
            [SchemaOp::CreateTable { sql }] => assert_eq!(
                sql,
                "create table if not exists \"archive\".\"t\" (\"id\" integer, primary key (\"id\"))"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn generated_columns_are_not_row_columns_but_are_created() {
        let mut g = col(2, "twice", "integer", 23);
        g.generated = Some("(id * 2)".to_owned());
        g.stored = true;
        let d = def(vec![col(1, "id", "integer", 23), g]);
        let rows = d.row_schema();
        assert_eq!(rows.columns.len(), 1);
        assert!(rows.columns[0].key);
        assert!(
            d.create_sql()
                .contains("\"twice\" integer generated always as ((id * 2)) stored")
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bad in [&b""[..], b"{", b"{\"tag\":1}", b"\xff\xfe", b"[]"] {
            let e = parse_message(bad, Lsn(16)).unwrap_err().to_string();
            assert!(e.contains("schema-change message at 0/10"), "{e}");
        }
        let ok = br#"{"tag":"DROP TABLE","dropped":{"relid":5,"schema":"s","table":"t"}}"#;
        assert!(matches!(
            parse_message(ok, Lsn(1)).unwrap(),
            DdlMessage::Dropped { .. }
        ));
    }
}
