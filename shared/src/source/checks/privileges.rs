//! The privileges a migration needs: replication (a slot), SELECT on every selected table
//! (the load), and what creating the publication and the DDL capture objects takes.

use tokio_postgres::Client;

use super::{Check, CheckOptions, NAMES_SHOWN, Status, names, rds_or};
use crate::error::{Error, Result};
use crate::source::catalog::{ServerInfo, TableInfo};
use crate::source::quote_ident;

pub(super) fn replication_privilege_check(server: &ServerInfo) -> Check {
    if server.replication {
        let how = if server.superuser {
            "superuser"
        } else {
            "REPLICATION or rds_replication"
        };
        return Check::pass(
            "replication_privilege",
            format!("{} has {how}", server.user),
        );
    }
    Check::new(
        "replication_privilege",
        Status::Fail,
        format!(
            "{} has neither REPLICATION nor rds_replication: it cannot create or read a slot",
            server.user
        ),
        rds_or(
            server,
            &format!("GRANT rds_replication TO {};", quote_ident(&server.user)),
            &format!("ALTER ROLE {} WITH REPLICATION;", quote_ident(&server.user)),
        ),
    )
}

pub(super) fn select_privilege_check(server: &ServerInfo, tables: &[TableInfo]) -> Check {
    let denied: Vec<&TableInfo> = tables.iter().filter(|t| !t.can_select).collect();
    if denied.is_empty() {
        return Check::pass(
            "select_privilege",
            format!("SELECT on all {} selected tables", tables.len()),
        );
    }
    let grants: Vec<String> = denied
        .iter()
        .take(NAMES_SHOWN)
        .map(|t| {
            format!(
                "GRANT SELECT ON {} TO {};",
                t.quoted(),
                quote_ident(&server.user)
            )
        })
        .collect();
    Check::new(
        "select_privilege",
        Status::Fail,
        format!(
            "{} cannot read {} selected tables: {}",
            server.user,
            denied.len(),
            names(&denied)
        ),
        grants.join(" "),
    )
}

pub(super) async fn create_privilege_check(
    client: &Client,
    server: &ServerInfo,
    tables: &[TableInfo],
    opts: &CheckOptions,
) -> Result<Check> {
    if let Some(pub_name) = &opts.publication_name {
        let row = client
            .query_opt(
                "select puballtables from pg_publication where pubname = $1",
                &[pub_name],
            )
            .await
            .map_err(|e| Error::postgres("reading publications", e))?;
        if let Some(row) = row {
            let all: bool = row.get(0);
            return Ok(if all {
                Check::new(
                    "create_privilege",
                    Status::Warn,
                    format!(
                        "publication {pub_name} is FOR ALL TABLES (an earlier pgshift): UPDATE and DELETE on any table without a replica identity fail on the source while it is"
                    ),
                    "run the task's next poll (pgshift cdc --once): it replaces the publication with the selected tables",
                )
            } else {
                Check::pass(
                    "create_privilege",
                    format!(
                        "publication {pub_name} exists; pgshift keeps it to the selected tables"
                    ),
                )
            });
        }
    }
    let can_create: bool = client
        .query_one(
            "select has_database_privilege(current_database(), 'create')",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("checking CREATE on the database", e))?
        .get(0);
    if !can_create {
        return Ok(Check::new(
            "create_privilege",
            Status::Fail,
            format!(
                "{} lacks CREATE on database {}: it cannot create the publication",
                server.user, server.database
            ),
            format!(
                "GRANT CREATE ON DATABASE {} TO {};",
                quote_ident(&server.database),
                quote_ident(&server.user)
            ),
        ));
    }
    let not_owned: Vec<&TableInfo> = tables.iter().filter(|t| !t.is_owner).collect();
    if not_owned.is_empty() {
        return Ok(Check::pass(
            "create_privilege",
            "the publications list exactly the selected tables (never FOR ALL TABLES); each poll adds tables that newly match",
        ));
    }
    Ok(Check::new(
        "create_privilege",
        Status::Fail,
        format!(
            "{} does not own {} selected tables ({}): ALTER PUBLICATION .. ADD TABLE needs ownership, so their changes would not be captured",
            server.user,
            not_owned.len(),
            names(&not_owned)
        ),
        "GRANT <owner role> TO <pgshift user>; (or run pgshift as the tables' owner)",
    ))
}
