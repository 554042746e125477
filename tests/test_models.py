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

from pipeline.config import REPO_ROOT
from pipeline.models import hub_id, model_identity, split_revision

MAIN, TAGGED = "a" * 40, "b" * 40


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
        shutil.copytree(root / "built" / commit, repo / "snapshots" / commit)
    return root


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
