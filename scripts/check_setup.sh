#!/usr/bin/env bash
# Check that set-up stays quiet: a fresh clone's `bash scripts/setup.sh` (a new .venv) prints at most MAX lines
# (default 6) and exits 0, and a second run (everything installed) too. Minutes (it installs torch): kept out
# of the test suite. Usage: bash scripts/check_setup.sh [MAX]
set -euo pipefail
MAX=${1:-6}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/repo"
for run in fresh again; do
  if ! (cd "$work/repo" && bash scripts/setup.sh) > "$work/$run.out" 2>&1; then
    echo "check_setup: set-up failed ($run):" >&2
    cat "$work/$run.out" >&2
    exit 1
  fi
  # lines pip prints about this machine's own package-index settings are not the toolkit's
  n=$(grep -vc "^WARNING: Location '.*' is ignored" "$work/$run.out" || true)
  echo "check_setup: $run set-up printed $n line(s):"
  grep -v "^WARNING: Location '.*' is ignored" "$work/$run.out" | sed 's/^/  | /'
  if [ "$n" -gt "$MAX" ]; then
    echo "check_setup: more than $MAX lines" >&2
    exit 1
  fi
done
echo "check_setup: quiet"
