"""Retrieval metrics through ir-measures, computed the way trec_eval computes them.

Measures are ir-measures strings: ``nDCG@10``, ``RR@10``, ``RR(rel=2)@10``, ``R@100``, ``R(rel=2)@1000``,
``AP(rel=2)``, ``P@10`` ... No metric formula is written here; every number comes from trec_eval's own code
(the pytrec_eval provider of ir-measures), so results match the official TREC tools to the last digit.

Conventions (those of trec_eval, and therefore of BEIR and MTEB, which also call pytrec_eval):

- Ranking: documents are ordered by score descending, ties by document id descending (trec_eval's
  ``comp_sim_docno``); the rank column of a run file is ignored.
- Relevance: nDCG uses the judged grades as gains (grades <= 0 give nothing); binary measures count
  ``grade >= rel`` as relevant (``rel=1`` unless the measure says ``rel=2``, trec_eval ``-l 2``).
- Queries: only queries present in both the qrels and the run are averaged. A judged query missing from the run
  is left out of the mean by default (trec_eval without ``-c``); ``missing="zero"`` counts it as 0 (``trec_eval
  -c``, what pyserini's reproduction commands, TREC's official tables and ir-measures' own averaging do). For
  runs that rank every judged query, such as the published TREC-DL runs, both give the same numbers.
  Queries in the run without judgements are ignored. A judged query whose judgements are all 0 is averaged
  with nDCG = 0 (it is in the qrels: nothing is excluded).
- ``RR@k``: trec_eval's ``recip_rank`` has no cutoff, and ir-measures would hand ``RR@k`` to its MS MARCO
  provider, which breaks ties by document id *ascending*. Here the run is cut to its first k documents in
  trec_eval order and ``recip_rank`` is taken from pytrec_eval, so ties are treated like every other measure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

MISSING_POLICIES = ("skip", "zero")


def parse_measures(names: Iterable[str]) -> dict[str, Any]:
    """{name as written: ir-measures Measure}; a name ir-measures cannot read is a ValueError naming it."""
    import ir_measures

    out: dict[str, Any] = {}
    for name in names:
        name = str(name).strip()
        try:
            out[name] = ir_measures.parse_measure(name)
        except (ValueError, NameError, SyntaxError, TypeError) as exc:
            raise ValueError(f"unknown measure {name!r} ({exc}); use ir-measures names such as nDCG@10, "
                             f"RR(rel=2)@10, R@1000, AP(rel=2)") from None
    if not out:
        raise ValueError("no measures given")
    return out


#: trec_eval's measures that count a judged document as relevant or not (what its ``-l`` sets)
BINARY_MEASURES = frozenset({"P", "R", "RR", "AP", "Rprec", "Bpref", "SetP", "SetR", "SetF", "SetAP", "infAP", "IPrec",
                             "Success"})


def with_relevance_level(names: Iterable[str], level: int) -> list[str]:
    """The names with ``rel=level`` added to each binary measure that sets no level of its own (what trec_eval's
    ``-l`` does: TREC-DL's RR, AP and recall count grade >= 2); graded measures such as nDCG, and NumRet (every
    retrieved document), are left as they are; NumRelRet counts at the level. NumRel has no level in ir-measures:
    refused rather than counted at grade 1 beside measures at another."""
    out = []
    for name, measure in parse_measures(names).items():
        if name == "NumRelRet":
            out.append(str(measure(rel=int(level))))
        elif measure.NAME == "NumRel":
            raise ValueError(f"{name}: ir-measures counts judged-relevant documents at grade >= 1 only; leave it "
                             f"out when a relevance level ({level}) is set")
        elif measure.NAME in BINARY_MEASURES and "rel" not in measure.params:
            out.append(str(measure(rel=int(level))))
        else:
            out.append(name)
    return out


def max_cutoff(names: Iterable[str]) -> int | None:
    """Largest cutoff among the measures (None when none has one): the retrieval depth they need."""
    cutoffs = [int(m.params["cutoff"]) for m in parse_measures(names).values() if m.params.get("cutoff")]
    return max(cutoffs) if cutoffs else None


def trec_order(ranked: Mapping[str, float]) -> list[tuple[str, float]]:
    """(doc, score) in the order trec_eval ranks them: score descending, then doc id descending."""
    return sorted(ranked.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def _check_inputs(qrels: Qrels, run: Run) -> None:
    if not qrels:
        raise ValueError("the qrels are empty: nothing to evaluate against")
    if not run:
        raise ValueError("the run is empty: no query has a ranked document")


def _plan(measures: Mapping[str, Any]) -> list[tuple[int | None, dict[Any, list[str]]]]:
    """Group measures by how the run must be cut before pytrec_eval sees it: (cutoff or None, {measure: names})."""
    import ir_measures

    groups: dict[int | None, dict[Any, list[str]]] = {}
    for name, measure in measures.items():
        cut: int | None = None
        if measure.NAME == "RR" and measure.params.get("cutoff") is not None:
            cut = int(measure["cutoff"])
            params = {k: v for k, v in measure.params.items() if k != "cutoff"}
            measure = ir_measures.measures.RR(**params)
        groups.setdefault(cut, {}).setdefault(measure, []).append(name)
    return sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0])


def _provider_for(measure: Any):
    import ir_measures

    if ir_measures.pytrec_eval.supports(measure):
        return ir_measures.pytrec_eval
    log.info("measure %s is not available from trec_eval; using ir-measures' default provider", measure)
    return ir_measures.DefaultPipeline


def per_query(qrels: Qrels, run: Run, measures: Sequence[str]) -> dict[str, dict[str, float]]:
    """{measure name: {qid: value}} for every query in both the qrels and the run."""
    _check_inputs(qrels, run)
    measures = [str(m).strip() for m in measures]  # the names parse_measures keys its result by
    qrels_plain = {str(q): {str(d): int(g) for d, g in judged.items()} for q, judged in qrels.items()}
    run_plain = {str(q): {str(d): float(s) for d, s in ranked.items()} for q, ranked in run.items() if ranked}
    out: dict[str, dict[str, float]] = {name: {} for name in measures}
    for cut, group in _plan(parse_measures(measures)):
        this_run = run_plain if cut is None else {q: dict(trec_order(r)[:cut]) for q, r in run_plain.items()}
        by_provider: dict[Any, list[Any]] = {}
        for measure in group:
            by_provider.setdefault(_provider_for(measure), []).append(measure)
        for provider, ms in by_provider.items():
            for m in provider.iter_calc(ms, qrels_plain, this_run):
                if str(m.query_id) not in this_run:
                    continue  # ir-measures fills absent queries with 0 (trec_eval -c); `missing` decides that
                for name in group[m.measure]:
                    out[name][str(m.query_id)] = float(m.value)
    return out


def coverage(qrels: Qrels, run: Run) -> dict[str, int]:
    """How many judged queries the run covers: what trec_eval's num_q counts, and what it silently drops."""
    judged = set(qrels)
    ranked = {q for q, r in run.items() if r}
    return {"judged_queries": len(judged), "run_queries": len(ranked), "evaluated_queries": len(judged & ranked),
            "judged_missing_from_run": len(judged - ranked), "run_queries_without_judgements": len(ranked - judged)}


def evaluate_run(qrels: Qrels, run: Run, measures: Sequence[str], *, missing: str = "skip") -> dict[str, float]:
    """{measure name: value} averaged the way trec_eval averages (see the module docstring for `missing`)."""
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing={missing!r}: choose one of {', '.join(MISSING_POLICIES)}")
    values = per_query(qrels, run, measures)
    cov = coverage(qrels, run)
    if cov["evaluated_queries"] == 0:
        raise ValueError("no query of the run has judgements: are the qrels and the run from the same topics? "
                         f"(qrels e.g. {sorted(qrels)[:3]}, run e.g. {sorted(run)[:3]})")
    if cov["judged_missing_from_run"]:
        log.warning("%d of %d judged queries have no ranked documents in the run; %s",
                    cov["judged_missing_from_run"], cov["judged_queries"],
                    "counted as 0 (missing=zero)" if missing == "zero" else "left out of the mean, as trec_eval "
                    "does without -c (missing=zero counts them as 0)")
    absent = sorted(set(qrels) - {q for q, r in run.items() if r}) if missing == "zero" else []
    parsed = parse_measures(measures)
    out = {}
    for name, per_q in values.items():
        agg = parsed[name].aggregator()
        for value in per_q.values():
            agg.add(value)
        for _ in absent:
            agg.add(0.0)
        out[name] = float(agg.result())
    return out


def format_trec(results: Mapping[str, float], num_q: int | None = None) -> str:
    """trec_eval-style lines: ``nDCG@10  all  0.4796``."""
    rows = ([("num_q", str(num_q))] if num_q is not None else []) + [(k, f"{v:.4f}") for k, v in results.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  all  {v}" for k, v in rows)
