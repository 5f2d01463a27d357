//! What a migration carries beyond rows: whether schema changes are captured in order
//! (`ddl_capture`), and the extensions column types come from (`extensions`), with a target
//! when one is given.

use tokio_postgres::Client;

use super::{Check, CheckOptions, Status, rds_or};
use crate::error::{Error, Result};
use crate::source::catalog::ServerInfo;

/// What happens to schema changes (DESIGN §12): captured in order by the event trigger's
/// messages, or explained from the catalog when a table's next row shows new columns — and
/// then what is lost.
pub(super) fn ddl_capture_check(server: &ServerInfo, opts: &CheckOptions) -> Check {
    const LOST: &str = "a DROP TABLE, a table created that gets no rows, a changed default or NOT NULL and an added generated column are not carried; several changes of one table between two polls are collapsed into one (an added column's value for existing rows may then be lost); rows a new table gets before the next poll are not captured";
    let why = if !opts.capture_ddl {
        "schema-change capture is off (--capture-ddl false)".to_owned()
    } else if server.version_num < 140_000 {
        format!(
            "PostgreSQL {} decodes no logical messages for pgoutput (14+ does)",
            server.version
        )
    } else if !server.superuser {
        format!(
            "{} may not create event triggers (superuser only)",
            server.user
        )
    } else {
        return Check::pass(
            "ddl_capture",
            "schema changes are captured in order with the data by pgshift's event trigger (DDL inside functions and DO blocks too)",
        );
    };
    Check::new(
        "ddl_capture",
        Status::Warn,
        format!(
            "{why}: schema changes are read from the catalog when a table's next row shows them; {LOST}"
        ),
        if server.version_num < 140_000 {
            "upgrade the source to PostgreSQL 14 or later, and run pgshift as a superuser"
                .to_owned()
        } else {
            rds_or(
                server,
                "run pgshift's first poll as the master user (rds_superuser) so it can create the trigger, or accept the catalog fallback",
                "run pgshift's first poll as a superuser so it can create the trigger, or accept the catalog fallback",
            )
        },
    )
}

/// Extensions whose types the selected tables use (PostGIS's geometry and geography, ..):
/// staged as their text output and created on the target by apply; with `--target`, whether
/// the target can have each (`pg_available_extensions`).
pub(super) async fn extensions_check(client: &Client, opts: &CheckOptions) -> Result<Check> {
    let rows = client
        .query(
            "select distinct e.extname::text, e.extversion, n.nspname::text, c.relname::text
             from pg_attribute a join pg_class c on c.oid = a.attrelid
             join pg_namespace n on n.oid = c.relnamespace
             join pg_type t on t.oid = a.atttypid
             join pg_depend d on d.classid = 'pg_type'::regclass and d.deptype = 'e'
               and d.refclassid = 'pg_extension'::regclass
               and d.objid in (t.oid, t.typelem, t.typbasetype)
             join pg_extension e on e.oid = d.refobjid
             where c.relkind in ('r', 'p') and a.attnum > 0 and not a.attisdropped
               and n.nspname not in ('pg_catalog', 'information_schema')
             order by 1, 3, 4",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("reading the extensions column types come from", e))?;
    let mut used: Vec<(String, String, Vec<String>)> = Vec::new();
    for r in &rows {
        let (ext, version, schema, table): (String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        if !opts.selection.selects(&schema, &table) {
            continue;
        }
        match used.iter_mut().find(|u| u.0 == ext) {
            Some(u) => u.2.push(format!("{schema}.{table}")),
            None => used.push((ext, version, vec![format!("{schema}.{table}")])),
        }
    }
    if used.is_empty() {
        return Ok(Check::pass(
            "extensions",
            "no selected column has an extension's type",
        ));
    }
    let listed: Vec<String> = used
        .iter()
        .map(|(e, v, t)| format!("{e} {v} ({})", t.join(", ")))
        .collect();
    let Some(target) = &opts.target else {
        return Ok(Check::pass(
            "extensions",
            format!(
                "columns of extension types: {}; apply creates the extensions on the target (pass --target to check it can)",
                listed.join("; ")
            ),
        ));
    };
    let tc = crate::source::connect(target).await?;
    let mut missing = Vec::new();
    for (ext, _, _) in &used {
        let available = tc
            .query_opt(
                "select coalesce(installed_version, default_version) from pg_available_extensions where name = $1",
                &[ext],
            )
            .await
            .map_err(|e| Error::postgres("reading the target's available extensions", e))?;
        if available.is_none() {
            missing.push(ext.clone());
        }
    }
    if missing.is_empty() {
        return Ok(Check::pass(
            "extensions",
            format!(
                "columns of extension types: {}; the target has each available",
                listed.join("; ")
            ),
        ));
    }
    Ok(Check::new(
        "extensions",
        Status::Fail,
        format!(
            "the target cannot create {} (not in pg_available_extensions), which columns use: {}",
            missing.join(", "),
            listed.join("; ")
        ),
        format!(
            "install the extension's package on the target (Debian: postgresql-<major>-{}), or on RDS enable it",
            if missing.iter().any(|m| m == "postgis") {
                "postgis-3"
            } else {
                "<extension>"
            }
        ),
    ))
}
