//! The task's publications: exactly the selected tables, so that **pgshift never makes a source
//! statement fail** (DESIGN §3).
//!
//! PostgreSQL refuses an UPDATE or DELETE on a table without a replica identity once a
//! publication publishes updates or deletes of it (`FOR ALL TABLES` does so for every table of
//! the database). So a task has two publications:
//! - `<name>`: the selected tables whose changes carry a key (a primary key, or REPLICA
//!   IDENTITY FULL or USING INDEX), every operation;
//! - `<name>$ins` ([`insert_only`]): the selected tables without one, published for insert and
//!   truncate only: their updates and deletes are not captured (test-endpoint names them and
//!   the fix, `ALTER TABLE .. REPLICA IDENTITY FULL`), and the source never fails on them.
//!
//! [`sync`] brings both to the selection: tables added and dropped (one moves between them when
//! it gains or loses a key), in one transaction under an advisory lock (two first runs at once
//! serialize instead of failing on the catalog's unique index); tables the role does not own
//! are skipped with a warning rather than failing the run.
//!
//! **When the insert-only publication can be read.** A peek naming a publication that did not
//! exist at a decoded change's WAL position fails (PostgreSQL 12–17). A new task creates both
//! publications before its slot. An older task (one publication, perhaps `FOR ALL TABLES`) is
//! brought in line in two steps: (1) `<name>$ins` is created with the keyless tables (they stay
//! in the main one too, so nothing is lost); (2) once every transaction that was running at
//! that creation has ended, `S` = the WAL insert position is taken, and in one transaction the
//! keyless tables leave the main publication (a `FOR ALL TABLES` one is replaced) and the
//! insert-only publication's comment records `pgshift since S`. Peeks read the main publication
//! alone up to `S` and both from `S` on ([`Publications::since`]); until step 2 the main one
//! alone, as before. The source holds this record, so no task state can disagree with it.

use tokio_postgres::Client;

use super::catalog::TableInfo;
use super::quote_ident;
use crate::error::{Error, Result};
use crate::lsn::{Lsn, LsnParseError};

/// The suffix of the insert-only publication (`$` cannot come from a task name).
pub const INSERT_ONLY_SUFFIX: &str = "$ins";

/// The insert-only publication of the task whose publication is `name`.
pub fn insert_only(name: &str) -> String {
    format!("{name}{INSERT_ONLY_SUFFIX}")
}

/// The `publication_names` a peek reads: both of the task's publications, or (for WAL written
/// before the insert-only one existed) the main one only.
pub fn peek_names(name: &str, with_insert_only: bool) -> String {
    if with_insert_only {
        format!("{name},{}", insert_only(name))
    } else {
        name.to_owned()
    }
}

/// What [`sync`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publications {
    /// From where peeks also read the insert-only publication (`None`: not yet; read the main
    /// one alone).
    pub since: Option<Lsn>,
    /// Tables published for insert and truncate only (`schema.table`).
    pub insert_only: Vec<String>,
    /// Tables added to either publication (`schema.table`).
    pub added: Vec<String>,
    /// Tables dropped from either publication.
    pub dropped: Vec<String>,
    /// Selected tables the role may not publish (it does not own them).
    pub skipped: Vec<String>,
    /// New matching tables join in their creating transaction (the follow trigger exists).
    pub follows: bool,
}

/// Whether a publication exists.
pub async fn exists(client: &Client, name: &str) -> Result<bool> {
    let row = client
        .query_one(
            "select exists (select 1 from pg_publication where pubname = $1)",
            &[&name],
        )
        .await
        .map_err(|e| Error::postgres(format!("looking up publication {name}"), e))?;
    Ok(row.get(0))
}

/// The tables a publication publishes (`schema`, `table`), as PostgreSQL lists them.
pub async fn tables(client: &Client, name: &str) -> Result<Vec<(String, String)>> {
    let rows = client
        .query(
            "select schemaname::text, tablename::text from pg_publication_tables where pubname = $1",
            &[&name],
        )
        .await
        .map_err(|e| Error::postgres(format!("listing the tables of publication {name}"), e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The tables a publication should hold: partitioned roots (PostgreSQL 13+, published through
/// the root) or, before 13, their partitions; plain tables as they are.
fn published(tables: &[TableInfo], version_num: i32) -> Vec<&TableInfo> {
    tables
        .iter()
        .filter(|t| {
            if version_num >= 130_000 {
                !t.is_partition
            } else {
                t.kind == 'r'
            }
        })
        .collect()
}

const MEMBERS: &str = "select p.pubname::text, n.nspname::text, c.relname::text \
 from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid \
 join pg_class c on c.oid = pr.prrelid join pg_namespace n on n.oid = c.relnamespace \
 where p.pubname = any($1)";

/// The insert-only publication's progress, from its comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InsertOnly {
    Missing,
    /// Step 1 done by transaction `xid`.
    Created {
        xid: i64,
    },
    /// Step 2 done: read from here on.
    Since(Lsn),
}

fn parse_comment(comment: Option<&str>) -> InsertOnly {
    let c = comment.unwrap_or("");
    if let Some(lsn) = c
        .strip_prefix("pgshift since ")
        .and_then(|l| l.parse().ok())
    {
        InsertOnly::Since(lsn)
    } else if let Some(xid) = c
        .strip_prefix("pgshift created by ")
        .and_then(|x| x.parse().ok())
    {
        InsertOnly::Created { xid }
    } else {
        // Created without a record (by hand, or a crash inside step 1's transaction cannot
        // happen): treated as just created, by a transaction that has ended.
        InsertOnly::Created { xid: 0 }
    }
}

/// Brings the task's publications to exactly `tables` (see the module docs).
pub async fn sync(
    client: &Client,
    name: &str,
    tables: &[TableInfo],
    version_num: i32,
) -> Result<Publications> {
    let ins = insert_only(name);
    let rows = client
        .query(
            "select pubname::text, puballtables, obj_description(oid, 'pg_publication') from pg_publication where pubname = any($1)",
            &[&vec![name.to_owned(), ins.clone()]],
        )
        .await
        .map_err(|e| Error::postgres("reading publications", e))?;
    let main = rows.iter().find(|r| r.get::<_, String>(0) == name);
    let main_all = main.is_some_and(|r| r.get::<_, bool>(1));
    let progress = match rows.iter().find(|r| r.get::<_, String>(0) == ins) {
        None => InsertOnly::Missing,
        Some(r) => parse_comment(r.get::<_, Option<String>>(2).as_deref()),
    };
    let mut plan = Plan::new(name, tables, version_num);
    plan.main_all = main_all;
    match (main.is_some(), progress) {
        // A new task: both at once, read from the start.
        (false, _) => {
            plan.apply(client, true, Some(Lsn::ZERO), true).await?;
        }
        // An earlier version's task: step 1, then step 2 when it can be done now.
        (true, InsertOnly::Missing) => {
            // Step 1 creates the insert-only publication (so it has the creating xid).
            let xid = plan.apply(client, false, None, false).await?.unwrap_or(0);
            plan.finish_step_two(client, xid).await?;
        }
        (true, InsertOnly::Created { xid }) => plan.finish_step_two(client, xid).await?,
        (true, InsertOnly::Since(since)) => {
            plan.out.since = Some(since);
            plan.apply(client, true, None, false).await?;
        }
    }
    Ok(plan.out)
}

/// One sync's wanted membership and what it did.
struct Plan<'a> {
    name: &'a str,
    ins: String,
    version_num: i32,
    keyed: Vec<&'a TableInfo>,
    keyless: Vec<&'a TableInfo>,
    /// The main publication is an earlier version's `FOR ALL TABLES` (no table list).
    main_all: bool,
    out: Publications,
}

impl<'a> Plan<'a> {
    fn new(name: &'a str, tables: &'a [TableInfo], version_num: i32) -> Plan<'a> {
        let mut out = Publications::default();
        let mut keyed = Vec::new();
        let mut keyless = Vec::new();
        for t in published(tables, version_num) {
            if !t.is_owner {
                tracing::warn!(table = %t.display_name(), "not published: the role does not own it (ALTER PUBLICATION needs ownership)");
                out.skipped.push(t.display_name());
            } else if t.has_replica_identity() {
                keyed.push(t);
            } else {
                out.insert_only.push(t.display_name());
                keyless.push(t);
            }
        }
        Plan {
            name,
            ins: insert_only(name),
            version_num,
            keyed,
            keyless,
            main_all: false,
            out,
        }
    }

    /// Step 2 (see the module docs) when every transaction running at step 1 has ended.
    async fn finish_step_two(&mut self, client: &Client, xid: i64) -> Result<()> {
        let ended: bool = client
            .query_one(
                "select txid_snapshot_xmin(txid_current_snapshot()) > $1",
                &[&xid],
            )
            .await
            .map_err(|e| Error::postgres("reading the oldest running transaction", e))?
            .get(0);
        if !ended {
            tracing::warn!(publication = %self.ins, "a transaction older than the insert-only publication is still running; its tables stay in the main publication until it ends");
            return Ok(());
        }
        let since = wal_insert_position(client).await?;
        self.out.since = Some(since);
        if self.main_all {
            self.replace_all_tables(client, since).await
        } else {
            self.apply(client, true, Some(since), false)
                .await
                .map(|_| ())
        }
    }

    /// Replaces a `FOR ALL TABLES` main publication with the keyed tables, and records step 2.
    async fn replace_all_tables(&mut self, client: &Client, since: Lsn) -> Result<()> {
        begin(client, self.name).await?;
        let keyed = self.keyed.clone();
        let done = async {
            exec(
                client,
                &format!("drop publication {}", quote_ident(self.name)),
            )
            .await?;
            self.create(
                client,
                self.name,
                "insert, update, delete, truncate",
                &keyed,
            )
            .await?;
            comment(client, &self.ins, &format!("pgshift since {since}")).await
        }
        .await;
        finish(client, done).await
    }

    /// One transaction: both publications created if missing and brought to their tables
    /// (`exact`: keyless tables leave the main one; else they stay there too), the insert-only
    /// one's comment set to `since` (or, when it is created here without one, the creating
    /// transaction's id). Returns that transaction's id.
    async fn apply(
        &mut self,
        client: &Client,
        exact: bool,
        since: Option<Lsn>,
        new_task: bool,
    ) -> Result<Option<i64>> {
        begin(client, self.name).await?;
        let done = self.apply_inner(client, exact, since, new_task).await;
        finish(client, done).await
    }

    async fn apply_inner(
        &mut self,
        tx: &Client,
        exact: bool,
        since: Option<Lsn>,
        new_task: bool,
    ) -> Result<Option<i64>> {
        // No transaction id unless something is written: a sync that changes nothing writes no
        // WAL (the drain target that follows would otherwise wait for its flush).
        let mut xid = None;
        let existing: Vec<String> = tx
            .query(
                "select pubname::text from pg_publication where pubname = any($1)",
                &[&vec![self.name.to_owned(), self.ins.clone()]],
            )
            .await
            .map_err(|e| Error::postgres("reading publications", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let (keyed, keyless) = (self.keyed.clone(), self.keyless.clone());
        let mut main_wants = keyed.clone();
        if !exact {
            main_wants.extend(keyless.iter().copied());
        }
        let ins = self.ins.clone();
        for (pubname, publish, wants) in [
            (self.name, "insert, update, delete, truncate", &main_wants),
            (ins.as_str(), "insert, truncate", &keyless),
        ] {
            let all_tables = pubname == self.name && self.main_all;
            if existing.iter().any(|e| e == pubname) {
                if !all_tables {
                    self.diff(tx, pubname, wants).await?;
                }
            } else {
                self.create(tx, pubname, publish, wants).await?;
                if pubname == ins && since.is_none() && !new_task {
                    let id: i64 = tx
                        .query_one("select txid_current()", &[])
                        .await
                        .map_err(|e| Error::postgres("reading the creating transaction", e))?
                        .get(0);
                    comment(tx, &ins, &format!("pgshift created by {id}")).await?;
                    xid = Some(id);
                }
            }
        }
        if let Some(s) = since {
            comment(tx, &ins, &format!("pgshift since {s}")).await?;
            self.out.since = Some(s);
        }
        Ok(xid)
    }

    async fn create(
        &mut self,
        tx: &Client,
        pubname: &str,
        publish: &str,
        tables: &[&TableInfo],
    ) -> Result<()> {
        let with = if self.version_num >= 130_000 {
            ", publish_via_partition_root = true"
        } else {
            ""
        };
        let list: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
        let target = if list.is_empty() {
            String::new()
        } else {
            format!(" for table {}", list.join(", "))
        };
        exec(
            tx,
            &format!(
                "create publication {}{target} with (publish = '{publish}'{with})",
                quote_ident(pubname)
            ),
        )
        .await?;
        self.out
            .added
            .extend(tables.iter().map(|t| t.display_name()));
        Ok(())
    }

    /// Adds and drops tables so `pubname` holds exactly `wants`.
    async fn diff(&mut self, tx: &Client, pubname: &str, wants: &[&TableInfo]) -> Result<()> {
        let members: Vec<(String, String)> = tx
            .query(MEMBERS, &[&vec![pubname.to_owned()]])
            .await
            .map_err(|e| Error::postgres("reading publication tables", e))?
            .iter()
            .map(|r| (r.get(1), r.get(2)))
            .collect();
        let quoted = quote_ident(pubname);
        for (schema, table) in &members {
            if !wants
                .iter()
                .any(|t| &t.schema == schema && &t.name == table)
            {
                let q = super::quote_qualified(schema, table);
                exec(tx, &format!("alter publication {quoted} drop table {q}")).await?;
                self.out.dropped.push(format!("{schema}.{table}"));
            }
        }
        for t in wants {
            if !members.iter().any(|(s, n)| s == &t.schema && n == &t.name) {
                exec(
                    tx,
                    &format!("alter publication {quoted} add table {}", t.quoted()),
                )
                .await?;
                self.out.added.push(t.display_name());
            }
        }
        Ok(())
    }
}

/// Starts a transaction holding the task's publication lock (syncs of one task run one at a
/// time).
async fn begin(client: &Client, name: &str) -> Result<()> {
    client
        .batch_execute("begin")
        .await
        .map_err(|e| Error::postgres("starting the publication sync", e))?;
    let locked = client
        .execute(
            "select pg_advisory_xact_lock(hashtext('pgshift publication ' || $1))",
            &[&name],
        )
        .await
        .map_err(|e| Error::postgres("locking the publication sync", e));
    finish_on_error(client, locked.map(|_| ())).await
}

/// Commits what `result` did, or rolls it back.
async fn finish<T>(client: &Client, result: Result<T>) -> Result<T> {
    let v = finish_on_error(client, result).await?;
    client
        .batch_execute("commit")
        .await
        .map_err(|e| Error::postgres("committing the publication sync", e))?;
    Ok(v)
}

async fn finish_on_error<T>(client: &Client, result: Result<T>) -> Result<T> {
    if result.is_err() {
        let _ = client.batch_execute("rollback").await;
    }
    result
}

async fn comment(tx: &Client, pubname: &str, text: &str) -> Result<()> {
    // COMMENT takes no parameters: the text is pgshift's own (an LSN or an xid), quoted.
    let literal = format!("'{}'", text.replace('\'', "''"));
    exec(
        tx,
        &format!(
            "comment on publication {} is {literal}",
            quote_ident(pubname)
        ),
    )
    .await
}

async fn exec(tx: &Client, sql: &str) -> Result<()> {
    tx.batch_execute(sql)
        .await
        .map_err(|e| Error::postgres(format!("syncing the publication ({sql})"), e))
}

/// The WAL insert position now: past the commit of what this session just did.
async fn wal_insert_position(client: &Client) -> Result<Lsn> {
    let text: String = client
        .query_one("select pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| Error::postgres("reading the WAL position", e))?
        .get(0);
    text.parse()
        .map_err(|e: LsnParseError| Error::Protocol(e.to_string()))
}

/// Sets REPLICA IDENTITY FULL on the selected plain tables (partitions included) that have no
/// usable replica identity and that the role owns (the user opted in: `--replica-identity-full`).
pub async fn set_replica_identity_full(client: &Client, tables: &mut [TableInfo]) -> Result<()> {
    for t in tables.iter_mut() {
        if t.kind == 'r' && t.is_owner && !t.has_replica_identity() {
            client
                .batch_execute(&format!("alter table {} replica identity full", t.quoted()))
                .await
                .map_err(|e| {
                    Error::postgres(
                        format!("setting REPLICA IDENTITY FULL on {}", t.display_name()),
                        e,
                    )
                })?;
            tracing::info!(table = %t.display_name(), "REPLICA IDENTITY FULL set (--replica-identity-full)");
            t.replica_identity = 'f';
        }
    }
    Ok(())
}

/// Drops the task's publications (teardown); missing ones are fine.
pub async fn drop_all(client: &Client, name: &str) -> Result<Vec<String>> {
    let mut dropped = Vec::new();
    for pubname in [name.to_owned(), insert_only(name)] {
        let n = client
            .execute(
                "select 1 from pg_publication where pubname = $1",
                &[&pubname],
            )
            .await
            .map_err(|e| Error::postgres("reading publications", e))?;
        if n > 0 {
            client
                .batch_execute(&format!(
                    "drop publication if exists {}",
                    quote_ident(&pubname)
                ))
                .await
                .map_err(|e| Error::postgres(format!("dropping publication {pubname}"), e))?;
            dropped.push(pubname);
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_record_the_insert_only_progress() {
        assert_eq!(
            parse_comment(Some("pgshift since 0/16B3748")),
            InsertOnly::Since(Lsn(0x16B_3748))
        );
        assert_eq!(
            parse_comment(Some("pgshift created by 731")),
            InsertOnly::Created { xid: 731 }
        );
        assert_eq!(parse_comment(None), InsertOnly::Created { xid: 0 });
        assert_eq!(
            parse_comment(Some("pgshift since garbage")),
            InsertOnly::Created { xid: 0 }
        );
    }

    #[test]
    fn names_cannot_collide_with_a_task_and_peek_both() {
        // Task names are [a-z0-9-] (slot names [a-z0-9_]): `$` never comes from one.
        assert_eq!(insert_only("pgshift_a"), "pgshift_a$ins");
        assert_eq!(peek_names("pgshift_a", true), "pgshift_a,pgshift_a$ins");
        assert_eq!(peek_names("pgshift_a", false), "pgshift_a");
        assert!(insert_only(&"x".repeat(56)).len() <= 63, "fits NAMEDATALEN");
    }
}
