//! The Lambda functions' settings (`PGSHIFT_*`), read and checked once at cold start.

use std::collections::HashMap;

use super::{SslMode, check_task_name};
use crate::error::{Error, Result};
use crate::lsn::StopPosition;

/// Settings of a Lambda function, read once at cold start from its environment.
#[derive(Debug, Clone, Default)]
pub struct LambdaEnv {
    /// `PGSHIFT_SOURCE_SECRET_ARN`: default source when an event names none.
    pub source_secret_arn: Option<String>,
    /// `PGSHIFT_SOURCE_SSLMODE`: TLS mode applied to secrets that do not say; unset or `auto`:
    /// `verify-full` on RDS/Aurora hosts, `require` elsewhere.
    pub source_sslmode: Option<SslMode>,
    /// `PGSHIFT_TASK`: the task id.
    pub task: Option<String>,
    /// `PGSHIFT_STAGE`: `s3://bucket/prefix`.
    pub stage: Option<String>,
    /// `PGSHIFT_STATE_TABLE`: the DynamoDB table.
    pub state_table: Option<String>,
    /// `PGSHIFT_FORMAT`: csv (default), csv.gz, jsonl, jsonl.gz.
    pub format: crate::staging::encode::Format,
    /// `PGSHIFT_COMMIT_TS_COLUMN`: `true` adds the commit timestamp column to CSV.
    pub commit_ts_column: bool,
    /// S3Settings' `IncludeOpForFullLoad`: CSV load rows start with `I`.
    pub load_op_column: bool,
    /// S3Settings' `CdcInsertsOnly` / `CdcInsertsAndUpdates`.
    pub cdc_ops: crate::staging::layout::CdcOps,
    /// S3Settings' `AddColumnName`: a header row in every CSV file.
    pub csv_header: bool,
    /// S3Settings' `DatePartitionEnabled` (+ sequence and delimiter).
    pub date_partition: Option<crate::staging::layout::DatePartition>,
    /// `S3Settings` `CsvDelimiter` / `CsvNullValue` / `CsvRowDelimiter`.
    pub csv: crate::staging::dialect::CsvDialect,
    /// S3Settings' `PreserveTransactions` with `CdcPath`: the transaction files' folder.
    pub cdc_path: Option<String>,
    /// S3Settings' `EncryptionMode` / `ServerSideEncryptionKmsKeyId` for staged objects.
    pub encryption: crate::staging::Encryption,
    /// `PGSHIFT_TABLE_MAPPINGS`: DMS table-mapping JSON (selection rules).
    pub selection: crate::selection::Selection,
    /// `PGSHIFT_CDC`: the full load creates the slot first (default true).
    pub cdc: bool,
    /// `PGSHIFT_CHUNK_MB`: target heap size of a full-load chunk (default 256).
    pub chunk_mb: u64,
    /// `PGSHIFT_S3_PART_MB`: bytes an S3 object is buffered to before it becomes a multipart
    /// upload, and its part size (default 8; 5-5120). An object that fits is one PUT; larger
    /// ones upload two parts at a time while the writer fills the next. The full-load
    /// function uses 64 (fewer requests per TB: docs/COST.md).
    pub s3_part_mb: u64,
    /// `PGSHIFT_CDC_STOP_POSITION`: the poller stages nothing committed at or after this WAL
    /// position (DMS's `CdcStopPosition`).
    pub cdc_stop_position: Option<StopPosition>,
    /// `PGSHIFT_SLOT_NAME` + `PGSHIFT_PUBLICATION` (+ `PGSHIFT_CDC_START_POSITION`): DMS's
    /// native start, CDC from the user's slot and publication.
    pub native_start: Option<crate::config::NativeStart>,
    /// `PGSHIFT_MAX_CONCURRENCY`: chunks exported at once by the state machine (default 8).
    pub max_concurrency: u32,
    /// `PGSHIFT_REPLICA_IDENTITY_FULL`: pgshift may set REPLICA IDENTITY FULL on selected
    /// tables without a key (default false: they are captured insert-only).
    pub replica_identity_full: bool,
    /// `PGSHIFT_CAPTURE_DDL`: capture schema changes with pgshift's event trigger (default
    /// true; DMS's `captureDDLs`).
    pub capture_ddl: bool,
    /// `PGSHIFT_DDL_ARTIFACTS_SCHEMA`: the schema of pgshift's trigger functions (default
    /// public; DMS's `ddlArtifactsSchema`).
    pub ddl_schema: String,
    /// `PGSHIFT_PEEK_SESSIONS`: backends a large CDC drain may decode with at once, 1 or 2
    /// (default 2).
    pub peek_sessions: u8,
    /// `PGSHIFT_EVENTS_BUS`: the EventBridge bus events go to (name or ARN; the default bus
    /// when unset, none with `none`).
    pub events_bus: Option<String>,
    /// `PGSHIFT_SLOT_LAG_ALERT_BYTES`: retained WAL past which the slot is announced as
    /// lagging (default 1 GiB).
    pub slot_lag_alert_bytes: u64,
    /// `PGSHIFT_TARGET_SECRET_ARN` (the apply function): the target's credentials.
    pub target_secret_arn: Option<String>,
    /// `PGSHIFT_TARGET_SSLMODE`: TLS mode for a target secret that does not say (default
    /// `require`).
    pub target_sslmode: Option<SslMode>,
    /// `PGSHIFT_TARGET_PREP`: create (default), truncate or keep.
    pub target_prep: Option<String>,
    /// `PGSHIFT_APPLY_PARALLEL`: target connections loading chunks at once (default 2).
    pub apply_parallel: usize,
    /// `PGSHIFT_APPLY_QUEUE_URL`: the apply function's queue, where it leaves itself a
    /// message to go on when its time runs out.
    pub apply_queue_url: Option<String>,
}

/// An EventBridge bus name (`[/\.\-_A-Za-z0-9]{1,256}`) or ARN, else an error naming it.
pub fn check_bus(bus: &str, field: &str) -> Result<String> {
    let bus = bus.trim();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.len() <= 256
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '-' | '_'))
    };
    let ok = match bus.strip_prefix("arn:") {
        Some(rest) => {
            rest.contains(":events:")
                && rest
                    .split_once(":event-bus/")
                    .is_some_and(|(_, n)| name_ok(n))
        }
        None => name_ok(bus),
    };
    if ok {
        Ok(bus.to_owned())
    } else {
        Err(Error::config(
            field,
            format!(
                "{bus:?} is not an EventBridge bus name (letters, digits, / . - _) or event-bus ARN"
            ),
        ))
    }
}

impl LambdaEnv {
    /// Builds from key/value pairs (the process environment in `main`, a map in tests).
    pub fn from_pairs<I, K, V>(pairs: I) -> Result<LambdaEnv>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let map: HashMap<String, String> = pairs
            .into_iter()
            .filter(|(k, _)| k.as_ref().starts_with("PGSHIFT_"))
            .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
            .collect();
        let get = |k: &str| {
            map.get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let sslmode = |name: &str| match get(name) {
            None => Ok(None),
            Some(v) if v == "auto" => Ok(None),
            Some(v) => SslMode::parse(&v).map(Some).ok_or_else(|| {
                Error::config(
                    name,
                    format!(
                        "{v:?} is not one of auto, disable, prefer, require, verify-ca, verify-full"
                    ),
                )
            }),
        };
        let source_sslmode = sslmode("PGSHIFT_SOURCE_SSLMODE")?;
        let target_sslmode = sslmode("PGSHIFT_TARGET_SSLMODE")?;
        let target_prep = get("PGSHIFT_TARGET_PREP");
        if let Some(p) = &target_prep
            && !matches!(p.as_str(), "create" | "truncate" | "keep")
        {
            return Err(Error::config(
                "PGSHIFT_TARGET_PREP",
                format!("{p:?} is not one of create, truncate, keep"),
            ));
        }
        if let Some(stage) = get("PGSHIFT_STAGE")
            && !stage.starts_with("s3://")
        {
            return Err(Error::config(
                "PGSHIFT_STAGE",
                "must be an s3://bucket/prefix URL",
            ));
        }
        let mut format = match get("PGSHIFT_FORMAT") {
            None => crate::staging::encode::Format::default(),
            Some(f) => crate::staging::encode::Format::parse(&f, "PGSHIFT_FORMAT")?,
        };
        // DMS's S3Settings JSON: its format wins over PGSHIFT_FORMAT; its bucket and folder
        // must be the stack's stage (the functions may write only there).
        let s3_settings = get("PGSHIFT_S3_SETTINGS")
            .map(|t| super::s3_settings::parse(&t, "PGSHIFT_S3_SETTINGS"))
            .transpose()?;
        if let Some(s) = &s3_settings {
            format = s.resolve_format(format, None)?;
            s.resolve_stage(
                &get("PGSHIFT_STAGE").unwrap_or_default(),
                Some("PGSHIFT_STAGE"),
            )?;
            for note in &s.notes {
                tracing::warn!("{note}");
            }
        }
        let flag = |name: &str, default: bool| parse_flag(name, get(name), default);
        let number =
            |name: &str, default: u64, max: u64| parse_number(name, get(name), default, max);
        let commit_ts_column = flag("PGSHIFT_COMMIT_TS_COLUMN", false)?
            || s3_settings.as_ref().is_some_and(|s| s.commit_ts_column);
        let cdc = flag("PGSHIFT_CDC", true)?;
        let replica_identity_full = flag("PGSHIFT_REPLICA_IDENTITY_FULL", false)?;
        let capture_ddl = flag("PGSHIFT_CAPTURE_DDL", true)?;
        let ddl_schema = match get("PGSHIFT_DDL_ARTIFACTS_SCHEMA") {
            None => String::new(),
            Some(s) => check_schema_name(&s, "PGSHIFT_DDL_ARTIFACTS_SCHEMA")?,
        };
        let chunk_mb = number("PGSHIFT_CHUNK_MB", 256, 65_536)?;
        let s3_part_mb = number("PGSHIFT_S3_PART_MB", 8, 5120)?;
        let native_start = native_start(
            get("PGSHIFT_SLOT_NAME"),
            get("PGSHIFT_PUBLICATION"),
            get("PGSHIFT_CDC_START_POSITION"),
            (
                "PGSHIFT_SLOT_NAME",
                "PGSHIFT_PUBLICATION",
                "PGSHIFT_CDC_START_POSITION",
            ),
        )?;
        if native_start.is_some() && cdc {
            return Err(Error::config(
                "PGSHIFT_SLOT_NAME",
                "a native start is CDC-only (the full load with CDC makes its own slot for its snapshot): set PGSHIFT_CDC (CaptureChanges) to false",
            ));
        }
        let cdc_stop_position = get("PGSHIFT_CDC_STOP_POSITION")
            .map(|v| parse_stop_position(&v, "PGSHIFT_CDC_STOP_POSITION"))
            .transpose()?;
        if s3_part_mb < 5 {
            return Err(Error::config(
                "PGSHIFT_S3_PART_MB",
                format!("{s3_part_mb} is below S3's 5 MiB minimum part size"),
            ));
        }
        let max_concurrency = number("PGSHIFT_MAX_CONCURRENCY", 8, 1000)? as u32;
        let peek_sessions = number("PGSHIFT_PEEK_SESSIONS", 2, 2)? as u8;
        let slot_lag_alert_bytes = number("PGSHIFT_SLOT_LAG_ALERT_BYTES", 1 << 30, u64::MAX)?;
        let apply_parallel = number("PGSHIFT_APPLY_PARALLEL", 2, 64)?.max(1) as usize;
        let events_bus = match get("PGSHIFT_EVENTS_BUS") {
            None => Some("default".to_owned()),
            Some(v) if v == "none" => None,
            Some(v) => Some(check_bus(&v, "PGSHIFT_EVENTS_BUS")?),
        };
        let selection = match get("PGSHIFT_TABLE_MAPPINGS") {
            None => crate::selection::Selection::all(),
            Some(json) => crate::selection::Selection::from_json(&json, "PGSHIFT_TABLE_MAPPINGS")?,
        };
        if let Some(task) = get("PGSHIFT_TASK") {
            check_task_name(&task).map_err(|e| match e {
                Error::Config { reason, .. } => Error::config("PGSHIFT_TASK", reason),
                other => other,
            })?;
        }
        Ok(LambdaEnv {
            target_secret_arn: get("PGSHIFT_TARGET_SECRET_ARN"),
            target_sslmode,
            target_prep,
            apply_parallel,
            apply_queue_url: get("PGSHIFT_APPLY_QUEUE_URL"),
            events_bus,
            slot_lag_alert_bytes,
            cdc,
            replica_identity_full,
            capture_ddl,
            ddl_schema,
            chunk_mb,
            s3_part_mb,
            cdc_stop_position,
            native_start,
            max_concurrency,
            peek_sessions,
            format,
            commit_ts_column,
            load_op_column: s3_settings
                .as_ref()
                .is_some_and(|s| s.include_op_for_full_load),
            cdc_ops: s3_settings.as_ref().map(|s| s.cdc_ops).unwrap_or_default(),
            csv_header: s3_settings.as_ref().is_some_and(|s| s.add_column_name),
            date_partition: s3_settings.as_ref().and_then(|s| s.date_partition),
            cdc_path: s3_settings.as_ref().and_then(|s| s.cdc_path.clone()),
            csv: s3_settings
                .as_ref()
                .map(|s| s.csv.clone())
                .unwrap_or_default(),
            encryption: s3_settings.map(|s| s.encryption).unwrap_or_default(),
            selection,
            source_secret_arn: get("PGSHIFT_SOURCE_SECRET_ARN"),
            source_sslmode,
            task: get("PGSHIFT_TASK"),
            stage: get("PGSHIFT_STAGE"),
            state_table: get("PGSHIFT_STATE_TABLE"),
        })
    }
}

/// `true`/`1` or `false`/`0`; `default` when unset.
fn parse_flag(name: &str, value: Option<String>, default: bool) -> Result<bool> {
    match value.as_deref() {
        None => Ok(default),
        Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(Error::config(
            name,
            format!("{other:?} is not true or false"),
        )),
    }
}

/// DMS's `CdcStopPosition` as pgshift takes it: a WAL position (`16/B374D848`, also written
/// `lsn:16/B374D848`) or `commit_time:2026-12-02T10:00:00` (UTC unless an offset is given;
/// the source's commit timestamps). DMS's `server_time:` (the replication instance's clock) has
/// no counterpart in a serverless poller and is named as such.
pub fn parse_stop_position(value: &str, field: &str) -> Result<StopPosition> {
    let v = value.trim();
    if let Some(t) = v.strip_prefix("commit_time:") {
        return crate::change::parse_utc_timestamp(t)
            .map(StopPosition::CommitTime)
            .ok_or_else(|| {
                Error::config(
                    field,
                    format!("{t:?} is not a time (YYYY-MM-DDTHH:MM:SS[.ffffff][Z|+HH:MM])"),
                )
            });
    }
    if v.starts_with("server_time:") {
        return Err(Error::config(
            field,
            format!(
                "{v:?}: server_time (DMS's replication-instance clock) is not supported: pgshift has no instance; give commit_time:<time> (the source's commit time) or a WAL position (X/Y)"
            ),
        ));
    }
    let lsn = v.strip_prefix("lsn:").unwrap_or(v);
    lsn.parse().map(StopPosition::Lsn).map_err(|e| {
        Error::config(
            field,
            format!("{v:?} is not a WAL position (X/Y) or commit_time:<time>: {e}"),
        )
    })
}

/// DMS's native start from its three settings (slot, publication, start position; named by
/// `fields`): all unset is none; a start position or publication without a slot is an error,
/// as is a slot without its publication.
pub fn native_start(
    slot: Option<String>,
    publication: Option<String>,
    start: Option<String>,
    fields: (&str, &str, &str),
) -> Result<Option<crate::config::NativeStart>> {
    let start = start
        .map(|v| {
            let t = v.trim();
            t.strip_prefix("lsn:").unwrap_or(t).parse().map_err(|e| {
                Error::config(fields.2, format!("{t:?} is not a WAL position (X/Y): {e}"))
            })
        })
        .transpose()?;
    match (slot, publication) {
        (None, None) if start.is_none() => Ok(None),
        (None, _) => Err(Error::config(
            fields.0,
            format!(
                "a native start reads the user's slot: give {} (with {})",
                fields.0, fields.1
            ),
        )),
        (Some(_), None) => Err(Error::config(
            fields.1,
            "a native start reads the user's publication too (made before the slot): give its name",
        )),
        (Some(slot), Some(publication)) => crate::config::NativeStart::new(
            slot.trim(),
            publication.trim(),
            start,
            (fields.0, fields.1),
        )
        .map(Some),
    }
}

/// A whole number in `1..=max`; `default` when unset.
fn parse_number(name: &str, value: Option<String>, default: u64, max: u64) -> Result<u64> {
    match value {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                Error::config(
                    name,
                    format!("{v:?} is not a whole number between 1 and {max}"),
                )
            }),
    }
}

/// A schema name given in configuration: 1 to 63 bytes, no NUL (it is always quoted).
pub fn check_schema_name(name: &str, field: &str) -> Result<String> {
    if name.is_empty() || name.len() > 63 || name.contains('\0') {
        return Err(Error::config(
            field,
            "must be a schema name of 1 to 63 bytes",
        ));
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_env_is_validated() {
        let env = LambdaEnv::from_pairs([
            ("PGSHIFT_SOURCE_SECRET_ARN", "arn:x"),
            ("PGSHIFT_STAGE", "s3://b/p"),
            ("HOME", "/root"),
        ])
        .unwrap();
        assert_eq!(env.source_secret_arn.as_deref(), Some("arn:x"));
        let err = LambdaEnv::from_pairs([("PGSHIFT_STAGE", "/tmp/x")]).unwrap_err();
        assert!(err.to_string().contains("PGSHIFT_STAGE"));
        let err = LambdaEnv::from_pairs([("PGSHIFT_SOURCE_SSLMODE", "on")]).unwrap_err();
        assert!(err.to_string().contains("PGSHIFT_SOURCE_SSLMODE"));
        assert_eq!(env.peek_sessions, 2);
        // PreserveTransactions reaches the poller's options from the stack's S3Settings.
        let env = LambdaEnv::from_pairs([(
            "PGSHIFT_S3_SETTINGS",
            r#"{"PreserveTransactions": true, "CdcPath": "txn"}"#,
        )])
        .unwrap();
        let settings = crate::options::TaskSettings::from(&env);
        let cfg = crate::config::PgConfig::from_url("postgres://u@h/d", "source").unwrap();
        let o = settings.cdc_options("t", cfg, "owner", None);
        assert_eq!(o.cdc_path.as_deref(), Some("txn"));
        let err =
            LambdaEnv::from_pairs([("PGSHIFT_S3_SETTINGS", r#"{"PreserveTransactions": true}"#)])
                .unwrap_err();
        assert!(
            err.to_string()
                .contains("PGSHIFT_S3_SETTINGS: S3Settings.PreserveTransactions"),
            "{err}"
        );
        let one = LambdaEnv::from_pairs([("PGSHIFT_PEEK_SESSIONS", "1")]).unwrap();
        assert_eq!(one.peek_sessions, 1);
        for bad in ["0", "3", "two"] {
            let err = LambdaEnv::from_pairs([("PGSHIFT_PEEK_SESSIONS", bad)]).unwrap_err();
            assert!(err.to_string().contains("PGSHIFT_PEEK_SESSIONS"), "{err}");
        }
    }

    #[test]
    fn events_bus_and_target_settings_are_checked() {
        let env = LambdaEnv::from_pairs([("PGSHIFT_TASK", "t")]).unwrap();
        assert_eq!(env.events_bus.as_deref(), Some("default"));
        assert_eq!(env.apply_parallel, 2);
        let off = LambdaEnv::from_pairs([("PGSHIFT_EVENTS_BUS", "none")]).unwrap();
        assert_eq!(off.events_bus, None);
        let arn = "arn:aws:events:eu-west-1:123456789012:event-bus/pgshift";
        assert_eq!(check_bus(arn, "bus").unwrap(), arn);
        for bad in ["bad bus!", "arn:aws:events:eu-west-1:1:rule/x", ""] {
            let err = check_bus(bad, "--events-bus").unwrap_err().to_string();
            assert!(err.contains("--events-bus"), "{err}");
        }
        let err = LambdaEnv::from_pairs([("PGSHIFT_EVENTS_BUS", "a b")]).unwrap_err();
        assert!(err.to_string().contains("PGSHIFT_EVENTS_BUS"), "{err}");
        assert!(err.to_string().contains("not an EventBridge bus"), "{err}");
        let err = LambdaEnv::from_pairs([("PGSHIFT_TARGET_PREP", "drop")]).unwrap_err();
        assert!(err.to_string().contains("PGSHIFT_TARGET_PREP"), "{err}");
        let err = LambdaEnv::from_pairs([("PGSHIFT_TARGET_SSLMODE", "on")]).unwrap_err();
        assert!(err.to_string().contains("PGSHIFT_TARGET_SSLMODE"), "{err}");
        for bad in ["4", "0", "6000", "x"] {
            let err = LambdaEnv::from_pairs([("PGSHIFT_S3_PART_MB", bad)]).unwrap_err();
            assert!(err.to_string().contains("PGSHIFT_S3_PART_MB"), "{err}");
        }
        let env = LambdaEnv::from_pairs([("PGSHIFT_S3_PART_MB", "256")]).unwrap();
        assert_eq!(env.s3_part_mb, 256);
        let env = LambdaEnv::from_pairs([("PGSHIFT_CDC_STOP_POSITION", "16/B374D848")]).unwrap();
        assert_eq!(
            env.cdc_stop_position.map(|l| l.to_string()).as_deref(),
            Some("16/B374D848")
        );
        let env = LambdaEnv::from_pairs([(
            "PGSHIFT_CDC_STOP_POSITION",
            "commit_time:2026-12-02T10:00:00",
        )])
        .unwrap();
        assert_eq!(
            env.cdc_stop_position.map(|l| l.to_string()).as_deref(),
            Some("commit_time:2026-12-02T10:00:00.000000Z")
        );
        for (bad, why) in [
            ("tomorrow", "not a WAL position"),
            ("commit_time:2026-02-30T10:00:00", "not a time"),
            ("commit_time:yesterday", "not a time"),
            ("server_time:2026-12-02T10:00:00", "server_time"),
        ] {
            let err = LambdaEnv::from_pairs([("PGSHIFT_CDC_STOP_POSITION", bad)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("PGSHIFT_CDC_STOP_POSITION"), "{err}");
            assert!(err.contains(why), "{bad}: {err}");
        }
        let err = LambdaEnv::from_pairs([
            ("PGSHIFT_SLOT_NAME", "dms_slot"),
            ("PGSHIFT_PUBLICATION", "dms_pub"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("CDC-only"), "{err}");
        let env = LambdaEnv::from_pairs([
            ("PGSHIFT_CDC", "false"),
            ("PGSHIFT_SLOT_NAME", "dms_slot"),
            ("PGSHIFT_PUBLICATION", "dms_pub"),
            ("PGSHIFT_CDC_START_POSITION", "lsn:16/B3000000"),
        ])
        .unwrap();
        let native = env.native_start.unwrap();
        assert_eq!(
            (native.slot.as_str(), native.publication.as_str()),
            ("dms_slot", "dms_pub")
        );
        assert_eq!(
            native.start.map(|l| l.to_string()).as_deref(),
            Some("16/B3000000")
        );
        for (pairs, field) in [
            (
                vec![("PGSHIFT_CDC_START_POSITION", "16/0")],
                "PGSHIFT_SLOT_NAME",
            ),
            (vec![("PGSHIFT_SLOT_NAME", "s")], "PGSHIFT_PUBLICATION"),
            (
                vec![("PGSHIFT_SLOT_NAME", "Bad"), ("PGSHIFT_PUBLICATION", "p")],
                "PGSHIFT_SLOT_NAME",
            ),
            (
                vec![
                    ("PGSHIFT_CDC", "false"),
                    ("PGSHIFT_SLOT_NAME", "s"),
                    ("PGSHIFT_PUBLICATION", "p"),
                    ("PGSHIFT_CDC_START_POSITION", "soon"),
                ],
                "PGSHIFT_CDC_START_POSITION",
            ),
        ] {
            let err = LambdaEnv::from_pairs(pairs).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        let env = LambdaEnv::from_pairs([("PGSHIFT_SOURCE_SSLMODE", "auto")]).unwrap();
        assert_eq!(env.source_sslmode, None);
        let err = LambdaEnv::from_pairs([("PGSHIFT_APPLY_PARALLEL", "x")]).unwrap_err();
        assert!(err.to_string().contains("PGSHIFT_APPLY_PARALLEL"), "{err}");
    }
}
