"""The teacher stage: negatives drawn from the retrieve stage's candidates (never a judged positive), a
cross-encoder fine-tuned with BCE and saved where the score stage looks for it."""

from __future__ import annotations

import json

import pytest

from pipeline.artifacts import open_stage
from pipeline.config import compose
from pipeline.stages import common, teacher


def test_sample_negatives_respects_the_rank_window_and_positives():
    cands = {"q1": [(r, f"p{r}") for r in range(1, 21)], "q2": [(1, "a"), (2, "b")]}
    negs = teacher.sample_negatives(cands, {"q1": {"p3", "p5"}}, k=4, rank_min=2, rank_max=10, seed=0)
    assert len(negs["q1"]) == 4 and len(set(negs["q1"])) == 4
    assert all(p in {f"p{r}" for r in range(2, 11)} - {"p3", "p5"} for p in negs["q1"])
    assert negs["q2"] == ["b"]
    assert negs == teacher.sample_negatives(cands, {"q1": {"p3", "p5"}}, 4, 2, 10, seed=0)
    with pytest.raises(ValueError, match="neg_rank_min"):
        teacher.sample_negatives(cands, {}, 4, 0, 10, seed=0)


def test_teacher_needed_only_without_a_cross_encoder(tmp_path):
    assert teacher.needed(compose(["model=demo", f"artifacts_root={tmp_path}"]))
    assert not teacher.needed(compose(["model.cross_encoder=some/ce", f"artifacts_root={tmp_path}"]))
    asked = compose(["model.cross_encoder=some/ce", "teacher.enabled=true", f"artifacts_root={tmp_path}"])
    assert teacher.needed(asked)
    # a teacher asked for is the one that judges (it was trained and then ignored), in every mining round
    from pipeline.stages import all as chain, score

    assert score._cross_encoder_identity(asked) == {"teacher": common.stage_dir(asked, "teacher").name,
                                                     "complete": False}
    assert score._cross_encoder_identity(compose(["model.cross_encoder=some/ce", f"artifacts_root={tmp_path}"])) != \
        score._cross_encoder_identity(asked)
    round2 = chain.iteration_config(asked, 2, "round1/model", "teacher/model")
    assert score.given_cross_encoder(round2) == "teacher/model"


def test_teacher_trains_a_cross_encoder_the_score_stage_finds(tmp_path, tiny_bi_encoder, tiny_cross_encoder):
    from sentence_transformers import CrossEncoder

    from pipeline.stages import common, score

    cfg = compose(["experiment=demo", f"artifacts_root={tmp_path}", f"model.bi_encoder={tiny_bi_encoder}",
                   f"model.teacher_base={tiny_cross_encoder}", "data.train.max_queries=40", "teacher.epochs=1",
                   "teacher.negatives_per_query=3", "teacher.neg_rank_max=6", "teacher.batch_size=16"])
    corpus = common.load_corpus(cfg)
    queries, positives, _ = common.training_set(cfg, corpus)
    _write_candidates(cfg, tmp_path)

    out = teacher.run(cfg)
    assert out == common.completed(cfg, "teacher")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["queries"] == 40
    assert manifest["counts"]["negatives"] == 40 * 3
    assert manifest["counts"]["positives"] == sum(len(p) for p in positives.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] > 0 and metrics["loss_first"] is not None
    assert not (out / "checkpoints").exists()
    model = CrossEncoder(str(out / "model"), device="cpu")
    assert model.num_labels == 1
    assert (out / "model" / "model.safetensors").is_file()
    assert score.cross_encoder_spec(cfg) == str(out / "model")
    assert teacher.run(cfg) == out  # complete: skipped



def _write_candidates(cfg, root):
    """The retrieve stage's artifact for this config, written by hand: a positive among every query's candidates."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.stages import common, retrieve

    corpus = common.load_corpus(cfg)
    queries, positives, _ = common.training_set(cfg, corpus)
    pids = corpus.id_at(list(range(10)))
    with open_stage("retrieve", retrieve.identity(cfg), root=root, label=retrieve.label(cfg)) as st:
        rows = [(q, p, r) for q in queries for r, p in enumerate([positives[q][0]] + pids[:9], 1)]
        pq.write_table(pa.table({"qid": [r[0] for r in rows], "pid": [r[1] for r in rows],
                                 "rank": pa.array([r[2] for r in rows], pa.int32()),
                                 "bi_score": pa.array([0.0] * len(rows), pa.float32())}),
                       st.path / "candidates.parquet")


def test_a_fresh_head_is_seeded_whatever_ran_before(tmp_path, tiny_bi_encoder):
    """A bi-encoder body as the teacher base gets a new classification head: the same config must give the same
    teacher whether or not earlier work in the process consumed the random generator (stage=all vs stage=teacher)."""
    import torch
    from safetensors.torch import load_file

    overrides = ["experiment=demo", f"artifacts_root={tmp_path}", f"model.bi_encoder={tiny_bi_encoder}",
                 f"model.teacher_base={tiny_bi_encoder}", "data.train.max_queries=16", "teacher.epochs=1",
                 "teacher.negatives_per_query=2", "teacher.batch_size=8"]
    _write_candidates(compose(overrides), tmp_path)
    weights = []
    for draws, force in ((0, "false"), (1000, "true")):
        torch.rand(draws)  # what a retrieve stage before it in the same process might have used
        out = teacher.run(compose([*overrides, f"force={force}"]))
        weights.append(load_file(str(out / "model" / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


# ------------------------------------------------------------------------------------------------ mutation review


def test_the_last_rank_of_the_window_is_eligible():
    # neg_rank_max is inclusive: with rank_min == rank_max the window is that one candidate
    cands = {"q1": [(r, f"p{r}") for r in range(1, 11)]}
    assert teacher.sample_negatives(cands, {}, k=5, rank_min=4, rank_max=6, seed=0)["q1"] == ["p4", "p5", "p6"]
    assert teacher.sample_negatives(cands, {}, k=5, rank_min=10, rank_max=10, seed=0)["q1"] == ["p10"]


class _Stop(Exception):
    pass


class _Corpus:
    def texts(self, pids):
        return [f"passage {p}" for p in pids]


def _stub_teacher_inputs(monkeypatch, tmp_path, queries, positives):
    """teacher.run's inputs stubbed: no retrieve stage, corpus or qrels files are read."""
    monkeypatch.setattr(common, "completed", lambda cfg, stage: tmp_path)
    monkeypatch.setattr(common, "load_corpus", lambda cfg: _Corpus())
    monkeypatch.setattr(common, "training_set", lambda cfg, corpus: (queries, positives, None))
    monkeypatch.setattr(teacher, "read_candidates",
                        lambda path: {q: [(r, f"c{r}") for r in range(1, 6)] for q in queries})


def test_positives_per_query_is_a_seeded_sample_per_query(monkeypatch, tmp_path):
    # a cap that took the first k (qrels file order) or one shared draw would bias which positives teach the head
    queries = {f"q{i}": f"query {i}" for i in range(6)}
    pool = [f"p{j}" for j in range(8)]
    _stub_teacher_inputs(monkeypatch, tmp_path, queries, {q: list(pool) for q in queries})
    seen = []

    def capture(queries, positives, negatives, corpus):
        seen.append(positives)
        raise _Stop

    monkeypatch.setattr(teacher, "pairs_dataset", capture)
    for _ in range(2):
        with pytest.raises(_Stop):
            teacher.run(compose(["experiment=demo", f"artifacts_root={tmp_path}", "teacher.positives_per_query=2"]))
    chosen = seen[0]
    assert all(len(ps) == 2 and set(ps) <= set(pool) and len(set(ps)) == 2 for ps in chosen.values())
    assert any(ps != pool[:2] for ps in chosen.values())          # not simply the first k
    assert len({tuple(ps) for ps in chosen.values()}) > 1          # one draw per query
    assert seen[1] == chosen                                       # seeded: a rerun samples the same


def test_pos_weight_and_head_lr_reach_the_loss_and_the_trainer(monkeypatch, tmp_path, tiny_cross_encoder):
    # pos_weight rebalances BCE; head_lr lets a fresh head (and untrained pooler) learn in a short run
    import sentence_transformers.cross_encoder as ce
    import sentence_transformers.cross_encoder.losses as ce_losses

    queries = {f"q{i}": f"query {i}" for i in range(3)}
    _stub_teacher_inputs(monkeypatch, tmp_path, queries, {q: [f"p{q}"] for q in queries})
    got = {}

    def loss(model, **kwargs):
        got["loss"] = kwargs
        return None

    def trainer(*, args, **kwargs):
        got["args"] = args
        raise _Stop

    monkeypatch.setattr(ce_losses, "BinaryCrossEntropyLoss", loss)
    monkeypatch.setattr(ce, "CrossEncoderTrainer", trainer)
    with pytest.raises(_Stop):
        teacher.run(compose(["experiment=demo", f"artifacts_root={tmp_path}", "device=cpu", "teacher.precision=fp32",
                             f"model.teacher_base={tiny_cross_encoder}", "teacher.pos_weight=3.5",
                             "teacher.head_lr=0.01"]))
    assert float(got["loss"]["pos_weight"]) == 3.5
    import re

    mapping = got["args"].learning_rate_mapping
    assert list(mapping.values()) == [0.01]
    pattern = next(iter(mapping))
    assert re.search(pattern, "classifier.weight") and re.search(pattern, "bert.pooler.dense.weight")
    assert not re.search(pattern, "bert.encoder.layer.0.attention.self.query.weight")


def test_a_signal_stops_the_teacher_at_a_checkpoint_and_the_rerun_resumes(tmp_path, tiny_cross_encoder,
                                                                          tiny_bi_encoder):
    """Slurm's time-limit warning (SIGUSR2) or a preemption mid-teacher: a checkpoint at the end of the step, nothing
    marked complete, and the rerun resumes from that step (before, the teacher trained on to its next save_steps
    checkpoint or lost the steps since the last one). The handler standing in for submitit's lets the process live,
    as submitit's does for SIGTERM."""
    import signal

    from pipeline import signals
    from pipeline.artifacts import StageError, is_complete

    cfg = compose(["experiment=demo", f"artifacts_root={tmp_path}", f"model.bi_encoder={tiny_bi_encoder}",
                   f"model.teacher_base={tiny_cross_encoder}", "data.train.max_queries=24", "teacher.epochs=1",
                   "teacher.negatives_per_query=3", "teacher.batch_size=8", "teacher.save_steps=1000"])
    _write_candidates(cfg, tmp_path)
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        signals.request(signal.SIGUSR2)  # arrived while the first step ran
        with pytest.raises(StageError, match=r"teacher: stopped by a signal at step 1 \(checkpoint saved\)"):
            teacher.run(cfg)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [signal.SIGUSR2]  # handed on to the scheduler's handler once the checkpoint was on disk
    folder = next((tmp_path / "teacher").iterdir())
    assert not is_complete(folder) and (folder / "checkpoints" / "checkpoint-1").is_dir()
    out = teacher.run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert is_complete(out) and metrics["resumed_from"] == "checkpoint-1" and metrics["steps"] == 13
    assert signals.requested() is None
