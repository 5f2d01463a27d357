//! The `pgshift` command: the same jobs as the Lambdas, run locally on embedded defaults.
//!
//! Exit codes: 0 success (all checks pass or warn), 1 a check or the job failed, 2 a usage or
//! configuration error.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgshift::Error;
use pgshift::aws::Aws;
use pgshift::config::SourceSpec;
use pgshift::job::test_endpoint;
use pgshift::selection::Selection;
use pgshift::source::checks::{CheckOptions, Status};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
            let selection = match &tables {
                None => Selection::all(),
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        Error::config("--tables", format!("cannot read {}: {e}", path.display()))
                    })?;
                    Selection::from_json(&text, "--tables")?
                }
            };
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
    }
}

async fn resolve(spec: &SourceSpec) -> pgshift::Result<pgshift::config::PgConfig> {
    match spec {
        SourceSpec::Direct(cfg) => Ok((**cfg).clone()),
        SourceSpec::Secret(_) => Aws::from_env().await.resolve(spec, None).await,
    }
}
