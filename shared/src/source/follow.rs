//! Following the selection as tables appear: an event trigger, created when the role may (a
//! superuser, `rds_superuser`), that puts a table matching the task's selection into the
//! right publication (keyed: the main one; keyless: insert-only) at `ddl_command_end` of its
//! `CREATE TABLE` — in the creating transaction, so its rows are captured from the first —
//! and moves it between them when an `ALTER TABLE` gives or takes its key.
//!
//! It never makes the user's statement fail: the function is `SECURITY DEFINER` (it acts as
//! pgshift's role, which owns the publications) with a fixed `search_path`, and any error
//! inside is a WARNING. Without the privilege, each poll's publication sync adds new tables
//! instead (rows written before that are not captured; test-endpoint says so). Rows a
//! `CREATE TABLE .. AS` writes are inserted before the trigger runs: they come with the next
//! full load, not through CDC.

use tokio_postgres::Client;

use super::Capture;
use super::publication::insert_only;
use super::quote_ident;
use crate::error::{Error, Result};

/// The event trigger's (and its function's) name for the task whose publication is `name`.
pub fn trigger_name(name: &str) -> String {
    format!("{name}_follow")
}

/// Whether the trigger sends schema-change messages: asked for, and a server whose pgoutput
/// decodes them (14+).
fn captures_ddl(capture: &Capture, version_num: i32) -> bool {
    capture.ddl && version_num >= 140_000
}

/// The statements that send a table's definition (`rel.oid`) as a transactional logical
/// message, never failing the user's statement. A message's position is the end of its WAL
/// record, which is where the next record (a row of the same statement's transaction, maybe
/// of another subtransaction) starts, and the decoder orders equal positions of different
/// subtransactions either way: an empty message after it (ignored by every reader) keeps the
/// definition strictly before whatever follows.
fn emit_definition(name: &str, relid: &str) -> String {
    format!(
        r#"
      begin
        execute $def${sql}$def$ into def using {relid};
        perform pg_logical_emit_message(true, '{prefix}',
          '{{"tag":' || to_json(tg_tag)::text || ',"definition":' || def || '}}');
        perform pg_logical_emit_message(true, 'pgshift_ddl_end', '');
      exception when others then
        raise warning 'pgshift: the schema change of % is not captured (%)', obj.objid::regclass, sqlerrm;
      end;"#,
        sql = crate::change::ddl::DEFINITION_SQL,
        prefix = crate::change::ddl::message_prefix(name).replace('\'', "''")
    )
}

/// The drop trigger's body: a message naming each selected table dropped.
fn drop_body(name: &str, capture: &Capture) -> String {
    let selected = capture
        .selection
        .sql_predicate("obj.schema_name", "obj.object_name");
    let prefix = crate::change::ddl::message_prefix(name).replace('\'', "''");
    format!(
        r#"
declare
  obj record;
begin
  for obj in select * from pg_event_trigger_dropped_objects()
             where object_type = 'table' and not is_temporary loop
    begin
      if {selected} then
        perform pg_logical_emit_message(true, '{prefix}', json_build_object('tag', tg_tag,
          'dropped', json_build_object('relid', obj.objid::int8, 'schema', obj.schema_name,
          'table', obj.object_name))::text);
        perform pg_logical_emit_message(true, 'pgshift_ddl_end', '');
      end if;
    exception when others then
      raise warning 'pgshift: the drop of %.% is not captured (%)', obj.schema_name, obj.object_name, sqlerrm;
    end;
  end loop;
exception when others then
  raise warning 'pgshift: %', sqlerrm;
end
"#
    )
}

/// The drop trigger's (and its function's) name.
pub fn drop_trigger_name(name: &str) -> String {
    format!("{name}_ddl_drop")
}

/// The function's body for `selection`, in the artifacts schema.
fn body(name: &str, capture: &Capture, version_num: i32) -> String {
    let main = name.replace('\'', "''");
    let ins = insert_only(name).replace('\'', "''");
    let skip_partitions = if version_num >= 130_000 {
        "rel.relispartition"
    } else {
        "rel.relkind = 'p'"
    };
    let selected = capture.selection.sql_predicate("nsp", "rel.relname::text");
    let full = if capture.replica_identity_full {
        "if not keyed and rel.relkind = 'r' then\n        execute format('alter table %I.%I replica identity full', nsp, rel.relname);\n        keyed := true;\n      end if;"
    } else {
        ""
    };
    let emit = if captures_ddl(capture, version_num) {
        emit_definition(name, "rel.oid")
    } else {
        String::new()
    };
    // A partition created, attached or detached changes its parent's partitions (the rows
    // are published through the root): the parent's definition is sent when the root is
    // selected, and a partitioned partition's own too.
    let partitions = if captures_ddl(capture, version_num) {
        let root_selected = capture
            .selection
            .sql_predicate("root.nspname::text", "root.relname::text");
        format!(
            r#"if rel.relispartition then
        select c.oid, c.relname, n.nspname into root from pg_class c
          join pg_namespace n on n.oid = c.relnamespace where c.oid = pg_partition_root(rel.oid);
        if {root_selected} then
          select i.inhparent into parent from pg_inherits i where i.inhrelid = rel.oid;
          {emit_parent}
          if rel.relkind = 'p' then
            {emit_self}
          end if;
        end if;
      end if;"#,
            emit_parent = emit_definition(name, "parent"),
            emit_self = emit_definition(name, "rel.oid"),
        )
    } else {
        String::new()
    };
    format!(
        r#"
declare
  obj record;
  rel record;
  nsp text;
  keyed boolean;
  into_pub text;
  out_pub text;
  def text;
  root record;
  parent oid;
begin
  for obj in select distinct objid from pg_event_trigger_ddl_commands()
             where object_type in ('table', 'table column') loop
    begin
      select c.oid, c.relname, c.relkind, c.relispartition, c.relreplident, c.relnamespace
        into rel from pg_class c where c.oid = obj.objid and c.relkind in ('r', 'p');
      if not found then
        continue;
      end if;
      {partitions}
      if {skip_partitions} then
        continue;
      end if;
      select n.nspname::text into nsp from pg_namespace n where n.oid = rel.relnamespace;
      if not {selected} then
        continue;
      end if;
      {emit}
      keyed := rel.relreplident in ('f', 'i') or (rel.relreplident = 'd' and exists (
        select 1 from pg_index i where i.indrelid = rel.oid and i.indisprimary));
      {full}
      into_pub := case when keyed then '{main}' else '{ins}' end;
      out_pub := case when keyed then '{ins}' else '{main}' end;
      if exists (select 1 from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid
                 where p.pubname = out_pub and pr.prrelid = rel.oid) then
        execute format('alter publication %I drop table %I.%I', out_pub, nsp, rel.relname);
      end if;
      if not exists (select 1 from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid
                     where p.pubname = into_pub and pr.prrelid = rel.oid) then
        execute format('alter publication %I add table %I.%I', into_pub, nsp, rel.relname);
      end if;
    exception when others then
      raise warning 'pgshift: % not published (%); the next poll retries', obj.objid::regclass, sqlerrm;
    end;
  end loop;
exception when others then
  raise warning 'pgshift: %', sqlerrm;
end
"#
    )
}

/// The schema holding the trigger functions (DMS's `ddlArtifactsSchema`; `public` unless set).
pub fn artifacts_schema(capture: &Capture) -> &str {
    if capture.ddl_schema.is_empty() {
        "public"
    } else {
        &capture.ddl_schema
    }
}

/// Creates (or updates, when the selection or the capture changed) the event triggers and
/// their functions: the follow trigger (which also sends the schema-change messages) and, when
/// schema changes are captured, the drop trigger. Returns false, changing nothing, when the
/// role may not create event triggers.
pub async fn ensure(
    client: &Client,
    name: &str,
    capture: &Capture,
    version_num: i32,
    superuser: bool,
) -> Result<bool> {
    if !superuser {
        return Ok(false);
    }
    let schema = artifacts_schema(capture);
    let trigger = trigger_name(name);
    let drop_trigger = drop_trigger_name(name);
    let body = body(name, capture, version_num);
    let ddl = captures_ddl(capture, version_num);
    let drop_body = drop_body(name, capture);
    let current = function_body(client, schema, &trigger).await?;
    let current_drop = function_body(client, schema, &drop_trigger).await?;
    let up_to_date = current.as_deref() == Some(body.as_str())
        && trigger_exists(client, &trigger).await?
        && if ddl {
            current_drop.as_deref() == Some(drop_body.as_str())
                && trigger_exists(client, &drop_trigger).await?
        } else {
            !trigger_exists(client, &drop_trigger).await?
        };
    if up_to_date {
        return Ok(true);
    }
    let q = quote_ident(schema);
    let func = format!("{q}.{}", quote_ident(&trigger));
    let drop_func = format!("{q}.{}", quote_ident(&drop_trigger));
    let drops = if ddl {
        format!(
            "create or replace function {drop_func}() returns event_trigger language plpgsql \
             security definer set search_path = pg_catalog, pg_temp as $pgshift${drop_body}$pgshift$; \
             drop event trigger if exists {t}; \
             create event trigger {t} on sql_drop execute function {drop_func}();",
            t = quote_ident(&drop_trigger)
        )
    } else {
        format!(
            "drop event trigger if exists {};",
            quote_ident(&drop_trigger)
        )
    };
    // Under the task's publication lock: two first runs at once do this one after the other.
    let sql = format!(
        "select pg_advisory_xact_lock(hashtext('pgshift publication ' || '{lock}')); \
         create schema if not exists {q}; \
         create or replace function {func}() returns event_trigger language plpgsql \
         security definer set search_path = pg_catalog, pg_temp as $pgshift${body}$pgshift$; \
         drop event trigger if exists {t}; \
         create event trigger {t} on ddl_command_end \
         when tag in ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE') \
         execute function {func}(); {drops}",
        t = quote_ident(&trigger),
        lock = name.replace('\'', "''")
    );
    // One simple query: one implicit transaction, all of it or nothing.
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| Error::postgres("creating the follow trigger", e))?;
    Ok(true)
}

async fn function_body(client: &Client, schema: &str, function: &str) -> Result<Option<String>> {
    Ok(client
        .query_opt(
            "select p.prosrc from pg_proc p join pg_namespace n on n.oid = p.pronamespace \
             where n.nspname = $1 and p.proname = $2",
            &[&schema, &function],
        )
        .await
        .map_err(|e| Error::postgres("reading the follow trigger's function", e))?
        .map(|r| r.get(0)))
}

async fn trigger_exists(client: &Client, trigger: &str) -> Result<bool> {
    Ok(client
        .query_opt(
            "select 1 from pg_event_trigger where evtname = $1",
            &[&trigger],
        )
        .await
        .map_err(|e| Error::postgres("reading event triggers", e))?
        .is_some())
}

/// Drops the event triggers and their functions, wherever they live (teardown); missing
/// ones are fine.
pub async fn drop(client: &Client, name: &str) -> Result<bool> {
    let mut existed = false;
    for trigger in [trigger_name(name), drop_trigger_name(name)] {
        existed |= trigger_exists(client, &trigger).await?;
        let functions: Vec<String> = client
            .query(
                "select quote_ident(n.nspname) || '.' || quote_ident(p.proname) from pg_proc p \
                 join pg_namespace n on n.oid = p.pronamespace \
                 where p.proname = $1 and p.prorettype = 'event_trigger'::regtype",
                &[&trigger],
            )
            .await
            .map_err(|e| Error::postgres("finding the follow trigger's functions", e))?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        let mut sql = format!("drop event trigger if exists {};", quote_ident(&trigger));
        for f in functions {
            sql.push_str(&format!(" drop function if exists {f}();"));
        }
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| Error::postgres("dropping the follow trigger", e))?;
    }
    Ok(existed)
}
