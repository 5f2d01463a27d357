#!/usr/bin/env bash
# The test command: starts everything the tests need on 127.0.0.1 (two throwaway PostgreSQL 15
# clusters from the machine's packages and the moto AWS emulator in a project-local virtualenv),
# runs the tests of the whole workspace against them, and stops what it started.
#
#   ./scripts/test.sh [extra cargo-nextest / cargo test arguments]
#
# Tests find the services through PGSHIFT_TEST_PG_URL, PGSHIFT_TEST_PG_REPLICA_URL,
# PGSHIFT_TEST_CA_FILE and AWS_ENDPOINT_URL; set them yourself and run `cargo nextest run` to use
# your own servers (LocalStack included).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$PGSHIFT_ROOT"
trap pgshift_cleanup EXIT
trap 'exit 130' INT TERM

pgshift_cargo_env
pgshift_ensure_postgres
pgshift_start_moto
pgshift_start_pg main logical
pgshift_start_pg replica replica

export PGSHIFT_TEST_PG_URL="postgres://postgres:${PGSHIFT_PG_PASSWORD}@127.0.0.1:${PG_PORT_main}/postgres"
export PGSHIFT_TEST_PG_REPLICA_URL="postgres://postgres:${PGSHIFT_PG_PASSWORD}@127.0.0.1:${PG_PORT_replica}/postgres"
export PGSHIFT_TEST_CA_FILE="$PGSHIFT_RUN_DIR/ca.crt"
export PGSHIFT_TEST_CORPUS="${PGSHIFT_TEST_CORPUS:-$PGSHIFT_ROOT/../shared/corpus}"

# The CLI tests run the built `pgshift` binary; test runners build only test targets.
cargo build --workspace --bins
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
