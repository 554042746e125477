"""stage=evaluate end to end on a tiny inline BEIR folder (retrieval and rerank sets, BM25 and a tiny bi-encoder),
the results table, and the CLI's exit code 2 with a file:line message on malformed input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import metrics
from pipeline.artifacts import StageError, is_complete, read_manifest, verify_folder
from pipeline.config import REPO_ROOT, compose
from pipeline.readers import read_qrels, read_run
from pipeline.stages import evaluate

DOCS = {
    "d1": ("Volcanoes", "Lava flows from an erupting volcano."),
    "d2": ("Glaciers", "Ice sheets move slowly across valleys."),
    "d3": ("Rivers", "A river carries water to the sea."),
    "d4": ("Deserts", "Sand dunes cover hot dry land."),
    "d5": ("Forests", "Tall trees grow in rainforests."),
    "d6": ("Oceans", "The ocean is deep and salty."),
    "d7": ("", "Mountains rise above the clouds."),
    "d8": ("Volcano eruptions", "Ash clouds after an eruption of a volcano."),
}
QUERIES = {"q1": "erupting volcano lava", "q2": "river water sea", "q3": "sand dunes", "q4": "ice sheets valleys",
           "q5": "ocean salty", "q9": "a query nobody judged"}
QRELS = [("q1", "d1", 2), ("q1", "d8", 1), ("q1", "d5", 0), ("q2", "d3", 1), ("q3", "d4", 1), ("q4", "d2", 2),
         ("q5", "d6", 1)]
CANDIDATES = {"q1": ["d2", "d8", "d1"], "q2": ["d4", "d3"], "q4": ["d7", "d2", "d6"]}


def beir_folder(root: Path) -> Path:
    folder = root / "tinybeir"
    if folder.is_dir():  # rewriting would change the files' fingerprints, hence every key
        return folder
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": t, "text": x}) + "\n" for d, (t, x) in DOCS.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items()))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in QRELS))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    (folder / "top1000.tsv").write_text("".join(f"{q}\t{d}\t{QUERIES[q]}\t{DOCS[d][1]}\n"
                                                for q, ds in CANDIDATES.items() for d in ds))
    (folder / "candidates.trec").write_text("".join(f"{q} Q0 {d} {i + 1} {10 - i} bm25\n"
                                                    for q, ds in CANDIDATES.items() for i, d in enumerate(ds)))
    return folder


def config(tmp_path: Path, *extra: str):
    folder = beir_folder(tmp_path)
    rerank = ("+data.evals.rr={kind: rerank, queries: '%s', qrels: '%s', candidates: '%s', "
              "metrics: ['nDCG@10', 'RR@10'], headline: 'RR@10', title: 'MRR@10 (rerank)'}"
              % (folder / "queries.jsonl", folder / "qrels" / "test.tsv", folder / "candidates.trec"))
    top1000 = ("+data.evals.tl={kind: rerank, qrels: '%s', candidates: '%s', metrics: ['RR@10'], title: 'top1000'}"
               % (folder / "qrels" / "test.tsv", folder / "top1000.tsv"))
    return compose(["data=beir", f"data.root={folder}", f"artifacts_root={tmp_path / 'art'}", rerank, top1000,
                    "evaluate.k=5", "device=cpu", *extra])


@pytest.fixture(scope="module")
def bi_encoder_spec(tiny_bi_encoder) -> str:
    return str(tiny_bi_encoder)


def test_bm25_only_end_to_end(tmp_path):
    cfg = config(tmp_path, "evaluate.systems=[]")
    folder = evaluate.run(cfg)
    assert is_complete(folder) and verify_folder(folder) == []
    doc = json.loads((folder / "metrics.json").read_text())
    assert doc["name"] == "BM25"
    # every judged query has its relevant passage first: the queries share words with one passage only
    assert doc["metrics"]["test"]["RR@10"] == 1.0
    # rerank: BM25 scores only the candidates, with corpus statistics; d1 (three terms) beats d8 (one term)
    rr = read_run(folder / "runs" / "rr.trec")
    assert list(rr["q1"])[0] == "d1" and set(rr["q1"]) == {"d1", "d2", "d8"}
    assert set(rr) == {"q1", "q2", "q4"}  # judged queries with candidates; q9 (unjudged) is never ranked
    # q3 and q5 are judged but have no candidates: counted as 0 (evaluate.missing_queries=zero)
    assert doc["metrics"]["rr"]["RR@10"] == pytest.approx(3 / 5)
    assert doc["coverage"]["rr"]["judged_missing_from_run"] == 2
    # the written run scores to the numbers in metrics.json
    qrels = read_qrels(Path(cfg.data.root) / "qrels" / "test.tsv")
    again = metrics.evaluate_run(qrels, read_run(folder / "runs" / "test.trec"), ["nDCG@10", "RR@10"])
    assert again == pytest.approx({k: doc["metrics"]["test"][k] for k in again})
    (written,) = (folder.parents[1] / "results").glob("tinybeir-*.md")
    table = written.read_text()
    assert "| Approach | NDCG@10 (test) | MRR@10 (rerank) |" in table and "| BM25 | " in table
    # the table's name follows its rows' folders (another system, or another config of one: another file)
    from pipeline.stages.evaluate import rows_key

    row = {"name": "BM25", "path": str(folder)}
    assert written.name == f"tinybeir-{rows_key([row])}.md"
    assert rows_key([row]) != rows_key([{**row, "path": str(folder.with_name("bm25-0123456789ab"))}])



def test_a_complete_evaluation_on_a_read_only_root_prints_its_table(tmp_path, monkeypatch, capsys):
    """An archived root mounted read-only: the evaluation is found complete without its lock, and the stage then
    failed on the very results table that was already there (stage=all printed it and went on)."""
    import errno

    from pipeline import artifacts

    cfg = config(tmp_path, "evaluate.systems=[]")
    folder = evaluate.run(cfg)
    (table,) = (folder.parents[1] / "results").glob("tinybeir-*.md")
    assert f"results table: {table}\n" in capsys.readouterr().out
    real_open = os.open

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[0]))

    def no_lock_files(path, flags, *args):
        if flags & os.O_CREAT:
            read_only(path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(artifacts.os, "open", no_lock_files)
    monkeypatch.setattr(evaluate, "atomic_write_text", read_only)
    assert evaluate.run(cfg) == folder  # the same table was there: nothing to write
    assert f"results table: {table}\n" in capsys.readouterr().out
    table.unlink()  # archived without its table: printed, and the line says it is not on disk
    assert evaluate.run(cfg) == folder
    out = capsys.readouterr().out
    assert "| BM25 | " in out and f"results table: {table} (not written)" in out and not table.exists()

def test_dense_system_end_to_end(tmp_path, bi_encoder_spec):
    from sentence_transformers import SentenceTransformer

    cfg = config(tmp_path, f"evaluate.systems=[{{name: tiny, model: '{bi_encoder_spec}', similarity: cosine}}]")
    last = evaluate.run(cfg)
    assert last.name.startswith("tinybeir-tiny-") and is_complete(last)
    manifest = read_manifest(last)
    emb = np.load(last / evaluate.EMB_FILE)
    assert emb.dtype == np.float16 and emb.shape[0] == len(DOCS)
    assert manifest["extra"]["similarity_used"] == "cosine"

    # the run agrees with an independent sentence-transformers computation: cosine, title + " " + text
    model = SentenceTransformer(bi_encoder_spec, device="cpu")
    texts = [f"{t} {x}".strip() for t, x in DOCS.values()]
    ref = model.similarity(model.encode([QUERIES["q1"]]), model.encode(texts)).numpy()[0]
    run = read_run(last / "runs" / "test.trec")
    assert len(run["q1"]) == len(DOCS)  # depth max(evaluate.k=5, nDCG@10's cutoff), clamped to the corpus
    for pid, score in run["q1"].items():
        assert score == pytest.approx(ref[list(DOCS).index(pid)], abs=5e-3)
    # a top-1000 file is reranked on the texts it carries (body only here, no title), with the query texts in it
    tl = read_run(last / "runs" / "tl.trec")
    assert set(tl) == {"q1", "q2", "q4"} and set(tl["q4"]) == {"d7", "d2", "d6"}
    body = model.similarity(model.encode([QUERIES["q4"]]), model.encode([DOCS["d2"][1]])).item()
    assert tl["q4"]["d2"] == pytest.approx(body, abs=1e-4)

    # same model again: complete folder reused; another depth: new folder, corpus embeddings linked not re-encoded
    mtime = (last / "metrics.json").stat().st_mtime_ns
    assert evaluate.run(cfg) == last and (last / "metrics.json").stat().st_mtime_ns == mtime
    other = evaluate.run(config(tmp_path, "evaluate.k=6", "evaluate.bm25=false",
                                f"evaluate.systems=[{{name: tiny, model: '{bi_encoder_spec}', similarity: cosine}}]"))
    assert other != last
    assert (other / evaluate.EMB_FILE).stat().st_ino == (last / evaluate.EMB_FILE).stat().st_ino
    assert "encode_corpus" not in read_manifest(other)["timings_s"]

    # the train stage's entry point and the table with a published figure
    row = evaluate.evaluate_system(cfg, "v3", bi_encoder_spec, "cosine")
    assert row["name"] == "v3" and Path(row["path"]).name.startswith("tinybeir-v3-")
    assert set(row["metrics"]) == {"test", "rr", "tl"} and 0.0 <= row["metrics"]["test"]["nDCG@10"] <= 1.0
    assert evaluate.results_table([row], cfg).splitlines()[2].startswith("| v3 | ")
    # without a similarity the chain's calls follow model.similarity, as stage=evaluate and retrieve do
    dot = evaluate.evaluate_system(config(tmp_path, "model.similarity=dot", "evaluate.bm25=false"), "v3",
                                   bi_encoder_spec)
    assert read_manifest(Path(dot["path"]))["extra"]["similarity_used"] == "dot"


def test_the_dtype_auto_means_on_this_machine_is_in_the_key(tmp_path, monkeypatch):
    """precision: auto is bf16 on a GPU or a CPU with bf16, fp32 elsewhere: the figures differ (demo dev RR@10
    37.78 in fp32, 37.62 in bf16), so a result from one must not be reused as the other's."""
    from pipeline import engine

    system = {"name": "x", "model": "demo:bi_encoder", "similarity": "auto", "query_prompt": None,
              "corpus_prompt": None}
    cfg = config(tmp_path, "evaluate.precision=auto", "device=cpu")
    keys = {}
    for fast_bf16 in (True, False):
        monkeypatch.setattr(engine, "_cpu_has_fast_bf16", lambda fast_bf16=fast_bf16: fast_bf16)
        keys[fast_bf16] = evaluate.system_identity(cfg, system)["evaluate"]["dtype"]
    assert keys == {True: "bfloat16", False: "float32"}


def test_results_table_shows_published_figures(tmp_path):
    cfg = compose(["data=demo", f"artifacts_root={tmp_path}", "+model.published.trec_dl=69.02", "+model.published.dev=33.13"])
    rows = [{"name": "BM25", "metrics": {"trec_dl": {"nDCG@10": 0.5058}, "dev": {"RR@10": 0.187}}},
            {"name": "v3", "metrics": {"trec_dl": {"nDCG@10": 0.68914}, "dev": {"RR@10": 0.3291}}},
            {"name": "other", "metrics": {"trec_dl": {"nDCG@10": 0.7}}, "published": {"dev": 40.0}}]
    table = evaluate.results_table(rows, cfg)
    lines = table.splitlines()
    assert lines[0] == "| Approach | NDCG@10 (demo rerank, TREC-DL style) | MRR@10 (demo dev) |"
    assert lines[2] == "| BM25 | 50.58 | 18.70 |"
    assert lines[3] == "| v3 | 68.91 (published 69.02) | 32.91 (published 33.13) |"
    assert lines[4] == "| other | 70.00 | – (published 40.00) |"


def test_bad_config_values_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        evaluate.run(config(tmp_path, "evaluate.systems=[{name: x, model: y, colour: red}]"))
    with pytest.raises(ValueError, match="similarity 'euclid'"):
        evaluate.evaluate_system(config(tmp_path), "x", "y", "euclid")
    with pytest.raises(StageError, match="system 'x': cannot load the bi-encoder"):
        evaluate.evaluate_system(config(tmp_path, "evaluate.bm25=false"), "x", str(tmp_path / "no-model"))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)


def test_cli_malformed_input_exits_2_with_file_and_line(tmp_path):
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("1 Q0 a 1\n")
    run = tmp_path / "bad.run"
    run.write_text("1 Q0 a 1 0.5 t\n1 Q0 b 2 high t\n")
    proc = _cli("stage=score_run", f"run_file={run}", f"qrels_file={qrels}", f"artifacts_root={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{run}:2: rank '2' must be an integer and score 'high' a number" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr

    folder = beir_folder(tmp_path)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\n")
    proc = _cli("stage=evaluate", "data=beir", f"data.root={folder}", "evaluate.systems=[]",
                f"artifacts_root={tmp_path / 'art'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{folder / 'qrels' / 'test.tsv'}:3: expected 3 tab-separated columns" in proc.stdout + proc.stderr


def test_dense_system_from_the_token_store_is_identical(tmp_path, bi_encoder_spec):
    """token_cache=true: the corpus is encoded from its token store; embeddings and metrics equal the texts path."""
    system = f"evaluate.systems=[{{name: tiny, model: '{bi_encoder_spec}', similarity: cosine}}]"
    out = {}
    for setting in ("false", "true"):
        folder = evaluate.run(config(tmp_path / setting, system, "evaluate.bm25=false", f"token_cache={setting}"))
        out[setting] = (np.load(folder / evaluate.EMB_FILE), json.loads((folder / "metrics.json").read_text()),
                        read_manifest(folder)["extra"].get("token_store"))
    np.testing.assert_array_equal(out["true"][0], out["false"][0])
    assert out["true"][1]["metrics"] == out["false"][1]["metrics"]
    assert out["false"][2] is None and "tokens" in out["true"][2]


def test_corpus_encode_split_over_processes_equals_one_process(tmp_path, bi_encoder_spec):
    """evaluate.devices=[cpu, cpu]: two spawned processes each write their half of the embeddings file (from the
    token store here); the file and the metrics equal the one-process encode's, and devices are not in the key."""
    system = f"evaluate.systems=[{{name: tiny, model: '{bi_encoder_spec}', similarity: cosine}}]"
    out = {}
    for name, devices in (("one", "[]"), ("two", "[cpu,cpu]")):
        folder = evaluate.run(config(tmp_path / name, system, "evaluate.bm25=false", "token_cache=true",
                                     f"evaluate.devices={devices}"))
        out[name] = (folder.name, np.load(folder / evaluate.EMB_FILE), json.loads((folder / "metrics.json").read_text()))
    assert out["one"][0] == out["two"][0]
    assert out["two"][2]["encode_devices"] == ["cpu", "cpu"] and out["one"][2]["encode_devices"] == ["cpu"]
    # equal here; other batch compositions may round differently: within the float16 storage step
    np.testing.assert_allclose(out["two"][1].astype(np.float32), out["one"][1].astype(np.float32), atol=1e-3)
    assert out["two"][2]["metrics"] == out["one"][2]["metrics"]


def test_encode_devices_setting(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert evaluate.encode_devices("auto", "cuda") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert evaluate.encode_devices("auto", "cuda:1") == []  # a GPU named by the config: that one alone
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert evaluate.encode_devices("auto", "cuda") == []
    assert evaluate.encode_devices("auto", "cpu") == [] and evaluate.encode_devices([], "cuda") == []
    assert evaluate.encode_devices(["cuda:0"], "cuda") == []  # one device: this process
    assert evaluate.encode_devices(["cuda:0", "cuda:1"], "cuda") == ["cuda:0", "cuda:1"]
    from pipeline.validate import evaluate_devices  # a string is refused at the stage entry, not read as a list

    assert evaluate_devices("cuda:0,cuda:1") and evaluate_devices(["cuda:0", "gpu"])
    assert evaluate_devices(["cuda:0", "cuda:1"]) is None and evaluate_devices(["cpu", "cpu"]) is None


def test_corpus_encode_resumes_after_a_crash(tmp_path, bi_encoder_spec, monkeypatch):
    """A run that dies mid-encode keeps its committed chunks; the rerun encodes only the others, and the embeddings
    and metrics are those of an uninterrupted run."""
    system = f"evaluate.systems=[{{name: tiny, model: '{bi_encoder_spec}', similarity: cosine}}]"
    settings = [system, "evaluate.bm25=false", "evaluate.corpus_chunk=3", "token_cache=false"]  # 8 passages: 3 chunks
    whole = evaluate.run(config(tmp_path / "whole", *settings))

    corpus_calls = []
    real = evaluate._Dense.encode

    def crashing(self, texts, prompt, desc):
        if desc.startswith("encode corpus"):
            corpus_calls.append(desc)
            if len(corpus_calls) == 3:
                raise RuntimeError("node lost")
        return real(self, texts, prompt, desc)

    monkeypatch.setattr(evaluate._Dense, "encode", crashing)
    cfg = config(tmp_path / "resumed", *settings)
    with pytest.raises(RuntimeError, match="node lost"):
        evaluate.run(cfg)
    partial = next((tmp_path / "resumed" / "art" / evaluate.STAGE).glob(f"*/{evaluate.PARTIAL_FILE}"))
    assert sorted(m.name for m in (partial.parent / evaluate.PARTIAL_MARKS).glob("rows-*")) == ["rows-0-3.done",
                                                                                               "rows-3-6.done"]
    corpus_calls.clear()

    def counting(self, texts, prompt, desc):
        if desc.startswith("encode corpus"):
            corpus_calls.append(desc)
        return real(self, texts, prompt, desc)

    monkeypatch.setattr(evaluate._Dense, "encode", counting)
    resumed = evaluate.run(cfg)
    assert corpus_calls == ["encode corpus 6+"]  # only the chunk the crash lost
    assert not (resumed / evaluate.PARTIAL_FILE).exists() and not (resumed / evaluate.PARTIAL_MARKS).exists()
    assert read_manifest(resumed)["counts"]["corpus_rows_resumed"] == 6 and verify_folder(resumed) == []
    np.testing.assert_array_equal(np.load(resumed / evaluate.EMB_FILE), np.load(whole / evaluate.EMB_FILE))
    assert json.loads((resumed / "metrics.json").read_text())["metrics"] == \
        json.loads((whole / "metrics.json").read_text())["metrics"]


def test_a_cut_short_encode_is_dropped_when_the_embeddings_can_be_linked(tmp_path, bi_encoder_spec, monkeypatch):
    """A run cut short mid-encode, then another evaluation of the same embeddings completes: the rerun links that
    file and leaves no partial rows behind."""
    system = f"evaluate.systems=[{{name: tiny, model: '{bi_encoder_spec}', similarity: cosine}}]"
    settings = [system, "evaluate.bm25=false", "evaluate.corpus_chunk=3", "token_cache=false"]
    real = evaluate._Dense.encode

    def crashing(self, texts, prompt, desc):
        if desc == "encode corpus 3+":
            raise RuntimeError("node lost")
        return real(self, texts, prompt, desc)

    cfg = config(tmp_path, *settings)
    with monkeypatch.context() as m:
        m.setattr(evaluate._Dense, "encode", crashing)
        with pytest.raises(RuntimeError, match="node lost"):
            evaluate.run(cfg)
    other = evaluate.run(config(tmp_path, *settings, "evaluate.k=6"))  # another folder, the same embeddings
    folder = evaluate.run(cfg)
    assert folder != other and (folder / evaluate.EMB_FILE).stat().st_ino == (other / evaluate.EMB_FILE).stat().st_ino
    assert not (folder / evaluate.PARTIAL_FILE).exists() and not (folder / evaluate.PARTIAL_MARKS).exists()
    assert verify_folder(folder) == []


def test_run_from_hits_drops_missing_results(tmp_path):
    """A search that finds fewer than k for a query (faiss_ivf: row -1) gives that query fewer results, never the
    passage at row 0 in their place; scores are kept as given."""
    from pipeline.readers import Corpus

    (tmp_path / "c.tsv").write_text("a\tone\nb\ttwo\nc\tthree\n")
    corpus = Corpus.open(tmp_path / "c.tsv", tmp_path / "cache")
    idx = np.array([[2, 0, 1], [1, -1, -1]])
    scores = np.array([[0.9, 0.5, 0.25], [0.75, -np.inf, -np.inf]], dtype=np.float32)
    run = evaluate.run_from_hits(["q1", "q2"], corpus, scores, idx)
    assert run == {"q1": {"c": 0.8999999761581421, "a": 0.5, "b": 0.25}, "q2": {"b": 0.75}}


def test_retrieval_judgements_missing_from_the_corpus_follow_max_missing_qrels(tmp_path):
    """Closed-corpus retrieval can never find a judged passage the corpus lacks: its figures would read low
    without a word. data.max_missing_qrels, checked for the training judgements, now holds for these too."""
    from pipeline.readers import DataError

    folder = beir_folder(tmp_path)
    bad = tmp_path / "qrels-with-a-stranger.tsv"
    bad.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td99\t1\n")
    extra = ("+data.evals.miss={kind: retrieval, queries: '%s', qrels: '%s', metrics: ['nDCG@10']}"
             % (folder / "queries.jsonl", bad))
    with pytest.raises(DataError, match=r"1 of 2 judged passages \(50.0%\) are not in the corpus"):
        evaluate.run(config(tmp_path, extra, "evaluate.systems=[]", "evaluate.bm25=true"))
    evaluate.run(config(tmp_path, extra, "evaluate.systems=[]", "evaluate.bm25=true", "data.max_missing_qrels=0.5"))


def test_a_top1000_s_own_query_texts_fill_in_for_a_queries_file_that_lacks_them(tmp_path):
    """A TREC-DL top-1000 file whose queries the eval set's queries file lacks (another year's queries file): the
    judged ones were counted as 0 under a warning that they had no text, though the top-1000 file carries it."""
    folder = beir_folder(tmp_path)
    qrels = folder / "qrels" / "test.tsv"
    other_year = tmp_path / "queries-without-q1.tsv"  # q1's text only in the top-1000 file
    other_year.write_text("".join(f"{q}\t{t}\n" for q, t in QUERIES.items() if q != "q1"))
    extra = ("+data.evals.dl={kind: rerank, queries: '%s', qrels: '%s', candidates: '%s', metrics: ['RR@10']}"
             % (other_year, qrels, folder / "top1000.tsv"))
    folder_bm25 = evaluate.run(config(tmp_path, extra, "evaluate.systems=[]"))
    assert set(read_run(folder_bm25 / "runs" / "dl.trec")) == {"q1", "q2", "q4"}


def test_a_top1000_that_ranks_no_judged_query_is_one_line(tmp_path):
    """A top-1000 file of another year or split ranks none of the judged queries: the empty run ended in a
    traceback from the metrics (exit 1) after the stages before it had run; now one line naming the file (exit 2)."""
    folder = beir_folder(tmp_path)
    qrels = folder / "qrels" / "test.tsv"
    stranger = tmp_path / "top1000-other-queries.tsv"
    stranger.write_text("x1\td1\tlava\tLava flows from an erupting volcano.\n")
    extra = ("+data.evals.dl={kind: rerank, queries: '%s', qrels: '%s', candidates: '%s', metrics: ['RR@10']}"
             % (folder / "queries.jsonl", qrels, stranger))
    with pytest.raises(StageError, match=r"top1000-other-queries.tsv ranks none of its 5 judged queries"):
        evaluate.run(config(tmp_path, extra, "evaluate.systems=[]"))


def test_rerank_encodes_each_candidate_s_own_text_with_the_passage_prompt(tmp_path, tiny_bi_encoder, monkeypatch):
    # a TREC run's candidates take their texts from the corpus, whose rows need not follow the ids' order; and
    # passages take the passage prompt, queries the query prompt (a prompted model scored otherwise is another model)
    import contextlib
    from types import SimpleNamespace

    from sentence_transformers import SentenceTransformer

    from pipeline.readers import Candidates

    folder = tmp_path / "unsorted"
    (folder / "qrels").mkdir(parents=True)
    docs = {"z9": "zebras graze", "a1": "apples fall", "m5": "mangoes ripen"}  # file order is not id order
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in docs.items()))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "fruit"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\ta1\t1\n")
    dot_model = tmp_path / "dot_model"
    model = SentenceTransformer(str(tiny_bi_encoder), device="cpu")
    model.similarity_fn_name = "dot"
    model.save(str(dot_model))
    cfg = compose(["data=beir", f"data.root={folder}", f"artifacts_root={tmp_path / 'art'}", "device=cpu"])
    system = {"name": "x", "model": str(dot_model), "similarity": "auto", "query_prompt": "query: ",
              "corpus_prompt": "passage: "}
    st = SimpleNamespace(timed=lambda name: contextlib.nullcontext(), counts={}, path=tmp_path)
    dense = evaluate._Dense(cfg, system, st)
    assert dense.facts["similarity_used"] == "dot"  # auto follows the model's own similarity
    calls = []
    monkeypatch.setattr(dense, "encode", lambda texts, prompt, desc: calls.append((list(texts), prompt))
                        or np.ones((len(texts), 4), np.float32))
    dense.rerank("rr", {"q1": "fruit"}, Candidates({"q1": ["z9", "a1", "m5"]}, {}, {}), "run.trec")
    assert calls == [(["apples fall", "mangoes ripen", "zebras graze"], "passage: "), (["fruit"], "query: ")]
