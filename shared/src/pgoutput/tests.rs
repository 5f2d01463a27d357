//! Decoder tests over byte fixtures captured from PostgreSQL 15 (`*.fixture`: one message per
//! line, `<lsn> <hex>`, as `pg_logical_slot_peek_binary_changes` returned them), plus property
//! tests that malformed bytes are errors and never panics.

use proptest::prelude::*;

use super::*;

const PROTO1: &str = include_str!("proto1.fixture");
const PROTO2_STREAM: &str = include_str!("proto2-stream.fixture");
const PROTO2_ABORT: &str = include_str!("proto2-abort.fixture");

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn messages(fixture: &str) -> Vec<(Lsn, Vec<u8>)> {
    fixture
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (lsn, hex) = l.split_once(' ').unwrap();
            (lsn.parse().unwrap(), unhex(hex.trim()))
        })
        .collect()
}

/// Decodes a whole fixture, tracking stream blocks the way the poller does.
fn decode_all(fixture: &str) -> Vec<Message<'static>> {
    let mut in_stream = false;
    let mut out = Vec::new();
    for (_, bytes) in messages(fixture) {
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        let msg = decode(bytes, in_stream).unwrap_or_else(|e| panic!("{e}"));
        match msg {
            Message::StreamStart(_) => in_stream = true,
            Message::StreamStop => in_stream = false,
            _ => {}
        }
        out.push(msg);
    }
    out
}

fn text(v: &Value<'_>) -> Option<String> {
    match v {
        Value::Text(t) => Some(String::from_utf8(t.to_vec()).unwrap()),
        _ => None,
    }
}

#[test]
fn protocol_1_fixture_decodes_every_message_type() {
    let msgs = decode_all(PROTO1);
    let mut seen = std::collections::HashSet::new();
    for m in &msgs {
        seen.insert(std::mem::discriminant(m));
    }
    // Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate, Message.
    assert_eq!(seen.len(), 10, "{msgs:#?}");

    let rel = msgs
        .iter()
        .find_map(|m| match m {
            Message::Relation(r) if r.name == "t" => Some(r.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(rel.namespace, "public");
    assert_eq!(rel.replica_identity, b'd');
    let cols: Vec<_> = rel.columns.iter().map(|c| (c.name, c.is_key())).collect();
    assert_eq!(
        cols,
        [("id", true), ("name", false), ("big", false), ("m", false)]
    );
    assert_eq!(rel.columns[0].type_oid, 23); // int4

    let ty = msgs
        .iter()
        .find_map(|m| match m {
            Message::Type(t) => Some(t.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!((ty.namespace, ty.name), ("public", "mood"));

    let first_insert = msgs
        .iter()
        .find_map(|m| match m {
            Message::Insert(i) if i.rel_id == rel.rel_id => Some(i.clone()),
            _ => None,
        })
        .unwrap();
    let vals: Vec<_> = first_insert.new.0.iter().map(text).collect();
    assert_eq!(vals[0].as_deref(), Some("1"));
    assert_eq!(vals[1].as_deref(), Some("a"));
    assert_eq!(vals[2].as_deref().map(str::len), Some(12_800));
    assert_eq!(vals[3].as_deref(), Some("ok"));

    // The primary-key update carries the old key ('K'); the plain one does not, and leaves the
    // TOASTed column unchanged ('u').
    let updates: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            Message::Update(u) => Some(u.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(updates.len(), 3);
    assert!(updates[0].old.is_none());
    assert_eq!(updates[0].new.0[2], Value::UnchangedToast);
    match &updates[1].old {
        Some(OldTuple::Key(k)) => {
            assert_eq!(text(&k.0[0]).as_deref(), Some("2"));
            assert_eq!(k.0[1], Value::Null, "non-key columns of a K tuple are null");
        }
        other => panic!("expected old key, got {other:?}"),
    }
    assert_eq!(text(&updates[1].new.0[0]).as_deref(), Some("10"));
    assert!(
        matches!(&updates[2].old, Some(OldTuple::Full(t)) if text(&t.0[1]).as_deref() == Some("v1"))
    );

    let deletes: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            Message::Delete(d) => Some(d.clone()),
            _ => None,
        })
        .collect();
    assert!(matches!(deletes[0].old, OldTuple::Key(_)));
    assert!(matches!(deletes[1].old, OldTuple::Full(_)));

    let trunc = msgs
        .iter()
        .find_map(|m| match m {
            Message::Truncate(t) => Some(t.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(trunc.rel_ids.len(), 2);

    let logical: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            Message::Message(m) => Some(m.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(logical.len(), 2);
    assert_eq!(logical[0].prefix, "pgshift");
    assert_eq!(logical[0].content, b"hello");
    assert_eq!(logical[0].flags & 1, 1, "transactional");
    assert_eq!(logical[1].flags & 1, 0, "non-transactional");

    let origin = msgs
        .iter()
        .find_map(|m| match m {
            Message::Origin(o) => Some(o.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(origin.name, "origin1");
    assert_eq!(origin.commit_lsn, "0/AABBCC".parse().unwrap());

    // Begin's final LSN is the Commit's commit LSN; end LSN lies past it.
    let mut open: Option<Begin> = None;
    for m in &msgs {
        match m {
            Message::Begin(b) => open = Some(*b),
            Message::Commit(c) => {
                let b = open.take().expect("commit without begin");
                assert_eq!(b.final_lsn, c.commit_lsn);
                assert!(c.end_lsn > c.commit_lsn);
                assert_eq!(b.commit_ts, c.commit_ts);
            }
            _ => {}
        }
    }
}

#[test]
fn protocol_2_stream_messages_decode() {
    let msgs = decode_all(PROTO2_STREAM);
    let starts = msgs
        .iter()
        .filter(|m| matches!(m, Message::StreamStart(_)))
        .count();
    let stops = msgs
        .iter()
        .filter(|m| matches!(m, Message::StreamStop))
        .count();
    assert!(starts > 0 && starts == stops);
    let commit = msgs
        .iter()
        .find_map(|m| match m {
            Message::StreamCommit(c) => Some(*c),
            _ => None,
        })
        .unwrap();
    assert!(commit.end_lsn > commit.commit_lsn);
    // Inside a stream, data messages carry the streamed transaction's id.
    let streamed_insert = msgs
        .iter()
        .find_map(|m| match m {
            Message::Insert(i) if i.xid.is_some() => Some(i.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(streamed_insert.xid, Some(commit.xid));

    let msgs = decode_all(PROTO2_ABORT);
    let abort = msgs
        .iter()
        .find_map(|m| match m {
            Message::StreamAbort(a) => Some(*a),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        abort.xid, abort.subxid,
        "a top-level abort names the transaction twice"
    );
}

#[test]
fn every_truncation_of_real_messages_is_an_error() {
    for fixture in [PROTO1, PROTO2_STREAM] {
        let mut in_stream = false;
        for (_, bytes) in messages(fixture) {
            for cut in 0..bytes.len().min(300) {
                assert!(
                    decode(&bytes[..cut], in_stream).is_err(),
                    "prefix of {cut} bytes decoded"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(
                decode(&longer, in_stream).is_err(),
                "trailing byte accepted"
            );
            match decode(&bytes, in_stream).unwrap() {
                Message::StreamStart(_) => in_stream = true,
                Message::StreamStop => in_stream = false,
                _ => {}
            }
        }
    }
}

#[test]
fn malformed_fields_are_named() {
    let err = decode(b"", false).unwrap_err();
    assert_eq!(err.problem, "no bytes");
    let err = decode(b"Z", false).unwrap_err();
    assert!(err.problem.contains("0x5a"), "{err}");
    // Insert with an unknown column kind.
    let mut bad = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b'q'];
    let err = decode(&bad, false).unwrap_err();
    assert_eq!(err.message, "Insert");
    assert!(err.problem.contains("unknown kind"), "{err}");
    // Negative length.
    bad = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0xff, 0xff, 0xff, 0xff];
    assert!(
        decode(&bad, false)
            .unwrap_err()
            .problem
            .contains("negative length")
    );
    // A huge column count is rejected before allocating.
    bad = vec![b'I', 0, 0, 0, 1, b'N', 0x7f, 0xff];
    assert!(decode(&bad, false).unwrap_err().problem.contains("exceeds"));
    // Invalid UTF-8 in a relation name.
    bad = vec![b'R', 0, 0, 0, 1, 0xff, 0xfe, 0];
    assert!(decode(&bad, false).unwrap_err().problem.contains("UTF-8"));
    // Truncate claiming 2^32-1 relations.
    bad = vec![b'T', 0xff, 0xff, 0xff, 0xff, 0];
    assert!(decode(&bad, false).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), in_stream in any::<bool>()) {
        let _ = decode(&bytes, in_stream);
    }

    #[test]
    fn random_bytes_after_a_valid_tag_never_panic(
        tag in proptest::sample::select(b"BCORYIUDTMSEcA".to_vec()),
        rest in proptest::collection::vec(any::<u8>(), 0..128),
        in_stream in any::<bool>(),
    ) {
        let mut bytes = vec![tag];
        bytes.extend(rest);
        let _ = decode(&bytes, in_stream);
    }

    #[test]
    fn flipped_bytes_in_real_messages_never_panic(idx in 0usize..40, pos in any::<prop::sample::Index>(), val in any::<u8>()) {
        let msgs = messages(PROTO1);
        let mut bytes = msgs[idx % msgs.len()].1.clone();
        let p = pos.index(bytes.len());
        bytes[p] = val;
        let _ = decode(&bytes, false);
    }
}
