#!/usr/bin/env python
"""The engine's host side (what feeds the GPU) on this machine's CPU: inputs from texts vs from a corpus token
store (pipeline/tokens.py), for the encode and the score calls, with no model forward (engine.ceilings with
device_batches=0). Beside the collating thread the consuming thread does launch-like work (small torch ops, as the
GPU-feeding thread does), so the figures include what the two threads cost each other; ``launch share`` is that
work's rate over its rate alone.

Real MS MARCO passages and queries (the TREC-DL 2020 pool of ../shared/data), all-MiniLM-L6-v2's tokenizer (the
bert-base-uncased vocabulary of msmarco-distilbert and the electra-base cross-encoder), best of --repeats runs.
Usage: python scripts/bench_host.py [--data DIR] [--repeats 3]   (~2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "trec-dl-2020-pool"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from bench_gpu import default_minilm, read_passages, read_queries  # this folder: the GPU bench's readers
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from pipeline import engine, tokens

    path = str(default_minilm())
    bi = SentenceTransformer(path, device="cpu")
    ce = CrossEncoder(path, num_labels=1, device="cpu")
    _, passages = read_passages(Path(args.data))
    _, queries = read_queries(Path(args.data))
    rng = np.random.default_rng(0)
    n_pairs = 3 * len(passages)
    qrows, prows = np.arange(n_pairs) % len(queries), rng.integers(0, len(passages), n_pairs)
    pairs = [(queries[q], passages[p]) for q, p in zip(qrows.tolist(), prows.tolist())]
    texts_at = lambda rows: [passages[i] for i in rows.tolist()]  # noqa: E731

    t0 = time.perf_counter()
    store = tokens.TokenStore.from_texts(tokens.fast_tokenizer_json(bi), passages)
    print(f"token store build: {len(passages):,} passages in {time.perf_counter() - t0:.2f}s "
          f"({len(passages) / (time.perf_counter() - t0):,.0f}/s, this process)")
    qstore = tokens.TokenStore.from_texts(tokens.fast_tokenizer_json(ce), queries)
    cases = [("encode", "texts", bi, passages, False),
             ("encode", "token store", bi, tokens.TextTokens(store, np.arange(len(passages)), texts_at), False),
             ("score", "texts", ce, pairs, True),
             ("score", "token store", ce, tokens.PairTokens(qstore, queries, qrows, store, prows, texts_at), True)]
    for call, source, model, items, is_pairs in cases:
        runs = [engine.ceilings(model, items, pairs=is_pairs, device_batches=0, batch_tokens=65536, max_batch=2048,
                                tokenize_workers=0) for _ in range(args.repeats)]
        best = min(runs, key=lambda c: c["host_s"])
        print(f"{call:6s} from {source:11s}: {len(items):>7,} items in {best['host_s']:6.2f}s = "
              f"{best['host_items_per_s']:>9,.0f}/s; collator cpu {best['producer_cpu_s']:.2f}s; launch share "
              f"{best['launch_share']:.2f}")


if __name__ == "__main__":
    main()
