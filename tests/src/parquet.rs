//! Parquet CDC read by an independent reader: pyarrow (the test virtualenv's,
//! `PGSHIFT_TEST_PYTHON`) reads the files the poller staged, and what it reads is compared
//! with the source — typed columns, edge values, ops, commit position and time, unchanged
//! TOAST marks, and a new file when a table's columns change within a batch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pgshift::job::cdc_poll;
use pgshift::options::CdcOptions;
use pgshift::staging::encode::Format;
use pgshift_tests::{Staging, env};

const TABLE: &str = "create table public.typed (
    id int primary key, i2 int2, i8 int8, f8 float8, b bool, d date, ts timestamp,
    tz timestamptz, n numeric(12,3), nn numeric, t text, j jsonb, arr int[], big text)";

/// Rows with edge values of every typed column, and generated ones.
const ROWS: &str = "insert into public.typed values
    (1, -32768, 9223372036854775807, 'NaN', true, '0044-03-15 BC', '1999-12-31 23:59:59.999999',
     '2024-02-29 12:00:00.5+05:30', -123456789.125, 'NaN', '', '{\"a\": [1, null]}', '{1,NULL,3}', null),
    (2, null, null, '-Infinity', false, '2000-01-01', '1900-01-01 00:00:00',
     '1970-01-01 00:00:00+00', 'NaN', '12345678901234567890.123456789', e'multi\\nline, \"quoted\"', 'null', '{}', 'small'),
    (3, 7, -1, 1.5e-07, null, null, null, null, null, null, null, null, null, null);
  insert into public.typed
    select g, g % 100, g * 1000003, g / 7.0, g % 2 = 0, date '2020-01-01' + g,
           timestamp '2021-06-01 10:00:00' + g * interval '1.25 second',
           timestamptz '2022-01-01 00:00:00+00' + g * interval '1 minute',
           g * 1.125, g / 3.0, 'row ' || g, jsonb_build_object('g', g), array[g, g + 1],
           (select string_agg(md5((g * 1000 + i)::text), '') from generate_series(1, 400) i)
    from generate_series(10, 209) g";

/// The source's rows in the form the reader script prints them (numbers as text, dates as
/// days since 1970, timestamps as microseconds since 1970 UTC, `big` as its md5).
const SOURCE_ROWS: &str = "select id::text, i2::text, i8::text, f8::text, b::text,
    (d - date '1970-01-01')::text, (extract(epoch from ts) * 1000000)::bigint::text,
    (extract(epoch from tz) * 1000000)::bigint::text, n::text, nn::text, t, j::text, arr::text,
    md5(big)
  from public.typed order by id";

/// Prints each file as JSON: its schema (name, Arrow type) and rows, every value as text
/// (floats as PostgreSQL writes them, dates as days, timestamps as microseconds, `big` as md5).
const READER: &str = r#"
import hashlib, json, math, sys
import pyarrow as pa, pyarrow.parquet as pq

def text(v):
    if v is None:
        return None
    if isinstance(v, bool):
        return 'true' if v else 'false'
    if isinstance(v, float):
        if math.isnan(v):
            return 'NaN'
        if math.isinf(v):
            return 'Infinity' if v > 0 else '-Infinity'
        r = repr(v)
        return r[:-2] if r.endswith('.0') else r
    return str(v)

out = []
for path in sys.argv[1:]:
    t = pq.read_table(path)
    cols = {}
    for name in t.column_names:
        col = t.column(name)
        if pa.types.is_date32(col.type):
            col = col.cast(pa.int32())
        elif pa.types.is_timestamp(col.type):
            col = col.cast(pa.int64())
        vals = col.to_pylist()
        if name == 'big':
            vals = [None if v is None else hashlib.md5(v.encode()).hexdigest() for v in vals]
        cols[name] = [text(v) for v in vals]
    rows = [{n: cols[n][i] for n in t.column_names} for i in range(t.num_rows)]
    out.append({'file': path, 'schema': [[f.name, str(f.type)] for f in t.schema], 'rows': rows})
print(json.dumps(out))
"#;

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// What pyarrow reads from `files`.
fn read_with_pyarrow(files: &[PathBuf]) -> Vec<serde_json::Value> {
    let python = env("PGSHIFT_TEST_PYTHON");
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(READER)
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    assert!(
        out.status.success(),
        "pyarrow could not read pgshift's Parquet: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

fn opts(task: &str, s: &Staging) -> CdcOptions {
    let mut o = CdcOptions::new(task, s.db.config(), "poller");
    o.format = Format::parse("parquet", "format").unwrap();
    o
}

#[tokio::test]
async fn cdc_parquet_is_read_by_pyarrow_as_the_source_has_it() {
    let s = Staging::new("pq_cdc").await;
    let c = s.db.client().await;
    c.batch_execute(TABLE).await.unwrap();
    let o = opts("pq-cdc", &s);
    let first = cdc_poll::run(&s.sink, &s.state, &o).await.unwrap();
    assert_eq!(first.changes, 0);
    c.batch_execute(ROWS).await.unwrap();
    let inserted = cdc_poll::run(&s.sink, &s.state, &o).await.unwrap();
    assert_eq!(inserted.changes, 203, "{inserted:#?}");

    let stage = s.dir.path().join("stage");
    let files = parquet_files(&stage.join("public/typed/cdc"));
    assert_eq!(files.len(), 1, "{files:?}");
    let read = read_with_pyarrow(&files);
    let file = &read[0];
    // Typed columns after op, commit_lsn, commit_ts; numeric(12,3) a decimal with its
    // `__special` column; unconstrained numeric, jsonb and arrays as text; `unchanged` last.
    let schema: Vec<(String, String)> = file["schema"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f[0].as_str().unwrap().into(), f[1].as_str().unwrap().into()))
        .collect();
    let want = [
        ("op", "string"),
        ("commit_lsn", "string"),
        ("commit_ts", "timestamp[us, tz=UTC]"),
        ("id", "int32"),
        ("i2", "int16"),
        ("i8", "int64"),
        ("f8", "double"),
        ("b", "bool"),
        ("d", "date32[day]"),
        ("ts", "timestamp[us]"),
        ("tz", "timestamp[us, tz=UTC]"),
        ("n", "decimal128(12, 3)"),
        ("n__special", "string"),
        ("nn", "string"),
        ("t", "string"),
        ("j", "string"),
        ("arr", "string"),
        ("big", "string"),
        ("unchanged", "string"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| ((*a).into(), (*b).into()))
        .collect();
    assert_eq!(schema, want);

    // Every value as the source has it.
    let rows = file["rows"].as_array().unwrap();
    let source = c.query(SOURCE_ROWS, &[]).await.unwrap();
    assert_eq!(rows.len(), source.len());
    let names = [
        "id", "i2", "i8", "f8", "b", "d", "ts", "tz", "n", "nn", "t", "j", "arr", "big",
    ];
    let by_id: BTreeMap<i64, &serde_json::Value> = rows
        .iter()
        .map(|r| (r["id"].as_str().unwrap().parse().unwrap(), r))
        .collect();
    for src in &source {
        let id: i64 = src.get::<_, Option<String>>(0).unwrap().parse().unwrap();
        let row = by_id[&id];
        for (i, name) in names.iter().enumerate() {
            let want: Option<String> = src.get(i);
            let got = row[*name].as_str().map(str::to_owned);
            let got = match (*name, got) {
                // numeric(12,3)'s NaN is null in the decimal, named in `n__special`.
                ("n", None) => row["n__special"].as_str().map(str::to_owned),
                (_, got) => got,
            };
            assert_eq!(got, want, "row {id} column {name}: {row}");
        }
        assert_eq!(row["op"], "I");
        assert!(row["unchanged"].is_null(), "{row}");
    }
    // One transaction of inserts: one commit position, at a commit time of this run.
    let lsns: std::collections::BTreeSet<&str> = rows
        .iter()
        .map(|r| r["commit_lsn"].as_str().unwrap())
        .collect();
    assert_eq!(lsns.len(), 1, "{lsns:?}");
    assert!(lsns.first().unwrap().parse::<pgshift::lsn::Lsn>().is_ok());
    let commit_us: i64 = rows[0]["commit_ts"].as_str().unwrap().parse().unwrap();
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    assert!(
        (now_us - commit_us).abs() < 600_000_000,
        "commit time {commit_us} is not near now {now_us}"
    );

    // The next batch: an update leaving the TOAST value unchanged, a delete, a primary key
    // moved (D + I), a truncate, and a column added after rows of the batch: the table's rows
    // after it go to a second file with the new column.
    for sql in [
        "update public.typed set i2 = 1 where id = 10",
        "delete from public.typed where id = 11",
        "update public.typed set id = 1000 where id = 12",
        "alter table public.typed add column added text",
        "insert into public.typed (id, added) values (2000, 'new column')",
        "truncate public.typed",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let changed = cdc_poll::run(&s.sink, &s.state, &o).await.unwrap();
    assert!(changed.changes >= 5, "{changed:#?}");
    let files: Vec<PathBuf> = parquet_files(&stage.join("public/typed/cdc"))
        .into_iter()
        .filter(|f| !files.contains(f))
        .collect();
    assert_eq!(files.len(), 2, "one file per schema version: {files:?}");
    let read = read_with_pyarrow(&files);
    let (before, after) = (&read[0], &read[1]);
    assert!(
        before["file"].as_str().unwrap().ends_with(".parquet")
            && after["file"].as_str().unwrap().ends_with("_0002.parquet"),
        "{files:?}"
    );
    let has_added = |f: &serde_json::Value| {
        f["schema"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c[0] == "added")
    };
    assert!(!has_added(before) && has_added(after));
    let ops = |f: &serde_json::Value| -> Vec<(String, Option<String>)> {
        f["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["op"].as_str().unwrap().to_owned(),
                    r["id"].as_str().map(str::to_owned),
                )
            })
            .collect()
    };
    let some = |op: &str, id: &str| (op.to_owned(), Some(id.to_owned()));
    assert_eq!(
        ops(before),
        [
            some("U", "10"),
            some("D", "11"),
            some("D", "12"),
            some("I", "1000")
        ]
    );
    assert_eq!(ops(after), [some("I", "2000"), ("T".to_owned(), None)]);
    let update = &before["rows"][0];
    // The unchanged TOAST value is marked (column 14, `big`), not written as a placeholder.
    assert_eq!(update["unchanged"], "14", "{update}");
    assert!(update["big"].is_null(), "{update}");
    assert_eq!(update["i2"], "1");
    assert_eq!(after["rows"][0]["added"], "new column");
}

/// DMS's `ParquetTimestampInMillisecond` (through `--s3-settings`): every timestamp column of
/// the load's and CDC's Parquet — the table's and `commit_ts` — is `timestamp[ms]` for
/// pyarrow, each value the source's truncated toward the past (before 1970 too); `apply`
/// refuses such a stage, naming the setting (it lost the microseconds).
#[tokio::test]
async fn parquet_timestamps_in_milliseconds_as_dms_writes_them() {
    let source = pgshift_tests::TestDb::new("pq_ms_src").await;
    let target = pgshift_tests::TestDb::new("pq_ms_dst").await;
    let c = source.client().await;
    c.batch_execute(
        "create table public.m (id int primary key, ts timestamp, tz timestamptz);
         insert into public.m values (1, '1999-12-31 23:59:59.999999', '2024-02-29 12:00:00.123456+05:30'),
                                     (2, '1969-07-20 20:17:40.000999', null);",
    )
    .await
    .unwrap();
    let task = pgshift_tests::CliTask::new("pqms", &source.config(), &target.config());
    let (src, dst) = (task.src.clone(), task.dst.clone());
    let stage = PathBuf::from(task.common()[3]);
    let s3 = r#"{"DataFormat": "parquet", "ParquetTimestampInMillisecond": true}"#;
    let (code, out, err) = task.run(&["full-load", "--source", &src, "--cdc", "--s3-settings", s3]);
    assert_eq!(code, Some(0), "{out}{err}");
    c.batch_execute("insert into public.m values (3, '2026-12-02 10:00:00.000500', '2026-12-02 10:00:00.999999+00')")
        .await
        .unwrap();
    let (code, out, err) = task.run(&["cdc", "--source", &src, "--once", "--s3-settings", s3]);
    assert_eq!(code, Some(0), "{out}{err}");
    let files = parquet_files(&stage);
    assert_eq!(files.len(), 2, "{files:?}");
    let mut seen = BTreeMap::new();
    for f in read_with_pyarrow(&files) {
        let schema: BTreeMap<String, String> = f["schema"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_owned(),
                    p[1].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(schema["ts"], "timestamp[ms]", "{schema:?}");
        assert_eq!(schema["tz"], "timestamp[ms, tz=UTC]", "{schema:?}");
        assert_eq!(schema["commit_ts"], "timestamp[ms, tz=UTC]", "{schema:?}");
        for row in f["rows"].as_array().unwrap() {
            seen.insert(
                row["id"].as_str().unwrap().to_owned(),
                (row["ts"].clone(), row["tz"].clone()),
            );
        }
    }
    let want = c
        .query(
            "select id::text, floor(extract(epoch from ts) * 1000)::bigint::text, floor(extract(epoch from tz) * 1000)::bigint::text from public.m order by id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(seen.len(), want.len());
    for r in want {
        let (id, ts, tz): (String, Option<String>, Option<String>) = (r.get(0), r.get(1), r.get(2));
        let got = &seen[&id];
        assert_eq!(got.0.as_str(), ts.as_deref(), "ts of {id}");
        assert_eq!(got.1.as_str(), tz.as_deref(), "tz of {id}");
    }
    let (code, out, err) = task.run(&["apply", "--target", &dst]);
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(err.contains("ParquetTimestampInMillisecond"), "{err}");
    let (code, _, err) = task.run(&[
        "cdc",
        "--source",
        &src,
        "--once",
        "--s3-settings",
        r#"{"DataFormat": "csv", "ParquetTimestampInMillisecond": true}"#,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("ParquetTimestampInMillisecond"), "{err}");
    let _ = pgshift_tests::run_cli(&["teardown", "--task", "pqms", "--source", &src, "--yes"]);
}
