"""Tokenisation into flat (CSR) token arrays, in this process or in the engine's tokeniser processes.

The engine (pipeline/engine.py) tokenises with the model's own fast tokenizer. One process tokenised MS MARCO
passages at 40k/s on an H200 host (the Rust tokenizer alone 64k/s; the rest is turning Encoding objects into arrays
under the GIL), while the GPU encodes 50k/s: for large inputs on a GPU the engine therefore runs this module as
worker processes (``python -m pipeline.tokenize_worker``, see tokenizing.TokenizerProcesses). A worker talks over its
stdin/stdout: an init message, then one list of inputs per job (JSON), answered by the raw token arrays. Plain
subprocesses rather than multiprocessing: nothing re-imports the caller's main script (which multiprocessing's
spawn and forkserver do), and no semaphores or fd passing are needed. Only numpy and tokenizers are imported here.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import sys
from typing import BinaryIO, Callable, Sequence

import numpy as np


def build_tokenizer(tokenizer_json: str, max_len: int | None, direction: str):
    """A tokenizers.Tokenizer from its JSON, without padding, truncating at ``max_len`` tokens (model-style)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_padding()
    if max_len:
        tok.enable_truncation(max_length=int(max_len), strategy="longest_first", direction=direction or "right")
    else:
        tok.no_truncation()
    return tok


def encode_csr(encode: Callable, items: Sequence, want_type_ids: bool, add_special_tokens: bool = True):
    """(ids int32, offsets int64 [n+1], type_ids int8 or None): row i is ids[offsets[i]:offsets[i+1]]."""
    encs = encode(list(items), add_special_tokens=add_special_tokens)
    n = len(encs)
    lengths = np.fromiter((len(e.ids) for e in encs), np.int64, n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), np.int32, total)
    type_ids = None
    if want_type_ids:
        type_ids = np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encs), np.int8, total)
    return ids, offsets, type_ids


def join_csr(parts: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Consecutive (ids, offsets, type_ids or None) parts as one: offsets rebased, type ids kept only when every
    part has them."""
    if len(parts) == 1:
        return tuple(parts[0])
    if not parts:
        return np.zeros(0, np.int32), np.zeros(1, np.int64), None
    lengths = np.concatenate([np.diff(p[1]) for p in parts])
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    type_ids = [p[2] for p in parts]
    return (np.concatenate([p[0] for p in parts]), offsets,
            None if any(t is None for t in type_ids) else np.concatenate(type_ids))


def widen_pipe(stream: BinaryIO, size: int = 1 << 20) -> None:
    """Grow a pipe's buffer to ``size`` bytes where Linux allows (F_SETPIPE_SZ; 1 MiB is the default ceiling for
    unprivileged processes): a sub-chunk's message then crosses in one or two system calls instead of one per 64 KiB,
    and each call is a GIL hand-off for the GPU-feeding thread of the engine's process. Best effort: a platform
    without it keeps its default."""
    try:
        import fcntl

        fcntl.fcntl(stream.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (ImportError, OSError, ValueError):
        pass


def send(stream: BinaryIO, header: dict, arrays: Sequence[np.ndarray] = ()) -> None:
    """One message: a JSON header (8-byte length first), then the raw bytes of ``arrays`` (dtypes and lengths in
    the header). Plain data both ways: nothing executable crosses the pipe."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = dict(header, arrays=[[a.dtype.str, int(a.size)] for a in arrays])
    data = json.dumps(header).encode("utf-8")
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    for a in arrays:
        stream.write(a.tobytes())
    stream.flush()


def _read(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("tokeniser process closed its pipe")
    return data


def recv(stream: BinaryIO) -> tuple[dict, list[np.ndarray]]:
    """The next message of :func:`send`: (header, arrays); EOFError when the other side has gone."""
    (size,) = struct.unpack("<Q", _read(stream, 8))
    header = json.loads(_read(stream, size).decode("utf-8"))
    arrays = []
    for dtype, count in header.pop("arrays", []):
        dt = np.dtype(dtype)
        arrays.append(np.frombuffer(_read(stream, dt.itemsize * int(count)), dtype=dt).copy())
    return header, arrays


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """Worker loop: an init message (tokenizer JSON, max length, truncation side, want type ids, and optionally
    whether to add special tokens), then jobs (lists of already-prompted inputs, pairs as 2-lists) answered by ids,
    offsets (and type ids) or an error text."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the workers are the parallelism
    try:  # below the GPU-feeding threads of the engine's process: a worker never takes a core they need
        os.nice(10)
    except (AttributeError, OSError):  # pragma: no cover - platforms without nice
        pass
    init, _ = recv(inp)
    tokenizer_json, max_len, direction, want_type_ids, *rest = init["init"]
    special = bool(rest[0]) if rest else True  # False: raw tokens (pipeline/tokens.py builds its stores so)
    tok = build_tokenizer(tokenizer_json, max_len, direction)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    send(out, {"status": "ready", "pid": os.getpid()})
    while True:
        try:
            job, _ = recv(inp)
        except EOFError:
            return
        try:
            items = [tuple(x) if isinstance(x, list) else x for x in job["items"]]
            ids, offsets, type_ids = encode_csr(encode, items, bool(want_type_ids), add_special_tokens=special)
            send(out, {"status": "ok"}, [ids, offsets] + ([type_ids] if type_ids is not None else []))
        except Exception as exc:  # reported to the engine, which tokenises in its own process instead
            send(out, {"status": "error", "message": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
