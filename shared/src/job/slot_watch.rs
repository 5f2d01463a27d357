//! The slot watch: what the task's replication slot retains on the source, read on its own
//! schedule whether or not the poller runs (a disabled poller with a slot is how DMS's
//! disk-full story starts). Reads only `pg_replication_slots`; touches no state and no slot.

use serde::{Deserialize, Serialize};

use crate::config::{PgConfig, slot_name};
use crate::error::Result;

/// What the watch saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotWatch {
    pub task: String,
    pub slot: String,
    pub exists: bool,
    pub active: bool,
    /// WAL the slot keeps on the source (0 without a slot).
    pub retained_bytes: i64,
    /// Bytes left before the slot is in danger (PostgreSQL 13+ with `max_slot_wal_keep_size`).
    pub safe_wal_size: Option<i64>,
    /// `reserved`, `extended`, `unreserved`, `lost` (13+; empty before or without a slot).
    pub wal_status: String,
}

/// Reads the task's slot on the source.
pub async fn run(source: &PgConfig, task: &str) -> Result<SlotWatch> {
    let slot = slot_name(task);
    let client = crate::source::connect(source).await?;
    let state = crate::source::slot::slot_state(&client, &slot).await?;
    Ok(match state {
        None => SlotWatch {
            task: task.to_owned(),
            slot,
            exists: false,
            active: false,
            retained_bytes: 0,
            safe_wal_size: None,
            wal_status: String::new(),
        },
        Some(s) => SlotWatch {
            task: task.to_owned(),
            slot,
            exists: true,
            active: s.active,
            retained_bytes: s.retained_bytes,
            safe_wal_size: s.safe_wal_size,
            wal_status: s.wal_status,
        },
    })
}

/// The watch's metrics line (EMF).
pub fn emf_line(w: &SlotWatch) -> String {
    crate::metrics::slot_watch_line(&w.task, w.retained_bytes, w.safe_wal_size)
}
