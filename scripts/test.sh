#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what is missing, then format check, clippy with
# warnings as errors, and every test (unit, policy fixtures, end to end). Run from anywhere:
#   bash scripts/test.sh
# Tests start their own servers (and a headless browser) on free ports; the "disk full" tests
# mount a small tmpfs, which needs root. Run as root (as CI is), no test may skip for want of
# root or of a tool this script installs (WARDGATE_NO_SKIP); run otherwise, those tests say
# they skipped, and this script says so first. The load-test smoke test
# (tests/loadtest_smoke.rs) has loadtest/run.sh install nginx and wrk the same way.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mount >/dev/null || need_apt+=(mount)
# A small ext4 disk on a loop device, frozen (`fsfreeze`) to stall the audit log's writes.
command -v mkfs.ext4 >/dev/null || [ -x /usr/sbin/mkfs.ext4 ] || need_apt+=(e2fsprogs)
command -v fsfreeze >/dev/null || [ -x /usr/sbin/fsfreeze ] || need_apt+=(util-linux)
command -v redis-server >/dev/null || need_apt+=(redis-server)
# Headless Chromium and its WebDriver, for the security console's browser test.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
# nginx serves an identity provider's JWK set over TLS in tests/jwks_e2e.rs (and the load
# test's upstream).
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
# The load test's profiles (`--profile`, checked by tests/loadtest_smoke.rs).
command -v perf >/dev/null || need_apt+=(linux-perf)
# A C compiler for ring and mimalloc; Python for Datasette (below).
command -v cc >/dev/null || need_apt+=(build-essential)
command -v python3 >/dev/null || need_apt+=(python3)
# (A virtual environment needs ensurepip, which Debian ships in python3-venv.)
if ! command -v datasette >/dev/null && ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
  need_apt+=(python3-venv)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    # Debian starts an installed nginx as a service on port 80; the tests want the binary only.
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      made_policy=1
    fi
    rc=0
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" || rc=$?
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    [ "$rc" = 0 ] || exit "$rc"
  else
    echo "missing: ${need_apt[*]} (install them, or run as root to have this script do it)" >&2
    exit 1
  fi
fi
# Datasette (PyPI) is the real third-party datastore of tests/datasette_e2e.rs: installed with
# the Python's own pip where it takes installs, else (Debian's Python refuses them, PEP 668)
# into a virtual environment of our own under target/.
if ! command -v datasette >/dev/null; then
  if python3 -m pip install --quiet --disable-pip-version-check datasette 2>/dev/null; then
    command -v datasette >/dev/null || export PATH="$(python3 -m site --user-base)/bin:$PATH"
  else
    venv=target/datasette-venv
    [ -x "$venv/bin/datasette" ] || {
      python3 -m venv "$venv" && "$venv/bin/pip" install --quiet --disable-pip-version-check datasette
    }
    export PATH="$PWD/$venv/bin:$PATH"
  fi
fi
# rustfmt and clippy, where rustup manages the toolchain (a toolchain without them fails below).
if command -v rustup >/dev/null; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

# Strict where a tmpfs can be mounted (root with CAP_SYS_ADMIN: not an unprivileged container).
probe=$(mktemp -d)
if [ "$(id -u)" = 0 ] && mount -t tmpfs -o size=1m tmpfs "$probe" 2>/dev/null; then
  umount "$probe"
  export WARDGATE_NO_SKIP=1
else
  echo "note: cannot mount a tmpfs here (not root, or a container without CAP_SYS_ADMIN), so the tests that fill a small one (no audit, no data when the disk is full) will skip" >&2
fi
rmdir "$probe"

# A CI build is built once: incremental state would only take disk (about 2 GB).
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo build --examples"
# tests/loadtest_smoke.rs runs the load test with these (cargo test builds examples as tests,
# under hashed names, not as the binaries loadtest/run.sh takes).
cargo build --examples --locked
echo "== cargo test"
cargo test --all-targets --locked --no-fail-fast
