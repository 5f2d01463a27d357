#!/usr/bin/env bash
# Whole-migration benchmark (prints figures; not a test): a PostgreSQL database copied to a
# second one — schema, data, indexes, keys, sequences — by pgshift against pgcopydb and
# pg_dump | pg_restore, on the same cluster in one run.
#
# On a throwaway cluster: `pgbench -i -s SCALE` (database src; 100,000 accounts per scale
# unit, a primary key per table, and a sequence: pgbench_history gets an identity-like
# bigserial column added here), then three copies, each into its own empty database:
#   pgshift   `full-load --cdc --parallel 2` (slot first, chunks staged in a folder) +
#             `apply --parallel 2` (pre-data, parallel load, post-data in parallel);
#   pgcopydb  `pgcopydb clone --table-jobs 2 --index-jobs 2` (Debian package `pgcopydb`,
#             installed when missing and root);
#   pg_dump   `pg_dump -Fd -j2` then `pg_restore -j2`.
# Every target is validated equal to the source (`pgshift validate`) and must have the
# source's indexes and sequence value.
#
#   ./scripts/bench-migrate.sh [SCALE]    (default 50: 5M rows)
#   PGSHIFT_BENCH_BIN=<pgshift binary> measures another build against the same baselines.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$PGSHIFT_ROOT"
trap pgshift_cleanup EXIT
SCALE=${1:-50}

pgshift_cargo_env
pgshift_ensure_postgres
if ! command -v pgcopydb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    log "installing pgcopydb from Debian packages"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgcopydb >/dev/null 2>&1 ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgcopydb >/dev/null; }
  else
    log "pgcopydb not found: install the Debian package pgcopydb"; exit 1
  fi
fi
pgshift_bench_bin
pgshift_start_pg migrate logical
export PGPASSWORD=$PGSHIFT_PG_PASSWORD
port=$PG_PORT_migrate
psql_() { psql -X -q -At -h 127.0.0.1 -p "$port" -U postgres "$@"; }
base="postgres://postgres:${PGSHIFT_PG_PASSWORD}@127.0.0.1:${port}"
url() { echo "$base/$1?sslmode=disable"; }
work=$PGSHIFT_RUN_DIR/bench-migrate
mkdir -p "$work"
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
export PGSHIFT_LOG=${PGSHIFT_LOG:-warn}

for db in src pgs pgc pgd; do psql_ -d postgres -c "create database $db"; done
log "pgbench -i -s $SCALE"
pgbench -q -i -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres src >/dev/null 2>&1
psql_ -d src -c "alter table pgbench_history add column id bigserial primary key" -c "analyze" -c "checkpoint"
rows=$(psql_ -d src -c "select sum(n_live_tup) from pg_stat_user_tables")

# pgshift: full load (with the slot a live migration needs), then apply.
t0=$(now)
"$bin" full-load --task mig --source "$(url src)" --stage "$work/stage" --state "$work/state" --cdc --parallel 2 >/dev/null
t1=$(now)
"$bin" apply --task mig --target "$(url pgs)" --stage "$work/stage" --parallel 2 >/dev/null
t2=$(now)
du_stage=$(du -sm "$work/stage" | cut -f1)

# pgcopydb clone.
t3=$(now)
pgcopydb clone --source "$(url src)" --target "$(url pgc)" --table-jobs 2 --index-jobs 2 \
  --dir "$work/pgcopydb" >"$work/pgcopydb.log" 2>&1 || { tail -20 "$work/pgcopydb.log"; exit 1; }
t4=$(now)

# pg_dump -Fd -j2 | pg_restore -j2.
t5=$(now)
pg_dump -h 127.0.0.1 -p "$port" -U postgres -Fd -j 2 -f "$work/dump" src
pg_restore -h 127.0.0.1 -p "$port" -U postgres -j 2 -d pgd "$work/dump"
t6=$(now)

idx_src=$(psql_ -d src -c "select count(*) from pg_indexes where schemaname = 'public'")
seq_src=$(psql_ -d src -c "select last_value from pgbench_history_id_seq")
for db in pgs pgc pgd; do
  "$bin" validate --task mig --source "$(url src)" --target "$(url $db)" >"$work/validate-$db.txt" || {
    cat "$work/validate-$db.txt"; echo "$db differs from the source" >&2; exit 1
  }
  [ "$(psql_ -d $db -c "select count(*) from pg_indexes where schemaname = 'public'")" = "$idx_src" ] ||
    { echo "$db lacks the source's indexes" >&2; exit 1; }
  [ "$(psql_ -d $db -c "select last_value from pgbench_history_id_seq")" = "$seq_src" ] ||
    { echo "$db's sequence is not the source's" >&2; exit 1; }
done
"$bin" teardown --task mig --source "$(url src)" --yes >/dev/null

python3 - "$SCALE" "$rows" "$(secs "$t0" "$t1")" "$(secs "$t1" "$t2")" "$(secs "$t3" "$t4")" "$(secs "$t5" "$t6")" "$du_stage" <<'PY'
import sys
scale, rows = int(sys.argv[1]), int(sys.argv[2])
load, apply_, pgc, pgd, du = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
pgs = load + apply_
print(f"database              pgbench -i -s {scale}: {rows} rows, 4 tables, 4 primary keys, 1 sequence")
print(f"pgshift               {pgs:8.2f} s  (full-load --cdc {load:.2f} s -> {du} MB staged, apply {apply_:.2f} s)")
print(f"pgcopydb clone        {pgc:8.2f} s")
print(f"pg_dump -j2 | restore {pgd:8.2f} s")
print(f"ratio to pgcopydb     {pgc / pgs:8.2f}  (pgcopydb's time / pgshift's; goal >= 1)")
print(f"ratio to pg_dump      {pgd / pgs:8.2f}")
print("every target validated equal to the source, with its indexes and sequence value")
PY
