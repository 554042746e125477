"""`stage=score`: cross-encoder raw logits for every (query, candidate) pair of a retrieve result (its top
`score.depth` ranks) and every (query, positive) pair -> scores.parquet.

scores.parquet: qid str, pid str, ce_score float32 (raw logit, no activation), is_positive bool, rank int32
(bi-encoder rank, null for a positive that was not retrieved within the scored depth); one row per pair, queries in
training order, each query's candidates in rank order followed by its unretrieved positives. The model's activation
(Sigmoid or Identity) is recorded in the manifest (extra.activation), so a probability is sigmoid(logit) only
when the model says so.

Resumable and never scoring a pair twice:
- the pair list is cut into chunks of `chunk_pairs`; each chunk is committed as its own parquet file, so a run
  killed at any moment restarts at the first uncommitted chunk (no lost, no duplicated pair);
- every newly scored pair is appended to the pair cache ``<cache_root>/ce_scores/<key>/chunk-*.parquet``, keyed by
  the cross-encoder (models.cache_identity: a Hub model by the files it loads), its max_length, the compute
  dtype that score.precision means on this device (a result keyed fp32 must not hold bf16 logits: they differ by
  up to 0.02 on the demo's teacher, enough to flip margin decisions) and the corpus/query fingerprints (the text of
  an id depends on the data): another retrieval system, another depth or the next mining iteration at the same
  precision reuses every logit already computed.
  The cache is append-only (atomic files written under a lock); reading it de-duplicates (qid, pid), keeping the
  lowest logit if two processes raced on one pair.
Sharding splits the chunks (see pipeline.shards); the merged scores.parquet equals a single run's.

Memory: the pair list is held as integer codes (query row, corpus row, rank, positive flag: 13 bytes a pair), built
from the retrieve result batch by batch; ids become strings only for the chunk being scored or merged, and the
merge streams scores.parquet chunk by chunk. The pair-cache join costs 24 bytes a pair more while it runs.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pipeline import validate
from pipeline.artifacts import (
    StageError,
    StageRun,
    atomic_write_json,
    claim_weights,
    config_key,
    folder_lock,
    is_complete,
    read_manifest,
    require_complete,
)
from pipeline.config import plain
from pipeline.models import cache_identity, hub_id, load_cross_encoder, model_identity
from pipeline.shards import block_bounds, n_blocks, parquet_stream, run_sharded, write_parquet
from pipeline import signals
from pipeline.stages import common

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_NOT_IN_KEY = ("debug_sleep_s",)


# --------------------------------------------------------------------------------------------- inputs


def given_cross_encoder(cfg: DictConfig) -> str | None:
    """model.cross_encoder, unless a teacher is asked for (teacher.enabled: the trained teacher judges instead)."""
    return None if cfg.teacher.enabled or not cfg.model.cross_encoder else str(cfg.model.cross_encoder)


def cross_encoder_spec(cfg: DictConfig) -> str:
    """model.cross_encoder, or the teacher stage's trained model when it is null or teacher.enabled is set."""
    given = given_cross_encoder(cfg)
    return given if given else str(common.completed(cfg, "teacher") / "model")


def _cross_encoder_identity(cfg: DictConfig) -> dict[str, Any]:
    given = given_cross_encoder(cfg)
    if given:
        return model_identity(given)
    teacher = common.stage_dir(cfg, "teacher")
    if is_complete(teacher):
        return model_identity(str(teacher / "model"))
    return {"teacher": teacher.name, "complete": False}


def retrieve_dir(cfg: DictConfig, *, must_exist: bool = True) -> Path:
    """The retrieve result scored: score.candidates when given, else this config's retrieve result."""
    if cfg.score.candidates:
        folder = Path(str(cfg.score.candidates)).expanduser().resolve()
        return require_complete(folder, "score.candidates") if must_exist else folder
    return common.completed(cfg, "retrieve") if must_exist else common.stage_dir(cfg, "retrieve")


def identity(cfg: DictConfig) -> dict[str, Any]:
    from pipeline.stages.retrieve import train_data_identity

    return {
        "score": {k: v for k, v in plain(cfg.score).items() if k not in _NOT_IN_KEY and k != "candidates"},
        "data": train_data_identity(cfg),
        "retrieve": retrieve_dir(cfg, must_exist=False).name,
        "cross_encoder": _cross_encoder_identity(cfg),
    }


def label(cfg: DictConfig) -> str:
    return f"{cfg.data.name}-{cfg.model.name}-{cfg.model.cross_encoder_name}"


# --------------------------------------------------------------------------------------------- pair cache


class PairCache:
    """Append-only store of cross-encoder logits: chunk-*.parquet (qid, pid, ce_score) in one folder per key."""

    def __init__(self, folder: Path, ident: dict[str, Any]):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "cache.json").exists():
            atomic_write_json(folder / "cache.json", ident)

    @classmethod
    def for_config(cls, cfg: DictConfig, spec: str, corpus: Any) -> PairCache:
        from pipeline.readers import corpus_source_fingerprint

        ident = {"format": CACHE_FORMAT, "cross_encoder": cache_identity(spec), "spec": spec,
                 "max_length": cfg.score.max_length, "corpus": corpus.fingerprint,
                 "dtype": common.compute_dtype(cfg.score.precision, common.stage_device(cfg)),
                 "queries": corpus_source_fingerprint(str(cfg.data.train.queries))}
        folder = Path(str(cfg.cache_root)).expanduser().resolve() / "ce_scores" / config_key(
            {k: v for k, v in ident.items() if k != "spec"}, 16)
        return cls(folder, ident)

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.parquet"))

    def lookup(self, pairs: Pairs, rows: np.ndarray, group_rows: int = 4_000_000) -> np.ndarray:
        """Cached logit of the pairs at ``rows``, NaN where none; duplicates resolve to the lowest logit, so the
        answer never depends on file order. Joined on integer keys (query row x corpus size + passage row): the
        cached ids become keys one group of files at a time, and the pairs side costs 24 bytes a pair."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        from pipeline.stages.mine import _numpy

        out = np.full(len(rows), np.nan, dtype=np.float32)
        files = self.files()
        if not files or len(rows) == 0:
            return out
        keys = pairs.keys(rows)
        order = np.argsort(keys)  # equal keys (a pair listed twice) get the same logit: no stable sort needed
        keys.sort()
        groups: list[list[Path]] = [[]]
        held = 0
        for f in files:
            m = pq.ParquetFile(f).metadata.num_rows
            if groups[-1] and held + m > group_rows:
                groups.append([])
                held = 0
            groups[-1].append(f)
            held += m
        for group in groups:
            t = ds.dataset([str(f) for f in group], format="parquet").to_table(columns=["qid", "pid", "ce_score"])
            q = _numpy(pc.fill_null(pc.index_in(t.column("qid").cast(pa.string()), value_set=pairs.query_ids), -1),
                       np.int64)
            t, q = t.filter(pa.array(q >= 0)), q[q >= 0]
            p = pairs.corpus.lookup_array(t.column("pid"))
            cached_keys = q[p >= 0] * pairs.key_base + p[p >= 0]
            logits = _numpy(t.column("ce_score"), np.float32)[p >= 0]
            by_key = np.lexsort((logits, cached_keys))  # each key's lowest logit first
            cached_keys, logits = cached_keys[by_key], logits[by_key]
            first = np.ones(len(cached_keys), dtype=bool)
            first[1:] = cached_keys[1:] != cached_keys[:-1]
            cached_keys, logits = cached_keys[first], logits[first]
            lo = np.searchsorted(keys, cached_keys, side="left")
            count = np.searchsorted(keys, cached_keys, side="right") - lo
            hit = count > 0
            if hit.any():
                lo, count = lo[hit], count[hit]
                at = order[np.repeat(lo - np.cumsum(count) + count, count) + np.arange(int(count.sum()))]
                out[at] = np.fmin(out[at], np.repeat(logits[hit], count))
        return out

    def append(self, table: Any) -> None:
        with folder_lock(self.folder, wait_s=600):
            write_parquet(table, self.folder / f"chunk-{time.time_ns():020d}-{os.getpid()}.parquet")


# --------------------------------------------------------------------------------------------- pairs


@dataclass
class Pairs:
    """The pair list as integer codes, 13 bytes a pair (25M pairs: 0.3 GB), where Arrow tables of id strings
    took ~150 at their peak; ids become strings only for the rows being written."""
    query_ids: Any  # Arrow string array: the training queries, in training order
    corpus: Any  # pipeline.readers.Corpus
    qrow: np.ndarray  # int32: row in query_ids
    prow: np.ndarray  # int32 (int64 past 2**31 passages): corpus row
    rank: np.ndarray  # int32: bi-encoder rank; 0 for a positive not retrieved within the scored depth
    is_positive: np.ndarray  # bool

    @property
    def num_rows(self) -> int:
        return len(self.qrow)

    @property
    def key_base(self) -> int:
        return max(len(self.corpus), 1)

    def keys(self, rows: np.ndarray, step: int = 1 << 22) -> np.ndarray:
        """One int64 per (query, passage) at ``rows``: query row x corpus size + corpus row (filled in slices, so
        the only full-size array is the result)."""
        out = np.empty(len(rows), dtype=np.int64)
        for lo in range(0, len(rows), step):
            at = rows[lo:lo + step]
            np.multiply(self.qrow[at], self.key_base, out=out[lo:lo + step], dtype=np.int64)
            out[lo:lo + step] += self.prow[at]
        return out

    def table(self, lo: int, hi: int) -> Any:
        """Rows lo..hi as (qid, pid, is_positive, rank) with rank null for an unretrieved positive."""
        import pyarrow as pa

        rank = self.rank[lo:hi]
        return pa.table({"qid": self.query_ids.take(pa.array(self.qrow[lo:hi])),
                         "pid": self.corpus.id_array(self.prow[lo:hi]),
                         "is_positive": pa.array(self.is_positive[lo:hi]),
                         "rank": pa.array(rank, pa.int32(), mask=rank == 0)})


def _in_rank_order(cq: np.ndarray, rank: np.ndarray, step: int = 1 << 22) -> bool:
    """(query row, rank) strictly increasing, checked in slices (bounded temporaries)."""
    for lo in range(0, max(len(cq) - 1, 0), step):
        hi = min(lo + step + 1, len(cq))
        dq, dr = np.diff(cq[lo:hi]), np.diff(rank[lo:hi])
        if not np.all((dq > 0) | ((dq == 0) & (dr > 0))):
            return False
    return True


def build_pairs(cands: Any, query_order: list[str], positives: dict[str, list[str]], depth: int | None,
                corpus: Any) -> Pairs:
    """Per query in `query_order`, its candidates (rank <= depth) in rank order, then its positives that were not
    among them. `cands`: the retrieve result's (qid, pid, rank) as a table or an iterable of record batches, turned
    into codes batch by batch, so the candidates' id strings are never all in memory."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.stages.mine import _chunked, _member, _numpy

    qvocab = pa.array(query_order, pa.string())
    row_type = np.int32 if len(corpus) < 2**31 else np.int64
    cq_parts, cp_parts, rank_parts = [], [], []
    for batch in cands.to_batches() if isinstance(cands, pa.Table) else cands:
        if depth is not None:
            batch = batch.filter(pc.less_equal(batch.column("rank"), depth))
        q = _numpy(pc.fill_null(pc.index_in(batch.column("qid").cast(pa.string()), value_set=qvocab), -1), np.int64)
        if (q < 0).any():  # candidates of queries outside the training set (data.train.max_queries)
            batch, q = batch.filter(pa.array(q >= 0)), q[q >= 0]
        p = corpus.lookup_array(batch.column("pid"))
        if (p < 0).any():
            raise StageError(f"score: {int((p < 0).sum())} candidate passage ids are not in the corpus, e.g. "
                             f"{batch.column('pid').filter(pa.array(p < 0)).to_pylist()[:5]}")
        if batch.column("rank").null_count:
            raise StageError("score: the retrieve result has candidates without a rank")
        cq_parts.append(q.astype(np.int32))
        cp_parts.append(p.astype(row_type))
        rank_parts.append(_numpy(batch.column("rank"), np.int32))
    cq, cp, rank = (_concatenate(parts) for parts in (cq_parts, cp_parts, rank_parts))
    if len(rank) and int(rank.min()) < 1:
        raise StageError(f"score: the retrieve result has rank {int(rank.min())}; ranks start at 1")
    if not _in_rank_order(cq, rank):
        order = np.lexsort((rank, cq))
        cq, cp, rank = cq[order], cp[order], rank[order]
        if np.any((np.diff(cq) == 0) & (np.diff(rank) == 0)):
            raise StageError("the retrieve result lists a rank twice for one query")
    pos_q = np.array([i for i, q in enumerate(query_order) for _ in positives.get(q, ())], dtype=np.int64)
    pos_ids = pa.array([p for q in query_order for p in positives.get(q, ())], pa.string())
    pos_p = corpus.lookup_array(pos_ids) if len(pos_ids) else np.zeros(0, np.int64)
    if (pos_p < 0).any():
        absent = pos_ids.filter(pa.array(pos_p < 0)).to_pylist()
        raise StageError(f"score: {len(absent)} positives are not in the corpus, e.g. {absent[:5]}")
    base = max(len(corpus), 1)
    pos_keys = pos_q * base + pos_p
    unique_pos = np.unique(pos_keys)
    cand_is_pos = _chunked(len(cq), lambda lo, hi: _member(cq[lo:hi].astype(np.int64) * base + cp[lo:hi], unique_pos))
    missing = ~_member(pos_keys, np.unique(cq[cand_is_pos].astype(np.int64) * base + cp[cand_is_pos]))
    at = np.searchsorted(cq, pos_q[missing], side="right")  # after the query's candidates, in positives order
    # one array at a time, so only one of them is ever held twice
    cp = np.insert(cp, at, pos_p[missing].astype(row_type))
    rank = np.insert(rank, at, np.int32(0))
    cand_is_pos = np.insert(cand_is_pos, at, True)
    cq = np.insert(cq, at, pos_q[missing].astype(np.int32))
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps the candidate batches' freed buffers
    return Pairs(qvocab, corpus, cq, cp, rank, cand_is_pos)


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    """The parts as one array (int32 when there are none), emptying the list: no part is kept beside the whole."""
    whole = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    parts.clear()
    return whole


# --------------------------------------------------------------------------------------------- stage


@dataclass
class _Ctx:
    cfg: DictConfig
    corpus: Any
    queries: dict[str, str]
    pairs: Pairs
    n_blocks: int
    spec: str
    cache: PairCache | None
    retrieve: Path
    final: Path
    _model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = load_cross_encoder(self.spec, device=common.stage_device(self.cfg),
                                             artifacts_root=str(common.artifacts_root(self.cfg)),
                                             max_length=self.cfg.score.max_length)
            claim_weights(self.final, self.spec)
            labels = int(getattr(self._model, "num_labels", 1) or 1)
            if labels != 1:
                raise StageError(f"cross-encoder {self.spec} has {labels} labels; scoring needs a single-logit model")
        return self._model

    @functools.cached_property
    def token_stores(self) -> tuple[Any, Any] | None:
        """(query token store, corpus token store) for the cross-encoder's tokenizer, queries in training order;
        None where token_cache is off or the model has no fast tokenizer (texts are passed then)."""
        from pipeline.tokens import TokenStore, build_workers, fast_tokenizer_json

        store = common.token_store(self.cfg, self.corpus, self.model)
        if store is None:
            return None
        queries = TokenStore.from_texts(fast_tokenizer_json(self.model), self.query_texts,
                                        workers=build_workers(len(self.query_texts)))
        return queries, store

    @functools.cached_property
    def query_texts(self) -> list[str]:
        return list(self.queries.values())  # the order of pairs.query_ids

    def pair_input(self, qrows: np.ndarray, prows: np.ndarray) -> Any:
        """The (query, passage) pairs of query rows ``qrows`` and corpus rows ``prows`` as cross-encoder input: a
        token-store view, or the texts."""
        if self.token_stores is None:
            return list(zip((self.query_texts[q] for q in qrows), self.corpus.texts_at(prows)))
        from pipeline.tokens import PairTokens

        qstore, store = self.token_stores
        return PairTokens(qstore, self.query_texts, qrows.astype(np.int64), store, prows.astype(np.int64),
                          self.corpus.texts_at)


def activation_name(model: Any) -> str:
    fn = getattr(model, "activation_fn", None)
    if fn is None:
        return "Identity"
    cls = type(fn)
    return f"{cls.__module__}.{cls.__qualname__}" if not cls.__module__.startswith("torch.nn.modules") \
        else f"torch.nn.{cls.__qualname__}"


@validate.checked
def run(cfg: DictConfig) -> Path:
    return run_sharded(cfg, "score", identity(cfg), label(cfg), prepare=lambda final: _prepare(cfg, final),
                       work=_work, merge=_merge, precision=cfg.score.precision)


def _prepare(cfg: DictConfig, final: Path) -> _Ctx:
    import pyarrow.parquet as pq

    from pipeline.stages.retrieve import train_data_identity

    rdir = retrieve_dir(cfg)
    if cfg.score.candidates:
        theirs = read_manifest(rdir).get("identity", {}).get("data")
        if theirs != train_data_identity(cfg):
            raise StageError(f"score.candidates={rdir} was retrieved for other data than data={cfg.data.name} "
                             f"(the training data identities differ)")
    spec = cross_encoder_spec(cfg)
    corpus = common.load_corpus(cfg)
    queries, positives, _ = common.training_set(cfg, corpus)
    cands = pq.ParquetFile(rdir / "candidates.parquet").iter_batches(batch_size=1 << 20, columns=["qid", "pid", "rank"])
    pairs = build_pairs(cands, list(queries), positives, cfg.score.depth, corpus)
    # force=true recomputes every pair: the cache is neither read (its logits may come from an older engine or
    # model file) nor appended to (its reads keep the lowest of duplicate logits, mixing old and new)
    ctx = _Ctx(cfg, corpus, queries, pairs, n_blocks(pairs.num_rows, int(cfg.score.chunk_pairs)), spec, None, rdir,
               final)
    if cfg.score.use_cache and not cfg.force:
        if hub_id(spec):
            _ = ctx.model  # a Hub model's cache is keyed by the files it loads (models.cache_identity)
        ctx.cache = PairCache.for_config(cfg, spec, corpus)
    return ctx


def _chunk_file(out_dir: Path, b: int) -> Path:
    return out_dir / f"chunk-{b:06d}.parquet"


@signals.deferred()  # a SIGTERM/SIGUSR1/SIGUSR2 stops the run after the chunk in progress is committed
def _work(ctx: _Ctx, st: StageRun, blocks: range, out_dir: Path) -> None:
    import pyarrow as pa
    from tqdm.auto import tqdm

    from pipeline.engine import score_pairs

    sc = ctx.cfg.score
    pairs = ctx.pairs
    n, size = pairs.num_rows, int(sc.chunk_pairs)
    todo = [b for b in blocks if not _chunk_file(out_dir, b).exists()]
    if not todo:
        return
    rows = np.concatenate([np.arange(*block_bounds(b, size, n), dtype=np.int32 if n < 2**31 else np.int64)
                           for b in todo])
    with st.timed("cache_lookup"):
        cached = ctx.cache.lookup(pairs, rows) if ctx.cache else np.full(len(rows), np.nan, dtype=np.float32)
    del rows
    hits = int((~np.isnan(cached)).sum())
    log.info("score: %d chunks to do (%d pairs, %d of them cached)", len(todo), len(cached), hits)
    with st.timed("token_store"):
        stores = ctx.token_stores if len(cached) > hits else None
    st.extra["token_store"] = str(stores[1].folder) if stores is not None else None
    bar = tqdm(total=len(cached), desc="score pairs", unit=" pairs", smoothing=0.1)
    scored = from_cache = 0
    at = 0
    for b in todo:
        lo, hi = block_bounds(b, size, n)
        values = cached[at:at + hi - lo].copy()
        at += hi - lo
        chunk = pairs.table(lo, hi)
        miss = np.flatnonzero(np.isnan(values))
        if len(miss):
            with st.timed("score"):
                logits = score_pairs(ctx.model, ctx.pair_input(pairs.qrow[lo:hi][miss], pairs.prow[lo:hi][miss]),
                                     batch_tokens=sc.batch_tokens, precision=str(sc.precision),
                                     show_progress=len(todo) == 1, desc=f"score chunk {b}")
            logits = np.asarray(logits, dtype=np.float32).reshape(-1)
            if len(logits) != len(miss) or not np.isfinite(logits).all():
                raise StageError(f"score: the cross-encoder returned {len(logits)} values (non-finite: "
                                 f"{int((~np.isfinite(logits)).sum())}) for {len(miss)} pairs in chunk {b}")
            values[miss] = logits
            if ctx.cache is not None:
                take = pa.array(miss)
                ctx.cache.append(pa.table({"qid": chunk.column("qid").take(take), "pid": chunk.column("pid").take(take),
                                           "ce_score": pa.array(logits, pa.float32())}))
        write_parquet(pa.table({"qid": chunk.column("qid"), "pid": chunk.column("pid"),
                                "ce_score": pa.array(values, pa.float32())}), _chunk_file(out_dir, b))
        scored += len(miss)
        from_cache += (hi - lo) - len(miss)
        bar.update(hi - lo)
        if float(sc.debug_sleep_s) > 0:
            time.sleep(float(sc.debug_sleep_s))
        signals.stop_if_requested()
    bar.close()
    st.counts["pairs_scored"] = st.counts.get("pairs_scored", 0) + scored
    st.counts["pairs_from_cache"] = st.counts.get("pairs_from_cache", 0) + from_cache


def _merge(ctx: _Ctx, st: StageRun, dirs: list[Path]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [f for d in dirs for f in sorted(d.glob("chunk-*.parquet"))]
    expected = [_chunk_file(Path("."), b).name for b in range(ctx.n_blocks)]
    if [f.name for f in files] != expected:
        missing = sorted(set(expected) - {f.name for f in files})
        raise StageError(f"score: chunks missing or unexpected in {', '.join(map(str, dirs))} (missing: "
                         f"{missing[:5]}); rerun the stage")
    pairs, size = ctx.pairs, int(ctx.cfg.score.chunk_pairs)
    schema = pa.schema([("qid", pa.string()), ("pid", pa.string()), ("ce_score", pa.float32()),
                        ("is_positive", pa.bool_()), ("rank", pa.int32())])
    with st.timed("merge"), parquet_stream(st.file("scores.parquet"), schema) as write:
        for b, f in enumerate(files):  # chunk by chunk: the merged table is never in memory
            lo, hi = block_bounds(b, size, pairs.num_rows)
            chunk, expect = pq.read_table(f), pairs.table(lo, hi)
            if chunk.num_rows != hi - lo or not _same_pairs(chunk, expect):
                raise StageError(f"score: committed chunk {f} does not match the pair list (the retrieve result "
                                 "changed under the same key?); rerun with force=true")
            write(expect.append_column("ce_score", chunk.column("ce_score").cast(pa.float32())))
    if any((d.parent / "manifest.json").exists() and d.parent.parent.name == "parts" for d in dirs):
        for key in ("pairs_scored", "pairs_from_cache"):
            st.counts[key] = sum(read_manifest(d.parent).get("counts", {}).get(key, 0) for d in dirs)
    positives = int(pairs.is_positive.sum())
    st.counts.update({"pairs": pairs.num_rows, "positive_pairs": positives, "queries": len(ctx.queries),
                      "candidate_pairs": int((pairs.rank > 0).sum())})
    st.extra.update({"cross_encoder": ctx.spec, "activation": activation_name(ctx.model),
                     "max_length": int(getattr(ctx.model, "max_length", 0) or 0) or None,
                     "retrieve": str(ctx.retrieve), "depth": ctx.cfg.score.depth,
                     "pair_cache": str(ctx.cache.folder) if ctx.cache else None})
    log.info("score: %d pairs (%d positives) -> %s", pairs.num_rows, positives, st.file("scores.parquet"))


def _same_pairs(a: Any, b: Any) -> bool:
    import pyarrow.compute as pc

    return bool(pc.all(pc.equal(a.column("qid"), b.column("qid"))).as_py()) and \
        bool(pc.all(pc.equal(a.column("pid"), b.column("pid"))).as_py())
