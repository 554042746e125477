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


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla V100-SXM2-32GB", None)])
def test_mfu_peak_follows_the_exact_part_not_its_family(name, peak):
    # an H100 PCIe card reports "H100" too: at the SXM peak its MFU would read 24% low
    assert bench_gpu.datasheet_peak(name)[0] == peak


def test_search_probes_survive_a_failing_method_and_stop_for_time(monkeypatch):
    """One search method that fails on the GPU (the fused kernel, the /16 re-search: both new there) must cost
    only its own probe; probes stop while the rows after the search keep their time; every probe failing is the
    row's failure."""
    monkeypatch.setattr(bench_gpu, "sync", lambda dev: None)
    clock = {"left": 100.0}
    searched = []

    def exact_search(queries, corpus, k, **kw):
        searched.append((len(queries), kw.get("topk_method"), kw.get("chunk_keep")))
        if kw.get("topk_method") == "fused":
            raise RuntimeError("PTX: out of resources")
        clock["left"] -= 10.0 if len(queries) > 256 else 0.0
        return None, None

    stub_search = types.SimpleNamespace(exact_search=exact_search, LAST_SEARCH={})
    bench = types.SimpleNamespace(search=stub_search, dev=torch.device("cpu"), left=lambda: clock["left"],
                                  reserve_s=45.0, results={})
    probes, _ = bench_gpu.Bench.probe_search(bench, ["grouped32", "fused32", "grouped16", "grouped64", "topk"],
                                             list(range(4096)), None, 100)
    assert list(probes) == ["grouped32", "grouped16", "grouped64"]  # then 70 s left, 25 past the reserve: stop
    errors = bench.results["search_probe_errors"]
    assert errors["fused32"].startswith("RuntimeError") and errors["topk"] == "not probed: time budget"
    assert "fused32" in bench.results["shortened"]["search probes"]
    assert [n for n, *_ in searched[:2]] == [256, 4096]  # an untimed small search before each timed one
    with pytest.raises(RuntimeError, match="every search probe failed"):
        bench_gpu.Bench.probe_search(bench, ["fused32"], list(range(4096)), None, 100)


def test_summary_names_what_did_not_complete(capsys):
    bench = types.SimpleNamespace(results={"errors": {"train": "RuntimeError: CUDA error"},
                                           "skipped": {"train_compiled": "time budget (12s left)"},
                                           "shortened": {"search": "ran 262144 of 500000 queries (time budget)"}})
    bench_gpu.Bench.log_incomplete(bench)
    out = capsys.readouterr().out
    assert "NOT COMPLETED" in out and "train: FAILED" in out and "train_compiled: skipped" in out
    assert "search: ran 262144 of 500000" in out
    bench_gpu.Bench.log_incomplete(types.SimpleNamespace(results={}))
    assert "NOT COMPLETED" not in capsys.readouterr().out
