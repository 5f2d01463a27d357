//! Unit tests of the stores.

use super::dynamodb::{from_attr, to_attr};
use super::*;

async fn conditional_writes<S: StateStore>(store: S) {
    let doc =
        serde_json::json!({"checkpoint": 18446744073709551615u64, "text": "FFFFFFFF/FFFFFFFF"});
    assert!(store.get("t1", "cdc").await.unwrap().is_none());
    let v1 = store.put("t1", "cdc", &doc, None).await.unwrap();
    assert!(matches!(
        store.put("t1", "cdc", &doc, None).await,
        Err(Error::Conflict(_))
    ));
    let v2 = store.put("t1", "cdc", &doc, Some(v1)).await.unwrap();
    assert!(v2 > v1);
    assert!(matches!(
        store.put("t1", "cdc", &doc, Some(v1)).await,
        Err(Error::Conflict(_))
    ));
    let got = store.get("t1", "cdc").await.unwrap().unwrap();
    assert_eq!(got.version, v2);
    assert_eq!(got.doc, doc);
}

#[tokio::test]
async fn memory_store_is_conditional() {
    conditional_writes(MemoryStore::new()).await;
}

#[tokio::test]
async fn file_store_is_conditional() {
    let dir = std::env::temp_dir().join(format!("pgshift-state-{}", uuid::Uuid::new_v4().simple()));
    conditional_writes(FileStore::new(&dir)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn attributes_round_trip() {
    let doc = serde_json::json!({"n": 42, "big": u64::MAX, "neg": -3, "s": "x", "b": true, "z": null, "l": [1, "a"], "m": {"k": 1.5}});
    assert_eq!(from_attr(&to_attr(&doc)), doc);
}
