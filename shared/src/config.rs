//! Configuration: one typed value, built by pure functions from strings, validated once.
//!
//! A source (or target) is given as a libpq-style URL
//! (`postgres://user:password@host:port/dbname?sslmode=verify-full&sslrootcert=/path`), as
//! `secret:<arn>` (a Secrets Manager secret in the DMS shape `{host, port, username, password,
//! dbname}`), or, in events, as an [`EndpointSpec`] object. Passwords are [`SecretString`]s:
//! they never reach `Debug`, logs or error messages, and a malformed URL is reported without
//! echoing it.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the connection uses TLS, with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, without verifying the certificate (libpq's default).
    #[default]
    Prefer,
    /// TLS required, certificate not verified.
    Require,
    /// TLS required, certificate chain verified, host name not checked.
    VerifyCa,
    /// TLS required, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Everything needed to open a session on a PostgreSQL server.
#[derive(Clone)]
pub struct PgConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<SecretString>,
    pub dbname: String,
    pub sslmode: SslMode,
    /// PEM file of CA certificates trusted for `verify-ca` / `verify-full` (RDS: the RDS CA
    /// bundle), added to the public web roots.
    pub sslrootcert: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub application_name: String,
    /// `statement_timeout` for every session (0 = none).
    pub statement_timeout: Duration,
    /// `lock_timeout` for every session.
    pub lock_timeout: Duration,
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .finish_non_exhaustive()
    }
}

impl PgConfig {
    /// Defaults for everything but the address and user.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        user: impl Into<String>,
        dbname: impl Into<String>,
    ) -> Self {
        PgConfig {
            host: host.into(),
            port,
            user: user.into(),
            password: None,
            dbname: dbname.into(),
            sslmode: SslMode::default(),
            sslrootcert: None,
            connect_timeout: Duration::from_secs(5),
            application_name: "pgshift".to_owned(),
            statement_timeout: Duration::from_secs(0),
            lock_timeout: Duration::from_secs(10),
        }
    }

    /// `host:port/dbname`, for messages (never the password).
    pub fn target(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }

    /// The same server and credentials, another database.
    pub fn with_dbname(&self, dbname: impl Into<String>) -> Self {
        PgConfig {
            dbname: dbname.into(),
            ..self.clone()
        }
    }

    /// Parses a libpq-style URL: `postgres[ql]://[user[:password]@]host[:port][/dbname][?k=v&..]`.
    /// Query keys: `sslmode`, `sslrootcert`, `connect_timeout` (seconds), `application_name`,
    /// `statement_timeout` and `lock_timeout` (milliseconds). Unknown keys are errors, so a typo
    /// never silently weakens TLS. `field` names the setting in errors.
    pub fn from_url(url: &str, field: &str) -> Result<PgConfig> {
        let bad = |reason: &str| Error::config(field, reason.to_owned());
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| bad("expected a postgres:// URL or secret:<arn>"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let decode = |s: &str, what: &str| -> Result<String> {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| bad(&format!("{what} is not valid percent-encoded UTF-8")))
        };
        let (user, password) = match userinfo {
            Some(ui) => match ui.split_once(':') {
                Some((u, p)) => (
                    decode(u, "user")?,
                    Some(SecretString::from(decode(p, "password")?)),
                ),
                None => (decode(ui, "user")?, None),
            },
            None => (String::new(), None),
        };
        let (host, port) = split_host_port(hostport).map_err(|r| bad(&r))?;
        if host.is_empty() {
            return Err(bad("host is missing"));
        }
        let dbname = decode(path, "database name")?;
        let user = if user.is_empty() {
            "postgres".to_owned()
        } else {
            user
        };
        let dbname = if dbname.is_empty() {
            user.clone()
        } else {
            dbname
        };
        let mut cfg = PgConfig::new(host, port, user, dbname);
        cfg.password = password;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad(&format!("query parameter {pair:?} has no value")))?;
            let v = decode(v, k)?;
            cfg.set_option(k, &v).map_err(|r| bad(&r))?;
        }
        Ok(cfg)
    }

    fn set_option(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        let millis = |v: &str| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("{key} must be a whole number of milliseconds, got {v:?}"))
        };
        match key {
            "sslmode" => {
                self.sslmode = SslMode::parse(value).ok_or_else(|| {
                    format!("sslmode {value:?} is not one of disable, prefer, require, verify-ca, verify-full")
                })?
            }
            "sslrootcert" => self.sslrootcert = Some(PathBuf::from(value)),
            "connect_timeout" => {
                let secs: u64 = value
                    .parse()
                    .map_err(|_| format!("connect_timeout must be whole seconds, got {value:?}"))?;
                if secs == 0 || secs > 300 {
                    return Err("connect_timeout must be between 1 and 300 seconds".to_owned());
                }
                self.connect_timeout = Duration::from_secs(secs);
            }
            "application_name" => self.application_name = value.to_owned(),
            "statement_timeout" => self.statement_timeout = millis(value)?,
            "lock_timeout" => self.lock_timeout = millis(value)?,
            "user" => self.user = value.to_owned(),
            "password" => self.password = Some(SecretString::from(value.to_owned())),
            "dbname" => self.dbname = value.to_owned(),
            _ => return Err(format!("unknown connection parameter {key:?}")),
        }
        Ok(())
    }

    /// Builds from a DMS-shaped endpoint (event body or Secrets Manager secret).
    pub fn from_endpoint(spec: &EndpointSpec, field: &str) -> Result<PgConfig> {
        let host = spec.host.trim();
        if host.is_empty() {
            return Err(Error::config(format!("{field}.host"), "must not be empty"));
        }
        let port = match &spec.port {
            None => 5432,
            Some(p) => p
                .value()
                .map_err(|r| Error::config(format!("{field}.port"), r))?,
        };
        let user = spec.username.as_deref().unwrap_or("postgres");
        let dbname = spec.dbname.as_deref().unwrap_or(user);
        let mut cfg = PgConfig::new(host, port, user, dbname);
        cfg.password = spec.password.clone().map(SecretString::from);
        if let Some(mode) = &spec.sslmode {
            cfg.sslmode = SslMode::parse(mode).ok_or_else(|| {
                Error::config(
                    format!("{field}.sslmode"),
                    format!(
                        "{mode:?} is not one of disable, prefer, require, verify-ca, verify-full"
                    ),
                )
            })?;
        }
        cfg.sslrootcert = spec.sslrootcert.clone().map(PathBuf::from);
        Ok(cfg)
    }

    /// The password, for the driver only.
    pub(crate) fn password_bytes(&self) -> Option<&[u8]> {
        self.password.as_ref().map(|p| p.expose_secret().as_bytes())
    }
}

fn split_host_port(s: &str) -> std::result::Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed [ in IPv6 host")?;
        (h.to_owned(), after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (s.to_owned(), None),
        }
    };
    if host.contains(',') {
        return Err("multiple hosts are not supported".to_owned());
    }
    let port = match port {
        None | Some("") => 5432,
        Some(p) => parse_port(p)?,
    };
    Ok((host, port))
}

fn parse_port(p: &str) -> std::result::Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("port {p:?} is not a number between 1 and 65535")),
        Ok(n) => Ok(n),
    }
}

/// A port given as a number or a string (DMS secrets store it either way).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortValue {
    Number(i64),
    Text(String),
}

impl PortValue {
    fn value(&self) -> std::result::Result<u16, String> {
        match self {
            PortValue::Number(n) => u16::try_from(*n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{n} is not between 1 and 65535")),
            PortValue::Text(t) => parse_port(t.trim()),
        }
    }
}

/// A source or target endpoint as JSON: the DMS secret shape plus optional TLS settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub host: String,
    #[serde(default)]
    pub port: Option<PortValue>,
    #[serde(default, alias = "user")]
    pub username: Option<String>,
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    #[serde(default, alias = "database")]
    pub dbname: Option<String>,
    #[serde(default)]
    pub sslmode: Option<String>,
    #[serde(default)]
    pub sslrootcert: Option<String>,
    /// DMS secrets carry `engine` (and sometimes `dbInstanceIdentifier`); accepted and ignored.
    #[serde(default)]
    pub engine: Option<String>,
    #[serde(default, rename = "dbInstanceIdentifier")]
    pub db_instance_identifier: Option<String>,
    #[serde(default, rename = "dbClusterIdentifier")]
    pub db_cluster_identifier: Option<String>,
}

impl fmt::Debug for EndpointSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointSpec")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("dbname", &self.dbname)
            .finish_non_exhaustive()
    }
}

/// Where connection settings come from.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    /// Given directly.
    Direct(Box<PgConfig>),
    /// A Secrets Manager secret (ARN or name) in the DMS shape.
    Secret(String),
}

impl SourceSpec {
    /// Parses the CLI form: a `postgres://` URL or `secret:<arn>`.
    pub fn parse(value: &str, field: &str) -> Result<SourceSpec> {
        if let Some(arn) = value.strip_prefix("secret:") {
            if arn.trim().is_empty() {
                return Err(Error::config(field, "secret: needs an ARN or secret name"));
            }
            return Ok(SourceSpec::Secret(arn.trim().to_owned()));
        }
        PgConfig::from_url(value, field).map(|c| SourceSpec::Direct(Box::new(c)))
    }
}

/// Settings of a Lambda function, read once at cold start from its environment.
#[derive(Debug, Clone, Default)]
pub struct LambdaEnv {
    /// `PGSHIFT_SOURCE_SECRET_ARN`: default source when an event names none.
    pub source_secret_arn: Option<String>,
    /// `PGSHIFT_SOURCE_SSLMODE`: TLS mode applied to secrets that do not say (default `require`).
    pub source_sslmode: Option<SslMode>,
    /// `PGSHIFT_TASK`: the task id.
    pub task: Option<String>,
    /// `PGSHIFT_STAGE`: `s3://bucket/prefix`.
    pub stage: Option<String>,
    /// `PGSHIFT_STATE_TABLE`: the DynamoDB table.
    pub state_table: Option<String>,
    /// `PGSHIFT_FORMAT`: csv (default), csv.gz, jsonl, jsonl.gz.
    pub format: crate::staging::encode::Format,
    /// `PGSHIFT_COMMIT_TS_COLUMN`: `true` adds the commit timestamp column to CSV.
    pub commit_ts_column: bool,
    /// `PGSHIFT_TABLE_MAPPINGS`: DMS table-mapping JSON (selection rules).
    pub selection: crate::selection::Selection,
    /// `PGSHIFT_CDC`: the full load creates the slot first (default true).
    pub cdc: bool,
    /// `PGSHIFT_CHUNK_MB`: target heap size of a full-load chunk (default 256).
    pub chunk_mb: u64,
    /// `PGSHIFT_MAX_CONCURRENCY`: chunks exported at once by the state machine (default 8).
    pub max_concurrency: u32,
    /// `PGSHIFT_REPLICA_IDENTITY_FULL`: pgshift may set REPLICA IDENTITY FULL on selected
    /// tables without a key (default false: they are captured insert-only).
    pub replica_identity_full: bool,
    /// `PGSHIFT_PEEK_SESSIONS`: backends a large CDC drain may decode with at once, 1 or 2
    /// (default 2).
    pub peek_sessions: u8,
    /// `PGSHIFT_EVENTS_BUS`: the EventBridge bus events go to (name or ARN; the default bus
    /// when unset, none with `none`).
    pub events_bus: Option<String>,
    /// `PGSHIFT_SLOT_LAG_ALERT_BYTES`: retained WAL past which the slot is announced as
    /// lagging (default 1 GiB).
    pub slot_lag_alert_bytes: u64,
    /// `PGSHIFT_TARGET_SECRET_ARN` (the apply function): the target's credentials.
    pub target_secret_arn: Option<String>,
    /// `PGSHIFT_TARGET_SSLMODE`: TLS mode for a target secret that does not say (default
    /// `require`).
    pub target_sslmode: Option<SslMode>,
    /// `PGSHIFT_TARGET_PREP`: create (default), truncate or keep.
    pub target_prep: Option<String>,
    /// `PGSHIFT_APPLY_PARALLEL`: target connections loading chunks at once (default 2).
    pub apply_parallel: usize,
    /// `PGSHIFT_APPLY_QUEUE_URL`: the apply function's queue, where it leaves itself a
    /// message to go on when its time runs out.
    pub apply_queue_url: Option<String>,
}

/// An EventBridge bus name (`[/\.\-_A-Za-z0-9]{1,256}`) or ARN, else an error naming it.
pub fn check_bus(bus: &str) -> Result<String> {
    let bus = bus.trim();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 256
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '-' | '_'))
    };
    let ok = match bus.strip_prefix("arn:") {
        Some(rest) => {
            rest.contains(":events:")
                && rest
                    .split_once(":event-bus/")
                    .is_some_and(|(_, n)| name_ok(n))
        }
        None => name_ok(bus),
    };
    if ok {
        Ok(bus.to_owned())
    } else {
        Err(Error::config(
            "events bus",
            format!(
                "{bus:?} is not an EventBridge bus name (letters, digits, / . - _) or event-bus ARN"
            ),
        ))
    }
}

impl LambdaEnv {
    /// Builds from key/value pairs (the process environment in `main`, a map in tests).
    pub fn from_pairs<I, K, V>(pairs: I) -> Result<LambdaEnv>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let map: HashMap<String, String> = pairs
            .into_iter()
            .filter(|(k, _)| k.as_ref().starts_with("PGSHIFT_"))
            .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
            .collect();
        let get = |k: &str| {
            map.get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let sslmode = |name: &str| match get(name) {
            None => Ok(None),
            Some(v) => SslMode::parse(&v).map(Some).ok_or_else(|| {
                Error::config(
                    name,
                    format!("{v:?} is not one of disable, prefer, require, verify-ca, verify-full"),
                )
            }),
        };
        let source_sslmode = sslmode("PGSHIFT_SOURCE_SSLMODE")?;
        let target_sslmode = sslmode("PGSHIFT_TARGET_SSLMODE")?;
        let target_prep = get("PGSHIFT_TARGET_PREP");
        if let Some(p) = &target_prep
            && !matches!(p.as_str(), "create" | "truncate" | "keep")
        {
            return Err(Error::config(
                "PGSHIFT_TARGET_PREP",
                format!("{p:?} is not one of create, truncate, keep"),
            ));
        }
        if let Some(stage) = get("PGSHIFT_STAGE")
            && !stage.starts_with("s3://")
        {
            return Err(Error::config(
                "PGSHIFT_STAGE",
                "must be an s3://bucket/prefix URL",
            ));
        }
        let format = match get("PGSHIFT_FORMAT") {
            None => crate::staging::encode::Format::default(),
            Some(f) => crate::staging::encode::Format::parse(&f, "PGSHIFT_FORMAT")?,
        };
        let flag = |name: &str, default: bool| parse_flag(name, get(name), default);
        let number =
            |name: &str, default: u64, max: u64| parse_number(name, get(name), default, max);
        let commit_ts_column = flag("PGSHIFT_COMMIT_TS_COLUMN", false)?;
        let cdc = flag("PGSHIFT_CDC", true)?;
        let replica_identity_full = flag("PGSHIFT_REPLICA_IDENTITY_FULL", false)?;
        let chunk_mb = number("PGSHIFT_CHUNK_MB", 256, 65_536)?;
        let max_concurrency = number("PGSHIFT_MAX_CONCURRENCY", 8, 1000)? as u32;
        let peek_sessions = number("PGSHIFT_PEEK_SESSIONS", 2, 2)? as u8;
        let slot_lag_alert_bytes = number("PGSHIFT_SLOT_LAG_ALERT_BYTES", 1 << 30, u64::MAX)?;
        let apply_parallel = number("PGSHIFT_APPLY_PARALLEL", 2, 64)?.max(1) as usize;
        let events_bus = match get("PGSHIFT_EVENTS_BUS") {
            None => Some("default".to_owned()),
            Some(v) if v == "none" => None,
            Some(v) => Some(check_bus(&v)?),
        };
        let selection = match get("PGSHIFT_TABLE_MAPPINGS") {
            None => crate::selection::Selection::all(),
            Some(json) => crate::selection::Selection::from_json(&json, "PGSHIFT_TABLE_MAPPINGS")?,
        };
        if let Some(task) = get("PGSHIFT_TASK") {
            check_task_name(&task).map_err(|e| match e {
                Error::Config { reason, .. } => Error::config("PGSHIFT_TASK", reason),
                other => other,
            })?;
        }
        Ok(LambdaEnv {
            target_secret_arn: get("PGSHIFT_TARGET_SECRET_ARN"),
            target_sslmode,
            target_prep,
            apply_parallel,
            apply_queue_url: get("PGSHIFT_APPLY_QUEUE_URL"),
            events_bus,
            slot_lag_alert_bytes,
            cdc,
            replica_identity_full,
            chunk_mb,
            max_concurrency,
            peek_sessions,
            format,
            commit_ts_column,
            selection,
            source_secret_arn: get("PGSHIFT_SOURCE_SECRET_ARN"),
            source_sslmode,
            task: get("PGSHIFT_TASK"),
            stage: get("PGSHIFT_STAGE"),
            state_table: get("PGSHIFT_STATE_TABLE"),
        })
    }
}

/// `true`/`1` or `false`/`0`; `default` when unset.
fn parse_flag(name: &str, value: Option<String>, default: bool) -> Result<bool> {
    match value.as_deref() {
        None => Ok(default),
        Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(Error::config(
            name,
            format!("{other:?} is not true or false"),
        )),
    }
}

/// A whole number in `1..=max`; `default` when unset.
fn parse_number(name: &str, value: Option<String>, default: u64, max: u64) -> Result<u64> {
    match value {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                Error::config(
                    name,
                    format!("{v:?} is not a whole number between 1 and {max}"),
                )
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_url() {
        let c = PgConfig::from_url(
            "postgres://app%40x:p%3Ass@db.example.com:6543/my%20db?sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=3",
            "source",
        )
        .unwrap();
        assert_eq!(c.host, "db.example.com");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "app@x");
        assert_eq!(c.password_bytes(), Some(&b"p:ss"[..]));
        assert_eq!(c.dbname, "my db");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(
            c.sslrootcert.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
    }

    #[test]
    fn defaults_like_libpq() {
        let c = PgConfig::from_url("postgresql://localhost", "source").unwrap();
        assert_eq!(
            (c.port, c.user.as_str(), c.dbname.as_str()),
            (5432, "postgres", "postgres")
        );
        assert_eq!(c.sslmode, SslMode::Prefer);
        let c = PgConfig::from_url("postgres://[::1]:5433/x", "source").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 5433));
    }

    #[test]
    fn malformed_urls_name_the_problem_without_the_password() {
        let cases = [
            ("mysql://u:hunter2@h/db", "expected a postgres:// URL"),
            ("postgres://u:hunter2@h:99999/db", "port \"99999\""),
            ("postgres://u:hunter2@h:abc/db", "port \"abc\""),
            ("postgres://u:hunter2@:5432/db", "host is missing"),
            (
                "postgres://u:hunter2@h/db?sslmode=maybe",
                "sslmode \"maybe\"",
            ),
            (
                "postgres://u:hunter2@h/db?sslmod=require",
                "unknown connection parameter \"sslmod\"",
            ),
            (
                "postgres://u:hunter2@h/db?connect_timeout=0",
                "connect_timeout",
            ),
            ("postgres://u:hunter2@a,b/db", "multiple hosts"),
        ];
        for (url, want) in cases {
            let err = PgConfig::from_url(url, "source").unwrap_err().to_string();
            assert!(err.contains(want), "{url}: {err}");
            assert!(err.starts_with("invalid configuration: source:"), "{err}");
            assert!(!err.contains("hunter2"), "password leaked: {err}");
        }
    }

    #[test]
    fn debug_redacts_password() {
        let c = PgConfig::from_url("postgres://u:hunter2@h/db", "source").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let spec: EndpointSpec =
            serde_json::from_str(r#"{"host":"h","password":"hunter2"}"#).unwrap();
        assert!(!format!("{spec:?}").contains("hunter2"));
    }

    #[test]
    fn endpoint_spec_accepts_dms_secret_shape() {
        let spec: EndpointSpec = serde_json::from_str(
            r#"{"engine":"postgres","host":"h","port":"5433","username":"u","password":"p","dbname":"d","dbInstanceIdentifier":"x"}"#,
        )
        .unwrap();
        let c = PgConfig::from_endpoint(&spec, "secret").unwrap();
        assert_eq!(
            (c.port, c.user.as_str(), c.dbname.as_str()),
            (5433, "u", "d")
        );
        let spec: EndpointSpec = serde_json::from_str(r#"{"host":"h","port":70000}"#).unwrap();
        let err = PgConfig::from_endpoint(&spec, "endpoint")
            .unwrap_err()
            .to_string();
        assert!(err.contains("endpoint.port"), "{err}");
    }

    #[test]
    fn source_spec_forms() {
        assert!(matches!(
            SourceSpec::parse("secret:arn:aws:secretsmanager:us-east-1:1:secret:x", "source").unwrap(),
            SourceSpec::Secret(a) if a.starts_with("arn:")
        ));
        assert!(SourceSpec::parse("secret:", "source").is_err());
        assert!(matches!(
            SourceSpec::parse("postgres://h/db", "source").unwrap(),
            SourceSpec::Direct(_)
        ));
    }

    #[test]
    fn lambda_env_is_validated() {
        let env = LambdaEnv::from_pairs([
            ("PGSHIFT_SOURCE_SECRET_ARN", "arn:x"),
            ("PGSHIFT_STAGE", "s3://b/p"),
            ("HOME", "/root"),
        ])
        .unwrap();
        assert_eq!(env.source_secret_arn.as_deref(), Some("arn:x"));
        let err = LambdaEnv::from_pairs([("PGSHIFT_STAGE", "/tmp/x")]).unwrap_err();
        assert!(err.to_string().contains("PGSHIFT_STAGE"));
        let err = LambdaEnv::from_pairs([("PGSHIFT_SOURCE_SSLMODE", "on")]).unwrap_err();
        assert!(err.to_string().contains("PGSHIFT_SOURCE_SSLMODE"));
        assert_eq!(env.peek_sessions, 2);
        let one = LambdaEnv::from_pairs([("PGSHIFT_PEEK_SESSIONS", "1")]).unwrap();
        assert_eq!(one.peek_sessions, 1);
        for bad in ["0", "3", "two"] {
            let err = LambdaEnv::from_pairs([("PGSHIFT_PEEK_SESSIONS", bad)]).unwrap_err();
            assert!(err.to_string().contains("PGSHIFT_PEEK_SESSIONS"), "{err}");
        }
    }
}

/// Checks a task name: it names the slot, the publication, state items and files, so it is
/// 1–48 characters of `a-z`, `0-9` and `-`, starting with a letter.
pub fn check_task_name(task: &str) -> Result<()> {
    let ok = (1..=48).contains(&task.len())
        && task.starts_with(|c: char| c.is_ascii_lowercase())
        && task
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::config(
            "task",
            format!(
                "{:?} is not a task name: use 1-48 of a-z, 0-9 and '-', starting with a letter",
                task.chars().take(60).collect::<String>()
            ),
        ))
    }
}

/// The replication slot (and publication) name of a task: `pgshift_<task>` with `-` as `_`
/// (slot names allow only lower-case letters, digits and underscores).
pub fn slot_name(task: &str) -> String {
    format!("pgshift_{}", task.replace('-', "_"))
}

#[cfg(test)]
mod task_tests {
    use super::*;

    #[test]
    fn task_names() {
        assert!(check_task_name("orders-prod").is_ok());
        for bad in ["", "Orders", "1abc", "a_b", "a b", "../x", &"a".repeat(49)] {
            assert!(check_task_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(slot_name("orders-prod"), "pgshift_orders_prod");
    }
}
