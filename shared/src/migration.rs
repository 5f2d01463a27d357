//! Runs that compose jobs (above the jobs, which never call each other): catching a target
//! up with CDC drained in the same process.

use crate::config::PgConfig;
use crate::error::{Error, Result};
use crate::job::apply::{self, ApplyOptions, ApplyReport, Until};
use crate::job::cdc_poll;
use crate::options::{CdcOptions, TaskSettings};
use crate::staging::ObjectSink;
use crate::state::StateStore;
use crate::state::records;

/// [`apply::run_until`] with CDC drained in the same process: the poller ([`cdc_poll`],
/// with `cdc`'s options) stages batches while apply applies each one as its manifest appears,
/// so reading the slot and writing the target overlap (as a native subscriber's walsender and
/// apply worker do). Small batches (`cdc.max_batch_changes`) start apply sooner. Another
/// poller holding the task's lease (a `cdc --follow`, the scheduled Lambda) is left to drain;
/// this one retries every `until.every`. Done when apply is; a poller error ends the run.
pub async fn catch_up<S: ObjectSink, St: StateStore>(
    sink: &S,
    state: &St,
    cdc: &CdcOptions,
    target: &PgConfig,
    task: &str,
    until: &Until,
    opts: ApplyOptions,
) -> Result<ApplyReport> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let mut cdc = cdc.clone();
    cdc.stop = Some(stop.clone());
    let cdc = &cdc;
    let drain = async {
        loop {
            let report = cdc_poll::run(sink, state, cdc).await?;
            if stop.load(Ordering::Relaxed)
                || records::staged_through(state, task)
                    .await?
                    .is_some_and(|s| s >= until.position)
            {
                return Ok::<(), Error>(());
            }
            let pause = match report.outcome {
                records::Outcome::LeaseHeld { .. } => until.every,
                _ => std::time::Duration::from_millis(20),
            };
            tokio::time::sleep(pause).await;
        }
    };
    let apply = apply::run_until(sink, state, target, task, until, opts);
    let (drain, apply) = (std::pin::pin!(drain), std::pin::pin!(apply));
    match futures_util::future::select(apply, drain).await {
        futures_util::future::Either::Left((applied, drain)) => {
            stop.store(true, Ordering::Relaxed);
            let drained = drain.await;
            let applied = applied?;
            drained?;
            Ok(applied)
        }
        futures_util::future::Either::Right((drained, apply)) => {
            drained?;
            apply.await
        }
    }
}

/// The poller's options for [`catch_up`]: the task's settings, `max_batch_changes` per batch,
/// never creating a task (apply only catches up one that exists), a short lease (renewed at
/// every peek) so a killed run does not lock the task out for long.
pub fn drain_options(
    settings: &TaskSettings,
    task: &str,
    source: PgConfig,
    owner: impl Into<String>,
    max_batch_changes: u64,
) -> CdcOptions {
    let mut cdc = settings.cdc_options(task, source, owner, None);
    cdc.max_batch_changes = max_batch_changes;
    cdc.create_if_missing = false;
    cdc.lease_ttl = std::time::Duration::from_secs(120);
    cdc
}
