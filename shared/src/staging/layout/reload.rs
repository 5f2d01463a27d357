//! A reload's keys (DMS's "reload table"): its chunks beside the table's data in a folder of
//! their own, its manifests under `_manifests/reload/<R0>/`.

use super::{ObjectSink, encode_segment, table_prefix};
use crate::error::Result;
use crate::lsn::Lsn;
use crate::staging::encode::Format;

/// Where reload manifests live.
pub const RELOAD_MANIFESTS: &str = "_manifests/reload/";

/// `<schema>/<table>/reload-<R0>/LOAD<n+1:08X>.<ext>`: the load's names in a folder no other
/// key of the table uses (`cdc/`, `_schema/` and `LOAD..` files are the others).
pub fn reload_chunk_key(schema: &str, table: &str, r0: Lsn, n: u32, format: Format) -> String {
    format!(
        "{}/reload-{}/LOAD{:08X}.{}",
        table_prefix(schema, table),
        r0.key_hex(),
        n + 1,
        format.ext()
    )
}

/// `<schema>/<table>/reload-<R0>/schema.json`: the columns the reload read.
pub fn reload_schema_key(schema: &str, table: &str, r0: Lsn) -> String {
    format!(
        "{}/reload-{}/schema.json",
        table_prefix(schema, table),
        r0.key_hex()
    )
}

/// `_manifests/reload/<R0>/<schema>.<table>.json` (names escaped as the load's manifests').
pub fn reload_manifest_key(r0: Lsn, schema: &str, table: &str) -> String {
    format!(
        "{RELOAD_MANIFESTS}{}/{}.{}.json",
        r0.key_hex(),
        encode_segment(schema, &['.']),
        encode_segment(table, &['.'])
    )
}

/// Every reload manifest key with its R0, in R0 order.
pub async fn reload_manifest_keys<S: ObjectSink>(sink: &S) -> Result<Vec<(Lsn, String)>> {
    let mut out: Vec<(Lsn, String)> = sink
        .list(RELOAD_MANIFESTS)
        .await?
        .into_iter()
        .filter_map(|k| {
            let (r0, _) = k.strip_prefix(RELOAD_MANIFESTS)?.split_once('/')?;
            Some((Lsn::from_key_hex(r0).ok()?, k))
        })
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_keys_sit_apart_from_the_loads() {
        let f = Format::default();
        assert_eq!(
            reload_chunk_key("public", "Orders", Lsn(0x1_0000_00A0), 0, f),
            "public/Orders/reload-00000001000000A0/LOAD00000001.csv"
        );
        assert_eq!(
            reload_manifest_key(Lsn(0xA0), "a.b", "c"),
            "_manifests/reload/00000000000000A0/a%2Eb.c.json"
        );
    }
}
