//! The poll's metrics as CloudWatch Embedded Metric Format (DMS metric names where they exist).

use crate::state::records::PollReport;

/// CloudWatch Embedded Metric Format line for a poll (DMS metric names where they exist).
/// Every poll reports latency, incoming changes (the poller-stopped alarm counts them) and the
/// slot's retained WAL; what only a busy poll has (rows, bytes, events) is reported when not
/// zero, so an idle task pays for three custom metrics, not seven (docs/COST.md).
pub fn emf_line(report: &PollReport) -> String {
    let busy = |n: u64| if n == 0 { f64::NAN } else { n as f64 };
    crate::metrics::emf_line(
        &report.task,
        &[
            ("CDCLatencySource", "Seconds", report.latency_secs),
            ("CDCIncomingChanges", "Count", report.changes as f64),
            ("CDCRowsStaged", "Count", busy(report.rows_staged)),
            ("CDCBytesStaged", "Bytes", busy(report.bytes_staged)),
            (
                "SlotRetainedBytes",
                "Bytes",
                report.slot_retained_bytes as f64,
            ),
            ("EventsPut", "Count", busy(report.events_put)),
            ("EventsFailed", "Count", busy(report.events_failed)),
            // Only when the server reports it (PostgreSQL 13+ with max_slot_wal_keep_size set):
            // an unknown value is no data point, never a made-up -1.
            (
                "SlotSafeWalSize",
                "Bytes",
                report.slot_safe_wal_size.map_or(f64::NAN, |s| s as f64),
            ),
        ],
    )
}
