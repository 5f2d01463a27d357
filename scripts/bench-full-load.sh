#!/usr/bin/env bash
# Full-load benchmark (prints figures; not a test). On a throwaway PostgreSQL with
# `pgbench -i -s SCALE` (100k rows per scale unit; 50 = 5M rows) it measures, in the same run:
#   baseline  COPY pgbench_accounts TO STDOUT (text, and csv) into /dev/null through psql
#   pgshift   pgshift full-load of that table to the local folder: csv with 1 and 2 workers, jsonl
# and prints rows/s, MB/s, the ratio to the text COPY baseline, and peak RSS.
#
#   ./scripts/bench-full-load.sh [SCALE]    (default 50)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$PGSHIFT_ROOT"
trap pgshift_cleanup EXIT
SCALE=${1:-50}

pgshift_cargo_env
pgshift_ensure_postgres
pgshift_bench_bin
pgshift_start_pg bench logical
export PGPASSWORD=$PGSHIFT_PG_PASSWORD
psql_() { psql -X -q -At -h 127.0.0.1 -p "$PG_PORT_bench" -U postgres "$@"; }
psql_ -d postgres -c "create database bench"
log "pgbench -i -s $SCALE"
pgbench -q -i -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT_bench" -U postgres bench >/dev/null 2>&1
psql_ -d bench -c "vacuum analyze pgbench_accounts"
url="postgres://postgres:${PGSHIFT_PG_PASSWORD}@127.0.0.1:${PG_PORT_bench}/bench?sslmode=${BENCH_SSLMODE:-prefer}"
rows=$(psql_ -d bench -c "select count(*) from pgbench_accounts")
echo '{"rules":[{"rule-type":"selection","rule-id":"1","object-locator":{"schema-name":"public","table-name":"pgbench_accounts"},"rule-action":"include"}]}' > "$PGSHIFT_RUN_DIR/accounts.json"

secs() { python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$@"; }
measure_copy() {
  local opts=$1 t0 t1
  t0=$(date +%s.%N)
  psql -X -q -h 127.0.0.1 -p "$PG_PORT_bench" -U postgres -d bench "sslmode=${BENCH_SSLMODE:-prefer}" -c "copy pgbench_accounts to stdout $opts" >/dev/null
  t1=$(date +%s.%N)
  secs "$t0" "$t1"
}
copy_text=$(measure_copy "")
copy_csv=$(measure_copy "with (format csv)")
copy_bytes=$(psql_ -d bench -c "copy pgbench_accounts to stdout with (format csv)" | wc -c)

run_pgshift() {
  local name=$1 format=$2 parallel=$3 out=$PGSHIFT_RUN_DIR/$1
  rm -rf "$out"
  /usr/bin/time -v -o "$out.time" "$bin" full-load --task "$name" --source "$url" --stage "$out/stage" --state "$out/state" \
    --tables "$PGSHIFT_RUN_DIR/accounts.json" --format "$format" --parallel "$parallel" --chunk-mb "${CHUNK_MB:-64}" --json > "$out.json"
  python3 - "$out" "$name" "$rows" "$copy_text" <<'PY'
import json, re, sys
out, name, rows, base = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
r = json.load(open(f"{out}.json"))
t = open(f"{out}.time").read()
wall = t.split("Elapsed (wall clock) time (h:mm:ss or m:ss): ")[1].splitlines()[0]
secs = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
assert r["rows"] == rows, (r["rows"], rows)
print(f"{name:22s} {secs:7.2f} s {rows / secs:12.0f} rows/s {r['bytes'] / secs / 1e6:8.1f} MB/s  ratio {base / secs:5.2f}  chunks {r['chunks']:3d}  peak RSS {rss:6.1f} MB")
PY
}

echo
echo "pgbench_accounts: $rows rows, $((copy_bytes / 1000000)) MB as CSV"
python3 -c "import sys; r, t, c, b = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]); print(f'{\"COPY TO STDOUT (text)\":22s} {t:7.2f} s {r / t:12.0f} rows/s {b / t / 1e6:8.1f} MB/s  (baseline)'); print(f'{\"COPY TO STDOUT (csv)\":22s} {c:7.2f} s {r / c:12.0f} rows/s {b / c / 1e6:8.1f} MB/s  ratio {t / c:5.2f}')" "$rows" "$copy_text" "$copy_csv" "$copy_bytes"
run_pgshift csv-1-worker csv 1
run_pgshift csv-2-workers csv 2
run_pgshift jsonl-1-worker jsonl 1
run_pgshift csv-gz-2-workers csv.gz 2
run_pgshift parquet-1-worker parquet 1
run_pgshift parquet-2-workers parquet 2
echo "(peak RSS is the whole process: the workers share it)"
