//! Fault injection around a [`CdcSource`]: a source that fails as a real one does at a chosen
//! step (the second peek session, mid-peek, the slot advance, a peek held past the deadline).
//! Tests wrap the source they pass; production code never sees it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::{Capture, CdcSource, PeekRequest, PeekStream, Publications, Replication, SlotState};
use crate::change::decoder::RelationInfo;
use crate::error::{Error, Result};
use crate::lsn::Lsn;

/// How the source fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceFault {
    /// The second session of every split peek fails (once its half is asked for).
    SecondHalf,
    /// A peek fails after returning this many rows (a connection cut mid-peek).
    MidPeek(usize),
    /// The process dies at the `n`-th (0-based) slot advance: it is not done, nor anything
    /// after it.
    AtAdvance(usize),
    /// The server takes this long to decode a peek: one given less time is cut at its
    /// deadline (as `statement_timeout` cuts it), without waiting on a clock.
    HoldPeek(Duration),
}

/// A source with a [`SourceFault`].
#[derive(Debug, Clone)]
pub struct UnreliableSource<S> {
    inner: S,
    fault: SourceFault,
    advances: Arc<Mutex<(usize, bool)>>,
}

impl<S: CdcSource> UnreliableSource<S> {
    pub fn new(inner: S, fault: SourceFault) -> UnreliableSource<S> {
        UnreliableSource {
            inner,
            fault,
            advances: Arc::new(Mutex::new((0, false))),
        }
    }

    fn alive(&self) -> Result<()> {
        match self.advances.lock() {
            Ok(a) if !a.1 => Ok(()),
            _ => Err(Error::Injected(
                "the process died at a slot advance".to_owned(),
            )),
        }
    }
}

impl<S: CdcSource> CdcSource for UnreliableSource<S> {
    type Peek = UnreliablePeek<S::Peek>;

    async fn create_replication(&self, name: &str, capture: &Capture) -> Result<Replication> {
        self.alive()?;
        self.inner.create_replication(name, capture).await
    }

    async fn adopt_replication(
        &self,
        slot: &str,
        publication: &str,
        start: Option<Lsn>,
    ) -> Result<Replication> {
        self.alive()?;
        self.inner.adopt_replication(slot, publication, start).await
    }

    async fn adopted_publication(
        &self,
        publication: &str,
        capture: &Capture,
    ) -> Result<Publications> {
        self.alive()?;
        self.inner.adopted_publication(publication, capture).await
    }

    async fn sync_publications(&self, name: &str, capture: &Capture) -> Result<Publications> {
        self.alive()?;
        self.inner.sync_publications(name, capture).await
    }

    async fn drop_replication(&self, name: &str) -> Result<Vec<String>> {
        self.alive()?;
        self.inner.drop_replication(name).await
    }

    async fn slot_state(&self, slot: &str) -> Result<Option<SlotState>> {
        self.alive()?;
        self.inner.slot_state(slot).await
    }

    async fn advance(&self, slot: &str, to: Lsn) -> Result<()> {
        self.alive()?;
        if let SourceFault::AtAdvance(n) = self.fault
            && let Ok(mut a) = self.advances.lock()
        {
            a.0 += 1;
            if a.0 > n {
                a.1 = true;
                return Err(Error::Injected(format!(
                    "the process died before advancing slot {slot} to {to}"
                )));
            }
        }
        self.inner.advance(slot, to).await
    }

    async fn drain_target(&self) -> Result<Lsn> {
        self.alive()?;
        self.inner.drain_target().await
    }

    async fn free_slots(&self, slot: &str) -> Result<i64> {
        self.alive()?;
        self.inner.free_slots(slot).await
    }

    async fn relation_info(&self, rel_id: u32, types: &[(u32, i32)]) -> Result<RelationInfo> {
        self.alive()?;
        self.inner.relation_info(rel_id, types).await
    }

    async fn table_definition(
        &self,
        rel_id: u32,
    ) -> Result<Option<crate::change::ddl::TableDefinition>> {
        self.alive()?;
        self.inner.table_definition(rel_id).await
    }

    async fn type_ddl(&self, rel_id: u32) -> Result<Vec<crate::source::ddl::DdlItem>> {
        self.alive()?;
        self.inner.type_ddl(rel_id).await
    }

    async fn prepare_peeks(&self, decoding_work_mem: &str) -> Result<i32> {
        self.alive()?;
        self.inner.prepare_peeks(decoding_work_mem).await
    }

    async fn peek(&self, req: &PeekRequest) -> Result<Self::Peek> {
        self.alive()?;
        let held = matches!(&self.fault, SourceFault::HoldPeek(hold) if *hold >= req.timeout);
        Ok(UnreliablePeek {
            inner: self.inner.peek(req).await?,
            fault: self.fault.clone(),
            rows: 0,
            held: held && req.deadline,
            cut: held && !req.deadline,
        })
    }
}

/// A peek of an [`UnreliableSource`].
#[derive(Debug)]
pub struct UnreliablePeek<P> {
    inner: P,
    fault: SourceFault,
    rows: usize,
    /// Cut at the deadline before the first row.
    held: bool,
    /// Cut by the session's statement timeout (no deadline): a plain failure.
    cut: bool,
}

impl<P: PeekStream> PeekStream for UnreliablePeek<P> {
    async fn next_row(&mut self) -> Result<Option<(Lsn, Bytes)>> {
        if self.held {
            return Err(Error::Deadline(
                "the peek was held past the time left (source fault)".to_owned(),
            ));
        }
        if self.cut {
            return Err(Error::Injected(
                "the peek outlived the statement timeout".to_owned(),
            ));
        }
        if let SourceFault::MidPeek(n) = self.fault
            && self.rows >= n
        {
            return Err(Error::Injected(format!(
                "the peek's connection was cut after {n} rows"
            )));
        }
        self.rows += 1;
        self.inner.next_row().await
    }

    async fn next_half(&mut self) -> Result<Option<Lsn>> {
        let next = self.inner.next_half().await?;
        if next.is_some() && self.fault == SourceFault::SecondHalf {
            return Err(Error::Injected(
                "the second peek session failed (source fault)".to_owned(),
            ));
        }
        Ok(next)
    }

    async fn cancel(self) {
        self.inner.cancel().await;
    }
}
