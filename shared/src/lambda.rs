//! What every Lambda binary shares: tracing set-up and the mapping of errors to the runtime's
//! `errorType` (transient kinds start with `Transient`, which the state machine retries).

use crate::error::Error;

/// JSON logs as the Lambda log format/level settings ask (`AWS_LAMBDA_LOG_FORMAT`, `AWS_LAMBDA_LOG_LEVEL`).
pub fn init_tracing() {
    lambda_runtime::tracing::init_default_subscriber();
}

/// The runtime's error report for a job error, logged once here.
pub fn diagnostic(err: Error) -> lambda_runtime::Diagnostic {
    tracing::error!(error = %err, kind = err.kind(), transient = err.is_transient(), "job failed");
    lambda_runtime::Diagnostic {
        error_type: err.kind().to_owned(),
        error_message: err.to_string(),
    }
}
