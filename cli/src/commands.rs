//! One function per command: validate the flags, build the seams and the job's options
//! (through the library's one mapping, `options::TaskSettings`), run, print.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use pgshift::Error;
use pgshift::config::SourceSpec;
use pgshift::job::full_load::{self, Progress};
use pgshift::job::validate as validate_job;
use pgshift::job::{apply as apply_job, cdc_poll, status as status_job, test_endpoint};
use pgshift::lsn::StopPosition;
use pgshift::options::TaskSettings;
use pgshift::source::checks::{CheckOptions, Status};
use pgshift::staging::encode::Format;
use pgshift::state::records::Outcome;

use crate::flags::{
    Backoff, events_for, resolve_source, retry_when_following, s3_settings, source_position,
    until_position,
};
use crate::report;
use crate::seams::{
    Seams, Target, lease_owner, read_selection, resolve, stop_on_signal, with_seams,
};
use crate::{
    ApplyArgs, CdcArgs, CutoverArgs, FullLoadArgs, StatusArgs, TeardownArgs, TestEndpointArgs,
    ValidateArgs,
};

fn print_json(value: serde_json::Result<serde_json::Value>, pretty: bool) {
    let text = match (value, pretty) {
        (Ok(v), true) => serde_json::to_string_pretty(&v),
        (Ok(v), false) => serde_json::to_string(&v),
        (Err(e), _) => Err(e),
    };
    println!("{}", text.unwrap_or_default());
}

/// Waits `interval`; false when interrupted (Ctrl-C ends a `--follow` loop cleanly).
pub(crate) async fn wait_or_interrupt(interval: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(interval) => true,
        _ = tokio::signal::ctrl_c() => false,
    }
}

pub(crate) async fn test_endpoint(args: TestEndpointArgs) -> pgshift::Result<ExitCode> {
    let spec = crate::source_spec(&args.source, "--source")?;
    let selection = read_selection(args.tables.as_deref())?;
    if !args.long_transaction_secs.is_finite() || args.long_transaction_secs < 0.0 {
        return Err(Error::config(
            "--long-transaction-secs",
            "must be a non-negative number",
        ));
    }
    let cfg = resolve(&spec).await?;
    let opts = CheckOptions {
        selection,
        slot_name: args.slot,
        publication_name: args.publication,
        long_transaction_secs: args.long_transaction_secs,
        capture_ddl: args.capture_ddl,
        target: match &args.target {
            Some(t) => Some(resolve(&crate::source_spec(t, "--target")?).await?),
            None => None,
        },
    };
    let report = test_endpoint::run(&cfg, &opts).await?;
    if args.json {
        print_json(serde_json::to_value(&report), true);
    } else {
        print!("{}", report::endpoint_table(&report));
    }
    Ok(if report.worst() == Status::Fail {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub(crate) async fn full_load(mut args: FullLoadArgs) -> pgshift::Result<ExitCode> {
    pgshift::config::check_task_name(&args.task)?;
    let spec = crate::source_spec(&args.source, "--source")?;
    let from = s3_settings(args.s3_settings.as_deref(), &mut args.stage, &args.format)?;
    let settings = TaskSettings {
        format: from.format,
        load_op_column: from.load_op_column,
        csv_header: from.csv_header,
        csv_dialect: from.csv_dialect.clone(),
        selection: read_selection(args.tables.as_deref())?,
        chunk_mib: args.chunk_mb,
        cdc: args.cdc,
        replica_identity_full: args.replica_identity_full,
        capture_ddl: args.capture_ddl,
        ddl_schema: pgshift::config::check_schema_name(
            &args.ddl_artifacts_schema,
            "--ddl-artifacts-schema",
        )?,
        ..TaskSettings::default()
    };
    if !(1..=64).contains(&args.parallel) {
        return Err(Error::config("--parallel", "must be between 1 and 64"));
    }
    pgshift::plan::ChunkSizing::from_mib(args.chunk_mb, 150_000)
        .map_err(|e| Error::config("--chunk-mb", e.to_string()))?;
    let reload = if args.reload.is_empty() {
        None
    } else if args.cdc {
        return Err(Error::config(
            "--cdc",
            "a reload goes into a task whose CDC already runs; --cdc starts one (leave it out with --reload)",
        ));
    } else {
        Some(pgshift::job::full_load::reload::parse_tables(&args.reload)?)
    };
    let mut seams = Seams::resolve(&spec, &args.stage, &args.state).await?;
    seams.encryption = from.encryption;
    let mut opts = settings.load_options(&args.task, seams.source.clone(), lease_owner(), None);
    opts.events = events_for(args.events_bus.as_deref(), seams.aws.as_ref()).await?;
    opts.force_lease = args.force;
    opts.allow_empty = args.allow_empty;
    let progress = Arc::new(Progress::default());
    if let Some(tables) = reload {
        let ticker = report::spawn_progress(progress.clone(), "chunks");
        let result = with_seams!(&seams, |sink, store| {
            full_load::reload::run_local(
                &sink,
                &store,
                &opts,
                &tables,
                args.parallel,
                progress.clone(),
            )
            .await
        });
        ticker.abort();
        let report = result?;
        if args.json {
            print_json(serde_json::to_value(&report), false);
        } else {
            println!("{}", report::reload_summary(&report));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let ticker = report::spawn_progress(progress.clone(), "chunks");
    let result = with_seams!(&seams, |sink, store| {
        full_load::run_local(&sink, &store, &opts, args.parallel, progress.clone()).await
    });
    ticker.abort();
    let report = result?;
    if args.json {
        print_json(serde_json::to_value(&report), false);
    } else {
        println!("{}", report::load_summary(&report));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn apply(args: ApplyArgs) -> pgshift::Result<ExitCode> {
    pgshift::config::check_task_name(&args.task)?;
    let source = match args.source.as_deref() {
        Some(s) => Some(resolve_source(s).await?),
        None => None,
    };
    let until = match args.until.as_deref() {
        None => None,
        Some(u) => Some(until_position(u, source.as_ref()).await?),
    };
    if args.max_batch_changes == 0 {
        return Err(Error::config("--max-batch-changes", "must be at least 1"));
    }
    // With --until and the source, CDC is drained here, alongside apply.
    let mut drain = match (&until, source) {
        (Some(_), Some(source)) => {
            let settings = TaskSettings {
                format: Format::parse(&args.format, "--format")?,
                selection: read_selection(args.tables.as_deref())?,
                ..TaskSettings::default()
            };
            Some(pgshift::migration::drain_options(
                &settings,
                &args.task,
                source,
                lease_owner(),
                args.max_batch_changes,
            ))
        }
        _ => None,
    };
    if until.is_some() && args.follow {
        return Err(Error::config(
            "--until",
            "stops at a position; --follow never stops: give one of them",
        ));
    }
    if args.parallel == 0 {
        return Err(Error::config("--parallel", "must be at least 1"));
    }
    // The load's chunks on a progress bar (a terminal only), for the first round.
    let progress = Arc::new(Progress::default());
    let opts = apply_job::ApplyOptions {
        load_workers: args.parallel,
        target_prep: args.target_prep.parse()?,
        progress: Some(progress.clone()),
        ..apply_job::ApplyOptions::default()
    };
    let mut ticker = Some(report::spawn_progress(progress, "chunks loaded"));
    let spec = crate::source_spec(&args.target, "--target")?;
    let seams = Seams::resolve(&spec, &args.stage, &args.state).await?;
    let events = events_for(args.events_bus.as_deref(), seams.aws.as_ref()).await?;
    if let Some(cdc) = drain.as_mut() {
        cdc.events = events.clone();
    }
    let target = &seams.source;
    let mut backoff = Backoff::new(Duration::from_secs(args.interval.max(1)));
    loop {
        let round = std::time::Instant::now();
        let applied = with_seams!(&seams, |sink, store| {
            match (until, &drain) {
                (Some(u), Some(cdc)) => {
                    Box::pin(pgshift::migration::catch_up(
                        &sink,
                        &store,
                        cdc,
                        target,
                        &args.task,
                        &apply_job::Until {
                            position: u,
                            every: Duration::from_millis(20),
                            wait: Duration::from_secs(args.wait),
                        },
                        opts.clone(),
                    ))
                    .await
                }
                (Some(u), None) => {
                    apply_job::run_until(
                        &sink,
                        &store,
                        target,
                        &args.task,
                        &apply_job::Until {
                            position: u,
                            every: Duration::from_secs(args.interval.clamp(1, 10)),
                            wait: Duration::from_secs(args.wait),
                        },
                        opts.clone(),
                    )
                    .await
                }
                (None, _) => apply_job::run_with(&sink, target, &args.task, opts.clone()).await,
            }
        });
        if let Some(t) = ticker.take() {
            t.abort();
        }
        let report = match applied {
            Ok(report) => {
                backoff.reset();
                report
            }
            Err(e) => {
                use pgshift::events::{Job, TaskStateChanged};
                events
                    .announce(&[TaskStateChanged::from_error(&args.task, Job::Apply, &e).event()])
                    .await;
                if args.follow && retry_when_following(&e) {
                    if !backoff.wait_after(&e, "apply").await {
                        return Ok(ExitCode::SUCCESS);
                    }
                    continue;
                }
                return Err(e);
            }
        };
        if args.json {
            print_json(serde_json::to_value(&report), false);
        } else {
            println!("{}", report::apply_summary(&report, round.elapsed()));
        }
        if !args.follow || !wait_or_interrupt(Duration::from_secs(args.interval.max(1))).await {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// Finishes a migration: apply until caught up with the source, sequences, validate.
pub(crate) async fn cutover(args: CutoverArgs) -> pgshift::Result<ExitCode> {
    pgshift::config::check_task_name(&args.task)?;
    let selection = read_selection(args.tables.as_deref())?;
    let spec = crate::source_spec(&args.source, "--source")?;
    let seams = Seams::resolve(&spec, &args.stage, &args.state).await?;
    let target_spec = crate::source_spec(&args.target, "--target")?;
    let target = match (&target_spec, &seams.aws) {
        (SourceSpec::Secret(_), Some(aws)) => aws.resolve(&target_spec, None).await?,
        (SourceSpec::Secret(_), None) => crate::aws().await.resolve(&target_spec, None).await?,
        _ => resolve(&target_spec).await?,
    };
    let until = source_position(&seams.source).await?;
    let every = Duration::from_secs(args.interval.clamp(1, 60));
    // CDC drained here, alongside apply (a poller holding the lease is left to it).
    let settings = TaskSettings {
        selection: selection.clone(),
        ..TaskSettings::default()
    };
    let cdc = pgshift::migration::drain_options(
        &settings,
        &args.task,
        seams.source.clone(),
        lease_owner(),
        250_000,
    );
    let applied = with_seams!(&seams, |sink, store| {
        Box::pin(pgshift::migration::catch_up(
            &sink,
            &store,
            &cdc,
            &target,
            &args.task,
            &apply_job::Until {
                position: until,
                every,
                wait: Duration::from_secs(args.wait),
            },
            apply_job::ApplyOptions::default(),
        ))
        .await
    })?;
    let source_client = pgshift::source::connect(&seams.source).await?;
    let target_client = pgshift::source::connect(&target).await?;
    let sequences =
        pgshift::target::sync_sequences(&source_client, &target_client, &selection).await?;
    let validation = validate_job::run(&seams.source, &target, &selection).await?;
    let equal = validation.equal;
    if args.json {
        print_json(
            Ok(serde_json::json!({
                "until": until,
                "apply": applied,
                "sequences": sequences,
                "validate": validation,
            })),
            true,
        );
    } else {
        print!(
            "{}",
            report::cutover_text(until, &applied, &sequences, &validation, &args.task)
        );
    }
    Ok(if equal {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(crate) async fn validate(args: ValidateArgs) -> pgshift::Result<ExitCode> {
    pgshift::config::check_task_name(&args.task)?;
    let selection = read_selection(args.tables.as_deref())?;
    let source = resolve(&crate::source_spec(&args.source, "--source")?).await?;
    let target = resolve(&crate::source_spec(&args.target, "--target")?).await?;
    let started = std::time::Instant::now();
    let progress = Arc::new(Progress::default());
    let ticker = report::spawn_progress(progress.clone(), "tables checked");
    let report = validate_job::run_with_progress(
        &source,
        &target,
        &selection,
        validate_job::DEFAULT_RANGE_ROWS,
        Some(&progress),
    )
    .await;
    ticker.abort();
    let report = report?;
    if args.json {
        print_json(serde_json::to_value(&report), true);
    } else {
        print!("{}", report::validate_table(&report));
        println!(
            "checked in {}",
            report::human_secs(started.elapsed().as_millis() as u64)
        );
    }
    Ok(if report.equal {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(crate) async fn status(args: StatusArgs) -> pgshift::Result<ExitCode> {
    let state = Target::parse_state(&args.state)?;
    let source = match &args.source {
        Some(s) => Some(resolve(&crate::source_spec(s, "--source")?).await?),
        None => None,
    };
    let target = match &args.target {
        Some(t) => Some(resolve(&crate::source_spec(t, "--target")?).await?),
        None => None,
    };
    let mut status = match &state {
        Target::Local(dir) => {
            status_job::run(
                &pgshift::state::FileStore::new(dir),
                &args.task,
                source.as_ref(),
            )
            .await?
        }
        Target::Aws(table) => {
            let aws = crate::aws().await;
            let store = pgshift::state::DynamoStore::new(aws.dynamodb(), table);
            status_job::run(&store, &args.task, source.as_ref()).await?
        }
    };
    if let Some(target) = &target {
        status_job::with_target(&mut status, target).await?;
    }
    if args.json {
        print_json(serde_json::to_value(&status), true);
    } else {
        print!("{}", report::status_text(&status));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn cdc(mut args: CdcArgs) -> pgshift::Result<ExitCode> {
    pgshift::config::check_task_name(&args.task)?;
    let spec = crate::source_spec(&args.source, "--source")?;
    if args.max_batch_changes == 0 {
        return Err(Error::config("--max-batch-changes", "must be at least 1"));
    }
    if !(1..=2).contains(&args.peek_sessions) {
        return Err(Error::config("--peek-sessions", "must be 1 or 2"));
    }
    let from = s3_settings(args.s3_settings.as_deref(), &mut args.stage, &args.format)?;
    let settings = TaskSettings {
        format: from.format,
        commit_ts_column: args.commit_ts_column || from.commit_ts_column,
        csv_header: from.csv_header,
        load_op_column: from.load_op_column,
        cdc_ops: from.cdc_ops,
        date_partition: from.date_partition,
        csv_dialect: from.csv_dialect.clone(),
        cdc_path: from.cdc_path.clone(),
        selection: read_selection(args.tables.as_deref())?,
        peek_sessions: args.peek_sessions,
        replica_identity_full: args.replica_identity_full,
        capture_ddl: args.capture_ddl,
        stop_position: args
            .stop_position
            .as_deref()
            .map(|v| pgshift::config::parse_stop_position(v, "--stop-position"))
            .transpose()?,
        native_start: pgshift::config::native_start(
            args.slot_name.clone(),
            args.publication.clone(),
            args.start_position.clone(),
            ("--slot-name", "--publication", "--start-position"),
        )?,
        ddl_schema: pgshift::config::check_schema_name(
            &args.ddl_artifacts_schema,
            "--ddl-artifacts-schema",
        )?,
        ..TaskSettings::default()
    };
    let mut seams = Seams::resolve(&spec, &args.stage, &args.state).await?;
    seams.encryption = from.encryption;
    let mut opts = settings.cdc_options(&args.task, seams.source.clone(), lease_owner(), None);
    opts.events = events_for(args.events_bus.as_deref(), seams.aws.as_ref()).await?;
    opts.max_batch_changes = args.max_batch_changes;
    opts.force_lease = args.force;
    opts.allow_empty = args.allow_empty;
    // Short, and renewed at every peek and checkpoint: a killed run's lease does not lock the
    // task out for long (and on this host it is taken over at once).
    opts.lease_ttl = Duration::from_secs(120);
    let stop = stop_on_signal();
    opts.stop = Some(stop.clone());
    let interval = Duration::from_secs(args.interval.max(1));
    let mut backoff = Backoff::new(interval);
    loop {
        let polled = with_seams!(&seams, |sink, store| cdc_poll::run(&sink, &store, &opts)
            .await);
        let report = match polled {
            Ok(report) => {
                backoff.reset();
                report
            }
            // --follow survives what may pass (the source restarting, a network blip, a
            // throttled AWS call): it says so and tries again later, longer each time.
            Err(e) if args.follow && retry_when_following(&e) => {
                if stop.load(std::sync::atomic::Ordering::Relaxed)
                    || !backoff.wait_after(&e, "cdc").await
                {
                    return Ok(ExitCode::SUCCESS);
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        if args.json {
            print_json(serde_json::to_value(&report), false);
        } else {
            println!("{}", report::poll_summary(&report));
        }
        let held = matches!(report.outcome, Outcome::LeaseHeld { .. });
        if let Some(stop) = report.stopped_at {
            if !args.json {
                let at = match settings.stop_position {
                    Some(time @ StopPosition::CommitTime(_)) => format!("{time} (at {stop})"),
                    _ => stop.to_string(),
                };
                println!(
                    "task {}: stop position {at} reached; nothing after it is staged",
                    args.task
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        if !args.follow {
            // --once did nothing: that is not a success a script may take for one.
            return Ok(if held {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            });
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) || !wait_or_interrupt(interval).await {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

pub(crate) async fn teardown(args: TeardownArgs) -> pgshift::Result<ExitCode> {
    pgshift::config::check_task_name(&args.task)?;
    let source = resolve(&crate::source_spec(&args.source, "--source")?).await?;
    if !args.yes {
        use std::io::{BufRead, IsTerminal, Write};
        if !std::io::stdin().is_terminal() {
            return Err(Error::config(
                "--yes",
                "teardown drops the task's replication slot: pass --yes when not at a terminal",
            ));
        }
        eprint!(
            "this drops the replication slot, publications and follow trigger of task {} on {}: CDC cannot continue from it.\ntype the task's name to go on: ",
            args.task,
            source.target()
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|e| Error::io("reading the answer", e))?;
        if answer.trim() != args.task {
            eprintln!("not confirmed; nothing dropped");
            return Ok(ExitCode::from(1));
        }
    }
    let dropped = if args.reset {
        match Target::parse_state(&args.state)? {
            Target::Local(dir) => {
                let store = pgshift::state::FileStore::new(dir);
                pgshift::job::teardown::reset(&source, &store, &args.task).await?
            }
            Target::Aws(table) => {
                let aws = crate::aws().await;
                let store = pgshift::state::DynamoStore::new(aws.dynamodb(), table);
                pgshift::job::teardown::reset(&source, &store, &args.task).await?
            }
        }
    } else {
        pgshift::job::teardown::run(&source, &args.task).await?
    };
    if args.json {
        print_json(serde_json::to_value(&dropped), false);
    } else if dropped.is_empty() {
        println!("task {}: nothing of it is left on the source", args.task);
    } else {
        println!("task {}: dropped {}", args.task, dropped.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
