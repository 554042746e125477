"""Model specs: a Hub id pinned to a revision (owner/name@revision) loads that revision and keys its artifacts by
it, and every manifest records the commit each Hub model it used resolved to. The Hub is a cache made here:
HF_HUB_OFFLINE=1 resolves ids and revisions from its refs, as on a cluster node without internet."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import models
from pipeline.artifacts import StageError
from pipeline.config import REPO_ROOT
from pipeline.models import (hub_id, load_bi_encoder, load_cross_encoder, model_identity, resolve_device,
                             resolve_model_path, split_revision)

MAIN, TAGGED, NEW_CARD = "a" * 40, "b" * 40, "c" * 40


def test_a_pinned_spec_splits_and_keys_by_its_revision(tmp_path, monkeypatch):
    assert split_revision("owner/name@v1.0") == ("owner/name", "v1.0")
    assert split_revision("owner/name") == ("owner/name", None)
    assert model_identity("owner/name@" + TAGGED) == {"hub": "owner/name", "revision": TAGGED}
    # an unpinned id keys as it always has: the artifacts of earlier runs keep their keys
    assert model_identity("owner/name") == {"hub": "owner/name"}
    assert hub_id("owner/name@v1.0") == "owner/name" and hub_id("owner/name") == "owner/name"
    # a local folder whose name holds an @ is that folder, not a pinned Hub id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny@v2").mkdir(parents=True)
    (tmp_path / "models" / "tiny@v2" / "config.json").write_text("{}")
    assert split_revision("models/tiny@v2") == ("models/tiny@v2", None)
    assert "local" in model_identity("models/tiny@v2") and hub_id("models/tiny@v2") is None


def _hub_cache(root: Path, tokenizer: Path) -> Path:
    """A Hugging Face cache holding owner/tiny at two commits, main and the tag v1, with different weights."""
    from pipeline.demo import build_tiny_bi_encoder

    repo = root / "models--owner--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(TAGGED)
    for seed, commit in enumerate((MAIN, TAGGED)):
        build_tiny_bi_encoder(root / "built" / commit, tokenizer_dir=tokenizer, hidden=32, layers=1, heads=2,
                              max_seq_length=32, seed=seed)
        _as_hub_snapshot(root / "built" / commit, repo, commit)
    return root


def _as_hub_snapshot(model: Path, repo: Path, commit: str) -> None:
    """``model``'s files as huggingface_hub lays out a download: content-named blobs, the snapshot's files links."""
    import hashlib

    for f in sorted(p for p in model.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        link = repo / "snapshots" / commit / f.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


RETRIEVE = """
import json, sys
import pyarrow.parquet as pq
from pipeline.artifacts import StageError, read_manifest
from pipeline.config import compose
from pipeline.stages import retrieve

overrides = json.loads(sys.argv[1])
out = {}
for spec in sys.argv[2:]:
    try:
        folder = retrieve.run(compose([*overrides, f"model.bi_encoder={spec}"]))
    except StageError as exc:
        out[spec] = {"error": str(exc)}
        continue
    manifest = read_manifest(folder)
    out[spec] = {"folder": folder.name, "hub_commits": manifest.get("hub_commits"),
                 "identity": manifest["identity"]["bi_encoder"],
                 "scores": pq.read_table(folder / "candidates.parquet").column("bi_score").to_pylist()}
from pipeline.models import hub_commit, load_cross_encoder

for spec in ("owner/tiny@" + "b" * 40, "owner/tiny@v8"):  # the tag v1's commit, a revision the cache lacks
    try:
        load_cross_encoder(spec, device="cpu")
        out["cross-encoder " + spec] = {"hub_commit": hub_commit(spec)}
    except StageError as exc:
        out["cross-encoder " + spec] = {"error": str(exc)}
print("RESULT " + json.dumps(out))
"""


def test_retrieve_loads_the_pinned_revision_and_its_manifest_records_the_commit(tmp_path, tiny_tokenizer_dir,
                                                                                  demo_stage_overrides):
    cache = _hub_cache(tmp_path / "hub", tiny_tokenizer_dir)
    overrides = [*demo_stage_overrides(max_queries=4, top_k=5, cross_encoder=False),
                 f"artifacts_root={tmp_path / 'art'}", "token_cache=false"]
    specs = ["owner/tiny", "owner/tiny@v1", f"owner/tiny@{MAIN}", "owner/tiny@v9"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", RETRIEVE, json.dumps(overrides), *specs], capture_output=True,
                          text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))

    assert got["owner/tiny"]["hub_commits"] == {"owner/tiny": MAIN}  # what the unpinned id served
    assert got["owner/tiny"]["identity"] == {"hub": "owner/tiny"}
    assert got["owner/tiny@v1"]["hub_commits"] == {"owner/tiny@v1": TAGGED}
    assert got["owner/tiny@v1"]["identity"] == {"hub": "owner/tiny", "revision": "v1"}
    assert got[f"owner/tiny@{MAIN}"]["hub_commits"] == {f"owner/tiny@{MAIN}": MAIN}
    # each pin is its own result, computed by the weights it names; none reuses the unpinned one
    assert len({got[spec]["folder"] for spec in specs[:3]}) == 3
    assert got[f"owner/tiny@{MAIN}"]["scores"] == got["owner/tiny"]["scores"] != got["owner/tiny@v1"]["scores"]
    error = got["owner/tiny@v9"]["error"]
    assert "cannot load the bi-encoder 'owner/tiny@v9'" in error and "revision 'v9'" in error
    assert got[f"cross-encoder owner/tiny@{TAGGED}"] == {"hub_commit": TAGGED}
    error = got["cross-encoder owner/tiny@v8"]["error"]
    assert "cannot load the cross-encoder 'owner/tiny@v8'" in error and "revision 'v8'" in error


def test_device_auto_is_what_this_machine_has():
    import torch

    assert resolve_device("auto") == resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == "cuda:1"


def test_a_pin_may_name_a_branch_with_slashes_and_a_local_folder_is_never_a_hub_id(tmp_path, monkeypatch):
    # the Hub's pull-request refs and slashed branch names are revisions too
    assert split_revision("owner/name@refs/pr/1") == ("owner/name", "refs/pr/1")
    # a folder named like an id is that folder: nothing for a model card to link
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert hub_id("models/tiny") is None and hub_id("models/other") == "models/other"


def test_a_commit_is_recorded_only_when_it_is_one(monkeypatch):
    """Where the cache cannot say which commit a model came from, the loader's record is kept only when it is a
    commit: a branch or tag name (what it keeps for a pinned one) would mislabel the card."""
    from types import SimpleNamespace

    monkeypatch.setattr(models, "_hub_loaded", {})

    def loaded(revision):
        return SimpleNamespace(model_card_data=SimpleNamespace(base_model_revision=revision))

    models._record_commit("owner/not-cached@v1", loaded("v1"))
    models._record_commit("owner/not-cached", loaded("c" * 40))
    assert models.commit_note("owner/not-cached@v1") == ""
    assert models.commit_note("owner/not-cached") == " at commit " + "c" * 40
    assert models.commit_note("./local-model") == ""


def test_loaders_apply_the_configured_lengths(tiny_bi_encoder, tiny_cross_encoder):
    assert load_bi_encoder(str(tiny_bi_encoder), device="cpu", max_seq_length=7).max_seq_length == 7
    assert load_cross_encoder(str(tiny_cross_encoder), device="cpu", max_length=9).max_length == 9


def test_a_model_that_cannot_load_is_one_line_saying_why(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    for spec, why in [("empty", "the folder holds no model"), ("./missing", "no such folder"),
                      ("model.pt", "no such folder"),
                      ("owner/not-cached", "not a local folder, and the Hub is unreachable or the id is wrong "
                                           "(offline: the HF cache only)")]:
        with pytest.raises(StageError) as info:
            load_bi_encoder(spec, device="cpu")
        message = str(info.value)
        assert message.startswith(f"cannot load the bi-encoder {spec!r}: {why} ("), message
        assert "\n" not in message
    # a library's multi-line explanation is cut to its first line
    import sentence_transformers

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to the Hub.\nCheckout your internet connection or see how to run the "
                      "library in offline mode.")

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", unreachable)
    with pytest.raises(StageError, match=r"\(We couldn't connect to the Hub\.\)$"):
        load_bi_encoder("owner/name", device="cpu")


def test_unknown_demo_models_are_named(tmp_path):
    with pytest.raises(StageError, match=r"unknown demo model 'demo:nope'; available: demo:"):
        resolve_model_path("demo:nope", tmp_path)


def test_a_models_identity_follows_what_it_computes(tmp_path, monkeypatch):
    """A local folder keys by its content but not its card (train writes the measured figures into README.md after
    evaluating); a demo model keys by the settings that build it."""
    import copy

    from pipeline import demo

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    before = model_identity(str(folder))
    (folder / "README.md").write_text("# measured: MRR@10 0.33\n")
    assert model_identity(str(folder)) == before
    (folder / "config.json").write_text('{"hidden": 8}')
    assert model_identity(str(folder)) != before

    built = model_identity("demo:bi_encoder")
    settings = copy.deepcopy(demo.DEMO_MODEL_SETTINGS)
    settings["version"] += 1
    monkeypatch.setattr(demo, "DEMO_MODEL_SETTINGS", settings)
    assert model_identity("demo:bi_encoder") != built


HUB_MOVES = """
import json, os, sys
from pathlib import Path
from pipeline.artifacts import StageError, read_manifest
from pipeline.config import compose
from pipeline.stages import retrieve, score

overrides, hub, new_main = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
out = {}

def retrieved(name, *extra):
    folder = retrieve.run(compose([*overrides, *extra]))
    out[name] = {"key": read_manifest(folder)["extra"]["embedding_key"], "emb": str(folder / "corpus_emb.f16.npy")}

def scored(name, *extra):
    manifest = read_manifest(score.run(compose([*overrides, *extra])))
    out[name] = {**manifest["counts"], "hub_commits": manifest.get("hub_commits")}

retrieved("before", "model.bi_encoder=owner/tiny")
sharded = [*overrides, "model.bi_encoder=owner/tiny", "retrieve.top_k=8", "shard.count=2"]
retrieve.run(compose([*sharded, "shard.index=0"]))  # an array task that ran before the move
scored("scored before", "model.bi_encoder=owner/tiny", "model.cross_encoder=owner/ce", "score.depth=3")
score_shards = ["model.bi_encoder=owner/tiny", "model.cross_encoder=owner/ce", "score.depth=2", "score.chunk_pairs=4",
                "shard.count=2"]
score.run(compose([*overrides, *score_shards, "shard.index=0"]))
for repo in ("models--owner--tiny", "models--owner--ce"):  # the Hub's main moves on
    (hub / repo / "refs" / "main").write_text(new_main)
retrieved("after", "model.bi_encoder=owner/tiny", "retrieve.top_k=6")
retrieved("pinned", "model.bi_encoder=owner/tiny@" + new_main, "retrieve.top_k=7")
try:
    retrieve.run(compose([*sharded, "shard.index=1"]))  # and its other task, started after the move
except StageError as exc:
    out["sharded after"] = str(exc)
try:
    score.run(compose([*overrides, *score_shards, "shard.index=1"]))
except StageError as exc:
    out["score shard after"] = str(exc)
scored("scored after", "model.bi_encoder=owner/tiny", "model.cross_encoder=owner/ce", "score.depth=4")
scored("scored pinned", "model.bi_encoder=owner/tiny", "model.cross_encoder=owner/ce@v1", "score.depth=5")
scored("scored new card", "model.bi_encoder=owner/tiny", "model.cross_encoder=owner/ce@" + "c" * 40, "score.depth=3")
print("RESULT " + json.dumps(out))
"""


def _hub_cross_encoder(cache: Path, tokenizer: Path, tmp_path: Path) -> Path:
    """owner/ce in the Hub cache: a tiny single-logit cross-encoder at main and at the tag v1, other weights."""
    from pipeline.demo import build_tiny_cross_encoder_base

    ce = cache / "models--owner--ce"
    (ce / "refs").mkdir(parents=True)
    (ce / "refs" / "main").write_text(MAIN)
    (ce / "refs" / "v1").write_text(TAGGED)
    for seed, commit in enumerate((MAIN, TAGGED)):
        built = build_tiny_cross_encoder_base(tmp_path / "built-ce" / commit, tokenizer_dir=tokenizer, hidden=32,
                                              layers=1, heads=2, max_seq_length=64, seed=seed)
        _as_hub_snapshot(built, ce, commit)
    return ce


CLAIMS = """
import json, sys
from pathlib import Path
from pipeline import artifacts
from pipeline.artifacts import StageError, stage_folder, config_key
from pipeline.config import compose
from pipeline.stages import common, evaluate, mine, retrieve, score, teacher, train

overrides = json.loads(sys.argv[1])
cfg = compose([*overrides, "model.cross_encoder=owner/ce"])
taught = compose([*overrides, "model.cross_encoder=null", "model.teacher_base=owner/ce", "teacher.epochs=1"])
out = {}

def claimed_by_others(folder):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"spec": "x", "files": {"hub": "x", "files": "other"}, "commit": "d" * 40}
    (folder / artifacts.HUB_WEIGHTS).write_text(json.dumps(record))

def refused(name, folder, call):
    claimed_by_others(folder)
    try:
        call()
        out[name] = "ran"
    except StageError as exc:
        out[name] = str(exc)
    (folder / artifacts.HUB_WEIGHTS).unlink()

refused("retrieve", common.stage_dir(cfg, "retrieve"), lambda: retrieve.run(cfg))
retrieve.run(cfg)
refused("teacher", common.stage_dir(taught, "teacher"), lambda: teacher.run(taught))
refused("score", common.stage_dir(cfg, "score"), lambda: score.run(cfg))
score.run(cfg)
mine.run(cfg)
refused("train", common.stage_dir(cfg, "train"), lambda: train.run(cfg))
system = evaluate._dense_system(cfg, "v2", "owner/tiny", "auto", None, None)
folder = stage_folder(common.artifacts_root(cfg), "evaluate", evaluate._label_for(cfg, system),
                      config_key(evaluate.system_identity(cfg, system)))
refused("evaluate", folder, lambda: evaluate.evaluate_system(cfg, "v2", "owner/tiny"))
print("RESULT " + json.dumps(out))
"""


def test_every_stage_that_loads_a_hub_model_claims_its_folder(tmp_path, tiny_tokenizer_dir, demo_stage_overrides):
    """Retrieve, teacher, score, train and evaluate each refuse to add to a folder whose work other files of their
    Hub model computed (the claims are one call each; a stage without one would mix two models after a move)."""
    cache = _hub_cache(tmp_path / "hub", tiny_tokenizer_dir)
    _hub_cross_encoder(cache, tiny_tokenizer_dir, tmp_path)
    overrides = [*demo_stage_overrides(max_queries=4, top_k=5, cross_encoder=False),
                 f"artifacts_root={tmp_path / 'art'}", "token_cache=false", "model.bi_encoder=owner/tiny",
                 "train.max_steps=1", "train.evaluate=false", "data.evals={}", "mine.ce_score_margin=-100"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", CLAIMS, json.dumps(overrides)], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    for stage, spec in (("retrieve", "owner/tiny"), ("teacher", "owner/ce"), ("score", "owner/ce"),
                        ("train", "owner/tiny"), ("evaluate", "owner/tiny")):
        assert f"computed with {spec} at commit {'d' * 40}" in got[stage], (stage, got[stage])


def test_caches_follow_the_commit_a_hub_model_loads_at_when_the_hub_moves(tmp_path, tiny_tokenizer_dir,
                                                                         demo_stage_overrides):
    """An unpinned id keys its results by name, but the corpus embeddings linked between stages and the pair cache
    must not outlive the weights: after the Hub's main moved, a new result computed with the new weights took the
    old weights' embeddings and logits (its manifest naming the new commit). Pins of the same files share them."""
    cache = _hub_cache(tmp_path / "hub", tiny_tokenizer_dir)
    ce = _hub_cross_encoder(cache, tiny_tokenizer_dir, tmp_path)
    (tmp_path / "built-ce" / MAIN / "README.md").write_text("# a model card added later")
    (tmp_path / "built-ce" / MAIN / "onnx").mkdir()
    (tmp_path / "built-ce" / MAIN / "onnx" / "model.onnx").write_bytes(b"an export added later")
    _as_hub_snapshot(tmp_path / "built-ce" / MAIN, ce, NEW_CARD)  # main's weights, a new card and an ONNX export
    overrides = [*demo_stage_overrides(max_queries=4, top_k=5), f"artifacts_root={tmp_path / 'art'}",
                 "token_cache=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", HUB_MOVES, json.dumps(overrides), str(cache), TAGGED],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))

    assert got["after"]["key"] != got["before"]["key"]
    assert not os.path.samefile(got["after"]["emb"], got["before"]["emb"])  # encoded again, not linked
    assert got["pinned"]["key"] == got["after"]["key"]  # the commit main now names, pinned: one cache
    assert os.path.samefile(got["pinned"]["emb"], got["after"]["emb"])
    before, after, pinned = got["scored before"], got["scored after"], got["scored pinned"]
    assert before["hub_commits"]["owner/ce"] == MAIN and after["hub_commits"]["owner/ce"] == TAGGED
    assert before["pairs_scored"] > 0 and after["pairs_from_cache"] == 0  # no logit of the old weights reused
    assert after["pairs_scored"] == after["pairs"]
    assert pinned["pairs_from_cache"] == after["pairs"] > 0  # the tag v1 is that commit: its logits are reused
    # one result is never computed with two models: the shard started after the move stops, saying what to do
    error = got["sharded after"]
    assert f"owner/tiny at commit {MAIN}" in error and f"loads commit {TAGGED}" in error
    assert "force=true" in error and f"owner/tiny@{MAIN}" in error
    assert f"owner/ce at commit {MAIN}" in got["score shard after"]
    # a commit that changed no file the model loads (a model card here; ONNX exports on the Hub) keeps the cache
    assert got["scored new card"]["pairs_from_cache"] == before["pairs"] > 0


def test_a_cache_keys_a_hub_model_by_the_files_it_loaded(monkeypatch, tmp_path):
    """Unpinned, pinned to a tag or to the commit itself: the same files share one cache key, a model card does not
    count and a weight does; without its snapshot a model loaded here keys by its commit, one not loaded by its
    spec; and a helper process is handed the commit, not the moving name."""
    snapshot = tmp_path / "snapshots" / MAIN
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"weights")
    (snapshot / "README.md").write_text("card")
    monkeypatch.setattr(models, "_hub_loaded", {"owner/x": models.HubLoad(MAIN, snapshot),
                                                "owner/x@v1": models.HubLoad(MAIN, snapshot),
                                                "owner/z": models.HubLoad(TAGGED, None)})
    first = models.cache_identity("owner/x")
    assert first["hub"] == "owner/x" and first == models.cache_identity("owner/x@v1")
    # what a full download adds beside a lazy one, or a later commit that changes no file loaded: the same key
    (snapshot / "README.md").write_text("a new card")
    (snapshot / "onnx").mkdir()
    (snapshot / "onnx" / "model.onnx").write_bytes(b"export")
    (snapshot / "pytorch_model.bin").write_bytes(b"the weights in the older format")
    assert models.cache_identity("owner/x") == first
    (snapshot / "model.safetensors").write_bytes(b"other weights")
    assert models.cache_identity("owner/x") != first
    assert models.cache_identity("owner/z") == {"hub": "owner/z", "commit": TAGGED}
    assert models.cache_identity(f"owner/y@{MAIN}") == {"hub": "owner/y", "commit": MAIN}  # it names its commit
    assert models.cache_identity("owner/y") == {"hub": "owner/y"}
    assert models.cache_identity("owner/y@v2") == {"hub": "owner/y", "revision": "v2"}
    assert models.loaded_spec("owner/x") == models.loaded_spec("owner/x@v1") == f"owner/x@{MAIN}"
    assert models.loaded_spec("owner/y") == "owner/y"
    (tmp_path / "config.json").write_text("{}")
    assert models.cache_identity(str(tmp_path)) == model_identity(str(tmp_path))


def test_a_snapshot_of_links_is_fingerprinted_without_reading_its_weights(monkeypatch, tmp_path):
    """huggingface_hub names each blob by its content hash: a multi-GB model keys its caches from the names."""
    from pipeline import artifacts

    repo = tmp_path / "models--owner--x"
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "config.json").write_text("{}")
    _as_hub_snapshot(model, repo, MAIN)

    def unread(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(artifacts, "content_digest", unread)
    linked = models.snapshot_fingerprint(repo / "snapshots" / MAIN)
    assert linked["files"] == 2
    (model / "model.safetensors").write_bytes(b"other weights")
    _as_hub_snapshot(model, repo, TAGGED)
    assert models.snapshot_fingerprint(repo / "snapshots" / TAGGED) != linked


def test_a_folder_takes_work_from_one_set_of_a_hub_models_files(monkeypatch, tmp_path):
    """The first load claims the folder; the same files (another shard, a resumed run) may add to it, other files
    may not; a local model is keyed by content already and claims nothing."""
    from pipeline.artifacts import HUB_WEIGHTS, claim_weights

    snapshots = {}
    for commit, weights in ((MAIN, b"w1"), (NEW_CARD, b"w1"), (TAGGED, b"w2")):
        snapshots[commit] = tmp_path / "snapshots" / commit
        snapshots[commit].mkdir(parents=True)
        (snapshots[commit] / "model.safetensors").write_bytes(weights)
        (snapshots[commit] / "README.md").write_text(commit)
    folder = tmp_path / "stage"
    folder.mkdir()

    def loaded(commit):
        monkeypatch.setattr(models, "_hub_loaded", {"owner/x": models.HubLoad(commit, snapshots[commit])})

    loaded(MAIN)
    claim_weights(folder, "owner/x")
    claim_weights(folder, "owner/x")
    assert json.loads((folder / HUB_WEIGHTS).read_text())["commit"] == MAIN
    loaded(NEW_CARD)
    claim_weights(folder, "owner/x")  # a new model card: the same weights
    (snapshots[MAIN] / "model.safetensors").write_bytes(b"w1, fetched another way")
    loaded(MAIN)
    claim_weights(folder, "owner/x")  # the claimed commit itself, whatever another host's cache holds of it
    loaded(TAGGED)
    with pytest.raises(StageError, match=f"loads commit {TAGGED}, whose files differ") as refused:
        claim_weights(folder, "owner/x")
    assert "PIPELINE_FORCE_ID" in str(refused.value) and f"owner/x@{MAIN}" in str(refused.value)
    (tmp_path / "local").mkdir()
    claim_weights(tmp_path / "local", str(snapshots[MAIN]))
    assert not (tmp_path / "local" / HUB_WEIGHTS).exists()
