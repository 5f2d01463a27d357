//! Set-based apply of a run of changes (what DMS calls batch-optimized apply).
//!
//! A run is a stretch of one file (one table, one schema version) with no truncate and no
//! change that needs its neighbours in order. Its rows are copied, in commit order with a
//! sequence number, into a temporary table with `COPY`, then reduced to the net effect per
//! key and applied with three statements:
//!
//! 1. keys whose last change is a delete are deleted;
//! 2. every other key's row is folded from its changes after its last delete: an insert sets
//!    every column, an update the columns it carries (an unchanged TOAST value is not
//!    carried: the latest change that carried the column wins, else the target keeps its
//!    value) and updated in place (`UPDATE .. FROM`);
//! 3. the folded rows whose key is not in the target are inserted.
//!
//! The end state is the one applying every change in commit order gives: within a run a key's
//! changes touch only that key's row (a key change is staged as D(old) + I(new), two keys).
//! A keyless table's run holds inserts only and is copied straight into the table in commit
//! order; its updates and deletes end the run and are applied row by row.
//!
//! While every change of a run carries its whole row, only a key's last change matters: the
//! run folds them as they come (a key's newer change replaces its older one, in place of
//! being copied), so a hot row updated 40,000 times in a batch is copied once. What is held is
//! bounded like the copy buffer: when the live rows reach [`COPY_CHUNK`] they are copied (and
//! the next rows of the same keys later reduced in the temporary table as before); a change
//! without its whole row (an unchanged TOAST value) ends the folding for the run. Rows keep
//! their relative order (a replaced row's successor goes to the end), so two spellings of one
//! key value (`1.0`, `1.00`) are still reduced in commit order.
//!
//! Memory: the copy buffer and the folded rows ([`COPY_CHUNK`] each), whatever the run's size.

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::Transaction;

use super::changes::{Change, Name, has_key};
use crate::error::{Error, Result};
use crate::source::quote_ident;
use crate::staging::encode::csv_field;
use crate::table::TableSchema;

/// Bytes buffered before they are copied into the run's temporary table.
pub(super) const COPY_CHUNK: usize = 256 << 10;

/// Runs of a process get their own temporary tables: a batch's runs of different tables are
/// in flight at once (the next file is read while the last run's statements execute).
static RUN_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One run being collected.
pub(super) struct Run {
    schema: TableSchema,
    name: String,
    keyed: bool,
    buf: Vec<u8>,
    rows: u64,
    created: bool,
    /// The run's `COPY`, open while changes are decoded: the target takes in each piece while
    /// the next is being read.
    copying: Option<std::pin::Pin<Box<tokio_postgres::CopyInSink<Bytes>>>>,
    /// Some update left a column out (an unchanged TOAST value): the fold is per column.
    partial: bool,
    /// Some change deleted.
    deletes: bool,
    /// The next sequence number a copied row gets.
    seq: u64,
    /// Whole-row changes folded by key, in order (a replaced one leaves a hole), with the
    /// bytes they hold; off for the rest of the run once a change lacks a column.
    folded: Vec<Option<Vec<u8>>>,
    latest: std::collections::HashMap<Vec<u8>, usize>,
    folded_bytes: usize,
    folding: bool,
    /// The capacity a new row starts with.
    line_hint: usize,
    /// Its temporary tables: the copied changes, and the folded rows.
    run_table: String,
    net_table: String,
}

impl Run {
    pub(super) fn new(schema: &TableSchema, name: &str) -> Run {
        let id = RUN_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Run {
            schema: schema.clone(),
            name: name.to_owned(),
            keyed: has_key(schema),
            buf: Vec::new(),
            rows: 0,
            created: false,
            copying: None,
            partial: false,
            deletes: false,
            seq: 0,
            folded: Vec::new(),
            latest: std::collections::HashMap::new(),
            folded_bytes: 0,
            folding: true,
            line_hint: 64,
            run_table: format!("pgshift_run_{id}"),
            net_table: format!("pgshift_net_{id}"),
        }
    }

    /// Whether a change of this table can join a run: inserts, updates and deletes by key of a
    /// keyed table whose key it does not move; inserts of a keyless one.
    pub(super) fn takes(schema: &TableSchema, change: &Change) -> bool {
        if !has_key(schema) {
            return change.op == "I";
        }
        match change.op.as_ref() {
            "I" => true,
            "D" => !change.key.is_empty(),
            // An update that moves its key (possible for a replica identity that is not the
            // primary key), or whose new key is not in the row, goes row by row.
            "U" => schema.columns.iter().filter(|c| c.key).all(|c| {
                let new = change.after.iter().find(|(n, _)| **n == *c.name);
                let old = change.key.iter().find(|(n, _)| **n == *c.name);
                matches!((new, old), (Some((_, a)), Some((_, b))) if a == b)
            }),
            _ => false,
        }
    }

    /// Adds a change (one [`Run::takes`]) to the run.
    pub(super) fn push(&mut self, change: &Change) {
        if !self.keyed {
            // Inserts only: copied straight into the table, in commit order.
            self.rows += 1;
            for (j, c) in self.schema.columns.iter().enumerate() {
                if j > 0 {
                    self.buf.push(b',');
                }
                csv_field(
                    &mut self.buf,
                    find(&change.after, &c.name).flatten().map(str::as_bytes),
                );
            }
            self.buf.push(b'\n');
            return;
        }
        self.rows += 1;
        // Sized as the last row was (no growing a row byte by byte).
        let mut line = Vec::with_capacity(self.line_hint);
        csv_field(&mut line, Some(change.op.as_bytes()));
        let mut unchanged = String::new();
        let mut values: Vec<Option<&str>> = Vec::with_capacity(self.schema.columns.len());
        for (j, c) in self.schema.columns.iter().enumerate() {
            let v = match change.op.as_ref() {
                "D" => {
                    if c.key {
                        find(&change.key, &c.name).flatten()
                    } else {
                        None
                    }
                }
                _ => match find(&change.after, &c.name) {
                    Some(v) => v,
                    None if change.op == "U" => {
                        unchanged.push_str(&format!(",{j}"));
                        None
                    }
                    None => None,
                },
            };
            values.push(v);
        }
        if !unchanged.is_empty() {
            unchanged.push(',');
            self.partial = true;
            // Its row needs the older changes of its key: fold no more in this run.
            self.unfold();
            self.folding = false;
        }
        if change.op == "D" {
            self.deletes = true;
        }
        line.push(b',');
        csv_field(
            &mut line,
            (!unchanged.is_empty()).then_some(unchanged.as_bytes()),
        );
        let mut key = Vec::new();
        for (j, v) in values.into_iter().enumerate() {
            line.push(b',');
            csv_field(&mut line, v.map(str::as_bytes));
            if self.folding && self.schema.columns[j].key {
                // The key's values, each marked null or not, in one byte string.
                match v {
                    Some(v) => {
                        key.push(1);
                        key.extend_from_slice(v.as_bytes());
                        key.push(0);
                    }
                    None => key.push(2),
                }
            }
        }
        line.push(b'\n');
        self.line_hint = line.len().next_power_of_two();
        if !self.folding {
            self.write_row(&line);
            return;
        }
        if let Some(older) = self.latest.get(&key).copied()
            && let Some(old) = self.folded[older].take()
        {
            self.folded_bytes -= old.len();
        }
        self.latest.insert(key, self.folded.len());
        self.folded_bytes += line.len();
        self.folded.push(Some(line));
    }

    /// A row for the temporary table, after its sequence number.
    fn write_row(&mut self, line: &[u8]) {
        use std::io::Write as _;
        // A number needs no quoting; written in place (no string per row).
        let _ = write!(self.buf, "{},", self.seq);
        self.seq += 1;
        self.buf.extend_from_slice(line);
    }

    /// Moves the folded rows, in order, into the copy buffer.
    fn unfold(&mut self) {
        let folded = std::mem::take(&mut self.folded);
        for line in folded.into_iter().flatten() {
            self.write_row(&line);
        }
        self.latest.clear();
        self.folded_bytes = 0;
    }

    /// Whether the buffer should be copied now.
    pub(super) fn full(&self) -> bool {
        self.buf.len() >= COPY_CHUNK || self.folded_bytes >= COPY_CHUNK
    }

    /// Sends what is buffered into the run's `COPY` (opened, after its temporary table, on
    /// the first call).
    pub(super) async fn copy(&mut self, tx: &Transaction<'_>) -> Result<()> {
        self.unfold();
        if self.buf.is_empty() {
            return Ok(());
        }
        let into = if self.keyed {
            format!("pg_temp.{}", self.run_table)
        } else {
            let cols: Vec<String> = self
                .schema
                .columns
                .iter()
                .map(|c| quote_ident(&c.name))
                .collect();
            format!("{} ({})", self.name, cols.join(", "))
        };
        if self.keyed && !self.created {
            let cols: Vec<String> = (0..self.schema.columns.len())
                .map(|j| format!("c{j} text"))
                .collect();
            tx.batch_execute(&format!(
                "create temp table {} (seq bigint, op text, u text, {}) on commit drop",
                self.run_table,
                cols.join(", ")
            ))
            .await
            .map_err(|e| Error::postgres(format!("staging changes of {}", self.name), e))?;
            self.created = true;
        }
        if self.copying.is_none() {
            let sink = tx
                .copy_in::<_, Bytes>(&format!("copy {into} from stdin with (format csv)"))
                .await
                .map_err(|e| Error::postgres(format!("copying changes of {}", self.name), e))?;
            self.copying = Some(Box::pin(sink));
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        if let Some(sink) = self.copying.as_mut() {
            sink.send(chunk)
                .await
                .map_err(|e| Error::postgres(format!("copying changes of {}", self.name), e))?;
        }
        Ok(())
    }

    /// Sends what is buffered and ends the run's `COPY`: the run is in its temporary table (or,
    /// for a keyless table, in the table).
    pub(super) async fn finish_copy(&mut self, tx: &Transaction<'_>) -> Result<()> {
        self.copy(tx).await?;
        if let Some(mut sink) = self.copying.take() {
            sink.as_mut()
                .finish()
                .await
                .map_err(|e| Error::postgres(format!("copying changes of {}", self.name), e))?;
        }
        Ok(())
    }

    /// Applies the run: copies what is left, then the set-based statements.
    pub(super) async fn apply(mut self, tx: &Transaction<'_>) -> Result<()> {
        self.finish_copy(tx).await?;
        if self.rows == 0 || !self.keyed {
            return Ok(());
        }
        let sql = self.statements();
        tx.batch_execute(&sql).await.map_err(|e| {
            Error::postgres(format!("applying a batch of changes to {}", self.name), e)
        })
    }

    /// `c<j>::<type>`: column `j` of a staged row as its type.
    fn typed(&self, alias: &str, j: usize) -> String {
        format!("{alias}.c{j}::{}", self.schema.columns[j].type_name)
    }

    /// The statements that apply the copied run.
    fn statements(&self) -> String {
        let cols = &self.schema.columns;
        let all: Vec<String> = cols.iter().map(|c| quote_ident(&c.name)).collect();
        let run = format!("pg_temp.{}", self.run_table);
        let net = format!("pg_temp.{}", self.net_table);
        let mut sql = String::new();
        // Statistics for the joins of deletes and partial rows (an upsert joins nothing).
        if self.seq > 1000 && (self.partial || self.deletes) {
            sql.push_str(&format!("analyze {run}; "));
        }
        let keys: Vec<usize> = (0..cols.len()).filter(|j| cols[*j].key).collect();
        let rest: Vec<usize> = (0..cols.len()).filter(|j| !cols[*j].key).collect();
        let key_typed =
            |alias: &str| -> Vec<String> { keys.iter().map(|j| self.typed(alias, *j)).collect() };
        let key_match = |t: &str, other: &dyn Fn(usize) -> String| -> String {
            keys.iter()
                .map(|j| format!("{t}.{} = {}", quote_ident(&cols[*j].name), other(*j)))
                .collect::<Vec<_>>()
                .join(" and ")
        };
        let last = format!(
            "(select distinct on ({k}) * from {run} r order by {k}, r.seq desc)",
            k = key_typed("r").join(", ")
        );
        if self.deletes {
            sql.push_str(&format!(
                "delete from {} t using {last} l where l.op = 'D' and {}; ",
                self.name,
                key_match("t", &|j| self.typed("l", j))
            ));
        }
        if !self.partial {
            // Every change carries its whole row: the last one per key is the row.
            let values: Vec<String> = (0..cols.len()).map(|j| self.typed("l", j)).collect();
            // The key columns too: a key value equal to the target's but spelt otherwise
            // (`5.000` for `5`, another case under a case-insensitive collation) is the
            // source's spelling after a delete and re-insert.
            let set: Vec<String> = cols
                .iter()
                .filter(|c| !c.key || c.spellings_differ())
                .map(|c| format!("{0} = excluded.{0}", quote_ident(&c.name)))
                .collect();
            let conflict = if set.is_empty() {
                "do nothing".to_owned()
            } else {
                format!("do update set {}", set.join(", "))
            };
            let key_names: Vec<String> = keys.iter().map(|j| quote_ident(&cols[*j].name)).collect();
            sql.push_str(&format!(
                "insert into {} ({}) overriding system value select {} from {last} l where l.op <> 'D' on conflict ({}) {conflict}",
                self.name,
                all.join(", "),
                values.join(", "),
                key_names.join(", ")
            ));
            return sql;
        }
        // Per column: the latest change after the key's last delete that carried it.
        let carried = |j: usize| format!("(x.op = 'I' or x.u is null or strpos(x.u, ',{j},') = 0)");
        let mut net_cols: Vec<String> = keys
            .iter()
            .map(|j| format!("{} as k{j}", self.typed("x", *j)))
            .collect();
        for j in &rest {
            net_cols.push(format!(
                "(array_agg(x.c{j} order by x.seq desc) filter (where {c}))[1] as v{j}, bool_or({c}) as s{j}",
                c = carried(*j)
            ));
        }
        let kx = key_typed("x").join(", ");
        sql.push_str(&format!(
            "create temp table {} on commit drop as \
             select {} from (select r.*, max(case when r.op = 'D' then r.seq end) over (partition by {}) d from {run} r) x \
             where x.op <> 'D' and x.seq > coalesce(x.d, -1) group by {kx}; ",
            self.net_table,
            net_cols.join(", "),
            key_typed("r").join(", ")
        ));
        let n_key = |j: usize| format!("n.k{j}");
        if !rest.is_empty() || keys.iter().any(|j| cols[*j].spellings_differ()) {
            let mut set: Vec<String> = keys
                .iter()
                .filter(|j| cols[**j].spellings_differ())
                .map(|j| format!("{} = n.k{j}", quote_ident(&cols[*j].name)))
                .collect();
            set.extend(rest.iter().map(|j| {
                let c = quote_ident(&cols[*j].name);
                format!(
                    "{c} = case when n.s{j} then n.v{j}::{} else t.{c} end",
                    cols[*j].type_name
                )
            }));
            sql.push_str(&format!(
                "update {} t set {} from {net} n where {}; ",
                self.name,
                set.join(", "),
                key_match("t", &n_key)
            ));
        }
        let values: Vec<String> = (0..cols.len())
            .map(|j| {
                if cols[j].key {
                    format!("n.k{j}")
                } else {
                    format!("case when n.s{j} then n.v{j}::{} end", cols[j].type_name)
                }
            })
            .collect();
        sql.push_str(&format!(
            "insert into {0} ({1}) overriding system value select {2} from {net} n where not exists (select 1 from {0} t where {3})",
            self.name,
            all.join(", "),
            values.join(", "),
            key_match("t", &n_key)
        ));
        sql
    }
}

/// The value of column `name` in a staged row, `None` when the row does not carry it.
fn find<'a>(row: &'a [(Name, Option<String>)], name: &str) -> Option<Option<&'a str>> {
    row.iter()
        .find(|(n, _)| **n == *name)
        .map(|(_, v)| v.as_deref())
}
