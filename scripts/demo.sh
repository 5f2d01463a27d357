#!/usr/bin/env bash
# The demo, on embedded defaults (a folder for staged data, a file for state; no AWS): a
# throwaway local PostgreSQL with a sample database and a write workload running the whole time;
# pgshift tests the endpoint, runs the full load with CDC, drains CDC a few times, applies
# everything to a second database and validates it equals the source. Stops what it started.
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
log "building pgshift (the first build takes a few minutes)"
cargo build -q -p pgshift-cli
pgshift=$CARGO_TARGET_DIR/debug/pgshift

pgshift_start_pg demo logical
export PGPASSWORD=$PGSHIFT_PG_PASSWORD
psql_() { psql -X -q -h 127.0.0.1 -p "$PG_PORT_demo" -U postgres "$@"; }
base="postgres://postgres:${PGSHIFT_PG_PASSWORD}@127.0.0.1:${PG_PORT_demo}"
src="$base/shop"
dst="$base/shop_copy"
psql_ -d postgres -c "create database shop" -c "create database shop_copy"
log "sample database: pgbench schema (scale 5: 500,000 accounts)"
pgbench -q -i -s 5 -h 127.0.0.1 -p "$PG_PORT_demo" -U postgres shop >/dev/null 2>&1
# pgbench_history has no primary key; give it one so updates and re-reads are exact.
psql_ -d shop -c "alter table pgbench_history add column id bigserial primary key"
data=$PGSHIFT_RUN_DIR/demo-data
task=(--task demo --stage "$data/stage" --state "$data/state")

printf '\n== pgshift test-endpoint ==\n'
"$pgshift" test-endpoint --source "$src" || true

log "starting a write workload (pgbench -N, 2 clients, 30 s) that runs through the load and CDC"
pgbench -n -N -c 2 -T 30 -h 127.0.0.1 -p "$PG_PORT_demo" -U postgres shop >/dev/null 2>&1 &
bench=$!
sleep 2

printf '\n== pgshift full-load --cdc (slot first, then chunks in parallel) ==\n'
"$pgshift" full-load "${task[@]}" --source "$src" --cdc --parallel 2 --chunk-mb 16

for i in 1 2 3; do
  sleep 5
  printf '\n== pgshift cdc --once (drain %s, workload running) ==\n' "$i"
  "$pgshift" cdc "${task[@]}" --source "$src" --once
done
log "waiting for the workload to finish"
wait "$bench"
printf '\n== pgshift cdc --once (catch up) ==\n'
"$pgshift" cdc "${task[@]}" --source "$src" --once

printf '\n== pgshift apply (into database shop_copy) ==\n'
"$pgshift" apply --task demo --stage "$data/stage" --target "$dst"

printf '\n== pgshift validate ==\n'
"$pgshift" validate --task demo --source "$src" --target "$dst"

printf '\n== pgshift cdc --once (nothing new: the idle slot still advances past the apply WAL) ==\n'
"$pgshift" cdc "${task[@]}" --source "$src" --once

printf '\n== pgshift status ==\n'
"$pgshift" status --task demo --state "$data/state" --source "$src"

printf '\n== staged files (first 12) ==\n'
(cd "$data/stage" && find . -type f | sort | head -12)
