//! The full load against a real PostgreSQL: staged files equal `COPY ... TO STDOUT` of the
//! source, chunked loads under concurrent writes converge with CDC from L0, killed exports
//! retry cleanly, selection rules and bad input.

use std::collections::BTreeMap;
use std::sync::Arc;

use pgshift::job::cdc_poll;
use pgshift::job::full_load::{self, Progress};
use pgshift::options::{CdcOptions, LoadOptions};
use pgshift::selection::Selection;
use pgshift::staging::ObjectSink;
use pgshift::staging::decode::parse_csv_fields;
use pgshift::staging::encode::Format;
use pgshift::staging::layout::LoadManifest;
use pgshift::staging::{Crash, UnreliableSink};
use pgshift::state::StateStore;
use pgshift::state::records::ChunkId;
use pgshift_tests::replay::{self, Row, Table};
use pgshift_tests::{Staging, TestDb, env};

type Fields = Vec<Option<String>>;

/// A test database with its staging, and the load's options and runner.
struct Load(Staging);

impl std::ops::Deref for Load {
    type Target = Staging;
    fn deref(&self) -> &Staging {
        &self.0
    }
}

impl Load {
    async fn new(prefix: &str) -> Load {
        Load(Staging::new(prefix).await)
    }

    fn opts(&self, task: &str, format: &str, chunk_mib: u64) -> LoadOptions {
        let mut o = LoadOptions::new(task, self.db.config(), "test-loader");
        o.format = Format::parse(format, "format").unwrap();
        o.chunk_mib = chunk_mib;
        o
    }

    async fn run(&self, o: &LoadOptions, parallel: usize) -> full_load::LoadReport {
        full_load::run_local(
            &self.sink,
            &self.state,
            o,
            parallel,
            Arc::new(Progress::default()),
        )
        .await
        .unwrap_or_else(|e| panic!("full load failed: {e}"))
    }
}

fn to_strings(fields: &[Option<Vec<u8>>]) -> Fields {
    fields
        .iter()
        .map(|f| f.as_ref().map(|b| String::from_utf8(b.clone()).unwrap()))
        .collect()
}

/// The source table as COPY CSV rows, parsed, sorted.
async fn source_copy(
    c: &tokio_postgres::Client,
    schema: &str,
    table: &str,
    columns: &[String],
) -> Vec<Fields> {
    use futures_util::StreamExt;
    let cols: Vec<String> = columns
        .iter()
        .map(|c| pgshift::source::quote_ident(c))
        .collect();
    let sql = format!(
        "copy (select {} from {}) to stdout with (format csv)",
        cols.join(", "),
        pgshift::source::quote_qualified(schema, table)
    );
    let stream = c.copy_out(&sql).await.unwrap();
    let mut stream = std::pin::pin!(stream);
    let mut bytes = Vec::new();
    while let Some(b) = stream.next().await {
        bytes.extend_from_slice(&b.unwrap());
    }
    let mut rows = Vec::new();
    let mut split = pgshift::staging::decode::CsvRows::new();
    let mut fields = Vec::new();
    split
        .feed(&bytes, |r| {
            parse_csv_fields(r, &mut fields)?;
            rows.push(to_strings(&fields));
            Ok(())
        })
        .unwrap();
    rows.sort();
    rows
}

/// The staged rows of a table (via its load manifest), parsed, sorted.
async fn staged_rows<S: ObjectSink>(sink: &S, m: &LoadManifest) -> Vec<Fields> {
    let mut rows = Vec::new();
    for chunk in &m.chunks {
        let body = sink.get(&chunk.key).await.unwrap().unwrap();
        let body = if chunk.key.ends_with(".gz") {
            replay::gunzip(&body)
        } else {
            body.to_vec()
        };
        let mut split = pgshift::staging::decode::CsvRows::new();
        let mut fields = Vec::new();
        if chunk.key.contains(".jsonl") {
            for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let v: serde_json::Value = serde_json::from_slice(line).unwrap();
                assert_eq!(v["op"], "I");
                assert_eq!(v["schema"], m.schema.as_str());
                rows.push(
                    m.columns
                        .iter()
                        .map(|c| v["after"][c].as_str().map(str::to_owned))
                        .collect(),
                );
            }
        } else {
            split
                .feed(&body, |r| {
                    parse_csv_fields(r, &mut fields)?;
                    rows.push(to_strings(&fields));
                    Ok(())
                })
                .unwrap();
            split.finish().unwrap();
        }
    }
    rows.sort();
    rows
}

async fn manifests<S: ObjectSink>(sink: &S) -> Vec<LoadManifest> {
    let mut out = Vec::new();
    for k in sink.list("_manifests/load/").await.unwrap() {
        if k.ends_with("_chunks.json") {
            continue;
        }
        let body = sink.get(&k).await.unwrap().unwrap();
        out.push(serde_json::from_slice(&body).unwrap());
    }
    out
}

async fn apply_corpus(db: &TestDb) {
    let dir = std::path::PathBuf::from(env("PGSHIFT_TEST_CORPUS")).join("debezium-postgres");
    let c = db.client().await;
    for f in [
        "init_database.ddl",
        "postgres_create_tables.ddl",
        "debezium_type_inserts.sql",
    ] {
        let sql = std::fs::read_to_string(dir.join(f))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()));
        c.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("applying {f}: {e:?}"));
    }
}

async fn corpus_loads_exactly(format: &str) {
    let l = Load::new("fl_corpus").await;
    apply_corpus(&l.db).await;
    let report = l.run(&l.opts("corpus", format, 1), 2).await;
    assert!(report.tables >= 20, "{report:?}");
    let c = l.db.client().await;
    let ms = manifests(&l.sink).await;
    assert_eq!(ms.len(), report.tables);
    let mut compared = 0;
    for m in &ms {
        let source = source_copy(&c, &m.schema, &m.table, &m.columns).await;
        let staged = staged_rows(&l.sink, m).await;
        assert_eq!(staged.len() as u64, m.rows, "{}.{}", m.schema, m.table);
        assert_eq!(staged, source, "{}.{} differs from COPY", m.schema, m.table);
        compared += source.len();
    }
    assert!(compared > 20, "the corpus has rows");
    assert!(
        ms.iter().any(|m| m.schema == "Quoted_\" . Schema"),
        "the quoted schema is loaded"
    );
}

#[tokio::test]
async fn corpus_tables_load_equal_to_copy_csv() {
    corpus_loads_exactly("csv").await;
}

#[tokio::test]
async fn corpus_tables_load_equal_to_copy_jsonl_gzip() {
    corpus_loads_exactly("jsonl.gz").await;
}

/// Raw CSV rows (each with its newline), sorted: byte-exact comparison material.
fn raw_rows(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut rows = Vec::new();
    let mut split = pgshift::staging::decode::CsvRows::new();
    split
        .feed(bytes, |r| {
            rows.push(r.to_vec());
            Ok(())
        })
        .unwrap();
    split.finish().unwrap();
    rows.sort();
    rows
}

/// The export reads COPY text and writes CSV itself: every value that text and CSV escape
/// differently must come out as the server's own `COPY ... (format csv)` bytes.
#[tokio::test]
async fn staged_csv_is_byte_for_byte_what_copy_csv_gives() {
    let l = Load::new("fl_bytes").await;
    let c = l.db.client().await;
    c.batch_execute(
        r#"create table public.nasty (id int primary key, t text, b bytea, a text[], j jsonb, n numeric, ts timestamptz);
        insert into public.nasty values
          (1, e'tab\there', '\x00ff', array['a,b', 'q"uote', null, ''], '{"k": "v\\n\"x\""}', 'NaN', 'infinity'),
          (2, e'two\nlines\r\nand cr\r', '\x5c', array[e'back\\slash'], '[]', -0.000100, '2024-02-29 12:00:00.123456+05:30'),
          (3, '', '', '{}', 'null', 0, null),
          (4, null, null, null, null, null, null),
          (5, e'\\.', e'\\x2e', array['\.'], '"\\."', 1e30, '-infinity'),
          (6, '\N', 'N', array['NULL', 'null'], '{"a": null}', 12.5, 'epoch'),
          (7, e'ctl \x01 \b \f \v \x7f end', '\x0a0d09', array[e'\t'], '{"t": "\t"}', 1, now()),
          (8, 'ünïcødé 😀 ,"', '\xe282ac', array['ü'], '{"ü": "😀"}', 2, now()),
          (9, ' lead and trail ', '\x20', array[' '], '" "', 3, now()),
          (10, '"', '\x22', array['"'], '"\""', 4, now());
        create table public.one (v text);
        insert into public.one values (e'\\.'), (''), (null), ('x'), ('\N'), (e'\\');
        create table public."Zero" ();
        insert into public."Zero" default values;
        insert into public."Zero" default values;"#,
    )
    .await
    .unwrap();
    let report = l.run(&l.opts("bytes", "csv", 1), 1).await;
    assert_eq!(report.tables, 3, "{report:?}");
    let ms = manifests(&l.sink).await;
    for m in &ms {
        let cols: Vec<String> = m
            .columns
            .iter()
            .map(|c| pgshift::source::quote_ident(c))
            .collect();
        let sql = format!(
            "copy (select {} from {}) to stdout with (format csv)",
            cols.join(", "),
            pgshift::source::quote_qualified(&m.schema, &m.table)
        );
        let mut source = Vec::new();
        let stream = c.copy_out(&sql).await.unwrap();
        let mut stream = std::pin::pin!(stream);
        while let Some(b) = futures_util::StreamExt::next(&mut stream).await {
            source.extend_from_slice(&b.unwrap());
        }
        let mut staged = Vec::new();
        for chunk in &m.chunks {
            staged.extend_from_slice(&l.sink.get(&chunk.key).await.unwrap().unwrap());
        }
        let want = match m.table.as_str() {
            "nasty" => 10,
            "one" => 6,
            _ => 2,
        };
        assert_eq!(m.rows, want, "{}", m.table);
        assert_eq!(
            raw_rows(&staged),
            raw_rows(&source),
            "{} differs from COPY csv:\n{}\n---\n{}",
            m.table,
            String::from_utf8_lossy(&staged),
            String::from_utf8_lossy(&source)
        );
    }
}

/// A CLI worker keeps its session from chunk to chunk (one backend, each chunk its own
/// snapshot) and opens a new one when the kept session was cut between chunks.
#[tokio::test]
async fn a_worker_session_serves_many_chunks_and_survives_a_cut() {
    let l = Load::new("fl_session").await;
    let c = l.db.client().await;
    c.batch_execute("create table public.t (id int primary key, v text); insert into public.t select g, repeat('x', 200) from generate_series(1, 40000) g;")
        .await
        .unwrap();
    c.batch_execute("vacuum analyze public.t").await.unwrap();
    let o = l.opts("session", "csv", 1);
    let (_, ids) = full_load::plan(&l.sink, &l.state, &o).await.unwrap();
    assert!(ids.len() >= 4, "a table of several chunks: {}", ids.len());
    let mut session = pgshift::source::snapshot::ChunkSession::default();
    let mut rows = 0;
    for (i, id) in ids.iter().enumerate() {
        if i == 2 {
            assert_eq!(session.connects, 1, "two chunks, one session");
            let cut: i64 = c
                .query_one(
                    "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity \
                     where datname = current_database() and application_name = 'pgshift-full-load') k",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(cut, 1, "the worker's one session is cut");
        }
        rows += full_load::export_chunk_in(&l.sink, &l.state, &o, id, &mut session)
            .await
            .unwrap()
            .rows;
    }
    assert_eq!(
        session.connects, 2,
        "a new session after the cut, then kept"
    );
    assert_eq!(rows, 40_000);
    let ms = full_load::finish(
        &l.sink,
        &l.state,
        "session",
        &pgshift::events::Events::off(),
    )
    .await
    .unwrap();
    assert_eq!(ms[0].rows, 40_000);
}

/// Many chunks while updates, inserts and deletes run; then CDC from L0 applied as upserts on
/// top of the load equals the source.
#[tokio::test]
async fn chunked_load_under_writes_converges_with_cdc_from_l0() {
    let l = Load::new("fl_live").await;
    let c = l.db.client().await;
    c.batch_execute(
        "create table public.acct (id int primary key, balance int not null, pad text);
         insert into public.acct select g, 0, repeat('p', 200) from generate_series(1, 30000) g;
         analyze public.acct;",
    )
    .await
    .unwrap();
    let mut o = l.opts("live", "csv", 1);
    o.cdc = true;
    // Writers run during the whole load.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (client, stop) = (l.db.client().await, stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = 1 + (i * 7919 + w * 13) % 30000;
                let sql = match i % 4 {
                    0 => format!("update public.acct set balance = balance + 1 where id = {id}"),
                    1 => format!("insert into public.acct values ({}, 1, 'new') on conflict (id) do update set balance = 5", 100_000 + i * 2 + w),
                    2 => format!("delete from public.acct where id = {id}"),
                    _ => format!("update public.acct set id = {} where id = {id}", 200_000 + i * 2 + w),
                };
                let _ = client.batch_execute(&sql).await;
                i += 1;
            }
            i
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let report = l.run(&o, 2).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    assert!(report.chunks >= 4, "{report:?}");
    assert!(
        writes > 50,
        "the workload ran during the load ({writes} writes)"
    );
    let l0 = report.l0.expect("L0 recorded");

    // CDC from L0.
    let mut co = CdcOptions::new("live", l.db.config(), "cdc-owner");
    co.format = Format::parse("jsonl", "format").unwrap();
    let r = cdc_poll::run(&l.sink, &l.state, &co).await.unwrap();
    assert_eq!(r.start_checkpoint, l0, "CDC starts at the load's L0");

    // Consumer: the load, then CDC in commit order as upserts.
    let m = manifests(&l.sink)
        .await
        .into_iter()
        .find(|m| m.table == "acct")
        .unwrap();
    let mut table = Table::new();
    for fields in staged_rows(&l.sink, &m).await {
        let row: Row = m.columns.iter().cloned().zip(fields).collect();
        table.insert(row["id"].clone().unwrap(), row);
    }
    let mut model = BTreeMap::from([("public.acct".to_owned(), table)]);
    let changes = replay::read_changes(&l.sink).await;
    replay::apply(&mut model, &changes, "id");
    let source = replay::source_rows(&c, "public", "acct", "id").await;
    replay::assert_same(&model, "public.acct", &source);
}

#[tokio::test]
async fn a_killed_export_is_retried_into_one_complete_object() {
    let l = Load::new("fl_kill").await;
    let c = l.db.client().await;
    c.batch_execute("create table public.t (id int primary key, v text); insert into public.t select g, md5(g::text) from generate_series(1, 50000) g;")
        .await
        .unwrap();
    let mut o = l.opts("kill", "csv", 1);
    o.lease_ttl = std::time::Duration::ZERO;
    let (_, ids) = full_load::plan(&l.sink, &l.state, &o).await.unwrap();
    let id: ChunkId = ids[0].clone();
    // The worker dies after 300 kB were written (no clean-up, no state change).
    let dying = UnreliableSink::new(l.sink.clone(), Crash::AfterBytes(300_000));
    let err = full_load::export_chunk(&dying, &l.state, &o, &id)
        .await
        .unwrap_err();
    assert!(matches!(err, pgshift::Error::Injected(_)), "{err}");
    let key = format!("chunk#public.t#{}", id.n);
    let rec = l.state.get("kill", &key).await.unwrap().unwrap();
    assert_eq!(
        rec.doc["status"], "running",
        "a killed export leaves the chunk running"
    );
    assert!(
        l.sink.list("public/t/LOAD").await.unwrap().is_empty(),
        "no half object is visible"
    );
    assert!(
        full_load::finish(&l.sink, &l.state, "kill", &pgshift::events::Events::off())
            .await
            .is_err(),
        "finish refuses unfinished chunks"
    );

    // Another worker retries (the lease has expired).
    let mut retry = o.clone();
    retry.owner = "second-worker".to_owned();
    let rows_by_retry: u64 = {
        let mut total = 0;
        for id in &ids {
            total += full_load::export_chunk(&l.sink, &l.state, &retry, id)
                .await
                .unwrap()
                .rows;
        }
        total
    };
    assert_eq!(rows_by_retry, 50_000);
    let again = full_load::export_chunk(&l.sink, &l.state, &retry, &id)
        .await
        .unwrap();
    assert_eq!(again.attempts, 2, "a done chunk is not exported again");
    let ms = full_load::finish(&l.sink, &l.state, "kill", &pgshift::events::Events::off())
        .await
        .unwrap();
    let m = &ms[0];
    assert_eq!(m.rows, 50_000);
    let objects = l.sink.list("public/t/LOAD").await.unwrap();
    assert_eq!(
        objects.len(),
        ids.len(),
        "one object per chunk: {objects:?}"
    );
    let cols = vec!["id".to_owned(), "v".to_owned()];
    assert_eq!(
        staged_rows(&l.sink, m).await,
        source_copy(&c, "public", "t", &cols).await
    );
    // The checksum is the source's.
    let mut sum = pgshift::source::copy_text::RowChecksum::default();
    for r in source_copy(&c, "public", "t", &cols).await {
        let line: Vec<String> = r.iter().map(|f| f.clone().unwrap()).collect();
        sum.add_row(line.join(",").as_bytes());
    }
    assert_eq!(m.checksum, sum);
    // Two workers never both own a chunk: a live lease is a conflict.
    let l2 = l.opts("kill2", "csv", 1);
    let (_, ids2) = full_load::plan(&l.sink, &l.state, &l2).await.unwrap();
    let dying = UnreliableSink::new(l.sink.clone(), Crash::AfterBytes(1));
    assert!(
        full_load::export_chunk(&dying, &l.state, &l2, &ids2[0])
            .await
            .is_err()
    );
    let mut other = l2.clone();
    other.owner = "intruder".to_owned();
    let err = full_load::export_chunk(&l.sink, &l.state, &other, &ids2[0])
        .await
        .unwrap_err();
    assert!(
        matches!(err, pgshift::Error::LeaseHeld { ref owner, .. } if *owner == l2.owner)
            && err.is_transient(),
        "{err}"
    );
}

#[tokio::test]
async fn selection_rules_pick_exact_names() {
    let l = Load::new("fl_select").await;
    l.db.client()
        .await
        .batch_execute(
            "create schema sales; create schema tmp;
             create table sales.orders (id int primary key); insert into sales.orders values (1);
             create table sales.order_items (id int primary key); insert into sales.order_items values (1);
             create table sales.tmp_scratch (id int primary key);
             create table sales.\"Table1\" (id int primary key); insert into sales.\"Table1\" values (1);
             create table sales.table1 (id int primary key); insert into sales.table1 values (1), (2);
             create table sales.\"a.b \"\"c\"\"\" (id int primary key); insert into sales.\"a.b \"\"c\"\"\" values (7);
             create table tmp.orders (id int primary key);",
        )
        .await
        .unwrap();
    let mut o = l.opts("select", "csv", 1);
    o.selection = Selection::from_json(
        r#"{"rules":[
          {"rule-type":"selection","rule-id":"1","object-locator":{"schema-name":"sales","table-name":"%"},"rule-action":"include"},
          {"rule-type":"selection","rule-id":"2","object-locator":{"schema-name":"sales","table-name":"tmp%"},"rule-action":"exclude"},
          {"rule-type":"selection","rule-id":"3","object-locator":{"schema-name":"sales","table-name":"order\\_%"},"rule-action":"exclude"}
        ]}"#,
        "tables",
    )
    .unwrap();
    l.run(&o, 1).await;
    let mut names: Vec<String> = manifests(&l.sink)
        .await
        .iter()
        .map(|m| format!("{}.{}", m.schema, m.table))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "sales.Table1",
            "sales.a.b \"c\"",
            "sales.order_items",
            "sales.orders",
            "sales.table1"
        ],
        "exclude of 'order\\_%' matches nothing (no escapes in DMS rules); tmp% is excluded"
    );
    let m = manifests(&l.sink)
        .await
        .into_iter()
        .find(|m| m.table == "table1")
        .unwrap();
    assert_eq!(m.rows, 2, "table1 and Table1 are different tables");
    let quoted = manifests(&l.sink)
        .await
        .into_iter()
        .find(|m| m.table == "a.b \"c\"")
        .unwrap();
    assert_eq!(quoted.chunks[0].key, "sales/a.b \"c\"/LOAD00000001.csv");
}

#[tokio::test]
async fn bad_input_is_a_clear_error() {
    let l = Load::new("fl_bad").await;
    l.db.client()
        .await
        .batch_execute("create table public.t (id int primary key)")
        .await
        .unwrap();
    let mut o = l.opts("bad", "csv", 1);
    o.selection = Selection::from_json(
        r#"{"rules":[{"rule-type":"selection","rule-id":"9","object-locator":{"schema-name":"public","table-name":"T"},"rule-action":"include"}]}"#,
        "tables",
    )
    .unwrap();
    let err = full_load::plan(&l.sink, &l.state, &o)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("public.T (rule-id 9)") && err.contains("do not exist"),
        "{err}"
    );

    let mut o = l.opts("bad2", "csv", 0);
    let err = full_load::plan(&l.sink, &l.state, &o)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("chunk size"), "{err}");
    o.chunk_mib = 1;
    o.task = "Bad Task".to_owned();
    assert!(
        full_load::plan(&l.sink, &l.state, &o)
            .await
            .unwrap_err()
            .to_string()
            .contains("task")
    );

    let unknown = ChunkId {
        schema: "public".into(),
        table: "nope".into(),
        n: 0,
        reload: None,
    };
    let err = full_load::export_chunk(&l.sink, &l.state, &l.opts("bad3", "csv", 1), &unknown)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not in the plan"), "{err}");
    assert!(!err.is_transient());

    // The CLI names bad flags and exits 2.
    let url = pgshift_tests::url(&l.db.config());
    for (args, want) in [
        (vec!["--chunk-mb", "0"], "--chunk-mb"),
        (vec!["--parallel", "0"], "--parallel"),
        (vec!["--format", "xml"], "--format"),
        (vec!["--tables", "/nonexistent.json"], "--tables"),
        (vec!["--stage", "ftp://x"], "--stage"),
    ] {
        let mut full = vec!["full-load", "--task", "cli-bad", "--source", url.as_str()];
        full.extend(args.iter());
        let out = std::process::Command::new(pgshift_tests::pgshift_bin())
            .args(&full)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn the_state_machine_is_valid_and_retries_only_transient_errors() {
    let text = include_str!("../../infra/statemachine/full-load.asl.json");
    let asl: serde_json::Value = serde_json::from_str(text).unwrap();
    let states = asl["States"].as_object().unwrap();
    for s in [
        "LoadOrReload",
        "Plan",
        "PlanReload",
        "FinishWhich",
        "FinishReload",
        "LargePlan",
        "ExportChunks",
        "ExportChunksDistributed",
        "Finish",
        "LoadFailed",
    ] {
        assert!(states.contains_key(s), "{s} missing");
    }
    assert_eq!(asl["StartAt"], "LoadOrReload");
    // An execution with `reload` plans and finishes a reload; without, the load.
    for (choice, with, without) in [
        ("LoadOrReload", "PlanReload", "Plan"),
        ("FinishWhich", "FinishReload", "Finish"),
    ] {
        let c = &states[choice];
        assert_eq!(c["Choices"][0]["Variable"], "$.reload");
        assert_eq!(c["Choices"][0]["Next"], with);
        assert_eq!(c["Default"], without);
    }
    assert_eq!(
        states["PlanReload"]["Parameters"]["Payload"]["reload.$"],
        "$.reload"
    );
    assert_eq!(
        states["FinishReload"]["Parameters"]["Payload"]["reload.$"],
        "$.plan.output.reload"
    );
    for s in ["ExportChunks", "ExportChunksDistributed"] {
        assert_eq!(states[s]["Next"], "FinishWhich");
    }
    let export = &states["ExportChunks"]["ItemProcessor"]["States"]["ExportChunk"];
    for retry in export["Retry"].as_array().unwrap() {
        for e in retry["ErrorEquals"].as_array().unwrap() {
            let e = e.as_str().unwrap();
            assert!(
                e.starts_with("Transient") || e.starts_with("Lambda.") || e == "States.Timeout",
                "retries {e}"
            );
        }
    }
    assert_eq!(
        states["ExportChunks"]["MaxConcurrencyPath"],
        "$.plan.output.max_concurrency"
    );
    assert_eq!(
        states["ExportChunksDistributed"]["ItemProcessor"]["ProcessorConfig"]["Mode"],
        "DISTRIBUTED"
    );
    // Every event the machine sends parses as a full-load event.
    for payload in [
        serde_json::json!({"action": "Plan"}),
        serde_json::json!({"action": "Finish"}),
        serde_json::json!({"action": "Plan", "reload": ["public.orders"]}),
        serde_json::json!({"action": "Finish", "reload": "0/16B3748"}),
    ] {
        full_load::FullLoadEvent::from_json(payload).unwrap();
    }
}

fn read_parquet(bytes: Vec<u8>) -> Vec<arrow_array::RecordBatch> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::from(bytes),
    )
    .unwrap()
    .build()
    .unwrap();
    reader.map(|b| b.unwrap()).collect()
}

#[tokio::test]
async fn corpus_tables_load_as_parquet() {
    let l = Load::new("fl_pq_corpus").await;
    apply_corpus(&l.db).await;
    let report = l.run(&l.opts("pq-corpus", "parquet", 1), 2).await;
    let c = l.db.client().await;
    for m in manifests(&l.sink).await {
        let mut rows = 0;
        for chunk in &m.chunks {
            assert!(chunk.key.ends_with(".parquet"));
            let body = l.sink.get(&chunk.key).await.unwrap().unwrap();
            rows += read_parquet(body.to_vec())
                .iter()
                .map(|b| b.num_rows())
                .sum::<usize>();
        }
        let count: i64 = c
            .query_one(
                &format!(
                    "select count(*) from {}",
                    pgshift::source::quote_qualified(&m.schema, &m.table)
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            (rows as u64, m.rows),
            (count as u64, count as u64),
            "{}.{}",
            m.schema,
            m.table
        );
    }
    assert!(report.rows > 20);
}

#[tokio::test]
async fn parquet_columns_are_typed_and_keep_special_values() {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{
        Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int64Type,
        TimestampMicrosecondType,
    };
    let l = Load::new("fl_pq_typed").await;
    l.db.client()
        .await
        .batch_execute(
            "create table public.typed (id int8 primary key, i2 int2, f4 real, f8 double precision, b bool, d date,
                ts timestamp, tz timestamptz, n numeric(10,3), big numeric, t text, j jsonb);
             insert into public.typed values
               (1, -32768, 'NaN', 'Infinity', true, '2024-02-29', '2024-02-29 12:34:56.789', '2024-02-29 12:34:56+00', 12.345, 1e40, '', '{\"a\": 1}'),
               (2, null, '-Infinity', '-Infinity', false, 'infinity', '-infinity', 'infinity', 'NaN', 'NaN', null, null),
               (3, 7, 1.5, 2.25, null, '0044-03-15 BC', '1999-12-31 23:59:59.999999', '1970-01-01 00:00:00+00', -0.5, 3, 'x,\"y\"', '[]');",
        )
        .await
        .unwrap();
    l.run(&l.opts("pq-typed", "parquet", 1), 1).await;
    let m = manifests(&l.sink)
        .await
        .into_iter()
        .find(|m| m.table == "typed")
        .unwrap();
    let body = l.sink.get(&m.chunks[0].key).await.unwrap().unwrap();
    let batches = read_parquet(body.to_vec());
    let b = &batches[0];
    let col = |name: &str| b.column(b.schema().index_of(name).unwrap()).clone();
    assert_eq!(b.num_rows(), 3);
    assert_eq!(col("op").as_string::<i32>().value(0), "I");
    assert_eq!(col("id").as_primitive::<Int64Type>().value(2), 3);
    assert_eq!(col("i2").as_primitive::<Int16Type>().value(0), -32768);
    assert!(col("i2").is_null(1));
    assert!(col("f4").as_primitive::<Float32Type>().value(0).is_nan());
    assert_eq!(
        col("f4").as_primitive::<Float32Type>().value(1),
        f32::NEG_INFINITY
    );
    assert_eq!(
        col("f8").as_primitive::<Float64Type>().value(0),
        f64::INFINITY
    );
    assert!(col("b").as_boolean().value(0));
    assert_eq!(col("d").as_primitive::<Date32Type>().value(0), 19_782);
    assert_eq!(
        col("d").as_primitive::<Date32Type>().value(1),
        i32::MAX,
        "infinity kept as the maximum"
    );
    assert_eq!(
        col("ts")
            .as_primitive::<TimestampMicrosecondType>()
            .value(0),
        1_709_210_096_789_000,
        "2024-02-29 12:34:56.789"
    );
    assert_eq!(
        col("tz")
            .as_primitive::<TimestampMicrosecondType>()
            .value(2),
        0
    );
    assert_eq!(
        b.schema().field_with_name("n").unwrap().data_type(),
        &arrow_schema::DataType::Decimal128(10, 3)
    );
    assert_eq!(col("n").as_primitive::<Decimal128Type>().value(0), 12_345);
    assert_eq!(col("n").as_primitive::<Decimal128Type>().value(2), -500);
    assert!(col("n").is_null(1));
    assert_eq!(
        col("n__special").as_string::<i32>().value(1),
        "NaN",
        "NaN kept beside the decimal"
    );
    assert_eq!(
        col("big").as_string::<i32>().value(0),
        "10000000000000000000000000000000000000000"
    );
    assert_eq!(col("big").as_string::<i32>().value(1), "NaN");
    assert_eq!(
        col("t").as_string::<i32>().value(0),
        "",
        "empty string is not null"
    );
    assert!(col("t").is_null(1));
    assert_eq!(col("t").as_string::<i32>().value(2), "x,\"y\"");
    assert_eq!(col("j").as_string::<i32>().value(0), "{\"a\": 1}");
}

/// Cluster-wide (an open transaction delays every slot creation): in the serial group.
#[tokio::test]
async fn cluster_wide_an_old_transaction_blocking_slot_creation_is_a_clear_error() {
    let l = Load::new("fl_block").await;
    let c = l.db.client().await;
    c.batch_execute("create table public.t (id int primary key)")
        .await
        .unwrap();
    let holder = l.db.client().await;
    holder
        .batch_execute("begin; insert into public.t values (1);")
        .await
        .unwrap();
    let mut o = l.opts("blocked", "csv", 1);
    o.cdc = true;
    o.source.lock_timeout = std::time::Duration::from_millis(500);
    let err = full_load::plan(&l.sink, &l.state, &o).await.unwrap_err();
    holder.batch_execute("rollback").await.unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("waited too long for running transactions"),
        "{msg}"
    );
    assert!(
        msg.contains("test-endpoint"),
        "the message says how to find them: {msg}"
    );
    // Once it ends, the same plan succeeds.
    o.source.lock_timeout = std::time::Duration::from_secs(10);
    let (plan, _) = full_load::plan(&l.sink, &l.state, &o).await.unwrap();
    assert!(plan.l0.is_some());
}

/// Primary-key range chunks (what PostgreSQL < 14 gets; forced here on 15): every row once.
#[tokio::test]
async fn key_range_chunks_cover_every_row_once() {
    let l = Load::new("fl_keys").await;
    let c = l.db.client().await;
    c.batch_execute(
        "create table public.k (id bigint primary key, v text);
         insert into public.k select g * 3, repeat(md5(g::text), 4) from generate_series(1, 40000) g;
         create table public.nokey (v text); insert into public.nokey select md5(g::text) from generate_series(1, 40000) g;
         analyze;",
    )
    .await
    .unwrap();
    let mut o = l.opts("keys", "csv", 1);
    o.chunking = pgshift::plan::Chunking::Keys;
    let report = l.run(&o, 2).await;
    let ms = manifests(&l.sink).await;
    let k = ms.iter().find(|m| m.table == "k").unwrap();
    assert!(
        k.chunks.len() >= 4,
        "{:?}",
        k.chunks.iter().map(|c| &c.range).collect::<Vec<_>>()
    );
    assert!(matches!(
        k.chunks[1].range,
        pgshift::plan::ChunkRange::Keys { .. }
    ));
    let nokey = ms.iter().find(|m| m.table == "nokey").unwrap();
    assert_eq!(nokey.chunks.len(), 1, "no single-column key: one chunk");
    for m in &ms {
        assert_eq!(
            staged_rows(&l.sink, m).await,
            source_copy(&c, &m.schema, &m.table, &m.columns).await,
            "{}",
            m.table
        );
    }
    assert_eq!(report.rows, 80_000);
}

/// DMS `table-settings` rules with `parallel-load` `ranges`: the load is cut where the user
/// asks (`(-inf, 250)`, `[250, 500)`, `[500, 750)`, `[750, +inf)`), each chunk holds exactly
/// its range, and the load applies equal to the source; a range pgshift cannot load safely is
/// a clear error naming the rule.
#[tokio::test]
async fn table_settings_ranges_cut_the_load_where_the_user_asks() {
    let s = Staging::new("fl_ranges").await;
    let c = s.db.client().await;
    c.batch_execute(
        "create table public.r (id int primary key, region int not null, note text);
         insert into public.r select g, g % 7, 'n' || g from generate_series(1, 1000) g;
         create table public.nullable (id int primary key, maybe int);
         create table public.nokey (v int not null);",
    )
    .await
    .unwrap();
    let mapping = |table: &str, column: &str, boundaries: &str| {
        format!(
            r#"{{"rules":[{{"rule-type":"selection","rule-id":"1","rule-name":"1","object-locator":{{"schema-name":"public","table-name":"%"}},"rule-action":"include"}},
              {{"rule-type":"table-settings","rule-id":"2","rule-name":"2","object-locator":{{"schema-name":"public","table-name":"{table}"}},
                "parallel-load":{{"type":"ranges","columns":["{column}"],"boundaries":{boundaries}}}}}]}}"#
        )
    };
    let mut lo = LoadOptions::new("ranges", s.db.config(), "loader");
    lo.selection =
        Selection::from_json(&mapping("r", "id", r#"[["250"],[500],["750"]]"#), "tables").unwrap();
    full_load::run_local(&s.sink, &s.state, &lo, 2, Arc::new(Progress::default()))
        .await
        .unwrap();
    let chunks = s.sink.list("public/r/LOAD").await.unwrap();
    assert_eq!(chunks.len(), 4, "{chunks:?}");
    let bounds = [(1, 249), (250, 499), (500, 749), (750, 1000)];
    let mut fields = Vec::new();
    for (key, (lo_id, hi_id)) in chunks.iter().zip(bounds) {
        let body = s.sink.get(key).await.unwrap().unwrap();
        let ids: Vec<i32> = body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                parse_csv_fields(l, &mut fields).unwrap();
                std::str::from_utf8(fields[0].as_ref().unwrap())
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(ids.len() as i32, hi_id - lo_id + 1, "{key}");
        assert_eq!(
            (ids.iter().min(), ids.iter().max()),
            (Some(&lo_id), Some(&hi_id)),
            "{key}"
        );
    }
    let target = TestDb::new("fl_ranges_dst").await;
    pgshift::job::apply::run(&s.sink, &target.config(), "ranges")
        .await
        .unwrap();
    pgshift_tests::assert_same(&s.db.config(), &target.config()).await;

    for (n, (table, column, boundaries, want)) in [
        ("nullable", "maybe", "[[1]]", "may be NULL"),
        ("nokey", "v", "[[1]]", "primary key"),
        ("r", "id", "[[500],[250]]", "must increase"),
        ("r", "id", r#"[["many"]]"#, "not all values of public.r.id"),
        ("r", "nope", "[[1]]", "no column \"nope\""),
    ]
    .into_iter()
    .enumerate()
    {
        let mut o = LoadOptions::new(format!("ranges-bad-{n}"), s.db.config(), "loader");
        o.selection = Selection::from_json(&mapping(table, column, boundaries), "tables").unwrap();
        let err = full_load::run_local(&s.sink, &s.state, &o, 1, Arc::new(Progress::default()))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(want) && err.contains("rule-id 2"), "{err}");
    }
}
