"""Blocks, shards and parts: how retrieve and score split their work and put it back together.

A stage's work is a list of fixed-size blocks (queries for retrieve, pairs for score). Shard ``i`` of ``n`` takes
a contiguous range of blocks, so the parts concatenated in shard order are the single-run order; and since a block
is computed the same way whoever computes it, shards + merge give the same bytes as one run. The shard settings
are therefore never part of a stage's key.

Layout inside the stage folder ``<root>/<stage>/<label>-<key>/``::

    blocks/...                        a single run's committed blocks (resumable)
    parts/shard-<i>-of-<n>-<key12>/   one shard's part: its blocks, manifest.json and _COMPLETE

Running:
  ``shard.count=1`` (the default) does everything in one process -- or, when complete parts of an earlier
  sharded run are there, merges them (and refuses, naming the missing parts, when some are not).
  ``shard.count=n shard.index=i`` computes part ``i`` only; the shard that completes the last part also merges,
  so a job array needs no separate merge job, and rerunning any shard after a crash finishes the merge.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.artifacts import (MARKER, StageError, StageLocked, StageRun, clear_for_force, config_key,
                                first_record, folder_lock, forced_already, forced_run_id, is_complete, open_stage,
                                stage_folder)
from pipeline.config import plain

log = logging.getLogger(__name__)

_PART_NAME = re.compile(r"^shard-(\d+)-of-(\d+)-[0-9a-f]{12}$")


def n_blocks(n_items: int, block_size: int) -> int:
    return (n_items + block_size - 1) // block_size


def block_bounds(block: int, block_size: int, n_items: int) -> tuple[int, int]:
    lo = block * block_size
    return lo, min(lo + block_size, n_items)


def shard_blocks(total_blocks: int, index: int, count: int) -> range:
    """Contiguous, balanced ranges: concatenated in shard order they are range(total_blocks)."""
    return range(total_blocks * index // count, total_blocks * (index + 1) // count)


def shard_settings(cfg: DictConfig) -> tuple[int, int]:
    return int(cfg.shard.index), int(cfg.shard.count)  # checked at the stage entry (pipeline/validate.py)


def part_identity(final_key: str, index: int, count: int) -> dict[str, Any]:
    return {"final": final_key, "index": index, "count": count}


def part_dir(final: Path, final_key: str, index: int, count: int) -> Path:
    return stage_folder(final, "parts", f"shard-{index}-of-{count}", config_key(part_identity(final_key, index, count)))


def part_sets(final: Path, final_key: str) -> dict[int, dict[int, Path]]:
    """Parts found under `final/parts`, by shard count, then index (complete or not); folders that do not
    belong to this key (a hand-copied folder, say) are ignored."""
    found: dict[int, dict[int, Path]] = {}
    for folder in sorted((final / "parts").glob("shard-*")):
        m = _PART_NAME.match(folder.name)
        if not m:
            continue
        index, count = int(m.group(1)), int(m.group(2))
        if folder == part_dir(final, final_key, index, count):
            found.setdefault(count, {})[index] = folder
    return found


def missing_parts(final: Path, final_key: str, count: int) -> list[int]:
    return [i for i in range(count) if not is_complete(part_dir(final, final_key, i, count))]


@contextlib.contextmanager
def try_lock(path: Path) -> Iterator[bool]:
    """Non-blocking exclusive flock on `path`: yields True when we hold it, False when a live process does.
    The file stays empty, so a finished stage's checksums never change."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


COMPUTE_RECORD = "compute.json"  # the compute dtype every block of the stage folder was computed in


def claim_compute_dtype(final: Path, stage: str, dtype: str, device: str) -> None:
    """Record the compute dtype (by name) of the first process that computes a block of ``final``, and refuse any
    other process (a shard, a rerun, a requeue) that would compute in another one: the stage's key holds the
    precision setting (``auto``), not the dtype it means on each machine, because downstream stages compute that
    key on any machine, so shards on bf16 and fp16 GPUs (or a CPU) would otherwise mix two dtypes in one result.
    Created once and atomically (artifacts.first_record)."""
    first = first_record(Path(final) / COMPUTE_RECORD, {"dtype": dtype, "device": device, "host": socket.gethostname()})
    if first["dtype"] != dtype:
        raise StageError(
            f"{stage}: {final} holds blocks computed in {first['dtype']} (on {first['device']} at {first['host']}); "
            f"this process would compute in {dtype} on {device}. One result never mixes two dtypes: run every shard "
            f"on the same kind of device, or set {stage}.precision to one that all of them compute the same way "
            f"(fp32), or start over in {dtype} with force=true (shards: with one PIPELINE_FORCE_ID=<id> for all of "
            f"them, which clears what they share; a submitit job array has one; or shard.count=1).")


def run_sharded(cfg: DictConfig, stage: str, identity: dict[str, Any], label: str, *,
                prepare: Callable[[Path], Any],
                work: Callable[[Any, StageRun, range, Path], None],
                merge: Callable[[Any, StageRun, list[Path]], None],
                precision: Any = None) -> Path:
    """The shard/merge skeleton shared by retrieve and score.

    prepare(final_folder) -> ctx, with ``ctx.n_blocks``; work(ctx, run, blocks, out_dir) computes the missing
    blocks of `blocks` into `out_dir` (resumable: committed blocks are kept); merge(ctx, run, out_dirs) writes the
    stage's final files into ``run.path`` from the block folders, in order. ``precision``: the stage's setting, whose
    dtype on this process's device is checked against the folder's record before any work (claim_compute_dtype).
    """
    from pipeline.stages.common import artifacts_root, compute_dtype, stage_device

    def claim() -> None:
        if precision is not None:
            device = stage_device(cfg)
            claim_compute_dtype(final, stage, compute_dtype(precision, device), device)

    index, count = shard_settings(cfg)
    root = artifacts_root(cfg)
    key = config_key(identity)
    final = stage_folder(root, stage, label, key)
    common: dict[str, Any] = {"root": root, "label": label, "config": plain(cfg), "lock_wait_s": cfg.lock_wait_s}

    if count == 1:
        found = {} if cfg.force else part_sets(final, key)
        complete = [n for n, parts in found.items() if not missing_parts(final, key, n)]
        if found and not complete and not is_complete(final):
            detail = "; ".join(f"of {n} parts, missing shard.index={missing_parts(final, key, n)}"
                               for n in sorted(found))
            raise StageError(f"{stage}: {final} holds an unfinished sharded run ({detail}). Run the missing shards "
                             f"with shard.count=<n> shard.index=<i>, or force=true to discard the parts and run "
                             f"everything in this process.")
        with open_stage(stage, identity, force=cfg.force, resumable=True, **common) as st:
            if st.done:
                return st.path
            ctx = prepare(final)
            if complete:
                n = complete[0]
                log.info("%s: merging %d complete shard parts", stage, n)
                st.extra["merged_parts"] = n
                merge(ctx, st, [part_dir(final, key, i, n) / "blocks" for i in range(n)])
            else:
                claim()
                work(ctx, st, range(ctx.n_blocks), st.path / "blocks")
                merge(ctx, st, [st.path / "blocks"])
        return st.path

    force_id = forced_run_id() if cfg.force else None
    if is_complete(final) and (not cfg.force or forced_already(final, force_id)):
        log.info("%s: the merged result is complete at %s; nothing to do for shard %d", stage, final, index)
        return final
    if cfg.force and force_id is not None:
        # the first shard of this forced run clears everything the shards share (parts, corpus embeddings); the
        # others, and requeues, find its id recorded and keep what this run has done since
        with folder_lock(final, wait_s=max(600.0, float(cfg.lock_wait_s))):
            if clear_for_force(final, force_id):
                log.info("%s: force=true (run %s): cleared %s for every shard of this run", stage, force_id, final)
    elif cfg.force:  # no run id: each shard recomputes its own part; what the shards share is kept
        (final / MARKER).unlink(missing_ok=True)
        log.warning("%s: force=true on shard %d without a run id recomputes this shard's part only; the corpus "
                    "embeddings the shards share are kept. Under submitit's Slurm launcher the job id is the run "
                    "id; elsewhere set PIPELINE_FORCE_ID=<one id> for every shard of the forced run", stage, index)
    ctx = None
    part_label = f"shard-{index}-of-{count}"
    with open_stage("parts", part_identity(key, index, count), force=cfg.force, resumable=True,
                    **{**common, "root": final, "label": part_label}) as pst:
        if not pst.done:
            ctx = prepare(final)
            blocks = shard_blocks(ctx.n_blocks, index, count)
            pst.extra.update({"stage": stage, "final": str(final), "blocks": [blocks.start, blocks.stop],
                              "total_blocks": ctx.n_blocks})
            log.info("%s: shard %d of %d computes blocks [%d, %d) of %d", stage, index, count, blocks.start,
                     blocks.stop, ctx.n_blocks)
            claim()
            work(ctx, pst, blocks, pst.path / "blocks")
    missing = missing_parts(final, key, count)
    if missing:
        log.info("%s: part %d of %d is complete at %s; the merge waits for shard.index=%s (the last shard to "
                 "finish merges)", stage, index, count, pst.path, missing)
        return pst.path
    with contextlib.ExitStack() as stack:
        try:
            st = stack.enter_context(open_stage(stage, identity, force=False, resumable=True, **common))
        except StageLocked:  # every shard that finishes after the last part tries: a rerun array starts together
            log.info("%s: part %d of %d is complete; another shard is merging the parts into %s (if it dies, "
                     "rerunning any shard merges)", stage, index, count, final)
            return pst.path
        if st.done:
            return st.path
        ctx = ctx or prepare(final)
        st.extra["merged_parts"] = count
        merge(ctx, st, [part_dir(final, key, i, count) / "blocks" for i in range(count)])
    return st.path


ROW_GROUP_ROWS = 1 << 20


def write_parquet(table: Any, path: Path) -> None:
    """Atomic parquet with fixed settings, so equal tables give equal bytes (shards + merge == one run)."""
    import pyarrow.parquet as pq

    from pipeline.artifacts import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS)


@contextlib.contextmanager
def parquet_stream(path: Path, schema: Any) -> Iterator[Callable[[Any], None]]:
    """Atomic parquet written table by table (yields ``write(table)``), so a result larger than memory is never one
    table. Rows are regrouped into full row groups, so the bytes depend on the rows only, not on how they were fed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.artifacts import atomic_path

    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        pending: list[Any] = []
        held = 0

        def flush(rows: int) -> None:
            nonlocal pending, held
            table = pa.concat_tables(pending)
            writer.write_table(table.slice(0, rows), row_group_size=ROW_GROUP_ROWS)
            pending, held = ([table.slice(rows)] if rows < table.num_rows else []), table.num_rows - rows

        def write(table: Any) -> None:
            nonlocal held
            pending.append(table.select(schema.names).cast(schema))
            held += table.num_rows
            while held >= ROW_GROUP_ROWS:
                flush(ROW_GROUP_ROWS)

        yield write
        if held:
            flush(held)
