//! State in memory (job-level tests).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::{StateStore, Versioned, conflict};
use crate::error::{Error, Result};
// Memory

/// State in memory, for job-level tests.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    items: Arc<Mutex<HashMap<(String, String), Versioned>>>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }
}

impl StateStore for MemoryStore {
    async fn get(&self, task: &str, key: &str) -> Result<Option<Versioned>> {
        Ok(self
            .items
            .lock()
            .ok()
            .and_then(|m| m.get(&(task.to_owned(), key.to_owned())).cloned()))
    }

    async fn put(&self, task: &str, key: &str, doc: &Value, expected: Option<u64>) -> Result<u64> {
        let mut m = self
            .items
            .lock()
            .map_err(|_| Error::Conflict("memory store poisoned".to_owned()))?;
        let k = (task.to_owned(), key.to_owned());
        let current = m.get(&k).map(|v| v.version);
        if current != expected {
            return Err(conflict(task, key, expected));
        }
        let version = expected.unwrap_or(0) + 1;
        m.insert(
            k,
            Versioned {
                version,
                doc: doc.clone(),
            },
        );
        Ok(version)
    }

    async fn delete(&self, task: &str, key: &str) -> Result<()> {
        if let Ok(mut m) = self.items.lock() {
            m.remove(&(task.to_owned(), key.to_owned()));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}
