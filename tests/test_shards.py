"""pipeline/shards.py's skeleton (parts, and the merge done by the last shard to finish) with stand-in stages."""

from __future__ import annotations

from types import SimpleNamespace

from omegaconf import OmegaConf

from pipeline.artifacts import is_complete
from pipeline.shards import run_sharded

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
