//! The full-load Lambda, driven by `infra/statemachine/full-load.asl.json`: wiring only. Events
//! are `{"action": "Plan"}`, `{"action": "ExportChunk", "chunk": {..}}` and
//! `{"action": "Finish"}`, and for a reload of tables into the running task (an execution
//! started with `{"reload": [..]}`) `{"action": "Plan", "reload": ["schema.table"]}` and
//! `{"action": "Finish", "reload": "<R0>"}`; the job is `pgshift::job::full_load`.

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use pgshift::Error;
use pgshift::job::full_load::{self, FullLoadEvent};
use pgshift::lambda::StagedDeps;
use pgshift::options::{LoadOptions, TaskSettings};

async fn handle(
    deps: &StagedDeps,
    event: LambdaEvent<serde_json::Value>,
) -> Result<serde_json::Value, Diagnostic> {
    let chunk = chunk_label(&event.payload);
    match Box::pin(run(deps, event)).await {
        Ok(v) => Ok(v),
        Err(e) => {
            deps.after_error(&e).await;
            Err(pgshift::lambda::diagnostic_in(e, chunk.as_deref()))
        }
    }
}

/// `chunk <schema>.<table>#<n>` of an ExportChunk event, for its error message (the state
/// machine's failure cause).
fn chunk_label(payload: &serde_json::Value) -> Option<String> {
    let c = payload.get("chunk")?;
    Some(format!(
        "chunk {}.{}#{}",
        c.get("schema")?.as_str()?,
        c.get("table")?.as_str()?,
        c.get("n")?.as_u64()?
    ))
}

async fn options(deps: &StagedDeps, ctx: &lambda_runtime::Context) -> pgshift::Result<LoadOptions> {
    let remaining = pgshift::lambda::remaining(ctx);
    Ok(TaskSettings::from(&deps.env).load_options(
        &deps.task,
        deps.source().await?,
        ctx.request_id.clone(),
        Some(remaining),
    ))
}

fn json<T: serde::Serialize>(v: &T) -> pgshift::Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Source(format!("cannot serialize the result: {e}")))
}

/// The Plan step's result for the state machine (the load's or a reload's).
async fn plan_output(
    deps: &StagedDeps,
    plan: &pgshift::state::records::PlanRecord,
    ids: Vec<pgshift::state::records::ChunkId>,
) -> pgshift::Result<serde_json::Value> {
    let out = full_load::plan_output(
        &deps.sink,
        &deps.task,
        plan,
        ids,
        deps.env.max_concurrency,
        |key| deps.sink.locate(key),
    )
    .await?;
    json(&out)
}

async fn run(
    deps: &StagedDeps,
    event: LambdaEvent<serde_json::Value>,
) -> pgshift::Result<serde_json::Value> {
    match FullLoadEvent::from_json(event.payload)? {
        FullLoadEvent::Plan => {
            let opts = options(deps, &event.context).await?;
            let (plan, ids) = full_load::plan(&deps.sink, &deps.state, &opts).await?;
            plan_output(deps, &plan, ids).await
        }
        FullLoadEvent::ExportChunk { chunk } => {
            let opts = options(deps, &event.context).await?;
            let started = std::time::Instant::now();
            let record = full_load::export_chunk(&deps.sink, &deps.state, &opts, &chunk).await?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{}",
                pgshift::metrics::chunk_line(&deps.task, record.rows, record.bytes, secs)
            );
            json(&record)
        }
        FullLoadEvent::PlanReload { tables } => {
            let opts = options(deps, &event.context).await?;
            let (plan, ids, _) =
                full_load::reload::plan(&deps.sink, &deps.state, &opts, &tables).await?;
            plan_output(deps, &plan, ids).await
        }
        FullLoadEvent::FinishReload { r0 } => {
            let manifests =
                full_load::reload::finish(&deps.sink, &deps.state, &deps.task, r0, &deps.events)
                    .await?;
            let rows: u64 = manifests.iter().map(|m| m.rows).sum();
            let tables: Vec<String> = manifests
                .iter()
                .map(|m| format!("{}.{}", m.schema, m.table))
                .collect();
            Ok(serde_json::json!({"task": deps.task, "reload": r0, "tables": tables, "rows": rows}))
        }
        FullLoadEvent::Finish => {
            let manifests =
                full_load::finish(&deps.sink, &deps.state, &deps.task, &deps.events).await?;
            let rows: u64 = manifests.iter().map(|m| m.rows).sum();
            println!(
                "{}",
                pgshift::metrics::load_finished_line(&deps.task, manifests.len(), rows)
            );
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
