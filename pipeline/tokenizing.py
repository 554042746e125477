"""Inputs to flat (CSR) token arrays exactly as the model's own ``preprocess`` makes them, without padding: in
this process with the model's fast (Rust) tokenizer, checked against ``preprocess`` on the first chunk, or from a
corpus token store (pipeline/tokens.py), or in tokeniser worker processes (pipeline/tokenize_worker.py; opt-in).
Used by pipeline/engine.py (inference) and pipeline/packing.py (training batches).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipeline import tokenize_worker, tokens

log = logging.getLogger(__name__)

@dataclass
class Tokens:
    """Flat (CSR) token storage for a chunk: row i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray
    offsets: np.ndarray
    type_ids: np.ndarray | None = None

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def transformer_module(model):
    try:
        first = model[0]
    except Exception:
        first = None
    if first is not None and (hasattr(first, "auto_model") or hasattr(first, "tokenizer")):
        return first
    return None


def _csr_from_padded(features: dict) -> Tokens:
    ids = features["input_ids"]
    if "cu_seq_lens_q" in features:  # the model's own preprocess flattened the batch (FA2 installs)
        cu = features["cu_seq_lens_q"].to(torch.int64).cpu().numpy()
        flat = ids.reshape(-1).cpu().numpy().astype(np.int32)
        tt = features.get("token_type_ids")
        return Tokens(flat, cu, None if tt is None else tt.reshape(-1).cpu().numpy().astype(np.int8))
    ids = torch.as_tensor(ids)
    mask = features.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    lengths = mask.sum(1).numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = ids[mask].numpy().astype(np.int32)
    tt = features.get("token_type_ids")
    tt_flat = None if tt is None else torch.as_tensor(tt)[mask].numpy().astype(np.int8)
    return Tokens(flat, offsets, tt_flat)


class Tokenizer:
    """Tokenises inputs exactly like the model's own ``preprocess`` but without padding, through the fast
    (Rust) tokenizer in batch; verified against ``preprocess`` on the first chunk."""

    def __init__(self, model, kind: str, prompt: str | None, want_type_ids: bool, max_positions: int | None):
        self.model = model
        self.kind = kind
        self.prompt = prompt
        self.want_type_ids = want_type_ids
        self.module = transformer_module(model)
        self.backend = None
        self.verified = False
        self.pool_broken = False
        self.slow_reason = ""
        tok = getattr(self.module, "tokenizer", None) if self.module is not None else None
        if tok is None:
            tok = getattr(model, "tokenizer", None)
        self.tokenizer = tok
        proc_kwargs = getattr(self.module, "processing_kwargs", None) or {}
        if tok is None or not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
            self.slow_reason = "no fast tokenizer"
            return
        if any(proc_kwargs.get(k) for k in ("text", "common")):
            self.slow_reason = "module has processing_kwargs"
            return
        max_len = getattr(self.module, "max_seq_length", None) if self.module is not None else None
        if max_len is None:
            max_len = getattr(tok, "model_max_length", None)
        if max_len is None or max_len > 10**6:
            max_len = max_positions
        self.max_len = max_len
        self.direction = getattr(tok, "truncation_side", "right") or "right"
        try:
            self.tokenizer_json = tok.backend_tokenizer.to_str()
            bt = tokenize_worker.build_tokenizer(self.tokenizer_json, max_len, self.direction)
            self.backend = bt
            self._encode = getattr(bt, "encode_batch_fast", bt.encode_batch)
        except Exception as exc:  # pragma: no cover
            self.slow_reason = f"backend tokenizer unusable: {exc}"

    def _prep_inputs(self, items: Sequence) -> list:
        if self.kind == "pairs":
            out = [(str(a), str(b)) for a, b in items]
            if self.prompt:
                out = [(self.prompt + a, b) for a, b in out]
            return out
        items = [str(t) for t in items]
        if self.prompt:
            items = [self.prompt + t for t in items]
        return items

    def _fast(self, items: Sequence) -> Tokens:
        return Tokens(*tokenize_worker.encode_csr(self._encode, self._prep_inputs(items), self.want_type_ids))

    def _slow(self, items: Sequence, step: int = 1024) -> Tokens:
        parts = []
        for s in range(0, len(items), step):
            sub = list(items[s : s + step])
            if self.kind == "pairs":
                sub = [(a, b) for a, b in sub]
                feats = self.model.preprocess(sub, prompt=self.prompt) if self.prompt else self.model.preprocess(sub)
            else:
                feats = self.model.preprocess(sub, prompt=self.prompt) if self.prompt else self.model.preprocess(sub)
            parts.append(_csr_from_padded(feats))
        t = Tokens(*tokenize_worker.join_csr([(p.ids, p.offsets, p.type_ids) for p in parts]))
        if not self.want_type_ids:
            t.type_ids = None
        elif t.type_ids is None:
            t.type_ids = np.zeros_like(t.ids, dtype=np.int8)
        return t

    def _verify(self, items: Sequence, fast: Tokens, fetch: Callable[[list[int]], list] | None = None) -> bool:
        """``fast`` agrees with the model's preprocess on the first 32 and the 32 longest inputs (``fetch(picks)``
        gives those inputs where ``items`` cannot be indexed)."""
        n = len(items)
        if n == 0:
            return True
        lens = fast.lengths
        pick = sorted(set(range(min(32, n))) | set(np.argsort(-lens, kind="stable")[:32].tolist()))
        try:
            ref = self._slow(fetch(pick) if fetch else [items[i] for i in pick], step=len(pick))
        except Exception as exc:  # pragma: no cover
            log.debug("preprocess cross-check failed to run: %s", exc)
            return True
        for j, i in enumerate(pick):
            a = fast.ids[fast.offsets[i] : fast.offsets[i + 1]]
            b = ref.ids[ref.offsets[j] : ref.offsets[j + 1]]
            if a.shape != b.shape or not np.array_equal(a, b):
                self.slow_reason = "fast tokenisation differs from the model's preprocess"
                return False
            if self.want_type_ids and fast.type_ids is not None and ref.type_ids is not None:
                ta = fast.type_ids[fast.offsets[i] : fast.offsets[i + 1]]
                tb = ref.type_ids[ref.offsets[j] : ref.offsets[j + 1]]
                if not np.array_equal(ta, tb):
                    self.slow_reason = "token type ids differ from the model's preprocess"
                    return False
        return True

    def submit(self, items: Sequence, pool) -> list | None:
        """Start tokenising ``items`` in the worker pool (futures of sub-chunks); None: :meth:`result` tokenises
        them in this thread."""
        if pool is None or self.backend is None or self.pool_broken:
            return None
        prepped = self._prep_inputs(items)
        step = max(512, -(-len(prepped) // (2 * max(1, pool.workers))))  # ~1 MB messages: one pipe buffer each
        try:
            return [pool.submit(prepped[i : i + step]) for i in range(0, len(prepped), step)]
        except Exception as exc:  # a closed pool: tokenised here instead
            log.warning("engine: tokeniser processes unusable (%s); tokenising in this process", exc)
            self.pool_broken = True
            return None

    def result(self, items: Sequence, handle: list | None) -> Tokens:
        """The tokens of ``items``, from the futures :meth:`submit` returned (checked like the in-thread path)."""
        if handle is None or self.backend is None:
            return self(items)
        try:
            parts = [f.result(timeout=RESULT_TIMEOUT_S) for f in handle]
        except Exception as exc:  # a worker died, failed or stalled: this chunk and the rest are tokenised here
            log.warning("engine: tokeniser process failed (%s: %s); tokenising in this process",
                        type(exc).__name__, exc)
            self.pool_broken = True
            close_pools()
            return self(items)
        return self._checked(items, Tokens(*tokenize_worker.join_csr(parts)))

    def _checked(self, items: Sequence, toks: Tokens) -> Tokens:
        """``toks`` once the first chunk's fast tokens match the model's preprocess; else the preprocess's."""
        if self.verified:
            return toks
        if self._verify(items, toks):
            self.verified = True
            return toks
        log.warning("engine: %s; using the model's own preprocess", self.slow_reason)
        self.backend = None
        return self._slow(items)

    @property
    def source(self) -> str:
        """Where the tokens came from (LAST_RUN["tokenizer"])."""
        return "fast" if self.backend is not None else f"preprocess ({self.slow_reason})"

    def __call__(self, items: Sequence) -> Tokens:
        if self.backend is not None:
            return self._checked(items, self._fast(items))
        return self._slow(items)


class TokensFromStore:
    """Inputs that arrive as tokens (a :mod:`pipeline.tokens` view over a token store): the model's special tokens
    and truncation are added by a :class:`tokens.Template` read off its tokenizer, and the first chunk is checked
    against the model's own preprocess of the same texts. A store the model cannot use (another tokenizer, a
    prompt, left truncation, a limit above the store's cap) or any difference: the view's texts are tokenised
    instead, as if they had been passed as texts."""

    backend = None  # nothing to hand to tokeniser processes

    def __init__(self, inner: Tokenizer, view):
        self.inner = inner
        self.template = None
        self.verified = False
        why = self._unusable(inner, view)
        if why is None:
            self.template = tokens.Template.probe(inner.tokenizer_json, int(inner.max_len))
            if self.template is None:
                why = "its special tokens could not be located"
            elif not view.fits(self.template):
                why, self.template = f"its limit of {inner.max_len} tokens exceeds the store's {view.store.cap}", None
        if why is not None:
            log.info("engine: token store not used (%s); tokenising the texts", why)

    @staticmethod
    def _unusable(inner: Tokenizer, view) -> str | None:
        if inner.backend is None:
            return inner.slow_reason or "no fast tokenizer"
        if view.kind != inner.kind:
            return f"{view.kind} given where {inner.kind} are expected"
        if inner.prompt:
            return "a prompt is prepended"
        if inner.direction != "right" or not inner.max_len:
            return "the model truncates on the left or not at all"
        if view.store.key != tokens.tokenizer_key(inner.tokenizer_json):
            return "the store was built with another tokenizer"
        return None

    @property
    def source(self) -> str:
        return "token store" if self.template is not None else f"texts, {self.inner.source}"

    def submit(self, items, pool) -> None:
        return None

    def result(self, items, handle=None) -> Tokens:
        return self(items)

    def __call__(self, items) -> Tokens:
        if self.template is None:
            return self.inner(items.texts())
        toks = Tokens(*items.assemble(self.template, self.inner.want_type_ids))
        if self.verified:
            return toks
        if self.inner._verify(items, toks, fetch=items.texts):
            self.verified = True
            return toks
        log.warning("engine: tokens from the store differ from the model's preprocess (%s); tokenising the texts",
                    self.inner.slow_reason)
        self.template = None
        return self.inner(items.texts())


# ------------------------------------------------------------------------------------ tokeniser processes
_POOLS: dict[tuple, Any] = {}
#: with PIPELINE_TOKENIZE_WORKERS=pool, tokenise in worker processes from this many inputs on (below it the pool's
#: start-up is not repaid)
POOL_MIN_ITEMS = 50_000


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what Slurm / cgroups / taskset grant, not the machine's count
    except (AttributeError, OSError):  # pragma: no cover - macOS
        return os.cpu_count() or 1


def pool_size(processes: int = 1) -> int:
    """Tokeniser processes worth starting next to ``processes`` GPU processes: every usable core but two (the
    GPU-feeding thread and the collation thread), at most 16, the node's cores split between the GPU processes."""
    return max(0, min(16, usable_cpus() // max(1, processes) - 2))


def resolve_tokenize_workers(workers: int | None, device: torch.device, n: int, processes: int = 1) -> int:
    """Worker processes for tokenisation. ``None`` (auto): the environment variable PIPELINE_TOKENIZE_WORKERS where
    set (a number, or "pool": :func:`pool_size` for CUDA jobs of ``POOL_MIN_ITEMS`` inputs or more), else 0, i.e.
    tokenise in this process (a background thread, the Rust tokenizer's own threads). The processes are opt-in
    because on an H200 they lost to in-process tokenisation in every paired comparison of session 6: encode 30.2k
    vs 26.3k passages/s and score 18.6k vs 16.0k pairs/s (14 processes) in one bench run, encode 28.4k vs 22.8k
    (14) and 26.7k (7) in another (docs/bench/h200-2026-11-27-run*.txt)."""
    if workers is None:
        env = os.environ.get("PIPELINE_TOKENIZE_WORKERS", "").strip().lower()
        if env == "pool":
            workers = pool_size(processes) if device.type == "cuda" and n >= POOL_MIN_ITEMS else 0
        elif env:
            workers = int(env)
        else:
            workers = 0
    return max(0, int(workers))


class TokenizerProcesses:
    """``workers`` tokeniser subprocesses (``python -m pipeline.tokenize_worker``), each driven by one thread of a
    thread pool: :meth:`submit` returns a Future of (ids, offsets, type_ids). Any failure (a worker that dies,
    answers with an error, or does not answer within ``RESULT_TIMEOUT_S``) makes the caller close the pool and
    tokenise in its own process: slower, never wrong, never stuck."""

    START_TIMEOUT_S = 120.0

    def __init__(self, workers: int, init: tuple):
        import select
        import subprocess
        import sys
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path

        root = str(Path(__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=root + (os.pathsep + path if path else ""))
        self.workers = workers
        self._procs: list = []
        self._free: "queue.Queue" = queue.Queue()
        self._closed = False
        try:
            for _ in range(workers):
                proc = subprocess.Popen([sys.executable, "-m", "pipeline.tokenize_worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
                self._procs.append(proc)
                for stream in (proc.stdin, proc.stdout):
                    tokenize_worker.widen_pipe(stream)
                tokenize_worker.send(proc.stdin, {"init": list(init)})
            deadline = time.monotonic() + self.START_TIMEOUT_S
            for proc in self._procs:
                ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError(f"a tokeniser process did not start within {self.START_TIMEOUT_S:.0f}s")
                header, _ = tokenize_worker.recv(proc.stdout)
                if header.get("status") != "ready":
                    raise RuntimeError(f"tokeniser process answered {header!r} to its start")
                self._free.put(proc)
        except BaseException:
            self.close()
            raise
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="tokenize")

    def submit(self, items: list):
        return self._threads.submit(self._roundtrip, items)

    def _roundtrip(self, items: list):
        proc = self._free.get()
        if proc is None or self._closed:
            raise RuntimeError("tokeniser processes closed")
        tokenize_worker.send(proc.stdin, {"items": items})
        header, arrays = tokenize_worker.recv(proc.stdout)
        if header.get("status") != "ok":
            raise RuntimeError(f"tokeniser process: {header.get('message', header)}")
        self._free.put(proc)  # only a worker that answered is handed out again
        return arrays[0], arrays[1], (arrays[2] if len(arrays) > 2 else None)

    def close(self) -> None:
        self._closed = True
        for proc in self._procs:
            with contextlib.suppress(Exception):
                proc.kill()
        for _ in self._procs:
            self._free.put(None)  # wakes threads waiting for a worker
        threads = getattr(self, "_threads", None)
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)
        for proc in self._procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)


#: seconds to wait for one sub-chunk (normally well under one): past it the pool is closed and tokenising goes on
#: in this process
RESULT_TIMEOUT_S = 300.0


def tokenizer_pool(tok: Tokenizer, workers: int):
    """Tokeniser processes holding ``tok``'s tokenizer, kept for later calls with the same tokenizer; None (with a
    warning) where they cannot start."""
    key = (tok.tokenizer_json, tok.max_len, tok.direction, tok.want_type_ids, workers)
    pool = _POOLS.get(key)
    if pool is None:
        close_pools()
        try:
            pool = TokenizerProcesses(workers, (tok.tokenizer_json, tok.max_len, tok.direction, tok.want_type_ids))
        except Exception as exc:
            log.warning("engine: tokeniser processes unavailable (%s: %s); tokenising in this process",
                        type(exc).__name__, exc)
            return None
        _POOLS[key] = pool
    return pool


def close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


atexit.register(close_pools)
