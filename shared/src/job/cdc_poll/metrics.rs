//! The poll's metrics as CloudWatch Embedded Metric Format (DMS metric names where they exist).

use crate::state::now_ms;
use crate::state::records::PollReport;

/// CloudWatch Embedded Metric Format line for a poll (DMS metric names where they exist).
pub fn emf_line(report: &PollReport) -> String {
    serde_json::json!({
        "_aws": {
            "Timestamp": now_ms(),
            "CloudWatchMetrics": [{
                "Namespace": "pgshift",
                "Dimensions": [["Task"]],
                "Metrics": [
                    {"Name": "CDCLatencySource", "Unit": "Seconds"},
                    {"Name": "CDCIncomingChanges", "Unit": "Count"},
                    {"Name": "CDCRowsStaged", "Unit": "Count"},
                    {"Name": "CDCBytesStaged", "Unit": "Bytes"},
                    {"Name": "SlotRetainedBytes", "Unit": "Bytes"},
                    {"Name": "SlotSafeWalSize", "Unit": "Bytes"},
                    {"Name": "EventsPut", "Unit": "Count"},
                    {"Name": "EventsFailed", "Unit": "Count"}
                ]
            }]
        },
        "Task": report.task,
        "CDCLatencySource": report.latency_secs,
        "CDCIncomingChanges": report.changes,
        "CDCRowsStaged": report.rows_staged,
        "CDCBytesStaged": report.bytes_staged,
        "SlotRetainedBytes": report.slot_retained_bytes,
        "SlotSafeWalSize": report.slot_safe_wal_size.unwrap_or(-1),
        "EventsPut": report.events_put,
        "EventsFailed": report.events_failed,
    })
    .to_string()
}
