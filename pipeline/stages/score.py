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
  the cross-encoder (model_identity), its max_length and the corpus/query fingerprints (the text of an id depends
  on the data), not by precision: another retrieval system, another depth or the next mining iteration reuses
  every logit already computed. The cache is append-only (atomic files written under a lock); reading it
  de-duplicates (qid, pid), keeping the lowest logit if two processes raced on one pair.
Sharding splits the chunks (see pipeline.shards); the merged scores.parquet equals a single run's.
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

from pipeline.artifacts import (
    StageError,
    StageRun,
    atomic_write_json,
    config_key,
    folder_lock,
    is_complete,
    read_manifest,
    require_complete,
)
from pipeline.config import plain
from pipeline.models import load_cross_encoder, model_identity
from pipeline.shards import block_bounds, n_blocks, run_sharded, write_parquet
from pipeline import signals
from pipeline.stages import common

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_NOT_IN_KEY = ("debug_sleep_s",)


# --------------------------------------------------------------------------------------------- inputs


def cross_encoder_spec(cfg: DictConfig) -> str:
    """model.cross_encoder, or the teacher stage's trained model when it is null."""
    if cfg.model.cross_encoder:
        return str(cfg.model.cross_encoder)
    return str(common.completed(cfg, "teacher") / "model")


def _cross_encoder_identity(cfg: DictConfig) -> dict[str, Any]:
    if cfg.model.cross_encoder:
        return model_identity(str(cfg.model.cross_encoder))
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

        ident = {"format": CACHE_FORMAT, "cross_encoder": model_identity(spec), "spec": spec,
                 "max_length": cfg.score.max_length, "corpus": corpus.fingerprint,
                 "queries": corpus_source_fingerprint(str(cfg.data.train.queries))}
        folder = Path(str(cfg.cache_root)).expanduser().resolve() / "ce_scores" / config_key(
            {k: v for k, v in ident.items() if k != "spec"}, 16)
        return cls(folder, ident)

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.parquet"))

    def lookup(self, qid: Any, pid: Any, group_rows: int = 4_000_000) -> np.ndarray:
        """Cached logit of every (qid[i], pid[i]), NaN where none; duplicates resolve to the lowest logit, so
        the answer never depends on file order."""
        import pyarrow as pa
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        n = len(qid)
        out = np.full(n, np.nan, dtype=np.float32)
        files = self.files()
        if not files or n == 0:
            return out
        left = pa.table({"qid": qid.cast(pa.string()), "pid": pid.cast(pa.string()),
                         "_i": pa.array(np.arange(n, dtype=np.int64))})
        groups: list[list[Path]] = [[]]
        rows = 0
        for f in files:
            m = pq.ParquetFile(f).metadata.num_rows
            if groups[-1] and rows + m > group_rows:
                groups.append([])
                rows = 0
            groups[-1].append(f)
            rows += m
        for group in groups:
            right = ds.dataset([str(f) for f in group], format="parquet").to_table(columns=["qid", "pid", "ce_score"])
            right = right.cast(pa.schema([("qid", pa.string()), ("pid", pa.string()), ("ce_score", pa.float32())]))
            hit = left.join(right, keys=["qid", "pid"], join_type="inner")
            if hit.num_rows:
                np.fmin.at(out, hit.column("_i").to_numpy(), hit.column("ce_score").to_numpy())
        return out

    def append(self, table: Any) -> None:
        with folder_lock(self.folder, wait_s=600):
            write_parquet(table, self.folder / f"chunk-{time.time_ns():020d}-{os.getpid()}.parquet")


# --------------------------------------------------------------------------------------------- pairs


def build_pairs(cands: Any, query_order: list[str], positives: dict[str, list[str]], depth: int | None) -> Any:
    """(qid, pid, is_positive, rank): per query in `query_order`, its candidates (rank <= depth) in rank order,
    then its positives that were not among them. Vectorised over Arrow columns and integer codes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.stages.mine import _member, _numpy

    qvocab = pa.array(query_order, pa.string())
    if depth is not None:
        cands = cands.filter(pc.less_equal(cands.column("rank"), depth))
    cq = _numpy(pc.fill_null(pc.index_in(cands.column("qid").cast(pa.string()), value_set=qvocab), -1), np.int64)
    if (cq < 0).any():
        cands, cq = cands.filter(pa.array(cq >= 0)), cq[cq >= 0]
    rank = _numpy(cands.column("rank"), np.int64)
    if len(rank):
        key = cq * (int(rank.max()) + 1) + rank
        if np.any(key[1:] <= key[:-1]):
            order = np.argsort(key, kind="stable")
            if np.any(np.diff(key[order]) == 0):
                raise StageError("the retrieve result lists a rank twice for one query")
            cands, cq, rank = cands.take(pa.array(order)), cq[order], rank[order]
    pos_q = np.array([i for i, q in enumerate(query_order) for _ in positives.get(q, ())], dtype=np.int64)
    pos_p = pa.array([p for q in query_order for p in positives.get(q, ())], pa.string())
    pvocab = pc.unique(pos_p) if len(pos_p) else pa.array([], pa.string())
    V = max(len(pvocab), 1)
    pos_keys = pos_q * V + _numpy(pc.index_in(pos_p, value_set=pvocab), np.int64)
    cand_pc = _numpy(pc.fill_null(pc.index_in(cands.column("pid").cast(pa.string()), value_set=pvocab), -1), np.int64)
    cand_keys = np.where(cand_pc >= 0, cq * V + cand_pc, -1)
    cand_is_pos = _member(cand_keys, np.unique(pos_keys))
    missing = ~_member(pos_keys, np.unique(cand_keys[cand_pc >= 0]))
    q_all = np.concatenate([cq, pos_q[missing]])
    order = np.argsort(q_all, kind="stable")
    pid_all = pa.chunked_array([c for c in cands.column("pid").cast(pa.string()).chunks]
                               + [pos_p.filter(pa.array(missing))], type=pa.string()).combine_chunks()
    rank_all = np.concatenate([rank, np.zeros(int(missing.sum()), np.int64)])
    take = pa.array(order)
    return pa.table({
        "qid": qvocab.take(pa.array(q_all[order])),
        "pid": pid_all.take(take),
        "is_positive": pa.array(np.concatenate([cand_is_pos, np.ones(int(missing.sum()), bool)])[order]),
        "rank": pa.array(rank_all[order].astype(np.int32), pa.int32(), mask=rank_all[order] == 0),
    })


# --------------------------------------------------------------------------------------------- stage


@dataclass
class _Ctx:
    cfg: DictConfig
    corpus: Any
    queries: dict[str, str]
    pairs: Any
    n_blocks: int
    spec: str
    cache: PairCache | None
    retrieve: Path
    _model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = load_cross_encoder(self.spec, device=common.stage_device(self.cfg),
                                             artifacts_root=str(common.artifacts_root(self.cfg)),
                                             max_length=self.cfg.score.max_length)
            labels = int(getattr(self._model, "num_labels", 1) or 1)
            if labels != 1:
                raise StageError(f"cross-encoder {self.spec} has {labels} labels; scoring needs a single-logit model")
        return self._model

    @functools.cached_property
    def token_stores(self) -> tuple[Any, list[str], dict[str, int], Any] | None:
        """(query token store, query texts, row of each query id, corpus token store) for the cross-encoder's
        tokenizer; None where token_cache is off or the model has no fast tokenizer (texts are passed then)."""
        from pipeline.tokens import TokenStore, build_workers, fast_tokenizer_json

        store = common.token_store(self.cfg, self.corpus, self.model)
        if store is None:
            return None
        qtexts = list(self.queries.values())
        queries = TokenStore.from_texts(fast_tokenizer_json(self.model), qtexts, workers=build_workers(len(qtexts)))
        return queries, qtexts, {q: i for i, q in enumerate(self.queries)}, store

    def pair_input(self, qids: list[str], pids: Any) -> Any:
        """The (query, passage) pairs of ``qids`` and ``pids`` (an Arrow string array) as cross-encoder input:
        a token-store view, or the texts."""
        if self.token_stores is None:
            texts = self.corpus.texts(pids.to_pylist())
            return [(self.queries[q], t) for q, t in zip(qids, texts)]
        from pipeline.tokens import PairTokens

        qstore, qtexts, qrow, store = self.token_stores
        prows = self.corpus.lookup_array(pids)
        if (prows < 0).any():
            raise StageError(f"score: {int((prows < 0).sum())} passage ids of the pair list are not in the corpus")
        return PairTokens(qstore, qtexts, np.fromiter((qrow[q] for q in qids), np.int64, len(qids)), store, prows,
                          self.corpus.texts_at)


def activation_name(model: Any) -> str:
    fn = getattr(model, "activation_fn", None)
    if fn is None:
        return "Identity"
    cls = type(fn)
    return f"{cls.__module__}.{cls.__qualname__}" if not cls.__module__.startswith("torch.nn.modules") \
        else f"torch.nn.{cls.__qualname__}"


def run(cfg: DictConfig) -> Path:
    sc = cfg.score
    if sc.depth is not None and int(sc.depth) < 1:
        raise ValueError(f"score.depth must be >= 1 or null, got {sc.depth}")
    if int(sc.chunk_pairs) < 1:
        raise ValueError(f"score.chunk_pairs must be >= 1, got {sc.chunk_pairs}")
    return run_sharded(cfg, "score", identity(cfg), label(cfg), prepare=lambda final: _prepare(cfg),
                       work=_work, merge=_merge)


def _prepare(cfg: DictConfig) -> _Ctx:
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
    cands = pq.read_table(rdir / "candidates.parquet", columns=["qid", "pid", "rank"])
    pairs = build_pairs(cands, list(queries), positives, cfg.score.depth)
    cache = PairCache.for_config(cfg, spec, corpus) if cfg.score.use_cache else None
    return _Ctx(cfg, corpus, queries, pairs, n_blocks(pairs.num_rows, int(cfg.score.chunk_pairs)), spec, cache, rdir)


def _chunk_file(out_dir: Path, b: int) -> Path:
    return out_dir / f"chunk-{b:06d}.parquet"


@signals.deferred()  # a SIGTERM/SIGUSR1/SIGUSR2 stops the run after the chunk in progress is committed
def _work(ctx: _Ctx, st: StageRun, blocks: range, out_dir: Path) -> None:
    import pyarrow as pa
    from tqdm.auto import tqdm

    from pipeline.engine import score_pairs

    sc = ctx.cfg.score
    n, size = ctx.pairs.num_rows, int(sc.chunk_pairs)
    todo = [b for b in blocks if not _chunk_file(out_dir, b).exists()]
    if not todo:
        return
    with st.timed("cache_lookup"):
        cached = ctx.cache.lookup(ctx.pairs.column("qid"), ctx.pairs.column("pid")) if ctx.cache else \
            np.full(n, np.nan, dtype=np.float32)
    total = sum(block_bounds(b, size, n)[1] - block_bounds(b, size, n)[0] for b in todo)
    hits = sum(int((~np.isnan(cached[slice(*block_bounds(b, size, n))])).sum()) for b in todo)
    log.info("score: %d chunks to do (%d pairs, %d of them cached)", len(todo), total, hits)
    with st.timed("token_store"):
        stores = ctx.token_stores if total > hits else None
    st.extra["token_store"] = str(stores[3].folder) if stores is not None else None
    bar = tqdm(total=total, desc="score pairs", unit=" pairs", smoothing=0.1)
    scored = from_cache = 0
    for b in todo:
        lo, hi = block_bounds(b, size, n)
        sub = ctx.pairs.slice(lo, hi - lo)
        values = cached[lo:hi].copy()
        miss = np.flatnonzero(np.isnan(values))
        if len(miss):
            take = pa.array(miss)
            qids = sub.column("qid").take(take).to_pylist()
            pid_array = sub.column("pid").take(take)
            pids = pid_array.to_pylist()
            with st.timed("score"):
                logits = score_pairs(ctx.model, ctx.pair_input(qids, pid_array),
                                     batch_tokens=sc.batch_tokens, precision=str(sc.precision),
                                     show_progress=len(todo) == 1, desc=f"score chunk {b}")
            logits = np.asarray(logits, dtype=np.float32).reshape(-1)
            if len(logits) != len(miss) or not np.isfinite(logits).all():
                raise StageError(f"score: the cross-encoder returned {len(logits)} values (non-finite: "
                                 f"{int((~np.isfinite(logits)).sum())}) for {len(miss)} pairs in chunk {b}")
            values[miss] = logits
            if ctx.cache is not None:
                ctx.cache.append(pa.table({"qid": pa.array(qids, pa.string()), "pid": pa.array(pids, pa.string()),
                                           "ce_score": pa.array(logits, pa.float32())}))
        write_parquet(pa.table({"qid": sub.column("qid"), "pid": sub.column("pid"),
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
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = [f for d in dirs for f in sorted(d.glob("chunk-*.parquet"))]
    expected = [_chunk_file(Path("."), b).name for b in range(ctx.n_blocks)]
    if [f.name for f in files] != expected:
        missing = sorted(set(expected) - {f.name for f in files})
        raise StageError(f"score: chunks missing or unexpected in {', '.join(map(str, dirs))} (missing: "
                         f"{missing[:5]}); rerun the stage")
    with st.timed("merge"):
        chunks = pa.concat_tables([pq.read_table(f) for f in files]) if files else \
            pa.table({"qid": pa.array([], pa.string()), "pid": pa.array([], pa.string()),
                      "ce_score": pa.array([], pa.float32())})
        pairs = ctx.pairs
        if chunks.num_rows != pairs.num_rows or (chunks.num_rows and not _same_pairs(chunks, pairs)):
            raise StageError("score: the committed chunks do not match the pair list (the retrieve result changed "
                             "under the same key?); rerun with force=true")
        table = pa.table({"qid": pairs.column("qid"), "pid": pairs.column("pid"),
                          "ce_score": chunks.column("ce_score").cast(pa.float32()),
                          "is_positive": pairs.column("is_positive"), "rank": pairs.column("rank")}).combine_chunks()
        write_parquet(table, st.file("scores.parquet"))
    if any((d.parent / "manifest.json").exists() and d.parent.parent.name == "parts" for d in dirs):
        for key in ("pairs_scored", "pairs_from_cache"):
            st.counts[key] = sum(read_manifest(d.parent).get("counts", {}).get(key, 0) for d in dirs)
    positives = int(pc.sum(pairs.column("is_positive")).as_py() or 0)
    st.counts.update({"pairs": pairs.num_rows, "positive_pairs": positives, "queries": len(ctx.queries),
                      "candidate_pairs": int(pairs.num_rows - pc.sum(pc.is_null(pairs.column("rank"))).as_py())})
    st.extra.update({"cross_encoder": ctx.spec, "activation": activation_name(ctx.model),
                     "max_length": int(getattr(ctx.model, "max_length", 0) or 0) or None,
                     "retrieve": str(ctx.retrieve), "depth": ctx.cfg.score.depth,
                     "pair_cache": str(ctx.cache.folder) if ctx.cache else None})
    log.info("score: %d pairs (%d positives) -> %s", pairs.num_rows, positives, st.file("scores.parquet"))


def _same_pairs(a: Any, b: Any) -> bool:
    import pyarrow.compute as pc

    return bool(pc.all(pc.equal(a.column("qid"), b.column("qid"))).as_py()) and \
        bool(pc.all(pc.equal(a.column("pid"), b.column("pid"))).as_py())
