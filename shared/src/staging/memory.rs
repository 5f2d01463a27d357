//! Objects in memory (job-level tests and the golden checks).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{ObjectSink, ObjectWriter, check_key};
use crate::error::Result;
// Memory

/// Objects in memory, for job-level tests.
#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    objects: Arc<Mutex<BTreeMap<String, Bytes>>>,
}

impl MemorySink {
    pub fn new() -> MemorySink {
        MemorySink::default()
    }

    /// A snapshot of every object.
    pub fn snapshot(&self) -> BTreeMap<String, Bytes> {
        self.objects.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

pub struct MemoryWriter {
    objects: Arc<Mutex<BTreeMap<String, Bytes>>>,
    key: String,
    buf: Vec<u8>,
}

impl ObjectWriter for MemoryWriter {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(data);
        Ok(())
    }

    async fn finish(self) -> Result<u64> {
        let len = self.buf.len() as u64;
        if let Ok(mut m) = self.objects.lock() {
            m.insert(self.key, Bytes::from(self.buf));
        }
        Ok(len)
    }

    async fn abort(self) {}
}

impl ObjectSink for MemorySink {
    type Writer = MemoryWriter;

    async fn writer(&self, key: &str) -> Result<MemoryWriter> {
        check_key(key)?;
        Ok(MemoryWriter {
            objects: self.objects.clone(),
            key: key.to_owned(),
            buf: Vec::new(),
        })
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        check_key(key)?;
        if let Ok(mut m) = self.objects.lock() {
            m.insert(key.to_owned(), body);
        }
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.objects.lock().ok().and_then(|m| m.get(key).cloned()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .objects
            .lock()
            .map(|m| {
                m.keys()
                    .filter(|k| k.starts_with(prefix))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        if let Ok(mut m) = self.objects.lock() {
            m.remove(key);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}
