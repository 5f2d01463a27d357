//! The endpoint checks: what DMS's PostgreSQL premigration assessments check, and what bites
//! DMS and Debezium users later (idle slots filling the disk, tables whose updates cannot be
//! captured, TOAST placeholders, transactions that block slot creation).
//!
//! Every check has a stable `id`, a status, a `detail` with the observed value and a `remedy`
//! a person can act on (the setting or GRANT to run; the RDS parameter-group setting on RDS).
//! All queries run in one READ ONLY transaction: the checks never change the source.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::catalog::{self, ServerInfo, TableInfo};
use super::slot::SlotUsage;
use crate::error::{Error, Result};
use crate::selection::Selection;

mod capture;
mod privileges;
mod slot_health;
mod tables;

use privileges::{create_privilege_check, replication_privilege_check, select_privilege_check};
use slot_health::slot_health_checks;
use tables::{
    case_collision_check, partitions_check, replica_identity_check, table_selection_check,
    toast_check, types_check,
};

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub id: String,
    pub status: Status,
    pub detail: String,
    /// What to do about it; empty when nothing needs doing.
    pub remedy: String,
}

impl Check {
    fn new(
        id: &str,
        status: Status,
        detail: impl Into<String>,
        remedy: impl Into<String>,
    ) -> Check {
        Check {
            id: id.to_owned(),
            status,
            detail: detail.into(),
            remedy: remedy.into(),
        }
    }

    fn pass(id: &str, detail: impl Into<String>) -> Check {
        Check::new(id, Status::Pass, detail, "")
    }
}

/// What the checks look at besides the server.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub selection: Selection,
    /// The task's slot and publication, when known, to check their health and fit.
    pub slot_name: Option<String>,
    pub publication_name: Option<String>,
    /// Transactions open longer than this are reported (they block slot creation).
    pub long_transaction_secs: f64,
    /// Schema changes are to be captured with pgshift's event trigger.
    pub capture_ddl: bool,
    /// The target of a PG → PG migration, to check it can have the extensions the selected
    /// tables' types come from.
    pub target: Option<crate::config::PgConfig>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            selection: Selection::all(),
            slot_name: None,
            publication_name: None,
            long_transaction_secs: 60.0,
            capture_ddl: true,
            target: None,
        }
    }
}

const SETTING_NAMES: &[&str] = &[
    "wal_level",
    "max_wal_senders",
    "wal_sender_timeout",
    "max_slot_wal_keep_size",
    "logical_decoding_work_mem",
    "rds.logical_replication",
    "hot_standby_feedback",
];

/// How many tables a detail line names before it says "and N more".
const NAMES_SHOWN: usize = 10;

/// Runs every check on an open session. The session's transaction is READ ONLY and rolled back.
pub async fn run(client: &Client, opts: &CheckOptions) -> Result<(ServerInfo, Vec<Check>)> {
    client
        .batch_execute("start transaction read only")
        .await
        .map_err(|e| Error::postgres("starting a read-only transaction", e))?;
    let result = run_in_transaction(client, opts).await;
    // Best effort: the session is dropped right after anyway.
    let _ = client.batch_execute("rollback").await;
    result
}

async fn run_in_transaction(
    client: &Client,
    opts: &CheckOptions,
) -> Result<(ServerInfo, Vec<Check>)> {
    let server = catalog::server_info(client).await?;
    let settings = catalog::settings(client, SETTING_NAMES).await?;
    let tables = catalog::user_tables(client, &opts.selection).await?;
    let mut checks = vec![
        Check::pass(
            "reachable",
            format!("connected to {} as {}", server.database, server.user),
        ),
        tls_check(&server),
        Check::pass("auth", format!("authenticated as {}", server.user)),
        version_check(&server),
        wal_level_check(&server, &settings),
        slots_check(client, &server, opts.slot_name.as_deref()).await?,
        wal_senders_check(client, &settings).await?,
        wal_sender_timeout_check(&settings),
        max_slot_wal_keep_size_check(&server, &settings),
        logical_decoding_work_mem_check(&server, &settings),
        replication_privilege_check(&server),
        capture::ddl_capture_check(&server, opts),
        select_privilege_check(&server, &tables),
        create_privilege_check(client, &server, &tables, opts).await?,
        hot_standby_check(&server, &settings),
        long_transactions_check(client, opts).await?,
        prepared_transactions_check(client).await?,
        replica_identity_check(&tables),
        toast_check(&tables),
        partitions_check(&server, &tables),
        case_collision_check(&tables),
        types_check(client, opts).await?,
        capture::extensions_check(client, opts).await?,
        table_selection_check(&tables, opts),
    ];
    checks.extend(slot_health_checks(client, &server, opts).await?);
    Ok((server, checks))
}

fn setting<'a>(settings: &'a HashMap<String, (String, String)>, name: &str) -> Option<&'a str> {
    settings.get(name).map(|(v, _)| v.as_str())
}

fn names(tables: &[&TableInfo]) -> String {
    let mut out = tables
        .iter()
        .take(NAMES_SHOWN)
        .map(|t| t.display_name())
        .collect::<Vec<_>>()
        .join(", ");
    if tables.len() > NAMES_SHOWN {
        let _ = write!(out, " and {} more", tables.len() - NAMES_SHOWN);
    }
    out
}

fn bytes_text(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn rds_or(server: &ServerInfo, rds: &str, plain: &str) -> String {
    if server.is_rds {
        rds.to_owned()
    } else {
        plain.to_owned()
    }
}

fn tls_check(server: &ServerInfo) -> Check {
    if server.tls {
        Check::pass(
            "tls",
            format!(
                "session encrypted ({})",
                server.tls_version.as_deref().unwrap_or("TLS")
            ),
        )
    } else {
        Check::new(
            "tls",
            Status::Warn,
            "session is not encrypted",
            "connect with sslmode=verify-full (and sslrootcert=<CA bundle>; on RDS the RDS global bundle) so credentials and data are encrypted",
        )
    }
}

fn version_check(server: &ServerInfo) -> Check {
    let v = server.version_num;
    let detail = format!("PostgreSQL {}", server.version);
    if v < 120_000 {
        Check::new(
            "version",
            Status::Fail,
            format!(
                "{detail}: pgshift needs PostgreSQL 12 or later (slot copies, version-aware catalog reads; tested on 12 to 18)"
            ),
            "upgrade the source to a supported PostgreSQL (14 or later recommended)",
        )
    } else if v < 140_000 {
        Check::pass(
            "version",
            format!("{detail}: full-load chunks use primary-key ranges (TID range scans need 14+)"),
        )
    } else {
        Check::pass("version", detail)
    }
}

fn wal_level_check(server: &ServerInfo, settings: &HashMap<String, (String, String)>) -> Check {
    let level = setting(settings, "wal_level").unwrap_or("unknown");
    if level == "logical" {
        return Check::pass("wal_level", "wal_level = logical");
    }
    let rds_flag = setting(settings, "rds.logical_replication").unwrap_or("n/a");
    Check::new(
        "wal_level",
        Status::Fail,
        if server.is_rds {
            format!(
                "wal_level = {level} (rds.logical_replication = {rds_flag}): logical decoding is off"
            )
        } else {
            format!("wal_level = {level}: logical decoding is off, CDC cannot start")
        },
        rds_or(
            server,
            "set rds.logical_replication = 1 in the DB (cluster) parameter group and reboot the instance",
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
        ),
    )
}

async fn slots_check(
    client: &Client,
    server: &ServerInfo,
    task_slot: Option<&str>,
) -> Result<Check> {
    let usage = super::slot::slot_usage(client, task_slot.unwrap_or("")).await?;
    let (status, detail) = slots_verdict(usage);
    Ok(if status == Status::Pass {
        Check::pass("replication_slots", detail)
    } else {
        Check::new(
            "replication_slots",
            status,
            detail,
            rds_or(
                server,
                "raise max_replication_slots in the parameter group (reboot), or drop unused slots with pg_drop_replication_slot",
                "ALTER SYSTEM SET max_replication_slots = <more>; restart; or drop unused slots with pg_drop_replication_slot",
            ),
        )
    })
}

/// The task needs its slot, and large CDC drains one more for a moment (the temporary copy a
/// second decoding session reads; without it they decode with one session).
fn slots_verdict(usage: SlotUsage) -> (Status, String) {
    let detail = format!(
        "{} of max_replication_slots = {} in use",
        usage.used, usage.max
    );
    let free = usage.free();
    let for_task = i64::from(!usage.exists);
    if free < for_task {
        (Status::Fail, format!("{detail}: no free slot for the task"))
    } else if free < for_task + 1 {
        (
            Status::Warn,
            format!(
                "{detail}: none free beside the task's for the temporary slot a large CDC drain splits its decoding with; such drains will decode with one session"
            ),
        )
    } else {
        (Status::Pass, detail)
    }
}

async fn wal_senders_check(
    client: &Client,
    settings: &HashMap<String, (String, String)>,
) -> Result<Check> {
    let max: i64 = setting(settings, "max_wal_senders")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let used: i64 = client
        .query_one("select count(*) from pg_stat_replication", &[])
        .await
        .map_err(|e| Error::postgres("counting wal senders", e))?
        .get(0);
    let detail = format!(
        "{used} of max_wal_senders = {max} in use (pgshift decodes over SQL and needs none; standbys and other CDC tools do)"
    );
    Ok(if used < max || max > 0 {
        Check::pass("wal_senders", detail)
    } else {
        Check::new(
            "wal_senders",
            Status::Warn,
            detail,
            "raise max_wal_senders if standbys or other replication consumers must connect",
        )
    })
}

fn wal_sender_timeout_check(settings: &HashMap<String, (String, String)>) -> Check {
    let ms: i64 = setting(settings, "wal_sender_timeout")
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1);
    let detail = format!("wal_sender_timeout = {ms} ms");
    if ms == 0 || ms >= 10_000 {
        Check::pass("wal_sender_timeout", detail)
    } else {
        Check::new(
            "wal_sender_timeout",
            Status::Warn,
            format!("{detail}: below the 10 s DMS requires for streaming consumers"),
            "set wal_sender_timeout to at least 10000 (ms)",
        )
    }
}

fn max_slot_wal_keep_size_check(
    server: &ServerInfo,
    settings: &HashMap<String, (String, String)>,
) -> Check {
    if server.version_num < 130_000 {
        return Check::new(
            "max_slot_wal_keep_size",
            Status::Warn,
            "not available before PostgreSQL 13: a stalled slot can retain WAL until the disk fills",
            "monitor slot retained bytes (pgshift's SlotRetainedBytes metric) and alarm on it",
        );
    }
    let mb: i64 = setting(settings, "max_slot_wal_keep_size")
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1);
    if mb < 0 {
        Check::new(
            "max_slot_wal_keep_size",
            Status::Warn,
            "max_slot_wal_keep_size = -1: a slot whose consumer stops retains WAL without limit",
            rds_or(
                server,
                "set max_slot_wal_keep_size (MB) in the parameter group to what the disk can spare; a slot past it is invalidated instead of filling the disk",
                "ALTER SYSTEM SET max_slot_wal_keep_size = '50GB' (what the disk can spare); SELECT pg_reload_conf()",
            ),
        )
    } else {
        Check::pass(
            "max_slot_wal_keep_size",
            format!("max_slot_wal_keep_size = {}", bytes_text(mb * 1024 * 1024)),
        )
    }
}

fn logical_decoding_work_mem_check(
    server: &ServerInfo,
    settings: &HashMap<String, (String, String)>,
) -> Check {
    if server.version_num < 130_000 {
        return Check::pass(
            "logical_decoding_work_mem",
            "not available before PostgreSQL 13 (large transactions spill to disk at 4096 changes)",
        );
    }
    let kb: i64 = setting(settings, "logical_decoding_work_mem")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Check::pass(
        "logical_decoding_work_mem",
        format!(
            "logical_decoding_work_mem = {} (pgshift raises it for its own sessions)",
            bytes_text(kb * 1024)
        ),
    )
}

fn hot_standby_check(server: &ServerInfo, settings: &HashMap<String, (String, String)>) -> Check {
    if !server.in_recovery {
        return Check::pass("hot_standby", "primary (not in recovery)");
    }
    if server.version_num < 160_000 {
        return Check::new(
            "hot_standby",
            Status::Fail,
            "the source is a standby: logical decoding on a standby needs PostgreSQL 16",
            "point the task at the primary (the writer endpoint on Aurora)",
        );
    }
    let feedback = setting(settings, "hot_standby_feedback").unwrap_or("off");
    Check::new(
        "hot_standby",
        Status::Warn,
        format!(
            "the source is a standby (PostgreSQL 16+ can decode there); hot_standby_feedback = {feedback}"
        ),
        "set hot_standby_feedback = on, or point the task at the primary",
    )
}

const LONG_TRANSACTIONS: &str = "select pid, coalesce(usename::text, ''), coalesce(datname::text, ''), \
 coalesce(state, ''), extract(epoch from now() - xact_start)::float8, backend_xid is not null \
 from pg_stat_activity where xact_start is not null and pid <> pg_backend_pid() \
 and backend_type = 'client backend' and now() - xact_start > make_interval(secs => $1) \
 order by xact_start limit 10";

async fn long_transactions_check(client: &Client, opts: &CheckOptions) -> Result<Check> {
    let rows = client
        .query(LONG_TRANSACTIONS, &[&opts.long_transaction_secs])
        .await
        .map_err(|e| Error::postgres("reading pg_stat_activity", e))?;
    if rows.is_empty() {
        return Ok(Check::pass(
            "long_running_transactions",
            format!(
                "no transaction open longer than {} s",
                opts.long_transaction_secs
            ),
        ));
    }
    let list: Vec<String> = rows
        .iter()
        .map(|r| {
            let writes = if r.get::<_, bool>(5) {
                ", has written"
            } else {
                ""
            };
            format!(
                "pid {} ({}@{}, {}, open {:.0} s{writes})",
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3),
                r.get::<_, f64>(4)
            )
        })
        .collect();
    Ok(Check::new(
        "long_running_transactions",
        Status::Warn,
        format!(
            "{} transactions open longer than {} s: {} (slot creation waits for transactions that write)",
            rows.len(),
            opts.long_transaction_secs,
            list.join("; ")
        ),
        "commit or end them before the full load starts (SELECT pg_terminate_backend(<pid>) as a last resort); set idle_in_transaction_session_timeout",
    ))
}

async fn prepared_transactions_check(client: &Client) -> Result<Check> {
    let rows = client
        .query(
            "select gid, database::text, extract(epoch from now() - prepared)::float8 from pg_prepared_xacts order by prepared limit 10",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("reading pg_prepared_xacts", e))?;
    if rows.is_empty() {
        return Ok(Check::pass(
            "prepared_transactions",
            "no prepared transactions",
        ));
    }
    let list: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} in {} ({:.0} s old)",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, f64>(2)
            )
        })
        .collect();
    Ok(Check::new(
        "prepared_transactions",
        Status::Warn,
        format!(
            "{} prepared transactions: {} (they block slot creation and hold back WAL removal)",
            rows.len(),
            list.join("; ")
        ),
        "COMMIT PREPARED '<gid>' or ROLLBACK PREPARED '<gid>' for each",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_postgres() {
        assert_eq!(bytes_text(512), "512 B");
        assert_eq!(bytes_text(1536), "1.5 kB");
        assert_eq!(bytes_text(64 * 1024 * 1024), "64.0 MB");
    }

    #[test]
    fn slots_leave_room_for_the_task_and_a_split_drain() {
        let verdict = |used, max, exists| slots_verdict(SlotUsage { used, max, exists });
        let status = |used, max, exists| verdict(used, max, exists).0;
        assert_eq!(status(10, 10, false), Status::Fail);
        assert_eq!(status(9, 10, false), Status::Warn);
        assert_eq!(status(8, 10, false), Status::Pass);
        assert_eq!(status(10, 10, true), Status::Warn);
        assert_eq!(status(9, 10, true), Status::Pass);
        assert!(
            verdict(9, 10, false)
                .1
                .contains("9 of max_replication_slots = 10")
        );
    }

    #[test]
    fn status_orders_by_severity() {
        assert!(Status::Fail > Status::Warn && Status::Warn > Status::Pass);
    }
}
