//! The cdc-poller Lambda, started by EventBridge Scheduler: wiring only. The job is
//! `pgshift::job::cdc_poll`; this builds clients once per cold start and per invocation passes
//! the deadline and the request id (the lease owner).

use std::time::{Duration, Instant};

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use pgshift::Error;
use pgshift::job::cdc_poll::{self, CdcOptions, PollReport};
use pgshift::lambda::StagedDeps;

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
    let mut opts = CdcOptions::new(
        &deps.task,
        deps.source().await?,
        event.context.request_id.clone(),
    );
    opts.format = deps.env.format;
    opts.commit_ts_column = deps.env.commit_ts_column;
    opts.selection = deps.env.selection.clone();
    opts.peek_sessions = deps.env.peek_sessions;
    opts.deadline = Some(Instant::now() + remaining);
    opts.lease_ttl = remaining + Duration::from_secs(30);
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
