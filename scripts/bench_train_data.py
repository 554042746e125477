"""Host memory and time of the train stage's data path at the v3 recipe's scale, without a model: the mine stage's
pools.parquet -> train.load_pools -> train.rotation -> train.rotation_dataset, as the train stage calls them.

Synthetic data: `--queries` training queries with one positive and `--negatives` negatives each (one system, ranks
1..N: the v3 recipe keeps 20 per query), passage ids drawn from a `--corpus`-passage corpus of short texts. A sampler
thread reads /proc/self/status every 10 ms and keeps the peak RssAnon over what the corpus, queries and imports hold.

    python scripts/bench_train_data.py                      # 500k queries x 21 pool rows, 10 epochs: 5M triplets
    python scripts/bench_train_data.py --epochs 1           # the same pools, 0.5M triplets (a second point)

`stage=plan` states the train stage's host RAM from these figures. The default test suite never runs this (a minute
or two, ~100 MB of disk).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_anon_mb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    return 0


def generate(work: Path, queries: int, negatives: int, corpus: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    with open(work / "collection.tsv", "w", encoding="utf-8") as fh:
        for lo in range(0, corpus, 100_000):
            fh.write("".join(f"{i}\tpassage {i} about something\n" for i in range(lo, min(lo + 100_000, corpus))))
    with open(work / "queries.tsv", "w", encoding="utf-8") as fh:
        fh.write("".join(f"{1_000_000 + i}\tquery {i}?\n" for i in range(queries)))
    rows = negatives + 1
    qids = np.repeat(np.arange(1_000_000, 1_000_000 + queries).astype(str), rows)
    pq.write_table(pa.table({"qid": qids, "pid": rng.integers(0, corpus, queries * rows).astype(str),
                             "role": np.tile(np.array(["pos"] + ["neg"] * negatives), queries),
                             "system": np.full(len(qids), "msmarco-distilbert-base-v2"),
                             "rank": np.tile(np.arange(0, rows), queries).astype(np.int32)}), work / "pools.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=500_000)
    ap.add_argument("--negatives", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--corpus", type=int, default=1_000_000)
    ap.add_argument("--workdir", type=Path, default=None, help="kept when given; a temporary folder otherwise")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train_data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (work / "pools.parquet").exists():
            generate(work, args.queries, args.negatives, args.corpus)
        import datasets  # noqa: F401  (imported before the baseline, as in the train stage)

        from pipeline.readers import Corpus, read_queries
        from pipeline.stages import train

        corpus = Corpus.open(work / "collection.tsv", work / "cache")
        queries = read_queries(work / "queries.tsv")
        base, peak = rss_anon_mb(), [0]

        def sample() -> None:
            while True:
                peak[0] = max(peak[0], rss_anon_mb())
                time.sleep(0.01)

        threading.Thread(target=sample, daemon=True).start()
        t0 = time.perf_counter()
        pools = train.load_pools(work / "pools.parquet")
        t1 = time.perf_counter()
        rows, stats = train.rotation(pools, list(queries), args.epochs, 0)
        t2 = time.perf_counter()
        train.rotation_dataset(rows, queries, corpus)
        t3 = time.perf_counter()
        time.sleep(0.05)
        pool_rows = args.queries * (args.negatives + 1)
        print(f"{pool_rows:,} pool rows, {stats['triplets']:,} triplets: load_pools {t1 - t0:.1f} s, rotation "
              f"{t2 - t1:.1f} s, dataset {t3 - t2:.1f} s; peak RssAnon {peak[0] - base} MB over the {base} MB of "
              f"corpus, queries and imports")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
