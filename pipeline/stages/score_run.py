"""`stage=score_run`: a small trec_eval.

    python -m pipeline stage=score_run run_file=run.trec qrels_file=qrels.txt \\
        'score_run.measures=[nDCG@10,RR@10,R@1000]' score_run.relevance_level=2 [score_run.output=out.json]

prints ``num_q`` and one line per measure (``nDCG@10  all  0.4796``), like ``trec_eval -m ...``; the numbers come
from pipeline.metrics (trec_eval's own code through ir-measures, same tie and missing-query conventions).
It writes no artifact folder: scoring a file is a look, not a pipeline step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline import metrics, validate
from pipeline.artifacts import StageError, atomic_write_json
from pipeline.readers import DataError, read_qrels, read_run

log = logging.getLogger(__name__)


def _required(cfg: DictConfig, key: str) -> str:
    value = cfg.get(key)
    if not value:
        raise StageError(f"stage=score_run needs {key}=<path>")
    return str(value)


def score(run_file: str, qrels_file: str, measures: list[str], *, missing: str = "skip") -> dict[str, Any]:
    """{"measures": {name: value}, "per_query": {name: {qid: value}}, "coverage": {...}} of one run file."""
    names = list(measures)
    metrics.parse_measures(names)  # a typo in a measure fails before reading large files
    qrels = read_qrels(qrels_file)
    run = read_run(run_file)
    return {"run_file": str(run_file), "qrels_file": str(qrels_file),
            "measures": metrics.evaluate_run(qrels, run, names, missing=missing),
            "per_query": metrics.per_query(qrels, run, names),
            "coverage": metrics.coverage(qrels, run), "missing": missing}


def report(result: dict[str, Any], per_query: bool = False) -> str:
    cov = result["coverage"]
    num_q = cov["evaluated_queries"] + (cov["judged_missing_from_run"] if result["missing"] == "zero" else 0)
    lines = []
    if per_query:
        width = max(len(n) for n in result["per_query"])
        for name, values in result["per_query"].items():
            lines += [f"{name:<{width}}  {qid}  {v:.4f}" for qid, v in sorted(values.items())]
    lines.append(metrics.format_trec(result["measures"], num_q=num_q))
    return "\n".join(lines)


@validate.checked
def run(cfg: DictConfig) -> Path:
    sc = cfg.score_run
    measures = list(sc.measures)
    if sc.relevance_level is not None:  # TREC-DL's RR, AP and recall count grade >= 2 (trec_eval -l 2)
        try:
            measures = metrics.with_relevance_level(measures, int(sc.relevance_level))
        except ValueError as exc:
            raise StageError(f"score_run.relevance_level: {exc}") from None
    try:
        result = score(_required(cfg, "run_file"), _required(cfg, "qrels_file"), measures, missing=str(sc.missing))
    except DataError:
        raise
    except ValueError as exc:  # the run and the qrels share no query, an empty file: what the user gave, one line
        raise StageError(f"score_run: {exc}") from None
    print(report(result, per_query=bool(sc.per_query)), flush=True)
    if sc.output:
        out = Path(str(sc.output)).expanduser()
        atomic_write_json(out, result)
        log.info("wrote %s", out)
        return out
    return Path(str(cfg.run_file))
