#!/usr/bin/env bash
# Subject access at scale (issue 5): N audit records (default 10 million) through the real
# writer and sealing, then one subject's lookup through the index vs a full scan of the log.
#   bash loadtest/sar_bench.sh [RECORDS] [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
records=${1:-10000000}
dir=${2:-/var/tmp/wardgate-sar-bench}
cargo run --release --example sar_bench -- --records "$records" --dir "$dir"
echo "(delete $dir when done: it holds several GB)"
