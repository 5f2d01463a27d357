//! pgshift never makes a source statement fail, and leaves nothing behind it cannot justify:
//! exact publications (keyless tables insert-only), an earlier version's `FOR ALL TABLES`
//! publication brought in line, new tables followed from their first row, teardown, no orphan
//! slot after a failed first run, a checkpoint the slot cannot justify, racing first runs.

use pgshift::error::Error;
use pgshift::job::cdc_poll;
use pgshift::options::CdcOptions;
use pgshift::selection::Selection;
use pgshift::state::StateStore;
use pgshift_tests::{Staging, TempDir, TestDb, replay};

fn opts(task: &str, db: &TestDb) -> CdcOptions {
    let mut o = CdcOptions::new(task, db.config(), "owner");
    o.peek_sessions = 1;
    o
}

fn selection(json: &str) -> Selection {
    Selection::from_json(json, "tables").unwrap()
}

/// `schema.table` of every table in a publication.
async fn members(c: &tokio_postgres::Client, publication: &str) -> Vec<String> {
    c.query(
        "select n.nspname || '.' || c.relname from pg_publication_rel pr \
         join pg_publication p on p.oid = pr.prpubid join pg_class c on c.oid = pr.prrelid \
         join pg_namespace n on n.oid = c.relnamespace where p.pubname = $1 order by 1",
        &[&publication],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Staged ops per table: `table → "IIUD.."` in order.
async fn staged_ops<S: pgshift::staging::ObjectSink>(
    sink: &S,
) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for c in replay::read_changes(sink).await {
        out.entry(c.table)
            .or_insert_with(String::new)
            .push_str(&c.op);
    }
    out
}

#[tokio::test]
async fn keyless_tables_in_or_out_of_the_selection_never_fail_on_the_source() {
    let Staging {
        db,
        sink,
        state,
        dir: _dir,
    } = Staging::new("safe_keyless").await;
    let c = db.client().await;
    c.batch_execute(
        "create table public.other_nopk (x int); insert into public.other_nopk values (1);
         create table public.sel_nopk (x int); insert into public.sel_nopk values (1);
         create table public.sel_pk (id int primary key, v int);",
    )
    .await
    .unwrap();
    let mut o = opts("keyless", &db);
    o.selection = selection(
        r#"{"rules": [{"rule-type": "selection", "rule-id": "1", "rule-name": "1",
            "object-locator": {"schema-name": "public", "table-name": "sel%"}, "rule-action": "include"}]}"#,
    );
    cdc_poll::run(&sink, &state, &o).await.unwrap();
    assert_eq!(members(&c, "pgshift_keyless").await, ["public.sel_pk"]);
    assert_eq!(
        members(&c, "pgshift_keyless$ins").await,
        ["public.sel_nopk"]
    );
    // Neither a table outside the selection nor a selected one without a key fails.
    c.batch_execute(
        "update public.other_nopk set x = 2; delete from public.other_nopk;
         insert into public.sel_nopk values (2), (3); update public.sel_nopk set x = 4 where x = 1;
         delete from public.sel_nopk where x = 2; truncate public.sel_nopk; insert into public.sel_nopk values (5);
         insert into public.sel_pk values (1, 1); update public.sel_pk set v = 2; delete from public.sel_pk;",
    )
    .await
    .expect("pgshift made a source statement fail");
    cdc_poll::run(&sink, &state, &o).await.unwrap();
    let ops = staged_ops(&sink).await;
    assert_eq!(
        ops.get("public.sel_nopk").map(String::as_str),
        Some("IITI"),
        "inserts and truncates only"
    );
    assert_eq!(ops.get("public.sel_pk").map(String::as_str), Some("IUD"));
    assert!(!ops.contains_key("public.other_nopk"));

    // The endpoint check names the tables and the fix.
    let report = pgshift::job::test_endpoint::run(
        &db.config(),
        &pgshift::source::checks::CheckOptions {
            selection: o.selection.clone(),
            publication_name: Some("pgshift_keyless".to_owned()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ri = report.check("replica_identity").unwrap();
    assert!(
        ri.detail.contains("public.sel_nopk") && ri.detail.contains("insert and truncate only"),
        "{ri:?}"
    );
    assert!(ri.remedy.contains("REPLICA IDENTITY FULL"), "{ri:?}");

    // Opted in, pgshift sets REPLICA IDENTITY FULL and the table moves to the main publication.
    o.replica_identity_full = true;
    cdc_poll::run(&sink, &state, &o).await.unwrap();
    assert_eq!(
        members(&c, "pgshift_keyless").await,
        ["public.sel_nopk", "public.sel_pk"]
    );
    assert!(members(&c, "pgshift_keyless$ins").await.is_empty());
    c.batch_execute("update public.sel_nopk set x = 6; delete from public.sel_nopk")
        .await
        .unwrap();
    cdc_poll::run(&sink, &state, &o).await.unwrap();
    let ops = staged_ops(&sink).await;
    // In CSV (no old row) the keyless update is staged as D(old row) + I(new row).
    assert_eq!(
        ops.get("public.sel_nopk").map(String::as_str),
        Some("IITIDID")
    );
}

#[tokio::test]
async fn an_earlier_for_all_tables_publication_is_brought_in_line_without_a_loss() {
    let Staging {
        db,
        sink,
        state,
        dir: _dir,
    } = Staging::new("safe_upgrade").await;
    let c = db.client().await;
    c.batch_execute(
        "create table public.pk (id int primary key, v int);
         create table public.nopk (x int);",
    )
    .await
    .unwrap();
    let o = opts("upgrade", &db);
    cdc_poll::run(&sink, &state, &o).await.unwrap();
    // As an earlier version left it: one publication FOR ALL TABLES (swapped in one
    // transaction, so the slot decodes across it).
    c.batch_execute(
        "begin; drop publication \"pgshift_upgrade$ins\"; drop publication pgshift_upgrade;
         create publication pgshift_upgrade for all tables; commit;",
    )
    .await
    .unwrap();
    assert!(
        c.batch_execute("delete from public.nopk").await.is_err(),
        "the outage being fixed"
    );
    c.batch_execute("insert into public.nopk values (1); insert into public.pk values (1, 1)")
        .await
        .unwrap();
    // A poll replaces it once no transaction older than the insert-only publication runs
    // (other tests' transactions on this cluster can defer it to a later poll), and stages
    // what was written before.
    let mut replaced = false;
    for _ in 0..100 {
        cdc_poll::run(&sink, &state, &o).await.unwrap();
        let all: bool = c
            .query_one(
                "select puballtables from pg_publication where pubname = 'pgshift_upgrade'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if !all {
            replaced = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        replaced,
        "the FOR ALL TABLES publication was never replaced"
    );
    assert_eq!(members(&c, "pgshift_upgrade$ins").await, ["public.nopk"]);
    c.batch_execute("delete from public.nopk where false; update public.nopk set x = 9; insert into public.nopk values (2); insert into public.pk values (2, 2)")
        .await
        .expect("no longer fails");
    let r = cdc_poll::run(&sink, &state, &o).await.unwrap();
    assert!(r.checkpoint >= r.target);
    cdc_poll::run(&sink, &state, &o).await.unwrap();
    let ops = staged_ops(&sink).await;
    assert_eq!(
        ops.get("public.nopk").map(String::as_str),
        Some("II"),
        "{ops:?}"
    );
    assert_eq!(
        ops.get("public.pk").map(String::as_str),
        Some("II"),
        "{ops:?}"
    );
}

#[tokio::test]
async fn new_matching_tables_are_captured_from_their_first_row() {
    let Staging {
        db,
        sink,
        state,
        dir: _dir,
    } = Staging::new("safe_follow").await;
    let c = db.client().await;
    c.batch_execute("create table public.t_first (id int primary key)")
        .await
        .unwrap();
    let mut o = opts("follow", &db);
    o.selection = selection(
        r#"{"rules": [{"rule-type": "selection", "rule-id": "1", "rule-name": "1",
            "object-locator": {"schema-name": "public", "table-name": "t_%"}, "rule-action": "include"}]}"#,
    );
    cdc_poll::run(&sink, &state, &o).await.unwrap();
    // Created and filled in one transaction, after the last poll.
    c.batch_execute(
        "begin; create table public.t_new (x int); insert into public.t_new values (1), (2); commit;
         begin; create table public.t_keyed (id int primary key); insert into public.t_keyed values (1); commit;
         create table public.other (x int); insert into public.other values (1);
         update public.t_new set x = 3 where x = 1;",
    )
    .await
    .expect("the follow trigger never fails a statement");
    cdc_poll::run(&sink, &state, &o).await.unwrap();
    let ops = staged_ops(&sink).await;
    assert_eq!(
        ops.get("public.t_new").map(String::as_str),
        Some("II"),
        "{ops:?}"
    );
    assert_eq!(
        ops.get("public.t_keyed").map(String::as_str),
        Some("I"),
        "{ops:?}"
    );
    assert!(!ops.contains_key("public.other"));
    // A key added later moves the table to the main publication in the same statement.
    c.batch_execute(
        "alter table public.t_new add primary key (x); update public.t_new set x = 4 where x = 3",
    )
    .await
    .unwrap();
    assert!(
        members(&c, "pgshift_follow")
            .await
            .contains(&"public.t_new".to_owned())
    );
    cdc_poll::run(&sink, &state, &o).await.unwrap();
    // The update changes the new primary key: D + I.
    let ops = staged_ops(&sink).await;
    assert_eq!(
        ops.get("public.t_new").map(String::as_str),
        Some("IIDI"),
        "{ops:?}"
    );
}

#[tokio::test]
async fn teardown_drops_what_pgshift_created_and_says_so() {
    let db = TestDb::new("safe_teardown").await;
    let dir = TempDir::new("safe_teardown");
    let c = db.client().await;
    c.batch_execute("create table public.t (id int primary key)")
        .await
        .unwrap();
    let url = pgshift_tests::url(&db.config());
    let run = |args: &[&str]| {
        std::process::Command::new(pgshift_tests::pgshift_bin())
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let stage = dir.path().join("stage");
    let state = dir.path().join("state");
    let out = run(&[
        "cdc",
        "--task",
        "gone",
        "--source",
        &url,
        "--stage",
        stage.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--once",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        count("select count(*) from pg_replication_slots where slot_name = 'pgshift_gone'").await,
        1
    );
    // Not at a terminal and without --yes: refused, nothing dropped.
    let out = run(&["teardown", "--task", "gone", "--source", &url]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert_eq!(
        count("select count(*) from pg_replication_slots where slot_name = 'pgshift_gone'").await,
        1
    );
    let out = run(&["teardown", "--task", "gone", "--source", &url, "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("replication slot pgshift_gone")
            && said.contains("publication pgshift_gone$ins"),
        "{said}"
    );
    assert_eq!(
        count("select count(*) from pg_replication_slots where slot_name = 'pgshift_gone'").await,
        0
    );
    assert_eq!(
        count("select count(*) from pg_publication where pubname like 'pgshift_gone%'").await,
        0
    );
    assert_eq!(
        count("select count(*) from pg_event_trigger where evtname = 'pgshift_gone_follow'").await,
        0
    );
    let out = run(&["teardown", "--task", "gone", "--source", &url, "--yes"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing of it is left"));
}

#[tokio::test]
async fn a_first_run_that_cannot_write_its_stage_leaves_no_slot() {
    let db = TestDb::new("safe_orphan").await;
    let dir = TempDir::new("safe_orphan");
    // The stage is a file, not a folder: nothing can be written under it.
    let stage = dir.path().join("stage");
    std::fs::write(&stage, b"not a folder").unwrap();
    let sink = pgshift::staging::LocalSink::new(&stage);
    let state = pgshift::state::FileStore::new(dir.path().join("state"));
    let err = cdc_poll::run(&sink, &state, &opts("orphan", &db))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot be written"), "{err}");
    let c = db.client().await;
    let slots: i64 = c
        .query_one(
            "select count(*) from pg_replication_slots where slot_name = 'pgshift_orphan'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "no slot left holding WAL");
}

#[tokio::test]
async fn a_checkpoint_ahead_of_what_was_staged_is_refused_and_loses_nothing() {
    let Staging {
        db,
        sink,
        state,
        dir: _dir,
    } = Staging::new("safe_ahead").await;
    let c = db.client().await;
    c.batch_execute("create table public.t (id int primary key)")
        .await
        .unwrap();
    let o = opts("ahead", &db);
    let first = cdc_poll::run(&sink, &state, &o).await.unwrap();
    c.batch_execute("insert into public.t select generate_series(1, 10)")
        .await
        .unwrap();
    let flush: String = c
        .query_one("select pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let flush: pgshift::Lsn = flush.parse().unwrap();
    // The state edited to skip the insert.
    let v = state.get("ahead", "cdc").await.unwrap().unwrap();
    let mut doc = v.doc;
    doc["checkpoint"] = serde_json::json!(flush.0);
    doc["checkpoint_lsn"] = serde_json::json!(flush.to_string());
    state
        .put("ahead", "cdc", &doc, Some(v.version))
        .await
        .unwrap();
    let err = cdc_poll::run(&sink, &state, &o).await.unwrap_err();
    assert!(
        matches!(err, Error::SlotLost(_)) && err.to_string().contains("never staged"),
        "{err}"
    );
    let confirmed: String = c
        .query_one("select confirmed_flush_lsn::text from pg_replication_slots where slot_name = 'pgshift_ahead'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        confirmed.parse::<pgshift::Lsn>().unwrap(),
        first.checkpoint,
        "the slot did not move"
    );
    // Put back: all 10 rows are staged.
    let v = state.get("ahead", "cdc").await.unwrap().unwrap();
    let mut doc = v.doc;
    doc["checkpoint"] = serde_json::json!(first.checkpoint.0);
    doc["checkpoint_lsn"] = serde_json::json!(first.checkpoint.to_string());
    state
        .put("ahead", "cdc", &doc, Some(v.version))
        .await
        .unwrap();
    assert_eq!(cdc_poll::run(&sink, &state, &o).await.unwrap().changes, 10);
}

#[tokio::test]
async fn racing_first_runs_create_the_task_once_without_an_error() {
    for round in 0..5 {
        let Staging {
            db,
            sink,
            state,
            dir: _dir,
        } = Staging::new("safe_race").await;
        db.client()
            .await
            .batch_execute(
                "create table public.t (id int primary key); create table public.u (x int)",
            )
            .await
            .unwrap();
        let mut a = opts(&format!("race{round}"), &db);
        let mut b = a.clone();
        a.owner = "a".to_owned();
        b.owner = "b".to_owned();
        let (ra, rb) = tokio::join!(
            cdc_poll::run(&sink, &state, &a),
            cdc_poll::run(&sink, &state, &b)
        );
        ra.unwrap_or_else(|e| panic!("round {round}: {e}"));
        rb.unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
}

/// `pgshift cdc` of task `lease-kill` with `extra` arguments.
fn cli_cdc(url: &str, dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let stage = dir.join("stage");
    let state = dir.join("state");
    let mut args = vec![
        "cdc",
        "--task",
        "lease-kill",
        "--source",
        url,
        "--stage",
        stage.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    std::process::Command::new(pgshift_tests::pgshift_bin())
        .args(&args)
        .output()
        .unwrap()
}

async fn hold_lease(state: &pgshift::state::FileStore, task: &str, owner: &str) {
    let v = state.get(task, "cdc").await.unwrap().unwrap();
    let mut doc = v.doc;
    doc["lease_owner"] = serde_json::json!(owner);
    doc["lease_expires_ms"] = serde_json::json!(pgshift::state::now_ms() + 600_000);
    state.put(task, "cdc", &doc, Some(v.version)).await.unwrap();
}

#[tokio::test]
async fn a_killed_run_does_not_lock_the_task_out_and_a_held_lease_is_an_error() {
    let db = TestDb::new("safe_lease").await;
    let dir = TempDir::new("safe_lease");
    let c = db.client().await;
    c.batch_execute("create table public.t (id int primary key)")
        .await
        .unwrap();
    let url = pgshift_tests::url(&db.config());
    let out = cli_cdc(&url, dir.path(), &["--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = pgshift::state::FileStore::new(dir.path().join("state"));
    // A run of this host that was killed (its pid is gone): taken over at once.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let dead = pgshift::state::records::local_owner()
        .replace(&std::process::id().to_string(), &dead_pid.to_string());
    hold_lease(&state, "lease-kill", &dead).await;
    c.batch_execute("insert into public.t values (1)")
        .await
        .unwrap();
    let out = cli_cdc(&url, dir.path(), &["--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 changes"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A live holder elsewhere: --once exits non-zero and says until when, in UTC.
    hold_lease(&state, "lease-kill", "cli-another-host-4242").await;
    let out = cli_cdc(&url, dir.path(), &["--once"]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("cli-another-host-4242") && said.contains(" UTC (in "),
        "{said}"
    );
    // --force takes it.
    c.batch_execute("insert into public.t values (2)")
        .await
        .unwrap();
    let out = cli_cdc(&url, dir.path(), &["--once", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 changes"));
}

#[tokio::test]
async fn sigint_stops_follow_promptly_and_releases_the_lease() {
    let db = TestDb::new("safe_sigint").await;
    let dir = TempDir::new("safe_sigint");
    db.client()
        .await
        .batch_execute("create table public.t (id int primary key)")
        .await
        .unwrap();
    let url = pgshift_tests::url(&db.config());
    let stage = dir.path().join("stage");
    let state_dir = dir.path().join("state");
    let mut child = std::process::Command::new(pgshift_tests::pgshift_bin())
        .args([
            "cdc",
            "--task",
            "lease-sig",
            "--source",
            &url,
            "--stage",
            stage.to_str().unwrap(),
            "--state",
            state_dir.to_str().unwrap(),
            "--follow",
            "--interval",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first poll's line.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(line.contains("task lease-sig"), "{line}");
    let started = std::time::Instant::now();
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let state = pgshift::state::FileStore::new(&state_dir);
    let doc = state.get("lease-sig", "cdc").await.unwrap().unwrap().doc;
    assert!(doc["lease_owner"].is_null(), "the lease is released: {doc}");
}

#[tokio::test]
async fn names_that_look_alike_or_like_pgshift_keys_never_collide() {
    let Staging {
        db,
        sink,
        state,
        dir: _dir,
    } = Staging::new("safe_names").await;
    let target = TestDb::new("safe_names_dst").await;
    let c = db.client().await;
    c.batch_execute(
        "create schema \"a.b\"; create schema a; create schema _manifests;
         create table \"a.b\".c (id int primary key, v text); insert into \"a.b\".c values (1, 'one');
         create table a.\"b.c\" (id int primary key, v text); insert into a.\"b.c\" values (1, 'two'), (2, 'three');
         create table _manifests.cdc (id int primary key, v text); insert into _manifests.cdc values (7, 'seven');",
    )
    .await
    .unwrap();
    let mut lo = pgshift::options::LoadOptions::new("names", db.config(), "loader");
    lo.cdc = true;
    let report = pgshift::job::full_load::run_local(&sink, &state, &lo, 1, Default::default())
        .await
        .unwrap();
    assert_eq!(report.rows, 4, "every table's rows, none overwritten");
    c.batch_execute("insert into _manifests.cdc values (8, 'eight'); update a.\"b.c\" set v = 'deux' where id = 1")
        .await
        .unwrap();
    cdc_poll::run(&sink, &state, &opts("names", &db))
        .await
        .unwrap();
    let a = pgshift::job::apply::run(&sink, &target.config(), "names")
        .await
        .unwrap();
    assert!(a.load_applied && a.batches_applied == 1, "{a:?}");
    let v = pgshift::job::validate::run(&db.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(v.equal, "{v:#?}");
}

/// Changes a copy of a stage folder.
type Tamper<'a> = Box<dyn Fn(&std::path::Path) + 'a>;

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[tokio::test]
async fn apply_refuses_staged_data_that_is_not_what_its_manifests_say() {
    let Staging {
        db,
        sink,
        state,
        dir,
    } = Staging::new("safe_verify").await;
    let c = db.client().await;
    c.batch_execute(
        "create table public.t (id int primary key, v text); insert into public.t values (0, 'z')",
    )
    .await
    .unwrap();
    let mut lo = pgshift::options::LoadOptions::new("verify", db.config(), "loader");
    lo.cdc = true;
    pgshift::job::full_load::run_local(&sink, &state, &lo, 1, Default::default())
        .await
        .unwrap();
    let o = opts("verify", &db);
    for i in 1..=3 {
        c.batch_execute(&format!(
            "insert into public.t values ({i}, 'v{i}'), ({}, 'w')",
            i + 10
        ))
        .await
        .unwrap();
        cdc_poll::run(&sink, &state, &o).await.unwrap();
    }
    let manifests = replay::manifests(&sink).await;
    assert_eq!(manifests.len(), 3);
    let stage = dir.path().join("stage");
    let middle = &manifests[1];
    let data = stage.join(&middle.1.files[0].key);
    let tampers: Vec<(&str, Tamper)> = vec![
        (
            "missing",
            Box::new(|s: &std::path::Path| std::fs::remove_file(s.join(&manifests[1].0)).unwrap()),
        ),
        (
            "cut",
            Box::new(|s: &std::path::Path| {
                let p = s.join(data.strip_prefix(&stage).unwrap());
                let body = std::fs::read_to_string(&p).unwrap();
                let first_line = body.lines().next().unwrap();
                std::fs::write(&p, format!("{first_line}\n")).unwrap();
            }),
        ),
        (
            "added",
            Box::new(|s: &std::path::Path| {
                let p = s.join(data.strip_prefix(&stage).unwrap());
                let mut body = std::fs::read_to_string(&p).unwrap();
                body.push_str("I,99,extra,\n");
                std::fs::write(&p, body).unwrap();
            }),
        ),
        (
            "load gone",
            Box::new(|s: &std::path::Path| {
                std::fs::remove_dir_all(s.join("_manifests/load")).unwrap()
            }),
        ),
    ];
    for (what, tamper) in tampers {
        let copy = dir.path().join(format!("copy-{}", what.replace(' ', "-")));
        copy_dir(&stage, &copy);
        tamper(&copy);
        let target = TestDb::new("safe_verify_dst").await;
        let err = pgshift::job::apply::run(
            &pgshift::staging::LocalSink::new(&copy),
            &target.config(),
            "verify",
        )
        .await
        .expect_err(what);
        assert!(matches!(err, Error::Staged(_)), "{what}: {err}");
        let said = err.to_string();
        match what {
            "missing" => assert!(
                said.contains("missing") && said.contains(&manifests[2].0),
                "{said}"
            ),
            "cut" | "added" => assert!(
                said.contains(&middle.1.files[0].key) && said.contains("bytes"),
                "{said}"
            ),
            _ => assert!(said.contains("load manifests"), "{said}"),
        }
    }
    // Untouched, it applies and validates equal.
    let target = TestDb::new("safe_verify_dst").await;
    pgshift::job::apply::run(&sink, &target.config(), "verify")
        .await
        .unwrap();
    let v = pgshift::job::validate::run(&db.config(), &target.config(), &Selection::all())
        .await
        .unwrap();
    assert!(v.equal, "{v:#?}");
}

#[tokio::test]
async fn selection_typos_are_an_error_unless_allowed() {
    let db = TestDb::new("safe_typo").await;
    let dir = TempDir::new("safe_typo");
    db.client()
        .await
        .batch_execute("create table public.t1 (id int primary key)")
        .await
        .unwrap();
    let url = pgshift_tests::url(&db.config());
    let mapping = dir.path().join("tables.json");
    let run = |cmd: &str, task: &str, tables: &str, extra: &[&str]| {
        let stage = dir.path().join(format!("stage-{task}"));
        let state = dir.path().join(format!("state-{task}"));
        let mut args = vec![
            cmd,
            "--task",
            task,
            "--source",
            &url,
            "--stage",
            stage.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--tables",
            tables,
        ];
        args.extend_from_slice(extra);
        std::process::Command::new(pgshift_tests::pgshift_bin())
            .args(&args)
            .output()
            .unwrap()
    };
    for (schema, table) in [("pubic", "t1"), ("public", "tt%")] {
        std::fs::write(
            &mapping,
            format!(
                r#"{{"rules": [{{"rule-type": "selection", "rule-id": "7", "rule-name": "7",
                "object-locator": {{"schema-name": "{schema}", "table-name": "{table}"}}, "rule-action": "include"}}]}}"#
            ),
        )
        .unwrap();
        // The mapping as DMS's CLI takes it: file://path, and the JSON itself.
        let tables = if schema == "pubic" {
            format!("file://{}", mapping.display())
        } else {
            std::fs::read_to_string(&mapping).unwrap()
        };
        for (cmd, extra) in [("cdc", &["--once"][..]), ("full-load", &["--cdc"][..])] {
            let out = run(cmd, "typo", &tables, extra);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{cmd} {schema}.{table}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(
                said.contains("match no table") && said.contains("rule-id 7"),
                "{said}"
            );
        }
        let slots: i64 = db
            .client()
            .await
            .query_one(
                "select count(*) from pg_replication_slots where slot_name = 'pgshift_typo'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(slots, 0, "nothing created for a typo");
    }
    let out = run(
        "cdc",
        "typo-ok",
        mapping.to_str().unwrap(),
        &["--once", "--allow-empty"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_killed_writers_temporary_files_are_cleaned_by_the_next_run() {
    let Staging {
        db,
        sink,
        state,
        dir,
    } = Staging::new("safe_tmp").await;
    db.client()
        .await
        .batch_execute("create table public.t (id int primary key)")
        .await
        .unwrap();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let folder = dir.path().join("stage/public/t");
    std::fs::create_dir_all(&folder).unwrap();
    let stale = folder.join(format!(".LOAD00000001.csv.tmp-{dead}-0123abcd"));
    let live = folder.join(format!(
        ".LOAD00000002.csv.tmp-{}-0123abcd",
        std::process::id()
    ));
    std::fs::write(&stale, b"half a chunk").unwrap();
    std::fs::write(&live, b"being written").unwrap();
    cdc_poll::run(&sink, &state, &opts("tmp", &db))
        .await
        .unwrap();
    assert!(!stale.exists(), "a dead writer's file is removed");
    assert!(live.exists(), "a live writer's file is kept");
}

#[tokio::test]
async fn a_lost_slot_or_publication_has_a_working_way_back() {
    let db = TestDb::new("safe_back").await;
    let target = TestDb::new("safe_back_dst").await;
    let dir = TempDir::new("safe_back");
    let c = db.client().await;
    c.batch_execute(
        "create table public.t (id int primary key, v text); insert into public.t values (1, 'a')",
    )
    .await
    .unwrap();
    let url = pgshift_tests::url(&db.config());
    let stage = dir.path().join("stage");
    let state = dir.path().join("state");
    let (stage, state) = (stage.to_str().unwrap(), state.to_str().unwrap());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(pgshift_tests::pgshift_bin())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let task = ["--task", "back"];
    let seams = ["--stage", stage, "--state", state];
    let load = || run(&[&["full-load", "--cdc", "--source", &url][..], &task, &seams].concat());
    let poll = || run(&[&["cdc", "--once", "--source", &url][..], &task, &seams].concat());
    let start_over = || {
        let (code, said) = run(&[
            &["teardown", "--reset", "--yes", "--source", &url][..],
            &task,
            &["--state", state],
        ]
        .concat());
        assert_eq!(code, Some(0), "{said}");
        assert!(
            said.contains("publication pgshift_back") && said.contains("task record"),
            "{said}"
        );
    };
    let apply_and_validate = || async {
        pgshift::job::apply::run(
            &pgshift::staging::LocalSink::new(stage),
            &target.config(),
            "back",
        )
        .await
        .unwrap();
        let v = pgshift::job::validate::run(&db.config(), &target.config(), &Selection::all())
            .await
            .unwrap();
        assert!(v.equal, "{v:#?}");
    };
    assert_eq!(load().0, Some(0));
    c.batch_execute("insert into public.t values (2, 'b')")
        .await
        .unwrap();
    assert_eq!(poll().0, Some(0));
    apply_and_validate().await;

    for lose in [
        "select pg_drop_replication_slot('pgshift_back')",
        "drop publication pgshift_back",
    ] {
        c.batch_execute(lose).await.unwrap();
        c.batch_execute("insert into public.t select max(id) + 1, 'lost?' from public.t")
            .await
            .unwrap();
        let (code, said) = poll();
        assert_eq!(code, Some(1), "{lose}: {said}");
        assert!(
            said.contains("start the task over") && said.contains("--reset"),
            "{lose}: {said}"
        );
        // The way back the message names: teardown --reset, a new full load, CDC, apply.
        start_over();
        let (code, said) = load();
        assert_eq!(code, Some(0), "{lose}: {said}");
        c.batch_execute("update public.t set v = 'after' where id = 1")
            .await
            .unwrap();
        assert_eq!(poll().0, Some(0), "{lose}");
        apply_and_validate().await;
    }
}

#[tokio::test]
async fn a_keyless_table_arrives_exactly_once_through_load_and_cdc() {
    for format in ["csv", "jsonl.gz"] {
        let Staging {
            db,
            sink,
            state,
            dir: _dir,
        } = Staging::new("safe_nokey").await;
        let target = TestDb::new("safe_nokey_dst").await;
        let c = db.client().await;
        c.batch_execute(
            "create table public.history (account int, delta int);
             insert into public.history select g % 10, g from generate_series(1, 1000) g;",
        )
        .await
        .unwrap();
        let task = format!("nokey-{}", format.replace('.', "-"));
        let mut lo = pgshift::options::LoadOptions::new(&task, db.config(), "loader");
        lo.cdc = true;
        lo.format = pgshift::staging::encode::Format::parse(format, "format").unwrap();
        lo.chunk_mib = 1;
        // The slot's L0 comes first; rows committed after it and before the chunk's snapshot
        // are in both the load and CDC.
        let (plan, _) = pgshift::job::full_load::plan(&sink, &state, &lo)
            .await
            .unwrap();
        assert_eq!(
            plan.tables[0].chunks.len(),
            1,
            "a keyless table is one snapshot"
        );
        c.batch_execute("insert into public.history select 99, g from generate_series(1, 37) g")
            .await
            .unwrap();
        pgshift::job::full_load::run_local(&sink, &state, &lo, 1, Default::default())
            .await
            .unwrap();
        c.batch_execute("insert into public.history values (7, 7), (7, 7)")
            .await
            .unwrap();
        let mut o = opts(&task, &db);
        o.format = lo.format;
        cdc_poll::run(&sink, &state, &o).await.unwrap();
        pgshift::job::apply::run(&sink, &target.config(), &task)
            .await
            .unwrap();
        let v = pgshift::job::validate::run(&db.config(), &target.config(), &Selection::all())
            .await
            .unwrap();
        assert!(v.equal, "{format}: {v:#?}");
    }
}
