//! [`CdcSource`] in memory, for job-level tests without PostgreSQL: tables, committed
//! transactions, and slots, with peeks that return real pgoutput (protocol 1) messages in
//! commit order, a Relation message before a relation's first change in each session, and
//! the slot semantics the poller relies on (a transaction is returned until the slot's
//! confirmed position passes its end; `upto` and `upto_nchanges` bound a peek).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{Capture, CdcSource, PeekRequest, PeekStream, Publications, Replication, SlotState};
use crate::change::decoder::RelationInfo;
use crate::error::{Error, Result};
use crate::lsn::Lsn;

/// A change a test commits. Values are text (`None` is NULL); every column is `text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryChange {
    Insert {
        rel: u32,
        new: Vec<Option<String>>,
    },
    /// `old`: the old key row when the key changed (or always, under REPLICA IDENTITY FULL).
    Update {
        rel: u32,
        old: Option<Vec<Option<String>>>,
        new: Vec<Option<String>>,
    },
    Delete {
        rel: u32,
        old: Vec<Option<String>>,
    },
    Truncate {
        rels: Vec<u32>,
    },
}

#[derive(Debug, Clone)]
struct MemTable {
    schema: String,
    name: String,
    columns: Vec<(String, bool)>,
}

#[derive(Debug, Clone)]
struct MemTxn {
    xid: u32,
    first: Lsn,
    commit: Lsn,
    end: Lsn,
    changes: Vec<(Lsn, MemoryChange)>,
}

#[derive(Debug, Default)]
struct Wal {
    lsn: u64,
    xid: u32,
    tables: BTreeMap<u32, MemTable>,
    txns: Vec<MemTxn>,
    slots: HashMap<String, Lsn>,
    max_slots: i64,
}

/// An in-memory source (cheap to clone: clones share the same WAL).
#[derive(Debug, Clone)]
pub struct MemorySource {
    wal: Arc<Mutex<Wal>>,
}

impl Default for MemorySource {
    fn default() -> Self {
        MemorySource::new()
    }
}

/// Commit timestamp of every transaction: 2026-01-01 00:00:00 UTC in PostgreSQL micros.
const COMMIT_TS: i64 = 820_454_400_000_000;

impl MemorySource {
    pub fn new() -> MemorySource {
        MemorySource {
            wal: Arc::new(Mutex::new(Wal {
                lsn: 0x100_0000,
                xid: 700,
                max_slots: 10,
                ..Wal::default()
            })),
        }
    }

    fn wal(&self) -> Result<std::sync::MutexGuard<'_, Wal>> {
        self.wal
            .lock()
            .map_err(|_| Error::Source("memory source poisoned".to_owned()))
    }

    /// Adds a table (every column `text`; `true` marks primary-key columns). Returns its id.
    pub fn create_table(&self, schema: &str, name: &str, columns: &[(&str, bool)]) -> u32 {
        let mut wal = self.wal.lock().expect("memory source");
        let id = 16_384 + wal.tables.len() as u32;
        wal.tables.insert(
            id,
            MemTable {
                schema: schema.to_owned(),
                name: name.to_owned(),
                columns: columns.iter().map(|(n, k)| ((*n).to_owned(), *k)).collect(),
            },
        );
        id
    }

    /// Commits one transaction; returns its end position.
    pub fn commit(&self, changes: Vec<MemoryChange>) -> Lsn {
        let mut wal = self.wal.lock().expect("memory source");
        wal.xid += 1;
        let xid = wal.xid;
        let first = Lsn(wal.lsn + 0x28);
        let mut at = wal.lsn;
        let changes = changes
            .into_iter()
            .map(|c| {
                at += 0x40;
                (Lsn(at), c)
            })
            .collect();
        let commit = Lsn(at + 0x40);
        let end = Lsn(commit.0 + 0x30);
        wal.lsn = end.0;
        wal.txns.push(MemTxn {
            xid,
            first,
            commit,
            end,
            changes,
        });
        end
    }

    /// The commit time of the last transaction committed.
    pub fn last_commit_ts(&self) -> i64 {
        commit_ts(self.wal.lock().expect("memory source").xid)
    }

    /// Where the WAL ends.
    pub fn flush_lsn(&self) -> Lsn {
        Lsn(self.wal.lock().expect("memory source").lsn)
    }

    /// A slot's confirmed position.
    pub fn confirmed(&self, slot: &str) -> Option<Lsn> {
        self.wal
            .lock()
            .expect("memory source")
            .slots
            .get(slot)
            .copied()
    }

    /// Drops a slot (as a person or `max_slot_wal_keep_size` would).
    pub fn drop_slot(&self, slot: &str) {
        self.wal.lock().expect("memory source").slots.remove(slot);
    }

    /// The messages of the transactions a peek returns, in order.
    fn messages(wal: &Wal, req: &PeekRequest, from: Lsn, below: Option<Lsn>) -> Vec<(Lsn, Bytes)> {
        let mut out = Vec::new();
        let mut sent = std::collections::HashSet::new();
        let mut changes = 0i64;
        for t in &wal.txns {
            if t.end <= from || t.end > req.upto || below.is_some_and(|b| t.commit >= b) {
                continue;
            }
            out.push((t.first, begin(t)));
            for (lsn, c) in &t.changes {
                let rels: Vec<u32> = match c {
                    MemoryChange::Insert { rel, .. }
                    | MemoryChange::Update { rel, .. }
                    | MemoryChange::Delete { rel, .. } => vec![*rel],
                    MemoryChange::Truncate { rels } => rels.clone(),
                };
                for rel in rels {
                    if sent.insert(rel)
                        && let Some(table) = wal.tables.get(&rel)
                    {
                        out.push((*lsn, relation(rel, table)));
                    }
                }
                out.push((*lsn, change(c)));
                changes += 1;
            }
            out.push((t.commit, commit(t)));
            if changes >= i64::from(req.max_changes) {
                break;
            }
        }
        out
    }
}

fn put_cstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

/// Transaction `xid`'s commit time: one second after the one before.
fn commit_ts(xid: u32) -> i64 {
    COMMIT_TS + i64::from(xid) * 1_000_000
}

fn begin(t: &MemTxn) -> Bytes {
    let mut b = vec![b'B'];
    b.extend_from_slice(&t.commit.0.to_be_bytes());
    b.extend_from_slice(&commit_ts(t.xid).to_be_bytes());
    b.extend_from_slice(&t.xid.to_be_bytes());
    Bytes::from(b)
}

fn commit(t: &MemTxn) -> Bytes {
    let mut b = vec![b'C', 0];
    b.extend_from_slice(&t.commit.0.to_be_bytes());
    b.extend_from_slice(&t.end.0.to_be_bytes());
    b.extend_from_slice(&commit_ts(t.xid).to_be_bytes());
    Bytes::from(b)
}

fn relation(id: u32, t: &MemTable) -> Bytes {
    let mut b = vec![b'R'];
    b.extend_from_slice(&id.to_be_bytes());
    put_cstr(&mut b, &t.schema);
    put_cstr(&mut b, &t.name);
    b.push(b'd');
    b.extend_from_slice(&(t.columns.len() as i16).to_be_bytes());
    for (name, key) in &t.columns {
        b.push(u8::from(*key));
        put_cstr(&mut b, name);
        b.extend_from_slice(&25u32.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
    }
    Bytes::from(b)
}

fn tuple(b: &mut Vec<u8>, values: &[Option<String>]) {
    b.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for v in values {
        match v {
            None => b.push(b'n'),
            Some(t) => {
                b.push(b't');
                b.extend_from_slice(&(t.len() as i32).to_be_bytes());
                b.extend_from_slice(t.as_bytes());
            }
        }
    }
}

fn change(c: &MemoryChange) -> Bytes {
    let mut b = Vec::new();
    match c {
        MemoryChange::Insert { rel, new } => {
            b.push(b'I');
            b.extend_from_slice(&rel.to_be_bytes());
            b.push(b'N');
            tuple(&mut b, new);
        }
        MemoryChange::Update { rel, old, new } => {
            b.push(b'U');
            b.extend_from_slice(&rel.to_be_bytes());
            if let Some(old) = old {
                b.push(b'K');
                tuple(&mut b, old);
            }
            b.push(b'N');
            tuple(&mut b, new);
        }
        MemoryChange::Delete { rel, old } => {
            b.push(b'D');
            b.extend_from_slice(&rel.to_be_bytes());
            b.push(b'K');
            tuple(&mut b, old);
        }
        MemoryChange::Truncate { rels } => {
            b.push(b'T');
            b.extend_from_slice(&(rels.len() as u32).to_be_bytes());
            b.push(0);
            for r in rels {
                b.extend_from_slice(&r.to_be_bytes());
            }
        }
    }
    Bytes::from(b)
}

impl CdcSource for MemorySource {
    type Peek = MemoryPeek;

    async fn create_replication(&self, name: &str, _capture: &Capture) -> Result<Replication> {
        let mut wal = self.wal()?;
        let at = Lsn(wal.lsn);
        let start = *wal.slots.entry(name.to_owned()).or_insert(at);
        Ok(Replication {
            start_lsn: start,
            database: "memory".to_owned(),
        })
    }

    async fn adopt_replication(
        &self,
        slot: &str,
        publication: &str,
        start: Option<Lsn>,
    ) -> Result<Replication> {
        let state = self.slot_state(slot).await?;
        let flush = self.flush_lsn();
        // Memory publications all exist but the empty name.
        let start_lsn = super::check_adoption(
            slot,
            publication,
            state.as_ref(),
            !publication.is_empty(),
            "memory",
            start,
            flush,
        )?;
        if state.and_then(|s| s.confirmed_flush_lsn) < Some(start_lsn) {
            self.advance(slot, start_lsn).await?;
        }
        Ok(Replication {
            start_lsn,
            database: "memory".to_owned(),
        })
    }

    async fn adopted_publication(
        &self,
        _publication: &str,
        _capture: &Capture,
    ) -> Result<Publications> {
        Ok(Publications::default())
    }

    async fn sync_publications(&self, _name: &str, _capture: &Capture) -> Result<Publications> {
        Ok(Publications {
            since: Some(Lsn::ZERO),
            follows: true,
            ..Publications::default()
        })
    }

    async fn drop_replication(&self, name: &str) -> Result<Vec<String>> {
        let existed = self.wal()?.slots.remove(name).is_some();
        Ok(if existed {
            vec![format!("replication slot {name}")]
        } else {
            Vec::new()
        })
    }

    async fn slot_state(&self, name: &str) -> Result<Option<SlotState>> {
        let wal = self.wal()?;
        Ok(wal.slots.get(name).map(|&confirmed| SlotState {
            name: name.to_owned(),
            plugin: "pgoutput".to_owned(),
            database: "memory".to_owned(),
            active: false,
            restart_lsn: Some(confirmed),
            confirmed_flush_lsn: Some(confirmed),
            wal_status: "reserved".to_owned(),
            safe_wal_size: None,
            retained_bytes: (wal.lsn - confirmed.0) as i64,
        }))
    }

    async fn advance(&self, name: &str, to: Lsn) -> Result<()> {
        let mut wal = self.wal()?;
        let flush = Lsn(wal.lsn);
        let slot = wal
            .slots
            .get_mut(name)
            .ok_or_else(|| Error::Source(format!("replication slot {name} does not exist")))?;
        *slot = (*slot).max(to.min(flush));
        Ok(())
    }

    async fn drain_target(&self) -> Result<Lsn> {
        Ok(Lsn(self.wal()?.lsn))
    }

    async fn free_slots(&self, _name: &str) -> Result<i64> {
        let wal = self.wal()?;
        Ok(wal.max_slots - wal.slots.len() as i64)
    }

    /// The memory source has no catalog: schema changes are seen from Relation messages.
    async fn table_definition(
        &self,
        _rel_id: u32,
    ) -> Result<Option<crate::change::ddl::TableDefinition>> {
        Ok(None)
    }

    async fn type_ddl(&self, _rel_id: u32) -> Result<Vec<crate::source::ddl::DdlItem>> {
        Ok(Vec::new())
    }

    async fn relation_info(&self, rel_id: u32, types: &[(u32, i32)]) -> Result<RelationInfo> {
        let wal = self.wal()?;
        let table = wal
            .tables
            .get(&rel_id)
            .ok_or_else(|| Error::Source(format!("no relation {rel_id}")))?;
        Ok(RelationInfo {
            primary_key: table
                .columns
                .iter()
                .filter(|c| c.1)
                .map(|c| c.0.clone())
                .collect(),
            type_names: types.iter().map(|_| "text".to_owned()).collect(),
        })
    }

    async fn prepare_peeks(&self, _decoding_work_mem: &str) -> Result<i32> {
        Ok(150_000)
    }

    async fn peek(&self, req: &PeekRequest) -> Result<MemoryPeek> {
        let wal = self.wal()?;
        let from = *wal.slots.get(&req.slot).ok_or_else(|| {
            Error::Source(format!("replication slot {} does not exist", req.slot))
        })?;
        let first = MemorySource::messages(&wal, req, from, req.split);
        let second = req.split.map(|at| {
            // The copy advanced to the split point: transactions committed from there on.
            let rest = MemorySource::messages(&wal, req, from, None);
            let skip: std::collections::HashSet<Lsn> = wal
                .txns
                .iter()
                .filter(|t| t.commit < at)
                .map(|t| t.first)
                .collect();
            let mut out = Vec::new();
            let mut keep = true;
            for (lsn, m) in rest {
                match m.first() {
                    Some(b'B') => keep = !skip.contains(&lsn),
                    Some(b'R') => {
                        out.push((lsn, m));
                        continue;
                    }
                    _ => {}
                }
                if keep {
                    out.push((lsn, m));
                }
            }
            (at, out)
        });
        Ok(MemoryPeek {
            rows: first.into_iter(),
            second,
        })
    }
}

/// A peek of [`MemorySource`].
#[derive(Debug)]
pub struct MemoryPeek {
    rows: std::vec::IntoIter<(Lsn, Bytes)>,
    second: Option<(Lsn, Vec<(Lsn, Bytes)>)>,
}

impl PeekStream for MemoryPeek {
    async fn next_row(&mut self) -> Result<Option<(Lsn, Bytes)>> {
        Ok(self.rows.next())
    }

    async fn next_half(&mut self) -> Result<Option<Lsn>> {
        match self.second.take() {
            Some((at, rows)) => {
                self.rows = rows.into_iter();
                Ok(Some(at))
            }
            None => Ok(None),
        }
    }

    async fn cancel(self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Message, decode};

    fn text(v: &[&str]) -> Vec<Option<String>> {
        v.iter().map(|s| Some((*s).to_owned())).collect()
    }

    #[tokio::test]
    async fn peeks_return_real_pgoutput_in_commit_order_until_the_slot_passes_them() {
        let src = MemorySource::new();
        let t = src.create_table("public", "t", &[("id", true), ("v", false)]);
        let start = src
            .create_replication("s", &Capture::default())
            .await
            .unwrap()
            .start_lsn;
        let e1 = src.commit(vec![MemoryChange::Insert {
            rel: t,
            new: text(&["1", "a"]),
        }]);
        let e2 = src.commit(vec![MemoryChange::Delete {
            rel: t,
            old: text(&["1", "a"]),
        }]);
        assert!(start < e1 && e1 < e2);
        let req = PeekRequest {
            slot: "s".to_owned(),
            publication: "s".to_owned(),
            upto: src.drain_target().await.unwrap(),
            max_changes: 100,
            timeout: std::time::Duration::from_secs(1),
            deadline: false,
            split: None,
            messages: false,
        };
        let mut p = src.peek(&req).await.unwrap();
        let mut tags = String::new();
        while let Some((_, m)) = p.next_row().await.unwrap() {
            let msg = decode(&m, false).unwrap();
            if let Message::Commit(c) = &msg {
                assert!(c.end_lsn == e1 || c.end_lsn == e2);
            }
            tags.push(m[0] as char);
        }
        assert_eq!(tags, "BRICBDC");
        src.advance("s", e1).await.unwrap();
        let mut p = src.peek(&req).await.unwrap();
        let mut tags = String::new();
        while let Some((_, m)) = p.next_row().await.unwrap() {
            tags.push(m[0] as char);
        }
        assert_eq!(tags, "BRDC", "a new session repeats the Relation");
    }
}
