"""Fault injection: a real subprocess SIGKILLed inside retrieve, score, mine and train, then a rerun.

The default suite kills each stage at 2 commit points (PIPELINE_FAULT_KILL_AT: the n-th atomic write, just
before or just after its rename, i.e. with a half-written temporary file or a just-committed chunk); the
slow suite adds 10 random points per stage. After every kill: no completion marker, and the rerun's
artifacts equal an uninterrupted run's byte for byte (train: it finishes and its model loads).
Disk-full is simulated with a write hook: a clear error, nothing marked complete, and a later run succeeds.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.artifacts import MANIFEST, MARKER, StageError, is_complete
from pipeline.cli import run as run_stage
from pipeline.config import REPO_ROOT, compose
from pipeline.stages.common import stage_dir

CHAIN = ["retrieve", "score", "mine", "train"]
# Outputs that depend on wall-clock or on the process (timings, checkpoints' optimizer state) are not compared.
NOT_COMPARED = {MANIFEST, MARKER, ".lock"}


@pytest.fixture(scope="module")
def overrides(demo_stage_overrides):
    return [*demo_stage_overrides(max_queries=24, top_k=10), "retrieve.encode_block=600", "retrieve.query_block=8",
            "score.chunk_pairs=60",
            "mine.ce_score_margin=null", "train.epochs=1", "train.batch_size=8", "train.max_steps=3",
            "train.save_steps=1", "train.evaluate=false", "train.precision=fp32", "tracking=none"]


@pytest.fixture(scope="module")
def reference(overrides, tmp_path_factory):
    """The uninterrupted chain, stage by stage, in this process."""
    root = tmp_path_factory.mktemp("fault_reference")
    cfg = compose([*overrides, f"artifacts_root={root}"])
    return {stage: run_stage(compose([*overrides, f"artifacts_root={root}", f"stage={stage}"])) for stage in CHAIN} | {
        "root": root, "cfg": cfg}


def _fresh_root(reference, stage: str, tmp_path: Path) -> Path:
    """A new artifacts root holding copies of the stages before `stage` (keys do not depend on the root), and
    no pair cache, so the stage has all its work to do."""
    for upstream in CHAIN[: CHAIN.index(stage)]:
        src = Path(reference[upstream])
        shutil.copytree(src, tmp_path / upstream / src.name)
    return tmp_path


def _files(folder: Path, root: Path) -> dict[str, bytes]:
    """Files of a stage folder; the artifacts root is masked (reports name their input folders)."""
    mask = str(root.resolve()).encode()
    return {p.relative_to(folder).as_posix(): p.read_bytes().replace(mask, b"<root>") for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in NOT_COMPARED and not p.relative_to(folder).as_posix().startswith("checkpoints")}


def _kill_and_resume(overrides, reference, stage: str, root: Path, kill_at: str) -> None:
    env = {**os.environ, "PIPELINE_FAULT_KILL_AT": kill_at, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", f"stage={stage}", *overrides, f"artifacts_root={root}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    cfg = compose([*overrides, f"artifacts_root={root}", f"stage={stage}"])
    folder = stage_dir(cfg, stage)
    assert proc.returncode == -9, f"{stage} was not killed at commit {kill_at}:\n{proc.stderr[-2000:]}"
    assert not (folder / MARKER).exists(), "a completion marker exists for an interrupted stage"
    rerun = run_stage(cfg)
    assert Path(rerun) == folder and is_complete(folder)
    expected = Path(reference[stage])
    if stage == "train":  # SGD on another process is not bit-reproducible; it must finish and load
        from sentence_transformers import SentenceTransformer

        assert SentenceTransformer(str(folder / "model"), device="cpu").encode(["a query"]).shape[0] == 1
        # a log at every save (here every step): the history reaches each checkpoint, and train_loss is the mean
        # of all 3 steps, not only of those the rerun trained
        summary = json.loads((folder / "metrics.json").read_text())["train"]
        assert [point["step"] for point in summary["loss_curve"]] == [1, 2, 3]
        curve = [point["loss"] for point in summary["loss_curve"]]
        assert summary["train_loss"] == pytest.approx(sum(curve) / 3, abs=1e-4)
        # the rerun continued from the last checkpoint: it ran only the steps after it, not the run again
        done_before = int(summary["resumed_from"][len("checkpoint-"):]) if summary["resumed_from"] else 0
        assert summary["steps_this_run"] == 3 - done_before, summary
        return
    got, want = _files(folder, root), _files(expected, reference["root"])
    assert sorted(got) == sorted(want)
    differing = [name for name in want if got[name] != want[name]]
    assert not differing, f"{stage}: files differ from the uninterrupted run after kill at {kill_at}: {differing}"


# train's first commits come before its trainer runs; its third follows the last checkpoint, so the rerun resumes
@pytest.mark.parametrize("stage,kill_at", [(s, k) for s in CHAIN for k in ("1:before", "3" if s == "train" else "2")])
def test_sigkill_at_a_commit_then_rerun_equals_uninterrupted(overrides, reference, stage, kill_at, tmp_path):
    _kill_and_resume(overrides, reference, stage, _fresh_root(reference, stage, tmp_path), kill_at)


@pytest.mark.slow
@pytest.mark.parametrize("stage", CHAIN)
def test_sigkill_at_ten_random_points(overrides, reference, stage, tmp_path):
    rng = random.Random(f"faults-{stage}")
    for i in range(10):
        root = _fresh_root(reference, stage, tmp_path / f"try{i}")
        _kill_and_resume(overrides, reference, stage, root, f"{rng.randint(1, 4)}:{rng.choice(['before', 'after'])}")


def test_disk_full_gives_a_clear_error_and_no_marker(overrides, reference, tmp_path, monkeypatch):
    root = _fresh_root(reference, "mine", tmp_path)
    cfg = compose([*overrides, f"artifacts_root={root}", "stage=mine"])
    real_replace = os.replace
    calls = {"n": 0}

    def full_disk(src, dst):  # the third commit finds the disk full
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(StageError, match="no space left on device"):
        run_stage(cfg)
    folder = stage_dir(cfg, "mine")
    assert not (folder / MARKER).exists() and not list(folder.rglob(".tmp-*"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert Path(run_stage(cfg)) == folder and is_complete(folder)
    assert _files(folder, root) == _files(Path(reference["mine"]), reference["root"])


def test_a_full_disk_inside_a_library_is_one_line_too():
    # safetensors wraps the OS error in its own exception: the CLI still names the cause instead of a traceback
    import errno

    from pipeline.cli import disk_full

    class SafetensorError(Exception):
        pass

    assert disk_full(SafetensorError("Error while serializing: IoError(Os { code: 27, kind: FileTooLarge })"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert disk_full(outer)
    assert not disk_full(RuntimeError("shape mismatch")) and not disk_full(OSError(errno.ENOENT, "missing"))


def test_a_read_only_root_is_one_line_and_exit_2_from_the_cli(tmp_path, monkeypatch, capsys):
    # an archived root mounted read-only, or a cache_root owned by someone else: the write fails with EROFS/EACCES,
    # which the CLI reported as a traceback (exit 1) in which the cleanup's own EROFS hid the first error
    root = tmp_path / "archive"

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src))

    monkeypatch.setattr(os, "replace", read_only)
    said = _plan_from_the_cli(root, tmp_path / "logs", monkeypatch, capsys)
    assert re.search(rf"Read-only file system: {re.escape(str(root / 'plans'))}/\.tmp-\S+; .*Point artifacts_root",
                     said)


def _plan_from_the_cli(root, logs, monkeypatch, capsys) -> str:
    """`python -m pipeline experiment=demo stage=plan` in this process, which must stop with one line, exit 2: what
    it said."""
    from pipeline import cli

    monkeypatch.setattr(sys, "argv", ["pipeline", "experiment=demo", "stage=plan", f"artifacts_root={root}",
                                      f"hydra.run.dir={logs}"])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    out = capsys.readouterr()
    assert stopped.value.code == 2, out.err[-2000:]
    assert "Traceback" not in out.out + out.err
    return out.out + out.err


def test_an_input_the_job_may_not_read_is_one_line_without_blaming_the_roots(tmp_path, monkeypatch, capsys):
    # a corpus file of another group's: the fix is that file's permissions, not another artifacts_root
    from pipeline import cli

    def denied(cfg):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/other-group/collection.tsv")

    monkeypatch.setattr(cli, "run", denied)
    said = _plan_from_the_cli(tmp_path, tmp_path / "logs", monkeypatch, capsys)
    assert ("Permission denied: /data/other-group/collection.tsv; nothing was marked complete that had not "
            "finished. Fix that path's permissions, and rerun") in said


def test_a_cache_root_elsewhere_that_may_not_be_written_is_blamed_on_the_roots(tmp_path, monkeypatch, capsys):
    # a cache_root shared between projects, outside artifacts_root: the fix is a root setting, not file permissions
    from pipeline import cli

    cache = tmp_path / "shared-cache"

    def denied(cfg):
        raise PermissionError(errno.EACCES, "Permission denied", str(cache / "digests" / "x"))

    monkeypatch.setattr(cli, "run", denied)
    monkeypatch.setattr(sys, "argv", ["pipeline", "experiment=demo", "stage=plan", f"artifacts_root={tmp_path / 'art'}",
                                      f"cache_root={cache}", f"hydra.run.dir={tmp_path / 'logs'}"])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    said = capsys.readouterr()
    said = said.out + said.err
    assert stopped.value.code == 2
    assert f"Permission denied: {cache / 'digests' / 'x'}; " in said and "Point artifacts_root" in said


def test_a_full_disk_outside_a_stage_is_one_line_and_exit_2_from_the_cli(tmp_path, monkeypatch, capsys):
    # a library's save that fails while handling the OS error (not `raise ... from`) still names the full disk
    from pipeline import cli

    def full(cfg):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("save failed")

    monkeypatch.setattr(cli, "run", full)
    said = _plan_from_the_cli(tmp_path, tmp_path / "logs", monkeypatch, capsys)
    assert "no space left while writing (save failed); nothing was marked complete that had not finished" in said


def test_a_permission_error_without_a_path_is_not_blamed_on_one():
    from pipeline.cli import not_writable

    named = PermissionError(errno.EACCES, "Permission denied", "/data/x.tsv")
    assert not_writable(named) is named
    assert not_writable(PermissionError(errno.EACCES, "Permission denied")) is None
