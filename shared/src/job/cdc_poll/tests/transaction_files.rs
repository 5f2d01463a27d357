//! PreserveTransactions over the in-memory seams: the transaction files through a crash at
//! every step.

use super::*;

/// PreserveTransactions: every batch also writes one transaction file of all tables' rows in
/// commit order; through a crash at every step, the files in name order hold every change
/// exactly once, each row naming its table and schema.
#[tokio::test]
async fn transaction_files_hold_every_table_in_commit_order_exactly_once() {
    let src = MemorySource::new();
    let t1 = src.create_table("public", "t1", &[("id", true), ("n", false)]);
    let t2 = src.create_table("sales", "t2", &[("id", true), ("n", false)]);
    let (sink, state) = (MemorySink::new(), MemoryStore::new());
    let mut o = opts("txn");
    o.cdc_path = Some("changes/all".to_owned());
    let bus = std::sync::Arc::new(crate::events::MemoryEvents::default());
    o.events = crate::events::Events::to(bus.clone());
    poll(&src, &sink, &state, &o).await.unwrap();
    let mut models = [BTreeMap::new(), BTreeMap::new()];
    // What the files must list, in order: (op, table, id) of every change.
    let mut expected = Vec::new();
    let crashes = [
        Some(Crash::at_object("changes/all/", 0)),
        Some(Crash::at_object("_manifests/", 0)),
        None,
    ];
    for round in 0..4u32 {
        for (i, t) in [t1, t2].into_iter().enumerate() {
            let [mut m1, mut m2] = [BTreeMap::new(), BTreeMap::new()];
            let model = if i == 0 { &mut m1 } else { &mut m2 };
            workload(&src, t, round * 2 + i as u32, model);
            models[i].extend(std::mem::take(model));
            let (a, b, c) = (
                format!("{}", (round * 2 + i as u32) * 10),
                format!("{}", (round * 2 + i as u32) * 10 + 1),
                format!("{}", (round * 2 + i as u32) * 10 + 2),
            );
            let name = ["t1", "t2"][i];
            for (op, id) in [
                ("I", &a),
                ("I", &b),
                ("U", &a),
                ("D", &b),
                ("I", &c),
                ("I", &"gone".to_owned()),
                ("D", &"gone".to_owned()),
            ] {
                expected.push((op.to_owned(), name.to_owned(), id.clone()));
            }
        }
        // One transaction over both tables.
        let id = format!("x{round}");
        src.commit(vec![
            MemoryChange::Insert {
                rel: t2,
                new: v(&[&id, "7"]),
            },
            MemoryChange::Insert {
                rel: t1,
                new: v(&[&id, "8"]),
            },
        ]);
        models[1].insert(id.clone(), "7".to_owned());
        models[0].insert(id.clone(), "8".to_owned());
        expected.push(("I".to_owned(), "t2".to_owned(), id.clone()));
        expected.push(("I".to_owned(), "t1".to_owned(), id));
        if let Some(Some(c)) = crashes.get(round as usize) {
            let s = UnreliableSink::new(sink.clone(), c.clone());
            let r = poll(&src, &s, &state, &o).await;
            assert!(s.crashed(), "round {round}: the sink crash was reached");
            assert!(matches!(r, Err(Error::Injected(_))), "round {round}: {r:?}");
        }
        if round == 2 {
            let s = UnreliableStore::new(
                state.clone(),
                StoreCrash::BeforePut {
                    key: "cdc".to_owned(),
                    n: 2,
                },
            );
            let r = poll(&src, &sink, &s, &o).await;
            assert!(s.crashed() && matches!(r, Err(Error::Injected(_))), "{r:?}");
        }
        // Later than the crashed run: a name taken from the clock would differ.
        tokio::time::sleep(Duration::from_millis(3)).await;
        let r = poll(&src, &sink, &state, &o).await.unwrap();
        assert_eq!(r.outcome, Outcome::Drained, "round {round}");
    }
    // Each batch's `Batch Committed` names its transaction file.
    let announced: BTreeMap<String, String> = bus
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.detail_type == crate::events::BATCH_COMMITTED)
        .map(|e| {
            let detail = &e.detail;
            let file = detail["transaction_file"]
                .as_str()
                .expect("named")
                .to_owned();
            (detail["manifest_key"].as_str().unwrap().to_owned(), file)
        })
        .collect();
    // The manifests list one transaction file each, and nothing else is in the folder.
    let mut listed = Vec::new();
    let mut previous_ms = None;
    for key in layout::batch_manifest_keys(&sink).await.unwrap() {
        let m: BatchManifest = layout::get_json(&sink, &key, "a manifest").await.unwrap();
        let t = m
            .transaction_file
            .expect("each batch has a transaction file");
        assert_eq!(
            announced.get(&key),
            Some(&t.key),
            "{key}: its event names it"
        );
        assert!(
            previous_ms < Some(t.unix_ms),
            "{key}: named after the batch before"
        );
        previous_ms = Some(t.unix_ms);
        assert_eq!(t.rows, m.changes, "{key}: every change of the batch");
        listed.push(t.key);
    }
    let mut stored = sink.list("changes/all/").await.unwrap();
    stored.sort();
    assert_eq!(
        stored, listed,
        "in name order, the batches' order; no stray file"
    );
    assert!(
        stored.iter().all(|k| {
            let name = k.strip_prefix("changes/all/CDC_TXN-").unwrap_or_default();
            name.len() == 21
                && name.ends_with(".csv")
                && name[..17].bytes().all(|b| b.is_ascii_digit())
        }),
        "{stored:?}"
    );
    let mut seen = Vec::new();
    let mut replayed = [BTreeMap::new(), BTreeMap::new()];
    for key in &stored {
        let body = layout::get_required(&sink, key).await.unwrap();
        let mut fields = Vec::new();
        for line in body.split_inclusive(|b| *b == b'\n') {
            parse_csv_fields(line, &mut fields).unwrap();
            let get = |i: usize| String::from_utf8(fields[i].clone().unwrap_or_default()).unwrap();
            assert_eq!(fields.len(), 6, "Op, table, schema, id, n, unchanged");
            let (op, table, schema) = (get(0), get(1), get(2));
            let i = usize::from(table == "t2");
            assert_eq!(schema, ["public", "sales"][i]);
            match op.as_str() {
                "I" | "U" => replayed[i].insert(get(3), get(4)),
                "D" => replayed[i].remove(&get(3)),
                other => panic!("op {other}"),
            };
            seen.push((op, table, get(3)));
        }
    }
    assert_eq!(
        seen, expected,
        "every change once, in commit order across tables"
    );
    assert_eq!(replayed, models);
}
