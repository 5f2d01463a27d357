//! The full-load Lambda, driven by `infra/statemachine/full-load.asl.json`: wiring only. Events
//! are `{"action": "Plan"}`, `{"action": "ExportChunk", "chunk": {..}}` and
//! `{"action": "Finish"}`; the job is `pgshift::job::full_load`.

use std::time::Duration;

use bytes::Bytes;
use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use pgshift::Error;
use pgshift::aws::Aws;
use pgshift::config::{LambdaEnv, SslMode};
use pgshift::job::full_load::{
    self, CHUNK_LIST_KEY, ChunkManifestRef, FullLoadEvent, INLINE_CHUNK_LIMIT, LoadOptions,
    PlanOutput,
};
use pgshift::stage::{ObjectSink, S3Sink};
use pgshift::state::DynamoStore;

struct Deps {
    aws: Aws,
    env: LambdaEnv,
    task: String,
    secret: String,
    sink: S3Sink,
    state: DynamoStore,
}

async fn handle(
    deps: &Deps,
    event: LambdaEvent<serde_json::Value>,
) -> Result<serde_json::Value, Diagnostic> {
    run(deps, event).await.map_err(pgshift::lambda::diagnostic)
}

async fn options(deps: &Deps, owner: String, remaining: Duration) -> pgshift::Result<LoadOptions> {
    let source = deps
        .aws
        .read_source_secret(
            &deps.secret,
            Some(deps.env.source_sslmode.unwrap_or(SslMode::Require)),
        )
        .await?;
    let mut opts = LoadOptions::new(&deps.task, source, owner);
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
    deps: &Deps,
    event: LambdaEvent<serde_json::Value>,
) -> pgshift::Result<serde_json::Value> {
    let action = FullLoadEvent::from_json(event.payload)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let remaining = Duration::from_millis(event.context.deadline.saturating_sub(now_ms));
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

fn required(value: Option<String>, name: &str) -> Result<String, Error> {
    value.ok_or_else(|| Error::config(name, "must be set"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    pgshift::lambda::init_tracing();
    let env = LambdaEnv::from_pairs(std::env::vars())?;
    let aws = Aws::from_env().await;
    let task = required(env.task.clone(), "PGSHIFT_TASK")?;
    let secret = required(env.source_secret_arn.clone(), "PGSHIFT_SOURCE_SECRET_ARN")?;
    let sink = S3Sink::new(aws.s3(), &required(env.stage.clone(), "PGSHIFT_STAGE")?)?;
    let state = DynamoStore::new(
        aws.dynamodb(),
        required(env.state_table.clone(), "PGSHIFT_STATE_TABLE")?,
    );
    let deps = Deps {
        aws,
        env,
        task,
        secret,
        sink,
        state,
    };
    let deps = &deps;
    lambda_runtime::run(service_fn(move |event| handle(deps, event))).await
}
