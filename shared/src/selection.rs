//! Table selection with DMS table-mapping rules.
//!
//! A DMS user brings the `rules` of their table mapping; pgshift reads its selection rules:
//! `object-locator` `schema-name` / `table-name` with `%` as the only wildcard (any run of
//! characters, possibly empty), and `rule-action` `include`, `exclude` or `explicit` (no
//! wildcards). As DMS applies them, a table is selected when some include (or explicit) rule
//! matches it and no exclude rule does, whatever their order. Names match exactly and
//! case-sensitively: `Table1` and `table1` are different tables. Without rules every user table
//! is selected. `table-settings` rules with `parallel-load` `ranges` on one column cut that
//! table's full load at the boundaries given ([`LoadRanges`]). Rules pgshift cannot honour
//! (transformations, filters, column lists, other table settings) are rejected with the rule's
//! id instead of silently changing what is moved.

use serde::Deserialize;

use crate::error::{Error, Result};

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
        for (i, value) in doc.rules.into_iter().enumerate() {
            if value["rule-type"] == "table-settings" {
                load_ranges.extend(table_settings(&value, i, field)?);
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
                        "rule-type {:?} is not supported; pgshift reads selection and table-settings rules",
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
        Ok(Selection { rules, load_ranges })
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
mod tests {
    use super::*;

    fn rules(json: &str) -> Selection {
        Selection::from_json(json, "tables").unwrap()
    }

    #[test]
    fn keys_pgshift_does_not_read_are_named_errors() {
        for (rule, key) in [
            (
                r#"{"rule-type":"selection","rule-id":"7","rule-name":"a","object-locator":{"schema-name":"s","table-name":"t"},"rule-action":"include","load-order":2}"#,
                "load-order",
            ),
            (
                r#"{"rule-type":"selection","rule-id":"7","object-locator":{"schema-name":"s","table-nmae":"t"},"rule-action":"include"}"#,
                "object-locator.table-nmae",
            ),
        ] {
            let err = Selection::from_json(&format!(r#"{{"rules":[{rule}]}}"#), "--tables")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains("rule-id 7"), "{err}");
        }
    }

    #[test]
    fn sql_predicates_quote_and_escape_the_patterns() {
        let sel = rules(
            r#"{"rules": [
                {"rule-type": "selection", "rule-id": "1", "rule-name": "1",
                 "object-locator": {"schema-name": "pub_%", "table-name": "it's\\%"}, "rule-action": "include"},
                {"rule-type": "selection", "rule-id": "2", "rule-name": "2",
                 "object-locator": {"schema-name": "%", "table-name": "tmp%"}, "rule-action": "exclude"}]}"#,
        );
        assert_eq!(
            sel.sql_predicate("s", "t"),
            r"(((s like 'pub\_%' escape '\' and t like 'it''s\\%' escape '\')) and not ((s like '%' escape '\' and t like 'tmp%' escape '\')))"
        );
        assert_eq!(Selection::all().sql_predicate("s", "t"), "true");
    }

    #[test]
    fn wildcards_match_like_dms() {
        assert!(like("%", ""));
        assert!(like("%", "anything"));
        assert!(like("order%", "orders"));
        assert!(like("order%", "order"));
        assert!(!like("order%", "Orders"));
        assert!(like("%_log", "audit_log"));
        assert!(like("a%b%c", "aXXbYYc"));
        assert!(!like("a%b%c", "aXXbYY"));
        assert!(like("a.b \"c\"", "a.b \"c\""));
        assert!(!like("_", "x"), "underscore is not a wildcard in DMS rules");
    }

    #[test]
    fn exclude_wins_whatever_the_order() {
        let sel = rules(
            r#"{"rules":[
              {"rule-type":"selection","rule-id":"2","rule-name":"2","object-locator":{"schema-name":"public","table-name":"tmp%"},"rule-action":"exclude"},
              {"rule-type":"selection","rule-id":"1","rule-name":"1","object-locator":{"schema-name":"public","table-name":"%"},"rule-action":"include"}
            ]}"#,
        );
        assert!(sel.selects("public", "orders"));
        assert!(!sel.selects("public", "tmp_x"));
        assert!(!sel.selects("other", "orders"));
    }

    #[test]
    fn names_are_case_sensitive() {
        let sel = rules(
            r#"{"rules":[{"rule-type":"selection","rule-id":1,"object-locator":{"schema-name":"public","table-name":"Table1"},"rule-action":"include"}]}"#,
        );
        assert!(sel.selects("public", "Table1"));
        assert!(!sel.selects("public", "table1"));
        let tables = vec![("public".to_owned(), "table1".to_owned())];
        assert_eq!(sel.unmatched_exact(&tables).len(), 1);
    }

    #[test]
    fn empty_rules_select_everything() {
        assert!(Selection::all().selects("any", "thing"));
    }

    #[test]
    fn bad_mappings_name_the_rule() {
        let cases = [
            ("not json", "not DMS table-mapping JSON"),
            (
                r#"{"rules":[{"rule-type":"transformation","rule-id":"7"}]}"#,
                "rule-id 7",
            ),
            (
                r#"{"rules":[{"rule-type":"selection","rule-id":"3","object-locator":{"schema-name":"s","table-name":"t"},"rule-action":"keep"}]}"#,
                "rule-action",
            ),
            (
                r#"{"rules":[{"rule-type":"selection","rule-id":"4","object-locator":{"table-name":"t"},"rule-action":"include"}]}"#,
                "schema-name is missing",
            ),
            (
                r#"{"rules":[{"rule-type":"selection","rule-id":"5","object-locator":{"schema-name":"s%","table-name":"t"},"rule-action":"explicit"}]}"#,
                "explicit rule",
            ),
            (
                r#"{"rules":[{"rule-type":"selection","rule-id":"6","object-locator":{"schema-name":"s","table-name":"t"},"rule-action":"include","filters":[{"filter-type":"source"}]}]}"#,
                "row filters",
            ),
        ];
        for (json, want) in cases {
            let err = Selection::from_json(json, "tables")
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{json}: {err}");
            assert!(err.contains("tables"), "{err}");
        }
    }

    proptest::proptest! {
        #[test]
        fn literal_patterns_match_only_themselves(a in "[a-zA-Z0-9_ .\"]{0,12}", b in "[a-zA-Z0-9_ .\"]{0,12}") {
            proptest::prop_assert_eq!(like(&a, &b), a == b);
            proptest::prop_assert!(like("%", &b));
        }
    }

    #[test]
    fn table_settings_ranges_parse_and_the_rest_is_named() {
        let sel = rules(
            r#"{"rules":[{"rule-type":"selection","rule-id":"1","object-locator":{"schema-name":"public","table-name":"%"},"rule-action":"include"},
              {"rule-type":"table-settings","rule-id":"2","rule-name":"2","object-locator":{"schema-name":"public","table-name":"Orders"},
               "parallel-load":{"type":"ranges","columns":["id"],"boundaries":[["10"],[20]]}},
              {"rule-type":"table-settings","rule-id":"3","object-locator":{"schema-name":"public","table-name":"t"},"parallel-load":{"type":"none"}}]}"#,
        );
        let r = sel.load_ranges_for("public", "Orders").unwrap();
        assert_eq!(
            (r.column.as_str(), r.boundaries.clone()),
            ("id", vec!["10".to_owned(), "20".to_owned()])
        );
        assert!(sel.load_ranges_for("public", "orders").is_none());
        assert!(sel.selects("public", "Orders"));
        for (json, want) in [
            (r#"{"type":"partitions-auto"}"#, "partitions-auto"),
            (
                r#"{"type":"ranges","columns":["a","b"],"boundaries":[["1","2"]]}"#,
                "one column",
            ),
            (
                r#"{"type":"ranges","columns":["a"],"boundaries":[]}"#,
                "empty",
            ),
            (
                r#"{"type":"ranges","columns":["a"],"boundaries":[["1","2"]]}"#,
                "one value",
            ),
            (
                r#"{"type":"ranges","columns":["a"],"boundaries":[[1]],"batch-size":5}"#,
                "batch-size",
            ),
        ] {
            let doc = format!(
                r#"{{"rules":[{{"rule-type":"table-settings","rule-id":"9","object-locator":{{"schema-name":"s","table-name":"t"}},"parallel-load":{json}}}]}}"#
            );
            let err = Selection::from_json(&doc, "tables")
                .unwrap_err()
                .to_string();
            assert!(err.contains(want) && err.contains("rule-id 9"), "{err}");
        }
        let err = Selection::from_json(
            r#"{"rules":[{"rule-type":"table-settings","rule-id":"4","object-locator":{"schema-name":"s","table-name":"t%"},"parallel-load":{"type":"none"}}]}"#,
            "tables",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot use %"), "{err}");
        let err = Selection::from_json(
            r#"{"rules":[{"rule-type":"table-settings","rule-id":"5","object-locator":{"schema-name":"s","table-name":"t"},"lob-settings":{"mode":"limited"}}]}"#,
            "tables",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("lob-settings"), "{err}");
    }
}
