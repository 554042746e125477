"""stage=all end to end on the demo corpus with the tiny test models: every stage runs once, a second run skips
every stage and says so, and a train run killed with SIGKILL after its first checkpoint resumes from it."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT, compose

STAGES = ("retrieve", "teacher", "score", "mine", "train", "evaluate v2", "evaluate v3", "evaluate BM25")


def _overrides(root: Path, bi_encoder: Path, cross_encoder: Path) -> list[str]:
    # the demo experiment, made smaller: 120 training queries, a short candidate list, two epochs, trained at a
    # length shorter than the bi-encoder's own 64
    return ["experiment=demo", f"artifacts_root={root}", f"model.bi_encoder={bi_encoder}",
            f"model.teacher_base={cross_encoder}", "data.train.max_queries=120", "retrieve.top_k=10",
            "teacher.epochs=1", "teacher.negatives_per_query=2", "teacher.neg_rank_max=10", "train.epochs=2",
            "train.lr=2e-3", "train.logging_steps=2", "train.max_seq_length=48"]


def _run_chain(cfg) -> str:
    """Run stage=all in-process and return what it printed and logged."""
    from pipeline.stages import all as chain

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("pipeline")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(buffer):
            chain.run(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def chain_run(tmp_path_factory, tiny_bi_encoder, tiny_cross_encoder):
    root = tmp_path_factory.mktemp("chain")
    overrides = _overrides(root, tiny_bi_encoder, tiny_cross_encoder)
    cfg = compose(overrides)
    return {"cfg": cfg, "root": root, "overrides": overrides, "first": _run_chain(cfg)}


def test_chain_runs_every_stage_and_prints_the_table(chain_run):
    out, cfg, root = chain_run["first"], chain_run["cfg"], chain_run["root"]
    lines = out.splitlines()
    for stage in STAGES:
        # train already measured v2 and v3, so those two evaluations are found complete
        status = "skipped (complete)" if stage in ("evaluate v2", "evaluate v3") else "ran in"
        assert any(line.strip().startswith(stage) and status in line for line in lines), (stage, out)
    assert "nothing to do" not in out
    assert "| v2 |" in out and "| v3 |" in out and "| BM25 |" in out
    written = Path(next(line.split(": ", 1)[1] for line in lines if line.startswith("results table: ")))
    # keyed by the rows' evaluation folders: two sweep jobs' tables never overwrite each other
    assert written.parent == root / "results" and re.fullmatch(rf"{cfg.data.name}-{cfg.model.name}-[0-9a-f]{{12}}\.md",
                                                                 written.name), written
    table = written.read_text()
    assert "| v3 |" in table
    plot = Path(next(line.split(": ", 1)[1] for line in lines if line.startswith("mining report plot: ")))
    assert plot.name == "report.png" and plot.is_file() and plot.parent.parent == root / "mine"


def test_train_artifact_has_model_card_metrics_and_no_checkpoints(chain_run):
    from sentence_transformers import SentenceTransformer

    from pipeline.stages import common

    folder = common.completed(chain_run["cfg"], "train")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["rotation"]["epochs"] == 2 and metrics["rotation"]["queries"] > 0
    assert metrics["train"]["loss_last"] < metrics["train"]["loss_first"]
    before, after = metrics["before"]["metrics"], metrics["after"]["metrics"]
    assert set(before) == set(after) == {"trec_dl", "dev"}
    assert after["dev"]["RR@10"] > before["dev"]["RR@10"]  # a random v2 is easy to beat; the demo report shows more
    card = (folder / "model" / "README.md").read_text()
    assert "## Hard-negative mining" in card and "ce_score_margin" in card and "## Evaluation" in card
    # the queries left out, in the mine report's words (they were mined; no negative survived the rules)
    report = json.loads((common.completed(chain_run["cfg"], "mine") / "report.json").read_text())
    dropped = {k: v for k, v in report["queries"]["dropped"].items() if v}
    assert dropped and metrics["rotation"]["skipped_no_pool"] == sum(dropped.values())
    assert all(f"{reason.replace('_', ' ')} {n}" in card for reason, n in dropped.items()), card
    assert "| max_seq_length | 48 in training; the saved model encodes at 64" in card
    assert "base_model:" not in card  # a demo: model has no hub id to link
    assert not (folder / "checkpoints").exists()
    model = SentenceTransformer(str(folder / "model"), device="cpu")
    assert model.encode(["a query"]).shape == (1, 64)
    assert model.max_seq_length == 64  # v2's own length, not the training's 48: v2 and v3 evaluate alike


def test_teacher_model_has_a_card_that_says_what_it_was_trained_on(chain_run):
    from pipeline.stages import common

    folder = common.completed(chain_run["cfg"], "teacher")
    counts = json.loads((folder / "manifest.json").read_text())["counts"]
    card = (folder / "model" / "README.md").read_text()
    assert "BinaryCrossEntropyLoss" in card and "from the bi-encoder's candidates ranked 1-10" in card
    assert f"pairs: {counts['pairs']} ({counts['positives']} positive, {counts['negatives']} negative)" in card


def test_second_run_skips_every_stage_and_says_so(chain_run):
    out = _run_chain(chain_run["cfg"])
    for stage in STAGES:
        assert any(line.strip().startswith(stage) and "skipped (complete)" in line for line in out.splitlines()), out
    assert "ran in" not in out
    assert "nothing to do: every stage was complete" in out


def test_a_tracked_chain_mirrors_every_stage_into_one_run(chain_run, fake_wandb):
    """tracking=wandb: the chain's one run gets each stage's manifest numbers under the stage's name (found complete
    or run: the chain mirrors them, most stages open no run of their own), the mining report and its plot, and the
    results table's metrics; it is finished when the chain ends."""
    from pipeline.artifacts import read_manifest
    from pipeline.stages import common

    cfg = compose([*chain_run["overrides"], "tracking=wandb"])
    _run_chain(cfg)
    assert len(fake_wandb.runs) == 1 and fake_wandb.runs[0].finished == 1
    run = fake_wandb.runs[0]
    assert run.kwargs["mode"] == "offline" and run.kwargs["job_type"] == "all"
    logged = {key: value for step in run.logged for key, value in step.items()}
    for stage in ("retrieve", "teacher", "score", "mine", "train"):
        counts = read_manifest(common.completed(cfg, stage))["counts"]
        assert counts and all(logged[f"{stage}/counts/{k}"] == v for k, v in counts.items()
                              if isinstance(v, int) and not isinstance(v, bool)), (stage, sorted(logged))
    report = json.loads((common.completed(cfg, "mine") / "report.json").read_text())
    assert logged["mine/report/queries/kept"] == report["queries"]["kept"] and logged["mine/report"][0] == "image"
    assert logged["results/v3/dev/RR@10"] > 0 and "results/BM25/trec_dl/nDCG@10" in logged


def test_a_chain_without_bm25_leaves_its_row_out(chain_run):
    # bookkeeping only: every stage is found complete, and the table has no BM25 row
    out = _run_chain(compose([*chain_run["overrides"], "evaluate.bm25=false"]))
    assert "nothing to do: every stage was complete" in out
    assert "| v2 |" in out and "| v3 |" in out and "BM25" not in out


def test_each_round_of_iterations_trains_from_the_last_under_its_own_name(tmp_path):
    from pipeline.stages import all as chain
    from pipeline.stages import common, train

    cfg = compose(["experiment=demo", f"artifacts_root={tmp_path}", "iterations=3"])
    round2 = chain.iteration_config(cfg, 2, "round1/model", "judge/model")
    round3 = chain.iteration_config(cfg, 3, "round2/model", "judge/model")
    assert [train.version_names(c) for c in (cfg, round2, round3)] == [("v2", "v3"), ("v3", "v4"), ("v4", "v5")]
    assert (round3.model.bi_encoder, round3.model.cross_encoder) == ("round2/model", "judge/model")
    assert len({common.stage_dir(c, "train") for c in (cfg, round2, round3)}) == 3


def test_a_complete_chain_on_a_read_only_root_prints_its_table(chain_run, monkeypatch):
    """An archived root mounted read-only: every stage is found complete without its lock, and the chain then
    failed with a traceback writing the very results table that was already there."""
    import errno

    from pipeline import artifacts
    from pipeline.stages import evaluate

    real_open = os.open

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[0]))

    def no_lock_files(path, flags, *args):  # as test_artifacts' read-only root: a lock file cannot be made
        if flags & os.O_CREAT:
            read_only(path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(artifacts.os, "open", no_lock_files)
    monkeypatch.setattr(evaluate, "atomic_write_text", read_only)
    out = _run_chain(chain_run["cfg"])
    assert "nothing to do: every stage was complete" in out and "| v3 |" in out
    table = Path(next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("results table: ")))
    assert table.is_file()  # the same table was there: nothing to write

    kept = table.read_bytes()
    table.unlink()  # a root archived without its table: the table is printed, and the line says it is not on disk
    try:
        out = _run_chain(chain_run["cfg"])
        assert "| v3 |" in out and f"results table: {table} (not written)" in out
    finally:
        table.write_bytes(kept)


def test_hydra_logs_leave_a_read_only_root(tmp_path, monkeypatch):
    """Hydra makes its log folder (<artifacts_root>/logs/...) before any stage runs: on a read-only root the CLI
    failed there with a traceback, before the stages that read a read-only root without their locks could start."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipeline import config
    from pipeline.config import CONF_DIR

    def run_dir(root: Path) -> Path:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=[f"artifacts_root={root}"], return_hydra_config=True)
        return Path(cfg.hydra.run.dir)

    writable, archive = tmp_path / "writable", tmp_path / "archive"
    archive.mkdir()
    assert run_dir(writable).parent.parent == writable / "logs"  # where the logs always were (made by Hydra)
    real_access = os.access
    monkeypatch.setattr(config.os, "access",
                        lambda p, mode: False if Path(p).is_relative_to(archive) else real_access(p, mode))
    logs = run_dir(archive)
    assert not logs.is_relative_to(archive) and logs.parent.parent.is_relative_to(tempfile.gettempdir())


@pytest.mark.slow  # the fast suite kills train at its commits (test_faults.py); this kills a real CLI run anywhere
def test_train_resumes_after_sigkill(chain_run):
    """A real `python -m pipeline stage=train` is killed (SIGKILL) once its first checkpoint is on disk; the rerun
    resumes from that checkpoint and finishes."""
    # another train config (more steps, frequent checkpoints), so the chain's complete train result is not reused
    args = [sys.executable, "-m", "pipeline", "stage=train", *chain_run["overrides"], "train.epochs=40",
            "train.max_steps=24", "train.save_steps=2", "train.logging_steps=1", "train.evaluate=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cfg = compose(args[4:])
    from pipeline.stages import common

    folder = common.stage_dir(cfg, "train")
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list(folder.glob("checkpoints/checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (folder / "_COMPLETE").exists()

    rerun = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-3000:]
    assert "train: resuming from checkpoint-" in log
    manifest = json.loads((folder / "manifest.json").read_text())
    resumed = manifest["extra"]["resumed_from"]
    assert resumed and int(resumed.split("-")[1]) >= 2
    assert manifest["counts"]["steps"] == 24
    # logged every step, the curve's mean is the mean loss of all 24 steps, not only of the resumed ones
    summary = json.loads((folder / "metrics.json").read_text())["train"]
    curve = [point["loss"] for point in summary["loss_curve"]]
    assert len(curve) == 24 and summary["train_loss"] == pytest.approx(sum(curve) / 24, abs=1e-4)
    assert (folder / "_COMPLETE").exists() and (folder / "model" / "model.safetensors").is_file()


def test_eval_teacher_reranks_v2_top_k_with_the_trained_teacher(chain_run, tmp_path, monkeypatch):
    """scripts/eval_teacher.py: v2's top-k cut keeps v2's own nDCG@10 (depth >= 10), and the teacher's rerank of the
    same candidates is measured on every eval set."""
    import importlib.util

    from pipeline.stages import common

    spec = importlib.util.spec_from_file_location("eval_teacher", REPO_ROOT / "scripts" / "eval_teacher.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "teacher.json"
    monkeypatch.setattr(sys, "argv", ["eval_teacher.py", *chain_run["overrides"], "--depth", "20", "--out", str(out)])
    assert script.main() == 0
    report = json.loads(out.read_text())
    before = json.loads((common.completed(chain_run["cfg"], "train") / "metrics.json").read_text())["before"]
    assert set(report["evals"]) == {"trec_dl", "dev"}
    for name, systems in report["evals"].items():
        v2, reranked = systems["v2 top-20"], systems["v2 top-20 reranked by the cross-encoder"]
        assert v2["nDCG@10"] == pytest.approx(before["metrics"][name]["nDCG@10"], abs=1e-9)
        assert 0.0 <= reranked["nDCG@10"] <= 1.0 and reranked != v2
    assert report["cross_encoder"].endswith("/model") and "teacher" in report["cross_encoder"]


def test_a_tracked_training_sends_its_curve_through_the_installed_wandb(chain_run, wandb_env, offline_wandb_log,
                                                                        tmp_path):
    """The trainers' own WandbCallback (transformers) with the installed wandb, not the stand-in: a train stage run
    with tracking=wandb logs its loss curve into the stage's offline run under <artifacts_root>/wandb, beside the
    stage's own v2/v3 evaluation, and leaves no run open."""
    import shutil

    import wandb

    from pipeline.stages import train

    root = tmp_path / "artifacts"
    shutil.copytree(chain_run["root"], root, ignore=shutil.ignore_patterns("wandb", "results"))
    overrides = [o for o in chain_run["overrides"] if not o.startswith("artifacts_root=")]
    train.run(compose([*overrides, f"artifacts_root={root}", "tracking=wandb", "force=true"]))
    assert wandb.run is None
    sent = offline_wandb_log(root / "wandb", b"train/loss", b"train/v3")
    assert b"train/loss" in sent and b"train/v3" in sent  # the trainer's curve; the stage's before/after evaluation
