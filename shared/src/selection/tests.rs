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
