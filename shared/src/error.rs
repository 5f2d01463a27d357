//! Errors of the library.
//!
//! Every error says whether a retry can help ([`Error::is_transient`]): Lambda and Step Functions
//! retry on transient errors only, so bad input or a missing privilege fails once, clearly,
//! instead of in a retry storm. Messages are lowercase, name what is wrong, and never carry a
//! password or row values.

use std::fmt;

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a connection to PostgreSQL failed, as a person would diagnose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectFailure {
    /// The host name did not resolve.
    Dns,
    /// Nothing listens on the port (connection refused).
    Refused,
    /// No answer within the connect timeout (firewall, security group, wrong host).
    Timeout,
    /// TLS could not be negotiated or the certificate was not trusted.
    Tls,
    /// The server rejected the user name or password.
    Auth,
    /// The database does not exist.
    Database,
    /// The server is full or starting up (a retry may help).
    Unavailable,
    /// Anything else (network reset, protocol error).
    Other,
}

impl ConnectFailure {
    /// Whether a later retry may succeed without anyone changing anything.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ConnectFailure::Timeout | ConnectFailure::Unavailable | ConnectFailure::Other
        )
    }

    /// A stable lowercase name (`dns`, `refused`, ...), used in reports and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Dns => "dns",
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Tls => "tls",
            ConnectFailure::Auth => "auth",
            ConnectFailure::Database => "database",
            ConnectFailure::Unavailable => "unavailable",
            ConnectFailure::Other => "other",
        }
    }
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The library's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is missing or malformed (terminal).
    #[error("invalid configuration: {field}: {reason}")]
    Config { field: String, reason: String },

    /// An event (Lambda input) is malformed (terminal).
    #[error("invalid event: {field}: {reason}")]
    Event { field: String, reason: String },

    /// The source or target could not be reached or refused us.
    #[error("cannot connect to {target} ({kind}): {detail}")]
    Connect {
        kind: ConnectFailure,
        target: String,
        detail: String,
    },

    /// A statement failed on an established connection.
    #[error("postgres: {context}: {detail}")]
    Postgres {
        context: String,
        detail: String,
        transient: bool,
        #[source]
        source: Option<tokio_postgres::Error>,
    },

    /// An AWS API call failed.
    #[error("aws {service}: {context}: {detail}")]
    Aws {
        service: &'static str,
        context: String,
        detail: String,
        transient: bool,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// A conditional write lost a race (another worker moved the state first).
    #[error("state conflict: {0}")]
    Conflict(String),

    /// Another live worker holds the lease of `what` (transient: retry after it expires).
    #[error("{what} is held by {owner} until {} (a run of a dead process on this host is taken over at once; --force takes it)", crate::state::records::human_time(*until_ms))]
    LeaseHeld {
        what: String,
        owner: String,
        until_ms: u64,
    },

    /// The invocation's deadline passed before the step could finish (transient: the next
    /// run redoes it; nothing it did is visible as committed).
    #[error("deadline reached: {0}")]
    Deadline(String),

    /// The task's replication slot is gone, lost WAL, or was consumed by someone else:
    /// changes since the checkpoint cannot be recovered (terminal).
    #[error("{0}")]
    SlotLost(String),

    /// Staged data is missing or not what its manifest says (terminal).
    #[error("staged data: {0}")]
    Staged(String),

    /// Bytes from the server that do not follow the protocol (terminal).
    #[error("protocol: {0}")]
    Protocol(String),

    /// A fault injected by a test wrapper around a seam (`staging::UnreliableSink`,
    /// `state::UnreliableStore`, `source::UnreliableSource`): the process is treated as dead.
    #[error("injected fault: {0}")]
    Injected(String),

    /// The source cannot serve what the task needs (terminal until a person acts).
    #[error("{0}")]
    Source(String),

    /// Local file input/output.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// Something this version does not do yet (terminal).
    #[error("not yet implemented: {0}")]
    NotYet(&'static str),
}

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { kind, .. } => kind.is_transient(),
            Error::Postgres { transient, .. } | Error::Aws { transient, .. } => *transient,
            Error::Io { .. } => true,
            Error::Conflict(_) | Error::LeaseHeld { .. } | Error::Deadline(_) => true,
            Error::Config { .. }
            | Error::Event { .. }
            | Error::Source(_)
            | Error::SlotLost(_)
            | Error::Staged(_)
            | Error::Protocol(_)
            | Error::Injected(_)
            | Error::NotYet(_) => false,
        }
    }

    /// A short machine-readable name of the error's kind (Lambda's `errorType`). Transient
    /// kinds start with `Transient`, so a Step Functions `Retry` matches them by name.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Config { .. } => "ConfigError",
            Error::Event { .. } => "EventError",
            Error::Connect { kind, .. } if kind.is_transient() => "TransientConnectError",
            Error::Connect { .. } => "ConnectError",
            Error::Postgres {
                transient: true, ..
            } => "TransientPostgresError",
            Error::Postgres { .. } => "PostgresError",
            Error::Aws {
                transient: true, ..
            } => "TransientAwsError",
            Error::Aws { .. } => "AwsError",
            Error::Conflict(_) => "TransientStateConflict",
            Error::LeaseHeld { .. } => "TransientLeaseHeld",
            Error::Deadline(_) => "TransientDeadlineReached",
            Error::SlotLost(_) => "SlotLost",
            Error::Staged(_) => "StagedDataError",
            Error::Protocol(_) => "ProtocolError",
            Error::Injected(_) => "InjectedFault",
            Error::Source(_) => "SourceError",
            Error::Io { .. } => "TransientIoError",
            Error::NotYet(_) => "NotYetImplemented",
        }
    }

    /// A configuration error naming the field.
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An event error naming the field.
    pub fn event(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Event {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Wraps a failed statement, classifying it by SQLSTATE: connection loss, serialization
    /// failures, deadlocks, lock and statement timeouts and resource exhaustion are transient.
    pub fn postgres(context: impl Into<String>, err: tokio_postgres::Error) -> Error {
        let (detail, transient) = describe_pg_error(&err);
        Error::Postgres {
            context: context.into(),
            detail,
            transient,
            source: Some(err),
        }
    }

    /// Wraps a local file error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The server's message (with SQLSTATE) or the client-side cause, and whether it is transient.
pub(crate) fn describe_pg_error(err: &tokio_postgres::Error) -> (String, bool) {
    if let Some(db) = err.as_db_error() {
        let code = db.code().code();
        let transient = matches!(
            &code[..2],
            "08" | "40" | "53" | "57" // connection, tx rollback, resources, operator intervention
        ) || code == "55P03"; // lock_not_available (lock_timeout)
        let mut detail = format!("{} (SQLSTATE {code})", db.message());
        if let Some(hint) = db.hint() {
            detail.push_str("; hint: ");
            detail.push_str(hint);
        }
        return (detail, transient);
    }
    // No server error: the connection broke or the client failed; a retry may help.
    let mut detail = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        detail.push_str(": ");
        detail.push_str(&c.to_string());
        cause = c.source();
    }
    (detail, true)
}

/// Maps an SDK error to [`Error::Aws`], transient for throttling, timeouts and 5xx.
pub(crate) fn sdk_error<E, R>(
    service: &'static str,
    context: String,
    err: aws_sdk_s3::error::SdkError<E, R>,
) -> Error
where
    E: std::error::Error + aws_sdk_s3::error::ProvideErrorMetadata + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
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
        source: Some(Box::new(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_and_transient_are_told_apart() {
        assert!(!Error::config("source", "missing").is_transient());
        assert!(!Error::event("endpoint.port", "not a number").is_transient());
        assert!(
            Error::Connect {
                kind: ConnectFailure::Timeout,
                target: "h:5432".into(),
                detail: "x".into()
            }
            .is_transient()
        );
        assert!(
            !Error::Connect {
                kind: ConnectFailure::Auth,
                target: "h:5432".into(),
                detail: "x".into()
            }
            .is_transient()
        );
    }

    #[test]
    fn messages_name_the_field() {
        let e = Error::event("endpoint.port", "must be 1..=65535");
        assert_eq!(
            e.to_string(),
            "invalid event: endpoint.port: must be 1..=65535"
        );
        assert_eq!(e.kind(), "EventError");
    }
}
