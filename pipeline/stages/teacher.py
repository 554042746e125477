"""`stage=teacher`: train the cross-encoder that filters the mined negatives (RocketQA-style), for data sets or
models without a published cross-encoder.

CrossEncoder(model.teacher_base, num_labels=1) (a bi-encoder folder gets a fresh classification head) is
fine-tuned with binary cross-entropy on the training qrels (positives, label 1) and negatives sampled from the
v2 bi-encoder's own candidates (retrieve stage), judged positives excluded, label 0. The score stage then uses
`<this folder>/model` whenever model.cross_encoder is null. Chain: retrieve -> teacher -> score -> mine -> train.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline import validate
from pipeline.artifacts import StageError, atomic_path, atomic_write_json, claim_weights, open_stage
from pipeline.config import plain
from pipeline.models import commit_note, hub_id, load_cross_encoder, model_identity, resolve_device
from pipeline.stages import common
from pipeline.stages.retrieve import train_data_identity

log = logging.getLogger(__name__)


def needed(cfg: DictConfig) -> bool:
    """The chain trains a teacher when no cross-encoder is given, or when asked to."""
    return cfg.model.cross_encoder is None or bool(cfg.teacher.enabled)


def identity(cfg: DictConfig) -> dict[str, Any]:
    return {
        # `enabled` decides whether the chain trains a teacher and which model judges, not this one's weights
        "teacher": {k: v for k, v in plain(cfg.teacher).items()
                    if k not in common.UNKEYED_TRAINING_SETTINGS and k != "enabled"},
        "seed": int(cfg.seed),
        "data": train_data_identity(cfg),  # the eval sets change no weight: editing them must not retrain
        "base": model_identity(str(cfg.model.teacher_base)),
        "retrieve": common.stage_dir(cfg, "retrieve").name,
    }


def label(cfg: DictConfig) -> str:
    return f"{cfg.data.name}-{cfg.model.cross_encoder_name}"


def model_dir(cfg: DictConfig) -> Path:
    return common.completed(cfg, "teacher") / "model"


def sample_negatives(candidates: Mapping[str, Sequence[tuple[int, str]]], positives: Mapping[str, set[str]],
                     k: int, rank_min: int, rank_max: int, seed: int) -> dict[str, list[str]]:
    """Up to k negatives per query, drawn (seeded per query) from its candidates ranked rank_min..rank_max,
    never a judged positive."""
    if rank_min < 1 or rank_max < rank_min:
        raise ValueError(f"teacher.neg_rank_min/neg_rank_max must satisfy 1 <= min <= max, got {rank_min}..{rank_max}")
    out: dict[str, list[str]] = {}
    for qid, ranked in candidates.items():
        pos = positives.get(qid, set())
        window = [pid for rank, pid in sorted(ranked) if rank_min <= rank <= rank_max and pid not in pos]
        if len(window) > k:
            window = random.Random(f"{seed}:{qid}").sample(window, k)
        out[qid] = window
    return out


def read_candidates(path: Path) -> dict[str, list[tuple[int, str]]]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise StageError(f"{path} is missing: the retrieve stage writes candidates.parquet; rerun stage=retrieve")
    cols = pq.read_table(path, columns=["qid", "pid", "rank"]).to_pydict()
    out: dict[str, list[tuple[int, str]]] = {}
    for q, p, r in zip(cols["qid"], cols["pid"], cols["rank"]):
        out.setdefault(str(q), []).append((int(r), str(p)))
    return out


def pairs_dataset(queries: Mapping[str, str], positives: Mapping[str, Sequence[str]],
                  negatives: Mapping[str, Sequence[str]], corpus):
    """(query, passage, label) rows: every positive (1.0) and the sampled negatives (0.0), query by query."""
    from datasets import Dataset

    qs, ps, labels = [], [], []
    for qid in queries:
        for pid in positives.get(qid, []):
            qs.append(qid), ps.append(pid), labels.append(1.0)
        for pid in negatives.get(qid, []):
            qs.append(qid), ps.append(pid), labels.append(0.0)
    if not qs:
        raise StageError("the teacher has no training pairs: no training query has a positive in the corpus")
    texts = corpus.texts(ps)
    return Dataset.from_dict({"query": [queries[q] for q in qs], "passage": texts, "label": labels})


@validate.checked
def run(cfg: DictConfig) -> Path:
    from pipeline import signals, tracking
    from pipeline.stages.train import last_checkpoint, resolve_precision

    tc = cfg.teacher
    with open_stage("teacher", identity(cfg), root=common.artifacts_root(cfg), label=label(cfg), config=plain(cfg),
                    force=cfg.force, resumable=True, lock_wait_s=cfg.lock_wait_s) as st:
        if st.done:
            return st.path
        retrieve_dir = common.completed(cfg, "retrieve")
        with st.timed("data"):
            corpus = common.load_corpus(cfg)
            queries, positives, _ = common.training_set(cfg, corpus)
            candidates = read_candidates(retrieve_dir / "candidates.parquet")
            negatives = sample_negatives({q: candidates.get(q, []) for q in queries},
                                         {q: set(p) for q, p in positives.items()}, int(tc.negatives_per_query),
                                         int(tc.neg_rank_min), int(tc.neg_rank_max), int(cfg.seed))
            if tc.positives_per_query:
                k = int(tc.positives_per_query)
                positives = {q: (random.Random(f"{cfg.seed}:pos:{q}").sample(ps, k) if len(ps) > k else ps)
                             for q, ps in positives.items()}
            dataset = pairs_dataset(queries, positives, negatives, corpus)
        n_pos = int(sum(dataset["label"]))
        st.counts.update({"queries": len(queries), "pairs": len(dataset), "positives": n_pos,
                          "negatives": len(dataset) - n_pos})
        log.info("teacher: %d queries, %d positive and %d negative pairs (negatives from retrieve ranks %d-%d)",
                 len(queries), n_pos, len(dataset) - n_pos, tc.neg_rank_min, tc.neg_rank_max)

        device = resolve_device(str(cfg.device))
        precision = resolve_precision(str(tc.precision), device)
        with st.timed("load_model"):
            import torch

            # A base without a classification head (a bi-encoder body, as in experiment=beir_minilm) gets a fresh
            # one here: seeded, or it would depend on how much of the RNG earlier stages of this process used
            # (stage=all vs stage=teacher gave different teachers, and different v3 results downstream).
            torch.manual_seed(int(cfg.seed))
            model = load_cross_encoder(str(cfg.model.teacher_base), device=device,
                                       artifacts_root=str(common.artifacts_root(cfg)), max_length=int(tc.max_length))
            claim_weights(st.path, str(cfg.model.teacher_base))  # checkpoints of other weights are not resumed
        if model.num_labels != 1:
            raise StageError(f"teacher base {cfg.model.teacher_base} has a {model.num_labels}-label head; the teacher "
                             f"needs one logit per pair: use a bi-encoder or an encoder checkpoint without a head")

        from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
        from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

        steps = -(-len(dataset) // int(tc.batch_size)) * int(tc.epochs)
        import torch

        pos_weight = torch.tensor(float(tc.pos_weight)) if tc.pos_weight is not None else None
        ckpt_dir = st.path / "checkpoints"
        args = CrossEncoderTrainingArguments(
            output_dir=str(ckpt_dir), num_train_epochs=int(tc.epochs), per_device_train_batch_size=int(tc.batch_size),
            learning_rate=float(tc.lr), warmup_steps=int(round(float(tc.warmup_ratio) * steps)),
            weight_decay=float(tc.weight_decay), bf16=precision == "bf16", fp16=precision == "fp16",
            use_cpu=not device.startswith("cuda"), save_strategy="steps", save_steps=max(1, int(tc.save_steps)),
            save_total_limit=1, logging_steps=max(1, int(tc.logging_steps)), logging_first_step=True,
            seed=int(cfg.seed), data_seed=int(cfg.seed), report_to=tracking.report_to(cfg), eval_strategy="no",
            dataloader_pin_memory=device.startswith("cuda"),
            # A fresh classification head learns nothing in a few dozen steps at a body's learning rate, and on a
            # bi-encoder body the [CLS] pooler was never trained either (all-MiniLM-L6-v2: weights of std 0.009,
            # which damp every gradient reaching the body): both take head_lr.
            learning_rate_mapping={r"(^|\.)(classifier|pooler)\.": float(tc.head_lr)} if tc.head_lr else {})
        with tracking.track(cfg, "teacher") as tracker:
            trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset,
                                          loss=BinaryCrossEntropyLoss(model, pos_weight=pos_weight))
            # Slurm's time-limit warning or a preemption: checkpoint at the end of the step and stop, as train does
            # (without it a requeued teacher lost every step since its last save_steps checkpoint)
            trainer.add_callback(signals.stop_callback())
            resume = last_checkpoint(ckpt_dir)
            if resume is not None:
                log.info("teacher: resuming from %s", resume.name)
            with st.timed("train"):
                started = time.perf_counter()
                with signals.training():
                    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
                seconds = time.perf_counter() - started
            signals.raise_if_training_stopped("teacher")
            history = [h for h in trainer.state.log_history if "loss" in h]
            summary = {"steps": int(trainer.state.global_step), "train_loss": round(float(output.training_loss), 5),
                       "loss_first": history[0]["loss"] if history else None,
                       "loss_last": history[-1]["loss"] if history else None,
                       "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history],
                       "seconds": round(seconds, 2), "precision": precision,
                       "resumed_from": resume.name if resume else None}
            with st.timed("check"):
                summary["train_pair_accuracy"] = _pair_accuracy(trainer.model, dataset)
            out = st.path / "model"
            with st.timed("save"), atomic_path(out) as tmp:
                trainer.model.save(str(tmp), create_model_card=False, safe_serialization=True)
                (tmp / "README.md").write_text(model_card(cfg, summary, st.counts), encoding="utf-8")
            atomic_write_json(st.path / "metrics.json", summary)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            st.counts["steps"] = summary["steps"]
            st.extra["resumed_from"] = summary["resumed_from"]
            log.info("teacher: %d steps, loss %s -> %s, positives above negatives on %.1f%% of training pairs",
                     summary["steps"], summary["loss_first"], summary["loss_last"],
                     100 * summary["train_pair_accuracy"])
            tracker.summary({"teacher": {k: v for k, v in summary.items() if k != "loss_curve"}})
    return st.path


def model_card(cfg: DictConfig, summary: dict[str, Any], counts: dict[str, Any]) -> str:
    """README.md of the teacher: what it was trained from and on, and how its scores read."""
    tc, spec = cfg.teacher, str(cfg.model.teacher_base)
    pos_weight = "none" if tc.pos_weight is None else tc.pos_weight
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: text-ranking",
        *([f"base_model: {hub_id(spec)}"] if hub_id(spec) else []),
        "tags: [sentence-transformers, cross-encoder, reranker, msmarco-v3-recipe]",
        "---",
        "",
        f"# {label(cfg)}",
        "",
        f"A cross-encoder fine-tuned from `{spec}`{commit_note(spec)} by the pipeline's teacher stage, to judge the "
        "passages the bi-encoder retrieved (the score stage) where no trained cross-encoder was configured. It is a "
        "judge for mining hard negatives on this data, not a general reranker.",
        "",
        "## Data",
        "",
        f"- data set: `{cfg.data.name}`; training queries `{cfg.data.train.queries}`, positives from "
        f"`{cfg.data.train.qrels}` (grade >= {cfg.data.train.min_grade}"
        + (f", at most {tc.positives_per_query} per query" if tc.positives_per_query else "") + ")",
        f"- negatives: up to {tc.negatives_per_query} per query, drawn from the bi-encoder's candidates ranked "
        f"{tc.neg_rank_min}-{tc.neg_rank_max}, never a judged positive",
        f"- pairs: {counts.get('pairs')} ({counts.get('positives')} positive, {counts.get('negatives')} negative) "
        f"from {counts.get('queries')} queries",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| loss | BinaryCrossEntropyLoss (pos_weight {pos_weight}) |",
        f"| epochs | {tc.epochs} |",
        f"| batch size | {tc.batch_size} |",
        f"| learning rate | {tc.lr} (classification head and pooler: {tc.head_lr or tc.lr}); warm-up ratio "
        f"{tc.warmup_ratio} |",
        f"| max_length | {tc.max_length} |",
        f"| precision | {summary['precision']} |",
        f"| steps | {summary['steps']} |",
        f"| loss | {summary['loss_first']} (first log) -> {summary['loss_last']} (last log) |",
        f"| positives above negatives (training pairs, a sanity figure) | {summary['train_pair_accuracy']} |",
        f"| seed | {cfg.seed} |",
        "",
        "## Use",
        "",
        "```python",
        "from sentence_transformers import CrossEncoder",
        "",
        "model = CrossEncoder(\"path/to/this/folder\")",
        "scores = model.predict([(\"a query\", \"a passage\")])  # probabilities (sigmoid of the logit)",
        "```",
        "",
        "The score stage stores the raw logit (`scores.parquet`, `ce_score`); mining compares probabilities or "
        "logits as `mine.ce_max_score_scale` says.",
        "",
    ]
    return "\n".join(lines)


def _pair_accuracy(model, dataset, max_queries: int = 50) -> float:
    """How often a positive outscores a negative of the same query (on training pairs: a sanity figure that the
    head learnt something, not a measure of generalisation)."""
    import numpy as np

    rows = dataset.to_dict()
    by_q: dict[str, list[int]] = {}
    for i, q in enumerate(rows["query"]):
        by_q.setdefault(q, []).append(i)
    chosen = [i for q in list(by_q)[:max_queries] for i in by_q[q]]
    if not chosen:
        return float("nan")
    from pipeline.engine import score_pairs

    model.eval()
    scores = np.asarray(score_pairs(model, [(rows["query"][i], rows["passage"][i]) for i in chosen],
                                    show_progress=False, desc="teacher check"))
    score = dict(zip(chosen, scores.tolist()))
    wins = total = 0
    for q in list(by_q)[:max_queries]:
        pos = [score[i] for i in by_q[q] if rows["label"][i] == 1.0]
        neg = [score[i] for i in by_q[q] if rows["label"][i] == 0.0]
        for p in pos:
            for n in neg:
                wins += p > n
                total += 1
    return round(wins / total, 4) if total else float("nan")
