//! The test-endpoint Lambda: wiring only. The job is `pgshift::job::test_endpoint`.

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use pgshift::aws::Aws;
use pgshift::config::LambdaEnv;
use pgshift::job::test_endpoint::{self, EndpointReport, TestEndpointEvent};

struct Deps {
    aws: Aws,
    env: LambdaEnv,
}

async fn handle(
    deps: &Deps,
    event: LambdaEvent<serde_json::Value>,
) -> Result<EndpointReport, Diagnostic> {
    run(deps, event.payload)
        .await
        .map_err(pgshift::lambda::diagnostic)
}

async fn run(deps: &Deps, payload: serde_json::Value) -> pgshift::Result<EndpointReport> {
    let event = TestEndpointEvent::from_json(payload)?;
    let opts = event.check_options()?;
    let default_sslmode = deps.env.source_sslmode;
    let source = event
        .resolve_source(
            Some(&deps.aws),
            deps.env.source_secret_arn.as_deref(),
            default_sslmode,
        )
        .await?;
    test_endpoint::run(&source, &opts).await
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    pgshift::lambda::init_tracing();
    let env = LambdaEnv::from_pairs(std::env::vars())?;
    let deps = Deps {
        aws: Aws::from_env().await,
        env,
    };
    let deps = &deps;
    lambda_runtime::run(service_fn(move |event| handle(deps, event))).await
}
