"""pipeline/kernels.py under Triton's CPU interpreter, and the top-k that consumes its group maxima."""

import os
import re
import subprocess
import sys

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
    assert run.returncode == 0 and re.search(r"\b3 passed", run.stdout), run.stdout[-3000:] + run.stderr[-3000:]


@inside_interpreter
def test_interpreted_kernel_scores_and_group_maxima_match_torch():
    interpreted = kernels
    # shapes off every tile multiple: rows, columns and the inner dimension all end in partial tiles
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(37, 48), dim=1).half()
    c = torch.nn.functional.normalize(torch.randn(201, 48), dim=1).half()
    c[192:] = -q[0]  # the cut last group (columns 192-200) all negative for query 0: padding must not win its max
    scores, gmax = interpreted.scores_and_group_max(q, c, group=32)
    ref = (q.float() @ c.float().T).half()
    assert scores.shape == (37, 201) and gmax.shape == (37, 7)
    torch.testing.assert_close(scores, ref, atol=2e-3, rtol=0)
    torch.testing.assert_close(gmax, _group_max(scores, 32), atol=0, rtol=0)  # the stored scores' own maxima
    with pytest.raises(TypeError, match="fp16"):
        interpreted.scores_and_group_max(q.float(), c.float())
    with pytest.raises(ValueError, match="divide"):
        interpreted.scores_and_group_max(q, c, group=48)


@inside_interpreter
def test_interpreted_fused_search_equals_brute_force():
    rng = np.random.default_rng(5)
    c = rng.standard_normal((700, 32)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    q = c[[3, 350, 699]] + 0.01 * rng.standard_normal((3, 32)).astype(np.float32)
    ref = np.argsort(-(q @ c.T), axis=1, kind="stable")[:, :10]
    s, i = S.exact_search(q, torch.from_numpy(c).half(), 10, device="cpu", dtype="fp16", topk_method="fused",
                          corpus_chunk=300, query_chunk=2, rescore=True, show_progress=False)
    np.testing.assert_array_equal(i, ref)  # fp32 re-scoring restores the exact order
    assert S.LAST_SEARCH["topk_method"] == "fused"


@inside_interpreter
def test_interpreted_kernel_input_checks():
    q = torch.zeros((4, 8), dtype=torch.float16)
    with pytest.raises(ValueError, match="do not match"):
        kernels.scores_and_group_max(q, torch.zeros((5, 6), dtype=torch.float16))


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs Triton kernels on the CPU")
def test_fused_search_refuses_where_it_cannot_run():
    with pytest.raises(ValueError, match="fused.*CUDA"):
        S.exact_search(np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), 3, device="cpu",
                       topk_method="fused", show_progress=False)
