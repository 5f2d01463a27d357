//! The poll's metrics as CloudWatch Embedded Metric Format (DMS metric names where they exist).

use crate::state::now_ms;
use crate::state::records::PollReport;

/// CloudWatch Embedded Metric Format line for a poll (DMS metric names where they exist).
pub fn emf_line(report: &PollReport) -> String {
    let mut metrics = vec![
        serde_json::json!({"Name": "CDCLatencySource", "Unit": "Seconds"}),
        serde_json::json!({"Name": "CDCIncomingChanges", "Unit": "Count"}),
        serde_json::json!({"Name": "CDCRowsStaged", "Unit": "Count"}),
        serde_json::json!({"Name": "CDCBytesStaged", "Unit": "Bytes"}),
        serde_json::json!({"Name": "SlotRetainedBytes", "Unit": "Bytes"}),
        serde_json::json!({"Name": "EventsPut", "Unit": "Count"}),
        serde_json::json!({"Name": "EventsFailed", "Unit": "Count"}),
    ];
    let mut line = serde_json::json!({
        "Task": report.task,
        "CDCLatencySource": report.latency_secs,
        "CDCIncomingChanges": report.changes,
        "CDCRowsStaged": report.rows_staged,
        "CDCBytesStaged": report.bytes_staged,
        "SlotRetainedBytes": report.slot_retained_bytes,
        "EventsPut": report.events_put,
        "EventsFailed": report.events_failed,
    });
    // Only when the server reports it (PostgreSQL 13+ with max_slot_wal_keep_size set): an
    // unknown value is no data point, never a made-up -1.
    if let Some(safe) = report.slot_safe_wal_size {
        metrics.push(serde_json::json!({"Name": "SlotSafeWalSize", "Unit": "Bytes"}));
        line["SlotSafeWalSize"] = serde_json::json!(safe);
    }
    line["_aws"] = serde_json::json!({
        "Timestamp": now_ms(),
        "CloudWatchMetrics": [{
            "Namespace": "pgshift",
            "Dimensions": [["Task"]],
            "Metrics": metrics,
        }]
    });
    line.to_string()
}
