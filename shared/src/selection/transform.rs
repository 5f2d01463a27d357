//! DMS transformation rules: the names a table and its columns are staged under, and columns
//! left out.
//!
//! A rule has a `rule-target` (`schema`, `table` or `column`), an `object-locator` whose
//! names match the *source's* names (`%` wildcards, as in selection rules) and a
//! `rule-action`: `rename` (to `value`), `add-prefix` / `add-suffix` (`value`),
//! `remove-prefix` / `remove-suffix` (`value`, when the name has it), `replace-prefix` /
//! `replace-suffix` (`old-value` → `value`), `convert-lowercase`, `convert-uppercase`, and for
//! columns `remove-column`. Every rule matching an object applies, in the order of the rules.
//! Any other action or target (`add-column`, `change-data-type`, `include-column`, indexes, ...)
//! is an error naming the rule, never ignored.
//!
//! The stage holds the transformed names everywhere a reader sees one: object keys, manifests,
//! schema versions, CSV headers, Parquet and JSON field names; a removed column is not staged
//! at all. (Internally — the plan's COPY, the selection, the slot — the source's names stay.)

use serde_json::Value;

use super::like;
use crate::change::ddl::{SchemaChange, SchemaOp, TableDefinition};
use crate::error::{Error, Result};
use crate::table::TableSchema;

/// What a transformation rule renames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Schema,
    Table,
    Column,
}

/// What a transformation rule does to a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Rename(String),
    AddPrefix(String),
    RemovePrefix(String),
    ReplacePrefix { old: String, new: String },
    AddSuffix(String),
    RemoveSuffix(String),
    ReplaceSuffix { old: String, new: String },
    Lowercase,
    Uppercase,
    RemoveColumn,
}

impl Action {
    /// The name after this action (`None`: the column is removed).
    fn apply(&self, name: &str) -> Option<String> {
        Some(match self {
            Action::Rename(v) => v.clone(),
            Action::AddPrefix(v) => format!("{v}{name}"),
            Action::AddSuffix(v) => format!("{name}{v}"),
            Action::RemovePrefix(v) => name.strip_prefix(v.as_str()).unwrap_or(name).to_owned(),
            Action::RemoveSuffix(v) => name.strip_suffix(v.as_str()).unwrap_or(name).to_owned(),
            Action::ReplacePrefix { old, new } => match name.strip_prefix(old.as_str()) {
                Some(rest) => format!("{new}{rest}"),
                None => name.to_owned(),
            },
            Action::ReplaceSuffix { old, new } => match name.strip_suffix(old.as_str()) {
                Some(rest) => format!("{rest}{new}"),
                None => name.to_owned(),
            },
            Action::Lowercase => name.to_lowercase(),
            Action::Uppercase => name.to_uppercase(),
            Action::RemoveColumn => return None,
        })
    }
}

/// One transformation rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transform {
    pub id: String,
    pub target: Target,
    pub schema: String,
    pub table: String,
    pub column: String,
    pub action: Action,
}

const KEYS: &[&str] = &[
    "rule-type",
    "rule-id",
    "rule-name",
    "rule-target",
    "object-locator",
    "rule-action",
    "value",
    "old-value",
];
const LOCATOR_KEYS: &[&str] = &["schema-name", "table-name", "column-name"];

/// Parses rule `i` (a `transformation` rule); `field` names the input in errors.
pub(super) fn parse(value: &Value, i: usize, field: &str) -> Result<Transform> {
    let id = match &value["rule-id"] {
        Value::String(s) => s.clone(),
        Value::Null => (i + 1).to_string(),
        v => v.to_string(),
    };
    let at = format!("{field}.rules[{i}] (rule-id {id})");
    if let Some(key) = super::unknown_keys(value, KEYS, &value["object-locator"], LOCATOR_KEYS) {
        return Err(Error::config(
            at,
            format!("{key:?} is not supported in a transformation rule"),
        ));
    }
    let text = |k: &str| -> Result<Option<String>> {
        match &value[k] {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s.clone())),
            _ => Err(Error::config(&at, format!("{k} must be a string"))),
        }
    };
    let target = match text("rule-target")?.as_deref() {
        Some("schema") => Target::Schema,
        Some("table") => Target::Table,
        Some("column") => Target::Column,
        other => {
            return Err(Error::config(
                &at,
                format!(
                    "rule-target {other:?} is not supported; pgshift transforms schema, table and column names"
                ),
            ));
        }
    };
    let loc = &value["object-locator"];
    let name = |k: &str, needed: bool| -> Result<String> {
        match &loc[k] {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            Value::Null if !needed => Ok("%".to_owned()),
            _ => Err(Error::config(
                &at,
                format!("object-locator.{k} is missing or not a name"),
            )),
        }
    };
    let schema = name("schema-name", true)?;
    let table = name("table-name", target != Target::Schema)?;
    let column = name("column-name", target == Target::Column)?;
    let needs = |k: &str| -> Result<String> {
        match text(k)? {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(Error::config(
                &at,
                format!("{k} is needed by this rule-action"),
            )),
        }
    };
    let action = match text("rule-action")?.as_deref() {
        Some("rename") => Action::Rename(needs("value")?),
        Some("add-prefix") => Action::AddPrefix(needs("value")?),
        Some("remove-prefix") => Action::RemovePrefix(needs("value")?),
        Some("replace-prefix") => Action::ReplacePrefix {
            old: needs("old-value")?,
            new: text("value")?.unwrap_or_default(),
        },
        Some("add-suffix") => Action::AddSuffix(needs("value")?),
        Some("remove-suffix") => Action::RemoveSuffix(needs("value")?),
        Some("replace-suffix") => Action::ReplaceSuffix {
            old: needs("old-value")?,
            new: text("value")?.unwrap_or_default(),
        },
        Some("convert-lowercase") => Action::Lowercase,
        Some("convert-uppercase") => Action::Uppercase,
        Some("remove-column") if target == Target::Column => Action::RemoveColumn,
        other => {
            return Err(Error::config(
                &at,
                format!(
                    "rule-action {other:?} is not supported for rule-target {target:?} (pgshift: rename, add-prefix, remove-prefix, replace-prefix, add-suffix, remove-suffix, replace-suffix, convert-lowercase, convert-uppercase; remove-column for columns)"
                ),
            ));
        }
    };
    Ok(Transform {
        id,
        target,
        schema,
        table,
        column,
        action,
    })
}

/// The staged names of a task's tables and columns.
pub(super) struct Naming<'a>(pub(super) &'a [Transform]);

impl Naming<'_> {
    /// `schema`.`table` as staged.
    pub(super) fn table(&self, schema: &str, table: &str) -> (String, String) {
        let (mut s, mut t) = (schema.to_owned(), table.to_owned());
        for r in self.0 {
            match r.target {
                Target::Schema if like(&r.schema, schema) => {
                    s = r.action.apply(&s).unwrap_or(s);
                }
                Target::Table if like(&r.schema, schema) && like(&r.table, table) => {
                    t = r.action.apply(&t).unwrap_or(t);
                }
                _ => {}
            }
        }
        (s, t)
    }

    /// A column's staged name (`None`: left out), and the rule that removed it.
    pub(super) fn column(
        &self,
        schema: &str,
        table: &str,
        column: &str,
    ) -> std::result::Result<String, String> {
        let mut c = column.to_owned();
        for r in self.0 {
            if r.target == Target::Column
                && like(&r.schema, schema)
                && like(&r.table, table)
                && like(&r.column, column)
            {
                match r.action.apply(&c) {
                    Some(n) => c = n,
                    None => return Err(r.id.clone()),
                }
            }
        }
        Ok(c)
    }
}

/// A table's schema as staged, and which of the source's columns it keeps (`None`: all).
/// A key column cannot be removed (rows could not be told apart), and two columns cannot end
/// up with one name; each is an error naming the rule.
pub(super) fn stage_schema(
    naming: &Naming<'_>,
    s: &TableSchema,
) -> Result<(TableSchema, Option<Vec<usize>>)> {
    let (schema, table) = naming.table(&s.schema, &s.table);
    let mut columns = Vec::with_capacity(s.columns.len());
    let mut keep = Vec::with_capacity(s.columns.len());
    for (i, c) in s.columns.iter().enumerate() {
        match naming.column(&s.schema, &s.table, &c.name) {
            Ok(name) => {
                if columns
                    .iter()
                    .any(|k: &crate::table::ColumnSchema| k.name == name)
                {
                    return Err(Error::config(
                        "table mappings",
                        format!(
                            "transformation rules give two columns of {}.{} the name {name:?}",
                            s.schema, s.table
                        ),
                    ));
                }
                let mut c = c.clone();
                c.name = name;
                columns.push(c);
                keep.push(i);
            }
            Err(rule) if c.key => {
                return Err(Error::config(
                    "table mappings",
                    format!(
                        "rule-id {rule} removes column {:?} of {}.{}, part of its key: its changes could not be told apart",
                        c.name, s.schema, s.table
                    ),
                ));
            }
            Err(_) => {}
        }
    }
    let all = keep.len() == s.columns.len();
    Ok((
        TableSchema {
            schema,
            table,
            columns,
            replica_identity: s.replica_identity.clone(),
        },
        (!all).then_some(keep),
    ))
}

/// A table's definition as staged: its names, columns (removed ones left out) and keys.
pub(super) fn stage_definition(naming: &Naming<'_>, d: &TableDefinition) -> TableDefinition {
    let (src_schema, src_table) = (d.schema.as_str(), d.table.as_str());
    let col = |c: &str| naming.column(src_schema, src_table, c).ok();
    let mut out = d.clone();
    (out.schema, out.table) = naming.table(src_schema, src_table);
    out.columns = d
        .columns
        .iter()
        .filter_map(|c| {
            let mut c = c.clone();
            c.name = col(&c.name)?;
            Some(c)
        })
        .collect();
    out.primary_key = d.primary_key.iter().filter_map(|c| col(c)).collect();
    out.identity_key = d.identity_key.iter().filter_map(|c| col(c)).collect();
    if let Some(root) = out.root.as_mut() {
        (root.schema, root.table) = naming.table(&root.schema, &root.table);
    }
    if let Some(parts) = out.partitions.as_mut() {
        for p in parts {
            (p.schema, p.table) = naming.table(&p.schema, &p.table);
        }
    }
    out
}

/// A schema change as staged: its definition's and its operations' names (an operation on a
/// removed column is left out; a new table's SQL is made from the staged definition).
/// `table` is the changed table's source name.
pub(super) fn stage_change(
    naming: &Naming<'_>,
    change: SchemaChange,
    table: (&str, &str),
) -> SchemaChange {
    let col = |c: &str| naming.column(table.0, table.1, c).ok();
    let staged = change
        .definition
        .as_ref()
        .map(|d| stage_definition(naming, d));
    let ops = change
        .ops
        .into_iter()
        .filter_map(|op| {
            Some(match op {
                SchemaOp::CreateTable { sql } => SchemaOp::CreateTable {
                    sql: staged.as_ref().map_or(sql, TableDefinition::create_sql),
                },
                SchemaOp::RenameTable {
                    from_schema,
                    from_table,
                } => {
                    let (from_schema, from_table) = naming.table(&from_schema, &from_table);
                    SchemaOp::RenameTable {
                        from_schema,
                        from_table,
                    }
                }
                SchemaOp::DropTable => SchemaOp::DropTable,
                SchemaOp::AddColumn {
                    column,
                    type_name,
                    definition,
                    existing_rows,
                    default,
                    generated,
                } => {
                    let staged_name = col(&column)?;
                    // The column's definition starts with its quoted name.
                    let quoted = crate::source::quote_ident(&column);
                    let definition = match definition.strip_prefix(quoted.as_str()) {
                        Some(rest) => format!("{}{rest}", crate::source::quote_ident(&staged_name)),
                        None => definition,
                    };
                    SchemaOp::AddColumn {
                        column: staged_name,
                        type_name,
                        definition,
                        existing_rows,
                        default,
                        generated,
                    }
                }
                SchemaOp::DropColumn { column } => SchemaOp::DropColumn {
                    column: col(&column)?,
                },
                SchemaOp::RenameColumn { from, to } => SchemaOp::RenameColumn {
                    from: col(&from)?,
                    to: col(&to)?,
                },
                SchemaOp::AlterType {
                    column,
                    type_name,
                    using,
                } => SchemaOp::AlterType {
                    column: col(&column)?,
                    type_name,
                    using,
                },
                SchemaOp::SetDefault { column, default } => SchemaOp::SetDefault {
                    column: col(&column)?,
                    default,
                },
                SchemaOp::SetNotNull { column, not_null } => SchemaOp::SetNotNull {
                    column: col(&column)?,
                    not_null,
                },
                SchemaOp::SetPrimaryKey { columns } => SchemaOp::SetPrimaryKey {
                    columns: columns.iter().filter_map(|c| col(c)).collect(),
                },
                SchemaOp::SetKey { columns } => SchemaOp::SetKey {
                    columns: columns.iter().filter_map(|c| col(c)).collect(),
                },
                SchemaOp::AttachPartition {
                    schema,
                    table,
                    bound,
                    key,
                    parent,
                } => {
                    let (schema, table) = naming.table(&schema, &table);
                    SchemaOp::AttachPartition {
                        schema,
                        table,
                        bound,
                        key,
                        parent,
                    }
                }
                SchemaOp::DetachPartition { schema, table } => {
                    let (schema, table) = naming.table(&schema, &table);
                    SchemaOp::DetachPartition { schema, table }
                }
            })
        })
        .collect();
    SchemaChange {
        ops,
        definition: staged,
        ..change
    }
}

#[cfg(test)]
mod tests {
    use crate::selection::Selection;
    use crate::table::{ColumnSchema, TableSchema};

    fn mapping(rules: &str) -> Selection {
        Selection::from_json(&format!(r#"{{"rules":[{rules}]}}"#), "--tables").unwrap()
    }

    fn col(name: &str, key: bool) -> ColumnSchema {
        ColumnSchema {
            name: name.to_owned(),
            type_name: "text".to_owned(),
            type_oid: 25,
            type_modifier: -1,
            key,
        }
    }

    #[test]
    fn rules_rename_in_order_on_the_source_names() {
        let s = mapping(
            r#"{"rule-type":"selection","rule-id":"1","object-locator":{"schema-name":"%","table-name":"%"},"rule-action":"include"},
               {"rule-type":"transformation","rule-id":"2","rule-target":"schema","object-locator":{"schema-name":"public"},"rule-action":"rename","value":"sales"},
               {"rule-type":"transformation","rule-id":"3","rule-target":"table","object-locator":{"schema-name":"public","table-name":"%"},"rule-action":"add-prefix","value":"dms_"},
               {"rule-type":"transformation","rule-id":"4","rule-target":"table","object-locator":{"schema-name":"%","table-name":"Orders"},"rule-action":"convert-lowercase"},
               {"rule-type":"transformation","rule-id":"5","rule-target":"table","object-locator":{"schema-name":"app","table-name":"tmp_%"},"rule-action":"replace-prefix","old-value":"tmp_","value":"t_"},
               {"rule-type":"transformation","rule-id":"6","rule-target":"table","object-locator":{"schema-name":"app","table-name":"%_v2"},"rule-action":"remove-suffix","value":"_v2"},
               {"rule-type":"transformation","rule-id":"7","rule-target":"column","object-locator":{"schema-name":"%","table-name":"%","column-name":"secret%"},"rule-action":"remove-column"},
               {"rule-type":"transformation","rule-id":"8","rule-target":"column","object-locator":{"schema-name":"%","table-name":"%","column-name":"%"},"rule-action":"convert-uppercase"},
               {"rule-type":"transformation","rule-id":"9","rule-target":"column","object-locator":{"schema-name":"public","table-name":"Orders","column-name":"qty"},"rule-action":"rename","value":"quantity"}"#,
        );
        assert_eq!(
            s.staged_table("public", "Orders"),
            ("sales".into(), "dms_orders".into())
        );
        assert_eq!(s.staged_table("app", "tmp_x"), ("app".into(), "t_x".into()));
        assert_eq!(s.staged_table("app", "y_v2"), ("app".into(), "y".into()));
        assert_eq!(s.staged_table("app", "z"), ("app".into(), "z".into()));
        let t = TableSchema {
            schema: "public".into(),
            table: "Orders".into(),
            columns: vec![
                col("id", true),
                col("secret_note", false),
                col("qty", false),
            ],
            replica_identity: "d".into(),
        };
        let (staged, keep) = s.stage_schema(&t).unwrap();
        let names: Vec<&str> = staged.columns.iter().map(|c| c.name.as_str()).collect();
        // Every rule applies in order: qty is upper-cased, then renamed by rule 9.
        assert_eq!(names, ["ID", "quantity"]);
        assert_eq!(
            (staged.schema.as_str(), staged.table.as_str()),
            ("sales", "dms_orders")
        );
        assert_eq!(keep, Some(vec![0, 2]));
        // A key column cannot be removed.
        let key = TableSchema {
            columns: vec![col("secret_id", true), col("v", false)],
            ..t.clone()
        };
        let err = s.stage_schema(&key).unwrap_err().to_string();
        assert!(
            err.contains("rule-id 7") && err.contains("secret_id"),
            "{err}"
        );
        // Two columns cannot end up with one name.
        let clash = TableSchema {
            columns: vec![col("id", true), col("Id", false)],
            ..t
        };
        let err = s.stage_schema(&clash).unwrap_err().to_string();
        assert!(err.contains("two columns"), "{err}");
        // Without rules nothing changes.
        assert!(!Selection::all().transforms_names());
    }

    #[test]
    fn rules_pgshift_cannot_honour_are_named() {
        for (rule, want) in [
            (
                r#"{"rule-type":"transformation","rule-id":"7","rule-target":"column","object-locator":{"schema-name":"%","table-name":"%"},"rule-action":"add-column","value":"x","expression":"1"}"#,
                "expression",
            ),
            (
                r#"{"rule-type":"transformation","rule-id":"7","rule-target":"column","object-locator":{"schema-name":"%","table-name":"%","column-name":"c"},"rule-action":"change-data-type"}"#,
                "change-data-type",
            ),
            (
                r#"{"rule-type":"transformation","rule-id":"7","rule-target":"index","object-locator":{"schema-name":"%"},"rule-action":"rename","value":"x"}"#,
                "rule-target",
            ),
            (
                r#"{"rule-type":"transformation","rule-id":"7","rule-target":"table","object-locator":{"schema-name":"%"},"rule-action":"remove-column"}"#,
                "object-locator.table-name",
            ),
            (
                r#"{"rule-type":"transformation","rule-id":"7","rule-target":"table","object-locator":{"schema-name":"%","table-name":"%"},"rule-action":"remove-column"}"#,
                "remove-column",
            ),
            (
                r#"{"rule-type":"transformation","rule-id":"7","rule-target":"schema","object-locator":{"schema-name":"%"},"rule-action":"rename"}"#,
                "value is needed",
            ),
            (
                r#"{"rule-type":"transformation","rule-id":"7","rule-target":"table","object-locator":{"schema-name":"%","table-name":"%"},"rule-action":"replace-suffix","value":"x"}"#,
                "old-value is needed",
            ),
        ] {
            let err = Selection::from_json(&format!(r#"{{"rules":[{rule}]}}"#), "--tables")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("rule-id 7") && err.contains(want),
                "{rule}: {err}"
            );
        }
    }
}
