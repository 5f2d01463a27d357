#!/usr/bin/env bash
# The test command: starts everything the tests need on 127.0.0.1 (two throwaway PostgreSQL 15
# clusters from the machine's packages and the moto AWS emulator in a project-local virtualenv),
# runs the tests of the whole workspace against them, then the LocalStack lane
# (scripts/test-localstack.sh: the AWS-facing tests on LocalStack, and the state machine
# executed), and stops what it started.
#
#   ./scripts/test.sh [extra cargo-nextest / cargo test arguments]
#
# Before the Rust tests it checks the deployment: cfn-lint and `sam validate --lint` on
# template.yaml, the CDK app's synth test (same stack as the template), the cost model
# (scripts/cost.py prints $/TB and idle $/month; fails past the goals), the packaged Lambdas
# (`cargo lambda build --release`, arm64 and x86_64) and a CloudFormation deploy of the template
# to the emulator. The Rust tests then run the packaged x86_64 bootstraps through the Lambda
# runtime API (`cargo lambda watch`).
#
# Tests find the services through PGSHIFT_TEST_PG_URL, PGSHIFT_TEST_PG_REPLICA_URL,
# PGSHIFT_TEST_PG12_URL (PostgreSQL 12, the oldest supported major), PGSHIFT_TEST_PG_MAJORS
# (`11=url 12=url 13=url ..`: every other major from npm's embedded-postgres, for the smoke
# lane in tests/src/majors.rs),
# PGSHIFT_TEST_CA_FILE, PGSHIFT_TEST_PYTHON (with jsonschema), AWS_ENDPOINT_URL, PGSHIFT_LAMBDA_DIR
# and PGSHIFT_CARGO_LAMBDA; set them
# yourself and run `cargo nextest run` to use your own servers (LocalStack included).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$PGSHIFT_ROOT"
trap pgshift_cleanup EXIT
trap 'exit 130' INT TERM

pgshift_cargo_env
pgshift_ensure_postgres
pgshift_ensure_tools
pgshift_ensure_infra_npm
pgshift_run_dir

# Deployment: the SAM template lints clean, and the CDK app synthesizes the same stack.
log "cfn-lint and sam validate --lint (template.yaml)"
"$PGSHIFT_TOOLS_VENV/bin/cfn-lint" template.yaml
"$PGSHIFT_TOOLS_VENV/bin/sam" validate --lint --template template.yaml >/dev/null
"$PGSHIFT_TOOLS_VENV/bin/python" infra/test/sam_template.py translate "$PGSHIFT_RUN_DIR/sam.json"
log "CDK synth test (infra/)"
(cd infra && PGSHIFT_SAM_TEMPLATE_JSON="$PGSHIFT_RUN_DIR/sam.json" npm test --silent \
  && PGSHIFT_CDK_NO_BUILD=1 npx cdk synth --quiet --no-notices --output "$PGSHIFT_RUN_DIR/cdk.out" >/dev/null)

# The cost model (docs/COST.md): $/TB of full load and $/month of an idle CDC task from the
# template's settings and the measured figures in docs/cost-inputs.json; fails past the goals.
log "cost model (scripts/cost.py)"
"$PGSHIFT_TOOLS_VENV/bin/python" scripts/cost.py

# The packaged Lambdas: arm64 (deployed) and x86_64 (run here through the runtime API).
pgshift_package arm64
pgshift_package x86_64
export PGSHIFT_LAMBDA_DIR PGSHIFT_CARGO_LAMBDA

pgshift_start_moto
pgshift_start_pg main logical
pgshift_start_pg replica replica
pgshift_start_pg12
pgshift_start_pg_majors

log "deploying template.yaml to the emulator (CloudFormation)"
"$PGSHIFT_TOOLS_VENV/bin/python" infra/test/deploy_emulator.py "$PGSHIFT_LAMBDA_DIR"
pgshift_moto_execute_state_machines

export PGSHIFT_TEST_PG_URL="postgres://postgres:${PGSHIFT_PG_PASSWORD}@127.0.0.1:${PG_PORT_main}/postgres"
export PGSHIFT_TEST_PG_REPLICA_URL="postgres://postgres:${PGSHIFT_PG_PASSWORD}@127.0.0.1:${PG_PORT_replica}/postgres"
export PGSHIFT_TEST_PG12_URL="postgres://postgres@127.0.0.1:${PG_PORT_pg12}/postgres?sslmode=disable"
export PGSHIFT_TEST_CA_FILE="$PGSHIFT_RUN_DIR/ca.crt"
export PGSHIFT_TEST_CORPUS="${PGSHIFT_TEST_CORPUS:-$PGSHIFT_ROOT/../shared/corpus}"
# The emulator's virtualenv has `jsonschema`: tests validate events against infra/events/.
export PGSHIFT_TEST_PYTHON="$PGSHIFT_VENV/bin/python"

# The CLI tests run the built `pgshift` binary; test runners build only test targets.
cargo build --workspace --bins
# The LocalStack lane's own tests (localstack::) run in scripts/test-localstack.sh, below.
status=0
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast -E 'not test(/^localstack::/)' "$@" || status=$?
else
  cargo test --workspace --no-fail-fast "$@" -- --skip localstack:: || status=$?
fi

# The AWS-facing tests again, on LocalStack (DynamoDB on moto).
log "the LocalStack lane (scripts/test-localstack.sh)"
lane=0
PGSHIFT_LAMBDA_DIR=$PGSHIFT_LAMBDA_DIR PGSHIFT_CARGO_LAMBDA=$PGSHIFT_CARGO_LAMBDA ./scripts/test-localstack.sh || lane=$?
[ "$status" -eq 0 ] && [ "$lane" -eq 0 ]
