//! The full-load Lambda, driven by `infra/statemachine/full-load.asl.json`: wiring only. Events
//! are `{"action": "Plan"}`, `{"action": "ExportChunk", "chunk": {..}}` and
//! `{"action": "Finish"}`; the job is `pgshift::job::full_load`.

use std::time::Duration;

use bytes::Bytes;
use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use pgshift::Error;
use pgshift::job::full_load::{
    self, CHUNK_LIST_KEY, ChunkManifestRef, FullLoadEvent, INLINE_CHUNK_LIMIT, LoadOptions,
    PlanOutput,
};
use pgshift::lambda::StagedDeps;
use pgshift::staging::ObjectSink;

async fn handle(
    deps: &StagedDeps,
    event: LambdaEvent<serde_json::Value>,
) -> Result<serde_json::Value, Diagnostic> {
    run(deps, event).await.map_err(pgshift::lambda::diagnostic)
}

async fn options(
    deps: &StagedDeps,
    owner: String,
    remaining: Duration,
) -> pgshift::Result<LoadOptions> {
    let mut opts = LoadOptions::new(&deps.task, deps.source().await?, owner);
    opts.format = deps.env.format;
    opts.selection = deps.env.selection.clone();
    opts.chunk_mib = deps.env.chunk_mb;
    opts.cdc = deps.env.cdc;
    // A chunk's lease outlives the invocation that holds it by a margin.
    opts.lease_ttl = remaining + Duration::from_secs(60);
    Ok(opts)
}

fn json<T: serde::Serialize>(v: &T) -> pgshift::Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Source(e.to_string()))
}

async fn run(
    deps: &StagedDeps,
    event: LambdaEvent<serde_json::Value>,
) -> pgshift::Result<serde_json::Value> {
    let action = FullLoadEvent::from_json(event.payload)?;
    let remaining = pgshift::lambda::remaining(&event.context);
    match action {
        FullLoadEvent::Plan => {
            let opts = options(deps, event.context.request_id, remaining).await?;
            let (plan, ids) = full_load::plan(&deps.sink, &deps.state, &opts).await?;
            let mut out = PlanOutput {
                task: deps.task.clone(),
                chunk_count: ids.len(),
                chunks: None,
                chunk_manifest: None,
                max_concurrency: deps.env.max_concurrency,
                l0: plan.l0,
            };
            if ids.len() <= INLINE_CHUNK_LIMIT {
                out.chunks = Some(ids);
            } else {
                let body = serde_json::to_vec(&ids).map_err(|e| Error::Source(e.to_string()))?;
                deps.sink.put(CHUNK_LIST_KEY, Bytes::from(body)).await?;
                let (bucket, key) = deps.sink.locate(CHUNK_LIST_KEY)?;
                out.chunk_manifest = Some(ChunkManifestRef { bucket, key });
            }
            json(&out)
        }
        FullLoadEvent::ExportChunk { chunk } => {
            let opts = options(deps, event.context.request_id, remaining).await?;
            let record = full_load::export_chunk(&deps.sink, &deps.state, &opts, &chunk).await?;
            json(&record)
        }
        FullLoadEvent::Finish => {
            let manifests = full_load::finish(&deps.sink, &deps.state, &deps.task).await?;
            let rows: u64 = manifests.iter().map(|m| m.rows).sum();
            Ok(serde_json::json!({"task": deps.task, "tables": manifests.len(), "rows": rows}))
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    pgshift::lambda::init_tracing();
    let deps = StagedDeps::from_env().await?;
    let deps = &deps;
    lambda_runtime::run(service_fn(move |event| handle(deps, event))).await
}
