//! The staged bytes of a fixed workload (full load, then CDC in CSV and JSON Lines), compared
//! with `tests/fixtures/golden/staged.txt`: a restructure must not change one byte of what
//! consumers read. Only what differs from run to run is normalized (WAL positions, in key
//! hex and `X/Y` form; transaction ids; timestamps; sizes of files whose rows carry those). `PGSHIFT_UPDATE_GOLDEN=1` rewrites the file after a deliberate change.

use std::collections::BTreeMap;

use pgshift::lsn::Lsn;
use pgshift::staging::encode::Format;
use pgshift::staging::{MemorySink, ObjectSink};
use pgshift::state::MemoryStore;
use pgshift_tests::TestDb;

const WORKLOAD: &[&str] = &[
    "insert into public.items select g, 'item ' || g, g * 10 from generate_series(4, 6) g",
    "update public.items set qty = qty + 1 where id = 1",
    "update public.items set id = 100 where id = 2",
    "delete from public.items where id = 3",
    "begin; insert into public.plain values (7, 'seven'); insert into public.items values (7, 'seven', 7); commit;",
    "update public.docs set tag = 'b' where id = 1",
    "update public.docs_full set tag = 'b' where id = 1",
    "insert into public.docs values (2, repeat('y', 9000), 'big')",
    "truncate public.plain",
    "alter table public.items add column extra text",
    "insert into public.items values (200, 'with extra', 1, 'x,\"y\"')",
    "delete from public.docs_full where id = 1",
];

async fn setup(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "create table public.items (id int primary key, name text, qty int);
             insert into public.items select g, 'item ' || g, g from generate_series(1, 3) g;
             create table public.plain (k int, v text);
             insert into public.plain values (1, 'one'), (2, null), (3, '');
             create table public.docs (id int primary key, body text, tag text);
             create table public.docs_full (id int primary key, body text, tag text);
             alter table public.docs_full replica identity full;
             insert into public.docs values (1, repeat('x', 9000), 'a');
             insert into public.docs_full values (1, repeat('x', 9000), 'a');",
        )
        .await
        .unwrap();
}

/// Runs the workload for one CDC format; returns every staged object.
async fn staged(format: &str) -> BTreeMap<String, Vec<u8>> {
    let db = TestDb::new("golden").await;
    setup(&db).await;
    let sink = MemorySink::new();
    let state = MemoryStore::new();
    let task = format!("golden-{}", format.replace('.', "-"));
    let mut load = pgshift::options::LoadOptions::new(&task, db.config(), "golden");
    load.cdc = true;
    load.format = Format::parse(format, "format").unwrap();
    pgshift::job::full_load::run_local(&sink, &state, &load, 1, Default::default())
        .await
        .unwrap();
    let c = db.client().await;
    for sql in WORKLOAD {
        c.batch_execute(sql).await.unwrap();
    }
    let mut cdc = pgshift::options::CdcOptions::new(&task, db.config(), "golden");
    cdc.format = Format::parse(format, "format").unwrap();
    cdc.peek_sessions = 1;
    cdc.max_batch_changes = 4; // several batches
    pgshift::job::cdc_poll::run(&sink, &state, &cdc)
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for key in sink.list("").await.unwrap() {
        let body = sink.get(&key).await.unwrap().unwrap();
        out.insert(key, body.to_vec());
    }
    out
}

/// Every WAL position in `text`: 16-hex key form and `X/Y` form.
fn lsns(text: &str, found: &mut Vec<Lsn>) {
    let b = text.as_bytes();
    let hex = |c: u8| c.is_ascii_hexdigit() && !c.is_ascii_lowercase();
    let mut i = 0;
    while i < b.len() {
        if hex(b[i]) && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) {
            let mut j = i;
            while j < b.len() && hex(b[j]) {
                j += 1;
            }
            if j - i == 16 && (j == b.len() || !b[j].is_ascii_alphanumeric()) {
                found.push(Lsn::from_key_hex(&text[i..j]).unwrap());
            } else if j < b.len() && b[j] == b'/' && j - i <= 8 {
                let mut k = j + 1;
                while k < b.len() && hex(b[k]) {
                    k += 1;
                }
                if k > j + 1 && k - j - 1 <= 8 && (k == b.len() || !b[k].is_ascii_alphanumeric()) {
                    found.push(text[i..k].parse().unwrap());
                }
                j = k;
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
}

fn normalize(all: &BTreeMap<String, Vec<u8>>) -> String {
    // A chunk's start position is wherever the WAL was when its snapshot began: not part of
    // what a consumer reads back, and not the same from run to run.
    // Relation histories are keyed by the relation's oid, which differs from run to run.
    let mut all: BTreeMap<String, Vec<u8>> = all
        .iter()
        .filter(|(k, _)| !k.starts_with("_manifests/schema/relations/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in all.iter_mut() {
        // A JSON Lines file's bytes hold WAL positions and transaction ids: its checksum
        // differs from run to run (a CSV file's does not, and is kept).
        if k.starts_with("_manifests/cdc/") {
            let mut doc: serde_json::Value = serde_json::from_slice(v).unwrap();
            if doc["format"]["encoding"] == "jsonl" {
                for f in doc["files"].as_array_mut().unwrap() {
                    f["checksum"] = serde_json::json!("<run-dependent>");
                }
                *v = serde_json::to_vec_pretty(&doc).unwrap();
            }
        }
        if k.starts_with("_manifests/load/") {
            let mut doc: serde_json::Value = serde_json::from_slice(v).unwrap();
            for chunk in doc["chunks"].as_array_mut().unwrap() {
                chunk["start_lsn"] = serde_json::Value::Null;
                chunk["snapshot"] = serde_json::json!("<run-dependent>");
                chunk["snapshot_lsn"] = serde_json::Value::Null;
            }
            *v = serde_json::to_vec_pretty(&doc).unwrap();
        }
    }
    let all = &all;
    let mut found = Vec::new();
    for (k, v) in all {
        lsns(k, &mut found);
        lsns(&String::from_utf8_lossy(v), &mut found);
    }
    found.sort();
    found.dedup();
    let mut text = String::new();
    for (k, v) in all {
        let body = if k.ends_with(".gz") || k.ends_with(".parquet") {
            format!("<{} binary bytes>", v.len())
        } else {
            String::from_utf8_lossy(v).into_owned()
        };
        text.push_str(&format!("=== {k}\n{body}\n"));
    }
    // Every position is masked alike: which WAL records lie between two commits (so which
    // positions coincide) depends on what else the cluster writes. Objects stay listed in WAL
    // order (by their real keys). Longest first, so no position is replaced inside another.
    let mut forms: Vec<String> = Vec::new();
    for l in &found {
        forms.push(l.key_hex());
        forms.push(l.to_string());
    }
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    for from in forms {
        text = text.replace(&from, "<LSN>");
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        out.push_str(&mask(line));
        out.push('\n');
    }
    out
}

/// Masks transaction ids, timestamps and sizes that follow from them.
fn mask(line: &str) -> String {
    let mut s = line.to_owned();
    for field in [
        "\"xid\":",
        "\"lease_expires_ms\":",
        "\"bytes\":",
        "\"relid\":",
    ] {
        let mut from = 0;
        while let Some(at) = s[from..].find(field) {
            let mut start = from + at + field.len();
            if s[start..].starts_with(' ') {
                start += 1;
            }
            let end = s[start..]
                .find(|c: char| !c.is_ascii_digit())
                .map_or(s.len(), |e| start + e);
            s.replace_range(start..end, "_");
            from = start + 1;
        }
    }
    // Timestamps: YYYY-MM-DD[ T]HH:MM:SS.ffffff
    let b = s.as_bytes().to_vec();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        if i + 26 <= b.len() && is_ts(&b[i..i + 26]) {
            out.push_str("<TS>");
            i += 26;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn is_ts(b: &[u8]) -> bool {
    let digits = [
        0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22, 23, 24, 25,
    ];
    digits.iter().all(|&i| b[i].is_ascii_digit())
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b' ' || b[10] == b'T')
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
}

#[tokio::test]
async fn staged_bytes_of_a_fixed_workload_match_the_golden_file() {
    let mut text = String::new();
    for format in ["csv", "jsonl"] {
        text.push_str(&format!("##### {format}\n"));
        text.push_str(&normalize(&staged(format).await));
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden/staged.txt");
    if std::env::var("PGSHIFT_UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (PGSHIFT_UPDATE_GOLDEN=1 writes it)",
            path.display()
        )
    });
    if want != text {
        let (n, (a, b)) = want
            .lines()
            .zip(text.lines())
            .enumerate()
            .find(|(_, (a, b))| a != b)
            .unwrap_or((0, ("(length differs)", "")));
        panic!(
            "staged bytes differ from the golden file at line {}:\n want: {a}\n  got: {b}",
            n + 1
        );
    }
}
