"""Exact top-k inner-product search (torch, CPU or GPU) and faiss backends.

Inputs are already normalised when cosine similarity is wanted: everything here is an inner product. They must be
finite (the stages refuse NaN or infinite embeddings before they get here: pipeline.stages.common.check_finite).

``exact_search`` streams the corpus in chunks (a float16 ``np.memmap`` larger than RAM is fine: each chunk is read,
used and released), multiplies each chunk with blocks of queries, keeps a per-chunk top-k and merges it into a
running top-k held on the compute device; a corpus resident on the device is walked inside each query block instead,
with one merge of all chunks' candidates per block. Results are copied to the host once at the end. Ties are broken
by the lower corpus index.

On CUDA the corpus is uploaded once in fp16 (kept resident when it fits in half the free memory, else streamed
chunk by chunk from pinned buffers filled by a reader thread), queries are fp16 blocks, scores come out of one
fp16 GEMM per (query block, corpus chunk), and the per-chunk top-k is a two-stage exact selection: the maxima of
strided column groups pick the only groups that can hold a top-k element, and ``torch.topk`` runs over those
groups only (one read of the score block instead of the several passes of a radix select over 262,144 columns).
When the corpus is resident the final candidates (k + ``tie_margin``) are re-scored in fp32 and re-ordered, so
scores and order match an fp32 search. On the CPU everything is fp32 with score blocks of at most 256 MB.
"""

from __future__ import annotations

import logging
import mmap
import queue
import threading
import time
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["exact_search", "faiss_search", "search", "LAST_SEARCH"]

#: facts about the last exact_search call (device, dtype, chunking, timings); read by the bench script.
LAST_SEARCH: dict[str, Any] = {}

# columns per strided group: one 4096 x 262,144 fp16 block on an H200 took 1.57 ms (32), 1.73 (64), 1.92 (128),
# 2.36 (256) against 7.55 for torch.topk; over 500k x 8.84M: 26.6k (32) / 24.9k (64) queries/s (session 6)
_GROUP = 32
_CPU_BLOCK_BYTES = 256 * 2**20


def _resolve_device(device: str, queries) -> torch.device:
    if isinstance(queries, torch.Tensor) and queries.device.type != "cpu" and device == "auto":
        return queries.device
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    from pipeline.models import precision_name

    d = precision_name(dtype)
    if d == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[d]


def _release_pages(arr, start_row: int, end_row: int) -> None:
    """Drop the pages that hold only rows [start_row, end_row) of a memmap from this process's resident set (they
    stay in the page cache): what keeps a corpus larger than RAM searchable. Not for a copy-on-write map (mode
    "c"): there dropping a page discards the edits made to it in memory. Positions come from the array's own data
    address, so a slice of a memmap (which carries its parent's ``offset``) releases its own rows."""
    mm = getattr(arr, "_mmap", None)
    if not isinstance(arr, np.memmap) or arr.mode == "c" or not isinstance(mm, mmap.mmap) or \
            not arr.flags.c_contiguous or end_row <= start_row:
        return
    try:
        base = np.frombuffer(mm, dtype=np.uint8).__array_interface__["data"][0]
        first = arr.__array_interface__["data"][0] - base
        row_bytes = arr.strides[0] if arr.ndim else arr.itemsize
        page = mmap.PAGESIZE
        a = -(-(first + start_row * row_bytes) // page) * page  # inward: pages shared with other rows stay
        b = min(len(mm), (first + end_row * row_bytes) // page * page)
        if b > a:
            mm.madvise(mmap.MADV_DONTNEED, a, b - a)
    except (ValueError, OSError, TypeError):  # pragma: no cover - a closed map, a platform without madvise
        pass


def _merge(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor, keep: int):
    """Merge two candidate sets; order by score descending, then corpus index ascending."""
    cs = torch.cat([best_s, s], dim=1)
    ci = torch.cat([best_i, i], dim=1)
    # placeholders (-inf, -1) sort last
    ci_key = torch.where(ci < 0, torch.iinfo(torch.int64).max, ci)
    o = torch.argsort(ci_key, dim=1)
    cs = torch.gather(cs, 1, o)
    ci = torch.gather(ci, 1, o)
    o = torch.sort(cs, dim=1, descending=True, stable=True).indices[:, :keep]
    return torch.gather(cs, 1, o), torch.gather(ci, 1, o)


def _topk_exact_ties(S: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row with ties at the k-th value broken by the lower column (CPU path)."""
    C = S.shape[1]
    if k >= C:
        v, i = torch.sort(S, dim=1, descending=True, stable=True)
        return v, i
    v, i = torch.topk(S, k, dim=1)
    # rows whose k-th value is shared with elements left out: which of them were kept is arbitrary
    bad = torch.nonzero((S >= v[:, -1:]).sum(1) > k).flatten()
    if bad.numel():
        v2, i2 = torch.sort(S[bad], dim=1, descending=True, stable=True)
        v[bad], i[bad] = v2[:, :k], i2[:, :k]
    return v, i


def _topk_grouped(S: torch.Tensor, k: int, group: int = _GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k via group maxima: the k groups with the largest maxima hold every element of the top k
    (the k-th largest group maximum is a lower bound of the k-th largest element).

    Group g is the strided column set {g, g + ng, g + 2 ng, ...} (ng = columns // group): its maximum is a reduction
    over the outer axis of a [rows, group, ng] view, which reads the score block once, coalesced. (Groups of
    adjacent columns reduce over a short inner axis: 4.95 ms for the maxima of one 4096 x 262,144 fp16 block on an
    H200, about ten times a single read of its 2 GB; the strided form took 0.78 ms there, 2.6 TB/s, in session 12.)
    The passes on such a block in session 12: group maxima 0.78 ms, top-k of the maxima 0.34 ms, gather and top-k of
    the candidates 0.43 ms; picking the maxima's top-k by grouping them too was slower (1.65 ms in all vs 1.59)."""
    qb, C = S.shape
    ng = C // group
    if ng <= k:
        return torch.topk(S, min(k, C), dim=1)
    main = ng * group
    S3 = S[:, :main].view(qb, group, ng)
    gmax = S3.amax(dim=1)  # [qb, ng]
    gi = torch.topk(gmax, k, dim=1, sorted=False).indices  # [qb, k]
    cand = torch.gather(S3, 2, gi.unsqueeze(1).expand(qb, group, k)).reshape(qb, group * k)
    if main < C:
        cand = torch.cat([cand, S[:, main:]], dim=1)
    v, p = torch.topk(cand, k, dim=1)
    in_main = p < group * k
    pm = torch.where(in_main, p, 0)
    cols = (pm // k) * ng + torch.gather(gi, 1, pm % k)
    cols = torch.where(in_main, cols, p - group * k + main)
    return v, cols


def _topk_from_group_max(S: torch.Tensor, gmax: torch.Tensor, k: int, group: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``S`` given the maxima of its groups of ``group`` adjacent columns (``gmax``, the last group
    possibly cut short), as pipeline.kernels computes them in the GEMM's epilogue: the k groups with the largest
    maxima hold every element of the top k; only their columns are gathered."""
    C = S.shape[1]
    if gmax.shape[1] <= k:
        return torch.topk(S, min(k, C), dim=1)
    cand, cols = _group_columns(S, torch.topk(gmax, k, dim=1, sorted=False).indices, group)
    v, p = torch.topk(cand, k, dim=1)
    return v, torch.gather(cols, 1, p)


def _group_columns(S: torch.Tensor, gi: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores and column numbers of the groups ``gi`` [rows, n] of ``group`` adjacent columns of ``S``, each
    [rows, n * group]; columns past the end (a cut last group) score -inf."""
    C = S.shape[1]
    cols = (gi.unsqueeze(-1) * group + torch.arange(group, device=S.device)).flatten(1)
    inside = cols < C
    return torch.gather(S, 1, cols.clamp(max=C - 1)).masked_fill(~inside, float("-inf")), cols


def _topk_pruned(S: torch.Tensor, k: int, thr: torch.Tensor, group: int | None = None):
    """Exact top-k of the elements that can still enter a running top-k whose admission threshold is ``thr``
    (the score of the last kept candidate, per row): only the few groups with the largest maxima are examined;
    rows where a group outside them could still hold an element above ``thr`` are redone with
    :func:`_topk_grouped` (this needs one host synchronisation per call). Elements not above ``thr`` may be
    returned or not: the merge drops them."""
    group = group or _GROUP
    qb, C = S.shape
    ng = C // group
    kk = max(16, 2 * ((k + group - 1) // group))
    if ng <= 2 * kk or kk * group < k:
        return _topk_grouped(S, k, group)
    main = ng * group
    S3 = S[:, :main].view(qb, ng, group)
    gmax = S3.amax(dim=2)
    gv, gi = torch.topk(gmax, kk, dim=1)
    cand, cols = _group_columns(S, gi, group)
    if main < C:
        cand = torch.cat([cand, S[:, main:]], dim=1)
        cols = torch.cat([cols, torch.arange(main, C, device=S.device).expand(qb, C - main)], dim=1)
    v, p = torch.topk(cand, k, dim=1)
    i = torch.gather(cols, 1, p)
    bad = torch.nonzero(gv[:, -1].float() > thr).flatten()
    if bad.numel():
        vb, ib = _topk_grouped(S[bad], k, group)
        v[bad], i[bad] = vb, ib
    return v, i


def _chunk_topk(S: torch.Tensor, k: int, method: str, thr: torch.Tensor | None = None, group: int | None = None):
    if method == "exact_ties":
        return _topk_exact_ties(S, k)
    if method == "grouped":
        return _topk_grouped(S, k, group or _GROUP)
    if method == "pruned":
        if thr is None:
            return _topk_grouped(S, k, group or _GROUP)
        return _topk_pruned(S, k, thr, group)
    return torch.topk(S, min(k, S.shape[1]), dim=1)


def _candidates(Qb: torch.Tensor, chunk: torch.Tensor, c0: int, kc: int, method: str, thr: torch.Tensor | None,
                group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A query block's top-``kc`` candidates in one corpus chunk starting at row ``c0``: (float32 scores, corpus
    rows). The score matrix lives only inside this call."""
    if method == "fused":  # scores and group maxima from one kernel (pipeline/kernels.py)
        from pipeline import kernels

        group = group or kernels.GROUP
        S, gmax = kernels.scores_and_group_max(Qb, chunk, group)
        v, i = _topk_from_group_max(S, gmax, kc, group)
        return v.float(), i + c0
    v, i = _chunk_topk(Qb @ chunk.T, kc, method, thr, group)
    return v.float(), i + c0


def _block_top(Qb: torch.Tensor, resident: torch.Tensor, bounds: list, keep: int, few: int, method: str,
               group: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One query block's top ``keep`` over every chunk of a resident corpus, from each chunk's top ``few``
    candidates merged once: (scores, rows, cut) where ``cut`` is, per query, the highest last-kept score of the
    chunks that kept fewer rows than they have (None where every chunk kept all it could give: nothing was cut).
    A query whose final ``keep``-th score is above its cut lost nothing to the cuts."""
    parts = [_candidates(Qb, resident[c0:c1], c0, min(few, c1 - c0), method, None, group) for c0, c1 in bounds]
    cs, ci = torch.cat([v for v, _ in parts], dim=1), torch.cat([i for _, i in parts], dim=1)
    top_s, top_i = _merge(cs[:, :0], ci[:, :0], cs, ci, keep)
    cuts = [v.amin(dim=1) for (v, _), (c0, c1) in zip(parts, bounds) if c1 - c0 > few and few < keep]
    cut = torch.stack(cuts, dim=1).amax(dim=1) if cuts else None
    return top_s, top_i, cut


def _put(q: "queue.Queue", item, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has stopped (it may have failed with the queue full): False then."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _chunk_reader(corpus, bounds, dtype: torch.dtype, pin: bool, q: "queue.Queue", stop: threading.Event):
    try:
        for c0, c1 in bounds:
            if stop.is_set():
                return
            np_dtype = np.float16 if dtype == torch.float16 else np.float32
            t = torch.from_numpy(np.array(corpus[c0:c1], dtype=np_dtype, copy=True)).to(dtype)
            if isinstance(corpus, np.memmap):
                _release_pages(corpus, c0, c1)
            if pin:
                t = t.pin_memory()
            if not _put(q, (c0, c1, t), stop):
                return
        _put(q, None, stop)
    except BaseException as exc:  # forwarded
        _put(q, exc, stop)


def exact_search(
    queries: np.ndarray | torch.Tensor,
    corpus: np.ndarray | torch.Tensor,
    k: int,
    *,
    device: str = "auto",
    corpus_chunk: int = 262144,
    query_chunk: int = 4096,
    dtype: str = "auto",
    show_progress: bool = True,
    rescore: bool | None = None,
    topk_method: str = "auto",
    tie_margin: int = 8,
    topk_group: int | None = None,
    merge: str = "auto",
    chunk_keep: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of every query over ``corpus``.

    Returns (scores float32 [nq, k] descending, indices int64 [nq, k] rows of ``corpus``), k clamped to the
    corpus size. ``corpus`` may be a float16/float32 array, an ``np.memmap`` bigger than RAM, or a torch tensor
    (on the compute device it is used in place). ``dtype`` "auto": fp16 on CUDA, fp32 on CPU. ``rescore``
    (default: when computing in half precision with the corpus resident on the GPU): recompute the final
    candidates' scores in fp32 and re-order. ``topk_method``: "auto" (grouped on CUDA, exact-ties on CPU),
    "grouped", "pruned" (grouped, examining after the first chunk only the groups that can beat the running top-k;
    one host sync per block; 8.8k against 25.6k queries/s for grouped on an H200 in session 12), "topk",
    "exact_ties", "fused" (the scores and the maxima of groups of adjacent columns from one Triton kernel,
    pipeline/kernels.py; CUDA, fp16; not yet measured on a GPU); ``topk_group``: columns per group of "grouped",
    "pruned" and "fused". Ties: broken by lower index exactly on CPU; on CUDA exactly unless more than
    ``tie_margin`` + 1 corpus rows of one chunk share the k-th score. ``merge``: "once" walks the corpus chunks inside
    each query block and merges all their candidates once per block; "each" merges every chunk's candidates into the
    running top-k (the only order for a streamed corpus, and what "pruned" needs); "auto": "once" where the
    corpus is resident on the device and the method is not "pruned". Both give the same result.
    ``chunk_keep`` (merge "once" only): candidates kept per (query block, corpus chunk), instead of all k +
    ``tie_margin``; the final k-th score of each query is then checked against every chunk's last kept score, and
    the queries where a chunk may have held more of their top k than it kept are searched again with every
    candidate kept (their whole query block, so that scores round as in the first pass; one host synchronisation
    per query block), so the result is the same. The top k of 8.84M
    passages holds ~3 of each 262,144-row chunk: keeping 16 instead of 108 shrinks the gather, the last top-k and
    the merge six-fold (not yet measured on a GPU: scripts/bench_gpu.py's "/16" probe).
    """
    t_start = time.perf_counter()
    dev = _resolve_device(device, queries)
    cdt = _resolve_dtype(dtype, dev)
    cuda = dev.type == "cuda"
    nq = int(queries.shape[0])
    N = int(corpus.shape[0])
    d = int(corpus.shape[1]) if corpus.ndim == 2 else 0
    if queries.ndim != 2 or (N and queries.shape[1] != d):
        raise ValueError(f"queries {tuple(queries.shape)} and corpus {tuple(corpus.shape)} do not match")
    k_eff = int(min(k, N))
    if nq == 0 or k_eff <= 0:
        return np.zeros((nq, max(k_eff, 0)), np.float32), np.zeros((nq, max(k_eff, 0)), np.int64)
    if topk_method == "auto":
        topk_method = "grouped" if cuda else "exact_ties"
    if topk_method == "fused":
        from pipeline import kernels

        if not kernels.available(dev) or cdt != torch.float16:
            raise ValueError("topk_method='fused' needs Triton, a CUDA device and fp16 scores "
                             f"(here: device {dev}, dtype {cdt}, Triton {'present' if kernels.triton else 'absent'})")
    keep = min(N, k_eff + (tie_margin if topk_method != "exact_ties" else 0))

    # ---- queries on the device
    q_in = queries if isinstance(queries, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(queries))
    Q = q_in.to(dev, dtype=cdt, non_blocking=True)
    # ---- corpus: resident on the device, or streamed
    corpus_is_dev_tensor = isinstance(corpus, torch.Tensor) and corpus.device == dev
    if cuda:
        corpus_chunk = max(1, int(corpus_chunk))
        query_chunk = max(1, int(query_chunk))
    else:
        corpus_chunk = max(1, min(int(corpus_chunk), 65536))
        query_chunk = max(1, min(int(query_chunk), _CPU_BLOCK_BYTES // (4 * corpus_chunk)))
    resident: torch.Tensor | None = None
    if corpus_is_dev_tensor:
        resident = corpus if corpus.dtype == cdt else None
    if cuda and resident is None:
        need = N * d * torch.finfo(cdt).bits // 8
        free = torch.cuda.mem_get_info(dev)[0]
        if need <= 0.5 * free:
            resident = torch.empty((N, d), dtype=cdt, device=dev)
            for c0 in range(0, N, corpus_chunk):
                c1 = min(N, c0 + corpus_chunk)
                src = corpus[c0:c1]
                src = src if isinstance(src, torch.Tensor) else torch.from_numpy(np.array(src, copy=True))
                resident[c0:c1].copy_(src.to(cdt).pin_memory() if src.device.type == "cpu" else src, non_blocking=True)
                if isinstance(corpus, np.memmap):
                    _release_pages(corpus, c0, c1)
    if rescore is None:
        rescore = cdt != torch.float32 and resident is not None
    Q32 = None
    if rescore:
        Q32 = q_in.to(dev, dtype=torch.float32, non_blocking=True) if cdt != torch.float32 else Q

    best_s = torch.full((nq, keep), float("-inf"), dtype=torch.float32, device=dev)
    best_i = torch.full((nq, keep), -1, dtype=torch.int64, device=dev)
    bounds = [(c0, min(N, c0 + corpus_chunk)) for c0 in range(0, N, corpus_chunk)]

    if merge not in ("auto", "once", "each"):
        raise ValueError(f"merge must be auto, once or each, not {merge!r}")
    once = resident is not None and topk_method != "pruned" and merge != "each"
    few = min(keep, max(1, int(chunk_keep))) if chunk_keep else keep
    if sum(min(few, c1 - c0) for c0, c1 in bounds) < keep:  # too few chunks to give k candidates at that rate
        few = keep
    bar = None
    if show_progress:
        try:
            from tqdm.auto import tqdm

            bar = (tqdm(total=nq, desc="search", unit="query", smoothing=0.05) if once else
                   tqdm(total=N, desc="search", unit="doc", smoothing=0.05))
        except Exception:  # pragma: no cover
            bar = None

    stop = threading.Event()
    reader = None
    redone = 0
    if once:
        chunk_iter = iter(())  # the query-block loop below walks the resident chunks itself
    elif resident is not None:
        chunk_iter = ((c0, c1, resident[c0:c1]) for c0, c1 in bounds)
    elif isinstance(corpus, torch.Tensor):
        chunk_iter = ((c0, c1, corpus[c0:c1].to(dev, dtype=cdt)) for c0, c1 in bounds)
    else:
        rq: "queue.Queue" = queue.Queue(maxsize=2)
        reader = threading.Thread(target=_chunk_reader, args=(corpus, bounds, cdt, cuda, rq, stop), daemon=True)
        reader.start()

        def _gen():
            while True:
                item = rq.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                c0, c1, t = item
                yield c0, c1, t.to(dev, non_blocking=True)

        chunk_iter = _gen()

    try:
        with torch.inference_mode():
            if once:
                # one merge per query block over every chunk's candidates instead of one per (block, chunk):
                # identical result (the merge is an exact top-k under one total order), a few percent of the GEMM
                # time saved (each merge is several small sorts and gathers)
                for q0 in range(0, nq, query_chunk):
                    q1 = min(nq, q0 + query_chunk)
                    best_s[q0:q1], best_i[q0:q1], cut = _block_top(Q[q0:q1], resident, bounds, keep, few,
                                                                  topk_method, topk_group)
                    if cut is not None:  # queries whose top k a chunk may have held more of than it kept
                        redo = torch.nonzero(best_s[q0:q1, keep - 1] <= cut).flatten()
                        if redo.numel():
                            # the whole block again, keeping every candidate: a GEMM over only the redone rows
                            # rounds differently, which can swap near-equal scores (rare: ~1e-7 per chunk for
                            # random vectors at 16 of 108)
                            full_s, full_i, _ = _block_top(Q[q0:q1], resident, bounds, keep, keep, topk_method,
                                                           topk_group)
                            best_s[redo + q0], best_i[redo + q0] = full_s[redo], full_i[redo]
                            redone += int(redo.numel())
                    if bar is not None:
                        bar.update(q1 - q0)
            for c0, c1, chunk in chunk_iter:
                kc = min(keep, c1 - c0)
                for q0 in range(0, nq, query_chunk):
                    q1 = min(nq, q0 + query_chunk)
                    thr = best_s[q0:q1, keep - 1] if (topk_method == "pruned" and c0 > 0 and kc == keep) else None
                    v, i = _candidates(Q[q0:q1], chunk, c0, kc, topk_method, thr, topk_group)
                    best_s[q0:q1], best_i[q0:q1] = _merge(best_s[q0:q1], best_i[q0:q1], v, i, keep)
                if bar is not None:
                    bar.update(c1 - c0)
            if rescore and resident is not None:
                for q0 in range(0, nq, query_chunk):
                    q1 = min(nq, q0 + query_chunk)
                    idx = best_i[q0:q1]
                    rows = resident[idx.reshape(-1)].view(q1 - q0, keep, d).float()
                    exact = torch.bmm(rows, Q32[q0:q1].unsqueeze(-1)).squeeze(-1)
                    best_s[q0:q1], best_i[q0:q1] = _merge(
                        exact[:, :0], idx[:, :0], exact, idx, keep
                    )
            out_s = best_s[:, :k_eff].cpu().numpy().astype(np.float32, copy=False)
            out_i = best_i[:, :k_eff].cpu().numpy().astype(np.int64, copy=False)
    finally:
        stop.set()
        if reader is not None:
            reader.join(timeout=5)
        if bar is not None:
            bar.close()
    LAST_SEARCH.clear()
    LAST_SEARCH.update(
        device=str(dev), dtype=str(cdt).replace("torch.", ""), nq=nq, n=N, k=k_eff, corpus_chunk=corpus_chunk,
        query_chunk=query_chunk, resident=resident is not None, rescore=bool(rescore), topk_method=topk_method,
        merge="once" if once else "each", chunk_keep=few if once else None, queries_redone=redone,
        wall_s=time.perf_counter() - t_start,
    )
    return out_s, out_i


def _sort_rows(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by score descending, then index ascending (missing results -1 last)."""
    key_i = np.where(I < 0, np.iinfo(np.int64).max, I)
    o = np.lexsort((key_i, -D), axis=1) if D.size else np.zeros_like(I)
    return np.take_along_axis(D, o, 1), np.take_along_axis(I, o, 1)


def faiss_search(
    queries,
    corpus,
    k: int,
    *,
    index: str = "flat",
    nlist: int = 4096,
    nprobe: int = 64,
    use_gpu: bool | str = "auto",
    add_chunk: int = 262144,
) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top-k with faiss (``index`` "flat" exact, "ivf" approximate). Same outputs as
    :func:`exact_search`. faiss is optional: ImportError with a hint when it is missing."""
    try:
        import faiss  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(
            "faiss is not installed: pip install faiss-cpu (or faiss-gpu-cu12), or use search backend 'torch'"
        ) from exc
    q = queries.detach().float().cpu().numpy() if isinstance(queries, torch.Tensor) else np.asarray(queries)
    q = np.ascontiguousarray(q, dtype=np.float32)
    N, d = int(corpus.shape[0]), int(corpus.shape[1])
    k_eff = int(min(k, N))
    if q.shape[0] == 0 or k_eff <= 0:
        return np.zeros((q.shape[0], max(k_eff, 0)), np.float32), np.zeros((q.shape[0], max(k_eff, 0)), np.int64)

    def rows(a, b):
        x = corpus[a:b]
        x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return np.ascontiguousarray(x, dtype=np.float32)

    if index == "flat":
        idx = faiss.IndexFlatIP(d)
    elif index == "ivf":
        nl = max(1, min(int(nlist), N // 39 if N >= 39 else 1))
        quantizer = faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFFlat(quantizer, d, nl, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        n_train = min(N, max(nl * 256, 10000))
        sample = np.sort(rng.choice(N, size=n_train, replace=False))
        train = np.ascontiguousarray(
            np.stack([np.asarray(corpus[int(j)], dtype=np.float32) for j in sample])
            if not isinstance(corpus, np.ndarray)
            else np.asarray(corpus[sample], dtype=np.float32)
        )
        idx.train(train)
        idx.nprobe = min(int(nprobe), nl)
    else:
        raise ValueError(f"index must be 'flat' or 'ivf', got {index!r}")
    want_gpu = (getattr(faiss, "get_num_gpus", lambda: 0)() > 0) if use_gpu == "auto" else bool(use_gpu)
    if want_gpu:
        if not hasattr(faiss, "index_cpu_to_all_gpus"):
            raise RuntimeError("this faiss build has no GPU support")
        idx = faiss.index_cpu_to_all_gpus(idx)
    for a in range(0, N, add_chunk):
        idx.add(rows(a, min(N, a + add_chunk)))
        if isinstance(corpus, np.memmap):
            _release_pages(corpus, a, min(N, a + add_chunk))
    # faiss keeps an arbitrary subset of the scores tied at rank k: ask for a margin more, then keep the lower rows
    D, I = idx.search(q, min(N, k_eff + 8))
    D, I = _sort_rows(D.astype(np.float32), I.astype(np.int64))
    return D[:, :k_eff], I[:, :k_eff]


def search(queries, corpus, k: int, *, backend: str = "torch", **kw) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch: ``torch`` (exact_search), ``faiss_flat``, ``faiss_ivf``."""
    if backend in ("torch", "exact"):
        return exact_search(queries, corpus, k, **kw)
    if backend in ("faiss_flat", "faiss"):
        return faiss_search(queries, corpus, k, index="flat", **kw)
    if backend == "faiss_ivf":
        return faiss_search(queries, corpus, k, index="ivf", **kw)
    raise ValueError(f"unknown search backend {backend!r}: torch | faiss_flat | faiss_ivf")
