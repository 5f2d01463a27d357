//! State in one JSON file per task under a folder.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use super::{StateStore, Versioned, conflict};
use crate::error::{Error, Result};
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

    /// Under the task's lock: applies `change` to its items and replaces the file.
    fn update_blocking<T>(
        &self,
        task: &str,
        change: impl FnOnce(&mut BTreeMap<String, (u64, Value)>) -> Result<T>,
    ) -> Result<T> {
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
        let out = change(&mut all)?;
        let tmp = path.with_extension(format!("json.tmp-{}", uuid::Uuid::new_v4().simple()));
        let text =
            serde_json::to_vec_pretty(&all).map_err(|e| Error::config("state", e.to_string()))?;
        std::fs::write(&tmp, text)
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::io(format!("replacing {}", path.display()), e))?;
        drop(lock);
        Ok(out)
    }

    fn put_blocking(
        &self,
        task: &str,
        key: &str,
        doc: &Value,
        expected: Option<u64>,
    ) -> Result<u64> {
        self.update_blocking(task, |all| {
            let current = all.get(key).map(|(v, _)| *v);
            if current != expected {
                return Err(conflict(task, key, expected));
            }
            let version = expected.unwrap_or(0) + 1;
            all.insert(key.to_owned(), (version, doc.clone()));
            Ok(version)
        })
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

    async fn delete(&self, task: &str, key: &str) -> Result<()> {
        let this = self.clone();
        let (task, key) = (task.to_owned(), key.to_owned());
        tokio::task::spawn_blocking(move || {
            this.update_blocking(&task, |all| {
                all.remove(&key);
                Ok(())
            })
        })
        .await
        .map_err(|e| Error::io("state write task", std::io::Error::other(e.to_string())))?
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}
