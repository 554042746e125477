"""Write the project's synthetic demo corpus (MS MARCO layout) into a folder.

    python scripts/make_demo_corpus.py [--out DIR] [--seed 0]

Defaults to pipeline/resources/demo/, the copy shipped with the repository. Deterministic: the same seed gives
byte-identical files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo import DEMO_DIR, DEMO_FILES, write_demo_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEMO_DIR, help=f"output folder (default {DEMO_DIR})")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    args = ap.parse_args(argv)
    out = write_demo_corpus(args.out, seed=args.seed)
    total = 0
    for name in DEMO_FILES:
        path = out / name
        size = path.stat().st_size
        total += size
        with open(path, encoding="utf-8") as fh:
            lines = sum(1 for _ in fh)
        print(f"{name:20s} {lines:6d} lines {size:9,d} bytes")
    print(f"{'total':20s} {'':12s} {total:9,d} bytes -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
