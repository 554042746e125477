"""Scale check of the mining chain's CPU-side work, each measurement in a fresh process (peak RSS is the process's
own ru_maxrss, data generation excluded):

  mine    500k queries x 50 scored candidates (+ positives) in a scores.parquet -> build_pool, select, and the
          outputs (pools.parquet, hard_negatives.jsonl, report.json/.png; triplets need passage texts and are
          left out). Duplicate-text hashes are synthetic (pids 2i and 2i+1 share a text).
  search  exact top-100 of random queries over a 1M x 768 float16 memory-mapped .npy (pipeline.search, torch
          backend) -- the retrieve stage's search step.

    python scripts/bench_mine.py                   # both, in <tmp>; prints a table and writes bench_mine.json
    python scripts/bench_mine.py mine --queries 50000 --keep
    python scripts/bench_mine.py search --rows 1000000 --search-queries 1000

The default test suite never runs this (it takes minutes and several GB of disk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------- generation


def gen_scores(path: Path, n_queries: int, per_query: int, corpus_size: int, seed: int = 0) -> dict:
    """A scores.parquet like the score stage writes: per query `per_query` candidates (rank order) with one
    positive (10% of queries two), 60% of positives among the candidates."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([("qid", pa.string()), ("pid", pa.string()), ("ce_score", pa.float32()),
                        ("is_positive", pa.bool_()), ("rank", pa.int32())])
    rows = 0
    stride = corpus_size // per_query
    with pq.ParquetWriter(str(path), schema, compression="zstd") as writer:
        for lo in range(0, n_queries, 50_000):
            nq = min(50_000, n_queries - lo)
            q = np.arange(lo, lo + nq)
            pids = (rng.integers(0, corpus_size, nq)[:, None] + np.arange(per_query) * stride) % corpus_size
            ranks = np.broadcast_to(np.arange(1, per_query + 1, dtype=np.int32), (nq, per_query))
            ce = (rng.normal(-2.0, 3.0, (nq, per_query)) + 4 * np.exp(-ranks / 10)).astype(np.float32)
            is_pos = np.zeros((nq, per_query), bool)
            retrieved = rng.random(nq) < 0.6
            at = rng.integers(0, per_query, nq)
            is_pos[np.flatnonzero(retrieved), at[retrieved]] = True
            # 10% of those queries also retrieve a passage with the positive's text under another pid
            # (the synthetic texts are shared by pids 2i and 2i+1, see run_mine)
            dup = np.flatnonzero(retrieved & (rng.random(nq) < 0.1))
            pids[dup, (at[dup] + 1) % per_query] = pids[dup, at[dup]] ^ 1
            ce[is_pos] = rng.normal(6.0, 2.0, int(is_pos.sum())).astype(np.float32)
            # unretrieved positives: one for the others, a second one for 10% of all queries
            extra_q = np.concatenate([q[~retrieved], q[rng.random(nq) < 0.1]])
            extra_p = rng.integers(0, corpus_size, len(extra_q))
            qq = np.concatenate([np.repeat(q, per_query), extra_q])
            order = np.argsort(qq, kind="stable")
            qid = np.char.mod("%d", 1_000_000 + qq[order])
            pid = np.char.mod("%d", np.concatenate([pids.reshape(-1), extra_p])[order])
            table = pa.table({
                "qid": pa.array(qid.astype(object), pa.string()), "pid": pa.array(pid.astype(object), pa.string()),
                "ce_score": pa.array(np.concatenate([ce.reshape(-1), rng.normal(6.0, 2.0, len(extra_q))
                                                     .astype(np.float32)])[order]),
                "is_positive": pa.array(np.concatenate([is_pos.reshape(-1), np.ones(len(extra_q), bool)])[order]),
                "rank": pa.array(np.concatenate([ranks.reshape(-1), np.zeros(len(extra_q), np.int32)])[order],
                                 pa.int32(), mask=np.concatenate([np.zeros(nq * per_query, bool),
                                                                  np.ones(len(extra_q), bool)])[order]),
            }, schema=schema)
            writer.write_table(table)
            rows += table.num_rows
    return {"rows": rows, "bytes": path.stat().st_size}


def gen_embeddings(path: Path, rows: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    mm = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float16, shape=(rows, dim))
    for lo in range(0, rows, 100_000):
        x = rng.standard_normal((min(100_000, rows - lo), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        mm[lo:lo + len(x)] = x.astype(np.float16)
    mm.flush()
    del mm


# --------------------------------------------------------------------------------------------- measurements


def run_mine(scores: Path, n_queries: int, out: Path) -> dict:
    import pyarrow.parquet as pq

    from pipeline.stages.mine import Rules, _splitmix64, build_pool, select, write_outputs

    t0 = time.perf_counter()
    n_rows = pq.ParquetFile(str(scores)).metadata.num_rows
    query_order = [str(1_000_000 + i) for i in range(n_queries)]
    t_read = time.perf_counter()

    def synthetic_hash(vocab):  # pids 2i and 2i+1 have the same text
        ints = vocab.cast("int64").to_numpy()
        return _splitmix64((ints >> 1).astype(np.uint64))

    pool, vocab = build_pool([scores], query_order, synthetic_hash)  # read column by column, as the stage does
    t_pool = time.perf_counter()
    rules = Rules()
    sel = select(pool, rules)
    t_select = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    report = write_outputs(out, pool, sel, query_order, vocab, ["bench-v2"], rules)
    t_write = time.perf_counter()
    return {"scored_rows": n_rows, "candidates": len(pool.cand_q), "queries": n_queries,
            "kept_queries": report["queries"]["kept"], "negatives": report["negatives"]["total"],
            "dropped": report["queries"]["dropped"],
            "removed_by_rule": {k: v["first"] for k, v in report["removed_by_rule"].items()},
            "seconds": {"build_pool": round(t_pool - t_read, 2),
                        "select": round(t_select - t_pool, 2), "write_outputs": round(t_write - t_select, 2),
                        "total": round(t_write - t0, 2)},
            "output_bytes": {f.name: f.stat().st_size for f in out.iterdir() if f.is_file()},
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def _rss_parts() -> dict[str, float]:
    """Current anonymous vs file-backed resident memory (MB): mapped corpus pages count in RSS but are page
    cache the kernel can drop, anonymous memory is not."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon", "RssFile")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) / 1024
    return out


def run_search(emb_path: Path, n_queries: int, k: int, device: str = "cpu") -> dict:
    import threading

    import torch

    from pipeline.search import LAST_SEARCH, search

    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            for key, value in _rss_parts().items():
                peaks[key] = max(peaks[key], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    emb = np.load(str(emb_path), mmap_mode="r")
    rng = np.random.default_rng(1)
    q = rng.standard_normal((n_queries, emb.shape[1]), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    _, idx = search(q, emb, k, backend="torch", device=device, show_progress=False)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    # exactness spot check on the first queries
    check = 4
    ref = np.asarray(emb, dtype=np.float32) @ q[:check].T if emb.shape[0] <= 200_000 else None
    ok = None
    if ref is not None:
        ok = bool(all(set(np.argsort(-ref[:, i])[:k]) == set(idx[i]) for i in range(check)))
    return {"corpus": list(emb.shape), "dtype": str(emb.dtype), "queries": n_queries, "k": k, "device": device,
            "seconds": round(wall, 2), "queries_per_s": round(n_queries / wall, 1),
            "gflops": round(2 * n_queries * emb.shape[0] * emb.shape[1] / wall / 1e9, 1),
            "threads": torch.get_num_threads(), "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_before_search_mb": round(rss_before, 1), "exact_check": ok,
            "peak_rss_anon_mb": round(peaks["RssAnon"], 1), "peak_rss_file_mb": round(peaks["RssFile"], 1),
            "search_facts": {k_: v for k_, v in LAST_SEARCH.items() if isinstance(v, (int, float, str, bool))}}


# --------------------------------------------------------------------------------------------- driver


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args, "--json"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in meminfo if line.startswith("MemTotal")), None)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mb": mem, "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="all",
                    choices=["all", "mine", "search", "gen-scores", "gen-emb", "_mine", "_search"])
    ap.add_argument("--queries", type=int, default=500_000)
    ap.add_argument("--per-query", type=int, default=50)
    ap.add_argument("--corpus-size", type=int, default=8_841_823)
    ap.add_argument("--rows", type=int, default=1_000_000, help="embedding rows for the search benchmark")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--search-queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--device", default="cpu", help="search device: cpu | cuda | auto")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--out", type=Path, default=Path("bench_mine.json"))
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.what == "gen-scores":
        print(json.dumps(gen_scores(args.dir / "scores.parquet", args.queries, args.per_query, args.corpus_size)))
        return
    if args.what == "gen-emb":
        gen_embeddings(args.dir / "emb.f16.npy", args.rows, args.dim)
        print(json.dumps({"rows": args.rows, "dim": args.dim}))
        return
    if args.what == "_mine":
        print(json.dumps(run_mine(args.dir / "scores.parquet", args.queries, args.dir / "mine_out")))
        return
    if args.what == "_search":
        print(json.dumps(run_search(args.dir / "emb.f16.npy", args.search_queries, args.k, args.device)))
        return

    work = args.dir or Path(tempfile.mkdtemp(prefix="bench_mine-"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--dir", str(work), "--queries", str(args.queries), "--per-query", str(args.per_query),
              "--corpus-size", str(args.corpus_size), "--rows", str(args.rows), "--dim", str(args.dim),
              "--search-queries", str(args.search_queries), "--k", str(args.k), "--device", args.device]
    result: dict = {"machine": machine()}
    try:
        if args.what in ("all", "mine"):
            t = time.perf_counter()
            result["mine_data"] = _child(["gen-scores", *common])
            result["mine_data"]["generate_s"] = round(time.perf_counter() - t, 1)
            result["mine"] = _child(["_mine", *common])
            print(f"mine: {result['mine']['scored_rows']:,} scored rows ({args.queries:,} queries x "
                  f"{args.per_query}) in {result['mine']['seconds']['total']} s, peak RSS "
                  f"{result['mine']['peak_rss_mb']:.0f} MB  {result['mine']['seconds']}", flush=True)
        if args.what in ("all", "search"):
            t = time.perf_counter()
            _child(["gen-emb", *common])
            result["search_data_generate_s"] = round(time.perf_counter() - t, 1)
            result["search"] = _child(["_search", *common])
            s = result["search"]
            print(f"search: {args.search_queries:,} queries x {args.rows:,} x {args.dim} float16 memmap, top-{args.k}:"
                  f" {s['seconds']} s ({s['queries_per_s']} q/s, {s['gflops']} GFLOP/s, {s['threads']} threads),"
                  f" peak RSS {s['peak_rss_mb']:.0f} MB (sampled peaks: anonymous {s['peak_rss_anon_mb']:.0f} MB,"
                  f" mapped file {s['peak_rss_file_mb']:.0f} MB)", flush=True)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
