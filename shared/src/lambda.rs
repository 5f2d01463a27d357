//! What every Lambda binary shares: tracing set-up and the mapping of errors to the runtime's
//! `errorType` (transient kinds start with `Transient`, which the state machine retries).

use crate::error::Error;

/// JSON logs as the Lambda log format/level settings ask (`AWS_LAMBDA_LOG_FORMAT`, `AWS_LAMBDA_LOG_LEVEL`).
pub fn init_tracing() {
    lambda_runtime::tracing::init_default_subscriber();
}

/// The runtime's error report for a job error, logged once here.
pub fn diagnostic(err: Error) -> lambda_runtime::Diagnostic {
    diagnostic_in(err, None)
}

/// [`diagnostic`], the message prefixed with what failed (`chunk public.orders#3`): a state
/// machine's failure cause names it.
pub fn diagnostic_in(err: Error, what: Option<&str>) -> lambda_runtime::Diagnostic {
    tracing::error!(error = %err, kind = err.kind(), transient = err.is_transient(), what, "job failed");
    lambda_runtime::Diagnostic {
        error_type: err.kind().to_owned(),
        error_message: match what {
            Some(w) => format!("{w}: {err}"),
            None => err.to_string(),
        },
    }
}

/// What the data functions (full-load, cdc-poller) build once per cold start: configuration
/// from the environment, the S3 sink, the DynamoDB state store and the source secret's id.
pub struct StagedDeps {
    pub aws: crate::aws::Aws,
    pub env: crate::config::LambdaEnv,
    pub task: String,
    pub secret: String,
    pub sink: crate::staging::S3Sink,
    pub state: crate::state::DynamoStore,
    /// `PGSHIFT_EVENTS_BUS` (the default bus when unset).
    pub events: crate::events::Events,
    /// The secret as last read, and when: a warm function reads it at most every
    /// [`SECRET_TTL`] (an idle poll each minute would otherwise pay a Secrets Manager call).
    secret_cache: tokio::sync::Mutex<Option<(std::time::Instant, crate::config::PgConfig)>>,
}

/// How long a warm function reuses the secret it read (a rotated password is picked up after
/// at most this long).
pub const SECRET_TTL: std::time::Duration = std::time::Duration::from_secs(300);

impl StagedDeps {
    /// Reads `PGSHIFT_*` (task, source secret, stage, state table are required).
    pub async fn from_env() -> crate::Result<StagedDeps> {
        let env = crate::config::LambdaEnv::from_pairs(std::env::vars())?;
        let required = |v: &Option<String>, name: &str| {
            v.clone().ok_or_else(|| Error::config(name, "must be set"))
        };
        let task = required(&env.task, "PGSHIFT_TASK")?;
        let secret = required(&env.source_secret_arn, "PGSHIFT_SOURCE_SECRET_ARN")?;
        let stage = required(&env.stage, "PGSHIFT_STAGE")?;
        let table = required(&env.state_table, "PGSHIFT_STATE_TABLE")?;
        let aws = crate::aws::Aws::from_env().await;
        let sink = crate::staging::S3Sink::new(aws.s3(), &stage)?
            .with_part_size((env.s3_part_mb as usize) << 20)
            .with_encryption(env.encryption.clone());
        let state = crate::state::DynamoStore::new(aws.dynamodb(), table);
        let events = crate::events::for_bus(&aws, env.events_bus.as_deref());
        Ok(StagedDeps {
            secret_cache: tokio::sync::Mutex::new(None),
            events,
            aws,
            env,
            task,
            secret,
            sink,
            state,
        })
    }

    /// The source's connection settings from its secret (TLS as the secret, else
    /// `PGSHIFT_SOURCE_SSLMODE`, else `verify-full` on RDS/Aurora and `require` elsewhere).
    pub async fn source(&self) -> crate::Result<crate::config::PgConfig> {
        let mut cache = self.secret_cache.lock().await;
        if let Some((at, cfg)) = cache.as_ref()
            && at.elapsed() < SECRET_TTL
        {
            return Ok(cfg.clone());
        }
        let cfg = self
            .aws
            .read_source_secret(&self.secret, self.env.source_sslmode)
            .await?;
        *cache = Some((std::time::Instant::now(), cfg.clone()));
        Ok(cfg)
    }

    /// After `err`: a source that refused the cached credentials (a rotated password) is read
    /// from the secret again by the next invocation instead of after [`SECRET_TTL`].
    pub async fn after_error(&self, err: &Error) {
        if matches!(
            err,
            Error::Connect {
                kind: crate::error::ConnectFailure::Auth,
                ..
            }
        ) {
            *self.secret_cache.lock().await = None;
        }
    }
}

/// Time left before the invocation's deadline.
pub fn remaining(ctx: &lambda_runtime::Context) -> std::time::Duration {
    remaining_at(ctx.deadline, crate::state::now_ms())
}

/// Lambda sends the deadline as milliseconds since the epoch. Local runtime API emulators
/// (`cargo lambda watch`) send their timeout instead (600000): a "deadline" before 2001 cannot be
/// a real one and is read as the time the invocation has.
fn remaining_at(deadline_ms: u64, now_ms: u64) -> std::time::Duration {
    const YEAR_2001_MS: u64 = 978_307_200_000;
    if deadline_ms < YEAR_2001_MS {
        return std::time::Duration::from_millis(deadline_ms);
    }
    std::time::Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

#[cfg(test)]
mod tests {
    use super::remaining_at;
    use std::time::Duration;

    #[test]
    fn deadlines_are_absolute_except_an_emulators_timeout() {
        let now = 1_790_000_000_000;
        assert_eq!(remaining_at(now + 5_000, now), Duration::from_secs(5));
        assert_eq!(remaining_at(now - 1, now), Duration::ZERO);
        assert_eq!(remaining_at(600_000, now), Duration::from_secs(600));
    }
}
