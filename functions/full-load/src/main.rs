//! The full-load Lambda: wiring only. Its job is not built yet; every invocation fails with a clear,
//! terminal `NotYetImplemented` error instead of pretending to work.

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};

async fn handle(_event: LambdaEvent<serde_json::Value>) -> Result<serde_json::Value, Diagnostic> {
    Err(pgshift::lambda::diagnostic(pgshift::Error::NotYet(
        "the full-load job",
    )))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    pgshift::lambda::init_tracing();
    lambda_runtime::run(service_fn(handle)).await
}
