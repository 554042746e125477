"""Every setting a stage reads, checked before any stage starts: a mistyped value stops the command at once with one
line naming the key (exit 2), instead of a library traceback deep in a run, a typo found after the corpus encode,
or a value that runs and gives nonsense (a negative BCE weight, zero epochs, ``use_cache=no`` read as true).

Hydra already rejects unknown keys; this checks the values of the known ones. Every stage entry runs it
(``@validate.checked``): the CLI, the ``all`` chain, scripts and tests that call a stage's ``run`` directly. A stage's
own checks stay where a value depends on the data (batch sizes against ranks, ids against the corpus).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import StageError

Check = Callable[[Any], str | None]  # the problem with a value, or None


class ConfigError(StageError, ValueError):
    """Invalid setting values (one line each); a ValueError too, for callers of a stage's ``run``."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum: int) -> Check:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        return None if ok else f"must be an integer >= {minimum}"
    return check


def number(minimum: float, *, above: bool = False, maximum: float | None = None, below: bool = False) -> Check:
    lo = f"> {minimum}" if above else f">= {minimum}"
    hi = "" if maximum is None else (f" and < {maximum}" if below else f" and <= {maximum}")

    def check(value: Any) -> str | None:
        if not _number(value) or value < minimum or (above and value == minimum):
            return f"must be a number {lo}{hi}"
        if maximum is not None and (value > maximum or (below and value == maximum)):
            return f"must be a number {lo}{hi}"
        return None
    return check


def optional(check: Check) -> Check:
    def maybe(value: Any) -> str | None:
        problem = None if value is None else check(value)
        return None if problem is None else f"{problem} (or null)"
    return maybe


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> str | None:
        # True/False compared by identity: 1 == True would otherwise pass for a boolean choice
        ok = any(value is c if isinstance(c, bool) else (not isinstance(value, bool) and value == c) for c in choices)
        return None if ok else "must be one of " + ", ".join(str(c).lower() if isinstance(c, bool) else str(c)
                                                          for c in choices)
    return check


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def precision(value: Any) -> str | None:
    from pipeline.models import precision_name

    if value is None:  # the stages would read "None" (fp32) where the plan reads auto: say which is meant
        return "must be auto, fp32, bf16 or fp16"
    try:
        precision_name(value)
    except ValueError:
        return "must be auto, fp32, bf16 or fp16"
    return None


def batch_tokens(value: Any) -> str | None:
    return None if value == "auto" or integer(1)(value) is None else "must be auto or a number of tokens >= 1"


def device(value: Any) -> str | None:
    return None if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(value)) else "must be auto, cpu, mps, cuda or cuda:N"


def existing_file(value: Any) -> str | None:
    return None if Path(str(value)).expanduser().is_file() else "names no file"


def stemmer(value: Any) -> str | None:
    try:
        import Stemmer
    except ImportError:  # without PyStemmer BM25 runs unstemmed (recorded in the manifest)
        return None
    return None if str(value) in Stemmer.algorithms() else "must be a Snowball stemmer (" + ", ".join(
        Stemmer.algorithms()[:6]) + ", ...)"


def evaluate_devices(value: Any) -> str | None:
    ok = value == "auto" or (isinstance(value, (list, tuple)) and all(device(d) is None and d != "auto"
                                                                      for d in value))
    return None if ok else "must be auto or a list of devices (cpu, cuda:N)"


EVAL_KINDS = ("retrieval", "rerank")
SIMILARITIES = ("auto", "cosine", "dot")
SYSTEM_KEYS = frozenset({"name", "model", "similarity", "query_prompt", "corpus_prompt", "published"})


def evaluate_systems(value: Any) -> str | None:
    """A list of {name, model[, similarity, query_prompt, corpus_prompt, published]}."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        return "must be a list of {name, model, ...} mappings"
    for i, system in enumerate(value):
        if not isinstance(system, Mapping) or not system.get("name") or not system.get("model"):
            return f"entry {i} must be a mapping with at least name and model"
        unknown = set(system) - SYSTEM_KEYS
        if unknown:
            return f"entry {i}: unknown keys {sorted(unknown)} (allowed: {sorted(SYSTEM_KEYS)})"
        if (system.get("similarity") or "auto") not in SIMILARITIES:
            return f"entry {i}: similarity {system['similarity']!r} must be one of {', '.join(SIMILARITIES)}"
    return None


def measures(value: Any) -> str | None:
    from pipeline.metrics import parse_measures

    try:
        parse_measures(value if isinstance(value, (list, tuple)) else [])
    except ValueError as exc:
        return str(exc)
    return None


def eval_sets(value: Any) -> str | None:
    """{name: {kind, qrels, metrics, queries (retrieval) | candidates (rerank), headline?}}; none is fine until a
    stage evaluates (it says so)."""
    from pipeline.metrics import parse_measures

    if value is None:
        return None
    if not isinstance(value, Mapping):
        return "must map names to eval sets {kind, qrels, metrics, ...}"
    for name, ev in value.items():
        if not isinstance(ev, Mapping) or ev.get("kind") not in EVAL_KINDS:
            return f"{name}: kind must be one of {', '.join(EVAL_KINDS)}"
        if not ev.get("qrels") or not ev.get("metrics"):
            return f"{name}: needs qrels and metrics"
        if ev["kind"] == "rerank" and not ev.get("candidates"):
            return f"{name} is a rerank set: it needs candidates (top-1000 file or TREC run)"
        if ev["kind"] == "retrieval" and not ev.get("queries"):
            return f"{name} is a retrieval set: it needs queries"
        try:
            parse_measures(ev["metrics"])
        except ValueError as exc:
            return f"{name}: {exc}"
        if ev.get("headline") and ev["headline"] not in ev["metrics"]:
            return f"{name}: headline {ev['headline']!r} is not among its metrics {list(ev['metrics'])}"
    return None


SIZE_KEYS = {"corpus": "passages", "train_queries": "training queries with a positive",
             "tokens_per_passage": "mean tokens", "eval_queries": "{eval set: judged queries}",
             "rerank_passages": "{rerank set: candidate lines}"}


def data_sizes(value: Any) -> str | None:
    """Counts stage=plan uses before the files exist (``+data.sizes.corpus=N`` for a data config without them)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return "must map " + ", ".join(SIZE_KEYS) + " to counts"
    for key, count in value.items():
        if key not in SIZE_KEYS:
            return f"unknown key {key!r} (known: {', '.join(SIZE_KEYS)})"
        per_set = key in ("eval_queries", "rerank_passages")
        if per_set and not isinstance(count, Mapping):
            return f"{key} must map eval set names to counts"
        for name, n in count.items() if per_set else [(None, count)]:
            if not _number(n) or n <= 0:
                return f"{key}{'' if name is None else '.' + str(name)}={n!r} must be a number > 0"
    return None


_PRECISION_KEYS = ("retrieve.precision", "score.precision", "evaluate.precision", "train.precision",
                   "teacher.precision")
_POSITIVE = integer(1)
_LENGTH = optional(_POSITIVE)  # a token limit; null = the model's own

RULES: dict[str, Check] = {
    # cpu_threads 0 or null: torch's default; token_cache 0/1 read as false/true; lock_wait_s inf: wait for good
    "iterations": _POSITIVE, "seed": integer(0), "shard.count": _POSITIVE, "shard.index": integer(0),
    "tracking.backend": one_of("none", "wandb"), "tracking.mode": one_of("auto", "offline", "online", "disabled"),
    "cpu_threads": optional(integer(0)), "device": device,
    "force": boolean, "token_cache": lambda v: None if v is None or (isinstance(v, int) and v in (0, 1))
    else one_of("auto", True, False)(v),
    "lock_wait_s": lambda v: None if (_number(v) and v >= 0) or v == math.inf else "must be a number >= 0 (or inf)",
    "data.max_missing_qrels": number(0, maximum=1), "data.empty_text": one_of("warn", "error"),
    "data.repair_encoding": boolean, "data.evals": eval_sets, "data.train.min_grade": _POSITIVE,
    "data.train.max_queries": optional(_POSITIVE), "data.sizes": data_sizes,
    "model.similarity": one_of("auto", "cosine", "dot"),
    **{key: precision for key in _PRECISION_KEYS},
    "retrieve.top_k": _POSITIVE, "retrieve.backend": one_of("torch", "faiss_flat", "faiss_ivf"),
    "retrieve.batch_tokens": batch_tokens, "retrieve.max_seq_length": _LENGTH, "retrieve.encode_block": _POSITIVE,
    "retrieve.query_block": _POSITIVE,
    "score.depth": optional(_POSITIVE), "score.chunk_pairs": _POSITIVE, "score.max_length": _LENGTH,
    "score.batch_tokens": batch_tokens, "score.use_cache": boolean, "score.debug_sleep_s": number(0),
    "mine.exclude_positives": boolean, "mine.exclude_duplicate_text": boolean, "mine.rank_min": optional(_POSITIVE),
    "mine.rank_max": optional(_POSITIVE), "mine.ce_max_score": optional(number(-math.inf)),
    "mine.ce_max_score_scale": one_of("probability", "logit"), "mine.ce_score_margin": optional(number(-math.inf)),
    "mine.relative_margin": optional(number(0, maximum=1, below=True)),
    "mine.num_negatives_per_system": optional(_POSITIVE), "mine.max_negatives": optional(_POSITIVE),
    "train.epochs": _POSITIVE, "train.triplets_per_query": optional(_POSITIVE), "train.batch_size": _POSITIVE,
    "train.lr": number(0, above=True), "train.warmup_steps": integer(0),
    "train.warmup_ratio": optional(number(0, maximum=1)), "train.weight_decay": number(0),
    "train.max_grad_norm": number(0), "train.max_seq_length": _POSITIVE,  # 0: no clipping (transformers)
    "train.scale": number(0, above=True), "train.similarity": one_of("cosine", "dot"),
    "train.max_steps": optional(_POSITIVE), "train.save_steps": _POSITIVE,
    "train.save_total_limit": optional(_POSITIVE), "train.keep_checkpoints": boolean, "train.logging_steps": _POSITIVE,
    "train.dataloader_workers": lambda v: None if v == "auto" or integer(0)(v) is None else
    "must be auto or an integer >= 0",
    "train.packing": one_of("auto", True, False), "train.compile_layers": boolean, "train.evaluate": boolean,
    "train.gather_across_devices": boolean,
    "teacher.enabled": boolean, "teacher.epochs": _POSITIVE, "teacher.batch_size": _POSITIVE,
    "teacher.lr": number(0, above=True), "teacher.head_lr": optional(number(0, above=True)),
    "teacher.warmup_ratio": number(0, maximum=1), "teacher.weight_decay": number(0), "teacher.max_length": _LENGTH,
    "teacher.negatives_per_query": _POSITIVE, "teacher.positives_per_query": optional(_POSITIVE),
    "teacher.neg_rank_min": _POSITIVE, "teacher.neg_rank_max": _POSITIVE,
    "teacher.pos_weight": optional(number(0, above=True)), "teacher.save_steps": _POSITIVE,
    "teacher.logging_steps": _POSITIVE,
    "evaluate.bm25": boolean, "evaluate.bm25_params.k1": number(0, above=True),
    "evaluate.bm25_params.b": number(0, maximum=1), "evaluate.bm25_params.stemmer": optional(stemmer),
    "evaluate.k": _POSITIVE, "evaluate.max_seq_length": _LENGTH, "evaluate.batch_tokens": batch_tokens,
    "evaluate.corpus_chunk": _POSITIVE, "evaluate.search_backend": one_of("torch", "faiss_flat", "faiss_ivf"),
    "evaluate.missing_queries": one_of("zero", "skip"), "evaluate.systems": evaluate_systems,
    "evaluate.devices": evaluate_devices,
    "plan.chain": one_of("all", "evaluate"), "plan.epochs": number(0, above=True),
    "plan.corpus_tokenizers": _POSITIVE, "plan.bi_encoder_cost_factor": number(0, above=True),
    "plan.cross_encoder_cost_factor": number(0, above=True), "plan.bench_json": optional(existing_file),
    "score_run.missing": one_of("skip", "zero"), "score_run.measures": measures,
    "score_run.relevance_level": optional(_POSITIVE),
    "score_run.per_query": boolean,
}

#: pairs of settings that only make sense in one order
ORDERED = (("mine.rank_min", "mine.rank_max"), ("teacher.neg_rank_min", "teacher.neg_rank_max"))
#: (index, count) pairs: the index must lie below the count
BELOW = (("shard.index", "shard.count"),)


def problems(cfg: DictConfig) -> list[str]:
    """``key=value: what it must be`` for every invalid setting in ``cfg`` (keys a config lacks are skipped)."""
    # a ??? left unset (data.root of the generic BEIR config) failed in a traceback wherever it was first read
    found = [f"{key} is required: give it on the command line ({key}=...)" for key in _unset(cfg)]
    values: dict[str, Any] = {}
    for key, check in RULES.items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True, default=_ABSENT)
        except Exception:  # built from a ??? value: named above
            continue
        if value is _ABSENT:
            continue
        container = OmegaConf.is_config(value)  # a list or mapping (eval sets, systems): named by its key alone
        if container:
            value = _plain(value)
        else:
            values[key] = value
        problem = check(value)
        if problem:
            found.append(f"{key}: {problem}" if container else f"{key}={value!r}: {problem}")
    for low, high in ORDERED:
        lo, hi = values.get(low), values.get(high)
        if _number(lo) and _number(hi) and hi < lo:
            found.append(f"{high}={hi!r} is below {low}={lo!r}")
    for index, count in BELOW:
        i, n = values.get(index), values.get(count)
        if _number(i) and _number(n) and i >= n:
            found.append(f"{index}={i!r} must be below {count}={n!r}")
    return found


_ABSENT = object()


def _unset(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys still ``???`` (OmegaConf.missing_keys resolves interpolations, and fails on the keys built
    from them)."""
    keys = node.keys() if OmegaConf.is_dict(node) else range(len(node))
    found = []
    for key in keys:
        name = f"{prefix}{key}" if OmegaConf.is_dict(node) else f"{prefix.rstrip('.')}[{key}]"
        if OmegaConf.is_missing(node, key):
            found.append(name)
            continue
        child = node._get_node(key)
        if not OmegaConf.is_interpolation(node, key) and OmegaConf.is_config(child) and not child._is_none():
            found += _unset(child, name + ".")
    return found


def _plain(node: Any) -> Any:
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # a path still built from a ??? root (named by _unset): its shape can still be checked
        return OmegaConf.to_container(node, resolve=False)


def check(cfg: DictConfig) -> None:
    """Raise ConfigError listing every invalid setting of ``cfg``."""
    found = problems(cfg)
    if found:
        raise ConfigError("invalid settings (nothing was run): " + "; ".join(found))


#: mappings open by design: an eval set of one's own, published figures for the results table; Hydra's own settings
OPEN_KEYS = ("data.evals.", "data.sizes.", "model.published.", "hydra.")  # checked by their rules


def added_keys(overrides: list[str], cfg: DictConfig | None = None) -> list[str]:
    """The keys that ``+key=value`` command-line overrides add where no stage reads them. Hydra's own hint for a
    mistyped key is to add it with +: ``+retrieve.topk=5`` then ran at the default top_k without a word. With the
    composed ``cfg``, the nearest known key is named."""
    found = []
    for override in overrides:
        if not override.startswith("+") or override.startswith("++"):
            continue
        key = override[1:].split("=", 1)[0].strip()
        if not _is_group(key) and not key.startswith(OPEN_KEYS):  # +experiment=... adds a group: Hydra's to judge
            near = _nearest_key(cfg, key) if cfg is not None else None
            hint = f"did you mean {near}?" if near else "a typo of a known key?"
            found.append(f"{override}: adds {key!r}, a key no stage reads ({hint} drop the +)")
    return found


def _is_group(key: str) -> bool:
    """Whether an override's key chooses a config group (experiment, data, hydra/launcher) rather than a setting."""
    from pipeline.config import CONF_DIR

    return "/" in key or (CONF_DIR / key).is_dir()


def unknown_keys(argv: list[str]) -> list[str]:
    """The plain ``key=value`` command-line overrides of keys the config does not have. Hydra refuses them with a
    multi-line error whose hint, to add the key with +, leads to :func:`added_keys`' refusal: here one line names
    the nearest known key first. The config groups chosen on the command line (experiment=..., data=...) are
    composed to know the keys, each choice of a sweep over them (-m data=demo,cisi) with the others at their
    first; where they cannot be, Hydra's own error follows."""
    from pipeline.config import compose

    if any(arg.startswith(("-cd", "-cn", "-cp", "--config", "hydra.searchpath")) for arg in argv):
        return []  # another config than conf/config.yaml: Hydra's to judge
    groups, plain_keys = [], []
    for arg in argv:
        key = arg.split("=", 1)[0].strip()
        if arg.startswith("-") or "=" not in arg or "@" in key:
            continue  # flags (-m, --cfg), package overrides
        if _is_group(key.lstrip("+")):
            groups.append((arg, key))  # experiment=..., +experiment=..., hydra/launcher=...
        elif not key.startswith(("+", "~", "hydra")):  # additions, deletions, Hydra's own settings: judged later
            plain_keys.append((arg, key))
    if not plain_keys:
        return []
    # a sweep over a group (-m data=demo,cisi) is one config per choice: each choice is composed, the others at
    # their first; sweep functions (choice(...), range(...), glob(...)) are Hydra's to expand and judge
    choices = [arg.split("=", 1)[1].split(",") for arg, _ in groups]
    if any(not c.strip() or set(c) & set("()[]{}'\"") for options in choices for c in options):
        return []
    first = [f"{key}={options[0]}" for (_, key), options in zip(groups, choices)]
    configs = [first] + [[*first[:g], f"{groups[g][1]}={option}", *first[g + 1:]]
                         for g, options in enumerate(choices) for option in options[1:]]
    found: dict[str, str] = {}
    for overrides in configs:
        try:
            cfg = compose(overrides)
        except Exception:
            return []
        for arg, problem in _unknown_in(cfg, plain_keys):
            found.setdefault(arg, problem + (f" with {' '.join(overrides)}" if len(configs) > 1 else ""))
    return list(found.values())


def _unknown_in(cfg: DictConfig, plain_keys: list[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """(override, why) for each plain key ``cfg`` does not have."""
    for arg, key in plain_keys:
        if key.startswith(OPEN_KEYS):
            continue
        node, parts = cfg, key.split(".")
        for depth, part in enumerate(parts):
            if not OmegaConf.is_dict(node) or not OmegaConf.is_struct(node):
                break  # a list index, a value's attribute, a mapping open to new keys: Hydra's to judge
            if part not in node.keys():  # `in` calls a ??? value absent
                missing = ".".join(parts[:depth + 1])
                near = _nearest_key(cfg, missing)
                yield arg, f"{arg}: {missing!r} is no setting" + (f" (did you mean {near}?)" if near else "")
                break
            node = node._get_node(part)


def _nearest_key(cfg: DictConfig, key: str) -> str | None:
    """The known key beside ``key`` (same parent) that it most looks like a typo of."""
    import difflib

    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not OmegaConf.is_dict(node):
        return None
    near = difflib.get_close_matches(leaf, [k for k in node.keys() if k != leaf], n=1, cutoff=0.6)
    return f"{parent}.{near[0]}" if near and parent else (near[0] if near else None)


def checked(run: Callable[..., Any]) -> Callable[..., Any]:
    """A stage entry that checks every setting of its config first (ConfigError, nothing started)."""
    @functools.wraps(run)
    def entry(cfg: DictConfig, *args: Any, **kwargs: Any) -> Any:
        check(cfg)
        return run(cfg, *args, **kwargs)
    return entry
