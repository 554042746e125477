"""The stage contract: every stage writes into a folder keyed by a hash of what determines its output.

    <root>/<stage>/<label>-<key12>/
        manifest.json   resolved config, inputs, versions, git revision, counts, timings, file checksums
        _COMPLETE       written last (after manifest.json); a folder without it is never read downstream
        .lock           flock held by the working process; the kernel drops it when the process dies

Folders are keyed by content, never by timestamp, so asking for the same work twice finds the first result.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MARKER = "_COMPLETE"
LOCK = ".lock"
FORCED = ".forced"  # the forced run (forced_run_id) that last cleared the folder
HUB_WEIGHTS = ".hub-weights.json"  # the files of the Hub model the folder's work is computed with (claim_weights)
_BOOKKEEPING = {MANIFEST, MARKER, LOCK, FORCED, HUB_WEIGHTS}
# "token" as a name's last word only (hub_token, HF_TOKEN, access_token): batch_tokens, token_cache or
# corpus_tokenizers are settings that change results, and a manifest that hid them could not be compared
_SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|(^|[_-])token$)", re.IGNORECASE)
_SAFE_LABEL = re.compile(r"[^A-Za-z0-9._-]+")
_OPEN_RUNS: list = []  # the StageRuns this process is inside, innermost last: what they read is recorded


class StageError(RuntimeError):
    """A stage cannot run or cannot finish; the message says why and what to do."""


class StageLocked(StageError):
    """Another live process works on the same stage folder."""


# --------------------------------------------------------------------------- hashing


def canonical_json(obj: Any) -> str:
    """Stable text for hashing: sorted keys, no whitespace, non-JSON values stringified."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def config_key(identity: Any, length: int = 12) -> str:
    return hashlib.sha256(canonical_json(identity).encode("utf-8")).hexdigest()[:length]


def file_fingerprint(path: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Content identity of an input file (its name, size and sha256) or folder (the relative path, size and sha256
    of every file in it, hidden files and the relative paths in ``exclude`` left out). Where the input lies and
    when it was last touched are not part of it: a corpus copied to node-local scratch, moved, or downloaded
    again keys the same artifacts. The name stays in it because the readers parse by it (.gz, .jsonl). Each file
    is read once per version (see :func:`content_digest`)."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        return {"missing": str(p)}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                       and f.relative_to(p).as_posix() not in exclude)
        digest = hashlib.sha256()
        total = 0
        for f in files:
            size = f.stat().st_size
            total += size
            digest.update(f"{f.relative_to(p).as_posix()}\0{size}\0{content_digest(f)}\n".encode())
        return {"files": len(files), "bytes": total, "sha256": digest.hexdigest()[:32]}
    return {"name": p.name, "bytes": p.stat().st_size, "sha256": content_digest(p)[:32]}


_DIGESTS: dict[tuple, str] = {}  # this process's digests, by file version
_digest_dir: Path | None = None  # where digests are kept between processes (remember_digests_in)


def remember_digests_in(folder: str | os.PathLike | None) -> None:
    """Keep file digests in ``folder`` (the CLI passes ``<cache_root>/digests``), so that each version of a
    3 GB corpus is read once, not at every stage start of every shard; None: within this process only."""
    global _digest_dir
    _digest_dir = Path(folder).expanduser().resolve() if folder else None


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered by file version (path, device, inode, size, mtime): a file changed
    in place gets a new mtime and is read again (as make and git assume; a writer that restores the mtime of a
    same-size file is not noticed)."""
    p = Path(path).resolve()
    st = p.stat()
    version = (str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if version in _DIGESTS:
        return _DIGESTS[version]
    if _digest_dir is None:
        digest = sha256_file(p)
    else:
        record = _digest_dir / f"{config_key(list(version), 32)}.json"
        digest = _kept_digest(record, version)
        if digest is None:
            try:  # the tasks of an array job start together: one reads the file, the others wait for its record
                with folder_lock(_digest_dir, wait_s=3600):
                    digest = _kept_digest(record, version) or _keep_digest(record, version, sha256_file(p))
            except OSError:  # a read-only cache: read the file here, every time
                digest = sha256_file(p)
    _DIGESTS[version] = digest
    return digest


def _kept_digest(record: Path, version: tuple) -> str | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        kept = json.loads(record.read_text())
        if kept["version"] == list(version) and re.fullmatch(r"[0-9a-f]{64}", kept["sha256"]):
            return kept["sha256"]
    return None  # none yet, or damaged: read the file again


def _keep_digest(record: Path, version: tuple, digest: str) -> str:
    # a plain rename, not a counted commit (the kill tests count those), and no fsync: a lost record costs a re-read
    tmp = record.parent / f".tmp-{record.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        tmp.write_text(json.dumps({"version": list(version), "sha256": digest}))
        os.replace(tmp, record)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return digest


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def redact(obj: Any) -> Any:
    """Drop secrets before anything reaches a manifest or a log."""
    if isinstance(obj, Mapping):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str) and "=" in obj:  # a command-line override (argv): +hub_token=... or tracking.api_key=...
        key, _, value = obj.partition("=")
        if value and _SECRET_KEY.search(key.lstrip("+~").rsplit(".", 1)[-1]):
            return f"{key}=<redacted>"
    return obj


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed onto `target` (file or directory).

    The rename is atomic on POSIX, so a reader sees either the old file, the new one, or none, never half.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        yield tmp
        _fault_point("before")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        _fault_point("after")
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            # OSError, not only a missing file: on a read-only mount unlinking the temporary that could not be made
            # fails with EROFS too, and that second error replaced the one that says what went wrong
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


_commits = 0


def _fault_point(when: str) -> None:
    """Fault injection for the kill tests: PIPELINE_FAULT_KILL_AT=<n>[:before] SIGKILLs this process at the
    n-th atomic commit of the run, just before or just after its rename. Unset (always, outside tests): no-op."""
    spec = os.environ.get("PIPELINE_FAULT_KILL_AT")
    if not spec:
        return
    global _commits
    n, _, moment = spec.partition(":")
    if when == (moment or "after"):
        _commits += 1
        if _commits == int(n):
            os.kill(os.getpid(), 9)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str, ensure_ascii=False) + "\n")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- provenance


def package_versions() -> dict[str, str]:
    from importlib import metadata

    names = ["torch", "transformers", "sentence-transformers", "datasets", "faiss-cpu", "ir-measures",
             "bm25s", "hydra-core", "pyarrow", "numpy", "msmarco-v3-pipeline"]
    out = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# --------------------------------------------------------------------------- locks


_NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


@contextlib.contextmanager
def folder_lock(folder: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Exclusive flock on <folder>/.lock. A lock file left by a killed process holds no flock, so it is
    recognised as stale and taken over; a live holder makes us wait up to `wait_s`, then refuse."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = Path(path).read_text(errors="replace").strip() or "unknown process"
                    raise StageLocked(
                        f"{folder} is being written by another live process ({holder}); "
                        f"wait for it to finish or stop it (lock file {path})") from None
                time.sleep(0.5)
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    raise
                # without locks two jobs could write one folder at once: refuse rather than go on unguarded
                raise StageError(
                    f"{folder}: this file system does not support file locks ({exc.strerror}), which the stages "
                    f"need to keep two jobs out of one folder. Put artifacts_root and cache_root on a file system "
                    f"that supports flock (Lustre mounted with -o flock, NFS with its lock service, or node-local "
                    f"scratch)") from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            log.warning("taking over a stale lock in %s (left by %s, no longer running)", folder, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the flock


# --------------------------------------------------------------------------- stage folders


def stage_folder(root: str | os.PathLike, stage: str, label: str, key: str) -> Path:
    """The folder of one stage result; labels are sanitised so no config value can leave the root."""
    root = Path(root).expanduser().resolve()
    safe = _SAFE_LABEL.sub("_", str(label)).strip("._") or stage
    folder = (root / stage / f"{safe[:60]}-{key}").resolve()
    if root not in folder.parents:
        raise StageError(f"refusing to write outside the artifacts root {root}: {folder}")
    return folder


def is_complete(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / MARKER).is_file() and (folder / MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(folder) / MANIFEST).read_text())


def require_complete(folder: str | os.PathLike, what: str) -> Path:
    """``folder``, a complete result that a stage is about to read: refused when a look at its files shows damage
    (a full check reads every byte: stage=verify), and recorded in the reading stage's manifest, so that its result
    counts as stale once ``folder`` is recomputed (:func:`stale_inputs`)."""
    folder = Path(folder)
    if not is_complete(folder):
        raise StageError(f"{what} at {folder} is missing or incomplete (no {MARKER}); run that stage first")
    problem = quick_check(folder)
    if problem:
        raise StageError(f"{what} at {folder} is damaged: {problem}. Rerun the stage that wrote it with force=true "
                         f"(`stage=verify` checks every artifact)")
    if _OPEN_RUNS:
        reader = _OPEN_RUNS[-1]
        reader.upstream[_relative_to_root(folder, reader.path)] = marker_digest(folder)
    return folder


def marker_digest(folder: Path) -> str:
    """The sha256 of a complete folder's manifest, as its marker holds it: changes whenever the folder is
    recomputed (timings and finish time are in the manifest)."""
    return (Path(folder) / MARKER).read_text().strip()


def quick_check(folder: Path) -> str | None:
    """What is wrong with a complete folder that its manifest and file sizes show, or None. Cheap (no file is
    read but the manifest): run before every read of an upstream result."""
    try:
        if marker_digest(folder) != sha256_file(folder / MANIFEST):
            return f"{MANIFEST} was changed after completion"
        files = dict(json.loads((folder / MANIFEST).read_text()).get("files") or {})
    except (OSError, ValueError, AttributeError):
        return f"its {MANIFEST} cannot be read"
    for name, meta in files.items():
        try:
            size = (folder / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != meta.get("bytes"):
            return f"{name} holds {size} bytes where its manifest records {meta.get('bytes')}"
    return None


def _relative_to_root(folder: Path, reader: Path) -> str:
    """An input folder as the reader records it: relative to the artifacts root both live under (so a copied
    root keeps its records), absolute otherwise (score.candidates from elsewhere)."""
    root = reader.parent.parent.resolve()
    folder = Path(folder).resolve()
    return folder.relative_to(root).as_posix() if folder.is_relative_to(root) else str(folder)


def _recorded_inputs(folder: Path) -> dict[Path, str]:
    """The input folders a complete ``folder`` recorded reading (:func:`require_complete`), with their markers then;
    none when its manifest cannot be read."""
    try:
        recorded = dict(read_manifest(folder).get("upstream") or {})
    except (OSError, ValueError, AttributeError):
        return {}
    root = Path(folder).resolve().parent.parent
    return {Path(name) if Path(name).is_absolute() else root / name: digest for name, digest in recorded.items()}


def unusable_inputs(folder: Path) -> list[tuple[Path, str]]:
    """The recorded inputs of a complete ``folder`` that could not be read again now (missing, unfinished or
    damaged), each with what is wrong: recomputing ``folder`` under the same key would need them."""
    problems = []
    for upstream in _recorded_inputs(folder):
        problem = f"no {MARKER}" if not is_complete(upstream) else quick_check(upstream)
        if problem:
            problems.append((upstream, problem))
    return problems


def stale_inputs(folder: Path) -> list[str]:
    """The recorded inputs of a complete ``folder`` that were recomputed since it read them (their marker
    differs). An input deleted, moved or being recomputed right now is not taken for a change."""
    stale = []
    for upstream, digest in _recorded_inputs(folder).items():
        try:
            if is_complete(upstream) and marker_digest(upstream) != digest:
                stale.append(str(upstream))
        except OSError:
            continue
    return stale


@dataclass
class StageRun:
    """One stage's work on its folder. Created by `open_stage`; the stage fills `counts` and `extra`."""

    stage: str
    path: Path
    key: str
    identity: dict[str, Any]
    config: dict[str, Any]
    done: bool = False  # True when a complete result was found and the stage should return at once
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    upstream: dict[str, str] = field(default_factory=dict)  # input folders read (require_complete): their markers

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 3)

    def file(self, name: str) -> Path:
        return self.path / name


def forced_run_id() -> str | None:
    """The forced run this process belongs to: ``force=true`` clears a folder once per id, so that a requeued job
    and the other tasks of its array resume what it started instead of clearing it again (a forced job longer than
    one time limit never finished). PIPELINE_FORCE_ID where set; else, for a job that submitit launched, the Slurm
    (array) job id (requeues keep it, an array's tasks share it) or, under its local executor, the sweep's
    submission folder (the same for every job of a sweep and its requeues); else None: every forced invocation
    clears, as an interactive shell (even inside one allocation) expects."""
    if os.environ.get("PIPELINE_FORCE_ID"):
        return os.environ["PIPELINE_FORCE_ID"]
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    if executor == "slurm":
        job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        return f"slurm-{job}" if job else None
    if executor and os.environ.get("SUBMITIT_FOLDER"):
        return f"submitit-{hashlib.sha256(os.environ['SUBMITIT_FOLDER'].encode()).hexdigest()[:16]}"
    return None


_THIS_PROCESS = f"process-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"


def stage_force_id() -> str:
    """The id a forced stage folder is cleared under (:func:`open_stage`): the forced run's, else this process's,
    so one invocation clears a folder once however often it reaches it (the chain evaluates v2 and v3 inside
    train and again for its table: two full-corpus encodes each when every call cleared)."""
    return forced_run_id() or _THIS_PROCESS


def forced_already(path: Path, force_id: str | None) -> bool:
    """Whether the forced run ``force_id`` cleared ``path`` before (a requeue of it, another task of its array):
    its work there is kept. Never without an id."""
    if force_id is None:
        return False
    try:
        return (Path(path) / FORCED).read_text().strip() == force_id
    except OSError:
        return False


def clear_for_force(path: Path, force_id: str | None) -> bool:
    """Clear ``path`` (its lock file kept) for a forced run, once per ``force_id`` (recorded in the folder); every
    time without one. Whether it cleared. The caller holds the folder's lock."""
    if forced_already(path, force_id):
        return False
    _clear_folder(path)
    if force_id is not None:
        atomic_write_text(path / FORCED, force_id + "\n")
    return True


@contextlib.contextmanager
def open_stage(stage: str, identity: Mapping[str, Any], *, root: str | os.PathLike, label: str | None = None,
               config: Mapping[str, Any] | None = None, force: bool = False, resumable: bool = False,
               lock_wait_s: float = 0.0) -> Iterator[StageRun]:
    """Run a stage's body inside its keyed folder.

    - complete and not forced: yields a run with `done=True`; the body must return at once.
    - forced: cleared and recomputed, once per :func:`stage_force_id` (a requeued forced job finds what it did,
      and one invocation reaching the folder twice clears it once).
    - incomplete leftovers: kept when `resumable` (committed chunks are reused), otherwise cleared.
    - on success: checksums every file, writes manifest.json, then the _COMPLETE marker (last).
    - on any error: nothing is marked complete; a full disk gets a message that says so.
    """
    identity = dict(identity)
    key = config_key(identity)
    path = stage_folder(root, stage, label or stage, key)
    run = StageRun(stage=stage, path=path, key=key, identity=identity, config=redact(dict(config or identity)))
    force_id = stage_force_id() if force else None
    if not force and is_complete(path) and not _writable(path) and not stale_inputs(path):
        # an archived or shared read-only root: nothing will be written, so no lock is needed to read it
        log.info("%s: complete result found at %s (key %s, read-only), skipping", stage, path, key)
        run.done = True
        yield run
        return
    with folder_lock(path, wait_s=lock_wait_s):
        # this forced run cleared the folder before (a requeue, an array's other task): its work is kept
        again = forced_already(path, force_id)
        reusable = is_complete(path) and (not force or again)
        stale = stale_inputs(path) if reusable else []
        if reusable and not stale:
            log.info("%s: complete result found at %s (key %s), skipping; force=true recomputes", stage, path, key)
            run.done = True
            yield run
            return
        if (is_complete(path) and not reusable) or stale:
            # discarding a result whose inputs are gone would leave neither the result nor a way to rebuild it
            gone = unusable_inputs(path)
            if gone:
                # a damaged input still marked complete is skipped by a plain rerun of its stage: it needs force
                writers = sorted({f"stage={folder.parent.name}" + (" force=true" if is_complete(folder) else "")
                                  for folder, _ in gone})
                raise StageError(f"{stage}: not discarding the complete result at {path}: the "
                                 f"input{'s' if len(gone) > 1 else ''} it was built from cannot be read "
                                 f"({'; '.join(f'{folder}: {why}' for folder, why in gone)}). Rebuild "
                                 f"{'them' if len(gone) > 1 else 'it'} first ({', '.join(writers)}), then rerun.")
        if stale:  # same settings, but an input it read was recomputed since (force=true): built from old data
            log.warning("%s: the complete result at %s was built from %s before %s recomputed; recomputing", stage,
                        path, ", ".join(stale), "it was" if len(stale) == 1 else "they were")
            _clear_folder(path)
        if is_complete(path):
            log.warning("%s: force=true, discarding the complete result at %s and recomputing", stage, path)
        (path / MARKER).unlink(missing_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)
        if force and not again:
            clear_for_force(path, force_id)
        elif not resumable:  # nothing of an unfinished run is reused, a requeued forced one's included
            _clear_folder(path)
            if again:
                atomic_write_text(path / FORCED, force_id + "\n")
        else:
            for leftover in path.rglob(".tmp-*"):  # half-written files of a killed run; never committed
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        start = time.perf_counter()
        _OPEN_RUNS.append(run)
        try:
            yield run
            run.timings["total"] = round(time.perf_counter() - start, 3)
            _finish(run)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StageError(f"{stage}: no space left on device while writing {path} ({exc.strerror}); nothing "
                                 f"was marked complete. Free space (or point artifacts_root elsewhere) and rerun: "
                                 f"the stage resumes.") from exc
            raise
        finally:
            _OPEN_RUNS.remove(run)
    log.info("%s: done in %.1fs -> %s", stage, run.timings.get("total", 0.0), path)


def first_record(path: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON record at ``path``, which is ``record`` unless another process wrote one first: created once and
    atomically (a link that fails if another process linked first), so every process of a folder, shards on other
    hosts included, compares itself with the same first one."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: shards on two hosts of one array can share a pid (a container per task),
        # and the second to write a pid-named file replaced the first's, which then linked (and unlinked) it
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{os.urandom(6).hex()}")
        atomic_write_text(tmp, json.dumps(dict(record)) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return json.loads(path.read_text())


def claim_weights(folder: Path, spec: str) -> None:
    """Refuse to add work to ``folder`` computed with other files of a Hub model than its work so far: an unpinned
    id (or a branch) keys a result by name, so a run resumed or a shard started after the Hub's main moved would
    put two models' outputs into one result. The first process to load the model there records what it loaded
    (models.cache_identity); the others compare. Local folders and demo models key the result by content."""
    from pipeline.models import cache_identity, hub_commit, hub_id

    if not hub_id(spec):
        return
    mine = {"spec": str(spec), "files": cache_identity(spec), "commit": hub_commit(spec)}
    theirs = first_record(Path(folder) / HUB_WEIGHTS, mine)
    same_commit = mine["commit"] is not None and theirs.get("commit") == mine["commit"]
    if not same_commit and theirs.get("files") != mine["files"]:  # one commit: files fetched another way, no change
        raise StageError(f"{folder}: its work so far was computed with {spec} at commit {theirs.get('commit')}, "
                         f"and {spec} now loads commit {mine['commit']}, whose files differ (the Hub moved since). "
                         f"Recompute it with the new files with force=true (shards: with one PIPELINE_FORCE_ID=<id> "
                         f"for all of them, which clears what they share; a submitit job array has one; or "
                         f"shard.count=1), or pin {hub_id(spec)}@{theirs.get('commit')} to finish a result of the "
                         f"earlier files (a new folder).")


def _writable(folder: Path) -> bool:
    """Whether a lock file can be made in ``folder`` (os.access misses read-only mounts and immutable folders
    under root)."""
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


def _clear_folder(path: Path) -> None:
    for child in path.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def checksum_files(folder: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and rel not in _BOOKKEEPING and not f.name.startswith(".tmp-"):
            files[rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return files


def _finish(run: StageRun) -> None:
    from pipeline.models import hub_commits_in

    commits = hub_commits_in(run.identity)
    manifest = {
        "stage": run.stage,
        "key": run.key,
        "identity": redact(run.identity),
        "config": run.config,
        "counts": run.counts,
        "timings_s": run.timings,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "host": socket.gethostname(),
        "argv": redact(sys.argv),
        "finished_unix": round(time.time(), 3),
        "files": checksum_files(run.path),
        **({"upstream": run.upstream} if run.upstream else {}),
        **({"hub_commits": commits} if commits else {}),
        **({"extra": run.extra} if run.extra else {}),
    }
    atomic_write_json(run.path / MANIFEST, manifest)
    digest = sha256_file(run.path / MANIFEST)
    atomic_write_text(run.path / MARKER, digest + "\n")


def verify_folder(folder: str | os.PathLike) -> list[str]:
    """Problems of one stage folder against its manifest: missing, altered or unexpected files."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return [f"{folder}: no manifest.json (incomplete)"]
    if not (folder / MARKER).is_file():
        return [f"{folder}: no {MARKER} marker (incomplete)"]
    problems = []
    if marker_digest(folder) != sha256_file(folder / MANIFEST):
        problems.append(f"{folder}/{MANIFEST}: altered after completion")
    try:
        recorded = dict(read_manifest(folder).get("files") or {})
    except (ValueError, AttributeError):
        return problems + [f"{folder}/{MANIFEST}: cannot be read (rerun the stage that wrote it with force=true)"]
    problems += [f"{folder}: built from {s} before it was recomputed (its next run recomputes it)"
                 for s in stale_inputs(folder)]
    actual = checksum_files(folder)
    for name, meta in recorded.items():
        if name not in actual:
            problems.append(f"{folder}/{name}: missing")
        elif actual[name]["sha256"] != meta["sha256"]:
            problems.append(f"{folder}/{name}: altered (sha256 differs from the manifest)")
    for name in sorted(set(actual) - set(recorded)):
        problems.append(f"{folder}/{name}: not in the manifest (added after completion)")
    return problems


def tempdir_in(root: str | os.PathLike) -> tempfile.TemporaryDirectory:
    """Scratch space on the same filesystem as the artifacts, so renames stay atomic."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=root, prefix=".scratch-")
