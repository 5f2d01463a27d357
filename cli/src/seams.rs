//! Where a command's staged data and state live, as the command line names them, and the
//! source it resolves (a URL, or a Secrets Manager secret).

use pgshift::Error;
use pgshift::aws::Aws;
use pgshift::config::{PgConfig, SourceSpec};
use pgshift::selection::Selection;

/// Runs `$body` with `$sink` and `$store` bound to the implementations the seams' targets name.
macro_rules! with_seams {
    ($seams:expr, |$sink:ident, $store:ident| $body:expr) => {{
        use pgshift::staging::{LocalSink, S3Sink};
        use pgshift::state::{DynamoStore, FileStore};
        let seams: &crate::seams::Seams = $seams;
        let aws: Option<&pgshift::aws::Aws> = seams.aws.as_ref();
        let need_aws =
            || aws.ok_or_else(|| pgshift::Error::config("aws", "AWS configuration was not loaded"));
        async {
            match (&seams.stage, &seams.state) {
                (Target::Local(dir), Target::Local(sdir)) => {
                    let ($sink, $store) = (LocalSink::new(dir), FileStore::new(sdir));
                    $body
                }
                (Target::Local(dir), Target::Aws(table)) => {
                    let $store = DynamoStore::new(need_aws()?.dynamodb(), table);
                    $store.ensure_table().await?;
                    let $sink = LocalSink::new(dir);
                    $body
                }
                (Target::Aws(url), Target::Local(sdir)) => {
                    let $sink = S3Sink::new(need_aws()?.s3(), url)?
                        .with_encryption(seams.encryption.clone());
                    let $store = FileStore::new(sdir);
                    $body
                }
                (Target::Aws(url), Target::Aws(table)) => {
                    let $store = DynamoStore::new(need_aws()?.dynamodb(), table);
                    $store.ensure_table().await?;
                    let $sink = S3Sink::new(need_aws()?.s3(), url)?
                        .with_encryption(seams.encryption.clone());
                    $body
                }
            }
        }
        .await
    }};
}
pub(crate) use with_seams;

/// The source, staging and state a job command names; AWS is loaded only when one needs it.
pub(crate) struct Seams {
    pub(crate) source: PgConfig,
    pub(crate) stage: Target,
    pub(crate) state: Target,
    pub(crate) aws: Option<Aws>,
    /// How staged objects are encrypted in S3 (S3Settings' EncryptionMode).
    pub(crate) encryption: pgshift::staging::Encryption,
}

impl Seams {
    pub(crate) async fn resolve(
        spec: &SourceSpec,
        stage: &str,
        state: &str,
    ) -> pgshift::Result<Seams> {
        let stage = Target::parse_stage(stage)?;
        let state = Target::parse_state(state)?;
        let aws = if stage.is_aws() || state.is_aws() || matches!(spec, SourceSpec::Secret(_)) {
            Some(crate::aws().await)
        } else {
            None
        };
        let source = match (spec, &aws) {
            (SourceSpec::Secret(_), Some(aws)) => aws.resolve(spec, None).await?,
            _ => resolve(spec).await?,
        };
        Ok(Seams {
            source,
            stage,
            state,
            aws,
            encryption: pgshift::staging::Encryption::BucketDefault,
        })
    }
}

/// Where staged data or state lives, as the command line names it.
pub(crate) enum Target {
    Local(std::path::PathBuf),
    Aws(String),
}

impl Target {
    pub(crate) fn parse_stage(s: &str) -> pgshift::Result<Target> {
        if s.starts_with("s3://") {
            pgshift::staging::parse_s3_url(s)?;
            Ok(Target::Aws(s.to_owned()))
        } else if s.contains("://") {
            Err(Error::config(
                "--stage",
                format!("{s:?} is neither a folder nor s3://bucket/prefix"),
            ))
        } else {
            Ok(Target::Local(s.into()))
        }
    }

    pub(crate) fn parse_state(s: &str) -> pgshift::Result<Target> {
        if let Some(table) = s.strip_prefix("dynamodb://") {
            if table.is_empty()
                || table.len() > 255
                || !table
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            {
                return Err(Error::config(
                    "--state",
                    format!("{table:?} is not a DynamoDB table name"),
                ));
            }
            Ok(Target::Aws(table.to_owned()))
        } else if s.contains("://") {
            Err(Error::config(
                "--state",
                format!("{s:?} is neither a folder nor dynamodb://table"),
            ))
        } else {
            Ok(Target::Local(s.into()))
        }
    }

    pub(crate) fn is_aws(&self) -> bool {
        matches!(self, Target::Aws(_))
    }
}

pub(crate) fn read_selection(tables: Option<&std::path::Path>) -> pgshift::Result<Selection> {
    match tables {
        None => Ok(Selection::all()),
        // As `aws dms create-replication-task --table-mappings` takes it: the JSON itself,
        // `file://path`, or (pgshift's habit) a path.
        Some(path) => {
            let given = path.to_string_lossy();
            if given.trim_start().starts_with('{') {
                return Selection::from_json(&given, "--tables");
            }
            let path = std::path::Path::new(given.strip_prefix("file://").unwrap_or(&given));
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::config("--tables", format!("cannot read {}: {e}", path.display()))
            })?;
            Selection::from_json(&text, "--tables")
        }
    }
}

pub(crate) async fn resolve(spec: &SourceSpec) -> pgshift::Result<PgConfig> {
    match spec {
        SourceSpec::Direct(cfg) => Ok((**cfg).clone()),
        SourceSpec::Secret(_) => crate::aws().await.resolve(spec, None).await,
    }
}

/// Who holds a lease taken by this process (`cli-<host>-<pid>`: a later run on this host
/// takes it over at once when this process is gone).
pub(crate) fn lease_owner() -> String {
    pgshift::state::records::local_owner()
}

/// A flag set by the first SIGINT or SIGTERM (a run then stops at its next commit boundary,
/// releasing its lease); a second one exits at once.
pub(crate) fn stop_on_signal() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if flag.swap(true, Ordering::Relaxed) {
                eprintln!("stopping now");
                std::process::exit(130);
            }
            eprintln!("stopping at the next commit boundary (again to stop now)");
        }
    });
    stop
}
