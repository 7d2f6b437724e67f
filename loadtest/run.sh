#!/usr/bin/env bash
# wardgate's load test, in one command (issue 7; see loadtest/README.md):
#   bash loadtest/run.sh [harness options, e.g. --sizes 100 --duration 5 --profile]
#   bash loadtest/run.sh --export [--records 1000000]   (the streamed-export benchmark, export.py)
# Installs nginx and wrk with apt-get if missing (as root), builds wardgate in release mode,
# generates synthetic pages with `wardgate demo`, then measures the upstream direct, nginx
# proxy_pass, and wardgate with fsync and with page-cache audit, side by side, on loopback only.
# Prints a table and writes loadtest/results/latest.json. Stops everything it started on exit.
#
# Environment:
#   WARDGATE_BIN         use this wardgate binary instead of building one
#   FIXEDRATE_BIN        use this fixed-rate generator (examples/fixedrate) instead of building one
#   PASSTHROUGH_BIN      use this build of examples/passthrough (wardgate's stack, no checks)
#   CARGO_TARGET_DIR     where to build (default: target/loadtest, apart from debug builds)
#   LOADTEST_BUILD_JOBS  cargo -j for the build (default: 1, to leave a core to others)
#   LOADTEST_KEEP_WORK=1 keep the scratch directory (configs, pages, logs, audit segments)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")

say() { printf '[loadtest %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---- 1. what it needs
need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
# Only for --instructions N (instructions per request under callgrind).
case " $* " in *" --instructions "*) command -v valgrind >/dev/null || need+=(valgrind) ;; esac
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing: ${need[*]}; install them, or run this as root to have it done" >&2
    exit 1
  fi
  say "installing ${need[*]}"
  # Debian starts an installed nginx as a system service on port 80; we only want the binary.
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  rc=0
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || rc=$?
  if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
  [ "$rc" = 0 ] || { echo "apt-get failed ($rc)" >&2; exit "$rc"; }
fi
export PATH="$PATH:/usr/sbin"

# ---- 2. wardgate and the fixed-rate generator, release builds
target_dir=${CARGO_TARGET_DIR:-$repo/target/loadtest}
build() {
  say "building $* (release) into $target_dir"
  (cd "$repo" && CARGO_TARGET_DIR="$target_dir" cargo build --release "$@" -j "${LOADTEST_BUILD_JOBS:-1}")
}
if [ -n "${WARDGATE_BIN:-}" ]; then
  bin=$WARDGATE_BIN
else
  build --bin wardgate
  bin=$target_dir/release/wardgate
fi
[ -x "$bin" ] || { echo "no wardgate binary at $bin" >&2; exit 1; }
fixedrate_args=()
if [ "${1:-}" != "--export" ]; then
  examples=()
  [ -n "${FIXEDRATE_BIN:-}" ] || examples+=(--example fixedrate)
  [ -n "${PASSTHROUGH_BIN:-}" ] || examples+=(--example passthrough)
  [ ${#examples[@]} -eq 0 ] || build "${examples[@]}"
  fixedrate=${FIXEDRATE_BIN:-$target_dir/release/examples/fixedrate}
  passthrough=${PASSTHROUGH_BIN:-$target_dir/release/examples/passthrough}
  [ -x "$fixedrate" ] || { echo "no fixed-rate generator at $fixedrate" >&2; exit 1; }
  [ -x "$passthrough" ] || { echo "no passthrough proxy at $passthrough" >&2; exit 1; }
  fixedrate_args=(--fixedrate "$fixedrate" --passthrough "$passthrough")
fi

# ---- 3. measure; the harness stops what it starts, and so does this trap if it cannot
work=$(mktemp -d "${TMPDIR:-/tmp}/wardgate-loadtest.XXXXXX")
cleanup() {
  if [ -f "$work/pids" ]; then
    while read -r pid; do
      kill "$pid" 2>/dev/null || true
    done <"$work/pids"
  fi
  if [ "${LOADTEST_KEEP_WORK:-0}" = 1 ]; then
    say "scratch kept in $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
say "scratch directory $work"
program=harness.py
if [ "${1:-}" = "--export" ]; then
  program=export.py
  shift
fi
python3 "$here/$program" --bin "$bin" "${fixedrate_args[@]}" --work "$work" "$@"
