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

/// The function's body for `selection`, in the schema `public`.
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
    format!(
        r#"
declare
  obj record;
  rel record;
  nsp text;
  keyed boolean;
  into_pub text;
  out_pub text;
begin
  for obj in select objid from pg_event_trigger_ddl_commands() where object_type = 'table' loop
    begin
      select c.oid, c.relname, c.relkind, c.relispartition, c.relreplident, c.relnamespace
        into rel from pg_class c where c.oid = obj.objid and c.relkind in ('r', 'p');
      if not found or {skip_partitions} then
        continue;
      end if;
      select n.nspname::text into nsp from pg_namespace n where n.oid = rel.relnamespace;
      if not {selected} then
        continue;
      end if;
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

/// Creates (or updates, when the selection changed) the event trigger and its function.
/// Returns false, changing nothing, when the role may not create event triggers.
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
    let trigger = trigger_name(name);
    let body = body(name, capture, version_num);
    let current: Option<String> = client
        .query_opt(
            "select p.prosrc from pg_proc p join pg_namespace n on n.oid = p.pronamespace \
             where n.nspname = 'public' and p.proname = $1",
            &[&trigger],
        )
        .await
        .map_err(|e| Error::postgres("reading the follow trigger's function", e))?
        .map(|r| r.get(0));
    let has_trigger = trigger_exists(client, &trigger).await?;
    if current.as_deref() == Some(body.as_str()) && has_trigger {
        return Ok(true);
    }
    let func = format!("public.{}", quote_ident(&trigger));
    // Under the task's publication lock: two first runs at once do this one after the other.
    let sql = format!(
        "select pg_advisory_xact_lock(hashtext('pgshift publication ' || '{lock}')); \
         create or replace function {func}() returns event_trigger language plpgsql \
         security definer set search_path = pg_catalog, pg_temp as $pgshift${body}$pgshift$; \
         drop event trigger if exists {t}; \
         create event trigger {t} on ddl_command_end \
         when tag in ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE') \
         execute function {func}()",
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

/// Drops the event trigger and its function (teardown); missing ones are fine.
pub async fn drop(client: &Client, name: &str) -> Result<bool> {
    let trigger = trigger_name(name);
    let existed = trigger_exists(client, &trigger).await?;
    client
        .batch_execute(&format!(
            "drop event trigger if exists {t}; drop function if exists public.{t}()",
            t = quote_ident(&trigger)
        ))
        .await
        .map_err(|e| Error::postgres("dropping the follow trigger", e))?;
    Ok(existed)
}
