//! The cdc-poller Lambda, started by EventBridge Scheduler (`{}` polls; `{"action": "Watch"}`
//! only reads what the slot retains, on its own schedule): wiring only. The job is
//! `pgshift::job::cdc_poll`; this builds clients once per cold start and per invocation passes
//! the deadline and the request id (the lease owner).

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use pgshift::Error;
use pgshift::job::{cdc_poll, slot_watch};
use pgshift::lambda::StagedDeps;
use pgshift::options::TaskSettings;

async fn handle(
    deps: &StagedDeps,
    event: LambdaEvent<serde_json::Value>,
) -> Result<serde_json::Value, Diagnostic> {
    match run(deps, event).await {
        Ok(v) => Ok(v),
        Err(e) => {
            deps.after_error(&e).await;
            Err(pgshift::lambda::diagnostic(e))
        }
    }
}

async fn run(
    deps: &StagedDeps,
    event: LambdaEvent<serde_json::Value>,
) -> pgshift::Result<serde_json::Value> {
    // The poll schedule's input is `{}`; the watch schedule's `{"action": "Watch"}`.
    if !(event.payload.is_object() || event.payload.is_null()) {
        return Err(Error::event("event", "must be a JSON object"));
    }
    match event.payload.get("action").map(|a| a.as_str()) {
        None | Some(Some("Poll")) => {}
        Some(Some("Watch")) => {
            let watch = slot_watch::run(&deps.source().await?, &deps.task).await?;
            println!("{}", slot_watch::emf_line(&watch));
            return serde_json::to_value(&watch)
                .map_err(|e| Error::Source(format!("cannot serialize the watch: {e}")));
        }
        Some(_) => {
            return Err(Error::event(
                "action",
                "must be Poll (the default) or Watch",
            ));
        }
    }
    let remaining = pgshift::lambda::remaining(&event.context);
    let mut opts = TaskSettings::from(&deps.env).cdc_options(
        &deps.task,
        deps.source().await?,
        event.context.request_id.clone(),
        Some(remaining),
    );
    opts.events = deps.events.clone();
    let report = cdc_poll::run(&deps.sink, &deps.state, &opts).await?;
    // CloudWatch Embedded Metric Format: one line on stdout becomes the metrics.
    println!("{}", cdc_poll::emf_line(&report));
    serde_json::to_value(&report)
        .map_err(|e| Error::Source(format!("cannot serialize the report: {e}")))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    pgshift::lambda::init_tracing();
    let deps = StagedDeps::from_env().await?;
    let deps = &deps;
    lambda_runtime::run(service_fn(move |event| handle(deps, event))).await
}
