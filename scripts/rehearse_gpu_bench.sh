#!/usr/bin/env bash
# Before spending device time: scripts/gpu_bench.sh, unchanged, on this CPU, in a fresh venv that holds what the GPU
# image's Python holds that the bench touches, at the image's versions (KINDS.md of the device tool: transformers
# 5.17.0, sentence-transformers 6.0.1, triton 3.6.0, accelerate, pyarrow, pandas), and no hydra, faiss or datasets: the wheels
# of scripts/prepare_gpu_carry.sh, built for this Python, must supply those, as the carried .whl/ does there.
#   bash scripts/rehearse_gpu_bench.sh [gpu_bench.sh options; default: --quick --device cpu]
#   (TRANSFORMERS=<version> SENTENCE_TRANSFORMERS=<version> for another image)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.rehearse-venv
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q "transformers==${TRANSFORMERS:-5.17.0}" \
    "sentence-transformers==${SENTENCE_TRANSFORMERS:-6.0.1}" "triton==${TRITON:-3.6.0}" accelerate pyarrow pandas xxhash fsspec requests tqdm \
    scipy scikit-learn pyyaml psutil filelock
this_python=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
WHL_DIR="$work/whl" GPU_PYTHON=$this_python bash scripts/prepare_gpu_carry.sh
if (($# == 0)); then set -- --quick --device cpu; fi
PATH="$PWD/$venv/bin:$PATH" WHL_DIR="$work/whl" SITE="$work/site" OUT=${OUT:-$work/out} \
    bash scripts/gpu_bench.sh "$@"
