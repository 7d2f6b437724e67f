#!/usr/bin/env bash
# Instructions per page for the filter and the naive baseline, counted by callgrind: figures
# that do not move with the machine's load (timings on a shared machine do; see README.md).
#   bash loadtest/instructions.sh [BENCH-ID ...]    (default: the four filter fixtures)
# Each fixture runs the `hot_paths` benchmark binary under callgrind, once for `filter_page`
# and once for `naive_value`, dumping the count after every page; the figure is the median of
# the benchmark's own pages but the first (the bench's start-up check filters every fixture's
# page once, which warms the caches; those calls are left out too).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v valgrind >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "valgrind is missing (apt-get install valgrind, as root)" >&2; exit 1; }
    apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
fi
fixtures=("$@")
[ ${#fixtures[@]} -gt 0 ] || fixtures=(analyst_profiling/100 analyst_profiling/1000
    councillor_canvassing/100 councillor_canvassing/1000)

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/loadtest}
# HOT_PATHS_BIN: count with this benchmark binary instead of building one (to compare builds).
bin=${HOT_PATHS_BIN:-}
[ -n "$bin" ] || bin=$(cargo bench --bench hot_paths --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "hot_paths":
        print(m["executable"])' | tail -1)
[ -x "$bin" ] || { echo "could not build the hot_paths benchmark" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# count BENCH-ID FUNCTION: median instructions between the ends of two calls of FUNCTION.
count() {
    rm -f "$work"/cg.*
    valgrind --tool=callgrind --callgrind-out-file="$work/cg" --dump-after="$2" \
        "$bin" --bench "^$1\$" --profile-time 3 >/dev/null 2>"$work/log"
    # The start-up check calls each filter once per fixture page (it prints a line for each).
    checks=$(grep -c '^fixture ' "$work/log" || true)
    python3 - "$work" "$checks" <<'EOF'
import pathlib, statistics, sys
work, checks = pathlib.Path(sys.argv[1]), int(sys.argv[2])
dumps = sorted(work.glob("cg.*"), key=lambda p: int(p.suffix[1:]))
totals = []
for p in dumps:
    for line in p.read_text().splitlines():
        if line.startswith("totals:"):
            totals.append(int(line.split()[1]))
            break
# The first dumps are the start-up checks (the first also holds everything before it); the
# benchmark's first call also carries the set-up before it, so it is left out too.
own = totals[checks + 1:]
if not own:
    sys.exit(f"too few calls under callgrind ({len(totals)} dumps)")
print(int(statistics.median(own)))
EOF
}

printf '%-30s %16s %16s %8s\n' fixture "filter_page" "naive_value" "naive/x"
for f in "${fixtures[@]}"; do
    fast=$(count "filter/filter_page/$f" 'hot_paths::wardgate_filter')
    naive=$(count "filter/naive_value/$f" 'hot_paths::naive_filter')
    python3 -c "import sys; f, n = int(sys.argv[2]), int(sys.argv[3]); print(f'{sys.argv[1]:<30} {f:>16,} {n:>16,} {n / f if f else 0:>7.1f}x')" "$f" "$fast" "$naive"
done
echo "(instructions per page, callgrind; naive/x = how many times the naive approach's count)"
