"""pipeline/shards.py's skeleton (parts, and the merge done by the last shard to finish) with stand-in stages."""

from __future__ import annotations

from types import SimpleNamespace

from omegaconf import OmegaConf

from pipeline.artifacts import is_complete
from pipeline.shards import block_bounds, n_blocks, run_sharded, shard_blocks

SHARDS = 4


def _cfg(root, index: int):
    return OmegaConf.create({"artifacts_root": str(root), "force": False, "lock_wait_s": 0,
                             "shard": {"index": index, "count": SHARDS}})


def test_a_shard_that_finds_another_merging_succeeds_without_merging(tmp_path):
    """A rerun array (after the merging shard died, say) starts its shards together: every one of them finds
    all parts complete and goes for the merge. Those that find it taken must end well, not with StageLocked
    (a failed array task), and the merge must run once."""
    merges, during = [], {}

    def work(ctx, run, blocks, out):
        out.mkdir(parents=True, exist_ok=True)
        for b in blocks:
            (out / f"block-{b}").write_text(str(b))

    def merge(ctx, st, dirs):
        merges.append(len(dirs))
        # shard 1 run again while shard 3 holds the merge
        during["shard 1"] = run_sharded(_cfg(tmp_path, 1), "demo", {"x": 1}, "demo", prepare=prepare, work=work,
                                        merge=merge)
        (st.path / "merged.txt").write_text("".join((d / f"block-{i}").read_text() for i, d in enumerate(dirs)))

    def prepare(final):
        return SimpleNamespace(n_blocks=SHARDS)

    for index in range(SHARDS - 1):  # parts 0-2: each waits for the others
        part = run_sharded(_cfg(tmp_path, index), "demo", {"x": 1}, "demo", prepare=prepare, work=work, merge=merge)
        assert part.name.startswith(f"shard-{index}-of-{SHARDS}")
    final = run_sharded(_cfg(tmp_path, SHARDS - 1), "demo", {"x": 1}, "demo", prepare=prepare, work=work,
                        merge=merge)
    assert merges == [SHARDS] and is_complete(final) and (final / "merged.txt").read_text() == "0123"
    assert during["shard 1"].name.startswith(f"shard-1-of-{SHARDS}")  # its part, complete; no exception


def test_a_forced_sharded_run_clears_what_the_shards_share_once(tmp_path, monkeypatch):
    """force=true over an array (one run id): the first shard clears the merged result, every part and what the
    shards share (retrieve's corpus embeddings live in the final folder: kept, they were reused after the model's
    output changed); the array's other shards and requeued ones keep what this run has done since."""
    worked = []

    def work(ctx, run, blocks, out):
        out.mkdir(parents=True, exist_ok=True)
        for b in blocks:
            worked.append(b)
            (out / f"block-{b}").write_text(ctx.version)

    def merge(ctx, st, dirs):
        (st.path / "merged.txt").write_text("".join((d / f"block-{i}").read_text() for i, d in enumerate(dirs)))

    def run(index, version, force):
        cfg = _cfg(tmp_path, index)
        cfg.force = force
        return run_sharded(cfg, "demo", {"x": 1}, "demo", work=work, merge=merge,
                           prepare=lambda final: SimpleNamespace(n_blocks=SHARDS, version=version))

    for index in range(SHARDS):
        final = run(index, "a", False)
    (final / "corpus_emb.f16.npy").write_text("made by the old model")
    monkeypatch.setenv("PIPELINE_FORCE_ID", "slurm-9")
    worked.clear()
    run(0, "b", True)
    assert not (final / "corpus_emb.f16.npy").exists() and not is_complete(final)
    run(1, "b", True)  # the same run's next task: shard 0's part is kept
    run(1, "b", True)  # shard 1 requeued
    run(2, "b", True)
    assert worked == [0, 1, 2]
    final = run(3, "b", True)
    assert (final / "merged.txt").read_text() == "bbbb" and worked == [0, 1, 2, 3]
    assert run(0, "b", True) == final and worked == [0, 1, 2, 3]  # requeued after the merge: nothing to do


def test_shards_that_would_compute_in_another_dtype_are_refused(tmp_path, monkeypatch):
    """retrieve's and score's keys hold `precision: auto`; a shard on a node where it means fp16 (or a CPU's fp32)
    must not add its blocks to a folder whose first blocks were bf16, and says what to do; the same dtype goes on.
    Each shard's node is stood in for by its device and the dtype its precision setting means there."""
    import pytest

    from pipeline.artifacts import StageError
    from pipeline.stages import common

    node = {}
    monkeypatch.setattr(common, "stage_device", lambda cfg: node["device"])

    def work(ctx, run, blocks, out):
        out.mkdir(parents=True, exist_ok=True)
        for b in blocks:
            (out / f"block-{b}").write_text(str(b))

    def merge(ctx, st, dirs):
        (st.path / "merged.txt").write_text("".join((d / f"block-{i}").read_text() for i, d in enumerate(dirs)))

    def run(index, precision, device="cuda"):
        node["device"] = device
        return run_sharded(_cfg(tmp_path, index), "demo", {"x": 1}, "demo", work=work, merge=merge,
                           prepare=lambda final: SimpleNamespace(n_blocks=SHARDS), precision=precision)

    run(0, "bf16")
    with pytest.raises(StageError, match=r"computed in bfloat16 .*would compute in float16 on cuda.*precision"):
        run(1, "fp16")
    with pytest.raises(StageError, match="computed in bfloat16"):
        run(1, "fp32", "cpu")
    for index in range(1, SHARDS):
        final = run(index, "bf16", "cpu")  # a CPU with bf16 computes the same dtype: accepted
    assert is_complete(final) and (final / "merged.txt").read_text() == "0123"
    assert (final / "compute.json").is_file()


def test_shards_with_one_pid_on_two_hosts_record_their_dtype_once(tmp_path, monkeypatch):
    """The tasks of an array start together, and with a container (pid namespace) per task two shards on two hosts
    can share a pid: both wrote the temporary record under that pid's name, so the first to link it found it unlinked
    by the other (FileNotFoundError, the task failed). Stood in for by the other host's claim running just before
    this one links."""
    from pipeline import shards

    real_link = shards.os.link
    other_host = {"claimed": False}

    def link(src, dst):
        if not other_host["claimed"]:
            other_host["claimed"] = True
            shards.claim_compute_dtype(tmp_path, "score", "bfloat16", "cuda")  # same pid, another host
        return real_link(src, dst)

    monkeypatch.setattr(shards.os, "link", link)
    shards.claim_compute_dtype(tmp_path, "score", "bfloat16", "cuda")
    assert other_host["claimed"] and (tmp_path / "compute.json").is_file()
    assert not list(tmp_path.glob(".tmp-*"))


def test_blocks_cover_the_items_exactly_once():
    # an extra (empty) block past the end would be a part with nothing in it, or a merge waiting for it forever
    for n, size in [(0, 4), (1, 4), (3, 4), (4, 4), (8, 4), (9, 4), (12, 4), (1000, 1)]:
        total = n_blocks(n, size)
        assert total == -(-n // size)
        bounds = [block_bounds(b, size, n) for b in range(total)]
        assert all(lo < hi for lo, hi in bounds)  # no empty block
        assert [i for lo, hi in bounds for i in range(lo, hi)] == list(range(n))
        for count in (1, 2, 3, 5):
            shards = [shard_blocks(total, i, count) for i in range(count)]
            assert [b for r in shards for b in r] == list(range(total))  # shard order is the single-run order
    assert n_blocks(8, 4) == 2 and block_bounds(1, 4, 8) == (4, 8)


def test_the_chain_refuses_shard_settings_before_running_anything(tmp_path):
    """`python -m pipeline -m shard.count=2 'shard.index=range(2)'` (stage=all, the default): one shard's retrieve
    returns its part, not the merged result, and the chain then stopped with "run that stage first" after the
    retrieve work; it is refused at once, naming the stages that shard."""
    import pytest

    from pipeline.artifacts import StageError
    from pipeline.config import compose
    from pipeline.stages import all as chain

    cfg = compose(["experiment=demo", f"artifacts_root={tmp_path}", "shard.count=2", "shard.index=0"])
    with pytest.raises(StageError, match=r"stage=all does not run sharded .*stage=retrieve and stage=score only"):
        chain.run(cfg)
    assert not (tmp_path / "retrieve").exists()  # nothing was started
