//! Set-based (batch) apply: every shape of change folded inside one batch converges on the
//! source, in CSV, JSON Lines and Parquet staging.

use std::sync::Arc;

use pgshift::job::full_load::{self, Progress};
use pgshift::job::{apply, cdc_poll, validate};
use pgshift::options::{CdcOptions, LoadOptions};
use pgshift::selection::Selection;
use pgshift::staging::encode::Format;
use pgshift_tests::{Staging, TestDb};

const SCHEMA: &str = "create table public.k (id int primary key, a int not null, big text, n numeric);
 create table public.full_k (id int primary key, a int, big text); alter table public.full_k replica identity full;
 create table public.two (x int, y text, v int, primary key (y, x));
 create table public.h (g int, note text); alter table public.h replica identity full;
 create table public.t (id int primary key, v int);
 insert into public.k select g, 0, case when g % 10 = 0 then (select string_agg(md5((g * 1000 + i)::text), '') from generate_series(1, 400) i) end, g / 3.0 from generate_series(1, 300) g;
 insert into public.full_k select g, 0, (select string_agg(md5((g * 1000 + i)::text), '') from generate_series(1, 400) i) from generate_series(1, 50) g;
 insert into public.two select g, 'y' || (g % 3), 0 from generate_series(1, 60) g;
 insert into public.h select g % 5, 'h' from generate_series(1, 20) g;
 insert into public.t select g, g from generate_series(1, 10) g;
 create table public.nk (id numeric primary key, v int);
 create table public.ia (id bigint generated always as identity primary key, v int);
 insert into public.ia (v) select g from generate_series(1, 5) g;
 insert into public.nk values (5, 5);
 create table public.cov (a int, b text, c int, primary key (a) include (b));
 insert into public.cov select g, 'b' || g, g from generate_series(1, 20) g;";

/// Transactions that all land in one batch: chains of updates of one key, updates leaving a
/// TOAST value unchanged (of loaded rows and of rows inserted earlier in the batch), delete and
/// re-insert of a key, insert then delete, primary-key moves and swaps, a composite key,
/// REPLICA IDENTITY FULL, a keyless table with duplicates deleted one at a time and updates
/// (in CSV staged as D + I: CSV carries no old row), a truncate
/// between inserts, a column added midway, a covering primary key (`INCLUDE`), and one key
/// value spelt two ways (`1.0`, `1.00`) deleted and re-inserted (the fold keeps their order).
const WORKLOAD: &[&str] = &[
    "update public.k set a = a + 1 where id <= 100",
    "update public.k set a = a + 1 where id <= 50",
    "update public.k set a = a * 10, n = n + 1 where id % 10 = 0",
    "insert into public.k values (1001, 1, (select string_agg(md5(i::text), '') from generate_series(1, 300) i), 1.5)",
    "update public.k set a = 2 where id = 1001",
    "update public.k set n = 2.25 where id = 1001",
    "delete from public.k where id between 101 and 110",
    "insert into public.k values (105, 7, 'back', 0)",
    "insert into public.k values (2000, 1, 'gone', 1)",
    "delete from public.k where id = 2000",
    "update public.k set id = id + 5000 where id between 200 and 205",
    "update public.k set id = -id where id in (206, 207)",
    "update public.k set id = 206 where id = -207",
    "update public.k set id = 207 where id = -206",
    "update public.k set a = a + 100 where id in (5206, 206, 207)",
    "insert into public.k values (3000, 0, (select string_agg(md5((-i)::text), '') from generate_series(1, 300) i), 0)",
    "update public.k set big = big || 'z' where id = 3000",
    "update public.k set a = 3 where id = 3000",
    "update public.full_k set a = a + 1",
    "update public.full_k set big = 'small' where id = 3",
    "update public.full_k set a = a + 1 where id <= 10",
    "delete from public.full_k where id = 4",
    "update public.two set v = v + 1 where y = 'y1'",
    "update public.two set x = x + 100 where y = 'y2' and x < 20",
    "delete from public.two where x = 3",
    "insert into public.h values (1, 'h'), (1, 'h'), (9, null)",
    "delete from public.h where ctid = (select ctid from public.h where g = 1 limit 1)",
    "insert into public.h values (2, 'after delete')",
    "update public.h set note = 'changed' where g = 2",
    "update public.h set g = g + 10 where note is null",
    "insert into public.t values (11, 11)",
    "truncate public.t",
    "insert into public.t values (1, 100), (2, 200)",
    "update public.t set v = v + 1",
    "alter table public.k add column z int",
    "update public.k set z = id where id <= 20",
    "insert into public.k values (4000, 4, null, 4, 44)",
    "update public.k set a = a + 1 where id <= 20",
    "update public.cov set b = 'changed' where a <= 5",
    "update public.cov set c = -c, b = b || '!' where a > 15",
    "delete from public.cov where a = 10",
    "insert into public.nk values (1.0, 1)",
    "update public.nk set v = v + 1",
    "update public.nk set v = v + 1",
    "delete from public.nk where id = 1",
    "insert into public.nk values (1.00, 3)",
    "update public.nk set id = 2.0 where id = 5",
    "insert into public.nk values (5.000, 9)",
    "update public.nk set v = 4 where id = 5",
    "update public.ia set v = v + 1",
    "delete from public.ia where id = 2",
    "insert into public.ia (id, v) overriding system value values (2, 22)",
    "insert into public.ia (v) values (6)",
];

async fn converges(format: &str, prefix: &str) {
    converges_with(format, prefix, false).await;
}

/// [`converges`]; with `dms`, the CSV DMS consumers ask for: a header row in every file
/// (AddColumnName), `I` first in load rows (IncludeOpForFullLoad), the commit time column.
async fn converges_with(format: &str, prefix: &str, dms: bool) {
    let s = Staging::new(&format!("{prefix}_src")).await;
    let target = TestDb::new(&format!("{prefix}_dst")).await;
    let task = prefix.replace('_', "-");
    let c = s.db.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    let format = Format::parse(format, "format").unwrap();
    let mut lo = LoadOptions::new(&task, s.db.config(), "loader");
    lo.format = format;
    lo.cdc = true;
    lo.csv_header = dms;
    lo.load_op_column = dms;
    full_load::run_local(&s.sink, &s.state, &lo, 1, Arc::new(Progress::default()))
        .await
        .unwrap();
    // The load applied first, so the batch applies over loaded rows.
    let loaded = apply::run(&s.sink, &target.config(), &task).await.unwrap();
    assert!(loaded.load_applied, "{loaded:?}");
    for sql in WORKLOAD {
        c.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let mut co = CdcOptions::new(&task, s.db.config(), "poller");
    co.format = format;
    co.csv_header = dms;
    co.commit_ts_column = dms;
    cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
    if dms {
        use pgshift::staging::ObjectSink;
        let first_line = |key: String| {
            let sink = s.sink.clone();
            async move {
                let body = sink.get(&key).await.unwrap().unwrap();
                String::from_utf8_lossy(&body)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            }
        };
        let load = s.sink.list("public/t/LOAD").await.unwrap();
        assert_eq!(first_line(load[0].clone()).await, "Op,id,v");
        // public.k's column added midway: its rows after it are in a second file with its
        // own header.
        let k = s.sink.list("public/k/cdc/").await.unwrap();
        assert_eq!(k.len(), 2, "{k:?}");
        assert_eq!(
            first_line(k[0].clone()).await,
            "Op,commit_ts,id,a,big,n,unchanged_toast"
        );
        assert!(k[1].ends_with("_0002.csv"), "{k:?}");
        assert_eq!(
            first_line(k[1].clone()).await,
            "Op,commit_ts,id,a,big,n,z,unchanged_toast"
        );
    }
    let report = apply::run(&s.sink, &target.config(), &task).await.unwrap();
    assert_eq!(report.batches_applied, 1, "one batch: {report:?}");
    // Everything but the keyless delete, the truncate and the keyed rows around the new
    // column's schema version went set-based.
    assert!(
        report.changes_set_based > 0 && report.changes_set_based < report.changes_applied,
        "{report:?}"
    );
    // Validate counts what it checked for a progress display as it goes.
    let progress = Progress::default();
    let v = validate::run_with_progress(
        &s.db.config(),
        &target.config(),
        &Selection::all(),
        validate::DEFAULT_RANGE_ROWS,
        Some(&progress),
    )
    .await
    .unwrap();
    assert!(v.equal, "{v:#?}");
    assert_eq!(v.tables.len(), 8);
    let count = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(count(&progress.chunks_total), 8);
    assert_eq!(count(&progress.chunks_done), 8);
    assert_eq!(
        count(&progress.rows),
        v.tables.iter().map(|t| t.source_rows).sum::<u64>()
    );
    // Unchanged TOAST values kept, in rows loaded and rows inserted in the batch.
    let big: Vec<(i32, i32)> = target
        .client()
        .await
        .query(
            "select id, length(big) from public.k where id in (10, 3000) order by id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(big, [(10, 12800), (3000, 9601)]);
    // A covering primary key's INCLUDE column is not a key column.
    let key: Vec<String> = target
        .client()
        .await
        .query_one(
            "select array_agg(a.attname::text order by a.attnum) from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any ((i.indkey::int2[])[0:i.indnkeyatts - 1]) where i.indrelid = 'public.cov'::regclass and i.indisprimary",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key, ["a"]);
}

#[tokio::test]
async fn a_batch_of_every_shape_of_change_applies_set_based_csv() {
    converges("csv", "batch_apply_csv").await;
}

#[tokio::test]
async fn a_batch_of_every_shape_of_change_applies_set_based_csv_with_dms_headers() {
    converges_with("csv", "batch_apply_dms", true).await;
}

#[tokio::test]
async fn a_batch_of_every_shape_of_change_applies_set_based_jsonl() {
    converges("jsonl", "batch_apply_jsonl").await;
}

/// Parquet: the load and the batch (whose column added midway puts `public.k`'s later rows in
/// a second file) read back and applied like CSV.
#[tokio::test]
async fn a_batch_of_every_shape_of_change_applies_set_based_parquet() {
    converges("parquet", "batch_apply_parquet").await;
}

/// A target that already has the source's foreign keys (the user brought the schema): the
/// load fills the referencing table before the referenced one and truncates both, and a
/// batch applies the child's file before the parent's; neither trips the keys.
#[tokio::test]
async fn a_target_with_foreign_keys_loads_and_applies() {
    const DDL: &str = "create table public.parent (id int primary key, name text);
     create table public.child (id int primary key, parent_id int not null references public.parent (id), note text);";
    let s = Staging::new("batch_apply_fk_src").await;
    let target = TestDb::new("batch_apply_fk_dst").await;
    let c = s.db.client().await;
    c.batch_execute(DDL).await.unwrap();
    c.batch_execute(
        "insert into public.parent select g, 'p' || g from generate_series(1, 20) g;
         insert into public.child select g, g, 'c' from generate_series(1, 20) g;",
    )
    .await
    .unwrap();
    let t = target.client().await;
    t.batch_execute(DDL).await.unwrap();
    // Rows the load replaces (a truncate of parent alone would be refused).
    t.batch_execute("insert into public.parent values (99, 'old'); insert into public.child values (99, 99, 'old')")
        .await
        .unwrap();
    let task = "batch-apply-fk";
    let mut lo = LoadOptions::new(task, s.db.config(), "loader");
    lo.cdc = true;
    full_load::run_local(&s.sink, &s.state, &lo, 1, Arc::new(Progress::default()))
        .await
        .unwrap();
    let loaded = apply::run(&s.sink, &target.config(), task).await.unwrap();
    assert!(loaded.load_applied, "{loaded:?}");
    c.batch_execute(
        "begin; insert into public.parent values (100, 'new'); insert into public.child values (100, 100, 'new'); commit;
         begin; delete from public.child where parent_id = 1; delete from public.parent where id = 1; commit;
         update public.child set parent_id = 100 where id = 2;",
    )
    .await
    .unwrap();
    s.poll(task).await;
    let report = apply::run(&s.sink, &target.config(), task).await.unwrap();
    assert_eq!(report.batches_applied, 1, "{report:?}");
    pgshift_tests::assert_same(&s.db.config(), &target.config()).await;
    // A truncate of the referenced table (the source cascades into the child: one truncate of
    // both, which the batch applies a file at a time), then new rows.
    c.batch_execute(
        "truncate public.parent cascade;
         insert into public.parent values (7, 'after'); insert into public.child values (7, 7, 'after');",
    )
    .await
    .unwrap();
    s.poll(task).await;
    let report = apply::run(&s.sink, &target.config(), task).await.unwrap();
    assert_eq!(report.batches_applied, 1, "{report:?}");
    pgshift_tests::assert_same(&s.db.config(), &target.config()).await;
    // The keys are still there, and hold.
    let err = t
        .batch_execute("insert into public.child values (500, 12345, 'orphan')")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION)
    );
}

/// The end of a migration through the CLI: `apply --until caught-up` waits for CDC (running
/// alongside) to stage the last changes, `status --target` shows the target caught up, and
/// `cutover` sets the target's sequences (serial, identity, and one no table owns) to the
/// source's values and validates.
#[tokio::test]
async fn cutover_catches_up_sets_sequences_and_validates() {
    const DDL: &str = "create table public.orders (id serial primary key, v int);
     create table public.items (id bigint generated always as identity primary key, o int);
     create sequence public.tickets start 100;";
    let source = TestDb::new("cutover_src").await;
    let target = TestDb::new("cutover_dst").await;
    let c = source.client().await;
    c.batch_execute(DDL).await.unwrap();
    c.batch_execute("insert into public.orders (v) select g from generate_series(1, 50) g; insert into public.items (o) select g from generate_series(1, 30) g;")
        .await
        .unwrap();
    // The user brought the schema (with its sequences) to the target.
    let t = target.client().await;
    t.batch_execute(DDL).await.unwrap();
    let task = pgshift_tests::CliTask::new("cutover", &source.config(), &target.config());
    let (src, dst, state) = (task.src.clone(), task.dst.clone(), task.state.as_str());
    let common = task.common();
    let cli = |args: &[&str]| task.run(args);
    let (code, out, err) = cli(&["full-load", "--cdc", "--source", &src]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = cli(&["apply", "--target", &dst]);
    assert_eq!(code, Some(0), "{out}{err}");

    // Writes, then the writes stop; CDC (following, started a moment later) stages them while
    // apply waits for it.
    c.batch_execute("insert into public.orders (v) values (1), (2); insert into public.items (o) values (7); select nextval('public.tickets'), nextval('public.tickets'); update public.orders set v = -1 where id = 3;")
        .await
        .unwrap();
    let follow = {
        let v = [
            &["cdc", "--follow", "--interval", "1", "--source", &src][..],
            &common,
        ]
        .concat();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        std::process::Command::new(pgshift_tests::pgshift_bin())
            .args(&v)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (code, out, err) = cli(&[
        "apply",
        "--until",
        "caught-up",
        "--interval",
        "1",
        "--wait",
        "60",
        "--target",
        &dst,
        "--source",
        &src,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("changes applied"), "{out}");
    let v: i32 = t
        .query_one("select v from public.orders where id = 3", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        v, -1,
        "apply --until waited for the change staged after it started"
    );

    let (code, out, err) = pgshift_tests::run_cli(&[
        "status", "--task", "cutover", "--state", state, "--target", &dst, "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["target"]["behind_bytes"], 0, "{status:#}");
    assert_eq!(status["target"]["lag_seconds"], 0.0, "{status:#}");
    assert!(
        status["target"]["applied"]["last_commit_ts"].is_string(),
        "{status:#}"
    );

    // Sequences differ before cutover (apply does not touch them).
    let next = |seq: &'static str| {
        let t = &t;
        async move {
            let v: i64 = t
                .query_one(&format!("select nextval('{seq}')"), &[])
                .await
                .unwrap()
                .get(0);
            v
        }
    };
    let (code, out, err) = cli(&[
        "cutover", "--wait", "60", "--target", &dst, "--source", &src,
    ]);
    // CDC stops (SIGINT: it releases its lease).
    let pid = follow.id().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let stopped = follow.wait_with_output().unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        stopped.status.success(),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    assert!(out.contains("3 of 3 set"), "{out}");
    assert!(
        out.contains("target equals source") && out.contains("teardown"),
        "{out}"
    );
    assert_eq!(next("public.orders_id_seq").await, 53);
    assert_eq!(next("public.items_id_seq").await, 32);
    assert_eq!(next("public.tickets").await, 102);

    // Bad input is named.
    let (code, _, err) = cli(&["apply", "--until", "soon", "--target", &dst]);
    assert_ne!(code, Some(0));
    assert!(err.contains("--until") && err.contains("soon"), "{err}");
    let (code, _, err) = cli(&["apply", "--until", "caught-up", "--target", &dst]);
    assert_ne!(code, Some(0));
    assert!(err.contains("needs --source"), "{err}");
    let (code, _, err) = cli(&["apply", "--parallel", "0", "--target", &dst]);
    assert_ne!(code, Some(0));
    assert!(err.contains("--parallel"), "{err}");
}

/// A load applied in parallel whose apply dies reading a chunk: the chunks committed before
/// stay (one transaction each, recorded in `pgshift.loaded`), the rerun loads only the rest,
/// and the target equals the source. JSON Lines gzipped, so the streamed conversion and
/// decompression are on the path too.
#[tokio::test]
async fn a_killed_parallel_load_resumes_at_the_chunk() {
    let s = Staging::new("load_resume_src").await;
    let target = TestDb::new("load_resume_dst").await;
    let c = s.db.client().await;
    c.batch_execute(
        "create table public.big (id int primary key, pad text);
         insert into public.big select g, repeat(md5(g::text), 4) from generate_series(1, 60000) g;
         create table public.nokey (g int, note text);
         insert into public.nokey select g % 7, 'n' from generate_series(1, 500) g;
         analyze;",
    )
    .await
    .unwrap();
    let task = "load-resume";
    let mut lo = LoadOptions::new(task, s.db.config(), "loader");
    lo.format = Format::parse("jsonl.gz", "format").unwrap();
    lo.chunk_mib = 1;
    lo.cdc = true;
    full_load::run_local(&s.sink, &s.state, &lo, 2, Arc::new(Progress::default()))
        .await
        .unwrap();
    let chunks = pgshift::staging::ObjectSink::list(&s.sink, "public/big/LOAD")
        .await
        .unwrap()
        .len() as u64;
    assert!(chunks >= 4, "{chunks} chunks of big");
    let opts = apply::ApplyOptions {
        load_workers: 2,
        ..Default::default()
    };
    // Out of time (a Lambda's deadline) before any chunk: a clean stop naming what is left.
    let late = apply::ApplyOptions {
        deadline: Some(std::time::Instant::now()),
        ..opts.clone()
    };
    let err = apply::run_with(&s.sink, &target.config(), task, late.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, pgshift::Error::Deadline(m) if m.contains(&format!("{} chunks", chunks + 1))),
        "{err}"
    );
    // The apply dies reading the fourth chunk file (each worker had committed one by then).
    let dying = pgshift::staging::UnreliableSink::new(
        s.sink.clone(),
        pgshift::staging::Crash::at_read("/LOAD", 3),
    );
    let err = apply::run_with(&dying, &target.config(), task, opts.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, pgshift::Error::Injected(_)), "{err}");
    let t = target.client().await;
    let loaded: i64 = t
        .query_one(
            "select count(*) from pgshift.loaded where task = $1",
            &[&task],
        )
        .await
        .unwrap()
        .get(0);
    assert!(loaded >= 1, "chunks committed before the crash: {loaded}");
    // The resumed load counts its chunks for a progress display as it goes.
    let progress = Arc::new(Progress::default());
    let resumed = apply::ApplyOptions {
        progress: Some(progress.clone()),
        ..opts.clone()
    };
    let report = apply::run_with(&s.sink, &target.config(), task, resumed)
        .await
        .unwrap();
    assert!(report.load_applied, "{report:?}");
    let count = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(count(&progress.chunks_total), report.load_chunks);
    assert_eq!(count(&progress.chunks_done), report.load_chunks);
    assert!(count(&progress.rows) > 0 && count(&progress.bytes) > 0);
    assert_eq!(report.load_chunks_resumed, loaded as u64, "{report:?}");
    assert_eq!(
        report.load_chunks + report.load_chunks_resumed,
        chunks + 1,
        "every chunk once: {report:?}"
    );
    pgshift_tests::assert_same(&s.db.config(), &target.config()).await;
    // Applied: a rerun loads nothing again.
    let again = apply::run_with(&s.sink, &target.config(), task, opts.clone())
        .await
        .unwrap();
    assert!(!again.load_applied, "{again:?}");
    // CDC out of time: no batch is started past the deadline; the next run applies it.
    c.batch_execute("update public.big set pad = pad || 'x' where id <= 10")
        .await
        .unwrap();
    s.poll(task).await;
    let stopped = apply::run_with(&s.sink, &target.config(), task, late)
        .await
        .unwrap();
    assert!(stopped.stopped_at_deadline, "{stopped:?}");
    assert_eq!(stopped.batches_applied, 0, "{stopped:?}");
    let rest = apply::run_with(&s.sink, &target.config(), task, opts)
        .await
        .unwrap();
    assert_eq!(rest.batches_applied, 1, "{rest:?}");
    pgshift_tests::assert_same(&s.db.config(), &target.config()).await;
}

/// A target whose columns differ from the source's is a named difference, not an error.
#[tokio::test]
async fn validate_names_schema_differences() {
    let source = TestDb::new("validate_schema_src").await;
    let target = TestDb::new("validate_schema_dst").await;
    source
        .client()
        .await
        .batch_execute("create table public.t (id int primary key, a int, b text); insert into public.t select g, g, 'x' from generate_series(1, 10) g;
             create table public.same (id int primary key); insert into public.same values (1); analyze;")
        .await
        .unwrap();
    target
        .client()
        .await
        .batch_execute("create table public.t (id int primary key, a bigint, c int); insert into public.t select g, g, 0 from generate_series(1, 10) g;
             create table public.same (id int primary key); insert into public.same values (1);")
        .await
        .unwrap();
    let v = validate::run(&source.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(!v.equal, "{v:#?}");
    let t = v.tables.iter().find(|t| t.table == "t").unwrap();
    assert!(!t.equal);
    assert_eq!(t.target_rows, Some(10), "rows still counted");
    assert_eq!(
        t.schema_differences,
        [
            "column \"a\": integer on the source, bigint on the target",
            "column \"b\" (text) missing on the target",
            "column \"c\" (integer) only on the target",
        ],
        "{t:#?}"
    );
    let same = v.tables.iter().find(|t| t.table == "same").unwrap();
    assert!(
        same.equal && same.schema_differences.is_empty(),
        "{same:#?}"
    );
    // Compared in key ranges, the same.
    let v = validate::run_with_ranges(&source.config(), &target.config(), &Selection::all(), 3)
        .await
        .unwrap();
    let t = v.tables.iter().find(|t| t.table == "t").unwrap();
    assert!(
        t.ranges > 1 && !t.equal && t.target_rows == Some(10),
        "{t:#?}"
    );
    assert_eq!(t.schema_differences.len(), 3);
}

/// `apply --until caught-up --source` with nothing else running drains CDC itself, in batches
/// of `--max-batch-changes`, applying each as it is staged, and stops caught up.
#[tokio::test]
async fn apply_until_drains_cdc_itself() {
    let source = TestDb::new("until_drain_src").await;
    let target = TestDb::new("until_drain_dst").await;
    let c = source.client().await;
    c.batch_execute(
        "create table public.acc (id int primary key, v int); insert into public.acc select g, 0 from generate_series(1, 200) g;",
    )
    .await
    .unwrap();
    let task = pgshift_tests::CliTask::new("until-drain", &source.config(), &target.config());
    let (src, dst) = (&task.src, &task.dst);
    let cli = |args: &[&str]| task.run(args);
    let (code, out, err) = cli(&["full-load", "--cdc", "--source", src]);
    assert_eq!(code, Some(0), "{out}{err}");
    for i in 0..10 {
        c.batch_execute(&format!(
            "update public.acc set v = v + {i} where id % 10 = {i}; insert into public.acc values ({}, {i})",
            1000 + i
        ))
        .await
        .unwrap();
    }
    let (code, out, err) = cli(&[
        "apply",
        "--until",
        "caught-up",
        "--source",
        src,
        "--target",
        dst,
        "--max-batch-changes",
        "30",
        "--wait",
        "60",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(report["load_applied"].as_bool().unwrap(), "{report:#}");
    assert!(
        report["batches_applied"].as_u64().unwrap() >= 5,
        "30 changes a batch: {report:#}"
    );
    assert_eq!(report["changes_applied"], 210, "{report:#}");
    pgshift_tests::assert_same(&source.config(), &target.config()).await;
}

/// An UPDATE of a row whose primary key is a TOASTed value (stored out of line) that the
/// update leaves alone: the new tuple marks the key unchanged; it is found by the old key the
/// server sends and keeps its value.
#[tokio::test]
async fn a_toasted_key_left_unchanged_keeps_its_row() {
    let s = Staging::new("toast_key_src").await;
    let target = TestDb::new("toast_key_dst").await;
    let task = "toast-key";
    let c = s.db.client().await;
    c.batch_execute(
        "create table public.tk (k text primary key, v int);
         alter table public.tk alter column k set storage external;
         insert into public.tk select (select string_agg(md5((g * 1000 + i)::text), '') from generate_series(1, 75) i), g from generate_series(1, 3) g;",
    )
    .await
    .unwrap();
    let mut lo = LoadOptions::new(task, s.db.config(), "loader");
    lo.cdc = true;
    full_load::run_local(&s.sink, &s.state, &lo, 1, Arc::new(Progress::default()))
        .await
        .unwrap();
    c.batch_execute("update public.tk set v = v + 10; update public.tk set v = v * 2 where v = 12")
        .await
        .unwrap();
    let co = CdcOptions::new(task, s.db.config(), "poller");
    cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
    let r = apply::run(&s.sink, &target.config(), task).await.unwrap();
    assert!(r.changes_applied >= 4, "{r:?}");
    let v = validate::run(&s.db.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(v.equal, "{v:#?}");
    let sum: i64 = target
        .client()
        .await
        .query_one(
            "select sum(v)::int8 from public.tk where length(k) = 2400",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, 11 + 24 + 13);
}
