"""The corpus token store: every passage tokenised once per tokenizer, kept as flat arrays, reused by every stage
that encodes or scores the corpus (retrieve and evaluate encode it, score pairs it with queries).

Why: on a GPU the engine is host-bound, and tokenising is nearly all of the host's work. On this 2-core VM the
Rust tokenizer gives 15k MS MARCO passages/s while sorting and collating the same passages runs at 2M/s; on an
H200 host one process tokenised 40k passages/s against a GPU that encodes 50k/s. Measured there in session 12:
distilbert-base encoded 26k passages/s from texts and 56k from the store, and electra-base scored 17.6k pairs/s
against 27.5k. The reference job tokenises the
8.84M passages three times (v2 encode, 25M cross-encoder pairs, v3 encode); with the store it tokenises them once,
and the bi-encoder and the cross-encoder share the store when their tokenizers agree (msmarco-distilbert and the
electra-base cross-encoder both use the bert-base-uncased vocabulary).

Layout: ``<cache_root>/tokens/<corpus fingerprint>-<tokenizer key>/`` holds ``ids.npy`` (uint16 when the
vocabulary fits, else int32), ``offsets.npy`` (int64, n + 1: passage i is ids[offsets[i]:offsets[i+1]]),
``lengths.npy`` (int32: each passage's untruncated token count, which pair truncation compares) and
``manifest.json``. Tokens are stored without special tokens and cut at ``CAP``; each model adds its own special
tokens and truncation when it reads them (:class:`Template`, the tokenizer's own truncation rule, incl. the
longest-first rule for pairs). The engine checks the assembled tokens of the first chunk of every call against the
model's own ``preprocess`` of the same texts and tokenises the texts instead on any difference, so a store can
make a run slower, never different. Built in blocks (BUILD_BLOCK passages or BUILD_BYTES of text) that are committed
one by one, so a killed build resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline import signals, tokenize_worker

log = logging.getLogger(__name__)

#: raw tokens kept per passage: serves every model whose limit, less its special tokens, is at most this
CAP = 512
#: ``token_cache: auto`` builds a store for corpora of this many passages or more (below it tokenising is seconds)
STORE_MIN_PASSAGES = 100_000
#: passages per committed block of a build (unit of resume), at most
BUILD_BLOCK = 262_144
#: text bytes per block, at most: the tokenizer's per-token objects of a block of long documents stay under ~1 GB
BUILD_BYTES = 64 << 20
FORMAT = 1


# ------------------------------------------------------------------------------------------------ keys


def tokenizer_key(tokenizer_json: str) -> str:
    """What decides a tokenizer's raw tokens (normaliser, pre-tokeniser, model, added tokens) and the tokenizers
    version, hashed: two models whose tokenizers agree share a store; padding, truncation and special-token
    templates are not part of it (they are applied at read time)."""
    import tokenizers

    spec = json.loads(tokenizer_json)
    kept = {k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model", "added_tokens")}
    kept["tokenizers"] = tokenizers.__version__
    kept["cap"] = CAP
    kept["format"] = FORMAT
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def fast_tokenizer_json(model) -> str | None:
    """The JSON of a SentenceTransformer's or CrossEncoder's fast (Rust) tokenizer; None when it has none."""
    tok = None
    try:
        first = model[0]
        tok = getattr(first, "tokenizer", None)
    except Exception:
        pass
    tok = tok or getattr(model, "tokenizer", None)
    if tok is None or not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        return None
    return tok.backend_tokenizer.to_str()


def wanted(setting: Any, n_passages: int) -> bool:
    """The ``token_cache`` setting: true, false, or auto (a store for corpora of STORE_MIN_PASSAGES or more)."""
    value = str(setting).lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", "none", "null"):
        return False
    if value != "auto":
        raise ValueError(f"token_cache must be auto, true or false, got {setting!r}")
    return n_passages >= STORE_MIN_PASSAGES


# ----------------------------------------------------------------------------------------------- store


@dataclass
class TokenStore:
    """Raw tokens of a corpus (CSR): passage i is ids[offsets[i]:offsets[i+1]], at most ``cap`` tokens, of
    ``lengths[i]`` before the cut."""

    ids: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    key: str
    cap: int = CAP
    folder: Path | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_texts(cls, tokenizer_json: str, texts: Sequence[str], workers: int = 0) -> TokenStore:
        """An in-memory store (queries in the score stage, tests, the bench)."""
        with RawTokenizer(tokenizer_json, workers) as tokenize:
            return cls(*tokenize(texts), tokenizer_key(tokenizer_json))

    @classmethod
    def load(cls, folder: Path) -> TokenStore:
        """The store in ``folder`` (memory-mapped), its arrays checked against each other and its manifest."""
        manifest = json.loads((folder / "manifest.json").read_text())
        try:
            arrays = [np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("ids", "offsets", "lengths")]
        except (OSError, ValueError) as exc:
            raise ValueError(f"token store {folder} is damaged ({exc}); delete the folder to rebuild it") from exc
        ids, offsets, lengths = arrays
        n, total = int(manifest["passages"]), int(manifest["tokens"])
        if len(offsets) != n + 1 or len(lengths) != n or len(ids) != total or int(offsets[-1]) != total:
            raise ValueError(f"token store {folder} is damaged (its arrays disagree with its manifest); delete the "
                             f"folder to rebuild it")
        return cls(ids, offsets, lengths, manifest["tokenizer_key"], int(manifest["cap"]), folder)


def _backend(tokenizer_json: str):
    return tokenize_worker.build_tokenizer(tokenizer_json, None, "right")  # untruncated: lengths are counted first


def raw_tokens(backend, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int32, offsets int64, untruncated lengths int32) of ``texts`` without special tokens, the ids cut at
    CAP tokens per text."""
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    ids, offsets, _ = tokenize_worker.encode_csr(encode, [str(t) for t in texts], False, add_special_tokens=False)
    return _cut(ids, np.diff(offsets))


def _cut(ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, offsets, lengths) of texts of ``lengths`` tokens stored back to back in ``ids``, each cut at CAP."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if len(lengths) and lengths.max() > CAP:
        ids, offsets, _ = _assemble([(ids, offsets[:-1], np.minimum(lengths, CAP))], None)
    return ids, offsets, lengths.astype(np.int32)


def build_workers(n: int) -> int:
    """Tokeniser processes for building a store of ``n`` passages: every usable core but two (tokenizing.pool_size)
    from tokenizing.POOL_MIN_ITEMS passages on, else none. Unlike the engine's (opt-in) processes, nothing competes with
    them for the GIL: the build runs before any model does."""
    from pipeline import tokenizing

    return tokenizing.pool_size() if n >= tokenizing.POOL_MIN_ITEMS else 0


class RawTokenizer:
    """Raw tokenisation (no special tokens, lengths before the cut at CAP) in ``workers`` tokeniser processes
    (tokenizing.TokenizerProcesses), or in this process (the Rust tokenizer's own threads) with 0 workers, where they
    cannot start, or after one fails. A context manager: the processes end with it."""

    def __init__(self, tokenizer_json: str, workers: int = 0):
        self.backend = _backend(tokenizer_json)
        self.pool = None
        if workers > 0:
            from pipeline.tokenizing import TokenizerProcesses

            try:
                self.pool = TokenizerProcesses(workers, (tokenizer_json, None, "right", False, False))
            except Exception as exc:
                log.warning("token store: tokeniser processes unavailable (%s); tokenising in this process", exc)

    def __enter__(self) -> RawTokenizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.pool is None:
            return raw_tokens(self.backend, texts)
        from pipeline.tokenizing import RESULT_TIMEOUT_S

        texts = [str(t) for t in texts]
        step = max(512, -(-len(texts) // (4 * self.pool.workers)))
        try:
            futures = [self.pool.submit(texts[i:i + step]) for i in range(0, len(texts), step)]
            parts = [f.result(timeout=RESULT_TIMEOUT_S) for f in futures]
        except Exception as exc:  # a worker died or stalled: slower, never wrong
            log.warning("token store: a tokeniser process failed (%s); tokenising in this process", exc)
            self.close()
            return raw_tokens(self.backend, texts)
        ids, offsets, _ = tokenize_worker.join_csr(parts)
        return _cut(ids, np.diff(offsets))


def open_store(corpus, tokenizer_json: str, cache_root: str | os.PathLike, *, wait_s: float = 3600.0) -> TokenStore:
    """The token store of ``corpus`` (a readers.Corpus) for this tokenizer, built on first use (one builder at a
    time: another process building it is waited for; a killed build resumes from its last committed block)."""
    from pipeline.artifacts import atomic_path, atomic_write_json, folder_lock, package_versions

    key = tokenizer_key(tokenizer_json)
    root = Path(cache_root).expanduser().resolve() / "tokens"
    folder = root / f"{corpus.fingerprint}-{key}"
    if (folder / "manifest.json").exists():
        return _checked(TokenStore.load(folder), corpus)
    root.mkdir(parents=True, exist_ok=True)
    with folder_lock(root / f".{folder.name}.lockdir", wait_s=wait_s):
        if (folder / "manifest.json").exists():
            return _checked(TokenStore.load(folder), corpus)
        parts = root / f".{folder.name}.parts"
        parts.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        n = len(corpus)
        blocks = _build_blocks(corpus)
        todo = [b for b in range(len(blocks)) if not (parts / f"block-{b:06d}.lengths.npy").exists()]
        workers = build_workers(sum(blocks[b][1] - blocks[b][0] for b in todo))
        built = 0
        # an assembly killed (SIGKILL: no cleanup) left its temporary store, gigabytes for MS MARCO; only the
        # lock holder assembles, so any such folder is stale
        for stale in root.glob(f".tmp-{folder.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        with RawTokenizer(tokenizer_json, workers) as tokenize:
            vocab = int(tokenize.backend.get_vocab_size(with_added_tokens=True))
            dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32
            for b in todo:
                lo, hi = blocks[b]
                ids, _, lengths = tokenize(corpus.texts_at(np.arange(lo, hi)))
                _save(parts / f"block-{b:06d}.ids.npy", ids.astype(dtype, copy=False))
                _save(parts / f"block-{b:06d}.lengths.npy", lengths)  # written last: marks the block done
                built += hi - lo
                log.info("token store: %d / %d passages tokenised (%d tokeniser processes)", hi, n, workers)
                # a safe point: MS MARCO's build takes minutes, longer than Slurm's warning before the time limit
                signals.stop_if_requested()
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            lengths = np.concatenate([np.load(parts / f"block-{b:06d}.lengths.npy") for b in range(len(blocks))]) \
                if blocks else np.zeros(0, np.int64)
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(np.minimum(lengths, CAP), out=offsets[1:])
            out = np.lib.format.open_memmap(tmp / "ids.npy", mode="w+", dtype=dtype, shape=(int(offsets[-1]),))
            for b, (lo, hi) in enumerate(blocks):
                out[offsets[lo]:offsets[hi]] = np.load(parts / f"block-{b:06d}.ids.npy")
            out.flush()
            del out
            np.save(tmp / "offsets.npy", offsets)
            np.save(tmp / "lengths.npy", lengths.astype(np.int32))
            atomic_write_json(tmp / "manifest.json", {
                "kind": "token_store", "format": FORMAT, "tokenizer_key": key, "cap": CAP,
                "dtype": np.dtype(dtype).name,
                "corpus": corpus.fingerprint, "passages": n, "tokens": int(offsets[-1]),
                "passages_over_cap": int((lengths > CAP).sum()), "tokenised_here": built,
                "tokeniser_processes": workers,
                "seconds": round(time.perf_counter() - t0, 2), "versions": package_versions()})
        for f in parts.iterdir():
            f.unlink()
        parts.rmdir()
        log.info("token store: %d passages, %d tokens -> %s", n, int(offsets[-1]), folder)
    return _checked(TokenStore.load(folder), corpus)


def _checked(store: TokenStore, corpus) -> TokenStore:
    if len(store) != len(corpus):
        raise ValueError(f"token store {store.folder} holds {len(store)} passages for a corpus of {len(corpus)}; "
                         f"delete the folder to rebuild it")
    return store


def _build_blocks(corpus) -> list[tuple[int, int]]:
    """[lo, hi) passage rows of each build block: BUILD_BLOCK passages or BUILD_BYTES of text, whichever comes
    first (a passage longer than that is a block of its own). Fixed by the corpus, so a resumed build cuts the same
    blocks."""
    import pyarrow.compute as pc

    n = len(corpus)
    nbytes = np.asarray(pc.binary_length(corpus.table.column("text")).to_numpy(zero_copy_only=False), np.int64)
    ends = np.cumsum(nbytes)
    blocks, lo = [], 0
    while lo < n:
        before = int(ends[lo - 1]) if lo else 0
        hi = int(np.searchsorted(ends, before + BUILD_BYTES, side="right"))
        hi = max(lo + 1, min(hi, lo + BUILD_BLOCK, n))
        blocks.append((lo, hi))
        lo = hi
    return blocks


def _save(path: Path, array: np.ndarray) -> None:
    from pipeline.artifacts import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


# -------------------------------------------------------------------------------------------- template


@dataclass
class Template:
    """How a tokenizer turns raw tokens into model inputs: its special tokens around one text or a pair, their
    token type ids, and its truncation to ``max_len`` tokens (special tokens included)."""

    max_len: int
    single: tuple[np.ndarray, np.ndarray]  # (prefix ids, suffix ids)
    single_types: tuple[np.ndarray, int, np.ndarray]  # (prefix types, text type, suffix types)
    pair: tuple[np.ndarray, np.ndarray, np.ndarray]  # (prefix, between, suffix) ids
    pair_types: tuple[np.ndarray, int, np.ndarray, int, np.ndarray]

    @classmethod
    def probe(cls, tokenizer_json: str, max_len: int) -> Template | None:
        """Read the template off the tokenizer by encoding two probe texts with and without special tokens;
        None when the probe cannot be located in the result (an unusual post-processor)."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        tok.no_truncation()
        tok.no_padding()
        a = tok.encode("alpha", add_special_tokens=False).ids
        b = tok.encode("omega", add_special_tokens=False).ids
        one, two = tok.encode("alpha"), tok.encode("alpha", "omega")
        i = _find(one.ids, a, 0)
        j = _find(two.ids, a, 0)
        k = _find(two.ids, b, j + len(a)) if j >= 0 else -1
        if min(i, j, k) < 0 or not a or not b:
            return None
        ids1, tt1, ids2, tt2 = (np.asarray(x, np.int32) for x in (one.ids, one.type_ids, two.ids, two.type_ids))
        e1, ja, kb = i + len(a), j + len(a), k + len(b)
        return cls(int(max_len), (ids1[:i], ids1[e1:]), (tt1[:i], int(tt1[i]), tt1[e1:]),
                   (ids2[:j], ids2[ja:k], ids2[kb:]), (tt2[:j], int(tt2[j]), tt2[ja:k], int(tt2[k]), tt2[kb:]))

    @property
    def single_room(self) -> int:
        return self.max_len - len(self.single[0]) - len(self.single[1])

    @property
    def pair_room(self) -> int:
        return self.max_len - sum(len(x) for x in self.pair)

    def texts(self, store: TokenStore, rows: np.ndarray, want_types: bool):
        """(ids, offsets, type ids or None) of passages ``rows`` as single-text model inputs."""
        starts = np.asarray(store.offsets[rows], np.int64)
        keep = np.minimum(np.asarray(store.lengths[rows], np.int64), self.single_room)
        (pre, suf), (tpre, ttext, tsuf) = self.single, self.single_types
        return _assemble([pre, (store.ids, starts, keep), suf], [tpre, ttext, tsuf] if want_types else None)

    def pairs(self, queries: TokenStore, qrows: np.ndarray, store: TokenStore, prows: np.ndarray, want_types: bool):
        """(ids, offsets, type ids or None) of (query qrows[i], passage prows[i]) as pair model inputs, truncated
        like the Rust tokenizer's longest-first rule: when both do not fit in the room left by the special tokens,
        the shorter keeps min(its length, room // 2) tokens and the longer the rest (ties: the first keeps
        room // 2)."""
        qs = np.asarray(queries.offsets[qrows], np.int64)
        ps = np.asarray(store.offsets[prows], np.int64)
        n1 = np.asarray(queries.lengths[qrows], np.int64)  # untruncated: the rule compares the full lengths
        n2 = np.asarray(store.lengths[prows], np.int64)
        room = self.pair_room
        over = n1 + n2 > room
        first_shorter = n1 <= n2
        short = np.minimum(np.where(first_shorter, n1, n2), room // 2)
        k1 = np.where(over, np.where(first_shorter, short, room - short), n1)
        k2 = np.where(over, np.where(first_shorter, room - short, short), n2)
        (pre, mid, suf), (tpre, tq, tmid, tp, tsuf) = self.pair, self.pair_types
        return _assemble([pre, (queries.ids, qs, k1), mid, (store.ids, ps, k2), suf],
                         [tpre, tq, tmid, tp, tsuf] if want_types else None)


def _find(seq: Sequence[int], sub: Sequence[int], start: int) -> int:
    seq, sub = list(seq), list(sub)
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


# Ragged index helpers. Built from cumsum and fancy indexing, which release the GIL, rather than np.repeat, which
# holds it: the engine runs them in its collating thread, beside the thread that launches the GPU's kernels.


def ragged_arange(starts: np.ndarray, lens: np.ndarray, total: int | None = None) -> np.ndarray:
    """concatenate(arange(starts[i], starts[i] + lens[i]) for every i), int64."""
    lens = np.asarray(lens, np.int64)
    keep = lens > 0
    s, n = np.asarray(starts, np.int64)[keep], lens[keep]
    total = int(n.sum()) if total is None else int(total)
    out = np.ones(total, np.int64)
    if total:
        first = np.cumsum(n) - n  # where each row begins in the output
        out[0] = s[0]
        out[first[1:]] = s[1:] - (s[:-1] + n[:-1] - 1)
        np.cumsum(out, out=out)
    return out


def segment_ids(lens: np.ndarray, total: int | None = None) -> np.ndarray:
    """repeat(arange(len(lens)), lens), int64: the row of every token."""
    lens = np.asarray(lens, np.int64)
    total = int(lens.sum()) if total is None else int(total)
    if not total:
        return np.zeros(0, np.int64)
    marks = np.bincount(np.cumsum(lens)[:-1], minlength=total + 1)[:total]  # a row starts after each row end
    return np.cumsum(marks, dtype=np.int64)


def _assemble(segments: list, types: list | None):
    """Concatenate per row: constant segments (an id array, the same for every row) and variable ones (source ids,
    start per row, length per row). Returns CSR (ids int32, offsets int64, type ids int8 or None)."""
    n = next(len(s[1]) for s in segments if isinstance(s, tuple))
    seg_len = [np.full(n, len(s), np.int64) if not isinstance(s, tuple) else s[2] for s in segments]
    row_len = np.sum(seg_len, axis=0) if seg_len else np.zeros(n, np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(row_len, out=offsets[1:])
    total = int(offsets[-1])
    ids = np.empty(total, np.int32)
    tt = np.empty(total, np.int8) if types is not None else None
    at = offsets[:-1].copy()  # where each row's next segment starts
    for s, (seg, lens) in enumerate(zip(segments, seg_len)):
        if not isinstance(seg, tuple):
            if len(seg):
                dst = at[:, None] + np.arange(len(seg))
                ids[dst] = seg
                if tt is not None:
                    tt[dst] = types[s]
        else:
            src, starts, _ = seg
            m = int(lens.sum())
            if m:
                dst = ragged_arange(at, lens, m)
                ids[dst] = src[ragged_arange(starts, lens, m)]
                if tt is not None:
                    tt[dst] = types[s]
        at += lens
    return ids, offsets, tt


# --------------------------------------------------------------------------------------------- views


class TextTokens:
    """Passages ``rows`` of a store, as input to engine.encode_texts (sliceable like a list). ``texts_at(rows)``
    gives their texts: the engine checks a sample against the model's own preprocess with them, and falls back to
    them where the store cannot serve the model."""

    kind = "texts"

    def __init__(self, store: TokenStore, rows: np.ndarray, texts_at: Callable[[np.ndarray], list[str]]):
        self.store, self.rows, self.texts_at = store, np.asarray(rows, np.int64), texts_at

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, part: slice) -> TextTokens:
        if not isinstance(part, slice):
            raise TypeError("token views are sliced, not indexed")
        return TextTokens(self.store, self.rows[part], self.texts_at)

    def texts(self, picks: Sequence[int] | None = None) -> list[str]:
        return self.texts_at(self.rows if picks is None else self.rows[np.asarray(picks, np.int64)])

    def assemble(self, template: Template, want_types: bool):
        return template.texts(self.store, self.rows, want_types)

    def fits(self, template: Template) -> bool:
        return template.single_room <= self.store.cap


class PairTokens:
    """(query, passage) pairs as input to engine.score_pairs: query qrows[i] of ``queries`` (a TokenStore of the
    query texts, ``query_texts`` in the same order) with passage prows[i] of ``store``."""

    kind = "pairs"

    def __init__(self, queries: TokenStore, query_texts: Sequence[str], qrows: np.ndarray, store: TokenStore,
                 prows: np.ndarray, texts_at: Callable[[np.ndarray], list[str]]):
        self.queries, self.query_texts, self.store, self.texts_at = queries, query_texts, store, texts_at
        self.qrows, self.prows = np.asarray(qrows, np.int64), np.asarray(prows, np.int64)
        if len(self.qrows) != len(self.prows):
            raise ValueError(f"{len(self.qrows)} query rows for {len(self.prows)} passage rows")

    def __len__(self) -> int:
        return len(self.qrows)

    def __getitem__(self, part: slice) -> PairTokens:
        if not isinstance(part, slice):
            raise TypeError("token views are sliced, not indexed")
        return PairTokens(self.queries, self.query_texts, self.qrows[part], self.store, self.prows[part],
                          self.texts_at)

    def texts(self, picks: Sequence[int] | None = None) -> list[tuple[str, str]]:
        sel = slice(None) if picks is None else np.asarray(picks, np.int64)
        qrows, prows = self.qrows[sel], self.prows[sel]
        return list(zip([self.query_texts[int(i)] for i in qrows], self.texts_at(prows)))

    def assemble(self, template: Template, want_types: bool):
        return template.pairs(self.queries, self.qrows, self.store, self.prows, want_types)

    def fits(self, template: Template) -> bool:
        return template.pair_room <= min(self.store.cap, self.queries.cap)


TokenView = (TextTokens, PairTokens)
