//! Step 3 of the effect order, the reading: one peek (or its two halves) message by message
//! into the cursor's batches — relations, transactions, rows, logical messages, commits.

use super::*;

impl<Src: CdcSource, S: ObjectSink, St: StateStore> Poller<'_, Src, S, St> {
    /// Step 3: one peek, read half by half into the cursor's batches.
    pub(super) async fn read_peek(
        &mut self,
        target: Lsn,
        split: Option<Lsn>,
        cursor: &mut Cursor<S::Writer>,
        report: &mut PollReport,
    ) -> Result<PeekEnd> {
        let opts = self.opts;
        // The peek may use what is left before the deadline, no more.
        let timeout = match opts.deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
            None => opts.source.statement_timeout,
        };
        let started = self
            .source
            .peek(&PeekRequest {
                slot: self.task.slot.clone(),
                publication: self.publications.clone(),
                upto: target,
                max_changes: opts.max_peek_changes,
                timeout,
                deadline: opts.deadline.is_some(),
                split,
                messages: self.messages,
            })
            .await;
        let mut peek = match started {
            Ok(peek) => peek,
            // Cut at the time left before its first row: the same clean stop as below.
            Err(Error::Deadline(why)) => {
                tracing::info!(task = %opts.task, reason = %why, "the peek reached the deadline");
                report.outcome = Outcome::DeadlineReached;
                cursor.stopped_early = true;
                return Ok(PeekEnd { incomplete: false });
            }
            Err(e) => return Err(e),
        };
        tracing::debug!(task = %opts.task, split = ?split, "peek started (the server decodes before the first row)");
        let mut incomplete = false;
        loop {
            let rows = match self.read_half(&mut peek, cursor, report).await {
                Ok(rows) => rows,
                // The server cut the peek at the time left: a clean stop, the open batch
                // abandoned, committed ones kept.
                Err(Error::SlotLost(why)) => {
                    return Err(Error::SlotLost(format!(
                        "{why}; {}",
                        start_over(&opts.task)
                    )));
                }
                Err(Error::Deadline(why)) => {
                    tracing::info!(task = %opts.task, reason = %why, "the peek reached the deadline");
                    report.outcome = Outcome::DeadlineReached;
                    cursor.stopped_early = true;
                    break;
                }
                Err(e) => return Err(e),
            };
            if cursor.stopped_early || cursor.stop_reached {
                break;
            }
            if cursor.txn.is_some() {
                return Err(Error::Protocol(
                    "the peek ended inside a transaction".to_owned(),
                ));
            }
            if rows >= i64::from(opts.max_peek_changes) {
                // Cut by `upto_nchanges`: the rest comes next peek. A backlog this large
                // is read by one session from here on: a second half waiting beyond a
                // cut first half is decoded for nothing.
                incomplete = true;
                break;
            }
            match peek.next_half().await {
                Ok(Some(at)) => {
                    report.split_peeks += 1;
                    report.split_at = Some(at);
                    cursor.keep = cursor.keep.second_half();
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(task = %opts.task, error = %e, "the second peek session failed; going on with one session");
                    incomplete = true;
                    break;
                }
            }
        }
        peek.cancel().await;
        Ok(PeekEnd { incomplete })
    }

    /// Reads the current half of a peek; returns its row count.
    pub(super) async fn read_half(
        &mut self,
        peek: &mut Src::Peek,
        cursor: &mut Cursor<S::Writer>,
        report: &mut PollReport,
    ) -> Result<i64> {
        let mut rows = 0i64;
        while let Some((lsn, data)) = peek.next_row().await? {
            rows += 1;
            let msg = pgoutput::decode(&data, false)
                .map_err(|e| Error::Protocol(format!("{e} at {lsn}")))?;
            if self.on_message(msg, lsn, cursor, report).await? {
                break;
            }
        }
        Ok(rows)
    }

    /// Where the second half of a split peek starts, when this drain is worth splitting: a
    /// large enough stretch of WAL, PostgreSQL 12 or later (slot copies) and a free slot.
    pub(super) async fn split_point(&self, target: Lsn) -> Result<Option<Lsn>> {
        let from = self.checkpoint();
        let span = target.0.saturating_sub(from.0);
        if span < self.opts.split_min_wal_bytes.max(2) {
            return Ok(None);
        }
        if self.source.free_slots(&self.task.slot).await? < 1 {
            tracing::info!(task = %self.opts.task, "no free replication slot for a split peek; one session");
            return Ok(None);
        }
        // The second session does more per byte (an advance and a skipping decode of the
        // first stretch): the first takes 60% of the span.
        Ok(Some(Lsn(from.0 + span / 10 * 6)))
    }

    /// One peek row. Returns true when the run must stop here (a deadline at a commit).
    pub(super) async fn on_message(
        &mut self,
        msg: Message<'_>,
        lsn: Lsn,
        cur: &mut Cursor<S::Writer>,
        report: &mut PollReport,
    ) -> Result<bool> {
        if cur.skipping {
            // A transaction the other half of a split peek stages. Relation messages still
            // count: this session will not repeat them for the transactions that follow.
            match msg {
                Message::Commit(_) => cur.skipping = false,
                Message::Relation(r) => self.on_relation(&r, lsn).await?,
                // Its schema changes are recorded now (the Relation messages after them match
                // them, as in one session); the other half stages them with its rows.
                Message::Message(m) if m.flags & 1 == 1 => {
                    self.on_logical_message(&m, lsn, None).await?;
                }
                _ => {}
            }
            return Ok(false);
        }
        match msg {
            Message::Begin(b) => {
                if !cur.keep.keeps(b.final_lsn) {
                    cur.skipping = true;
                    return Ok(false);
                }
                // A stop by commit time: the first transaction committed after it is not
                // read; the batch so far is the drain's last. (Unless an existing manifest
                // — a run with another stop — already holds it: its batch is rewritten as it
                // was, never as a second batch starting at the same position.)
                if let Some(stop) = self.stop_time_pending()
                    && b.commit_ts > stop
                    && cur.batch.must_end.is_none()
                {
                    cur.stop_reached = true;
                    return Ok(true);
                }
                cur.batch.txn_commit_ts = b.commit_ts;
                cur.txn = Some(Txn {
                    xid: b.xid,
                    commit_ts: b.commit_ts,
                    final_lsn: b.final_lsn,
                    staged_before: (cur.batch.changes, cur.batch.schema_changes),
                });
            }
            Message::Commit(c) => return self.on_commit(&c, lsn, cur, report).await,
            Message::Relation(r) => self.on_relation(&r, lsn).await?,
            Message::Insert(i) => {
                let t = txn_of(&cur.txn, lsn)?;
                let row = Row::new(Op::Insert, i.rel_id, None, false, Some(&i.new.0));
                self.stage(&mut cur.batch, t, lsn, row).await?;
            }
            Message::Update(u) => {
                let t = txn_of(&cur.txn, lsn)?;
                self.stage_update(&mut cur.batch, t, lsn, &u).await?;
            }
            Message::Delete(d) => {
                let t = txn_of(&cur.txn, lsn)?;
                let (old, full) = decoder::delete_row(&d);
                let row = Row::new(Op::Delete, d.rel_id, Some(old), full, None);
                self.stage(&mut cur.batch, t, lsn, row).await?;
            }
            Message::Truncate(tr) => {
                let t = txn_of(&cur.txn, lsn)?;
                for rel in &tr.rel_ids {
                    let row = Row::new(Op::Truncate, *rel, None, false, None);
                    self.stage(&mut cur.batch, t, lsn, row).await?;
                }
            }
            // Non-transactional messages (other applications') come outside transactions.
            Message::Message(m) if m.flags & 1 == 1 => {
                txn_of(&cur.txn, lsn)?;
                self.on_logical_message(&m, lsn, Some(&mut cur.batch))
                    .await?;
            }
            Message::Message(_) => {}
            Message::Origin(_) | Message::Type(_) => {}
            Message::StreamStart(_)
            | Message::StreamStop
            | Message::StreamCommit(_)
            | Message::StreamAbort(_) => {
                return Err(Error::Protocol(format!(
                    "unexpected streaming message at {lsn}: pgshift peeks with protocol 1"
                )));
            }
        }
        Ok(false)
    }

    /// A commit: the batch is cut here when it is full (or must end here), and the run stops
    /// here when the soft deadline passed.
    pub(super) async fn on_commit(
        &mut self,
        c: &pgoutput::Commit,
        lsn: Lsn,
        cur: &mut Cursor<S::Writer>,
        report: &mut PollReport,
    ) -> Result<bool> {
        let Some(txn) = cur.txn.take() else {
            return Err(Error::Protocol(format!("commit at {lsn} without a begin")));
        };
        let opts = self.opts;
        let batch = &mut cur.batch;
        if txn.staged_before == (batch.changes, batch.schema_changes)
            && batch.must_end != Some(c.end_lsn)
        {
            return Ok(false);
        }
        batch.transactions += 1;
        batch.first_commit.get_or_insert(c.commit_lsn);
        batch.last_commit = c.commit_lsn;
        batch.last_end = c.end_lsn;
        batch.last_commit_ts = c.commit_ts;
        let cut = match batch.must_end {
            Some(end) if c.end_lsn == end => true,
            Some(end) if c.end_lsn > end => {
                return Err(Error::Staged(format!(
                    "manifest {} ends at {end}, which is not a commit boundary of slot {}",
                    manifest_key(batch.start, end),
                    self.task.slot
                )));
            }
            Some(_) => false,
            None => batch.changes >= opts.max_batch_changes || batch.bytes >= opts.max_batch_bytes,
        };
        let stop = self.soft_deadline_passed();
        if cut || stop {
            let done = std::mem::replace(&mut cur.batch, Batch::empty(self.checkpoint()));
            // Boxed: committing writes every file (S3 uploads), a deep future; inline it would
            // sit in every message's future.
            if let Some(ts) = Box::pin(self.commit_batch(done, report)).await? {
                cur.last_commit_ts = Some(ts);
            }
            if stop {
                report.outcome = Outcome::DeadlineReached;
                cur.stopped_early = true;
                return Ok(true);
            }
            cur.batch = self.new_batch().await?;
        }
        Ok(false)
    }
}
