"""pipeline.metrics against values worked out by hand, trec_eval's tie rule, and the published TREC-DL 2020
numbers of four public runs (run-file parity)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import metrics
from pipeline.config import REPO_ROOT
from pipeline.readers import read_qrels, read_run

SHARED = Path(os.environ.get("PIPELINE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
DL20 = SHARED / "trec-dl-2020-pool"

QRELS = {"q1": {"d1": 3, "d2": 1, "d3": 0, "d4": 2}, "q2": {"d5": 1}}
RUN = {"q1": {"d3": 0.9, "d1": 0.8, "d5": 0.7, "d2": 0.6},  # d5 unjudged for q1, d4 never retrieved
       "q2": {"d6": 0.5, "d5": 0.4}}


def test_values_computed_by_hand():
    got = metrics.evaluate_run(QRELS, RUN, ["nDCG@10", "RR@10", "RR(rel=2)@10", "RR@1", "R@3", "R@10"])
    log2 = math.log2
    # q1 ranks: d3 (grade 0), d1 (3), d5 (unjudged), d2 (1); gains are the grades
    dcg1 = 3 / log2(3) + 1 / log2(5)
    idcg1 = 3 / log2(2) + 2 / log2(3) + 1 / log2(4)
    ndcg2 = (1 / log2(3)) / 1.0  # q2: its only relevant passage at rank 2
    assert got["nDCG@10"] == pytest.approx((dcg1 / idcg1 + ndcg2) / 2, abs=1e-12)
    assert got["RR@10"] == pytest.approx((1 / 2 + 1 / 2) / 2)  # first grade >= 1 at rank 2 for both
    assert got["RR(rel=2)@10"] == pytest.approx((1 / 2 + 0) / 2)  # q2 has nothing of grade >= 2
    assert got["RR@1"] == 0.0
    assert got["R@3"] == pytest.approx((1 / 3 + 1) / 2)  # q1: d1 of {d1, d2, d4}; q2: d5 of {d5}
    assert got["R@10"] == pytest.approx((2 / 3 + 1) / 2)


def test_per_query_values_and_names_as_written():
    per = metrics.per_query(QRELS, RUN, ["RR@10", "R@3"])
    assert per == {"RR@10": {"q1": 0.5, "q2": 0.5}, "R@3": {"q1": pytest.approx(1 / 3), "q2": 1.0}}


def test_ties_are_broken_like_trec_eval():
    # equal scores: trec_eval ranks by doc id descending, so "b" comes before "a"
    qrels, run = {"q": {"a": 1}}, {"q": {"a": 0.5, "b": 0.5}}
    assert metrics.evaluate_run(qrels, run, ["RR"])["RR"] == 0.5
    # RR@k is cut in the same order (ir-measures' msmarco provider would sort "a" first and give 1.0)
    assert metrics.evaluate_run(qrels, run, ["RR@1"])["RR@1"] == 0.0
    assert metrics.evaluate_run(qrels, run, ["nDCG@1"])["nDCG@1"] == 0.0
    assert [d for d, _ in metrics.trec_order({"a": 0.5, "b": 0.5, "c": 0.7})] == ["c", "b", "a"]


def test_missing_queries_skipped_like_trec_eval_or_counted_as_zero():
    qrels = {**QRELS, "q3": {"x": 1}}  # judged but not in the run
    skip = metrics.evaluate_run(qrels, RUN, ["RR@10"])
    zero = metrics.evaluate_run(qrels, RUN, ["RR@10"], missing="zero")
    assert skip["RR@10"] == pytest.approx(0.5)
    assert zero["RR@10"] == pytest.approx(1.0 / 3)
    cov = metrics.coverage(qrels, {**RUN, "unjudged": {"d": 1.0}})
    assert cov["judged_missing_from_run"] == 1 and cov["run_queries_without_judgements"] == 1
    assert cov["evaluated_queries"] == 2


def test_a_judged_query_with_an_empty_ranking_counts_as_missing():
    # a retriever that returns nothing for a query writes {qid: {}}: trec_eval never sees that query, so "skip"
    # leaves it out of the mean and "zero" counts it as 0 (exactly as if the query were absent from the run)
    qrels = {**QRELS, "q3": {"x": 1}}
    run = {**RUN, "q3": {}}
    assert "q3" not in metrics.per_query(qrels, run, ["RR@10"])["RR@10"]
    both = ["RR@10", "nDCG@10"]
    assert metrics.evaluate_run(qrels, run, both) == metrics.evaluate_run(qrels, RUN, both)
    assert metrics.evaluate_run(qrels, run, ["RR@10"])["RR@10"] == pytest.approx(0.5)
    assert metrics.evaluate_run(qrels, run, ["RR@10"], missing="zero")["RR@10"] == pytest.approx(1.0 / 3)
    assert metrics.coverage(qrels, run)["judged_missing_from_run"] == 1


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown measure 'nDCG@@10'"):
        metrics.evaluate_run(QRELS, RUN, ["nDCG@@10"])
    with pytest.raises(ValueError, match="no query of the run has judgements"):
        metrics.evaluate_run(QRELS, {"other": {"d1": 1.0}}, ["RR@10"])
    with pytest.raises(ValueError, match="run is empty"):
        metrics.evaluate_run(QRELS, {}, ["RR@10"])
    with pytest.raises(ValueError, match="missing="):
        metrics.evaluate_run(QRELS, RUN, ["RR@10"], missing="drop")
    assert metrics.max_cutoff(["nDCG@10", "R(rel=2)@1000", "AP"]) == 1000
    assert metrics.max_cutoff(["AP"]) is None


PUBLISHED = {"BM25": 0.4796, "BM25_RM3": 0.4896, "D_BERT_KD_TASB": 0.6854, "SPLADE_P_P_ENSEMBLE_DISTIL": 0.7197}


@pytest.mark.skipif(not DL20.is_dir(), reason="shared TREC-DL 2020 data not present")
@pytest.mark.parametrize("system", sorted(PUBLISHED))
def test_trec_dl20_run_parity(system):
    qrels = read_qrels(DL20 / "qrels.dl20-passage.txt")
    run = read_run(DL20 / "runs" / f"{system}.dl20_top100.txt.gz")
    assert round(metrics.evaluate_run(qrels, run, ["nDCG@10"])["nDCG@10"], 4) == PUBLISHED[system]


@pytest.mark.skipif(not DL20.is_dir(), reason="shared TREC-DL 2020 data not present")
def test_score_run_command_prints_trec_eval_lines(tmp_path):
    out = tmp_path / "tasb.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "stage=score_run", f"artifacts_root={tmp_path}",
         f"run_file={DL20 / 'runs' / 'D_BERT_KD_TASB.dl20_top100.txt.gz'}",
         f"qrels_file={DL20 / 'qrels.dl20-passage.txt'}",
         "score_run.measures=['nDCG@10','RR(rel=2)@10']", f"score_run.output={out}"],
        capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert ["num_q", "all", "54"] in lines
    assert ["nDCG@10", "all", "0.6854"] in lines
    import json

    assert round(json.loads(out.read_text())["measures"]["nDCG@10"], 4) == 0.6854


def test_measure_names_are_read_without_surrounding_spaces():
    # a name from a hand-written list or a shell argument (' RR@10') must not crash the scoring
    assert metrics.evaluate_run({"q1": {"d1": 1}}, {"q1": {"d1": 1.0}}, [" RR@10 "]) == {"RR@10": 1.0}


def test_score_run_stage_takes_a_relevance_level(tmp_path, capsys):
    from omegaconf import OmegaConf

    from pipeline.stages import score_run

    (tmp_path / "qrels").write_text("q1 0 d1 1\nq1 0 d2 2\n")
    (tmp_path / "run").write_text("q1 Q0 d1 1 2.0 t\nq1 Q0 d2 2 1.0 t\n")
    cfg = OmegaConf.create({"run_file": str(tmp_path / "run"), "qrels_file": str(tmp_path / "qrels"), "score_run": {
        "measures": ["nDCG@10", "RR@10"], "missing": "skip", "per_query": False, "output": None,
        "relevance_level": 2}})
    score_run.run(cfg)
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["RR(rel=2)@10", "all", "0.5000"] in lines and ["nDCG@10", "all", "0.8597"] in lines, lines  # gains 1 + 2/log2(3) over 2 + 1/log2(3)


def test_relevance_level_reaches_binary_measures_only(tmp_path):
    """trec_eval.py -l 2: TREC-DL's binary measures count grade >= 2; nDCG keeps the grades as gains and a
    measure that names its own level keeps it."""
    assert metrics.with_relevance_level(["nDCG@10", "RR@10", "AP", "R@100", "RR(rel=1)@10"], 2) == [
        "nDCG@10", "RR(rel=2)@10", "AP(rel=2)", "R(rel=2)@100", "RR(rel=1)@10"]
    # trec_eval -l 2 leaves num_ret (every retrieved document) alone and counts num_rel_ret at the level; ir-measures
    # has no level for NumRel: refused rather than silently at grade 1
    assert metrics.with_relevance_level(["NumRet", "NumRelRet", "P@10"], 2) == ["NumRet", "NumRet(rel=2)", "P(rel=2)@10"]
    with pytest.raises(ValueError, match="NumRel"):
        metrics.with_relevance_level(["NumRel"], 2)
    (tmp_path / "qrels").write_text("q1 0 d1 1\nq1 0 d2 2\n")
    (tmp_path / "run").write_text("q1 Q0 d1 1 2.0 t\nq1 Q0 d2 2 1.0 t\n")
    script = [sys.executable, str(REPO_ROOT / "scripts" / "trec_eval.py"), str(tmp_path / "qrels"),
              str(tmp_path / "run"), "-m", "RR@10"]
    level1 = subprocess.run(script, capture_output=True, text=True, timeout=120)
    level2 = subprocess.run(script + ["-l", "2"], capture_output=True, text=True, timeout=120)
    assert ["RR@10", "all", "1.0000"] in [line.split() for line in level1.stdout.splitlines()], level1.stderr
    assert ["RR(rel=2)@10", "all", "0.5000"] in [line.split() for line in level2.stdout.splitlines()], level2.stderr


def _score_run_config(tmp_path, **score_run):
    from omegaconf import OmegaConf

    settings = {"measures": ["RR@10"], "missing": "skip", "per_query": False, "output": None, "relevance_level": None}
    return OmegaConf.create({"run_file": str(tmp_path / "run"), "qrels_file": str(tmp_path / "qrels"),
                             "score_run": {**settings, **score_run}})


def test_score_run_stage_counts_missing_queries_lists_per_query_and_writes_json(tmp_path, capsys):
    """The trec_eval switches score_run stands for: -c (missing=zero: a judged query the run left out counts 0 and
    num_q counts it), -q (per_query: a line per query, none without it), and output= (the JSON beside the print,
    whose path the stage returns)."""
    import json

    from pipeline.stages import score_run

    (tmp_path / "qrels").write_text("q1 0 d1 1\nq2 0 d2 1\nq3 0 d3 1\n")
    (tmp_path / "run").write_text("q1 Q0 d1 1 2.0 t\nq2 Q0 d9 1 2.0 t\nq2 Q0 d2 2 1.0 t\n")  # q3 left out

    def lines(**settings):
        out = score_run.run(_score_run_config(tmp_path, **settings))
        return out, [line.split() for line in capsys.readouterr().out.splitlines()]

    out, skip = lines()
    assert skip == [["num_q", "all", "2"], ["RR@10", "all", "0.7500"]] and out == tmp_path / "run"
    _, zero = lines(missing="zero")
    assert zero == [["num_q", "all", "3"], ["RR@10", "all", "0.5000"]]
    _, listed = lines(per_query=True)
    assert listed[:2] == [["RR@10", "q1", "1.0000"], ["RR@10", "q2", "0.5000"]] and listed[2:] == skip
    out, written = lines(output=str(tmp_path / "scores.json"))
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert out == tmp_path / "scores.json" and written == skip
    assert saved["measures"] == {"RR@10": 0.75} and saved["per_query"]["RR@10"] == {"q1": 1.0, "q2": 0.5}


def test_score_run_stage_mistakes_are_one_line(tmp_path):
    """What the user typed wrong is a StageError (one line and exit 2 from the CLI), not a traceback: no run file,
    a run from other topics, a relevance level a measure cannot take; a malformed line stays the reader's DataError
    (<file>:<line>: what is wrong); and a misspelt measure is named before the (possibly large) files are read."""
    from pipeline.artifacts import StageError
    from pipeline.readers import DataError
    from pipeline.stages import score_run

    (tmp_path / "qrels").write_text("q1 0 d1 1\n")
    (tmp_path / "run").write_text("q7 Q0 d1 1 2.0 t\n")
    for unset in (None, ""):  # run_file= on the command line is an empty string
        cfg = _score_run_config(tmp_path)
        cfg.run_file = unset
        with pytest.raises(StageError, match=r"stage=score_run needs run_file=<path>"):
            score_run.run(cfg)
    with pytest.raises(StageError, match=r"score_run: no query of the run has judgements"):
        score_run.run(_score_run_config(tmp_path))
    with pytest.raises(StageError, match=r"score_run.relevance_level: .*NumRel"):
        score_run.run(_score_run_config(tmp_path, measures=["NumRel"], relevance_level=2))
    (tmp_path / "bad.run").write_text("q1 Q0 d1 one 2.0 t\n")
    cfg = _score_run_config(tmp_path)
    cfg.run_file = str(tmp_path / "bad.run")
    with pytest.raises(DataError, match=r"bad.run:1: rank 'one' must be an integer"):  # the reader's own line
        score_run.run(cfg)
    with pytest.raises(ValueError, match="nDGC@10"):  # scripts/trec_eval.py calls score() without the stage's check
        score_run.score(str(tmp_path / "absent.run"), str(tmp_path / "qrels"), ["nDGC@10"])
