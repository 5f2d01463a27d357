//! A consumer of staged CDC output, as a downstream job would be: read the batch manifests in
//! LSN order, read each file (JSON Lines or CSV with its schema versions), and apply the changes
//! to an in-memory copy of the tables keyed by primary key. Tests compare that copy with the
//! source.

use std::collections::BTreeMap;

use pgshift::staging::ObjectSink;
use pgshift::staging::layout::{BatchManifest, StoredSchema};
use tokio_postgres::Client;

/// Row: column name → text value (None = NULL).
pub type Row = BTreeMap<String, Option<String>>;
/// Table: key → row.
pub type Table = BTreeMap<String, Row>;

/// One staged change, decoded from either format.
#[derive(Debug, Clone, PartialEq)]
pub struct Staged {
    pub table: String,
    pub op: String,
    pub key: Option<Row>,
    pub after: Option<Row>,
    pub unchanged: Vec<String>,
    pub manifest: String,
}

/// Every committed manifest, in LSN order.
pub async fn manifests<S: ObjectSink>(sink: &S) -> Vec<(String, BatchManifest)> {
    let keys = sink.list("_manifests/cdc/").await.expect("list manifests");
    let mut out = Vec::new();
    for k in keys {
        let body = sink
            .get(&k)
            .await
            .expect("get manifest")
            .expect("manifest exists");
        let m: BatchManifest = serde_json::from_slice(&body).expect("manifest json");
        out.push((k, m));
    }
    out
}

/// Decompresses a `.gz` object.
pub fn gunzip(body: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut out)
        .expect("gzip");
    out
}

/// Parses CSV (RFC 4180; an unquoted empty field is NULL, `""` an empty string).
pub fn parse_csv(text: &[u8]) -> Vec<Vec<Option<String>>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = Vec::new();
    let mut quoted = false;
    let mut was_quoted = false;
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if quoted {
            if b == b'"' {
                if text.get(i + 1) == Some(&b'"') {
                    field.push(b'"');
                    i += 1;
                } else {
                    quoted = false;
                }
            } else {
                field.push(b);
            }
        } else {
            match b {
                b'"' => {
                    quoted = true;
                    was_quoted = true;
                }
                b',' | b'\n' => {
                    let value = if field.is_empty() && !was_quoted {
                        None
                    } else {
                        Some(String::from_utf8(std::mem::take(&mut field)).expect("utf8"))
                    };
                    row.push(value);
                    field.clear();
                    was_quoted = false;
                    if b == b'\n' {
                        rows.push(std::mem::take(&mut row));
                    }
                }
                _ => field.push(b),
            }
        }
        i += 1;
    }
    rows
}

/// Reads every staged change of every committed manifest, in order.
pub async fn read_changes<S: ObjectSink>(sink: &S) -> Vec<Staged> {
    let mut out = Vec::new();
    for (mkey, m) in manifests(sink).await {
        for f in &m.files {
            let body = sink
                .get(&f.key)
                .await
                .expect("get file")
                .expect("file listed in manifest exists");
            let body = if f.key.ends_with(".gz") {
                gunzip(&body)
            } else {
                body.to_vec()
            };
            let table = format!("{}.{}", f.schema, f.table);
            if f.key.contains(".jsonl") {
                let mut n = 0;
                for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    n += 1;
                    let v: serde_json::Value = serde_json::from_slice(line).expect("jsonl row");
                    let obj = |x: &serde_json::Value| -> Option<Row> {
                        x.as_object().map(|o| {
                            o.iter()
                                .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned)))
                                .collect()
                        })
                    };
                    out.push(Staged {
                        table: table.clone(),
                        op: v["op"].as_str().unwrap().to_owned(),
                        key: obj(&v["key"]),
                        after: obj(&v["after"]),
                        unchanged: v["unchanged"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_str().unwrap().to_owned())
                            .collect(),
                        manifest: mkey.clone(),
                    });
                }
                assert_eq!(n, f.rows, "{}: row count differs from the manifest", f.key);
            } else {
                let rows = parse_csv(&body);
                assert_eq!(
                    rows.len() as u64,
                    f.rows,
                    "{}: row count differs from the manifest",
                    f.key
                );
                let mut schemas = Vec::new();
                for seg in &f.schema_versions {
                    let s = sink
                        .get(&seg.key)
                        .await
                        .expect("get schema")
                        .expect("schema exists");
                    let s: StoredSchema = serde_json::from_slice(&s).expect("schema json");
                    schemas.push((seg.first_row, s));
                }
                for (i, fields) in rows.into_iter().enumerate() {
                    let (_, schema) = schemas
                        .iter()
                        .rev()
                        .find(|(first, _)| *first <= i as u64)
                        .expect("a schema version covers every row");
                    let offset = if m.commit_ts_column { 2 } else { 1 };
                    let cols = &schema.schema.columns;
                    assert_eq!(
                        fields.len(),
                        cols.len() + offset + 1,
                        "{}: row {i} has the wrong width",
                        f.key
                    );
                    let op = fields[0].clone().unwrap();
                    let unchanged: Vec<String> = fields[cols.len() + offset]
                        .as_deref()
                        .unwrap_or("")
                        .split(';')
                        .filter(|s| !s.is_empty())
                        .map(|n| cols[n.parse::<usize>().unwrap() - 1].name.clone())
                        .collect();
                    let row: Row = cols
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| !unchanged.contains(&c.name))
                        .map(|(j, c)| (c.name.clone(), fields[j + offset].clone()))
                        .collect();
                    let key: Row = cols
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.key)
                        .map(|(j, c)| (c.name.clone(), fields[j + offset].clone()))
                        .collect();
                    let (key, after) = match op.as_str() {
                        "I" => (None, Some(row)),
                        "U" => (Some(key), Some(row)),
                        "D" => (Some(key), None),
                        _ => (None, None),
                    };
                    out.push(Staged {
                        table: table.clone(),
                        op,
                        key,
                        after,
                        unchanged,
                        manifest: mkey.clone(),
                    });
                }
            }
        }
    }
    out
}

/// Applies changes to a model keyed by `key_col`.
pub fn apply(model: &mut BTreeMap<String, Table>, changes: &[Staged], key_col: &str) {
    for c in changes {
        let table = model.entry(c.table.clone()).or_default();
        let key_of = |r: &Row| {
            r.get(key_col)
                .cloned()
                .flatten()
                .expect("key column present")
        };
        match c.op.as_str() {
            "I" => {
                let after = c.after.clone().unwrap();
                table.insert(key_of(&after), after);
            }
            "U" => {
                let after = c.after.clone().unwrap();
                let old_key = c.key.as_ref().map(key_of).unwrap_or_else(|| key_of(&after));
                let mut row = table.remove(&old_key).unwrap_or_default();
                for (k, v) in after {
                    row.insert(k, v);
                }
                table.insert(key_of(&row), row);
            }
            "D" => {
                table.remove(&key_of(c.key.as_ref().unwrap()));
            }
            "T" => table.clear(),
            other => panic!("unknown op {other}"),
        }
    }
}

/// The source table's rows as text, keyed by `key_col`.
pub async fn source_rows(client: &Client, schema: &str, table: &str, key_col: &str) -> Table {
    let cols: Vec<String> = client
        .query(
            "select attname::text from pg_attribute where attrelid = format('%I.%I', $1::text, $2::text)::regclass and attnum > 0 and not attisdropped order by attnum",
            &[&schema, &table],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let select: Vec<String> = cols
        .iter()
        .map(|c| format!("{}::text", pgshift::source::quote_ident(c)))
        .collect();
    let rows = client
        .query(
            &format!(
                "select {} from {}",
                select.join(", "),
                pgshift::source::quote_qualified(schema, table)
            ),
            &[],
        )
        .await
        .unwrap();
    let mut out = Table::new();
    for r in rows {
        let row: Row = cols
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), r.get::<_, Option<String>>(i)))
            .collect();
        out.insert(row.get(key_col).cloned().flatten().unwrap(), row);
    }
    out
}

/// Asserts the model's table equals the source (columns the model lacks count as NULL:
/// they were added after the row's last change).
pub fn assert_same(model: &BTreeMap<String, Table>, name: &str, source: &Table) {
    let empty = Table::new();
    let staged = model.get(name).unwrap_or(&empty);
    let staged_keys: Vec<&String> = staged.keys().collect();
    let source_keys: Vec<&String> = source.keys().collect();
    assert_eq!(
        staged_keys.len(),
        source_keys.len(),
        "{name}: row count differs"
    );
    assert_eq!(staged_keys, source_keys, "{name}: keys differ");
    for (k, src) in source {
        let got = &staged[k];
        for (col, v) in src {
            let g = got.get(col).cloned().flatten();
            assert_eq!(&g, v, "{name} key {k} column {col}");
        }
    }
}
