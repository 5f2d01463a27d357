//! Human-readable output.

use std::fmt::Write as _;

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use pgshift::job::apply::ApplyReport;
use pgshift::job::full_load::reload::ReloadReport;
use pgshift::job::full_load::{LoadReport, Progress};
use pgshift::job::status::TaskStatus;
use pgshift::job::test_endpoint::EndpointReport;
use pgshift::job::validate::ValidateReport;
use pgshift::source::checks::Status;
use pgshift::state::records::{Outcome, PollReport};

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
        Outcome::LeaseHeld { owner, expires_ms } => format!(
            "task {}: another poller ({owner}) holds the lease until {}; nothing done (--force takes it)",
            r.task,
            pgshift::state::records::human_time(*expires_ms)
        ),
        outcome => format!(
            "task {}: {} changes in {} transactions, {} batches, {} staged in {}; checkpoint {} -> {} (target {}); slot {} retains {} ({}){}",
            r.task,
            r.changes,
            r.transactions,
            r.batches.len(),
            human_bytes(r.bytes_staged as i64),
            human_secs(r.elapsed_ms),
            r.start_checkpoint,
            r.checkpoint,
            r.target,
            r.slot,
            human_bytes(r.slot_retained_bytes),
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

/// A progress bar on stderr while a load, apply's load or validate runs (only when stderr is
/// a terminal): `what` done of their total, rows, MB and rows/s.
pub(crate) fn spawn_progress(
    progress: Arc<Progress>,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{spinner}} {what} {{pos}}/{{len}} {{msg}} [{{elapsed_precise}}]"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let started = std::time::Instant::now();
        loop {
            let rows = progress.rows.load(Relaxed);
            let bytes = progress.bytes.load(Relaxed);
            bar.set_length(progress.chunks_total.load(Relaxed));
            bar.set_position(progress.chunks_done.load(Relaxed));
            let secs = started.elapsed().as_secs_f64().max(0.001);
            bar.set_message(format!(
                "{rows} rows, {:.1} MB, {:.0} rows/s",
                bytes as f64 / 1e6,
                rows as f64 / secs
            ));
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
}

/// The end of a load.
pub(crate) fn load_summary(r: &LoadReport) -> String {
    format!(
        "task {}: {} tables, {} chunks, {} rows, {:.1} MB in {:.1} s ({:.0} rows/s){}",
        r.task,
        r.tables,
        r.chunks,
        r.rows,
        r.bytes as f64 / 1e6,
        r.elapsed_ms as f64 / 1000.0,
        r.rows_per_sec,
        match r.l0 {
            Some(l0) => format!(
                "; CDC continues from {l0} (pgshift cdc --task {} ...)",
                r.task
            ),
            None => String::new(),
        }
    )
}

pub(crate) fn reload_summary(r: &ReloadReport) -> String {
    format!(
        "task {}: reloaded {} from {} ({} chunks{}, {} rows, {} in {}, {:.0} rows/s); a target applies it once it has applied CDC through {}",
        r.task,
        r.tables.join(", "),
        r.r0,
        r.chunks,
        if r.resumed > 0 {
            format!(", {} exported by an earlier run", r.resumed)
        } else {
            String::new()
        },
        r.rows,
        human_bytes(r.bytes as i64),
        human_secs(r.elapsed_ms),
        r.rows_per_sec,
        r.r0
    )
}

/// Validation, one line per table.
pub(crate) fn validate_table(r: &ValidateReport) -> String {
    let mut out = String::new();
    for t in &r.tables {
        let target = t
            .target_rows
            .map_or("missing".to_owned(), |n| n.to_string());
        let _ = writeln!(
            out,
            "{:<5} {}.{}  source {} rows, target {} rows, checksum {} / {}, {} key ranges",
            if t.equal { "EQUAL" } else { "DIFF" },
            t.schema,
            t.table,
            t.source_rows,
            target,
            t.source_checksum.hex(),
            t.target_checksum.map_or("-".to_owned(), |c| c.hex()),
            t.ranges
        );
        for d in &t.schema_differences {
            let _ = writeln!(out, "      schema: {d}");
        }
        for r in t.differing_ranges.iter().take(10) {
            let _ = writeln!(
                out,
                "      range [{}, {}): source {} rows, target {} rows",
                r.lower.as_deref().unwrap_or("-inf"),
                r.upper.as_deref().unwrap_or("+inf"),
                r.source_rows,
                r.target_rows
            );
        }
        if !t.differing_keys.is_empty() {
            let _ = writeln!(
                out,
                "      first differing keys: {}",
                t.differing_keys.join("; ")
            );
        }
    }
    let _ = writeln!(
        out,
        "{}",
        if r.equal {
            "target equals source"
        } else {
            "target differs from source"
        }
    );
    out
}

/// A task's status for people.
pub(crate) fn status_text(s: &TaskStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "task        {}", s.task);
    let _ = writeln!(
        out,
        "slot        {} (L0 {})",
        s.slot.as_deref().unwrap_or("-"),
        s.l0.map_or("-".to_owned(), |l| l.to_string())
    );
    let _ = writeln!(out, "full load   {}", s.load);
    for t in &s.tables {
        let _ = writeln!(
            out,
            "  {}.{}: {}/{} chunks, {} rows",
            t.schema, t.table, t.chunks_done, t.chunks, t.rows
        );
    }
    let _ = writeln!(
        out,
        "cdc         checkpoint {}, {} batches{}",
        s.checkpoint.map_or("-".to_owned(), |l| l.to_string()),
        s.batches,
        s.lease_owner
            .as_ref()
            .map_or(String::new(), |o| format!(", lease held by {o}"))
    );
    for r in &s.reloads {
        let _ = writeln!(
            out,
            "reload      {} from {}: {}",
            r.tables.join(", "),
            r.r0.map_or("-".to_owned(), |l| l.to_string()),
            r.status
        );
    }
    if let Some(p) = &s.last_poll {
        let _ = writeln!(
            out,
            "last poll   {} changes, latency {:.1} s, slot retained {} ({})",
            p.changes,
            p.latency_secs,
            human_bytes(p.slot_retained_bytes),
            p.slot_wal_status
        );
    }
    if let Some(lag) = s.lag_bytes {
        let _ = writeln!(
            out,
            "live        {} behind the source; slot retains {} ({})",
            human_bytes(lag as i64),
            human_bytes(s.slot_retained_bytes.unwrap_or(0)),
            s.slot_wal_status.as_deref().unwrap_or("-")
        );
    }
    if let Some(t) = &s.target {
        match &t.applied {
            None => {
                let _ = writeln!(out, "target      apply never ran for this task");
            }
            Some(a) => {
                let _ = writeln!(
                    out,
                    "target      applied to {} ({} batches{}); {} of staged batches to apply, lag {}",
                    a.position,
                    a.batches,
                    if a.load_complete {
                        ", load applied"
                    } else {
                        ", load not applied"
                    },
                    human_bytes(t.behind_bytes.unwrap_or(0) as i64),
                    t.lag_seconds
                        .map_or("-".to_owned(), |l| format!("{l:.1} s"))
                );
            }
        }
    }
    out
}

/// What `cutover` did and what the user does next.
pub(crate) fn cutover_text(
    until: pgshift::lsn::Lsn,
    applied: &ApplyReport,
    sequences: &[pgshift::target::SequenceSync],
    validation: &pgshift::job::validate::ValidateReport,
    task: &str,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "caught up   the target is at {} (the source was at {until}); {} batches, {} changes applied now",
        applied.position, applied.batches_applied, applied.changes_applied
    );
    let set = sequences.iter().filter(|s| s.set).count();
    let _ = writeln!(
        out,
        "sequences   {set} of {} set to the source's values",
        sequences.len()
    );
    for s in sequences.iter().filter(|s| !s.set) {
        let _ = writeln!(
            out,
            "  missing on the target: {}.{} (source at {})",
            s.schema,
            s.name,
            s.last_value.map_or("unused".to_owned(), |v| v.to_string())
        );
    }
    out.push_str(&validate_table(validation));
    if validation.equal {
        let _ = writeln!(
            out,
            "next        point the applications at the target; then `pgshift teardown --task {task}` drops the slot and publications on the source"
        );
    } else {
        let _ = writeln!(
            out,
            "next        the target differs (above): keep the source in service, find the cause, run cutover again"
        );
    }
    out
}

/// One line per apply run.
/// Bytes for people: `512 B`, `1.5 kB`, `148 MB`, `2.30 GB` (decimal units, as `du --si`).
pub(crate) fn human_bytes(n: i64) -> String {
    let v = n as f64;
    let a = v.abs();
    if a < 1e3 {
        format!("{n} B")
    } else if a < 1e6 {
        format!("{:.1} kB", v / 1e3)
    } else if a < 1e9 {
        format!("{:.1} MB", v / 1e6)
    } else if a < 1e12 {
        format!("{:.2} GB", v / 1e9)
    } else {
        format!("{:.2} TB", v / 1e12)
    }
}

/// Milliseconds for people: `850 ms`, `12.4 s`, `3 min 05 s`.
pub(crate) fn human_secs(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {:02} s", ms / 60_000, (ms / 1000) % 60)
    }
}

pub(crate) fn apply_summary(report: &ApplyReport, took: std::time::Duration) -> String {
    let secs = took.as_secs_f64().max(0.001);
    let rate = if report.changes_applied > 0 {
        format!(", {:.0} changes/s", report.changes_applied as f64 / secs)
    } else {
        String::new()
    };
    format!(
        "task {}: {}{} batches, {} changes applied ({} set-based) in {}{rate}; target at {}",
        report.task,
        if report.load_applied {
            format!(
                "load applied ({} rows, {} chunks{}); ",
                report.load_rows,
                report.load_chunks,
                if report.load_chunks_resumed > 0 {
                    format!(", {} loaded by an earlier run", report.load_chunks_resumed)
                } else {
                    String::new()
                }
            )
        } else {
            String::new()
        },
        report.batches_applied,
        report.changes_applied,
        report.changes_set_based,
        human_secs(took.as_millis() as u64),
        report.position
    ) + &reload_lines(report)
        + &schema_lines(report)
}

/// The reloads applied.
fn reload_lines(report: &ApplyReport) -> String {
    if report.reloads_applied.is_empty() {
        return String::new();
    }
    format!(
        "\nreloaded: {} ({} rows, {} later changes re-applied over them)",
        report.reloads_applied.join(", "),
        report.reload_rows,
        report.reload_changes_replayed
    )
}

/// The staged schema's statements run, and each one the target refused (or not carried).
fn schema_lines(report: &ApplyReport) -> String {
    let mut out = String::new();
    if report.schema_items > 0 {
        out.push_str(&format!(
            "\nschema: {} statements run (pre-data before the load, post-data after it)",
            report.schema_items
        ));
    }
    for s in &report.schema_skipped {
        out.push_str(&format!("\n  not created: {s}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{human_bytes, human_secs};

    #[test]
    fn units_for_people() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1_500), "1.5 kB");
        assert_eq!(human_bytes(154_922_128), "154.9 MB");
        assert_eq!(human_bytes(2_300_000_000), "2.30 GB");
        assert_eq!(human_secs(850), "850 ms");
        assert_eq!(human_secs(12_400), "12.4 s");
        assert_eq!(human_secs(185_000), "3 min 05 s");
    }
}
