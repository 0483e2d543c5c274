#!/usr/bin/env bash
# The GPU run of the benchmark suite, as .ci/gpu or a person runs it on the GPU host.
# Usage: OUT=/some/dir bench/gpu_check.sh   (writes bench.json, bench.md, bench.png there)
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
python3 -m cupynn bench seed seed-1m narrow wide --device cuda --peers all \
    --json "$OUT/bench.json" --plot "$OUT/bench.png" --markdown "$OUT/bench.md" \
    2> "$OUT/bench.log"
rc=$?
echo "bench: exit $rc, $(( $(date +%s) - start )) s wall"
exit $rc
