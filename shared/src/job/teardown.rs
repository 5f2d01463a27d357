//! Teardown: drops everything pgshift created on the source for a task — its replication
//! slot (which otherwise holds WAL until the disk fills), its publications and its follow
//! trigger. Staged data is left alone (the migration's record); the task's state too, unless
//! asked to reset it (`--reset`): the way to start a task over after its slot or publication
//! was lost, with its next full load.
//!
//! Effect order: the slot first (an active slot — a poll running — is an error naming it, and
//! nothing else is dropped), then the publications, then the trigger. A rerun finishes what a
//! failed one left; dropping what is already gone is not an error.

use crate::config::{PgConfig, check_task_name, slot_name};
use crate::error::Result;
use crate::source::{CdcSource, PgSource};
use crate::state::StateStore;
use crate::state::records;

/// What teardown dropped (`replication slot ..`, `publication ..`, `event trigger ..`).
pub async fn run(source: &PgConfig, task: &str) -> Result<Vec<String>> {
    check_task_name(task)?;
    let source = PgSource::connect(source).await?;
    drop_task(&source, task).await
}

/// [`run`], then the task's state deleted so it starts over with its next full load.
pub async fn reset<St: StateStore>(
    source: &PgConfig,
    state: &St,
    task: &str,
) -> Result<Vec<String>> {
    let mut done = run(source, task).await?;
    done.extend(records::reset_task(state, task).await?);
    Ok(done)
}

/// [`run`] over any source.
pub async fn drop_task<Src: CdcSource>(source: &Src, task: &str) -> Result<Vec<String>> {
    check_task_name(task)?;
    let dropped = source.drop_replication(&slot_name(task)).await?;
    tracing::info!(task, ?dropped, "teardown");
    Ok(dropped)
}
