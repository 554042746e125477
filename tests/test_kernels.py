"""pipeline/kernels.py under Triton's CPU interpreter, and the top-k that consumes its group maxima."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import kernels
from pipeline import search as S


def _group_max(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Maxima of groups of ``group`` adjacent columns, the last group cut at the end (the kernel's contract)."""
    q, n = scores.shape
    padded = torch.full((q, -(-n // group) * group), float("-inf"), dtype=scores.dtype)
    padded[:, :n] = scores
    return padded.view(q, -1, group).amax(dim=2)


@pytest.mark.parametrize("n,group", [(1000, 32), (997, 32), (130, 8)])
def test_top_k_from_group_maxima_is_exact(n, group):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((12, n)).astype(np.float32))
    x[0, 64:96] += 10.0  # row 0: one group holds the top 30's head
    x[1, -5:] += 10.0  # row 1: the cut last group
    x[2, ::group] += 10.0  # row 2: every group's first column
    v, i = S._topk_from_group_max(x, _group_max(x, group), 30, group)
    rv, ri = torch.topk(x, 30, dim=1)
    torch.testing.assert_close(v, rv)
    assert torch.equal(torch.sort(i, dim=1).values, torch.sort(ri, dim=1).values)
    assert int(i.max()) < n


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
inside_interpreter = pytest.mark.skipif(not INTERPRETED, reason="run by test_kernels_under_the_interpreter")


def test_kernels_under_the_interpreter():
    """This file's interpreter tests, in a process that sets TRITON_INTERPRET=1 before Triton is first imported
    (Triton reads it when its own helpers such as tl.max are defined, so it cannot be switched on in this one)."""
    pytest.importorskip("triton")
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "interpreted"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and re.search(r"\b5 passed", run.stdout), run.stdout[-3000:] + run.stderr[-3000:]


@inside_interpreter
def test_interpreted_kernel_scores_and_group_maxima_match_torch():
    """Each kernel (pointer loads; TMA loads and stores, one tile per program or persistent) on shapes off every
    tile multiple: rows, columns and the inner dimension all end in partial tiles."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(37, 48), dim=1).half()
    c = torch.nn.functional.normalize(torch.randn(201, 48), dim=1).half()
    c[192:] = -q[0]  # the cut last group (columns 192-200) all negative for query 0: padding must not win its max
    ref = (q.float() @ c.float().T).half()
    # the default interpreter tiles, then each kernel with a band of 3 row tiles that the 37 rows cut short
    settings = [None] + [dict(kernel=k, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SWIZZLE_M=3) for k in kernels._KERNELS]
    for tiles in settings:
        scores, gmax = kernels.scores_and_group_max(q, c, group=32, tiles=tiles)
        assert scores.shape == (37, 201) and gmax.shape == (37, 7), tiles
        torch.testing.assert_close(scores, ref, atol=2e-3, rtol=0)
        torch.testing.assert_close(gmax, _group_max(scores, 32), atol=0, rtol=0)  # the stored scores' own maxima
    with pytest.raises(TypeError, match="fp16"):
        kernels.scores_and_group_max(q.float(), c.float())
    with pytest.raises(ValueError, match="divide"):
        kernels.scores_and_group_max(q, c, group=48)
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.scores_and_group_max(q, c, tiles=dict(settings[1], kernel="wgmma"))
    with pytest.raises(ValueError, match="divisible by 8"):  # TMA rows must be 16-byte multiples
        kernels.scores_and_group_max(q[:, :44].contiguous(), c[:, :44].contiguous(), tiles=settings[2])


@inside_interpreter
def test_interpreted_pointer_kernel_keeps_its_offsets_within_32_bits(monkeypatch):
    """A score block of 2^31 elements or more (8,192 queries x 262,144 columns) is computed in bands of query rows
    whose offsets fit: here the limit is lowered to just above the 201 x 48 corpus chunk, so that 150 x 201
    scores take four bands of at most 48 rows."""
    monkeypatch.setattr(kernels, "_INT32_ELEMENTS", 201 * 48 + 1)
    torch.manual_seed(1)
    q = torch.randn(150, 48).half()
    c = torch.randn(201, 48).half()
    tiles = dict(kernel="pointer", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SWIZZLE_M=3)
    scores, gmax = kernels.scores_and_group_max(q, c, group=32, tiles=tiles)
    torch.testing.assert_close(scores, (q.float() @ c.float().T).half(), atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(gmax, _group_max(scores, 32), atol=0, rtol=0)
    with pytest.raises(ValueError, match="smaller corpus chunk"):  # the corpus rows' own offsets
        kernels.scores_and_group_max(q, torch.zeros((500, 48), dtype=torch.float16), tiles=tiles)


@inside_interpreter
def test_interpreted_fused_search_equals_brute_force(monkeypatch):
    rng = np.random.default_rng(5)
    c = rng.standard_normal((700, 32)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    q = c[[3, 350, 699]] + 0.01 * rng.standard_normal((3, 32)).astype(np.float32)
    ref = np.argsort(-(q @ c.T), axis=1, kind="stable")[:, :10]
    for kind in kernels._KERNELS:  # the TMA kernels' scores are views of row-padded buffers
        monkeypatch.setattr(kernels, "_INTERPRETER_TILES", dict(kernels._INTERPRETER_TILES, kernel=kind))
        s, i = S.exact_search(q, torch.from_numpy(c).half(), 10, device="cpu", dtype="fp16", topk_method="fused",
                              corpus_chunk=300, query_chunk=2, rescore=True, show_progress=False)
        np.testing.assert_array_equal(i, ref)  # fp32 re-scoring restores the exact order
        assert S.LAST_SEARCH["topk_method"] == "fused"


@inside_interpreter
def test_interpreted_bench_sweep_picks_a_tile_and_checks_the_selection(monkeypatch):
    """scripts/bench_gpu.py's fused-kernel block (otherwise only run on a GPU): every tile setting timed, the
    fastest kept for the rest of the run, the top-k found exact although ties make indices differ."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_gpu

    monkeypatch.setattr(kernels, "GPU_TILES", kernels.GPU_TILES)
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(64, 32), dim=1).half()
    c = torch.nn.functional.normalize(torch.randn(600, 32), dim=1).half()
    out = bench_gpu.fused_block(q, c, (q.float() @ c.float().T).half(), 10, 0.0, reps=1)
    assert set(out["tiles_ms"]) == {kernels.tile_name(t) for t in kernels.GPU_TILE_CHOICES} and not out["tiles_failed"]
    assert out["tiles"] == min(out["tiles_ms"], key=out["tiles_ms"].get) == kernels.tile_name(kernels.GPU_TILES)
    assert out["same_topk"] is True and out["max_abs_diff"] <= 2e-3
    assert 0.5 < out["same_index_share_vs_grouped32"] <= 1.0
    # a run short of time compiles only the setting the sweep kept
    short = bench_gpu.fused_block(q, c, (q.float() @ c.float().T).half(), 10, 0.0, reps=1, all_tiles=False)
    assert list(short["tiles_ms"]) == [out["tiles"]] and short["same_topk"] is True


@inside_interpreter
def test_interpreted_kernel_input_checks():
    q = torch.zeros((4, 8), dtype=torch.float16)
    with pytest.raises(ValueError, match="do not match"):
        kernels.scores_and_group_max(q, torch.zeros((5, 6), dtype=torch.float16))


def test_gpu_tile_choices_fit_a_hopper_multiprocessor():
    """Every tile the bench sweeps names a kernel, holds whole 32-column groups, and its pipelined shared-memory
    buffers (fp16 query and corpus tiles, one per stage, and for the TMA kernels the score tile they store from)
    fit in the 227 KB an H100/H200 block may use."""
    assert kernels.GPU_TILES in kernels.GPU_TILE_CHOICES
    assert {t["kernel"] for t in kernels.GPU_TILE_CHOICES} == set(kernels._KERNELS)
    for t in kernels.GPU_TILE_CHOICES:
        assert t["BLOCK_N"] % kernels.GROUP == 0, kernels.tile_name(t)
        smem = (t["BLOCK_M"] * t["BLOCK_K"] + t["BLOCK_K"] * t["BLOCK_N"]) * 2 * t["num_stages"]
        smem += t["BLOCK_M"] * t["BLOCK_N"] * 2 if t["kernel"].startswith("tma") else 0
        assert smem <= 227 * 1024, kernels.tile_name(t)
    assert kernels.tile_name(kernels.GPU_TILE_CHOICES[0]) == "pointer 128x256x64 w8 s3"
    assert len({kernels.tile_name(t) for t in kernels.GPU_TILE_CHOICES}) == len(kernels.GPU_TILE_CHOICES)


@pytest.mark.slow  # 6-13 s of ahead-of-time compiles for a kernel the stages use only when asked (topk_method=fused)
@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs Triton kernels on the CPU")
def test_gpu_kernels_compile_for_hopper(tmp_path, monkeypatch):
    """Every tile setting the bench sweeps compiles ahead of time for an H100/H200 (sm_90: no GPU needed), with
    the 16-divisible pointers and sizes of a search block as Triton's launcher specialises them: tensor-core
    (wgmma) GEMMs, the TMA kernels through bulk tensor copies, the pointer kernels' loads pipelined (cp.async), and
    shared memory within the 227 KB a block may use. The interpreter runs none of this."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set, newer Triton warns no more
    for tiles in kernels.GPU_TILE_CHOICES:
        t = dict(tiles)
        kind, warps, stages = t.pop("kernel"), t.pop("num_warps"), t.pop("num_stages")
        fn = kernels._scores_group_max_kernel if kind == "pointer" else kernels._scores_group_max_tma_kernel
        blocks = {"q_desc": (t["BLOCK_M"], t["BLOCK_K"]), "c_desc": (t["BLOCK_N"], t["BLOCK_K"]),
                  "s_desc": (t["BLOCK_M"], t["BLOCK_N"])}
        consts = dict(K=768, GROUP_N=32, **t, **({} if kind == "pointer" else
                                                 {"TILES": 256 if kind == "tma_persistent" else 1}))
        sig = {}
        for name in fn.arg_names:
            sig[name] = ("constexpr" if name in consts else f"tensordesc<fp16[{blocks[name][0]},{blocks[name][1]}]>"
                         if name in blocks else "*fp16" if name in "QCSG" else "i32")
        divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                     if sig[name] in ("*fp16", "i32") and name != "N"}  # the last chunk's N need not be
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=divisible),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        ptx, name = compiled.asm["ptx"], kernels.tile_name(tiles)
        assert "wgmma" in ptx, name
        assert ("cp.async.bulk.tensor" in ptx) if kind != "pointer" else ("cp.async.cg" in ptx), name
        assert compiled.metadata.shared <= 232448, (name, compiled.metadata.shared)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs Triton kernels on the CPU")
def test_fused_search_refuses_where_it_cannot_run():
    with pytest.raises(ValueError, match="fused.*CUDA"):
        S.exact_search(np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), 3, device="cpu",
                       topk_method="fused", show_progress=False)
