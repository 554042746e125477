"""Nothing the pipeline loads can run code: no pickles, no remote code, safetensors only, no writes outside
the artifacts root, no secrets in manifests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.artifacts import StageError, open_stage, redact, stage_folder
from pipeline.config import PACKAGE_DIR, REPO_ROOT, compose

SOURCES = sorted(PACKAGE_DIR.rglob("*.py")) + sorted((REPO_ROOT / "scripts").glob("*.py"))

# Loading paths that can execute code from a file: pickle, torch.load without weights_only, numpy pickles.
UNSAFE = [
    (re.compile(r"\bimport pickle\b|\bfrom pickle\b|\bpickle\.loads?\("), "pickle"),
    (re.compile(r"\bimport (c|_)?pickle\b|\bimport dill\b|\bjoblib\.load\("), "pickle-like loader"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code=True hard-coded"),
    (re.compile(r"(?<![.\w])(eval|exec)\("), "eval/exec"),
]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_unsafe_loading_in_the_code(path):
    text = path.read_text()
    found = [f"{what}: line {text[:m.start()].count(chr(10)) + 1}" for pattern, what in UNSAFE
             for m in pattern.finditer(text)]
    assert not found, f"{path}: {found}"


def test_trust_remote_code_is_off_by_default():
    import inspect

    from pipeline import models

    for fn in (models.load_bi_encoder, models.load_cross_encoder):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    cfg = compose([])
    flat = json.dumps(__import__("omegaconf").OmegaConf.to_container(cfg, resolve=False))
    assert '"trust_remote_code": true' not in flat


def test_labels_cannot_escape_the_artifacts_root(tmp_path):
    for label in ("../../etc", "/abs/path", "..", "a/../../b", "x" * 500):
        folder = stage_folder(tmp_path, "retrieve", label, "abc123")
        assert tmp_path.resolve() in folder.parents
    with pytest.raises(StageError, match="outside the artifacts root"):
        stage_folder(tmp_path, "../escape", "label", "abc123")


def test_secrets_never_reach_the_manifest(tmp_path):
    config = {"tracking": {"api_key": "sk-secret-123", "project": "p"}, "hub_token": "hf_abc", "lr": 1e-5}
    with open_stage("toy", {"x": 1}, root=tmp_path, config=config) as st:
        (st.path / "out.txt").write_text("ok\n")
    manifest = (st.path / "manifest.json").read_text()
    assert "sk-secret-123" not in manifest and "hf_abc" not in manifest
    assert json.loads(manifest)["config"]["lr"] == 1e-5
    assert redact({"WANDB_API_KEY": "k", "nested": [{"password": "p"}]}) == {
        "WANDB_API_KEY": "<redacted>", "nested": [{"password": "<redacted>"}]}
    assert redact(["-m", "pipeline", "+hub_token=hf_x", "tracking.api_key=k", "lr=1"]) == [
        "-m", "pipeline", "+hub_token=<redacted>", "tracking.api_key=<redacted>", "lr=1"]


def test_settings_named_after_tokens_are_not_taken_for_secrets():
    # batch_tokens or token_cache change what a stage computes: a manifest that hid them could not be compared
    settings = {"batch_tokens": 65536, "token_cache": "auto", "corpus_tokenizers": 16, "tokenise_passages": 1,
                "passages_tokenised": 9, "max_tokens": 3}
    assert redact({"retrieve": settings}) == {"retrieve": settings}
    assert redact({"HF_TOKEN": "x", "access_token": "y", "token": "z"}) == {
        "HF_TOKEN": "<redacted>", "access_token": "<redacted>", "token": "<redacted>"}


def test_saved_models_are_safetensors(tiny_bi_encoder, tiny_cross_encoder):
    for folder in (Path(tiny_bi_encoder), Path(tiny_cross_encoder)):
        weights = [p.name for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".safetensors"}]
        assert weights and all(name.endswith(".safetensors") for name in weights), weights
