"""`stage=retrieve`: the v2 bi-encoder's top-k passages for every training query -> candidates.parquet, run.trec.

The corpus is encoded block by block straight into a float16 .npy (``corpus_emb.f16.npy``, rows in corpus order,
ids in ``corpus_ids.txt``; searched as a read-only memmap), so it is never held in RAM; each committed block leaves
a marker, so a killed run resumes at the next block. Queries are encoded and searched exactly (pipeline.search)
block by block, each block committed as parquet. Positives are kept here; the mine stage decides what a negative is.

Sharding (shard.count=n, shard.index=i, see pipeline.shards): a shard encodes corpus blocks -- its own share
first, then any block nobody holds (blocks are locked while encoded, so concurrent shards split the work and a
lone shard does it all) -- and then searches its contiguous range of query blocks. Every block is computed the
same way whoever computes it, so the merged candidates.parquet is byte-identical to a single run's.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pipeline import validate
from pipeline.artifacts import (StageError, StageRun, atomic_path, claim_weights, folder_lock,
                                stage_force_id)
from pipeline.config import plain
from pipeline.models import load_bi_encoder, model_identity
from pipeline.shards import (COMPUTE_RECORD, block_bounds, n_blocks, parquet_stream, run_sharded, shard_blocks,
                             shard_settings, try_lock, write_parquet)
from pipeline import signals
from pipeline.stages import common

log = logging.getLogger(__name__)

EMB_FILE = common.EMB_FILE
EMB_BLOCKS = "corpus_emb.blocks"
IDS_FILE = "corpus_ids.txt"


def train_data_identity(cfg: DictConfig) -> dict[str, Any]:
    """What the training side of the data is: the contents of the corpus and training files and the settings
    that change what is read from them, but not the evaluation sets (changing those must not re-retrieve) and not
    where the files lie (a copy elsewhere keys the same artifacts)."""
    from pipeline.readers import corpus_source_fingerprint, sources_by_content

    data = cfg.data
    # data.max_missing_qrels is left out: a check that passes or stops, it never changes what is read
    return {"corpus": corpus_source_fingerprint(str(data.corpus)), "repair_encoding": bool(data.repair_encoding),
            "empty_text": str(data.empty_text), "train": sources_by_content(plain(data.train), ("queries", "qrels"))}


def identity(cfg: DictConfig) -> dict[str, Any]:
    return {
        "retrieve": plain(cfg.retrieve),
        "data": train_data_identity(cfg),
        "bi_encoder": model_identity(str(cfg.model.bi_encoder)),
        "similarity": str(cfg.model.similarity),
        "query_prompt": cfg.model.query_prompt,
        "corpus_prompt": cfg.model.corpus_prompt,
    }


def label(cfg: DictConfig) -> str:
    return f"{cfg.data.name}-{cfg.model.name}"


@dataclass
class _Ctx:
    cfg: DictConfig
    final: Path
    corpus: Any
    qids: list[str]
    qtexts: list[str]
    n_blocks: int
    _model: Any = None
    _facts: dict[str, Any] | None = None

    @property
    def model(self) -> Any:
        if self._model is None:
            from pipeline import engine

            cfg = self.cfg
            device = common.stage_device(cfg)
            self._model = load_bi_encoder(str(cfg.model.bi_encoder), device=device,
                                          artifacts_root=str(common.artifacts_root(cfg)),
                                          max_seq_length=cfg.retrieve.max_seq_length)
            claim_weights(self.final, str(cfg.model.bi_encoder))
            sim = str(cfg.model.similarity)
            dot = sim == "dot" or (sim == "auto" and engine.uses_dot_product(self._model))
            corpus_prompt = common.resolve_prompt(self._model, cfg.model.corpus_prompt, "document")
            max_len = int(getattr(self._model, "max_seq_length", 0) or 0)
            self._facts = {"similarity_used": "dot" if dot else "cosine",
                           "query_prompt": common.resolve_prompt(self._model, cfg.model.query_prompt, "query"),
                           "corpus_prompt": corpus_prompt, "max_seq_length": max_len,
                           "embedding_key": common.embedding_key(str(cfg.model.bi_encoder), self.corpus, corpus_prompt,
                                                                 not dot, max_len, str(cfg.retrieve.precision),
                                                                 device)}
        return self._model

    @property
    def facts(self) -> dict[str, Any]:
        _ = self.model
        return self._facts

    def encode(self, texts: Any, role: str, desc: str, progress: bool) -> np.ndarray:
        from pipeline.engine import encode_texts

        rc = self.cfg.retrieve
        facts = self.facts
        return encode_texts(self.model, texts, prompt=facts[f"{role}_prompt"],
                            normalize=facts["similarity_used"] == "cosine", batch_tokens=rc.batch_tokens,
                            precision=str(rc.precision), show_progress=progress, desc=desc)


@validate.checked
def run(cfg: DictConfig) -> Path:
    return run_sharded(cfg, "retrieve", identity(cfg), label(cfg), prepare=lambda final: _prepare(cfg, final),
                       work=_work, merge=_merge, precision=cfg.retrieve.precision)


def _prepare(cfg: DictConfig, final: Path) -> _Ctx:
    corpus = common.load_corpus(cfg)
    queries, _, _ = common.training_set(cfg, corpus)
    if not queries:
        raise StageError(f"data={cfg.data.name}: no training query has a positive in the corpus; nothing to retrieve")
    qids = list(queries)
    blocks = n_blocks(len(qids), int(cfg.retrieve.query_block))
    return _Ctx(cfg, final, corpus, qids, [queries[q] for q in qids], blocks)


# --------------------------------------------------------------------------------------------- corpus


def _block_done(final: Path, lo: int, hi: int) -> bool:
    return common.rows_committed(final / EMB_BLOCKS, lo, hi)


def encode_corpus(ctx: _Ctx, st: StageRun) -> np.ndarray:
    """Every corpus block encoded into the shared memmap (own share first, then unclaimed blocks, then waiting
    for blocks other live shards hold); returns the read-only memmap."""
    from tqdm.auto import tqdm

    cfg, final, corpus = ctx.cfg, ctx.final, ctx.corpus
    n, block = len(corpus), int(cfg.retrieve.encode_block)
    total = n_blocks(n, block)
    index, count = shard_settings(cfg)
    mine = shard_blocks(total, index, count)
    order = list(mine) + [b for b in range(total) if b not in mine]
    if common.forget_rows_of_a_missing_file(final / EMB_FILE, final / EMB_BLOCKS):
        log.warning("retrieve: %s was missing beside its row markers; encoding every block again", final / EMB_FILE)
    todo = [b for b in order if not _block_done(final, *block_bounds(b, block, n))]
    done_rows = n - sum(block_bounds(b, block, n)[1] - block_bounds(b, block, n)[0] for b in todo)
    encoded = 0
    bar = tqdm(total=n, initial=done_rows, desc="encode corpus", unit=" passages", smoothing=0.1,
               disable=not todo)
    waited = 0.0
    store = None
    if todo and done_rows == 0 and _link_corpus(ctx, total):
        st.extra["corpus_embeddings_linked"] = True
        todo = []
    if todo:
        with st.timed("token_store"):
            store = common.token_store(cfg, corpus, ctx.model, ctx.facts["corpus_prompt"])
        st.extra["token_store"] = str(store.folder) if store is not None else None
    while todo:
        busy = []
        for b in todo:
            lo, hi = block_bounds(b, block, n)
            if _block_done(final, lo, hi):
                continue
            with try_lock(final / EMB_BLOCKS / f"block-{b:06d}.lock") as held:
                if not held:
                    busy.append(b)
                    continue
                if _block_done(final, lo, hi):  # finished by another shard between the checks
                    continue
                with st.timed("encode_corpus"):
                    emb = ctx.encode(common.corpus_rows(corpus, store, lo, hi), "corpus",
                                     desc=f"encode corpus {lo:,}+", progress=total == 1)
                    common.write_embedding_rows(final / EMB_FILE, n, lo, emb, final / EMB_BLOCKS)
                    del emb
                common.commit_rows(final / EMB_BLOCKS, lo, hi)
                encoded += hi - lo
                bar.update(hi - lo)
            signals.stop_if_requested()
        todo = busy
        if todo:  # held by other live shards: wait for them rather than encode twice
            if waited == 0.0:
                log.info("retrieve: waiting for %d corpus blocks that other shards are encoding", len(todo))
            time.sleep(2.0)
            signals.stop_if_requested()
            waited += 2.0
    bar.close()
    st.counts["corpus_rows_encoded_here"] = st.counts.get("corpus_rows_encoded_here", 0) + encoded
    emb = np.load(final / EMB_FILE, mmap_mode="r")
    if emb.shape[0] != n:
        raise StageError(f"{final / EMB_FILE}: {emb.shape[0]} rows for a corpus of {n}; force=true rebuilds it")
    return emb


def _link_corpus(ctx: _Ctx, total: int) -> bool:
    """Before any block is encoded: link the embeddings of a complete evaluate (or retrieve) folder with this
    encode's key (the v2 evaluated before the chain, or the model an earlier iteration trained and evaluated) and
    mark every block done, so no shard encodes. Under the blocks' folder lock: concurrent shards link once. The
    markers go first: a kill between them and the link leaves markers without a file, which the next encode
    forgets (the other order left a linked file that a rerun wrote its missing blocks into)."""
    final = ctx.final
    root, key = common.artifacts_root(ctx.cfg), ctx.facts["embedding_key"]
    (final / EMB_BLOCKS).mkdir(parents=True, exist_ok=True)
    with folder_lock(final / EMB_BLOCKS, wait_s=600):
        if (final / EMB_FILE).exists():  # a shard already created or linked it
            return False
        source = common.reusable_embeddings(root, key, final, stage_force_id() if ctx.cfg.force else None)
        if source is None:
            return False
        n, block = len(ctx.corpus), int(ctx.cfg.retrieve.encode_block)
        for b in range(total):
            common.commit_rows(final / EMB_BLOCKS, *block_bounds(b, block, n))
        common.link_embeddings(root, key, final / EMB_FILE, final, source=source)
    return True


# --------------------------------------------------------------------------------------------- queries


def _qblock_file(out_dir: Path, b: int) -> Path:
    return out_dir / f"block-{b:06d}.parquet"


@signals.deferred()  # a SIGTERM/SIGUSR1/SIGUSR2 stops the run after the block in progress is committed
def _work(ctx: _Ctx, st: StageRun, blocks: range, out_dir: Path) -> None:
    from tqdm.auto import tqdm

    from pipeline.search import search

    cfg = ctx.cfg
    rc = cfg.retrieve
    todo = [b for b in blocks if not _qblock_file(out_dir, b).exists()]
    emb = encode_corpus(ctx, st)
    if not todo:
        return
    k = min(int(rc.top_k), emb.shape[0])
    qb = int(rc.query_block)
    ids = ctx.corpus.table.column("id")
    backend = str(rc.backend)
    # faiss builds its index on every call: give it all of this shard's queries at once
    kw = {"device": common.stage_device(cfg), "show_progress": False} if backend == "torch" else {}
    groups = [[b] for b in todo] if backend == "torch" else [todo]
    n_rows = sum(block_bounds(b, qb, len(ctx.qids))[1] - block_bounds(b, qb, len(ctx.qids))[0] for b in todo)
    bar = tqdm(total=n_rows, desc="retrieve", unit=" queries", smoothing=0.1)
    for group in groups:
        bounds = [block_bounds(b, qb, len(ctx.qids)) for b in group]
        with st.timed("encode_queries"):
            q_emb = np.concatenate([ctx.encode(ctx.qtexts[lo:hi], "query", desc=f"encode queries {lo:,}+",
                                               progress=len(todo) == 1) for lo, hi in bounds])
        common.check_finite(q_emb, "query" if len(bounds) == 1 else "query (this shard's blocks, in order)",
                            first_row=bounds[0][0] if len(bounds) == 1 else 0)
        with st.timed("search"):
            scores, idx = search(q_emb, emb, k, backend=backend, **kw)
        scores, idx = np.asarray(scores, dtype=np.float32), np.asarray(idx, dtype=np.int64)
        at = 0
        for b, (lo, hi) in zip(group, bounds):
            table = _candidates_table(ctx.qids[lo:hi], ids, scores[at:at + hi - lo], idx[at:at + hi - lo])
            at += hi - lo
            write_parquet(table, _qblock_file(out_dir, b))
            bar.update(hi - lo)
            st.counts["queries_searched_here"] = st.counts.get("queries_searched_here", 0) + (hi - lo)
            signals.stop_if_requested()
    bar.close()


def _candidates_table(qids: list[str], ids: Any, scores: np.ndarray, idx: np.ndarray) -> Any:
    import pyarrow as pa

    nq, kk = idx.shape
    valid = (idx >= 0).reshape(-1)  # faiss_ivf may return fewer than k
    qpos = np.repeat(np.arange(nq), kk)[valid]
    return pa.table({
        "qid": pa.array(qids, pa.string()).take(pa.array(qpos)),
        "pid": ids.take(pa.array(idx.reshape(-1)[valid])).cast(pa.string()),
        "rank": pa.array(np.tile(np.arange(1, kk + 1, dtype=np.int32), nq)[valid], pa.int32()),
        "bi_score": pa.array(scores.reshape(-1)[valid], pa.float32()),
    })


def _merge(ctx: _Ctx, st: StageRun, dirs: list[Path]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [f for d in dirs for f in sorted(d.glob("block-*.parquet"))]
    names = [f.name for f in files]
    expected = [_qblock_file(Path("."), b).name for b in range(ctx.n_blocks)]
    if names != expected:
        missing = sorted(set(expected) - set(names))
        raise StageError(f"retrieve: query blocks missing or unexpected in {', '.join(map(str, dirs))} "
                         f"(missing: {missing[:5]}); rerun the stage")
    candidates = 0
    schema = pa.schema([("qid", pa.string()), ("pid", pa.string()), ("rank", pa.int32()), ("bi_score", pa.float32())])
    with st.timed("merge"):  # block by block: 500k queries x top-100 are never one table
        with parquet_stream(st.file("candidates.parquet"), schema) as write, \
                atomic_path(st.file("run.trec")) as tmp, open(tmp, "wb") as trec:
            for f in files:
                table = pq.read_table(f)
                write(table)
                write_trec(table, trec, tag=f"{ctx.cfg.model.name}")
                candidates += table.num_rows
        if not st.file(IDS_FILE).exists():
            write_lines(ctx.corpus.table.column("id"), st.file(IDS_FILE))
    n, block = len(ctx.corpus), int(ctx.cfg.retrieve.encode_block)
    for b in range(n_blocks(n, block)):
        if not _block_done(ctx.final, *block_bounds(b, block, n)):
            raise StageError(f"retrieve: corpus embedding block {b} is not marked complete; rerun the stage")
    st.counts.update({"queries": len(ctx.qids), "candidates": candidates, "corpus": len(ctx.corpus),
                      "top_k": int(ctx.cfg.retrieve.top_k)})
    st.extra.update({"corpus_fingerprint": ctx.corpus.fingerprint, "embeddings": EMB_FILE,
                     "embedding_dtype": "float16", "query_blocks": ctx.n_blocks})
    if ctx._facts is not None:
        st.extra.update(ctx._facts)
    if (ctx.final / COMPUTE_RECORD).is_file():  # the dtype every block was computed in (one, or the run refused)
        st.extra["computed_in"] = json.loads((ctx.final / COMPUTE_RECORD).read_text())
    log.info("retrieve: %d candidates for %d queries (top %d)", candidates, len(ctx.qids), int(ctx.cfg.retrieve.top_k))


def write_trec(table: Any, fh: Any, tag: str, batch: int = 1 << 20) -> None:
    """TREC run lines `qid Q0 pid rank score tag` of ``table`` onto the binary file ``fh``, built with Arrow string
    kernels (no per-line Python)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for lo in range(0, table.num_rows, batch):
        t = table.slice(lo, batch)
        lines = pc.binary_join_element_wise(
            t.column("qid"), " Q0 ", t.column("pid"), " ", pc.cast(t.column("rank"), pa.string()), " ",
            pc.cast(t.column("bi_score"), pa.string()), f" {tag}\n", "")
        _write_string_data(fh, lines)


def write_lines(column: Any, path: Path, batch: int = 1 << 20) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for lo in range(0, len(column), batch):
            _write_string_data(fh, pc.binary_join_element_wise(column.slice(lo, batch).cast(pa.string()), "\n", ""))


def _write_string_data(fh: Any, arr: Any) -> None:
    import pyarrow as pa

    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    for c in chunks:
        if len(c) == 0:
            continue
        c = c.cast(pa.large_string())
        offsets = np.frombuffer(c.buffers()[1], dtype=np.int64)[c.offset:c.offset + len(c) + 1]
        fh.write(memoryview(c.buffers()[2])[int(offsets[0]):int(offsets[-1])])
