//! The selected tables' schema as pg_dump's sections, read from the source catalog at the
//! full load's plan and staged beside the data (`_manifests/schema/ddl.json`), so apply can
//! build the target the way `pg_dump | pg_restore` would without a client binary.
//!
//! - **pre-data** (before the load): schemas, extensions owning used types, user types
//!   (enums, domains with their checks, composites, ranges) in dependency order, sequences
//!   (serial-owned and those defaults call) with their values, tables with defaults, identity
//!   and generated columns, `NOT NULL`, collations, partitioning and partitions, then check
//!   constraints and sequence ownership.
//! - **post-data** (after it, in parallel on the target): primary keys, unique and exclusion
//!   constraints, the other indexes, then foreign keys between selected tables.
//!
//! Every statement is text the catalog printed (`format_type`, `pg_get_expr`,
//! `pg_get_constraintdef`, `pg_get_indexdef`) around identifiers the server quoted
//! (`quote_ident`); nothing is parsed here. What is not carried is listed in `skipped` with
//! the reason (triggers: functions are not migrated; a foreign key to a table not selected).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::error::{Error, Result};

/// Where the staged schema lives in the stage.
pub const DDL_KEY: &str = "_manifests/schema/ddl.json";

/// What an item creates; apply uses it to skip what the target has and to order the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DdlKind {
    Schema,
    Extension,
    Type,
    Sequence,
    Table,
    /// A check constraint (`object` is its name).
    Check,
    /// Sequence ownership and values, after the tables.
    Alter,
    PrimaryKey,
    Unique,
    Exclusion,
    Index,
    ForeignKey,
}

/// One statement of a section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlItem {
    pub kind: DdlKind,
    /// The object, qualified and quoted (a type, sequence, table or index name), or the
    /// constraint's name for constraints.
    pub object: String,
    /// The table it belongs to (quoted, qualified), for tables, constraints and indexes.
    #[serde(default)]
    pub table: Option<String>,
    pub sql: String,
}

/// The staged schema: both sections, and what was left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaDdl {
    pub pre_data: Vec<DdlItem>,
    pub post_data: Vec<DdlItem>,
    #[serde(default)]
    pub skipped: Vec<String>,
}

fn pg(what: &str) -> impl FnOnce(tokio_postgres::Error) -> Error + '_ {
    move |e| Error::postgres(format!("reading {what} for the target's schema"), e)
}

/// The relations to create for the selected tables (oids): each one, and the whole partition
/// tree under a partitioned one, parents before their partitions.
async fn relations(client: &Client, tables: &[u32]) -> Result<Vec<u32>> {
    let rows = client
        .query(
            "select distinct on (t.relid) t.relid::oid, t.level, o.ord from unnest($1::oid[]) with ordinality o(oid, ord), \
             lateral (select relid::oid, level from pg_partition_tree(o.oid) \
                      union all select o.oid, 0 where not exists (select 1 from pg_partition_tree(o.oid))) t \
             join pg_class c on c.oid = t.relid where c.relkind in ('r', 'p') \
             order by t.relid, t.level",
            &[&tables],
        )
        .await
        .map_err(pg("the partition trees"))?;
    let mut rels: Vec<(u32, i32, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    rels.sort_by_key(|&(oid, level, ord)| (ord, level, oid));
    let mut seen = HashSet::new();
    Ok(rels
        .into_iter()
        .filter(|(oid, _, _)| seen.insert(*oid))
        .map(|(oid, _, _)| oid)
        .collect())
}

/// Reads both sections for the selected tables (their oids).
pub async fn read(client: &Client, tables: &[u32]) -> Result<SchemaDdl> {
    let rels = relations(client, tables).await?;
    let mut out = SchemaDdl::default();
    let mut schemas: Vec<String> = Vec::new();
    let mut add_schema = |s: String, out: &mut SchemaDdl| {
        if s != "\"public\"" && s != "public" && !schemas.contains(&s) {
            schemas.push(s.clone());
            out.pre_data.push(DdlItem {
                kind: DdlKind::Schema,
                object: s.clone(),
                table: None,
                sql: format!("create schema if not exists {s}"),
            });
        }
    };
    for row in client
        .query(
            "select distinct quote_ident(n.nspname) from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = any($1::oid[]) order by 1",
            &[&rels],
        )
        .await
        .map_err(pg("schemas"))?
    {
        add_schema(row.get(0), &mut out);
    }
    let mut types = types(client, &rels).await?;
    for s in types.schemas.drain(..) {
        add_schema(s, &mut out);
    }
    out.pre_data.append(&mut types.items);
    let sequence_alters = sequences(client, &rels, &mut out).await?;
    tables_sql(client, &rels, &mut out).await?;
    out.pre_data.extend(sequence_alters);
    post_data(client, &rels, &mut out).await?;
    // Tables named as pgshift quotes them everywhere else (every identifier quoted).
    for item in out.pre_data.iter_mut().chain(out.post_data.iter_mut()) {
        if let Some(t) = &mut item.table {
            *t = requote(t);
            if item.kind == DdlKind::Table {
                item.object = t.clone();
            }
        }
    }
    Ok(out)
}

/// The user types (with their schemas and owning extensions) the columns of `rels` use,
/// dependencies first: what a table created or changed after the load needs on the target.
pub async fn type_items(client: &Client, rels: &[u32]) -> Result<Vec<DdlItem>> {
    let types = types(client, rels).await?;
    let mut items: Vec<DdlItem> = types
        .schemas
        .iter()
        .map(|s| DdlItem {
            kind: DdlKind::Schema,
            object: s.clone(),
            table: None,
            sql: format!("create schema if not exists {s}"),
        })
        .collect();
    items.extend(types.items);
    Ok(items)
}

/// `schema.table` as PostgreSQL's `quote_ident` printed it (quoted only where needed), with
/// every part quoted.
fn requote(name: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut chars = name.chars().peekable();
    let mut quoted = false;
    while let Some(ch) = chars.next() {
        match ch {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    parts.push(cur);
    parts
        .iter()
        .map(|p| crate::source::quote_ident(p))
        .collect::<Vec<_>>()
        .join(".")
}

/// What [`types`] found: the schemas they live in and their statements, in dependency order.
struct Types {
    schemas: Vec<String>,
    items: Vec<DdlItem>,
}

/// One user type as the catalog describes it.
struct TypeRow {
    name: String,
    schema: String,
    kind: char,
    extension: Option<(String, String)>,
    deps: Vec<u32>,
    sql: Option<String>,
}

const TYPE_INFO: &str = "select t.oid, format_type(t.oid, null), quote_ident(n.nspname), t.typtype::text, \
 n.nspname in ('pg_catalog', 'information_schema'), \
 (select quote_ident(e.extname) || ' ' || quote_ident(en.nspname) from pg_depend d join pg_extension e on e.oid = d.refobjid \
   join pg_namespace en on en.oid = e.extnamespace \
   where d.classid = 'pg_type'::regclass and d.objid = t.oid and d.refclassid = 'pg_extension'::regclass and d.deptype = 'e'), \
 array_remove(array[nullif(t.typelem, 0), nullif(t.typbasetype, 0), (select rngsubtype from pg_range where rngtypid = t.oid)] \
   || coalesce((select array_agg(a.atttypid) from pg_attribute a where a.attrelid = t.typrelid and t.typtype = 'c' and a.attnum > 0 and not a.attisdropped), '{}'), null), \
 case t.typtype \
  when 'e' then 'create type ' || format_type(t.oid, null) || ' as enum (' || \
    coalesce((select string_agg(quote_literal(enumlabel), ', ' order by enumsortorder) from pg_enum where enumtypid = t.oid), '') || ')' \
  when 'd' then 'create domain ' || format_type(t.oid, null) || ' as ' || format_type(t.typbasetype, nullif(t.typtypmod, -1)) || \
    coalesce(' collate ' || (select quote_ident(cn.nspname) || '.' || quote_ident(co.collname) from pg_collation co join pg_namespace cn on cn.oid = co.collnamespace \
      where co.oid = t.typcollation and t.typcollation <> (select typcollation from pg_type b where b.oid = t.typbasetype)), '') || \
    coalesce(' default ' || t.typdefault, '') || case when t.typnotnull then ' not null' else '' end || \
    coalesce((select string_agg(' constraint ' || quote_ident(conname) || ' ' || pg_get_constraintdef(oid), '' order by conname) from pg_constraint where contypid = t.oid and contype = 'c'), '') \
  when 'c' then 'create type ' || format_type(t.oid, null) || ' as (' || \
    coalesce((select string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, nullif(a.atttypmod, -1)), ', ' order by a.attnum) \
      from pg_attribute a where a.attrelid = t.typrelid and a.attnum > 0 and not a.attisdropped), '') || ')' \
  when 'r' then 'create type ' || format_type(t.oid, null) || ' as range (subtype = ' || \
    (select format_type(rngsubtype, null) from pg_range where rngtypid = t.oid) || ')' \
 end, \
 coalesce((select relkind::text from pg_class where oid = t.typrelid), '') \
 from pg_type t join pg_namespace n on n.oid = t.typnamespace where t.oid = any($1::oid[])";

/// The user types the relations' columns use (through arrays, domains, composites and
/// ranges), dependencies first; a type an extension owns brings `create extension`.
async fn types(client: &Client, rels: &[u32]) -> Result<Types> {
    let mut pending: Vec<u32> = client
        .query(
            "select distinct atttypid from pg_attribute where attrelid = any($1::oid[]) and attnum > 0 and not attisdropped",
            &[&rels],
        )
        .await
        .map_err(pg("column types"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut found: HashMap<u32, TypeRow> = HashMap::new();
    while !pending.is_empty() {
        let rows = client
            .query(TYPE_INFO, &[&pending])
            .await
            .map_err(pg("types"))?;
        pending.clear();
        for r in rows {
            let oid: u32 = r.get(0);
            let builtin: bool = r.get(4);
            let relkind: String = r.get(8);
            let kind = r.get::<_, String>(3).chars().next().unwrap_or('b');
            let extension: Option<String> = r.get(5);
            let deps: Vec<u32> = r.get(6);
            // A table's row type is the table itself; a base type (not an extension's)
            // cannot be created from the catalog.
            let table_row = kind == 'c' && relkind != "c";
            for d in &deps {
                if !found.contains_key(d) && !pending.contains(d) {
                    pending.push(*d);
                }
            }
            found.insert(
                oid,
                TypeRow {
                    name: r.get(1),
                    schema: r.get(2),
                    kind,
                    extension: extension
                        .and_then(|e| e.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned()))),
                    deps: if builtin || table_row {
                        Vec::new()
                    } else {
                        deps
                    },
                    sql: if builtin || table_row { None } else { r.get(7) },
                },
            );
        }
    }
    // Dependencies first (post-order), extensions once.
    let mut out = Types {
        schemas: Vec::new(),
        items: Vec::new(),
    };
    let mut done: HashSet<u32> = HashSet::new();
    let mut extensions: HashSet<String> = HashSet::new();
    let mut order: Vec<u32> = found.keys().copied().collect();
    order.sort_unstable();
    fn visit(
        oid: u32,
        found: &HashMap<u32, TypeRow>,
        done: &mut HashSet<u32>,
        extensions: &mut HashSet<String>,
        out: &mut Types,
    ) {
        if !done.insert(oid) {
            return;
        }
        let Some(t) = found.get(&oid) else {
            return;
        };
        if let Some((ext, schema)) = &t.extension {
            if extensions.insert(ext.clone()) {
                if schema != "public" && !out.schemas.contains(schema) {
                    out.schemas.push(schema.clone());
                }
                out.items.push(DdlItem {
                    kind: DdlKind::Extension,
                    object: ext.clone(),
                    table: None,
                    sql: format!("create extension if not exists {ext} with schema {schema}"),
                });
            }
            return;
        }
        for d in &t.deps {
            visit(*d, found, done, extensions, out);
        }
        if let Some(sql) = &t.sql
            && matches!(t.kind, 'e' | 'd' | 'c' | 'r')
        {
            if t.schema != "public" && !out.schemas.contains(&t.schema) {
                out.schemas.push(t.schema.clone());
            }
            out.items.push(DdlItem {
                kind: DdlKind::Type,
                object: t.name.clone(),
                table: None,
                sql: sql.clone(),
            });
        }
    }
    for oid in order {
        visit(oid, &found, &mut done, &mut extensions, &mut out);
    }
    Ok(out)
}

/// Sequences the relations own (serial columns; identity columns make their own) and those
/// their defaults call, with their options and current values.
async fn sequences(client: &Client, rels: &[u32], out: &mut SchemaDdl) -> Result<Vec<DdlItem>> {
    let rows = client
        .query(
            "with used as ( \
               select d.objid as seq, d.refobjid as rel, d.refobjsubid as col from pg_depend d \
                where d.classid = 'pg_class'::regclass and d.refclassid = 'pg_class'::regclass and d.deptype = 'a' and d.refobjid = any($1::oid[]) \
               union \
               select d.refobjid, null, null from pg_depend d join pg_attrdef ad on ad.oid = d.objid \
                where d.classid = 'pg_attrdef'::regclass and d.refclassid = 'pg_class'::regclass and ad.adrelid = any($1::oid[])) \
             select quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
               'create sequence if not exists ' || quote_ident(n.nspname) || '.' || quote_ident(c.relname) || \
               ' as ' || format_type(s.seqtypid, null) || ' increment by ' || s.seqincrement || ' minvalue ' || s.seqmin || \
               ' maxvalue ' || s.seqmax || ' start with ' || s.seqstart || ' cache ' || s.seqcache || \
               case when s.seqcycle then ' cycle' else ' no cycle' end, \
               (select 'alter sequence ' || quote_ident(n.nspname) || '.' || quote_ident(c.relname) || ' owned by ' || \
                  quote_ident(tn.nspname) || '.' || quote_ident(t.relname) || '.' || quote_ident(a.attname) \
                from pg_class t join pg_namespace tn on tn.oid = t.relnamespace \
                join pg_attribute a on a.attrelid = t.oid and a.attnum = u.col where t.oid = u.rel), \
               (select 'select setval(' || quote_literal(quote_ident(n.nspname) || '.' || quote_ident(c.relname)) || ', ' || ps.last_value || ')' \
                  from pg_sequences ps where ps.schemaname = n.nspname and ps.sequencename = c.relname and ps.last_value is not null), \
               quote_ident(n.nspname) \
             from (select seq, max(rel) as rel, max(col) as col from used group by seq) u \
             join pg_class c on c.oid = u.seq and c.relkind = 'S' \
             join pg_namespace n on n.oid = c.relnamespace \
             join pg_sequence s on s.seqrelid = c.oid \
             order by 1",
            &[&rels],
        )
        .await
        .map_err(pg("sequences"))?;
    let mut after = Vec::new();
    for r in rows {
        let schema: String = r.get(4);
        if schema != "public"
            && !out
                .pre_data
                .iter()
                .any(|i| i.kind == DdlKind::Schema && i.object == schema)
        {
            out.pre_data.push(DdlItem {
                kind: DdlKind::Schema,
                object: schema.clone(),
                table: None,
                sql: format!("create schema if not exists {schema}"),
            });
        }
        let name: String = r.get(0);
        out.pre_data.push(DdlItem {
            kind: DdlKind::Sequence,
            object: name.clone(),
            table: None,
            sql: r.get(1),
        });
        for sql in [r.get::<_, Option<String>>(2), r.get(3)]
            .into_iter()
            .flatten()
        {
            after.push(DdlItem {
                kind: DdlKind::Alter,
                object: name.clone(),
                table: None,
                sql,
            });
        }
    }
    // Identity columns' sequences come with their tables: their values only.
    for r in client
        .query(
            "select 'select setval(pg_get_serial_sequence(' || quote_literal(quote_ident(tn.nspname) || '.' || quote_ident(t.relname)) || ', ' || \
               quote_literal(a.attname) || '), ' || ps.last_value || ')', quote_ident(tn.nspname) || '.' || quote_ident(t.relname) \
             from pg_depend d join pg_class s on s.oid = d.objid join pg_namespace sn on sn.oid = s.relnamespace \
             join pg_sequences ps on ps.schemaname = sn.nspname and ps.sequencename = s.relname \
             join pg_class t on t.oid = d.refobjid join pg_namespace tn on tn.oid = t.relnamespace \
             join pg_attribute a on a.attrelid = t.oid and a.attnum = d.refobjsubid \
             where d.classid = 'pg_class'::regclass and d.refclassid = 'pg_class'::regclass and d.deptype = 'i' \
               and d.refobjid = any($1::oid[]) and ps.last_value is not null order by 2",
            &[&rels],
        )
        .await
        .map_err(pg("identity sequences"))?
    {
        let table: String = r.get(1);
        after.push(DdlItem {
            kind: DdlKind::Alter,
            object: table.clone(),
            table: Some(table),
            sql: r.get(0),
        });
    }
    // Ownership and values go after the tables: returned for the caller to place there.
    Ok(after)
}

/// The tables (with partitioning and partitions), then their check constraints.
async fn tables_sql(client: &Client, rels: &[u32], out: &mut SchemaDdl) -> Result<()> {
    let rows = client
        .query(
            "select o.ord, quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relispartition, \
               case when c.relpersistence = 'u' then 'create unlogged table if not exists ' else 'create table if not exists ' end || \
               quote_ident(n.nspname) || '.' || quote_ident(c.relname) || \
               case when c.relispartition and p.parent is not null then \
                 ' partition of ' || p.parent || ' ' || pg_get_expr(c.relpartbound, c.oid) \
               else ' (' || coalesce((select string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod) || \
                   coalesce(' collate ' || (select quote_ident(cn.nspname) || '.' || quote_ident(co.collname) from pg_collation co \
                      join pg_namespace cn on cn.oid = co.collnamespace where co.oid = a.attcollation and a.attcollation <> ty.typcollation), '') || \
                   case when a.attidentity = 'a' then ' generated always as identity' \
                        when a.attidentity = 'd' then ' generated by default as identity' \
                        when a.attgenerated = 's' then ' generated always as (' || pg_get_expr(ad.adbin, ad.adrelid) || ') stored' \
                        when a.attgenerated = 'v' then ' generated always as (' || pg_get_expr(ad.adbin, ad.adrelid) || ')' \
                        else coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), '') end || \
                   case when a.attnotnull then ' not null' else '' end, ', ' order by a.attnum) \
                 from pg_attribute a join pg_type ty on ty.oid = a.atttypid \
                 left join pg_attrdef ad on ad.adrelid = a.attrelid and ad.adnum = a.attnum \
                 where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped), '') || ')' end || \
               case when c.relkind = 'p' then ' partition by ' || pg_get_partkeydef(c.oid) else '' end || \
               coalesce(' with (' || (select string_agg(quote_ident(split_part(o, '=', 1)) || ' = ' || \
                   quote_literal(substr(o, strpos(o, '=') + 1)), ', ') from unnest(c.reloptions) o) || ')', ''), \
               coalesce((select array_agg('alter table ' || quote_ident(n.nspname) || '.' || quote_ident(c.relname) || \
                   ' add constraint ' || quote_ident(k.conname) || ' ' || pg_get_constraintdef(k.oid) order by k.conname) \
                 from pg_constraint k where k.conrelid = c.oid and k.contype = 'c' and k.conislocal), '{}'), \
               coalesce((select array_agg(quote_ident(k.conname) order by k.conname) \
                 from pg_constraint k where k.conrelid = c.oid and k.contype = 'c' and k.conislocal), '{}') \
             from unnest($1::oid[]) with ordinality o(oid, ord) \
             join pg_class c on c.oid = o.oid join pg_namespace n on n.oid = c.relnamespace \
             left join lateral (select quote_ident(pn.nspname) || '.' || quote_ident(pc.relname) as parent from pg_inherits i \
               join pg_class pc on pc.oid = i.inhparent join pg_namespace pn on pn.oid = pc.relnamespace \
               where i.inhrelid = c.oid and i.inhparent = any($1::oid[])) p on true \
             order by o.ord",
            &[&rels],
        )
        .await
        .map_err(pg("tables"))?;
    let mut checks = Vec::new();
    for r in rows {
        let name: String = r.get(1);
        out.pre_data.push(DdlItem {
            kind: DdlKind::Table,
            object: name.clone(),
            table: Some(name.clone()),
            sql: r.get(3),
        });
        let names: Vec<String> = r.get(5);
        for (sql, check) in r.get::<_, Vec<String>>(4).into_iter().zip(names) {
            checks.push(DdlItem {
                kind: DdlKind::Check,
                object: check,
                table: Some(name.clone()),
                sql,
            });
        }
    }
    out.pre_data.append(&mut checks);
    Ok(())
}

/// Keys, unique and exclusion constraints, the other indexes, then foreign keys between the
/// relations; triggers and foreign keys to other tables are named in `skipped`.
async fn post_data(client: &Client, rels: &[u32], out: &mut SchemaDdl) -> Result<()> {
    let rows = client
        .query(
            "select k.contype::text, quote_ident(k.conname), quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
               'alter table ' || quote_ident(n.nspname) || '.' || quote_ident(c.relname) || ' add constraint ' || \
               quote_ident(k.conname) || ' ' || pg_get_constraintdef(k.oid), \
               k.contype <> 'f' or k.confrelid = any($1::oid[]), \
               coalesce((select quote_ident(fn.nspname) || '.' || quote_ident(f.relname) from pg_class f join pg_namespace fn on fn.oid = f.relnamespace where f.oid = k.confrelid), '') \
             from pg_constraint k join pg_class c on c.oid = k.conrelid join pg_namespace n on n.oid = c.relnamespace \
             where k.conrelid = any($1::oid[]) and k.contype in ('p', 'u', 'x', 'f') and k.conparentid = 0 \
             order by case k.contype when 'p' then 0 when 'u' then 1 when 'x' then 2 else 3 end, 3, 2",
            &[&rels],
        )
        .await
        .map_err(pg("constraints"))?;
    let mut fks = Vec::new();
    for r in rows {
        let kind = match r.get::<_, String>(0).as_str() {
            "p" => DdlKind::PrimaryKey,
            "u" => DdlKind::Unique,
            "x" => DdlKind::Exclusion,
            _ => DdlKind::ForeignKey,
        };
        let (object, table): (String, String) = (r.get(1), r.get(2));
        if !r.get::<_, bool>(4) {
            out.skipped.push(format!(
                "foreign key {object} of {table}: it references {}, which is not selected",
                r.get::<_, String>(5)
            ));
            continue;
        }
        let item = DdlItem {
            kind,
            object,
            table: Some(table),
            sql: r.get(3),
        };
        if kind == DdlKind::ForeignKey {
            fks.push(item);
        } else {
            out.post_data.push(item);
        }
    }
    let rows = client
        .query(
            "select quote_ident(n.nspname) || '.' || quote_ident(ic.relname), quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
               replace(pg_get_indexdef(i.indexrelid), ' ON ONLY ', ' ON ') \
             from pg_index i join pg_class ic on ic.oid = i.indexrelid join pg_class c on c.oid = i.indrelid \
             join pg_namespace n on n.oid = ic.relnamespace \
             where i.indrelid = any($1::oid[]) \
               and not exists (select 1 from pg_constraint k where k.conindid = i.indexrelid and k.contype in ('p', 'u', 'x')) \
               and not exists (select 1 from pg_inherits h where h.inhrelid = i.indexrelid) \
             order by 2, 1",
            &[&rels],
        )
        .await
        .map_err(pg("indexes"))?;
    for r in rows {
        out.post_data.push(DdlItem {
            kind: DdlKind::Index,
            object: r.get(0),
            table: Some(r.get(1)),
            sql: r.get(2),
        });
    }
    out.post_data.append(&mut fks);
    for r in client
        .query(
            "select quote_ident(t.tgname), quote_ident(n.nspname) || '.' || quote_ident(c.relname) from pg_trigger t \
             join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace \
             where t.tgrelid = any($1::oid[]) and not t.tgisinternal order by 2, 1",
            &[&rels],
        )
        .await
        .map_err(pg("triggers"))?
    {
        out.skipped.push(format!(
            "trigger {} on {}: functions are not migrated; create it after cutover",
            r.get::<_, String>(0),
            r.get::<_, String>(1)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_requoted_in_full() {
        assert_eq!(super::requote("app.child"), r#""app"."child""#);
        assert_eq!(
            super::requote(r#""We ""x"".y"."a.b""#),
            r#""We ""x"".y"."a.b""#
        );
    }
}
