//! What a task's jobs share, below the jobs (jobs never import jobs): the task item made on
//! the first run (publications, slot, record), and a Lambda event parsed naming its field.

use crate::config::{NativeStart, slot_name};
use crate::error::{Error, Result};
use crate::source::{Capture, CdcSource};
use crate::state::StateStore;
use crate::state::records::{self, TaskRecord};

/// The first step of the full load with CDC and of a CDC-only task: the task item, creating
/// the publication, slot and item when the task has none (and `create` allows it).
pub async fn ensure_task<Src: CdcSource, St: StateStore>(
    source: &Src,
    state: &St,
    task: &str,
    capture: &Capture,
    create: bool,
    created_by: &str,
) -> Result<TaskRecord> {
    if let Some(record) = records::get_task(state, task).await? {
        return Ok(record);
    }
    if !create {
        return Err(Error::Source(format!(
            "task {task} has no slot yet: run the full load with CDC (pgshift full-load --cdc) or a CDC-only task (pgshift cdc)"
        )));
    }
    let name = slot_name(task);
    let replication = source.create_replication(&name, capture).await?;
    let record = TaskRecord {
        slot: name.clone(),
        publication: name.clone(),
        start_lsn: replication.start_lsn,
        database: replication.database,
        created_by: created_by.to_owned(),
        adopted: false,
    };
    match records::create_task(state, task, record).await {
        Ok(r) => Ok(r),
        // The task could not be recorded: what was just created on the source is dropped, so
        // no slot is left holding WAL for a task that does not exist.
        Err(e) => {
            match source.drop_replication(&name).await {
                Ok(dropped) => {
                    tracing::warn!(task, ?dropped, error = %e, "the task could not be recorded; dropped what was created on the source")
                }
                Err(drop_err) => {
                    tracing::error!(task, error = %e, %drop_err, "the task could not be recorded, and its slot could not be dropped: run pgshift teardown")
                }
            }
            Err(e)
        }
    }
}

/// A CDC task on its user's slot and publication ([`NativeStart`]): the task item made on the
/// first run (nothing is created on the source); later runs must name the same slot,
/// publication and start.
pub async fn adopt_task<Src: CdcSource, St: StateStore>(
    source: &Src,
    state: &St,
    task: &str,
    native: &NativeStart,
) -> Result<TaskRecord> {
    if let Some(record) = records::get_task(state, task).await? {
        let same = record.adopted
            && record.slot == native.slot
            && record.publication == native.publication
            && native.start.is_none_or(|s| s == record.start_lsn);
        if !same {
            return Err(Error::Source(format!(
                "task {task} reads slot {} and publication {} from {} ({}); it cannot switch to slot {} / publication {}{}: a start applies when a task starts (teardown --reset the task to start it over)",
                record.slot,
                record.publication,
                record.start_lsn,
                if record.adopted {
                    "its user's"
                } else {
                    "pgshift's own"
                },
                native.slot,
                native.publication,
                native
                    .start
                    .map(|s| format!(" from {s}"))
                    .unwrap_or_default(),
            )));
        }
        return Ok(record);
    }
    let replication = source
        .adopt_replication(&native.slot, &native.publication, native.start)
        .await?;
    let record = TaskRecord {
        slot: native.slot.clone(),
        publication: native.publication.clone(),
        start_lsn: replication.start_lsn,
        database: replication.database,
        created_by: "native-start".to_owned(),
        adopted: true,
    };
    tracing::info!(task, slot = %record.slot, publication = %record.publication, start = %record.start_lsn, "native start: the task reads its user's slot");
    records::create_task(state, task, record).await
}

/// Parses a Lambda event, naming the offending field on error (`endpoint.port: ...`).
pub fn parse_event<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> crate::Result<T> {
    if !value.is_object() {
        return Err(crate::Error::event("event", "must be a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "event".to_owned()
        } else {
            path
        };
        crate::Error::event(field, e.inner().to_string())
    })
}
