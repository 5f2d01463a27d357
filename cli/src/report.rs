//! Human-readable output.

use std::fmt::Write as _;

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
