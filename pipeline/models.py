"""The one place models are loaded: hub ids, local folders, or `demo:<name>` (tiny models built offline).

Remote code is never trusted unless a config turns `trust_remote_code` on explicitly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


#: every spelling of a precision setting the stages accept, by its canonical name
_PRECISIONS = {"auto": ("auto",), "fp32": ("fp32", "float32", "32", "full", "none"), "bf16": ("bf16", "bfloat16"),
               "fp16": ("fp16", "float16", "half", "16")}


def precision_name(precision: Any) -> str:
    """The canonical name (auto, fp32, bf16 or fp16) of a precision setting; None means auto. Torch-free, so the
    plan reads settings the way the engine does without loading torch."""
    spelled = str(precision or "auto").lower().strip().replace("torch.", "")
    for name, spellings in _PRECISIONS.items():
        if spelled in spellings:
            return name
    raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")


def resolve_model_path(spec: str, artifacts_root: str | os.PathLike | None = None) -> str:
    """`demo:<name>` builds (once) the project's tiny models under <artifacts_root>/demo_models."""
    spec = str(spec)
    if spec.startswith("demo:"):
        from pipeline import demo
        from pipeline.config import resource_dir

        root = Path(artifacts_root or "data/artifacts") / "demo_models"
        built = demo.build_demo_models(root, resource_dir("demo"))
        name = spec[5:]
        if name not in built:
            from pipeline.artifacts import StageError

            raise StageError(f"unknown demo model {spec!r}; available: {', '.join('demo:' + k for k in built)}")
        return str(built[name])
    return spec


def hub_id(spec: Any) -> str | None:
    """``spec`` when it names a model on the Hub (owner/name, no such local folder), else None: what a model card's
    ``base_model`` may link to (a local path or a demo: model means nothing once the folder is shared)."""
    spec = str(spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not Path(spec).expanduser().exists():
        return spec
    return None


def load_bi_encoder(spec: str, *, device: str = "auto", artifacts_root: str | None = None,
                    max_seq_length: int | None = None, trust_remote_code: bool = False) -> Any:
    from sentence_transformers import SentenceTransformer

    with _loading(spec, "bi-encoder"):
        model = SentenceTransformer(resolve_model_path(spec, artifacts_root), device=resolve_device(device),
                                    trust_remote_code=trust_remote_code)
    if max_seq_length:
        model.max_seq_length = int(max_seq_length)
    return model


def load_cross_encoder(spec: str, *, device: str = "auto", artifacts_root: str | None = None,
                       max_length: int | None = None, trust_remote_code: bool = False) -> Any:
    from sentence_transformers import CrossEncoder

    kwargs: dict[str, Any] = {"device": resolve_device(device), "trust_remote_code": trust_remote_code}
    if max_length:
        kwargs["max_length"] = int(max_length)
    with _loading(spec, "cross-encoder"):
        return CrossEncoder(resolve_model_path(spec, artifacts_root), **kwargs)


@contextlib.contextmanager
def _loading(spec: str, kind: str):
    """A model that cannot be loaded (a mistyped path, a hub id offline and not in the cache, a folder without a
    model) stops the stage with one line naming it, not a library traceback."""
    from pipeline.artifacts import StageError

    try:
        yield
    except OSError as exc:
        where = ("the folder holds no model" if Path(spec).expanduser().is_dir() else "no such folder" if
                 spec.startswith((".", "/", "~")) or Path(spec).suffix else
                 "not a local folder, and the Hub is unreachable or the id is wrong (offline: the HF cache only)")
        raise StageError(f"cannot load the {kind} {spec!r}: {where} ({str(exc).splitlines()[0][:200]})") from exc


def model_identity(spec: str) -> dict[str, Any]:
    """What keys an artifact to a model: the hub id, or a local folder's content fingerprint (so two different
    local models never share a cache, unlike util.mine_hard_negatives' cache_folder, and one model copied
    elsewhere keeps its cached embeddings)."""
    from pipeline.artifacts import file_fingerprint

    spec = str(spec)
    if spec.startswith("demo:"):
        from pipeline.demo import DEMO_MODEL_SETTINGS

        # The settings decide what gets built: changing them rebuilds the model, so they must change every key
        # that depends on it (else old embeddings of the previous build would be reused).
        return {"demo": spec, "settings": DEMO_MODEL_SETTINGS}
    if Path(spec).exists():
        # a folder's model card (README.md) is left out: the train stage writes the measured figures into it after
        # evaluating the model, and it changes nothing the model computes
        return {"local": file_fingerprint(spec, exclude=("README.md",))}
    return {"hub": spec}
