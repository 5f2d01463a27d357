//! Events for what comes next (DESIGN §9): EventBridge events put after the record they
//! announce is durable, source `pgshift`.
//!
//! | detail-type          | when                                                            |
//! |----------------------|-----------------------------------------------------------------|
//! | `Batch Committed`    | a CDC batch's checkpoint moved (its manifest is the record)      |
//! | `Table Loaded`       | a table's full-load (or reload) manifest was written             |
//! | `Load Finished`      | every table's manifest was written and the plan marked complete  |
//! |                      | (a reload's: with `reload`, its position R0)                     |
//! | `Task State Changed` | what an operator must act on: a poll failed, the slot was lost,  |
//! |                      | started or stopped lagging, the lease was lost, a load failed    |
//!
//! The detail schemas are `infra/events/*.schema.json` (each with an example); every detail
//! carries `version` (1) and `task`.
//!
//! An event never fails or repeats the work it announces: a put that still fails after its
//! retries is logged and counted (`events_failed` in the report, the `EventsFailed` metric),
//! and the poller re-announces, at its next run, every batch after the last one it announced
//! (the checkpoint item's `announced_through`). Consumers dedupe by manifest key.

use futures_util::FutureExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lsn::Lsn;

/// The events' `source`.
pub const SOURCE: &str = "pgshift";
/// The detail schemas' version.
pub const VERSION: u32 = 1;
/// Tables listed in one `Batch Committed` (an event is at most 256 KiB); the rest are counted.
pub const MAX_TABLES: usize = 200;

pub const BATCH_COMMITTED: &str = "Batch Committed";
pub const TABLE_LOADED: &str = "Table Loaded";
pub const LOAD_FINISHED: &str = "Load Finished";
pub const TASK_STATE_CHANGED: &str = "Task State Changed";

/// One event: its detail-type and detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub detail_type: String,
    pub detail: serde_json::Value,
}

impl Event {
    fn new(detail_type: &str, detail: &impl Serialize) -> Event {
        Event {
            detail_type: detail_type.to_owned(),
            detail: serde_json::to_value(detail).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// A table's part of a committed batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchTable {
    pub schema: String,
    pub table: String,
    pub key: String,
    pub rows: u64,
    pub bytes: u64,
}

/// `Batch Committed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchCommitted {
    pub version: u32,
    pub task: String,
    /// Where the stage is (`s3://bucket/prefix`, or a local folder).
    pub stage: String,
    pub manifest_key: String,
    pub batch_seq: u64,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub first_commit_lsn: Lsn,
    pub last_commit_lsn: Lsn,
    pub last_commit_ts: String,
    pub transactions: u64,
    pub changes: u64,
    pub bytes: u64,
    pub tables: Vec<BatchTable>,
    /// Tables of the batch not listed (past [`MAX_TABLES`]).
    pub tables_not_listed: usize,
    /// Sent again by a later poll, after a put that failed (or a run that died before it).
    pub reannounced: bool,
    /// The batch's transaction file (PreserveTransactions with CdcPath): every table's
    /// changes in commit order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_file: Option<String>,
}

impl BatchCommitted {
    pub fn from_manifest(
        stage: &str,
        key: &str,
        m: &crate::staging::layout::BatchManifest,
        reannounced: bool,
    ) -> BatchCommitted {
        let tables: Vec<BatchTable> = m
            .files
            .iter()
            .map(|f| BatchTable {
                schema: f.schema.clone(),
                table: f.table.clone(),
                key: f.key.clone(),
                rows: f.rows,
                bytes: f.bytes,
            })
            .collect();
        BatchCommitted {
            version: VERSION,
            task: m.task.clone(),
            stage: stage.to_owned(),
            manifest_key: key.to_owned(),
            batch_seq: m.batch_seq,
            start_lsn: m.start_lsn,
            end_lsn: m.end_lsn,
            first_commit_lsn: m.first_commit_lsn,
            last_commit_lsn: m.last_commit_lsn,
            last_commit_ts: m.last_commit_ts.clone(),
            transactions: m.transactions,
            changes: m.changes,
            bytes: tables.iter().map(|t| t.bytes).sum(),
            tables_not_listed: tables.len().saturating_sub(MAX_TABLES),
            tables: tables.into_iter().take(MAX_TABLES).collect(),
            reannounced,
            transaction_file: m.transaction_file.as_ref().map(|t| t.key.clone()),
        }
    }

    pub fn event(&self) -> Event {
        Event::new(BATCH_COMMITTED, self)
    }
}

/// `Table Loaded`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableLoaded {
    pub version: u32,
    pub task: String,
    pub stage: String,
    pub schema: String,
    pub table: String,
    pub manifest_key: String,
    pub rows: u64,
    pub bytes: u64,
    pub chunks: usize,
    /// Where the task's CDC starts (none for a load without CDC).
    pub l0: Option<Lsn>,
}

impl TableLoaded {
    pub fn event(&self) -> Event {
        Event::new(TABLE_LOADED, self)
    }
}

/// `Load Finished`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadFinished {
    pub version: u32,
    pub task: String,
    pub stage: String,
    pub tables: usize,
    pub rows: u64,
    pub bytes: u64,
    pub l0: Option<Lsn>,
    /// A reload's position R0 (DMS's "reload table"): the tables were loaded again into the
    /// running task; absent for the full load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<Lsn>,
}

impl LoadFinished {
    pub fn event(&self) -> Event {
        Event::new(LOAD_FINISHED, self)
    }
}

/// What changed, in `Task State Changed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// A CDC poll failed (it is retried at the next schedule).
    PollFailed,
    /// The slot is gone or its WAL was removed: the task must start over.
    SlotLost,
    /// The slot's retained WAL passed the alert threshold.
    SlotLagging,
    /// The slot's retained WAL is back under the threshold.
    SlotCaughtUp,
    /// Another poller took the lease mid-run.
    LeaseLost,
    /// A full load failed.
    LoadFailed,
    /// Applying to a target failed.
    ApplyFailed,
}

impl TaskState {
    pub fn severity(self) -> &'static str {
        match self {
            TaskState::SlotCaughtUp => "info",
            TaskState::SlotLagging | TaskState::LeaseLost | TaskState::PollFailed => "warning",
            _ => "error",
        }
    }
}

/// `Task State Changed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStateChanged {
    pub version: u32,
    pub task: String,
    pub state: TaskState,
    pub severity: String,
    /// What happened, as pgshift reports it (never row values or secrets).
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_retained_bytes: Option<i64>,
}

impl TaskStateChanged {
    pub fn new(task: &str, state: TaskState, message: impl Into<String>) -> TaskStateChanged {
        TaskStateChanged {
            version: VERSION,
            task: task.to_owned(),
            state,
            severity: state.severity().to_owned(),
            message: message.into(),
            slot: None,
            slot_retained_bytes: None,
        }
    }

    /// The state an error of a job is reported as.
    pub fn from_error(task: &str, job: Job, e: &Error) -> TaskStateChanged {
        let state = match (job, e) {
            (_, Error::SlotLost(_)) => TaskState::SlotLost,
            (Job::Cdc, Error::Conflict(m)) if m.contains("lost the lease") => TaskState::LeaseLost,
            (Job::Cdc, _) => TaskState::PollFailed,
            (Job::Load, _) => TaskState::LoadFailed,
            (Job::Apply, _) => TaskState::ApplyFailed,
        };
        TaskStateChanged::new(task, state, e.to_string())
    }

    pub fn event(&self) -> Event {
        Event::new(TASK_STATE_CHANGED, self)
    }
}

/// Which job an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    Cdc,
    Load,
    Apply,
}

/// Detail-types that ask the apply function to apply (`Apply Continue`: the message it leaves
/// itself when its time runs out).
pub const APPLY_TRIGGERS: [&str; 3] = [BATCH_COMMITTED, LOAD_FINISHED, APPLY_CONTINUE];
pub const APPLY_CONTINUE: &str = "Apply Continue";

/// Of an SQS event's messages (EventBridge events a rule delivered), how many ask `task`'s
/// apply to run and how many do not concern it. A malformed event is an error naming the
/// message.
pub fn apply_triggers(payload: &serde_json::Value, task: &str) -> Result<(usize, usize)> {
    use serde_json::Value;
    let records = payload
        .get("Records")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::event("Records", "must be the SQS event's list of messages"))?;
    let (mut ours, mut others) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        let body = r
            .get("body")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::event(format!("Records[{i}].body"), "must be a string"))?;
        let e: Value = serde_json::from_str(body).map_err(|e| {
            Error::event(
                format!("Records[{i}].body"),
                format!("is not an EventBridge event: {e}"),
            )
        })?;
        let detail_type = e.get("detail-type").and_then(Value::as_str).unwrap_or("");
        let for_task = e.pointer("/detail/task").and_then(Value::as_str);
        if e.get("source").and_then(Value::as_str) == Some(SOURCE)
            && APPLY_TRIGGERS.contains(&detail_type)
            && for_task == Some(task)
        {
            ours += 1;
        } else {
            tracing::warn!(index = i, detail_type, task = ?for_task, "a message that is not this task's trigger; left alone");
            others += 1;
        }
    }
    Ok((ours, others))
}

/// The message the apply function leaves on its queue to go on in its next invocation.
pub fn apply_continue(task: &str, why: &str) -> serde_json::Value {
    serde_json::json!({
        "source": SOURCE,
        "detail-type": APPLY_CONTINUE,
        "detail": {"version": VERSION, "task": task, "reason": why},
    })
}

/// Where events go: EventBridge, or (tests) memory.
pub trait EventSink: Send + Sync {
    /// Puts the events (all or an error).
    fn put<'a>(
        &'a self,
        events: &'a [Event],
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;
    /// The bus, for messages.
    fn describe(&self) -> String;
}

/// What an announcement did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announced {
    pub put: u64,
    pub failed: u64,
}

/// A job's events: off (the CLI's default), or a sink.
#[derive(Clone, Default)]
pub struct Events(Option<Arc<dyn EventSink>>);

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(s) => write!(f, "Events({})", s.describe()),
            None => f.write_str("Events(off)"),
        }
    }
}

impl Events {
    pub fn off() -> Events {
        Events(None)
    }

    pub fn to(sink: Arc<dyn EventSink>) -> Events {
        Events(Some(sink))
    }

    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Puts the events; never fails (a failure is logged and counted).
    pub async fn announce(&self, events: &[Event]) -> Announced {
        let Some(sink) = &self.0 else {
            return Announced::default();
        };
        if events.is_empty() {
            return Announced::default();
        }
        match sink.put(events).await {
            Ok(()) => Announced {
                put: events.len() as u64,
                failed: 0,
            },
            Err(e) => {
                tracing::warn!(bus = %sink.describe(), events = events.len(), error = %e, "putting events failed; the next poll re-announces batches");
                Announced {
                    put: 0,
                    failed: events.len() as u64,
                }
            }
        }
    }
}

/// EventBridge `PutEvents` on a bus (name or ARN; `default`), ten entries a request, entries
/// that failed retried with backoff (on top of the SDK's own retries).
pub struct EventBridge {
    client: aws_sdk_eventbridge::Client,
    bus: String,
}

impl EventBridge {
    pub fn new(client: aws_sdk_eventbridge::Client, bus: impl Into<String>) -> EventBridge {
        EventBridge {
            client,
            bus: bus.into(),
        }
    }

    async fn put_all(&self, events: &[Event]) -> Result<()> {
        use aws_sdk_eventbridge::types::PutEventsRequestEntry;
        for group in events.chunks(10) {
            let mut pending: Vec<&Event> = group.iter().collect();
            let mut attempt = 0u32;
            loop {
                let entries: Vec<PutEventsRequestEntry> = pending
                    .iter()
                    .map(|e| {
                        PutEventsRequestEntry::builder()
                            .source(SOURCE)
                            .detail_type(&e.detail_type)
                            .detail(e.detail.to_string())
                            .event_bus_name(&self.bus)
                            .build()
                    })
                    .collect();
                let out = self
                    .client
                    .put_events()
                    .set_entries(Some(entries))
                    .send()
                    .boxed()
                    .await
                    .map_err(|e| {
                        crate::error::sdk_error(
                            "eventbridge",
                            format!("PutEvents on bus {}", self.bus),
                            e,
                        )
                    })?;
                let results = out.entries();
                let failed: Vec<(&Event, String)> = pending
                    .iter()
                    .zip(results.iter().map(Some).chain(std::iter::repeat(None)))
                    .filter_map(|(e, r)| match r {
                        Some(r) if r.error_code().is_none() => None,
                        Some(r) => Some((
                            *e,
                            format!(
                                "{}: {}",
                                r.error_code().unwrap_or_default(),
                                r.error_message().unwrap_or_default()
                            ),
                        )),
                        None => Some((*e, "no result".to_owned())),
                    })
                    .collect();
                if failed.is_empty() {
                    break;
                }
                attempt += 1;
                if attempt >= 3 {
                    return Err(Error::Aws {
                        service: "eventbridge",
                        context: format!("PutEvents on bus {}", self.bus),
                        detail: format!(
                            "{} of {} entries failed ({})",
                            failed.len(),
                            pending.len(),
                            failed[0].1
                        ),
                        transient: true,
                        source: None,
                    });
                }
                tokio::time::sleep(std::time::Duration::from_millis(100 << (2 * attempt))).await;
                pending = failed.into_iter().map(|(e, _)| e).collect();
            }
        }
        Ok(())
    }
}

impl EventSink for EventBridge {
    fn put<'a>(
        &'a self,
        events: &'a [Event],
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(self.put_all(events))
    }

    fn describe(&self) -> String {
        format!("EventBridge bus {}", self.bus)
    }
}

/// Events kept in memory (job-level tests), failing while `fail` is set.
#[derive(Default)]
pub struct MemoryEvents {
    pub events: std::sync::Mutex<Vec<Event>>,
    pub fail: std::sync::atomic::AtomicBool,
}

impl EventSink for MemoryEvents {
    fn put<'a>(
        &'a self,
        events: &'a [Event],
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(async move {
            if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::Aws {
                    service: "eventbridge",
                    context: "memory events".to_owned(),
                    detail: "failing on purpose".to_owned(),
                    transient: true,
                    source: None,
                });
            }
            if let Ok(mut all) = self.events.lock() {
                all.extend_from_slice(events);
            }
            Ok(())
        })
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}

/// The events a bus setting asks for: none for `none`/`off`/empty, else EventBridge on it.
pub fn for_bus(aws: &crate::aws::Aws, bus: Option<&str>) -> Events {
    match bus.map(str::trim) {
        None | Some("" | "none" | "off") => Events::off(),
        Some(bus) => Events::to(Arc::new(EventBridge::new(aws.eventbridge(), bus))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(body: serde_json::Value) -> serde_json::Value {
        json!({"messageId": "1", "body": body.to_string(), "eventSource": "aws:sqs"})
    }

    #[test]
    fn only_this_tasks_triggers_count() {
        let ours = json!({"source": "pgshift", "detail-type": "Batch Committed", "detail": {"task": "t1"}});
        let other_task =
            json!({"source": "pgshift", "detail-type": "Load Finished", "detail": {"task": "t2"}});
        let other_type =
            json!({"source": "pgshift", "detail-type": "Table Loaded", "detail": {"task": "t1"}});
        let payload = json!({"Records": [
            message(ours),
            message(other_task),
            message(other_type),
            message(apply_continue("t1", "time ran out")),
        ]});
        assert_eq!(apply_triggers(&payload, "t1").unwrap(), (2, 2));
    }

    #[test]
    fn malformed_messages_are_named() {
        let err = apply_triggers(&json!({"nope": 1}), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Records"), "{err}");
        let err = apply_triggers(&json!({"Records": [{"body": "{not json"}]}), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Records[0].body"), "{err}");
        let err = apply_triggers(&json!({"Records": [{"body": 5}]}), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Records[0].body"), "{err}");
    }
}
