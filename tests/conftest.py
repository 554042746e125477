"""Shared fixtures: the shipped demo corpus, tiny offline models built once per session, the shared real data."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# a suite run inside a Slurm job submitit launched (or with a forced run id) must not see forced folders as its own
for _name in ("PIPELINE_FORCE_ID", "SUBMITIT_EXECUTOR"):
    os.environ.pop(_name, None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def demo_data_dir() -> Path:
    """The demo corpus shipped in pipeline/resources/demo (MS MARCO layout, synthetic)."""
    from pipeline.demo import DEMO_DIR

    if not (DEMO_DIR / "collection.tsv").exists():
        pytest.fail(f"demo corpus missing: run `python scripts/make_demo_corpus.py` ({DEMO_DIR})")
    return DEMO_DIR


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, demo_data_dir) -> Path:
    """A WordPiece tokenizer trained on the demo collection and training queries."""
    from pipeline.demo import DEMO_MODEL_SETTINGS, read_tsv_pairs, train_tokenizer

    texts = list(read_tsv_pairs(demo_data_dir / "collection.tsv").values())
    texts += list(read_tsv_pairs(demo_data_dir / "queries.train.tsv").values())
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer(texts, out, vocab_size=DEMO_MODEL_SETTINGS["vocab_size"])
    return out


@pytest.fixture(scope="session")
def tiny_bi_encoder(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """Directory of a random (untrained) tiny BERT + mean pooling SentenceTransformer, 64-dim, cosine."""
    from pipeline.demo import build_tiny_bi_encoder

    out = tmp_path_factory.mktemp("tiny_bi_encoder") / "model"
    return build_tiny_bi_encoder(out, tokenizer_dir=tiny_tokenizer_dir, hidden=64, layers=2, heads=2,
                                 max_seq_length=64, seed=0)


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """Directory of a random (untrained) tiny BertForSequenceClassification(num_labels=1), CrossEncoder-loadable."""
    from pipeline.demo import build_tiny_cross_encoder_base

    out = tmp_path_factory.mktemp("tiny_cross_encoder") / "model"
    return build_tiny_cross_encoder_base(out, tokenizer_dir=tiny_tokenizer_dir, hidden=64, layers=2, heads=2,
                                         max_seq_length=128, seed=0)


@pytest.fixture(scope="session")
def demo_stage_overrides(request, demo_data_dir):
    """A factory of overrides that run the stages on the shipped demo corpus (its first `max_queries` training
    queries) with the tiny models, on CPU, in fp32 (stage tests compare outputs byte for byte)."""

    def build(*, max_queries: int, top_k: int, cross_encoder: bool = True) -> list[str]:
        data = Path(demo_data_dir)
        out = [f"data.corpus={data / 'collection.tsv'}", f"data.train.queries={data / 'queries.train.tsv'}",
               f"data.train.qrels={data / 'qrels.train.tsv'}", f"data.train.max_queries={max_queries}",
               f"model.bi_encoder={request.getfixturevalue('tiny_bi_encoder')}", "device=cpu",
               f"retrieve.top_k={top_k}", "retrieve.precision=fp32"]
        if cross_encoder:
            out += [f"model.cross_encoder={request.getfixturevalue('tiny_cross_encoder')}", "score.precision=fp32"]
        return out

    return build


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """/work/shared/data (real test collections, read-only); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def fake_wandb(monkeypatch, wandb_env):
    """A stand-in `wandb` module that records what the pipeline sends (no network here; the real package's offline
    run is tests/test_tracking.py's last test): `.runs` holds every run `init` made, each with its init arguments,
    `.logged` calls, summary and finish count. The WANDB_* variables are wandb_env's."""
    import sys
    import types

    module = types.ModuleType("wandb")

    class Run:
        def __init__(self, **kwargs):
            self.kwargs, self.name, self.logged, self.summary, self.finished = kwargs, kwargs.get("name"), [], {}, 0

        def log(self, data, step=None):
            self.logged.append(dict(data))

        def finish(self):
            self.finished += 1
            module.run = None

    def init(**kwargs):
        module.run = Run(**kwargs)
        module.runs.append(module.run)
        return module.run

    module.run, module.runs, module.init = None, [], init
    module.Image = lambda path: ("image", str(path))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


@pytest.fixture
def offline_wandb_log():
    """``read(folder, *keys)``: the bytes of the one offline run log under ``folder`` once it holds every key (wandb's
    service process writes it after ``finish`` returns: CI once read the 7-byte header alone), or after 60 s."""
    import time

    def read(folder: Path, *keys: bytes) -> bytes:
        deadline = time.monotonic() + 60
        while True:
            logs = list(folder.rglob("offline-run-*/run-*.wandb"))
            assert len(logs) <= 1, logs
            sent = logs[0].read_bytes() if logs else b""
            if all(k in sent for k in keys) or time.monotonic() > deadline:
                return sent
            time.sleep(0.2)

    return read


@pytest.fixture
def wandb_env(monkeypatch):
    """The WANDB_* variables tracking exports for the trainers, unset for the test and put back after it."""
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_LOG_MODEL", "WANDB_ENTITY", "WANDB_API_KEY"):
        monkeypatch.setenv(name, "")  # recorded, so that what the test (or the code) sets is undone after it
        monkeypatch.delenv(name)
