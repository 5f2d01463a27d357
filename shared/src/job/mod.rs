//! Jobs: the orchestration each Lambda and CLI command calls. Each module's docs give its
//! effect order and what happens on failure at each step.

pub mod test_endpoint;
