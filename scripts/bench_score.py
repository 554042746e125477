"""Host memory of `stage=score` at reduced scale, with a trivial scorer (no model): what the stage itself holds per
(query, passage) pair, phase by phase, so `stage=plan` can state the score stage's RAM at MS MARCO scale.

Synthetic MS MARCO-layout data (passages of ~430 bytes, 7-digit query ids, one judged positive per query, 60% of
them among the candidates), a complete retrieve result of `--per-query` candidates per query, then the score stage
itself (pipeline.stages.score.run, unchanged) in a fresh process with `pipeline.engine.score_pairs` replaced by a
cheap function of the texts. Two runs: `cold` (empty pair cache: every pair is scored and appended to the cache)
and `warm` (force=true: every pair is answered by the cache, so the cache join over all pairs runs). A sampler
thread reads /proc/self/status every 10 ms and keeps the peak of VmRSS (all resident memory, including the
memory-mapped corpus pages the kernel can drop) and RssAnon (the process's own heap: what must fit in RAM) per
phase: prepare (corpus, queries, qrels, candidates, pair list), cache_lookup, score_chunks, merge.

    python scripts/bench_score.py                          # 20k queries x 100 candidates: ~2.02M pairs
    python scripts/bench_score.py --queries 10000          # ~1.01M pairs (a second point for the slope)

Writes <workdir>/bench_score.json; the default test suite never runs this (minutes, ~1 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ["the", "of", "and", "to", "in", "is", "for", "on", "that", "with", "as", "by", "at", "from", "this", "be",
         "are", "or", "was", "an", "it", "which", "can", "have", "not", "has", "more", "but", "its", "also", "one",
         "all", "their", "been", "other", "when", "were", "they", "will", "what", "into", "these", "after", "first",
         "water", "body", "cells", "energy", "number", "state", "years", "system", "during", "used", "between",
         "most", "such", "blood", "time", "example", "heart", "called", "make", "form", "people", "means", "made",
         "many", "usually", "found", "include", "type", "known", "long"]


def overrides(work: Path, per_query: int, chunk: int) -> list[str]:
    data = work / "data"
    return [f"data.corpus={data / 'collection.tsv'}", f"data.train.queries={data / 'queries.train.tsv'}",
            f"data.train.qrels={data / 'qrels.train.tsv'}", "data.name=bench", "model.name=bench-bi",
            "model.bi_encoder=bench/bi-encoder", "model.cross_encoder=bench/cross-encoder",
            "model.cross_encoder_name=bench-ce", f"retrieve.top_k={per_query}", f"score.chunk_pairs={chunk}",
            "device=cpu", "tracking=none", f"artifacts_root={work / 'artifacts'}"]


def generate(work: Path, n_queries: int, per_query: int, corpus_size: int, seed: int = 0) -> dict:
    """collection.tsv, queries.train.tsv, qrels.train.tsv and candidate arrays (saved as .npy)."""
    rng = np.random.default_rng(seed)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    words = np.array(WORDS)
    with open(data / "collection.tsv", "w", encoding="utf-8") as fh:
        for lo in range(0, corpus_size, 10_000):
            n = min(10_000, corpus_size - lo)
            picks = words[rng.integers(0, len(words), (n, 72))]  # ~430 bytes per passage
            fh.write("".join(f"{lo + i}\t{' '.join(row)}\n" for i, row in enumerate(picks)))
    qids = np.arange(1_000_000, 1_000_000 + n_queries)
    with open(data / "queries.train.tsv", "w", encoding="utf-8") as fh:
        picks = words[rng.integers(0, len(words), (n_queries, 6))]
        fh.write("".join(f"{q}\t{' '.join(row)}?\n" for q, row in zip(qids, picks)))
    positive = rng.integers(0, corpus_size, n_queries)
    with open(data / "qrels.train.tsv", "w", encoding="utf-8") as fh:
        fh.write("".join(f"{q}\t0\t{p}\t1\n" for q, p in zip(qids, positive)))
    stride = corpus_size // per_query
    cands = (rng.integers(0, corpus_size, n_queries)[:, None] + np.arange(per_query) * stride) % corpus_size
    retrieved = rng.random(n_queries) < 0.6
    at = rng.integers(0, per_query, n_queries)
    cands[np.flatnonzero(retrieved), at[retrieved]] = positive[retrieved]
    np.save(work / "cand_pids.npy", cands)
    return {"queries": n_queries, "candidates_per_query": per_query, "corpus": corpus_size,
            "positives_retrieved": int(retrieved.sum())}


def prepare(work: Path, per_query: int, chunk: int) -> None:
    """A complete retrieve result for the bench config, and the corpus' Arrow conversion (done by retrieve in a
    real chain), so the measured runs start where the score stage starts."""
    import pyarrow as pa

    from pipeline.artifacts import open_stage
    from pipeline.config import compose, plain
    from pipeline.shards import write_parquet
    from pipeline.stages import common, retrieve

    cfg = compose(overrides(work, per_query, chunk))
    common.load_corpus(cfg)
    cands = np.load(work / "cand_pids.npy")
    n_queries = len(cands)
    qids = np.repeat(np.arange(1_000_000, 1_000_000 + n_queries), per_query).astype(str)
    table = pa.table({"qid": pa.array(qids.astype(object), pa.string()),
                      "pid": pa.array(cands.reshape(-1).astype(str).astype(object), pa.string()),
                      "rank": pa.array(np.tile(np.arange(1, per_query + 1, dtype=np.int32), n_queries)),
                      "bi_score": pa.array(np.zeros(cands.size, np.float32))})
    with open_stage("retrieve", retrieve.identity(cfg), root=common.artifacts_root(cfg), label=retrieve.label(cfg),
                    config=plain(cfg)) as st:
        write_parquet(table, st.file("candidates.parquet"))


def measure(work: Path, per_query: int, chunk: int, force: bool) -> dict:
    """One score run in this (fresh) process, with phase peaks."""
    import threading

    from pipeline import engine
    from pipeline.config import compose
    from pipeline.stages import score

    peaks: dict[str, dict[str, float]] = {}
    phase = ["other"]  # outside the four phases: the stage contract (lock, manifest checksums), the end
    stop = threading.Event()

    def status() -> dict[str, float]:
        out = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) / 1024  # MB
        return out

    def sample() -> None:
        while not stop.is_set():
            now = status()
            p = peaks.setdefault(phase[-1], {})
            for k, v in now.items():
                p[k] = max(p.get(k, 0.0), v)
            time.sleep(0.01)

    def in_phase(name, fn):
        def wrapped(*a, **k):
            phase.append(name)
            try:
                return fn(*a, **k)
            finally:
                phase.pop()
        return wrapped

    class Stub:  # what the stage asks of a cross-encoder besides scoring
        activation_fn = None
        num_labels = 1
        max_length = 128

    def fake_scores(model, pairs, **kw):
        return np.fromiter((0.01 * len(q) - 0.001 * len(t) + (hash(t) % 1000) / 1000 for q, t in pairs),
                           np.float32, count=len(pairs))

    engine.score_pairs = fake_scores
    score._Ctx.model = property(lambda self: Stub())
    score._prepare = in_phase("prepare", score._prepare)
    score.PairCache.lookup = in_phase("cache_lookup", score.PairCache.lookup)
    score._work = in_phase("score_chunks", score._work)
    score._merge = in_phase("merge", score._merge)
    cfg = compose([*overrides(work, per_query, chunk), f"force={str(force).lower()}"])
    thread = threading.Thread(target=sample, daemon=True)
    baseline = status()
    thread.start()
    t0 = time.perf_counter()
    folder = score.run(cfg)
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    from pipeline.artifacts import read_manifest

    manifest = read_manifest(folder)
    return {"pairs": manifest["counts"]["pairs"], "pairs_scored": manifest["counts"]["pairs_scored"],
            "pairs_from_cache": manifest["counts"]["pairs_from_cache"], "seconds": round(seconds, 1),
            "baseline_mb": {k: round(v, 1) for k, v in baseline.items()},
            "peak_mb": {ph: {k: round(v, 1) for k, v in p.items()} for ph, p in peaks.items()},
            "scores_parquet_mb": round((folder / "scores.parquet").stat().st_size / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=20_000)
    ap.add_argument("--per-query", type=int, default=100)
    ap.add_argument("--corpus", type=int, default=200_000)
    ap.add_argument("--chunk", type=int, default=20_000)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated data and artifacts")
    ap.add_argument("--_measure", choices=["cold", "warm"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        print(json.dumps(measure(args.workdir, args.per_query, args.chunk, force=args._measure == "warm")))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_score-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = generate(work, args.queries, args.per_query, args.corpus)
    prepare(work, args.per_query, args.chunk)
    info["generate_s"] = round(time.perf_counter() - t0, 1)
    results = {"setup": info}
    for run in ("cold", "warm"):
        proc = subprocess.run([sys.executable, __file__, "--_measure", run, "--workdir", str(work),
                               "--per-query", str(args.per_query), "--chunk", str(args.chunk)],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"{run} run failed:\n{proc.stderr[-3000:]}")
        results[run] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[run]
        anon = max(p.get("RssAnon", 0.0) for p in r["peak_mb"].values())
        print(f"{run}: {r['pairs']:,} pairs in {r['seconds']} s; peak RssAnon {anon:.0f} MB "
              f"({(anon - r['baseline_mb']['RssAnon']) * 2**20 / r['pairs']:.0f} B/pair over the "
              f"{r['baseline_mb']['RssAnon']:.0f} MB after imports); per phase (MB): "
              + ", ".join(f"{ph} {p.get('RssAnon', 0):.0f}/{p.get('VmRSS', 0):.0f}" for ph, p in r["peak_mb"].items()),
              flush=True)
    out = work / "bench_score.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")
    if not args.keep:
        keep = Path(tempfile.gettempdir()) / f"bench_score-{args.queries}.json"
        shutil.copy(out, keep)
        shutil.rmtree(work, ignore_errors=True)
        print(f"(data removed; results kept at {keep})")


if __name__ == "__main__":
    main()
