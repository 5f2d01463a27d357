//! The `pgshift` command: the same jobs as the Lambdas, run locally on embedded defaults.
//!
//! Exit codes: 0 success (all checks pass or warn), 1 a check or the job failed, 2 a usage or
//! configuration error.

use std::process::ExitCode;

use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use conventions::{AWS_CHOICE, ignored_flags, init_tracing, man_pages};
pub(crate) use conventions::{aws, source_spec};
use pgshift::Error;

mod commands;
mod conventions;
mod flags;
mod report;
mod seams;

#[derive(Parser)]
#[command(
    name = "pgshift",
    version,
    about = "Move a live PostgreSQL database into S3: full load, then CDC"
)]
struct Cli {
    /// More log output: -v info, -vv debug, -vvv trace (PGSHIFT_LOG or RUST_LOG, when set,
    /// decide instead: `RUST_LOG=pgshift=debug`).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Errors only in the log.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Log lines on stderr as `text` or `json` (one object a line, for log shippers).
    #[arg(long, global = true, env = "PGSHIFT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Colour in the log: `auto` (a terminal, and NO_COLOR unset), `always`, `never`.
    #[arg(long, global = true, default_value = "auto", value_parser = ["auto", "always", "never"])]
    color: String,
    /// AWS profile of ~/.aws/config for S3, DynamoDB, Secrets Manager and EventBridge (SSO
    /// and credential_process profiles included).
    #[arg(long, global = true, env = "AWS_PROFILE")]
    profile: Option<String>,
    /// AWS region.
    #[arg(long, global = true, env = "AWS_REGION")]
    region: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that a source can serve a full load and CDC; prints a pass/warn/fail table.
    #[command(
        after_help = "Examples:\n  pgshift test-endpoint --source 'postgres://pgshift@db.abc.eu-west-1.rds.amazonaws.com/orders'
  pgshift test-endpoint --source secret:pgshift/source --tables mapping.json --json
  PGHOST=db PGUSER=pgshift pgshift test-endpoint --source postgres:// --target \"$TARGET_URL\""
    )]
    TestEndpoint(TestEndpointArgs),
    /// Load the selected tables in parallel chunks (COPY), optionally creating the CDC slot first.
    #[command(
        after_help = "Examples:\n  pgshift full-load --task orders --source \"$URL\" --cdc --parallel 4
  pgshift full-load --task orders --source \"$URL\" --format parquet --stage s3://bucket/orders
  pgshift full-load --task orders --source \"$URL\" --s3-settings file://s3.json --state dynamodb://pgshift-state
  pgshift full-load --task orders --source \"$URL\" --reload public.orders,public.order_items   # into the running task"
    )]
    FullLoad(FullLoadArgs),
    /// Apply the staged load and CDC batches to a target PostgreSQL (exactly once, resumable).
    #[command(
        after_help = "Examples:\n  pgshift apply --task orders --target \"$TARGET_URL\" --parallel 4
  pgshift apply --task orders --target \"$TARGET_URL\" --follow
  pgshift apply --task orders --target \"$TARGET_URL\" --until caught-up --source \"$URL\""
    )]
    Apply(ApplyArgs),
    /// Compare source and target table by table (row counts, checksums, differing keys).
    #[command(
        after_help = "Examples:\n  pgshift validate --task orders --source \"$URL\" --target \"$TARGET_URL\"
  pgshift validate --task orders --source \"$URL\" --target \"$TARGET_URL\" --tables mapping.json --json"
    )]
    Validate(ValidateArgs),
    /// Finish a PG -> PG migration (writes to the source stopped): apply until caught up with
    /// the source, set the target's sequences to the source's values, validate, say what next.
    #[command(
        after_help = "Examples:\n  pgshift cutover --task orders --source \"$URL\" --target \"$TARGET_URL\""
    )]
    Cutover(CutoverArgs),
    /// Show a task: load progress per table, CDC checkpoint, lag and slot health.
    #[command(after_help = "Examples:\n  pgshift status --task orders
  pgshift status --task orders --state dynamodb://pgshift-state --source \"$URL\" --target \"$TARGET_URL\" --json")]
    Status(StatusArgs),
    /// Drain the task's slot into staged files (creates the publication and slot of a CDC-only task).
    #[command(
        after_help = "Examples:\n  pgshift cdc --task orders --source \"$URL\" --once
  pgshift cdc --task orders --source \"$URL\" --follow --interval 30 --events-bus default
  pgshift cdc --task orders --source \"$URL\" --once --stop-position 16/B374D848
  pgshift cdc --task orders --source \"$URL\" --once --stop-position commit_time:2026-12-02T10:00:00
  # native start: the user's publication and slot (made in that order), from a position
  pgshift cdc --task orders --source \"$URL\" --once --slot-name dms_slot --publication dms_pub --start-position 16/B3000000"
    )]
    Cdc(CdcArgs),
    /// Drop everything pgshift created on the source for a task: its replication slot (which
    /// holds WAL until dropped), publications and follow trigger. Staged data and state stay.
    #[command(
        after_help = "Examples:\n  pgshift teardown --task orders --source \"$URL\" --yes
  pgshift teardown --task orders --source \"$URL\" --reset --yes     # and the task's state: start over"
    )]
    Teardown(TeardownArgs),
    /// Print a shell completion script: `pgshift completions bash > /etc/bash_completion.d/pgshift`
    /// (zsh: into a folder of $fpath as `_pgshift`; fish: ~/.config/fish/completions/pgshift.fish).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to stdout, or write pgshift.1 and a page per command into
    /// --out-dir: `pgshift man | man -l -`.
    Man {
        /// A folder for pgshift.1, pgshift-full-load.1, ...
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
    },
}

#[derive(Args)]
pub(crate) struct TeardownArgs {
    #[arg(long, env = "PGSHIFT_TASK")]
    pub(crate) task: String,
    /// `postgres://..`, `host=.. dbname=..` conninfo or `secret:<arn>` (PG* variables and the password file fill in what it leaves out).
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
    /// `postgres://user:password@host:port/dbname?sslmode=..`, `host=.. dbname=..` conninfo or `secret:<arn>` (PG* variables and the password file fill in what it leaves out).
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub(crate) source: String,
    /// DMS table mapping (selection and table-settings rules): a file, file://path or the
    /// JSON itself (default: all user tables).
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
    /// The target of a PG → PG migration (`postgres://..`, `host=.. dbname=..` conninfo or `secret:<arn>` (PG* variables and the password file fill in what it leaves out)): checks it can
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
    /// `postgres://..`, `host=.. dbname=..` conninfo or `secret:<arn>` (PG* variables and the password file fill in what it leaves out).
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub(crate) source: String,
    /// A folder, or `s3://bucket/prefix` (default ./pgshift-data/stage).
    #[arg(long, env = "PGSHIFT_STAGE", default_value = "./pgshift-data/stage")]
    pub(crate) stage: String,
    /// A folder, or `dynamodb://table` (default ./pgshift-data/state).
    #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
    pub(crate) state: String,
    /// DMS table mapping (selection and table-settings rules): a file, file://path or the
    /// JSON itself (default: all user tables).
    #[arg(long, env = "PGSHIFT_TABLES")]
    pub(crate) tables: Option<std::path::PathBuf>,
    /// DMS's S3 target settings (`file://s3.json` or inline JSON, as for `aws dms
    /// create-endpoint --s3-settings`): BucketName/BucketFolder are the stage, DataFormat and
    /// CompressionType the format, TimestampColumnName the commit timestamp column; a setting
    /// pgshift does not honour is an error naming it.
    #[arg(long, env = "PGSHIFT_S3_SETTINGS")]
    pub(crate) s3_settings: Option<String>,
    /// csv, csv.gz, jsonl, jsonl.gz or parquet.
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
    /// Reload tables into the task while its CDC runs (DMS's "reload table"; also a table
    /// added to --tables after the load): `schema.table`, comma-separated or repeated, names
    /// with a dot or a comma in double quotes. `apply` replaces the table's rows with the
    /// reload's and re-applies the changes after it; a rerun resumes an unfinished reload.
    #[arg(long, value_name = "SCHEMA.TABLE")]
    pub(crate) reload: Vec<String>,
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
    /// `postgres://..`, `host=.. dbname=..` conninfo or `secret:<arn>` (PG* variables and the password file fill in what it leaves out) of the target.
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
    /// `postgres://..`, `host=.. dbname=..` conninfo or `secret:<arn>` (PG* variables and the password file fill in what it leaves out) of the source (writes to it stopped).
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub(crate) source: String,
    /// `postgres://..`, `host=.. dbname=..` conninfo or `secret:<arn>` (PG* variables and the password file fill in what it leaves out) of the target.
    #[arg(long, env = "PGSHIFT_TARGET")]
    pub(crate) target: String,
    #[arg(long, env = "PGSHIFT_STAGE", default_value = "./pgshift-data/stage")]
    pub(crate) stage: String,
    #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
    pub(crate) state: String,
    /// DMS table mapping (selection and table-settings rules): a file, file://path or the
    /// JSON itself (default: all user tables).
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
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub(crate) source: String,
    #[arg(long, env = "PGSHIFT_TARGET")]
    pub(crate) target: String,
    /// DMS table mapping (selection and table-settings rules): a file, file://path or the
    /// JSON itself (default: all user tables).
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
    /// `postgres://..`, `host=.. dbname=..` conninfo or `secret:<arn>` (PG* variables and the password file fill in what it leaves out).
    #[arg(long, env = "PGSHIFT_SOURCE")]
    pub(crate) source: String,
    /// A folder, or `s3://bucket/prefix` (default ./pgshift-data/stage).
    #[arg(long, env = "PGSHIFT_STAGE", default_value = "./pgshift-data/stage")]
    pub(crate) stage: String,
    /// A folder, or `dynamodb://table` (default ./pgshift-data/state).
    #[arg(long, env = "PGSHIFT_STATE", default_value = "./pgshift-data/state")]
    pub(crate) state: String,
    /// DMS's S3 target settings (`file://s3.json` or inline JSON, as for `aws dms
    /// create-endpoint --s3-settings`): BucketName/BucketFolder are the stage, DataFormat and
    /// CompressionType the format, TimestampColumnName the commit timestamp column,
    /// PreserveTransactions with CdcPath a transaction file per batch
    /// (`<CdcPath>/CDC_TXN-<time>.csv`, every table in commit order); a setting pgshift does
    /// not honour is an error naming it.
    #[arg(long, env = "PGSHIFT_S3_SETTINGS")]
    pub(crate) s3_settings: Option<String>,
    /// csv, csv.gz, jsonl, jsonl.gz or parquet.
    #[arg(long, env = "PGSHIFT_FORMAT", default_value = "csv")]
    pub(crate) format: String,
    /// DMS table mapping (selection and table-settings rules): a file, file://path or the
    /// JSON itself (default: all user tables).
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
    /// Stop staging at a WAL position (`X/Y`) or a commit time
    /// (`commit_time:2026-12-02T10:00:00`, UTC unless an offset is given) — DMS's
    /// `CdcStopPosition`: transactions committed before it are staged, none after; the task
    /// rests there until the stop is lifted; `--follow` exits once it is reached.
    #[arg(
        long,
        env = "PGSHIFT_CDC_STOP_POSITION",
        value_name = "X/Y|commit_time:TIME"
    )]
    pub(crate) stop_position: Option<String>,
    /// Native start (DMS's `slotName` + `CdcStartPosition`): read the replication slot the
    /// user made (a pgoutput slot of this database, created after --publication) instead of
    /// creating pgshift's own. pgshift never changes nor drops the user's slot or publication;
    /// the first run records them with the task, later runs must name the same.
    #[arg(long, env = "PGSHIFT_SLOT_NAME", value_name = "SLOT")]
    pub(crate) slot_name: Option<String>,
    /// The publication the user's slot reads with (native start; made before the slot).
    #[arg(long, env = "PGSHIFT_PUBLICATION", value_name = "NAME")]
    pub(crate) publication: Option<String>,
    /// Where a native start begins (DMS's `CdcStartPosition`): transactions committed after
    /// this WAL position are staged; at or after the slot's confirmed position. Default: the
    /// slot's confirmed position.
    #[arg(long, env = "PGSHIFT_CDC_START_POSITION", value_name = "X/Y")]
    pub(crate) start_position: Option<String>,
    /// Backends a large drain may decode with at once: 2 splits a drain of 16 MiB of WAL
    /// or more between two sessions, 1 never does.
    #[arg(long, env = "PGSHIFT_PEEK_SESSIONS", default_value_t = 2)]
    pub(crate) peek_sessions: u8,
    /// Print each poll's report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(err) = ignored_flags(&matches) {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    init_tracing(&cli);
    let _ = AWS_CHOICE.set((cli.profile.clone(), cli.region.clone()));
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "pgshift",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man { out_dir } => {
            return match man_pages(out_dir.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
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

async fn run(cli: Cli) -> pgshift::Result<ExitCode> {
    match cli.command {
        Command::TestEndpoint(args) => commands::test_endpoint(args).await,
        Command::FullLoad(args) => Box::pin(commands::full_load(args)).await,
        Command::Apply(args) => Box::pin(commands::apply(args)).await,
        Command::Validate(args) => commands::validate(args).await,
        Command::Cutover(args) => commands::cutover(args).await,
        Command::Status(args) => commands::status(args).await,
        Command::Cdc(args) => commands::cdc(args).await,
        Command::Teardown(args) => commands::teardown(args).await,
        Command::Completions { .. } | Command::Man { .. } => Ok(ExitCode::SUCCESS),
    }
}
