//! Step 2 of the effect order: the slot must be at the checkpoint, and a checkpoint ahead of
//! the slot is advanced to only when every transaction in between was staged.

use super::{Poller, start_over};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::pgoutput::{self, Message};
use crate::source::publication::peek_names;
use crate::source::{CdcSource, PeekRequest, PeekStream, SlotState};
use crate::staging::ObjectSink;
use crate::staging::layout;
use crate::state::StateStore;

impl<Src: CdcSource, S: ObjectSink, St: StateStore> Poller<'_, Src, S, St> {
    pub(super) async fn slot_state(&self) -> Result<SlotState> {
        let name = &self.task.slot;
        let state = self.source.slot_state(name).await?.ok_or_else(|| {
            Error::SlotLost(format!(
                "replication slot {name} of task {} does not exist (dropped?): changes since the checkpoint cannot be recovered; {}",
                self.opts.task,
                start_over(&self.opts.task)
            ))
        })?;
        if state.wal_status == "lost" {
            return Err(Error::SlotLost(format!(
                "replication slot {name} lost WAL it needed (wal_status = lost, max_slot_wal_keep_size exceeded): changes were lost on the source; {}",
                start_over(&self.opts.task)
            )));
        }
        Ok(state)
    }

    /// Step 2: the slot must be at the checkpoint. Behind it after a crash between steps 5
    /// and 6, it is advanced — once every transaction in between is shown staged; ahead of
    /// it, changes nobody staged are gone.
    pub(super) async fn align_slot(&self, since: Option<Lsn>) -> Result<SlotState> {
        let start = self.checkpoint();
        let state = self.slot_state().await?;
        let confirmed = state.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
        if confirmed < start {
            let names = peek_names(
                &self.task.publication,
                since.is_some_and(|s| confirmed >= s),
            );
            self.justify_checkpoint(confirmed, start, names).await?;
            self.source.advance(&self.task.slot, start).await?;
        } else if confirmed > start {
            return Err(Error::SlotLost(format!(
                "slot {} is at {confirmed}, past the checkpoint {start}: something else consumed it and those changes were never staged; {}",
                self.task.slot,
                start_over(&self.opts.task)
            )));
        }
        Ok(state)
    }

    /// A checkpoint ahead of the slot is justified when every transaction of a selected table
    /// committed between them is inside a committed batch (a crash between steps 5 and 6).
    /// Anything else (edited or foreign state) would lose changes: a terminal error.
    async fn justify_checkpoint(&self, confirmed: Lsn, start: Lsn, names: String) -> Result<()> {
        let flush = self.source.drain_target().await?;
        if start > flush {
            return Err(Error::SlotLost(format!(
                "the checkpoint {start} of task {} is ahead of the server's WAL ({flush}): the task's state is not this source's; restore it, or {}",
                self.opts.task,
                start_over(&self.opts.task)
            )));
        }
        let staged: Vec<(Lsn, Lsn)> = layout::batch_manifest_keys(self.sink)
            .await?
            .iter()
            .filter_map(|k| layout::batch_range(k))
            .collect();
        let mut peek = self
            .source
            .peek(&PeekRequest {
                slot: self.task.slot.clone(),
                publication: names,
                upto: start,
                max_changes: i32::MAX,
                timeout: self.opts.source.statement_timeout,
                deadline: false,
                split: None,
                messages: self.messages,
            })
            .await?;
        let mut selected = std::collections::HashMap::new();
        let (mut changed, mut unstaged, mut first) = (false, 0u64, None);
        while let Some((lsn, data)) = peek.next_row().await? {
            let msg = pgoutput::decode(&data, false)
                .map_err(|e| Error::Protocol(format!("{e} at {lsn}")))?;
            let rel = match &msg {
                Message::Relation(r) => {
                    let yes = self.opts.selection.selects(r.namespace, r.name);
                    selected.insert(r.rel_id, yes);
                    continue;
                }
                Message::Begin(_) => {
                    changed = false;
                    continue;
                }
                Message::Commit(c) => {
                    let covered = staged
                        .iter()
                        .any(|(s, e)| c.end_lsn > *s && c.end_lsn <= *e);
                    if changed && c.end_lsn <= start && !covered {
                        unstaged += 1;
                        first.get_or_insert(c.commit_lsn);
                    }
                    continue;
                }
                Message::Insert(i) => i.rel_id,
                Message::Update(u) => u.rel_id,
                Message::Delete(d) => d.rel_id,
                Message::Truncate(t) => t.rel_ids.first().copied().unwrap_or(0),
                _ => continue,
            };
            changed |= selected.get(&rel).copied().unwrap_or(true);
        }
        peek.cancel().await;
        match first {
            None => Ok(()),
            Some(at) => Err(Error::SlotLost(format!(
                "the checkpoint {start} of task {} is ahead of what was staged: {unstaged} transactions between the slot's position {confirmed} and it (the first committed at {at}) were never staged, and advancing the slot would lose them; restore the task's state, or {}",
                self.opts.task,
                start_over(&self.opts.task)
            ))),
        }
    }
}
