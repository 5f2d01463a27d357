//! The source's connection settings from a Secrets Manager secret (DMS's shape), or as given.

use futures_util::FutureExt;
use secrecy::SecretString;

use crate::aws::Aws;
use crate::config::{EndpointSpec, PgConfig, SourceSpec, SslMode};
use crate::error::{Error, Result, sdk_error};

impl Aws {
    /// Reads a DMS-shaped secret (`{host, port, username, password, dbname}`) into connection
    /// settings. When the secret names no `sslmode`, `default_sslmode` applies (the stack's
    /// `SourceSslMode`), else `verify-full` on an RDS/Aurora host (its certificate authorities
    /// are built in) and `require` elsewhere: a secret names a database reached over the
    /// network. `sslrootcert` may hold the PEM certificates themselves. Errors never include
    /// the secret's value.
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
            .boxed()
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
        if spec.sslmode.is_none() {
            cfg.sslmode =
                default_sslmode.unwrap_or_else(|| SslMode::for_host(&cfg.host, SslMode::Require));
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
