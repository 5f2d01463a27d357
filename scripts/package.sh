#!/usr/bin/env bash
# Packages the four Lambda functions as AWS runs them: `cargo lambda build --release` for
# arm64 (what template.yaml and the CDK app deploy) and x86_64, one `bootstrap` per function,
# zipped for upload. Prints each file's size.
#
#   ./scripts/package.sh [arm64|x86_64 ...]      (default: both)
#
# Output: $CARGO_TARGET_DIR/lambda-<arch>/<function>/bootstrap(.zip); CARGO_TARGET_DIR defaults
# to ~/.cache/pgshift/target.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$PGSHIFT_ROOT"
pgshift_cargo_env
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(arm64 x86_64)
for arch in "${archs[@]}"; do
  pgshift_package "$arch"
  for fn in test-endpoint full-load cdc-poller apply; do
    dir="$PGSHIFT_LAMBDA_DIR/$fn"
    (cd "$dir" && rm -f bootstrap.zip && python3 -c "import zipfile,sys; z=zipfile.ZipFile('bootstrap.zip','w',zipfile.ZIP_DEFLATED); i=zipfile.ZipInfo('bootstrap'); i.external_attr=0o755<<16; i.compress_type=zipfile.ZIP_DEFLATED; z.writestr(i, open('bootstrap','rb').read()); z.close()")
    awk -v a="$arch" -v f="$fn" -v b="$(stat -c %s "$dir/bootstrap")" -v z="$(stat -c %s "$dir/bootstrap.zip")" -v d="$dir" \
      'BEGIN { printf "%-7s %-14s bootstrap %6.1f MB   zip %6.1f MB   %s\n", a, f, b / 1e6, z / 1e6, d }' 
  done
done
