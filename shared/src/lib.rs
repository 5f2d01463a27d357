//! pgshift: move a live PostgreSQL database into S3 — a consistent chunked full load, then
//! change data capture from a logical replication slot — with no always-on instance.
//!
//! # Layout
//! - [`config`]: typed configuration (connection URLs, DMS secrets, Lambda environment).
//! - [`error`]: the error type; every error knows whether a retry can help.
//! - [`lsn`]: WAL positions.
//! - [`aws`]: the one place AWS SDK clients are built (honours `AWS_ENDPOINT_URL`).
//! - [`selection`]: DMS table-mapping selection rules.
//! - [`source`]: the PostgreSQL source: connect, catalog, endpoint checks.
//! - [`pgoutput`]: a pure decoder of the pgoutput protocol; [`change`]: decoded row changes.
//! - [`format`](mod@format): staged file formats; [`stage`]: where files go (S3, folder, memory).
//! - [`state`]: task state with conditional writes (DynamoDB, file, memory).
//! - [`job`]: what the functions and the CLI run.
//!
//! The design (data formats, the CDC effect order) is in `DESIGN.md` of the project.

pub mod aws;
pub mod change;
pub mod config;
pub mod error;
pub mod job;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod lsn;
pub mod pgoutput;
pub mod plan;
pub mod selection;
pub mod source;
pub mod staging;
pub mod state;
pub mod table;

pub use error::{Error, Result};
pub use lsn::Lsn;
