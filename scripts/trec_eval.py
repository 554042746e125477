#!/usr/bin/env python
"""trec_eval-like scoring of a run file without Hydra (same code as `python -m pipeline stage=score_run`).

    python scripts/trec_eval.py QRELS RUN [-m nDCG@10 -m 'RR(rel=2)@10' ...] [-l 2] [-c] [-q] [--json out.json]

Argument order is trec_eval's (qrels first). -l sets the relevance level of the binary measures that name none
(default 1, trec_eval's; TREC-DL's convention is -l 2), -c counts judged queries missing from the run as 0, -q
adds per-query lines. Malformed files exit with status 2 and a `file:line: reason` message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.metrics import with_relevance_level  # noqa: E402
from pipeline.readers import DataError  # noqa: E402
from pipeline.stages.score_run import report, score  # noqa: E402

DEFAULT = ["nDCG@10", "RR@10", "AP", "R@100", "R@1000"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("qrels")
    parser.add_argument("run")
    parser.add_argument("-m", "--measure", action="append", help=f"ir-measures name (default {' '.join(DEFAULT)})")
    parser.add_argument("-l", type=int, default=1, metavar="LEVEL",
                        help="lowest grade that counts as relevant for binary measures naming no rel= (default 1, as "
                             "trec_eval; TREC-DL: 2)")
    parser.add_argument("-c", action="store_true", help="judged queries missing from the run count as 0")
    parser.add_argument("-q", action="store_true", help="per-query values too")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        measures = args.measure or DEFAULT
        if args.l != 1:
            measures = with_relevance_level(measures, args.l)
        result = score(args.run, args.qrels, measures, missing="zero" if args.c else "skip")
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(result, per_query=args.q))
    if args.json:
        from pipeline.artifacts import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
