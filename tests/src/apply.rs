//! Set-based (batch) apply: every shape of change folded inside one batch converges on the
//! source, in CSV and JSON Lines staging.

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
 insert into public.t select g, g from generate_series(1, 10) g;";

/// Transactions that all land in one batch: chains of updates of one key, updates leaving a
/// TOAST value unchanged (of loaded rows and of rows inserted earlier in the batch), delete and
/// re-insert of a key, insert then delete, primary-key moves and swaps, a composite key,
/// REPLICA IDENTITY FULL, a keyless table with duplicates deleted one at a time and updates
/// (in CSV staged as D + I: CSV carries no old row), a truncate
/// between inserts, and a column added midway.
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
];

async fn converges(format: &str, prefix: &str) {
    let s = Staging::new(&format!("{prefix}_src")).await;
    let target = TestDb::new(&format!("{prefix}_dst")).await;
    let task = prefix.replace('_', "-");
    let c = s.db.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    let format = Format::parse(format, "format").unwrap();
    let mut lo = LoadOptions::new(&task, s.db.config(), "loader");
    lo.format = format;
    lo.cdc = true;
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
    cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
    let report = apply::run(&s.sink, &target.config(), &task).await.unwrap();
    assert_eq!(report.batches_applied, 1, "one batch: {report:?}");
    // Everything but the keyless delete, the truncate and the keyed rows around the new
    // column's schema version went set-based.
    assert!(
        report.changes_set_based > 0 && report.changes_set_based < report.changes_applied,
        "{report:?}"
    );
    let v = validate::run(&s.db.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(v.equal, "{v:#?}");
    assert_eq!(v.tables.len(), 5);
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
}

#[tokio::test]
async fn a_batch_of_every_shape_of_change_applies_set_based_csv() {
    converges("csv", "batch_apply_csv").await;
}

#[tokio::test]
async fn a_batch_of_every_shape_of_change_applies_set_based_jsonl() {
    converges("jsonl", "batch_apply_jsonl").await;
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
    cdc_poll::run(
        &s.sink,
        &s.state,
        &CdcOptions::new(task, s.db.config(), "poller"),
    )
    .await
    .unwrap();
    let report = apply::run(&s.sink, &target.config(), task).await.unwrap();
    assert_eq!(report.batches_applied, 1, "{report:?}");
    let v = validate::run(&s.db.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(v.equal, "{v:#?}");
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
