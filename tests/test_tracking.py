"""pipeline.tracking with a stand-in wandb (conftest's fake_wandb): what a tracked stage sends, where its run files
go, and that it stays offline unless asked. The switches themselves (off by default, offline without a key) are in
test_train.py."""

from __future__ import annotations

import json
import os
import sys

import pytest
from omegaconf import OmegaConf

from pipeline import tracking
from pipeline.config import compose


def test_a_tracked_stage_runs_offline_in_the_artifacts_root_and_tells_the_trainers_the_same(fake_wandb, tmp_path):
    """No key and mode auto: offline, its files under <artifacts_root>/wandb, and the same settings in the
    environment that transformers' WandbCallback reads (without them a trainer's callback started an online run of
    its own, or copied model files into wandb). The run is finished when the stage ends."""
    cfg = compose(["experiment=demo", f"artifacts_root={tmp_path}", "tracking=wandb", "tracking.tags=[sweep]"])
    with tracking.track(cfg, "train") as tracker:
        assert tracker.active and len(fake_wandb.runs) == 1
        run = fake_wandb.runs[0]
        args = run.kwargs
        assert (args["mode"], args["project"], args["job_type"]) == ("offline", "msmarco-v3", "train")
        assert args["dir"] == str(tmp_path / "wandb") and (tmp_path / "wandb").is_dir()
        assert args["tags"] == ["sweep", "train", str(cfg.data.name)]
        assert args["name"] == f"train-{cfg.data.name}-{cfg.model.name}"
        assert {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_LOG_MODEL")} == {
            "WANDB_MODE": "offline", "WANDB_PROJECT": "msmarco-v3", "WANDB_DIR": str(tmp_path / "wandb"),
            "WANDB_LOG_MODEL": "false"}
        tracker.summary({"train": {"steps": 3, "loss_last": 0.5}})
        assert run.summary == {"train/steps": 3, "train/loss_last": 0.5} and run.finished == 0
    assert run.finished == 1 and fake_wandb.run is None


def test_a_stage_inside_the_chain_logs_into_the_chain_run(fake_wandb, tmp_path):
    """stage=all opens one run and each stage's own track() joins it: a second init would have finished the chain's
    run (wandb's default outside notebooks) and split one job over several runs."""
    cfg = compose(["experiment=demo", f"artifacts_root={tmp_path}", "tracking=wandb"])
    with tracking.track(cfg, "all") as chain:
        with tracking.track(cfg, "train") as stage:
            assert stage.run is chain.run
        assert chain.run.finished == 0
    assert len(fake_wandb.runs) == 1 and chain.run.finished == 1


def test_secrets_in_the_config_are_not_sent_to_wandb(fake_wandb, tmp_path):
    """The run's config is the stage config, redacted as manifests are: a key or token given as a setting stays on
    the machine (an online run would publish it to everyone who can see the project)."""
    cfg = compose(["experiment=demo", f"artifacts_root={tmp_path}", "tracking=wandb", "+tracking.api_key=sk-secret-9",
                   "+hub_token=hf_secret_9"])
    with tracking.track(cfg, "train"):
        pass
    sent = json.dumps(fake_wandb.runs[0].kwargs["config"], default=str)
    assert "sk-secret-9" not in sent and "hf_secret_9" not in sent
    assert json.loads(sent)["tracking"]["api_key"] == json.loads(sent)["hub_token"] == "<redacted>"


def test_a_finished_stage_is_mirrored_from_its_manifest_and_reports(fake_wandb, tmp_path):
    """log_stage: the manifest's counts and timings and the report/metrics numbers under the stage's name (nested
    keys joined by /, text and flags left out: wandb charts numbers), the report plot as an image; a folder without
    a manifest, or tracking off, sends nothing and raises nothing (tracking never fails a stage)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({
        "counts": {"queries": 12, "pairs": {"kept": 30, "dropped": 2}, "note": "text", "resumed": False},
        "timings_s": {"total": 1.5}}))
    (folder / "report.json").write_text(json.dumps({"margin": {"mean": 0.25}, "queries": 11}))
    (folder / "metrics.json").write_text("{not json")  # a broken file is skipped, not fatal
    (folder / "report.png").write_bytes(b"\x89PNG")
    run = fake_wandb.init()
    tracking.log_stage(tracking.Tracker(run), "mine (round 2)", folder)
    assert run.logged == [
        {"mine (round 2)/counts/queries": 12, "mine (round 2)/counts/pairs/kept": 30,
         "mine (round 2)/counts/pairs/dropped": 2, "mine (round 2)/timings_s/total": 1.5},
        {"mine (round 2)/report/margin/mean": 0.25, "mine (round 2)/report/queries": 11},
        {"mine (round 2)/report": ("image", str(folder / "report.png"))}]

    run.logged.clear()
    (folder / "manifest.json").write_text(json.dumps({"counts": {"note": "text"}}))
    for name in ("report.json", "metrics.json", "report.png"):
        (folder / name).unlink()
    tracking.log_stage(tracking.Tracker(run), "mine", folder)  # no number: no empty step in the charts
    tracking.log_stage(tracking.Tracker(run), "mine", tmp_path / "no-manifest")
    tracking.log_stage(tracking.Tracker(), "mine", folder)
    assert run.logged == []


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_tracking_never_goes_online_unless_asked(fake_wandb, tmp_path, monkeypatch, mode):
    """A key in the environment is not a request when the config says offline; disabled starts no run at all."""
    monkeypatch.setenv("WANDB_API_KEY", "k")
    cfg = compose(["experiment=demo", f"artifacts_root={tmp_path}", "tracking=wandb", f"tracking.mode={mode}"])
    with tracking.track(cfg, "all") as tracker:
        pass
    assert [r.kwargs["mode"] for r in fake_wandb.runs] == ([] if mode == "disabled" else ["offline"])
    assert tracker.active == (mode != "disabled")


def test_settings_a_hand_written_tracking_config_leaves_out(fake_wandb, tmp_path):
    """A tracking config of the user's own (conf/tracking/<name>.yaml) without mode or dir: offline and under the
    artifacts root all the same; an entity given reaches both the run and the trainers' callback."""
    cfg = compose(["experiment=demo", f"artifacts_root={tmp_path}", "tracking=wandb", "tracking.entity=team"])
    OmegaConf.set_struct(cfg, False)
    del cfg.tracking["mode"]
    cfg.tracking.dir = None
    assert tracking.wandb_mode(cfg) == "offline"
    with tracking.track(cfg, "mine"):
        assert os.environ.get("WANDB_ENTITY") == "team"
    args = fake_wandb.runs[0].kwargs
    assert (args["mode"], args["dir"], args["entity"]) == ("offline", str(tmp_path / "wandb"), "team")
    cfg.tracking.dir = str(tmp_path / "runs")  # tracking.dir=...: run files kept apart from the artifacts
    with tracking.track(cfg, "mine"):
        pass
    assert fake_wandb.runs[1].kwargs["dir"] == os.environ["WANDB_DIR"] == str(tmp_path / "runs")
    del cfg.tracking["backend"]
    assert not tracking.enabled(cfg)  # no backend named: tracking is off


def test_tracking_asked_for_without_wandb_installed_is_one_line(tmp_path, monkeypatch):
    """An environment without wandb (built by hand; the project depends on it): tracking=wandb was a
    ModuleNotFoundError traceback (in the train stage after its data was built); now a StageError that says what
    to install, one line and exit 2 from the CLI like the other missing packages."""
    from pipeline.artifacts import StageError

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, installed or not
    cfg = compose(["experiment=demo", f"artifacts_root={tmp_path}", "tracking=wandb"])
    missing = r"tracking=wandb needs the wandb package, which this environment lacks: pip install 'wandb>=0\.17'"
    with pytest.raises(StageError, match=missing):
        with tracking.track(cfg, "all"):
            pass
    with tracking.track(compose(["experiment=demo", f"artifacts_root={tmp_path}"]), "all") as tracker:
        assert not tracker.active  # tracking off: wandb is never imported


def test_the_installed_wandb_runs_offline_under_the_artifacts_root(wandb_env, offline_wandb_log, tmp_path,
                                                                   monkeypatch):
    """The stand-in above checks what is sent; this, that the installed wandb takes it: an offline run in
    <artifacts_root>/wandb whose log holds the stage's metrics, nothing written to the working directory, and no
    run left open after the stage. The config's mode wins over a WANDB_MODE=disabled in the environment (CI's)."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    cfg = compose(["experiment=demo", f"artifacts_root={tmp_path / 'artifacts'}", "tracking=wandb"])
    with tracking.track(cfg, "evaluate") as tracker:
        assert tracker.active and wandb.run is not None and wandb.run.settings.mode == "offline"
        tracker.log({"rerank": {"ndcg_cut_10": 0.6902}})
    assert wandb.run is None
    assert b"rerank/ndcg_cut_10" in offline_wandb_log(tmp_path / "artifacts" / "wandb", b"rerank/ndcg_cut_10")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]
