#!/usr/bin/env bash
# The test suite at the oldest versions pyproject.toml allows: every `name>=X` of [project].dependencies is
# installed as `name==X` (torch excepted: the CPU build of .ci/run, installed first), in a fresh venv.
#   bash scripts/check_min_versions.sh [pytest options, e.g. -m slow]
# A floor that fails here is a floor pyproject.toml must raise (users on clusters pin old stacks).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
venv=${VENV:-.minver-venv}
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.13.0
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
"$venv/bin/python" - "$pins" <<'PYEOF'
import re, sys, tomllib  # Python >= 3.11

deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
with open(sys.argv[1], "w") as out:
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", dep)
        if m and m.group(1).lower() != "torch":
            out.write(f"{m.group(1)}=={m.group(2)}\n")
PYEOF
cat "$pins"
"$venv/bin/python" -m pip install -q -e ".[test]" -c "$pins"
"$venv/bin/python" -m pip list 2>/dev/null | grep -i -E "^($(cut -d= -f1 "$pins" | paste -sd'|')) " || true
"$venv/bin/python" -m pytest -q "$@"
