"""What every stage needs: its artifacts root, the corpus and query sets of the data config, and the folder
of any other stage's result (computed from the config alone, so no stage ever guesses a path)."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pipeline.artifacts import (MANIFEST, StageError, atomic_path, atomic_write_text, config_key, folder_lock,
                                forced_already, is_complete, read_manifest, require_complete, stage_folder)
from pipeline.readers import Corpus, Qrels, check_qrels_in_corpus, positives, read_qrels, read_queries

log = logging.getLogger(__name__)

#: a corpus's embeddings in a retrieve or evaluate folder: float16 rows in corpus order (see embedding_key)
EMB_FILE = "corpus_emb.f16.npy"


def artifacts_root(cfg: DictConfig) -> Path:
    return Path(str(cfg.artifacts_root)).expanduser().resolve()


def stage_device(cfg: DictConfig) -> str:
    """The device of a stage's models and search: ``cfg.device``, resolved. One shard of a sharded stage
    (``shard.count`` > 1) that sees several GPUs and was given no GPU index (device auto or cuda) takes GPU
    ``shard.index`` mod the GPU count, made this process's current device: shards started side by side on one node
    (by hand, or as hydra/launcher=local jobs with all GPUs visible) use one GPU each instead of all using the first.
    A Slurm array task, which sees only its own GPU, keeps cuda:0."""
    import torch

    from pipeline.models import resolve_device

    device = resolve_device(str(cfg.device))
    if device != "cuda" or int(cfg.shard.count) <= 1:
        return device
    gpus = torch.cuda.device_count()
    if gpus <= 1:
        return device
    index = int(cfg.shard.index) % gpus
    torch.cuda.set_device(index)  # the CUDA calls that name no device (events, streams) go to this GPU too
    return f"cuda:{index}"


def load_corpus(cfg: DictConfig) -> Corpus:
    return Corpus.open(str(cfg.data.corpus), Path(str(cfg.cache_root)).expanduser(),
                       repair_encoding=bool(cfg.data.repair_encoding), empty_text=str(cfg.data.empty_text))


def token_store(cfg: DictConfig, corpus: Corpus, model: Any, prompt: str | None = None):
    """The corpus token store for ``model``'s tokenizer when ``token_cache`` asks for one (built on first use,
    see pipeline/tokens.py); None: the stage passes texts and the engine tokenises them. A ``prompt`` (prepended to
    every passage) is tokenised with each passage, so no store serves it: None."""
    from pipeline import tokens

    if prompt or not tokens.wanted(cfg.token_cache, len(corpus)):
        return None
    tokenizer_json = tokens.fast_tokenizer_json(model)
    if tokenizer_json is None:
        log.info("token_cache: the model has no fast tokenizer; tokenising texts")
        return None
    try:
        return tokens.open_store(corpus, tokenizer_json, Path(str(cfg.cache_root)).expanduser(), wait_s=3600)
    except ValueError as exc:  # a damaged store: one clear line, not a traceback
        raise StageError(str(exc)) from exc


def corpus_rows(corpus: Corpus, store: Any, lo: int, hi: int) -> Any:
    """Corpus rows [lo, hi) as encoder input: a view over the token store, or their texts without one."""
    if store is None:
        return corpus.table.column("text").slice(lo, hi - lo).to_pylist()
    from pipeline.tokens import TextTokens

    return TextTokens(store, np.arange(lo, hi), corpus.texts_at)


def resolve_prompt(model: Any, setting: Any, role: str) -> str | None:
    """A configured prompt (a name in the model's prompts, else literal text); when null the model's own prompt
    for the role (MTEB's query/document prompt names), else its default prompt. Retrieve and evaluate both."""
    prompts = dict(getattr(model, "prompts", None) or {})
    if setting:
        return prompts.get(str(setting), str(setting))
    for name in (("query",) if role == "query" else ("document", "passage", "corpus")):
        if prompts.get(name):
            return prompts[name]
    default = getattr(model, "default_prompt_name", None)
    return (prompts.get(default) or None) if default else None


def embedding_key(model_spec: str, corpus: Corpus, prompt: str | None, normalized: bool, max_seq_length: int,
                  precision: str, device: str) -> str:
    """What a corpus's embeddings depend on (the model, a Hub model by the files it loaded, so call it after
    loading; corpus, prompt, normalisation, truncation, the compute dtype that ``precision`` means on ``device``):
    retrieve and evaluate record it, so that evaluate links the float16 embeddings of any complete folder with the
    same key instead of encoding the corpus again (the v2 evaluation of a chain reuses what retrieve encoded with
    v2)."""
    from pipeline.models import cache_identity

    return config_key({"model": cache_identity(str(model_spec)), "corpus": corpus.fingerprint, "prompt": prompt,
                       "normalized": bool(normalized), "max_seq_length": int(max_seq_length),
                       "dtype": compute_dtype(precision, device)}, 16)


def compute_dtype(precision: Any, device: str) -> str:
    """The compute dtype a precision setting means on ``device`` (auto: bf16 on a GPU, fp32 on a CPU without bf16),
    by name: what embedding, evaluation and pair-cache keys record, so that one key never holds two dtypes."""
    from pipeline.engine import dtype_name, resolve_precision

    return dtype_name(resolve_precision(str(precision), device))


#: settings of train and teacher that change no weight (who tokenises the batches, how often the loss is logged or a
#: checkpoint saved, how many are kept), left out of their keys: changing one must not retrain
UNKEYED_TRAINING_SETTINGS = ("dataloader_workers", "logging_steps", "save_steps", "save_total_limit",
                             "keep_checkpoints")

#: stages whose complete folders may hold corpus embeddings another can link (EMB_FILE, same layout)
EMBEDDING_STAGES = ("evaluate", "retrieve")


def reusable_embeddings(root: Path, key: str, here: Path, forced_run: str | None = None) -> Path | None:
    """A complete retrieve or evaluate folder (not ``here``) whose corpus embeddings were recorded with ``key``
    (:func:`embedding_key`), or None. For a forced stage (``forced_run``: its artifacts.stage_force_id), only a
    folder that this forced run computed again: force=true recomputes, so embeddings made before it (by an older
    engine, say) are not taken over, while the chain's later stages share what it encoded afresh."""
    manifests = [m for stage in EMBEDDING_STAGES for m in sorted((root / stage).glob(f"*/{MANIFEST}"))]
    for manifest in manifests:
        folder = manifest.parent
        if folder == here or not is_complete(folder) or not (folder / EMB_FILE).is_file():
            continue
        if forced_run is not None and not forced_already(folder, forced_run):
            continue
        try:
            if read_manifest(folder).get("extra", {}).get("embedding_key") == key:
                return folder
        except (OSError, ValueError):
            continue
    return None


def link_embeddings(root: Path, key: str, target: Path, here: Path, source: Path | None = None,
                    forced_run: str | None = None) -> Path | None:
    """Link (hard link; a copy across filesystems) the corpus embeddings of ``source`` or else of
    :func:`reusable_embeddings` to ``target``, instead of encoding the corpus again; returns that folder, or None
    where there is none. The file is never written in place afterwards (write_embedding_rows refuses a file with
    other links): a forced rerun of either folder replaces it."""
    folder = source or reusable_embeddings(root, key, here, forced_run)
    if folder is None:
        return None
    with atomic_path(target) as tmp:
        try:
            os.link(folder / EMB_FILE, tmp)
        except OSError:
            shutil.copyfile(folder / EMB_FILE, tmp)
    log.info("reusing corpus embeddings of %s", folder)
    return folder


# the embeddings file while it is written: any writer (a retrieve shard, an evaluate device process, a rerun) writes
# a range of rows and then commits it with a marker, and every writer skips the ranges already committed


def rows_committed(marks: Path, lo: int, hi: int) -> bool:
    return (marks / f"rows-{lo}-{hi}.done").exists()


def _unlink_row_marks(marks: Path) -> int:
    stale = list(marks.glob("rows-*.done")) if marks.is_dir() else []
    for mark in stale:
        mark.unlink(missing_ok=True)
    return len(stale)


def forget_rows_of_a_missing_file(path: Path, marks: Path) -> int:
    """Remove the row markers in ``marks`` when the embeddings file ``path`` they commit rows of is gone (a run
    killed while a forced rerun cleared its folder: the markers may go after the file); how many. Without this
    a resumed encode would skip those rows and leave them zero in a file it then calls complete."""
    if path.exists() or not marks.is_dir():
        return 0
    with folder_lock(marks, wait_s=600):
        return 0 if path.exists() else _unlink_row_marks(marks)


def commit_rows(marks: Path, lo: int, hi: int) -> None:
    """Mark rows lo..hi of an embeddings file as written and synced: no writer does them again."""
    atomic_write_text(marks / f"rows-{lo}-{hi}.done", f"{lo} {hi}\n")


def committed_row_count(marks: Path) -> int:
    """How many rows the markers in ``marks`` commit."""
    total = 0
    for mark in marks.glob("rows-*.done") if marks.is_dir() else ():
        lo, _, hi = mark.name[len("rows-"):-len(".done")].partition("-")
        total += int(hi) - int(lo)
    return total


def embeddings_file_fits(path: Path, n: int, dim: int) -> bool:
    """Whether ``path`` is a float16 .npy of n x dim (an earlier attempt's file that this encode can continue)."""
    if dim <= 0 or not path.is_file():
        return False
    try:
        mm = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return mm.shape == (n, dim) and mm.dtype == np.float16


def create_embeddings_file(path: Path, n: int, dim: int, lock_dir: Path) -> None:
    """The float16 .npy of n x dim at ``path``, created once (sparse; under ``lock_dir``'s lock, renamed into place)
    by whichever writer comes first. Row markers left in ``lock_dir`` commit nothing of a new file: removed first."""
    if not path.exists():
        with folder_lock(lock_dir, wait_s=600):
            if not path.exists():
                _unlink_row_marks(lock_dir)
                with atomic_path(path) as tmp:
                    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
                    mm.flush()
                    del mm


def check_finite(emb: np.ndarray, what: str, first_row: int = 0) -> None:
    """StageError naming the rows of ``emb`` (float16 or float32) that hold a NaN or an infinity: a model that
    overflowed would otherwise rank them first or last in every search, silently."""
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1)) if emb.size else np.zeros(0, np.int64)
    if bad.size:
        raise StageError(f"{bad.size} of {len(emb)} {what} embeddings are not finite (first: row "
                         f"{first_row + int(bad[0])}): the model overflowed; a wider precision (bf16 or fp32) or a "
                         f"model whose values fit float16 (|x| <= 65,504) is needed")


def write_embedding_rows(path: Path, n: int, lo: int, emb: np.ndarray, lock_dir: Path) -> None:
    """Write rows [lo, lo + len(emb)) of the float16 .npy at ``path`` (see :func:`create_embeddings_file`), then
    sync them. Rows go in by byte range (pwrite), not through a writable memmap: a memmap dirties whole pages, and on
    a shared filesystem two hosts writing neighbouring ranges would overwrite each other's half of a page.
    Rows that are not finite once in float16 are refused (:func:`check_finite`); nothing is written then."""
    dim = int(emb.shape[1])
    with np.errstate(over="ignore"):  # an overflow becomes inf, which check_finite names
        half = np.ascontiguousarray(emb, dtype=np.float16)
    check_finite(half, "corpus", first_row=lo)
    create_embeddings_file(path, n, dim, lock_dir)
    if os.stat(path).st_nlink > 1:  # linked from (or to) another folder's complete embeddings: never write into it
        raise StageError(f"{path} is a hard link shared with another stage folder's embeddings; writing rows into "
                         f"it would change that folder too. force=true rebuilds this folder's own file")
    mm = np.load(path, mmap_mode="r")
    if mm.shape != (n, dim) or mm.dtype != np.float16:
        raise StageError(f"{path} has shape {mm.shape} {mm.dtype}, expected ({n}, {dim}) float16; "
                         f"force=true rebuilds it")
    offset = int(mm.offset) + lo * dim * 2
    del mm
    data = memoryview(half).cast("B")
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        os.fsync(fd)
    finally:
        os.close(fd)


def training_set(cfg: DictConfig, corpus: Corpus | None = None) -> tuple[dict[str, str], dict[str, list[str]], Qrels]:
    """(queries, positives, qrels) of the training split: only queries that have a positive and a text,
    in sorted-id order, capped at data.train.max_queries. Judged ids missing from the corpus are counted
    and fail past data.max_missing_qrels."""
    train = cfg.data.train
    if not train.queries or not train.qrels:
        raise StageError(f"data={cfg.data.name} has no training split (data.train.queries/qrels are null): it can "
                         f"be evaluated on (stage=evaluate), not trained on")
    queries = read_queries(str(train.queries))
    qrels = read_qrels(str(train.qrels))
    if corpus is not None:
        check_qrels_in_corpus(qrels, corpus, str(train.qrels), float(cfg.data.max_missing_qrels))
        qrels = {q: {p: g for p, g in judged.items() if p in corpus} for q, judged in qrels.items()}
    pos = positives(qrels, int(train.min_grade))
    missing_text = sorted(q for q in pos if q not in queries)
    if missing_text:
        log.warning("%d training queries have qrels but no text in %s, e.g. %s; skipped",
                    len(missing_text), train.queries, missing_text[:5])
    kept = sorted((q for q in pos if q in queries), key=_id_sort_key)
    if train.max_queries:
        kept = kept[: int(train.max_queries)]
    return {q: queries[q] for q in kept}, {q: pos[q] for q in kept}, qrels


def _id_sort_key(value: str) -> tuple[int, int | str]:
    return (0, int(value)) if value.isdigit() else (1, value)


def stage_module(stage: str):
    return importlib.import_module(f"pipeline.stages.{stage}")


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    """Folder of `stage`'s result for this config (whether or not it exists yet)."""
    mod = stage_module(stage)
    return stage_folder(artifacts_root(cfg), stage, mod.label(cfg), config_key(mod.identity(cfg)))


def completed(cfg: DictConfig, stage: str) -> Path:
    """Folder of `stage`'s complete result for this config, or a StageError saying which stage to run."""
    return require_complete(stage_dir(cfg, stage), f"the {stage} result for this config")
