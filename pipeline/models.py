"""The one place models are loaded: hub ids, local folders, or `demo:<name>` (tiny models built offline).

Remote code is never trusted unless a config turns `trust_remote_code` on explicitly.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

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


#: a Hub repository id (owner/name; readers' hf: datasets too), one pinned to a branch, tag or commit
#: (owner/name@revision, pip's spelling of a pinned source), and a full commit id
HUB_ID = r"[\w.-]+/[\w.-]+"
_PINNED = re.compile(rf"({HUB_ID})@([\w./-]+)")
COMMIT = re.compile(r"[0-9a-f]{40}")

class HubLoad(NamedTuple):
    """What a Hub model loaded in this process came from: the commit (manifests record it) and the HF cache
    snapshot folder named by it (caches key by its files; None where the cache could not say)."""
    commit: str
    snapshot: Path | None


#: each Hub model loaded in this process, by its spec
_hub_loaded: dict[str, HubLoad] = {}


def split_revision(spec: Any) -> tuple[str, str | None]:
    """(model, revision) of ``owner/name@revision``; (spec, None) for anything else, a local folder whose name
    holds an ``@`` included."""
    spec = str(spec)
    m = _PINNED.fullmatch(spec)
    if m and not Path(spec).expanduser().exists():
        return m.group(1), m.group(2)
    return spec, None


def hub_id(spec: Any) -> str | None:
    """The Hub id ``spec`` names (owner/name, any ``@revision`` dropped; no such local folder), else None: what a
    model card's ``base_model`` may link to (a local path or a demo: model means nothing once the folder is shared)."""
    name = split_revision(spec)[0]
    if re.fullmatch(HUB_ID, name) and not Path(name).expanduser().exists():
        return name
    return None


def hub_commit(spec: Any) -> str | None:
    """The commit a Hub model loaded in this process came from (None: not a Hub model, or not loaded here)."""
    loaded = _hub_loaded.get(str(spec))
    return loaded.commit if loaded else None


def commit_note(spec: Any, recorded: str | None = None) -> str:
    """What a model card adds after a spec: ' at commit <sha>' for a Hub model loaded in this process (else the
    commit ``recorded`` by the stage that loaded it), '' when neither is known."""
    commit = hub_commit(spec) or recorded
    return f" at commit {commit}" if commit else ""


def loaded_spec(spec: Any) -> str:
    """``spec`` pinned to the commit this process loaded it at (``owner/name@<commit>``) when it is a Hub model
    loaded here; else ``spec``: what a helper process loads, so that it computes with the parent's weights even if
    the Hub's branch moved in between."""
    commit = hub_commit(spec)
    return f"{split_revision(spec)[0]}@{commit}" if commit else str(spec)


#: files of a Hub snapshot that no loader here reads: model cards, other frameworks' weights and exports (the Hub's
#: sentence-transformers repos gained onnx/ and openvino/ folders in later commits). A snapshot holds the files that
#: were downloaded, lazily or all at once, so these are left out of its fingerprint rather than required.
_NOT_LOADED = re.compile(r"(^|/)(onnx|openvino)/|\.(md|onnx|h5|msgpack|ot|xml|gitattributes)$")


def snapshot_fingerprint(snapshot: Path) -> dict[str, Any]:
    """Content identity of the files a model loads from a Hugging Face cache snapshot: each file's relative path
    and blob name (the blobs are named by their content hash, so nothing is read), or its sha256 where the cache
    holds copies rather than links. One weight format: beside model.safetensors, transformers never reads
    pytorch_model.bin (which older libraries downloaded)."""
    from pipeline.artifacts import content_digest

    files = {f.relative_to(snapshot).as_posix(): f for f in sorted(snapshot.rglob("*")) if f.is_file()}
    digest = hashlib.sha256()
    count = 0
    for rel, f in files.items():
        folder = rel.rpartition("/")[0] + "/" if "/" in rel else ""
        safetensors = {folder + "model.safetensors", folder + "model.safetensors.index.json"} & files.keys()
        if _NOT_LOADED.search(rel) or (rel.rpartition("/")[2].startswith("pytorch_model") and safetensors):
            continue
        target = Path(os.readlink(f)) if f.is_symlink() else None
        blob = target.name if target is not None and target.parent.name == "blobs" else content_digest(f)
        digest.update(f"{rel}\0{blob}\n".encode())
        count += 1
    return {"files": count, "sha256": digest.hexdigest()[:32]}


def cache_identity(spec: Any) -> dict[str, Any]:
    """What keys a cache that outlives one result (corpus embeddings linked between stages, the cross-encoder pair
    cache): :func:`model_identity`, except that a Hub model loaded in this process keys by the files it loads from
    its snapshot (:func:`snapshot_fingerprint`; else by its commit), whether unpinned or pinned to a branch, a tag
    or the commit. A result keyed by an unpinned name keeps its key when the Hub's main moves (its manifest records
    the commit); a cache must not, or a new result would mix the earlier weights' embeddings or logits with the new
    weights' own, while a commit that changes no file loaded (a model card, ONNX exports) keeps it. Call it after
    loading the model (before, a Hub model keys by its spec as in model_identity)."""
    identity = model_identity(str(spec))
    if "hub" not in identity:
        return identity
    loaded = _hub_loaded.get(str(spec))
    if loaded and loaded.snapshot is not None and loaded.snapshot.is_dir():
        return {"hub": identity["hub"], "files": snapshot_fingerprint(loaded.snapshot)}
    revision = identity.get("revision")
    commit = hub_commit(spec) or (revision if COMMIT.fullmatch(str(revision)) else None)
    return {"hub": identity["hub"], "commit": commit} if commit else identity


def hub_commits_in(identity: Any) -> dict[str, str]:
    """The commit of every Hub model in a stage's identity (the :func:`model_identity` entries in it) that this
    process loaded, by its spec: an unpinned id keys by name (whatever the Hub serves), so this is what says which
    weights made the result."""
    found: dict[str, str] = {}
    if isinstance(identity, dict):
        if isinstance(identity.get("hub"), str):
            spec = identity["hub"] + (f"@{identity['revision']}" if identity.get("revision") else "")
            commit = hub_commit(spec)
            if commit:
                found[spec] = commit
        for value in identity.values():
            found.update(hub_commits_in(value))
    elif isinstance(identity, list):
        for value in identity:
            found.update(hub_commits_in(value))
    return found


def _record_commit(spec: str, model: Any) -> None:
    """Remember the commit a Hub model was loaded from: the cache snapshot its files came from (the refs of a branch
    or tag resolve there, online or offline); sentence-transformers' own record, where that fails, only when it is
    a commit (for a pinned branch or tag it keeps the name as given)."""
    name = hub_id(spec)
    if not name:
        return
    revision = split_revision(spec)[1]
    _hub_loaded.pop(spec, None)  # what an earlier load of the spec found says nothing of this one
    snapshot = None
    with contextlib.suppress(Exception):  # a cache layout this cannot read: the manifest goes without it
        from huggingface_hub import try_to_load_from_cache

        for filename in ("modules.json", "config.json"):
            path = try_to_load_from_cache(name, filename, revision=revision)
            if isinstance(path, str) and "snapshots" in Path(path).parts:
                parts = Path(path).parts
                snapshot = Path(*parts[:parts.index("snapshots") + 2])  # snapshots/<commit>
                break
    if snapshot is not None:
        commit = snapshot.name
    else:
        commit = getattr(getattr(model, "model_card_data", None), "base_model_revision", None)
        commit = commit if COMMIT.fullmatch(str(commit)) else None
    if commit:
        _hub_loaded[spec] = HubLoad(str(commit), snapshot)


def load_bi_encoder(spec: str, *, device: str = "auto", artifacts_root: str | None = None,
                    max_seq_length: int | None = None, trust_remote_code: bool = False) -> Any:
    from sentence_transformers import SentenceTransformer

    name, revision = split_revision(spec)
    with _loading(spec, "bi-encoder"):
        model = SentenceTransformer(resolve_model_path(name, artifacts_root), device=resolve_device(device),
                                    trust_remote_code=trust_remote_code, revision=revision)
    _record_commit(spec, model)
    if max_seq_length:
        model.max_seq_length = int(max_seq_length)
    return model


def load_cross_encoder(spec: str, *, device: str = "auto", artifacts_root: str | None = None,
                       max_length: int | None = None, trust_remote_code: bool = False) -> Any:
    from sentence_transformers import CrossEncoder

    name, revision = split_revision(spec)
    kwargs: dict[str, Any] = {"device": resolve_device(device), "trust_remote_code": trust_remote_code,
                              "revision": revision}
    if max_length:
        kwargs["max_length"] = int(max_length)
    with _loading(spec, "cross-encoder"):
        model = CrossEncoder(resolve_model_path(name, artifacts_root), **kwargs)
    _record_commit(spec, model)
    return model


@contextlib.contextmanager
def _loading(spec: str, kind: str):
    """A model that cannot be loaded (a mistyped path, a hub id offline and not in the cache, a folder without a
    model) stops the stage with one line naming it, not a library traceback."""
    from pipeline.artifacts import StageError

    try:
        yield
    except (OSError, ValueError) as exc:
        if not isinstance(exc, OSError) and not Path(spec).expanduser().is_dir():
            raise  # a folder without a model (no config.json, or one without model_type) raises ValueError
        revision = split_revision(spec)[1]
        where = ("the folder holds no model" if Path(spec).expanduser().is_dir() else
                 f"not a local folder, and the Hub is unreachable, or the id or revision {revision!r} is wrong "
                 "(offline: the HF cache only)" if revision else "no such folder" if
                 spec.startswith((".", "/", "~")) or Path(spec).suffix else
                 "not a local folder, and the Hub is unreachable or the id is wrong (offline: the HF cache only)")
        raise StageError(f"cannot load the {kind} {spec!r}: {where} ({str(exc).splitlines()[0][:200]})") from exc


def model_identity(spec: str) -> dict[str, Any]:
    """What keys an artifact to a model: the hub id (with its revision when pinned), or a local folder's content
    fingerprint (so two different local models never share a cache, unlike util.mine_hard_negatives' cache_folder,
    and one model copied elsewhere keeps its cached embeddings)."""
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
    name, revision = split_revision(spec)
    # an unpinned id keys by its name alone (whatever the Hub serves; the manifest records the commit it was)
    return {"hub": name, "revision": revision} if revision else {"hub": spec}
