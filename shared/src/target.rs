//! The target PostgreSQL's side that jobs and commands share: pgshift's bookkeeping table
//! (where a task's apply stands, written by the apply job in each batch's transaction) and the
//! cutover's sequence sync.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::selection::Selection;
use crate::source::quote_qualified;

/// `pgshift.applied`, created (or brought up to date) by every apply run.
pub const BOOKKEEPING: &str = "create schema if not exists pgshift; \
 create table if not exists pgshift.applied (task text primary key, load_complete boolean not null default false, \
 position text not null default '0/0', batches bigint not null default 0, updated_at timestamptz not null default now()); \
 alter table pgshift.applied add column if not exists l0 text; \
 alter table pgshift.applied add column if not exists last_commit_ts timestamptz; \
 create table if not exists pgshift.reloads (task text not null, manifest text not null, r0 text not null, \
 rows bigint not null, replayed bigint not null, applied_at timestamptz not null default now(), primary key (task, manifest))";

/// Where a task's apply stands in a target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub load_complete: bool,
    /// The end of the last batch applied (the load's L0 before any).
    pub position: Lsn,
    pub batches: i64,
    /// The source commit time of the last change applied (RFC 3339).
    pub last_commit_ts: Option<String>,
    /// Seconds between that commit and now (the target's clock).
    pub seconds_since_last_commit: Option<f64>,
}

/// The task's row of `pgshift.applied`, `None` when apply never ran against this target.
pub async fn applied(client: &Client, task: &str) -> Result<Option<Applied>> {
    let exists: bool = client
        .query_one("select to_regclass('pgshift.applied') is not null", &[])
        .await
        .map_err(|e| Error::postgres("looking for pgshift.applied in the target", e))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let has_ts: bool = client
        .query_one(
            "select count(*) = 1 from pg_attribute where attrelid = 'pgshift.applied'::regclass and attname = 'last_commit_ts' and not attisdropped",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("reading pgshift.applied in the target", e))?
        .get(0);
    let ts = if has_ts {
        "to_char(last_commit_ts at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), extract(epoch from now() - last_commit_ts)::float8"
    } else {
        "null::text, null::float8"
    };
    let row = client
        .query_opt(
            &format!(
                "select load_complete, position, batches, {ts} from pgshift.applied where task = $1"
            ),
            &[&task],
        )
        .await
        .map_err(|e| Error::postgres("reading pgshift.applied in the target", e))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let position: String = row.get(1);
    Ok(Some(Applied {
        load_complete: row.get(0),
        position: position.parse().map_err(|e: crate::lsn::LsnParseError| {
            Error::Source(format!("pgshift.applied: {e}"))
        })?,
        batches: row.get(2),
        last_commit_ts: row.get(3),
        seconds_since_last_commit: row.get(4),
    }))
}

/// One sequence brought to the source's value at cutover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceSync {
    pub schema: String,
    pub name: String,
    /// The source's `last_value` (`None`: never used there).
    pub last_value: Option<i64>,
    /// Set on the target; false when the target has no such sequence.
    pub set: bool,
}

/// Sets every sequence of the selected tables (owned by one of their columns, serial or
/// identity) and every selected sequence that no table owns to the source's value, as
/// `setval` would have left it there: the next value the target hands out is the source's
/// next. A sequence the target lacks is reported, not created.
pub async fn sync_sequences(
    source: &Client,
    target: &Client,
    selection: &Selection,
) -> Result<Vec<SequenceSync>> {
    let rows = source
        .query(
            "select s.schemaname::text, s.sequencename::text, s.last_value, s.start_value, \
                    tn.nspname::text, t.relname::text \
             from pg_sequences s \
             join pg_class c on c.relname = s.sequencename \
             join pg_namespace n on n.oid = c.relnamespace and n.nspname = s.schemaname \
             left join pg_depend d on d.classid = 'pg_class'::regclass and d.objid = c.oid \
                  and d.refclassid = 'pg_class'::regclass and d.deptype in ('a', 'i') \
             left join pg_class t on t.oid = d.refobjid \
             left join pg_namespace tn on tn.oid = t.relnamespace \
             where s.schemaname not in ('pg_catalog', 'information_schema', 'pgshift') \
             order by 1, 2",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("reading the source's sequences", e))?;
    let mut out = Vec::new();
    for row in rows {
        let (schema, name): (String, String) = (row.get(0), row.get(1));
        let owner: (Option<String>, Option<String>) = (row.get(4), row.get(5));
        let selected = match &owner {
            (Some(s), Some(t)) => selection.selects(s, t),
            _ => selection.selects(&schema, &name),
        };
        if !selected {
            continue;
        }
        let (last_value, start): (Option<i64>, i64) = (row.get(2), row.get(3));
        let qualified = quote_qualified(&schema, &name);
        let present: bool = target
            .query_one("select to_regclass($1) is not null", &[&qualified])
            .await
            .map_err(|e| Error::postgres("looking for a sequence in the target", e))?
            .get(0);
        if present {
            let (value, called) = last_value.map_or((start, false), |v| (v, true));
            target
                .execute(
                    "select setval($1::text::regclass, $2, $3)",
                    &[&qualified, &value, &called],
                )
                .await
                .map_err(|e| Error::postgres(format!("setting {qualified} on the target"), e))?;
        }
        out.push(SequenceSync {
            schema,
            name,
            last_value,
            set: present,
        });
    }
    Ok(out)
}
