//! Task state: the [`StateStore`] seam, with DynamoDB ([`DynamoStore`]), local-file
//! ([`FileStore`]) and in-memory ([`MemoryStore`]) implementations.
//!
//! The model is DESIGN §6's single table: partition key `pk` = task id, sort key `sk` (`task`,
//! `cdc`, `chunk#..`). Each item is a JSON document plus a version number. Every write is
//! conditional on the version the writer read (or on the item not existing), so a lost race is
//! an [`Error::Conflict`], never a silent overwrite. In DynamoDB the document is stored as
//! native attributes (numbers as `N`), so a checkpoint LSN is a number there too.

use std::future::Future;

use serde_json::Value;

use crate::error::{Error, Result};

/// A stored document and its version.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub version: u64,
    pub doc: Value,
}

/// The state seam.
pub trait StateStore: Send + Sync + 'static {
    /// Reads an item.
    fn get(&self, task: &str, key: &str) -> impl Future<Output = Result<Option<Versioned>>> + Send;
    /// Writes `doc` if the stored version is `expected` (`None`: the item must not exist yet).
    /// Returns the new version; a mismatch is [`Error::Conflict`].
    fn put(
        &self,
        task: &str,
        key: &str,
        doc: &Value,
        expected: Option<u64>,
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Where the state lives, for messages.
    /// Deletes an item (no error when it does not exist): a task started over (`teardown
    /// --reset`), never a job's step.
    fn delete(&self, task: &str, key: &str) -> impl Future<Output = Result<()>> + Send;
    fn describe(&self) -> String;
}

/// An item document from a typed record.
pub fn to_doc<T: serde::Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::config("state", e.to_string()))
}

/// A typed record from an item document; `what` names the item in errors.
pub fn from_doc<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T> {
    serde_json::from_value(v)
        .map_err(|e| Error::config("state", format!("{what} item is malformed: {e}")))
}

/// Milliseconds since the Unix epoch (lease expiries are stored this way).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn conflict(task: &str, key: &str, expected: Option<u64>) -> Error {
    Error::Conflict(match expected {
        None => format!("{task}/{key} already exists"),
        Some(v) => format!("{task}/{key} changed since version {v} was read"),
    })
}

mod dynamodb;
mod file;
mod memory;
pub mod records;
pub mod unreliable;

pub use dynamodb::DynamoStore;
pub use file::FileStore;
pub use memory::MemoryStore;
pub use unreliable::UnreliableStore;

#[cfg(test)]
mod tests;
