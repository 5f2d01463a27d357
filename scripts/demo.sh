#!/usr/bin/env bash
# The demo: a throwaway local PostgreSQL with a sample database, and pgshift run against it on
# embedded defaults (no AWS needed). Everything it starts is stopped when it ends.
#
#   ./scripts/demo.sh
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$PGSHIFT_ROOT"
trap pgshift_cleanup EXIT
trap 'exit 130' INT TERM

pgshift_cargo_env
pgshift_ensure_postgres
log "building pgshift (first build takes a few minutes)"
cargo build -q -p pgshift-cli
pgshift=$CARGO_TARGET_DIR/debug/pgshift

pgshift_start_pg demo logical
export PGPASSWORD=$PGSHIFT_PG_PASSWORD
src="postgres://postgres:${PGSHIFT_PG_PASSWORD}@127.0.0.1:${PG_PORT_demo}/shop"
psql -q -h 127.0.0.1 -p "$PG_PORT_demo" -U postgres -d postgres -c "create database shop"
log "creating a sample database (pgbench schema, scale 2, plus a table without a primary key)"
pgbench -q -i -s 2 -h 127.0.0.1 -p "$PG_PORT_demo" -U postgres shop >/dev/null 2>&1
psql -q -h 127.0.0.1 -p "$PG_PORT_demo" -U postgres -d shop -c \
  "create table public.audit_log (at timestamptz default now(), note text); insert into public.audit_log(note) values ('hello');"

printf '\n== pgshift test-endpoint ==\n'
"$pgshift" test-endpoint --source "$src" || true

stage=$PGSHIFT_RUN_DIR/demo-data/stage
state=$PGSHIFT_RUN_DIR/demo-data/state
printf '\n== pgshift cdc --once (a CDC-only task: creates the publication and slot) ==\n'
"$pgshift" cdc --task demo --source "$src" --stage "$stage" --state "$state" --once

log "running a write workload (pgbench -N, 20 s) while draining"
pgbench -n -N -c 2 -T 20 -h 127.0.0.1 -p "$PG_PORT_demo" -U postgres shop >/dev/null 2>&1 &
bench=$!
for i in 1 2 3; do
  sleep 6
  printf '\n== pgshift cdc --once (drain %s, workload running) ==\n' "$i"
  "$pgshift" cdc --task demo --source "$src" --stage "$stage" --state "$state" --once --format jsonl
done
wait "$bench"
printf '\n== pgshift cdc --once (catch up after the workload) ==\n'
"$pgshift" cdc --task demo --source "$src" --stage "$stage" --state "$state" --once --format jsonl

printf '\n== staged files ==\n'
(cd "$stage" && find . -type f | sort | head -20)
printf '\n== first staged change ==\n'
first=$(cd "$stage" && find . -path '*pgbench_accounts/cdc/*.jsonl' | sort | head -1)
[ -n "$first" ] && head -c 600 "$stage/$first" && echo
