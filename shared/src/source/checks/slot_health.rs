//! The replication slots' health: each slot's retained WAL and whether it can still be
//! used, the task's own slot first.

use std::fmt::Write as _;

use tokio_postgres::Client;

use super::{Check, CheckOptions, Status, bytes_text};
use crate::error::{Error, Result};
use crate::source::catalog::ServerInfo;

const SLOT_HEALTH_13: &str = "select slot_name::text, coalesce(plugin::text, ''), coalesce(database::text, ''), active, \
 coalesce(wal_status, ''), safe_wal_size, \
 coalesce(pg_wal_lsn_diff(case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end, restart_lsn), 0)::int8 \
 from pg_replication_slots where slot_type = 'logical' order by slot_name";
const SLOT_HEALTH_10: &str = "select slot_name::text, coalesce(plugin::text, ''), coalesce(database::text, ''), active, \
 ''::text, null::int8, \
 coalesce(pg_wal_lsn_diff(case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end, restart_lsn), 0)::int8 \
 from pg_replication_slots where slot_type = 'logical' order by slot_name";

/// Retained WAL above which an inactive slot is reported.
const RETAINED_WARN_BYTES: i64 = 1 << 30;

/// The task's own slot: lost, not the task's kind, retaining much WAL, or fine.
pub(super) fn task_slot_verdict(lost: bool, fits: bool, at_risk: bool) -> (Status, &'static str) {
    if lost {
        (
            Status::Fail,
            "the slot lost WAL it needed: start the task over (pgshift teardown --reset, then pgshift full-load --cdc)",
        )
    } else if !fits {
        (
            Status::Fail,
            "the task's slot exists with another plugin or database: choose another slot name or drop it",
        )
    } else if at_risk {
        (
            Status::Warn,
            "the slot retains much WAL: run the CDC poller (pgshift cdc) so it advances",
        )
    } else {
        (Status::Pass, "")
    }
}

pub(super) async fn slot_health_checks(
    client: &Client,
    server: &ServerInfo,
    opts: &CheckOptions,
) -> Result<Vec<Check>> {
    let sql = if server.version_num >= 130_000 {
        SLOT_HEALTH_13
    } else {
        SLOT_HEALTH_10
    };
    let rows = client
        .query(sql, &[])
        .await
        .map_err(|e| Error::postgres("reading replication slots", e))?;
    let mut checks = Vec::new();
    let mut task_slot_seen = false;
    let mut worries = Vec::new();
    for r in &rows {
        let name: String = r.get(0);
        let plugin: String = r.get(1);
        let database: String = r.get(2);
        let active: bool = r.get(3);
        let wal_status: String = r.get(4);
        let safe: Option<i64> = r.get(5);
        let retained: i64 = r.get(6);
        let mut detail = format!(
            "slot {name} ({plugin}, database {database}, {}): retains {}",
            if active { "active" } else { "inactive" },
            bytes_text(retained)
        );
        if !wal_status.is_empty() {
            let _ = write!(detail, ", wal_status {wal_status}");
        }
        if let Some(s) = safe {
            let _ = write!(detail, ", safe_wal_size {}", bytes_text(s));
        }
        let is_task = opts.slot_name.as_deref() == Some(name.as_str());
        task_slot_seen |= is_task;
        let lost = wal_status == "lost";
        let at_risk = wal_status == "unreserved" || (!active && retained > RETAINED_WARN_BYTES);
        if is_task {
            let fits = plugin == "pgoutput" && database == server.database;
            let (status, remedy) = task_slot_verdict(lost, fits, at_risk);
            checks.push(Check::new("task_slot", status, detail, remedy));
        } else if lost || at_risk {
            worries.push(detail);
        }
    }
    if let Some(slot) = &opts.slot_name
        && !task_slot_seen
    {
        checks.push(Check::pass(
            "task_slot",
            format!("slot {slot} does not exist yet; the full load creates it"),
        ));
    }
    checks.push(if worries.is_empty() {
        Check::pass(
            "slot_health",
            format!("{} logical slots, none lost or retaining over {}", rows.len(), bytes_text(RETAINED_WARN_BYTES)),
        )
    } else {
        Check::new(
            "slot_health",
            Status::Warn,
            worries.join("; "),
            "drop slots nobody consumes (SELECT pg_drop_replication_slot('<name>')): an idle slot keeps WAL until the disk fills",
        )
    });
    Ok(checks)
}
