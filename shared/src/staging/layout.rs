//! The staged layout (DESIGN §5): every object key and every manifest type, in one place.
//!
//! ```text
//! <schema>/<table>/LOAD<n:08X>.<ext>           full-load chunk n (DMS naming)
//! <schema>/<table>/cdc/<C>.<ext>               a CDC batch's changes of one table
//! <schema>/<table>/_schema/<lsn>.json          a schema version (StoredSchema)
//! _manifests/load/<schema>.<table>.json        a table's load manifest (LoadManifest)
//! _manifests/load/_chunks.json                 the chunk list of a large plan
//! _manifests/cdc/<C>-<E>.json                  a batch's commit record (BatchManifest)
//! ```
//! LSNs in keys are 16 hex digits, so keys sort in WAL order. Schema and table names are kept
//! as they are (case included) except what cannot be one key segment ([`key_segment`]).

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::ObjectSink;
use super::dialect::CsvDialect;
use super::encode::Format;
use crate::change::ddl::{SchemaChange, TableDefinition};
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::source::copy_text::RowChecksum;
use crate::state::records::ChunkRecord;
use crate::table::TableSchema;

mod cdc;

pub use cdc::{
    CdcOps, DatePartition, DateSequence, TransactionFile, cdc_file_key, cdc_part_key,
    transaction_file_key, transaction_file_ms,
};
mod reload;
mod versions;
pub use reload::{
    RELOAD_MANIFESTS, reload_chunk_key, reload_manifest_key, reload_manifest_keys,
    reload_schema_key,
};
pub use versions::SchemaVersions;

/// Where batch manifests live.
pub const CDC_MANIFESTS: &str = "_manifests/cdc/";
/// Where load manifests live.
pub const LOAD_MANIFESTS: &str = "_manifests/load/";
/// Written and deleted before a task's first slot is created: a stage that cannot be written
/// fails the run before anything holds WAL on the source.
pub const WRITE_CHECK_KEY: &str = "_manifests/_write_check";
/// The chunk list of a plan too large to pass inline through Step Functions.
pub const CHUNK_LIST_KEY: &str = "_manifests/load/_chunks.json";

/// A schema or table name as one object-key segment: `/`, `%`, `\`, control characters, the
/// names `.`/`..` and a leading `_` (pgshift's own keys start with `_`: a schema named
/// `_manifests` must not land among the manifests) are percent-encoded; everything else (case
/// included) is kept. Injective: different names give different segments.
pub fn key_segment(name: &str) -> String {
    encode_segment(name, &[])
}

/// [`key_segment`] that also encodes `extra` characters (separators of a compound key).
fn encode_segment(name: &str, extra: &[char]) -> String {
    if name == "." || name == ".." {
        return name.bytes().map(|b| format!("%{b:02X}")).collect();
    }
    let mut out = String::with_capacity(name.len());
    for (i, ch) in name.chars().enumerate() {
        if ch == '/'
            || ch == '%'
            || ch == '\\'
            || ch.is_control()
            || (i == 0 && ch == '_')
            || extra.contains(&ch)
        {
            let mut buf = [0u8; 4];
            for b in ch.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// `<schema>/<table>` as a key prefix.
pub fn table_prefix(schema: &str, table: &str) -> String {
    format!("{}/{}", key_segment(schema), key_segment(table))
}

/// `_manifests/cdc/<C>-<E>.json`.
pub fn manifest_key(start: Lsn, end: Lsn) -> String {
    format!("{CDC_MANIFESTS}{}-{}.json", start.key_hex(), end.key_hex())
}

/// The start and end of a batch from its manifest key (`None` for any other key).
pub fn batch_range(key: &str) -> Option<(Lsn, Lsn)> {
    let (start, end) = key
        .strip_prefix(CDC_MANIFESTS)?
        .strip_suffix(".json")?
        .split_once('-')?;
    Some((Lsn::from_key_hex(start).ok()?, Lsn::from_key_hex(end).ok()?))
}

/// The prefix of every manifest of a batch starting at `start`.
pub fn manifest_prefix(start: Lsn) -> String {
    format!("{CDC_MANIFESTS}{}-", start.key_hex())
}

/// The end of the batch starting at `start`, when a manifest for it already exists (the
/// smallest, should there be several).
pub fn existing_batch_end(keys: &[String], start: Lsn) -> Option<Lsn> {
    let prefix = manifest_prefix(start);
    keys.iter()
        .filter_map(|k| k.strip_prefix(&prefix)?.strip_suffix(".json"))
        .filter_map(|e| Lsn::from_key_hex(e).ok())
        .min()
}

/// `<schema>/<table>/LOAD<n+1:08X>.<ext>` (DMS naming, 1-based).
pub fn chunk_key(schema: &str, table: &str, n: u32, format: Format) -> String {
    format!(
        "{}/LOAD{:08X}.{}",
        table_prefix(schema, table),
        n + 1,
        format.ext()
    )
}

/// `_manifests/load/<schema>.<table>.json`: names escaped as in data keys, and `.` too, so
/// `"a.b"."c"` and `"a"."b.c"` have different manifests.
pub fn load_manifest_key(schema: &str, table: &str) -> String {
    format!(
        "{LOAD_MANIFESTS}{}.{}.json",
        encode_segment(schema, &['.']),
        encode_segment(table, &['.'])
    )
}

/// `<schema>.<table>` for a state item's key, with `%`, `.` and `#` escaped (the separators of
/// `chunk#<schema>.<table>#<n>`), so no two tables share an item.
pub fn state_table_key(schema: &str, table: &str) -> String {
    let esc = |s: &str| {
        s.replace('%', "%25")
            .replace('.', "%2E")
            .replace('#', "%23")
    };
    format!("{}.{}", esc(schema), esc(table))
}

/// `<schema>/<table>/_schema/`.
pub fn schema_prefix(schema: &str, table: &str) -> String {
    format!("{}/_schema/", table_prefix(schema, table))
}

/// A run of rows of one transaction in a file (a keyless table's files list them, so a reader
/// can skip what a chunk's snapshot already saw).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidRun {
    pub xid: u32,
    pub rows: u64,
}

/// A chunk's snapshot, as `txid_current_snapshot()` prints it (`xmin:xmax:xip,..`, 64-bit
/// transaction ids): which transactions the chunk's rows already include.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl Snapshot {
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?,
        };
        parts
            .next()
            .is_none()
            .then_some(Snapshot { xmin, xmax, xip })
    }

    /// Whether the transaction `xid` (32 bits, as pgoutput gives it; taken in the epoch that
    /// puts it nearest to `xmax`) had committed when the snapshot was taken.
    pub fn saw(&self, xid: u32) -> bool {
        let epoch = self.xmax & !0xFFFF_FFFF;
        let mut full = epoch | u64::from(xid);
        if full > self.xmax + (1 << 31) {
            full = full.wrapping_sub(1 << 32);
        } else if full + (1 << 31) < self.xmax {
            full += 1 << 32;
        }
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

/// One file of a batch, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchFile {
    pub key: String,
    pub schema: String,
    pub table: String,
    pub rows: u64,
    pub bytes: u64,
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub truncates: u64,
    /// Schema versions used, each with the first row it applies to.
    pub schema_versions: Vec<SchemaSegment>,
    /// xxh3-64 of the stored bytes (16 hex digits): readers verify the object is whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// A keyless table's rows by transaction, in order (empty for keyed tables).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xids: Vec<XidRun>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaSegment {
    pub key: String,
    pub first_row: u64,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// `_manifests/cdc/<C>-<E>.json`: the commit record of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchManifest {
    pub task: String,
    pub batch_seq: u64,
    /// The checkpoint the batch starts from.
    pub start_lsn: Lsn,
    /// The checkpoint after it: the last commit's end LSN.
    pub end_lsn: Lsn,
    pub first_commit_lsn: Lsn,
    pub last_commit_lsn: Lsn,
    pub last_commit_ts: String,
    pub transactions: u64,
    pub changes: u64,
    pub format: Format,
    pub commit_ts_column: bool,
    pub files: Vec<BatchFile>,
    /// Where the task's previous batch ended (`None` for its first): a reader that does not
    /// find that batch knows one is missing.
    #[serde(default)]
    pub prev_end_lsn: Option<Lsn>,
    /// The task began with a full load: its load manifests must exist.
    #[serde(default)]
    pub after_load: bool,
    /// Which changes were staged (absent: all).
    #[serde(default, skip_serializing_if = "CdcOps::is_all")]
    pub cdc_ops: CdcOps,
    /// CSV rows start with their `Op` field (absent: they do; without it only when
    /// `cdc_ops` filters and IncludeOpForFullLoad is off, as DMS writes them).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub op_field: bool,
    /// Each CSV file starts with a header row, its schema version's `csv_cdc_layout` (DMS's
    /// `AddColumnName`); a file then holds one schema version.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub header: bool,
    /// The CSV dialect (DMS's `CsvDelimiter`, `CsvNullValue`, `CsvRowDelimiter`; absent:
    /// PostgreSQL's CSV).
    #[serde(default, skip_serializing_if = "CsvDialect::is_default")]
    pub csv: CsvDialect,
    /// Written under transformation rules (names changed, columns left out): for the stage's
    /// readers; `apply` needs the source's names and refuses it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transformed: bool,
    /// The batch's changes of every table in commit order, one CSV file (DMS's
    /// `PreserveTransactions` with `CdcPath`); its rows are also in the tables' `files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_file: Option<TransactionFile>,
}

/// `<schema>/<table>/_schema/<lsn>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSchema {
    /// Where this version starts.
    pub lsn: Lsn,
    #[serde(flatten)]
    pub schema: TableSchema,
    /// The columns of a CDC CSV row, in order.
    pub csv_cdc_layout: Vec<String>,
    /// What changed the table here (DESIGN §12): absent for the load's version and for a
    /// shape seen only in a Relation message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ddl: Option<SchemaChange>,
}

/// Where a relation's definitions are kept, by relation id (the full load's, then one per
/// schema change): the poller finds what a change started from here, whatever the table is
/// called now.
pub const RELATIONS_PREFIX: &str = "_manifests/schema/relations/";

/// `_manifests/schema/relations/<relid>.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RelationHistory {
    pub relid: u32,
    /// In LSN order; a `None` definition: dropped there.
    pub versions: Vec<DefinitionAt>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DefinitionAt {
    pub lsn: Lsn,
    pub definition: Option<TableDefinition>,
}

impl RelationHistory {
    /// The definition in force just before `lsn`.
    pub fn before(&self, lsn: Lsn) -> Option<&TableDefinition> {
        self.versions
            .iter()
            .rev()
            .find(|v| v.lsn < lsn)
            .and_then(|v| v.definition.as_ref())
    }

    /// Records the definition from `lsn` on (a retry records the same again).
    pub fn record(&mut self, lsn: Lsn, definition: Option<TableDefinition>) {
        self.versions.retain(|v| v.lsn != lsn);
        let at = self.versions.partition_point(|v| v.lsn < lsn);
        self.versions.insert(at, DefinitionAt { lsn, definition });
    }
}

pub fn relation_key(relid: u32) -> String {
    format!("{RELATIONS_PREFIX}{relid}.json")
}

/// A relation's stored history (empty when none is stored).
pub async fn relation_history<S: ObjectSink>(sink: &S, relid: u32) -> Result<RelationHistory> {
    let key = relation_key(relid);
    match sink.get(&key).await? {
        None => Ok(RelationHistory {
            relid,
            versions: Vec::new(),
        }),
        Some(body) => serde_json::from_slice(&body)
            .map_err(|e| Error::Staged(format!("{key} is not a relation history: {e}"))),
    }
}

/// A table's load manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadManifest {
    pub task: String,
    pub schema: String,
    pub table: String,
    pub format: Format,
    /// CSV rows start with an `Op` field, `I` (DMS's `IncludeOpForFullLoad`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub op_column: bool,
    /// CSV files start with a header row of column names (DMS's `AddColumnName`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub header: bool,
    /// The CSV dialect (DMS's `CsvDelimiter`, `CsvNullValue`, `CsvRowDelimiter`; absent:
    /// PostgreSQL's CSV).
    #[serde(default, skip_serializing_if = "CsvDialect::is_default")]
    pub csv: CsvDialect,
    /// Written under transformation rules (names changed, columns left out): for the stage's
    /// readers; `apply` needs the source's names and refuses it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transformed: bool,
    pub columns: Vec<String>,
    /// The slot's consistent point (a reload's: its position R0).
    pub l0: Option<Lsn>,
    /// A reload's: the schema version its rows have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_key: Option<String>,
    pub rows: u64,
    pub bytes: u64,
    pub checksum: RowChecksum,
    pub chunks: Vec<ChunkRecord>,
}

/// The columns of a CDC CSV row: `Op`, the commit timestamp when asked, the table's columns,
/// then the unchanged-TOAST ordinals.
pub fn csv_cdc_layout(schema: &TableSchema, commit_ts_column: bool) -> Vec<String> {
    let mut cols = vec!["Op".to_owned()];
    if commit_ts_column {
        cols.push("commit_ts".to_owned());
    }
    cols.extend(schema.columns.iter().map(|c| c.name.clone()));
    cols.push("unchanged_toast".to_owned());
    cols
}

/// [`csv_cdc_layout`], without the `Op` field when `op_field` is false (a filtered stage).
pub fn csv_cdc_fields(schema: &TableSchema, commit_ts_column: bool, op_field: bool) -> Vec<String> {
    let mut layout = csv_cdc_layout(schema, commit_ts_column);
    if !op_field {
        layout.remove(0);
    }
    layout
}

/// Writes `value` as pretty JSON at `key`.
pub async fn put_json<S: ObjectSink, T: Serialize>(sink: &S, key: &str, value: &T) -> Result<()> {
    let body = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::Staged(format!("{key}: cannot serialize: {e}")))?;
    sink.put(key, Bytes::from(body)).await
}

/// Checks the stage takes a write (and a delete), naming it when it does not.
pub async fn check_writable<S: ObjectSink>(sink: &S) -> Result<()> {
    sink.put(WRITE_CHECK_KEY, Bytes::from_static(b"pgshift"))
        .await
        .map_err(|e| Error::Staged(format!("{} cannot be written: {e}", sink.describe())))?;
    sink.delete(WRITE_CHECK_KEY).await
}

/// Reads an object that must exist.
pub async fn get_required<S: ObjectSink>(sink: &S, key: &str) -> Result<Bytes> {
    sink.get(key).await?.ok_or_else(|| {
        Error::Staged(format!(
            "{key} is listed in a manifest but missing from {}",
            sink.describe()
        ))
    })
}

/// Reads a JSON object that must exist, naming the key when it is not what `what` says.
pub async fn get_json<S: ObjectSink, T: DeserializeOwned>(
    sink: &S,
    key: &str,
    what: &str,
) -> Result<T> {
    let body = get_required(sink, key).await?;
    serde_json::from_slice(&body).map_err(|e| Error::Staged(format!("{key} is not {what}: {e}")))
}

/// Every batch manifest key, in WAL order.
pub async fn batch_manifest_keys<S: ObjectSink>(sink: &S) -> Result<Vec<String>> {
    sink.list(CDC_MANIFESTS).await
}

/// Every load manifest key (the chunk list excluded).
pub async fn load_manifest_keys<S: ObjectSink>(sink: &S) -> Result<Vec<String>> {
    Ok(sink
        .list(LOAD_MANIFESTS)
        .await?
        .into_iter()
        .filter(|k| k != CHUNK_LIST_KEY)
        .collect())
}

/// The first (the load's) schema version of a table.
pub async fn first_schema<S: ObjectSink>(
    sink: &S,
    schema: &str,
    table: &str,
) -> Result<StoredSchema> {
    let key = sink
        .list(&schema_prefix(schema, table))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Staged(format!("no staged schema for {schema}.{table}")))?;
    get_json(sink, &key, "a schema version").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_segments_keep_case_and_escape_separators() {
        assert_eq!(key_segment("Table1"), "Table1");
        assert_eq!(key_segment("a/b"), "a%2Fb");
        assert_eq!(key_segment("100%"), "100%25");
        assert_eq!(key_segment("."), "%2E");
        assert_eq!(key_segment(".."), "%2E%2E");
        assert_eq!(key_segment("s p.\"q\""), "s p.\"q\"");
        assert_eq!(key_segment("_manifests"), "%5Fmanifests");
        assert_eq!(key_segment("a_b"), "a_b");
    }

    #[test]
    fn every_key_is_injective_over_identifiers() {
        let names = [
            "a.b",
            "a",
            "b.c",
            "c",
            "_manifests",
            "%5Fmanifests",
            "cdc",
            "a#1",
            "x%2Ey",
        ];
        let mut loads = std::collections::HashSet::new();
        let mut states = std::collections::HashSet::new();
        let mut data = std::collections::HashSet::new();
        for s in names {
            for t in names {
                assert!(loads.insert(load_manifest_key(s, t)), "{s}.{t}");
                assert!(states.insert(state_table_key(s, t)), "{s}.{t}");
                let f = Format::default();
                assert!(data.insert(chunk_key(s, t, 0, f)), "{s}.{t}");
                assert!(
                    !chunk_key(s, t, 0, f).starts_with("_"),
                    "{s}.{t}: among pgshift's keys"
                );
            }
        }
    }

    #[test]
    fn snapshots_tell_which_transactions_they_saw() {
        let s = Snapshot::parse("100:105:101,103").unwrap();
        assert!(s.saw(99) && s.saw(100) && s.saw(102) && s.saw(104));
        assert!(!s.saw(101) && !s.saw(103) && !s.saw(105) && !s.saw(200));
        assert_eq!(Snapshot::parse("7:7:").unwrap().xip, Vec::<u64>::new());
        assert!(Snapshot::parse("x:1:").is_none() && Snapshot::parse("1:2:3:4").is_none());
        // Across a 32-bit wraparound: xmax in epoch 1, an xid just before it in epoch 0.
        let s = Snapshot::parse("4294967290:4294967300:").unwrap();
        assert!(s.saw(4_294_967_295), "epoch 0, before xmin's end");
        assert!(s.saw(2), "epoch 1 (4294967298), below xmax");
        assert!(!s.saw(5), "epoch 1 (4294967301), not yet");
    }

    #[test]
    fn manifest_keys_sort_by_lsn() {
        let a = manifest_key(Lsn(0xFF), Lsn(0x100));
        let b = manifest_key(Lsn(0x1_0000_0000), Lsn(0x1_0000_0001));
        assert!(a < b);
        assert_eq!(a, "_manifests/cdc/00000000000000FF-0000000000000100.json");
        let keys = vec![b.clone(), a.clone()];
        assert_eq!(existing_batch_end(&keys, Lsn(0xFF)), Some(Lsn(0x100)));
        assert_eq!(existing_batch_end(&keys, Lsn(0x100)), None);
        assert_eq!(batch_range(&a), Some((Lsn(0xFF), Lsn(0x100))));
        assert_eq!(batch_range("_manifests/cdc/zz-00.json"), None);
        assert_eq!(batch_range("_manifests/load/x.json"), None);
    }

    #[test]
    fn keys_follow_dms_naming() {
        let f = Format::parse("csv.gz", "f").unwrap();
        assert_eq!(
            chunk_key("public", "Orders", 0, f),
            "public/Orders/LOAD00000001.csv.gz"
        );
        assert_eq!(
            cdc_file_key("a/b", "t", Lsn(1), f),
            "a%2Fb/t/cdc/0000000000000001.csv.gz"
        );
        assert_eq!(
            load_manifest_key("s.x", "t/y"),
            "_manifests/load/s%2Ex.t%2Fy.json"
        );
        // A table's later Parquet parts sort after its first, and before the next batch.
        let pq = Format::parse("parquet", "f").unwrap();
        let part = |lsn, n| cdc_part_key("public", "t", Lsn(lsn), pq, n, None);
        assert_eq!(part(1, 0), cdc_file_key("public", "t", Lsn(1), pq));
        assert_eq!(part(1, 1), "public/t/cdc/0000000000000001_0002.parquet");
        let mut keys = vec![part(2, 0), part(1, 10), part(1, 1), part(1, 0)];
        keys.sort();
        assert_eq!(keys, [part(1, 0), part(1, 1), part(1, 10), part(2, 0)]);
        assert_eq!(
            cdc_part_key("public", "t", Lsn(1), pq, 0, Some("2026/12/02")),
            "public/t/cdc/2026/12/02/0000000000000001.parquet"
        );
    }

    #[test]
    fn date_partitions_follow_the_commit_date() {
        // 2026-12-02 18:30:00 UTC, in microseconds since 2000-01-01.
        let ts = (1_796_236_200 - 946_684_800) * 1_000_000;
        let p = |sequence, delimiter| DatePartition {
            sequence,
            delimiter,
        };
        assert_eq!(p(DateSequence::Yyyymmdd, "/").path(ts), "2026/12/02");
        assert_eq!(p(DateSequence::Yyyymmddhh, "/").path(ts), "2026/12/02/18");
        assert_eq!(p(DateSequence::Yyyymm, "-").path(ts), "2026-12");
        assert_eq!(p(DateSequence::Mmyyyydd, "_").path(ts), "12_2026_02");
        assert_eq!(p(DateSequence::Ddmmyyyy, "").path(ts), "02122026");
        // Before 2000 and across a leap day.
        assert_eq!(p(DateSequence::Yyyymmdd, "/").path(-1), "1999/12/31");
        let leap = (1_709_164_800 - 946_684_800) * 1_000_000; // 2024-02-29 00:00 UTC
        assert_eq!(p(DateSequence::Yyyymmdd, "").path(leap), "20240229");
    }
}
