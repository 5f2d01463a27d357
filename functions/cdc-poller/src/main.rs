//! The cdc-poller Lambda, started by EventBridge Scheduler: wiring only. The job is
//! `pgshift::job::cdc_poll`; this reads the environment once, builds clients once per cold
//! start, and per invocation passes the deadline and request id as the lease owner.

use std::time::{Duration, Instant};

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use pgshift::Error;
use pgshift::aws::Aws;
use pgshift::config::{LambdaEnv, SslMode};
use pgshift::job::cdc_poll::{self, CdcOptions, PollReport};
use pgshift::stage::S3Sink;
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
) -> Result<PollReport, Diagnostic> {
    run(deps, event).await.map_err(pgshift::lambda::diagnostic)
}

async fn run(deps: &Deps, event: LambdaEvent<serde_json::Value>) -> pgshift::Result<PollReport> {
    // The schedule's input is not used; reject only what cannot be a schedule event.
    if !(event.payload.is_object() || event.payload.is_null()) {
        return Err(Error::event("event", "must be a JSON object"));
    }
    let source = deps
        .aws
        .read_source_secret(
            &deps.secret,
            Some(deps.env.source_sslmode.unwrap_or(SslMode::Require)),
        )
        .await?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let remaining = Duration::from_millis(event.context.deadline.saturating_sub(now_ms));
    let mut opts = CdcOptions::new(&deps.task, source, event.context.request_id.clone());
    opts.format = deps.env.format;
    opts.commit_ts_column = deps.env.commit_ts_column;
    opts.selection = deps.env.selection.clone();
    opts.deadline = Some(Instant::now() + remaining);
    opts.lease_ttl = remaining + Duration::from_secs(30);
    let report = cdc_poll::run(&deps.sink, &deps.state, &opts).await?;
    // CloudWatch Embedded Metric Format: one line on stdout becomes the metrics.
    println!("{}", cdc_poll::emf_line(&report));
    Ok(report)
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
