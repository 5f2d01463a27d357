//! Configuration: one typed value, built by pure functions from strings, validated once.
//!
//! A source (or target) is given as a libpq-style URL
//! (`postgres://user:password@host:port/dbname?sslmode=verify-full&sslrootcert=/path`), as
//! `secret:<arn>` (a Secrets Manager secret in the DMS shape `{host, port, username, password,
//! dbname}`), or, in events, as an [`EndpointSpec`] object. Passwords are [`SecretString`]s:
//! they never reach `Debug`, logs or error messages, and a malformed URL is reported without
//! echoing it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod lambda_env;
pub mod libpq;
pub mod s3_settings;
pub use lambda_env::{LambdaEnv, check_bus, check_schema_name, native_start, parse_stop_position};

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

    /// The mode for an endpoint that names none: `verify-full` on an RDS or Aurora host (the
    /// RDS certificate authorities are built in), `otherwise` elsewhere.
    pub fn for_host(host: &str, otherwise: SslMode) -> SslMode {
        if is_rds_host(host) {
            SslMode::VerifyFull
        } else {
            otherwise
        }
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

/// An Amazon RDS or Aurora endpoint (`<name>.<id>.<region>.rds.amazonaws.com[.cn]`, RDS Proxy
/// included), whose certificate chains to the RDS certificate authorities.
pub fn is_rds_host(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host.ends_with(".rds.amazonaws.com") || host.ends_with(".rds.amazonaws.com.cn")
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
    /// PEM file of CA certificates trusted for `verify-ca` / `verify-full`, added to the public
    /// web roots and the built-in RDS certificate authorities.
    pub sslrootcert: Option<PathBuf>,
    /// The same as PEM text (a secret's `sslrootcert` holding the certificates themselves: a
    /// Lambda has no file to point at).
    pub sslrootcert_pem: Option<String>,
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
            .field(
                "sslrootcert_pem",
                &self.sslrootcert_pem.as_ref().map(|p| p.len()),
            )
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
            sslrootcert_pem: None,
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
        libpq::build(
            libpq::url_settings(url, field)?,
            field,
            &libpq::LibpqEnv::none(),
        )
    }

    pub(crate) fn set_option(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
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
        cfg.sslmode = SslMode::for_host(&cfg.host, cfg.sslmode);
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
        match spec.sslrootcert.as_deref().map(str::trim) {
            Some(pem) if pem.starts_with("-----BEGIN") => {
                cfg.sslrootcert_pem = Some(pem.to_owned())
            }
            Some(path) => cfg.sslrootcert = Some(PathBuf::from(path)),
            None => {}
        }
        Ok(cfg)
    }

    /// The password, for the driver only.
    pub(crate) fn password_bytes(&self) -> Option<&[u8]> {
        self.password.as_ref().map(|p| p.expose_secret().as_bytes())
    }
}

pub(crate) fn split_host_port(s: &str) -> std::result::Result<(String, u16), String> {
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

pub(crate) fn parse_port(p: &str) -> std::result::Result<u16, String> {
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

    /// The CLI form as libpq reads it: a `postgres://` URL or `key=value` conninfo, with
    /// `PG*` environment variables for what it leaves out and the password from the password
    /// file (`PGPASSFILE`, `~/.pgpass`) when neither gives one; or `secret:<arn>`.
    pub fn parse_libpq(value: &str, field: &str, env: &libpq::LibpqEnv) -> Result<SourceSpec> {
        if value.starts_with("secret:") {
            return SourceSpec::parse(value, field);
        }
        let settings = if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            libpq::url_settings(value, field)?
        } else {
            libpq::conninfo_settings(value, field)?
        };
        libpq::build(settings, field, env).map(|c| SourceSpec::Direct(Box::new(c)))
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
    fn rds_and_aurora_hosts_default_to_verify_full() {
        for host in [
            "db1.abcdefghijkl.eu-west-1.rds.amazonaws.com",
            "app.cluster-ro-abcdefghijkl.us-east-1.rds.amazonaws.com.",
            "px.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com",
            "db.abcdefghijkl.rds.cn-north-1.rds.amazonaws.com.cn",
            "DB1.ABC.EU-WEST-1.RDS.AMAZONAWS.COM",
        ] {
            assert!(is_rds_host(host), "{host}");
            let c = PgConfig::from_url(&format!("postgres://u@{host}/db"), "source").unwrap();
            assert_eq!(c.sslmode, SslMode::VerifyFull, "{host}");
            // Named, the mode stays the user's.
            let c = PgConfig::from_url(&format!("postgres://u@{host}/db?sslmode=require"), "s")
                .unwrap();
            assert_eq!(c.sslmode, SslMode::Require);
        }
        for host in [
            "localhost",
            "rds.amazonaws.com.evil.example",
            "myrds.amazonaws.com",
        ] {
            assert!(!is_rds_host(host), "{host}");
            assert_eq!(SslMode::for_host(host, SslMode::Require), SslMode::Require);
        }
        let spec: EndpointSpec = serde_json::from_value(serde_json::json!({
            "host": "db1.abc.eu-west-1.rds.amazonaws.com",
            "sslrootcert": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        }))
        .unwrap();
        let c = PgConfig::from_endpoint(&spec, "secret").unwrap();
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert!(c.sslrootcert.is_none());
        assert!(c.sslrootcert_pem.as_deref().unwrap().contains("AAAA"));
        assert!(!format!("{c:?}").contains("AAAA"));
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

/// DMS's native start: CDC from a slot and publication the user made (the publication before
/// the slot, so it exists at every position the slot decodes), from a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeStart {
    pub slot: String,
    pub publication: String,
    /// DMS's `CdcStartPosition`: transactions committed after it are staged (`None`: from
    /// the slot's confirmed position).
    pub start: Option<crate::lsn::Lsn>,
}

impl NativeStart {
    /// Checked names: a slot name is PostgreSQL's (`a-z`, `0-9`, `_`, up to 63), a
    /// publication any name of up to 63 bytes; each error names its field.
    pub fn new(
        slot: &str,
        publication: &str,
        start: Option<crate::lsn::Lsn>,
        fields: (&str, &str),
    ) -> Result<NativeStart> {
        if slot.is_empty()
            || slot.len() > 63
            || !slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(Error::config(
                fields.0,
                format!("{slot:?} is not a replication slot name (a-z, 0-9 and _, up to 63)"),
            ));
        }
        if publication.is_empty() || publication.len() > 63 || publication.contains('\0') {
            return Err(Error::config(
                fields.1,
                format!("{publication:?} is not a publication name (1 to 63 bytes)"),
            ));
        }
        Ok(NativeStart {
            slot: slot.to_owned(),
            publication: publication.to_owned(),
            start,
        })
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
