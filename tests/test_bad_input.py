"""Malformed MS MARCO and BEIR inputs through the real stages: each ends with a DataError naming the file, the
line and the cause, no completion marker is left, and the CLI exits non-zero. Good variants (BOM, CRLF, gzip)
pass; documented warnings (empty passages, qrels for queries without text) are counted, not fatal."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.artifacts import MARKER
from pipeline.cli import run as run_stage
from pipeline.config import REPO_ROOT, compose
from pipeline.readers import DataError

GOOD_CORPUS = "".join(f"{i}\tpassage number {i} about topic {i % 7}\n" for i in range(40))
GOOD_QUERIES = "".join(f"q{i}\twhat about topic {i}\n" for i in range(6))
GOOD_QRELS = "".join(f"q{i}\t0\t{i}\t1\n" for i in range(6))
GOOD_BEIR_CORPUS = "".join(json.dumps({"_id": f"d{i}", "title": f"t{i}", "text": f"text {i}"}) + "\n" for i in range(40))
GOOD_TOP = "".join(f"q{q}\t{p}\twhat about topic {q}\tpassage number {p}\n" for q in range(3) for p in range(5))


def gz_truncated(text: str) -> bytes:
    return gzip.compress(text.encode())[:-12]


# (name, role, file name, content, expected line or None, words in the message)
CASES = [
    ("corpus truncated gzip", "corpus", "collection.tsv.gz", gz_truncated(GOOD_CORPUS * 50), None, "gzip"),
    ("corpus missing column", "corpus", "collection.tsv", "0\tok\n1 no tab here\n", 2, "expected 2 columns"),
    ("corpus duplicate id", "corpus", "collection.tsv", "0\ta\n1\tb\n0\tc\n", 3, "duplicate document id '0'"),
    ("corpus id differs by whitespace", "corpus", "collection.tsv", "0\ta\n0 \tb\n", 2, "whitespace"),
    ("corpus invalid utf-8", "corpus", "collection.tsv", b"0\tfine\n1\tbad \xff\xfe bytes\n", 2, "invalid UTF-8"),
    ("corpus empty file", "corpus", "collection.tsv", b"", None, "file is empty"),
    ("corpus blank line", "corpus", "collection.tsv", "0\ta\n\n1\tb\n", 2, "blank line"),
    ("corpus empty id", "corpus", "collection.tsv", "0\ta\n\tno id\n", 2, "empty id"),
    ("beir corpus invalid json", "corpus", "corpus.jsonl", '{"_id": "1", "text": "a"}\n{"_id": "2", "text": \n', 2, "invalid JSON"),
    ("beir corpus missing _id", "corpus", "corpus.jsonl", '{"_id": "1", "text": "a"}\n{"text": "b"}\n', 2, "missing id"),
    ("beir corpus not an object", "corpus", "corpus.jsonl", '{"_id": "1", "text": "a"}\n["x"]\n', 2, "JSON object"),
    ("beir corpus text not a string", "corpus", "corpus.jsonl", '{"_id": "1", "text": 5}\n', 1, "must be strings"),
    ("beir corpus missing text", "corpus", "corpus.jsonl", '{"_id": "1", "title": "x"}\n', 1, "missing text"),
    ("beir corpus truncated gzip", "corpus", "corpus.jsonl.gz", gz_truncated(GOOD_BEIR_CORPUS * 40), None, "gzip"),
    ("queries missing column", "queries", "queries.tsv", "q0\ta\nq1\n", 2, "expected 2 columns"),
    ("queries duplicate id", "queries", "queries.tsv", "q0\ta\nq0\tb\n", 2, "duplicate query id"),
    ("queries empty text", "queries", "queries.tsv", "q0\ta\nq1\t\n", 2, "empty text"),
    ("queries whitespace-only text", "queries", "queries.tsv", "q0\ta\nq1\t   \n", 2, "empty text"),
    ("queries invalid utf-8", "queries", "queries.tsv", b"q0\ta\nq1\t\xc3\x28\n", 2, "invalid UTF-8"),
    ("queries id with whitespace", "queries", "queries.tsv", "q0\ta\n q1\tb\n", 2, "whitespace"),
    ("qrels non-integer grade", "qrels", "qrels.tsv", "q0\t0\t0\t1\nq1\t0\t1\thigh\n", 2, "not an integer"),
    ("qrels float grade", "qrels", "qrels.tsv", "q0 0 0 1\nq1 0 1 1.5\n", 2, "not an integer"),
    ("qrels wrong column count", "qrels", "qrels.tsv", "q0\t0\t0\t1\nq1\t1\n", 2, "expected 4 columns"),
    ("qrels conflicting grades", "qrels", "qrels.tsv", "q0 0 0 1\nq0 0 0 2\n", 2, "conflicting grades"),
    ("qrels unknown passage ids", "qrels", "qrels.tsv", "q0\t0\t0\t1\nq1\t0\t999\t1\nq2\t0\t998\t1\n", None,
     "not in the corpus"),
    ("qrels empty file", "qrels", "qrels.tsv", b"", None, "file is empty"),
    ("beir qrels header only", "qrels", "test.tsv", "query-id\tcorpus-id\tscore\n", None, "no judgements"),
    ("beir qrels two columns", "qrels", "test.tsv", "query-id\tcorpus-id\tscore\nq0\t0\n", 2, "3 tab-separated"),
    ("qrels truncated gzip", "qrels", "qrels.tsv.gz", gz_truncated(GOOD_QRELS * 400), None, "gzip"),
    ("top1000 wrong column count", "candidates", "top1000.tsv", "q0\t1\tquery\tpassage\nq0\t2\tquery\n", 2,
     "expected 4 columns"),
    ("top1000 duplicate pair", "candidates", "top1000.tsv", "q0\t1\tquery\tp\nq0\t1\tquery\tp\n", 2, "listed twice"),
    ("top1000 empty passage", "candidates", "top1000.tsv", "q0\t1\tquery\tp\nq0\t2\tquery\t \n", 2, "empty text"),
    ("run non-numeric score", "run", "run.trec", "q0 Q0 1 1 1.5 t\nq0 Q0 2 2 high t\n", 2, "a number"),
    ("run wrong column count", "run", "run.trec", "q0 Q0 1 1 1.5 t\nq0 Q0 2 2\n", 2, "expected 6 columns"),
    ("run duplicate document", "run", "run.trec", "q0 Q0 1 1 1.5 t\nq0 Q0 1 2 1.0 t\n", 2, "appears twice"),
    ("run infinite score", "run", "run.trec", "q0 Q0 1 1 inf t\n", 1, "not finite"),
]


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    (d / "collection.tsv").write_text(GOOD_CORPUS)
    (d / "queries.tsv").write_text(GOOD_QUERIES)
    (d / "qrels.tsv").write_text(GOOD_QRELS)
    (d / "top1000.tsv").write_text(GOOD_TOP)
    (d / "qrels.dl.txt").write_text("q0 0 1 2\nq1 0 2 3\n")
    return d


def _overrides(files: dict[str, Path], root: Path, bi_encoder: Path) -> tuple[str, list[str]]:
    """A retrieve run (corpus, queries, qrels) or a BM25 rerank evaluation (candidates, run) over the files."""
    common = [f"artifacts_root={root}", f"model.bi_encoder={bi_encoder}", "device=cpu", "retrieve.top_k=5"]
    data = [f"data.corpus={files['corpus']}", f"data.train.queries={files['queries']}",
            f"data.train.qrels={files['qrels']}"]
    if "candidates" in files or "run" in files:
        cands = files.get("candidates") or files["run"]
        evals = ["~data.evals.dev", f"data.evals.trec_dl.candidates={cands}",
                 f"data.evals.trec_dl.queries={files['queries']}", f"data.evals.trec_dl.qrels={files['dl_qrels']}"]
        return "evaluate", [*common, *data, *evals, "evaluate.systems=[]", "evaluate.bm25=true"]
    return "retrieve", [*common, *data]


@pytest.mark.parametrize("name,role,filename,content,line,words", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_names_file_line_and_cause(name, role, filename, content, line, words, good_files, tmp_path,
                                                    tiny_bi_encoder):
    bad = tmp_path / "in" / filename
    bad.parent.mkdir()
    bad.write_bytes(content.encode() if isinstance(content, str) else content)
    files = {"corpus": good_files / "collection.tsv", "queries": good_files / "queries.tsv",
             "qrels": good_files / "qrels.tsv", "dl_qrels": good_files / "qrels.dl.txt", role: bad}
    if role in ("candidates", "run"):
        files["queries"] = good_files / "queries.tsv"
    stage, overrides = _overrides(files, tmp_path / "artifacts", tiny_bi_encoder)
    with pytest.raises(DataError) as err:
        run_stage(compose([*overrides, f"stage={stage}"]))
    message = str(err.value)
    assert message.startswith(f"{bad}:{line}: " if line else f"{bad}"), message
    assert words in message, message
    assert not list((tmp_path / "artifacts").rglob(MARKER)), "a completion marker was written for failed input"


def test_cli_exits_nonzero_with_file_and_line(good_files, tmp_path, tiny_bi_encoder):
    bad = tmp_path / "collection.tsv"
    bad.write_text("0\tfine\n1 missing tab\n")
    _, overrides = _overrides({"corpus": bad, "queries": good_files / "queries.tsv", "qrels": good_files / "qrels.tsv"},
                              tmp_path / "artifacts", tiny_bi_encoder)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "stage=retrieve", *overrides], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}:2: expected 2 columns" in proc.stdout + proc.stderr
    assert not list((tmp_path / "artifacts").rglob(MARKER))


def test_good_variants_and_documented_warnings_pass(good_files, tmp_path, tiny_bi_encoder, caplog):
    """BOM + CRLF + gzip read like plain files; an empty passage and qrels of a query without text are counted
    warnings, not errors."""
    corpus = tmp_path / "collection.tsv.gz"
    corpus.write_bytes(gzip.compress(("\ufeff" + GOOD_CORPUS.replace("\n", "\r\n") + "40\t \r\n").encode()))
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text(GOOD_QRELS + "q_no_text\t0\t3\t1\n")
    _, overrides = _overrides({"corpus": corpus, "queries": good_files / "queries.tsv", "qrels": qrels},
                              tmp_path / "artifacts", tiny_bi_encoder)
    folder = Path(run_stage(compose([*overrides, "stage=retrieve"])))
    assert (folder / MARKER).exists()
    text = caplog.text
    assert "1 documents with empty text kept" in text and "no text" in text
