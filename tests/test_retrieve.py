"""The retrieve stage on the demo corpus with the tiny bi-encoder: outputs, exactness against a brute-force
search, resume after a kill, and shards run one by one + merge == one run (byte for byte)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import MARKER, StageError, is_complete, read_manifest, verify_folder
from pipeline.config import compose
from pipeline.stages import retrieve

N_QUERIES = 20
TOP_K = 8


@pytest.fixture(scope="module")
def setup(demo_stage_overrides):
    return [*demo_stage_overrides(max_queries=N_QUERIES, top_k=TOP_K, cross_encoder=False),
            "retrieve.query_block=6", "retrieve.encode_block=1024"]


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieve_single")
    cfg = compose([*setup, f"artifacts_root={root}"])
    return cfg, retrieve.run(cfg)


def test_outputs(single):
    from pipeline.stages import common

    cfg, folder = single
    assert is_complete(folder) and verify_folder(folder) == []
    t = pq.read_table(folder / "candidates.parquet")
    assert [(f.name, str(f.type)) for f in t.schema] == [("qid", "string"), ("pid", "string"), ("rank", "int32"),
                                                         ("bi_score", "float")]
    queries, _, _ = common.training_set(cfg, common.load_corpus(cfg))
    assert t.num_rows == N_QUERIES * TOP_K
    d = t.to_pydict()
    assert d["qid"][::TOP_K] == list(queries)  # training order, k rows each
    assert d["rank"][:TOP_K] == list(range(1, TOP_K + 1))
    scores = np.array(d["bi_score"]).reshape(N_QUERIES, TOP_K)
    assert (np.diff(scores, axis=1) <= 0).all()
    lines = (folder / "run.trec").read_text().splitlines()
    assert len(lines) == t.num_rows
    q, q0, pid, rank, score, tag = lines[1].split()
    assert (q, q0, pid, int(rank), tag) == (d["qid"][1], "Q0", d["pid"][1], 2, cfg.model.name)
    assert float(score) == pytest.approx(d["bi_score"][1], rel=1e-6)
    corpus = common.load_corpus(cfg)
    emb = np.load(folder / "corpus_emb.f16.npy", mmap_mode="r")
    assert emb.dtype == np.float16 and emb.shape[0] == len(corpus)
    assert (folder / "corpus_ids.txt").read_text().splitlines() == corpus.table.column("id").to_pylist()
    counts = read_manifest(folder)["counts"]
    assert counts["candidates"] == t.num_rows and counts["corpus"] == len(corpus)


def test_exact_and_positives_kept(single):
    """The top-k equals a brute-force search with the model's own encode; positives are not removed."""
    from sentence_transformers import SentenceTransformer

    from pipeline.stages import common

    cfg, folder = single
    corpus = common.load_corpus(cfg)
    queries, positives, _ = common.training_set(cfg, corpus)
    model = SentenceTransformer(str(cfg.model.bi_encoder), device="cpu")
    q = model.encode(list(queries.values()), normalize_embeddings=True, convert_to_numpy=True)
    emb = np.load(folder / "corpus_emb.f16.npy").astype(np.float32)
    p_ref = model.encode(corpus.texts_at(np.arange(50)), normalize_embeddings=True, convert_to_numpy=True)
    assert np.abs(emb[:50] - p_ref).max() < 2e-3  # float16 storage of normalised embeddings
    sims = q @ emb.T
    d = pq.read_table(folder / "candidates.parquet").to_pydict()
    got = np.array(d["pid"]).reshape(N_QUERIES, TOP_K)
    ids = np.array(corpus.table.column("id").to_pylist())
    for i in range(N_QUERIES):
        kth = np.sort(sims[i])[::-1][TOP_K - 1]
        assert set(got[i]) <= set(ids[sims[i] >= kth - 1e-4])
    retrieved_pos = sum(p in set(got[i]) for i, qid in enumerate(queries) for p in positives[qid])
    assert retrieved_pos > 0  # the warmed-up tiny v2 finds some positives, and they stay in the candidates


def test_resume_after_kill(single, setup, tmp_path):
    """A run that died after some blocks: committed blocks are kept and the result is the same bytes."""
    import shutil

    _, folder = single
    root = tmp_path / "art"
    copy = root / folder.relative_to(folder.parents[1])
    shutil.copytree(folder, copy)
    second_corpus_block = sorted((copy / "corpus_emb.blocks").glob("rows-*.done"),
                                 key=lambda m: int(m.name.split("-")[1]))[1]
    assert second_corpus_block.name.startswith("rows-1024-")  # retrieve.encode_block=1024 here
    for name in (MARKER, "manifest.json", "candidates.parquet", "run.trec", "blocks/block-000002.parquet",
                 second_corpus_block.relative_to(copy)):
        (copy / name).unlink()
    again = retrieve.run(compose([*setup, f"artifacts_root={root}"]))
    assert again == copy and is_complete(again)
    assert (again / "candidates.parquet").read_bytes() == (folder / "candidates.parquet").read_bytes()
    counts = read_manifest(again)["counts"]
    assert counts["queries_searched_here"] == 6  # one query block redone
    assert counts["corpus_rows_encoded_here"] == 1024  # one corpus block redone


def test_shards_one_by_one_equal_single_run(single, setup, tmp_path):
    _, folder = single
    root = tmp_path / "art"
    parts = [retrieve.run(compose([*setup, f"artifacts_root={root}", "shard.count=3", f"shard.index={i}"]))
             for i in (2, 0)]
    assert all(p.parent.name == "parts" and is_complete(p) for p in parts)
    # the first shard found no one else working and encoded the whole corpus; the second reused it
    assert read_manifest(parts[0])["counts"]["corpus_rows_encoded_here"] > 0
    assert "corpus_rows_encoded_here" not in read_manifest(parts[1])["counts"] or \
        read_manifest(parts[1])["counts"]["corpus_rows_encoded_here"] == 0
    with pytest.raises(StageError, match=r"missing shard.index=\[1\]"):
        retrieve.run(compose([*setup, f"artifacts_root={root}"]))
    last = retrieve.run(compose([*setup, f"artifacts_root={root}", "shard.count=3", "shard.index=1"]))
    assert last.name == folder.name and is_complete(last)  # the last shard merged
    assert (last / "candidates.parquet").read_bytes() == (folder / "candidates.parquet").read_bytes()
    assert (last / "run.trec").read_bytes() == (folder / "run.trec").read_bytes()
    assert verify_folder(last) == []
    assert read_manifest(last)["extra"]["merged_parts"] == 3
    # shard settings never change the key; a plain run now finds the merged result
    assert retrieve.run(compose([*setup, f"artifacts_root={root}"])) == last


def test_bad_settings_are_clear(setup, tmp_path):
    with pytest.raises(ValueError, match="shard.index"):
        retrieve.run(compose([*setup, f"artifacts_root={tmp_path}", "shard.count=2", "shard.index=2"]))
    with pytest.raises(ValueError, match="retrieve.backend"):
        retrieve.run(compose([*setup, f"artifacts_root={tmp_path}", "retrieve.backend=annoy"]))


def test_evaluation_links_the_retrieved_embeddings(single, setup):
    """The chain's v2 evaluation encodes nothing: retrieve already encoded the corpus with that model, prompt,
    normalisation, truncation and dtype, and evaluate links that file. Another dtype encodes anew."""
    from pipeline.stages import evaluate

    cfg, folder = single
    assert read_manifest(folder)["extra"]["embedding_key"]
    root = cfg.artifacts_root
    same = evaluate.run(compose([*setup, f"artifacts_root={root}", "evaluate.bm25=false", "evaluate.precision=fp32"]))
    assert (same / evaluate.EMB_FILE).stat().st_ino == (folder / retrieve.EMB_FILE).stat().st_ino
    assert "encode_corpus" not in read_manifest(same)["timings_s"]
    other = evaluate.run(compose([*setup, f"artifacts_root={root}", "evaluate.bm25=false", "evaluate.precision=bf16"]))
    assert "encode_corpus" in read_manifest(other)["timings_s"]
    assert (other / evaluate.EMB_FILE).stat().st_ino != (folder / retrieve.EMB_FILE).stat().st_ino
    # the linked rows are the same passages in the same order: a bf16 encode of the corpus agrees with them row by row
    fresh = np.load(other / evaluate.EMB_FILE).astype(np.float32)
    linked = np.load(same / evaluate.EMB_FILE).astype(np.float32)
    cos = (fresh * linked).sum(1) / (np.linalg.norm(fresh, axis=1) * np.linalg.norm(linked, axis=1))
    assert cos.min() > 0.99


def test_retrieve_links_embeddings_an_evaluation_made(single, setup, tmp_path):
    """The v2 evaluated before the chain (same model, dtype, truncation): retrieve links that evaluation's corpus
    embeddings instead of encoding, and retrieves what a fresh encode retrieves."""
    from pipeline.stages import evaluate

    root = tmp_path / "art"
    ev = evaluate.run(compose([*setup, f"artifacts_root={root}", "evaluate.bm25=false", "evaluate.precision=fp32"]))
    folder = retrieve.run(compose([*setup, f"artifacts_root={root}"]))
    assert (folder / retrieve.EMB_FILE).stat().st_ino == (ev / evaluate.EMB_FILE).stat().st_ino
    manifest = read_manifest(folder)
    assert manifest["counts"]["corpus_rows_encoded_here"] == 0 and manifest["extra"]["corpus_embeddings_linked"]
    assert verify_folder(folder) == []
    ours = pq.read_table(folder / "candidates.parquet").column("pid").to_pylist()
    fresh = pq.read_table(single[1] / "candidates.parquet").column("pid").to_pylist()
    assert np.mean([a == b for a, b in zip(ours, fresh)]) >= 0.95 and len(ours) == len(fresh)


def test_a_forced_retrieve_encodes_afresh_and_shares_only_what_its_run_made(single, setup, tmp_path, monkeypatch):
    """force=true recomputes: embeddings an evaluation made before (an older engine, say) are not linked; the
    evaluation the same forced run makes afterwards links the fresh ones instead of encoding a third time."""
    from pipeline import artifacts
    from pipeline.stages import evaluate

    root = tmp_path / "art"
    monkeypatch.setenv("PIPELINE_FORCE_ID", "forced-run-1")
    stale = evaluate.run(compose([*setup, f"artifacts_root={root}", "evaluate.bm25=false", "evaluate.precision=fp32"]))
    monkeypatch.setenv("PIPELINE_FORCE_ID", "forced-run-2")
    folder = retrieve.run(compose([*setup, f"artifacts_root={root}", "force=true"]))
    manifest = read_manifest(folder)
    assert manifest["counts"]["corpus_rows_encoded_here"] > 0 and "corpus_embeddings_linked" not in manifest["extra"]
    assert (folder / retrieve.EMB_FILE).stat().st_ino != (stale / evaluate.EMB_FILE).stat().st_ino
    again = evaluate.run(compose([*setup, f"artifacts_root={root}", "evaluate.bm25=false", "evaluate.precision=fp32",
                                  "force=true"]))
    assert again == stale and artifacts.forced_already(again, "forced-run-2")
    assert (again / evaluate.EMB_FILE).stat().st_ino == (folder / retrieve.EMB_FILE).stat().st_ino


def test_embedding_rows_written_by_ranges_and_committed(tmp_path):
    """The one writer of a corpus embeddings file (retrieve's blocks, evaluate's chunks and device processes): ranges
    written in any order and by separate processes make the whole float16 file; committed ranges are counted;
    a file of another shape is refused with a way out."""
    import multiprocessing as mp

    from pipeline.stages import common

    path, marks = tmp_path / "emb.f16.npy", tmp_path / "marks"
    whole = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    for lo, hi in ((6, 10), (0, 3)):
        common.write_embedding_rows(path, 10, lo, whole[lo:hi], marks)
        common.commit_rows(marks, lo, hi)
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=common.write_embedding_rows, args=(path, 10, 3, whole[3:6], marks))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    common.commit_rows(marks, 3, 6)
    np.testing.assert_array_equal(np.load(path), whole.astype(np.float16))
    assert common.rows_committed(marks, 3, 6) and not common.rows_committed(marks, 3, 7)
    assert common.committed_row_count(marks) == 10
    assert common.embeddings_file_fits(path, 10, 4) and not common.embeddings_file_fits(path, 10, 5)
    with pytest.raises(StageError, match=r"expected \(10, 5\) float16; force=true rebuilds it"):
        common.write_embedding_rows(path, 10, 0, np.zeros((1, 5), np.float32), marks)


def test_embeddings_that_are_not_finite_are_refused_by_row(tmp_path):
    """A model that overflowed gives NaN or infinite embeddings, which a search ranks first or last for every
    query without a word; values past float16's range become infinite in the file. The writer refuses both and
    writes nothing of the block."""
    from pipeline.stages import common

    path, marks = tmp_path / "emb.f16.npy", tmp_path / "marks"
    block = np.ones((4, 3), np.float32)
    block[2, 1] = np.nan
    with pytest.raises(StageError, match=r"1 of 4 corpus embeddings are not finite \(first: row 102\)"):
        common.write_embedding_rows(path, 200, 100, block, marks)
    block[2, 1], block[3, 0] = 1.0, 70000.0  # finite in float32, infinite in the float16 file
    with pytest.raises(StageError, match=r"first: row 103"):
        common.write_embedding_rows(path, 200, 100, block, marks)
    assert not path.exists()  # refused before anything was written
    with pytest.raises(StageError, match="query embeddings are not finite"):
        common.check_finite(np.array([[0.5, np.inf]], np.float32), "query")
    common.check_finite(np.zeros((0, 3), np.float32), "query")


def _encode_ctx(root: Path, final: Path, value: float, n: int = 8, dim: int = 4):
    """What retrieve.encode_corpus reads, standing in for the stage's context: an n-passage corpus in blocks of 2,
    embedding key "K", and a model whose every embedding is ``value``."""
    from types import SimpleNamespace

    import pyarrow as pa
    from omegaconf import OmegaConf

    class Passages(SimpleNamespace):
        def __len__(self):
            return n

    cfg = OmegaConf.create({"artifacts_root": str(root), "token_cache": False, "force": False,
                            "retrieve": {"encode_block": 2}, "shard": {"index": 0, "count": 1}})
    return SimpleNamespace(cfg=cfg, final=final, model=None, facts={"embedding_key": "K", "corpus_prompt": None},
                           corpus=Passages(table=pa.table({"text": [f"p{i}" for i in range(n)]}), fingerprint="c"),
                           encode=lambda texts, *a, **k: np.full((len(texts), dim), value, np.float32))


def test_row_markers_of_a_missing_embeddings_file_are_not_trusted(tmp_path):
    """A forced rerun clears the folder; killed after the embeddings file went but before all its row markers
    did, it leaves markers for rows of a file that no longer exists. The resumed encode must encode those rows
    again, not skip them into a fresh all-zero file that it then calls complete."""
    from pipeline.artifacts import open_stage
    from pipeline.stages import common, retrieve

    n, dim = 8, 4
    with pytest.raises(RuntimeError, match="killed"), open_stage("retrieve", {"r": 1}, root=tmp_path, label="l",
                                                                 resumable=True) as st:
        retrieve.encode_corpus(_encode_ctx(tmp_path, st.path, 2.0), st)
        raise RuntimeError("killed before the stage completed")
    final = st.path
    (final / retrieve.EMB_FILE).unlink()  # the file gone, its markers still there
    assert common.committed_row_count(final / retrieve.EMB_BLOCKS) == n
    with open_stage("retrieve", {"r": 1}, root=tmp_path, label="l", resumable=True) as st:
        emb = retrieve.encode_corpus(_encode_ctx(tmp_path, st.path, 3.0), st)
    np.testing.assert_array_equal(np.asarray(emb), np.full((n, dim), 3.0, np.float16))


def test_a_kill_while_linking_embeddings_never_writes_into_the_linked_file(tmp_path, monkeypatch):
    """retrieve links a complete evaluate folder's corpus embeddings (same key) and marks its blocks done. Killed
    in between, the rerun must not encode the unmarked blocks into the linked file: that is the evaluate
    folder's file too, which would change under its checksums. And no writer writes into a shared file."""
    from pipeline.artifacts import StageRun, open_stage, verify_folder
    from pipeline.stages import common, retrieve

    n, dim = 8, 4
    with open_stage("evaluate", {"e": 1}, root=tmp_path, label="ev") as st:
        np.save(st.file(common.EMB_FILE), np.ones((n, dim), np.float16))
        st.extra["embedding_key"] = "K"
    evaluated = st.path
    final = tmp_path / "retrieve" / "l-123"
    final.mkdir(parents=True)
    ctx = _encode_ctx(tmp_path, final, 2.0, n, dim)
    real, marked = common.commit_rows, []

    def killed_at_the_second_marker(*a):
        marked.append(a)
        if len(marked) == 2:
            raise SystemExit("killed")
        return real(*a)

    monkeypatch.setattr(common, "commit_rows", killed_at_the_second_marker)
    with pytest.raises(SystemExit):
        retrieve.encode_corpus(ctx, StageRun("retrieve", final, "123", {}, {}))
    monkeypatch.setattr(common, "commit_rows", real)
    emb = retrieve.encode_corpus(ctx, StageRun("retrieve", final, "123", {}, {}))
    np.testing.assert_array_equal(np.asarray(emb), np.ones((n, dim), np.float16))  # linked again, not encoded
    assert verify_folder(evaluated) == [] and np.load(evaluated / common.EMB_FILE).min() == 1
    with pytest.raises(StageError, match="hard link shared with another stage folder"):
        common.write_embedding_rows(final / common.EMB_FILE, n, 0, np.zeros((2, dim), np.float32),
                                    final / retrieve.EMB_BLOCKS)
