//! Schema changes (DESIGN §12) converge on the target: captured in order with the data by the
//! event trigger's logical messages, or explained from the catalog when no message came.

use std::sync::Arc;

use pgshift::change::ddl::{ChangeOrigin, SchemaOp};
use pgshift::job::full_load::{self, Progress};
use pgshift::job::{apply, cdc_poll, teardown, validate};
use pgshift::options::{CdcOptions, LoadOptions};
use pgshift::selection::Selection;
use pgshift::staging::ObjectSink;
use pgshift::staging::layout::StoredSchema;
use pgshift_tests::{Staging, TestDb};

const SCHEMA: &str = "create table public.t (id int primary key, a int, v text);
 insert into public.t select g, g, 'x' from generate_series(1, 20) g;
 create table public.r (id int primary key, v text);
 insert into public.r select g, 'r' from generate_series(1, 5) g;
 create table public.m (id int primary key, v text);
 insert into public.m select g, 'm' from generate_series(1, 5) g;
 create table public.g (id int primary key, a int, twice int generated always as (a * 2) stored);
 insert into public.g (id, a) select g, g from generate_series(1, 5) g;
 create table public.gone (id int primary key);
 insert into public.gone values (1);
 create table public.quiet (id int primary key, v text);
 insert into public.quiet select g, 'q' from generate_series(1, 5) g;";

/// Each kind of DDL, interleaved with rows in the same transactions and batches.
const ROUND_ONE: &[&str] = &[
    // Existing rows get the default, new rows their own value.
    "alter table public.t add column c int not null default 7; insert into public.t values (21, 21, 'n', 3)",
    // A rename keeps the values; rows after it use the new name.
    "alter table public.t rename column a to b; update public.t set v = 'renamed' where id <= 3",
    // Retyped: int to bigint (a value only bigint holds follows), then to text.
    "alter table public.t alter column b type bigint; insert into public.t values (22, 5000000000, 'big', 1)",
    "alter table public.t alter column b type text; update public.t set b = 'text now' where id = 1",
    // Renamed and moved tables keep their rows (no second table on the target).
    "alter table public.r rename to r2; insert into public.r2 values (6, 'after rename')",
    "create schema archive; alter table public.m set schema archive; insert into archive.m values (6, 'moved')",
    // Created after the load: with rows, and with none (it appears all the same).
    "create table public.fresh (id int primary key, note text default 'd'); insert into public.fresh (id) values (1), (2)",
    "create table public.empty_new (id bigint primary key, at timestamptz default now())",
    // DDL run inside a DO block (DMS's trigger misses it).
    "do $$ begin execute 'alter table public.t add column z int default 5'; end $$",
    // A generated column added: it stays generated on the target.
    "alter table public.g add column thrice int generated always as (a * 3) stored; update public.g set a = a + 1 where id = 1",
    // Dropped on the source: dropped on the target.
    "drop table public.gone",
    // A stable default: existing rows keep the value they got at the ALTER.
    "alter table public.quiet add column at timestamptz not null default now()",
    // A schema change rolled back leaves nothing behind.
    "begin; alter table public.t add column never int; rollback",
    // Types created after the load come before the tables that use them (never text).
    "create type public.mood as enum ('sad', 'ok', 'happy'); create domain public.posint as int check (value > 0);
     create table public.typed (id int primary key, m public.mood, p public.posint, r int4range);
     insert into public.typed values (1, 'ok', 5, '[1,5)')",
    "create type public.pair_t as (a int, b text); alter table public.quiet add column pr public.pair_t;
     update public.quiet set pr = row(1, 'x') where id = 3",
];

/// After a separate apply run: rows into the renamed tables, a column dropped.
const ROUND_TWO: &[&str] = &[
    "insert into public.r2 values (7, 'second round')",
    "insert into archive.m values (7, 'second round')",
    "alter table public.t drop column v; insert into public.t values (23, 'b', 23, 1)",
    "insert into public.empty_new (id) values (1)",
    "update public.quiet set v = 'later' where id = 1",
];

async fn run(sql: &tokio_postgres::Client, steps: &[&str]) {
    for s in steps {
        sql.batch_execute(s)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
}

async fn staged_changes<S: ObjectSink>(sink: &S) -> Vec<StoredSchema> {
    let mut out = Vec::new();
    for key in sink.list("").await.unwrap() {
        if key.contains("/_schema/") {
            let body = sink.get(&key).await.unwrap().unwrap();
            let s: StoredSchema = serde_json::from_slice(&body).unwrap();
            if s.ddl.is_some() {
                out.push(s);
            }
        }
    }
    out
}

async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get::<_, Option<String>>(0)
        .unwrap_or_default()
}

async fn converge(prefix: &str, capture_ddl: bool) -> (Staging, TestDb, String) {
    let s = Staging::new(&format!("{prefix}_src")).await;
    let target = TestDb::new(&format!("{prefix}_dst")).await;
    let task = prefix.replace('_', "-");
    let c = s.db.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    let mut lo = LoadOptions::new(&task, s.db.config(), "loader");
    lo.cdc = true;
    lo.capture_ddl = capture_ddl;
    lo.ddl_schema = "pgshift_artifacts".to_owned();
    full_load::run_local(&s.sink, &s.state, &lo, 1, Arc::new(Progress::default()))
        .await
        .unwrap();
    let mut co = CdcOptions::new(&task, s.db.config(), "poller");
    co.capture_ddl = capture_ddl;
    co.ddl_schema = "pgshift_artifacts".to_owned();
    if !capture_ddl {
        // Without messages a change is seen in the Relation message of the table's next row,
        // explained by the catalog as it is at the poll: each change polled before the next
        // (changes of one table between two polls are collapsed, see the README).
        for step in ROUND_ONE.iter().filter(|s| {
            // Invisible without messages: a drop, a table that gets no rows, a generated
            // column (pgoutput does not send those).
            !s.contains("drop table") && !s.contains("empty_new") && !s.contains("generated")
        }) {
            c.batch_execute(step).await.unwrap();
            c.batch_execute("update public.t set v = v where id = 2; update public.quiet set v = v where id = 2")
                .await
                .unwrap();
            cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
        }
    } else {
        run(&c, ROUND_ONE).await;
    }
    cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
    apply::run(&s.sink, &target.config(), &task).await.unwrap();
    if capture_ddl {
        run(&c, ROUND_TWO).await;
    } else {
        run(
            &c,
            &ROUND_TWO
                .iter()
                .filter(|s| !s.contains("empty_new"))
                .copied()
                .collect::<Vec<_>>(),
        )
        .await;
    }
    cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
    // A separate apply run: it knows the tables only from the target and the staged versions.
    apply::run(&s.sink, &target.config(), &task).await.unwrap();
    let v = validate::run(&s.db.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(v.equal, "{v:#?}");
    (s, target, task)
}

#[tokio::test]
async fn schema_changes_are_captured_in_order_and_converge() {
    let (s, target, task) = converge("ddl_capture", true).await;
    let t = target.client().await;
    // No stale tables: renamed, moved and dropped tables are where the source has them.
    assert_eq!(
        one(&t, "select string_agg(n.nspname || '.' || c.relname, ',' order by n.nspname || '.' || c.relname) from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.relkind = 'r' and n.nspname in ('public', 'archive')").await,
        "archive.m,public.empty_new,public.fresh,public.g,public.quiet,public.r2,public.t,public.typed"
    );
    // Generated columns stay generated, with the source's expression.
    assert_eq!(
        one(&t, "select string_agg(attname::text || ':' || attgenerated::text, ',' order by attnum) from pg_attribute where attrelid = 'public.g'::regclass and attnum > 0 and attgenerated <> ''").await,
        "twice:s,thrice:s"
    );
    // User types created after the load are the target's types too.
    assert_eq!(
        one(&t, "select string_agg(format_type(atttypid, atttypmod), ',' order by attnum) from pg_attribute where attrelid = 'public.typed'::regclass and attnum > 0").await,
        "integer,mood,posint,int4range"
    );
    assert_eq!(
        one(&t, "select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'public.quiet'::regclass and attname = 'pr'").await,
        "pair_t"
    );
    // Defaults and NOT NULL came with the added column; the created table has its key.
    assert_eq!(
        one(&t, "select pg_get_expr(adbin, adrelid) || ' ' || (select attnotnull::text from pg_attribute where attrelid = 'public.t'::regclass and attname = 'c') from pg_attrdef where adrelid = 'public.t'::regclass and adnum = (select attnum from pg_attribute where attrelid = 'public.t'::regclass and attname = 'c')").await,
        "7 true"
    );
    assert_eq!(
        one(&t, "select string_agg(a.attname::text, ',') from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey) where i.indrelid = 'public.empty_new'::regclass and i.indisprimary").await,
        "id"
    );
    // What the stage says each change meant, learnt from the trigger's messages.
    let changes = staged_changes(&s.sink).await;
    assert!(
        changes
            .iter()
            .all(|c| c.ddl.as_ref().unwrap().origin == ChangeOrigin::Message),
        "{changes:#?}"
    );
    let ops: Vec<&SchemaOp> = changes
        .iter()
        .flat_map(|c| &c.ddl.as_ref().unwrap().ops)
        .collect();
    let has = |f: &dyn Fn(&SchemaOp) -> bool| ops.iter().any(|o| f(o));
    assert!(has(
        &|o| matches!(o, SchemaOp::AddColumn { column, existing_rows: Some(v), .. } if column == "c" && v == "7")
    ));
    assert!(has(
        &|o| matches!(o, SchemaOp::RenameColumn { from, to } if from == "a" && to == "b")
    ));
    assert!(has(
        &|o| matches!(o, SchemaOp::AlterType { type_name, .. } if type_name == "bigint")
    ));
    assert!(has(
        &|o| matches!(o, SchemaOp::RenameTable { from_table, .. } if from_table == "r")
    ));
    assert!(has(
        &|o| matches!(o, SchemaOp::RenameTable { from_schema, .. } if from_schema == "public")
    ));
    assert!(has(&|o| matches!(o, SchemaOp::DropTable)));
    assert!(has(
        &|o| matches!(o, SchemaOp::DropColumn { column } if column == "v")
    ));
    assert!(!has(
        &|o| matches!(o, SchemaOp::AddColumn { column, .. } if column == "never")
    ));
    // The trigger functions live in the chosen schema; teardown removes them and the triggers.
    let src = s.db.client().await;
    let count = |sql: &'static str| {
        let src = &src;
        async move { src.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    let sql_triggers = "select count(*) from pg_event_trigger where evtname like 'pgshift%'";
    let sql_functions = "select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'pgshift_artifacts'";
    assert_eq!(count(sql_triggers).await, 2);
    assert_eq!(count(sql_functions).await, 2);
    teardown::run(&s.db.config(), &task).await.unwrap();
    assert_eq!(count(sql_triggers).await, 0);
    assert_eq!(count(sql_functions).await, 0);
}

#[tokio::test]
async fn without_messages_schema_changes_come_from_the_catalog() {
    let (s, target, _task) = converge("ddl_catalog", false).await;
    let changes = staged_changes(&s.sink).await;
    assert!(
        !changes.is_empty()
            && changes
                .iter()
                .all(|c| c.ddl.as_ref().unwrap().origin == ChangeOrigin::Catalog),
        "{changes:#?}"
    );
    let t = target.client().await;
    assert_eq!(
        one(&t, "select string_agg(n.nspname || '.' || c.relname, ',' order by n.nspname || '.' || c.relname) from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.relkind = 'r' and n.nspname in ('public', 'archive')").await,
        "archive.m,public.fresh,public.g,public.gone,public.quiet,public.r2,public.t,public.typed"
    );
}

/// Partitioned tables in every shape, published through the root: partitions created after
/// the load (in another schema, sub-partitioned, a default one), a table attached, one
/// detached, rows moving between partitions; with the trigger's messages and without them.
async fn partitions_converge(prefix: &str, capture_ddl: bool) {
    let s = Staging::new(&format!("{prefix}_src")).await;
    let target = TestDb::new(&format!("{prefix}_dst")).await;
    let task = prefix.replace('_', "-");
    let c = s.db.client().await;
    c.batch_execute(
        "create table public.p (id int, k int, v text, primary key (id, k, v)) partition by range (k);
         create table public.p1 partition of public.p for values from (0) to (100);
         create table public.p2 partition of public.p for values from (100) to (200);
         insert into public.p select g, g % 200, 'x' from generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let mut lo = LoadOptions::new(&task, s.db.config(), "loader");
    lo.cdc = true;
    lo.capture_ddl = capture_ddl;
    full_load::run_local(&s.sink, &s.state, &lo, 1, Arc::new(Progress::default()))
        .await
        .unwrap();
    let mut co = CdcOptions::new(&task, s.db.config(), "poller");
    co.capture_ddl = capture_ddl;
    let mut rounds: Vec<&str> = vec![
        "update public.p set k = k + 100 where id <= 5 and k < 100",
        "create schema other; create table other.p3 partition of public.p for values from (200) to (300);
         insert into public.p values (1000, 250, 'other schema')",
        "create table public.p4 partition of public.p for values from (300) to (400) partition by list (v);
         create table public.p4a partition of public.p4 for values in ('a');
         create table public.p4z partition of public.p4 default;
         insert into public.p values (2000, 350, 'a'), (2001, 360, 'zz')",
        "update public.p set k = 370, v = 'a' where id = 1000",
        "create table public.p4b partition of public.p4 for values in ('b'); insert into public.p values (2002, 380, 'b')",
    ];
    if capture_ddl {
        // Seen only in the messages: an attach of a table with rows, and a detach.
        rounds.push(
            "create table public.p5 (id int not null, k int not null, v text not null); insert into public.p5 values (3000, 450, 'att');
             alter table public.p attach partition public.p5 for values from (400) to (500);
             insert into public.p values (3001, 451, 'after attach')",
        );
        rounds.push("alter table public.p detach partition public.p1; insert into public.p values (3002, 150, 'p2')");
    }
    for (i, step) in rounds.iter().enumerate() {
        c.batch_execute(step)
            .await
            .unwrap_or_else(|e| panic!("{step}: {e}"));
        cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
        if i % 2 == 1 {
            apply::run(&s.sink, &target.config(), &task).await.unwrap();
        }
    }
    apply::run(&s.sink, &target.config(), &task).await.unwrap();
    let v = validate::run(&s.db.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(v.equal, "{v:#?}");
    let tree = "select string_agg(i.inhrelid::regclass::text || '<' || i.inhparent::regclass::text, ',' order by i.inhrelid::regclass::text) from pg_inherits i join pg_class c on c.oid = i.inhrelid where c.relkind in ('r', 'p')";
    let want = one(&c, tree).await;
    assert_eq!(one(&target.client().await, tree).await, want);
    assert!(
        want.contains("other.p3<p") && want.contains("p4b<p4"),
        "{want}"
    );
}

#[tokio::test]
async fn partitions_in_every_shape_converge() {
    partitions_converge("ddl_parts", true).await;
}

#[tokio::test]
async fn partitions_converge_without_messages() {
    partitions_converge("ddl_parts_catalog", false).await;
}

/// PostGIS (Debian's `postgresql-15-postgis-3`, installed by the test command): geometry and
/// geography columns load, stream and apply exactly; the extension is created on a target
/// that lacks it; test-endpoint checks the target can have it.
#[tokio::test]
async fn postgis_columns_migrate_exactly() {
    let s = Staging::new("ddl_gis_src").await;
    let target = TestDb::new("ddl_gis_dst").await;
    let task = "ddl-gis";
    let c = s.db.client().await;
    c.batch_execute(
        "create extension postgis;
         create table public.places (id int primary key, g geometry(Point, 4326), gg geography, area geometry);
         insert into public.places select i, st_setsrid(st_makepoint(i, i / 3.0), 4326),
           st_makepoint(i * 1.5, 1)::geography, st_buffer(st_makepoint(0, 0), i)
         from generate_series(1, 30) i;",
    )
    .await
    .unwrap();
    // The source's check names the extension; against this target it can be created, against
    // a server without PostGIS (the PostgreSQL 12 build) it cannot.
    let mut opts = pgshift::source::checks::CheckOptions {
        target: Some(target.config()),
        ..Default::default()
    };
    let report = pgshift::job::test_endpoint::run(&s.db.config(), &opts)
        .await
        .unwrap();
    let ext = report.check("extensions").unwrap();
    assert_eq!(ext.status, pgshift::source::checks::Status::Pass, "{ext:?}");
    assert!(
        ext.detail.contains("postgis") && ext.detail.contains("public.places"),
        "{ext:?}"
    );
    let bare = TestDb::on(
        pgshift::config::PgConfig::from_url(
            &pgshift_tests::env("PGSHIFT_TEST_PG12_URL"),
            "PGSHIFT_TEST_PG12_URL",
        )
        .unwrap(),
        "gis_bare",
    )
    .await;
    opts.target = Some(bare.config());
    let report = pgshift::job::test_endpoint::run(&s.db.config(), &opts)
        .await
        .unwrap();
    let ext = report.check("extensions").unwrap();
    assert_eq!(ext.status, pgshift::source::checks::Status::Fail, "{ext:?}");
    assert!(ext.remedy.contains("postgis"), "{ext:?}");

    let mut lo = LoadOptions::new(task, s.db.config(), "loader");
    lo.cdc = true;
    full_load::run_local(&s.sink, &s.state, &lo, 1, Arc::new(Progress::default()))
        .await
        .unwrap();
    c.batch_execute(
        "update public.places set g = st_setsrid(st_makepoint(100.123456789, -50.5), 4326) where id = 1;
         insert into public.places values (31, 'SRID=4326;POINT(3 4)', 'SRID=4326;POINT(5 6)'::geography, 'POLYGON((0 0,1 0,1 1,0 0))');
         delete from public.places where id = 2;
         alter table public.places add column route geometry(LineString, 4326);
         update public.places set route = 'SRID=4326;LINESTRING(0 0, 1 1, 2 0)' where id = 3;",
    )
    .await
    .unwrap();
    let co = CdcOptions::new(task, s.db.config(), "poller");
    cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
    apply::run(&s.sink, &target.config(), task).await.unwrap();
    let v = validate::run(&s.db.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(v.equal, "{v:#?}");
    let t = target.client().await;
    assert_eq!(
        one(
            &t,
            "select extname::text from pg_extension where extname = 'postgis'"
        )
        .await,
        "postgis"
    );
    let exact = "select string_agg(id || ' ' || st_asewkt(g) || ' ' || st_asewkt(gg::geometry) || ' ' || coalesce(st_asewkt(route), '-'), '; ' order by id) from public.places where id in (1, 3, 31)";
    assert_eq!(one(&t, exact).await, one(&c, exact).await);
    assert_eq!(
        one(&t, "select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'public.places'::regclass and attname = 'route'").await,
        "geometry(LineString,4326)"
    );
}
