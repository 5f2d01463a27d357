//! Jobs: the orchestration each Lambda and CLI command calls. Each module's docs give its
//! effect order and what happens on failure at each step.

pub mod apply;
pub mod cdc_poll;
pub mod full_load;
pub mod status;
pub mod test_endpoint;
pub mod validate;

/// Parses a Lambda event, naming the offending field on error (`endpoint.port: ...`).
pub fn parse_event<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> crate::Result<T> {
    if !value.is_object() {
        return Err(crate::Error::event("event", "must be a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "event".to_owned()
        } else {
            path
        };
        crate::Error::event(field, e.inner().to_string())
    })
}
