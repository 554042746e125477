"""`python -m pipeline stage=<stage> ...`: the one Hydra entry point; each stage is `pipeline.stages.<stage>.run`."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.config import CONF_DIR  # importing it registers the resolvers before Hydra composes
from pipeline.artifacts import StageError, remember_digests_in
from pipeline.readers import DataError

log = logging.getLogger("pipeline")

STAGES = ("all", "retrieve", "score", "mine", "train", "teacher", "evaluate", "score_run", "plan", "verify")
DISTRIBUTED_STAGES = ("train",)  # the stages that may run under torchrun (pipeline/distributed.py)


def run(cfg: DictConfig):
    if cfg.stage not in STAGES:
        raise StageError(f"unknown stage {cfg.stage!r}; choose one of: {', '.join(STAGES)}")
    from pipeline.distributed import world_size

    if world_size() > 1 and cfg.stage not in DISTRIBUTED_STAGES:
        # Every rank would open the same stage folder; only train knows how to share one among ranks.
        raise StageError(f"stage={cfg.stage} does not run under torchrun ({world_size()} processes): only stage=train "
                         f"does. Run it as `python -m pipeline stage={cfg.stage} ...` (retrieve and score split "
                         f"across GPUs with shard.count / shard.index, see docs/scale-out.md), then "
                         f"`torchrun ... -m pipeline stage=train ...`")
    apply_cpu_threads(cfg)
    # input files are keyed by content: each version of a file is read once per cache, not at every stage start
    remember_digests_in(Path(str(cfg.cache_root)).expanduser() / "digests")
    return importlib.import_module(f"pipeline.stages.{cfg.stage}").run(cfg)


def apply_cpu_threads(cfg: DictConfig) -> None:
    """torch's intra-op threads = cfg.cpu_threads when set. Tiny models gain nothing from a second thread, and
    OpenMP threads that spin while another process holds the core made a demo step 40x slower on a busy 2-core
    machine."""
    if cfg.get("cpu_threads"):
        import torch

        torch.set_num_threads(int(cfg.cpu_threads))


def main() -> None:
    """The command line: a mistyped setting is one line naming the nearest known one (exit 2, as every setting
    the user has to change) before Hydra composes, then the stage."""
    from pipeline import validate

    unknown = validate.unknown_keys(sys.argv[1:])
    if unknown:
        logging.basicConfig(format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        log.error("invalid settings (nothing was run): %s", "; ".join(unknown))
        sys.exit(2)
    _hydra_main()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from pipeline import validate

    try:
        added = validate.added_keys(list(HydraConfig.get().overrides.task), cfg)
        if added:
            raise validate.ConfigError("invalid settings (nothing was run): " + "; ".join(added))
        run(cfg)
    except (DataError, StageError) as exc:  # expected failures: one clear line, no traceback, non-zero exit
        log.error("%s", exc)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: what is committed stays; the same command resumes
        log.error("interrupted: nothing was marked complete that had not finished; run the same command again to "
                  "resume")
        sys.exit(130)
    except Exception as exc:
        denied = not_writable(exc)
        if denied is not None:
            # a read-only or foreign artifacts_root / cache_root, or an input file the job may not read: one line
            # naming the path, not a traceback (exit 2, like every setting the user has to change)
            try:
                ours = any(Path(str(denied.filename)).resolve().is_relative_to(Path(str(root)).expanduser().resolve())
                           for root in (cfg.artifacts_root, cfg.cache_root))
            except Exception:  # a root that cannot be resolved: name both fixes
                ours = True
            fix = ("Point artifacts_root (and cache_root, default <artifacts_root>/cache) at a folder this job may "
                   "write, or fix that path's permissions" if ours else "Fix that path's permissions")
            log.error("%s: %s; nothing was marked complete that had not finished. %s, and rerun", denied.strerror,
                      denied.filename, fix)
            sys.exit(2)
        if not disk_full(exc):
            raise
        # outside a stage's own writes (a library's save, Hydra's log): the same one line as inside
        log.error("no space left while writing (%s); nothing was marked complete that had not finished. Free space "
                  "(or point artifacts_root elsewhere) and rerun: the stage resumes", str(exc).splitlines()[0][:200])
        sys.exit(2)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (libraries such as safetensors wrap the OS error)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def not_writable(exc: BaseException) -> OSError | None:
    """The read-only file system or permission error (with the path it names) that ``exc`` is or was raised from."""
    import errno

    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES)
                 and e.filename), None)


_DISK_FULL = ("No space left on device", "File too large", "Disk quota exceeded", "FileTooLarge", "StorageFull")


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or one it was raised from) is a full disk, a quota or a file-size limit: libraries such as
    safetensors wrap the OS error in their own."""
    import errno

    return any((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG))
               or any(s in str(e) for s in _DISK_FULL) for e in _chain(exc))
