//! Catalog queries: who the server is, its settings, and the user tables with what CDC needs
//! to know of them. Read-only.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::selection::Selection;
use crate::table::ColumnSchema;

/// What the server is and who we are on it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerInfo {
    /// `server_version`, e.g. `15.18 (Debian 15.18-0+deb12u1)`.
    pub version: String,
    /// `server_version_num`, e.g. `150018`.
    pub version_num: i32,
    /// Amazon RDS for PostgreSQL (or Aurora).
    pub is_rds: bool,
    /// Aurora PostgreSQL.
    pub is_aurora: bool,
    /// A standby (hot standby).
    pub in_recovery: bool,
    pub database: String,
    pub user: String,
    pub superuser: bool,
    /// The role may use replication slots (REPLICATION, superuser, or rds_replication).
    pub replication: bool,
    /// Whether this session is encrypted, and with which TLS version.
    pub tls: bool,
    pub tls_version: Option<String>,
}

const SERVER_INFO: &str = "select current_setting('server_version'), current_setting('server_version_num')::int4, \
 pg_is_in_recovery(), current_database()::text, current_user::text, \
 coalesce((select rolsuper from pg_roles where rolname = current_user), false), \
 coalesce((select rolreplication from pg_roles where rolname = current_user), false), \
 coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false), \
 (select version from pg_stat_ssl where pid = pg_backend_pid()), \
 (current_setting('rds.extensions', true) is not null or current_setting('rds.logical_replication', true) is not null), \
 exists (select 1 from pg_proc where proname = 'aurora_version'), \
 case when exists (select 1 from pg_roles where rolname = 'rds_replication') \
      then pg_has_role(current_user, 'rds_replication', 'member') else false end";

/// Reads [`ServerInfo`].
pub async fn server_info(client: &Client) -> Result<ServerInfo> {
    let row = client
        .query_one(SERVER_INFO, &[])
        .await
        .map_err(|e| Error::postgres("reading server information", e))?;
    let superuser: bool = row.get(5);
    let rds_replication: bool = row.get(11);
    let is_aurora: bool = row.get(10);
    Ok(ServerInfo {
        version: row.get(0),
        version_num: row.get(1),
        in_recovery: row.get(2),
        database: row.get(3),
        user: row.get(4),
        superuser,
        replication: superuser || row.get::<_, bool>(6) || rds_replication,
        tls: row.get(7),
        tls_version: row.get(8),
        is_rds: row.get::<_, bool>(9) || is_aurora,
        is_aurora,
    })
}

const SETTINGS: &str =
    "select name, setting, coalesce(unit, '') from pg_settings where name = any($1)";

/// Server settings by name (`setting` and `unit` as pg_settings shows them).
pub async fn settings(
    client: &Client,
    names: &[&str],
) -> Result<HashMap<String, (String, String)>> {
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let rows = client
        .query(SETTINGS, &[&names])
        .await
        .map_err(|e| Error::postgres("reading server settings", e))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (r.get::<_, String>(1), r.get::<_, String>(2)),
            )
        })
        .collect())
}

/// A user table (or partitioned table) and what CDC needs to know of it.
#[derive(Debug, Clone, PartialEq)]
pub struct TableInfo {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `r` table, `p` partitioned table.
    pub kind: char,
    pub is_partition: bool,
    /// `relreplident`: `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    pub has_primary_key: bool,
    /// Some column can be TOASTed out of line: variable length with extended or external
    /// storage (numeric's `main` storage and `char`/`varchar` of at most 255 characters, which
    /// in practice stay inline, are not counted).
    pub has_toastable: bool,
    pub can_select: bool,
    /// The current role owns the table (needed for `CREATE PUBLICATION .. FOR TABLE`).
    pub is_owner: bool,
    pub pages: i64,
    pub estimated_rows: f64,
}

impl TableInfo {
    /// `schema.table` for messages (unquoted, as a person writes it).
    pub fn display_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// `"schema"."table"`, safe to put in SQL.
    pub fn quoted(&self) -> String {
        super::quote_qualified(&self.schema, &self.name)
    }

    /// Whether updates and deletes carry a key in the WAL.
    pub fn has_replica_identity(&self) -> bool {
        match self.replica_identity {
            'f' | 'i' => true,
            'd' => self.has_primary_key,
            _ => false,
        }
    }
}

const USER_TABLES: &str = "select c.oid, n.nspname::text, c.relname::text, c.relkind::text, c.relispartition, \
 c.relreplident::text, \
 exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisprimary), \
 exists (select 1 from pg_attribute a where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped \
         and a.attlen = -1 and a.attstorage in ('x', 'e') \
         and not (a.atttypid in ('bpchar'::regtype, 'varchar'::regtype) and a.atttypmod between 0 and 259)), \
 has_table_privilege(c.oid, 'select'), pg_has_role(c.relowner, 'usage'), \
 c.relpages::int8, c.reltuples::float8 \
 from pg_class c join pg_namespace n on n.oid = c.relnamespace \
 where c.relkind in ('r', 'p') and n.nspname <> 'information_schema' and n.nspname !~ '^pg_' \
 and not exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass and d.objid = c.oid and d.deptype = 'e') \
 order by n.nspname, c.relname";

/// Lists user tables (not system or extension-owned ones) that `selection` selects.
/// Partitions are listed too, flagged, because changes may be published under them.
pub async fn user_tables(client: &Client, selection: &Selection) -> Result<Vec<TableInfo>> {
    let rows = client
        .query(USER_TABLES, &[])
        .await
        .map_err(|e| Error::postgres("listing tables", e))?;
    let char_of = |s: String| s.chars().next().unwrap_or('?');
    Ok(rows
        .into_iter()
        .map(|r| TableInfo {
            oid: r.get(0),
            schema: r.get(1),
            name: r.get(2),
            kind: char_of(r.get(3)),
            is_partition: r.get(4),
            replica_identity: char_of(r.get(5)),
            has_primary_key: r.get(6),
            has_toastable: r.get(7),
            can_select: r.get(8),
            is_owner: r.get(9),
            pages: r.get(10),
            estimated_rows: r.get(11),
        })
        .filter(|t| selection.selects(&t.schema, &t.name))
        .collect())
}

/// Sorted lower bounds of `buckets` equal-sized ranges of a table's single-column key.
pub async fn key_range_lows(
    client: &Client,
    schema: &str,
    table: &str,
    column: &str,
    buckets: i32,
) -> Result<Vec<String>> {
    let key = super::quote_ident(column);
    let sql = format!(
        "select min(k)::text from (select {key} as k, ntile($1) over (order by {key}) as b from {}) x group by b order by min(k)",
        super::quote_qualified(schema, table)
    );
    let rows = client
        .query(&sql, &[&buckets.max(1)])
        .await
        .map_err(|e| Error::postgres(format!("cutting {schema}.{table} into key ranges"), e))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// The columns of a table, in order, and which make up its primary key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    pub columns: Vec<ColumnSchema>,
    /// Indexes into `columns` of the primary key, in key order (empty without one).
    pub key_order: Vec<usize>,
}

/// The one columns query: name, type oid, modifier, `format_type` (no modifier printed when
/// there is none) and the position in the primary key (its key columns: a covering key's
/// `INCLUDE` columns are not key columns). Generated columns are left out, as pgoutput leaves
/// them out: the target computes them (the staged schema creates them as generated).
const COLUMNS: &str = "select a.attname::text, a.atttypid, a.atttypmod, format_type(a.atttypid, nullif(a.atttypmod, -1)), \
 array_position((i.indkey::int2[])[0:i.indnkeyatts - 1], a.attnum)::int4 \
 from pg_attribute a left join pg_index i on i.indrelid = a.attrelid and i.indisprimary \
 where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped and a.attgenerated = '' order by a.attnum";

/// Reads a table's columns (see [`Columns`]); `name` is for messages.
pub async fn table_columns(client: &Client, oid: u32, name: &str) -> Result<Columns> {
    let rows = client
        .query(COLUMNS, &[&oid])
        .await
        .map_err(|e| Error::postgres(format!("reading columns of {name}"), e))?;
    let mut keyed: Vec<(i32, usize)> = Vec::new();
    let columns = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let position: Option<i32> = r.get(4);
            if let Some(p) = position {
                keyed.push((p, i));
            }
            ColumnSchema {
                name: r.get(0),
                type_oid: r.get(1),
                type_modifier: r.get(2),
                type_name: r.get(3),
                key: position.is_some(),
            }
        })
        .collect();
    keyed.sort_unstable();
    Ok(Columns {
        columns,
        key_order: keyed.into_iter().map(|(_, i)| i).collect(),
    })
}

/// Primary-key column names of a relation, in key order (empty when it has none; `INCLUDE`
/// columns left out).
pub async fn primary_key_columns(client: &Client, rel_id: u32) -> Result<Vec<String>> {
    let rows = client
        .query(
            "select a.attname::text from pg_index i \
             join lateral unnest(i.indkey) with ordinality k(attnum, ord) on true \
             join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum \
             where i.indrelid = $1 and i.indisprimary and k.ord <= i.indnkeyatts order by k.ord",
            &[&rel_id],
        )
        .await
        .map_err(|e| Error::postgres("reading primary keys", e))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// `format_type` for (type oid, modifier) pairs, in order. A type dropped since the change was
/// written (the peek decodes history, this query sees the present) reads as `text`.
pub async fn type_names(client: &Client, types: &[(u32, i32)]) -> Result<Vec<String>> {
    let oids: Vec<u32> = types.iter().map(|t| t.0).collect();
    let mods: Vec<i32> = types.iter().map(|t| t.1).collect();
    let rows = client
        .query(
            "select case when exists (select 1 from pg_type where oid = t) then format_type(t, nullif(m, -1)) else 'text' end \
             from unnest($1::oid[], $2::int4[]) with ordinality u(t, m, o) order by o",
            &[&oids, &mods],
        )
        .await
        .map_err(|e| Error::postgres("reading column types", e))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}
