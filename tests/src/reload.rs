//! Reload tables into a running task (DMS's "reload table"): a fresh chunked load of some
//! tables while CDC keeps flowing, merged by `apply` with the changes around it — a target
//! that drifted is repaired, a table selected after the load is brought in, keyless tables
//! stay exact, a reload whose table changed shape meanwhile is refused and a newer one wins.

use std::sync::Arc;

use pgshift::job::full_load::{self, Progress, reload};
use pgshift::job::{apply, cdc_poll};
use pgshift::lsn::Lsn;
use pgshift::options::{CdcOptions, LoadOptions};
use pgshift::selection::Selection;
use pgshift_tests::{CliTask, Staging, TempDir, TestDb, assert_same};

const SCHEMA: &str = "create table public.acct (id int primary key, v int not null, pad text);
 insert into public.acct select g, 0, repeat('x', 200) from generate_series(1, 20000) g;
 create table public.log (g int, note text); alter table public.log replica identity full;
 insert into public.log select g % 50, 'n' from generate_series(1, 500) g;
 create table public.late (id int primary key, v text);
 insert into public.late select g, 'l' || g from generate_series(1, 100) g;
 analyze public.acct;";

fn selection(tables: &[&str]) -> Selection {
    let rules: Vec<serde_json::Value> = tables
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"rule-type": "selection", "rule-id": (i + 1).to_string(),
                "object-locator": {"schema-name": "public", "table-name": t}, "rule-action": "include"})
        })
        .collect();
    Selection::from_json(&serde_json::json!({ "rules": rules }).to_string(), "tables").unwrap()
}

fn names(tables: &[&str]) -> Vec<(String, String)> {
    tables
        .iter()
        .map(|t| ("public".to_owned(), (*t).to_owned()))
        .collect()
}

#[tokio::test]
async fn a_reload_repairs_the_target_and_merges_with_the_changes_around_it() {
    let s = Staging::new("reload_src").await;
    let target = TestDb::new("reload_dst").await;
    let task = "reload-repair";
    let c = s.db.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    let (first, all) = (
        selection(&["acct", "log"]),
        selection(&["acct", "log", "late"]),
    );
    let mut lo = LoadOptions::new(task, s.db.config(), "loader");
    lo.cdc = true;
    lo.chunk_mib = 1;
    lo.selection = first;
    full_load::run_local(&s.sink, &s.state, &lo, 2, Arc::new(Progress::default()))
        .await
        .unwrap();
    assert!(
        apply::run(&s.sink, &target.config(), task)
            .await
            .unwrap()
            .load_applied
    );
    let exec = |sql: &'static str| {
        let c = &c;
        async move {
            c.batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        }
    };

    // The target drifts (rows lost, changed, a keyless table's rows doubled): what a reload is
    // for.
    target
        .client()
        .await
        .batch_execute(
            "delete from public.acct where id % 100 = 0; update public.acct set v = -1 where id % 77 = 0;
             insert into public.log select 1, 'dup' from generate_series(1, 5)",
        )
        .await
        .unwrap();
    exec("update public.acct set v = v + 1 where id % 3 = 0; delete from public.log where g = 7; insert into public.log values (100, 'a')").await;
    // CDC with the wider selection: `late` joins the publication.
    let mut co = CdcOptions::new(task, s.db.config(), "poller");
    co.selection = all.clone();
    cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();

    // The reload: planned (R0 read), then changes before any chunk is read, then half the
    // chunks, more changes, CDC staged and applied past R0 before the reload is complete.
    let mut ro = LoadOptions::new(task, s.db.config(), "reloader");
    ro.chunk_mib = 1;
    ro.selection = all.clone();
    let tables = names(&["acct", "log", "late"]);
    let (plan, ids, resumed) = reload::plan(&s.sink, &s.state, &ro, &tables).await.unwrap();
    let r0 = plan.reload.unwrap();
    assert!(!resumed);
    assert!(ids.len() >= 4, "acct in several chunks: {ids:?}");
    assert!(
        ids.iter().all(|id| id.reload == Some(r0)),
        "the reload's own chunk items"
    );
    exec("update public.acct set v = v + 10 where id % 5 = 0;
          update public.acct set id = id + 100000 where id between 10 and 12;
          insert into public.log values (7, 'back'); update public.log set note = 'u' where g = 3;
          insert into public.late values (1000, 'new'); update public.late set v = 'chg' where id <= 10").await;
    let half = ids.len() / 2;
    for id in &ids[..half] {
        full_load::export_chunk(&s.sink, &s.state, &ro, id)
            .await
            .unwrap();
    }
    exec("update public.acct set v = v + 100 where id % 7 = 0; delete from public.acct where id between 15000 and 15010;
          delete from public.log where g = 3 and note = 'u'; insert into public.log values (8, 'x'), (8, 'x')").await;
    let polled = cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
    assert!(!polled.batches.is_empty(), "{polled:?}");
    let before = apply::run(&s.sink, &target.config(), task).await.unwrap();
    assert!(
        before.reloads_applied.is_empty() && before.position > r0,
        "an unfinished reload is not applied; the target goes on past R0: {before:?}"
    );
    for id in &ids[half..] {
        full_load::export_chunk(&s.sink, &s.state, &ro, id)
            .await
            .unwrap();
    }
    let manifests = reload::finish(&s.sink, &s.state, task, r0, &Default::default())
        .await
        .unwrap();
    assert_eq!(manifests.len(), 3);
    assert!(
        manifests
            .iter()
            .all(|m| m.l0 == Some(r0) && m.schema_key.is_some())
    );
    {
        use pgshift::staging::ObjectSink;
        let keys = s.sink.list("public/acct/").await.unwrap();
        let reloaded: Vec<&String> = keys
            .iter()
            .filter(|k| k.contains("/reload-") && k.contains("/LOAD"))
            .collect();
        assert_eq!(
            reloaded.len(),
            manifests
                .iter()
                .find(|m| m.table == "acct")
                .unwrap()
                .chunks
                .len(),
            "the reload's chunks sit in their own folder: {keys:?}"
        );
        assert!(reloaded[0].starts_with(&format!("public/acct/reload-{}/LOAD", r0.key_hex())));
    }
    exec("update public.acct set v = 0 where id = 1; insert into public.late values (1001, 'after'); update public.log set note = 'later' where g = 8").await;
    cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
    let report = apply::run(&s.sink, &target.config(), task).await.unwrap();
    let mut applied = report.reloads_applied.clone();
    applied.sort();
    assert_eq!(
        applied,
        ["public.acct", "public.late", "public.log"],
        "{report:?}"
    );
    assert!(report.reload_changes_replayed > 0, "{report:?}");
    assert_same(&s.db.config(), &target.config()).await;
    // Applied once: a rerun has nothing to do.
    let again = apply::run(&s.sink, &target.config(), task).await.unwrap();
    assert!(
        again.reloads_applied.is_empty() && again.batches_applied == 0,
        "{again:?}"
    );
    exec("update public.log set note = 'after reload' where g = 100; delete from public.acct where id = 2").await;
    cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
    apply::run(&s.sink, &target.config(), task).await.unwrap();
    assert_same(&s.db.config(), &target.config()).await;

    // A table that changes shape while it is reloaded: apply refuses that reload (naming
    // what to do), a newer reload supersedes it.
    let one = names(&["acct"]);
    let (plan, ids, _) = reload::plan(&s.sink, &s.state, &ro, &one).await.unwrap();
    let r1 = plan.reload.unwrap();
    exec("alter table public.acct add column z int; update public.acct set z = 1, v = v + 1 where id = 3").await;
    for id in &ids {
        full_load::export_chunk(&s.sink, &s.state, &ro, id)
            .await
            .unwrap();
    }
    reload::finish(&s.sink, &s.state, task, r1, &Default::default())
        .await
        .unwrap();
    cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
    let err = apply::run(&s.sink, &target.config(), task)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("public.acct") && err.contains("run the reload again"),
        "{err}"
    );
    let rerun = reload::run_local(
        &s.sink,
        &s.state,
        &ro,
        &one,
        2,
        Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    assert!(rerun.r0 > r1 && rerun.resumed == 0, "{rerun:?}");
    exec("update public.acct set z = 2 where id = 4").await;
    cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
    let report = apply::run(&s.sink, &target.config(), task).await.unwrap();
    assert_eq!(report.reloads_applied, ["public.acct"], "{report:?}");
    assert_same(&s.db.config(), &target.config()).await;
}

#[tokio::test]
async fn a_reload_names_what_it_cannot_do() {
    let s = Staging::new("reload_err").await;
    let c = s.db.client().await;
    c.batch_execute(
        "create table public.a (id int primary key); create table public.b (id int primary key);
         create table public.c (id int primary key, x int); insert into public.c values (1, 1);
         create table public.p (id int, k int) partition by range (id);
         create table public.p1 partition of public.p for values from (0) to (10);",
    )
    .await
    .unwrap();
    let mut ro = LoadOptions::new("reload-err", s.db.config(), "reloader");
    ro.selection = selection(&["a", "c", "p", "p1"]);
    let msg = |e: pgshift::Error| e.to_string();
    // No task yet: a reload goes into a running one.
    let err = msg(reload::plan(&s.sink, &s.state, &ro, &names(&["a"]))
        .await
        .unwrap_err());
    assert!(err.contains("full-load --cdc"), "{err}");
    let mut co = CdcOptions::new("reload-err", s.db.config(), "poller");
    co.selection = ro.selection.clone();
    cdc_poll::run(&s.sink, &s.state, &co).await.unwrap();
    for (tables, want) in [
        (names(&["b"]), "not in the task's selection"),
        (names(&["p1"]), "is a partition"),
        (
            vec![("public".to_owned(), "A".to_owned())],
            "not in the task's selection",
        ),
    ] {
        let err = msg(reload::plan(&s.sink, &s.state, &ro, &tables)
            .await
            .unwrap_err());
        assert!(err.contains(want), "{tables:?}: {err}");
    }
    // A partitioned table reloads through its root; an interrupted reload is resumed.
    let (plan, ids, resumed) = reload::plan(&s.sink, &s.state, &ro, &names(&["p"]))
        .await
        .unwrap();
    assert!(!resumed && ids.len() == 1);
    let (again, _, resumed) = reload::plan(&s.sink, &s.state, &ro, &names(&["p"]))
        .await
        .unwrap();
    assert!(resumed && again.reload == plan.reload, "{again:?}");
    // While it is unfinished CDC lists rows by transaction; after, past its snapshot only.
    let horizon = pgshift::state::records::snapshot_horizon(&s.state, "reload-err")
        .await
        .unwrap();
    assert_eq!(horizon, Some(Lsn(u64::MAX)));
    let report = reload::run_local(
        &s.sink,
        &s.state,
        &ro,
        &names(&["p"]),
        1,
        Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    assert_eq!(report.r0, plan.reload.unwrap());
    let horizon = pgshift::state::records::snapshot_horizon(&s.state, "reload-err")
        .await
        .unwrap();
    assert!(
        horizon.is_some_and(|h| h >= report.r0 && h < Lsn(u64::MAX)),
        "{horizon:?}"
    );
    // An unfinished reload whose columns changed is not resumed (its chunks would fail): it
    // is abandoned for a new one.
    let (old, _, _) = reload::plan(&s.sink, &s.state, &ro, &names(&["c"]))
        .await
        .unwrap();
    c.batch_execute("alter table public.c drop column x")
        .await
        .unwrap();
    let (new, _, resumed) = reload::plan(&s.sink, &s.state, &ro, &names(&["c"]))
        .await
        .unwrap();
    assert!(!resumed && new.reload > old.reload, "{new:?}");
    assert_eq!(new.tables[0].columns, ["id"]);
    let index = pgshift::state::records::reload::get_index(&s.state, "reload-err")
        .await
        .unwrap();
    let status = |r0| {
        index
            .reloads
            .iter()
            .find(|e| e.r0 == r0)
            .map(|e| e.status.clone())
    };
    assert_eq!(status(old.reload).as_deref(), Some("abandoned"));
    assert_eq!(status(new.reload).as_deref(), Some("planned"));
    // Planned right after, with nothing written in between (the flushed position may not
    // move), another reload still gets a position of its own.
    let (next, _, _) = reload::plan(&s.sink, &s.state, &ro, &names(&["p"]))
        .await
        .unwrap();
    assert!(next.reload > new.reload, "{next:?}");
    assert_eq!(next.tables[0].table, "p");
}

/// The command: `full-load --reload` while a writer keeps changing the table, then CDC and
/// apply: the target equals the source; misuses are named errors.
#[tokio::test]
async fn full_load_reload_while_writes_go_on() {
    let source = TestDb::new("cli_reload_src").await;
    let target = TestDb::new("cli_reload_dst").await;
    let c = source.client().await;
    c.batch_execute(SCHEMA).await.unwrap();
    let task = CliTask::new("cli-reload", &source.config(), &target.config());
    let (src, dst) = (task.src.clone(), task.dst.clone());
    let dir = TempDir::new("cli-reload");
    let mapping = |tables: &[&str], name: &str| {
        let rules: Vec<serde_json::Value> = tables
            .iter()
            .enumerate()
            .map(|(i, t)| serde_json::json!({"rule-type": "selection", "rule-id": (i + 1).to_string(),
                "object-locator": {"schema-name": "public", "table-name": t}, "rule-action": "include"}))
            .collect();
        let path = dir.path().join(name);
        std::fs::write(&path, serde_json::json!({ "rules": rules }).to_string()).unwrap();
        path.to_string_lossy().into_owned()
    };
    let (first, all) = (
        mapping(&["acct", "log"], "first.json"),
        mapping(&["acct", "log", "late"], "all.json"),
    );
    let ok = |(code, out, err): (Option<i32>, String, String)| {
        assert_eq!(code, Some(0), "{out}\n{err}");
        out
    };
    ok(task.run(&[
        "full-load",
        "--source",
        &src,
        "--cdc",
        "--tables",
        &first,
        "--chunk-mb",
        "1",
    ]));
    ok(task.run(&["apply", "--target", &dst]));
    target
        .client()
        .await
        .batch_execute("truncate public.acct; insert into public.log values (1, 'dup')")
        .await
        .unwrap();
    // A writer runs through the reload.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (cfg, stop) = (source.config(), stop.clone());
        tokio::spawn(async move {
            let c = pgshift_tests::connect(&cfg).await;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 20 {
                n += 1;
                c.batch_execute(&format!(
                    "update public.acct set v = v + 1 where id % 97 = {m}; insert into public.log values ({m}, 'w'); delete from public.late where id = {n}; insert into public.late values ({k}, 'w')",
                    m = n % 97,
                    k = 5000 + n
                ))
                .await
                .unwrap();
            }
            n
        })
    };
    let args: Vec<String> = [
        "full-load",
        "--source",
        &src,
        "--tables",
        &all,
        "--chunk-mb",
        "1",
        "--parallel",
        "2",
        "--reload",
        "public.acct,public.late",
        "--reload",
        "public.log",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain(task.common().iter().map(|s| (*s).to_owned()))
    .collect();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        pgshift_tests::run_cli(&args)
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    let out = ok(out);
    assert!(
        out.contains("reloaded public.acct, public.late, public.log from"),
        "{out}"
    );
    let (code, status, err) =
        pgshift_tests::run_cli(&["status", "--task", "cli-reload", "--state", &task.state]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        status.contains("reload      public.acct, public.late, public.log from")
            && status.contains(": complete"),
        "{status}"
    );
    ok(task.run(&["cdc", "--source", &src, "--tables", &all, "--once"]));
    let out = ok(task.run(&["apply", "--target", &dst]));
    assert!(
        out.contains("reloaded: public.acct, public.late, public.log"),
        "{out}"
    );
    assert!(writes >= 20);
    assert_same(&source.config(), &target.config()).await;
    // Misuse: named errors, exit 2.
    for (args, want) in [
        (vec!["--reload", "acct"], "schema.table"),
        (vec!["--reload", "public.acct", "--cdc"], "--cdc"),
        (
            vec!["--reload", "public.nope"],
            "not in the task's selection",
        ),
    ] {
        let all_args = [
            &["full-load", "--source", &src, "--tables", &all][..],
            &args[..],
        ]
        .concat();
        let (code, out, err) = task.run(&all_args);
        assert_eq!(code, Some(2), "{args:?}: {out}\n{err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
