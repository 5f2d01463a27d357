//! The peek: reading a slot's changes without consuming them, as binary COPY, one session or
//! split between two decoding at once (a temporary copy of the slot advanced to the split
//! point; see the CDC poller's module docs, step 3).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio_postgres::{Client, CopyOutStream};

use super::{PeekRequest, PeekStream, slot};
use crate::config::PgConfig;
use crate::error::{Error, Result};
use crate::lsn::Lsn;

/// Copies `slot` into a temporary slot of this session (same `restart_lsn`, confirmed
/// position and catalog horizon; PostgreSQL drops it when the session ends or fails). It is
/// named `pgshift__split_<backend pid>`: no other live session's copy has that pid, and no
/// task's slot starts `pgshift__` (task names start with a letter). Returns the name and pid.
pub async fn copy_temporary(client: &Client, slot: &str) -> Result<(String, i32)> {
    let row = client
        .query_one(
            "select (pg_copy_logical_replication_slot($1, 'pgshift__split_' || pg_backend_pid(), true)).slot_name::text, pg_backend_pid()",
            &[&slot],
        )
        .await
        .map_err(|e| Error::postgres(format!("copying slot {slot} into a temporary slot"), e))?;
    Ok((row.get(0), row.get(1)))
}

/// Prepares a session for peeking: `logical_decoding_work_mem` raised (PostgreSQL 13+, where
/// it exists) so transactions decode in memory. Returns `server_version_num`.
pub async fn prepare_peek_session(client: &Client, decoding_work_mem: &str) -> Result<i32> {
    let version: i32 = client
        .query_one("select current_setting('server_version_num')::int4", &[])
        .await
        .map_err(|e| Error::postgres("reading the server version", e))?
        .get(0);
    if version >= 130_000 {
        client
            .execute(
                "select set_config('logical_decoding_work_mem', $1, false)",
                &[&decoding_work_mem],
            )
            .await
            .map_err(|e| Error::postgres("setting logical_decoding_work_mem", e))?;
    }
    Ok(version)
}

/// One peek of `slot` (or of its temporary copy), as bound by `PEEK_BIND`.
#[derive(Debug, Clone)]
pub struct Peek<'a> {
    pub slot: &'a str,
    pub publication: &'a str,
    /// Up to this WAL position.
    pub upto: Lsn,
    /// About how many changes at most (checked between transactions).
    pub max_changes: i32,
    /// The session's `statement_timeout` (0 = none).
    pub timeout: std::time::Duration,
    /// Ask pgoutput for logical messages too (PostgreSQL 14+: the schema-change messages).
    pub messages: bool,
}

/// Starts a peek: binds its values, then opens the binary COPY whose rows [`PeekRows`] splits.
/// The stream's first piece comes once the server has decoded the whole range.
pub async fn start_peek(client: &Client, peek: &Peek<'_>) -> Result<tokio_postgres::CopyOutStream> {
    // The bind below runs under the session's current statement_timeout, which the previous
    // peek may have left very short (the time then left before its deadline).
    client
        .batch_execute("set statement_timeout = 0")
        .await
        .map_err(|e| Error::postgres("resetting the peek session's statement_timeout", e))?;
    client
        .execute(
            PEEK_BIND,
            &[
                &peek.slot,
                &peek.upto.to_string(),
                &peek.max_changes.to_string(),
                &peek.publication,
                &peek.timeout.as_millis().to_string(),
            ],
        )
        .await
        .map_err(|e| Error::postgres("binding the peek", e))?;
    client
        .copy_out(if peek.messages {
            PEEK_COPY_MESSAGES
        } else {
            PEEK_COPY
        })
        .await
        .map_err(|e| Error::postgres(format!("peeking slot {}", peek.slot), e))
}

/// Binds the peek's values for [`PEEK_COPY`] (COPY takes no parameters; the values travel
/// as bound arguments of `set_config`, never inside the statement text): the slot, the upper
/// LSN, about how many changes at most (checked between transactions), the publication, and
/// the session's `statement_timeout` in milliseconds (what is left before the deadline).
const PEEK_BIND: &str = "select set_config('pgshift.peek_slot', $1, false), \
 set_config('pgshift.peek_upto', $2, false), set_config('pgshift.peek_changes', $3, false), \
 set_config('pgshift.peek_publication', $4, false), set_config('statement_timeout', $5, false)";

/// The peek, pgoutput protocol 1, as binary COPY: `(lsn, data)` rows ([`PeekRows`]). COPY
/// sends rows with less work per row on both sides than a query's DataRow messages (the
/// server streams the decoded tuplestore; this is most of the run after the decode itself).
const PEEK_COPY: &str = "copy (select lsn, data from pg_logical_slot_peek_binary_changes(\
 current_setting('pgshift.peek_slot'), current_setting('pgshift.peek_upto')::pg_lsn, \
 current_setting('pgshift.peek_changes')::int4, 'proto_version', '1', \
 'publication_names', current_setting('pgshift.peek_publication'))) to stdout with (format binary)";

/// [`PEEK_COPY`] with pgoutput's `messages` option (PostgreSQL 14+; older servers refuse it).
const PEEK_COPY_MESSAGES: &str = "copy (select lsn, data from pg_logical_slot_peek_binary_changes(\
 current_setting('pgshift.peek_slot'), current_setting('pgshift.peek_upto')::pg_lsn, \
 current_setting('pgshift.peek_changes')::int4, 'proto_version', '1', \
 'publication_names', current_setting('pgshift.peek_publication'), 'messages', 'true')) to stdout with (format binary)";

const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Splits the binary COPY of `PEEK_COPY` into `(lsn, data)` rows, whatever the pieces the
/// stream arrives in. A row inside one piece is a slice of it (no copy); one spanning pieces
/// is joined (PostgreSQL sends each row of COPY TO as one CopyData message, so joins are rare:
/// the header, or a client that splits messages). Every read is checked: malformed bytes are errors naming what is wrong.
#[derive(Debug, Default)]
pub struct PeekRows {
    pending: Bytes,
    header_read: bool,
    ended: bool,
}

impl PeekRows {
    pub fn new() -> PeekRows {
        PeekRows::default()
    }

    /// Adds the next piece of the stream.
    pub fn push(&mut self, piece: Bytes) {
        if self.pending.is_empty() {
            self.pending = piece;
        } else {
            let mut joined = BytesMut::with_capacity(self.pending.len() + piece.len());
            joined.extend_from_slice(&self.pending);
            joined.extend_from_slice(&piece);
            self.pending = joined.freeze();
        }
    }

    /// The next complete row, `None` when more bytes are needed (or the trailer was read).
    pub fn next_row(&mut self) -> Result<Option<(Lsn, Bytes)>> {
        let p = &self.pending;
        if !self.header_read {
            if p.len() < COPY_SIGNATURE.len() + 8 {
                return Ok(None);
            }
            if !p.starts_with(COPY_SIGNATURE) {
                return Err(Error::Source(
                    "the peek's COPY output does not start with the binary COPY signature"
                        .to_owned(),
                ));
            }
            let at = COPY_SIGNATURE.len();
            let flags = be_u32(p, at);
            if flags & (1 << 16) != 0 {
                return Err(Error::Source(
                    "the peek's COPY output carries OIDs (unexpected)".to_owned(),
                ));
            }
            let ext = be_u32(p, at + 4) as usize;
            let body = at + 8 + ext;
            if p.len() < body {
                return Ok(None);
            }
            self.pending = p.slice(body..);
            self.header_read = true;
            return self.next_row();
        }
        if p.len() < 2 {
            return Ok(None);
        }
        let fields = i16::from_be_bytes([p[0], p[1]]);
        if self.ended || fields == -1 {
            if self.ended || p.len() > 2 {
                return Err(Error::Source(format!(
                    "{} bytes after the end of the peek's COPY output",
                    if self.ended { p.len() } else { p.len() - 2 }
                )));
            }
            self.ended = true;
            self.pending = Bytes::new();
            return Ok(None);
        }
        if fields != 2 {
            return Err(Error::Source(format!(
                "a row of the peek's COPY output has {fields} fields, expected 2 (lsn, data)"
            )));
        }
        if p.len() < 2 + 4 + 8 + 4 {
            return Ok(None);
        }
        let lsn_len = be_u32(p, 2) as i32;
        if lsn_len != 8 {
            return Err(Error::Source(format!(
                "a row of the peek's COPY output has an LSN of {lsn_len} bytes, expected 8"
            )));
        }
        let lsn = Lsn(u64::from_be_bytes([
            p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13],
        ]));
        let data_len = be_u32(p, 14) as i32;
        let Ok(data_len) = usize::try_from(data_len) else {
            return Err(Error::Source(format!(
                "the change at {lsn} in the peek's COPY output has no data (length {data_len})"
            )));
        };
        let end = 18 + data_len;
        if p.len() < end {
            return Ok(None);
        }
        let data = p.slice(18..end);
        self.pending = p.slice(end..);
        Ok(Some((lsn, data)))
    }

    /// Checks the stream ended with the trailer and nothing after it.
    pub fn finish(&self) -> Result<()> {
        if self.ended && self.pending.is_empty() {
            Ok(())
        } else if !self.ended && self.pending.is_empty() && !self.header_read {
            Err(Error::Source("the peek's COPY output is empty".to_owned()))
        } else {
            Err(Error::Source(format!(
                "the peek's COPY output ended inside a row ({} bytes pending)",
                self.pending.len()
            )))
        }
    }
}

/// A big-endian u32 at `at` (the caller checked the length).
fn be_u32(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

/// A peek of [`super::PgSource`]: the first half on the peek session, the second (when split)
/// on its own session over a temporary copy of the slot.
pub struct PgPeek {
    stream: Pin<Box<CopyOutStream>>,
    rows: PeekRows,
    slot: String,
    deadline: bool,
    split: Option<Lsn>,
    second: Option<SecondHalf>,
    control: Arc<Client>,
    /// Keeps the second half's session open while its rows are read.
    _second_session: Option<Client>,
}

impl PgPeek {
    /// Starts the peek: the second half first (its session, slot copy and advance overlap
    /// the first half's decode), then the first.
    pub(crate) async fn start(
        cfg: &PgConfig,
        session: &Client,
        control: Arc<Client>,
        req: &PeekRequest,
        decoding_work_mem: &str,
    ) -> Result<PgPeek> {
        let second = req.split.map(|at| {
            SecondHalf::open(SecondHalfPlan {
                cfg: cfg.clone(),
                req: PeekRequest {
                    split: None,
                    ..req.clone()
                },
                from: at,
                decoding_work_mem: decoding_work_mem.to_owned(),
            })
        });
        let started = start_peek(
            session,
            &Peek {
                slot: &req.slot,
                publication: &req.publication,
                upto: req.split.unwrap_or(req.upto),
                max_changes: req.max_changes,
                timeout: req.timeout,
                messages: req.messages,
            },
        )
        .await;
        let copy = match started {
            Ok(copy) => copy,
            // The server can cut the peek at the time left before its first row arrives.
            Err(Error::Postgres {
                source: Some(e), ..
            }) if req.deadline
                && e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) =>
            {
                return Err(Error::Deadline(format!(
                    "the peek of slot {} reached the deadline",
                    req.slot
                )));
            }
            Err(e) => return Err(e),
        };
        Ok(PgPeek {
            stream: Box::pin(copy),
            rows: PeekRows::new(),
            slot: req.slot.clone(),
            deadline: req.deadline,
            split: req.split,
            second,
            control,
            _second_session: None,
        })
    }
}

impl PeekStream for PgPeek {
    async fn next_row(&mut self) -> Result<Option<(Lsn, Bytes)>> {
        loop {
            if let Some(row) = self.rows.next_row()? {
                return Ok(Some(row));
            }
            match self.stream.next().await {
                Some(Ok(piece)) => self.rows.push(piece),
                // The server cut the peek at the time left (its statement_timeout).
                Some(Err(e))
                    if self.deadline
                        && e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) =>
                {
                    return Err(Error::Deadline(format!(
                        "the peek of slot {} reached the deadline",
                        self.slot
                    )));
                }
                // A publication the slot decodes with did not exist at a position it must
                // decode: it was dropped while the task needed it.
                Some(Err(e))
                    if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) =>
                {
                    let detail = e
                        .as_db_error()
                        .map(|d| d.message().to_owned())
                        .unwrap_or_default();
                    return Err(Error::SlotLost(format!(
                        "slot {} cannot decode its changes: {detail} (a publication was dropped while the task needed it)",
                        self.slot
                    )));
                }
                Some(Err(e)) => {
                    return Err(Error::postgres(
                        format!("reading changes of slot {}", self.slot),
                        e,
                    ));
                }
                None => {
                    self.rows.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    async fn next_half(&mut self) -> Result<Option<Lsn>> {
        let Some(half) = self.second.take() else {
            return Ok(None);
        };
        let (session, rest) = half.join().await?;
        self._second_session = Some(session);
        self.stream = Box::pin(rest);
        self.rows = PeekRows::new();
        Ok(self.split)
    }

    async fn cancel(mut self) {
        if let Some(half) = self.second.take() {
            half.cancel(&self.control).await;
        }
    }
}

/// What the second session of a split peek needs (owned: it runs as its own task).
struct SecondHalfPlan {
    cfg: PgConfig,
    req: PeekRequest,
    /// The split point: the copy is advanced here.
    from: Lsn,
    decoding_work_mem: String,
}

/// The second half of a split peek, opening in the background: its own session, a
/// temporary copy of the slot advanced to the split point, and the peek from there to the
/// target. Dropping it stops the task (and with it the session and the copy).
struct SecondHalf {
    task: tokio::task::JoinHandle<Result<(Client, CopyOutStream)>>,
    pid: Arc<AtomicI32>,
}

impl SecondHalf {
    fn open(plan: SecondHalfPlan) -> SecondHalf {
        let pid = Arc::new(AtomicI32::new(0));
        let seen = pid.clone();
        let task = tokio::spawn(async move {
            let mut cfg = plan.cfg;
            cfg.application_name = "pgshift-cdc-peek2".to_owned();
            let client = super::connect(&cfg).await?;
            prepare_peek_session(&client, &plan.decoding_work_mem).await?;
            let (copy, backend) = copy_temporary(&client, &plan.req.slot).await?;
            seen.store(backend, Ordering::Relaxed);
            slot::advance(&client, &copy, plan.from).await?;
            let peek = Peek {
                slot: &copy,
                publication: &plan.req.publication,
                upto: plan.req.upto,
                max_changes: plan.req.max_changes,
                messages: plan.req.messages,
                timeout: plan.req.timeout,
            };
            let rows = start_peek(&client, &peek).await?;
            Ok((client, rows))
        });
        SecondHalf { task, pid }
    }

    async fn join(mut self) -> Result<(Client, CopyOutStream)> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(Error::Source(format!("the second peek task failed: {e}"))),
        }
    }

    /// Stops a second half nobody will read: the task, and the backend's decode.
    async fn cancel(self, control: &Client) {
        self.task.abort();
        let pid = self.pid.load(Ordering::Relaxed);
        if pid != 0 {
            let _ = control
                .execute("select pg_cancel_backend($1)", &[&pid])
                .await;
        }
    }
}

impl Drop for SecondHalf {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod peek_rows_tests {
    use super::*;

    fn copy_bytes(rows: &[(u64, &[u8])]) -> Vec<u8> {
        let mut b = COPY_SIGNATURE.to_vec();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&4u32.to_be_bytes());
        b.extend_from_slice(b"ext!");
        for (lsn, data) in rows {
            b.extend_from_slice(&2i16.to_be_bytes());
            b.extend_from_slice(&8i32.to_be_bytes());
            b.extend_from_slice(&lsn.to_be_bytes());
            b.extend_from_slice(&(data.len() as i32).to_be_bytes());
            b.extend_from_slice(data);
        }
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b
    }

    fn split(bytes: &[u8], cuts: &[usize]) -> Result<Vec<(Lsn, Vec<u8>)>> {
        let mut r = PeekRows::new();
        let mut out = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            r.push(Bytes::copy_from_slice(&bytes[from..cut]));
            from = cut;
            while let Some((lsn, data)) = r.next_row()? {
                out.push((lsn, data.to_vec()));
            }
        }
        r.finish()?;
        Ok(out)
    }

    #[test]
    fn rows_come_out_whatever_the_pieces() {
        let rows: &[(u64, &[u8])] = &[(0x1_0000_0010, b"B..."), (0x1_0000_0020, b""), (7, b"C")];
        let bytes = copy_bytes(rows);
        let want: Vec<(Lsn, Vec<u8>)> = rows.iter().map(|(l, d)| (Lsn(*l), d.to_vec())).collect();
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                assert_eq!(split(&bytes, &[a, b]).unwrap(), want, "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn malformed_copy_output_is_an_error() {
        let good = copy_bytes(&[(1, b"x")]);
        let mut bad_sig = good.clone();
        bad_sig[0] = b'X';
        let mut three = good.clone();
        three[23..25].copy_from_slice(&3i16.to_be_bytes());
        let mut short_lsn = good.clone();
        short_lsn[25..29].copy_from_slice(&4i32.to_be_bytes());
        let mut null_data = good.clone();
        null_data[37..41].copy_from_slice(&(-1i32).to_be_bytes());
        let mut oids = good.clone();
        oids[11..15].copy_from_slice(&(1u32 << 16).to_be_bytes());
        let mut trailing = good.clone();
        trailing.push(0);
        for (bytes, want) in [
            (bad_sig, "signature"),
            (three, "3 fields"),
            (short_lsn, "LSN of 4 bytes"),
            (null_data, "has no data"),
            (oids, "OIDs"),
            (trailing, "after the end"),
            (good[..good.len() - 3].to_vec(), "ended inside a row"),
            (Vec::new(), "is empty"),
        ] {
            let err = split(&bytes, &[]).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let len = (seed % 64) as usize;
            let mut bytes = copy_bytes(&[(1, b"abc")])[..19].to_vec();
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push(seed as u8);
            }
            let _ = split(&bytes, &[(seed % 40) as usize % (bytes.len() + 1)]);
        }
    }
}
