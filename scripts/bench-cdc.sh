#!/usr/bin/env bash
# CDC benchmark (prints figures; not a test). On a throwaway PostgreSQL it creates pgshift's
# task (slot + publication) and a pristine copy of its slot, runs `pgbench -N` (TXNS
# transactions: an UPDATE and an INSERT each, so 2 x TXNS row changes), then measures, in the
# same run and RUNS times each (the slot is re-copied from the pristine one before every run,
# so every run drains the same changes):
#   ceiling  select count(*) from pg_logical_slot_peek_binary_changes(..pgoutput..)
#   pgshift  pgshift cdc --once to the local folder (release build), from a fresh checkpoint,
#            as configured by default (a drain this large is decoded by two sessions at once)
#            and with --peek-sessions 1
# and prints the median (and best) changes/s for each, the ratios of medians, pgshift's peak
# RSS, and once, for reference, the streaming replication protocol (pg_recvlogical to
# /dev/null) over the same changes.
#
#   ./scripts/bench-cdc.sh [TXNS] [RUNS]    (defaults 250000, 3)
#   PGSHIFT_BENCH_FORMAT=parquet ./scripts/bench-cdc.sh ...   (the staged format; default csv)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$PGSHIFT_ROOT"
trap pgshift_cleanup EXIT
TXNS=${1:-250000}
RUNS=${2:-3}

pgshift_cargo_env
pgshift_ensure_postgres
pgshift_bench_bin
pgshift_start_pg bench logical
export PGPASSWORD=$PGSHIFT_PG_PASSWORD
psql_() { psql -X -q -At -h 127.0.0.1 -p "$PG_PORT_bench" -U postgres "$@"; }
psql_ -d postgres -c "create database bench"
pgbench -q -i -s 5 -h 127.0.0.1 -p "$PG_PORT_bench" -U postgres bench >/dev/null 2>&1
url="postgres://postgres:${PGSHIFT_PG_PASSWORD}@127.0.0.1:${PG_PORT_bench}/bench?sslmode=${BENCH_SSLMODE:-prefer}"
work=$PGSHIFT_RUN_DIR/bench-out

# The task (slot pgshift_bench, publication pgshift_bench) and its checkpoint, kept aside.
"$bin" cdc --task bench --source "$url" --stage "$work/stage" --state "$work/state" --once >/dev/null
cp -r "$work/state" "$work/state0"
psql_ -d bench -c "select 1 from pg_copy_logical_replication_slot('pgshift_bench', 'pristine')" >/dev/null

log "pgbench -N: $TXNS transactions"
pgbench -n -N -c 2 -j 2 -t $((TXNS / 2)) -h 127.0.0.1 -p "$PG_PORT_bench" -U postgres bench >/dev/null 2>&1
psql_ -d bench -c "checkpoint" >/dev/null
end_lsn=$(psql_ -d bench -c "select pg_current_wal_flush_lsn()")

# The publications pgshift peeks: both of the task's (keyless tables such as pgbench_history
# are in the insert-only one), or the one an earlier version made.
pubs=$(psql_ -d bench -c "select string_agg(pubname, ',' order by pubname) from pg_publication where pubname like 'pgshift\_bench%'")

reset_slot() {
  psql_ -d bench -c "select pg_drop_replication_slot('pgshift_bench')" \
    -c "select 1 from pg_copy_logical_replication_slot('pristine', 'pgshift_bench')" >/dev/null
  rm -rf "$work/stage" "$work/state"
  cp -r "$work/state0" "$work/state"
}
now() { date +%s.%N; }

ceilings=() secs=() rss=() secs1=() rss1=()
run_pgshift() { # SESSIONS REPORT -> "wall kb"
  reset_slot
  PGSHIFT_LOG=${PGSHIFT_LOG:-warn} /usr/bin/time -f "%e %M" -o "$work/time.txt" "$bin" cdc --task bench --source "$url" --stage "$work/stage" --state "$work/state" --once --json --peek-sessions "$1" --format "${PGSHIFT_BENCH_FORMAT:-csv}" >"$2"
  cat "$work/time.txt"
}
for run in $(seq "$RUNS"); do
  t0=$(now)
  rows=$(psql_ -d bench -c "set logical_decoding_work_mem = '256MB'" -c "select count(*) from pg_logical_slot_peek_binary_changes('pristine', null, null, 'proto_version', '1', 'publication_names', '$pubs')")
  t1=$(now)
  ceilings+=("$(python3 -c "print($t1 - $t0)")")
  read -r wall kb < <(run_pgshift 2 "$work/report-$run.json")
  secs+=("$wall") rss+=("$kb")
  read -r wall kb < <(run_pgshift 1 "$work/report1-$run.json")
  secs1+=("$wall") rss1+=("$kb")
done

reset_slot
t0=$(now)
pg_recvlogical -h 127.0.0.1 -p "$PG_PORT_bench" -U postgres -d "dbname=bench sslmode=${BENCH_SSLMODE:-prefer}" \
  -S pgshift_bench --start -E "$end_lsn" -o proto_version=1 -o publication_names="$pubs" \
  --no-loop -F 0 -f /dev/null
t1=$(now)
streaming=$(python3 -c "print($t1 - $t0)")

python3 - "$work" "$rows" "$TXNS" "$streaming" "${ceilings[*]}" "${secs[*]}" "${rss[*]}" "${secs1[*]}" "${rss1[*]}" <<'PY'
import json, statistics, sys
work, rows, txns, streaming = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ceilings = [float(x) for x in sys.argv[5].split()]
secs, secs1 = ([float(x) for x in sys.argv[i].split()] for i in (6, 8))
rss, rss1 = ([int(x) / 1024 for x in sys.argv[i].split()] for i in (7, 9))
reports = [json.load(open(f"{work}/report-{i + 1}.json")) for i in range(len(secs))]
reports1 = [json.load(open(f"{work}/report1-{i + 1}.json")) for i in range(len(secs1))]
changes = reports[0]["changes"]
assert all(r["changes"] == changes for r in reports + reports1), [r["changes"] for r in reports + reports1]
assert all(r["split_peeks"] == 1 for r in reports), [r["split_peeks"] for r in reports]
assert all(r["split_peeks"] == 0 for r in reports1), [r["split_peeks"] for r in reports1]
c, p, p1 = statistics.median(ceilings), statistics.median(secs), statistics.median(secs1)
r = reports[0]
print(f"row changes           {changes} (pgbench -N, {txns} transactions; the peek returns {rows} messages); {len(secs)} runs each")
print(f"ceiling (peek count)  {c:8.2f} s  {changes / c:12.0f} changes/s  (median; best {min(ceilings):.2f} s)")
print(f"pgshift cdc --once    {p:8.2f} s  {changes / p:12.0f} changes/s  (median; best {min(secs):.2f} s; default: split at {r['split_at']}; {r['bytes_staged'] / 1e6:.1f} MB staged, {len(r['batches'])} batches)")
print(f"ratio                 {c / p:8.2f}  (medians; target >= 0.75)")
print(f"pgshift peak RSS      {max(rss):8.1f} MB (target < 100 MB)")
print(f"  --peek-sessions 1   {p1:8.2f} s  {changes / p1:12.0f} changes/s  (median; best {min(secs1):.2f} s; ratio {c / p1:.2f}; peak RSS {max(rss1):.1f} MB)")
print(f"streaming protocol    {streaming:8.2f} s  {changes / streaming:12.0f} changes/s  (pg_recvlogical to /dev/null, for reference)")
PY
