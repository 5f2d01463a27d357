//! CloudWatch Embedded Metric Format: one JSON line on a Lambda's stdout becomes metrics in the
//! `pgshift` namespace, dimension `Task` (DMS's metric names where DMS has one).

use crate::state::now_ms;

/// One metric of a line: name, CloudWatch unit, value.
pub type Metric = (&'static str, &'static str, f64);

/// The EMF line for `task`'s metrics (values that are not finite are left out: no made-up data
/// points).
pub fn emf_line(task: &str, metrics: &[Metric]) -> String {
    let mut line = serde_json::json!({ "Task": task });
    let mut declared = Vec::new();
    for (name, unit, value) in metrics {
        if !value.is_finite() {
            continue;
        }
        declared.push(serde_json::json!({"Name": name, "Unit": unit}));
        line[*name] = if value.fract() == 0.0 && value.abs() < 9.0e15 {
            serde_json::json!(*value as i64)
        } else {
            serde_json::json!(value)
        };
    }
    line["_aws"] = serde_json::json!({
        "Timestamp": now_ms(),
        "CloudWatchMetrics": [{
            "Namespace": "pgshift",
            "Dimensions": [["Task"]],
            "Metrics": declared,
        }]
    });
    line.to_string()
}

/// An exported chunk (`ExportChunk`): DMS's full-load throughput names plus rows, bytes and the
/// chunk's seconds.
pub fn chunk_line(task: &str, rows: u64, bytes: u64, seconds: f64) -> String {
    let secs = seconds.max(0.001);
    emf_line(
        task,
        &[
            ("FullLoadRowsStaged", "Count", rows as f64),
            ("FullLoadBytesStaged", "Bytes", bytes as f64),
            ("FullLoadChunkSeconds", "Seconds", seconds),
            (
                "FullLoadThroughputRowsSource",
                "Count/Second",
                rows as f64 / secs,
            ),
            (
                "FullLoadThroughputBandwidthSource",
                "Kilobytes/Second",
                bytes as f64 / 1024.0 / secs,
            ),
        ],
    )
}

/// The load's end (`Finish`): tables and rows loaded.
pub fn load_finished_line(task: &str, tables: usize, rows: u64) -> String {
    emf_line(
        task,
        &[
            ("FullLoadTablesLoaded", "Count", tables as f64),
            ("FullLoadRowsLoaded", "Count", rows as f64),
        ],
    )
}

/// The slot watch (the poller's `Watch` action): the WAL the slot retains whether or not the
/// poller runs; 0 when the slot does not exist (nothing retained).
pub fn slot_watch_line(task: &str, retained_bytes: i64, safe_wal_size: Option<i64>) -> String {
    emf_line(
        task,
        &[
            ("SlotRetainedBytes", "Bytes", retained_bytes as f64),
            (
                "SlotSafeWalSize",
                "Bytes",
                safe_wal_size.map_or(f64::NAN, |s| s as f64),
            ),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_declare_exactly_the_values_they_carry() {
        let v: serde_json::Value =
            serde_json::from_str(&chunk_line("t1", 1000, 2048 * 1024, 2.0)).unwrap();
        assert_eq!(v["Task"], "t1");
        assert_eq!(v["FullLoadThroughputRowsSource"], 500);
        assert_eq!(v["FullLoadThroughputBandwidthSource"], 1024);
        let declared = v["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap();
        assert_eq!(declared.len(), 5);
        for m in declared {
            assert!(v[m["Name"].as_str().unwrap()].is_number(), "{v}");
        }
        // An unknown safe WAL size is no data point.
        let v: serde_json::Value = serde_json::from_str(&slot_watch_line("t1", 0, None)).unwrap();
        assert_eq!(v["SlotRetainedBytes"], 0);
        assert!(v.get("SlotSafeWalSize").is_none());
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Metrics"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }
}
