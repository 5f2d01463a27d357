//! The poller's events (DESIGN §9): a failed poll and the slot's lag crossing its threshold
//! (`Task State Changed`), and the re-announcement of batches whose `Batch Committed` was
//! not put. `Batch Committed` itself is put in `commit_batch`, right after step 5.

use super::*;
use crate::events::{Job, TaskState, TaskStateChanged};

/// A poll's error, announced (`Task State Changed`) with events on.
pub(super) async fn failed(opts: &CdcOptions, e: Error) -> Error {
    if opts.events.enabled() && !matches!(e, Error::Injected(_)) {
        let change = TaskStateChanged::from_error(&opts.task, Job::Cdc, &e);
        opts.events.announce(&[change.event()]).await;
    }
    e
}

/// `Task State Changed` when the slot's retained WAL crossed the alert threshold since the
/// last poll (either way).
pub(super) fn lag_change(
    opts: &CdcOptions,
    before: Option<&PollReport>,
    now: &PollReport,
) -> Option<TaskStateChanged> {
    let limit = opts.slot_lag_alert_bytes as i64;
    let was = before.is_some_and(|b| b.slot_retained_bytes > limit);
    let is = now.slot_retained_bytes > limit;
    let bytes = now.slot_retained_bytes;
    match (was, is) {
        (false, true) => Some(TaskStateChanged::new(
            &opts.task,
            TaskState::SlotLagging,
            format!(
                "the slot retains {bytes} bytes of WAL, more than the alert threshold of {limit}"
            ),
        )),
        (true, false) => Some(TaskStateChanged::new(
            &opts.task,
            TaskState::SlotCaughtUp,
            format!("the slot retains {bytes} bytes of WAL, under the alert threshold of {limit}"),
        )),
        _ => None,
    }
}

/// Batches one poll re-announces at most.
const REANNOUNCE_MAX: u64 = 100;

impl<Src: CdcSource, S: ObjectSink, St: StateStore> Poller<'_, Src, S, St> {
    /// With events on, before the drain: the batches committed after the last one announced
    /// (a put that failed, a run that died after its checkpoint moved) are announced again,
    /// at most [`REANNOUNCE_MAX`] a poll. The first poll with events on starts at the
    /// checkpoint (history is not announced); with events off the mark is dropped.
    pub(super) async fn reannounce(&mut self, report: &mut PollReport) -> Result<()> {
        let events = &self.opts.events;
        let checkpoint = self.checkpoint();
        let Some(through) = self
            .lease
            .rec
            .announced_through
            .filter(|_| events.enabled())
        else {
            self.lease.rec.announced_through = events.enabled().then_some(checkpoint);
            return Ok(());
        };
        if through >= checkpoint {
            return Ok(());
        }
        let stage = self.sink.describe();
        let mut at = through;
        for key in layout::batch_manifest_keys(self.sink).await? {
            let Some((start, end)) = layout::batch_range(&key) else {
                continue;
            };
            if end <= at || start < at || end > checkpoint {
                continue;
            }
            if report.events_put >= REANNOUNCE_MAX {
                break;
            }
            let m: BatchManifest = layout::get_json(self.sink, &key, "a batch manifest").await?;
            let sent = events
                .announce(&[BatchCommitted::from_manifest(&stage, &key, &m, true).event()])
                .await;
            report.events_put += sent.put;
            report.events_failed += sent.failed;
            if sent.failed > 0 {
                break;
            }
            at = end;
        }
        // Past the last batch (an idle stretch moved the checkpoint without one): caught up.
        if report.events_failed == 0 && self.lease.rec.last_batch_end.is_none_or(|e| e <= at) {
            at = checkpoint;
        }
        self.lease.rec.announced_through = Some(at);
        Ok(())
    }
}
