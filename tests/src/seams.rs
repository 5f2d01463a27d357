//! The seams against the emulator (S3 multipart, DynamoDB conditional writes) and the poller's
//! deadline over the in-memory seams.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pgshift::aws::Aws;
use pgshift::error::Error;
use pgshift::job::cdc_poll;
use pgshift::options::CdcOptions;
use pgshift::source::{CdcSource, PeekRequest, PeekStream, PgSource};
use pgshift::staging::{MemorySink, ObjectSink, ObjectWriter, S3Sink};
use pgshift::state::records::Outcome;
use pgshift::state::{DynamoStore, MemoryStore, StateStore};
use pgshift_tests::{TestDb, env, unique_name};

async fn bucket(aws: &Aws) -> String {
    pgshift_tests::emulator_bucket(aws, "pgshift-seam").await
}

#[tokio::test]
async fn s3_multipart_upload_round_trips_and_abort_leaves_nothing() {
    let _ = env("AWS_ENDPOINT_URL");
    let aws = Aws::from_env().await;
    let bucket = bucket(&aws).await;
    let sink = S3Sink::new(aws.s3(), &format!("s3://{bucket}/p/q"))
        .unwrap()
        .with_part_size(5 << 20);
    // 12 MiB in uneven writes: three parts (5 + 5 + 2 MiB).
    let data: Vec<u8> = (0..12 * 1024 * 1024)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut w = sink.writer("s/t/LOAD00000001.csv").await.unwrap();
    for chunk in data.chunks(777_777) {
        w.write(chunk).await.unwrap();
    }
    assert!(
        sink.list("s/").await.unwrap().is_empty(),
        "invisible until complete"
    );
    assert_eq!(w.finish().await.unwrap(), data.len() as u64);
    let back = sink.get("s/t/LOAD00000001.csv").await.unwrap().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "multipart object differs");

    let mut w = sink.writer("s/t/aborted.csv").await.unwrap();
    w.write(&data[..6 << 20]).await.unwrap();
    w.abort().await;
    let uploads = aws
        .s3()
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert!(
        uploads.uploads().is_empty(),
        "abort must not leave an upload behind"
    );
    assert_eq!(
        sink.list("s/").await.unwrap(),
        vec!["s/t/LOAD00000001.csv".to_owned()]
    );

    sink.put("_manifests/cdc/x.json", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert_eq!(sink.list("_manifests/").await.unwrap().len(), 1);
    assert!(sink.get("missing").await.unwrap().is_none());
    // Keys land under the prefix.
    let raw = aws
        .s3()
        .list_objects_v2()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert!(
        raw.contents()
            .iter()
            .all(|o| o.key().unwrap().starts_with("p/q/"))
    );
}

#[tokio::test]
async fn dynamodb_writes_are_conditional() {
    let _ = env("AWS_ENDPOINT_URL");
    let aws = Aws::from_env().await;
    let store = DynamoStore::new(aws.dynamodb(), unique_name("pgshift-seam"));
    store.ensure_table().await.unwrap();
    store.ensure_table().await.unwrap();
    let doc = serde_json::json!({"checkpoint": 1u64 << 62, "checkpoint_lsn": "40000000/0", "lease_owner": null});
    let v1 = store.put("task-a", "cdc", &doc, None).await.unwrap();
    assert!(matches!(
        store.put("task-a", "cdc", &doc, None).await,
        Err(Error::Conflict(_))
    ));
    let v2 = store.put("task-a", "cdc", &doc, Some(v1)).await.unwrap();
    assert!(matches!(
        store.put("task-a", "cdc", &doc, Some(v1)).await,
        Err(Error::Conflict(_))
    ));
    let got = store.get("task-a", "cdc").await.unwrap().unwrap();
    assert_eq!((got.version, got.doc), (v2, doc));
    assert!(store.get("task-b", "cdc").await.unwrap().is_none());
    // Racing writers with the same expected version: exactly one wins.
    let doc2 = serde_json::json!({"n": 2});
    let (a, b) = tokio::join!(
        store.put("task-a", "cdc", &doc2, Some(v2)),
        store.put("task-a", "cdc", &doc2, Some(v2))
    );
    assert_eq!(
        usize::from(a.is_ok()) + usize::from(b.is_ok()),
        1,
        "{a:?} {b:?}"
    );
}

/// A peek that would outlive the deadline is cut by the server (its `statement_timeout` is
/// the time left) and reads as a deadline, not a failure. The run's clean stop on it (nothing
/// committed, the next run drains it all) is the poller's job test over a source that holds
/// the peek (`job::cdc_poll::tests`), which races no clock; here the real server's cut.
#[tokio::test]
async fn a_peek_longer_than_the_time_left_is_cut_by_the_server_as_a_deadline() {
    let db = TestDb::new("cdc_peek_timeout").await;
    let sink = MemorySink::new();
    let state = MemoryStore::new();
    let c = db.client().await;
    c.batch_execute("create table public.t (id int)")
        .await
        .unwrap();
    let o = CdcOptions::new("peek-timeout", db.config(), "owner-1");
    let first = cdc_poll::run(&sink, &state, &o).await.unwrap();
    c.batch_execute("insert into public.t select generate_series(1, 1000000)")
        .await
        .unwrap();
    let source = PgSource::connect(&db.config()).await.unwrap();
    source.prepare_peeks("256MB").await.unwrap();
    let upto = source.drain_target().await.unwrap();
    let request = |deadline: bool| PeekRequest {
        slot: first.slot.clone(),
        publication: first.slot.clone(),
        upto,
        max_changes: i32::MAX,
        // Decoding a million inserts takes the server about a second: far more than 1 ms.
        timeout: Duration::from_millis(1),
        deadline,
        split: None,
        messages: false,
    };
    // The cut arrives before the first row or with it, as the server's timer falls.
    let first_row = |req: PeekRequest| {
        let source = &source;
        async move {
            match source.peek(&req).await {
                Ok(mut peek) => peek.next_row().await.map(|_| ()),
                Err(e) => Err(e),
            }
        }
    };
    let err = first_row(request(true)).await.unwrap_err();
    assert!(
        matches!(err, Error::Deadline(_)) && err.is_transient(),
        "{err}"
    );
    // Without a deadline the same cut is the session's statement timeout: a failure.
    let err = first_row(request(false)).await.unwrap_err();
    assert!(matches!(err, Error::Postgres { .. }), "{err}");
    assert_eq!(
        source
            .slot_state(&first.slot)
            .await
            .unwrap()
            .unwrap()
            .confirmed_flush_lsn,
        Some(first.checkpoint),
        "a peek consumes nothing"
    );

    // Over 16 MiB of WAL: two sessions decode it, the one transaction (its commit after
    // the split point) coming whole from the second.
    let r = cdc_poll::run(&sink, &state, &o).await.unwrap();
    assert_eq!(
        (r.outcome, r.changes, r.split_peeks),
        (Outcome::Drained, 1_000_000, 1)
    );
}

#[tokio::test]
async fn a_passed_deadline_stops_cleanly_and_the_next_run_continues() {
    let db = TestDb::new("cdc_deadline").await;
    let sink = MemorySink::new();
    let state = MemoryStore::new();
    let c = db.client().await;
    c.batch_execute("create table public.t (id int primary key)")
        .await
        .unwrap();
    let mut o = CdcOptions::new("deadline", db.config(), "owner-1");
    cdc_poll::run(&sink, &state, &o).await.unwrap();
    c.batch_execute("insert into public.t select generate_series(1, 1000)")
        .await
        .unwrap();
    let before = state.get("deadline", "cdc").await.unwrap().unwrap().doc["checkpoint"].clone();

    o.deadline = Some(Instant::now() + Duration::from_secs(5));
    o.safety_margin = Duration::from_secs(10);
    let r = cdc_poll::run(&sink, &state, &o).await.unwrap();
    assert_eq!(r.outcome, Outcome::DeadlineReached);
    assert_eq!(r.changes, 0);
    let after = state.get("deadline", "cdc").await.unwrap().unwrap();
    assert_eq!(
        after.doc["checkpoint"], before,
        "nothing committed past the deadline"
    );
    assert!(
        after.doc["lease_owner"].is_null(),
        "a clean stop releases the lease"
    );

    o.deadline = None;
    let r = cdc_poll::run(&sink, &state, &o).await.unwrap();
    assert_eq!((r.outcome, r.changes), (Outcome::Drained, 1000));
    let files: Vec<String> = sink.snapshot().keys().cloned().collect();
    assert!(
        files.iter().any(|k| k.starts_with("public/t/cdc/")),
        "{files:?}"
    );
    assert_eq!(
        files
            .iter()
            .filter(|k| k.starts_with("_manifests/cdc/"))
            .count(),
        1
    );
}
