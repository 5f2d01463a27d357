//! What the commands' shared flags resolve to: `--s3-settings` with `--stage` and
//! `--format`, `--source`, `--until`, `--events-bus`, and `--follow`'s retries.

use std::time::Duration;

use pgshift::Error;
use pgshift::aws::Aws;
use pgshift::config::SourceSpec;
use pgshift::staging::Encryption;
use pgshift::staging::encode::Format;

use crate::commands::wait_or_interrupt;
use crate::seams::resolve;

/// `--s3-settings` (DMS's S3Settings) with `--stage` and `--format`: its bucket and folder are
/// the stage and its format the format, unless the flags say otherwise (then they must agree).
/// SSE-KMS needs an S3 stage.
pub(crate) fn s3_settings(
    value: Option<&str>,
    stage: &mut String,
    format: &str,
) -> pgshift::Result<FromS3Settings> {
    let flag_format = Format::parse(format, "--format")?;
    let Some(value) = value else {
        return Ok(FromS3Settings {
            format: flag_format,
            commit_ts_column: false,
            load_op_column: false,
            csv_header: false,
            cdc_ops: Default::default(),
            date_partition: None,
            csv_dialect: Default::default(),
            cdc_path: None,
            encryption: Encryption::BucketDefault,
        });
    };
    let s = pgshift::config::s3_settings::read(value, "--s3-settings")?;
    for note in &s.notes {
        eprintln!("note: {note}");
    }
    *stage = s.resolve_stage(stage, (stage != DEFAULT_STAGE).then_some("--stage"))?;
    let format = s.resolve_format(flag_format, (format != "csv").then_some("--format"))?;
    if s.encryption != Encryption::BucketDefault && !stage.starts_with("s3://") {
        return Err(Error::config(
            "--s3-settings: S3Settings.EncryptionMode",
            format!("SSE_KMS encrypts S3 objects; the stage {stage} is a folder"),
        ));
    }
    Ok(FromS3Settings {
        format,
        commit_ts_column: s.commit_ts_column,
        load_op_column: s.include_op_for_full_load,
        csv_header: s.add_column_name,
        cdc_ops: s.cdc_ops,
        date_partition: s.date_partition,
        csv_dialect: s.csv.clone(),
        cdc_path: s.cdc_path.clone(),
        encryption: s.encryption,
    })
}

/// What `--s3-settings` decides.
pub(crate) struct FromS3Settings {
    pub(crate) format: Format,
    pub(crate) commit_ts_column: bool,
    pub(crate) load_op_column: bool,
    pub(crate) csv_header: bool,
    pub(crate) cdc_ops: pgshift::staging::layout::CdcOps,
    pub(crate) date_partition: Option<pgshift::staging::layout::DatePartition>,
    pub(crate) csv_dialect: pgshift::staging::dialect::CsvDialect,
    /// `PreserveTransactions` with `CdcPath`.
    pub(crate) cdc_path: Option<String>,
    pub(crate) encryption: Encryption,
}

/// `--stage`'s default: a folder here.
pub(crate) const DEFAULT_STAGE: &str = "./pgshift-data/stage";

/// What `--follow` waits out: transient failures, and a source or target that refuses
/// connections (restarting, failing over) — never a wrong password, database or name.
pub(crate) fn retry_when_following(e: &Error) -> bool {
    e.is_transient()
        || matches!(
            e,
            Error::Connect {
                kind: pgshift::error::ConnectFailure::Refused,
                ..
            }
        )
}

/// `--follow`'s retry after a transient failure: the interval, doubling up to 5 minutes,
/// back to the interval after a success.
pub(crate) struct Backoff {
    base: Duration,
    next: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration) -> Backoff {
        Backoff {
            base,
            next: base,
            failures: 0,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.base;
        self.failures = 0;
    }

    /// Says what failed and when it tries again, then waits (false: interrupted).
    pub(crate) async fn wait_after(&mut self, err: &Error, what: &str) -> bool {
        self.failures += 1;
        eprintln!(
            "warning: {what} failed ({} in a row, transient): {err}; trying again in {} s",
            self.failures,
            self.next.as_secs()
        );
        tracing::warn!(error = %err, failures = self.failures, retry_in_s = self.next.as_secs(), "{what} failed; retrying");
        let wait = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(300));
        wait_or_interrupt(wait).await
    }
}

/// `--events-bus`: off unless given; EventBridge on the bus (the AWS clients of the stage
/// and state when they are on AWS, else from the environment).
pub(crate) async fn events_for(
    bus: Option<&str>,
    aws: Option<&Aws>,
) -> pgshift::Result<pgshift::events::Events> {
    let Some(bus) = bus.map(str::trim).filter(|b| !b.is_empty() && *b != "none") else {
        return Ok(pgshift::events::Events::off());
    };
    let bus = pgshift::config::check_bus(bus, "--events-bus")?;
    let aws = match aws {
        Some(aws) => aws.clone(),
        None => crate::aws().await,
    };
    Ok(pgshift::events::for_bus(&aws, Some(&bus)))
}

/// The source's connection settings from `--source` (a URL or `secret:<arn>`).
pub(crate) async fn resolve_source(source: &str) -> pgshift::Result<pgshift::config::PgConfig> {
    let spec = crate::source_spec(source, "--source")?;
    match &spec {
        SourceSpec::Secret(_) => crate::aws().await.resolve(&spec, None).await,
        _ => resolve(&spec).await,
    }
}

/// `--until`: a WAL position, or `caught-up` (the source's current position, read now).
pub(crate) async fn until_position(
    until: &str,
    source: Option<&pgshift::config::PgConfig>,
) -> pgshift::Result<pgshift::lsn::Lsn> {
    if until != "caught-up" {
        return until.parse().map_err(|_| {
            Error::config(
                "--until",
                format!("{until:?} is neither a WAL position (X/Y) nor caught-up"),
            )
        });
    }
    let Some(source) = source else {
        return Err(Error::config(
            "--until",
            "caught-up needs --source (or PGSHIFT_SOURCE): the source's position is what the target catches up with",
        ));
    };
    source_position(source).await
}

/// The source's WAL insert position now.
pub(crate) async fn source_position(
    cfg: &pgshift::config::PgConfig,
) -> pgshift::Result<pgshift::lsn::Lsn> {
    let client = pgshift::source::connect(cfg).await?;
    pgshift::source::snapshot::wal_position(&client).await
}
