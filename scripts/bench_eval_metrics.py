"""Host memory and time of the evaluate stage's metric step at MS MARCO dev scale, without a model: a run of
`--queries` x `--k` results held as the {qid: {pid: score}} mapping the stage builds (evaluate.run_from_hits),
then pipeline.metrics (trec_eval's code through ir-measures) over it, as `stage=evaluate` does for a full-corpus
retrieval eval set.

    python scripts/bench_eval_metrics.py                    # 6,980 dev queries x top-1000

`stage=plan` states the evaluate stage's host RAM from this figure. The default test suite never runs this.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_data import rss_anon_mb  # noqa: E402  (the same probe as the train data bench)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=6980)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--corpus", type=int, default=8_841_823)
    ap.add_argument("--measures", default="RR@10,nDCG@10,R@1000")
    args = ap.parse_args()
    from pipeline import metrics
    from pipeline.stages.evaluate import run_from_hits

    class NumberedCorpus:  # passage ids "0".."corpus-1": what run_from_hits asks of a Corpus
        @staticmethod
        def id_at(rows: np.ndarray) -> list[str]:
            return rows.astype(str).tolist()

    rng = np.random.default_rng(0)
    qids = [str(300_000 + i) for i in range(args.queries)]
    qrels = {q: {str(rng.integers(0, args.corpus)): 1} for q in qids}
    base = rss_anon_mb()
    t0 = time.perf_counter()
    idx = rng.integers(0, args.corpus, (args.queries, args.k))
    scores = -np.sort(-rng.random((args.queries, args.k)), axis=1)
    run = run_from_hits(qids, NumberedCorpus(), scores, idx)  # the evaluate stage's own construction
    del idx, scores
    t1 = time.perf_counter()
    held = rss_anon_mb() - base
    metrics.evaluate_run(qrels, run, args.measures.split(","), missing="zero")
    t2 = time.perf_counter()
    print(f"{args.queries:,} queries x {args.k:,}: run mapping {t1 - t0:.1f} s, {held} MB; metrics {t2 - t1:.1f} s; "
          f"RssAnon {rss_anon_mb() - base} MB over the imports after both "
          f"({(rss_anon_mb() - base) * 2**20 / (args.queries * args.k):.0f} B per result)")


if __name__ == "__main__":
    main()
