"""`stage=mine`: hard negatives from scored candidates -> hard_negatives.jsonl, triplets/, pools.parquet, report.

Per query, a retrieved passage becomes a hard negative when it passes every enabled rule (each one off-able):

  positive          it is not a judged positive of the query (issue #1346: positives leaking into negatives)
  duplicate_text    its text, lower-cased with whitespace collapsed, differs from every positive's text
                    (MS MARCO has many exact duplicates under different pids)
  rank_window       rank_min <= bi-encoder rank <= rank_max
  ce_max_score      CE <= ce_max_score, on sigmoid(logit) when ce_max_score_scale=probability (RocketQA: 0.1),
                    on the raw logit when logit
  ce_score_margin   CE <= min CE(query, positive) - margin, in logits (the published v3/v4 script, margin 3.0)
  relative_margin   sigmoid(CE) <= (1 - relative_margin) * sigmoid(min CE(query, positive)): NV-Retriever's
                    TopK-PercPos, in sentence-transformers' convention (util.mine_hard_negatives: 0.05 = "at most 95%
                    of the positive"; a score above the threshold is removed, one on it kept). Defined on
                    probabilities so it stays meaningful whatever the logits' sign or scale; a ratio of raw logits
                    flips meaning when the positive's logit is negative.
then, system by system in `systems` order and within a system in retrieval order, the first
`num_negatives_per_system` survivors not already taken from an earlier system (the published script's loop), and
at most `max_negatives` in that pooled order. Queries without a positive, without candidates, or without a
surviving negative are dropped and counted by reason.

All of it is vectorised (numpy over integer codes of the Arrow columns; grouping by sorted query code and run
boundaries), so 25M scored candidates take minutes and a few GB; no Python loop runs per candidate.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pipeline import validate
from pipeline.artifacts import (
    StageError,
    atomic_path,
    atomic_write_json,
    config_key,
    is_complete,
    open_stage,
    read_manifest,
    require_complete,
)
from pipeline.config import plain
from pipeline.stages import common

log = logging.getLogger(__name__)

RULES = ("positive", "duplicate_text", "rank_window", "ce_max_score", "ce_score_margin", "relative_margin",
         "cross_system_duplicate", "per_system_cap", "max_negatives")
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


# --------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rules:
    exclude_positives: bool = True
    exclude_duplicate_text: bool = True
    rank_min: int | None = None
    rank_max: int | None = None
    ce_max_score: float | None = None
    ce_max_score_scale: str = "probability"
    ce_score_margin: float | None = 3.0
    relative_margin: float | None = None
    num_negatives_per_system: int | None = 5
    max_negatives: int | None = None

    def __post_init__(self) -> None:
        if self.ce_max_score_scale not in ("probability", "logit"):
            raise ValueError(f"mine.ce_max_score_scale must be probability or logit, got {self.ce_max_score_scale!r}")
        if self.ce_max_score is not None and self.ce_max_score_scale == "probability" \
                and not 0.0 <= self.ce_max_score <= 1.0:
            raise ValueError(f"mine.ce_max_score={self.ce_max_score} is a probability (ce_max_score_scale=probability) "
                             f"and must lie in [0, 1]; set ce_max_score_scale=logit for a logit ceiling")
        for name in ("rank_min", "rank_max", "num_negatives_per_system", "max_negatives"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"mine.{name} must be >= 1 or null, got {value}")
        if self.rank_min is not None and self.rank_max is not None and self.rank_max < self.rank_min:
            raise ValueError(f"mine.rank_max ({self.rank_max}) is below mine.rank_min ({self.rank_min})")
        if self.relative_margin is not None and not 0.0 <= self.relative_margin < 1.0:
            raise ValueError(f"mine.relative_margin must lie in [0, 1) (0.05: below 95% of the weakest positive's "
                             f"probability, sentence-transformers' convention), got {self.relative_margin}")
        if self.relative_margin is not None and self.relative_margin > 0.5:
            log.warning("mine.relative_margin=%s keeps only negatives below %.0f%% of the weakest positive's "
                        "probability (sentence-transformers' convention: NV-Retriever's 95%% is 0.05)",
                        self.relative_margin, 100 * (1 - self.relative_margin))
        if self.ce_score_margin is not None and not math.isfinite(self.ce_score_margin):
            raise ValueError(f"mine.ce_score_margin must be finite or null, got {self.ce_score_margin}")

    @classmethod
    def from_cfg(cls, section: Any) -> Rules:
        d = plain(section)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------------------------- the core


@dataclass
class Pool:
    """Scored candidates of every system as integer codes. Queries are codes into the training query order,
    passages codes into `pid_vocab`; `pid_hash` (optional) is the normalised-text hash of each passage code."""

    n_queries: int
    n_pids: int
    cand_q: np.ndarray      # int32
    cand_p: np.ndarray      # int32
    cand_rank: np.ndarray   # int32, 1-based
    cand_ce: np.ndarray     # float32 raw logit
    cand_sys: np.ndarray    # int8 index into the system names
    pos_q: np.ndarray       # int32
    pos_p: np.ndarray       # int32
    pos_ce: np.ndarray      # float32
    n_systems: int = 1
    pid_hash: np.ndarray | None = None  # uint64 per passage code


@dataclass
class Selection:
    neg: np.ndarray              # indices into the (sorted) pool candidates, in pooled order (query, system, rank)
    is_pos: np.ndarray           # per candidate: a judged positive of its query
    rejected: np.ndarray         # per candidate: neither a positive nor selected, of a query with positives
    kept: np.ndarray             # per query code: has positives and negatives
    reasons: dict[str, int]      # dropped queries by reason
    removed: dict[str, dict[str, int]]  # per rule: candidates it removed first in rule order / on its own
    likely_false_negatives: int
    likely_false_negative_queries: int
    neg_count: np.ndarray        # per query code
    min_pos: np.ndarray          # per query code (inf without positives)
    extra: dict[str, Any] = field(default_factory=dict)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    x += _GOLDEN
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _member(values: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    """values[i] in sorted_unique, by binary search (no hash set, no Python loop)."""
    if len(sorted_unique) == 0 or len(values) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_unique, values)
    np.minimum(pos, len(sorted_unique) - 1, out=pos)
    return sorted_unique[pos] == values


def _chunked(n: int, fn: Callable[[int, int], np.ndarray], size: int = 1 << 22) -> np.ndarray:
    """fn over row ranges of at most `size`, concatenated (bounds the temporaries of 64-bit key arithmetic)."""
    if n <= size:
        return fn(0, n)
    return np.concatenate([fn(lo, min(lo + size, n)) for lo in range(0, n, size)])


def rank_in_group(sorted_keys: np.ndarray) -> np.ndarray:
    """0-based position of each element within its run of equal keys (keys sorted)."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=change[1:])
    start = np.flatnonzero(change)
    return np.arange(n, dtype=np.int64) - np.repeat(start, np.diff(np.append(start, n)))


def _in_query_sets(q: np.ndarray, values: Callable[[int, int], np.ndarray], set_q: np.ndarray,
                   set_values: np.ndarray, nq: int, fallback: Callable[[], Callable[[int, int], np.ndarray]],
                   max_per_query: int = 32) -> np.ndarray:
    """values[i] is in the set of query q[i] (sets given as (set_q, set_values) pairs). Sets are small (a
    query's positives): one dense per-query lookup table per set position, gathered by q -- sequential reads
    instead of a binary search per row. When some query has a huge set, `fallback()` gives the row-range
    function to use instead (a binary search on keys)."""
    n = len(q)
    if len(set_q) == 0 or n == 0:
        return np.zeros(n, dtype=bool)
    order = np.argsort(set_q, kind="stable")
    sq, sv = set_q[order], set_values[order]
    pos_in = rank_in_group(sq)
    if int(pos_in.max()) + 1 > max_per_query:
        return _chunked(n, fallback())
    tables = []
    for j in range(int(pos_in.max()) + 1):
        at = pos_in == j
        table = np.zeros(nq, dtype=sv.dtype)
        has = np.zeros(nq, dtype=bool)
        table[sq[at]] = sv[at]
        has[sq[at]] = True
        tables.append((table, has))

    def block(lo: int, hi: int) -> np.ndarray:
        qq, vv = q[lo:hi], values(lo, hi)
        out = np.zeros(hi - lo, dtype=bool)
        for table, has in tables:
            out |= (table[qq] == vv) & has[qq]
        return out

    return _chunked(n, block)


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x.astype(np.float32)))).astype(np.float32)


def select(pool: Pool, rules: Rules) -> Selection:
    """Apply the rules; sorts the pool's candidate arrays in place by (query, system, rank)."""
    n, nq, S = len(pool.cand_q), pool.n_queries, pool.n_systems
    if n:
        R = int(pool.cand_rank.max()) + 1
        key = (pool.cand_q.astype(np.int64) * S + pool.cand_sys) * R + pool.cand_rank
        if np.any(key[1:] < key[:-1]):
            order = np.argsort(key, kind="stable")
            for name in ("cand_q", "cand_p", "cand_rank", "cand_ce", "cand_sys"):
                setattr(pool, name, getattr(pool, name)[order])
            del order
        del key
    q, p, rank, ce, sys = pool.cand_q, pool.cand_p, pool.cand_rank, pool.cand_ce, pool.cand_sys

    has_pos = np.zeros(nq, dtype=bool)
    has_pos[pool.pos_q] = True
    min_pos = np.full(nq, np.inf, dtype=np.float32)
    np.minimum.at(min_pos, pool.pos_q, pool.pos_ce)
    row_ok = has_pos[q]
    cmin = min_pos[q]

    P = np.int64(max(pool.n_pids, 1))

    def cand_keys(rows: Any = slice(None)) -> np.ndarray:
        return q[rows].astype(np.int64) * P + p[rows]

    def by_search() -> Callable[[int, int], np.ndarray]:
        pos_keys = np.unique(pool.pos_q.astype(np.int64) * P + pool.pos_p)
        return lambda lo, hi: _member(cand_keys(slice(lo, hi)), pos_keys)

    is_pos = _in_query_sets(q, lambda lo, hi: p[lo:hi], pool.pos_q, pool.pos_p, nq, by_search)

    alive = row_ok.copy()
    removed: dict[str, dict[str, int]] = {}

    def apply(name: str, reject: np.ndarray) -> None:
        reject &= row_ok
        first = reject & alive
        removed[name] = {"first": int(first.sum()), "alone": int(reject.sum())}
        alive[first] = False

    if rules.exclude_positives:
        apply("positive", is_pos.copy())
    if rules.exclude_duplicate_text and pool.pid_hash is not None:
        h = pool.pid_hash

        def text_search() -> Callable[[int, int], np.ndarray]:
            pos_text = np.unique(h[pool.pos_p] ^ _splitmix64(pool.pos_q.astype(np.uint64)))
            return lambda lo, hi: _member(h[p[lo:hi]] ^ _splitmix64(q[lo:hi].astype(np.uint64)), pos_text)

        dup = _in_query_sets(q, lambda lo, hi: h[p[lo:hi]], pool.pos_q, h[pool.pos_p], nq, text_search)
        dup &= ~is_pos
        apply("duplicate_text", dup)
        del dup
    if rules.rank_min is not None or rules.rank_max is not None:
        outside = np.zeros(n, dtype=bool)
        if rules.rank_min is not None:
            outside |= rank < rules.rank_min
        if rules.rank_max is not None:
            outside |= rank > rules.rank_max
        apply("rank_window", outside)
    if rules.ce_max_score is not None:
        value = sigmoid(ce) if rules.ce_max_score_scale == "probability" else ce
        apply("ce_max_score", value > np.float32(rules.ce_max_score))
    if rules.ce_score_margin is not None:
        apply("ce_score_margin", ce > cmin - np.float32(rules.ce_score_margin))
    if rules.relative_margin is not None:
        apply("relative_margin", sigmoid(ce) > np.float32(1.0 - rules.relative_margin) * sigmoid(cmin))

    likely_fn = ~is_pos & row_ok & (ce >= cmin)
    lfn_queries = int(np.count_nonzero(np.bincount(q[likely_fn], minlength=nq)))
    lfn = int(likely_fn.sum())
    del likely_fn, cmin

    selected = np.zeros(n, dtype=bool)
    cross_dup = capped = 0
    for s in range(S):
        idx = np.flatnonzero(alive & (sys == s)) if S > 1 else np.flatnonzero(alive)
        if s > 0 and len(idx):
            taken = np.sort(cand_keys(selected))
            dup = _member(cand_keys(idx), taken)
            cross_dup += int(dup.sum())
            idx = idx[~dup]
        if rules.num_negatives_per_system is not None and len(idx):
            r = rank_in_group(q[idx])
            over = r >= rules.num_negatives_per_system
            capped += int(over.sum())
            idx = idx[~over]
        selected[idx] = True
    removed["cross_system_duplicate"] = {"first": cross_dup}
    removed["per_system_cap"] = {"first": capped}
    if rules.max_negatives is not None:
        idx = np.flatnonzero(selected)
        over = rank_in_group(q[idx]) >= rules.max_negatives
        selected[idx[over]] = False
        removed["max_negatives"] = {"first": int(over.sum())}

    neg = np.flatnonzero(selected)
    neg_count = np.bincount(q[neg], minlength=nq)
    has_cand = np.bincount(q, minlength=nq) > 0
    kept = has_pos & (neg_count > 0)
    reasons = {
        "no_positive": int((~has_pos).sum()),
        "no_candidates": int((has_pos & ~has_cand).sum()),
        "no_negative_left": int((has_pos & has_cand & (neg_count == 0)).sum()),
    }
    rejected = row_ok & ~is_pos & ~selected
    return Selection(neg=neg, is_pos=is_pos, rejected=rejected, kept=kept, reasons=reasons, removed=removed,
                     likely_false_negatives=lfn, likely_false_negative_queries=lfn_queries, neg_count=neg_count,
                     min_pos=min_pos)


# --------------------------------------------------------------------------------------------- from tables


def build_pool(sources: Sequence[Any], query_order: Sequence[str],
               pid_hash_fn: Callable[[Any], np.ndarray] | None = None) -> tuple[Pool, Any]:
    """Pool from score results (qid, pid, ce_score, is_positive, rank), one per system (the first supplies the
    positives): Arrow tables, or parquet paths read one column at a time so that only one string column is in
    memory at once. Returns the pool and the passage-id vocabulary (an Arrow string array)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(sources) > 127:
        raise ValueError("at most 127 retrieval systems can be mined together")
    qvocab = pa.array(list(query_order), type=pa.string())
    chunks, sizes = [], []
    for src in sources:
        col = _column(src, "pid").cast(pa.string())
        sizes.append(len(col))
        chunks += col.chunks
        del col
    pid_vocab, pcodes = dictionary_codes(pa.chunked_array(chunks, type=pa.string()))
    del chunks
    cq, cp, cr, cc, cs = [], [], [], [], []
    start = 0
    pos = None
    for s, src in enumerate(sources):
        m = sizes[s]
        qcode = _numpy(pc.fill_null(pc.index_in(_column(src, "qid").cast(pa.string()), value_set=qvocab), -1),
                       np.int32)
        p = pcodes[start:start + m]
        start += m
        rank_col = _column(src, "rank")
        retrieved = _numpy(rank_col.is_valid(), bool) & (qcode >= 0)
        rank = _numpy(pc.fill_null(rank_col, 0), np.int32)
        del rank_col
        ce = _numpy(_column(src, "ce_score"), np.float32)
        if not np.isfinite(ce).all():
            raise StageError(f"scores of system {s} contain non-finite cross-encoder scores")
        if s == 0:
            is_pos = _numpy(_column(src, "is_positive"), bool) & (qcode >= 0)
            pos = (qcode[is_pos], p[is_pos], ce[is_pos])
            del is_pos
        if retrieved.all():
            cq.append(qcode), cp.append(p), cr.append(rank), cc.append(ce)
        else:
            cq.append(qcode[retrieved]), cp.append(p[retrieved]), cr.append(rank[retrieved]), cc.append(ce[retrieved])
        cs.append(np.full(len(cq[-1]), s, dtype=np.int8))
        del qcode, rank, ce, retrieved, p
    del pcodes

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    pool = Pool(n_queries=len(query_order), n_pids=len(pid_vocab), cand_q=cat(cq), cand_p=cat(cp),
                cand_rank=cat(cr), cand_ce=cat(cc), cand_sys=cat(cs), pos_q=pos[0], pos_p=pos[1], pos_ce=pos[2],
                n_systems=len(sources))
    del cq, cp, cr, cc, cs
    if pid_hash_fn is not None:
        pool.pid_hash = np.asarray(pid_hash_fn(pid_vocab), dtype=np.uint64)
    return pool, pid_vocab


def _column(src: Any, name: str) -> Any:
    """One column of a table, or read alone from a parquet file."""
    import pyarrow.parquet as pq

    if isinstance(src, (str, Path)):
        return pq.read_table(str(src), columns=[name]).column(name)
    return src.column(name)


def dictionary_codes(values: Any) -> tuple[Any, np.ndarray]:
    """(distinct values, int32 code of each value) of an Arrow array or chunked array, in one hashing pass with one
    memo table across chunks (no concatenation): every chunk's dictionary is the same, final one. A dictionary
    array is codes already; its chunks' dictionaries are unified."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(values.type):
        unified = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        return unified.dictionary, unified.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    encoded = pc.dictionary_encode(values)
    chunks = encoded.chunks if isinstance(encoded, pa.ChunkedArray) else [encoded]
    if not chunks:
        return pa.array([], values.type), np.zeros(0, np.int32)
    return chunks[0].dictionary, np.concatenate([c.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
                                                 for c in chunks])


def _numpy(col: Any, dtype: Any) -> np.ndarray:
    """A numpy copy (or view) of an Arrow array or chunked array without nulls, one concatenation at most."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        parts = [c.to_numpy(zero_copy_only=False).astype(dtype, copy=False) for c in col.chunks]
        if not parts:
            return np.zeros(0, dtype=dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    return col.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


# --------------------------------------------------------------------------------------------- text hashes


_POWERS = np.ones(1, dtype=np.uint64)


def _powers(n: int) -> np.ndarray:
    global _POWERS
    if len(_POWERS) < n:
        size = max(n, 2 * len(_POWERS))
        _POWERS = np.cumprod(np.full(size, 0x100000001B3, dtype=np.uint64), dtype=np.uint64)
    return _POWERS


def hash_strings(arr: Any) -> np.ndarray:
    """64-bit hash of every string of an Arrow string array, vectorised over its data buffer: a polynomial hash
    of the bytes (mod 2**64) finished with splitmix64 over (sum, length). Nulls hash like empty strings."""
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_large_string(arr.type):
        off_dtype = np.int64
    else:
        arr = arr.cast(pa.string())
        off_dtype = np.int32
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=off_dtype)[arr.offset:arr.offset + n + 1].astype(np.int64)
    lengths = np.diff(offsets)
    if arr.null_count:
        lengths = np.where(np.asarray(arr.is_valid()), lengths, 0)
    base = offsets[0]
    total = int(offsets[-1] - base)
    sums = np.zeros(n, dtype=np.uint64)
    if total:
        data = np.frombuffer(bufs[2], dtype=np.uint8)[base:base + total].astype(np.uint64)
        starts = offsets[:-1] - base
        within = np.arange(total, dtype=np.int64) - np.repeat(starts, np.diff(offsets))
        data += np.uint64(1)
        data *= _powers(int(within.max()) + 1)[within]
        nonempty = lengths > 0
        if nonempty.any():
            sums[nonempty] = np.add.reduceat(data, starts[nonempty])
    return _splitmix64(sums ^ _splitmix64(lengths.astype(np.uint64)))


def normalised_text_hash(texts: Any) -> np.ndarray:
    """Hash of text lower-cased, whitespace runs collapsed to one space, trimmed."""
    import pyarrow.compute as pc

    t = pc.utf8_lower(texts)
    t = pc.replace_substring_regex(t, pattern=r"\s+", replacement=" ")
    t = pc.utf8_trim_whitespace(t)
    return hash_strings(t)


def corpus_text_hashes(corpus: Any, rows: np.ndarray, batch: int = 16384) -> np.ndarray:
    from tqdm.auto import tqdm

    out = np.empty(len(rows), dtype=np.uint64)
    text_col = corpus.table.column("text")
    for lo in tqdm(range(0, len(rows), batch), desc="hash passage texts", unit="batch",
                   disable=len(rows) <= batch):
        out[lo:lo + batch] = normalised_text_hash(text_col.take(rows[lo:lo + batch]))
    return out


def passage_text_hashes(cfg: DictConfig, corpus: Any, rows: np.ndarray) -> np.ndarray:
    """Normalised-text hashes of corpus rows. When they are a large part of the corpus (MS MARCO mining touches
    most of it) the whole corpus is hashed once into <cache_root>/text_hash/<corpus fingerprint>.npy and reused
    by every later mining run; otherwise only the rows asked for are hashed."""
    from pipeline.artifacts import atomic_path, folder_lock

    if len(rows) * 4 < len(corpus):
        return corpus_text_hashes(corpus, rows)
    folder = Path(str(cfg.cache_root)).expanduser().resolve() / "text_hash"
    path = folder / f"{corpus.fingerprint}-v1.npy"
    if not path.exists():
        with folder_lock(folder, wait_s=3600):
            if not path.exists():
                with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, corpus_text_hashes(corpus, np.arange(len(corpus), dtype=np.int64)))
    return np.load(path, mmap_mode="r")[rows]


# --------------------------------------------------------------------------------------------- systems


@dataclass
class System:
    name: str
    score_key: str           # key of the score result this system's candidates and logits come from
    score_dir: Path | None   # its complete folder (None when not found and not required)


def systems(cfg: DictConfig, *, strict: bool = True) -> list[System]:
    """The configured bi-encoder (named model.name) then each of `mine.systems`: "<name>=<source>" or
    "<source>", a source being a retrieve artifact folder or a bi-encoder spec (hub id, dir, demo:<name>).
    Score results are found by key whatever their label (a retrieve folder's system may have run under another
    model.name; a spec's key holds this config's model.name, through the retrieve folder's name).
    strict: every score result must be complete (StageError naming the command to run otherwise)."""
    from pipeline.stages import score

    entries: list[tuple[str, DictConfig, str]] = [(str(cfg.model.name), cfg, "stage=score"), *_extra_entries(cfg)]
    out = []
    for name, cfg2, how in entries:
        key = config_key(score.identity(cfg2))
        found = next((f for f in sorted((common.artifacts_root(cfg) / "score").glob(f"*-{key}")) if is_complete(f)),
                     None)
        if found is None and strict:
            raise StageError(f"no complete score result for system {name!r} (key {key}); run {how} first")
        if found is not None and strict:  # about to be read: checked, and recorded in mine's manifest
            require_complete(found, f"the score result of system {name!r}")
        out.append(System(name, key, found))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise StageError(f"mine.systems: system names must be unique, got {names}; name them as <name>=<source>")
    return out


def fixed_systems(cfg: DictConfig) -> list[str]:
    """`mine.systems` with each source as the retrieve folder it names under ``cfg``: what stage=all gives its later
    rounds. A later round runs under another model.name (<name>-it<k>), which a bi-encoder spec's score key holds
    (through the retrieve folder's name): round 2 looked for results no command had made, and its message named
    the commands that had made round 1's. The folder names the same candidates, and the same scores, every round."""
    from pipeline.stages import score

    return [f"{name}={score.retrieve_dir(cfg2, must_exist=False)}" for name, cfg2, _ in _extra_entries(cfg)]


def _extra_entries(cfg: DictConfig) -> list[tuple[str, DictConfig, str]]:
    """(name, config that scores it, the commands that make its score result) of each of `mine.systems`."""
    import copy

    from omegaconf import OmegaConf

    from pipeline.stages import score

    entries: list[tuple[str, DictConfig, str]] = []
    for entry in cfg.mine.systems or []:
        entry = str(entry)
        name, sep, source = entry.partition("=")
        if not sep:
            name, source = "", entry
        cfg2 = copy.deepcopy(cfg)
        folder = Path(source).expanduser()
        if (folder / "candidates.parquet").is_file():
            if not is_complete(folder):
                raise StageError(f"mine.systems: retrieve folder {folder} is incomplete (no _COMPLETE)")
            OmegaConf.update(cfg2, "score.candidates", str(folder.resolve()))
            name = name or str(read_manifest(folder).get("config", {}).get("model", {}).get("name") or folder.name)
            how = f"stage=score score.candidates={folder.resolve()}"
        else:
            OmegaConf.update(cfg2, "model.bi_encoder", source)
            name = name or Path(source.rstrip("/")).name or source
            judge = ""
            if score.given_cross_encoder(cfg) is None:
                # the teacher this config trains judges every system, as it judges every round of stage=all: the
                # extra system's own config asked for a teacher of its own (trained on its own candidates), whose
                # logits the mining rules would then have compared with the first teacher's
                teacher_model = common.stage_dir(cfg, "teacher") / "model"
                OmegaConf.update(cfg2, "model.cross_encoder", str(teacher_model))
                OmegaConf.update(cfg2, "teacher.enabled", False)
                judge = f" model.cross_encoder={teacher_model} teacher.enabled=false"
            how = f"stage=retrieve model.bi_encoder={source}, then stage=score model.bi_encoder={source}{judge}"
        entries.append((name, cfg2, how))
    return entries


# --------------------------------------------------------------------------------------------- stage


def identity(cfg: DictConfig) -> dict[str, Any]:
    from pipeline.stages.retrieve import train_data_identity

    return {
        "mine": plain(cfg.mine),
        "data": train_data_identity(cfg),
        "systems": [{"name": s.name, "score": s.score_key} for s in systems(cfg, strict=False)],
    }


def label(cfg: DictConfig) -> str:
    return f"{cfg.data.name}-{cfg.model.name}"


@validate.checked
def run(cfg: DictConfig) -> Path:
    import pyarrow as pa

    rules = Rules.from_cfg(cfg.mine)
    with open_stage("mine", identity(cfg), root=common.artifacts_root(cfg), label=label(cfg), config=plain(cfg),
                    force=cfg.force, lock_wait_s=cfg.lock_wait_s) as st:
        if st.done:
            return st.path
        syst = systems(cfg)
        with st.timed("load"):
            corpus = common.load_corpus(cfg)
            queries, _, _ = common.training_set(cfg, corpus)
            query_order = list(queries)
            sources = [s.score_dir / "scores.parquet" for s in syst]
            pid_rows: dict[str, np.ndarray] = {}

            def pid_hash_fn(vocab: Any) -> np.ndarray:
                rows = corpus.lookup_array(vocab)
                if (rows < 0).any():
                    missing = vocab.filter(pa.array(rows < 0)).to_pylist()
                    raise StageError(f"{len(missing)} scored passage ids are not in the corpus, e.g. {missing[:5]}")
                pid_rows["rows"] = rows
                if not rules.exclude_duplicate_text:
                    return np.zeros(len(vocab), dtype=np.uint64)
                return passage_text_hashes(cfg, corpus, rows)

            pool, pid_vocab = build_pool(sources, query_order, pid_hash_fn)
            if not rules.exclude_duplicate_text:
                pool.pid_hash = None
        with st.timed("select"):
            sel = select(pool, rules)
        activation = {s.name: read_manifest(s.score_dir).get("extra", {}).get("activation") for s in syst}
        with st.timed("write"):
            rows = pid_rows["rows"]
            write_outputs(st.path, pool, sel, query_order, pid_vocab, [s.name for s in syst], rules,
                          texts=(lambda qcodes: [queries[query_order[i]] for i in qcodes],
                                 lambda pcodes: corpus.texts_at(rows[pcodes])),
                          report_extra={"systems": {s.name: str(s.score_dir) for s in syst},
                                        "activation": activation})
        report = json.loads((st.path / "report.json").read_text())
        if not report["queries"]["kept"]:
            # the rule to loosen: the one that alone rejects the most (exclusions of positives are not rules to loosen)
            alone = {k: v.get("alone", v["first"]) for k, v in sel.removed.items()
                     if k not in ("positive", "duplicate_text")}
            worst = max(alone, key=alone.get) if alone and max(alone.values()) else None
            hint = f"mine.{worst} (it alone rejects {alone[worst]} candidates)" if worst else "the rules"
            raise StageError(f"mine: no query kept any negative (dropped: {sel.reasons}; removed by rule: "
                             f"{ {k: v['first'] for k, v in sel.removed.items()} }). Loosen {hint}; the report is "
                             f"in {st.path / 'report.json'}")
        st.counts.update({"queries": len(query_order), "queries_kept": report["queries"]["kept"],
                          "candidates": len(pool.cand_q), "negatives": len(sel.neg),
                          "triplets": report["queries"]["kept"]})
        st.extra["dropped"] = sel.reasons
        log.info("mine: %d of %d queries kept, %d negatives (%.2f per kept query); dropped %s",
                 report["queries"]["kept"], len(query_order), len(sel.neg),
                 len(sel.neg) / max(1, report["queries"]["kept"]), sel.reasons)
    return st.path


# --------------------------------------------------------------------------------------------- outputs


def write_outputs(out: Path, pool: Pool, sel: Selection, query_order: Sequence[str], pid_vocab: Any,
                  system_names: Sequence[str], rules: Rules, *,
                  texts: tuple[Callable, Callable] | None = None, report_extra: dict | None = None) -> dict[str, Any]:
    """pools.parquet, hard_negatives.jsonl, triplets/ (when `texts` gives query and passage text getters),
    report.json and report.png. Returns the report."""
    import pyarrow as pa

    from pipeline.shards import write_parquet

    kept = sel.kept
    pos_keep = kept[pool.pos_q]
    pq_, pp_, pc_ = pool.pos_q[pos_keep], pool.pos_p[pos_keep], pool.pos_ce[pos_keep]
    n_pos = len(pq_)
    nq_, np_ = pool.cand_q[sel.neg], pool.cand_p[sel.neg]
    rows_q = np.concatenate([pq_, nq_])
    order = np.argsort(rows_q, kind="stable")  # per query: positives (input order), then negatives (pooled order)
    rows_q = rows_q[order]
    rows_p = np.concatenate([pp_, np_])[order]
    rows_ce = np.concatenate([pc_, pool.cand_ce[sel.neg]])[order]
    is_neg = (order >= n_pos)
    rows_sys = np.concatenate([np.full(n_pos, -1, np.int16), pool.cand_sys[sel.neg].astype(np.int16)])[order]
    pos_rank = _positive_ranks(pool, sel, pq_, pp_)
    rows_rank = np.concatenate([pos_rank, pool.cand_rank[sel.neg]])[order]
    del order

    qvocab = pa.array(list(query_order), type=pa.string())
    sysvocab = pa.array(list(system_names), type=pa.string())
    qid_col = qvocab.take(pa.array(rows_q))
    pid_col = pid_vocab.take(pa.array(rows_p))
    role = pa.DictionaryArray.from_arrays(pa.array(is_neg.astype(np.int8)), pa.array(["pos", "neg"])).cast(pa.string())
    system = sysvocab.take(pa.array(np.maximum(rows_sys, 0), mask=rows_sys < 0))
    rank = pa.array(rows_rank, type=pa.int32(), mask=rows_rank <= 0)
    pools = pa.table({"qid": qid_col, "pid": pid_col, "role": role, "ce_score": pa.array(rows_ce, pa.float32()),
                      "system": system, "rank": rank})
    write_parquet(pools, out / "pools.parquet")

    bounds = np.flatnonzero(np.r_[True, rows_q[1:] != rows_q[:-1], True]) if len(rows_q) else np.zeros(1, np.int64)
    _write_jsonl(out / "hard_negatives.jsonl", qid_col, pid_col, rows_ce, is_neg, rows_sys, bounds, system_names)
    if texts is not None:
        _write_triplets(out / "triplets", rows_q, rows_p, is_neg, bounds, texts)

    report = _report(pool, sel, rules, system_names, rows_sys[is_neg])
    report.update(report_extra or {})
    atomic_write_json(out / "report.json", report)
    _plot(out / "report.png", pool, sel)
    return report


def _positive_ranks(pool: Pool, sel: Selection, pos_q: np.ndarray, pos_p: np.ndarray) -> np.ndarray:
    """Bi-encoder rank of each positive in the first system (0 when it was not retrieved)."""
    found = np.flatnonzero(sel.is_pos & (pool.cand_sys == 0))
    P = np.int64(max(pool.n_pids, 1))
    keys = pool.cand_q[found].astype(np.int64) * P + pool.cand_p[found]
    order = np.argsort(keys)
    keys, ranks = keys[order], pool.cand_rank[found][order]
    want = pos_q.astype(np.int64) * P + pos_p
    out = np.zeros(len(want), dtype=np.int32)
    if len(keys):
        at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        hit = keys[at] == want
        out[hit] = ranks[at[hit]]
    return out


def _decimal_ids(column: Any) -> bool:
    """Whether every id is a decimal integer written as int() would write it back (readers._decimal_id's rule,
    vectorised; at most 18 digits, so it fits an int64)."""
    import pyarrow.compute as pc

    return bool(pc.all(pc.match_substring_regex(column, r"^(0|[1-9][0-9]{0,17})$")).as_py() is not False)


def _write_jsonl(path: Path, qid_col: Any, pid_col: Any, ce: np.ndarray, is_neg: np.ndarray, sys: np.ndarray,
                 bounds: np.ndarray, system_names: Sequence[str]) -> None:
    """One line per kept query, in the layout of sentence-transformers' msmarco-hard-negatives plus the
    cross-encoder logits: {"qid", "pos": [...], "neg": {system: [...]}, "ce_scores": {pid: logit}}. Lists here
    are the mined negatives (after the rules), not the raw retrieval lists. Ids are JSON integers where every id
    is a decimal integer (MS MARCO: the published file's layout, which its training script indexes with
    ``int`` keys), strings otherwise (BEIR ids); ce_scores' keys are strings either way (JSON object keys)."""
    from tqdm.auto import tqdm

    qids = qid_col.to_pylist()
    keys = pid_col.to_pylist()
    pids = keys
    if _decimal_ids(qid_col) and _decimal_ids(pid_col):
        qids, pids = [int(x) for x in qids], [int(x) for x in keys]
    ces = ce.astype(np.float64).tolist()
    negs = is_neg.tolist()
    syss = sys.tolist()
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        buf: list[str] = []
        for g in tqdm(range(len(bounds) - 1), desc="write hard_negatives.jsonl", unit=" queries", mininterval=2,
                      disable=len(bounds) < 50_000):
            a, b = int(bounds[g]), int(bounds[g + 1])
            split = a + negs[a:b].index(True) if True in negs[a:b] else b
            neg: dict[str, list[str]] = {}
            for j in range(split, b):
                neg.setdefault(system_names[syss[j]], []).append(pids[j])
            buf.append(dumps({"qid": qids[a], "pos": pids[a:split], "neg": neg,
                              "ce_scores": dict(zip(keys[a:b], ces[a:b]))}))
            if len(buf) >= 10_000:
                fh.write("\n".join(buf) + "\n")
                buf.clear()
        if buf:
            fh.write("\n".join(buf) + "\n")


def _write_triplets(path: Path, rows_q: np.ndarray, rows_p: np.ndarray, is_neg: np.ndarray, bounds: np.ndarray,
                    texts: tuple[Callable, Callable]) -> None:
    """One (query, positive, negative) row per kept query: its first positive and its first (best) negative.
    That is what MultipleNegativesRankingLoss wants: a query appears once, so no batch holds the same query
    twice (which would make its own positive a false in-batch negative); the train stage rotates positives and
    negatives per epoch from pools.parquet, as the published script did."""
    import datasets
    import pyarrow as pa

    starts = bounds[:-1]
    first_neg = np.empty(len(starts), dtype=np.int64)
    # the first negative of each group: the first index >= start where is_neg (positives precede negatives)
    neg_idx = np.flatnonzero(is_neg)
    first_neg[:] = neg_idx[np.searchsorted(neg_idx, starts)] if len(starts) else 0
    query_text, passage_text = texts
    table = pa.table({"query": pa.array(query_text(rows_q[starts].tolist()), pa.string()),
                      "positive": pa.array(passage_text(rows_p[starts]), pa.string()),
                      "negative": pa.array(passage_text(rows_p[first_neg]), pa.string())})
    with atomic_path(path) as tmp:
        datasets.Dataset(table).save_to_disk(str(tmp))


def _quantiles(x: np.ndarray) -> dict[str, float] | None:
    if len(x) == 0:
        return None
    values = np.quantile(x.astype(np.float64), QUANTILES)
    return {f"q{round(qq * 100):02d}": round(float(v), 4) for qq, v in zip(QUANTILES, values)} | {
        "mean": round(float(x.astype(np.float64).mean()), 4), "count": len(x)}


def _report(pool: Pool, sel: Selection, rules: Rules, system_names: Sequence[str], neg_sys: np.ndarray
            ) -> dict[str, Any]:
    kept_counts = sel.neg_count[sel.kept]
    hist = np.bincount(kept_counts) if len(kept_counts) else np.zeros(0, np.int64)
    per_system = np.bincount(neg_sys, minlength=len(system_names)) if len(neg_sys) else np.zeros(len(system_names))
    cand_per_system = np.bincount(pool.cand_sys, minlength=len(system_names))
    return {
        "rules": {k: getattr(rules, k) for k in rules.__dataclass_fields__},
        "rule_order": list(RULES),
        "queries": {"total": int(pool.n_queries), "kept": int(sel.kept.sum()), "dropped": sel.reasons},
        "candidates": {"total": len(pool.cand_q),
                       "per_system": {n: int(c) for n, c in zip(system_names, cand_per_system)},
                       "positives_retrieved": int(sel.is_pos.sum())},
        "removed_by_rule": {name: sel.removed[name] for name in RULES if name in sel.removed},
        "removed_by_rule_note": ("first: candidates this rule removed that no earlier rule (in rule_order) had "
                                 "removed; alone: candidates it rejects on its own, whatever the other rules"),
        "negatives": {"total": len(sel.neg),
                      "per_system": {n: int(c) for n, c in zip(system_names, per_system)},
                      "per_query_mean": round(float(kept_counts.mean()), 4) if len(kept_counts) else 0.0,
                      "per_query_histogram": {str(i): int(c) for i, c in enumerate(hist) if c}},
        "ce_scores": {"positives": _quantiles(pool.pos_ce),
                      "kept": _quantiles(pool.cand_ce[sel.neg]),
                      "rejected": _quantiles(pool.cand_ce[sel.rejected])},
        "likely_false_negatives": {
            "candidates": sel.likely_false_negatives, "queries": sel.likely_false_negative_queries,
            "definition": "retrieved non-positive passages whose CE score is >= the query's lowest positive score"},
    }


def _plot(path: Path, pool: Pool, sel: Selection) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"positives": pool.pos_ce, "kept negatives": pool.cand_ce[sel.neg],
              "rejected candidates": pool.cand_ce[sel.rejected]}
    nonempty = [v for v in series.values() if len(v)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if nonempty:
        lo = min(float(v.min()) for v in nonempty)
        hi = max(float(v.max()) for v in nonempty)
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)
        for name, values in series.items():
            if len(values):
                counts, edges = np.histogram(values, bins=bins)
                ax1.stairs(counts / max(1, counts.sum()), edges, label=f"{name} ({len(values):,})")
    ax1.set_xlabel("cross-encoder score (raw logit)")
    ax1.set_ylabel("share of the series")
    ax1.set_title("CE scores")
    ax1.legend()
    hist = np.bincount(sel.neg_count[sel.kept]) if sel.kept.any() else np.zeros(1)
    ax2.bar(np.arange(len(hist)), hist)
    ax2.set_xlabel("negatives per kept query")
    ax2.set_ylabel("queries")
    ax2.set_title(f"{int(sel.kept.sum()):,} kept queries")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
