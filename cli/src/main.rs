//! The `pgshift` command: the same jobs as the Lambdas, run locally on embedded defaults.
//!
//! Exit codes: 0 success (all checks pass or warn), 1 a check or the job failed, 2 a usage or
//! configuration error.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use pgshift::Error;

mod commands;
mod report;
mod seams;

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
    TestEndpoint(TestEndpointArgs),
    /// Load the selected tables in parallel chunks (COPY), optionally creating the CDC slot first.
    FullLoad(FullLoadArgs),
    /// Apply the staged load and CDC batches to a target PostgreSQL (exactly once, resumable).
    Apply(ApplyArgs),
    /// Compare source and target table by table (row counts, checksums, differing keys).
    Validate(ValidateArgs),
    /// Finish a PG -> PG migration (writes to the source stopped): apply until caught up with
    /// the source, set the target's sequences to the source's values, validate, say what next.
    Cutover(CutoverArgs),
    /// Show a task: load progress per table, CDC checkpoint, lag and slot health.
    Status(StatusArgs),
    /// Drain the task's slot into staged files (creates the publication and slot of a CDC-only task).
    Cdc(CdcArgs),
    /// Drop everything pgshift created on the source for a task: its replication slot (which
    /// holds WAL until dropped), publications and follow trigger. Staged data and state stay.
    Teardown(TeardownArgs),
}

#[derive(Args)]
pub(crate) struct TeardownArgs {
    #[arg(long, env = "PGSHIFT_TASK")]
    pub(crate) task: String,
    /// `postgres://..` or `secret:<arn>`.
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub(crate) source: String,
    /// Do not ask (for scripts): without it, the task's name is asked for on a terminal.
    #[arg(long)]
    pub(crate) yes: bool,
    /// Also delete the task's state (plan, chunks, checkpoint, task record), so its next full
    /// load starts it over: the way back after its slot or publication was lost.
    #[arg(long)]
    pub(crate) reset: bool,
    /// A folder, or `dynamodb://table` (default ./pgshift-data/state); with --reset.
    #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
    pub(crate) state: String,
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct TestEndpointArgs {
    /// `postgres://user:password@host:port/dbname?sslmode=..` or `secret:<arn>`.
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub(crate) source: String,
    /// DMS table-mapping JSON file with selection rules (default: all user tables).
    #[arg(long, env = "PGSHIFT_TABLES")]
    pub(crate) tables: Option<std::path::PathBuf>,
    /// The task's slot name, to check its health.
    #[arg(long)]
    pub(crate) slot: Option<String>,
    /// The task's publication name, to check it exists.
    #[arg(long)]
    pub(crate) publication: Option<String>,
    /// Report transactions open longer than this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub(crate) long_transaction_secs: f64,
    /// The target of a PG → PG migration (`postgres://..` or `secret:<arn>`): checks it can
    /// create the extensions the selected columns' types come from (PostGIS, ..).
    #[arg(long)]
    pub(crate) target: Option<String>,
    /// Whether the task will capture schema changes with pgshift's event trigger (as
    /// `cdc --capture-ddl`): `true` or `false`.
    #[arg(long, env = "PGSHIFT_CAPTURE_DDL", default_value = "true", action = clap::ArgAction::Set)]
    pub(crate) capture_ddl: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct FullLoadArgs {
    /// EventBridge bus for pgshift's events (`Batch Committed`, `Table Loaded`, `Load
    /// Finished`, `Task State Changed`): a bus name, an event-bus ARN, or `default`. None
    /// unless given.
    #[arg(long, env = "PGSHIFT_EVENTS_BUS")]
    pub(crate) events_bus: Option<String>,
    #[arg(long, env = "PGSHIFT_TASK")]
    pub(crate) task: String,
    /// `postgres://..` or `secret:<arn>`.
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub(crate) source: String,
    /// A folder, or `s3://bucket/prefix` (default ./pgshift-data/stage).
    #[arg(long, env = "PGSHIFT_STAGE", default_value = "./pgshift-data/stage")]
    pub(crate) stage: String,
    /// A folder, or `dynamodb://table` (default ./pgshift-data/state).
    #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
    pub(crate) state: String,
    /// DMS table-mapping JSON file with selection rules (default: all user tables).
    #[arg(long, env = "PGSHIFT_TABLES")]
    pub(crate) tables: Option<std::path::PathBuf>,
    /// csv, csv.gz, jsonl or jsonl.gz.
    #[arg(long, env = "PGSHIFT_FORMAT", default_value = "csv")]
    pub(crate) format: String,
    /// Chunks exported at once.
    #[arg(long, default_value_t = 2)]
    pub(crate) parallel: usize,
    /// Let pgshift set REPLICA IDENTITY FULL on selected tables without a key, so their
    /// updates and deletes are captured too (without it they are captured insert-only).
    #[arg(long, env = "PGSHIFT_REPLICA_IDENTITY_FULL")]
    pub(crate) replica_identity_full: bool,
    /// Capture schema changes (DDL) in order with the data, with an event trigger pgshift
    /// creates when its role may (DMS's `captureDDLs`): `true` or `false`.
    #[arg(long, env = "PGSHIFT_CAPTURE_DDL", default_value = "true", action = clap::ArgAction::Set)]
    pub(crate) capture_ddl: bool,
    /// The schema of pgshift's event-trigger functions on the source (DMS's
    /// `ddlArtifactsSchema`).
    #[arg(long, env = "PGSHIFT_DDL_ARTIFACTS_SCHEMA", default_value = "public")]
    pub(crate) ddl_artifacts_schema: String,
    /// Take the lease even from a live holder (a run that is still going will then fail its
    /// next checkpoint move: nothing is staged twice).
    #[arg(long)]
    pub(crate) force: bool,
    /// Go on when selection rules match no table (a task for tables not created yet).
    #[arg(long)]
    pub(crate) allow_empty: bool,
    /// Create the publication and slot first, so `pgshift cdc` continues from the load.
    #[arg(long)]
    pub(crate) cdc: bool,
    /// Target heap size of a chunk, MiB (small enough that local workers stay balanced).
    #[arg(long, default_value_t = 64)]
    pub(crate) chunk_mb: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct ApplyArgs {
    /// EventBridge bus for pgshift's events (`Batch Committed`, `Table Loaded`, `Load
    /// Finished`, `Task State Changed`): a bus name, an event-bus ARN, or `default`. None
    /// unless given.
    #[arg(long, env = "PGSHIFT_EVENTS_BUS")]
    pub(crate) events_bus: Option<String>,
    #[arg(long, env = "PGSHIFT_TASK")]
    pub(crate) task: String,
    #[arg(long, env = "PGSHIFT_STAGE", default_value = "./pgshift-data/stage")]
    pub(crate) stage: String,
    #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
    pub(crate) state: String,
    /// `postgres://..` or `secret:<arn>` of the target.
    #[arg(long, env = "PGSHIFT_TARGET")]
    pub(crate) target: String,
    /// Keep applying new batches every --interval seconds until interrupted.
    #[arg(long)]
    pub(crate) follow: bool,
    #[arg(long, default_value_t = 10)]
    pub(crate) interval: u64,
    /// Apply until the target has everything up to a WAL position (`X/Y`), or `caught-up`:
    /// the source's current position when apply starts (needs --source). Staged batches are
    /// applied as CDC stages them: by this process with --source, else by `pgshift cdc
    /// --follow` or the Lambda running alongside.
    #[arg(long)]
    pub(crate) until: Option<String>,
    /// The source: with --until, CDC is drained here too (the slot read while batches are
    /// applied, as a native subscriber does; another poller holding the task's lease is left
    /// to drain). `--until caught-up` needs it.
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub(crate) source: Option<String>,
    /// With --until and --source: the task's table mapping (the publication follows it, as
    /// for `pgshift cdc`).
    #[arg(long, env = "PGSHIFT_TABLES")]
    pub(crate) tables: Option<std::path::PathBuf>,
    /// With --until and --source: the format of the batches CDC stages.
    #[arg(long, env = "PGSHIFT_FORMAT", default_value = "csv")]
    pub(crate) format: String,
    /// With --until and --source: changes per staged batch (smaller batches start apply
    /// sooner but fold less; a peek decodes before it streams, so on a small machine one
    /// large batch catches up fastest).
    #[arg(long, default_value_t = 250_000)]
    pub(crate) max_batch_changes: u64,
    /// With --until: seconds to wait for CDC to stage up to the position before giving up.
    #[arg(long, default_value_t = 600)]
    pub(crate) wait: u64,
    /// Target connections loading the full load's chunks at once (and building the
    /// indexes and constraints after it).
    #[arg(long, default_value_t = 2)]
    pub(crate) parallel: usize,
    /// How the target's tables are prepared for the load (DMS's TargetTablePrepMode):
    /// `create` builds the source's schema (types, sequences, tables with defaults, checks and
    /// generated columns before the load; keys, indexes and foreign keys after it) and
    /// truncates tables that exist; `truncate` expects your tables and empties them; `keep`
    /// expects your tables and keeps their rows.
    #[arg(long, env = "PGSHIFT_TARGET_PREP", default_value = "create")]
    pub(crate) target_prep: String,
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct CutoverArgs {
    #[arg(long, env = "PGSHIFT_TASK")]
    pub(crate) task: String,
    /// `postgres://..` or `secret:<arn>` of the source (writes to it stopped).
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub(crate) source: String,
    /// `postgres://..` or `secret:<arn>` of the target.
    #[arg(long, env = "PGSHIFT_TARGET")]
    pub(crate) target: String,
    #[arg(long, env = "PGSHIFT_STAGE", default_value = "./pgshift-data/stage")]
    pub(crate) stage: String,
    #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
    pub(crate) state: String,
    /// DMS table-mapping JSON file with selection rules (default: all user tables).
    #[arg(long, env = "PGSHIFT_TABLES")]
    pub(crate) tables: Option<std::path::PathBuf>,
    /// Seconds between tries while another poller (`pgshift cdc --follow`, the scheduled
    /// Lambda) holds the task's lease; without one, cutover drains CDC itself.
    #[arg(long, default_value_t = 1)]
    pub(crate) interval: u64,
    /// Seconds to wait for CDC to stage up to the source's position before giving up.
    #[arg(long, default_value_t = 600)]
    pub(crate) wait: u64,
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct ValidateArgs {
    #[arg(long, env = "PGSHIFT_TASK")]
    pub(crate) task: String,
    #[arg(long, env = "PGSHIFT_STAGE", default_value = "./pgshift-data/stage")]
    pub(crate) stage: String,
    #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
    pub(crate) state: String,
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub(crate) source: String,
    #[arg(long, env = "PGSHIFT_TARGET")]
    pub(crate) target: String,
    /// DMS table-mapping JSON file with selection rules (default: all user tables).
    #[arg(long, env = "PGSHIFT_TABLES")]
    pub(crate) tables: Option<std::path::PathBuf>,
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct StatusArgs {
    #[arg(long, env = "PGSHIFT_TASK")]
    pub(crate) task: String,
    #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
    pub(crate) state: String,
    /// The source, for live lag and slot health (optional).
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub(crate) source: Option<String>,
    /// A PG -> PG target, for its applied position and lag (optional).
    #[arg(long, env = "PGSHIFT_TARGET")]
    pub(crate) target: Option<String>,
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct CdcArgs {
    /// EventBridge bus for pgshift's events (`Batch Committed`, `Table Loaded`, `Load
    /// Finished`, `Task State Changed`): a bus name, an event-bus ARN, or `default`. None
    /// unless given.
    #[arg(long, env = "PGSHIFT_EVENTS_BUS")]
    pub(crate) events_bus: Option<String>,
    #[arg(long, env = "PGSHIFT_TASK")]
    pub(crate) task: String,
    /// `postgres://..` or `secret:<arn>`.
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub(crate) source: String,
    /// A folder, or `s3://bucket/prefix` (default ./pgshift-data/stage).
    #[arg(long, env = "PGSHIFT_STAGE", default_value = "./pgshift-data/stage")]
    pub(crate) stage: String,
    /// A folder, or `dynamodb://table` (default ./pgshift-data/state).
    #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
    pub(crate) state: String,
    /// csv, csv.gz, jsonl or jsonl.gz.
    #[arg(long, env = "PGSHIFT_FORMAT", default_value = "csv")]
    pub(crate) format: String,
    /// DMS table-mapping JSON file with selection rules (default: all user tables).
    #[arg(long, env = "PGSHIFT_TABLES")]
    pub(crate) tables: Option<std::path::PathBuf>,
    /// Let pgshift set REPLICA IDENTITY FULL on selected tables without a key, so their
    /// updates and deletes are captured too (without it they are captured insert-only).
    #[arg(long, env = "PGSHIFT_REPLICA_IDENTITY_FULL")]
    pub(crate) replica_identity_full: bool,
    /// Capture schema changes (DDL) in order with the data, with an event trigger pgshift
    /// creates when its role may (DMS's `captureDDLs`): `true` or `false`.
    #[arg(long, env = "PGSHIFT_CAPTURE_DDL", default_value = "true", action = clap::ArgAction::Set)]
    pub(crate) capture_ddl: bool,
    /// The schema of pgshift's event-trigger functions on the source (DMS's
    /// `ddlArtifactsSchema`).
    #[arg(long, env = "PGSHIFT_DDL_ARTIFACTS_SCHEMA", default_value = "public")]
    pub(crate) ddl_artifacts_schema: String,
    /// Take the lease even from a live holder (a run that is still going will then fail its
    /// next checkpoint move: nothing is staged twice).
    #[arg(long)]
    pub(crate) force: bool,
    /// Go on when selection rules match no table (a task for tables not created yet).
    #[arg(long)]
    pub(crate) allow_empty: bool,
    /// Add the commit timestamp column to CSV rows.
    #[arg(long)]
    pub(crate) commit_ts_column: bool,
    /// Drain once and exit.
    #[arg(long, conflicts_with = "follow", required_unless_present = "follow")]
    pub(crate) once: bool,
    /// Keep draining every --interval seconds until interrupted.
    #[arg(long)]
    pub(crate) follow: bool,
    #[arg(long, default_value_t = 10)]
    pub(crate) interval: u64,
    /// Cut batches after this many changes (at a commit boundary).
    #[arg(long, default_value_t = 250_000)]
    pub(crate) max_batch_changes: u64,
    /// Backends a large drain may decode with at once: 2 splits a drain of 16 MiB of WAL
    /// or more between two sessions, 1 never does.
    #[arg(long, env = "PGSHIFT_PEEK_SESSIONS", default_value_t = 2)]
    pub(crate) peek_sessions: u8,
    /// Print each poll's report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // One thread for the CDC drain: the connection task and the consumer hand rows over
    // without cross-thread wake-ups, and the PostgreSQL backend keeps the other core (measured
    // by bench-cdc.sh). Parallel full-load workers get a thread each.
    let mut builder = match &cli.command {
        Command::FullLoad(args) if args.parallel > 1 => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(args.parallel.min(64));
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
        Command::TestEndpoint(args) => commands::test_endpoint(args).await,
        Command::FullLoad(args) => commands::full_load(args).await,
        Command::Apply(args) => Box::pin(commands::apply(args)).await,
        Command::Validate(args) => commands::validate(args).await,
        Command::Cutover(args) => commands::cutover(args).await,
        Command::Status(args) => commands::status(args).await,
        Command::Cdc(args) => commands::cdc(args).await,
        Command::Teardown(args) => commands::teardown(args).await,
    }
}
