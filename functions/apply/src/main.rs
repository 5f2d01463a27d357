//! The apply Lambda: PG → PG in the cloud. An EventBridge rule sends the task's `Batch
//! Committed` and `Load Finished` events to an SQS FIFO queue (one message group per task, a
//! DLQ), which invokes this function one message at a time. Wiring only: the job is
//! `pgshift::job::apply`.
//!
//! A message only says "something was staged": each invocation applies everything staged after
//! the target's applied position (kept in the target, moved in the same transaction as the
//! data), so a duplicated or late message is a no-op, and a lost one costs latency, never data
//! (the next one, or the gap it leaves, is filled from the manifests). CDC batches of a task
//! whose full load is not staged yet wait for its `Load Finished`. When the invocation's time
//! runs out, the load stops at a chunk boundary (or apply at a batch boundary) and the
//! function leaves itself an `Apply Continue` message on its queue (with
//! `PGSHIFT_APPLY_QUEUE_URL`; without it the message fails and SQS redelivers it).

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use pgshift::Error;
use pgshift::events::{Events, Job, TaskStateChanged};
use pgshift::job::apply::{self, ApplyOptions, TargetPrep};
use serde_json::{Value, json};

/// Time kept back from the invocation's deadline for the commit in flight and the reply.
const MARGIN: std::time::Duration = std::time::Duration::from_secs(60);

struct Deps {
    aws: pgshift::aws::Aws,
    env: pgshift::config::LambdaEnv,
    task: String,
    target_secret: String,
    sink: pgshift::staging::S3Sink,
    events: Events,
    sqs: aws_sdk_sqs::Client,
}

impl Deps {
    async fn from_env() -> pgshift::Result<Deps> {
        let env = pgshift::config::LambdaEnv::from_pairs(std::env::vars())?;
        let required = |v: &Option<String>, name: &str| {
            v.clone().ok_or_else(|| Error::config(name, "must be set"))
        };
        let task = required(&env.task, "PGSHIFT_TASK")?;
        let target_secret = required(&env.target_secret_arn, "PGSHIFT_TARGET_SECRET_ARN")?;
        let stage = required(&env.stage, "PGSHIFT_STAGE")?;
        let aws = pgshift::aws::Aws::from_env().await;
        let sink = pgshift::staging::S3Sink::new(aws.s3(), &stage)?;
        let events = pgshift::events::for_bus(&aws, env.events_bus.as_deref());
        let sqs = aws_sdk_sqs::Client::new(aws.sdk_config());
        Ok(Deps {
            aws,
            env,
            task,
            target_secret,
            sink,
            events,
            sqs,
        })
    }
}

async fn handle(deps: &Deps, event: LambdaEvent<Value>) -> Result<Value, Diagnostic> {
    // The apply future is large (a batch's reads and the target's writes): on the heap.
    Box::pin(run(deps, event))
        .await
        .map_err(pgshift::lambda::diagnostic)
}

async fn run(deps: &Deps, event: LambdaEvent<Value>) -> pgshift::Result<Value> {
    let (ours, others) = pgshift::events::apply_triggers(&event.payload, &deps.task)?;
    if ours == 0 {
        return Ok(json!({"task": deps.task, "outcome": "ignored", "messages_ignored": others}));
    }
    if apply::waiting_for_load(&deps.sink).await? {
        tracing::info!(task = %deps.task, "CDC batches are staged but the full load is not yet: waiting for Load Finished");
        return Ok(json!({"task": deps.task, "outcome": "waiting_for_load"}));
    }
    let remaining = pgshift::lambda::remaining(&event.context);
    let opts = ApplyOptions {
        load_workers: deps.env.apply_parallel,
        target_prep: match deps.env.target_prep.as_deref() {
            Some(p) => p.parse()?,
            None => TargetPrep::Create,
        },
        deadline: Some(std::time::Instant::now() + remaining.saturating_sub(MARGIN)),
        progress: None,
    };
    let result = match deps
        .aws
        .read_source_secret(&deps.target_secret, deps.env.target_sslmode)
        .await
    {
        Ok(target) => apply::run_with(&deps.sink, &target, &deps.task, opts).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(report) => {
            let more = report.stopped_at_deadline;
            if more {
                continue_later(deps, "batches are left").await?;
            }
            let mut out = serde_json::to_value(&report).unwrap_or(Value::Null);
            out["outcome"] = json!(if more { "continues" } else { "applied" });
            Ok(out)
        }
        Err(Error::Deadline(why)) => {
            continue_later(deps, &why).await?;
            Ok(json!({"task": deps.task, "outcome": "continues", "reason": why}))
        }
        Err(e) => {
            let change = TaskStateChanged::from_error(&deps.task, Job::Apply, &e);
            deps.events.announce(&[change.event()]).await;
            Err(e)
        }
    }
}

/// Leaves an `Apply Continue` message for the next invocation (or, without the queue's URL,
/// fails so SQS delivers this message again).
async fn continue_later(deps: &Deps, why: &str) -> pgshift::Result<()> {
    let Some(url) = &deps.env.apply_queue_url else {
        return Err(Error::Deadline(format!(
            "{why}; PGSHIFT_APPLY_QUEUE_URL is not set, so the message is left for SQS to deliver again"
        )));
    };
    let body = pgshift::events::apply_continue(&deps.task, why);
    deps.sqs
        .send_message()
        .queue_url(url)
        .message_body(body.to_string())
        .message_group_id(&deps.task)
        .message_deduplication_id(uuid::Uuid::new_v4().to_string())
        .send()
        .await
        .map_err(|e| Error::Aws {
            service: "sqs",
            context: "SendMessage (Apply Continue)".to_owned(),
            detail: aws_sdk_sqs::error::DisplayErrorContext(&e).to_string(),
            transient: true,
            source: None,
        })?;
    tracing::info!(task = %deps.task, reason = why, "the time ran out: continuing in the next invocation");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    pgshift::lambda::init_tracing();
    let deps = Deps::from_env().await?;
    let deps = &deps;
    lambda_runtime::run(service_fn(move |event| handle(deps, event))).await
}
