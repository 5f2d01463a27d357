//! Table selection with DMS table-mapping rules.
//!
//! A DMS user brings the `rules` of their table mapping; pgshift reads its selection rules:
//! `object-locator` `schema-name` / `table-name` with `%` as the only wildcard (any run of
//! characters, possibly empty), and `rule-action` `include`, `exclude` or `explicit` (no
//! wildcards). As DMS applies them, a table is selected when some include (or explicit) rule
//! matches it and no exclude rule does, whatever their order. Names match exactly and
//! case-sensitively: `Table1` and `table1` are different tables. Without rules every user table
//! is selected. `table-settings` rules with `parallel-load` `ranges` on one column cut that
//! table's full load at the boundaries given ([`LoadRanges`]); `transformation` rules give the
//! names tables and columns are staged under, and columns left out ([`transform`]). Rules
//! pgshift cannot honour (filters, column lists, other transformations and table settings) are
//! rejected with the rule's id instead of silently changing what is moved.

use serde::Deserialize;

use crate::error::{Error, Result};

pub mod transform;

/// What to do with tables a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAction {
    Include,
    Exclude,
    Explicit,
}

/// One selection rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub id: String,
    pub schema: String,
    pub table: String,
    pub action: RuleAction,
}

/// A `table-settings` rule's `parallel-load` of type `ranges`: the full load cuts the table
/// into chunks at these values of one column (`(-inf, b1)`, `[b1, b2)`, ..., `[bn, +inf)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadRanges {
    pub id: String,
    pub schema: String,
    pub table: String,
    pub column: String,
    pub boundaries: Vec<String>,
}

/// The selection rules of a task (empty = every user table), and the load ranges its
/// `table-settings` rules ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub rules: Vec<Rule>,
    pub load_ranges: Vec<LoadRanges>,
    /// Transformation rules: the names tables and columns are staged under ([`transform`]).
    pub transforms: Vec<transform::Transform>,
}

#[derive(Deserialize)]
struct MappingDoc {
    rules: Vec<serde_json::Value>,
}

/// The keys of a selection rule pgshift reads; any other key (`load-order`, `parallel-load`,
/// a misspelling) would change what DMS does without pgshift doing it, so it is an error.
const RULE_KEYS: &[&str] = &[
    "rule-type",
    "rule-id",
    "rule-name",
    "object-locator",
    "rule-action",
    "filters",
];
const LOCATOR_KEYS: &[&str] = &["schema-name", "table-name", "table-type"];

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawRule {
    rule_type: String,
    #[serde(default)]
    rule_id: Option<serde_json::Value>,
    #[serde(default)]
    object_locator: Option<RawLocator>,
    #[serde(default)]
    rule_action: Option<String>,
    #[serde(default)]
    filters: Option<Vec<serde_json::Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawLocator {
    schema_name: Option<String>,
    table_name: Option<String>,
    #[serde(default)]
    table_type: Option<String>,
}

/// A `table-settings` rule: `parallel-load` `ranges` on one column (`none`: nothing to do);
/// any other setting or type is an error naming it.
fn table_settings(value: &serde_json::Value, i: usize, field: &str) -> Result<Option<LoadRanges>> {
    let id = match &value["rule-id"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => (i + 1).to_string(),
        v => v.to_string(),
    };
    let at = format!("{field}.rules[{i}] (rule-id {id})");
    if let Some(key) = unknown_keys(
        value,
        &[
            "rule-type",
            "rule-id",
            "rule-name",
            "object-locator",
            "parallel-load",
        ],
        &value["object-locator"],
        &["schema-name", "table-name"],
    ) {
        return Err(Error::config(
            at,
            format!(
                "{key:?} is not supported in a table-settings rule (pgshift reads parallel-load ranges)"
            ),
        ));
    }
    let name = |k: &str| -> Result<String> {
        match value["object-locator"][k].as_str() {
            Some(n) if n.contains('%') => Err(Error::config(
                &at,
                format!(
                    "object-locator.{k} cannot use % in a table-settings rule (name one table)"
                ),
            )),
            Some(n) if !n.is_empty() => Ok(n.to_owned()),
            _ => Err(Error::config(&at, format!("object-locator.{k} is missing"))),
        }
    };
    let (schema, table) = (name("schema-name")?, name("table-name")?);
    let load = &value["parallel-load"];
    match load["type"].as_str() {
        Some("none") | None if load.is_null() || load["type"] == "none" => return Ok(None),
        Some("ranges") => {}
        other => {
            return Err(Error::config(
                &at,
                format!(
                    "parallel-load type {other:?} is not supported (pgshift takes ranges, or none)"
                ),
            ));
        }
    }
    if let Some(key) = load.as_object().and_then(|o| {
        o.keys()
            .find(|k| !matches!(k.as_str(), "type" | "columns" | "boundaries"))
    }) {
        return Err(Error::config(
            &at,
            format!("parallel-load.{key} is not supported"),
        ));
    }
    let columns: Vec<&str> = load["columns"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
        .unwrap_or_default();
    let [column] = columns.as_slice() else {
        return Err(Error::config(
            &at,
            "parallel-load.columns must name one column (pgshift cuts ranges on one column)",
        ));
    };
    let value_text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let mut boundaries = Vec::new();
    for b in load["boundaries"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        match b.as_array().map(Vec::as_slice) {
            Some([v]) if value_text(v).is_some() => boundaries.extend(value_text(v)),
            _ => {
                return Err(Error::config(
                    &at,
                    format!("parallel-load.boundaries: {b} is not one value for the one column"),
                ));
            }
        }
    }
    if boundaries.is_empty() {
        return Err(Error::config(&at, "parallel-load.boundaries is empty"));
    }
    Ok(Some(LoadRanges {
        id,
        schema,
        table,
        column: (*column).to_owned(),
        boundaries,
    }))
}

/// The first key of `rule` (or of its `locator`) not in the known lists.
fn unknown_keys(
    rule: &serde_json::Value,
    known: &[&str],
    locator: &serde_json::Value,
    locator_known: &[&str],
) -> Option<String> {
    let first = |v: &serde_json::Value, known: &[&str], prefix: &str| {
        v.as_object()?
            .keys()
            .find(|k| !known.contains(&k.as_str()))
            .map(|k| format!("{prefix}{k}"))
    };
    first(rule, known, "").or_else(|| first(locator, locator_known, "object-locator."))
}

impl Selection {
    /// Every user table.
    pub fn all() -> Selection {
        Selection::default()
    }

    /// Parses DMS table-mapping JSON (`{"rules": [...]}`). `field` names the input in errors.
    pub fn from_json(text: &str, field: &str) -> Result<Selection> {
        let doc: MappingDoc = serde_json::from_str(text).map_err(|e| {
            Error::config(
                field,
                format!("not DMS table-mapping JSON ({{\"rules\": [...]}}): {e}"),
            )
        })?;
        let mut rules = Vec::new();
        let mut load_ranges = Vec::new();
        let mut transforms = Vec::new();
        for (i, value) in doc.rules.into_iter().enumerate() {
            if value["rule-type"] == "table-settings" {
                load_ranges.extend(table_settings(&value, i, field)?);
                continue;
            }
            if value["rule-type"] == "transformation" {
                transforms.push(transform::parse(&value, i, field)?);
                continue;
            }
            let keys = unknown_keys(&value, RULE_KEYS, &value["object-locator"], LOCATOR_KEYS);
            let raw: RawRule = serde_json::from_value(value)
                .map_err(|e| Error::config(format!("{field}.rules[{i}]"), e.to_string()))?;
            let id = match &raw.rule_id {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => (i + 1).to_string(),
            };
            let at = format!("{field}.rules[{i}] (rule-id {id})");
            if raw.rule_type == "selection"
                && let Some(key) = keys
            {
                return Err(Error::config(
                    at,
                    format!(
                        "{key:?} is not supported in a selection rule (pgshift reads {})",
                        RULE_KEYS.join(", ")
                    ),
                ));
            }
            if raw.rule_type != "selection" {
                return Err(Error::config(
                    at,
                    format!(
                        "rule-type {:?} is not supported; pgshift reads selection, transformation and table-settings rules",
                        raw.rule_type
                    ),
                ));
            }
            if raw.filters.as_ref().is_some_and(|f| !f.is_empty()) {
                return Err(Error::config(at, "row filters are not supported"));
            }
            let loc = raw
                .object_locator
                .ok_or_else(|| Error::config(&at, "object-locator is missing"))?;
            if let Some(tt) = loc.table_type.as_deref()
                && !matches!(tt, "table" | "all")
            {
                return Err(Error::config(
                    &at,
                    format!("table-type {tt:?} is not supported"),
                ));
            }
            let schema = loc
                .schema_name
                .filter(|s| !s.is_empty())
                .ok_or_else(|| Error::config(&at, "object-locator.schema-name is missing"))?;
            let table = loc.table_name.unwrap_or_else(|| "%".to_owned());
            if table.is_empty() {
                return Err(Error::config(&at, "object-locator.table-name is empty"));
            }
            let action = match raw.rule_action.as_deref() {
                Some("include") => RuleAction::Include,
                Some("exclude") => RuleAction::Exclude,
                Some("explicit") => RuleAction::Explicit,
                other => {
                    return Err(Error::config(
                        &at,
                        format!("rule-action {other:?} is not include, exclude or explicit"),
                    ));
                }
            };
            if action == RuleAction::Explicit && (schema.contains('%') || table.contains('%')) {
                return Err(Error::config(
                    &at,
                    "an explicit rule cannot use % wildcards",
                ));
            }
            rules.push(Rule {
                id,
                schema,
                table,
                action,
            });
        }
        Ok(Selection {
            rules,
            load_ranges,
            transforms,
        })
    }

    /// Whether transformation rules change any name or leave a column out.
    pub fn transforms_names(&self) -> bool {
        !self.transforms.is_empty()
    }

    /// `schema`.`table` (the source's names) as staged.
    pub fn staged_table(&self, schema: &str, table: &str) -> (String, String) {
        transform::Naming(&self.transforms).table(schema, table)
    }

    /// A table's schema as staged (names, columns left out), and the indexes of the source's
    /// columns it keeps (`None`: all). An error names a rule that would remove a key column
    /// or give two columns one name.
    pub fn stage_schema(
        &self,
        s: &crate::table::TableSchema,
    ) -> Result<(crate::table::TableSchema, Option<Vec<usize>>)> {
        if self.transforms.is_empty() {
            return Ok((s.clone(), None));
        }
        transform::stage_schema(&transform::Naming(&self.transforms), s)
    }

    /// A schema change of the table `table` (source names) as staged.
    pub fn stage_change(
        &self,
        change: crate::change::ddl::SchemaChange,
        table: (&str, &str),
    ) -> crate::change::ddl::SchemaChange {
        if self.transforms.is_empty() {
            return change;
        }
        transform::stage_change(&transform::Naming(&self.transforms), change, table)
    }

    /// A table's definition as staged (schema versions carry it).
    pub fn stage_definition(
        &self,
        d: &crate::change::ddl::TableDefinition,
    ) -> crate::change::ddl::TableDefinition {
        if self.transforms.is_empty() {
            return d.clone();
        }
        transform::stage_definition(&transform::Naming(&self.transforms), d)
    }

    /// The load ranges a `table-settings` rule asks for `schema`.`table`.
    pub fn load_ranges_for(&self, schema: &str, table: &str) -> Option<&LoadRanges> {
        self.load_ranges
            .iter()
            .find(|r| r.schema == schema && r.table == table)
    }

    /// Whether the table `schema`.`table` is selected.
    pub fn selects(&self, schema: &str, table: &str) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        let matches = |r: &Rule| like(&r.schema, schema) && like(&r.table, table);
        let included = self
            .rules
            .iter()
            .any(|r| r.action != RuleAction::Exclude && matches(r));
        included
            && !self
                .rules
                .iter()
                .any(|r| r.action == RuleAction::Exclude && matches(r))
    }

    /// `selection rules name tables that do not exist: s.t (rule-id 3), ...`, or `None` when
    /// every wildcard-free include rule names an existing table.
    pub fn unmatched_message(&self, tables: &[(String, String)]) -> Option<String> {
        let missing = self.unmatched_exact(tables);
        if missing.is_empty() {
            return None;
        }
        let names: Vec<String> = missing
            .iter()
            .map(|r| format!("{}.{} (rule-id {})", r.schema, r.table, r.id))
            .collect();
        Some(format!(
            "selection rules name tables that do not exist: {}",
            names.join(", ")
        ))
    }

    /// Include and explicit rules (wildcards too) that match no table of `tables`: a typo such
    /// as `pubic` or `tt%` selects nothing and would move nothing without a word.
    pub fn rules_matching_nothing<'a>(&'a self, tables: &[(String, String)]) -> Vec<&'a Rule> {
        self.rules
            .iter()
            .filter(|r| r.action != RuleAction::Exclude)
            .filter(|r| {
                !tables
                    .iter()
                    .any(|(s, t)| like(&r.schema, s) && like(&r.table, t))
            })
            .collect()
    }

    /// The error for rules that match nothing (`None` when every rule matches a table).
    pub fn empty_rules_error(
        &self,
        tables: &[(String, String)],
        field: &str,
    ) -> Option<crate::Error> {
        let rules = self.rules_matching_nothing(tables);
        if rules.is_empty() {
            return None;
        }
        let names: Vec<String> = rules
            .iter()
            .map(|r| format!("{}.{} (rule-id {})", r.schema, r.table, r.id))
            .collect();
        Some(Error::config(
            field,
            format!(
                "selection rules match no table: {} (names are case-sensitive; --allow-empty to go on)",
                names.join(", ")
            ),
        ))
    }

    /// Explicit and wildcard-free include rules whose table does not exist in `tables`
    /// (a likely typo, reported instead of silently moving nothing).
    pub fn unmatched_exact<'a>(&'a self, tables: &[(String, String)]) -> Vec<&'a Rule> {
        self.rules
            .iter()
            .filter(|r| {
                r.action != RuleAction::Exclude && !r.schema.contains('%') && !r.table.contains('%')
            })
            .filter(|r| !tables.iter().any(|(s, t)| *s == r.schema && *t == r.table))
            .collect()
    }
}

impl Selection {
    /// The selection as a SQL boolean over `schema_expr` and `table_expr` (text expressions),
    /// matching exactly as [`Selection::selects`] does: `%` any run of characters, every other
    /// character itself (`_` and `\` escaped), case-sensitive. The rules' names are quoted
    /// literals (this is for function bodies, where nothing can be bound).
    pub fn sql_predicate(&self, schema_expr: &str, table_expr: &str) -> String {
        if self.rules.is_empty() {
            return "true".to_owned();
        }
        let pattern = |p: &str| {
            let escaped: String = p
                .chars()
                .flat_map(|c| match c {
                    '\\' | '_' => vec!['\\', c],
                    '\'' => vec!['\'', '\''],
                    other => vec![other],
                })
                .collect();
            format!("'{escaped}'")
        };
        let matches = |r: &Rule| {
            format!(
                "({schema_expr} like {} escape '\\' and {table_expr} like {} escape '\\')",
                pattern(&r.schema),
                pattern(&r.table)
            )
        };
        let of = |exclude: bool| -> Vec<String> {
            self.rules
                .iter()
                .filter(|r| (r.action == RuleAction::Exclude) == exclude)
                .map(matches)
                .collect()
        };
        let (include, exclude) = (of(false), of(true));
        let included = if include.is_empty() {
            "false".to_owned()
        } else {
            include.join(" or ")
        };
        if exclude.is_empty() {
            format!("({included})")
        } else {
            format!("(({included}) and not ({}))", exclude.join(" or "))
        }
    }
}

/// DMS `%` matching: `%` is any run of characters; everything else matches itself exactly.
fn like(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative wildcard matching with backtracking to the last `%`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == '%' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '%')
}

#[cfg(test)]
mod tests;
