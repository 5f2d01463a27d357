//! PostgreSQL 12, the oldest supported major (`PGSHIFT_TEST_PG12_URL`): a full load
//! (primary-key chunks: no TID range scans before 14), CDC (no `wal_status` and no
//! `publish_via_partition_root` before 13), `status --source`, apply to PostgreSQL 15 and
//! validate, and the endpoint checks.

use pgshift::config::PgConfig;
use pgshift::options::{CdcOptions, LoadOptions};
use pgshift::selection::Selection;
use pgshift_tests::{TempDir, TestDb, env};

fn admin() -> PgConfig {
    PgConfig::from_url(&env("PGSHIFT_TEST_PG12_URL"), "PGSHIFT_TEST_PG12_URL")
        .expect("PGSHIFT_TEST_PG12_URL")
}

#[tokio::test]
async fn postgres_12_loads_captures_applies_and_reports() {
    let db = TestDb::on(admin(), "pg12").await;
    let target = TestDb::new("pg12_dst").await;
    let dir = TempDir::new("pg12");
    let sink = pgshift::staging::LocalSink::new(dir.path().join("stage"));
    let state = pgshift::state::FileStore::new(dir.path().join("state"));
    let c = db.client().await;
    let version: i32 = c
        .query_one("select current_setting('server_version_num')::int4", &[])
        .await
        .unwrap()
        .get(0);
    assert!((120_000..130_000).contains(&version), "{version}");
    c.batch_execute(
        "create table public.t (id int primary key, v text);
         insert into public.t select g, md5(g::text) from generate_series(1, 3000) g;
         create table public.events (at int, what text);
         insert into public.events values (1, 'start');",
    )
    .await
    .unwrap();
    let mut lo = LoadOptions::new("pg12", db.config(), "loader");
    lo.cdc = true;
    lo.chunk_mib = 1;
    let load = pgshift::job::full_load::run_local(&sink, &state, &lo, 2, Default::default())
        .await
        .unwrap();
    assert_eq!(load.rows, 3001);
    c.batch_execute(
        "update public.t set v = 'x' where id <= 10; delete from public.t where id > 2990;
         update public.t set id = 5000 where id = 100; insert into public.events values (2, 'more');",
    )
    .await
    .unwrap();
    let mut o = CdcOptions::new("pg12", db.config(), "poller");
    o.peek_sessions = 2;
    o.split_min_wal_bytes = 0;
    let r = pgshift::job::cdc_poll::run(&sink, &state, &o)
        .await
        .unwrap();
    assert!(r.changes >= 22, "{r:?}");
    assert_eq!(r.slot_wal_status, "", "no wal_status before 13");
    let status = pgshift::job::status::run(&state, "pg12", Some(&db.config()))
        .await
        .unwrap();
    assert_eq!(
        status.lag_bytes.map(|b| b < 1 << 20),
        Some(true),
        "{status:?}"
    );
    let a = pgshift::job::apply::run(&sink, &target.config(), "pg12")
        .await
        .unwrap();
    assert!(a.load_applied && a.batches_applied >= 1, "{a:?}");
    let v = pgshift::job::validate::run(&db.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(v.equal, "{v:#?}");
    // A keyless table never fails on 12 either.
    c.batch_execute("update public.events set what = 'y'; delete from public.events")
        .await
        .unwrap();
    let report = pgshift::job::test_endpoint::run(&db.config(), &Default::default())
        .await
        .unwrap();
    assert!(
        report
            .checks
            .iter()
            .all(|c| c.status != pgshift::source::checks::Status::Fail),
        "{report:#?}"
    );
}
