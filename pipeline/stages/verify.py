"""`stage=verify`: re-check every artifact under artifacts_root against the checksums in its manifest."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline import validate
from pipeline.artifacts import MANIFEST, MARKER, StageError, verify_folder
from pipeline.stages.common import artifacts_root

log = logging.getLogger(__name__)


def identity(cfg: DictConfig) -> dict:
    return {"root": str(artifacts_root(cfg))}


def label(cfg: DictConfig) -> str:
    return "verify"


def stage_folders(root: Path, skip: tuple[Path, ...] = ()) -> list[Path]:
    """Every folder that is, or was meant to be, a stage result (<root>/<stage>/<label>-<key>); folders under
    ``skip`` (the cache root: its digest and pair-cache folders hold locks too) are none."""
    found = set()
    skip = tuple(Path(s).resolve() for s in skip)
    for marker in ("manifest.json", "_COMPLETE", ".lock"):
        for f in root.glob(f"*/*/{marker}"):
            if not any(f.parent.resolve().is_relative_to(s) for s in skip):
                found.add(f.parent)
    for f in root.glob("*/*/parts/*/" + MANIFEST):  # shard parts have their own manifests
        found.add(f.parent)
    return sorted(found)


@validate.checked
def run(cfg: DictConfig) -> Path:
    root = artifacts_root(cfg)
    if not root.is_dir():
        raise StageError(f"no artifacts under {root}")
    folders = stage_folders(root, skip=(Path(str(cfg.cache_root)).expanduser(),))
    if not folders:  # Hydra made <root>/logs before this ran: a mistyped root exists by now, holding no stage folder
        raise StageError(f"no artifacts under {root}: no stage folder (<stage>/<label>-<key>) there; is "
                         f"artifacts_root right?")
    complete = incomplete = damaged = 0
    problems: list[str] = []
    for folder in folders:
        if not (folder / MARKER).exists() and not (folder / MANIFEST).exists():
            incomplete += 1
            log.info("incomplete (no manifest, never read downstream): %s", folder)
            continue
        found = verify_folder(folder)
        problems += found
        damaged += bool(found)
        complete += not found
    print(f"verify: {len(folders)} artifact folders under {root}: {complete} intact, "
          f"{damaged} with problems, "
          f"{incomplete} incomplete")
    for p in problems:
        print("  " + p)
    if problems:
        raise StageError(f"{len(problems)} problems found in artifacts under {root}: rerun the stage of each folder "
                         f"named with force=true (python -m pipeline stage=<stage> force=true ...)")
    return root
