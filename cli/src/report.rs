//! Human-readable output.

use std::fmt::Write as _;

use pgshift::job::cdc_poll::{Outcome, PollReport};
use pgshift::job::test_endpoint::EndpointReport;
use pgshift::source::checks::Status;

/// The endpoint report as a table: one line per check, the remedy under each warn or fail.
pub(crate) fn endpoint_table(report: &EndpointReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "endpoint  {}", report.endpoint);
    if let Some(s) = &report.server {
        let mut flavour = Vec::new();
        if s.is_aurora {
            flavour.push("Aurora");
        } else if s.is_rds {
            flavour.push("RDS");
        }
        if s.in_recovery {
            flavour.push("standby");
        }
        let flavour = if flavour.is_empty() {
            String::new()
        } else {
            format!(" ({})", flavour.join(", "))
        };
        let _ = writeln!(out, "server    PostgreSQL {}{flavour}", s.version);
    }
    let width = report
        .checks
        .iter()
        .map(|c| c.id.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<6} {:<width$}  DETAIL", "STATUS", "CHECK");
    for c in &report.checks {
        let _ = writeln!(
            out,
            "{:<6} {:<width$}  {}",
            c.status.as_str().to_uppercase(),
            c.id,
            c.detail
        );
        if c.status != Status::Pass && !c.remedy.is_empty() {
            let _ = writeln!(out, "{:<6} {:<width$}  -> {}", "", "", c.remedy);
        }
    }
    let count = |s: Status| report.checks.iter().filter(|c| c.status == s).count();
    let _ = writeln!(
        out,
        "\n{}: {} pass, {} warn, {} fail ({} ms)",
        if report.ok { "OK" } else { "FAILED" },
        count(Status::Pass),
        count(Status::Warn),
        count(Status::Fail),
        report.elapsed_ms
    );
    out
}

/// One line per poll.
pub(crate) fn poll_summary(r: &PollReport) -> String {
    match &r.outcome {
        Outcome::LeaseHeld { owner, .. } => format!(
            "task {}: another poller ({owner}) holds the lease; nothing done",
            r.task
        ),
        outcome => format!(
            "task {}: {} changes in {} transactions, {} batches, {} bytes staged; checkpoint {} -> {} (target {}); slot {} retains {} bytes ({}){}",
            r.task,
            r.changes,
            r.transactions,
            r.batches.len(),
            r.bytes_staged,
            r.start_checkpoint,
            r.checkpoint,
            r.target,
            r.slot,
            r.slot_retained_bytes,
            if r.slot_wal_status.is_empty() {
                "n/a"
            } else {
                &r.slot_wal_status
            },
            match outcome {
                Outcome::DeadlineReached => "; stopped at the deadline",
                Outcome::MoreWaiting => "; more changes waiting",
                _ => "",
            }
        ),
    }
}
