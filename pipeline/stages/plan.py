"""`stage=plan`: what a run will do and cost, from the config and file sizes alone (no model is loaded).

Counts come from `data.sizes` when the config knows them (MS MARCO) or from the files when they exist;
throughput figures come from `conf/plan` (measured by scripts/bench_gpu.py, stated there)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.artifacts import atomic_write_json
from pipeline.stages.common import artifacts_root


def identity(cfg: DictConfig) -> dict:
    return {"plan": True}


def label(cfg: DictConfig) -> str:
    return "plan"


def _count_lines(path: str | None) -> int | None:
    if not path or str(path).startswith(("hf:", "irds:")):
        return None
    p = Path(str(path))
    if p.is_dir():
        p = next((p / n for n in ("corpus.jsonl", "corpus.jsonl.gz") if (p / n).exists()), p)
    if not p.is_file():
        return None
    opener = gzip.open if p.read_bytes()[:2] == b"\x1f\x8b" else open
    with opener(p, "rb") as fh:
        return sum(1 for _ in fh)


def _count_judged_queries(path: str | None, min_grade: int) -> int | None:
    if not path or not Path(str(path)).is_file():
        return None
    from pipeline.readers import positives, read_qrels

    return len(positives(read_qrels(str(path)), min_grade))


def _hours(work: float, rate: float) -> float:
    return work / rate / 3600 if rate else float("nan")


def estimate(cfg: DictConfig) -> dict[str, Any]:
    sizes = dict(cfg.data.get("sizes") or {})
    p = cfg.plan
    corpus = sizes.get("corpus") or _count_lines(cfg.data.corpus)
    train_q = sizes.get("train_queries") or _count_judged_queries(cfg.data.train.qrels, int(cfg.data.train.min_grade))
    if cfg.data.train.max_queries and train_q:
        train_q = min(train_q, int(cfg.data.train.max_queries))
    eval_q = {}
    for name, ev in cfg.data.evals.items():
        eval_q[name] = {"kind": str(ev.kind), "queries": _count_judged_queries(ev.qrels, 1)}
    unknown = [n for n, v in (("corpus passages", corpus), ("training queries", train_q)) if v is None]
    corpus, train_q = corpus or 0, train_q or 0
    top_k = int(cfg.retrieve.top_k)
    pairs = train_q * (top_k + 1)  # candidates plus about one positive per query
    retrieval_evals = sum(1 for v in eval_q.values() if v["kind"] == "retrieval")
    systems = 2  # v2 and v3
    encode = {"retrieve": corpus, "evaluate": corpus * systems * min(retrieval_evals, 1)}
    batch = int(cfg.train.batch_size)
    epochs = float(p.epochs)
    triplets = int(train_q * epochs)
    dim = int(p.embedding_dim)
    disk = {
        "corpus_arrow_gb": corpus * 350 / 1e9,  # ~350 bytes of text per MS MARCO passage
        "corpus_embeddings_gb_per_model": corpus * dim * 2 / 1e9,
        "candidates_gb": train_q * top_k * 24 / 1e9,
        "scores_gb": pairs * 24 / 1e9,
        "model_checkpoints_gb": 3 * 0.5,
    }
    host_ram = {
        "retrieve_gb": max(2.0, 2 * min(corpus, 262144) * dim * 4 / 1e9 + 1.5),  # model + one search chunk
        "score_gb": 3.0,
        "mine_gb": pairs * 40 / 1e9 + 1.0,  # columns of the scored table, vectorised
        "train_gb": 4.0,
    }
    rates = {}
    for which in ("pipeline", "baseline"):
        r = p[which]
        enc_rate = r.encode_passages / float(p.bi_encoder_cost_factor)
        score_rate = r.score_pairs / float(p.cross_encoder_cost_factor)
        hours = {
            "encode": _hours(sum(encode.values()), enc_rate),
            "search": _hours(train_q + sum(v["queries"] or 0 for v in eval_q.values()), r.search_queries),
            "score": _hours(pairs, score_rate),
            "train": _hours(triplets, r.train_triplets / float(p.bi_encoder_cost_factor)),
        }
        hours["total"] = sum(hours.values())
        rates[which] = hours
    return {
        "experiment": {"data": cfg.data.name, "model": cfg.model.name},
        "work": {"corpus_passages": corpus, "training_queries": train_q, "eval_queries": eval_q,
                 "passages_encoded": encode, "queries_searched_top_k": top_k, "pairs_scored": pairs,
                 "training_triplets": triplets, "training_steps": -(-triplets // batch) if batch else 0},
        "disk_gb": {k: round(v, 2) for k, v in disk.items()},
        "peak_host_ram_gb": {k: round(v, 1) for k, v in host_ram.items()},
        "gpu_hours": {w: {k: round(v, 3) for k, v in h.items()} for w, h in rates.items()},
        "throughput_source": str(p.throughput_source),
        "unknown": unknown,
    }


def format_plan(plan: dict[str, Any]) -> str:
    w = plan["work"]
    lines = [f"plan for data={plan['experiment']['data']} model={plan['experiment']['model']}",
             f"  corpus passages        {w['corpus_passages']:>14,}",
             f"  training queries       {w['training_queries']:>14,}"]
    for name, ev in w["eval_queries"].items():
        lines.append(f"  eval {name:<17} {ev['queries'] if ev['queries'] is not None else '?':>14} queries ({ev['kind']})")
    lines += [f"  passages to encode     {sum(w['passages_encoded'].values()):>14,}  {w['passages_encoded']}",
              f"  pairs to score         {w['pairs_scored']:>14,}",
              f"  training triplets      {w['training_triplets']:>14,}  ({w['training_steps']:,} steps)",
              "  disk (GB)              " + ", ".join(f"{k} {v}" for k, v in plan["disk_gb"].items()),
              "  peak host RAM (GB)     " + ", ".join(f"{k} {v}" for k, v in plan["peak_host_ram_gb"].items())]
    for which, hours in plan["gpu_hours"].items():
        lines.append(f"  GPU hours ({which:<8})   " + ", ".join(f"{k} {v:.2f}" for k, v in hours.items()))
    lines.append(f"  throughput figures: {plan['throughput_source']}")
    if plan["unknown"]:
        lines.append(f"  unknown (files absent, no data.sizes): {', '.join(plan['unknown'])}")
    return "\n".join(lines)


def run(cfg: DictConfig) -> Path:
    plan = estimate(cfg)
    print(format_plan(plan))
    out = artifacts_root(cfg) / "plans" / f"{cfg.data.name}-{cfg.model.name}.json"
    atomic_write_json(out, plan)
    print(f"  written to {out}")
    return out
