//! The one place AWS SDK clients are built.
//!
//! Clients honour `AWS_ENDPOINT_URL` (and the service-specific `AWS_ENDPOINT_URL_<SERVICE>`)
//! through the SDK's own configuration loading, so the same code talks to AWS, to LocalStack or
//! to the moto server the tests start. S3 uses path-style addressing whenever an endpoint is
//! set, because emulators do not serve virtual-hosted buckets.

use aws_config::{BehaviorVersion, SdkConfig};
use secrecy::SecretString;

use crate::config::{EndpointSpec, PgConfig, SourceSpec, SslMode};
use crate::error::{Error, Result};

/// Shared SDK configuration and the clients built from it, once per cold start.
#[derive(Clone, Debug)]
pub struct Aws {
    config: SdkConfig,
}

impl Aws {
    /// Loads region, credentials and endpoint from the environment (the Lambda role on AWS).
    pub async fn from_env() -> Aws {
        let config = aws_config::defaults(BehaviorVersion::latest()).load().await;
        Aws { config }
    }

    /// Whether a custom endpoint (an emulator) is configured.
    pub fn has_custom_endpoint(&self) -> bool {
        self.config.endpoint_url().is_some()
    }

    pub fn s3(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::config::Builder::from(&self.config)
            .force_path_style(self.has_custom_endpoint())
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    pub fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.config)
    }

    pub fn secrets(&self) -> aws_sdk_secretsmanager::Client {
        aws_sdk_secretsmanager::Client::new(&self.config)
    }

    /// Reads a DMS-shaped secret (`{host, port, username, password, dbname}`) into connection
    /// settings. `default_sslmode` applies when the secret does not say (Lambdas default to
    /// `require`: a managed database is reached over the network). Errors never include the
    /// secret's value.
    pub async fn read_source_secret(
        &self,
        secret_id: &str,
        default_sslmode: Option<SslMode>,
    ) -> Result<PgConfig> {
        let out = self
            .secrets()
            .get_secret_value()
            .secret_id(secret_id)
            .send()
            .await
            .map_err(|e| sdk_error("secretsmanager", format!("reading secret {secret_id}"), e))?;
        let text = out.secret_string().ok_or_else(|| {
            Error::config(
                "secret",
                format!(
                    "secret {secret_id} has no SecretString (binary secrets are not supported)"
                ),
            )
        })?;
        let text = SecretString::from(text.to_owned());
        let spec: EndpointSpec = serde_json::from_str(secrecy::ExposeSecret::expose_secret(&text)).map_err(|e| {
            // serde_json's message names the field and position, never the value.
            Error::config(
                "secret",
                format!("secret {secret_id} is not a DMS PostgreSQL secret {{host, port, username, password, dbname}}: {}", redact_serde(&e)),
            )
        })?;
        let mut cfg = PgConfig::from_endpoint(&spec, "secret")?;
        if spec.sslmode.is_none()
            && let Some(mode) = default_sslmode
        {
            cfg.sslmode = mode;
        }
        Ok(cfg)
    }

    /// Resolves a [`SourceSpec`] to connection settings.
    pub async fn resolve(
        &self,
        spec: &SourceSpec,
        default_sslmode: Option<SslMode>,
    ) -> Result<PgConfig> {
        match spec {
            SourceSpec::Direct(cfg) => Ok((**cfg).clone()),
            SourceSpec::Secret(arn) => self.read_source_secret(arn, default_sslmode).await,
        }
    }
}

/// serde_json messages quote the offending value for some errors ("invalid type: string
/// \"...\""); keep the category and position only.
fn redact_serde(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let kind = msg.split(':').next().unwrap_or("malformed");
    let field = msg
        .split('`')
        .nth(1)
        .filter(|_| msg.contains("field `"))
        .map(|f| format!(" `{f}`"))
        .unwrap_or_default();
    format!("{kind}{field} at line {} column {}", e.line(), e.column())
}

/// Maps an SDK error to [`Error::Aws`], transient for throttling, timeouts and 5xx.
pub(crate) fn sdk_error<E, R>(
    service: &'static str,
    context: String,
    err: aws_sdk_s3::error::SdkError<E, R>,
) -> Error
where
    E: std::error::Error + aws_sdk_s3::error::ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_s3::error::SdkError;
    let (detail, transient) = match &err {
        SdkError::ServiceError(se) => {
            let e = se.err();
            let code = e.code().unwrap_or("unknown");
            let transient = matches!(
                code,
                "ThrottlingException"
                    | "Throttling"
                    | "SlowDown"
                    | "RequestTimeout"
                    | "InternalError"
                    | "InternalServerError"
                    | "ServiceUnavailable"
                    | "ProvisionedThroughputExceededException"
                    | "RequestLimitExceeded"
                    | "TransactionInProgressException"
            );
            (
                format!("{code}: {}", e.message().unwrap_or("no message")),
                transient,
            )
        }
        SdkError::TimeoutError(_) => ("request timed out".to_owned(), true),
        SdkError::DispatchFailure(d) => (format!("could not send the request: {d:?}"), true),
        SdkError::ResponseError(_) => ("malformed response".to_owned(), true),
        other => (format!("{other}"), false),
    };
    Error::Aws {
        service,
        context,
        detail,
        transient,
    }
}
