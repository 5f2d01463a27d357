//! Integration tests: real PostgreSQL and a local AWS emulator (see `scripts/test.sh`).

mod apply;
mod cdc;
mod cli;
mod ddl;
mod endpoint;
mod events;
mod full_load;
mod golden;
mod lambda_runtime;
mod localstack;
mod majors;
mod migrate;
mod parquet;
mod pg12;
mod reload;
mod safety;
mod seams;
mod target_schema;
