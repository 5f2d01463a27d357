//! DMS's S3 target settings (`S3Settings`, as written for `aws dms create-endpoint
//! --s3-settings`): the settings pgshift honours become its stage, format and columns; a
//! setting pgshift does not honour is an error naming it, never silently ignored.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::staging::dialect::CsvDialect;
use crate::staging::encode::{Encoding, Format};
use crate::staging::s3::Encryption;

/// What a DMS `S3Settings` document asks of pgshift.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// `s3://BucketName/BucketFolder`.
    pub stage: Option<String>,
    /// `DataFormat` + `CompressionType`.
    pub format: Option<Format>,
    /// `TimestampColumnName` set: the commit timestamp column in CDC rows.
    pub commit_ts_column: bool,
    /// `IncludeOpForFullLoad`: CSV load rows start with an `Op` field, `I`.
    pub include_op_for_full_load: bool,
    /// `CdcInsertsOnly` / `CdcInsertsAndUpdates`: which changes CDC stages.
    pub cdc_ops: crate::staging::layout::CdcOps,
    /// `AddColumnName`: a header row of column names in every CSV file.
    pub add_column_name: bool,
    /// `DatePartitionEnabled` (+ `DatePartitionSequence`, `DatePartitionDelimiter`): CDC
    /// files in date folders by commit date, UTC.
    pub date_partition: Option<crate::staging::layout::DatePartition>,
    /// `EncryptionMode` (+ `ServerSideEncryptionKmsKeyId`): how objects are encrypted.
    pub encryption: Encryption,
    /// `CsvDelimiter`, `CsvNullValue`, `CsvRowDelimiter`: the CSV dialect of staged files.
    pub csv: CsvDialect,
    /// `ParquetTimestampInMillisecond`: Parquet timestamps in milliseconds (truncated).
    pub parquet_timestamp_ms: bool,
    /// `PreserveTransactions` with `CdcPath`: the folder (under the stage) of the CDC
    /// transaction files, every table's changes in commit order.
    pub cdc_path: Option<String>,
    /// Settings accepted but without effect here, each with why (printed, never silent).
    pub notes: Vec<String>,
}

impl S3Settings {
    /// The stage: the settings' bucket and folder, which must agree with a stage given
    /// explicitly (`given_as` names it: `--stage`, `PGSHIFT_STAGE`); else `stage`.
    pub fn resolve_stage(&self, stage: &str, given_as: Option<&str>) -> Result<String> {
        match (&self.stage, given_as) {
            (None, _) => Ok(stage.to_owned()),
            (Some(want), Some(field)) if stage.trim_end_matches('/') != want => Err(Error::config(
                field,
                format!(
                    "{stage} is not S3Settings' s3://BucketName/BucketFolder ({want}): give one of them"
                ),
            )),
            (Some(want), _) => Ok(want.clone()),
        }
    }

    /// The format: the settings' DataFormat/CompressionType, which must agree with a format
    /// given explicitly (`given_as` names it); else `format`.
    /// `ParquetTimestampInMillisecond` applies to the format resolved, which must be Parquet.
    pub fn resolve_format(&self, format: Format, given_as: Option<&str>) -> Result<Format> {
        let mut f = match (self.format, given_as) {
            (None, _) => format,
            (Some(f), Some(field)) if (f.encoding, f.gzip) != (format.encoding, format.gzip) => {
                return Err(Error::config(
                    field,
                    "differs from S3Settings' DataFormat/CompressionType: give one of them",
                ));
            }
            (Some(f), _) => f,
        };
        if self.parquet_timestamp_ms {
            if f.encoding != Encoding::Parquet {
                return Err(Error::config(
                    "S3Settings.ParquetTimestampInMillisecond",
                    "shapes Parquet files; the format is not parquet",
                ));
            }
            f.timestamp_ms = true;
        }
        // The dialect shapes CSV files: with a format given elsewhere (`--format`,
        // PGSHIFT_FORMAT) that is not CSV it would be ignored, so it is an error.
        if !self.csv.is_default() && f.encoding != Encoding::Csv {
            return Err(Error::config(
                "S3Settings.CsvDelimiter",
                format!(
                    "CsvDelimiter, CsvNullValue and CsvRowDelimiter shape CSV files; the format is {}",
                    f.ext()
                ),
            ));
        }
        Ok(f)
    }
}

/// Reads `file://path` or inline JSON.
pub fn read(value: &str, field: &str) -> Result<S3Settings> {
    let text = match value.strip_prefix("file://") {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| Error::config(field, format!("cannot read {path}: {e}")))?,
        None => value.to_owned(),
    };
    parse(&text, field)
}

/// Parses an `S3Settings` JSON object (the `S3Settings` member of a `create-endpoint` input
/// is accepted too).
pub fn parse(text: &str, field: &str) -> Result<S3Settings> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| Error::config(field, format!("not S3Settings JSON: {e}")))?;
    let doc = doc.get("S3Settings").unwrap_or(&doc);
    let obj = doc
        .as_object()
        .ok_or_else(|| Error::config(field, "S3Settings must be a JSON object"))?;
    let at = |k: &str| format!("{field}: S3Settings.{k}");
    let string = |k: &str, v: &Value| -> Result<String> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::config(at(k), "must be a string"))
    };
    let flag = |k: &str, v: &Value| -> Result<bool> {
        match v {
            Value::Bool(b) => Ok(*b),
            // DMS takes y and n too.
            Value::String(s) if s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("y") => {
                Ok(true)
            }
            Value::String(s) if s.eq_ignore_ascii_case("n") => Ok(false),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
            _ => Err(Error::config(at(k), "must be true or false")),
        }
    };
    let unsupported = |k: &str, why: &str| Error::config(at(k), format!("not supported: {why}"));
    let mut out = S3Settings::default();
    let (mut bucket, mut folder, mut data_format, mut gzip) = (None, None, None, false);
    let mut partitioned = false;
    let (mut sequence, mut delimiter, mut date_keys) = (None, None, Vec::new());
    let (mut kms_mode, mut kms_key) = (false, None);
    let (mut inserts_only, mut inserts_and_updates) = (false, false);
    let (mut preserve_transactions, mut cdc_path) = (false, None);
    let (mut csv_delimiter, mut csv_null, mut csv_row_delimiter) =
        (",".to_owned(), String::new(), "\n".to_owned());
    for (k, v) in obj {
        match k.as_str() {
            "BucketName" => bucket = Some(string(k, v)?),
            "BucketFolder" => folder = Some(string(k, v)?),
            "DataFormat" => data_format = Some(string(k, v)?.to_ascii_lowercase()),
            "CompressionType" => {
                gzip = match string(k, v)?.to_ascii_uppercase().as_str() {
                    "NONE" => false,
                    "GZIP" => true,
                    other => return Err(Error::config(at(k), format!("{other:?} is not NONE or GZIP"))),
                }
            }
            "TimestampColumnName" => out.commit_ts_column = !string(k, v)?.is_empty(),
            "IncludeOpForFullLoad" => out.include_op_for_full_load = flag(k, v)?,
            "CdcInsertsOnly" => inserts_only = flag(k, v)?,
            "CdcInsertsAndUpdates" => inserts_and_updates = flag(k, v)?,
            "AddColumnName" => out.add_column_name = flag(k, v)?,
            "DatePartitionEnabled" => partitioned = flag(k, v)?,
            "CsvDelimiter" => csv_delimiter = string(k, v)?,
            "CsvRowDelimiter" => csv_row_delimiter = string(k, v)?,
            "CsvNullValue" => csv_null = string(k, v)?,
            "CdcPath" => cdc_path = Some(string(k, v)?),
            "PreserveTransactions" => preserve_transactions = flag(k, v)?,
            "ParquetTimestampInMillisecond" => out.parquet_timestamp_ms = flag(k, v)?,
            // SSE_S3 leaves objects to the bucket's default encryption (SSE-S3, or the KMS key
            // the stack's DataKmsKeyArn puts there), as DMS's default does.
            "EncryptionMode" => match string(k, v)?.to_ascii_uppercase().as_str() {
                "SSE_S3" => kms_mode = false,
                "SSE_KMS" => kms_mode = true,
                other => return Err(Error::config(at(k), format!("{other:?} is not SSE_S3 or SSE_KMS"))),
            },
            "ServerSideEncryptionKmsKeyId" => {
                let key = string(k, v)?;
                kms_key = (!key.trim().is_empty()).then(|| key.trim().to_owned());
            }
            "DatePartitionSequence" => {
                use crate::staging::layout::DateSequence as D;
                date_keys.push(k.as_str());
                sequence = Some(match string(k, v)?.to_ascii_uppercase().as_str() {
                    "YYYYMMDD" => D::Yyyymmdd,
                    "YYYYMMDDHH" => D::Yyyymmddhh,
                    "YYYYMM" => D::Yyyymm,
                    "MMYYYYDD" => D::Mmyyyydd,
                    "DDMMYYYY" => D::Ddmmyyyy,
                    other => return Err(Error::config(at(k), format!("{other:?} is not YYYYMMDD, YYYYMMDDHH, YYYYMM, MMYYYYDD or DDMMYYYY"))),
                });
            }
            "DatePartitionDelimiter" => {
                date_keys.push(k.as_str());
                delimiter = Some(match string(k, v)?.to_ascii_uppercase().as_str() {
                    "SLASH" => "/",
                    "UNDERSCORE" => "_",
                    "DASH" => "-",
                    "NONE" => "",
                    other => return Err(Error::config(at(k), format!("{other:?} is not SLASH, UNDERSCORE, DASH or NONE"))),
                });
            }
            "DatePartitionTimezone" => {
                date_keys.push(k.as_str());
                if !matches!(string(k, v)?.to_ascii_uppercase().as_str(), "UTC" | "ETC/UTC" | "") {
                    return Err(unsupported(k, "date folders are by the commit date in UTC"));
                }
            }
            "ServiceAccessRoleArn" => out.notes.push(
                "S3Settings.ServiceAccessRoleArn is not used: pgshift writes with its own AWS credentials (the function's role, or --profile)".to_owned(),
            ),
            other => {
                return Err(Error::config(
                    at(other),
                    "not a setting pgshift supports (docs/DMS-S3-SETTINGS.md lists them)",
                ));
            }
        }
    }
    out.cdc_ops = match (inserts_only, inserts_and_updates) {
        (false, false) => crate::staging::layout::CdcOps::All,
        (true, false) => crate::staging::layout::CdcOps::InsertsOnly,
        (false, true) => crate::staging::layout::CdcOps::InsertsAndUpdates,
        (true, true) => {
            return Err(Error::config(
                at("CdcInsertsAndUpdates"),
                "CdcInsertsOnly and CdcInsertsAndUpdates cannot both be true",
            ));
        }
    };
    out.encryption = match (kms_mode, kms_key) {
        (true, key_id) => Encryption::Kms { key_id },
        (false, None) => Encryption::BucketDefault,
        (false, Some(_)) => {
            return Err(Error::config(
                at("ServerSideEncryptionKmsKeyId"),
                "needs EncryptionMode SSE_KMS",
            ));
        }
    };
    out.csv = CsvDialect::new(&csv_delimiter, &csv_null, &csv_row_delimiter, at)?;
    if partitioned {
        out.date_partition = Some(crate::staging::layout::DatePartition {
            sequence: sequence.unwrap_or(crate::staging::layout::DateSequence::Yyyymmdd),
            delimiter: delimiter.unwrap_or("/"),
        });
    } else if let Some(k) = date_keys.first() {
        return Err(Error::config(at(k), "needs DatePartitionEnabled true"));
    }
    out.cdc_path = transaction_folder(
        preserve_transactions,
        cdc_path.as_deref(),
        out.add_column_name,
        partitioned,
        at,
    )?;
    out.format = match (data_format.as_deref(), gzip) {
        (None, false) => None,
        (None | Some("csv"), true) => Some(Format::parse("csv.gz", field)?),
        (Some("csv"), false) => Some(Format::parse("csv", field)?),
        (Some("parquet"), false) => Some(Format::parse("parquet", field)?),
        (Some("parquet"), true) => {
            return Err(unsupported(
                "CompressionType",
                "Parquet is compressed with Snappy inside the file",
            ));
        }
        (Some(other), _) => {
            return Err(Error::config(
                at("DataFormat"),
                format!("{other:?} is not csv or parquet"),
            ));
        }
    };
    if !out.csv.is_default() && out.format.is_some_and(|f| f.encoding != Encoding::Csv) {
        return Err(Error::config(
            at("CsvDelimiter"),
            "CsvDelimiter, CsvNullValue and CsvRowDelimiter shape CSV files; DataFormat is parquet",
        ));
    }
    match (bucket, folder) {
        (Some(b), f) if !b.is_empty() => {
            let folder = f.unwrap_or_default();
            let folder = folder.trim_matches('/');
            let url = if folder.is_empty() {
                format!("s3://{b}")
            } else {
                format!("s3://{b}/{folder}")
            };
            crate::staging::parse_s3_url(&url).map_err(|e| match e {
                Error::Config { reason, .. } => Error::config(at("BucketName"), reason),
                other => other,
            })?;
            out.stage = Some(url);
        }
        (_, Some(f)) if !f.is_empty() => {
            return Err(Error::config(at("BucketFolder"), "needs BucketName"));
        }
        _ => {}
    }
    Ok(out)
}

/// `PreserveTransactions` and `CdcPath`, as DMS takes them on an S3 target: both or neither,
/// never with `AddColumnName` or `DatePartitionEnabled`. The folder is relative to the stage
/// (DMS: under BucketFolder), of S3's safe characters, and not pgshift's `_manifests`.
fn transaction_folder(
    preserve: bool,
    cdc_path: Option<&str>,
    add_column_name: bool,
    date_partition: bool,
    at: impl Fn(&str) -> String,
) -> Result<Option<String>> {
    let path = cdc_path
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty());
    let path = match (preserve, path) {
        (false, None) => return Ok(None),
        (true, None) => {
            return Err(Error::config(
                at("PreserveTransactions"),
                "needs CdcPath: the folder the transaction files go to",
            ));
        }
        (false, Some(_)) => {
            return Err(Error::config(
                at("CdcPath"),
                "on a target it is the folder of PreserveTransactions' files: set PreserveTransactions true, or leave CdcPath out",
            ));
        }
        (true, Some(p)) => p,
    };
    for (setting, on) in [
        ("AddColumnName", add_column_name),
        ("DatePartitionEnabled", date_partition),
    ] {
        if on {
            return Err(Error::config(
                at(setting),
                "cannot be used with PreserveTransactions (nor can it in DMS)",
            ));
        }
    }
    let safe = |c: char| c.is_ascii_alphanumeric() || "!-_.*'()".contains(c);
    for segment in path.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." || !segment.chars().all(safe) {
            return Err(Error::config(
                at("CdcPath"),
                format!(
                    "{path:?} is not a relative folder of letters, digits and !-_.*'() separated by /"
                ),
            ));
        }
    }
    if path.starts_with('_') {
        return Err(Error::config(
            at("CdcPath"),
            format!("{path:?}: folders starting with _ are pgshift's (_manifests)"),
        ));
    }
    Ok(Some(path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dms_settings_become_stage_format_and_columns() {
        let s = parse(
            r#"{"S3Settings": {"BucketName": "my-bucket", "BucketFolder": "/dms/orders/",
                "DataFormat": "csv", "CompressionType": "GZIP", "TimestampColumnName": "ts",
                "IncludeOpForFullLoad": false, "CsvDelimiter": ",", "CsvRowDelimiter": "\\n",
                "EncryptionMode": "SSE_S3", "ServiceAccessRoleArn": "arn:aws:iam::1:role/dms"}}"#,
            "--s3-settings",
        )
        .unwrap();
        assert_eq!(s.stage.as_deref(), Some("s3://my-bucket/dms/orders"));
        assert_eq!(s.format, Some(Format::parse("csv.gz", "f").unwrap()));
        assert!(s.commit_ts_column);
        assert_eq!(s.encryption, Encryption::BucketDefault);
        assert_eq!(s.notes.len(), 1, "the role is named as not used");
        assert!(s.csv.is_default());
        let s = parse(
            r#"{"CsvDelimiter": "\t", "CsvNullValue": "\\N", "CsvRowDelimiter": "\r\n"}"#,
            "x",
        )
        .unwrap();
        assert_eq!(
            (
                s.csv.delimiter.as_str(),
                s.csv.null_value.as_str(),
                s.csv.row_delimiter.as_str()
            ),
            ("\t", "\\N", "\r\n")
        );
        let s = parse(r#"{"DataFormat": "parquet"}"#, "x").unwrap();
        assert_eq!(s.format, Some(Format::parse("parquet", "f").unwrap()));
        assert!(s.stage.is_none());
        let s = parse(
            r#"{"EncryptionMode": "sse_kms", "ServerSideEncryptionKmsKeyId": "alias/dms"}"#,
            "x",
        )
        .unwrap();
        assert_eq!(
            s.encryption,
            Encryption::Kms {
                key_id: Some("alias/dms".to_owned())
            }
        );
        let s = parse(r#"{"EncryptionMode": "SSE_KMS"}"#, "x").unwrap();
        assert_eq!(s.encryption, Encryption::Kms { key_id: None });
        use crate::staging::layout::{DatePartition, DateSequence};
        let s = parse(r#"{"DatePartitionEnabled": "y"}"#, "x").unwrap();
        assert_eq!(
            s.date_partition,
            Some(DatePartition {
                sequence: DateSequence::Yyyymmdd,
                delimiter: "/"
            })
        );
        let s = parse(
            r#"{"DatePartitionEnabled": true, "DatePartitionSequence": "yyyymmddhh",
                "DatePartitionDelimiter": "NONE", "DatePartitionTimezone": "UTC"}"#,
            "x",
        )
        .unwrap();
        assert_eq!(
            s.date_partition,
            Some(DatePartition {
                sequence: DateSequence::Yyyymmddhh,
                delimiter: ""
            })
        );
    }

    #[test]
    fn preserve_transactions_names_the_transaction_folder() {
        let s = parse(
            r#"{"PreserveTransactions": true, "CdcPath": "/txn/all/", "DataFormat": "parquet"}"#,
            "x",
        )
        .unwrap();
        assert_eq!(s.cdc_path.as_deref(), Some("txn/all"));
        let s = parse(
            r#"{"PreserveTransactions": "y", "CdcPath": "changes"}"#,
            "x",
        )
        .unwrap();
        assert_eq!(s.cdc_path.as_deref(), Some("changes"));
        let s = parse(r#"{"PreserveTransactions": false, "CdcPath": ""}"#, "x").unwrap();
        assert_eq!(s.cdc_path, None);
    }

    #[test]
    fn given_stage_and_format_must_agree() {
        let s = parse(
            r#"{"BucketName": "bkt", "BucketFolder": "f", "DataFormat": "parquet"}"#,
            "x",
        )
        .unwrap();
        assert_eq!(s.resolve_stage("./default", None).unwrap(), "s3://bkt/f");
        assert_eq!(
            s.resolve_stage("s3://bkt/f/", Some("--stage")).unwrap(),
            "s3://bkt/f"
        );
        let err = s
            .resolve_stage("s3://other/f", Some("PGSHIFT_STAGE"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("PGSHIFT_STAGE") && err.contains("s3://bkt/f"),
            "{err}"
        );
        let csv = Format::parse("csv", "f").unwrap();
        let parquet = Format::parse("parquet", "f").unwrap();
        assert_eq!(s.resolve_format(csv, None).unwrap(), parquet);
        let err = s
            .resolve_format(csv, Some("--format"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--format"), "{err}");
        assert_eq!(
            s.resolve_format(parquet, Some("--format")).unwrap(),
            parquet
        );
        // A CSV dialect with a format given elsewhere that is not CSV is named.
        let s = parse(r#"{"CsvDelimiter": "|"}"#, "x").unwrap();
        for other in ["jsonl", "parquet"] {
            let f = Format::parse(other, "f").unwrap();
            let err = s
                .resolve_format(f, Some("--format"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("S3Settings.CsvDelimiter") && err.contains(other),
                "{err}"
            );
        }
        assert_eq!(s.resolve_format(csv, Some("--format")).unwrap(), csv);
    }

    #[test]
    fn settings_pgshift_does_not_honour_are_named() {
        for (json, key) in [
            (
                r#"{"CdcInsertsOnly": true, "CdcInsertsAndUpdates": true}"#,
                "CdcInsertsAndUpdates",
            ),
            (r#"{"CdcInsertsOnly": 1}"#, "CdcInsertsOnly"),
            (r#"{"IncludeOpForFullLoad": "yes"}"#, "IncludeOpForFullLoad"),
            (r#"{"AddColumnName": "maybe"}"#, "AddColumnName"),
            (r#"{"CsvDelimiter": "ab"}"#, "CsvDelimiter"),
            (r#"{"CsvRowDelimiter": "\\r"}"#, "CsvRowDelimiter"),
            (r#"{"CsvNullValue": "a,b"}"#, "CsvNullValue"),
            (
                r#"{"CsvNullValue": "NULL", "DataFormat": "parquet"}"#,
                "CsvDelimiter",
            ),
            (r#"{"DatePartitionEnabled": 3}"#, "DatePartitionEnabled"),
            (
                r#"{"DatePartitionEnabled": true, "DatePartitionSequence": "YYYY"}"#,
                "DatePartitionSequence",
            ),
            (
                r#"{"DatePartitionEnabled": true, "DatePartitionTimezone": "Asia/Seoul"}"#,
                "DatePartitionTimezone",
            ),
            (
                r#"{"DatePartitionDelimiter": "DASH"}"#,
                "DatePartitionDelimiter",
            ),
            (r#"{"EncryptionMode": "SSE_C"}"#, "EncryptionMode"),
            (
                r#"{"ServerSideEncryptionKmsKeyId": "arn:aws:kms:us-east-1:1:key/k"}"#,
                "ServerSideEncryptionKmsKeyId",
            ),
            (r#"{"CsvNoSupValue": "x"}"#, "CsvNoSupValue"),
            (
                r#"{"DataFormat": "parquet", "CompressionType": "gzip"}"#,
                "CompressionType",
            ),
            (r#"{"BucketFolder": "x"}"#, "BucketFolder"),
            (r#"{"BucketName": "Bad_Bucket"}"#, "BucketName"),
            (r#"["not an object"]"#, "object"),
            (r#"{"PreserveTransactions": true}"#, "PreserveTransactions"),
            (r#"{"CdcPath": "changes"}"#, "CdcPath"),
            (
                r#"{"PreserveTransactions": "n", "CdcPath": "changes"}"#,
                "CdcPath",
            ),
            (
                r#"{"PreserveTransactions": true, "CdcPath": "changes", "AddColumnName": true}"#,
                "AddColumnName",
            ),
            (
                r#"{"PreserveTransactions": true, "CdcPath": "c", "DatePartitionEnabled": true}"#,
                "DatePartitionEnabled",
            ),
            (
                r#"{"PreserveTransactions": true, "CdcPath": "a/../b"}"#,
                "CdcPath",
            ),
            (
                r#"{"PreserveTransactions": true, "CdcPath": "a b"}"#,
                "CdcPath",
            ),
            (
                r#"{"PreserveTransactions": true, "CdcPath": "_manifests"}"#,
                "CdcPath",
            ),
            (
                r#"{"PreserveTransactions": 1, "CdcPath": "c"}"#,
                "PreserveTransactions",
            ),
        ] {
            let err = parse(json, "--s3-settings").unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("--s3-settings"),
                "{json}: {err}"
            );
        }
    }
}
