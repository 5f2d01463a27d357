//! Jobs: the orchestration each Lambda and CLI command calls. Each module's docs give its
//! effect order and what happens on failure at each step.

pub mod cdc_poll;
pub mod test_endpoint;
