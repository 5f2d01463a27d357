//! The `pgshift` command: the same jobs as the Lambdas, run locally on embedded defaults.
//!
//! Exit codes: 0 success (all checks pass or warn), 1 a check or the job failed, 2 a usage or
//! configuration error.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgshift::Error;
use pgshift::aws::Aws;
use pgshift::config::SourceSpec;
use pgshift::staging::encode::Format;
use pgshift::job::apply::{self, ApplyOptions};
use pgshift::job::cdc_poll::{self, CdcOptions};
use pgshift::job::full_load::{self, LoadOptions, Progress};
use pgshift::job::test_endpoint;
use pgshift::job::{status, validate};
use pgshift::selection::Selection;
use pgshift::source::checks::{CheckOptions, Status};
use std::sync::Arc;

mod report;

#[derive(Parser)]
#[command(
    name = "pgshift",
    version,
    about = "Move a live PostgreSQL database into S3: full load, then CDC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that a source can serve a full load and CDC; prints a pass/warn/fail table.
    TestEndpoint {
        /// `postgres://user:password@host:port/dbname?sslmode=..` or `secret:<arn>`.
        #[arg(long, env = "PGSHIFT_SOURCE")]
        source: String,
        /// DMS table-mapping JSON file with selection rules (default: all user tables).
        #[arg(long, env = "PGSHIFT_TABLES")]
        tables: Option<std::path::PathBuf>,
        /// The task's slot name, to check its health.
        #[arg(long)]
        slot: Option<String>,
        /// The task's publication name, to check it exists.
        #[arg(long)]
        publication: Option<String>,
        /// Report transactions open longer than this many seconds.
        #[arg(long, default_value_t = 60.0)]
        long_transaction_secs: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Load the selected tables in parallel chunks (COPY), optionally creating the CDC slot first.
    FullLoad {
        #[arg(long, env = "PGSHIFT_TASK")]
        task: String,
        /// `postgres://..` or `secret:<arn>`.
        #[arg(long, env = "PGSHIFT_SOURCE")]
        source: String,
        /// A folder, or `s3://bucket/prefix` (default ./pgshift-data/stage).
        #[arg(long, env = "PGSHIFT_STAGE", default_value = "./pgshift-data/stage")]
        stage: String,
        /// A folder, or `dynamodb://table` (default ./pgshift-data/state).
        #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
        state: String,
        /// DMS table-mapping JSON file with selection rules (default: all user tables).
        #[arg(long, env = "PGSHIFT_TABLES")]
        tables: Option<std::path::PathBuf>,
        /// csv, csv.gz, jsonl or jsonl.gz.
        #[arg(long, env = "PGSHIFT_FORMAT", default_value = "csv")]
        format: String,
        /// Chunks exported at once.
        #[arg(long, default_value_t = 2)]
        parallel: usize,
        /// Create the publication and slot first, so `pgshift cdc` continues from the load.
        #[arg(long)]
        cdc: bool,
        /// Target heap size of a chunk, MiB (small enough that local workers stay balanced).
        #[arg(long, default_value_t = 64)]
        chunk_mb: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply the staged load and CDC batches to a target PostgreSQL (exactly once, resumable).
    Apply {
        #[arg(long, env = "PGSHIFT_TASK")]
        task: String,
        #[arg(long, env = "PGSHIFT_STAGE", default_value = "./pgshift-data/stage")]
        stage: String,
        #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
        state: String,
        /// `postgres://..` or `secret:<arn>` of the target.
        #[arg(long, env = "PGSHIFT_TARGET")]
        target: String,
        /// Keep applying new batches every --interval seconds until interrupted.
        #[arg(long)]
        follow: bool,
        #[arg(long, default_value_t = 10)]
        interval: u64,
        #[arg(long)]
        json: bool,
    },
    /// Compare source and target table by table (row counts, checksums, differing keys).
    Validate {
        #[arg(long, env = "PGSHIFT_TASK")]
        task: String,
        #[arg(long, env = "PGSHIFT_STAGE", default_value = "./pgshift-data/stage")]
        stage: String,
        #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
        state: String,
        #[arg(long, env = "PGSHIFT_SOURCE")]
        source: String,
        #[arg(long, env = "PGSHIFT_TARGET")]
        target: String,
        /// DMS table-mapping JSON file with selection rules (default: all user tables).
        #[arg(long, env = "PGSHIFT_TABLES")]
        tables: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show a task: load progress per table, CDC checkpoint, lag and slot health.
    Status {
        #[arg(long, env = "PGSHIFT_TASK")]
        task: String,
        #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
        state: String,
        /// The source, for live lag and slot health (optional).
        #[arg(long, env = "PGSHIFT_SOURCE")]
        source: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Drain the task's slot into staged files (creates the publication and slot of a CDC-only task).
    Cdc {
        #[arg(long, env = "PGSHIFT_TASK")]
        task: String,
        /// `postgres://..` or `secret:<arn>`.
        #[arg(long, env = "PGSHIFT_SOURCE")]
        source: String,
        /// A folder, or `s3://bucket/prefix` (default ./pgshift-data/stage).
        #[arg(long, env = "PGSHIFT_STAGE", default_value = "./pgshift-data/stage")]
        stage: String,
        /// A folder, or `dynamodb://table` (default ./pgshift-data/state).
        #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
        state: String,
        /// csv, csv.gz, jsonl or jsonl.gz.
        #[arg(long, env = "PGSHIFT_FORMAT", default_value = "csv")]
        format: String,
        /// DMS table-mapping JSON file with selection rules (default: all user tables).
        #[arg(long, env = "PGSHIFT_TABLES")]
        tables: Option<std::path::PathBuf>,
        /// Add the commit timestamp column to CSV rows.
        #[arg(long)]
        commit_ts_column: bool,
        /// Drain once and exit.
        #[arg(long, conflicts_with = "follow", required_unless_present = "follow")]
        once: bool,
        /// Keep draining every --interval seconds until interrupted.
        #[arg(long)]
        follow: bool,
        #[arg(long, default_value_t = 10)]
        interval: u64,
        /// Cut batches after this many changes (at a commit boundary).
        #[arg(long, default_value_t = 250_000)]
        max_batch_changes: u64,
        /// Backends a large drain may decode with at once: 2 splits a drain of 16 MiB of WAL
        /// or more between two sessions, 1 never does.
        #[arg(long, env = "PGSHIFT_PEEK_SESSIONS", default_value_t = 2)]
        peek_sessions: u8,
        /// Print each poll's report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // One thread for the CDC drain: the connection task and the consumer hand rows over
    // without cross-thread wake-ups, and the PostgreSQL backend keeps the other core (measured
    // by bench-cdc.sh). Parallel full-load workers get a thread each.
    let mut builder = match &cli.command {
        Command::FullLoad { parallel, .. } if *parallel > 1 => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads((*parallel).min(64));
            b
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            match err {
                Error::Config { .. } | Error::Event { .. } => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGSHIFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(cli: Cli) -> pgshift::Result<ExitCode> {
    match cli.command {
        Command::TestEndpoint {
            source,
            tables,
            slot,
            publication,
            long_transaction_secs,
            json,
        } => {
            let spec = SourceSpec::parse(&source, "--source")?;
            let selection = read_selection(tables.as_deref())?;
            if !long_transaction_secs.is_finite() || long_transaction_secs < 0.0 {
                return Err(Error::config(
                    "--long-transaction-secs",
                    "must be a non-negative number",
                ));
            }
            let cfg = resolve(&spec).await?;
            let opts = CheckOptions {
                selection,
                slot_name: slot,
                publication_name: publication,
                long_transaction_secs,
            };
            let report = test_endpoint::run(&cfg, &opts).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", report::endpoint_table(&report));
            }
            Ok(if report.worst() == Status::Fail {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::FullLoad {
            task,
            source,
            stage,
            state,
            tables,
            format,
            parallel,
            cdc,
            chunk_mb,
            json,
        } => {
            pgshift::config::check_task_name(&task)?;
            let spec = SourceSpec::parse(&source, "--source")?;
            let format = Format::parse(&format, "--format")?;
            let selection = read_selection(tables.as_deref())?;
            if !(1..=64).contains(&parallel) {
                return Err(Error::config("--parallel", "must be between 1 and 64"));
            }
            pgshift::plan::ChunkSizing::from_mib(chunk_mb, 150_000)
                .map_err(|e| Error::config("--chunk-mb", e.to_string()))?;
            let Seams {
                source: cfg,
                stage,
                state,
                aws,
            } = Seams::resolve(&spec, &stage, &state).await?;
            let owner = lease_owner();
            let mut opts = LoadOptions::new(task, cfg, owner);
            opts.format = format;
            opts.selection = selection;
            opts.chunk_mib = chunk_mb;
            opts.cdc = cdc;
            let progress = Arc::new(Progress::default());
            let ticker = report::spawn_progress(progress.clone());
            let result = with_seams!(&stage, &state, aws.as_ref(), |sink, store| {
                full_load::run_local(&sink, &store, &opts, parallel, progress.clone()).await
            });
            ticker.abort();
            let report = result?;
            if json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                println!("{}", report::load_summary(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply {
            task,
            stage,
            state: _,
            target,
            follow,
            interval,
            json,
        } => {
            pgshift::config::check_task_name(&task)?;
            let stage = Target::parse_stage(&stage)?;
            let spec = SourceSpec::parse(&target, "--target")?;
            let aws = if stage.is_aws() || matches!(spec, SourceSpec::Secret(_)) {
                Some(Aws::from_env().await)
            } else {
                None
            };
            let target = match (&spec, &aws) {
                (SourceSpec::Secret(_), Some(aws)) => aws.resolve(&spec, None).await?,
                _ => resolve(&spec).await?,
            };
            loop {
                let report = match &stage {
                    Target::Local(dir) => {
                        apply::run(
                            &pgshift::staging::LocalSink::new(dir),
                            &target,
                            &task,
                            ApplyOptions::default(),
                        )
                        .await?
                    }
                    Target::Aws(url) => {
                        let aws = aws.as_ref().ok_or_else(|| {
                            Error::config("aws", "AWS configuration was not loaded")
                        })?;
                        let sink = pgshift::staging::S3Sink::new(aws.s3(), url)?;
                        apply::run(&sink, &target, &task, ApplyOptions::default()).await?
                    }
                };
                if json {
                    println!("{}", serde_json::to_string(&report).unwrap_or_default());
                } else {
                    println!(
                        "task {}: {}{} batches, {} changes applied; target at {}",
                        report.task,
                        if report.load_applied {
                            format!("load applied ({} rows); ", report.load_rows)
                        } else {
                            String::new()
                        },
                        report.batches_applied,
                        report.changes_applied,
                        report.position
                    );
                }
                if !follow {
                    return Ok(ExitCode::SUCCESS);
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(interval.max(1))) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
                }
            }
        }
        Command::Validate {
            task,
            stage: _,
            state: _,
            source,
            target,
            tables,
            json,
        } => {
            pgshift::config::check_task_name(&task)?;
            let selection = read_selection(tables.as_deref())?;
            let source = resolve(&SourceSpec::parse(&source, "--source")?).await?;
            let target = resolve(&SourceSpec::parse(&target, "--target")?).await?;
            let report = validate::run(&source, &target, &selection).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", report::validate_table(&report));
            }
            Ok(if report.equal {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Status {
            task,
            state,
            source,
            json,
        } => {
            let state = Target::parse_state(&state)?;
            let source = match &source {
                Some(s) => Some(resolve(&SourceSpec::parse(s, "--source")?).await?),
                None => None,
            };
            let aws = if state.is_aws() {
                Some(Aws::from_env().await)
            } else {
                None
            };
            let status = match &state {
                Target::Local(dir) => {
                    status::run(&pgshift::state::FileStore::new(dir), &task, source.as_ref())
                        .await?
                }
                Target::Aws(table) => {
                    let aws = aws
                        .as_ref()
                        .ok_or_else(|| Error::config("aws", "AWS configuration was not loaded"))?;
                    status::run(
                        &pgshift::state::DynamoStore::new(aws.dynamodb(), table),
                        &task,
                        source.as_ref(),
                    )
                    .await?
                }
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
            } else {
                print!("{}", report::status_text(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cdc {
            task,
            source,
            stage,
            state,
            format,
            tables,
            commit_ts_column,
            once: _,
            follow,
            interval,
            max_batch_changes,
            peek_sessions,
            json,
        } => {
            pgshift::config::check_task_name(&task)?;
            let spec = SourceSpec::parse(&source, "--source")?;
            let format = Format::parse(&format, "--format")?;
            let selection = read_selection(tables.as_deref())?;
            if max_batch_changes == 0 {
                return Err(Error::config("--max-batch-changes", "must be at least 1"));
            }
            if !(1..=2).contains(&peek_sessions) {
                return Err(Error::config("--peek-sessions", "must be 1 or 2"));
            }
            let Seams {
                source: cfg,
                stage,
                state,
                aws,
            } = Seams::resolve(&spec, &stage, &state).await?;
            let owner = lease_owner();
            let mut opts = CdcOptions::new(task, cfg, owner);
            opts.format = format;
            opts.commit_ts_column = commit_ts_column;
            opts.selection = selection;
            opts.max_batch_changes = max_batch_changes;
            opts.peek_sessions = peek_sessions;
            let interval = std::time::Duration::from_secs(interval.max(1));
            loop {
                let report = with_seams!(&stage, &state, aws.as_ref(), |sink, store| {
                    cdc_poll::run(&sink, &store, &opts).await
                })?;
                if json {
                    println!("{}", serde_json::to_string(&report).unwrap_or_default());
                } else {
                    println!("{}", report::poll_summary(&report));
                }
                if !follow {
                    return Ok(ExitCode::SUCCESS);
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
                }
            }
        }
    }
}

/// Who holds a lease taken by this process (shown by `status` and in lease-held reports).
fn lease_owner() -> String {
    format!("cli-{}-{}", hostname(), std::process::id())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "local".to_owned())
}

/// Runs `$body` with `$sink` and `$store` bound to the implementations the targets name.
macro_rules! with_seams {
    ($stage:expr, $state:expr, $aws:expr, |$sink:ident, $store:ident| $body:expr) => {{
        use pgshift::staging::{LocalSink, S3Sink};
        use pgshift::state::{DynamoStore, FileStore};
        let aws: Option<&Aws> = $aws;
        let need_aws =
            || aws.ok_or_else(|| Error::config("aws", "AWS configuration was not loaded"));
        async {
            match ($stage, $state) {
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
                    let ($sink, $store) =
                        (S3Sink::new(need_aws()?.s3(), url)?, FileStore::new(sdir));
                    $body
                }
                (Target::Aws(url), Target::Aws(table)) => {
                    let $store = DynamoStore::new(need_aws()?.dynamodb(), table);
                    $store.ensure_table().await?;
                    let $sink = S3Sink::new(need_aws()?.s3(), url)?;
                    $body
                }
            }
        }
        .await
    }};
}
use with_seams;

/// The source, staging and state a job command names; AWS is loaded only when one needs it.
struct Seams {
    source: pgshift::config::PgConfig,
    stage: Target,
    state: Target,
    aws: Option<Aws>,
}

impl Seams {
    async fn resolve(spec: &SourceSpec, stage: &str, state: &str) -> pgshift::Result<Seams> {
        let stage = Target::parse_stage(stage)?;
        let state = Target::parse_state(state)?;
        let aws = if stage.is_aws() || state.is_aws() || matches!(spec, SourceSpec::Secret(_)) {
            Some(Aws::from_env().await)
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
        })
    }
}

/// Where staged data or state lives, as the command line names it.
enum Target {
    Local(std::path::PathBuf),
    Aws(String),
}

impl Target {
    fn parse_stage(s: &str) -> pgshift::Result<Target> {
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

    fn parse_state(s: &str) -> pgshift::Result<Target> {
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

    fn is_aws(&self) -> bool {
        matches!(self, Target::Aws(_))
    }
}

fn read_selection(tables: Option<&std::path::Path>) -> pgshift::Result<Selection> {
    match tables {
        None => Ok(Selection::all()),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::config("--tables", format!("cannot read {}: {e}", path.display()))
            })?;
            Selection::from_json(&text, "--tables")
        }
    }
}

async fn resolve(spec: &SourceSpec) -> pgshift::Result<pgshift::config::PgConfig> {
    match spec {
        SourceSpec::Direct(cfg) => Ok((**cfg).clone()),
        SourceSpec::Secret(_) => Aws::from_env().await.resolve(spec, None).await,
    }
}
