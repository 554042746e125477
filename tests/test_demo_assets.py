"""The shipped demo corpus (formats, counts, determinism) and the tiny offline models."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline import demo

N_COLLECTION = (2800, 3200)


def _lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and b"\r" not in raw, path
    return raw.decode("utf-8").split("\n")[:-1]


def _tsv(path: Path, ncols: int) -> list[list[str]]:
    rows = [line.split("\t") for line in _lines(path)]
    assert all(len(r) == ncols for r in rows), path
    return rows


@pytest.fixture(scope="module")
def shipped(demo_data_dir):
    d = Path(demo_data_dir)
    coll = _tsv(d / "collection.tsv", 2)
    queries = {s: _tsv(d / f"queries.{s}.tsv", 2) for s in ("train", "dev", "dl")}
    return {"dir": d, "collection": coll, "pids": {p for p, _ in coll}, "text": dict(coll), "queries": queries}


def test_files_and_size(shipped):
    d = shipped["dir"]
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(demo.DEMO_FILES)
    assert sum((d / n).stat().st_size for n in names) < 1_000_000


def test_collection(shipped):
    coll = shipped["collection"]
    assert N_COLLECTION[0] <= len(coll) <= N_COLLECTION[1]
    assert [p for p, _ in coll] == [str(i) for i in range(len(coll))]  # integer pids 0..N-1, in order
    assert all(t.strip() == t and len(t) > 20 for _, t in coll)
    assert len({t for _, t in coll}) == len(coll)  # no duplicate passages


def test_queries(shipped):
    q = shipped["queries"]
    assert [len(q[s]) for s in ("train", "dev", "dl")] == [demo.N_TRAIN, demo.N_DEV, demo.N_DL]
    ids = [qid for s in q for qid, _ in q[s]]
    assert len(ids) == len(set(ids))  # distinct within and across query sets
    assert all(qid.isdigit() and text and text == text.lower() for s in q for qid, text in q[s])


@pytest.mark.parametrize("split", ["train", "dev"])
def test_msmarco_qrels(shipped, split):
    rows = _tsv(shipped["dir"] / f"qrels.{split}.tsv", 4)
    qids = {qid for qid, _ in shipped["queries"][split]}
    assert all(r[1] == "0" and r[3] == "1" for r in rows)
    assert all(r[2] in shipped["pids"] for r in rows)
    assert {r[0] for r in rows} == qids  # every query has a positive
    per_query = Counter(r[0] for r in rows)
    assert set(per_query.values()) == {1, 2} and 0.1 < sum(v == 2 for v in per_query.values()) / len(qids) < 0.35
    assert len({(r[0], r[2]) for r in rows}) == len(rows)


def test_trec_dl_qrels_and_top100(shipped):
    d = shipped["dir"]
    qrels = [line.split(" ") for line in _lines(d / "qrels.dl.txt")]
    assert all(len(r) == 4 and r[1] == "Q0" and r[3] in {"0", "1", "2", "3"} for r in qrels)
    assert all(r[2] in shipped["pids"] for r in qrels)
    qtext = dict(shipped["queries"]["dl"])
    judged: dict[str, dict[str, int]] = {}
    for qid, _, pid, g in qrels:
        assert pid not in judged.setdefault(qid, {})
        judged[qid][pid] = int(g)
    assert set(judged) == set(qtext)
    for grades in judged.values():
        c = Counter(grades.values())
        assert c[3] == 1 and c[2] >= 1 and c[1] >= 3 and c[0] >= 4

    top = _tsv(d / "top100.dl.tsv", 4)
    cands: dict[str, list[str]] = {}
    for qid, pid, query, passage in top:
        assert query == qtext[qid] and passage == shipped["text"][pid]
        cands.setdefault(qid, []).append(pid)
    assert set(cands) == set(qtext)
    for qid, pids in cands.items():
        assert len(pids) == demo.TOP_K_DL == len(set(pids))
        assert set(judged[qid]) <= set(pids)  # every judged passage is a candidate


def test_readme(shipped):
    text = (shipped["dir"] / "README.md").read_text()
    assert "python scripts/make_demo_corpus.py" in text and "Random(0)" in text
    assert f"{len(shipped['collection'])} passages" in text


def test_generation_is_deterministic(shipped, tmp_path):
    out = demo.write_demo_corpus(tmp_path / "demo", seed=0)
    for name in demo.DEMO_FILES:
        assert (out / name).read_bytes() == (shipped["dir"] / name).read_bytes(), name
    other = demo.generate_demo_corpus(seed=1)
    assert [t for _, t in other["collection"]] != [t for _, t in shipped["collection"]]


def test_tiny_bi_encoder_loads_offline(tiny_bi_encoder, shipped):
    import numpy as np
    from sentence_transformers import SentenceTransformer

    path = Path(tiny_bi_encoder)
    assert list(path.glob("*.safetensors")) and not list(path.rglob("*.bin"))
    model = SentenceTransformer(str(path), device="cpu")
    assert model.similarity_fn_name == "cosine" and model.get_max_seq_length() == 64
    texts = [t for _, t in shipped["collection"][:5]] + [t for _, t in shipped["queries"]["dev"][:3]]
    emb = model.encode(texts, convert_to_numpy=True)
    assert emb.shape == (8, 64) and np.isfinite(emb).all()
    tok = model.tokenizer
    assert tok.unk_token == "[UNK]" and tok.cls_token == "[CLS]" and tok.mask_token == "[MASK]"
    ids = tok("How many people live in Velmora")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids


def test_tiny_cross_encoder_loads_offline(tiny_cross_encoder, shipped):
    import numpy as np
    from sentence_transformers import CrossEncoder
    from transformers import BertTokenizerFast

    path = Path(tiny_cross_encoder)
    assert list(path.glob("*.safetensors"))
    assert BertTokenizerFast.from_pretrained(str(path)).vocab_size <= 4000
    ce = CrossEncoder(str(path), device="cpu")
    q = shipped["queries"]["dev"][0][1]
    scores = ce.predict([(q, t) for _, t in shipped["collection"][:6]])
    assert np.asarray(scores).shape == (6,) and np.isfinite(scores).all()


def test_build_demo_models_is_idempotent(tmp_path, monkeypatch, demo_data_dir):
    settings = copy.deepcopy(demo.DEMO_MODEL_SETTINGS)
    settings["bi_encoder"]["warmup_steps"] = 3
    settings["bi_encoder"]["warmup_batch_size"] = 8
    monkeypatch.setattr(demo, "DEMO_MODEL_SETTINGS", settings)
    paths = demo.build_demo_models(tmp_path / "models", demo_data_dir)
    assert set(paths) == {"bi_encoder", "cross_encoder_base"}
    warm = json.loads((paths["bi_encoder"] / "warmup.json").read_text())
    assert warm["steps"] == 3
    stamp = tmp_path / "models" / "stamp.json"
    before = (stamp.stat().st_mtime_ns, (paths["bi_encoder"] / "model.safetensors").stat().st_mtime_ns)
    assert demo.build_demo_models(tmp_path / "models", demo_data_dir) == paths
    after = (stamp.stat().st_mtime_ns, (paths["bi_encoder"] / "model.safetensors").stat().st_mtime_ns)
    assert before == after  # reused, not rebuilt
    settings["bi_encoder"]["warmup_steps"] = 2  # other settings: rebuilt
    demo.build_demo_models(tmp_path / "models", demo_data_dir)
    assert json.loads((paths["bi_encoder"] / "warmup.json").read_text())["steps"] == 2


def test_demo_models_are_built_once_by_concurrent_callers(tmp_path, monkeypatch, demo_data_dir):
    """The shards of an array on a fresh artifacts root all ask for the demo models at once: one builds, the
    others wait for it and reuse its models (they used to delete each other's tokenizer mid-build)."""
    import threading

    settings = copy.deepcopy(demo.DEMO_MODEL_SETTINGS)
    settings["bi_encoder"]["warmup_steps"] = 2
    settings["bi_encoder"]["warmup_batch_size"] = 8
    monkeypatch.setattr(demo, "DEMO_MODEL_SETTINGS", settings)
    builds, results, errors = [], [], []
    real = demo._build_demo_models

    def counted(*args):
        builds.append(1)
        real(*args)

    monkeypatch.setattr(demo, "_build_demo_models", counted)

    def ask():
        try:
            results.append(demo.build_demo_models(tmp_path / "models", demo_data_dir))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(builds) == 1 and len(results) == 3 and results[0] == results[1] == results[2]
