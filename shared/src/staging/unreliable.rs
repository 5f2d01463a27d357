//! Fault injection around a sink (in the spirit of neon's `remote_storage` simulate-failures
//! wrapper): the wrapped sink "dies" at a chosen step, as a killed process would, and every
//! call after that fails too. Production code never sees it; tests wrap the sink they pass.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{ObjectSink, ObjectWriter};
use crate::error::{Error, Result};

/// Where the sink dies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Crash {
    /// Instead of completing the `n`-th (0-based) object whose key contains `pattern` (a
    /// writer's finish or a put): that object is never written.
    AtObject { pattern: String, n: usize },
    /// While writing: a write fails once the sink's writers were given `bytes` in all (the
    /// upload is left as a killed process leaves it).
    AfterBytes(u64),
    /// Reading the `n`-th (0-based) object whose key contains `pattern`.
    AtRead { pattern: String, n: usize },
}

impl Crash {
    /// Dies instead of completing the `n`-th object whose key contains `pattern`.
    pub fn at_object(pattern: &str, n: usize) -> Crash {
        Crash::AtObject {
            pattern: pattern.to_owned(),
            n,
        }
    }

    /// Dies reading the `n`-th object whose key contains `pattern`.
    pub fn at_read(pattern: &str, n: usize) -> Crash {
        Crash::AtRead {
            pattern: pattern.to_owned(),
            n,
        }
    }
}

#[derive(Debug, Default)]
struct Faults {
    seen: usize,
    bytes: u64,
    dead: bool,
}

/// A sink that dies at [`Crash`].
#[derive(Debug, Clone)]
pub struct UnreliableSink<S> {
    inner: S,
    crash: Crash,
    faults: Arc<Mutex<Faults>>,
}

impl<S: ObjectSink> UnreliableSink<S> {
    pub fn new(inner: S, crash: Crash) -> UnreliableSink<S> {
        UnreliableSink {
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
        check_alive(&self.faults)
    }

    /// Counts an object completing (or being read); true when this one is the crash.
    fn hits(&self, key: &str, reading: bool) -> bool {
        let (pattern, n) = match (&self.crash, reading) {
            (Crash::AtObject { pattern, n }, false) | (Crash::AtRead { pattern, n }, true) => {
                (pattern, *n)
            }
            _ => return false,
        };
        if !key.contains(pattern.as_str()) {
            return false;
        }
        let Ok(mut f) = self.faults.lock() else {
            return true;
        };
        f.seen += 1;
        if f.seen > n {
            f.dead = true;
        }
        f.dead
    }
}

fn check_alive(faults: &Mutex<Faults>) -> Result<()> {
    match faults.lock() {
        Ok(f) if !f.dead => Ok(()),
        _ => Err(Error::Injected("the staging sink crashed".to_owned())),
    }
}

fn crash(what: &str, key: &str) -> Error {
    Error::Injected(format!("the staging sink crashed {what} {key}"))
}

impl<S: ObjectSink> ObjectSink for UnreliableSink<S> {
    type Writer = UnreliableWriter<S::Writer>;

    async fn writer(&self, key: &str) -> Result<Self::Writer> {
        self.alive()?;
        Ok(UnreliableWriter {
            inner: self.inner.writer(key).await?,
            key: key.to_owned(),
            sink: self.clone_shallow(),
        })
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        self.alive()?;
        if self.hits(key, false) {
            return Err(crash("instead of writing", key));
        }
        self.inner.put(key, body).await
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.alive()?;
        if self.hits(key, true) {
            return Err(crash("reading", key));
        }
        self.inner.get(key).await
    }

    async fn reader(&self, key: &str) -> Result<Option<super::ObjectReader>> {
        self.alive()?;
        if self.hits(key, true) {
            return Err(crash("reading", key));
        }
        self.inner.reader(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.alive()?;
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.alive()?;
        self.inner.delete(key).await
    }

    fn describe(&self) -> String {
        format!("unreliable {}", self.inner.describe())
    }

    async fn sweep(&self) -> Result<u64> {
        self.alive()?;
        self.inner.sweep().await
    }
}

impl<S: ObjectSink> UnreliableSink<S> {
    /// The fault bookkeeping without the inner sink (writers only need the plan and counts).
    fn clone_shallow(&self) -> Shared {
        Shared {
            crash: self.crash.clone(),
            faults: self.faults.clone(),
        }
    }
}

/// What a writer shares with its sink.
#[derive(Debug)]
struct Shared {
    crash: Crash,
    faults: Arc<Mutex<Faults>>,
}

/// A writer of an [`UnreliableSink`].
#[derive(Debug)]
pub struct UnreliableWriter<W> {
    inner: W,
    key: String,
    sink: Shared,
}

impl<W: ObjectWriter> ObjectWriter for UnreliableWriter<W> {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        check_alive(&self.sink.faults)?;
        if let Crash::AfterBytes(limit) = self.sink.crash {
            let dead = match self.sink.faults.lock() {
                Ok(mut f) => {
                    f.bytes += data.len() as u64;
                    f.dead = f.bytes >= limit;
                    f.dead
                }
                Err(_) => true,
            };
            if dead {
                return Err(crash("while writing", &self.key));
            }
        }
        self.inner.write(data).await
    }

    async fn finish(self) -> Result<u64> {
        check_alive(&self.sink.faults)?;
        if let Crash::AtObject { pattern, n } = &self.sink.crash
            && self.key.contains(pattern.as_str())
        {
            let dead = match self.sink.faults.lock() {
                Ok(mut f) => {
                    f.seen += 1;
                    f.dead = f.seen > *n;
                    f.dead
                }
                Err(_) => true,
            };
            if dead {
                return Err(crash("instead of completing", &self.key));
            }
        }
        self.inner.finish().await
    }

    async fn abort(self) {
        self.inner.abort().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::MemorySink;

    #[tokio::test]
    async fn dies_at_the_chosen_object_and_stays_dead() {
        let inner = MemorySink::new();
        let sink = UnreliableSink::new(inner.clone(), Crash::at_object("/cdc/", 1));
        sink.put("s/t/_schema/1.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let mut w = sink.writer("s/t/cdc/1.csv").await.unwrap();
        w.write(b"I,1\n").await.unwrap();
        w.finish().await.unwrap();
        let mut w = sink.writer("s/u/cdc/1.csv").await.unwrap();
        w.write(b"I,2\n").await.unwrap();
        assert!(matches!(w.finish().await, Err(Error::Injected(_))));
        assert!(sink.crashed());
        assert!(sink.list("").await.is_err(), "a dead sink answers nothing");
        assert_eq!(
            inner.list("").await.unwrap(),
            ["s/t/_schema/1.json", "s/t/cdc/1.csv"],
            "the crashed object was never written"
        );
    }

    #[tokio::test]
    async fn dies_while_writing_after_the_byte_limit() {
        let sink = UnreliableSink::new(MemorySink::new(), Crash::AfterBytes(10));
        let mut w = sink.writer("a").await.unwrap();
        w.write(b"12345").await.unwrap();
        assert!(w.write(b"67890").await.is_err());
        assert!(sink.get("a").await.is_err());
    }

    #[tokio::test]
    async fn dies_reading_the_chosen_object() {
        let inner = MemorySink::new();
        inner
            .put("x/cdc/1", Bytes::from_static(b"1"))
            .await
            .unwrap();
        inner
            .put("x/cdc/2", Bytes::from_static(b"2"))
            .await
            .unwrap();
        let sink = UnreliableSink::new(inner, Crash::at_read("/cdc/", 1));
        assert!(sink.get("x/cdc/1").await.unwrap().is_some());
        assert!(sink.get("x/cdc/2").await.is_err());
    }
}
