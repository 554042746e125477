"""Experiment tracking. Off by default (`tracking=none`); `tracking=wandb` sends stage metrics, mining report
figures and training curves to Weights & Biases, offline unless the user asks for online (a config saying so, or a
WANDB_API_KEY in the environment with `mode: auto`).

Manifests stay the record of truth: tracking only mirrors them, so a run without wandb loses nothing. wandb is
imported only when it is switched on, and no key ever leaves the environment (configs are redacted first).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.artifacts import StageError, read_manifest, redact
from pipeline.config import plain

log = logging.getLogger(__name__)


def backend(cfg: DictConfig) -> str:
    return str(cfg.tracking.get("backend", "none") or "none")  # checked at the stage entry (pipeline/validate.py)


def enabled(cfg: DictConfig) -> bool:
    return backend(cfg) == "wandb" and wandb_mode(cfg) != "disabled"


def wandb_mode(cfg: DictConfig) -> str:
    """offline unless online is asked for: explicitly, or by `auto` with a WANDB_API_KEY present."""
    mode = str(cfg.tracking.get("mode", "auto") or "auto")
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def report_to(cfg: DictConfig) -> str:
    """The Hugging Face trainers' `report_to`: training curves go to wandb only when tracking is on."""
    return "wandb" if enabled(cfg) else "none"


class Tracker:
    """What a stage logs through; the no-op version is used when tracking is off."""

    def __init__(self, run: Any = None):
        self.run = run

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            flat = {k: v for k, v in _flatten(metrics).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if flat:
                self.run.log(flat, step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            for k, v in _flatten(values).items():
                self.run.summary[k] = v

    def image(self, name: str, path: str | os.PathLike) -> None:
        if self.run is not None and Path(path).is_file():
            import wandb

            self.run.log({name: wandb.Image(str(path))})


@contextlib.contextmanager
def track(cfg: DictConfig, stage: str, name: str | None = None) -> Iterator[Tracker]:
    """A tracking run around one stage (or the whole chain). Nested calls reuse the open run, so the chain
    logs into one wandb run and a trainer's WandbCallback joins it rather than starting its own."""
    if not enabled(cfg):
        yield Tracker()
        return
    try:
        import wandb
    except ModuleNotFoundError as exc:  # a dependency, but an environment built by hand may lack it: one line
        if exc.name != "wandb":
            raise  # installed, but one of its own imports fails: that traceback is what says why
        raise StageError("tracking=wandb needs the wandb package, which this environment lacks: pip install "
                         "'wandb>=0.17' (or the project again), or set tracking=none") from None

    if wandb.run is not None:
        yield Tracker(wandb.run)
        return
    _export_env(cfg)
    t = cfg.tracking
    tags = [str(x) for x in (t.get("tags") or [])] + [stage, str(cfg.data.name)]
    run = wandb.init(project=str(t.get("project") or "msmarco-v3"), entity=t.get("entity") or None,
                     mode=wandb_mode(cfg), dir=str(_wandb_dir(cfg)), job_type=stage, tags=tags,
                     name=name or f"{stage}-{cfg.data.name}-{cfg.model.name}",
                     config=redact(plain(cfg)))  # no `reinit`: an open run was joined above (< 0.19.9 refuses
    # reinit="finish_previous", passed here until a test ran the installed package at the floor)
    log.info("tracking: wandb run %s (%s) in %s", run.name, wandb_mode(cfg), _wandb_dir(cfg))
    try:
        yield Tracker(run)
    finally:
        run.finish()


def _wandb_dir(cfg: DictConfig) -> Path:
    folder = Path(str(cfg.tracking.get("dir") or Path(str(cfg.artifacts_root)) / "wandb")).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _export_env(cfg: DictConfig) -> None:
    """The transformers WandbCallback reads its settings from the environment, not from our config."""
    t = cfg.tracking
    os.environ["WANDB_MODE"] = wandb_mode(cfg)
    os.environ["WANDB_PROJECT"] = str(t.get("project") or "msmarco-v3")
    os.environ["WANDB_DIR"] = str(_wandb_dir(cfg))
    os.environ.setdefault("WANDB_LOG_MODEL", "false")  # model files stay in the artifacts folder
    if t.get("entity"):
        os.environ["WANDB_ENTITY"] = str(t.entity)


def log_stage(tracker: Tracker, stage: str, path: str | os.PathLike) -> None:
    """Mirror a finished stage: its counts and timings, and the mine stage's report figures and plot."""
    if not tracker.active:
        return
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError):
        return
    tracker.log({f"{stage}/counts": manifest.get("counts", {}), f"{stage}/timings_s": manifest.get("timings_s", {})})
    for name in ("report.json", "metrics.json"):
        if (path / name).is_file():
            with contextlib.suppress(ValueError, OSError):
                tracker.log({f"{stage}/{name[:-5]}": json.loads((path / name).read_text())})
    if (path / "report.png").is_file():
        tracker.image(f"{stage}/report", path / "report.png")


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out
