//! Transitions of the state records over the memory store.

use super::*;
use crate::plan::ChunkRange;
use crate::staging::encode::Format;
use crate::state::MemoryStore;

fn plan() -> PlanRecord {
    PlanRecord {
        tables: vec![PlannedTable {
            schema: "public".to_owned(),
            table: "t".to_owned(),
            columns: vec!["id".to_owned()],
            types: vec![(23, -1)],
            chunks: vec![ChunkRange::Whole, ChunkRange::Whole],
            estimated_rows: 2.0,
            staged_as: None,
            schema_key: None,
        }],
        format: Format::default(),
        op_column: false,
        header: false,
        csv: Default::default(),
        l0: Some(Lsn(7)),
        status: "planned".to_owned(),
        reload: None,
    }
}

#[tokio::test]
async fn chunks_are_claimed_by_one_worker_until_the_lease_expires() {
    let state = MemoryStore::new();
    let p = create_plan(&state, "t1", plan(), |id| format!("k{}", id.n))
        .await
        .unwrap();
    let ids = p.chunk_ids();
    assert_eq!(ids.len(), 2);
    // A second plan stored concurrently loses to the first.
    let mut other = plan();
    other.l0 = Some(Lsn(9));
    assert_eq!(
        create_plan(&state, "t1", other, |_| String::new())
            .await
            .unwrap()
            .l0,
        Some(Lsn(7))
    );

    let ttl = Duration::from_secs(60);
    let Claim::Claimed { record, version } = claim_chunk(&state, "t1", &ids[0], "a", ttl, false)
        .await
        .unwrap()
    else {
        panic!("pending chunk not claimed")
    };
    assert_eq!((record.status.as_str(), record.attempts), ("running", 1));
    // Another worker is told who holds it; the holder may claim again (a retry).
    match claim_chunk(&state, "t1", &ids[0], "b", ttl, false).await {
        Err(Error::LeaseHeld { owner, .. }) => assert_eq!(owner, "a"),
        other => panic!("{other:?}"),
    }
    assert!(
        Error::LeaseHeld {
            what: String::new(),
            owner: String::new(),
            until_ms: 0
        }
        .is_transient()
    );
    let Claim::Claimed {
        record,
        version: v2,
    } = claim_chunk(&state, "t1", &ids[0], "a", ttl, false)
        .await
        .unwrap()
    else {
        panic!("the holder's retry must claim")
    };
    assert_eq!(record.attempts, 2);
    // The stale claim cannot complete; the current one can, once.
    assert!(matches!(
        complete_chunk(&state, "t1", record.clone(), version).await,
        Err(Error::Conflict(_))
    ));
    let done = complete_chunk(&state, "t1", record, v2).await.unwrap();
    assert_eq!(done.status, "done");
    assert_eq!(
        claim_chunk(&state, "t1", &ids[0], "b", ttl, false)
            .await
            .unwrap(),
        Claim::Done(done)
    );

    // An expired lease is taken over, and the old worker's completion is refused.
    let Claim::Claimed {
        record: r1,
        version: v1,
    } = claim_chunk(&state, "t1", &ids[1], "a", Duration::ZERO, false)
        .await
        .unwrap()
    else {
        panic!()
    };
    let Claim::Claimed {
        version: vb,
        record: rb,
    } = claim_chunk(&state, "t1", &ids[1], "b", ttl, false)
        .await
        .unwrap()
    else {
        panic!("an expired lease must be taken over")
    };
    assert!(
        complete_chunk(&state, "t1", r1, v1)
            .await
            .unwrap_err()
            .to_string()
            .contains("taken over")
    );
    complete_chunk(&state, "t1", rb, vb).await.unwrap();
}

#[test]
fn a_dead_process_of_this_host_is_told_from_a_live_or_remote_one() {
    // pid 0 never runs a CLI (`/proc/0` does not exist).
    let dead = format!("cli-{}-0", local_host());
    assert!(holder_is_dead_here(&dead));
    assert!(!holder_is_dead_here(&local_owner()), "this process runs");
    assert!(
        !holder_is_dead_here("cli-other-host-0"),
        "another host's process"
    );
    assert!(
        !holder_is_dead_here("8f14e45f-ceea-467f-a0e6-2f8b1c2c3d4e"),
        "a Lambda request"
    );
    assert!(human_time(now_ms() + 90_000).ends_with("(in 90 s)"));
    assert_eq!(human_time(946_684_800_000), "2000-01-01 00:00:00 UTC");
}

#[tokio::test]
async fn a_dead_or_forced_holder_is_taken_over_at_once() {
    let state = MemoryStore::new();
    let ttl = Duration::from_secs(600);
    let dead = format!("cli-{}-0", local_host());
    Lease::acquire(&state, "t", &dead, ttl, Lsn(1), false)
        .await
        .unwrap()
        .unwrap();
    let mine = Lease::acquire(&state, "t", "me", ttl, Lsn(0), false)
        .await
        .unwrap();
    assert!(mine.is_ok(), "a dead holder's lease is taken at once");
    assert!(
        Lease::acquire(&state, "t", "other", ttl, Lsn(0), false)
            .await
            .unwrap()
            .is_err()
    );
    assert!(
        Lease::acquire(&state, "t", "other", ttl, Lsn(0), true)
            .await
            .unwrap()
            .is_ok(),
        "--force"
    );
    // The same for a chunk a killed worker of this host was exporting.
    let p = create_plan(&state, "c", plan(), |id| format!("k{}", id.n))
        .await
        .unwrap();
    let id = &p.chunk_ids()[0];
    claim_chunk(&state, "c", id, &dead, ttl, false)
        .await
        .unwrap();
    let taken = claim_chunk(&state, "c", id, "me", ttl, false)
        .await
        .unwrap();
    assert!(matches!(taken, Claim::Claimed { .. }), "{taken:?}");
}

#[tokio::test]
async fn the_checkpoint_moves_only_forward_and_only_under_the_lease() {
    let state = MemoryStore::new();
    let ttl = Duration::from_secs(60);
    let mut lease = Lease::acquire(&state, "t", "a", ttl, Lsn(10), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.checkpoint(), Lsn(10));
    match Lease::acquire(&state, "t", "b", ttl, Lsn(0), false)
        .await
        .unwrap()
    {
        Err(Outcome::LeaseHeld { owner, .. }) => assert_eq!(owner, "a"),
        other => panic!("two owners: {other:?}"),
    }
    lease.move_checkpoint(&state, Lsn(20), true).await.unwrap();
    lease.move_checkpoint(&state, Lsn(15), true).await.unwrap();
    assert_eq!(lease.checkpoint(), Lsn(20));
    let stored = get_cdc(&state, "t").await.unwrap().unwrap();
    assert_eq!((stored.checkpoint_lsn, stored.batch_seq), (Lsn(20), 1));
    // A stale lease (someone else wrote since) cannot move it.
    let mut stale = lease.clone();
    lease.move_checkpoint(&state, Lsn(30), false).await.unwrap();
    let err = stale
        .move_checkpoint(&state, Lsn(40), true)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict(ref m) if m.contains("lost the lease")),
        "{err}"
    );
    lease.release(&state, None).await;
    let next = Lease::acquire(&state, "t", "b", ttl, Lsn(0), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.checkpoint(), Lsn(30));
}

#[tokio::test]
async fn a_reloads_items_are_its_own_and_a_reset_deletes_them() {
    let state = MemoryStore::new();
    let load = create_plan(&state, "t", plan(), |id| format!("load{}", id.n))
        .await
        .unwrap();
    let mut r = plan();
    r.reload = Some(Lsn(0x40));
    let reload = create_plan(&state, "t", r, |id| format!("reload{}", id.n))
        .await
        .unwrap();
    // Same tables and chunk numbers, different items.
    let (a, b) = (&load.chunk_ids()[0], &reload.chunk_ids()[0]);
    assert_ne!(a.state_key(), b.state_key());
    assert_eq!(b.state_key(), "reload#0000000000000040#chunk#public.t#0");
    assert_eq!(
        get_chunk(&state, "t", b).await.unwrap().unwrap().key,
        "reload0"
    );
    assert_eq!(
        get_chunk(&state, "t", a).await.unwrap().unwrap().key,
        "load0"
    );
    let claimed = claim_chunk(&state, "t", b, "w", Duration::from_secs(60), false)
        .await
        .unwrap();
    let Claim::Claimed { record, version } = claimed else {
        panic!("{claimed:?}")
    };
    let done = complete_chunk(&state, "t", record, version).await.unwrap();
    assert_eq!(done.reload, Some(Lsn(0x40)));
    assert_eq!(
        get_chunk(&state, "t", a).await.unwrap().unwrap().status,
        "pending",
        "the load's chunk is untouched"
    );
    reload::update_index(&state, "t", |i| {
        i.reloads.push(reload::ReloadEntry {
            started_by: "w".to_owned(),
            started_ms: crate::state::now_ms(),
            status: "planned".to_owned(),
            r0: Some(Lsn(0x40)),
            tables: vec!["public.t".to_owned()],
            horizon: None,
        });
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(
        snapshot_horizon(&state, "t").await.unwrap(),
        Some(Lsn(u64::MAX))
    );
    let deleted = reset_task(&state, "t").await.unwrap();
    assert!(deleted.iter().any(|d| d == "1 reloads"), "{deleted:?}");
    assert!(
        get_plan_of(&state, "t", Some(Lsn(0x40)))
            .await
            .unwrap()
            .is_none()
    );
    assert!(get_chunk(&state, "t", b).await.unwrap().is_none());
    assert!(
        reload::get_index(&state, "t")
            .await
            .unwrap()
            .reloads
            .is_empty()
    );
}
