"""`stage=plan`: what a run will do and cost, from the config and file sizes alone (no model is loaded).

Counts come from the files where they exist, else from `data.sizes` (MS MARCO knows them before the files are
fetched); the corpus and the training qrels, which counting would read for a minute, take `data.sizes` unless their
file's size says it holds another number of lines (a folder holding a sample);
throughput figures come from `conf/plan` (measured by scripts/bench_gpu.py, stated there), or straight from a
bench's JSON output (`plan.bench_json`)."""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline import validate
from pipeline.artifacts import StageError, atomic_write_json
from pipeline.models import precision_name
from pipeline.stages.common import artifacts_root
from pipeline.tokens import wanted as tokens_wanted

log = logging.getLogger(__name__)


def identity(cfg: DictConfig) -> dict:
    return {"plan": True}


def label(cfg: DictConfig) -> str:
    return "plan"


def _data_file(path: str | None) -> Path | None:
    """The file a data source reads (a BEIR folder's corpus file), None for hf:/irds: ids and what does not exist."""
    if not path or str(path).startswith(("hf:", "irds:")):
        return None
    p = Path(str(path))
    if p.is_dir():
        p = next((p / n for n in ("corpus.jsonl", "corpus.jsonl.gz") if (p / n).exists()), p)
    return p if p.is_file() else None


def _gzipped(p: Path) -> bool:
    with open(p, "rb") as fh:  # the magic bytes only: a corpus is gigabytes
        return fh.read(2) == b"\x1f\x8b"


def _count_lines(path: str | None) -> int | None:
    p = _data_file(path)
    if p is None:
        return None
    with (gzip.open if _gzipped(p) else open)(p, "rb") as fh:
        return sum(1 for _ in fh)


_SAMPLE_BYTES = 8 << 20  # text read to estimate a file's lines


def _estimate_lines(path: str | None) -> float | None:
    """A file's lines estimated from its size and its first 8 MiB of text (exact for a smaller file): a check on a
    data.sizes count that costs milliseconds where counting MS MARCO's collection takes a minute."""
    p = _data_file(path)
    if p is None:
        return None
    with open(p, "rb") as raw:
        if _gzipped(p):
            # zlib, not GzipFile: the file's position is past what GzipFile's read-ahead took (128 KiB from Python
            # 3.12, most of a well-compressed sample); what zlib leaves unread is exact
            z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            compressed = raw.read(_SAMPLE_BYTES)  # at least about as much text
            head = z.decompress(compressed, _SAMPLE_BYTES)
            consumed = len(compressed) - len(z.unconsumed_tail) - len(z.unused_data)  # the bytes behind `head`
            whole = z.eof and not z.unused_data and not raw.read(1)
        else:
            head = raw.read(_SAMPLE_BYTES)
            consumed, whole = len(head), not raw.read(1)
    lines = head.count(b"\n") + (bool(head) and not head.endswith(b"\n"))
    return float(lines) if whole else lines * p.stat().st_size / max(consumed, 1)


def _size_or_none(known: Any, size: str, key: str, source: Any, low: float, high: float | None) -> int | None:
    """``known`` (the count data.sizes' ``size`` gives) unless the file ``key`` names has far fewer (or, with
    ``high``, more) lines than it implies: a data config's counts describe the full dataset, and a folder holding a
    sample of it (data.root or MSMARCO_DIR pointed at a subset) was costed as the whole; the file is then counted."""
    if not known:
        return None
    lines = _estimate_lines(source)
    if lines is None or (low * known <= lines and (high is None or lines <= high * known)):
        return int(known)
    log.warning("%s=%s has about %s lines where %s=%s: counted from the file instead", key, source,
                f"{lines:,.0f}", size, f"{int(known):,}")
    return None


def _why_uncounted(key: str, source: Any, size: str) -> str:
    """Why the plan could not count what ``key`` names (``size``: the data.sizes key that would give it): planning
    before the data is fetched is meant to work, but a mistyped path must not pass for an empty corpus."""
    if not source:
        return f"{key} is not set and data.sizes does not count it"
    if str(source).startswith(("hf:", "irds:")):
        return f"{key}={source} is counted only from data.sizes"
    folder = Path(str(source)).is_dir()
    missing = ("holds no corpus.jsonl[.gz]" if key == "data.corpus" else "is a folder") if folder else "does not exist"
    return (f"{key}={source} {missing}; to plan before fetching give {size}=N (+{size}=N where the data "
            f"config has no sizes)")


def _positives_per_query(path: str | None, min_grade: int) -> list[int] | None:
    """Judged positives of each query with at least one, most first; None without a readable qrels file."""
    if not path or not Path(str(path)).is_file():
        return None
    from pipeline.readers import positives, read_qrels

    return sorted((len(ps) for ps in positives(read_qrels(str(path)), min_grade).values()), reverse=True)


def _rerank_passages(candidates: Path, judged: Mapping[str, Any]) -> int:
    """The passages evaluate encodes for a rerank set: the distinct candidates of its judged queries, from the
    candidates file as evaluate reads it (a TREC-DL top-1000 file or a TREC run)."""
    from pipeline.readers import read_candidates

    ranked = read_candidates(str(candidates)).ranked
    return len({p for q in judged for p in ranked.get(q, ())})


def _triplets_per_epoch(positive_counts: list[int] | None, per_query: int | None, train_q: int) -> int:
    """Triplets an epoch: per_query per training query, at most one per judged positive (train.triplets_per_query;
    null = every positive). Without the counts (sizes given in the data config, no qrels), per_query per query."""
    if per_query == 1 or positive_counts is None:
        return train_q * (per_query or 1)
    return sum(min(c, per_query or c) for c in positive_counts[:train_q])


def _hours(work: float, rate: float) -> float:
    return work / rate / 3600 if rate else float("nan")


def _gpu_memory_gb(params_m: float, train: bool, batch_tokens: int, hidden: int = 768, layers: int = 12) -> float:
    """Rough peak: weights (bf16) + activations of one token-budget batch; training adds fp32 master
    weights, AdamW moments and gradients (16 bytes/param) and stored activations."""
    weights = params_m * 1e6 * 2
    acts = batch_tokens * hidden * layers * 2 * (14 if train else 4)
    optim = params_m * 1e6 * 16 if train else 0
    return (weights + acts + optim) / 1e9 + 1.0  # + CUDA context


#: the rows the stages' path for a corpus with a token store (token_cache) is measured by
_STORE_SYSTEM = "ours, inputs from the token store"
#: plan figure -> (bench row, system-name prefix) it is read from: this project's figures, the keys of
#: conf/plan's `pipeline` (the token store's build, read from two rows, is picked on its own)
_BENCH_FIGURES = {
    "encode_passages": ("encode", "ours (stage defaults"),
    "encode_passages_store": ("encode", _STORE_SYSTEM),
    "encode_passages_fp32": ("encode", "ours fp32"),  # a retrieve or evaluate at precision=fp32
    "score_pairs": ("score", "ours (stage defaults"),
    "score_pairs_store": ("score", _STORE_SYSTEM),
    "search_queries": ("search", "ours exact_search"),
    "train_triplets": ("train", "ours_compiled (train stage"),  # train.compile_layers (the default)
    "train_triplets_eager": ("train", "ours (train stage"),
}
#: the library's figures, same rows: conf/plan's `baseline`
_BENCH_BASELINES = {
    "encode_passages": ("encode", "ST encode fp32 default"),
    "score_pairs": ("score", "CE predict fp32 default"),
    "search_queries": ("search", "ST util.semantic_search"),
    "train_triplets": ("train", "baseline (SentenceTransformerTrainer"),
}


def choose_figures(figures: dict, use_store: bool, compiled_train: bool) -> tuple[dict[str, Any], list[str]]:
    """The figures a run is costed at, from a set in conf/plan's `pipeline` layout (from the config or a bench
    file), and notes for the source line. ``use_store``: the encode and score figures of inputs from a corpus
    token store (what the stages run where token_cache is on), where the set has them; the store's build is then a
    step of its own (``tokenise_passages``), since those figures no longer include tokenising. ``compiled_train``
    (train.compile_layers): the training figure with compiled layers, else the eager one; either stands in for the
    other where it is missing (a bench run whose time budget skipped the compiled row: a lower bound, said so; a
    config without an eager figure)."""
    ours = {key: figures.get(key) for key in ("encode_passages", "score_pairs", "search_queries",
                                              "encode_passages_fp32")}
    store_used, notes = [], []
    has_store_figures = any(figures.get(f"{key}_store") for key in ("encode_passages", "score_pairs"))
    if use_store and has_store_figures and not figures.get("tokenise_passages"):
        # store rates exclude tokenising: without the build's rate they would cost the tokenising at nothing
        notes.append("no token-store build figure: encode/score at their from-texts rates")
        use_store = False
    for key, row in (("encode_passages", "encode"), ("score_pairs", "score")):
        if use_store and figures.get(f"{key}_store"):
            ours[key] = figures[f"{key}_store"]
            store_used.append(row)
    if store_used:
        notes.append(f"encode/score from the token store: {', '.join(store_used)}")
        ours["tokenise_passages"] = figures.get("tokenise_passages")
    compiled, eager = figures.get("train_triplets"), figures.get("train_triplets_eager")
    ours["train_triplets"] = (compiled or eager) if compiled_train else (eager or compiled)
    if compiled_train and not compiled and eager:
        notes.append("train: eager layers' figure (no compiled-layers row in the file)")
    return ours, notes


def figures_from_bench(path: str, use_store: bool, compiled_train: bool = False
                       ) -> tuple[dict[str, float], dict[str, float], str]:
    """(pipeline figures, baseline figures, source line) from a scripts/bench_gpu.py --out JSON, chosen by
    :func:`choose_figures` (the token store's build: with tokeniser processes where the file has that row)."""
    import json

    try:
        doc = json.loads(Path(path).read_text())
    except (ValueError, OSError) as exc:  # the bench's .txt report, say, which the plan names as its source
        raise StageError(f"plan.bench_json={path} is not readable JSON ({exc}); give the file scripts/bench_gpu.py "
                         f"--out wrote") from None
    if not isinstance(doc, dict):
        raise StageError(f"plan.bench_json={path} is not an object of rows; give the file scripts/bench_gpu.py --out "
                         f"wrote")
    rows = doc.get("rows", {})

    def pick(row: str, prefix: str) -> float | None:
        for rec in rows.get(row, []) if isinstance(rows.get(row), list) else []:
            if str(rec.get("system", "")).startswith(prefix) and rec.get("throughput") == rec.get("throughput"):
                return float(rec["throughput"])
        return None

    measured = {key: pick(*where) for key, where in _BENCH_FIGURES.items()}
    measured["tokenise_passages"] = pick("encode", "token store build, ") or pick("encode", "token store build")
    base = {key: pick(*where) for key, where in _BENCH_BASELINES.items()}
    ours, notes = choose_figures(measured, use_store, compiled_train)
    missing = [f"{row}: {prefix}" for key, (row, prefix) in _BENCH_FIGURES.items()
               if key in ("encode_passages", "score_pairs", "search_queries") and measured[key] is None]
    train = ours["train_triplets"] if compiled_train else measured["train_triplets_eager"]
    missing += [] if train else [f"train: {_BENCH_FIGURES['train_triplets_eager'][1]}"]
    missing += [f"{row}: {prefix}" for key, (row, prefix) in _BENCH_BASELINES.items() if base[key] is None]
    if missing:
        raise StageError(f"plan.bench_json={path} lacks the rows {missing}")
    env = doc.get("env", {})
    source = (f"{path} ({env.get('device', '?')}, torch {env.get('torch', '?')}"
              + "".join(f"; {n}" for n in notes) + ")")
    return ours, base, source


def _gpu_dtype(precision: Any) -> str:
    """The compute dtype a precision setting means on a GPU (engine.resolve_precision: auto is bf16 there)."""
    name = precision_name(precision)
    return "bf16" if name == "auto" else name


def _same_gpu_embeddings(cfg: DictConfig) -> bool:
    """Whether the chain's v2 evaluation would find retrieve's corpus embeddings to link on a GPU: same dtype and
    truncation (model, corpus, prompt and similarity are the chain's own in both)."""
    dtype = [_gpu_dtype(x) for x in (cfg.retrieve.precision, cfg.evaluate.precision)]
    return dtype[0] == dtype[1] and cfg.retrieve.max_seq_length == cfg.evaluate.max_seq_length


def estimate(cfg: DictConfig) -> dict[str, Any]:
    sizes = dict(cfg.data.get("sizes") or {})
    p = cfg.plan
    # a passage a line (BEIR's corpus.jsonl too); a qrels file has a line or more for each query with a positive
    corpus = (_size_or_none(sizes.get("corpus"), "data.sizes.corpus", "data.corpus", cfg.data.corpus, 0.8, 1.25)
              or _count_lines(cfg.data.corpus))
    known_train_q = _size_or_none(sizes.get("train_queries"), "data.sizes.train_queries", "data.train.qrels",
                                  cfg.data.train.qrels, 0.8, None)
    per_query = cfg.train.get("triplets_per_query", 1)
    per_query = None if per_query is None else int(per_query)
    # the training qrels are read once, and only when the data config's sizes leave something to count
    train_positives = (_positives_per_query(cfg.data.train.qrels, int(cfg.data.train.min_grade))
                       if not known_train_q or per_query != 1 else None)
    train_q = known_train_q or (None if train_positives is None else len(train_positives))
    if cfg.data.train.max_queries and train_q:
        train_q = min(train_q, int(cfg.data.train.max_queries))
    known_eval = dict(sizes.get("eval_queries") or {})
    known_rerank = dict(sizes.get("rerank_passages") or {})
    eval_q = {}
    counted = [("corpus passages", "data.corpus", cfg.data.corpus, "data.sizes.corpus", corpus),
               ("training queries", "data.train.qrels", cfg.data.train.qrels, "data.sizes.train_queries", train_q)]
    rerank_passages = 0
    from pipeline.readers import positives, read_qrels

    for name, ev in cfg.data.evals.items():
        # eval qrels and top-1000 files are small: counted where they exist (a sample folder's are not the sizes'),
        # the qrels read once for both counts
        judged = read_qrels(str(ev.qrels)) if ev.qrels and Path(str(ev.qrels)).is_file() else None
        count = (None if judged is None else len(positives(judged, 1))) or known_eval.get(name)
        eval_q[name] = {"kind": str(ev.kind), "queries": count}
        counted.append((f"{name} queries", f"data.evals.{name}.qrels", ev.qrels, f"data.sizes.eval_queries.{name}",
                        count))
        if str(ev.kind) == "rerank":
            candidates = _data_file(ev.get("candidates"))
            passages = ((_rerank_passages(candidates, judged) if candidates and judged is not None else None)
                        or known_rerank.get(name))
            needs = "qrels" if candidates else "candidates"  # the file that is missing
            counted.append((f"{name} rerank passages", f"data.evals.{name}.{needs}", ev.get(needs),
                            f"data.sizes.rerank_passages.{name}", passages))
            rerank_passages += passages or 0
    unknown = [f"{what} ({_why_uncounted(key, source, size)})" for what, key, source, size, count in counted
               if count is None]
    corpus, train_q = corpus or 0, train_q or 0
    evaluate_only = str(p.chain) == "evaluate"
    # stage=all's rounds: each retrieves, scores, mines and trains with the model the round before trained
    rounds = 0 if evaluate_only else max(1, int(cfg.get("iterations", 1)))
    if evaluate_only:
        train_q = 0
        dense_systems = len(cfg.evaluate.systems)
    else:
        dense_systems = 1 + rounds  # v2 before training, then each round's model (v3, v4, ...)
    top_k = int(cfg.retrieve.top_k)
    depth = int(cfg.score.depth or top_k)
    # every judged positive is scored, retrieved or not: the mean per query where the qrels were read, else one
    positives_per_query = (sum(train_positives) / len(train_positives)) if train_positives else 1.0
    # candidates plus the positives, each round (an upper bound: the pair cache reuses the pairs a later round
    # retrieves again, and a retrieved positive is one pair, not two)
    pairs = int(rounds * train_q * (depth + positives_per_query))
    # the teacher (trained first when no cross-encoder is given): (positive + sampled negatives) pairs per query and
    # epoch, each costed as three scored pairs (forward and backward)
    from pipeline.stages import teacher

    teacher_pairs = 0
    if rounds and teacher.needed(cfg):
        tc = cfg.teacher
        kept_positives = min(positives_per_query, float(tc.positives_per_query or positives_per_query))
        teacher_pairs = int(train_q * (kept_positives + int(tc.negatives_per_query)) * int(tc.epochs))
    retrieval_evals = [n for n, v in eval_q.items() if v["kind"] == "retrieval"]
    # each round's retrieve and the evaluation of the same model share one corpus encode when their embeddings are
    # the same (common.embedding_key): v2's evaluation links retrieve's, a later round's retrieve links the
    # evaluation of the model it retrieves with
    reused = not evaluate_only and bool(train_q) and bool(retrieval_evals) and _same_gpu_embeddings(cfg)
    encode = {"retrieve": rounds * corpus if train_q else 0,
              "evaluate": dense_systems * (corpus * bool(retrieval_evals) + rerank_passages)
              - rounds * corpus * reused}
    fp32 = {stage: _gpu_dtype(cfg[stage].precision) == "fp32"
            for stage in ("retrieve", "score", "evaluate")}
    searched = rounds * train_q + dense_systems * sum(eval_q[n]["queries"] or 0 for n in retrieval_evals)
    # the depth each search goes to: retrieve's top_k for training queries, evaluate's for the dev queries; the
    # line said top-100 for an evaluation-only plan searching top-1000
    from pipeline.stages.evaluate import search_depth

    eval_depth = max((search_depth(cfg, cfg.data.evals[n]) for n in retrieval_evals), default=int(cfg.evaluate.k))
    depths = [*([f"training top-{top_k}"] if rounds * train_q else []),
              *([f"evaluation top-{eval_depth}"] if retrieval_evals else [])]
    batch = int(cfg.train.batch_size)
    triplets = rounds * int(_triplets_per_epoch(train_positives, per_query, train_q) * float(p.epochs))
    negatives = int(cfg.mine.num_negatives_per_system or depth) * (1 + len(cfg.mine.systems or []))
    pool_rows = train_q * (1 + min(negatives, int(cfg.mine.max_negatives or negatives)))  # the mine stage's pools
    dim = int(p.embedding_dim)
    disk = {
        "corpus_arrow": corpus * 350 / 1e9,  # ~350 bytes of text per MS MARCO passage
        "corpus_embeddings_per_model": corpus * dim * 2 / 1e9,
        # token_cache: uint16 tokens (data.sizes.tokens_per_passage, else MS MARCO's ~83) + 12 bytes of offsets and
        # lengths per passage, per tokenizer
        "corpus_tokens_per_tokenizer": corpus * (float(sizes.get("tokens_per_passage") or 83) * 2 + 12) / 1e9
        if tokens_wanted(cfg.token_cache, corpus) else 0.0,
        "candidates": train_q * top_k * 24 / 1e9,
        "scores_and_pair_cache": 2 * pairs * 24 / 1e9,
        "model_and_checkpoints": 3 * p.params_m.bi_encoder * 1e6 * 4 * 3 / 1e9,
    }
    search_chunk = min(corpus, int(cfg.retrieve.get("encode_block", 262144) or 262144))
    host_ram = {  # what stays resident; the corpus Arrow file and embeddings are memory-mapped (page cache)
        # measured (tiny model, CPU): 200k passages, 20k queries x top-100 -> 2.76 GB peak RSS; the merge streams
        # the candidates one query block (~32 B a row) at a time
        "retrieve": 2.7 + search_chunk * dim * 4 * 2 / 1e9 + train_q * dim * 4 / 1e9
        + min(train_q, int(cfg.retrieve.query_block)) * top_k * 32 / 1e9,
        # 1.0 GB for the process (torch, the cross-encoder, CUDA context) + the stage's own memory, measured by
        # scripts/bench_score.py (trivial scorer; peak RssAnon over the imports, worst of an empty and a full pair
        # cache): 0.29 / 0.45 / 0.85 / 1.25 / 1.85 GB at 1.0 / 2.0 / 5.0 / 10.0 / 25.1M pairs, under 0.6 GB + 75 B
        # per pair at every point (13 B/pair of codes, the cache join's 24 B/pair and its 4M-row groups, Arrow's pool)
        "score": 1.0 + 0.6 + pairs * 75 / 1e9,
        "mine": 1.0 + pairs * 40 / 1e9,  # the scored table's columns, vectorised
        # 4.0 GB for the process, model and trainer (a formula, not measured) + the data path, measured by
        # scripts/bench_train_data.py (pools.parquet -> rotation -> dataset; peak RssAnon over the imports): 1.57 /
        # 1.58 GB at 10.5M pool rows with 0.5M / 5M triplets (the v3 recipe: 500k queries x 21 rows, 1 / 10 epochs)
        "train": 4.0 + pool_rows * 160 / 1e9 + triplets * 48 / 1e9,
        # + the run of the largest retrieval eval set as {qid: {pid: score}} and trec_eval over it:
        # scripts/bench_eval_metrics.py, 6,980 dev queries x top-1000 -> 1.32 GB over the imports (198 B a result)
        "evaluate": 2.0 + min(corpus, int(cfg.evaluate.corpus_chunk)) * dim * 4 * 2 / 1e9
        + max((eval_q[n]["queries"] or 0 for n in retrieval_evals), default=0) * int(cfg.evaluate.k) * 210 / 1e9,
    }
    def gpu_tokens(value) -> int:  # "auto" is 65,536 on a 40 GB+ GPU (engine.resolve_batch_tokens)
        return 65536 if str(value).lower() == "auto" else int(value)

    tokens = gpu_tokens(cfg.retrieve.batch_tokens)
    gpu_mem = {
        "retrieve": _gpu_memory_gb(p.params_m.bi_encoder, False, tokens) + corpus * dim * 2 / 1e9,  # corpus resident
        "score": _gpu_memory_gb(p.params_m.cross_encoder, False, gpu_tokens(cfg.score.batch_tokens)),
        "train": _gpu_memory_gb(p.params_m.bi_encoder, True, batch * 3 * int(cfg.train.max_seq_length)),
        "evaluate": _gpu_memory_gb(p.params_m.bi_encoder, False, gpu_tokens(cfg.evaluate.batch_tokens))
        + corpus * dim * 2 / 1e9,
    }
    rates = {}
    ref = p.reference_job
    use_store, compiled_train = tokens_wanted(cfg.token_cache, corpus), bool(cfg.train.compile_layers)
    if p.get("bench_json"):
        ours, base, source = figures_from_bench(str(p.bench_json), use_store, compiled_train)
    else:
        ours, notes = choose_figures(dict(p.pipeline), use_store, compiled_train)
        base, source = dict(p.baseline), str(p.throughput_source) + "".join(f"; {n}" for n in notes)
    figures = {"pipeline": DictConfig(ours), "baseline": DictConfig(base)}
    for which in ("pipeline", "baseline"):
        r = figures[which]
        # a stage at precision fp32 runs at an fp32 rate: ours where measured (encode), else the library's fp32 rate
        # (its default, so also the baseline's own; an upper bound on the time)
        fp32_encode = r.get("encode_passages_fp32") or figures["baseline"].encode_passages
        encode_rate = {stage: (fp32_encode if fp32[stage] else r.encode_passages) / float(p.bi_encoder_cost_factor)
                       for stage in ("retrieve", "evaluate")}
        score_rate = (figures["baseline"].score_pairs if fp32["score"] else r.score_pairs) / float(
            p.cross_encoder_cost_factor)
        hours = {
            "encode": sum(_hours(encode[stage], encode_rate[stage]) for stage in ("retrieve", "evaluate")),
            "search": _hours(searched, r.search_queries),
            "score": _hours(pairs, score_rate),
            "teacher": _hours(3 * teacher_pairs, score_rate),
            "train": _hours(triplets, r.train_triplets / float(p.bi_encoder_cost_factor)),
        }
        if r.get("tokenise_passages"):  # the token stores' builds: once per corpus and tokenizer (stages share them)
            hours["tokenise"] = _hours(corpus * int(p.corpus_tokenizers) if sum(encode.values()) or pairs else 0,
                                       r.tokenise_passages)
        hours["total"] = sum(hours.values())
        reference = {
            "encode": _hours(ref.passages_encoded, r.encode_passages),
            "search": _hours(ref.queries_searched, r.search_queries),
            "score": _hours(ref.pairs_scored, r.score_pairs),
            "train": _hours(ref.triplets_trained, r.train_triplets),
        }
        if r.get("tokenise_passages"):
            reference["tokenise"] = _hours(ref.passages_tokenised, r.tokenise_passages)
        reference["total"] = sum(reference.values())
        rates[which] = {"this_run": hours, "reference_job": reference}
    return {
        "experiment": {"data": cfg.data.name, "model": cfg.model.name, "chain": str(p.chain)},
        "work": {"corpus_passages": corpus, "training_queries": train_q, "eval_queries": eval_q,
                 "passages_encoded": encode, "queries_searched": searched, "top_k": top_k,
                 "search_depths": ", ".join(depths), "pairs_scored": pairs,
                 "teacher_pairs_trained": teacher_pairs,
                 "training_triplets": triplets, "training_steps": -(-triplets // batch) if batch else 0},
        "disk_gb": {k: round(v, 2) for k, v in disk.items()},
        "peak_host_ram_gb": {k: round(v, 1) for k, v in host_ram.items()},
        "peak_gpu_memory_gb": {k: round(v, 1) for k, v in gpu_mem.items()},
        "gpu_hours": {w: {part: {k: round(v, 3) for k, v in h.items()} for part, h in d.items()}
                      for w, d in rates.items()},
        "throughput_source": source,
        # stages that run in fp32 (costed at an fp32 rate: ours where a bench measured it, else the library's)
        "fp32_stages": [stage for stage, is_fp32 in fp32.items()
                        if is_fp32 and (pairs if stage == "score" else encode[stage])],
        "unknown": unknown,
    }


def format_plan(plan: dict[str, Any]) -> str:
    w = plan["work"]
    exp = plan["experiment"]
    lines = [f"plan for data={exp['data']} model={exp['model']} (chain: {exp['chain']})",
             f"  corpus passages        {w['corpus_passages']:>14,}",
             f"  training queries       {w['training_queries']:>14,}"]
    for name, ev in w["eval_queries"].items():
        count = f"{ev['queries']:,}" if ev["queries"] is not None else "?"
        lines.append(f"  eval {name:<17} {count:>14} queries ({ev['kind']})")
    lines += [f"  passages to encode     {sum(w['passages_encoded'].values()):>14,}  {w['passages_encoded']}",
              f"  queries to search      {w['queries_searched']:>14,}  ({w['search_depths']})",
              f"  pairs to score         {w['pairs_scored']:>14,}",
              *([f"  teacher training pairs {w['teacher_pairs_trained']:>14,}  (costed as 3 scored pairs each)"]
                if w.get("teacher_pairs_trained") else []),
              f"  training triplets      {w['training_triplets']:>14,}  ({w['training_steps']:,} steps)",
              "  disk (GB)              " + ", ".join(f"{k} {v}" for k, v in plan["disk_gb"].items()),
              "  peak host RAM (GB)     " + ", ".join(f"{k} {v}" for k, v in plan["peak_host_ram_gb"].items()),
              "  peak GPU memory (GB)   " + ", ".join(f"{k} {v}" for k, v in plan["peak_gpu_memory_gb"].items())]
    for which, parts in plan["gpu_hours"].items():
        for part, hours in parts.items():
            lines.append(f"  GPU hours {which:<8} {part:<13} " + ", ".join(f"{k} {v:.2f}" for k, v in hours.items()))
    lines.append(f"  throughput figures: {plan['throughput_source']}")
    if plan["fp32_stages"]:
        lines.append(f"  in fp32 (precision=fp32, the exact path; bf16 is several times faster on a GPU): "
                     f"{', '.join(plan['fp32_stages'])}")
    if plan["unknown"]:  # first, where it cannot be missed: every figure below counts these as 0
        lines[1:1] = [f"  NOT COUNTED (taken as 0 below): {what}" for what in plan["unknown"]]
    return "\n".join(lines)


@validate.checked
def run(cfg: DictConfig) -> Path:
    plan = estimate(cfg)
    for what in plan["unknown"]:
        log.warning("plan: not counted, taken as 0: %s", what)
    print(format_plan(plan))
    out = artifacts_root(cfg) / "plans" / f"{cfg.data.name}-{cfg.model.name}.json"
    atomic_write_json(out, plan)
    print(f"  written to {out}")
    return out
