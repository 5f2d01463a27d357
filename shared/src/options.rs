//! What each job is asked to do, and the ONE mapping from configuration to it: the CLI's
//! flags and every Lambda's environment ([`LambdaEnv`]) become [`TaskSettings`], which make
//! [`CdcOptions`] and [`LoadOptions`]. No production option is a test hook: faults are
//! injected by wrapping a seam (`staging::UnreliableSink`, `state::UnreliableStore`,
//! `source::UnreliableSource`).

use std::time::{Duration, Instant};

use crate::config::{LambdaEnv, PgConfig};
use crate::plan::Chunking;
use crate::selection::Selection;
use crate::source::Capture;
use crate::staging::encode::Format;

/// The settings a task's jobs share, from the CLI or a Lambda's environment.
#[derive(Debug, Clone)]
pub struct TaskSettings {
    pub format: Format,
    /// Add the commit timestamp column to CDC CSV rows.
    pub commit_ts_column: bool,
    /// Start CSV load rows with an `Op` field (DMS's `IncludeOpForFullLoad`).
    pub load_op_column: bool,
    /// A header row of column names in every CSV file (DMS's `AddColumnName`).
    pub csv_header: bool,
    /// Which changes CDC stages (DMS's `CdcInsertsOnly`, `CdcInsertsAndUpdates`).
    pub cdc_ops: crate::staging::layout::CdcOps,
    /// CDC files in date folders (DMS's `DatePartitionEnabled`).
    pub date_partition: Option<crate::staging::layout::DatePartition>,
    /// The CSV dialect of staged files (DMS's CsvDelimiter / CsvNullValue / CsvRowDelimiter).
    pub csv_dialect: crate::staging::dialect::CsvDialect,
    /// Also stage every batch's changes of all tables in commit order in one transaction
    /// file in this folder (DMS's `PreserveTransactions` with `CdcPath`).
    pub cdc_path: Option<String>,
    pub selection: Selection,
    /// Backends a large CDC drain may decode with at once (1 or 2).
    pub peek_sessions: u8,
    /// Target heap size of a full-load chunk, MiB.
    pub chunk_mib: u64,
    /// The full load creates the slot first.
    pub cdc: bool,
    /// pgshift may set REPLICA IDENTITY FULL on selected tables without a key.
    pub replica_identity_full: bool,
    /// Retained WAL past which the slot is announced as lagging.
    pub slot_lag_alert_bytes: u64,
    /// Capture schema changes with the event trigger (DMS's `captureDDLs`).
    pub capture_ddl: bool,
    /// The schema of pgshift's trigger functions (DMS's `ddlArtifactsSchema`; empty: public).
    pub ddl_schema: String,
    /// Stop staging at this WAL position or commit time (DMS's `CdcStopPosition`):
    /// transactions that commit before it are staged, none after; the checkpoint rests there.
    pub stop_position: Option<crate::lsn::StopPosition>,
    /// DMS's native start: the user's slot and publication, from a position.
    pub native_start: Option<crate::config::NativeStart>,
}

impl Default for TaskSettings {
    fn default() -> Self {
        TaskSettings {
            format: Format::default(),
            commit_ts_column: false,
            load_op_column: false,
            csv_header: false,
            cdc_ops: crate::staging::layout::CdcOps::All,
            date_partition: None,
            csv_dialect: Default::default(),
            cdc_path: None,
            selection: Selection::all(),
            peek_sessions: 2,
            chunk_mib: 256,
            cdc: false,
            replica_identity_full: false,
            slot_lag_alert_bytes: 1 << 30,
            capture_ddl: true,
            ddl_schema: String::new(),
            stop_position: None,
            native_start: None,
        }
    }
}

impl From<&LambdaEnv> for TaskSettings {
    fn from(env: &LambdaEnv) -> TaskSettings {
        TaskSettings {
            format: env.format,
            commit_ts_column: env.commit_ts_column,
            load_op_column: env.load_op_column,
            csv_header: env.csv_header,
            cdc_ops: env.cdc_ops,
            date_partition: env.date_partition,
            csv_dialect: env.csv.clone(),
            cdc_path: env.cdc_path.clone(),
            selection: env.selection.clone(),
            peek_sessions: env.peek_sessions,
            chunk_mib: env.chunk_mb,
            cdc: env.cdc,
            replica_identity_full: env.replica_identity_full,
            slot_lag_alert_bytes: env.slot_lag_alert_bytes,
            capture_ddl: env.capture_ddl,
            ddl_schema: env.ddl_schema.clone(),
            stop_position: env.cdc_stop_position,
            native_start: env.native_start.clone(),
        }
    }
}

impl TaskSettings {
    /// A poll run's options; `time_left` (a Lambda's) sets the deadline and a lease that
    /// outlives the invocation a little.
    pub fn cdc_options(
        &self,
        task: &str,
        source: PgConfig,
        owner: impl Into<String>,
        time_left: Option<Duration>,
    ) -> CdcOptions {
        let mut o = CdcOptions::new(task, source, owner);
        o.format = self.format;
        o.commit_ts_column = self.commit_ts_column;
        o.cdc_ops = self.cdc_ops;
        o.csv_header = self.csv_header;
        o.date_partition = self.date_partition;
        o.csv_dialect = self.csv_dialect.clone();
        o.cdc_path = self.cdc_path.clone();
        o.load_op_column = self.load_op_column;
        o.selection = self.selection.clone();
        o.peek_sessions = self.peek_sessions;
        o.replica_identity_full = self.replica_identity_full;
        o.slot_lag_alert_bytes = self.slot_lag_alert_bytes;
        o.capture_ddl = self.capture_ddl;
        o.ddl_schema = self.ddl_schema.clone();
        o.stop_position = self.stop_position;
        o.native_start = self.native_start.clone();
        if let Some(left) = time_left {
            o.deadline = Some(Instant::now() + left);
            o.lease_ttl = left + Duration::from_secs(30);
        }
        o
    }

    /// A load's options; `time_left` (a Lambda's) sets the chunk lease.
    pub fn load_options(
        &self,
        task: &str,
        source: PgConfig,
        owner: impl Into<String>,
        time_left: Option<Duration>,
    ) -> LoadOptions {
        let mut o = LoadOptions::new(task, source, owner);
        o.format = self.format;
        o.commit_ts_column = self.commit_ts_column;
        o.load_op_column = self.load_op_column;
        o.csv_header = self.csv_header;
        o.csv_dialect = self.csv_dialect.clone();
        o.selection = self.selection.clone();
        o.chunk_mib = self.chunk_mib;
        o.cdc = self.cdc;
        o.replica_identity_full = self.replica_identity_full;
        o.capture_ddl = self.capture_ddl;
        o.ddl_schema = self.ddl_schema.clone();
        if let Some(left) = time_left {
            o.lease_ttl = left + Duration::from_secs(60);
        }
        o
    }
}

/// What a poll run is asked to do.
#[derive(Debug, Clone)]
pub struct CdcOptions {
    pub task: String,
    pub source: PgConfig,
    pub format: Format,
    /// Add the commit timestamp column to CSV rows.
    pub commit_ts_column: bool,
    /// Which changes are staged (DMS's `CdcInsertsOnly`, `CdcInsertsAndUpdates`).
    pub cdc_ops: crate::staging::layout::CdcOps,
    /// DMS's `IncludeOpForFullLoad`: with `cdc_ops` filtering, CSV rows keep their `Op`.
    pub load_op_column: bool,
    /// CDC files in date folders (DMS's `DatePartitionEnabled`).
    pub date_partition: Option<crate::staging::layout::DatePartition>,
    /// The CSV dialect of staged files (DMS's CsvDelimiter / CsvNullValue / CsvRowDelimiter).
    pub csv_dialect: crate::staging::dialect::CsvDialect,
    /// A header row in every CSV file (DMS's `AddColumnName`): one schema version per file.
    pub csv_header: bool,
    /// Each batch also writes one transaction file of every table's changes in commit order
    /// to `<cdc_path>/CDC_TXN-<ms>.csv` (DMS's `PreserveTransactions` with `CdcPath`).
    pub cdc_path: Option<String>,
    /// Tables to stage (changes of others are skipped).
    pub selection: Selection,
    pub max_batch_changes: u64,
    pub max_batch_bytes: u64,
    /// `upto_nchanges` of one peek.
    pub max_peek_changes: i32,
    /// Backends one peek may use: 1, or 2 to split a large drain between two sessions
    /// decoding at once (the poller's module docs, step 3).
    pub peek_sessions: u8,
    /// A drain covering less WAL than this is never split.
    pub split_min_wal_bytes: u64,
    /// The invocation's end: uncommitted work is abandoned after it.
    pub deadline: Option<Instant>,
    /// Stop at the first commit boundary this long before the deadline.
    pub safety_margin: Duration,
    pub lease_ttl: Duration,
    /// Who runs (the Lambda request id, or host and pid).
    pub owner: String,
    /// `logical_decoding_work_mem` of the peek session.
    pub decoding_work_mem: String,
    /// Create the publication and slot when the task has none (a CDC-only task).
    pub create_if_missing: bool,
    /// pgshift may set REPLICA IDENTITY FULL on selected tables without a key.
    pub replica_identity_full: bool,
    /// Take the lease even from a live holder (`--force`).
    pub force_lease: bool,
    /// Selection rules may match no table.
    pub allow_empty: bool,
    /// Set to stop at the next commit boundary (the CLI's SIGINT/SIGTERM).
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Where `Batch Committed` and `Task State Changed` go (off by default).
    pub events: crate::events::Events,
    /// Retained WAL past which the slot is announced as lagging (`Task State Changed`).
    pub slot_lag_alert_bytes: u64,
    /// Capture schema changes with the event trigger (DMS's `captureDDLs`; on by default).
    pub capture_ddl: bool,
    /// The schema of pgshift's trigger functions (DMS's `ddlArtifactsSchema`; empty: public).
    pub ddl_schema: String,
    /// Stop staging at this WAL position or commit time (DMS's `CdcStopPosition`):
    /// transactions committed before it are staged, none after; the checkpoint rests there.
    pub stop_position: Option<crate::lsn::StopPosition>,
    /// DMS's native start: the user's slot and publication, from a position.
    pub native_start: Option<crate::config::NativeStart>,
}

impl CdcOptions {
    /// Whether CSV rows start with their `Op` field: always, but when inserts (and updates)
    /// alone are staged without IncludeOpForFullLoad, as DMS writes them.
    pub fn op_field(&self) -> bool {
        self.cdc_ops.is_all() || self.load_op_column
    }

    /// What the task captures.
    pub fn capture(&self) -> Capture {
        Capture {
            selection: self.selection.clone(),
            replica_identity_full: self.replica_identity_full,
            allow_empty: self.allow_empty,
            ddl: self.capture_ddl,
            ddl_schema: self.ddl_schema.clone(),
        }
    }
}

impl CdcOptions {
    pub fn new(task: impl Into<String>, source: PgConfig, owner: impl Into<String>) -> CdcOptions {
        CdcOptions {
            task: task.into(),
            source,
            format: Format::default(),
            commit_ts_column: false,
            cdc_ops: crate::staging::layout::CdcOps::All,
            load_op_column: false,
            date_partition: None,
            csv_dialect: Default::default(),
            csv_header: false,
            cdc_path: None,
            selection: Selection::all(),
            max_batch_changes: 250_000,
            max_batch_bytes: 256 << 20,
            max_peek_changes: 4_000_000,
            peek_sessions: 2,
            split_min_wal_bytes: 16 << 20,
            deadline: None,
            safety_margin: Duration::from_secs(20),
            lease_ttl: Duration::from_secs(900),
            owner: owner.into(),
            decoding_work_mem: "256MB".to_owned(),
            create_if_missing: true,
            replica_identity_full: false,
            force_lease: false,
            allow_empty: false,
            stop: None,
            events: crate::events::Events::off(),
            slot_lag_alert_bytes: 1 << 30,
            capture_ddl: true,
            ddl_schema: String::new(),
            stop_position: None,
            native_start: None,
        }
    }
}

/// What the load is asked to do.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub task: String,
    pub source: PgConfig,
    pub format: Format,
    /// The CDC CSV layout the schema versions announce (with the commit timestamp column).
    pub commit_ts_column: bool,
    /// Start CSV load rows with an `Op` field, `I` (DMS's `IncludeOpForFullLoad`).
    pub load_op_column: bool,
    /// A header row of column names in every CSV chunk (DMS's `AddColumnName`).
    pub csv_header: bool,
    /// The CSV dialect of staged files (DMS's CsvDelimiter / CsvNullValue / CsvRowDelimiter).
    pub csv_dialect: crate::staging::dialect::CsvDialect,
    pub selection: Selection,
    /// Target heap size of a chunk, MiB.
    pub chunk_mib: u64,
    /// Create the publication and slot first (CDC from `L0`).
    pub cdc: bool,
    pub owner: String,
    pub lease_ttl: Duration,
    /// Page ranges (PostgreSQL 14+) or primary-key ranges.
    pub chunking: Chunking,
    /// pgshift may set REPLICA IDENTITY FULL on selected tables without a key.
    pub replica_identity_full: bool,
    /// Take chunk leases even from live holders (`--force`).
    pub force_lease: bool,
    /// Selection rules may match no table.
    pub allow_empty: bool,
    /// Where `Table Loaded`, `Load Finished` and a failed load's `Task State Changed` go.
    pub events: crate::events::Events,
    /// Capture schema changes with the event trigger (DMS's `captureDDLs`; on by default).
    pub capture_ddl: bool,
    /// The schema of pgshift's trigger functions (DMS's `ddlArtifactsSchema`; empty: public).
    pub ddl_schema: String,
}

impl LoadOptions {
    pub fn new(task: impl Into<String>, source: PgConfig, owner: impl Into<String>) -> LoadOptions {
        LoadOptions {
            task: task.into(),
            source,
            format: Format::default(),
            commit_ts_column: false,
            load_op_column: false,
            csv_header: false,
            csv_dialect: Default::default(),
            selection: Selection::all(),
            chunk_mib: 256,
            cdc: false,
            owner: owner.into(),
            lease_ttl: Duration::from_secs(900),
            chunking: Chunking::Auto,
            replica_identity_full: false,
            force_lease: false,
            allow_empty: false,
            events: crate::events::Events::off(),
            capture_ddl: true,
            ddl_schema: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_mapping_from_a_lambda_environment() {
        let env = LambdaEnv::from_pairs([
            ("PGSHIFT_FORMAT", "jsonl.gz"),
            ("PGSHIFT_COMMIT_TS_COLUMN", "true"),
            ("PGSHIFT_PEEK_SESSIONS", "1"),
            ("PGSHIFT_CHUNK_MB", "32"),
            ("PGSHIFT_CDC", "false"),
        ])
        .unwrap();
        let s = TaskSettings::from(&env);
        let src = PgConfig::from_url("postgres://u@h/d", "source").unwrap();
        let c = s.cdc_options("t", src.clone(), "me", Some(Duration::from_secs(60)));
        assert_eq!(
            (c.format.ext(), c.commit_ts_column, c.peek_sessions),
            ("jsonl.gz", true, 1)
        );
        assert!(c.deadline.is_some() && c.lease_ttl == Duration::from_secs(90));
        let l = s.load_options("t", src, "me", None);
        assert_eq!((l.chunk_mib, l.cdc, l.commit_ts_column), (32, false, true));
        assert_eq!(l.lease_ttl, Duration::from_secs(900));
    }
}
