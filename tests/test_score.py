"""The score stage: every candidate and positive scored once, a SIGKILLed run resumed to the same result, the
pair cache reused across runs, shards + merge == one run, and the model's activation recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import StageError, is_complete, read_manifest, verify_folder
from pipeline.config import compose
from pipeline.stages import retrieve, score

N_QUERIES = 16
TOP_K = 10
CHUNK = 40


@pytest.fixture(scope="module")
def setup(demo_stage_overrides):
    return [*demo_stage_overrides(max_queries=N_QUERIES, top_k=TOP_K), f"score.chunk_pairs={CHUNK}"]


@pytest.fixture(scope="module")
def retrieved(setup, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("score_retrieved")
    return retrieve.run(compose([*setup, f"artifacts_root={root}"]))


def _retrieved_root(retrieved: Path, tmp_path_factory, name: str) -> Path:
    """A fresh artifacts root (so an empty pair cache) holding a copy of the retrieve result (its key does not
    depend on the root)."""
    import shutil

    root = tmp_path_factory.mktemp(name)
    shutil.copytree(retrieved, root / "retrieve" / retrieved.name)
    return root


@pytest.fixture(scope="module")
def single(setup, retrieved, tmp_path_factory):
    root = _retrieved_root(retrieved, tmp_path_factory, "score_single")
    cfg = compose([*setup, f"artifacts_root={root}"])
    return cfg, score.run(cfg), root


def test_every_pair_once(single):
    from pipeline.stages import common

    cfg, folder, _ = single
    assert is_complete(folder) and verify_folder(folder) == []
    t = pq.read_table(folder / "scores.parquet")
    assert [(f.name, str(f.type)) for f in t.schema] == [("qid", "string"), ("pid", "string"), ("ce_score", "float"),
                                                         ("is_positive", "bool"), ("rank", "int32")]
    d = t.to_pydict()
    pairs = list(zip(d["qid"], d["pid"]))
    assert len(pairs) == len(set(pairs))
    queries, positives, _ = common.training_set(cfg, common.load_corpus(cfg))
    cands = pq.read_table(common.completed(cfg, "retrieve") / "candidates.parquet").to_pydict()
    expected = set(zip(cands["qid"], cands["pid"])) | {(q, p) for q in queries for p in positives[q]}
    assert set(pairs) == expected
    for q, p, pos, rank in zip(d["qid"], d["pid"], d["is_positive"], d["rank"]):
        assert pos == (p in positives[q])
        assert (rank is None) == ((q, p) not in set(zip(cands["qid"], cands["pid"])))
    # queries in training order, candidates by rank, then unretrieved positives
    assert list(dict.fromkeys(d["qid"])) == list(queries)
    # the stored value is the raw logit of the model (no sigmoid), scored in any order
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(cfg.model.cross_encoder), device="cpu")
    texts = dict(zip(*[common.load_corpus(cfg).table.column(c).to_pylist() for c in ("id", "text")]))
    ref = ce.predict([(queries[q], texts[p]) for q, p in pairs[:12]], activation_fn=lambda x: x)
    assert np.allclose(ref, d["ce_score"][:12], atol=1e-4)
    manifest = read_manifest(folder)
    assert manifest["extra"]["activation"] == "torch.nn.Sigmoid"  # a fresh num_labels=1 head
    assert manifest["counts"]["pairs"] == len(pairs) == manifest["counts"]["pairs_scored"]


def test_depth_and_cache_reuse(single, setup):
    """A second run over the same cross-encoder and data scores only pairs the cache lacks."""
    _, folder, root = single
    shallow = score.run(compose([*setup, f"artifacts_root={root}", "score.depth=3"]))
    counts = read_manifest(shallow)["counts"]
    assert counts["pairs_scored"] == 0 and counts["pairs_from_cache"] == counts["pairs"]
    d = pq.read_table(shallow / "scores.parquet").to_pydict()
    assert all(r is None or r <= 3 for r in d["rank"])
    full = dict(zip(zip(*[pq.read_table(folder / "scores.parquet").column(c).to_pylist() for c in ("qid", "pid")]),
                    pq.read_table(folder / "scores.parquet").column("ce_score").to_pylist()))
    assert all(full[(q, p)] == s for q, p, s in zip(d["qid"], d["pid"], d["ce_score"]))


def _cli(overrides: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "stage=score", *overrides],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, **kw)


def test_sigkill_then_resume(single, setup, retrieved, tmp_path_factory):
    _, folder, _ = single
    root = _retrieved_root(retrieved, tmp_path_factory, "score_kill")
    overrides = [*setup, f"artifacts_root={root}"]
    target = score.identity(compose(overrides))
    from pipeline.artifacts import config_key

    blocks = next(iter((root / "score").glob(f"*-{config_key(target)}")), None)
    proc = _cli([*overrides, "score.debug_sleep_s=0.4"])
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        blocks = next(iter((root / "score").glob(f"*-{config_key(target)}")), None)
        if blocks is not None and len(list((blocks / "blocks").glob("chunk-*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done_before = len(list((blocks / "blocks").glob("chunk-*.parquet")))
    total = -(-read_manifest(folder)["counts"]["pairs"] // CHUNK)
    assert 2 <= done_before < total and not is_complete(blocks)

    resumed = score.run(compose(overrides))
    assert resumed == blocks and is_complete(resumed)
    # same pairs, same scores, same bytes as the uninterrupted run
    assert (resumed / "scores.parquet").read_bytes() == (folder / "scores.parquet").read_bytes()
    counts = read_manifest(resumed)["counts"]
    assert counts["pairs_scored"] + counts["pairs_from_cache"] == counts["pairs"] - done_before * CHUNK
    # no pair was scored twice: the cache holds each pair exactly once
    cache_dir = Path(read_manifest(resumed)["extra"]["pair_cache"])
    rows = [r for f in sorted(cache_dir.glob("chunk-*.parquet"))
            for r in zip(*[pq.read_table(f).column(c).to_pylist() for c in ("qid", "pid")])]
    assert len(rows) == len(set(rows)) == counts["pairs"]


def test_shards_then_merge_equal_single_run(single, setup, retrieved, tmp_path_factory):
    _, folder, _ = single
    root = _retrieved_root(retrieved, tmp_path_factory, "score_shards")
    part = score.run(compose([*setup, f"artifacts_root={root}", "shard.count=2", "shard.index=1"]))
    assert part.parent.name == "parts" and is_complete(part)
    with pytest.raises(StageError, match=r"missing shard.index=\[0\]"):
        score.run(compose([*setup, f"artifacts_root={root}"]))
    merged = score.run(compose([*setup, f"artifacts_root={root}", "shard.count=2", "shard.index=0"]))
    assert merged.name == folder.name and is_complete(merged) and verify_folder(merged) == []
    assert (merged / "scores.parquet").read_bytes() == (folder / "scores.parquet").read_bytes()
    manifest = read_manifest(merged)
    assert manifest["extra"]["merged_parts"] == 2
    assert manifest["counts"]["pairs_scored"] == manifest["counts"]["pairs"]


def test_cross_encoder_from_teacher_when_null(setup, tmp_path):
    cfg = compose([*setup, f"artifacts_root={tmp_path}", "model.cross_encoder=null"])
    with pytest.raises(StageError, match="teacher"):
        score.cross_encoder_spec(cfg)
    assert score.identity(cfg)["cross_encoder"]["complete"] is False  # the key is computable before training
