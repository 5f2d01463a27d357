//! The endpoint test: connect to a source and report, check by check, whether a full load and
//! CDC can run from it (DMS "test connection" plus its PostgreSQL premigration assessments).
//!
//! Effect order: resolve the connection settings (event endpoint, secret, or the function's
//! default secret) → connect (a failure becomes a `reachable` fail with its class: dns, refused,
//! timeout, tls, auth, database) → run every check in one READ ONLY transaction → report.
//! Nothing is written to the source at any step.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::aws::Aws;
use crate::config::{EndpointSpec, PgConfig, SslMode};
use crate::error::{ConnectFailure, Error, Result};
use crate::selection::Selection;
use crate::source::checks::{self, Check, CheckOptions, Status};
use crate::source::{self, ServerInfo};

/// The test-endpoint event (see `tests/fixtures/events/test-endpoint*.json`).
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TestEndpointEvent {
    /// The endpoint itself (DMS secret shape). Exclusive with `secret_arn`.
    #[serde(default)]
    pub endpoint: Option<EndpointSpec>,
    /// A Secrets Manager secret holding the endpoint. Without either, the function's
    /// `PGSHIFT_SOURCE_SECRET_ARN` is used.
    #[serde(default)]
    pub secret_arn: Option<String>,
    #[serde(default)]
    pub task: Option<TaskSpec>,
}

/// The parts of a task the checks look at.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// DMS table mapping (`{"rules": [...]}`); all user tables when absent.
    #[serde(default)]
    pub table_mappings: Option<serde_json::Value>,
    #[serde(default)]
    pub slot_name: Option<String>,
    #[serde(default)]
    pub publication_name: Option<String>,
    /// Report transactions open longer than this many seconds (default 60).
    #[serde(default)]
    pub long_transaction_secs: Option<f64>,
}

impl TestEndpointEvent {
    /// Parses an event, naming the offending field on error (`endpoint.port: ...`).
    pub fn from_json(value: serde_json::Value) -> Result<TestEndpointEvent> {
        let event: TestEndpointEvent = crate::task::parse_event(value)?;
        if event.endpoint.is_some() && event.secret_arn.is_some() {
            return Err(Error::event(
                "endpoint",
                "give either endpoint or secret_arn, not both",
            ));
        }
        if let Some(arn) = &event.secret_arn
            && arn.trim().is_empty()
        {
            return Err(Error::event("secret_arn", "must not be empty"));
        }
        Ok(event)
    }

    /// The check options the task asks for.
    pub fn check_options(&self) -> Result<CheckOptions> {
        let mut opts = CheckOptions::default();
        if let Some(task) = &self.task {
            if let Some(m) = &task.table_mappings {
                opts.selection = Selection::from_json(&m.to_string(), "task.table_mappings")
                    .map_err(|e| match e {
                        Error::Config { field, reason } => Error::Event { field, reason },
                        other => other,
                    })?;
            }
            opts.slot_name = task.slot_name.clone();
            opts.publication_name = task.publication_name.clone();
            if let Some(secs) = task.long_transaction_secs {
                if !secs.is_finite() || secs < 0.0 {
                    return Err(Error::event(
                        "task.long_transaction_secs",
                        "must be a non-negative number",
                    ));
                }
                opts.long_transaction_secs = secs;
            }
        }
        Ok(opts)
    }

    /// Resolves the connection settings: the event's endpoint, its secret, or `default_secret`.
    pub async fn resolve_source(
        &self,
        aws: Option<&Aws>,
        default_secret: Option<&str>,
        default_sslmode: Option<SslMode>,
    ) -> Result<PgConfig> {
        if let Some(spec) = &self.endpoint {
            return PgConfig::from_endpoint(spec, "endpoint").map_err(|e| match e {
                Error::Config { field, reason } => Error::Event { field, reason },
                other => other,
            });
        }
        let secret = self
            .secret_arn
            .as_deref()
            .or(default_secret)
            .ok_or_else(|| {
                Error::event(
                    "endpoint",
                    "missing: give endpoint or secret_arn (or set PGSHIFT_SOURCE_SECRET_ARN)",
                )
            })?;
        let aws = aws.ok_or_else(|| Error::config("aws", "a secret needs AWS configuration"))?;
        aws.read_source_secret(secret, default_sslmode).await
    }
}

/// The report: `ok` is false when any check failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointReport {
    pub ok: bool,
    /// Where we connected (never the password).
    pub endpoint: String,
    pub server: Option<ServerInfo>,
    /// Why the connection failed, when it did.
    pub connection_failure: Option<ConnectFailure>,
    pub checks: Vec<Check>,
    pub elapsed_ms: u64,
}

impl EndpointReport {
    /// The check with `id`, if it ran.
    pub fn check(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }

    /// The worst status of all checks.
    pub fn worst(&self) -> Status {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Pass)
    }
}

/// Tests an endpoint. A connection failure is a report (a failed `reachable` check), not an
/// error; an error is returned only when a catalog query itself fails.
pub async fn run(cfg: &PgConfig, opts: &CheckOptions) -> Result<EndpointReport> {
    let started = Instant::now();
    let endpoint = format!(
        "{} (user {}, sslmode {})",
        cfg.target(),
        cfg.user,
        cfg.sslmode.as_str()
    );
    let mut cfg = cfg.clone();
    cfg.application_name = "pgshift-test-endpoint".to_owned();
    cfg.statement_timeout = std::time::Duration::from_secs(20);
    let client = match source::connect(&cfg).await {
        Ok(c) => c,
        Err(Error::Connect { kind, detail, .. }) => {
            let check = Check {
                id: "reachable".to_owned(),
                status: Status::Fail,
                detail: format!("{kind}: {detail}"),
                remedy: connect_remedy(kind, &cfg).to_owned(),
            };
            return Ok(EndpointReport {
                ok: false,
                endpoint,
                server: None,
                connection_failure: Some(kind),
                checks: vec![check],
                elapsed_ms: started.elapsed().as_millis() as u64,
            });
        }
        Err(other) => return Err(other),
    };
    let (server, checks) = checks::run(&client, opts).await?;
    let ok = checks.iter().all(|c| c.status != Status::Fail);
    Ok(EndpointReport {
        ok,
        endpoint,
        server: Some(server),
        connection_failure: None,
        checks,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

fn connect_remedy(kind: ConnectFailure, cfg: &PgConfig) -> &'static str {
    let _ = cfg;
    match kind {
        ConnectFailure::Dns => {
            "the host name does not resolve: check it (from a VPC Lambda use the endpoint's DNS name, and enable DNS resolution in the VPC)"
        }
        ConnectFailure::Refused => {
            "nothing accepts connections on that host and port: check the port, that PostgreSQL runs, and listen_addresses"
        }
        ConnectFailure::Timeout => {
            "no answer: allow TCP to the port in the database's security group / firewall from the function's subnets, and check the host"
        }
        ConnectFailure::Tls => {
            "TLS failed: for verify-full give sslrootcert (the RDS global CA bundle on RDS) and use the certificate's host name; sslmode=require needs ssl = on on the server"
        }
        ConnectFailure::Auth => {
            "the server rejected the credentials: check username and password (the secret's values) and pg_hba.conf (rds.force_ssl on RDS needs TLS)"
        }
        ConnectFailure::Database => "the database does not exist: check dbname",
        ConnectFailure::Unavailable => {
            "the server is full or starting up: retry, or raise max_connections"
        }
        ConnectFailure::Other => {
            "the connection broke during startup: check network path and server logs"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_events_name_the_field() {
        let cases = [
            (
                serde_json::json!({"endpoint": {"host": "h", "port": "http"}}),
                None,
            ),
            (
                serde_json::json!({"endpoint": {"port": 5432}}),
                Some("endpoint"),
            ),
            (
                serde_json::json!({"endpoint": {"host": "h"}, "secret_arn": "x"}),
                Some("endpoint"),
            ),
            (
                serde_json::json!({"endpont": {"host": "h"}}),
                Some("endpont"),
            ),
            (
                serde_json::json!({"endpoint": {"host": 7}}),
                Some("endpoint.host"),
            ),
            (serde_json::json!({"secret_arn": ""}), Some("secret_arn")),
            (
                serde_json::json!({"task": {"long_transaction_secs": "x"}}),
                Some("task.long_transaction_secs"),
            ),
            (serde_json::json!([1, 2]), Some("event")),
        ];
        for (value, field) in cases {
            match TestEndpointEvent::from_json(value.clone()) {
                Ok(ev) => {
                    // Field-level problems surface when the endpoint is built.
                    let err = PgConfig::from_endpoint(ev.endpoint.as_ref().unwrap(), "endpoint")
                        .unwrap_err();
                    assert!(err.to_string().contains("endpoint.port"), "{value}: {err}");
                }
                Err(err) => {
                    let want = field.unwrap();
                    assert!(
                        err.to_string()
                            .starts_with(&format!("invalid event: {want}")),
                        "{value}: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn fixture_events_parse() {
        let secret: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/events/test-endpoint-secret.json"
        ))
        .unwrap();
        let ev = TestEndpointEvent::from_json(secret).unwrap();
        let opts = ev.check_options().unwrap();
        assert!(opts.selection.selects("sales", "orders"));
        assert!(!opts.selection.selects("sales", "tmp_orders"));
        assert_eq!(opts.slot_name.as_deref(), Some("pgshift_orders"));

        let direct: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/events/test-endpoint-endpoint.json"
        ))
        .unwrap();
        let ev = TestEndpointEvent::from_json(direct).unwrap();
        let cfg = PgConfig::from_endpoint(ev.endpoint.as_ref().unwrap(), "endpoint").unwrap();
        assert_eq!(cfg.sslmode, SslMode::VerifyFull);

        let empty: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/events/test-endpoint-default.json"
        ))
        .unwrap();
        let ev = TestEndpointEvent::from_json(empty).unwrap();
        assert!(ev.endpoint.is_none() && ev.secret_arn.is_none());
    }

    #[test]
    fn task_mappings_are_validated() {
        let ev = TestEndpointEvent::from_json(serde_json::json!({
            "endpoint": {"host": "h"},
            "task": {"table_mappings": {"rules": [{"rule-type": "selection", "rule-id": "1",
              "object-locator": {"schema-name": "public", "table-name": "%"}, "rule-action": "nope"}]}}
        }))
        .unwrap();
        let err = ev.check_options().unwrap_err().to_string();
        assert!(err.contains("task.table_mappings.rules[0]"), "{err}");
    }
}
