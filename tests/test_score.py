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
    # another compute dtype is another cache: an fp32-keyed result never holds bf16 logits, nor the reverse
    other = "bf16" if str(compose(setup).score.precision) != "bf16" else "fp32"
    again = score.run(compose([*setup, f"artifacts_root={root}", "score.depth=3", f"score.precision={other}"]))
    counts = read_manifest(again)["counts"]
    assert counts["pairs_from_cache"] == 0 and counts["pairs_scored"] == counts["pairs"]
    # force=true recomputes every pair: the cache (logits of an older engine, say) is not read, nor added to
    cache_files = sorted(Path(str(compose([*setup, f"artifacts_root={root}"]).cache_root)).glob("ce_scores/*/chunk-*.parquet"))
    forced = score.run(compose([*setup, f"artifacts_root={root}", "score.depth=3", "force=true"]))
    counts = read_manifest(forced)["counts"]
    assert forced == shallow and counts["pairs_from_cache"] == 0 and counts["pairs_scored"] == counts["pairs"]
    assert sorted(Path(str(compose([*setup, f"artifacts_root={root}"]).cache_root)).glob("ce_scores/*/chunk-*.parquet")) == cache_files


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


# --------------------------------------------------------------------------------------------- pair list, inline data


def _corpus(tmp_path, ids):
    from pipeline.readers import Corpus

    (tmp_path / "c.tsv").write_text("".join(f"{p}\tpassage {p}\n" for p in ids))
    return Corpus.open(tmp_path / "c.tsv", tmp_path / "cache")


def _cands(rows):
    import pyarrow as pa

    q, p, r = zip(*rows)
    return pa.table({"qid": pa.array(q, pa.string()), "pid": pa.array(p, pa.string()), "rank": pa.array(r, pa.int32())})


@pytest.mark.parametrize("ids", [["10", "11", "12", "13", "14"], ["d10", "d11", "d12", "d13", "d14"]])
def test_pair_list_order_flags_and_batches(tmp_path, ids):
    """Candidates in rank order whatever the file order, other queries' candidates and ranks past the depth dropped,
    retrieved positives flagged, unretrieved positives after their query's candidates; the same from batches of
    any size, and for integer (dense index) and other ids."""
    d = dict(zip(["10", "11", "12", "13", "14"], ids))
    cands = _cands([("q2", d["13"], 2), ("q1", d["11"], 2), ("q1", d["10"], 1), ("q9", d["10"], 1),
                    ("q2", d["12"], 1), ("q1", d["12"], 3)])
    corpus = _corpus(tmp_path, ids)
    positives = {"q1": [d["14"], d["11"]], "q2": [d["12"]]}
    pairs = score.build_pairs(cands, ["q1", "q2"], positives, 2, corpus)
    t = pairs.table(0, pairs.num_rows).to_pydict()
    assert list(zip(t["qid"], t["pid"], t["rank"], t["is_positive"])) == [
        ("q1", d["10"], 1, False), ("q1", d["11"], 2, True), ("q1", d["14"], None, True),
        ("q2", d["12"], 1, True), ("q2", d["13"], 2, False)]
    assert pairs.table(1, 3).to_pydict()["pid"] == [d["11"], d["14"]]
    for size in (1, 4):
        again = score.build_pairs(cands.to_batches(max_chunksize=size), ["q1", "q2"], positives, 2, corpus)
        assert again.table(0, again.num_rows).equals(pairs.table(0, pairs.num_rows))


def test_pair_list_refuses_bad_candidates(tmp_path):
    corpus = _corpus(tmp_path, ["1", "2"])
    with pytest.raises(StageError, match="rank twice"):
        score.build_pairs(_cands([("q", "1", 1), ("q", "2", 1)]), ["q"], {"q": ["1"]}, None, corpus)
    with pytest.raises(StageError, match=r"1 candidate passage ids are not in the corpus, e.g. \['7'\]"):
        score.build_pairs(_cands([("q", "1", 1), ("q", "7", 2)]), ["q"], {"q": ["1"]}, None, corpus)
    with pytest.raises(StageError, match="ranks start at 1"):
        score.build_pairs(_cands([("q", "1", 0)]), ["q"], {"q": ["1"]}, None, corpus)


def test_pair_cache_lookup_takes_the_lowest_logit(tmp_path):
    """Two processes that raced on a pair leave two logits: the lookup gives the lowest, whichever file or group
    holds it; pairs of other queries, unknown passages and rows not asked for stay NaN."""
    import pyarrow as pa

    corpus = _corpus(tmp_path, ["1", "2", "3"])
    pairs = score.build_pairs(_cands([("a", "1", 1), ("a", "2", 2), ("b", "1", 1), ("b", "3", 2)]), ["a", "b"],
                              {"a": ["1"], "b": ["3"]}, None, corpus)
    cache = score.PairCache(tmp_path / "pc", {"test": 1})
    for q, p, s in [(["a", "b", "z"], ["2", "3", "1"], [0.5, 2.0, 9.0]), (["b", "a"], ["3", "9"], [1.5, 7.0]),
                    (["b"], ["3"], [3.0])]:
        cache.append(pa.table({"qid": q, "pid": p, "ce_score": pa.array(s, pa.float32())}))
    for group_rows in (1, 100):
        got = cache.lookup(pairs, np.arange(4), group_rows=group_rows)
        assert np.array_equal(got, [np.nan, 0.5, np.nan, 1.5], equal_nan=True)
    assert np.array_equal(cache.lookup(pairs, np.array([3, 1])), [1.5, 0.5])


def test_parquet_stream_bytes_depend_on_rows_only(tmp_path, monkeypatch):
    """The merge streams scores.parquet: however the rows are fed, the file has full row groups and equal bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import shards

    monkeypatch.setattr(shards, "ROW_GROUP_ROWS", 4)
    table = pa.table({"x": pa.array(np.arange(10), pa.int64()), "y": pa.array([str(i) for i in range(10)])})
    files = []
    for feed in ([10], [1, 2, 3, 4], [3, 3, 3, 1]):
        path = tmp_path / f"s{len(files)}.parquet"
        with shards.parquet_stream(path, table.schema) as write:
            lo = 0
            for n in feed:
                write(table.slice(lo, n))
                lo += n
        files.append(path.read_bytes())
        meta = pq.ParquetFile(path).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 2]
        assert pq.read_table(path).equals(table)
    assert files[0] == files[1] == files[2]
    with pytest.raises(RuntimeError), shards.parquet_stream(tmp_path / "never.parquet", table.schema) as write:
        write(table)
        raise RuntimeError("killed")
    assert not list(tmp_path.glob("*never*")) and not list(tmp_path.glob(".tmp-*"))


def test_a_committed_chunk_of_other_pairs_is_refused_at_the_merge(single, setup, tmp_path):
    # a chunk committed for another pair list (the retrieve result changed under the same key) would pin its
    # logits onto the wrong (qid, pid) rows
    import shutil

    import pyarrow as pa

    _, folder, root = single
    copy = tmp_path / "score" / folder.name
    shutil.copytree(root / "retrieve", tmp_path / "retrieve")
    shutil.copytree(folder, copy)
    for name in ("_COMPLETE", "manifest.json", "scores.parquet"):
        (copy / name).unlink()
    chunk = sorted((copy / "blocks").glob("chunk-*.parquet"))[0]
    table = pq.read_table(chunk)
    pids = table.column("pid").to_pylist()
    pq.write_table(table.set_column(table.schema.get_field_index("pid"), "pid", pa.array(pids[1:] + pids[:1])),
                   chunk)
    with pytest.raises(StageError, match="does not match the pair list"):
        score.run(compose([*setup, f"artifacts_root={tmp_path}"]))


def test_the_pair_cache_is_keyed_by_truncation_and_query_text(tmp_path):
    # logits of another max_length, or of a query file with the same ids and other texts, are other logits
    from types import SimpleNamespace

    corpus = SimpleNamespace(fingerprint={"corpus": "x"})
    (tmp_path / "a.tsv").write_text("1\tfirst text\n")
    (tmp_path / "b.tsv").write_text("1\tsecond text\n")

    def folder(*overrides):
        cfg = compose([f"artifacts_root={tmp_path}", f"cache_root={tmp_path / 'cache'}", *overrides])
        return score.PairCache.for_config(cfg, "demo:cross_encoder", corpus).folder

    base = folder(f"data.train.queries={tmp_path / 'a.tsv'}", "score.max_length=64")
    assert folder(f"data.train.queries={tmp_path / 'a.tsv'}", "score.max_length=64") == base
    assert folder(f"data.train.queries={tmp_path / 'a.tsv'}", "score.max_length=32") != base
    assert folder(f"data.train.queries={tmp_path / 'b.tsv'}", "score.max_length=64") != base
