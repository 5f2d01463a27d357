//! The CDC poller against a real PostgreSQL, staging to a folder (and to the S3 emulator with
//! state in DynamoDB): what is staged, read back and replayed in order equals the source.

use std::collections::{BTreeMap, HashSet};

use pgshift::config::PgConfig;
use pgshift::error::Error;
use pgshift::job::cdc_poll;
use pgshift::lsn::Lsn;
use pgshift::options::CdcOptions;
use pgshift::source::slot;
use pgshift::staging::ObjectSink;
use pgshift::staging::encode::Format;
use pgshift::staging::{LocalSink, layout};
use pgshift::state::StateStore;
use pgshift::state::records::{Outcome, PollReport};
use pgshift_tests::replay::{self, Table};
use pgshift_tests::{Kill, Staging, TempDir, TestDb, unique_name};

/// Every drain of these tests splits its peek between two sessions (the path of large
/// drains), whatever its size; the CLI and migration tests drain through one session.
fn opts(task: &str, cfg: PgConfig, format: &str) -> CdcOptions {
    let mut o = CdcOptions::new(task, cfg, "test-owner");
    o.format = Format::parse(format, "format").unwrap();
    o.split_min_wal_bytes = 0;
    o
}

async fn poll<S: ObjectSink, St: StateStore>(sink: &S, state: &St, o: &CdcOptions) -> PollReport {
    let r = cdc_poll::run(sink, state, o)
        .await
        .unwrap_or_else(|e| panic!("poll failed: {e}"));
    assert!(matches!(r.outcome, Outcome::Drained), "{r:#?}");
    r
}

async fn check_tables<S: ObjectSink>(
    sink: &S,
    db: &TestDb,
    tables: &[&str],
) -> Vec<replay::Staged> {
    let changes = replay::read_changes(sink).await;
    let mut model = BTreeMap::new();
    replay::apply(&mut model, &changes, "id");
    let c = db.client().await;
    for t in tables {
        let src: Table = replay::source_rows(&c, "public", t, "id").await;
        replay::assert_same(&model, &format!("public.{t}"), &src);
    }
    changes
}

/// The workload of the issue: every kind of change, in several polls, for one format.
async fn every_kind_of_change(format: &str) {
    let Staging {
        db,
        sink,
        state,
        dir: _dir,
    } = Staging::new("cdc_kinds").await;
    let c = db.client().await;
    c.batch_execute(
        "create table public.items (id int primary key, name text, qty int, note text);
         create table public.docs (id int primary key, body text, tag text);
         create table public.docs_full (id int primary key, body text, tag text);
         alter table public.docs_full replica identity full;
         create table public.\"MixedCase\" (id int primary key, v text);",
    )
    .await
    .unwrap();
    // Slots are cluster-wide: one task name per format.
    let task = format!("kinds-{}", format.replace('.', "-"));
    let o = opts(&task, db.config(), format);
    // A CDC-only task: the first poll creates the publication and slot.
    let first = poll(&sink, &state, &o).await;
    assert_eq!(first.changes, 0);

    // Each string is sent on its own, so each explicit transaction is really one.
    for sql in [
        "insert into public.items values (1, 'a', 1, ''), (2, 'b', 2, null), (3, 'c,\"q\"', 3, e'multi\\nline')",
        "begin; insert into public.items values (4, 'd', 4, 'x'); insert into public.\"MixedCase\" values (1, 'm'); commit;",
        "update public.items set qty = qty + 10 where id <= 2",
        "update public.items set id = 20 where id = 2",
        "delete from public.items where id = 1",
        "begin; insert into public.items values (99, 'rolled back', 0, ''); rollback;",
        "begin; insert into public.items values (5, 'kept', 5, ''); savepoint s1; \
         insert into public.items values (6, 'undone', 6, ''); rollback to savepoint s1; \
         insert into public.items values (7, 'after savepoint', 7, ''); commit;",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let big =
        "(select string_agg(md5(g::text || random()::text), '') from generate_series(1, 300) g)";
    c.batch_execute(&format!(
        "insert into public.docs values (1, {big}, 't1'), (2, 'small', 't2');
         insert into public.docs_full values (1, {big}, 't1');"
    ))
    .await
    .unwrap();
    let second = poll(&sink, &state, &o).await;
    assert!(second.changes >= 10, "{second:#?}");

    // TOAST: the tag changes, the large body does not.
    for sql in [
        "update public.docs set tag = 't1b' where id = 1",
        "update public.docs_full set tag = 't1b' where id = 1",
        "alter table public.items add column added text",
        "insert into public.items (id, name, qty, note, added) values (8, 'with added', 8, '', 'new col')",
        "update public.items set added = 'set later' where id = 3",
        "alter table public.items drop column note",
        "insert into public.items (id, name, qty, added) values (9, 'after drop', 9, 'z')",
        "truncate public.\"MixedCase\"",
        "insert into public.\"MixedCase\" values (2, 'after truncate')",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    poll(&sink, &state, &o).await;

    let changes = check_tables(&sink, &db, &["items", "docs", "docs_full", "MixedCase"]).await;
    // Rollbacks and rolled-back savepoints are never staged.
    let ids: HashSet<String> = changes
        .iter()
        .filter_map(|c| {
            c.after
                .as_ref()
                .and_then(|a| a.get("id").cloned().flatten())
        })
        .collect();
    assert!(
        !ids.contains("99") && !ids.contains("6"),
        "rolled-back rows staged"
    );
    // The primary-key update is a delete of the old key and an insert of the new row.
    let pk_moves: Vec<_> = changes
        .iter()
        .filter(|c| c.table == "public.items" && (c.op == "D" || c.op == "I"))
        .filter(|c| {
            c.key
                .as_ref()
                .and_then(|k| k.get("id").cloned().flatten())
                .as_deref()
                == Some("2")
                || c.after
                    .as_ref()
                    .and_then(|a| a.get("id").cloned().flatten())
                    .as_deref()
                    == Some("20")
        })
        .map(|c| c.op.clone())
        .collect();
    assert_eq!(pk_moves, ["D", "I"], "{changes:#?}");
    // Unchanged TOAST: marked for docs (no old row), filled for docs_full.
    let docs_update = changes
        .iter()
        .find(|c| c.table == "public.docs" && c.op == "U")
        .unwrap();
    assert_eq!(docs_update.unchanged, ["body"]);
    assert!(
        !docs_update.after.as_ref().unwrap().contains_key("body"),
        "no placeholder value"
    );
    let full_update = changes
        .iter()
        .find(|c| c.table == "public.docs_full" && c.op == "U")
        .unwrap();
    assert!(full_update.unchanged.is_empty());
    assert_eq!(
        full_update.after.as_ref().unwrap()["body"]
            .as_ref()
            .map(String::len),
        Some(9600)
    );
    // TRUNCATE staged as a record.
    assert!(
        changes
            .iter()
            .any(|c| c.table == "public.MixedCase" && c.op == "T")
    );
    // NULL and empty string stay apart.
    let row2 = changes
        .iter()
        .find(|c| {
            c.table == "public.items"
                && c.op == "I"
                && c.after
                    .as_ref()
                    .unwrap()
                    .get("id")
                    .cloned()
                    .flatten()
                    .as_deref()
                    == Some("1")
        })
        .unwrap();
    assert_eq!(row2.after.as_ref().unwrap()["note"], Some(String::new()));

    // Schema versions: items has three (initial, +added, -note).
    let versions = sink.list("public/items/_schema/").await.unwrap();
    assert_eq!(versions.len(), 3, "{versions:?}");
}

#[tokio::test]
async fn every_kind_of_change_jsonl() {
    every_kind_of_change("jsonl").await;
}

#[tokio::test]
async fn every_kind_of_change_csv_gzip() {
    every_kind_of_change("csv.gz").await;
}

#[tokio::test]
async fn large_transaction_streams_with_bounded_batches() {
    let Staging {
        db,
        sink,
        state,
        dir: _dir,
    } = Staging::new("cdc_big").await;
    let c = db.client().await;
    c.batch_execute("create table public.big (id int primary key, v text)")
        .await
        .unwrap();
    let mut o = opts("big", db.config(), "csv");
    o.max_batch_changes = 50_000;
    poll(&sink, &state, &o).await;
    c.batch_execute(
        "insert into public.big select g, md5(g::text) from generate_series(1, 200000) g",
    )
    .await
    .unwrap();
    c.batch_execute("insert into public.big values (200001, 'after')")
        .await
        .unwrap();
    let r = poll(&sink, &state, &o).await;
    assert_eq!(r.changes, 200_001);
    // A batch never splits a transaction: the 200k-row transaction is one batch despite the
    // 50k cut, and the next transaction starts the next batch.
    let manifests = replay::manifests(&sink).await;
    assert_eq!(manifests.len(), 2);
    assert_eq!(
        (manifests[0].1.transactions, manifests[0].1.changes),
        (1, 200_000)
    );
    assert_eq!(
        (manifests[1].1.transactions, manifests[1].1.changes),
        (1, 1)
    );
    check_tables(&sink, &db, &["big"]).await;
}

#[tokio::test]
async fn batches_cut_at_commit_boundaries() {
    let Staging {
        db,
        sink,
        state,
        dir: _dir,
    } = Staging::new("cdc_cut").await;
    let c = db.client().await;
    c.batch_execute("create table public.t (id int primary key, v int)")
        .await
        .unwrap();
    let mut o = opts("cut", db.config(), "jsonl");
    o.max_batch_changes = 10;
    poll(&sink, &state, &o).await;
    for i in 0..10 {
        c.batch_execute(&format!(
            "insert into public.t select g, g from generate_series({}, {}) g",
            i * 7,
            i * 7 + 6
        ))
        .await
        .unwrap();
    }
    let r = poll(&sink, &state, &o).await;
    assert_eq!(r.changes, 70);
    let manifests = replay::manifests(&sink).await;
    assert_eq!(
        manifests.len(),
        5,
        "10-change cuts of 7-change transactions"
    );
    let mut prev_end = None;
    for (_, m) in &manifests {
        assert_eq!(m.changes, 14);
        if let Some(end) = prev_end {
            assert_eq!(
                m.start_lsn, end,
                "batches chain: each starts where the last ended"
            );
        }
        prev_end = Some(m.end_lsn);
    }
    check_tables(&sink, &db, &["t"]).await;
}

/// Crash at every step boundary, then a normal run: the committed manifests hold every
/// change exactly once.
#[tokio::test]
async fn crash_at_every_step_then_rerun_loses_and_duplicates_nothing() {
    let Staging {
        db,
        sink,
        state,
        dir: _dir,
    } = Staging::new("cdc_crash").await;
    let c = db.client().await;
    c.batch_execute("create table public.a (id int primary key, v int); create table public.b (id int primary key, v int);")
        .await
        .unwrap();
    let mut o = opts("crash", db.config(), "jsonl");
    o.max_batch_changes = 6;
    poll(&sink, &state, &o).await;
    let mut next = 0;
    for fp in [
        Kill::AfterPeek,
        Kill::AfterFirstFile,
        Kill::AfterFiles,
        Kill::AfterManifest,
        Kill::AfterCheckpoint,
    ] {
        for _ in 0..4 {
            c.batch_execute(&format!(
                "begin; insert into public.a values ({n}, 1), ({m}, 1); insert into public.b values ({n}, 1); update public.a set v = v + 1 where id = {n}; commit;",
                n = next,
                m = next + 1
            ))
            .await
            .unwrap();
            next += 2;
        }
        let before = state.get("crash", "cdc").await.unwrap().unwrap().doc["checkpoint"]
            .as_u64()
            .unwrap();
        let err = fp.poll(&sink, &state, &o).await.unwrap_err();
        assert!(matches!(err, Error::Injected(_)), "{fp:?}: {err}");
        let after = state.get("crash", "cdc").await.unwrap().unwrap().doc["checkpoint"]
            .as_u64()
            .unwrap();
        assert!(after >= before, "{fp:?}: checkpoint moved backwards");
        // A rerun by the same owner (the lease was left as a crash leaves it).
        poll(&sink, &state, &o).await;
    }
    let changes = check_tables(&sink, &db, &["a", "b"]).await;
    let inserts_a = changes
        .iter()
        .filter(|c| c.table == "public.a" && c.op == "I")
        .count();
    let inserts_b = changes
        .iter()
        .filter(|c| c.table == "public.b" && c.op == "I")
        .count();
    assert_eq!(inserts_a, next as usize, "every insert exactly once");
    assert_eq!(inserts_b, next as usize / 2);
    // Manifests never overlap (idle stretches between polls leave gaps without changes).
    let manifests = replay::manifests(&sink).await;
    for pair in manifests.windows(2) {
        assert!(
            pair[0].1.end_lsn <= pair[1].1.start_lsn,
            "{:?} then {:?}",
            pair[0].0,
            pair[1].0
        );
    }
}

#[tokio::test]
async fn a_held_lease_stops_a_second_poller_and_checkpoints_never_go_back() {
    let Staging {
        db,
        sink,
        state,
        dir: _dir,
    } = Staging::new("cdc_lease").await;
    let c = db.client().await;
    c.batch_execute("create table public.t (id int primary key)")
        .await
        .unwrap();
    let a = opts("lease", db.config(), "csv");
    poll(&sink, &state, &a).await;
    c.batch_execute("insert into public.t select generate_series(1, 100)")
        .await
        .unwrap();
    // Owner A dies holding the lease.
    assert!(Kill::AfterPeek.poll(&sink, &state, &a).await.is_err());
    let mut b = a.clone();
    b.owner = "other-owner".to_owned();
    let r = cdc_poll::run(&sink, &state, &b).await.unwrap();
    assert!(
        matches!(&r.outcome, Outcome::LeaseHeld { owner, .. } if owner == "test-owner"),
        "{r:#?}"
    );
    assert_eq!(r.changes, 0);
    assert!(replay::manifests(&sink).await.is_empty());

    // Once it expires, B takes over.
    let mut expiring = a.clone();
    expiring.lease_ttl = std::time::Duration::ZERO;
    assert!(
        Kill::AfterPeek
            .poll(&sink, &state, &expiring)
            .await
            .is_err()
    );
    let r = poll(&sink, &state, &b).await;
    assert_eq!(r.changes, 100);

    // Two pollers racing, many times: never an error other than a held lease, never a
    // checkpoint that goes back, every row exactly once.
    let mut last = Lsn::ZERO;
    for round in 0..6 {
        c.batch_execute(&format!(
            "insert into public.t select generate_series({}, {})",
            1000 + round * 50,
            1049 + round * 50
        ))
        .await
        .unwrap();
        let (ra, rb) = tokio::join!(
            cdc_poll::run(&sink, &state, &a),
            cdc_poll::run(&sink, &state, &b)
        );
        for r in [ra, rb] {
            let r = r.unwrap_or_else(|e| panic!("racing poller failed: {e}"));
            if !matches!(r.outcome, Outcome::LeaseHeld { .. }) {
                assert!(r.checkpoint >= last, "checkpoint went back");
                last = r.checkpoint;
            }
        }
    }
    poll(&sink, &state, &a).await;
    let changes = check_tables(&sink, &db, &["t"]).await;
    assert_eq!(changes.len(), 100 + 6 * 50);
}

/// The changes of a table, in the order staged (which batch they came in aside).
fn per_table(changes: &[replay::Staged]) -> BTreeMap<String, Vec<replay::Staged>> {
    let mut out: BTreeMap<String, Vec<replay::Staged>> = BTreeMap::new();
    for c in changes {
        let mut c = c.clone();
        c.manifest.clear();
        out.entry(c.table.clone()).or_default().push(c);
    }
    out
}

/// Every staged object but the manifests (which name their task), by key, the batch's
/// start checkpoint in keys written as `START`.
async fn staged_objects(
    sink: &pgshift::staging::LocalSink,
    start_hex: &str,
) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for key in sink.list("").await.unwrap() {
        if !key.starts_with("_manifests/") {
            let body = sink.get(&key).await.unwrap().unwrap();
            out.insert(key.replace(start_hex, "START"), body.to_vec());
        }
    }
    out
}

/// The same keys with the same bytes; a difference is shown as its first differing line.
fn assert_same_objects(left: &BTreeMap<String, Vec<u8>>, right: &BTreeMap<String, Vec<u8>>) {
    assert_eq!(
        left.keys().collect::<Vec<_>>(),
        right.keys().collect::<Vec<_>>()
    );
    for (key, l) in left {
        let r = &right[key];
        if l != r {
            let (l, r) = (String::from_utf8_lossy(l), String::from_utf8_lossy(r));
            let (n, (a, b)) = l
                .lines()
                .zip(r.lines())
                .enumerate()
                .find(|(_, (a, b))| a != b)
                .unwrap_or((0, ("<length differs>", "")));
            panic!("{key} differs at line {}:\n  {a}\n  {b}", n + 1);
        }
    }
}

/// Two sessions decoding halves of one drain stage exactly what one session stages: the
/// same objects byte for byte, a transaction that spans the split point once, schema
/// versions at the same places. When the second session fails, the run goes on with one.
#[tokio::test]
async fn a_split_peek_stages_exactly_what_one_session_stages() {
    let dir = TempDir::new("cdc_split");
    let db = TestDb::new("cdc_split").await;
    let c = db.client().await;
    c.batch_execute(
        "create table public.a (id int primary key, v text);
         create table public.b (id int primary key, n int, body text);
         alter table public.b replica identity full;
         insert into public.b select g, g, repeat(md5(g::text), 300) from generate_series(1, 20) g;",
    )
    .await
    .unwrap();
    let seams = |name: &str| {
        (
            pgshift::staging::LocalSink::new(dir.path().join(name).join("stage")),
            pgshift::state::FileStore::new(dir.path().join(name).join("state")),
        )
    };
    let (one_sink, one_state) = seams("one");
    let (two_sink, two_state) = seams("two");
    let (fail_sink, fail_state) = seams("fail");
    // Three tasks on one database: each task's trigger would send its own schema-change
    // message (at its own position, so in versions keyed apart); the column added below is
    // explained from the catalog instead, at the Relation message all three see alike.
    let mut one = opts("split-one", db.config(), "jsonl");
    one.peek_sessions = 1;
    one.capture_ddl = false;
    let mut two = opts("split-two", db.config(), "jsonl");
    two.capture_ddl = false;
    let mut fail = opts("split-fail", db.config(), "jsonl");
    fail.capture_ddl = false;
    poll(&one_sink, &one_state, &one).await;
    poll(&two_sink, &two_state, &two).await;
    poll(&fail_sink, &fail_state, &fail).await;

    // Open for the whole workload: its first rows come long before the split point, its
    // commit after it.
    let long = db.client().await;
    long.batch_execute("begin; insert into public.b values (21, 0, 'long-lived')")
        .await
        .unwrap();
    for i in 1..=1200 {
        let mut sql = format!(
            "insert into public.a values ({i}, (select string_agg(md5(g::text || '-{i}'), '') from generate_series(1, 50) g)); update public.b set n = n + {i} where id = {};",
            i % 20 + 1
        );
        if i % 7 == 0 {
            sql.push_str(&format!("delete from public.a where id = {};", i - 3));
        }
        if i % 11 == 0 {
            sql.push_str(&format!(
                "update public.a set id = id + 100000 where id = {};",
                i - 1
            ));
        }
        if i == 600 {
            sql.push_str("alter table public.a add column w int;");
        }
        if i > 600 {
            sql.push_str(&format!("update public.a set w = {i} where id = {i};"));
        }
        c.batch_execute(&format!("begin; {sql} commit;"))
            .await
            .unwrap();
    }
    long.batch_execute("insert into public.b values (22, 0, 'last of the long one'); commit")
        .await
        .unwrap();

    // The split run first: its drain ends nearest the workload's end (other tests' WAL after
    // it would move the split point past the last commit).
    let r2 = poll(&two_sink, &two_state, &two).await;
    let r1 = poll(&one_sink, &one_state, &one).await;
    // The second session fails (a source fault): the run goes on with one session.
    let broken = pgshift::source::UnreliableSource::new(
        pgshift::source::PgSource::connect(&fail.source)
            .await
            .unwrap(),
        pgshift::source::SourceFault::SecondHalf,
    );
    let r3 = cdc_poll::poll(&broken, &fail_sink, &fail_state, &fail)
        .await
        .unwrap();
    assert_eq!((r1.peeks, r1.split_peeks), (1, 0), "{r1:#?}");
    assert_eq!((r2.peeks, r2.split_peeks), (1, 1), "{r2:#?}");
    assert_eq!(
        (r3.peeks, r3.split_peeks),
        (2, 0),
        "a failed second session: a second peek with one session finishes the drain: {r3:#?}"
    );
    assert!(r1.changes > 650, "{r1:#?}");
    assert_eq!(r1.changes, r2.changes);
    assert_eq!(r1.changes, r3.changes);

    // The split point falls among the drained transactions: both sessions staged some.
    let at = r2.split_at.expect("split point reported");
    let two_manifests = replay::manifests(&two_sink).await;
    assert_eq!(two_manifests.len(), 1);
    let m = &two_manifests[0].1;
    assert!(
        m.first_commit_lsn < at && at <= m.last_commit_lsn,
        "split at {at}, commits {}..{}",
        m.first_commit_lsn,
        m.last_commit_lsn
    );
    // Byte for byte what one session staged (data files and schema versions), and the same
    // manifest, but for the task's name and the start checkpoint (each task's first poll
    // ended at its own flush position) that names the batch's files.
    let mut one_manifests = replay::manifests(&one_sink).await;
    assert_eq!(one_manifests.len(), 1);
    let one_m = &mut one_manifests[0].1;
    let (one_start, two_start) = (one_m.start_lsn.key_hex(), m.start_lsn.key_hex());
    let one_objects = staged_objects(&one_sink, &one_start).await;
    assert!(one_objects.keys().any(|k| k.contains("_schema/")));
    assert_same_objects(&one_objects, &staged_objects(&two_sink, &two_start).await);
    one_m.task = m.task.clone();
    one_m.start_lsn = m.start_lsn;
    for f in &mut one_m.files {
        f.key = f.key.replace(&one_start, &two_start);
    }
    assert_eq!(one_m, m);

    // The fallback staged the same changes, in the same order per table, and every table
    // replays to the source.
    let one_changes = check_tables(&one_sink, &db, &["a", "b"]).await;
    let two_changes = check_tables(&two_sink, &db, &["a", "b"]).await;
    let fail_changes = check_tables(&fail_sink, &db, &["a", "b"]).await;
    assert_eq!(per_table(&one_changes), per_table(&two_changes));
    assert_eq!(per_table(&one_changes), per_table(&fail_changes));
    let long_lived = one_changes
        .iter()
        .filter(|s| {
            s.after
                .as_ref()
                .and_then(|r| r.get("body").cloned().flatten())
                .as_deref()
                == Some("long-lived")
        })
        .count();
    assert_eq!(
        long_lived, 1,
        "the transaction across the split point is staged once"
    );

    // The temporary copies go with their sessions: no slot is left to pin WAL.
    let mut left = -1i64;
    for _ in 0..100 {
        left = c
            .query_one(
                r"select count(*) from pg_replication_slots
                  where database = current_database() and slot_name like 'pgshift\_\_split\_%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "temporary slot copies left behind");
}

/// A backlog larger than one peek: the first half is cut by `upto_nchanges`, so its second
/// half is cancelled and the rest is drained by one session, every change exactly once.
#[tokio::test]
async fn a_first_half_cut_by_the_change_limit_drains_the_rest_with_one_session() {
    let Staging {
        db,
        sink,
        state,
        dir: _dir,
    } = Staging::new("cdc_split_cut").await;
    let c = db.client().await;
    c.batch_execute("create table public.t (id int primary key, v int)")
        .await
        .unwrap();
    let mut o = opts("split-cut", db.config(), "csv");
    o.max_peek_changes = 200;
    poll(&sink, &state, &o).await;
    for i in 0..100 {
        c.batch_execute(&format!(
            "insert into public.t select g, g from generate_series({}, {}) g",
            i * 10,
            i * 10 + 9
        ))
        .await
        .unwrap();
    }
    let r = poll(&sink, &state, &o).await;
    assert_eq!(r.changes, 1000);
    // WAL is cluster-wide: other tests' writes can put the split point before these changes,
    // so the first half is not always the one cut (the exact path is the job test
    // `a_first_half_cut_by_the_change_limit_leaves_the_rest_to_one_session`).
    assert!(r.split_peeks <= 1, "{r:#?}");
    assert!(r.peeks >= 5, "200-change peeks of 1000 changes: {r:#?}");
    let changes = check_tables(&sink, &db, &["t"]).await;
    assert_eq!(changes.len(), 1000);
}

#[tokio::test]
async fn idle_slot_keeps_advancing_while_other_databases_write() {
    let Staging {
        db,
        sink,
        state,
        dir: _dir,
    } = Staging::new("cdc_idle").await;
    let other = TestDb::new("cdc_busy").await;
    db.client()
        .await
        .batch_execute("create table public.t (id int primary key)")
        .await
        .unwrap();
    let o = opts("idle", db.config(), "csv");
    poll(&sink, &state, &o).await;
    let busy = other.client().await;
    busy.batch_execute("create table public.noise (id serial primary key, v text)")
        .await
        .unwrap();
    let admin = db.client().await;
    let slot_name = pgshift::config::slot_name("idle");
    let first = slot::slot_state(&admin, &slot_name).await.unwrap().unwrap();
    let mut prev = first.clone();
    for _ in 0..3 {
        busy.batch_execute("insert into public.noise (v) select md5(g::text) from generate_series(1, 2000) g; checkpoint;")
            .await
            .unwrap();
        let r = poll(&sink, &state, &o).await;
        assert_eq!(r.changes, 0);
        assert_eq!(
            r.checkpoint, r.target,
            "an idle drain moves to the flush position"
        );
        let now = slot::slot_state(&admin, &slot_name).await.unwrap().unwrap();
        assert!(
            now.confirmed_flush_lsn > prev.confirmed_flush_lsn,
            "{prev:?} -> {now:?}"
        );
        prev = now;
    }
    assert!(
        prev.restart_lsn > first.restart_lsn,
        "restart_lsn must move too: {first:?} -> {prev:?}"
    );
    assert!(
        replay::manifests(&sink).await.is_empty(),
        "nothing staged for other databases"
    );
}

#[tokio::test]
async fn a_dropped_slot_is_a_clear_terminal_error() {
    let Staging {
        db,
        sink,
        state,
        dir: _dir,
    } = Staging::new("cdc_lost").await;
    db.client()
        .await
        .batch_execute("create table public.t (id int primary key)")
        .await
        .unwrap();
    let o = opts("lost", db.config(), "csv");
    poll(&sink, &state, &o).await;
    db.client()
        .await
        .batch_execute(&format!(
            "select pg_drop_replication_slot('{}')",
            pgshift::config::slot_name("lost")
        ))
        .await
        .unwrap();
    let err = cdc_poll::run(&sink, &state, &o).await.unwrap_err();
    assert!(!err.is_transient());
    assert!(err.to_string().contains("start the task over"), "{err}");
}

#[tokio::test]
async fn cdc_to_s3_with_state_in_dynamodb() {
    let _ = pgshift_tests::env("AWS_ENDPOINT_URL");
    let aws = pgshift::aws::Aws::from_env().await;
    let bucket = pgshift_tests::emulator_bucket(&aws, "pgshift-cdc").await;
    let sink = pgshift::staging::S3Sink::new(aws.s3(), &format!("s3://{bucket}/staged")).unwrap();
    let table = unique_name("pgshift-state");
    let state = pgshift::state::DynamoStore::new(aws.dynamodb(), &table);
    state.ensure_table().await.unwrap();

    let db = TestDb::new("cdc_s3").await;
    let c = db.client().await;
    c.batch_execute("create table public.t (id int primary key, v text); alter table public.t replica identity full;")
        .await
        .unwrap();
    let mut o = opts("s3", db.config(), "jsonl.gz");
    o.max_batch_changes = 100;
    // PreserveTransactions too: its files in S3, its name's time in the DynamoDB item.
    o.cdc_path = Some("txn".to_owned());
    poll(&sink, &state, &o).await;
    c.batch_execute(
        "insert into public.t select g, md5(g::text) from generate_series(1, 300) g;
         update public.t set v = 'u' where id % 3 = 0;
         update public.t set id = id + 1000 where id % 5 = 0;
         delete from public.t where id % 7 = 0;",
    )
    .await
    .unwrap();
    poll(&sink, &state, &o).await;
    // A crash after the manifest, then a rerun: the same manifest is committed, no duplicate.
    c.batch_execute("insert into public.t select g, 'late' from generate_series(5000, 5099) g")
        .await
        .unwrap();
    assert!(Kill::AfterManifest.poll(&sink, &state, &o).await.is_err());
    poll(&sink, &state, &o).await;
    check_tables(&sink, &db, &["t"]).await;
    let doc = state.get("s3", "cdc").await.unwrap().unwrap().doc;
    assert!(
        doc["checkpoint"].is_u64(),
        "the checkpoint is a DynamoDB number: {doc}"
    );
    assert!(doc["lease_owner"].is_null(), "the lease is released");
    // One transaction file per committed batch (the crashed batch's rewritten, no stray),
    // CSV gzipped whatever the format, holding every change.
    let (mut listed, mut changes, mut last_ms) = (Vec::new(), 0, None);
    for key in layout::batch_manifest_keys(&sink).await.unwrap() {
        let m: layout::BatchManifest = layout::get_json(&sink, &key, "manifest").await.unwrap();
        let t = m.transaction_file.expect("a transaction file per batch");
        assert!(t.key.ends_with(".csv.gz") && t.rows == m.changes, "{t:?}");
        let body = replay::gunzip(&sink.get(&t.key).await.unwrap().unwrap());
        assert_eq!(body.iter().filter(|b| **b == b'\n').count() as u64, t.rows);
        changes += t.rows;
        last_ms = Some(t.unix_ms);
        listed.push(t.key);
    }
    let mut stored = sink.list("txn/").await.unwrap();
    stored.sort();
    assert_eq!(stored, listed);
    assert!(changes >= 400, "{changes}");
    assert_eq!(doc["txn_file_ms"].as_i64(), last_ms, "{doc}");
}

#[tokio::test]
async fn cli_cdc_once_stages_and_reports() {
    let db = TestDb::new("cdc_cli").await;
    let dir = TempDir::new("cdc_cli");
    let c = db.client().await;
    c.batch_execute("create table public.t (id int primary key, v text)")
        .await
        .unwrap();
    let url = pgshift_tests::url(&db.config());
    let stage = dir.path().join("stage");
    let state = dir.path().join("state");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "cdc",
            "--task",
            "cli-task",
            "--source",
            &url,
            "--stage",
            stage.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        std::process::Command::new(pgshift_tests::pgshift_bin())
            .args(&args)
            .output()
            .unwrap()
    };
    let out = run(&["--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.batch_execute("insert into public.t values (1, 'x'), (2, 'y')")
        .await
        .unwrap();
    let out = run(&["--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: PollReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report.changes, 2);
    let staged = std::fs::read_to_string(stage.join(format!(
        "public/t/cdc/{}.csv",
        report.start_checkpoint.key_hex()
    )))
    .unwrap();
    assert_eq!(staged, "I,1,x,\nI,2,y,\n");

    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2), "--once or --follow is required");
    for bad in ["0", "3"] {
        let out = run(&["--once", "--peek-sessions", bad]);
        assert_eq!(out.status.code(), Some(2), "--peek-sessions {bad}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--peek-sessions"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = std::process::Command::new(pgshift_tests::pgshift_bin())
        .args(["cdc", "--task", "Bad_Name", "--source", &url, "--once"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("task"));
}

/// The CLI on the AWS seams: staged to S3 and checkpointed in DynamoDB (the emulator).
#[tokio::test]
async fn cli_cdc_stages_to_s3_with_state_in_dynamodb() {
    let endpoint = pgshift_tests::env("AWS_ENDPOINT_URL");
    let aws = pgshift::aws::Aws::from_env().await;
    let bucket = pgshift_tests::emulator_bucket(&aws, "pgshift-cli").await;
    let table = unique_name("pgshift-cli");
    let db = TestDb::new("cdc_cli_aws").await;
    let c = db.client().await;
    c.batch_execute("create table public.t (id int primary key, v text)")
        .await
        .unwrap();
    let url = pgshift_tests::url(&db.config());
    let (stage, state) = (format!("s3://{bucket}/cli"), format!("dynamodb://{table}"));
    let run = || {
        std::process::Command::new(pgshift_tests::pgshift_bin())
            .args([
                "cdc", "--task", "cli-aws", "--source", &url, "--stage", &stage, "--state", &state,
                "--once", "--json",
            ])
            .env("AWS_ENDPOINT_URL", &endpoint)
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.batch_execute("insert into public.t values (1, 'x'), (2, 'y')")
        .await
        .unwrap();
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: PollReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report.changes, 2);
    let sink = pgshift::staging::S3Sink::new(aws.s3(), &stage).unwrap();
    let staged = sink
        .get(&format!(
            "public/t/cdc/{}.csv",
            report.start_checkpoint.key_hex()
        ))
        .await
        .unwrap()
        .expect("the batch file is in S3");
    assert_eq!(&staged[..], b"I,1,x,\nI,2,y,\n");
    let store = pgshift::state::DynamoStore::new(aws.dynamodb(), &table);
    let doc = store.get("cli-aws", "cdc").await.unwrap().unwrap().doc;
    assert_eq!(doc["checkpoint_lsn"], report.checkpoint.to_string());
}

/// DMS's `CdcInsertsOnly` / `CdcInsertsAndUpdates` (S3Settings): only those changes are
/// staged — an update of the key as one `U` of the new row, as DMS writes it; without
/// `IncludeOpForFullLoad` the CSV rows have no `Op` field, with it they do; the manifest and
/// the schema version say so, and `apply` refuses such a stage by name.
#[tokio::test]
async fn filtered_cdc_stages_inserts_and_updates_as_dms_writes_them() {
    use pgshift::staging::layout::CdcOps;
    let Staging {
        db,
        sink: _,
        state,
        dir,
    } = Staging::new("cdc_filtered").await;
    let c = db.client().await;
    c.batch_execute("create table public.e (id int primary key, v text)")
        .await
        .unwrap();
    let mut inserts = opts("ins-only", db.config(), "csv");
    inserts.cdc_ops = CdcOps::InsertsOnly;
    let mut upserts = opts("ins-upd", db.config(), "csv");
    upserts.cdc_ops = CdcOps::InsertsAndUpdates;
    upserts.load_op_column = true;
    // Two CDC-only tasks over one stage: their slots made before the workload.
    let stage_a = LocalSink::new(dir.path().join("a"));
    let stage_b = LocalSink::new(dir.path().join("b"));
    poll(&stage_a, &state, &inserts).await;
    poll(&stage_b, &state, &upserts).await;
    for sql in [
        "insert into public.e values (1, 'a'), (2, 'b')",
        "update public.e set v = 'c' where id = 1",
        "update public.e set id = 3 where id = 2",
        "delete from public.e where id = 1",
        "truncate public.e",
        "insert into public.e values (4, 'd')",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
    let state = &state;
    let staged = |sink: LocalSink, o: CdcOptions| async move {
        let r = poll(&sink, state, &o).await;
        let file = format!("public/e/cdc/{}.csv", r.start_checkpoint.key_hex());
        let body = sink.get(&file).await.unwrap().expect("the batch file");
        let key = layout::batch_manifest_keys(&sink).await.unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&sink.get(key.last().unwrap()).await.unwrap().unwrap()).unwrap();
        let versions = sink.list("public/e/_schema/").await.unwrap();
        let version: serde_json::Value =
            serde_json::from_slice(&sink.get(versions.last().unwrap()).await.unwrap().unwrap())
                .unwrap();
        (String::from_utf8(body.to_vec()).unwrap(), manifest, version)
    };
    let (rows, manifest, version) = staged(stage_a.clone(), inserts.clone()).await;
    assert_eq!(rows, "1,a,\n2,b,\n4,d,\n");
    assert_eq!(manifest["cdc_ops"], "inserts-only");
    assert_eq!(manifest["op_field"], false);
    assert_eq!(
        version["csv_cdc_layout"],
        serde_json::json!(["id", "v", "unchanged_toast"])
    );
    let (rows, manifest, version) = staged(stage_b, upserts).await;
    assert_eq!(rows, "I,1,a,\nI,2,b,\nU,1,c,\nU,3,b,\nI,4,d,\n");
    assert_eq!(manifest["cdc_ops"], "inserts-and-updates");
    assert!(manifest.get("op_field").is_none(), "{manifest}");
    assert_eq!(
        version["csv_cdc_layout"],
        serde_json::json!(["Op", "id", "v", "unchanged_toast"])
    );

    let target = pgshift_tests::TestDb::new("cdc_filtered_dst").await;
    let err = pgshift::job::apply::run(&stage_a, &target.config(), "ins-only")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("S3Settings.CdcInsertsOnly"), "{err}");
}

/// DMS's `DatePartitionEnabled`: CDC files go to date folders by their transaction's commit
/// date (UTC), the manifest lists them there, and `apply` finds them through it.
#[tokio::test]
async fn date_partitioned_cdc_files_are_in_commit_date_folders_and_apply() {
    use pgshift::staging::layout::{DatePartition, DateSequence};
    let s = Staging::new("cdc_dated").await;
    let c = s.db.client().await;
    c.batch_execute("create table public.d (id int primary key, v text)")
        .await
        .unwrap();
    let mut o = opts("dated", s.db.config(), "csv");
    o.date_partition = Some(DatePartition {
        sequence: DateSequence::Yyyymmdd,
        delimiter: "/",
    });
    poll(&s.sink, &s.state, &o).await;
    c.batch_execute(
        "insert into public.d select g, 'v' || g from generate_series(1, 50) g;
         update public.d set v = 'changed' where id <= 10;
         delete from public.d where id > 45",
    )
    .await
    .unwrap();
    let r = poll(&s.sink, &s.state, &o).await;
    assert!(r.changes >= 65, "{r:#?}");
    let keys = layout::batch_manifest_keys(&s.sink).await.unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&s.sink.get(keys.last().unwrap()).await.unwrap().unwrap()).unwrap();
    // The commit date as the manifest gives it (RFC 3339, UTC): 2026-12-02T.. -> 2026/12/02.
    let date = manifest["last_commit_ts"].as_str().unwrap()[..10].replace('-', "/");
    let want = format!("public/d/cdc/{date}/{}.csv", r.start_checkpoint.key_hex());
    assert_eq!(manifest["files"][0]["key"], want.as_str(), "{manifest}");
    assert!(s.sink.get(&want).await.unwrap().is_some(), "{want}");

    let target = TestDb::new("cdc_dated_dst").await;
    let applied = pgshift::job::apply::run(&s.sink, &target.config(), "dated")
        .await
        .unwrap();
    assert_eq!(applied.batches_applied, 1, "{applied:?}");
    let rows: Vec<(i32, String)> = target
        .client()
        .await
        .query("select id, v from public.d order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.len(), 45);
    assert_eq!(rows[0], (1, "changed".to_owned()));
    assert_eq!(rows[44], (45, "v45".to_owned()));
}

/// DMS's `PreserveTransactions` with `CdcPath`: each batch also writes one transaction file,
/// `<CdcPath>/CDC_TXN-<yyyyMMddHHmmssSSS>.csv`, whose rows are every table's changes in
/// commit order (not begin order), each naming its table and schema after `Op`; CSV whatever
/// the data format, gzip with it. The tables' own files and manifests are as without it.
#[tokio::test]
async fn transaction_files_list_every_tables_changes_in_commit_order() {
    let s = Staging::new("cdc_txnfiles").await;
    let c = s.db.client().await;
    c.batch_execute(
        "create schema sales;
         create table public.orders (id int primary key, note text, big text);
         create table sales.\"Items\" (order_id int, line int, qty numeric,
             primary key (order_id, line));
         alter table public.orders alter column big set storage external",
    )
    .await
    .unwrap();
    let mut o = opts("txnfiles", s.db.config(), "csv.gz");
    o.cdc_path = Some("txn/all".to_owned());
    let mut p = opts("txnparquet", s.db.config(), "parquet");
    p.cdc_path = Some("ptxn".to_owned());
    // A CSV dialect shapes the transaction file only: the tables' files stay Parquet.
    p.csv_dialect =
        pgshift::staging::dialect::CsvDialect::new("|", "", "\n", |k: &str| k.to_owned()).unwrap();
    let parquet_stage = LocalSink::new(s.dir.path().join("parquet"));
    poll(&s.sink, &s.state, &o).await;
    poll(&parquet_stage, &s.state, &p).await;

    // A begins first and commits last: the files list B's changes before A's.
    let other = s.db.client().await;
    c.batch_execute(
        "begin; insert into public.orders values (1, 'a, \"quoted\"', repeat('x', 10000))",
    )
    .await
    .unwrap();
    other
        .batch_execute(
            "begin; insert into sales.\"Items\" values (7, 1, 2.50), (7, 2, null);
             insert into public.orders values (7, null, null); commit",
        )
        .await
        .unwrap();
    c.batch_execute(
        "update sales.\"Items\" set qty = 3 where order_id = 7 and line = 2;
         commit;
         update public.orders set note = 'b' where id = 1;
         begin; delete from public.orders where id = 7; update sales.\"Items\" set line = 9
             where line = 1; commit;
         truncate sales.\"Items\"",
    )
    .await
    .unwrap();
    // Fields joined by `|`, NULL as `∅`, the 10,000-character value by its start.
    let expected = [
        "I|Items|sales|7|1|2.50|∅",
        "I|Items|sales|7|2|∅|∅",
        "I|orders|public|7|∅|∅|∅",
        "I|orders|public|1|a, \"quoted\"|xxxx…|∅",
        "U|Items|sales|7|2|3|∅",
        // The unchanged TOAST value is left out and its ordinal listed, as in the table's file.
        "U|orders|public|1|b|∅|3",
        "D|orders|public|7|∅|∅|∅",
        // A key change: D of the old key (its key columns: replica identity default), I of
        // the new row.
        "D|Items|sales|7|1|∅|∅",
        "I|Items|sales|7|9|2.50|∅",
        "T|Items|sales|∅|∅|∅|∅",
    ];
    for (sink, opts, ext) in [(&s.sink, &o, "csv.gz"), (&parquet_stage, &p, "csv")] {
        let r = poll(sink, &s.state, opts).await;
        assert_eq!(r.changes, 10, "{r:#?}");
        let folder = opts.cdc_path.clone().unwrap();
        let keys = sink.list(&format!("{folder}/")).await.unwrap();
        assert_eq!(keys.len(), 1, "one batch, one file: {keys:?}");
        let name = keys[0].strip_prefix(&format!("{folder}/CDC_TXN-")).unwrap();
        assert_eq!(name.len(), 18 + ext.len(), "{name}");
        assert!(
            name[..17].bytes().all(|b| b.is_ascii_digit()) && name.ends_with(ext),
            "{name}"
        );
        let manifests = layout::batch_manifest_keys(sink).await.unwrap();
        let m: layout::BatchManifest =
            layout::get_json(sink, manifests.last().unwrap(), "manifest")
                .await
                .unwrap();
        let t = m.transaction_file.as_ref().expect("the manifest lists it");
        assert_eq!((t.key.as_str(), t.rows), (keys[0].as_str(), 10));
        // Named by the first transaction's commit time (the manifest's time is the last's).
        assert!(
            name[..8] <= m.last_commit_ts.replace('-', "")[..8],
            "{name} {m:?}"
        );
        let body = sink.get(&keys[0]).await.unwrap().unwrap();
        if opts.format.encoding == pgshift::staging::encode::Encoding::Parquet {
            let text = String::from_utf8(body.to_vec()).unwrap();
            assert_eq!(text.lines().count(), 10, "{text}");
            assert!(text.starts_with("I|Items|sales|7|1|2.50|\n"), "{text}");
            assert_eq!(m.files.len(), 2, "{m:?}");
            for f in &m.files {
                let body = sink.get(&f.key).await.unwrap().unwrap();
                assert!(
                    body.starts_with(b"PAR1") && body.ends_with(b"PAR1"),
                    "{} is Parquet",
                    f.key
                );
            }
            continue;
        }
        let body = if ext.ends_with(".gz") {
            replay::gunzip(&body)
        } else {
            body.to_vec()
        };
        let mut rows = Vec::new();
        let mut fields = Vec::new();
        for line in body.split_inclusive(|b| *b == b'\n') {
            pgshift::staging::decode::parse_csv_fields(line, &mut fields).unwrap();
            let shown: Vec<String> = fields
                .iter()
                .map(|f| match f.as_deref().map(String::from_utf8_lossy) {
                    None => "∅".to_owned(),
                    Some(v) if v.len() > 100 => format!("{}…", &v[..4]),
                    Some(v) => v.into_owned(),
                })
                .collect();
            rows.push(shown.join("|"));
        }
        assert_eq!(rows, expected);
        // The tables' own files are still there, as the manifest lists them.
        assert_eq!(m.files.len(), 2, "{m:?}");
    }
}
