#!/usr/bin/env bash
# On the GPU machine, from the repository root with .whl/ and .benchdata/ (scripts/prepare_gpu_carry.sh) carried:
# every default row of scripts/bench_gpu.py with its baseline, in one process; output and JSON into $OUT.
#   bash scripts/gpu_bench.sh [bench_gpu.py options, e.g. --budget-s 240]
#   PROFILE_ROWS=encode,score bash scripts/gpu_bench.sh   # then scripts/profile_gpu.py on those rows (kernel times)
# Then, here: python -m pipeline stage=plan experiment=v3_distilbert plan.bench_json=<$OUT/b.json>
set -euo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
whl=${WHL_DIR:-.whl} site=${SITE:-/tmp/site}  # other folders only for scripts/rehearse_gpu_bench.sh
if compgen -G "$whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$whl"/*.whl
else  # without them the training row reports itself unavailable (no datasets); every other row still runs
    echo "no wheels in $whl (scripts/prepare_gpu_carry.sh builds them): running without" >&2
fi
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 scripts/bench_gpu.py --data .benchdata/data --minilm .benchdata/minilm --train-steps 40 --out "$out/b.json" "$@" 2>&1 \
    | { grep --line-buffered -v "it/s\]\|example/s\|{'loss\|{'train_runtime" || true; } | tee "$out/b.txt"
if [ -n "${PROFILE_ROWS:-}" ]; then  # where the encode/score time goes, kernel by kernel (not part of the 5 minutes)
    python3 scripts/profile_gpu.py --data .benchdata/data --minilm .benchdata/minilm --rows "$PROFILE_ROWS" \
        --out "$out/profile.json" 2>&1 | { grep --line-buffered -v "it/s\]" || true; } | tee "$out/profile.txt"
fi
