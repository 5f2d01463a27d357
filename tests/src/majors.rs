//! The smoke lane over every supported major (`PGSHIFT_TEST_PG_MAJORS`: `12=url 13=url ..`,
//! servers from npm's embedded-postgres builds; 15 is the main suite's, `PGSHIFT_TEST_PG_URL`):
//! a full load with writes running, CDC with a primary-key change, a truncate and an added
//! column, apply to PostgreSQL 15, validate. Below 12, test-endpoint refuses the source.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pgshift::change::ddl::ChangeOrigin;
use pgshift::config::PgConfig;
use pgshift::job::full_load::{self, Progress};
use pgshift::job::{apply, cdc_poll, test_endpoint, validate};
use pgshift::options::{CdcOptions, LoadOptions};
use pgshift::selection::Selection;
use pgshift::source::checks::Status;
use pgshift::staging::ObjectSink;
use pgshift::staging::layout::StoredSchema;
use pgshift_tests::{TempDir, TestDb, env};

/// The servers by major, the main suite's 15 included.
fn majors() -> Vec<(u32, PgConfig)> {
    let mut out: Vec<(u32, PgConfig)> = env("PGSHIFT_TEST_PG_MAJORS")
        .split_whitespace()
        .map(|kv| {
            let (major, url) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("PGSHIFT_TEST_PG_MAJORS: {kv} is not MAJOR=URL"));
            (
                major.parse().expect("a major version"),
                PgConfig::from_url(url, "PGSHIFT_TEST_PG_MAJORS").expect("a URL"),
            )
        })
        .collect();
    out.push((
        15,
        PgConfig::from_url(&env("PGSHIFT_TEST_PG_URL"), "PGSHIFT_TEST_PG_URL").unwrap(),
    ));
    out.sort_by_key(|(m, _)| *m);
    out
}

const SCHEMA: &str = "create table public.t (id int primary key, v text, n numeric(10,2));
 insert into public.t select g, md5(g::text), g / 7.0 from generate_series(1, 4000) g;
 create table public.pair (a int, b text, v int, primary key (a, b));
 insert into public.pair select g, 'b' || (g % 3), 0 from generate_series(1, 300) g;
 create table public.emptied (id int primary key, v text);
 insert into public.emptied select g, 'e' from generate_series(1, 50) g;
 create table public.pt (id int, k int, v text, primary key (id, k)) partition by range (k);
 create table public.pt1 partition of public.pt for values from (0) to (100);
 insert into public.pt select g, g % 100, 'p' from generate_series(1, 200) g;";

const WORKLOAD: &[&str] = &[
    "update public.t set v = 'changed' where id <= 20",
    "update public.t set id = id + 100000 where id between 21 and 25",
    "delete from public.t where id > 3990",
    "update public.pair set b = b || '!' where a <= 10",
    "truncate public.emptied",
    "insert into public.emptied values (1, 'after truncate')",
    "alter table public.t add column c int not null default 7",
    "insert into public.t values (9000, 'new', 1, 3)",
    "update public.t set c = 8 where id = 1",
    // A partition created after the load, and rows moving into it.
    "create table public.pt2 partition of public.pt for values from (100) to (200)",
    "update public.pt set k = k + 100 where id <= 10",
    "insert into public.pt values (1000, 150, 'new')",
];

async fn scenario(major: u32, admin: PgConfig) {
    let db = TestDb::on(admin, &format!("major{major}")).await;
    let target = TestDb::new(&format!("major{major}_dst")).await;
    let dir = TempDir::new(&format!("major{major}"));
    let sink = pgshift::staging::LocalSink::new(dir.path().join("stage"));
    let state = pgshift::state::FileStore::new(dir.path().join("state"));
    let task = format!("major{major}");
    let c = db.client().await;
    let version: i32 = c
        .query_one("select current_setting('server_version_num')::int4", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version as u32 / 10_000, major, "{version}");
    c.batch_execute(SCHEMA).await.unwrap();
    // Writes while the load runs: CDC from L0 and the chunks' snapshots converge.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, cfg) = (stop.clone(), db.config());
        tokio::spawn(async move {
            let c = pgshift_tests::connect(&cfg).await;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                c.batch_execute(&format!(
                    "update public.t set n = n + 1 where id = {}; insert into public.pair values ({}, 'w', {i})",
                    i % 4000 + 1,
                    10_000 + i
                ))
                .await
                .unwrap();
            }
            i
        })
    };
    let mut lo = LoadOptions::new(&task, db.config(), "loader");
    lo.cdc = true;
    lo.chunk_mib = 1;
    let load = full_load::run_local(&sink, &state, &lo, 2, Arc::new(Progress::default()))
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: full load: {e}"));
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(load.rows >= 4350, "PostgreSQL {major}: {load:?}");
    for sql in WORKLOAD {
        c.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL {major}: {sql}: {e}"));
    }
    let co = CdcOptions::new(&task, db.config(), "poller");
    let r = cdc_poll::run(&sink, &state, &co)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: cdc: {e}"));
    assert!(
        r.changes > 40,
        "PostgreSQL {major}: {r:?} ({writes} writes)"
    );
    let a = apply::run(&sink, &target.config(), &task)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL {major}: apply: {e}"));
    assert!(a.load_applied && a.batches_applied >= 1, "{a:?}");
    let v = validate::run(&db.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(v.equal, "PostgreSQL {major}: {v:#?}");
    // The added column's meaning: from the trigger's message on 14+, the catalog before.
    let mut origins = Vec::new();
    for key in sink.list("public/t/_schema/").await.unwrap() {
        let s: StoredSchema =
            serde_json::from_slice(&sink.get(&key).await.unwrap().unwrap()).unwrap();
        if let Some(d) = s.ddl {
            origins.push(d.origin);
        }
    }
    let want = if major >= 14 {
        ChangeOrigin::Message
    } else {
        ChangeOrigin::Catalog
    };
    assert_eq!(origins, [want], "PostgreSQL {major}");
    // Existing rows got the default on the target too.
    let sevens: i64 = target
        .client()
        .await
        .query_one("select count(*) from public.t where c = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert!(sevens > 3900, "PostgreSQL {major}: {sevens}");
    let report = test_endpoint::run(&db.config(), &Default::default())
        .await
        .unwrap();
    assert!(
        report.checks.iter().all(|c| c.status != Status::Fail),
        "PostgreSQL {major}: {report:#?}"
    );
}

#[tokio::test]
async fn every_major_loads_captures_applies_and_validates() {
    let mut ran = Vec::new();
    for (major, admin) in majors() {
        if major < 12 {
            let report = test_endpoint::run(&admin, &Default::default())
                .await
                .unwrap();
            let version = report.check("version").unwrap();
            assert_eq!(version.status, Status::Fail, "{report:#?}");
            assert!(
                version.detail.contains("needs PostgreSQL 12 or later"),
                "{version:?}"
            );
            continue;
        }
        scenario(major, admin).await;
        ran.push(major);
    }
    assert_eq!(ran, [12, 13, 14, 15, 16, 17, 18]);
}
