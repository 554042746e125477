"""scripts/bench_gpu.py's logic that only a GPU run reaches, driven here with stand-ins for the model calls."""

import os
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import bench_gpu  # noqa: E402

CONTROL = "stage defaults (control)"
FROZEN = "compiled with frozen weights (one QKV GEMM)"
EVERY_TOKEN = "last layer's feed-forward on every token"
PADDED = "padded attention (SDPA, length-sorted batches)"


def _gpu_bench(left_s: float, reserve_s: float):
    """A Bench as the variants method sees it on a GPU, its measurements recorded instead of logged."""
    added = []

    def add(row, system, n, seconds, unit, flops=None, note=""):
        added.append(system)
        return 1000.0 + len(added)  # distinct rates: the control's mean and the ratios are checked below

    return types.SimpleNamespace(dev=torch.device("cuda"), args=types.SimpleNamespace(variants="default"),
                                 left=lambda: left_s, reserve_s=reserve_s, engine=types.SimpleNamespace(LAST_RUN={}),
                                 results={"rows": {}}, add=add, added=added)


def test_gpu_variants_interleave_a_second_round_of_the_control_and_undecided_settings(monkeypatch):
    monkeypatch.setattr(bench_gpu, "sync", lambda dev: None)
    bench = _gpu_bench(left_s=1000.0, reserve_s=100.0)
    calls = []

    def job(model, items, **kw):
        calls.append((len(items), kw.get("compile_layers"), kw.get("attention"),
                      os.environ.get("PIPELINE_COMPILE_FREEZE"), os.environ.get("PIPELINE_FIRST_TOKEN_FFN")))

    kw = {"compile_layers": True, "batch_tokens": 65536, "max_batch": 2048, "tokenize_workers": 0}
    bench_gpu.Bench.variants(bench, "score", job, None, list(range(600)), kw, 1.0, "pairs/s", "token store")
    labels = [s.split(": ", 1)[1] for s in bench.added]
    assert labels == [CONTROL, "eager layers", FROZEN, EVERY_TOKEN, PADDED,
                      f"{CONTROL}, round 2", f"{FROZEN}, round 2", f"{EVERY_TOKEN}, round 2", f"{PADDED}, round 2"]
    timed = [c for c in calls if c[0] == 300]  # half the inputs; the warm-up calls take a third of those
    assert len(timed) == 9 and len(calls) == 9 + 5  # warm-ups in the first round only
    assert timed[2][3] == "1" and timed[3][4] == "0" and timed[4][2] == "padded" and timed[1][1] is False
    assert os.environ.get("PIPELINE_COMPILE_FREEZE") is None  # each setting only for its own calls
    out = bench.results["rows"]["score_variants"]
    assert out["source"] == "token store"
    control = out[CONTROL]
    assert control["rates"] == [1001.0, 1006.0] and control["vs_control"] == 1.0
    assert control["spread"] == pytest.approx(5 / 1003.5)
    assert out[FROZEN]["vs_control"] == pytest.approx((1003 + 1007) / 2 / 1003.5)
    assert out["eager layers"]["rates"] == [1002.0]


def test_gpu_variants_leave_the_time_of_the_later_rows_alone(monkeypatch):
    monkeypatch.setattr(bench_gpu, "sync", lambda dev: None)
    bench = _gpu_bench(left_s=110.0, reserve_s=100.0)  # 10 s to spare: less than one variant needs
    calls = []
    kw = {"compile_layers": True, "batch_tokens": 65536, "max_batch": 2048, "tokenize_workers": 0}
    bench_gpu.Bench.variants(bench, "encode", lambda model, items, **k: calls.append(1), None, list(range(600)), kw,
                             1.0, "passages/s", "token store")
    assert not calls and not bench.added
    assert bench.results["rows"]["encode_variants"] == {"source": "token store"}


def test_vs_control_without_a_control():
    """On the CPU there is no control row: rates are kept, ratios are None."""
    out = bench_gpu.vs_control({"GELU not fused into its GEMM": [40.0]}, CONTROL)
    assert out == {"GELU not fused into its GEMM": {"rates": [40.0], "mean": 40.0, "vs_control": None}}
