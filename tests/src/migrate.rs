//! The end-to-end proof: a write workload runs during the whole full load and several CDC
//! drains, with exports killed and polls crashing at step boundaries; after the workload stops
//! and CDC catches up, the staged data applied to a second database validates equal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pgshift::job::apply;
use pgshift::job::cdc_poll;
use pgshift::job::full_load::{self, Progress};
use pgshift::job::validate;
use pgshift::options::{CdcOptions, LoadOptions};
use pgshift::selection::Selection;
use pgshift::staging::ObjectSink;
use pgshift::staging::encode::Format;
use pgshift::staging::{Crash, UnreliableSink};
use pgshift::state::StateStore;
use pgshift_tests::{Kill, TempDir, TestDb};

const SCHEMA: &str = "create table public.accounts (id int primary key, balance bigint not null, note text);
 create table public.docs (id int primary key, body text, rev int not null default 0);
 create table public.events (id bigserial primary key, account int, at timestamptz default now(), payload jsonb);
 insert into public.accounts select g, 0, 'n' || g from generate_series(1, 20000) g;
 insert into public.docs select g, (select string_agg(md5((g * 1000 + k)::text), '') from generate_series(1, 120) k), 0 from generate_series(1, 40) g;
 create table public.history (account int, delta int, at timestamptz default now());
 insert into public.history select g % 100, g from generate_series(1, 5000) g;
 analyze;";

async fn prove<S: ObjectSink + Clone, St: StateStore + Clone>(
    sink: S,
    state: St,
    format: &str,
    prefix: &str,
) {
    // Slots are cluster-wide: the task (and so the slot) is unique to this test.
    let task = prefix.replace('_', "-");
    let task = task.as_str();
    let source = TestDb::new(&format!("{prefix}_src")).await;
    let target = TestDb::new(&format!("{prefix}_dst")).await;
    source.client().await.batch_execute(SCHEMA).await.unwrap();
    let format = Format::parse(format, "format").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for w in 0..2 {
        let (stop, cfg) = (stop.clone(), source.config());
        handles.push(tokio::spawn(async move {
            workload(&cfg, stop, w * 1_000_000).await
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    // Full load with CDC; the first export is killed and the load rerun.
    let mut lo = LoadOptions::new(task, source.config(), "loader");
    lo.format = format;
    lo.cdc = true;
    lo.chunk_mib = 1;
    let (_, ids) = full_load::plan(&sink, &state, &lo).await.unwrap();
    // The export dies after 100 kB were written (no clean-up of the upload, no state change).
    let dying = UnreliableSink::new(sink.clone(), Crash::AfterBytes(100_000));
    assert!(
        full_load::export_chunk(&dying, &state, &lo, &ids[0])
            .await
            .is_err()
    );
    full_load::run_local(&sink, &state, &lo, 2, Arc::new(Progress::default()))
        .await
        .unwrap();

    // CDC drains while the workload runs, some crashing at step boundaries.
    let mut co = CdcOptions::new(task, source.config(), "poller");
    co.format = format;
    co.max_batch_changes = 400;
    for fp in [
        None,
        Some(Kill::AfterPeek),
        Some(Kill::AfterFiles),
        None,
        Some(Kill::AfterManifest),
        Some(Kill::AfterCheckpoint),
        None,
        Some(Kill::AfterFirstFile),
    ] {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let r = match fp {
            Some(kill) => kill.poll(&sink, &state, &co).await,
            None => cdc_poll::run(&sink, &state, &co).await,
        };
        // A failpoint fires only when there is something to stage at its step.
        if fp.is_none() {
            r.unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for h in handles {
        writes += h.await.unwrap();
    }
    assert!(writes > 100, "the workload ran ({writes} statements)");
    // Catch up, then apply (twice: the second run applies nothing new) and validate.
    cdc_poll::run(&sink, &state, &co).await.unwrap();
    // An apply killed mid-batch (reading a batch's second file), then the real one.
    let dying = UnreliableSink::new(sink.clone(), Crash::at_read("/cdc/", 1));
    let _ = apply::run(&dying, &target.config(), task).await;
    let first = apply::run(&sink, &target.config(), task).await.unwrap();
    assert!(first.batches_applied > 0, "{first:?}");
    let again = apply::run(&sink, &target.config(), task).await.unwrap();
    assert_eq!(
        (again.batches_applied, again.load_applied),
        (0, false),
        "nothing applied twice"
    );
    let report = validate::run(&source.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(report.equal, "{report:#?}");
    assert_eq!(report.tables.len(), 4);
}

/// The workload: updates, inserts, deletes, primary-key moves and updates that leave the
/// TOASTed body unchanged, until told to stop. Returns how many statements ran.
async fn workload(cfg: &pgshift::config::PgConfig, stop: Arc<AtomicBool>, seed: i64) -> i64 {
    let c = pgshift_tests::connect(cfg).await;
    let mut i = seed;
    while !stop.load(Ordering::Relaxed) {
        c.batch_execute(&statement(i))
            .await
            .unwrap_or_else(|e| panic!("workload: {e}"));
        i += 1;
    }
    i - seed
}

fn statement(i: i64) -> String {
    let id = 1 + (i * 7919).rem_euclid(20000);
    match i % 6 {
        0 => format!(
            "update public.accounts set balance = balance + {} where id = {id}",
            i % 1000
        ),
        1 => format!(
            "begin; update public.accounts set balance = balance - 1 where id = {id}; insert into public.events (account, payload) values ({id}, '{{\"i\": {i}}}'); insert into public.history (account, delta) values ({id}, -1); commit;"
        ),
        2 => format!(
            "delete from public.accounts where id = {}",
            1 + (i * 31).rem_euclid(20000)
        ),
        3 => format!(
            "update public.accounts set id = {} where id = {id}",
            100_000 + i
        ),
        4 => format!(
            "update public.docs set rev = rev + 1 where id = {}",
            1 + i % 40
        ),
        _ => format!(
            "insert into public.accounts values ({}, {}, null) on conflict (id) do nothing",
            50_000 + i,
            i % 1000
        ),
    }
}

#[tokio::test]
async fn end_to_end_csv_to_a_folder() {
    let dir = TempDir::new("e2e_csv");
    prove(
        pgshift::staging::LocalSink::new(dir.path().join("stage")),
        pgshift::state::FileStore::new(dir.path().join("state")),
        "csv",
        "e2e_csv",
    )
    .await;
}

#[tokio::test]
async fn end_to_end_jsonl_to_a_folder() {
    let dir = TempDir::new("e2e_jsonl");
    prove(
        pgshift::staging::LocalSink::new(dir.path().join("stage")),
        pgshift::state::FileStore::new(dir.path().join("state")),
        "jsonl.gz",
        "e2e_jsonl",
    )
    .await;
}

#[tokio::test]
async fn end_to_end_s3_and_dynamodb() {
    let _ = pgshift_tests::env("AWS_ENDPOINT_URL");
    let aws = pgshift::aws::Aws::from_env().await;
    let bucket = pgshift_tests::emulator_bucket(&aws, "pgshift-e2e").await;
    let state =
        pgshift::state::DynamoStore::new(aws.dynamodb(), pgshift_tests::unique_name("pgshift-e2e"));
    state.ensure_table().await.unwrap();
    let sink = pgshift::staging::S3Sink::new(aws.s3(), &format!("s3://{bucket}/run")).unwrap();
    Box::pin(prove(sink, state, "csv", "e2e_s3")).await;
}

#[tokio::test]
async fn apply_interrupted_mid_batch_resumes_without_duplicates() {
    let source = TestDb::new("apply_src").await;
    let target = TestDb::new("apply_dst").await;
    let dir = TempDir::new("apply_resume");
    let sink = pgshift::staging::LocalSink::new(dir.path().join("stage"));
    let state = pgshift::state::FileStore::new(dir.path().join("state"));
    let c = source.client().await;
    c.batch_execute("create table public.t (id int primary key, v int not null, big text); alter table public.t replica identity full;
         create table public.u (id int primary key, v int not null);")
        .await
        .unwrap();
    let mut lo = LoadOptions::new("resume", source.config(), "loader");
    lo.cdc = true;
    full_load::run_local(&sink, &state, &lo, 1, Arc::new(Progress::default()))
        .await
        .unwrap();
    let mut co = CdcOptions::new("resume", source.config(), "poller");
    co.max_batch_changes = 50;
    for i in 0..4 {
        c.batch_execute(&format!(
            "insert into public.t select g, 0, null from generate_series({0}, {0} + 59) g; update public.t set v = v + 1; \
             insert into public.u values ({0}, 0); update public.u set v = v + 1;",
            i * 100
        ))
        .await
        .unwrap();
        cdc_poll::run(&sink, &state, &co).await.unwrap();
    }
    // v counts updates: applying any batch twice would make it differ.
    // Each batch holds a file of t and one of u: the apply dies reading the second batch's
    // second file, after the first file's changes ran inside the batch's transaction.
    let dying = UnreliableSink::new(sink.clone(), Crash::at_read("/cdc/", 3));
    let err = apply::run(&dying, &target.config(), "resume")
        .await
        .unwrap_err();
    assert!(matches!(err, pgshift::Error::Injected(_)), "{err}");
    assert!(dying.crashed());
    let done = apply::run(&sink, &target.config(), "resume").await.unwrap();
    assert!(done.batches_applied >= 3, "{done:?}");
    let report = validate::run(&source.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(report.equal, "{report:#?}");
    let batches: i64 = target
        .client()
        .await
        .query_one(
            "select batches from pgshift.applied where task = 'resume'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let staged = pgshift_tests::replay::manifests(&sink).await.len() as i64;
    assert_eq!(batches, staged, "each batch applied exactly once");

    // A difference is found and named.
    target
        .client()
        .await
        .batch_execute("update public.t set v = -1 where id = 5")
        .await
        .unwrap();
    let report = validate::run(&source.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(!report.equal);
    assert_eq!(report.tables[0].differing_keys, ["5"]);
}

#[tokio::test]
async fn cli_full_load_cdc_apply_validate_status() {
    let source = TestDb::new("cli_flow_src").await;
    let target = TestDb::new("cli_flow_dst").await;
    let c = source.client().await;
    c.batch_execute("create table public.t (id int primary key, v text); insert into public.t select g, md5(g::text) from generate_series(1, 5000) g;")
        .await
        .unwrap();
    let task = pgshift_tests::CliTask::new("cli-flow", &source.config(), &target.config());
    let (src, dst, state) = (task.src.clone(), task.dst.clone(), task.state.as_str());
    let run = pgshift_tests::run_cli;
    let common = task.common();
    let (code, out, err) = run(&[
        &["full-load", "--source", &src, "--cdc", "--parallel", "2"][..],
        &common,
    ]
    .concat());
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("5000 rows") && out.contains("CDC continues from"),
        "{out}"
    );
    c.batch_execute("update public.t set v = 'changed' where id <= 10; delete from public.t where id > 4990; insert into public.t values (9999, null);")
        .await
        .unwrap();
    let (code, out, err) = run(&[&["cdc", "--source", &src, "--once"][..], &common].concat());
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = task.run(&["apply", "--target", &dst]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("load applied (5000 rows, "), "{out}");
    assert!(
        out.contains("changes/s; target at "),
        "human rate in the summary: {out}"
    );
    let (code, out, err) = task.run(&["validate", "--source", &src, "--target", &dst]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("EQUAL public.t")
            && out.contains("target equals source")
            && out.contains("checked in "),
        "{out}"
    );
    let (code, out, err) = run(&[
        "status", "--task", "cli-flow", "--state", state, "--source", &src, "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["load"], "complete");
    assert_eq!(status["tables"][0]["rows"], 5000);
    assert!(
        status["checkpoint"].is_string() && status["lag_bytes"].is_u64(),
        "{status}"
    );

    target
        .client()
        .await
        .batch_execute("delete from public.t where id = 7")
        .await
        .unwrap();
    let (code, out, _) = task.run(&["validate", "--source", &src, "--target", &dst]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("first differing keys: 7"), "{out}");
    let (code, _, err) = run(&["status", "--task", "no-such-task", "--state", state]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no state"), "{err}");
}

/// A row updated between two chunks' snapshots moves to a later page and is read twice; the
/// load applies once per key and CDC from L0 settles the final version.
#[tokio::test]
async fn a_row_read_by_two_chunks_applies_once() {
    let source = TestDb::new("dup_src").await;
    let target = TestDb::new("dup_dst").await;
    let dir = TempDir::new("dup_chunks");
    let sink = pgshift::staging::LocalSink::new(dir.path().join("stage"));
    let state = pgshift::state::FileStore::new(dir.path().join("state"));
    let c = source.client().await;
    c.batch_execute(
        "create table public.t (id int primary key, v text) with (fillfactor = 100);
         insert into public.t select g, repeat('x', 100) from generate_series(1, 20000) g;",
    )
    .await
    .unwrap();
    c.batch_execute("vacuum analyze public.t").await.unwrap();
    let mut lo = LoadOptions::new("dup", source.config(), "loader");
    lo.cdc = true;
    lo.chunk_mib = 1;
    let (_, ids) = full_load::plan(&sink, &state, &lo).await.unwrap();
    assert!(ids.len() >= 2, "{ids:?}");
    full_load::export_chunk(&sink, &state, &lo, &ids[0])
        .await
        .unwrap();
    // Full pages: the new version of row 1 goes to the end of the table (the last chunk).
    c.batch_execute("update public.t set v = repeat('moved', 300) where id = 1")
        .await
        .unwrap();
    let ctid: String = c
        .query_one("select ctid::text from public.t where id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !ctid.starts_with("(0,"),
        "the new version left page 0: {ctid}"
    );
    for id in &ids[1..] {
        full_load::export_chunk(&sink, &state, &lo, id)
            .await
            .unwrap();
    }
    let ms = full_load::finish(&sink, &state, "dup", &pgshift::events::Events::off())
        .await
        .unwrap();
    assert_eq!(ms[0].rows, 20_001, "row 1 was read by two chunks");
    let co = CdcOptions::new("dup", source.config(), "poller");
    cdc_poll::run(&sink, &state, &co).await.unwrap();
    apply::run(&sink, &target.config(), "dup").await.unwrap();
    let report = validate::run(&source.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(report.equal, "{report:#?}");
}

/// The SQL statements of a wal2json regression file, without psql commands and slot calls.
fn corpus_statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('\\') || t.starts_with("--") || t.is_empty() {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if t.ends_with(';') {
            let stmt = std::mem::take(&mut current);
            let lower = stmt.to_lowercase();
            if !lower.contains("pg_logical_slot") && !lower.contains("replication_slot") {
                out.push(stmt);
            }
        }
    }
    out
}

#[tokio::test]
async fn wal2json_corpus_workloads_apply_equal() {
    let dir =
        std::path::PathBuf::from(pgshift_tests::env("PGSHIFT_TEST_CORPUS")).join("wal2json/sql");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    assert!(files.len() >= 25, "{files:?}");
    let mut applied_changes = 0;
    for file in files {
        let name = file
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .replace('_', "-");
        let source = TestDb::new("w2j_src").await;
        let target = TestDb::new("w2j_dst").await;
        let tmp = TempDir::new("w2j");
        let sink = pgshift::staging::LocalSink::new(tmp.path().join("stage"));
        let state = pgshift::state::FileStore::new(tmp.path().join("state"));
        let task = format!("w2j-{name}");
        let mut co = CdcOptions::new(&task, source.config(), "poller");
        // JSON Lines: updates of tables without a primary key need the old row it carries.
        co.format = Format::parse("jsonl", "format").unwrap();
        // A CDC-only task first: its follow trigger publishes the tables the workload creates,
        // in their creating transaction; with REPLICA IDENTITY FULL set by pgshift (opted in)
        // on those without a key, their updates and deletes are captured too.
        co.replica_identity_full = true;
        cdc_poll::run(&sink, &state, &co).await.unwrap();
        let c = source.client().await;
        for stmt in corpus_statements(&std::fs::read_to_string(&file).unwrap()) {
            // The source rejects some statements (the corpus expects them to fail): unchanged.
            let _ = c.batch_execute(&stmt).await;
        }
        let r = cdc_poll::run(&sink, &state, &co)
            .await
            .unwrap_or_else(|e| panic!("{}: cdc: {e}", file.display()));
        let a = apply::run(&sink, &target.config(), &task)
            .await
            .unwrap_or_else(|e| panic!("{}: apply: {e}", file.display()));
        applied_changes += a.changes_applied;
        let report = validate::run(&source.config(), &target.config(), &Selection::all())
            .await
            .unwrap();
        assert!(
            report.equal,
            "{}: {} changes staged\n{report:#?}",
            file.display(),
            r.changes
        );
    }
    assert!(
        applied_changes > 50,
        "the corpus changed something ({applied_changes})"
    );
}

#[tokio::test]
async fn validate_compares_primary_key_ranges() {
    let source = TestDb::new("vr_src").await;
    let target = TestDb::new("vr_dst").await;
    for db in [&source, &target] {
        db.client()
            .await
            .batch_execute(
                "create table public.t (id int primary key, v text);
                 insert into public.t select g, md5(g::text) from generate_series(1, 50000) g;",
            )
            .await
            .unwrap();
    }
    source
        .client()
        .await
        .batch_execute("analyze public.t")
        .await
        .unwrap();
    let equal = validate::run_with_ranges(
        &source.config(),
        &target.config(),
        &Selection::all(),
        10_000,
    )
    .await
    .unwrap();
    assert!(equal.equal, "{equal:#?}");
    assert_eq!(equal.tables[0].ranges, 5, "50,000 rows in ranges of 10,000");

    target
        .client()
        .await
        .batch_execute("update public.t set v = 'x' where id = 23456")
        .await
        .unwrap();
    let diff = validate::run_with_ranges(
        &source.config(),
        &target.config(),
        &Selection::all(),
        10_000,
    )
    .await
    .unwrap();
    assert!(!diff.equal);
    let t = &diff.tables[0];
    assert_eq!(t.differing_ranges.len(), 1, "{t:#?}");
    let r = &t.differing_ranges[0];
    let (lo, hi): (i32, i32) = (
        r.lower.as_ref().unwrap().parse().unwrap(),
        r.upper.as_ref().unwrap().parse().unwrap(),
    );
    assert!(lo <= 23456 && 23456 < hi, "{r:?}");
    assert_eq!(t.differing_keys, ["23456"]);
}
