#!/usr/bin/env bash
# Apply benchmark (prints figures; not a test): how fast a PG -> PG target catches up, pgshift
# against PostgreSQL's own logical replication subscriber, on the same backlog in one run.
#
# On a throwaway cluster: `pgbench -i -s 5` (database bench), then
#   pgshift  `full-load --cdc` staged and applied to database pgs (before the workload);
#   native   a publication and a slot made right after pgshift's (so both slots read the same
#            stretch of WAL), database native gets the same tables (pg_dump), and a
#            subscription created disabled on that slot;
# in each of ROUNDS rounds, every database is vacuumed and every slot moved to the current
# WAL position (the loads and the vacuums are not the backlog), then `pgbench` (TPC-B-like:
# 3 updates and an insert per transaction) runs TXNS transactions and each side catches up
# on that same backlog:
#   pgshift  `cdc --once` (drains the slot into the folder) + `apply` (the figure is their sum,
#            and apply alone), both timed, peak RSS of apply;
#   pgshift  pipelined (a second task, its own slot and target database pgp, loaded the same
#            way): `apply --until <end> --source --max-batch-changes PIPE_BATCH`, which drains
#            CDC in batches while it applies them;
#   native   the subscription enabled, timed until its slot confirmed the workload's end.
# Figures are the medians of the rounds (each round's are printed too). The three targets are
# validated equal to the source. Then a single transaction of BIG_ROWS inserted rows (plus an
# update of all of them) is staged and applied: apply's time and peak RSS (a batch of one
# transaction).
#
#   ./scripts/bench-apply.sh [TXNS] [BIG_ROWS]    (defaults 40000, 1000000)
#   PGSHIFT_BENCH_ROUNDS (3): the workload and both catch-ups run this many times; medians.
#   PGSHIFT_BENCH_PIPE_BATCH (60000): the pipelined run's --max-batch-changes.
#   PGSHIFT_BENCH_BIN=<pgshift binary> measures another build against the same baseline.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$PGSHIFT_ROOT"
trap pgshift_cleanup EXIT
TXNS=${1:-40000}
BIG_ROWS=${2:-1000000}
ROUNDS=${PGSHIFT_BENCH_ROUNDS:-3}
PIPE_BATCH=${PGSHIFT_BENCH_PIPE_BATCH:-60000}

pgshift_cargo_env
pgshift_ensure_postgres
pgshift_bench_bin
pgshift_start_pg apply logical
export PGPASSWORD=$PGSHIFT_PG_PASSWORD
port=$PG_PORT_apply
psql_() { psql -X -q -At -h 127.0.0.1 -p "$port" -U postgres "$@"; }
base="postgres://postgres:${PGSHIFT_PG_PASSWORD}@127.0.0.1:${port}"
src="$base/bench?sslmode=disable" pgs="$base/pgs?sslmode=disable"
work=$PGSHIFT_RUN_DIR/bench-apply
stage=(--stage "$work/stage" --state "$work/state")
# apply without --until takes only the stage (its position is in the target)
apply_stage=(--stage "$work/stage")
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
export PGSHIFT_LOG=${PGSHIFT_LOG:-warn}

for db in bench pgs pgp native; do psql_ -d postgres -c "create database $db"; done
pgbench -q -i -s 5 -h 127.0.0.1 -p "$port" -U postgres bench >/dev/null 2>&1

# pgshift: the load (with the task's slot), applied before the workload.
"$bin" full-load --task bench --source "$src" "${stage[@]}" --cdc >/dev/null
# native's slot right after pgshift's: both read the same stretch of WAL (the other loads below
# write theirs into it) and decode the same workload.
psql_ -d bench -c "create publication native_pub for table pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history" \
  -c "select 1 from pg_create_logical_replication_slot('native_slot', 'pgoutput')" >/dev/null
"$bin" apply --task bench --target "$pgs" "${apply_stage[@]}" >/dev/null
pgp="$base/pgp?sslmode=disable"
pipe=(--stage "$work/pipe-stage" --state "$work/pipe-state")
apply_pipe=(--stage "$work/pipe-stage")
"$bin" full-load --task pipe --source "$src" "${pipe[@]}" --cdc >/dev/null
"$bin" apply --task pipe --target "$pgp" "${apply_pipe[@]}" >/dev/null
# native: the same tables and rows (nothing wrote to them since its slot), a disabled
# subscription on its slot.
pg_dump -h 127.0.0.1 -p "$port" -U postgres -t 'pgbench_*' bench | psql_ -d native >/dev/null
psql_ -d native -c "create subscription native_sub connection 'host=127.0.0.1 port=$port user=postgres password=$PGSHIFT_PG_PASSWORD dbname=bench sslmode=disable' publication native_pub with (connect = true, create_slot = false, slot_name = 'native_slot', enabled = false, copy_data = false)" >/dev/null

# Rounds: the same workload again on each side (the host's noise shows in their spread; the
# figures are the medians).
# No autovacuum firing in the middle of a measurement: every database is vacuumed before each
# round instead.
psql_ -d postgres -c "alter system set autovacuum = off" -c "select pg_reload_conf()" >/dev/null
for round in $(seq 1 "$ROUNDS"); do
  for db in bench pgs pgp native; do psql_ -d "$db" -c "vacuum analyze" >/dev/null; done
  # Every slot starts at the workload: neither the loads above (round 1) nor the vacuums are
  # the backlog (their WAL has no row change, but decoding it costs both sides, and it would
  # put pgshift's split point outside the workload).
  "$bin" cdc --task bench --source "$src" "${stage[@]}" --once >/dev/null
  "$bin" cdc --task pipe --source "$src" "${pipe[@]}" --once >/dev/null
  psql_ -d bench -c "select 1 from pg_replication_slot_advance('native_slot', pg_current_wal_lsn())" >/dev/null
  log "round $round: pgbench, $TXNS transactions"
  pgbench -n -c 2 -j 2 -t $((TXNS / 2)) -h 127.0.0.1 -p "$port" -U postgres bench >/dev/null 2>&1
  end_lsn=$(psql_ -d bench -c "select pg_current_wal_lsn()")
  psql_ -d bench -c "checkpoint" >/dev/null

  # pgshift: drain, then apply.
  t0=$(now)
  "$bin" cdc --task bench --source "$src" "${stage[@]}" --once --json >"$work/cdc-$round.json"
  t1=$(now)
  /usr/bin/time -f "%e %M" -o "$work/apply.time" "$bin" apply --task bench --target "$pgs" "${apply_stage[@]}" --json >"$work/apply-$round.json"
  t2=$(now)
  read -r _ apply_kb <"$work/apply.time"

  # pgshift pipelined: drain and apply at once.
  t5=$(now)
  /usr/bin/time -f "%e %M" -o "$work/pipe.time" "$bin" apply --task pipe --target "$pgp" "${pipe[@]}" --until "$end_lsn" --source "$src" --max-batch-changes "$PIPE_BATCH" --json >"$work/pipe-$round.json"
  t6=$(now)
  read -r _ pipe_kb <"$work/pipe.time"

  # native: enable, wait until the slot confirmed the workload's end, disable.
  t3=$(now)
  psql_ -d native -c "alter subscription native_sub enable"
  until [ "$(psql_ -d bench -c "select confirmed_flush_lsn >= '$end_lsn' from pg_replication_slots where slot_name = 'native_slot'")" = t ]; do
    sleep 0.02
  done
  t4=$(now)
  psql_ -d native -c "alter subscription native_sub disable"
  # The walsender lets go of the slot before the next round enables it again.
  until [ "$(psql_ -d bench -c "select active from pg_replication_slots where slot_name = 'native_slot'")" = f ]; do
    sleep 0.02
  done
  echo "$round $(secs "$t0" "$t1") $(secs "$t1" "$t2") $apply_kb $(secs "$t5" "$t6") $pipe_kb $(secs "$t3" "$t4")" >>"$work/rounds.txt"
done

"$bin" validate --task bench --source "$src" --target "$pgs" >"$work/validate-pgs.txt" || {
  cat "$work/validate-pgs.txt"
  echo "pgshift's target differs from the source" >&2
  exit 1
}
"$bin" validate --task pipe --source "$src" --target "$pgp" >"$work/validate-pgp.txt" || {
  cat "$work/validate-pgp.txt"
  echo "pgshift's pipelined target differs from the source" >&2
  exit 1
}
"$bin" validate --task bench --source "$src" --target "$base/native?sslmode=disable" >"$work/validate-native.txt" || {
  cat "$work/validate-native.txt"
  echo "the native subscriber's target differs from the source" >&2
  exit 1
}

# One big transaction: BIG_ROWS inserts and BIG_ROWS updates of them.
psql_ -d bench -c "create table big (id int primary key, v int, pad text)" \
  -c "begin" -c "insert into big select g, 0, md5(g::text) from generate_series(1, $BIG_ROWS) g" \
  -c "update big set v = 1" -c "commit" >/dev/null
"$bin" cdc --task bench --source "$src" "${stage[@]}" --once --json >"$work/cdc-big.json"
/usr/bin/time -f "%e %M" -o "$work/big.time" "$bin" apply --task bench --target "$pgs" "${apply_stage[@]}" --json >"$work/apply-big.json"
read -r big_s big_kb <"$work/big.time"
[ "$(psql_ -d pgs -c "select count(*) filter (where v = 1) from big")" = "$BIG_ROWS" ] || {
  echo "the big transaction did not apply" >&2
  exit 1
}

python3 - "$work" "$TXNS" "$BIG_ROWS" "$big_s" "$big_kb" "$PIPE_BATCH" <<'PY'
import json, statistics, sys
work, txns, big_rows, big_s, big_kb, pipe_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
rounds = [line.split() for line in open(f"{work}/rounds.txt")]
a = json.load(open(f"{work}/apply-1.json"))
p = json.load(open(f"{work}/pipe-1.json"))
changes = a["changes_applied"]
rows = []
for r in rounds:
    n, cdc_s, apply_s, apply_kb, pipe_s, pipe_kb, native_s = int(r[0]), float(r[1]), float(r[2]), int(r[3]), float(r[4]), int(r[5]), float(r[6])
    applied = json.load(open(f"{work}/apply-{n}.json"))["changes_applied"]
    assert applied == changes, f"round {n} applied {applied} changes, round 1 {changes}"
    rows.append(dict(cdc=cdc_s, apply=apply_s, total=cdc_s + apply_s, pipe=pipe_s, native=native_s, apply_kb=apply_kb, pipe_kb=pipe_kb))
    print(f"round {n}: native {native_s:.2f} s, pgshift cdc + apply {cdc_s + apply_s:.2f} s ({cdc_s:.2f} + {apply_s:.2f}) = {native_s / (cdc_s + apply_s):.2f}x, pipelined {pipe_s:.2f} s = {native_s / pipe_s:.2f}x")
med = lambda k: statistics.median(x[k] for x in rows)
ratio = lambda k: statistics.median(x["native"] / x[k] for x in rows)
native_s, total, pipe_s, apply_s, cdc_s = med("native"), med("total"), med("pipe"), med("apply"), med("cdc")
print(f"backlog               {changes} row changes (pgbench TPC-B-like, {txns} transactions) per round, {a['batches_applied']} batches, {a.get('changes_set_based', 0)} set-based; medians of {len(rows)} rounds")
print(f"native subscriber     {native_s:8.2f} s  {changes / native_s:10.0f} changes/s")
print(f"pgshift cdc + apply   {total:8.2f} s  {changes / total:10.0f} changes/s  (cdc --once {cdc_s:.2f} s, apply {apply_s:.2f} s)")
print(f"ratio                 {ratio('total'):8.2f}  (pgshift speed / native, median of the rounds' ratios; goal >= 2)")
print(f"pgshift pipelined     {pipe_s:8.2f} s  {changes / pipe_s:10.0f} changes/s  (apply --until --source --max-batch-changes {pipe_batch}: {p['batches_applied']} batches drained and applied at once, peak RSS {max(x['pipe_kb'] for x in rows) / 1024:.1f} MB)")
print(f"ratio pipelined       {ratio('pipe'):8.2f}  (goal >= 2)")
print(f"  apply alone         {ratio('apply'):8.2f}  ({changes / apply_s:.0f} changes/s)")
print(f"apply peak RSS        {max(x['apply_kb'] for x in rows) / 1024:8.1f} MB")
print(f"one transaction       {2 * big_rows} row changes ({big_rows} inserts + {big_rows} updates): apply {big_s:.2f} s, peak RSS {big_kb / 1024:.1f} MB (goal < 100 MB)")
print("the three targets validated equal to the source")
PY
