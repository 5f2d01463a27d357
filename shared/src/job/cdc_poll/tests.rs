//! The poller over the in-memory seams (no PostgreSQL): the effect order under a crash at
//! every step, split peeks, the deadline. Each runs in milliseconds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::*;
use crate::config::PgConfig;
use crate::source::{MemoryChange, MemorySource, SourceFault, UnreliableSource};
use crate::staging::decode::parse_csv_fields;
use crate::staging::{Crash, MemorySink, UnreliableSink};
use crate::state::records::get_cdc;
use crate::state::unreliable::StoreCrash;
use crate::state::{MemoryStore, UnreliableStore};

fn opts(task: &str) -> CdcOptions {
    let cfg = PgConfig::from_url("postgres://memory@localhost/memory", "source").unwrap();
    let mut o = CdcOptions::new(task, cfg, "owner");
    o.max_batch_changes = 5;
    o.split_min_wal_bytes = 0;
    o
}

fn v(s: &[&str]) -> Vec<Option<String>> {
    s.iter().map(|x| Some((*x).to_owned())).collect()
}

/// Commits a transaction of every kind of change to table `t` (id, n), keeping `model`.
fn workload(src: &MemorySource, t: u32, round: u32, model: &mut BTreeMap<String, String>) {
    let a = format!("{}", round * 10);
    let b = format!("{}", round * 10 + 1);
    let c = format!("{}", round * 10 + 2);
    src.commit(vec![
        MemoryChange::Insert {
            rel: t,
            new: v(&[&a, "1"]),
        },
        MemoryChange::Insert {
            rel: t,
            new: v(&[&b, "1"]),
        },
    ]);
    src.commit(vec![MemoryChange::Update {
        rel: t,
        old: None,
        new: v(&[&a, "2"]),
    }]);
    // A primary-key change and a delete.
    src.commit(vec![
        MemoryChange::Update {
            rel: t,
            old: Some(v(&[&b, "1"])),
            new: v(&[&c, "3"]),
        },
        MemoryChange::Insert {
            rel: t,
            new: v(&["gone", "0"]),
        },
        MemoryChange::Delete {
            rel: t,
            old: v(&["gone", "0"]),
        },
    ]);
    model.insert(a, "2".to_owned());
    model.insert(c, "3".to_owned());
}

/// Replays every committed batch's CSV in manifest order into (id → n).
async fn replay(sink: &MemorySink) -> (BTreeMap<String, String>, usize) {
    let mut model = BTreeMap::new();
    let mut inserts = 0;
    let mut last_end = Lsn::ZERO;
    for key in layout::batch_manifest_keys(sink).await.unwrap() {
        let m: BatchManifest = layout::get_json(sink, &key, "a manifest").await.unwrap();
        assert!(m.start_lsn >= last_end, "{key} overlaps the batch before");
        last_end = m.end_lsn;
        for f in &m.files {
            let body = layout::get_required(sink, &f.key).await.unwrap();
            let mut fields = Vec::new();
            for line in body.split_inclusive(|b| *b == b'\n') {
                parse_csv_fields(line, &mut fields).unwrap();
                let get =
                    |i: usize| String::from_utf8(fields[i].clone().unwrap_or_default()).unwrap();
                match get(0).as_str() {
                    "I" => {
                        inserts += 1;
                        model.insert(get(1), get(2));
                    }
                    "U" => {
                        model.insert(get(1), get(2));
                    }
                    "D" => {
                        model.remove(&get(1));
                    }
                    "T" => model.clear(),
                    other => panic!("op {other}"),
                }
            }
        }
    }
    (model, inserts)
}

async fn checkpoint(state: &MemoryStore, task: &str) -> Lsn {
    get_cdc(state, task)
        .await
        .unwrap()
        .map_or(Lsn::ZERO, |r| r.checkpoint_lsn)
}

#[tokio::test]
async fn a_crash_at_every_step_then_a_rerun_stages_every_change_exactly_once() {
    let src = MemorySource::new();
    let t = src.create_table("public", "t", &[("id", true), ("n", false)]);
    let (sink, state) = (MemorySink::new(), MemoryStore::new());
    let o = opts("crash");
    poll(&src, &sink, &state, &o).await.unwrap();
    let mut model = BTreeMap::new();
    let sinks = [
        Some(Crash::at_object("/cdc/", 0)), // after the peek, before any file
        Some(Crash::at_object("/cdc/", 1)), // after the first file
        Some(Crash::at_object("_manifests/", 0)), // after the files, before the manifest
        None,
        None,
        None,
        None,
    ];
    let stores = [
        None,
        None,
        None,
        // Writes of `cdc`: the lease, its renewal at the peek, then the checkpoint.
        Some(StoreCrash::BeforePut {
            key: "cdc".to_owned(),
            n: 2,
        }), // after the manifest
        Some(StoreCrash::AfterPut {
            key: "cdc".to_owned(),
            n: 2,
        }), // after the checkpoint
        None,
        None,
    ];
    let sources = [
        None,
        None,
        None,
        None,
        None,
        Some(SourceFault::AtAdvance(0)),
        Some(SourceFault::MidPeek(7)),
    ];
    for round in 0..7 {
        workload(&src, t, round as u32, &mut model);
        let before = checkpoint(&state, "crash").await;
        let r = match (&sinks[round], &stores[round], &sources[round]) {
            (Some(c), _, _) => {
                let s = UnreliableSink::new(sink.clone(), c.clone());
                let r = poll(&src, &s, &state, &o).await;
                assert!(s.crashed(), "round {round}: the sink crash was reached");
                r
            }
            (_, Some(c), _) => {
                let s = UnreliableStore::new(state.clone(), c.clone());
                let r = poll(&src, &sink, &s, &o).await;
                assert!(s.crashed(), "round {round}: the store crash was reached");
                r
            }
            (_, _, Some(f)) => {
                poll(
                    &UnreliableSource::new(src.clone(), f.clone()),
                    &sink,
                    &state,
                    &o,
                )
                .await
            }
            _ => unreachable!(),
        };
        assert!(matches!(r, Err(Error::Injected(_))), "round {round}: {r:?}");
        let after = checkpoint(&state, "crash").await;
        assert!(after >= before, "round {round}: the checkpoint went back");
        let manifests = layout::batch_manifest_keys(&sink).await.unwrap();
        let ahead = manifests
            .iter()
            .any(|k| layout::batch_range(k).is_some_and(|(s, _)| s == after));
        match round {
            // Killed before the manifest: nothing past the checkpoint is committed.
            0..=2 => assert!(!ahead && after == before, "round {round}"),
            // Killed between manifest and checkpoint: the manifest is there, the checkpoint not.
            3 => assert!(ahead && after == before, "round {round}"),
            // Killed after the checkpoint, or at the slot advance: it moved.
            4 | 5 => assert!(after > before, "round {round}"),
            // A connection cut mid-peek: wherever it fell.
            _ => {}
        }
        // The rerun (same owner: the dead process's lease is its own).
        let r = poll(&src, &sink, &state, &o).await.unwrap();
        assert_eq!(r.outcome, Outcome::Drained, "round {round}");
        assert_eq!(
            src.confirmed(&r.slot),
            Some(r.checkpoint),
            "slot at the checkpoint"
        );
    }
    let (staged, inserts) = replay(&sink).await;
    assert_eq!(staged, model, "nothing lost, nothing applied twice");
    // Per round: 2 inserts, a key change (D + I) and an insert deleted again.
    assert_eq!(inserts, 7 * 4, "every insert exactly once");
}

#[tokio::test]
async fn a_dead_poller_keeps_its_lease_until_it_expires() {
    let src = MemorySource::new();
    let t = src.create_table("public", "t", &[("id", true), ("n", false)]);
    let (sink, state) = (MemorySink::new(), MemoryStore::new());
    let a = opts("lease");
    poll(&src, &sink, &state, &a).await.unwrap();
    workload(&src, t, 0, &mut BTreeMap::new());
    let dying = UnreliableSink::new(sink.clone(), Crash::at_object("/cdc/", 0));
    assert!(poll(&src, &dying, &state, &a).await.is_err());
    let mut b = a.clone();
    b.owner = "other".to_owned();
    let r = poll(&src, &sink, &state, &b).await.unwrap();
    assert!(
        matches!(&r.outcome, Outcome::LeaseHeld { owner, .. } if owner == "owner"),
        "{r:?}"
    );
    assert!(layout::batch_manifest_keys(&sink).await.unwrap().is_empty());
    let mut expiring = a.clone();
    expiring.lease_ttl = Duration::ZERO;
    let dying = UnreliableSink::new(sink.clone(), Crash::at_object("/cdc/", 0));
    assert!(poll(&src, &dying, &state, &expiring).await.is_err());
    let r = poll(&src, &sink, &state, &b).await.unwrap();
    assert_eq!(r.changes, 7);
}

#[tokio::test]
async fn split_peeks_stage_what_one_session_stages_and_survive_a_failed_second_half() {
    let src = MemorySource::new();
    let t = src.create_table("public", "t", &[("id", true), ("n", false)]);
    let u = src.create_table("public", "u", &[("id", true), ("n", false)]);
    let one = opts("one");
    let two = opts("two");
    let failing = opts("failing");
    let sinks = [MemorySink::new(), MemorySink::new(), MemorySink::new()];
    let state = MemoryStore::new();
    let mut single = one.clone();
    single.peek_sessions = 1;
    for (o, s) in [
        (&single, &sinks[0]),
        (&two, &sinks[1]),
        (&failing, &sinks[2]),
    ] {
        poll(&src, s, &state, o).await.unwrap();
    }
    let mut model = BTreeMap::new();
    for round in 0..6 {
        workload(&src, if round % 2 == 0 { t } else { u }, round, &mut model);
    }
    let r1 = poll(&src, &sinks[0], &state, &single).await.unwrap();
    let r2 = poll(&src, &sinks[1], &state, &two).await.unwrap();
    assert_eq!((r1.split_peeks, r2.split_peeks), (0, 1));
    assert!(
        r2.split_at
            .is_some_and(|at| at > r2.start_checkpoint && at < r2.target)
    );
    let (a, b) = (sinks[0].snapshot(), sinks[1].snapshot());
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        if !ka.starts_with("_manifests/") {
            assert_eq!(va, vb, "{ka}: byte for byte what one session stages");
        }
    }
    // The second session fails: its half is read by the next peek, with one session.
    let broken = UnreliableSource::new(src.clone(), SourceFault::SecondHalf);
    let r = poll(&broken, &sinks[2], &state, &failing).await.unwrap();
    assert_eq!(
        (r.split_peeks, r.outcome.clone()),
        (0, Outcome::Drained),
        "{r:?}"
    );
    assert!(r.peeks >= 2, "{r:?}");
    let (x, _) = replay(&sinks[2]).await;
    let (y, _) = replay(&sinks[0]).await;
    assert_eq!(x, y);
}

/// A stop by commit time in a drain of several batches and a split peek: the transactions
/// committed at or before it are staged (all of them, once), none after; the task rests at
/// that checkpoint without peeking; a later time moves on.
#[tokio::test]
async fn a_stop_by_commit_time_stages_exactly_the_transactions_before_it() {
    let src = MemorySource::new();
    let t = src.create_table("public", "t", &[("id", true), ("n", false)]);
    let sink = MemorySink::new();
    let state = MemoryStore::new();
    let mut o = opts("stoptime");
    poll(&src, &sink, &state, &o).await.unwrap();
    let mut model = BTreeMap::new();
    // The stop falls in the second half of the split (which starts 60% of the way).
    for round in 0..6 {
        workload(&src, t, round, &mut model);
    }
    let (stop, expected) = (src.last_commit_ts(), model.clone());
    let stop_end = src.flush_lsn();
    for round in 6..8 {
        workload(&src, t, round, &mut model);
    }
    o.stop_position = Some(StopPosition::CommitTime(stop));
    let r = poll(&src, &sink, &state, &o).await.unwrap();
    assert_eq!(r.split_peeks, 1, "{r:?}");
    assert_eq!(r.transactions, 18, "{r:?}");
    assert_eq!((r.checkpoint, r.stopped_at), (stop_end, Some(stop_end)));
    assert_eq!(replay(&sink).await.0, expected);
    let rec = get_cdc(&state, "stoptime").await.unwrap().unwrap();
    assert_eq!(
        rec.stop_found.map(|f| (f.commit_time, f.lsn)),
        Some((stop, stop_end))
    );
    // Resting: nothing peeked, nothing staged.
    let again = poll(&src, &sink, &state, &o).await.unwrap();
    assert_eq!(
        (again.peeks, again.changes, again.stopped_at),
        (0, 0, Some(stop_end))
    );
    // A later time: the rest, and no stop reached (nothing committed after it yet).
    o.stop_position = Some(StopPosition::CommitTime(src.last_commit_ts()));
    let rest = poll(&src, &sink, &state, &o).await.unwrap();
    assert_eq!((rest.transactions, rest.stopped_at), (6, None), "{rest:?}");
    assert_eq!(replay(&sink).await.0, model);
}

#[tokio::test]
async fn a_first_half_cut_by_the_change_limit_leaves_the_rest_to_one_session() {
    let src = MemorySource::new();
    let t = src.create_table("public", "t", &[("id", true), ("n", false)]);
    let (sink, state) = (MemorySink::new(), MemoryStore::new());
    let mut o = opts("cut");
    o.max_peek_changes = 20;
    poll(&src, &sink, &state, &o).await.unwrap();
    for i in 0..50 {
        src.commit(vec![MemoryChange::Insert {
            rel: t,
            new: v(&[&i.to_string(), "1"]),
        }]);
    }
    let r = poll(&src, &sink, &state, &o).await.unwrap();
    assert_eq!(r.outcome, Outcome::Drained);
    assert_eq!(r.changes, 50);
    assert_eq!(
        r.split_peeks, 0,
        "the cut first half turns splitting off: {r:?}"
    );
    assert!(r.peeks >= 3, "{r:?}");
    let (staged, inserts) = replay(&sink).await;
    assert_eq!(
        (staged.len(), inserts),
        (50, 50),
        "every change exactly once"
    );
}

#[tokio::test]
async fn a_peek_longer_than_the_time_left_is_cut_and_retried_whole() {
    let src = MemorySource::new();
    let t = src.create_table("public", "t", &[("id", true), ("n", false)]);
    let (sink, state) = (MemorySink::new(), MemoryStore::new());
    let mut o = opts("deadline");
    poll(&src, &sink, &state, &o).await.unwrap();
    let mut model = BTreeMap::new();
    workload(&src, t, 0, &mut model);
    let before = checkpoint(&state, "deadline").await;
    // The server would take 10 minutes; the invocation has 30 s (no margin).
    o.deadline = Some(Instant::now() + Duration::from_secs(30));
    o.safety_margin = Duration::ZERO;
    let slow = UnreliableSource::new(src.clone(), SourceFault::HoldPeek(Duration::from_secs(600)));
    let r = poll(&slow, &sink, &state, &o).await.unwrap();
    assert_eq!(r.outcome, Outcome::DeadlineReached);
    assert_eq!((r.peeks, r.changes), (1, 0));
    assert!(layout::batch_manifest_keys(&sink).await.unwrap().is_empty());
    assert_eq!(
        checkpoint(&state, "deadline").await,
        before,
        "nothing committed"
    );
    o.deadline = None;
    let r = poll(&src, &sink, &state, &o).await.unwrap();
    assert_eq!(r.outcome, Outcome::Drained);
    assert_eq!(replay(&sink).await.0, model);
}

#[tokio::test]
async fn a_lost_slot_is_a_terminal_error_naming_the_remedy() {
    let src = MemorySource::new();
    let (sink, state) = (MemorySink::new(), MemoryStore::new());
    let o = opts("lost");
    let r = poll(&src, &sink, &state, &o).await.unwrap();
    src.drop_slot(&r.slot);
    let err = poll(&src, &sink, &state, &o).await.unwrap_err();
    assert!(matches!(err, Error::SlotLost(_)), "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("start the task over"), "{err}");
}

#[test]
fn emf_names_dms_metrics() {
    let mut report = PollReport::new("t", "s", Outcome::Drained, Lsn(1), Lsn(2));
    report.changes = 5;
    report.rows_staged = 5;
    report.bytes_staged = 10;
    report.slot_retained_bytes = 100;
    report.latency_secs = 1.5;
    let v: serde_json::Value = serde_json::from_str(&emf_line(&report)).unwrap();
    assert_eq!(v["CDCLatencySource"], 1.5);
    assert_eq!(v["CDCIncomingChanges"], 5);
    assert_eq!(
        v["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"],
        "CDCLatencySource"
    );
    // An unknown safe_wal_size is no data point (not -1); a known one is.
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(!names(&v).contains(&"SlotSafeWalSize".to_owned()));
    assert!(v.get("SlotSafeWalSize").is_none());
    assert_eq!(v["CDCRowsStaged"], 5);
    // An idle poll reports latency, incoming changes and retained WAL only.
    let idle = PollReport::new("t", "s", Outcome::Drained, Lsn(1), Lsn(1));
    let v: serde_json::Value = serde_json::from_str(&emf_line(&idle)).unwrap();
    assert_eq!(
        names(&v),
        [
            "CDCLatencySource",
            "CDCIncomingChanges",
            "SlotRetainedBytes"
        ]
    );
    assert_eq!(v["CDCIncomingChanges"], 0);
    report.slot_safe_wal_size = Some(4096);
    let v: serde_json::Value = serde_json::from_str(&emf_line(&report)).unwrap();
    assert!(names(&v).contains(&"SlotSafeWalSize".to_owned()));
    assert_eq!(v["SlotSafeWalSize"], 4096);
}

#[tokio::test]
async fn a_checkpoint_the_slot_cannot_justify_is_a_terminal_error_never_a_loss() {
    let src = MemorySource::new();
    let t = src.create_table("public", "t", &[("id", true), ("n", false)]);
    let (sink, state) = (MemorySink::new(), MemoryStore::new());
    let o = opts("edited");
    let first = poll(&src, &sink, &state, &o).await.unwrap();
    workload(&src, t, 0, &mut BTreeMap::new());
    let edit = |to: Lsn| {
        let state = state.clone();
        async move {
            let v = state.get("edited", "cdc").await.unwrap().unwrap();
            let mut doc = v.doc;
            doc["checkpoint"] = serde_json::json!(to.0);
            doc["checkpoint_lsn"] = serde_json::json!(to.to_string());
            state
                .put("edited", "cdc", &doc, Some(v.version))
                .await
                .unwrap();
        }
    };
    // Moved past changes nobody staged.
    edit(src.flush_lsn()).await;
    let err = poll(&src, &sink, &state, &o).await.unwrap_err();
    assert!(matches!(err, Error::SlotLost(_)), "{err}");
    assert!(err.to_string().contains("3 transactions"), "{err}");
    assert_eq!(
        src.confirmed(&first.slot),
        Some(first.checkpoint),
        "the slot was not advanced"
    );
    // Past the server's WAL.
    edit(Lsn(src.flush_lsn().0 + 0x1000)).await;
    let err = poll(&src, &sink, &state, &o).await.unwrap_err();
    assert!(
        err.to_string().contains("ahead of the server's WAL"),
        "{err}"
    );
    // Put back, the run stages everything.
    edit(first.checkpoint).await;
    let r = poll(&src, &sink, &state, &o).await.unwrap();
    assert_eq!(r.changes, 7);
}

/// Events: every committed batch is announced once, after its checkpoint moved; a put that
/// fails loses no batch and the next poll announces it again (flagged `reannounced`), then
/// carries on; a lost slot is a `Task State Changed`.
#[tokio::test]
async fn batches_are_announced_and_a_failed_put_is_reannounced() {
    use crate::events::{BATCH_COMMITTED, Events, MemoryEvents, TASK_STATE_CHANGED};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    let src = MemorySource::new();
    let t = src.create_table("public", "t", &[("id", true), ("n", false)]);
    let (sink, state) = (MemorySink::new(), MemoryStore::new());
    let bus = Arc::new(MemoryEvents::default());
    let mut o = opts("events");
    o.events = Events::to(bus.clone());
    poll(&src, &sink, &state, &o).await.unwrap();
    let mut model = BTreeMap::new();
    let batches = |bus: &MemoryEvents| -> Vec<(String, bool, Lsn)> {
        bus.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.detail_type == BATCH_COMMITTED)
            .map(|e| {
                (
                    e.detail["manifest_key"].as_str().unwrap().to_owned(),
                    e.detail["reannounced"].as_bool().unwrap(),
                    e.detail["end_lsn"].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect()
    };
    workload(&src, t, 1, &mut model);
    let r = poll(&src, &sink, &state, &o).await.unwrap();
    assert!(!r.batches.is_empty());
    assert_eq!(r.events_put, r.batches.len() as u64);
    let first = batches(&bus);
    assert_eq!(
        first.iter().map(|b| b.0.clone()).collect::<Vec<_>>(),
        r.batches
    );
    assert!(first.iter().all(|b| !b.1));
    // The bus fails: the batches are staged and the checkpoint moves all the same.
    bus.fail.store(true, Ordering::Relaxed);
    workload(&src, t, 2, &mut model);
    let failed = poll(&src, &sink, &state, &o).await.unwrap();
    assert!(!failed.batches.is_empty());
    assert_eq!(failed.events_failed, failed.batches.len() as u64);
    assert_eq!(checkpoint(&state, "events").await, failed.checkpoint);
    // Back: the next poll announces the missed batches first, then its own.
    bus.fail.store(false, Ordering::Relaxed);
    workload(&src, t, 3, &mut model);
    let next = poll(&src, &sink, &state, &o).await.unwrap();
    let all = batches(&bus);
    let again: Vec<String> = all.iter().filter(|b| b.1).map(|b| b.0.clone()).collect();
    assert_eq!(again, failed.batches);
    let fresh: Vec<String> = all[first.len() + again.len()..]
        .iter()
        .map(|b| b.0.clone())
        .collect();
    assert_eq!(fresh, next.batches);
    // Every staged batch announced, in order, and nothing pending.
    let keys = layout::batch_manifest_keys(&sink).await.unwrap();
    assert_eq!(all.iter().map(|b| b.0.clone()).collect::<Vec<_>>(), keys);
    let rec = get_cdc(&state, "events").await.unwrap().unwrap();
    assert_eq!(rec.announced_through, Some(rec.checkpoint_lsn));
    let quiet = poll(&src, &sink, &state, &o).await.unwrap();
    assert_eq!(quiet.events_put, 0);
    // A lost slot: the error, and the event saying so.
    src.drop_slot(&quiet.slot);
    poll(&src, &sink, &state, &o).await.unwrap_err();
    let last = bus.events.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.detail_type, TASK_STATE_CHANGED);
    assert_eq!(last.detail["state"], "SlotLost");
    assert_eq!(last.detail["task"], "events");
}

mod transaction_files;
