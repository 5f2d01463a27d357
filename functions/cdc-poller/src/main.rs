//! The cdc-poller Lambda, started by EventBridge Scheduler: wiring only. The job is
//! `pgshift::job::cdc_poll`; this builds clients once per cold start and per invocation passes
//! the deadline and the request id (the lease owner).

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use pgshift::Error;
use pgshift::job::cdc_poll;
use pgshift::lambda::StagedDeps;
use pgshift::options::TaskSettings;
use pgshift::state::records::PollReport;

async fn handle(
    deps: &StagedDeps,
    event: LambdaEvent<serde_json::Value>,
) -> Result<PollReport, Diagnostic> {
    run(deps, event).await.map_err(pgshift::lambda::diagnostic)
}

async fn run(
    deps: &StagedDeps,
    event: LambdaEvent<serde_json::Value>,
) -> pgshift::Result<PollReport> {
    // The schedule's input is not used; reject only what cannot be a schedule event.
    if !(event.payload.is_object() || event.payload.is_null()) {
        return Err(Error::event("event", "must be a JSON object"));
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
    Ok(report)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    pgshift::lambda::init_tracing();
    let deps = StagedDeps::from_env().await?;
    let deps = &deps;
    lambda_runtime::run(service_fn(move |event| handle(deps, event))).await
}
