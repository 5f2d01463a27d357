//! The schema versions of a table's staged files (`<schema>/<table>/_schema/<lsn>.json`).

use crate::change::ddl::SchemaChange;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::staging::ObjectSink;
use crate::table::TableSchema;

use super::{StoredSchema, csv_cdc_fields, put_json, schema_prefix};

/// The schema versions of one table's staged files: the one writer of
/// `<schema>/<table>/_schema/<lsn>.json`, used by the full load and CDC alike. A version is
/// written when the table's shape (or the CSV layout) differs from the latest stored one.
#[derive(Debug, Default)]
pub struct SchemaVersions {
    /// Latest stored version per table prefix: (key, schema, layout); `None` when none.
    latest: std::collections::HashMap<String, Option<(String, StoredSchema)>>,
    /// CDC CSV rows have no `Op` field (a filtered stage without IncludeOpForFullLoad).
    without_op: bool,
}

impl SchemaVersions {
    pub fn new() -> SchemaVersions {
        SchemaVersions::default()
    }

    /// Versions announcing CSV rows with (`true`) or without their `Op` field.
    pub fn with_op_field(mut self, op_field: bool) -> SchemaVersions {
        self.without_op = !op_field;
        self
    }

    fn layout(&self, schema: &TableSchema, commit_ts_column: bool) -> Vec<String> {
        csv_cdc_fields(schema, commit_ts_column, !self.without_op)
    }

    /// The key of the stored version matching `schema`, writing one at `lsn` if none does.
    pub async fn version_for<S: ObjectSink>(
        &mut self,
        sink: &S,
        schema: &TableSchema,
        lsn: Lsn,
        commit_ts_column: bool,
    ) -> Result<String> {
        if let Some(key) = self.current(sink, schema, commit_ts_column).await? {
            return Ok(key);
        }
        self.write(sink, schema, lsn, commit_ts_column, None).await
    }

    /// The key of the latest stored version when it matches `schema` (and the layout).
    pub async fn current<S: ObjectSink>(
        &mut self,
        sink: &S,
        schema: &TableSchema,
        commit_ts_column: bool,
    ) -> Result<Option<String>> {
        let prefix = schema_prefix(&schema.schema, &schema.table);
        if !self.latest.contains_key(&prefix) {
            let latest = match sink.list(&prefix).await?.last() {
                None => None,
                Some(k) => match sink.get(k).await? {
                    Some(body) => serde_json::from_slice::<StoredSchema>(&body)
                        .ok()
                        .map(|s| (k.clone(), s)),
                    None => None,
                },
            };
            self.latest.insert(prefix.clone(), latest);
        }
        let layout = self.layout(schema, commit_ts_column);
        if let Some(Some((key, stored))) = self.latest.get(&prefix)
            && stored.schema.same_shape(schema)
            && stored.csv_cdc_layout == layout
        {
            return Ok(Some(key.clone()));
        }
        Ok(None)
    }

    /// Writes the version a schema change starts at `lsn` (always: a change that keeps the
    /// columns, a default or a rename of the table, is a version too).
    pub async fn version_for_change<S: ObjectSink>(
        &mut self,
        sink: &S,
        schema: &TableSchema,
        lsn: Lsn,
        commit_ts_column: bool,
        change: SchemaChange,
    ) -> Result<String> {
        self.write(sink, schema, lsn, commit_ts_column, Some(change))
            .await
    }

    async fn write<S: ObjectSink>(
        &mut self,
        sink: &S,
        schema: &TableSchema,
        lsn: Lsn,
        commit_ts_column: bool,
        ddl: Option<SchemaChange>,
    ) -> Result<String> {
        let prefix = schema_prefix(&schema.schema, &schema.table);
        let stored = StoredSchema {
            lsn,
            schema: schema.clone(),
            csv_cdc_layout: self.layout(schema, commit_ts_column),
            ddl,
        };
        let want = serde_json::to_value(&stored)
            .map_err(|e| Error::Staged(format!("encoding a schema version: {e}")))?;
        // Keys never collide: a different version at the same position (the load's and a
        // change's, or two changes of one statement) takes the next suffix, which sorts after
        // it; a retry finds its own version and rewrites it.
        let mut key = format!("{prefix}{}.json", lsn.key_hex());
        for n in 1..=99 {
            let existing = match sink.get(&key).await? {
                None => break,
                Some(body) => serde_json::from_slice::<serde_json::Value>(&body).ok(),
            };
            if existing.as_ref() == Some(&want) {
                break;
            }
            key = format!("{prefix}{}_{n:02}.json", lsn.key_hex());
        }
        put_json(sink, &key, &stored).await?;
        self.latest.insert(prefix, Some((key.clone(), stored)));
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::MemorySink;
    use crate::staging::layout::get_json;
    use crate::table::ColumnSchema;

    fn table(cols: &[&str]) -> TableSchema {
        TableSchema {
            schema: "public".to_owned(),
            table: "t".to_owned(),
            columns: cols
                .iter()
                .map(|c| ColumnSchema {
                    name: (*c).to_owned(),
                    type_name: "text".to_owned(),
                    type_oid: 25,
                    type_modifier: -1,
                    key: *c == "id",
                })
                .collect(),
            replica_identity: "d".to_owned(),
        }
    }

    #[tokio::test]
    async fn schema_versions_are_written_once_per_shape_and_layout() {
        let sink = MemorySink::new();
        let mut v = SchemaVersions::new();
        let a = v
            .version_for(&sink, &table(&["id", "a"]), Lsn(1), false)
            .await
            .unwrap();
        assert_eq!(
            v.version_for(&sink, &table(&["id", "a"]), Lsn(2), false)
                .await
                .unwrap(),
            a
        );
        // A new column, then a different CSV layout: new versions.
        let b = v
            .version_for(&sink, &table(&["id", "a", "b"]), Lsn(3), false)
            .await
            .unwrap();
        let c = v
            .version_for(&sink, &table(&["id", "a", "b"]), Lsn(4), true)
            .await
            .unwrap();
        assert!(a < b && b < c, "{a} {b} {c}");
        // A fresh writer (another run) finds the latest stored one.
        let mut again = SchemaVersions::new();
        assert_eq!(
            again
                .version_for(&sink, &table(&["id", "a", "b"]), Lsn(9), true)
                .await
                .unwrap(),
            c
        );
        let stored: StoredSchema = get_json(&sink, &c, "a schema").await.unwrap();
        assert_eq!(
            stored.csv_cdc_layout,
            ["Op", "commit_ts", "id", "a", "b", "unchanged_toast"]
        );
        assert_eq!(sink.list("public/t/_schema/").await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn versions_at_one_position_never_overwrite_each_other() {
        let sink = MemorySink::new();
        // The load's version at L0, then CDC's with another layout at the same position.
        let load = SchemaVersions::new()
            .version_for(&sink, &table(&["id", "a"]), Lsn(16), false)
            .await
            .unwrap();
        let mut cdc = SchemaVersions::new();
        let other = cdc
            .version_for(&sink, &table(&["id", "a"]), Lsn(16), true)
            .await
            .unwrap();
        assert_ne!(load, other);
        assert!(load < other, "sorts after: the latest is the last key");
        let kept: StoredSchema = get_json(&sink, &load, "a schema").await.unwrap();
        assert_eq!(kept.csv_cdc_layout, ["Op", "id", "a", "unchanged_toast"]);
        // A retry writes its own version again, at the same key.
        let again = SchemaVersions::new()
            .version_for(&sink, &table(&["id", "a"]), Lsn(16), true)
            .await
            .unwrap();
        assert_eq!(again, other);
        assert_eq!(sink.list("public/t/_schema/").await.unwrap().len(), 2);
    }
}
