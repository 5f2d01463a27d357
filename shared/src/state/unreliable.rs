//! Fault injection around a state store: it "dies" before or after the chosen write, as a
//! killed process would, and every call after that fails too. Tests wrap the store they pass.

use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::{StateStore, Versioned};
use crate::error::{Error, Result};

/// Where the store dies: at the `n`-th (0-based) put to an item whose key starts with `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreCrash {
    /// The put is not written.
    BeforePut { key: String, n: usize },
    /// The put is written (durable), then the process dies before it hears back.
    AfterPut { key: String, n: usize },
}

#[derive(Debug, Default)]
struct Faults {
    seen: usize,
    dead: bool,
}

/// A store that dies at [`StoreCrash`].
#[derive(Debug, Clone)]
pub struct UnreliableStore<St> {
    inner: St,
    crash: StoreCrash,
    faults: Arc<Mutex<Faults>>,
}

impl<St: StateStore> UnreliableStore<St> {
    pub fn new(inner: St, crash: StoreCrash) -> UnreliableStore<St> {
        UnreliableStore {
            inner,
            crash,
            faults: Arc::new(Mutex::new(Faults::default())),
        }
    }

    /// Whether the crash happened.
    pub fn crashed(&self) -> bool {
        self.faults.lock().map(|f| f.dead).unwrap_or(true)
    }

    fn alive(&self) -> Result<()> {
        match self.faults.lock() {
            Ok(f) if !f.dead => Ok(()),
            _ => Err(Error::Injected("the state store crashed".to_owned())),
        }
    }

    /// Counts a put to `key`; `Some(before)` when this one is the crash.
    fn hits(&self, key: &str) -> Option<bool> {
        let (prefix, n, before) = match &self.crash {
            StoreCrash::BeforePut { key, n } => (key, *n, true),
            StoreCrash::AfterPut { key, n } => (key, *n, false),
        };
        if !key.starts_with(prefix.as_str()) {
            return None;
        }
        let mut f = self.faults.lock().ok()?;
        f.seen += 1;
        if f.seen > n {
            f.dead = true;
            Some(before)
        } else {
            None
        }
    }
}

impl<St: StateStore> StateStore for UnreliableStore<St> {
    async fn get(&self, task: &str, key: &str) -> Result<Option<Versioned>> {
        self.alive()?;
        self.inner.get(task, key).await
    }

    async fn put(&self, task: &str, key: &str, doc: &Value, expected: Option<u64>) -> Result<u64> {
        self.alive()?;
        match self.hits(key) {
            None => self.inner.put(task, key, doc, expected).await,
            Some(true) => Err(Error::Injected(format!(
                "the state store crashed before writing {task}/{key}"
            ))),
            Some(false) => {
                self.inner.put(task, key, doc, expected).await?;
                Err(Error::Injected(format!(
                    "the state store crashed after writing {task}/{key}"
                )))
            }
        }
    }

    async fn delete(&self, task: &str, key: &str) -> Result<()> {
        self.alive()?;
        self.inner.delete(task, key).await
    }

    fn describe(&self) -> String {
        format!("unreliable {}", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    #[tokio::test]
    async fn dies_before_or_after_the_chosen_write() {
        let doc = serde_json::json!({"n": 1});
        let inner = MemoryStore::new();
        let before = UnreliableStore::new(
            inner.clone(),
            StoreCrash::BeforePut {
                key: "cdc".to_owned(),
                n: 1,
            },
        );
        let v = before.put("t", "cdc", &doc, None).await.unwrap();
        before.put("t", "task", &doc, None).await.unwrap();
        assert!(before.put("t", "cdc", &doc, Some(v)).await.is_err());
        assert!(before.get("t", "cdc").await.is_err(), "dead");
        assert_eq!(
            inner.get("t", "cdc").await.unwrap().unwrap().version,
            v,
            "not written"
        );

        let inner = MemoryStore::new();
        let after = UnreliableStore::new(
            inner.clone(),
            StoreCrash::AfterPut {
                key: "cdc".to_owned(),
                n: 0,
            },
        );
        assert!(after.put("t", "cdc", &doc, None).await.is_err());
        assert!(after.crashed());
        assert!(
            inner.get("t", "cdc").await.unwrap().is_some(),
            "written, then dead"
        );
    }
}
