#!/usr/bin/env bash
# The LocalStack lane: the integration tests that touch AWS services, run against LocalStack
# (localstack-core 4.9.2 in host mode, no Docker; pinned, in a project-local virtualenv) the way
# pgshift's users test: staging to S3, Secrets Manager credentials, the packaged Lambdas through
# the runtime API, events through a rule to an SQS queue, and the full-load state machine
# executed on its Step Functions (tests/src/localstack.rs, with the mocked Lambda integrations
# of tests/fixtures/sfn-mock.json), and a CloudFormation deploy of template.yaml
# (infra/test/deploy_localstack.py). DynamoDB stays on moto through the service-specific
# endpoint (AWS_ENDPOINT_URL_DYNAMODB): LocalStack's downloads a JVM at run time, and so does its
# Lambda service (the functions run through the runtime API instead).
#
#   ./scripts/test-localstack.sh [extra cargo-nextest arguments]
#
# ./scripts/test.sh calls it after the main lane, reusing its PostgreSQL and packaged Lambdas
# (PGSHIFT_TEST_PG_URL, PGSHIFT_LAMBDA_DIR); alone, it starts its own. It starts LocalStack and
# moto on 127.0.0.1, stops them afterwards and removes their files. The last line of its output
# is `localstack lane: N passed, M failed`.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$PGSHIFT_ROOT"
trap pgshift_cleanup EXIT
trap 'exit 130' INT TERM

pgshift_cargo_env
pgshift_run_dir
if [ -z "${PGSHIFT_TEST_PG_URL:-}" ]; then
  pgshift_ensure_postgres
  pgshift_start_pg main logical
  export PGSHIFT_TEST_PG_URL="postgres://postgres:${PGSHIFT_PG_PASSWORD}@127.0.0.1:${PG_PORT_main}/postgres"
  export PGSHIFT_TEST_CA_FILE="$PGSHIFT_RUN_DIR/ca.crt"
fi
if [ -z "${PGSHIFT_LAMBDA_DIR:-}" ]; then
  pgshift_package x86_64
  export PGSHIFT_LAMBDA_DIR PGSHIFT_CARGO_LAMBDA
fi
export PGSHIFT_TEST_CORPUS="${PGSHIFT_TEST_CORPUS:-$PGSHIFT_ROOT/../shared/corpus}"

# moto for DynamoDB only, then LocalStack for everything else.
unset AWS_ENDPOINT_URL
pgshift_start_moto
moto_url=$AWS_ENDPOINT_URL
export PGSHIFT_TEST_SFN_MOCK="$PGSHIFT_ROOT/tests/fixtures/sfn-mock.json"
pgshift_start_localstack "$PGSHIFT_TEST_SFN_MOCK"
export AWS_ENDPOINT_URL=$PGSHIFT_LOCALSTACK_URL
export AWS_ENDPOINT_URL_DYNAMODB=$moto_url
export PGSHIFT_TEST_PYTHON="$PGSHIFT_VENV/bin/python"

# The template on LocalStack's CloudFormation (without what LocalStack cannot create here:
# the functions and the table; the script names them).
pgshift_ensure_tools
deploy=0
log "deploying template.yaml to LocalStack (CloudFormation)"
"$PGSHIFT_TOOLS_VENV/bin/python" infra/test/deploy_localstack.py || deploy=$?

# The CLI tests among them run the built binary.
cargo build --workspace --bins
filter='test(/^localstack::/) | test(/^events::/) | test(/^lambda_runtime::/)'
filter+=' | test(=seams::s3_multipart_upload_round_trips_and_abort_leaves_nothing)'
filter+=' | test(=seams::dynamodb_writes_are_conditional)'
filter+=' | test(=cdc::cdc_to_s3_with_state_in_dynamodb) | test(=cdc::cli_cdc_stages_to_s3_with_state_in_dynamodb)'
filter+=' | test(=endpoint::credentials_come_from_a_dms_secret_in_the_emulator)'
filter+=' | test(=migrate::end_to_end_s3_and_dynamodb)'
out="$PGSHIFT_RUN_DIR/localstack-lane.log"
status=0
cargo nextest run -p pgshift-tests --test integration --no-fail-fast -E "$filter" "$@" 2>&1 | tee "$out" || status=$?
passed=$(grep -oE '[0-9]+ passed' "$out" | tail -1 | grep -oE '[0-9]+' || echo 0)
failed=$(grep -oE '[0-9]+ failed' "$out" | tail -1 | grep -oE '[0-9]+' || echo 0)
if [ "$status" -ne 0 ] && [ "$failed" = 0 ]; then failed=1; fi
# The deployment counts as one more.
if [ "$deploy" -eq 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); status=1; fi
echo "localstack lane: $passed passed, $failed failed"
exit "$status"
