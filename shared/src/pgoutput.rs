//! A pure decoder of PostgreSQL's pgoutput logical replication messages.
//!
//! One type per message, field names from the PostgreSQL documentation ("Logical Replication
//! Message Formats"). Protocol 1 messages (Begin, Commit, Origin, Relation, Type, Insert, Update,
//! Delete, Truncate, Message) and the protocol 2 streaming messages (Stream Start/Stop/Commit/
//! Abort, and the transaction id that prefixes data messages inside a stream) are parsed.
//! Every read is checked: malformed or truncated bytes are a [`DecodeError`] naming the message
//! and field, never a panic. Text values are borrowed from the input (no copy).

use std::fmt;

use crate::lsn::Lsn;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput {message} message: {problem}")]
pub struct DecodeError {
    pub message: &'static str,
    pub problem: String,
}

type Result<T> = std::result::Result<T, DecodeError>;

/// One decoded message. Borrowed from the input buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Message<'a> {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin<'a>),
    Relation(Relation<'a>),
    Type(Type<'a>),
    Insert(Insert<'a>),
    Update(Update<'a>),
    Delete(Delete<'a>),
    Truncate(Truncate),
    Message(LogicalMessage<'a>),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// The final LSN of the transaction (its commit record).
    pub final_lsn: Lsn,
    /// Commit timestamp, microseconds since 2000-01-01 UTC.
    pub commit_ts: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End LSN of the transaction: where the next one may start.
    pub end_lsn: Lsn,
    pub commit_ts: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin<'a> {
    pub commit_lsn: Lsn,
    pub name: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column<'a> {
    /// Bit 1: part of the replica identity key.
    pub flags: u8,
    pub name: &'a str,
    pub type_oid: u32,
    pub type_modifier: i32,
}

impl Column<'_> {
    pub fn is_key(&self) -> bool {
        self.flags & 1 == 1
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation<'a> {
    /// Transaction id, inside a stream only.
    pub xid: Option<u32>,
    pub rel_id: u32,
    pub namespace: &'a str,
    pub name: &'a str,
    /// `relreplident`: d, n, f or i.
    pub replica_identity: u8,
    pub columns: Vec<Column<'a>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type<'a> {
    pub xid: Option<u32>,
    pub type_oid: u32,
    pub namespace: &'a str,
    pub name: &'a str,
}

/// One column value of a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    /// An unchanged TOASTed value: not sent, the old value stays.
    UnchangedToast,
    /// Text output of the type.
    Text(&'a [u8]),
    /// Binary send output (only when the `binary` option is on).
    Binary(&'a [u8]),
}

/// A tuple: one value per column of the relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple<'a>(pub Vec<Value<'a>>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert<'a> {
    pub xid: Option<u32>,
    pub rel_id: u32,
    pub new: Tuple<'a>,
}

/// The old row of an update or delete: the key columns ('K') or the whole row under
/// REPLICA IDENTITY FULL ('O').
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple<'a> {
    Key(Tuple<'a>),
    Full(Tuple<'a>),
}

impl<'a> OldTuple<'a> {
    pub fn tuple(&self) -> &Tuple<'a> {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update<'a> {
    pub xid: Option<u32>,
    pub rel_id: u32,
    pub old: Option<OldTuple<'a>>,
    pub new: Tuple<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete<'a> {
    pub xid: Option<u32>,
    pub rel_id: u32,
    pub old: OldTuple<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub xid: Option<u32>,
    /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
    pub options: u8,
    pub rel_ids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage<'a> {
    pub xid: Option<u32>,
    /// Bit 1: transactional.
    pub flags: u8,
    pub lsn: Lsn,
    pub prefix: &'a str,
    pub content: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: u32,
    pub first_segment: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_ts: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: u32,
    pub subxid: u32,
}

/// A checked reader over one message.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, problem: impl Into<String>) -> DecodeError {
        DecodeError {
            message: self.message,
            problem: problem.into(),
        }
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or_else(|| {
                self.err(format!(
                    "{field}: needs {n} bytes at offset {}, message has {}",
                    self.pos,
                    self.buf.len()
                ))
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.take(1, field)?[0])
    }

    fn i16(&mut self, field: &str) -> Result<i16> {
        let b = self.take(2, field)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &str) -> Result<u32> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self, field: &str) -> Result<i32> {
        Ok(self.u32(field)? as i32)
    }

    fn u64(&mut self, field: &str) -> Result<u64> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn i64(&mut self, field: &str) -> Result<i64> {
        Ok(self.u64(field)? as i64)
    }

    fn lsn(&mut self, field: &str) -> Result<Lsn> {
        self.u64(field).map(Lsn)
    }

    /// A NUL-terminated UTF-8 string.
    fn cstr(&mut self, field: &str) -> Result<&'a str> {
        let rest = &self.buf[self.pos.min(self.buf.len())..];
        let nul = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| self.err(format!("{field}: string without terminating NUL")))?;
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| self.err(format!("{field}: not valid UTF-8")))?;
        self.pos += nul + 1;
        Ok(s)
    }

    fn done(&self) -> Result<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.err(format!(
                "{} trailing bytes after the message",
                self.buf.len() - self.pos
            )))
        }
    }

    fn tuple(&mut self) -> Result<Tuple<'a>> {
        let n = self.i16("number of columns")?;
        if n < 0 {
            return Err(self.err(format!("negative column count {n}")));
        }
        // Each column takes at least one byte: reject impossible counts before allocating.
        if n as usize > self.buf.len() - self.pos {
            return Err(self.err(format!("column count {n} exceeds the message")));
        }
        let mut values = Vec::with_capacity(n as usize);
        for i in 0..n {
            let kind = self.u8("column kind")?;
            values.push(match kind {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' | b'b' => {
                    let len = self.i32("column length")?;
                    if len < 0 {
                        return Err(self.err(format!("column {i}: negative length {len}")));
                    }
                    let data = self.take(len as usize, "column value")?;
                    if kind == b't' {
                        Value::Text(data)
                    } else {
                        Value::Binary(data)
                    }
                }
                other => {
                    return Err(self.err(format!("column {i}: unknown kind byte 0x{other:02x}")));
                }
            });
        }
        Ok(Tuple(values))
    }

    fn old_tuple(&mut self, tag: u8) -> Result<OldTuple<'a>> {
        match tag {
            b'K' => Ok(OldTuple::Key(self.tuple()?)),
            b'O' => Ok(OldTuple::Full(self.tuple()?)),
            other => Err(self.err(format!("expected K or O, got 0x{other:02x}"))),
        }
    }
}

fn name_of(tag: u8) -> &'static str {
    match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        _ => "unknown",
    }
}

/// Decodes one message. `in_stream` says whether it arrived between Stream Start and Stream
/// Stop (protocol 2), where data messages carry the transaction id first.
pub fn decode(buf: &[u8], in_stream: bool) -> Result<Message<'_>> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError {
            message: "empty",
            problem: "no bytes".to_owned(),
        });
    };
    let mut r = Reader {
        buf,
        pos: 1,
        message: name_of(tag),
    };
    let stream_xid = |r: &mut Reader<'_>| -> Result<Option<u32>> {
        if in_stream {
            r.u32("transaction id").map(Some)
        } else {
            Ok(None)
        }
    };
    let msg = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.lsn("final LSN")?,
            commit_ts: r.i64("commit timestamp")?,
            xid: r.u32("transaction id")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_ts: r.i64("commit timestamp")?,
        }),
        b'O' => Message::Origin(Origin {
            commit_lsn: r.lsn("commit LSN")?,
            name: r.cstr("origin name")?,
        }),
        b'R' => {
            let xid = stream_xid(&mut r)?;
            let rel_id = r.u32("relation id")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("number of columns")?;
            if n < 0 || n as usize > buf.len() {
                return Err(r.err(format!("impossible column count {n}")));
            }
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                columns.push(Column {
                    flags: r.u8("column flags")?,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("column type modifier")?,
                });
            }
            Message::Relation(Relation {
                xid,
                rel_id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type(Type {
            xid: stream_xid(&mut r)?,
            type_oid: r.u32("type id")?,
            namespace: r.cstr("namespace")?,
            name: r.cstr("type name")?,
        }),
        b'I' => {
            let xid = stream_xid(&mut r)?;
            let rel_id = r.u32("relation id")?;
            let t = r.u8("tuple tag")?;
            if t != b'N' {
                return Err(r.err(format!("expected N, got 0x{t:02x}")));
            }
            Message::Insert(Insert {
                xid,
                rel_id,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let xid = stream_xid(&mut r)?;
            let rel_id = r.u32("relation id")?;
            let mut t = r.u8("tuple tag")?;
            let old = if t == b'K' || t == b'O' {
                let old = r.old_tuple(t)?;
                t = r.u8("tuple tag")?;
                Some(old)
            } else {
                None
            };
            if t != b'N' {
                return Err(r.err(format!("expected N, got 0x{t:02x}")));
            }
            Message::Update(Update {
                xid,
                rel_id,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let xid = stream_xid(&mut r)?;
            let rel_id = r.u32("relation id")?;
            let t = r.u8("tuple tag")?;
            Message::Delete(Delete {
                xid,
                rel_id,
                old: r.old_tuple(t)?,
            })
        }
        b'T' => {
            let xid = stream_xid(&mut r)?;
            let n = r.u32("number of relations")?;
            let options = r.u8("options")?;
            if (n as usize).saturating_mul(4) > buf.len() {
                return Err(r.err(format!("relation count {n} exceeds the message")));
            }
            let mut rel_ids = Vec::with_capacity(n as usize);
            for _ in 0..n {
                rel_ids.push(r.u32("relation id")?);
            }
            Message::Truncate(Truncate {
                xid,
                options,
                rel_ids,
            })
        }
        b'M' => {
            let xid = stream_xid(&mut r)?;
            let flags = r.u8("flags")?;
            let lsn = r.lsn("message LSN")?;
            let prefix = r.cstr("prefix")?;
            let len = r.u32("content length")?;
            let content = r.take(len as usize, "content")?;
            Message::Message(LogicalMessage {
                xid,
                flags,
                lsn,
                prefix,
                content,
            })
        }
        b'S' => Message::StreamStart(StreamStart {
            xid: r.u32("transaction id")?,
            first_segment: r.u8("first segment")? == 1,
        }),
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit(StreamCommit {
            xid: r.u32("transaction id")?,
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_ts: r.i64("commit timestamp")?,
        }),
        b'A' => Message::StreamAbort(StreamAbort {
            xid: r.u32("transaction id")?,
            subxid: r.u32("subtransaction id")?,
        }),
        other => {
            return Err(DecodeError {
                message: "unknown",
                problem: format!("unknown message type byte 0x{other:02x}"),
            });
        }
    };
    r.done()?;
    Ok(msg)
}

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::UnchangedToast => f.write_str("unchanged-toast"),
            Value::Text(t) => write!(f, "{:?}", String::from_utf8_lossy(t)),
            Value::Binary(b) => write!(f, "<{} bytes>", b.len()),
        }
    }
}

#[cfg(test)]
mod tests;
