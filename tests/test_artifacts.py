"""The stage contract: content keys, skip/force, no marker after a failure, atomic writes, locks, verification."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from pipeline.artifacts import (LOCK, MANIFEST, MARKER, StageError, StageLocked, atomic_path, atomic_write_json,
                                config_key, is_complete, open_stage, quick_check, require_complete, verify_folder)

IDENTITY = {"stage_cfg": {"k": 100, "rule": "x"}, "data": {"files": {"corpus": {"size": 3}}}, "upstream": "abc"}


def work(root, identity=IDENTITY, calls=None, **kw):
    with open_stage("demo", identity, root=root, label="lbl", **kw) as st:
        if st.done:
            return st.path
        (calls if calls is not None else []).append(1)
        atomic_write_json(st.file("out.json"), {"value": 1})
        st.counts["rows"] = 1
        return st.path


def test_key_is_stable_and_content_based():
    same_in_other_order = {"upstream": "abc", "data": {"files": {"corpus": {"size": 3}}},
                           "stage_cfg": {"rule": "x", "k": 100}}
    assert config_key(IDENTITY) == config_key(same_in_other_order)
    assert config_key(IDENTITY) == config_key(json.loads(json.dumps(IDENTITY)))
    assert config_key({**IDENTITY, "upstream": "abd"}) != config_key(IDENTITY)
    assert len(config_key(IDENTITY)) == 12


def test_second_call_skips_and_force_recomputes(tmp_path):
    calls: list[int] = []
    first = work(tmp_path, calls=calls)
    assert is_complete(first) and first.name == f"lbl-{config_key(IDENTITY)}"
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["counts"] == {"rows": 1} and "out.json" in manifest["files"]
    assert work(tmp_path, calls=calls) == first and calls == [1]
    assert work(tmp_path, calls=calls, force=True) == first and calls == [1, 1]
    assert work(tmp_path, {**IDENTITY, "upstream": "other"}, calls=calls) != first


def test_failure_leaves_no_marker_and_next_run_starts_clean(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with open_stage("demo", IDENTITY, root=tmp_path, label="lbl") as st:
            atomic_write_json(st.file("half.json"), {"partial": True})
            raise RuntimeError("boom")
    folder = st.path
    assert not (folder / MARKER).exists() and not (folder / MANIFEST).exists()
    assert verify_folder(folder)  # reported as incomplete
    work(tmp_path)
    assert is_complete(folder) and not (folder / "half.json").exists()


def test_atomic_path_leaves_no_partial_file(tmp_path):
    target = tmp_path / "data.bin"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new but unfinished")
            raise ValueError("interrupted")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_a_write_a_read_only_root_refuses_raises_its_own_error(tmp_path, monkeypatch):
    # on a read-only mount the temporary cannot be made, and unlinking it fails with EROFS as well (not ENOENT):
    # that cleanup error used to replace the first one, so the message named the wrong call
    from pathlib import Path

    def refused(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", "the cleanup's unlink")

    monkeypatch.setattr(Path, "unlink", refused)
    with pytest.raises(OSError) as raised:
        with atomic_path(tmp_path / "table.md"):
            raise OSError(errno.EROFS, "Read-only file system", "the write")
    assert raised.value.filename == "the write"


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK])
def test_a_file_system_without_locks_is_refused_in_one_line(tmp_path, monkeypatch, code):
    # Lustre mounted without -o flock answers ENOSYS, NFS without its lock service ENOLCK: a traceback before, and
    # going on without the lock would let two jobs write one folder
    from pipeline import artifacts

    def no_flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(artifacts.fcntl, "flock", no_flock)
    with pytest.raises(StageError, match=rf"does not support file locks \({os.strerror(code)}\).*Lustre mounted "
                                         r"with -o flock"):
        work(tmp_path)
    assert not list((tmp_path / "demo").glob("*/out.json"))  # nothing was written unguarded


def test_stale_lock_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "demo" / f"lbl-{config_key(IDENTITY)}"
    folder.mkdir(parents=True)
    (folder / LOCK).write_text("pid=999999 host=gone")  # left by a killed process: no flock held
    with caplog.at_level("WARNING"):
        assert is_complete(work(tmp_path))
    assert "stale lock" in caplog.text


def test_live_lock_refuses(tmp_path):
    folder = tmp_path / "demo" / f"lbl-{config_key(IDENTITY)}"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from pipeline.artifacts import folder_lock
            with folder_lock(Path({str(folder)!r})):
                print("locked", flush=True)
                sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StageLocked, match="another live process"):
            work(tmp_path, lock_wait_s=0)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert is_complete(work(tmp_path))  # the holder is gone: its lock went with it


def test_verify_folder_detects_changes(tmp_path):
    folder = work(tmp_path)
    assert verify_folder(folder) == []
    (folder / "out.json").write_text('{"value": 2}')
    assert any("out.json: altered" in p for p in verify_folder(folder))
    (folder / "extra.txt").write_text("x")
    assert any("extra.txt: not in the manifest" in p for p in verify_folder(folder))
    (folder / "out.json").unlink()
    assert any("out.json: missing" in p for p in verify_folder(folder))


def _reader(root, upstream, calls, force=False):
    """A stage that reads ``upstream`` (the way stages read their inputs) and writes one file."""
    with open_stage("reader", {"reads": "demo"}, root=root, label="r", force=force) as st:
        if st.done:
            return st.path
        require_complete(upstream, "the demo result")
        calls.append(1)
        atomic_write_json(st.file("out.json"), {"value": 2})
        return st.path


def test_a_damaged_input_is_refused_before_it_is_read(tmp_path):
    # a rewritten, truncated or missing file in a complete input (or a mangled manifest) trained on silently
    upstream = work(tmp_path)
    require_complete(upstream, "the demo result")
    (upstream / "out.json").write_text('{"value": 1, "padding": "rewritten"}')
    with pytest.raises(StageError, match="the demo result at .* is damaged: out.json holds 36 bytes where its "
                                         "manifest records 17. Rerun the stage that wrote it with force=true"):
        require_complete(upstream, "the demo result")
    (upstream / "out.json").unlink()
    with pytest.raises(StageError, match="out.json is missing"):
        require_complete(upstream, "the demo result")
    (upstream / MANIFEST).write_text("{not json")
    with pytest.raises(StageError, match="manifest.json was changed after completion"):
        require_complete(upstream, "the demo result")
    assert any("cannot be read" in p for p in verify_folder(upstream))  # verify reports it, no traceback


def test_a_result_built_from_an_input_recomputed_since_is_recomputed(tmp_path):
    calls: list[int] = []
    upstream = work(tmp_path)
    reader = _reader(tmp_path, upstream, calls)
    assert _reader(tmp_path, upstream, calls) == reader and calls == [1]  # same input: skipped
    recorded = json.loads((reader / MANIFEST).read_text())["upstream"]
    assert recorded == {f"demo/{upstream.name}": (upstream / MARKER).read_text().strip()}
    work(tmp_path, force=True)  # the input recomputed under the same key (after a fix, or after damage)
    assert any("built from" in p and "before it was recomputed" in p for p in verify_folder(reader))
    assert _reader(tmp_path, upstream, calls) == reader and calls == [1, 1]  # stale: recomputed, not skipped
    assert verify_folder(reader) == [] and _reader(tmp_path, upstream, calls) and calls == [1, 1]


def test_force_keeps_a_result_whose_inputs_are_gone(tmp_path):
    """force=true on a stage whose input was deleted used to discard the result, then fail on the input: the user
    lost both. The result is kept and the error names the input; once the input is back, force recomputes."""
    calls: list[int] = []
    upstream = work(tmp_path)
    reader = _reader(tmp_path, upstream, calls)
    shutil.rmtree(upstream)
    with pytest.raises(StageError, match=r"not discarding the complete result .* cannot be read \(.*demo.*no "
                                         r"_COMPLETE\)\. Rebuild it first \(stage=demo\)"):
        _reader(tmp_path, upstream, calls, force=True)
    assert is_complete(reader) and verify_folder(reader) == [] and calls == [1]
    assert work(tmp_path) == upstream  # rebuilt
    (upstream / "out.json").write_text("{}")  # damaged: refused the same way
    with pytest.raises(StageError, match=r"out.json holds 2 bytes.*Rebuild it first \(stage=demo force=true\)"):
        _reader(tmp_path, upstream, calls, force=True)
    assert is_complete(reader)
    assert work(tmp_path) == upstream and "holds 2 bytes" in quick_check(upstream)  # plain rerun: skipped, damaged
    work(tmp_path, force=True)
    assert _reader(tmp_path, upstream, calls, force=True) == reader and calls == [1, 1]


def test_verify_folder_detects_an_edited_manifest(tmp_path):
    # the manifest is the record a result is trusted by: an edit to it (counts, checksums) must not pass unseen
    folder = work(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["counts"]["rows"] = 2
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert any(f"{MANIFEST}: altered after completion" in p for p in verify_folder(folder))


def test_a_marker_without_its_manifest_is_not_complete(tmp_path):
    # a folder whose manifest was lost (a copy that skipped it) must be recomputed, not skipped as complete
    calls: list[int] = []
    folder = work(tmp_path, calls=calls)
    (folder / MANIFEST).unlink()
    assert (folder / MARKER).is_file() and not is_complete(folder)
    assert work(tmp_path, calls=calls) == folder and calls == [1, 1]  # recomputed
    assert is_complete(folder) and verify_folder(folder) == []


def test_a_resumed_stage_deletes_half_written_temporaries(tmp_path):
    # .tmp-* files and folders are writes a killed run never committed: a resume keeps the committed chunks only
    with pytest.raises(RuntimeError, match="killed"):
        with open_stage("demo", IDENTITY, root=tmp_path, label="lbl", resumable=True) as st:
            atomic_write_json(st.file("chunk-0.json"), {"committed": True})
            (st.path / "blocks").mkdir()
            (st.path / ".tmp-chunk-1.json").write_text('{"half')
            (st.path / "blocks" / ".tmp-block-3").mkdir()
            (st.path / "blocks" / ".tmp-block-3" / "part.bin").write_bytes(b"\x00")
            raise RuntimeError("killed")
    with open_stage("demo", IDENTITY, root=tmp_path, label="lbl", resumable=True) as st:
        assert not st.done and (st.path / "chunk-0.json").exists()
        assert not list(st.path.rglob(".tmp-*"))
    assert is_complete(st.path) and not list(st.path.rglob(".tmp-*"))


def test_input_fingerprints_follow_content_not_place_or_mtime(tmp_path, monkeypatch):
    import os
    import shutil

    from pipeline import artifacts

    a = tmp_path / "a" / "collection.tsv"
    a.parent.mkdir()
    a.write_text("1\tfirst passage\n2\tsecond passage\n")
    b = tmp_path / "b" / "collection.tsv"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    os.utime(b, ns=(1, 1))
    assert artifacts.file_fingerprint(a) == artifacts.file_fingerprint(b)
    b.write_text("1\tfirst passage\n2\tsecond passagE\n")  # same size, other bytes
    assert artifacts.file_fingerprint(a) != artifacts.file_fingerprint(b)
    assert artifacts.file_fingerprint(a)["bytes"] == artifacts.file_fingerprint(b)["bytes"]
    # the name stays in it: the readers parse by it
    c = tmp_path / "a" / "collection.jsonl"
    shutil.copyfile(a, c)
    assert artifacts.file_fingerprint(c) != artifacts.file_fingerprint(a)
    # folders: by their files' relative paths and contents; excluded paths (a model card) change nothing
    for name in ("m1", "m2"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "weights.bin").write_bytes(b"\x00\x01")
        (tmp_path / name / "README.md").write_text(f"card of {name}")
    assert artifacts.file_fingerprint(tmp_path / "m1") != artifacts.file_fingerprint(tmp_path / "m2")
    assert artifacts.file_fingerprint(tmp_path / "m1", exclude=("README.md",)) == \
        artifacts.file_fingerprint(tmp_path / "m2", exclude=("README.md",))
    (tmp_path / "m2" / "sub" / "weights.bin").write_bytes(b"\x00\x02")
    assert artifacts.file_fingerprint(tmp_path / "m1", exclude=("README.md",)) != \
        artifacts.file_fingerprint(tmp_path / "m2", exclude=("README.md",))


def test_a_folder_fingerprint_follows_its_file_names(tmp_path):
    # a model folder whose file was renamed (weights.bin -> other.bin) loads differently: it must get a new key
    from pipeline import artifacts

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    (folder / "config.json").write_text("{}")
    before = artifacts.file_fingerprint(folder)
    (folder / "sub" / "weights.bin").rename(folder / "sub" / "other.bin")
    after = artifacts.file_fingerprint(folder)
    assert after["bytes"] == before["bytes"] and after["files"] == before["files"]
    assert after != before
    assert config_key(after) != config_key(before)
    (folder / "sub" / "other.bin").rename(folder / "weights.bin")  # the same name in another place
    assert artifacts.file_fingerprint(folder) not in (before, after)


@pytest.fixture
def digest_cache(tmp_path, monkeypatch):
    """Digests kept in tmp_path/digests, this process's memo empty, and every read of a file counted
    (``reads``; each read takes ``delay`` seconds)."""
    import time

    from pipeline import artifacts

    state = {"reads": [], "delay": 0.0, "real": artifacts.sha256_file}

    def counted(path):
        state["reads"].append(path)
        time.sleep(state["delay"])
        return state["real"](path)

    monkeypatch.setattr(artifacts, "sha256_file", counted)
    monkeypatch.setattr(artifacts, "_DIGESTS", {})
    artifacts.remember_digests_in(tmp_path / "digests")
    yield state
    artifacts.remember_digests_in(None)


def test_each_file_version_is_read_once_per_digest_cache(tmp_path, digest_cache):
    import os

    from pipeline import artifacts

    f = tmp_path / "queries.tsv"
    f.write_text("1\twhat is a test\n")
    reads, real = digest_cache["reads"], digest_cache["real"]
    first = artifacts.content_digest(f)
    artifacts._DIGESTS.clear()  # as a new process would start
    assert artifacts.content_digest(f) == first and len(reads) == 1
    f.write_text("1\twhat is a tesT\n")  # changed in place: a new version, read again
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    assert artifacts.content_digest(f) != first and len(reads) == 2
    for record in (tmp_path / "digests").glob("*.json"):  # a damaged record costs a re-read, not a wrong key
        record.write_text("{not json")
    artifacts._DIGESTS.clear()
    assert artifacts.content_digest(f) == real(f) and len(reads) == 3


def test_processes_starting_together_read_a_file_once(tmp_path, digest_cache):
    """Array tasks start together: the first to take the digests' lock reads the file, the others wait for its
    record (threads here: each flock is its own open file, as in separate processes)."""
    import threading

    from pipeline import artifacts

    f = tmp_path / "collection.tsv"
    f.write_text("1\tpassage\n" * 1000)
    digest_cache["delay"] = 0.3
    out = []
    threads = [threading.Thread(target=lambda: out.append(artifacts.content_digest(f))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(digest_cache["reads"]) == 1 and len(set(out)) == 1 and out[0] == digest_cache["real"](f)


def test_forced_run_id_comes_from_the_launcher_not_from_any_allocation(monkeypatch):
    from pipeline.artifacts import forced_run_id

    for name in ("PIPELINE_FORCE_ID", "SUBMITIT_EXECUTOR", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert forced_run_id() is None  # an interactive shell in an allocation: each forced command clears
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert forced_run_id() == "slurm-77"  # a requeued job keeps its id
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    assert forced_run_id() == "slurm-70"  # every task of the array shares it
    monkeypatch.setenv("PIPELINE_FORCE_ID", "rerun-2")
    assert forced_run_id() == "rerun-2"


def test_a_local_submitit_sweep_is_one_forced_run(monkeypatch):
    """submitit's local executor (hydra/launcher=local): the sweep's submission folder is the run id, the same for
    each of its jobs and their requeues (a requeued forced job used to clear its committed work every time)."""
    from pipeline.artifacts import forced_run_id

    for name in ("PIPELINE_FORCE_ID", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_FOLDER", "/runs/multirun/2026-11-27/.submitit/%j")
    sweep = forced_run_id()
    assert sweep and sweep.startswith("submitit-") and forced_run_id() == sweep
    monkeypatch.setenv("SUBMITIT_FOLDER", "/runs/multirun/2026-11-28/.submitit/%j")
    assert forced_run_id() not in (None, sweep)  # another sweep forces again


def test_one_invocation_clears_a_forced_folder_once(tmp_path, monkeypatch):
    """Without a run id, the process is the forced run: the chain reaches v2's and v3's evaluation folders twice
    (train's before/after, then the table) and must encode the corpus once each; the next invocation clears."""
    from pipeline import artifacts

    monkeypatch.delenv("PIPELINE_FORCE_ID", raising=False)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    calls: list[int] = []
    first = work(tmp_path, calls=calls)
    assert work(tmp_path, calls=calls, force=True) == first and calls == [1, 1]
    assert work(tmp_path, calls=calls, force=True) == first and calls == [1, 1]  # the same invocation: kept
    monkeypatch.setattr(artifacts, "_THIS_PROCESS", "process-next-invocation")
    assert work(tmp_path, calls=calls, force=True) == first and calls == [1, 1, 1]


def test_a_forced_run_clears_once_then_resumes_what_it_started(tmp_path, monkeypatch):
    """force=true under one run id (a submitit Slurm job): the first start clears and recomputes; a requeue of
    that job finds its committed work (a resumable stage) or its complete result instead of starting over, which
    a forced job longer than one time limit needs to ever finish. Another id forces again."""
    calls: list[int] = []
    first = work(tmp_path, calls=calls)
    monkeypatch.setenv("PIPELINE_FORCE_ID", "job-1")
    with pytest.raises(RuntimeError, match="time limit"):
        with open_stage("demo", IDENTITY, root=tmp_path, label="lbl", force=True, resumable=True) as st:
            atomic_write_json(st.file("chunk-0.json"), {"committed": True})
            raise RuntimeError("time limit")
    assert not (first / "out.json").exists()  # cleared by the forced start
    with open_stage("demo", IDENTITY, root=tmp_path, label="lbl", force=True, resumable=True) as st:
        assert not st.done and (st.path / "chunk-0.json").exists()  # the requeue resumes
        atomic_write_json(st.file("out.json"), {"value": 2})
    assert verify_folder(first) == []  # the run id's record is bookkeeping, not content
    assert work(tmp_path, calls=calls, force=True) == first and calls == [1]  # this run's result: kept
    monkeypatch.setenv("PIPELINE_FORCE_ID", "job-2")
    assert work(tmp_path, calls=calls, force=True) == first and calls == [1, 1]
    monkeypatch.delenv("PIPELINE_FORCE_ID")
    assert work(tmp_path, calls=calls, force=True) == first and calls == [1, 1, 1]  # no id: every force clears


def test_a_requeued_forced_stage_that_cannot_resume_starts_clean(tmp_path, monkeypatch):
    """A stage that is not resumable (mine) keeps nothing of its unfinished forced run when that run is requeued,
    and the folder still knows the run cleared it (the next requeue does not clear a complete result)."""
    monkeypatch.setenv("PIPELINE_FORCE_ID", "job-1")
    with pytest.raises(RuntimeError, match="time limit"):
        with open_stage("demo", IDENTITY, root=tmp_path, label="lbl", force=True) as st:
            atomic_write_json(st.file("half-of-the-output.json"), {"rows": 10})
            raise RuntimeError("time limit")
    with open_stage("demo", IDENTITY, root=tmp_path, label="lbl", force=True) as st:
        assert not st.done and not (st.path / "half-of-the-output.json").exists()
        atomic_write_json(st.file("out.json"), {"value": 1})
    with open_stage("demo", IDENTITY, root=tmp_path, label="lbl", force=True) as st:
        assert st.done


def test_a_complete_result_on_a_read_only_root_is_used_without_its_lock(tmp_path, monkeypatch):
    # an archived or shared root mounted read-only: taking the lock to skip a complete stage failed with EROFS
    from pipeline import artifacts

    calls: list[int] = []
    folder = work(tmp_path, calls=calls)
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(LOCK) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(artifacts.os, "open", read_only)
    assert work(tmp_path, calls=calls) == folder and calls == [1]  # skipped, no lock taken
    with pytest.raises(OSError, match="Read-only"):  # work to do still needs the lock
        work(tmp_path, {**IDENTITY, "upstream": "other"}, calls=calls)
