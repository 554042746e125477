"""`stage=evaluate`: full-corpus retrieval, reranking and BM25 on every eval set of the data config.

    python -m pipeline stage=evaluate [data=cranfield] [model=minilm] [evaluate.bm25=false]

One artifact folder per system (bi-encoder or BM25), keyed by the system's model identity, the fingerprints of
the corpus and eval-set files, and the evaluate config; it holds ``metrics.json``, ``runs/<eval>.trec``,
``table.md`` and, for retrieval sets, the corpus embeddings (``corpus_emb.f16.npy``). The combined table of all
systems is also written to ``<artifacts_root>/results/<data.name>.md``.

Eval-set kinds
  retrieval  every judged query against the whole corpus: exact search (pipeline.search) over embeddings
             encoded chunk by chunk (evaluate.corpus_chunk passages at a time, stored as float16), so an 8.8M
             corpus needs bounded host memory; depth k = max(evaluate.k, largest metric cutoff).
  rerank     the given candidates of every judged query (TREC-DL top-1000 file, texts from the file; or a TREC
             run, texts from the corpus) scored by the bi-encoder and ranked by that score.
  BM25 (bm25s, Lucene scoring, k1/b/stemmer/stopwords from evaluate.bm25_params) retrieves from the corpus index
  for retrieval sets, and for rerank sets scores only the candidates (corpus statistics, Anserini-style).

Conventions, chosen to equal BEIR's ``EvaluateRetrieval`` and MTEB's retrieval evaluator for a bi-encoder:
  - passage text = ``(title + " " + text).strip()`` (pipeline.readers.Corpus); queries exactly as in the file;
  - prompts: the configured query/corpus prompt (a name in the model's ``prompts`` or literal text); when null,
    the model's ``query`` / ``document`` prompt if it defines one (MTEB's prompt types), else its default;
  - similarity: cosine (embeddings L2-normalised, then dot product) unless the model declares dot product
    (``similarity: auto``) or the system says ``dot``; fp32 encoding (``evaluate.precision: fp32``);
  - queries: only judged queries (those in the qrels file, as BEIR's loader keeps them); qrels are used whole,
    grade-0 rows and queries whose judgements are all 0 included (nDCG counts them as 0); nothing is excluded,
    in particular no document whose id equals the query id is dropped (BEIR's ``ignore_identical_ids`` is not
    applied, as in MTEB's default);
  - depth 1000; metrics from pipeline.metrics (trec_eval through ir-measures: graded gains for nDCG, grade >= 1
    relevant unless the measure says rel=2, ties by document id descending, as pytrec_eval in BEIR/MTEB);
  - the only deviation: corpus embeddings are stored as float16, which moves cosine scores by ~1e-4 and can swap
    near-ties; measured effect on nDCG@10 is far below 0.005.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pipeline import metrics, signals, validate
from pipeline.artifacts import (StageError, atomic_write_json, atomic_write_text, claim_weights, config_key,
                                open_stage, stage_force_id)
from pipeline.config import plain
from pipeline.models import load_bi_encoder, loaded_spec, model_identity, resolve_device
from pipeline.readers import (Candidates, Corpus, DataError, Qrels, check_qrels_in_corpus, corpus_source_fingerprint,
                              read_candidates, read_qrels, read_queries, sources_by_content, write_run)
from pipeline.stages.common import (EMB_FILE, artifacts_root, check_finite, commit_rows, committed_row_count,
                                    compute_dtype, corpus_rows, create_embeddings_file, embedding_key,
                                    embeddings_file_fits, link_embeddings, load_corpus, resolve_prompt,
                                    rows_committed, token_store, write_embedding_rows)
from pipeline.tokens import TextTokens

log = logging.getLogger(__name__)

STAGE = "evaluate"
BM25 = "bm25"
# evaluate keys that change no number of a system (which systems run, how the table is labelled)
_NOT_IDENTITY = {"systems", "bm25", "published_system", "devices"}


# --------------------------------------------------------------------------- configuration


def _systems(cfg: DictConfig) -> list[dict[str, Any]]:
    """The configured systems in table order: BM25 first (the baseline row), then the bi-encoders (their shape is
    checked at the stage entry, pipeline/validate.py)."""
    out = [_bm25_system()] if cfg.evaluate.bm25 else []
    for raw in plain(cfg.evaluate.systems) or []:
        out.append(_dense_system(cfg, str(raw["name"]), str(raw["model"]), str(raw.get("similarity") or "auto"),
                                 raw.get("query_prompt", cfg.model.query_prompt),
                                 raw.get("corpus_prompt", cfg.model.corpus_prompt), raw.get("published")))
    return out


def _bm25_system() -> dict[str, Any]:
    return {"name": "BM25", "model": BM25, "similarity": "bm25"}


def _dense_system(cfg: DictConfig, name: str, model: str, similarity: str = "auto", query_prompt: Any = None,
                  corpus_prompt: Any = None, published: Mapping[str, float] | None = None) -> dict[str, Any]:
    if similarity not in validate.SIMILARITIES:  # evaluate_system's argument: no config checked it
        raise ValueError(f"similarity {similarity!r} of system {name!r}: choose one of "
                         f"{', '.join(validate.SIMILARITIES)}")
    system = {"name": name, "model": model, "similarity": similarity,
              "query_prompt": query_prompt, "corpus_prompt": corpus_prompt}
    if published:
        system["published"] = dict(published)
    return system


def _evals(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    evals = plain(cfg.data.evals) or {}  # their shape is checked at the stage entry (pipeline/validate.py)
    if not evals:
        raise StageError(f"data={cfg.data.name} defines no eval sets (data.evals is empty): nothing to evaluate on")
    return evals


def eval_data_identity(cfg: DictConfig) -> dict[str, Any]:
    """The corpus and every eval set (not the training split), the files they name by content (see
    readers.sources_by_content)."""
    data = plain(cfg.data)
    evals = {name: sources_by_content(ev, ("queries", "qrels", "candidates")) for name, ev in _evals(cfg).items()}
    return {"name": data["name"], "corpus": corpus_source_fingerprint(str(data["corpus"])),
            "repair_encoding": data.get("repair_encoding"), "empty_text": data.get("empty_text"), "evals": evals}


def _evaluate_config(cfg: DictConfig, bm25: bool) -> dict[str, Any]:
    ev = {k: v for k, v in plain(cfg.evaluate).items() if k not in _NOT_IDENTITY}
    dense_only = ("max_seq_length", "precision", "batch_tokens", "corpus_chunk", "search_backend")
    if bm25:
        return {k: v for k, v in ev.items() if k not in dense_only}
    # the dtype "auto" means on this machine (bf16 on a GPU, fp32 on a CPU without bf16): another dtype gives other
    # figures (demo dev RR@10 37.78 in fp32, 37.62 in bf16), which one key must not hold both of
    return {**{k: v for k, v in ev.items() if k != "bm25_params"},
            "dtype": compute_dtype(cfg.evaluate.precision, resolve_device(str(cfg.device)))}


def system_identity(cfg: DictConfig, system: Mapping[str, Any]) -> dict[str, Any]:
    is_bm25 = system["model"] == BM25
    ident = {k: v for k, v in system.items() if k not in ("model", "published")}
    if is_bm25:
        ident["stemmer"] = _stemmer_name(cfg)  # installing PyStemmer changes the numbers, so the key
    else:
        ident["model"] = model_identity(system["model"])
    return {"system": ident, "data": eval_data_identity(cfg), "evaluate": _evaluate_config(cfg, is_bm25)}


def _label_for(cfg: DictConfig, system: Mapping[str, Any]) -> str:
    return f"{cfg.data.name}-{system['name']}"


def identity(cfg: DictConfig) -> dict[str, Any]:
    """Identity of the last configured system: the folder run() returns."""
    systems = _systems(cfg)
    if not systems:
        raise StageError("nothing to evaluate: evaluate.systems is empty and evaluate.bm25 is false")
    return system_identity(cfg, systems[-1])


def label(cfg: DictConfig) -> str:
    systems = _systems(cfg)
    return _label_for(cfg, systems[-1]) if systems else f"{cfg.data.name}-evaluate"


# --------------------------------------------------------------------------- public API


def evaluate_system(cfg: DictConfig, name: str, model_spec: str, similarity: str | None = None) -> dict[str, Any]:
    """Evaluate one bi-encoder (or BM25 with model_spec="bm25") on every eval set of cfg.data, with ``similarity``
    (default: model.similarity, as retrieve and stage=evaluate use it).

    Returns {"name", "metrics": {eval: {measure: value}}, "path"}; a complete folder is reused."""
    similarity = str(cfg.model.get("similarity", "auto")) if similarity is None else similarity
    if str(model_spec) == BM25:
        system = {**_bm25_system(), "name": name}
    else:
        system = _dense_system(cfg, name, str(model_spec), similarity, cfg.model.query_prompt, cfg.model.corpus_prompt)
    return _run_system(cfg, system)


def results_table(rows: Sequence[Mapping[str, Any]], cfg: DictConfig) -> str:
    """Markdown table shaped like the published one: one column per eval set (its headline metric x100), the
    published figure beside the measured one where the row (or cfg.model.published) has it."""
    evals = _evals(cfg)
    titles = [ev.get("title") or f"{ev.get('headline') or ev['metrics'][0]} ({name})" for name, ev in evals.items()]
    lines = ["| Approach | " + " | ".join(titles) + " |", "|---|" + "---|" * len(titles)]
    for row in rows:
        published = _published_for(row, cfg)
        cells = []
        for name, ev in evals.items():
            headline = ev.get("headline") or ev["metrics"][0]
            value = (row.get("metrics") or {}).get(name, {}).get(headline)
            cell = "–" if value is None else f"{100 * value:.2f}"
            if name in published and published[name] is not None:
                cell += f" (published {float(published[name]):.2f})"
            cells.append(cell)
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _published_for(row: Mapping[str, Any], cfg: DictConfig) -> dict[str, Any]:
    """A row's own `published`, else model.published: either {system: {eval: figure}} or a flat {eval: figure}
    that describes the row named evaluate.published_system (the model the recipe reproduces)."""
    if row.get("published"):
        return dict(row["published"])
    model_pub = plain(cfg.model.get("published")) or {}
    if any(isinstance(v, Mapping) for v in model_pub.values()):
        return dict(model_pub.get(row["name"]) or {})
    return dict(model_pub) if row["name"] == cfg.evaluate.published_system else {}


def rows_key(rows: Sequence[Mapping[str, Any]]) -> str:
    """The key of a results table: its rows' names and evaluation folders (each keyed by its own config), so the
    tables of two sweep jobs never overwrite each other and a rerun of one job rewrites its own."""
    return config_key({"rows": [[row["name"], Path(row["path"]).name] for row in rows]})


def write_results(out: Path, text: str) -> bool:
    """Write a results table unless the same one is there; whether it is there now. A root mounted read-only
    (an archive whose stages are all complete, read without their locks) gets a warning, not a traceback after
    every stage was found complete: the caller prints the table anyway (this stage and `stage=all` alike)."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if out.read_text(encoding="utf-8") == text:
            return True
    try:
        atomic_write_text(out, text)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        log.warning("results table not written to %s (%s); it is printed below", out, exc.strerror)
        return False
    return True


@validate.checked
def run(cfg: DictConfig) -> Path:
    systems = _systems(cfg)
    if not systems:
        raise StageError("nothing to evaluate: evaluate.systems is empty and evaluate.bm25 is false")
    rows = [_run_system(cfg, system) for system in systems]
    table = results_table(rows, cfg)
    out = artifacts_root(cfg) / "results" / f"{cfg.data.name}-{rows_key(rows)}.md"
    written = write_results(out, f"# {cfg.data.name}\n\n{table}")
    print(table, flush=True)
    print(f"results table: {out}" + ("" if written else " (not written)"), flush=True)
    return Path(rows[-1]["path"])


# --------------------------------------------------------------------------- one system


def _run_system(cfg: DictConfig, system: dict[str, Any]) -> dict[str, Any]:
    evals = _evals(cfg)
    ident = system_identity(cfg, system)
    with open_stage(STAGE, ident, root=artifacts_root(cfg), label=_label_for(cfg, system),
                    config={"evaluate": plain(cfg.evaluate), "data": plain(cfg.data), "system": system},
                    force=bool(cfg.force), lock_wait_s=float(cfg.lock_wait_s),
                    resumable=True) as st:  # a killed run keeps its committed corpus-encode chunks
        if not st.done:
            scorer = _Bm25(cfg, st) if system["model"] == BM25 else _Dense(cfg, system, st)
            results: dict[str, dict[str, float]] = {}
            coverage: dict[str, dict[str, int]] = {}
            for name, ev in evals.items():
                qrels = read_qrels(str(ev["qrels"]))
                with st.timed(f"{name}.rank"):
                    if ev["kind"] == "retrieval":
                        # closed-corpus retrieval cannot find a judged passage the corpus lacks: as for training
                        check_qrels_in_corpus(qrels, load_corpus(cfg), str(ev["qrels"]),
                                              float(cfg.data.max_missing_qrels))
                        queries = _judged_queries(read_queries(str(ev["queries"])), qrels, name)
                        ranked = scorer.retrieve(name, queries, search_depth(cfg, ev))
                    else:
                        cands = read_candidates(str(ev["candidates"]))
                        queries = _judged_queries(_rerank_queries(ev, cands), qrels, name)
                        _check_candidates_judged(queries, cands, name, str(ev["candidates"]))
                        ranked = scorer.rerank(name, queries, cands, str(ev["candidates"]))
                with st.timed(f"{name}.metrics"):
                    results[name] = metrics.evaluate_run(qrels, ranked, list(ev["metrics"]),
                                                         missing=str(cfg.evaluate.missing_queries))
                    coverage[name] = metrics.coverage(qrels, ranked)
                write_run(st.path / "runs" / f"{name}.trec", ranked, tag=_safe_tag(system["name"]))
                st.counts[f"{name}.queries"] = len(queries)
                st.counts[f"{name}.run_rows"] = sum(len(r) for r in ranked.values())
                log.info("%s on %s: %s", system["name"], name,
                         ", ".join(f"{m}={v:.4f}" for m, v in results[name].items()))
            st.extra.update(scorer.facts)
            doc = {"name": system["name"], "model": system["model"], "similarity": system["similarity"],
                   "data": str(cfg.data.name), "metrics": results, "coverage": coverage, **scorer.facts}
            atomic_write_json(st.path / "metrics.json", doc)
            row = {"name": system["name"], "metrics": results, "published": system.get("published")}
            atomic_write_text(st.path / "table.md", results_table([row], cfg))
    doc = json.loads((st.path / "metrics.json").read_text())
    return {"name": system["name"], "metrics": doc["metrics"], "path": str(st.path),
            **({"published": system["published"]} if system.get("published") else {})}


def run_from_hits(qids: Sequence[str], corpus: Corpus, scores: np.ndarray, idx: np.ndarray
                  ) -> dict[str, dict[str, float]]:
    """{qid: {pid: score}} from a search's scores and corpus rows ([queries, k]); a row of -1 (faiss_ivf finding
    fewer than k) is no result. One dict(zip) a query: 5x faster than a loop per result on 6,980 x 1000 dev hits."""
    ids = corpus.id_at(np.clip(idx.reshape(-1), 0, None))
    found, values, width = idx >= 0, scores.tolist(), idx.shape[1]
    run: dict[str, dict[str, float]] = {}
    for i, qid in enumerate(qids):
        row = ids[i * width:(i + 1) * width]
        run[qid] = dict(zip(row, values[i])) if found[i].all() else \
            {p: v for p, v, ok in zip(row, values[i], found[i]) if ok}
    return run


def _safe_tag(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "run"


def search_depth(cfg: DictConfig, ev: Mapping[str, Any]) -> int:
    """How deep a retrieval eval set is searched: evaluate.k, and at least its metrics' largest cutoff."""
    return max(int(cfg.evaluate.k), metrics.max_cutoff(ev["metrics"]) or 0)


def _rerank_queries(ev: Mapping[str, Any], cands: Candidates) -> dict[str, str]:
    if ev.get("queries"):
        queries = read_queries(str(ev["queries"]))
        # a TREC-DL top-1000 file carries the text of every query it ranks: a query the queries file lacks (another
        # year's or split's file) is still ranked, with the text its candidates were retrieved for, instead of
        # being counted as 0 under a warning that it has no text
        extra = {q: t for q, t in cands.queries.items() if q not in queries}
        if extra:
            log.warning("%s: %d queries of the candidates file are not in %s, e.g. %s; their text is taken from "
                        "the candidates file", ev["candidates"], len(extra), ev["queries"], sorted(extra)[:5])
        return {**queries, **extra}
    if not cands.queries:
        raise DataError(str(ev["candidates"]), None, "a TREC run carries no query texts: set the eval set's queries")
    return dict(cands.queries)


def _judged_queries(queries: Mapping[str, str], qrels: Qrels, eval_name: str) -> dict[str, str]:
    """Only judged queries are ranked (BEIR's loader does the same; trec_eval would ignore the others)."""
    missing = sorted(q for q in qrels if q not in queries)
    if missing:
        log.warning("%s: %d judged queries have no text and are not ranked, e.g. %s", eval_name, len(missing),
                    missing[:5])
    kept = {q: queries[q] for q in qrels if q in queries}
    if not kept:
        raise StageError(f"eval set {eval_name}: no judged query has a text (do queries and qrels match?)")
    return kept


def _check_candidates_judged(queries: Mapping[str, str], cands: Candidates, eval_name: str, source: str) -> None:
    """A rerank set whose candidates rank none of its judged queries (a top-1000 file of another year or split)
    would leave an empty run, which failed deep in the metrics with a traceback: one line naming the file instead.
    Some judged queries without candidates are allowed (counted by evaluate.missing_queries, with a warning)."""
    if not any(cands.ranked.get(q) for q in queries):
        raise StageError(f"eval set {eval_name}: the candidates file {source} ranks none of its {len(queries)} judged "
                         f"queries (e.g. {sorted(queries)[:3]}; it ranks {sorted(cands.ranked)[:3]}): do the "
                         f"candidates, queries and qrels belong to the same set?")


def _corpus_rows(corpus: Corpus, cands: Candidates, source: str) -> dict[str, int]:
    pids = sorted({p for ranked in cands.ranked.values() for p in ranked})
    rows = corpus.lookup(pids)
    missing = [p for p, r in zip(pids, rows) if r < 0]
    if missing:
        raise DataError(source, None, f"{len(missing)} candidate passages are not in the corpus "
                                      f"(data.corpus), e.g. {missing[:5]}")
    return dict(zip(pids, rows.tolist()))


# --------------------------------------------------------------------------- bi-encoder


def encode_devices(setting: Any, device: str) -> list[str]:
    """The devices the corpus encode is split over, one process each ([]: this process alone). auto: every GPU
    this process sees when ``device`` is cuda without an index and there are several; a list names them (two CPU
    entries split it into two CPU processes, which the tests use)."""
    if setting is None or str(setting) == "auto":
        import torch

        if device != "cuda" or torch.cuda.device_count() < 2:
            return []
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    devices = [str(d) for d in setting]
    return devices if len(devices) > 1 else []


def _encode_range(encode: Callable[[Any, int], np.ndarray], corpus: Corpus, store: Any, lo: int, hi: int, chunk: int,
                  target: Path, marks: Path, progress: Callable[[int], Any] | None = None) -> int:
    """Passages lo..hi, ``chunk`` at a time, through ``encode(items, first row)`` (token-store views or texts in,
    embeddings out) into the float16 file ``target``; each chunk written is committed with a marker in ``marks``, and
    a chunk already committed is skipped. Returns the dimension (0 when every chunk was already done). Used by the
    one-process encode and by each process of the split one."""
    dim = 0
    for a in range(lo, hi, chunk):
        b = min(hi, a + chunk)
        if not rows_committed(marks, a, b):
            emb = encode(corpus_rows(corpus, store, a, b), a)
            dim = int(emb.shape[1])
            write_embedding_rows(target, len(corpus), a, emb, marks)
            commit_rows(marks, a, b)
        if progress is not None:
            progress(b - a)
        signals.stop_if_requested()
    return dim


#: the corpus embeddings while they are encoded, and the markers of the committed chunks (see _Dense._encode_corpus)
PARTIAL_FILE = "corpus_emb.partial.f16.npy"
PARTIAL_MARKS = "corpus_emb.chunks"


def _encode_part(job: dict[str, Any], device: str, lo: int, hi: int) -> None:  # pragma: no cover - subprocess
    """One process of _Dense._encode_corpus_split: passages lo..hi on ``device``, into the shared float16 file."""
    from pipeline.engine import device_worker_setup, encode_texts
    from pipeline.tokens import TokenStore

    device_worker_setup(device, int(job["processes"]))
    model = load_bi_encoder(job["model"], device=device, artifacts_root=job["artifacts_root"],
                            max_seq_length=job["max_seq_length"])

    store = TokenStore.load(Path(job["store"])) if job["store"] else None
    with signals.deferred():  # a signal (from the parent, or the scheduler's to every process) ends a chunk first
        _encode_range(lambda items, _: encode_texts(model, items, prompt=job["prompt"], normalize=job["normalize"],
                                                 batch_tokens=job["batch_tokens"], precision=job["precision"],
                                                 show_progress=False),
                      Corpus(Path(job["corpus"])), store, lo, hi, job["chunk"], Path(job["target"]),
                      Path(job["marks"]))


class _Dense:
    def __init__(self, cfg: DictConfig, system: Mapping[str, Any], st):
        from pipeline import engine

        self.cfg, self.system, self.st = cfg, system, st
        self.device = resolve_device(str(cfg.device))
        with st.timed("load_model"):
            try:
                self.model = load_bi_encoder(str(system["model"]), device=self.device,
                                             artifacts_root=str(artifacts_root(cfg)),
                                             max_seq_length=cfg.evaluate.max_seq_length)
            except StageError as exc:  # a wrong path or an unreachable hub id (models._loading): say which system
                raise StageError(f"system {system['name']!r}: {exc}") from exc
        claim_weights(st.path, str(system["model"]))
        sim = system["similarity"]
        self.dot = sim == "dot" or (sim == "auto" and engine.uses_dot_product(self.model))
        self.query_prompt = resolve_prompt(self.model, system.get("query_prompt"), "query")
        self.corpus_prompt = resolve_prompt(self.model, system.get("corpus_prompt"), "document")
        self._corpus: Corpus | None = None
        self._emb: np.ndarray | None = None
        self.facts: dict[str, Any] = {
            "similarity_used": "dot" if self.dot else "cosine", "query_prompt": self.query_prompt,
            "corpus_prompt": self.corpus_prompt, "max_seq_length": int(self.model.max_seq_length or 0),
            "precision": str(cfg.evaluate.precision), "dtype": compute_dtype(cfg.evaluate.precision, self.device),
            "device": self.device}

    def encode(self, texts: Sequence[str] | TextTokens, prompt: str | None, desc: str) -> np.ndarray:
        from pipeline.engine import encode_texts

        texts = texts if isinstance(texts, TextTokens) else list(texts)
        return encode_texts(self.model, texts, prompt=prompt, normalize=None if self.dot else True,
                            batch_tokens=self.cfg.evaluate.batch_tokens, precision=str(self.cfg.evaluate.precision),
                            desc=desc)

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            with self.st.timed("load_corpus"):
                self._corpus = load_corpus(self.cfg)
            self.st.counts["corpus"] = len(self._corpus)
        return self._corpus

    def corpus_embeddings(self) -> np.ndarray:
        if self._emb is None:
            target = self.st.path / EMB_FILE
            key = self._embedding_key()
            self.facts["embedding_key"] = key
            # a file in place is complete (it is renamed there whole): an earlier attempt stopped after the encode
            forced_run = stage_force_id() if self.cfg.force else None  # a forced stage links only fresh embeddings
            if not target.is_file() and not link_embeddings(artifacts_root(self.cfg), key, target, self.st.path,
                                                            forced_run=forced_run):
                with self.st.timed("encode_corpus"):
                    self._encode_corpus(target)
            # linked from elsewhere after an attempt of its own was cut short: its partial rows are not needed
            (self.st.path / PARTIAL_FILE).unlink(missing_ok=True)
            shutil.rmtree(self.st.path / PARTIAL_MARKS, ignore_errors=True)
            self._emb = np.load(target, mmap_mode="r")
            if self._emb.shape[0] != len(self.corpus):
                raise StageError(f"{target}: {self._emb.shape[0]} embeddings for {len(self.corpus)} passages")
        return self._emb

    def _embedding_key(self) -> str:
        return embedding_key(str(self.system["model"]), self.corpus, self.corpus_prompt, not self.dot,
                             self.facts["max_seq_length"], self.facts["precision"], self.device)

    @signals.deferred()  # a SIGTERM/SIGUSR1/SIGUSR2 stops the encode after the chunk in progress is committed
    def _encode_corpus(self, target: Path) -> None:
        """The corpus encode, resumable: rows go into ``PARTIAL_FILE`` chunk by chunk, each committed chunk leaves a
        marker in ``PARTIAL_MARKS``, and a rerun of this folder (same key) encodes only the chunks without one. The
        file is renamed to ``target`` when every chunk is in."""
        from tqdm.auto import tqdm

        from pipeline.engine import embedding_dimension

        corpus, chunk = self.corpus, max(1, int(self.cfg.evaluate.corpus_chunk))
        dim = embedding_dimension(self.model)
        partial, marks = self.st.path / PARTIAL_FILE, self.st.path / PARTIAL_MARKS
        if not embeddings_file_fits(partial, len(corpus), dim):  # continued only where this encode writes its shape
            partial.unlink(missing_ok=True)
            shutil.rmtree(marks, ignore_errors=True)
        marks.mkdir(parents=True, exist_ok=True)
        done = committed_row_count(marks)
        if done:
            log.info("evaluate: resuming the corpus encode, %d of %d passages already in %s", done, len(corpus),
                     partial)
        self.st.counts["corpus_rows_resumed"] = done
        with self.st.timed("token_store"):
            store = token_store(self.cfg, corpus, self.model, self.corpus_prompt)
        self.facts["token_store"] = str(store.folder) if store is not None else None
        devices = encode_devices(self.cfg.evaluate.devices, self.device)
        self.facts["encode_devices"] = devices or [self.device]
        if devices:
            self._encode_corpus_split(partial, marks, store, devices, dim)
        else:
            bar = tqdm(total=len(corpus), initial=done, desc="corpus embeddings", unit=" passages",
                       disable=len(corpus) <= chunk)

            def encode(items, lo: int) -> np.ndarray:
                return self.encode(items, self.corpus_prompt, desc=f"encode corpus {lo:,}+")

            dim = _encode_range(encode, corpus, store, 0, len(corpus), chunk, partial, marks, bar.update) or dim
            bar.close()
        os.replace(partial, target)
        shutil.rmtree(marks, ignore_errors=True)
        self.st.counts["corpus_embeddings"] = len(corpus)
        self.facts["embedding_dim"] = dim

    def _encode_corpus_split(self, partial: Path, marks: Path, store: Any, devices: list[str], dim: int) -> None:
        """The corpus encode over several devices, one spawned process each on a contiguous range of passages,
        each writing its rows straight into the float16 file (nothing gathered in one process's memory)."""
        from multiprocessing.connection import wait as wait_any

        import torch.multiprocessing as mp

        if dim <= 0:
            raise StageError(f"system {self.system['name']!r}: the model states no embedding dimension, which a "
                             f"corpus encode split over {devices} needs; set evaluate.devices=[]")
        n = len(self.corpus)
        create_embeddings_file(partial, n, dim, marks)  # here, at its full size: the processes only write rows into it
        bounds = np.linspace(0, n, len(devices) + 1).astype(int)
        job = {"model": loaded_spec(self.system["model"]), "artifacts_root": str(artifacts_root(self.cfg)),
               "max_seq_length": self.cfg.evaluate.max_seq_length, "corpus": str(self.corpus.folder),
               "store": str(store.folder) if store is not None else None, "prompt": self.corpus_prompt,
               "normalize": None if self.dot else True, "batch_tokens": self.cfg.evaluate.batch_tokens,
               "precision": str(self.cfg.evaluate.precision), "chunk": max(1, int(self.cfg.evaluate.corpus_chunk)),
               "target": str(partial), "marks": str(marks), "processes": len(devices)}
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_encode_part, args=(job, dev, int(lo), int(hi)), daemon=True)
                 for dev, lo, hi in zip(devices, bounds[:-1], bounds[1:]) if hi > lo]
        log.info("evaluate: encoding %d passages on %s, one process each", n, ", ".join(devices))
        try:
            for proc in procs:
                proc.start()
            forwarded = False
            while any(proc.is_alive() for proc in procs):
                wait_any([proc.sentinel for proc in procs if proc.is_alive()], timeout=0.5)
                if signals.requested() is not None and not forwarded:
                    # the signal may have reached this process alone (submitit's local executor, a kill by pid):
                    # each encoding process commits its chunk in progress and stops too, instead of finishing
                    # its whole range while this one waits
                    for proc in procs:
                        if proc.is_alive():
                            os.kill(proc.pid, signals.requested())
                    forwarded = True
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
        signals.stop_if_requested()  # stopped by a signal: the committed chunks stay, the rerun encodes the rest
        failed = [(dev, proc.exitcode) for dev, proc in zip(devices, procs) if proc.exitcode != 0]
        if failed:
            raise StageError(f"system {self.system['name']!r}: the corpus encode failed on {failed} "
                             f"(device, exit code); its log is above")

    def retrieve(self, name: str, queries: Mapping[str, str], k: int) -> dict[str, dict[str, float]]:
        from pipeline.search import search

        emb = self.corpus_embeddings()
        qids = list(queries)
        q_emb = self.encode([queries[q] for q in qids], self.query_prompt, desc=f"encode {name} queries")
        check_finite(q_emb, f"{name} query")
        k = min(k, emb.shape[0])
        backend = str(self.cfg.evaluate.search_backend)
        kw = {"device": self.device} if backend in ("torch", "exact") else {}  # faiss picks its own device
        scores, idx = search(q_emb, emb, k, backend=backend, **kw)
        scores, idx = np.asarray(scores), np.asarray(idx)
        return run_from_hits(qids, self.corpus, scores, idx)

    def rerank(self, name: str, queries: Mapping[str, str], cands: Candidates, source: str
               ) -> dict[str, dict[str, float]]:
        qids = [q for q in queries if cands.ranked.get(q)]
        pids = sorted({p for q in qids for p in cands.ranked[q]})
        if cands.passages:  # a TREC-DL top-1000 file: the protocol ranks the texts it carries
            texts = [cands.passages[p] for p in pids]
        else:
            rows = _corpus_rows(self.corpus, Candidates({q: cands.ranked[q] for q in qids}, {}, {}), source)
            texts = self.corpus.texts_at([rows[p] for p in pids])
        p_emb = self.encode(texts, self.corpus_prompt, desc=f"encode {name} candidates")
        q_emb = self.encode([queries[q] for q in qids], self.query_prompt, desc=f"encode {name} queries")
        row_of = {p: i for i, p in enumerate(pids)}
        run = {}
        for i, qid in enumerate(qids):
            rows = np.array([row_of[p] for p in cands.ranked[qid]])
            sims = p_emb[rows] @ q_emb[i]
            run[qid] = {p: float(s) for p, s in zip(cands.ranked[qid], sims)}
        return run


# --------------------------------------------------------------------------- BM25


def _stemmer_name(cfg: DictConfig) -> str | None:
    wanted = cfg.evaluate.bm25_params.stemmer
    if not wanted:
        return None
    try:
        import Stemmer  # noqa: F401  (PyStemmer)
    except ImportError:
        return None
    return str(wanted)


class _Bm25:
    def __init__(self, cfg: DictConfig, st):
        self.cfg, self.st = cfg, st
        p = cfg.evaluate.bm25_params
        self.k1, self.b = float(p.k1), float(p.b)
        self.stopwords = p.stopwords or []
        self.stemmer_name = _stemmer_name(cfg)
        if p.stemmer and not self.stemmer_name:
            log.warning("BM25: PyStemmer is not installed, tokenising without a stemmer (pip install PyStemmer "
                        "for Anserini-like numbers)")
        self._index = None
        self.facts: dict[str, Any] = {"bm25": {"k1": self.k1, "b": self.b, "stemmer": self.stemmer_name,
                                               "stopwords": p.stopwords, "method": "lucene"}}

    def _build(self):
        if self._index is None:
            import bm25s
            from bm25s.tokenization import Tokenizer

            stemmer = None
            if self.stemmer_name:
                import Stemmer

                stemmer = Stemmer.Stemmer(self.stemmer_name).stemWord  # bm25s calls it per word
            with self.st.timed("load_corpus"):
                self.corpus = load_corpus(self.cfg)
            self.st.counts["corpus"] = len(self.corpus)
            self.tokenizer = Tokenizer(stopwords=self.stopwords, stemmer=stemmer)
            with self.st.timed("bm25_index"):
                texts = (t for _, _, batch in self.corpus.iter_batches(65536) for t in batch)
                tokens = self.tokenizer.tokenize(texts, return_as="ids", length=len(self.corpus))
                retriever = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
                retriever.index(tokens)
            self._index = retriever
        return self._index

    def _query_tokens(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.tokenize(texts, update_vocab=False, return_as="ids", show_progress=False)

    def retrieve(self, name: str, queries: Mapping[str, str], k: int) -> dict[str, dict[str, float]]:
        index = self._build()
        qids = list(queries)
        k = min(k, len(self.corpus))
        docs, scores = index.retrieve(self._query_tokens([queries[q] for q in qids]), k=k, n_threads=0)
        ids = self.corpus.id_at(np.asarray(docs).reshape(-1))
        run = {}
        for i, qid in enumerate(qids):
            # Lucene retrieves only documents sharing a term with the query: zero scores are not retrievals.
            run[qid] = {ids[i * k + j]: float(s) for j, s in enumerate(scores[i]) if s > 0}
        return run

    def rerank(self, name: str, queries: Mapping[str, str], cands: Candidates, source: str
               ) -> dict[str, dict[str, float]]:
        index = self._build()
        qids = [q for q in queries if cands.ranked.get(q)]
        rows = _corpus_rows(self.corpus, Candidates({q: cands.ranked[q] for q in qids}, {}, {}), source)
        tokens = self._query_tokens([queries[q] for q in qids])
        run = {}
        for qid, toks in zip(qids, tokens):
            all_scores = index.get_scores(toks)
            run[qid] = {p: float(all_scores[rows[p]]) for p in cands.ranked[qid]}
        return run
