//! Task state: the [`StateStore`] seam, with DynamoDB ([`DynamoStore`]), local-file
//! ([`FileStore`]) and in-memory ([`MemoryStore`]) implementations.
//!
//! The model is DESIGN §6's single table: partition key `pk` = task id, sort key `sk` (`task`,
//! `cdc`, `chunk#..`). Each item is a JSON document plus a version number. Every write is
//! conditional on the version the writer read (or on the item not existing), so a lost race is
//! an [`Error::Conflict`], never a silent overwrite. In DynamoDB the document is stored as
//! native attributes (numbers as `N`), so a checkpoint LSN is a number there too.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::Value;

use crate::aws::sdk_error;
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

fn conflict(task: &str, key: &str, expected: Option<u64>) -> Error {
    Error::Conflict(match expected {
        None => format!("{task}/{key} already exists"),
        Some(v) => format!("{task}/{key} changed since version {v} was read"),
    })
}

// ---------------------------------------------------------------------------------------------
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

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Local file

/// State in one JSON file per task under a folder (the CLI's `./pgshift-data/state`). Writes
/// take an exclusive lock on `<task>.lock`, so two `pgshift` processes on one machine race
/// safely; the file is replaced by rename, so a crash leaves the old or the new state.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn new(dir: impl Into<PathBuf>) -> FileStore {
        FileStore { dir: dir.into() }
    }

    fn paths(&self, task: &str) -> Result<(PathBuf, PathBuf)> {
        crate::config::check_task_name(task)?;
        Ok((
            self.dir.join(format!("{task}.json")),
            self.dir.join(format!("{task}.lock")),
        ))
    }

    fn read_all(path: &std::path::Path) -> Result<BTreeMap<String, (u64, Value)>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::config(
                    "state",
                    format!("{} is not a pgshift state file: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    fn put_blocking(
        &self,
        task: &str,
        key: &str,
        doc: &Value,
        expected: Option<u64>,
    ) -> Result<u64> {
        let (path, lock_path) = self.paths(task)?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::io(format!("creating {}", self.dir.display()), e))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("opening {}", lock_path.display()), e))?;
        lock.lock()
            .map_err(|e| Error::io(format!("locking {}", lock_path.display()), e))?;
        let mut all = Self::read_all(&path)?;
        let current = all.get(key).map(|(v, _)| *v);
        if current != expected {
            return Err(conflict(task, key, expected));
        }
        let version = expected.unwrap_or(0) + 1;
        all.insert(key.to_owned(), (version, doc.clone()));
        let tmp = path.with_extension(format!("json.tmp-{}", uuid::Uuid::new_v4().simple()));
        let text =
            serde_json::to_vec_pretty(&all).map_err(|e| Error::config("state", e.to_string()))?;
        std::fs::write(&tmp, text)
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::io(format!("replacing {}", path.display()), e))?;
        drop(lock);
        Ok(version)
    }
}

impl StateStore for FileStore {
    async fn get(&self, task: &str, key: &str) -> Result<Option<Versioned>> {
        let (path, _) = self.paths(task)?;
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            Ok(Self::read_all(&path)?
                .remove(&key)
                .map(|(version, doc)| Versioned { version, doc }))
        })
        .await
        .map_err(|e| Error::io("state read task", std::io::Error::other(e.to_string())))?
    }

    async fn put(&self, task: &str, key: &str, doc: &Value, expected: Option<u64>) -> Result<u64> {
        let this = self.clone();
        let (task, key, doc) = (task.to_owned(), key.to_owned(), doc.clone());
        tokio::task::spawn_blocking(move || this.put_blocking(&task, &key, &doc, expected))
            .await
            .map_err(|e| Error::io("state write task", std::io::Error::other(e.to_string())))?
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// DynamoDB

/// State in a DynamoDB table (`pk` S, `sk` S; on-demand).
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl DynamoStore {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> DynamoStore {
        DynamoStore {
            client,
            table: table.into(),
        }
    }

    /// Creates the table if it does not exist (the CLI and tests; on AWS the stack creates it).
    pub async fn ensure_table(&self) -> Result<()> {
        use aws_sdk_dynamodb::types::{
            AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
        };
        let exists = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await;
        match exists {
            Ok(_) => return Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) => {}
            Err(e) => {
                return Err(sdk_error(
                    "dynamodb",
                    format!("describing table {}", self.table),
                    e,
                ));
            }
        }
        let attr = |n: &str| {
            AttributeDefinition::builder()
                .attribute_name(n)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| Error::config("state", e.to_string()))
        };
        let key = |n: &str, t: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(n)
                .key_type(t)
                .build()
                .map_err(|e| Error::config("state", e.to_string()))
        };
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr("pk")?)
            .attribute_definitions(attr("sk")?)
            .key_schema(key("pk", KeyType::Hash)?)
            .key_schema(key("sk", KeyType::Range)?)
            .send()
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_in_use_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(sdk_error(
                "dynamodb",
                format!("creating table {}", self.table),
                e,
            )),
        }
    }
}

/// JSON to a DynamoDB attribute (numbers stay numbers).
fn to_attr(v: &Value) -> AttributeValue {
    match v {
        Value::Null => AttributeValue::Null(true),
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Number(n) => AttributeValue::N(n.to_string()),
        Value::String(s) => AttributeValue::S(s.clone()),
        Value::Array(a) => AttributeValue::L(a.iter().map(to_attr).collect()),
        Value::Object(o) => {
            AttributeValue::M(o.iter().map(|(k, v)| (k.clone(), to_attr(v))).collect())
        }
    }
}

fn from_attr(a: &AttributeValue) -> Value {
    match a {
        AttributeValue::Null(_) => Value::Null,
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::N(n) => n
            .parse::<u64>()
            .map(Value::from)
            .or_else(|_| n.parse::<i64>().map(Value::from))
            .or_else(|_| n.parse::<f64>().map(Value::from))
            .unwrap_or(Value::Null),
        AttributeValue::S(s) => Value::String(s.clone()),
        AttributeValue::L(l) => Value::Array(l.iter().map(from_attr).collect()),
        AttributeValue::M(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), from_attr(v))).collect())
        }
        _ => Value::Null,
    }
}

impl StateStore for DynamoStore {
    async fn get(&self, task: &str, key: &str) -> Result<Option<Versioned>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(task.to_owned()))
            .key("sk", AttributeValue::S(key.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_error("dynamodb", format!("reading {task}/{key}"), e))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        let version = item
            .get("version")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                Error::config("state", format!("{task}/{key} has no version attribute"))
            })?;
        let doc = item.get("doc").map(from_attr).unwrap_or(Value::Null);
        Ok(Some(Versioned { version, doc }))
    }

    async fn put(&self, task: &str, key: &str, doc: &Value, expected: Option<u64>) -> Result<u64> {
        let version = expected.unwrap_or(0) + 1;
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(task.to_owned()))
            .item("sk", AttributeValue::S(key.to_owned()))
            .item("version", AttributeValue::N(version.to_string()))
            .item("doc", to_attr(doc));
        req = match expected {
            None => req.condition_expression("attribute_not_exists(pk)"),
            Some(v) => req
                .condition_expression("version = :expected")
                .expression_attribute_values(":expected", AttributeValue::N(v.to_string())),
        };
        match req.send().await {
            Ok(_) => Ok(version),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Err(conflict(task, key, expected))
            }
            Err(e) => Err(sdk_error("dynamodb", format!("writing {task}/{key}"), e)),
        }
    }

    fn describe(&self) -> String {
        format!("dynamodb://{}", self.table)
    }
}

#[cfg(test)]
mod tests {
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
        let dir =
            std::env::temp_dir().join(format!("pgshift-state-{}", uuid::Uuid::new_v4().simple()));
        conditional_writes(FileStore::new(&dir)).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn attributes_round_trip() {
        let doc = serde_json::json!({"n": 42, "big": u64::MAX, "neg": -3, "s": "x", "b": true, "z": null, "l": [1, "a"], "m": {"k": 1.5}});
        assert_eq!(from_attr(&to_attr(&doc)), doc);
    }
}
