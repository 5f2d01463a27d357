#!/usr/bin/env bash
# CDC benchmark (prints figures; not a test). On a throwaway PostgreSQL it creates two identical
# slots, runs `pgbench -N` (TXNS transactions: an UPDATE and an INSERT each, so 2 x TXNS row
# changes), then measures in the same run:
#   ceiling  select count(*) from pg_logical_slot_peek_binary_changes(..pgoutput..) on slot 2
#   pgshift  pgshift cdc --once to the local folder, draining slot 1 (release build)
# and prints changes/s for both, the ratio, and pgshift's peak RSS.
#
#   ./scripts/bench-cdc.sh [TXNS]        (default 250000)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$PGSHIFT_ROOT"
trap pgshift_cleanup EXIT
TXNS=${1:-250000}

pgshift_cargo_env
pgshift_ensure_postgres
cargo build -q --release -p pgshift-cli
bin=$CARGO_TARGET_DIR/release/pgshift
pgshift_start_pg bench logical
export PGPASSWORD=$PGSHIFT_PG_PASSWORD
psql_() { psql -X -q -At -h 127.0.0.1 -p "$PG_PORT_bench" -U postgres "$@"; }
psql_ -d postgres -c "create database bench"
pgbench -q -i -s 5 -h 127.0.0.1 -p "$PG_PORT_bench" -U postgres bench >/dev/null 2>&1
url="postgres://postgres:${PGSHIFT_PG_PASSWORD}@127.0.0.1:${PG_PORT_bench}/bench?sslmode=${BENCH_SSLMODE:-prefer}"
work=$PGSHIFT_RUN_DIR/bench-out

# Slot 1 and its publication through pgshift (a CDC-only task), slot 2 beside it at once.
"$bin" cdc --task bench --source "$url" --stage "$work/stage" --state "$work/state" --once >/dev/null
psql_ -d bench -c "select 1 from pg_create_logical_replication_slot('ceiling', 'pgoutput')" >/dev/null

log "pgbench -N: $TXNS transactions"
pgbench -n -N -c 2 -j 2 -t $((TXNS / 2)) -h 127.0.0.1 -p "$PG_PORT_bench" -U postgres bench >/dev/null 2>&1
psql_ -d bench -c "checkpoint" >/dev/null

ceiling_start=$(date +%s.%N)
rows=$(psql_ -d bench -c "set logical_decoding_work_mem = '256MB'" -c "select count(*) from pg_logical_slot_peek_binary_changes('ceiling', null, null, 'proto_version', '1', 'publication_names', 'pgshift_bench')")
ceiling_end=$(date +%s.%N)

PGSHIFT_LOG=${PGSHIFT_LOG:-warn} /usr/bin/time -v -o "$work/time.txt" "$bin" cdc --task bench --source "$url" --stage "$work/stage" --state "$work/state" --once --json >"$work/report.json"
python3 - "$work" "$ceiling_start" "$ceiling_end" "$rows" "$TXNS" <<'PY'
import json, re, sys
work, c0, c1, rows, txns = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
report = json.load(open(f"{work}/report.json"))
timing = open(f"{work}/time.txt").read()
wall = timing.split("Elapsed (wall clock) time (h:mm:ss or m:ss): ")[1].splitlines()[0]
parts = [float(p) for p in wall.split(":")]
secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing).group(1))
changes = report["changes"]
ceiling = c1 - c0
print(f"row changes           {changes} (pgbench -N, {txns} transactions; ceiling peek returned {rows} messages)")
print(f"ceiling (peek count)  {ceiling:8.2f} s  {changes / ceiling:12.0f} changes/s")
print(f"pgshift cdc --once    {secs:8.2f} s  {changes / secs:12.0f} changes/s  ({report['bytes_staged'] / 1e6:.1f} MB staged, {len(report['batches'])} batches)")
print(f"ratio                 {ceiling / secs:8.2f}  (target >= 0.75)")
print(f"pgshift peak RSS      {rss_kb / 1024:8.1f} MB (target < 100 MB)")
PY
