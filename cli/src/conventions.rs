//! The command's conventions around the jobs: the log (-v/-q, JSON, colour, RUST_LOG), flags a
//! command would ignore refused, manual pages, connections as libpq reads them, and the AWS
//! profile and region.

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory};
use pgshift::Error;

use crate::Cli;

/// The log: PGSHIFT_LOG, else RUST_LOG, else -v/-q (warnings by default); text or JSON lines
/// on stderr; colour on a terminal unless NO_COLOR or --color says.
pub(crate) fn init_tracing(cli: &Cli) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGSHIFT_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = match cli.color.as_str() {
        "always" => true,
        "never" => false,
        _ => {
            use std::io::IsTerminal;
            std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.with_ansi(ansi).init();
    }
}

/// Flags a command would not use, given on the command line, are errors (never silently
/// ignored); the same settings from the environment (PGSHIFT_*) are not, since one environment
/// serves every command.
pub(crate) fn ignored_flags(matches: &ArgMatches) -> pgshift::Result<()> {
    let Some((command, m)) = matches.subcommand() else {
        return Ok(());
    };
    let given = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    let present = |id: &str| {
        matches!(
            m.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let refuse = |flags: &[&str], why: &str| -> pgshift::Result<()> {
        for flag in flags {
            if given(flag) {
                let name = format!("--{}", flag.replace('_', "-"));
                return Err(Error::config(
                    name,
                    format!("{command} does not use it {why}"),
                ));
            }
        }
        Ok(())
    };
    match command {
        "apply" => {
            if !present("until") {
                refuse(
                    &[
                        "source",
                        "state",
                        "tables",
                        "format",
                        "max_batch_changes",
                        "wait",
                    ],
                    "without --until (only `apply --until .. --source ..` drains CDC itself)",
                )?;
            } else if !present("source") {
                refuse(
                    &["state", "tables", "format", "max_batch_changes"],
                    "without --source (they configure the CDC drain --source starts)",
                )?;
            }
            if !given("follow") && !present("until") {
                refuse(&["interval"], "without --follow or --until")?;
            }
        }
        "cdc" if !given("follow") => refuse(&["interval"], "without --follow")?,
        "teardown" if !given("reset") => refuse(&["state"], "without --reset")?,
        _ => {}
    }
    Ok(())
}

/// `pgshift man`: the top page, and one per command (`pgshift-full-load.1`, ..).
pub(crate) fn man_pages(out_dir: Option<&std::path::Path>) -> std::io::Result<()> {
    let cmd = Cli::command();
    let Some(dir) = out_dir else {
        return clap_mangen::Man::new(cmd).render(&mut std::io::stdout());
    };
    std::fs::create_dir_all(dir)?;
    let mut top = std::fs::File::create(dir.join("pgshift.1"))?;
    clap_mangen::Man::new(cmd.clone()).render(&mut top)?;
    for sub in cmd.get_subcommands() {
        let name = format!("pgshift-{}", sub.get_name());
        // A command name is `&'static str` in clap; the pages are made once per run.
        let page = sub.clone().name(&*Box::leak(name.clone().into_boxed_str()));
        let mut f = std::fs::File::create(dir.join(format!("{name}.1")))?;
        clap_mangen::Man::new(page).render(&mut f)?;
    }
    Ok(())
}

/// `--source` / `--target` as libpq users write them: a `postgres://` URL or `key=value`
/// conninfo completed from the `PG*` variables and the password file, or `secret:<arn>`.
pub(crate) fn source_spec(
    value: &str,
    field: &str,
) -> pgshift::Result<pgshift::config::SourceSpec> {
    pgshift::config::SourceSpec::parse_libpq(
        value,
        field,
        &pgshift::config::libpq::LibpqEnv::from_process(),
    )
}

/// `--profile` and `--region`, for every AWS client this run makes.
pub(crate) static AWS_CHOICE: std::sync::OnceLock<(Option<String>, Option<String>)> =
    std::sync::OnceLock::new();

/// The AWS configuration: the default chain, with `--profile` / `--region`.
pub(crate) async fn aws() -> pgshift::aws::Aws {
    let (profile, region) = AWS_CHOICE.get().cloned().unwrap_or_default();
    pgshift::aws::Aws::with_choice(profile.as_deref(), region.as_deref()).await
}
