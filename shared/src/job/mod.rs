//! Jobs: the orchestration each Lambda and CLI command calls. Each module's docs give its
//! effect order and what happens on failure at each step. A job is its effect order and its
//! loop over the seams (source, staging, state); jobs never import jobs: what they share is
//! below them ([`crate::task`], [`crate::options`]).

pub mod apply;
pub mod cdc_poll;
pub mod full_load;
pub mod slot_watch;
pub mod status;
pub mod teardown;
pub mod test_endpoint;
pub mod validate;
