"""`stage=train`: fine-tune the v2 bi-encoder into v3 on mined hard negatives.

SentenceTransformerTrainer with MultipleNegativesRankingLoss (cosine x 20) over (query, positive, hard negative),
starting from the v2 weights, as the published train_bi-encoder_mnrl.py did. That script gave every query a fresh
(positive, negative) each epoch, rotating through its positives and its shuffled negatives; the newer trainer lost
this (it freezes one triplet per query). Here the rotation is restored without giving up the trainer's resume:
the per-epoch datasets are built up front from the mine stage's pools (seeded, so a rerun builds the same rows),
concatenated, and trained in one pass by a sampler that walks the epoch blocks in order with a no-duplicates
shuffle inside each. A resume after a crash skips into the exact batch of the exact block.

Several processes (`torchrun --nproc_per_node=N -m pipeline stage=train ...`, gloo on CPU, nccl on CUDA): rank 0
(global) owns the stage folder -- lock, skip decision, evaluation before and after, the saved model, model card,
manifest and `_COMPLETE` -- and tells the other ranks whether to skip or train and from which checkpoint
(pipeline/distributed.py). Every rank builds the same seeded rotation (rank 0 checks a digest of it) and trains
through SentenceTransformerTrainer, which runs DDP from torchrun's environment; inside the trainer only its own
main-process logic writes checkpoints (each rank adds its rng_state_<rank>.pth), and no rank other than 0 touches
the folder once training is over. `train.batch_size` is the batch of one optimizer step across all ranks
(the effective batch): each of the N ranks takes batch_size / N rows of every no-duplicates batch, so N ranks
with gathered in-batch negatives (train.gather_across_devices) train on the very batches one process would.

Output: `model/` (SentenceTransformer dir, safetensors, README.md model card), `metrics.json` (before/after),
`checkpoints/` while training (removed at the end unless train.keep_checkpoints).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pipeline import validate
from pipeline.artifacts import (StageError, atomic_path, atomic_write_json, atomic_write_text, claim_weights,
                                open_stage, read_manifest)
from pipeline.config import plain
from pipeline.models import commit_note, hub_id, load_bi_encoder, loaded_spec, model_identity, resolve_device
from pipeline.stages import common
from pipeline.stages.retrieve import train_data_identity

log = logging.getLogger(__name__)

SIMILARITIES = ("cosine", "dot")
COLUMNS = ("query", "positive", "negative")


# --------------------------------------------------------------------------------------------- stage contract


def identity(cfg: DictConfig) -> dict[str, Any]:
    """What determines the trained weights. The world size (torchrun's process count) is not part of it:
    `train.batch_size` is the batch of one optimizer step whatever the number of ranks, and with gathered in-batch
    negatives (the default) N ranks see exactly the batches one process sees, so `python -m pipeline stage=train`
    and `torchrun --nproc_per_node=N -m pipeline stage=train` with the same config share one folder: either
    finds the other's result complete, and every later stage (run without torchrun) finds it too. Only ungathered
    negatives under several ranks train differently (each query ranks only its rank's batch_size / N rows): then
    that group size is part of the key."""
    return {
        "train": train_identity(cfg),
        "seed": int(cfg.seed),
        "data": train_data_identity(cfg),  # the eval sets change no weight: editing them must not retrain
        "bi_encoder": model_identity(str(cfg.model.bi_encoder)),
        "prompts": {"query": plain(cfg.model.query_prompt), "corpus": plain(cfg.model.corpus_prompt)},
        "mine": common.stage_dir(cfg, "mine").name,
    }


def train_identity(cfg: DictConfig, world: int | None = None) -> dict[str, Any]:
    """cfg.train for the key; `world` (default: this job's world size) matters only for ungathered negatives."""
    from pipeline import distributed

    section = plain(cfg.train)
    for bookkeeping in common.UNKEYED_TRAINING_SETTINGS:
        section.pop(bookkeeping, None)
    world = distributed.world_size() if world is None else int(world)
    if world > 1 and not section.get("gather_across_devices", True):
        section["in_batch_group"] = int(section["batch_size"]) // world
    return section


def per_device_batch_size(batch_size: int, world: int) -> int:
    """The rows each rank takes of a `batch_size` batch (the effective batch of one optimizer step)."""
    batch_size, world = int(batch_size), int(world)
    if batch_size < 1 or batch_size % world:
        raise StageError(f"train.batch_size={batch_size} is the batch of one optimizer step across all {world} "
                         f"ranks, so it must be a positive multiple of {world} (each rank takes batch_size / "
                         f"{world} rows); e.g. train.batch_size={max(1, batch_size // world) * world}")
    return batch_size // world


def label(cfg: DictConfig) -> str:
    return f"{cfg.data.name}-{cfg.model.name}"


def version_names(cfg: DictConfig) -> tuple[str, str]:
    """Table names of the model trained from and the model trained here: v2 -> v3, and in stage=all's later
    iterations (model.name ending in -it<k>) v<k+1> -> v<k+2>."""
    m = re.search(r"-it(\d+)$", str(cfg.model.name))
    k = int(m.group(1)) if m else 1
    return f"v{k + 1}", f"v{k + 2}"


def model_dir(cfg: DictConfig) -> Path:
    """The trained v3 model of this config (StageError when the train stage has not completed)."""
    return common.completed(cfg, "train") / "model"


# --------------------------------------------------------------------------------------------- the rotation


def load_pools(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """{qid: {"pos": [...], "neg": [...]}} from the mine stage's pools.parquet. Positives in file order;
    negatives in a fixed order (system, rank with missing ranks last, pid), de-duplicated across systems and never
    a positive of the query, so the rotation never depends on file order. Vectorised over integer codes (the v3
    recipe's pools are ~10M rows); each distinct passage id is one Python string, shared by every list holding it."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.stages.mine import _member, dictionary_codes

    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} is missing: the mine stage writes pools.parquet; rerun stage=mine")
    schema = pq.read_schema(path)
    names = schema.names
    missing = {"qid", "pid", "role"} - set(names)
    if missing:
        raise StageError(f"{path} lacks columns {sorted(missing)} (has {names})")
    table = pq.read_table(path, columns=[c for c in ("qid", "pid", "role", "system", "rank") if c in names],
                          read_dictionary=[c for c in ("role", "system")  # few distinct values: codes, not strings
                                           if c in names and pa.types.is_string(schema.field(c).type)])
    n = table.num_rows
    qid, pid = (table.column(c).cast(pa.string()) for c in ("qid", "pid"))
    role = table.column("role")
    is_pos = pc.fill_null(pc.equal(role, "pos"), False).to_numpy(zero_copy_only=False)
    is_neg = pc.fill_null(pc.equal(role, "neg"), False).to_numpy(zero_copy_only=False)
    if not (is_pos | is_neg).all():
        i = int(np.flatnonzero(~(is_pos | is_neg))[0])
        raise StageError(f"{path}: role {role[i].as_py()!r} for ({qid[i].as_py()}, {pid[i].as_py()}) is neither "
                         f"'pos' nor 'neg'")
    qvocab, qcode = dictionary_codes(qid)
    pvocab, pcode = dictionary_codes(pid)
    key = qcode.astype(np.int64) * max(len(pvocab), 1) + pcode
    # positives: the first row of each (query, passage), in file order
    pos_rows = np.flatnonzero(is_pos)
    pos_rows = np.sort(pos_rows[np.unique(key[pos_rows], return_index=True)[1]])
    pos_rows = pos_rows[np.argsort(qcode[pos_rows], kind="stable")]
    # negatives: ordered by (query, system, rank, pid); the first row of each (query, passage); no positive
    if "system" in names:
        system = table.column("system")
        system = pc.fill_null(system if pa.types.is_dictionary(system.type) else system.cast(pa.string()), "")
    else:
        system = pa.array([""] * n, pa.string())
    rank = pc.fill_null(table.column("rank").cast(pa.float64()), math.inf).to_numpy(zero_copy_only=False) \
        if "rank" in names else np.full(n, math.inf)
    svocab, scode = dictionary_codes(system)
    sys_order = _sort_order(svocab)[scode]
    neg_rows = np.flatnonzero(is_neg)
    neg_rows = neg_rows[np.lexsort((rank[neg_rows], sys_order[neg_rows], qcode[neg_rows]))]
    tied = _tied(qcode[neg_rows], sys_order[neg_rows], rank[neg_rows])
    if tied.any():  # same query, system and rank (missing ranks): the pid decides, compared as strings
        tie_codes = np.unique(pcode[neg_rows[tied]])
        by_id = np.zeros(len(pvocab), dtype=np.int64)
        by_id[tie_codes] = _sort_order(pvocab.take(pa.array(tie_codes)))
        neg_rows = neg_rows[np.lexsort((by_id[pcode[neg_rows]], rank[neg_rows], sys_order[neg_rows],
                                        qcode[neg_rows]))]
    first = np.zeros(len(neg_rows), dtype=bool)
    first[np.unique(key[neg_rows], return_index=True)[1]] = True
    neg_rows = neg_rows[first & ~_member(key[neg_rows], np.unique(key[pos_rows]))]

    ids = np.array(pvocab.to_pylist(), dtype=object)
    qids = qvocab.to_pylist()
    with _collector_paused():
        pools = {qids[q]: {"pos": [], "neg": []} for q in np.unique(qcode).tolist()}
        for role_name, rows in (("pos", pos_rows), ("neg", neg_rows)):
            if not len(rows):
                continue
            codes = qcode[rows]
            starts = np.r_[0, np.flatnonzero(np.diff(codes)) + 1]
            values = ids[pcode[rows]].tolist()
            for q, a, b in zip(codes[starts].tolist(), starts.tolist(), np.r_[starts[1:], len(rows)].tolist()):
                pools[qids[q]][role_name] = values[a:b]
    del table, qid, pid, role, system, pvocab, qvocab
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed buffers: 1.6 GB at 10M pool rows
    return pools


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while millions of acyclic lists and dicts are built: its passes over
    every object made so far took 28% of load_pools' time on 3M pool rows (9.1 s against 6.6 s)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _tied(*keys: np.ndarray) -> np.ndarray:
    """Rows (sorted by ``keys``) that share every key with a neighbour."""
    same = np.ones(max(len(keys[0]) - 1, 0), dtype=bool)
    for k in keys:
        same &= k[1:] == k[:-1]
    tied = np.zeros(len(keys[0]), dtype=bool)
    tied[:-1] |= same
    tied[1:] |= same
    return tied


def _sort_order(vocab: Any) -> np.ndarray:
    """The position of each distinct string in sorted order (Arrow sorts UTF-8 bytes: Python's code-point order)."""
    import pyarrow.compute as pc

    order = pc.sort_indices(vocab).to_numpy()
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    return position


def negative_sequence(negatives: Sequence[str], epochs: int, seed: int, qid: str) -> list[str]:
    """One negative per epoch: cycles through all of a query's negatives, each cycle in a fresh seeded shuffle
    (seed + cycle), and never the same negative twice in a row when there is more than one."""
    out: list[str] = []
    previous = None
    cycle = 0
    while len(out) < epochs:
        order = list(negatives)
        random.Random(f"{seed + cycle}:{qid}").shuffle(order)
        if len(order) > 1 and order[0] == previous:
            order.append(order.pop(0))
        out.extend(order)
        previous = order[-1]
        cycle += 1
    return out[:epochs]


def rotation(pools: Mapping[str, Mapping[str, Sequence[str]]], qids: Sequence[str], epochs: int,
             seed: int, per_query: int | None = 1) -> tuple[list[list[tuple[str, str, str]]], dict[str, int]]:
    """Per epoch, `per_query` (qid, positive, negative) triplets per query that has both (None: one per judged
    positive), each with the next positive in pool order and the next negative of `negative_sequence`; queries in
    the given order. per_query=1 is the published rotation (one triplet per query per epoch); collections with
    few queries and many judged passages per query (Cranfield, CISI, BEIR sets) need every positive each epoch."""
    if epochs < 1:
        raise ValueError(f"train.epochs must be >= 1, got {epochs}")
    if per_query is not None and per_query < 1:
        raise ValueError(f"train.triplets_per_query must be >= 1 or null, got {per_query}")
    kept, no_pool, no_pos, no_neg = [], 0, 0, 0
    for q in qids:
        pool = pools.get(q)
        if pool is None:
            no_pool += 1
        elif not pool["pos"]:
            no_pos += 1
        elif not pool["neg"]:
            no_neg += 1
        else:
            kept.append(q)
    epochs_rows: list[list[tuple[str, str, str]]] = [[] for _ in range(epochs)]
    for q in kept:
        positives = pools[q]["pos"]
        n = len(positives) if per_query is None else min(per_query, len(positives))
        negs = negative_sequence(pools[q]["neg"], epochs * n, seed, q)
        for e in range(epochs):
            for j in range(n):
                epochs_rows[e].append((q, positives[(e * n + j) % len(positives)], negs[e * n + j]))
    stats = {"queries": len(kept), "epochs": epochs, "triplets": sum(len(rows) for rows in epochs_rows),
             "skipped_no_pool": no_pool, "skipped_no_positive": no_pos, "skipped_no_negative": no_neg}
    return epochs_rows, stats


def rotation_dataset(epochs_rows: Sequence[Sequence[tuple[str, str, str]]], queries: Mapping[str, str], corpus):
    """The concatenated epochs as a datasets.Dataset of ids whose rows read as texts (query, positive, negative):
    texts are looked up lazily in the memory-mapped corpus, so 10 epochs of MS MARCO stay a few ids per row."""
    from datasets import Dataset

    flat = [row for rows in epochs_rows for row in rows]
    missing = sorted({q for q, _, _ in flat if q not in queries})
    if missing:
        raise StageError(f"{len(missing)} mined queries have no text in the training queries, e.g. {missing[:5]}")
    pids = sorted({p for _, a, b in flat for p in (a, b)})
    absent = [p for p, r in zip(pids, corpus.lookup(pids)) if r < 0]
    if absent:
        raise StageError(f"{len(absent)} mined passages are not in the corpus, e.g. {absent[:5]}; "
                         f"was the mine stage run on another corpus?")
    ds = Dataset.from_dict({c: [row[i] for row in flat] for i, c in enumerate(COLUMNS)})

    def to_text(batch: dict[str, list[str]]) -> dict[str, list[str]]:
        return {"query": [queries[q] for q in batch["query"]],
                "positive": corpus.texts(batch["positive"]),
                "negative": corpus.texts(batch["negative"])}

    return ds.with_transform(to_text)


# --------------------------------------------------------------------------------------------- batch samplers


class _Block:
    """A read-only window [lo, lo + n) of a dataset, for a sampler that only needs len() and rows."""

    def __init__(self, dataset, lo: int, n: int):
        self.dataset, self.lo, self.n = dataset, lo, n
        self.column_names = list(dataset.column_names)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.dataset[self.lo + int(index)]


def _no_duplicates_sampler_cls():
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    return NoDuplicatesBatchSampler


def _default_batch_sampler_cls():
    from sentence_transformers.base.sampler import DefaultBatchSampler

    return DefaultBatchSampler


def make_rotation_sampler(block_size: int, world_size: int = 1, seed: int = 0):
    """A `batch_sampler` factory for the trainer: epoch blocks of `block_size` rows, in order, each shuffled
    with the no-duplicates rule (seed + block), so each block is one epoch of the rotation. With several ranks
    the trainer asks for the per-device batch; the batches are drawn at per-device x world_size and cut into one
    slice per rank (see RotationBatchSampler). The order's seed is bound here (train.seed): sentence-transformers
    before 6.2 calls the factory with seed=0 whatever its args.seed, so the trainer's `seed` argument is ignored."""
    return _RotationSamplers(block_size=block_size, world_size=int(world_size), order_seed=int(seed))


class _RotationSamplers:
    """The trainer's batch-sampler factory: one RotationBatchSampler per (dataset, batch size, drop_last), kept,
    so that the batches planned for counting the steps (make_trainer) are the ones trained on."""

    def __init__(self, *, block_size: int, world_size: int, order_seed: int):
        self.block_size, self.world_size, self.order_seed = block_size, world_size, order_seed
        self.made: dict[tuple[int, int, bool], RotationBatchSampler] = {}

    def __getstate__(self) -> dict:  # the trainer pickles its arguments into every checkpoint: settings only
        return {k: v for k, v in self.__dict__.items() if k != "made"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, made={})

    def __deepcopy__(self, memo) -> "_RotationSamplers":  # a copy of the arguments trains on the same batches
        return self

    def __call__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns=None, generator=None,
                 seed: int | None = None) -> "RotationBatchSampler":
        key = (id(dataset), int(batch_size), bool(drop_last))
        if key not in self.made:  # the sampler holds the dataset: its id is not reused while kept here
            self.made[key] = RotationBatchSampler(dataset, batch_size * self.world_size, drop_last,
                                                  valid_label_columns, generator, self.order_seed,
                                                  block_size=self.block_size, world_size=self.world_size)
        return self.made[key]


class RotationBatchSampler:
    """Walks the per-epoch blocks of a concatenated rotation dataset in order, with the library's
    NoDuplicatesBatchSampler inside each block (so in-batch negatives are never a copy of a row's own texts).

    Several ranks (`world_size` > 1): `batch_size` is the batch of one optimizer step across all ranks. Each
    no-duplicates batch of that size is yielded as `world_size` consecutive equal slices; accelerate hands the
    i-th batch of the stream to rank i % world_size (BatchSamplerShard), so rank r trains on slice r of every
    batch, the ranks never share a row, and the rows gathered across ranks (MNRL gather_across_devices) are the
    whole duplicate-free batch -- the batch one process would train on. `all_gather` needs equal slices, so a
    short batch (a block's last, or one the no-duplicates rule could not fill) loses its len % world_size trailing
    rows (counted per pass in `rows_left_out`; world_size - 1 per short batch at most, usually one per epoch).
    `self.batch_size` is then None: accelerate's round-robin must pass the shorter slices on instead of waiting for
    full ones."""

    def __init__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns=None, generator=None,
                 seed: int = 0, *, block_size: int, world_size: int = 1):
        import torch

        n = len(dataset)
        if block_size <= 0 or n % block_size:
            raise ValueError(f"dataset of {n} rows is not a whole number of epoch blocks of {block_size}")
        if world_size < 1 or batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not a multiple of the world size {world_size}")
        self.world_size = int(world_size)
        self.global_batch_size = batch_size
        self.batch_size = batch_size if self.world_size == 1 else None
        self.drop_last, self.block_size = drop_last, block_size
        self.epoch = 0
        self.rows_left_out = 0
        NoDup = _no_duplicates_sampler_cls()
        self.blocks = [NoDup(_Block(dataset, lo, block_size), batch_size=batch_size, drop_last=drop_last,
                             valid_label_columns=valid_label_columns, generator=torch.Generator(), seed=seed + b)
                       for b, lo in enumerate(range(0, n, block_size))]
        self._batches: list[list[list[int]]] | None = None

    def planned(self) -> list[list[list[int]]]:
        """Each block's no-duplicates batches, drawn once and kept. The library's sampler can give more (smaller)
        batches than its __len__ says (a row that would repeat a text of the batch waits for a later one), and the
        trainer stops at __len__: the last batches were never trained (17 of the demo's 2,372 rows, 11% of a
        Cranfield run's), and the learning rate reached 0 early."""
        if self._batches is None:
            self._batches = [[list(batch) for batch in sampler] for sampler in self.blocks]
        return self._batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # the trainer runs one pass; the rotation's epochs are the blocks

    def __iter__(self) -> Iterator[list[int]]:
        w = self.world_size
        self.rows_left_out = 0  # in this pass
        for b, batches in enumerate(self.planned()):
            lo = b * self.block_size
            for batch in batches:
                rows = [lo + i for i in batch]
                if w == 1:
                    yield rows
                    continue
                per = len(rows) // w
                self.rows_left_out += len(rows) - per * w
                if per:
                    for r in range(w):
                        yield rows[r * per:(r + 1) * per]

    def __len__(self) -> int:
        """Exactly what __iter__ yields: a batch for one process; with several, one slice per rank of every batch
        with at least one row per rank."""
        w = self.world_size
        return sum(w if len(batch) >= w else 0 for batches in self.planned() for batch in batches)

    def steps(self) -> int:
        """Optimizer steps of one pass: the batches every rank trains on together."""
        return len(self) // self.world_size


# --------------------------------------------------------------------------------------------- trainer


def resolve_precision(precision: str, device: str) -> str:
    """auto: bf16 on CUDA with bf16 support, fp16 on older CUDA; on the CPU bf16 autocast where the CPU has native
    bf16 (AVX512-BF16 or AMX: all-MiniLM-L6-v2 trains 1.6x faster than in fp32 on 2 EPYC cores), else fp32."""
    from pipeline.models import precision_name

    precision = precision_name(precision)  # the spellings the inference stages accept (float32, half, ...)
    cuda = str(device).startswith("cuda")
    if precision == "auto":  # the inference engine's rule, so training and inference agree on every machine
        import torch

        from pipeline.engine import resolve_precision as engine_precision

        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[engine_precision("auto", device)]
    if precision == "fp16" and not cuda:
        raise StageError("fp16 training needs a CUDA device; on CPU use precision=bf16 or fp32")
    return precision


def mnrl_loss(model, scale: float = 20.0, similarity: str = "cosine", packed_by=None, compile_layers: bool = False):
    """MultipleNegativesRankingLoss; with `packed_by` (a primed PackedTripletCollator) its packed form, whose
    transformer layers are compiled where `compile_layers` (see pipeline/packing.py)."""
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    if similarity not in SIMILARITIES:
        raise ValueError(f"train.similarity={similarity!r} is not one of {', '.join(SIMILARITIES)}")
    fn = util.cos_sim if similarity == "cosine" else util.dot_score
    if packed_by is not None:
        from pipeline.packing import PackedMNRL

        return PackedMNRL(model, pos_offset=packed_by.pos_offset, pad_id=packed_by.pad_id, scale=float(scale),
                          similarity_fct=fn, compile_layers=compile_layers)
    return MultipleNegativesRankingLoss(model, scale=float(scale), similarity_fct=fn)


def packed_collator(model, dataset, device: str, precision: str, packing: str | bool = "auto",
                    prompts: dict[str, str] | None = None):
    """The packed collator when packed training can run here (pipeline/packing.py), else None (the library's
    collator and per-column padded forwards)."""
    from pipeline.packing import PackedTripletCollator, packing_plan

    use, why = packing_plan(model, device, precision, packing, prompted=bool(prompts))
    if not use:
        log.info("train: padded batches (%s)", why)
        return None
    collator = PackedTripletCollator(model, [c for c in dataset.column_names if c in COLUMNS] or COLUMNS, prompts)
    sample = dataset[: min(64, len(dataset))]
    rows = [dict(zip(sample, values)) for values in zip(*sample.values())]
    if not collator.prime(rows):
        if str(packing).lower() == "true":
            raise StageError("train.packing=true but the fast tokenisation differs from the model's preprocess")
        log.info("train: padded batches (fast tokenisation differs from the model's preprocess)")
        return None
    return collator


def warmup_for(total_steps: int, warmup_steps: int, warmup_ratio: float | None) -> int:
    """The published 1000 warm-up steps, capped at a fraction of the run so small data still trains."""
    steps = int(warmup_steps)
    if warmup_ratio is not None:
        steps = min(steps, int(math.ceil(float(warmup_ratio) * total_steps)))
    return max(0, steps)


def resolve_dataloader_workers(workers: int | str | None, device: str) -> int:
    """DataLoader workers for training. "auto": on CUDA, 4 (fewer where fewer than 8 cores are usable; with
    several ranks on one node each rank gets its share), so tokenising the next batches never stalls the GPU; on
    the CPU 0 (the cores are busy with the model itself)."""
    if workers is None or str(workers).lower() == "auto":
        if not str(device).startswith("cuda"):
            return 0
        from pipeline import distributed
        from pipeline.tokenizing import usable_cpus

        per_rank = usable_cpus() // max(1, distributed.local_world_size())
        return max(0, min(4, per_rank // 2 - 1))
    try:
        value = int(workers)
    except (TypeError, ValueError):
        raise ValueError(f"train.dataloader_workers must be auto or a number >= 0, got {workers!r}") from None
    if value < 0:
        raise ValueError(f"train.dataloader_workers must be auto or a number >= 0, got {workers!r}")
    return value


def _single_threaded_tokenizers_in_forked_workers() -> None:
    """DataLoader workers are forked from a process whose Rust tokenizer may already have run its thread pool
    (the engine, the packed collator's check). The pool's threads do not survive a fork: with
    TOKENIZERS_PARALLELISM=true a worker's batch encode waits on them forever; unset, the library only turns
    parallelism off after a warning. Each worker tokenises one batch at a time, so it is set off here, before
    the workers start (the engine's own tokeniser processes are separate programs and unaffected by a fork)."""
    import os

    if os.environ.get("TOKENIZERS_PARALLELISM", "").strip().lower() not in ("false", "0", "off", "no"):
        log.info("train: TOKENIZERS_PARALLELISM=false (DataLoader workers are forked; a tokenizer thread pool "
                 "does not survive a fork)")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def make_trainer(model, dataset, *, block_size: int, output_dir: str | Path, batch_size: int = 64,
                 lr: float = 2e-5, warmup_steps: int = 1000, warmup_ratio: float | None = 0.1,
                 weight_decay: float = 0.01, max_grad_norm: float = 1.0, scale: float = 20.0,
                 similarity: str = "cosine", precision: str = "auto", device: str = "auto",
                 max_steps: int | None = None, save_steps: int = 500, save_total_limit: int | None = 2,
                 logging_steps: int = 50, dataloader_workers: int | str = "auto", seed: int = 42,
                 report_to: str = "none", callbacks: Sequence[Any] = (), world_size: int | None = None,
                 packing: str | bool = "auto", compile_layers: bool = False, prompts: dict[str, str] | None = None):
    """The train stage's SentenceTransformerTrainer: one pass over the concatenated epoch blocks. `batch_size` is
    the batch of one optimizer step; under torchrun (`world_size`, default this job's) each rank takes
    batch_size / world_size rows of it.

    On CUDA the batches are tokenised by DataLoader worker processes (see :func:`resolve_dataloader_workers`) and
    handed over in pinned memory, copied without blocking; where variable-length attention runs (`packing`, see
    pipeline/packing.py) each batch is one packed forward. The host never waits on the device within a step (the
    trainer's per-step NaN check is off: a NaN loss shows in the logged loss instead of being averaged away).
    AdamW is the library's default, the fused implementation (one kernel per step). `compile_layers`: the packed
    path's transformer layers compiled with torch.compile (pipeline/packing.py; the stage's default,
    train.compile_layers, is on: on an H200 at batch 64 it lifted the step from 1,643-1,877 to 2,380-2,676
    triplets/s, session 12, where the eager step's 8% MFU said the passes between the matmuls dominate)."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from pipeline import distributed

    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    workers = resolve_dataloader_workers(dataloader_workers, device)
    cuda = device.startswith("cuda")
    if workers > 0:
        _single_threaded_tokenizers_in_forked_workers()
    world = distributed.world_size() if world_size is None else int(world_size)
    per_device = per_device_batch_size(batch_size, world)
    samplers = make_rotation_sampler(block_size, world, seed)
    total = samplers(dataset, per_device, False).steps()  # the batches the pass will train on, counted
    if max_steps:  # a stop before the end; past it the trainer would replay the pass from its start
        total = min(total, int(max_steps))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=1,  # the rotation's epochs are blocks of the one pass
        max_steps=total if max_steps else -1,
        per_device_train_batch_size=per_device,
        learning_rate=float(lr),
        warmup_steps=warmup_for(total, warmup_steps, warmup_ratio),
        weight_decay=float(weight_decay),
        max_grad_norm=float(max_grad_norm),
        lr_scheduler_type="linear",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not device.startswith("cuda"),
        batch_sampler=samplers,
        save_strategy="steps",
        save_steps=max(1, int(save_steps)),
        save_total_limit=save_total_limit,
        logging_steps=max(1, int(logging_steps)),
        logging_first_step=True,
        dataloader_num_workers=workers,
        dataloader_pin_memory=cuda,
        dataloader_persistent_workers=workers > 0,
        dataloader_prefetch_factor=4 if workers > 0 else None,
        accelerator_config={"non_blocking": cuda},
        logging_nan_inf_filter=False,
        seed=int(seed),
        data_seed=int(seed),
        report_to=report_to,
        eval_strategy="no",
        prompts=prompts or None,  # column -> prompt (the padded path's collator prepends them; the packed one too)
    )
    if int(args.world_size) != world:
        raise StageError(f"this job has {world} processes (torchrun's WORLD_SIZE) but the trainer set up "
                         f"{args.world_size}; device={device} cannot run distributed here")
    # sentence-transformers turns dataloader_drop_last on under DDP (an uneven last batch could hang a rank); the
    # rotation sampler hands every rank an equal slice of every batch, so the short last batch of each epoch block
    # is kept, as in one process.
    args.dataloader_drop_last = False
    collator = packed_collator(model, dataset, device, precision, packing, prompts)
    if compile_layers and collator is None:
        log.info("train: train.compile_layers applies to packed batches only; these are padded")
    loss = mnrl_loss(model, scale, similarity, packed_by=collator, compile_layers=bool(compile_layers))
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                      data_collator=collator, callbacks=[*callbacks, _plain_forward_after_training()])


def _plain_forward_after_training():
    """Accelerate wraps the model's forward in autocast for bf16/fp16 training and leaves it wrapped: the trained
    model would keep encoding in bf16 in this process while its saved copy encodes in fp32. Undone at the end, as
    are layers compiled for training (train.compile_layers)."""
    from transformers import TrainerCallback

    from pipeline.packing import release_compiled

    class PlainForward(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            original = getattr(model, "_original_forward", None) if model is not None else None
            if original is not None and "forward" in vars(model):
                model.forward = original
                del model._original_forward
            if model is not None:
                release_compiled(model)

    return PlainForward()


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose trainer_state.json (written last by the trainer's main process) is whole and
    whose torch files (optimizer, scheduler, each rank's rng_state_<rank>.pth) are whole zip archives (checked
    without loading them). Newer, half-written ones (a kill during saving) are removed so the trainer's own
    rotation never counts them. Under torchrun only rank 0 calls this; the other ranks resume from its answer."""
    import zipfile

    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        name = child.name
        if child.is_dir() and name.startswith("checkpoint-") and name[11:].isdigit():
            found.append((int(name[11:]), child))
    for _, child in sorted(found, reverse=True):
        try:
            json.loads((child / "trainer_state.json").read_text())
            broken = [f.name for f in child.iterdir() if f.suffix in (".pt", ".pth") and not zipfile.is_zipfile(f)]
            if broken:
                raise ValueError(f"truncated {broken}")
            return child
        except (OSError, ValueError):
            log.warning("removing incomplete checkpoint %s (interrupted while saving)", child)
            shutil.rmtree(child, ignore_errors=True)
    return None


# --------------------------------------------------------------------------------------------- the stage


@validate.checked
def run(cfg: DictConfig) -> Path:
    """One process, or every rank under torchrun: rank 0 runs the stage (`_lead`), the others follow it
    (`_follow`); see the module docstring and pipeline/distributed.py."""
    from pipeline import distributed

    world = distributed.world_size()
    per_device_batch_size(int(cfg.train.batch_size), world)  # a bad batch size fails on every rank alike, at once
    with distributed.coordinator(resolve_device(str(cfg.device))) as coord:
        if coord.leader:
            return _lead(cfg, coord)
        distributed.quiet_followers(coord.rank)
        return _follow(cfg, coord)


def _step_counter():
    """A trainer callback counting the optimizer steps this process ran (a resume runs only those past its
    checkpoint); transformers is imported when a stage trains, not with this module."""
    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    return StepCounter()


def check_loss_finite(history: list[dict[str, Any]], cfg: DictConfig) -> None:
    """A diverged run (a loss of nan or inf) is not saved as v3: its evaluation then blamed the precision."""
    bad = next((h for h in history if not math.isfinite(float(h["loss"]))), None)
    if bad is not None:
        raise StageError(f"train: the loss diverged ({bad['loss']} at step {bad['step']}) with train.lr={cfg.train.lr} "
                         f"at precision {cfg.train.precision}; nothing was saved. Lower train.lr (the published "
                         f"recipe: 2e-5) or raise train.warmup_steps")


def whole_run_loss(history: list[dict], last_step: int, fallback: float) -> float:
    """The mean training loss over every step up to ``last_step``, from the log history (each logged loss is the
    mean since the previous log; a log is forced at every save, the last one included: signals.stop_callback), which
    a resumed run carries over from its checkpoint. The trainer's own figure counts only the steps of its process,
    and transformers releases divide it differently (by those steps, or by every step). A history that stops short
    of ``last_step`` (a checkpoint written before that rule) leaves ``fallback``, with a warning."""
    covered, total = 0, 0.0
    for entry in history:
        step = int(entry["step"])
        if covered < step <= last_step:
            total += float(entry["loss"]) * (step - covered)
            covered = step
    if covered != last_step or last_step <= 0:
        log.warning("train: the loss log ends at step %d, not %d: train_loss is the trainer's own figure", covered,
                    last_step)
        return fallback
    return total / last_step


def _lead(cfg: DictConfig, coord) -> Path:
    """The stage proper (the only process, or rank 0): the folder, its lock, before/after, the model, the marker."""
    from pipeline import signals, tracking

    tc = cfg.train
    with open_stage("train", identity(cfg), root=common.artifacts_root(cfg), label=label(cfg), config=plain(cfg),
                    force=cfg.force, resumable=True, lock_wait_s=cfg.lock_wait_s) as st:
        if st.done:
            coord.tell("skip", path=str(st.path))
            return st.path
        mine_dir = common.completed(cfg, "mine")
        with st.timed("data"):
            dataset, stats, block_size, digest = _training_data(cfg, mine_dir)
        log.info("train: %d queries x %d epochs = %d triplets (rotation; skipped: %s)", stats["queries"],
                 stats["epochs"], stats["triplets"], skipped_text(stats))
        st.counts.update({"queries": stats["queries"], "triplets": stats["triplets"], "epochs": stats["epochs"]})

        with tracking.track(cfg, "train") as tracker:
            before = _load_or_eval_before(cfg, st.path) if tc.evaluate else None
            with st.timed("load_model"):
                model = _load_model(cfg)  # (builds a demo: model once, before the other ranks load it)
            claim_weights(st.path, str(cfg.model.bi_encoder))  # checkpoints of other weights are not resumed
            ckpt_dir = st.path / "checkpoints"
            resume = last_checkpoint(ckpt_dir)
            coord.tell("train", path=str(st.path), resume=str(resume) if resume else None, digest=digest,
                       model=loaded_spec(cfg.model.bi_encoder))  # the commit rank 0 loaded, not the moving name
            trainer = _make_stage_trainer(cfg, model, dataset, block_size, ckpt_dir)
            steps_here = _step_counter()
            trainer.add_callback(steps_here)
            st.extra["scale_out"] = signals.prepare_trainer(
                trainer, gather_across_devices=bool(tc.gather_across_devices))
            if resume is not None:
                planned = trainer.args.batch_sampler(dataset, trainer.args.per_device_train_batch_size,
                                                     False).steps()  # the sampler make_trainer counted
                log.info("train: resuming from %s (step %s of %d)", resume.name, resume.name[11:],
                         int(tc.max_steps) if tc.max_steps else planned)
            with st.timed("train"):
                started = time.perf_counter()
                with signals.training():
                    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
                seconds = time.perf_counter() - started
            coord.training_done()  # every rank left the trainer: the folder is rank 0's alone again
            signals.raise_if_training_stopped("train")
            history = [h for h in trainer.state.log_history if "loss" in h]
            check_loss_finite(history, cfg)
            summary = {
                "steps": int(trainer.state.global_step),
                "train_loss": round(whole_run_loss(history, int(trainer.state.global_step),
                                                   float(output.training_loss)), 5),
                "loss_first": history[0]["loss"] if history else None,
                "loss_last": history[-1]["loss"] if history else None,
                "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history],
                "seconds": round(seconds, 2),
                "triplets_per_s": round((trainer.state.global_step - (int(resume.name[11:]) if resume else 0))
                                        * int(tc.batch_size) / max(seconds, 1e-9), 1),
                "precision": resolve_precision(str(tc.precision), resolve_device(str(cfg.device))),
                "warmup_steps": int(trainer.args.warmup_steps),
                "resumed_from": resume.name if resume else None,
                "steps_this_run": steps_here.steps,  # after a resume: the steps past the checkpoint only
                "world_size": st.extra["scale_out"]["world_size"],
                "effective_batch_size": st.extra["scale_out"]["effective_batch_size"],
                # which forward trained: packed (with its first-batch check) or padded; compiled layers or eager
                "forward": getattr(trainer.loss, "mode", "library MNRL, padded per column"),
                "packed_check": getattr(trainer.loss, "check", None) or None,
                "compiled_layers": getattr(trainer.loss, "compiled", "off"),
            }
            st.counts["steps"] = summary["steps"]
            st.extra["resumed_from"] = summary["resumed_from"]

            out = st.path / "model"
            own_length = getattr(trainer.model, "saved_max_seq_length", None)
            if own_length:
                trainer.model.max_seq_length = own_length
            summary["saved_max_seq_length"] = int(trainer.model.max_seq_length)
            carry_prompts(trainer.model, training_prompts(cfg, trainer.model))
            with st.timed("save"), atomic_path(out) as tmp:
                trainer.model.save(str(tmp), create_model_card=False, safe_serialization=True)
            del trainer
            after = _evaluate(cfg, version_names(cfg)[1], str(out)) if tc.evaluate else None
            metrics = {"before": before, "after": after, "train": summary, "rotation": stats}
            atomic_write_json(st.path / "metrics.json", metrics)
            atomic_write_text(out / "README.md", model_card(cfg, mine_dir, metrics))
            if not tc.keep_checkpoints:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            (st.path / "metrics_before.json").unlink(missing_ok=True)
            _log_before_after(before, after, version_names(cfg))
            tracker.log({"train/v2": _headlines(before), "train/v3": _headlines(after)})
            tracker.summary({"train": {k: v for k, v in summary.items() if k != "loss_curve"}})
    coord.tell("done", path=str(st.path))  # after _COMPLETE: the other ranks exit 0
    return st.path


def _follow(cfg: DictConfig, coord) -> Path:
    """A rank other than 0: wait for rank 0's decision, then build the same data set and train in step with it.
    It writes nothing itself (the trainer's own rng_state_<rank>.pth in each checkpoint aside)."""
    decision = coord.listen()
    if decision["action"] == "skip":
        return Path(decision["path"])
    folder = Path(decision["path"])
    dataset, _, block_size, digest = _training_data(cfg, common.completed(cfg, "mine"))
    if digest != decision["digest"]:
        raise StageError(f"rank {coord.rank} built another training set than rank 0 (digest {digest[:12]} vs "
                         f"{decision['digest'][:12]}): do all ranks read the same files and config?")
    model = _load_model(cfg, decision.get("model"))
    trainer = _make_stage_trainer(cfg, model, dataset, block_size, folder / "checkpoints")
    from pipeline import signals

    signals.prepare_trainer(trainer, gather_across_devices=bool(cfg.train.gather_across_devices))
    with signals.training():
        trainer.train(resume_from_checkpoint=decision["resume"])
    coord.training_done()
    return Path(coord.listen()["path"])  # rank 0's "done", or its error (a stop signal, a failed save) raised here


def _training_data(cfg: DictConfig, mine_dir: Path) -> tuple[Any, dict[str, int], int, str]:
    """(dataset, rotation stats, rows per epoch block, digest of the rotation): the same on every rank (the digest,
    which the ranks compare, is only computed under torchrun)."""
    import hashlib

    from pipeline import distributed

    tc = cfg.train
    corpus = common.load_corpus(cfg)
    queries, _, _ = common.training_set(cfg, corpus)
    pools = load_pools(mine_dir / "pools.parquet")
    epochs_rows, stats = rotation(pools, list(queries), int(tc.epochs), int(cfg.seed),
                                  None if tc.triplets_per_query is None else int(tc.triplets_per_query))
    # why a query has no pool is the mine stage's to say (no positive, no candidates, no negative left)
    report = _safe(lambda: json.loads((mine_dir / "report.json").read_text()), {})
    stats["mine_dropped"] = {k: v for k, v in ((report.get("queries") or {}).get("dropped") or {}).items() if v}
    if not stats["queries"]:
        raise StageError(f"no training query has both a positive and a mined negative in {mine_dir} "
                         f"({stats}); loosen the mine rules or check the data")
    dataset = rotation_dataset(epochs_rows, queries, corpus)
    h = hashlib.sha256()
    for rows in epochs_rows if distributed.world_size() > 1 else ():
        h.update("\n".join("\t".join(row) for row in rows).encode("utf-8") + b"\x00")
    return dataset, stats, len(epochs_rows[0]), h.hexdigest()


def _load_model(cfg: DictConfig, spec: str | None = None):
    """The v2 model, truncating at train.max_seq_length while it trains; its own length is kept as
    ``saved_max_seq_length``, which the saved v3 gets back, so that evaluations of v2 and v3 (and users) encode at
    one length (the v3 encoded at the training length: 128 against v2's 256 in the Cranfield and CISI runs).
    ``spec``: what to load in place of model.bi_encoder (another rank: the commit rank 0 loaded)."""
    model = load_bi_encoder(spec or str(cfg.model.bi_encoder), device=str(cfg.device),
                            artifacts_root=str(common.artifacts_root(cfg)))
    model.saved_max_seq_length = model.max_seq_length
    model.max_seq_length = int(cfg.train.max_seq_length)
    return model


def training_prompts(cfg: DictConfig, model) -> dict[str, str]:
    """Column -> prompt: the query prompt before queries, the corpus prompt before positives and negatives, as
    retrieve and evaluate resolve them (common.resolve_prompt); empty for models without prompts (the v2s)."""
    query = common.resolve_prompt(model, cfg.model.query_prompt, "query")
    corpus = common.resolve_prompt(model, cfg.model.corpus_prompt, "corpus")
    return {col: p for col, p in (("query", query), ("positive", corpus), ("negative", corpus)) if p}


def carry_prompts(model, trained_with: dict[str, str]) -> None:
    """Prompts the model was trained with but does not name (text in the config) go into its ``prompts`` under
    the names resolve_prompt reads (query, document), so that the saved model encodes as it was trained."""
    for column, name in (("query", "query"), ("positive", "document")):
        if trained_with.get(column) and not (model.prompts or {}).get(name):
            model.prompts = {**(model.prompts or {}), name: trained_with[column]}


def _make_stage_trainer(cfg: DictConfig, model, dataset, block_size: int, ckpt_dir: Path):
    from pipeline import tracking

    tc = cfg.train
    return make_trainer(
        model, dataset, block_size=block_size, output_dir=ckpt_dir, batch_size=int(tc.batch_size),
        lr=float(tc.lr), warmup_steps=int(tc.warmup_steps),
        warmup_ratio=None if tc.warmup_ratio is None else float(tc.warmup_ratio),
        weight_decay=float(tc.weight_decay), max_grad_norm=float(tc.max_grad_norm), scale=float(tc.scale),
        similarity=str(tc.similarity), precision=str(tc.precision), device=str(cfg.device),
        max_steps=tc.max_steps, save_steps=int(tc.save_steps), save_total_limit=tc.save_total_limit,
        logging_steps=int(tc.logging_steps), dataloader_workers=tc.dataloader_workers,
        seed=int(cfg.seed), report_to=tracking.report_to(cfg), packing=tc.packing,
        compile_layers=bool(tc.compile_layers), prompts=training_prompts(cfg, model))


def _evaluate(cfg: DictConfig, name: str, spec: str) -> dict[str, Any] | None:
    from pipeline.stages import evaluate

    res = evaluate.evaluate_system(cfg, name, spec)
    return {"name": res.get("name", name), "model": spec, "metrics": res["metrics"]}


def _load_or_eval_before(cfg: DictConfig, folder: Path) -> dict[str, Any] | None:
    """v2's figures: its evaluate folder, found complete when a resumed run (or the chain before it) measured them
    under the same evaluation key. (A copy kept in this folder outlived a change of the evaluation settings, which
    are not in the train key: a resumed run reported the old measures.)"""
    return _evaluate(cfg, version_names(cfg)[0], str(cfg.model.bi_encoder))


def _headlines(result: Mapping[str, Any] | None) -> dict[str, float]:
    if not result:
        return {}
    return {f"{ev}/{m}": v for ev, ms in result["metrics"].items() for m, v in ms.items()
            if isinstance(v, (int, float))}


def _log_before_after(before, after, names: tuple[str, str]) -> None:
    if not before or not after:
        return
    for ev, ms in after["metrics"].items():
        for m, v in ms.items():
            b = before["metrics"].get(ev, {}).get(m)
            if isinstance(v, (int, float)) and isinstance(b, (int, float)):
                log.info("train: %-10s %-16s %s %.4f -> %s %.4f (%+.4f)", ev, m, names[0], b, names[1], v, v - b)


# --------------------------------------------------------------------------------------------- model card


def skipped_text(stats: Mapping[str, Any]) -> str:
    """The training queries left out and why, in the mine report's words where mine dropped them."""
    dropped = stats.get("mine_dropped") or {}
    why = ", ".join(f"{reason.replace('_', ' ')} {n}" for reason, n in dropped.items())
    parts = [f"{stats['skipped_no_pool']} without a mined pool" + (f" (mine dropped them: {why})" if why else "")]
    parts += [f"{stats[key]} {text}" for key, text in (("skipped_no_positive", "without a positive"),
                                                       ("skipped_no_negative", "without a negative")) if stats[key]]
    return ", ".join(parts)


def model_card(cfg: DictConfig, mine_dir: Path, metrics: Mapping[str, Any]) -> str:
    """README.md of the v3 model: where its data came from, the mining rules, the training and the figures."""
    tc = plain(cfg.train)
    mine_manifest = _safe(lambda: read_manifest(mine_dir), {})
    mine_cfg = (mine_manifest.get("config") or {}).get("mine") or mine_manifest.get("identity", {}).get("mine") or {}
    report = _safe(lambda: json.loads((mine_dir / "report.json").read_text()), {})
    ce = _cross_encoder(cfg)
    rot, tr = metrics["rotation"], metrics["train"]
    old, new = version_names(cfg)
    name = f"{cfg.model.name}-{new}"
    spec = str(cfg.model.bi_encoder)
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        *([f"base_model: {hub_id(spec)}"] if hub_id(spec) else []),
        "tags: [sentence-transformers, sentence-similarity, feature-extraction, msmarco-v3-recipe, hard-negatives]",
        "---",
        "",
        f"# {name}",
        "",
        f"{cfg.model.name} ({old}, `{spec}`{commit_note(spec)}) fine-tuned into {new} with the MSMARCO Models v3 "
        f"recipe: {old} retrieved passages for the training queries, a cross-encoder scored them, passages {old} "
        f"ranked high but the cross-encoder scored low became hard negatives, and {old} was trained further with "
        "MultipleNegativesRankingLoss.",
        "",
        "## Data",
        "",
        f"- data set: `{cfg.data.name}`; corpus `{cfg.data.corpus}`",
        f"- training queries: `{cfg.data.train.queries}`, positives from `{cfg.data.train.qrels}` "
        f"(grade >= {cfg.data.train.min_grade})",
        f"- queries trained on: {rot['queries']} (with a positive and at least one mined negative); "
        f"skipped: {skipped_text(rot)}",
        "",
        "## Hard-negative mining",
        "",
        f"- cross-encoder: `{ce}`{_judge_commit_note(ce, report)}",
        f"- mine stage artifact: `{mine_dir.name}`",
        "- rules (mine config):",
        "",
        "```json",
        json.dumps(mine_cfg, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    if report:
        lines += ["- mining report figures:", "", "```json", json.dumps(_scalars(report), indent=2, sort_keys=True,
                                                                        default=str), "```", ""]
    lines += [
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| loss | MultipleNegativesRankingLoss ({tc['similarity']} x {tc['scale']}), in-batch + 1 hard negative |",
        f"| epochs | {rot['epochs']} (a fresh positive/negative per query each epoch) |",
        f"| triplets per query per epoch | {tc.get('triplets_per_query') or 'one per judged positive'} |",
        f"| triplets | {rot['triplets']} |",
        f"| batch size | {tc['batch_size']} (no duplicates within a batch) |",
        f"| learning rate | {tc['lr']} (linear decay, {tr['warmup_steps']} warm-up steps) |",
        f"| max_seq_length | {tc['max_seq_length']} in training; the saved model encodes at "
        f"{tr.get('saved_max_seq_length', tc['max_seq_length'])}, {old}'s own limit, so {old} and {new} are evaluated "
        "alike |",
        f"| precision | {tr['precision']} |",
        f"| steps | {tr['steps']} |",
        f"| loss | {tr['loss_first']} (first log) -> {tr['loss_last']} (last log) |",
        f"| seed | {cfg.seed} |",
        "",
    ]
    before, after = metrics.get("before"), metrics.get("after")
    if before and after:
        lines += ["## Evaluation", "", f"Measured by the evaluate stage on `{cfg.data.name}`'s evaluation sets.", "",
                  f"| eval set | measure | {old} | {new} | change |", "|---|---|---|---|---|"]
        for ev, ms in after["metrics"].items():
            for m, v in ms.items():
                b = before["metrics"].get(ev, {}).get(m)
                if isinstance(v, (int, float)) and isinstance(b, (int, float)):
                    lines.append(f"| {ev} | {m} | {b:.4f} | {v:.4f} | {v - b:+.4f} |")
        lines.append("")
    lines += ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
              "model = SentenceTransformer(\"path/to/this/folder\")",
              "embeddings = model.encode([\"how long do cats live\"])", "```", ""]
    return "\n".join(lines)


def _cross_encoder(cfg: DictConfig) -> str:
    try:
        from pipeline.stages import score

        return str(score.cross_encoder_spec(cfg))
    except Exception:  # the card must not fail over a label
        return str(cfg.model.cross_encoder or "teacher stage")


def _judge_commit_note(ce: str, report: Mapping[str, Any]) -> str:
    """' at commit <sha>' for a Hub cross-encoder, from the manifests of the score results the mine report names:
    train never loads the judge, so the card named v2's commit and left the judge's unsaid (an unpinned id keys by
    its name, whatever the Hub serves)."""
    recorded = None
    for folder in (report.get("systems") or {}).values():
        recorded = recorded or _safe(lambda f=folder: read_manifest(Path(f)).get("hub_commits", {}).get(ce), None)
    return commit_note(ce, recorded)


def _safe(fn, default):
    try:
        return fn()
    except (OSError, ValueError, KeyError):
        return default


def _scalars(obj: Any, depth: int = 0) -> Any:
    """The report's figures without long lists (histograms stay in report.json)."""
    if isinstance(obj, Mapping):
        return {k: _scalars(v, depth + 1) for k, v in obj.items()
                if not (isinstance(v, (list, tuple)) and len(v) > 10)}
    return obj
