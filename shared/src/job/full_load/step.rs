//! The state machine's side of the full load (`infra/statemachine/full-load.asl.json`): the
//! function's event, and the Plan step's output (chunks inline, or staged for a Distributed Map).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::staging::ObjectSink;
use crate::staging::layout::{self, CHUNK_LIST_KEY};
use crate::state::records::{ChunkId, PlanRecord};

/// The full-load function's event: one of the state machine's three steps, for the load or
/// for a reload of some tables into the running task (an execution started with
/// `{"reload": ["schema.table", ..]}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FullLoadEvent {
    Plan,
    ExportChunk {
        chunk: ChunkId,
    },
    Finish,
    /// `{"action": "Plan", "reload": ["public.orders"]}`.
    PlanReload {
        tables: Vec<(String, String)>,
    },
    /// `{"action": "Finish", "reload": "<R0 from the plan>"}`.
    FinishReload {
        r0: Lsn,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    action: Action,
    #[serde(default)]
    chunk: Option<ChunkId>,
    #[serde(default)]
    reload: Option<serde_json::Value>,
}

#[derive(Deserialize)]
enum Action {
    Plan,
    ExportChunk,
    Finish,
}

impl FullLoadEvent {
    /// Parses `{"action": "Plan" | "ExportChunk" | "Finish", "chunk": {..}}`, naming the field
    /// that is wrong.
    pub fn from_json(value: serde_json::Value) -> Result<FullLoadEvent> {
        let raw: RawEvent = crate::task::parse_event(value)?;
        match (&raw.action, raw.reload) {
            (Action::Plan, Some(list)) if raw.chunk.is_none() => {
                let names: Vec<String> = serde_json::from_value(list).map_err(|_| {
                    Error::event("reload", "must be a list of \"schema.table\" names")
                })?;
                let tables = super::reload::parse_tables(&names)
                    .map_err(|e| Error::event("reload", e.to_string()))?;
                return Ok(FullLoadEvent::PlanReload { tables });
            }
            (Action::Finish, Some(r0)) if raw.chunk.is_none() => {
                let r0 = r0.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                    Error::event(
                        "reload",
                        "must be the reload's position (the plan's `reload`, X/Y)",
                    )
                })?;
                return Ok(FullLoadEvent::FinishReload { r0 });
            }
            (Action::ExportChunk, Some(_)) => {
                return Err(Error::event(
                    "reload",
                    "ExportChunk takes the chunk only (a reload's chunk says so itself)",
                ));
            }
            _ => {}
        }
        match (raw.action, raw.chunk) {
            (Action::Plan, None) => Ok(FullLoadEvent::Plan),
            (Action::Finish, None) => Ok(FullLoadEvent::Finish),
            (Action::ExportChunk, Some(chunk)) => Ok(FullLoadEvent::ExportChunk { chunk }),
            (Action::ExportChunk, None) => Err(Error::event(
                "chunk",
                "ExportChunk needs the chunk to export",
            )),
            (_, Some(_)) => Err(Error::event("chunk", "only ExportChunk takes a chunk")),
        }
    }
}

/// Plans of more chunks than this go to the Map state as an S3 object (Distributed Map).
pub const INLINE_CHUNK_LIMIT: usize = 1000;

/// The Plan step's result for the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanOutput {
    pub task: String,
    pub chunk_count: usize,
    /// The chunks, when at most [`INLINE_CHUNK_LIMIT`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Vec<ChunkId>>,
    /// Otherwise the staged JSON array of chunks, for the Distributed Map's ItemReader.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_manifest: Option<ChunkManifestRef>,
    pub max_concurrency: u32,
    pub l0: Option<Lsn>,
    /// A reload's position (R0): the Finish step's `reload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<Lsn>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkManifestRef {
    pub bucket: String,
    pub key: String,
}

/// The Plan step's output for the state machine: the chunks inline, or (more than
/// [`INLINE_CHUNK_LIMIT`]) staged as [`CHUNK_LIST_KEY`] for a Distributed Map, whose bucket
/// and key `locate` gives.
pub async fn plan_output<S: ObjectSink>(
    sink: &S,
    task: &str,
    plan: &PlanRecord,
    ids: Vec<ChunkId>,
    max_concurrency: u32,
    locate: impl Fn(&str) -> Result<(String, String)>,
) -> Result<PlanOutput> {
    let mut out = PlanOutput {
        task: task.to_owned(),
        chunk_count: ids.len(),
        chunks: None,
        chunk_manifest: None,
        max_concurrency,
        l0: plan.l0,
        reload: plan.reload,
    };
    if ids.len() <= INLINE_CHUNK_LIMIT {
        out.chunks = Some(ids);
    } else {
        layout::put_json(sink, CHUNK_LIST_KEY, &ids).await?;
        let (bucket, key) = locate(CHUNK_LIST_KEY)?;
        out.chunk_manifest = Some(ChunkManifestRef { bucket, key });
    }
    Ok(out)
}
