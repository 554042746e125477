"""The import rule of docs/architecture.md: the modules scripts/bench_gpu.py loads on a GPU machine import without
hydra, omegaconf, faiss, wandb, bm25s or ir_datasets (that machine's Python has none of them; datasets, which
sentence-transformers itself imports, and omegaconf for the training rows arrive as carried wheels)."""

import subprocess
import sys
import textwrap

GPU_MACHINE_MODULES = ["pipeline", "pipeline.engine", "pipeline.varlen", "pipeline.rewrites", "pipeline.tokenizing",
                       "pipeline.tokenize_worker", "pipeline.tokens", "pipeline.search", "pipeline.kernels",
                       "pipeline.packing"]
ABSENT_THERE = ["hydra", "omegaconf", "faiss", "wandb", "bm25s", "ir_datasets"]


def test_bench_modules_import_without_the_stage_dependencies():
    code = textwrap.dedent(f"""
        import importlib, sys

        for absent in {ABSENT_THERE!r}:
            sys.modules[absent] = None  # as for a missing package: import raises, find_spec is None
        for name in {GPU_MACHINE_MODULES!r}:
            importlib.import_module(name)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_absent_modules_are_really_refused():
    """The check above would pass vacuously if its finder refused nothing: here it refuses an import that works."""
    code = textwrap.dedent(f"""
        import sys

        for absent in {ABSENT_THERE!r}:
            sys.modules[absent] = None
        import omegaconf
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr
