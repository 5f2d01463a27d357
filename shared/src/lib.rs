//! pgshift: move a live PostgreSQL database into S3 — a consistent chunked full load, then
//! change data capture from a logical replication slot — with no always-on instance.
//!
//! # Layout
//! - [`config`]: typed configuration (connection URLs, DMS secrets, Lambda environment).
//! - [`error`]: the error type; typed variants for what code branches on, and every error
//!   knows whether a retry can help.
//! - [`lsn`]: WAL positions; [`table`]: a table's schema; [`selection`]: DMS selection rules;
//!   [`plan`]: chunk ranges (pure).
//! - [`aws`]: the one place AWS SDK clients are built (honours `AWS_ENDPOINT_URL`).
//! - Three seams: [`source`] (PostgreSQL: [`source::CdcSource`], catalog, slot, peek,
//!   snapshot), [`staging`] (objects: [`staging::ObjectSink`]; [`staging::layout`] names
//!   every one), [`state`] (task state: [`state::StateStore`]; [`state::records`] holds every
//!   transition), each with a real, a local, an in-memory and a fault-injecting implementation.
//! - [`pgoutput`]: a pure decoder of the pgoutput protocol; [`change`]: decoded row changes.
//! - [`task`]: what a task's jobs share (its first run's task item); [`options`]: the one
//!   configuration → job options mapping.
//! - [`job`]: what the functions and the CLI run, each its effect order over the seams.
//!
//! The design (data formats, the CDC effect order) is in `DESIGN.md` of the project.

pub mod aws;
pub mod change;
pub mod config;
pub mod error;
pub mod events;
pub mod job;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod lsn;
pub mod metrics;
pub mod migration;
pub mod options;
pub mod pgoutput;
pub mod plan;
pub mod progress;
pub mod selection;
pub mod source;
pub mod staging;
pub mod state;
pub mod table;
pub mod target;
pub mod task;

pub use error::{Error, Result};
pub use lsn::Lsn;
