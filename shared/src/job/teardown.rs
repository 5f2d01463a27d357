//! Teardown: drops everything pgshift created on the source for a task — its replication
//! slot (which otherwise holds WAL until the disk fills), its publications and its follow
//! trigger. Staged data and state are left alone (they are the migration's record).
//!
//! Effect order: the slot first (an active slot — a poll running — is an error naming it, and
//! nothing else is dropped), then the publications, then the trigger. A rerun finishes what a
//! failed one left; dropping what is already gone is not an error.

use crate::config::{PgConfig, check_task_name, slot_name};
use crate::error::Result;
use crate::source::{CdcSource, PgSource};

/// What teardown dropped (`replication slot ..`, `publication ..`, `event trigger ..`).
pub async fn run(source: &PgConfig, task: &str) -> Result<Vec<String>> {
    check_task_name(task)?;
    let source = PgSource::connect(source).await?;
    drop_task(&source, task).await
}

/// [`run`] over any source.
pub async fn drop_task<Src: CdcSource>(source: &Src, task: &str) -> Result<Vec<String>> {
    check_task_name(task)?;
    let dropped = source.drop_replication(&slot_name(task)).await?;
    tracing::info!(task, ?dropped, "teardown");
    Ok(dropped)
}
