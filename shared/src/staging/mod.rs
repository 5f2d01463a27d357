//! Staging: where staged data goes, what it is called, and how rows are encoded.
//!
//! - the [`ObjectSink`] seam, with S3 ([`S3Sink`]), local-folder ([`LocalSink`]) and
//!   in-memory ([`MemorySink`]) implementations, and [`UnreliableSink`] for fault injection;
//! - [`layout`]: every object key and manifest type; [`encode`]: rows → CSV, JSON Lines,
//!   Parquet; [`decode`]: staged CSV read back; [`dialect`]: DMS's CSV settings.
//!
//! Keys are relative to the sink's prefix and use `/` separators. An object becomes visible
//! only when its writer finishes: S3 completes the multipart upload (or puts a small object
//! whole), the folder renames a temporary file into place. A writer that is dropped or aborted
//! leaves nothing at the key (S3 aborts the upload; the bucket's lifecycle rule reaps any that
//! a crash left). Memory stays bounded: a writer holds at most one part.

use std::future::Future;

use bytes::Bytes;

use crate::error::{Error, Result};

/// A place objects are written to and read back from.
pub trait ObjectSink: Send + Sync + 'static {
    type Writer: ObjectWriter;

    /// Starts writing `key`; nothing is visible until [`ObjectWriter::finish`].
    fn writer(&self, key: &str) -> impl Future<Output = Result<Self::Writer>> + Send;
    /// Writes a small object in one go, replacing any previous one.
    fn put(&self, key: &str, body: Bytes) -> impl Future<Output = Result<()>> + Send;
    /// Reads an object; `None` when it does not exist.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Bytes>>> + Send;
    /// Reads an object in pieces, so a large one is never held whole; `None` when it does
    /// not exist. (By default: read whole, one piece.)
    fn reader(&self, key: &str) -> impl Future<Output = Result<Option<ObjectReader>>> + Send {
        let got = self.get(key);
        async move { Ok(got.await?.map(ObjectReader::whole)) }
    }
    /// Keys starting with `prefix`, sorted.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// Deletes an object (no error when it does not exist).
    fn delete(&self, key: &str) -> impl Future<Output = Result<()>> + Send;
    /// Where this sink writes (`s3://bucket/prefix`, a folder), for messages.
    fn describe(&self) -> String;
    /// Removes what killed writers left behind (a folder's temporary files of processes that
    /// are gone; S3's lifecycle rule reaps incomplete uploads). Returns how many were removed.
    fn sweep(&self) -> impl Future<Output = Result<u64>> + Send {
        std::future::ready(Ok(0))
    }
}

/// The pieces of an object being read ([`ObjectSink::reader`]).
pub struct ObjectReader(std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes>> + Send>>);

impl ObjectReader {
    pub fn new(stream: impl futures_util::Stream<Item = Result<Bytes>> + Send + 'static) -> Self {
        ObjectReader(Box::pin(stream))
    }

    /// An object already read whole.
    pub fn whole(body: Bytes) -> Self {
        ObjectReader::new(futures_util::stream::iter([Ok(body)]))
    }

    /// The next piece, `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        use futures_util::StreamExt;
        self.0.next().await.transpose()
    }
}

/// Bytes a reader asks for at a time.
pub const READ_PIECE: usize = 1 << 20;

/// A streaming write of one object.
pub trait ObjectWriter: Send {
    /// Appends bytes; uploads a part when the buffer is full.
    fn write(&mut self, data: &[u8]) -> impl Future<Output = Result<()>> + Send;
    /// Makes the object visible; returns its size in bytes.
    fn finish(self) -> impl Future<Output = Result<u64>> + Send;
    /// Discards what was written.
    fn abort(self) -> impl Future<Output = ()> + Send;
}

/// Checks a key: relative, no empty or `..` segments.
pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key.starts_with('/')
        || key
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(Error::config("key", format!("invalid object key {key:?}")));
    }
    Ok(())
}

pub mod decode;
pub mod dialect;
pub mod encode;
pub mod layout;
mod local;
mod memory;
pub mod s3;
pub mod unreliable;

pub use local::{LocalSink, LocalWriter};
pub use memory::{MemorySink, MemoryWriter};
pub use s3::{Encryption, S3_PART_SIZE, S3Sink, S3Writer, parse_s3_url};
pub use unreliable::{Crash, UnreliableSink};

#[cfg(test)]
mod tests;
