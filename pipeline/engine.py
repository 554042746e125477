"""Fast inference for bi-encoders (``encode_texts``) and cross-encoders (``score_pairs``).

Used by the retrieve, score and evaluate stages and by ``scripts/bench_gpu.py``. Module level imports are
restricted to torch, numpy, transformers and sentence-transformers (see docs/architecture.md).

What it does differently from ``SentenceTransformer.encode`` / ``CrossEncoder.predict``:

* tokenises once per chunk of inputs (default 65,536) with the model's own fast tokenizer, in a background
  thread (or, opt-in, in worker processes: ``tokenize_workers``), into flat token arrays (no padded tensors, no
  per-item Python objects kept around); the first chunk is cross-checked against the model's own ``preprocess``
  (prompt, lower-casing, truncation, special tokens); any difference switches to the model's own ``preprocess``.
  Inputs may instead be views over a corpus token store (``pipeline.tokens.TextTokens`` / ``PairTokens``: the
  stages pass these for large corpora), which are turned into model inputs with array operations instead of
  tokenised, checked the same way on the first chunk (all of this: pipeline/tokenizing.py);
* sorts every chunk by token length and cuts it into token-budget batches (``batch_tokens`` padded tokens, at
  most ``max_batch`` rows), so padding is small and batches are as large as memory allows;
* on CUDA with a half-precision model, removes padding entirely: the batch is one packed sequence
  (``input_ids`` [1, T] with per-sequence ``position_ids``) and attention is PyTorch's built-in FlashAttention
  variable-length kernel (pipeline/varlen.py), registered with transformers' ``AttentionInterface`` as
  ``"engine_varlen"`` and fed ``cu_seq_lens``; a forward hook re-pads the encoder output so the model's own
  heads (BERT pooler, ELECTRA/DistilBERT classification heads) and the SentenceTransformer's own
  Pooling/Dense/Normalize modules run unchanged. Elsewhere (CPU, fp32,
  models without the attention interface) batches are padded and attention is SDPA with a prebuilt 4-D mask
  (no host synchronisation in mask creation). The first packed batch of a model is checked against the padded
  path once; a failure or a mismatch falls back to padding. Packed *training* batches (pipeline/packing.py) also
  run on the CPU: there ``engine_varlen`` is SDPA over buckets of similar-length sequences
  (pipeline/varlen.py), so only attention sees (a little) padding;
* bf16: on CUDA a bf16 copy of the transformer (cached while the weights are unchanged); on CPUs with
  AVX512-BF16/AMX the same (2-3x faster than fp32 here); pooling and the rest of the SentenceTransformer run in
  fp32 on the transformer's output;
* on CUDA, for jobs of 20k+ inputs, each transformer layer runs through ``torch.compile`` (one graph for all
  layers: fused LayerNorms, GELUs and residual adds), checked against the eager layers on the first batch;
* the working copy's layers rewritten where that is checked to change nothing (pipeline/rewrites.py): each
  feed-forward GELU in its GEMM's epilogue, and a cross-encoder's last feed-forward on each text's first token;
* the collation thread produces pinned tensors that are copied with ``non_blocking=True``; results stay on the
  device and are copied to the host once per chunk, asynchronously; nothing in the loop synchronises with the
  host (no ``.item()``, no ``.cpu()`` per batch).

Multi-GPU on one node: ``devices=["cuda:0", "cuda:1", ...]`` (or :func:`encode_texts_multi_gpu`) runs one
process per device over contiguous shards and writes into one shared-memory output.

Measured figures (H200 and CPU) are in the docstring of ``scripts/bench_gpu.py``. ``LAST_RUN`` records, per call,
which attention path ran ("varlen", "sdpa" or "model"), the dtype, real and padded token counts and timings.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from pipeline import rewrites, tokenizing, tokens, varlen

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import CrossEncoder, SentenceTransformer

log = logging.getLogger(__name__)

__all__ = [
    "encode_texts",
    "score_pairs",
    "resolve_precision",
    "resolve_batch_tokens",
    "uses_dot_product",
    "encode_texts_multi_gpu",
    "score_pairs_multi_gpu",
    "token_budget_batches",
    "LAST_RUN",
]

DEFAULT_CHUNK = 65536

#: facts about the last encode/score call of this process (attention path, token counts, timings);
#: read by the bench script and the stages' manifests.
LAST_RUN: dict[str, Any] = {}


# ----------------------------------------------------------------------------------------------- precision
def _cpu_has_fast_bf16() -> bool:
    env = os.environ.get("PIPELINE_CPU_BF16")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "")
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover
            pass
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:  # pragma: no cover
        return False


def resolve_precision(precision: str, device) -> torch.dtype | None:
    """Compute dtype for ``precision`` on ``device``; ``None`` means fp32.

    ``"auto"``: bf16 on CUDA (fp16 where bf16 is unsupported), bf16 on CPUs with AVX512-BF16 or AMX, else fp32.
    ``"fp32"``/``"float32"``, ``"bf16"``/``"bfloat16"``, ``"fp16"``/``"float16"``/``"half"`` force a dtype.
    """
    from pipeline.models import precision_name

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    p = precision_name(precision)
    if p != "auto":
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]
    if dev.type == "cuda":
        try:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        except Exception:  # pragma: no cover
            return torch.float16
    if dev.type == "cpu":
        return torch.bfloat16 if _cpu_has_fast_bf16() else None
    return None


def dtype_name(dtype: torch.dtype | None) -> str:
    """A compute dtype as artifacts and reports name it (float32, bfloat16, float16); None (see resolve_precision)
    is float32."""
    return str(dtype).replace("torch.", "") if dtype is not None else "float32"


def resolve_batch_tokens(batch_tokens, device) -> int:
    """Tokens per batch. "auto": 65,536 on GPUs with 40 GB or more, 32,768 on smaller GPUs, 16,384 on the CPU.
    On an H200 the device alone gains nothing past 65,536 (session 3's profile), and the whole engine call did not
    either: over a token store, 65,536 / 131,072 / 262,144 tokens encoded 56.5k / 56.7k / 57.3k passages/s and
    scored 28.0k / 27.7k / 28.2k pairs/s (session 12, docs/bench/h200-2026-11-27-s12-run3.txt)."""
    if batch_tokens is None or str(batch_tokens).lower() == "auto":
        dev = torch.device(device)
        if dev.type != "cuda":
            return 16384
        try:
            total = torch.cuda.get_device_properties(dev).total_memory
        except Exception:  # pragma: no cover
            total = 0
        return 65536 if total >= 40 * 2**30 else 32768
    value = int(batch_tokens)
    if value < 1:
        raise ValueError(f"batch_tokens must be auto or a positive number, got {batch_tokens!r}")
    return value


def resolve_max_batch(max_batch: int | None, device) -> int:
    """Rows per batch at most. None: 2,048 on CUDA (with 65,536 tokens a batch of ~83-token passages has ~790 rows;
    the cap only binds for very short texts such as queries), 512 on the CPU."""
    if max_batch:
        return int(max_batch)
    return 2048 if torch.device(device).type == "cuda" else 512


def uses_dot_product(model) -> bool:
    """True when the model's similarity function is the dot product (ANCE-style), i.e. callers must not
    normalise embeddings; False for cosine (the default)."""
    name = getattr(model, "similarity_fn_name", None)
    if name is None:
        return False
    name = str(getattr(name, "value", name)).lower()
    return name in ("dot", "dot_product", "dot_score")



# ------------------------------------------------------------------------------------------ model handling
@dataclass
class _Prepared:
    hf: torch.nn.Module
    dtype: torch.dtype | None
    device: torch.device
    autocast: bool  # run the (uncast) model under autocast instead of a cast copy
    attn: str  # "varlen" | "sdpa" | "model"
    accepts_token_type_ids: bool
    pos_offset: int
    hook_handle: Any = None
    ctx: dict = field(default_factory=dict)
    verified: bool = False
    fingerprint: tuple = ()
    compiled: list = field(default_factory=list)  # the layers' compiled call functions (empty: eager)
    compile_checked: bool = False
    fused_gelu: int = 0  # feed-forward GELUs computed in their GEMM's epilogue (rewrites.fuse_gelu_epilogues)
    freeze: bool = False  # the compiled layers fold the weights in as constants (rewrites.resolve_compile_freeze)
    first_token_ffn: bool = False  # the last layer's feed-forward runs on each text's first token only


_PREPARED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _fingerprint(m: torch.nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, str(p.device)) for p in m.parameters())


def position_offset(hf: torch.nn.Module) -> int:
    """The first position id of a text: RoBERTa-family embeddings count positions from padding_idx + 1 (as
    sentence-transformers does), others from 0. Packed batches set position ids themselves, so they need it."""
    for module in hf.modules():
        pad = getattr(module, "padding_idx", None)
        if isinstance(pad, int) and isinstance(getattr(module, "position_embeddings", None), torch.nn.Embedding):
            return pad + 1
    return 0


def _set_attn(hf: torch.nn.Module, name: str) -> bool:
    try:
        if hasattr(hf, "set_attn_implementation"):
            hf.set_attn_implementation(name)
        else:  # pragma: no cover - older transformers
            hf.config._attn_implementation = name
        return getattr(hf.config, "_attn_implementation", name) == name
    except Exception as exc:
        log.debug("cannot set attention implementation %s: %s", name, exc)
        return False


def _repad_hook(prep: _Prepared):
    def hook(module, args, output):
        ctx = prep.ctx
        if not ctx.get("packed"):
            return output
        hs = output[0] if isinstance(output, tuple) else output["last_hidden_state"]
        if hs.dim() != 3 or hs.shape[0] != 1:
            return output
        padded = hs.new_zeros(ctx["B"], ctx["L"], hs.shape[-1])
        padded[ctx["rows"], ctx["cols"]] = hs[0]
        if isinstance(output, tuple):
            return (padded,) + tuple(output[1:])
        output["last_hidden_state"] = padded
        return output

    return hook


def _prepare(hf_model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None, attention: str,
             compile_layers: bool = False, first_token_head: bool = False) -> _Prepared:
    """A working copy of the HF model on ``device`` in ``dtype`` with the chosen attention, cached while the
    original's weights are unchanged (fingerprint over data pointers and in-place version counters)."""
    fuse_gelu = rewrites.resolve_fuse_gelu()
    freeze = bool(compile_layers) and rewrites.resolve_compile_freeze()
    first_token = bool(first_token_head) and rewrites.resolve_first_token_ffn()
    key = (str(device), dtype, attention, bool(compile_layers), fuse_gelu, freeze, first_token)
    fp = _fingerprint(hf_model)
    cache = _PREPARED.setdefault(hf_model, {})
    prep = cache.get(key)
    if prep is not None and prep.fingerprint == fp:
        return prep
    for stale in [k for k, v in cache.items() if v.fingerprint != fp]:  # weights changed: drop old copies
        old = cache.pop(stale)
        if old.hook_handle is not None:
            old.hook_handle.remove()

    want_varlen = attention in ("auto", "varlen") and dtype in (torch.float16, torch.bfloat16) and \
        varlen.varlen_available(device)
    if attention == "varlen" and not want_varlen:
        log.warning("varlen attention requested but unavailable on %s/%s; using padded SDPA", device, dtype)
    encoder = rewrites.find_encoder(hf_model)
    supports_backend = bool(getattr(hf_model, "_supports_attention_backend", False))
    if want_varlen and (encoder is None or not supports_backend):
        want_varlen = False
    try:
        work = copy.deepcopy(hf_model)
        use_autocast = False
    except Exception as exc:  # pragma: no cover - e.g. models holding non-copyable state
        log.warning("cannot copy the model (%s); running it in place under autocast with padded attention", exc)
        work, use_autocast, want_varlen = hf_model, True, False
    if not use_autocast:
        work.to(device=device, dtype=dtype) if dtype is not None else work.to(device=device)
        if dtype is not None:
            _keep_head_fp32(work)
        work.eval()
        for p in work.parameters():
            p.requires_grad_(False)
    ctx: dict = {}
    # checked on the model's own attention, before the packed (varlen) one that needs packed inputs
    pruned = first_token and not use_autocast and rewrites.prune_last_feed_forward(work, ctx, device, eager=freeze)
    attn = "model"
    if want_varlen and _set_attn(work, varlen.VARLEN_ATTN_NAME):
        attn = "varlen"
    elif not use_autocast and getattr(work, "_supports_sdpa", False) and _set_attn(work, "sdpa"):
        attn = "sdpa"
    fwd_params = inspect.signature(work.forward).parameters
    prep = _Prepared(
        hf=work,
        dtype=dtype,
        device=device,
        autocast=use_autocast,
        attn=attn,
        accepts_token_type_ids="token_type_ids" in fwd_params,
        pos_offset=position_offset(work),
        fingerprint=fp,
        ctx=ctx,
        first_token_ffn=pruned,
    )
    if attn == "varlen":
        prep.hook_handle = rewrites.find_encoder(work).register_forward_hook(_repad_hook(prep))
    if fuse_gelu and not use_autocast:  # before compiling: the compiled layers then call the fused GEMMs
        prep.fused_gelu = rewrites.fuse_gelu_epilogues(work, device, dtype)
    if compile_layers and not use_autocast:
        _compile_layers(prep, freeze)
        prep.freeze = freeze and bool(prep.compiled)
    cache[key] = prep
    return prep


def _compile_layers(prep: _Prepared, freeze: bool = False) -> None:
    """Compiled transformer layers (:func:`rewrites.compile_encoder_layers`), so the residual adds, LayerNorms, bias
    adds and GELUs between the matmuls run fused instead of as separate passes over the activations (29% of encode time
    on an H200, scripts/profile_gpu.py); checked against the eager layers on the first batch (see
    _Runner._forward)."""
    # frozen graphs under options of their own: dynamo reuses a layer's graph for another copy of the layer
    # (the weights are inputs) when the compile options agree, so a process that compiled the layers unfrozen
    # would otherwise keep running those graphs (the freezing switch itself is _frozen_compiles)
    compiled = rewrites.compile_encoder_layers(prep.hf, options={"freezing": True} if freeze else None)
    if not compiled:
        log.warning("engine: compile_layers: no transformer layers found to compile; running eagerly")
        return
    prep.compiled = compiled



def _pools_first_token_only(model, prompt: str | None = None) -> bool:
    """Whether a SentenceTransformer's pooling reads only the first token ([CLS] pooling alone: ANCE, BGE,
    msmarco-bert-base-dot-v5), under the pooling_mode of sentence-transformers 6.x or the older boolean flags.
    Only a pooling module right after the transformer (a CNN or LSTM between mixes the tokens first), and not
    one that leaves a ``prompt`` out (``include_prompt=False``: its "first" token is the one after the prompt)."""
    modules = list(model)[1:2] if tokenizing.transformer_module(model) is not None else []
    for module in modules:
        if prompt and getattr(module, "include_prompt", True) is False:
            return False
        modes = getattr(module, "pooling_mode", None)
        if isinstance(modes, (str, tuple, list)):
            return tuple([modes] if isinstance(modes, str) else modes) == ("cls",)
        if hasattr(module, "pooling_mode_cls_token"):
            flags = [bool(getattr(module, name)) for name in dir(module) if name.startswith("pooling_mode_")
                     and not callable(getattr(module, name))]
            return bool(module.pooling_mode_cls_token) and sum(flags) == 1
    return False


def _unusual_transformer_output(model) -> str | None:
    """What makes a SentenceTransformer's Transformer module hand on something other than its last hidden state
    as ``token_embeddings`` (what the engine feeds the modules after it), or None."""
    module = tokenizing.transformer_module(model)
    config = getattr(module, "modality_config", None)
    text = config.get("text") if isinstance(config, dict) else None
    if isinstance(text, dict) and (text.get("method", "forward") != "forward" or
                                   text.get("method_output_name", "last_hidden_state") != "last_hidden_state"):
        return f"reads {text!r} from the model"
    if getattr(module, "module_output_name", None) not in (None, "token_embeddings"):
        return f"writes its output to {module.module_output_name!r}"
    if any(type(m).__name__ == "WeightedLayerPooling" for m in list(model)[1:]):
        return "is followed by WeightedLayerPooling, which reads every layer's output"
    return None



def _frozen_compiles(prep: "_Prepared"):
    """The context of a forward that may compile a layer: Inductor's freezing switched on for it where
    ``prep.freeze`` (a compile option does not reach that switch, which Inductor reads before applying options);
    otherwise nothing."""
    if prep.freeze and prep.compiled:
        import torch._inductor.config as inductor_config

        return inductor_config.patch(freezing=True)
    return contextlib.nullcontext()



def _use_compiled(prep: _Prepared, on: bool) -> None:
    for layer, impl in zip(rewrites.encoder_layers(prep.hf), prep.compiled):
        layer._compiled_call_impl = impl if on else None


#: compile the layers (auto) from this many inputs on: compiling costs 5-13 s once per process (H200), at ~20-40k
#: inputs/s the gain of 1.2-2x repays it from ~20k inputs
COMPILE_MIN_ITEMS = 20_000


def resolve_compile_layers(compile_layers: bool | None, device: torch.device | None = None, n: int = 0) -> bool:
    """None (auto): the PIPELINE_COMPILE_LAYERS environment variable (1/true: on, 0/false: off) where set; else on
    for CUDA jobs of at least ``COMPILE_MIN_ITEMS`` inputs and off elsewhere (on the CPU it gained nothing). On an
    H200, over a token store (device-bound: session 12), compiled layers were 10% (encode) and 12% (score) faster
    than eager; from texts (host-bound: session 6) 1.0x-2.3x, never clearly slower; embeddings within cosine 0.99997
    of the eager layers."""
    if compile_layers is None:
        setting = rewrites.env_switch("PIPELINE_COMPILE_LAYERS")
        if setting is not None:
            return setting
        return device is not None and device.type == "cuda" and n >= COMPILE_MIN_ITEMS
    return bool(compile_layers)


def embedding_dimension(model: Any) -> int:
    """The width of a SentenceTransformer's embeddings (0 where unknown): ``get_embedding_dimension`` since
    sentence-transformers 6, which deprecates the older name (still the only one before it)."""
    dim_of = getattr(model, "get_embedding_dimension", None) or getattr(model, "get_sentence_embedding_dimension", None)
    return int((dim_of() if dim_of is not None else 0) or 0)


def _raised_in_fused_gemm(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a fused Linear + GELU GEMM (rewrites._LinearGELU), and not for lack of memory
    (unfusing frees none, and another try would only fail again later)."""
    import traceback

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    fused = rewrites._LinearGELU.forward.__code__
    return any(frame.f_code is fused for frame, _ in traceback.walk_tb(exc.__traceback__))


def _fallback_to_padded(prep: _Prepared) -> None:
    if prep.attn != "varlen":
        return
    if prep.hook_handle is not None:
        prep.hook_handle.remove()
        prep.hook_handle = None
    prep.attn = "sdpa" if getattr(prep.hf, "_supports_sdpa", False) and _set_attn(prep.hf, "sdpa") else "model"
    if prep.attn == "model":
        _set_attn(prep.hf, "eager")


# ---------------------------------------------------------------------------------------------- batching
def token_budget_batches(lengths_sorted: np.ndarray, batch_tokens: int, max_batch: int, packed: bool = False):
    """Cut a descending-sorted length array into consecutive [start, end) batches.

    Padded: rows * longest-row <= batch_tokens; packed: sum of lengths <= batch_tokens; never more than
    ``max_batch`` rows; a single row longer than the budget forms its own batch. Every index appears in
    exactly one batch, in order.
    """
    n = len(lengths_sorted)
    out = []
    if n == 0:
        return out
    lengths_sorted = np.asarray(lengths_sorted, dtype=np.int64)
    batch_tokens = max(1, int(batch_tokens))
    max_batch = max(1, int(max_batch))
    if packed:
        csum = np.concatenate([[0], np.cumsum(lengths_sorted)])
    i = 0
    while i < n:
        if packed:
            j = int(np.searchsorted(csum, csum[i] + batch_tokens, side="right")) - 1
            j = max(j, i + 1)
        else:
            longest = max(1, int(lengths_sorted[i]))
            j = i + max(1, batch_tokens // longest)
        j = min(j, i + max_batch, n)
        out.append((i, j))
        i = j
    return out


@dataclass
class _Batch:
    local_idx: np.ndarray  # rows of this batch, as positions in the chunk (input order)
    chunk: int
    B: int
    L: int
    T: int
    packed: bool
    tensors: dict


class _ChunkEnd:
    def __init__(self, chunk: int, start: int, n: int):
        self.chunk, self.start, self.n = chunk, start, n


class _Stop:
    pass


def collate(toks: tokenizing.Tokens, order: np.ndarray, pos_offset: int, packed: bool, pad_id: int, want_tt: bool,
            pin: bool) -> tuple[int, int, int, dict[str, torch.Tensor]]:
    """One batch of model inputs from rows ``order`` of ``toks``: (rows B, longest L, real tokens T, tensors).
    Packed: input_ids/position_ids [1, T] (positions from ``pos_offset``), cu_seq_lens ``cu`` and each token's
    row and column (to re-pad the output); else input_ids [B, L] padded with ``pad_id``. Also ``lens`` [B];
    token_type_ids where ``want_tt``; pinned where ``pin`` (for non-blocking copies)."""
    lens = toks.lengths[order]
    B = len(order)
    L = int(lens.max()) if B else 0
    T = int(lens.sum())
    starts = toks.offsets[order]
    # flat gather indices of all tokens of the batch, row-major (helpers that release the GIL: see pipeline/tokens.py)
    flat_idx = tokens.ragged_arange(starts, lens, T)
    rows = tokens.segment_ids(lens, T)
    cols = np.arange(T, dtype=np.int64) - (np.cumsum(lens) - lens)[rows]
    ids = toks.ids[flat_idx].astype(np.int64)
    t: dict[str, torch.Tensor] = {}
    if packed:
        cu = np.zeros(B + 1, np.int32)
        np.cumsum(lens, out=cu[1:])
        t["input_ids"] = torch.from_numpy(ids).view(1, T)
        t["position_ids"] = torch.from_numpy(cols + pos_offset).view(1, T)
        if want_tt and toks.type_ids is not None:
            t["token_type_ids"] = torch.from_numpy(toks.type_ids[flat_idx].astype(np.int64)).view(1, T)
        t["cu"] = torch.from_numpy(cu)
        t["rows"] = torch.from_numpy(rows)
        t["cols"] = torch.from_numpy(cols)
    else:
        pid = np.full((B, L), pad_id, np.int64)
        pid[rows, cols] = ids
        t["input_ids"] = torch.from_numpy(pid)
        if want_tt and toks.type_ids is not None:
            tt = np.zeros((B, L), np.int64)
            tt[rows, cols] = toks.type_ids[flat_idx]
            t["token_type_ids"] = torch.from_numpy(tt)
    t["lens"] = torch.from_numpy(lens.astype(np.int64))
    if pin:
        t = {k: v.pin_memory() for k, v in t.items()}
    return B, L, T, t


_PROBE = torch.zeros(4)


def _launch_slice(n: int = 100) -> None:
    """``n`` tiny CPU tensor ops: the Python and dispatcher work of launching ``n`` kernels, which gives up the
    GIL inside every op and needs it back after, as the GPU-feeding thread does."""
    for _ in range(n):
        _PROBE.add_(1.0)


def _launch_rate(seconds: float) -> float:
    """Slices of :func:`_launch_slice` per second in this thread, measured for ``seconds``."""
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        _launch_slice()
        n += 1
    return n / (time.perf_counter() - t0)


# -------------------------------------------------------------------------------------------- the runner
def _chunk_bounds(n: int, chunk: int, ramp: bool) -> list[tuple[int, int]]:
    """[start, end) of the tokenisation chunks. With ``ramp`` the first chunks are small (2048, 4096, ...) so
    the device starts working while the next, larger chunks are being tokenised."""
    out, s, size = [], 0, (min(chunk, 2048) if ramp else chunk)
    while s < n:
        e = min(n, s + size)
        out.append((s, e))
        s, size = e, min(chunk, size * 2)
    return out


def _producer(items, tokenizer: tokenizing.Tokenizer, prep: _Prepared, cfg: dict, q: "queue.Queue",
              stop: threading.Event, stats):
    handles: dict = {}
    cpu0 = time.thread_time()
    try:
        pad_id = cfg["pad_id"]
        chunks, pool = cfg["bounds"], cfg["pool"]
        for c, (s, e) in enumerate(chunks):
            if stop.is_set():
                return
            # the pool tokenises up to `ahead` chunks beyond the one being batched, so the device never waits
            for ahead in range(c, min(len(chunks), c + cfg["ahead"] + 1)):
                if ahead not in handles:
                    handles[ahead] = tokenizer.submit(items[chunks[ahead][0] : chunks[ahead][1]], pool)
            t0 = time.perf_counter()
            toks = tokenizer.result(items[s:e], handles.pop(c))
            stats["tokenize_s"] += time.perf_counter() - t0
            lens = toks.lengths
            stats["tokens"] += int(lens.sum())
            stats["attn_tokens"] += float(np.square(lens.astype(np.float64)).sum())
            order = np.argsort(-lens, kind="stable")
            # cfg["packed"] only ever goes True -> False (permanent fallback, set by the consumer); packed batches
            # still queued then are re-padded by the consumer. prep.attn is not read here: it changes briefly
            # while the consumer checks the packed path against the padded one.
            packed = cfg["packed"]
            bounds = token_budget_batches(lens[order], cfg["batch_tokens"], cfg["max_batch"], packed=packed)
            for a, b in bounds:
                if stop.is_set():
                    return
                sel = order[a:b]
                packed = packed and cfg["packed"]
                B, L, T, tensors = collate(toks, sel, prep.pos_offset, packed, pad_id, cfg["want_tt"], cfg["pin"])
                tensors["local_idx"] = torch.from_numpy(np.ascontiguousarray(sel, dtype=np.int64))
                if cfg["pin"]:
                    tensors["local_idx"] = tensors["local_idx"].pin_memory()
                stats["padded_tokens"] += B * L
                _put(q, _Batch(sel, c, B, L, T, packed, tensors), stop, stats)
            _put(q, _ChunkEnd(c, s, e - s), stop, stats)
        _put(q, _Stop(), stop)
    except BaseException as exc:  # forwarded to the consumer
        _put(q, exc, stop)
    finally:
        stats["producer_cpu_s"] = time.thread_time() - cpu0
        for handle in handles.values():
            for fut in handle or ():
                fut.cancel()


def _put(q: "queue.Queue", item, stop: threading.Event, stats: dict | None = None) -> None:
    """Queue ``item`` unless the run stops; time spent waiting for room (the consumer is the slower side) is added
    to ``stats["producer_blocked_s"]``."""
    try:
        q.put_nowait(item)
        return
    except queue.Full:
        pass
    t0 = time.perf_counter()
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            break
        except queue.Full:
            continue
    if stats is not None:
        stats["producer_blocked_s"] = stats.get("producer_blocked_s", 0.0) + time.perf_counter() - t0


def _to_device(t: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) for k, v in t.items()}


def _packed_to_padded(batch: _Batch, pad_id: int) -> _Batch:
    t = batch.tensors
    B, L = batch.B, batch.L
    ids = torch.full((B, L), pad_id, dtype=torch.int64, device=t["input_ids"].device)
    ids[t["rows"], t["cols"]] = t["input_ids"][0]
    nt = {"input_ids": ids, "lens": t["lens"], "local_idx": t["local_idx"]}
    if "token_type_ids" in t:
        tt = torch.zeros((B, L), dtype=torch.int64, device=ids.device)
        tt[t["rows"], t["cols"]] = t["token_type_ids"][0]
        nt["token_type_ids"] = tt
    return _Batch(batch.local_idx, batch.chunk, B, L, batch.T, False, nt)


def _hf_forward(prep: _Prepared, batch: _Batch, dev: dict):
    """Run the prepared HF model on one batch; returns (model output, [B, L] bool mask)."""
    B, L = batch.B, batch.L
    mask2d = torch.arange(L, device=prep.device)[None, :] < dev["lens"][:, None]
    kwargs: dict[str, Any] = {"input_ids": dev["input_ids"]}
    if prep.accepts_token_type_ids and "token_type_ids" in dev:
        kwargs["token_type_ids"] = dev["token_type_ids"]
    if batch.packed:
        kwargs["position_ids"] = dev["position_ids"]
        kwargs["cu_seq_lens_q"] = dev["cu"]
        kwargs["cu_seq_lens_k"] = dev["cu"]
        kwargs["max_length_q"] = L
        kwargs["max_length_k"] = L
        prep.ctx.update(packed=True, B=B, L=L, rows=dev["rows"], cols=dev["cols"])
        if prep.first_token_ffn:  # the texts' first tokens, for the pruned last feed-forward
            prep.ctx["first"] = dev["cu"][:-1].long()
    else:
        prep.ctx["packed"] = False
        if prep.attn == "sdpa":
            kwargs["attention_mask"] = mask2d[:, None, None, :]  # 4-D bool: returned as-is, no host sync
        else:
            kwargs["attention_mask"] = mask2d.to(torch.int64)
    try:
        if prep.autocast and prep.dtype is not None:
            with torch.autocast(device_type=prep.device.type, dtype=prep.dtype):
                out = prep.hf(**kwargs, return_dict=True)
        else:
            with _frozen_compiles(prep):
                out = prep.hf(**kwargs, return_dict=True)
    finally:
        prep.ctx["packed"] = False
        prep.ctx.pop("rows", None)
        prep.ctx.pop("cols", None)
        prep.ctx.pop("first", None)
    return out, mask2d


class _Runner:
    """Shared machinery of encode_texts and score_pairs."""

    def __init__(self, kind: str, model, hf_model, items, *, prompt, batch_tokens, max_batch, precision,
                 show_progress, desc, attention, chunk, post: Callable, tokenize_workers: int | None = 0,
                 compile_layers: bool | None = None):
        self.kind = kind
        self.model = model
        self.items = items
        self.post = post
        try:
            device = model.device
        except Exception:  # pragma: no cover
            device = next(hf_model.parameters()).device
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = resolve_precision(precision, self.device)
        self.prep = _prepare(hf_model, self.device, self.dtype, attention,
                             resolve_compile_layers(compile_layers, self.device, len(items)),
                             first_token_head=kind == "pairs" or _pools_first_token_only(model, prompt))
        cfg_max_pos = getattr(getattr(hf_model, "config", None), "max_position_embeddings", None)
        max_positions = (cfg_max_pos - self.prep.pos_offset) if cfg_max_pos else None
        tok = getattr(tokenizing.transformer_module(model), "tokenizer", None) or getattr(model, "tokenizer", None)
        input_names = getattr(tok, "model_input_names", None) or []
        want_tt = self.prep.accepts_token_type_ids and "token_type_ids" in input_names
        self.tokenizer = tokenizing.Tokenizer(model, kind, prompt, want_tt, max_positions)
        if isinstance(items, tokens.TokenView):
            self.tokenizer = tokenizing.TokensFromStore(self.tokenizer, items)
        pad_id = getattr(tok, "pad_token_id", None)
        self.cfg = {
            "chunk": max(1, int(chunk or DEFAULT_CHUNK)),
            "batch_tokens": resolve_batch_tokens(batch_tokens, self.device),
            "max_batch": resolve_max_batch(max_batch, self.device),
            "pad_id": 0 if pad_id is None else int(pad_id),
            "want_tt": want_tt,
            "pin": self.device.type == "cuda",
            "packed": self.prep.attn == "varlen",
            "ahead": 2,  # chunks tokenised ahead by the pool
        }
        workers = tokenizing.resolve_tokenize_workers(tokenize_workers, self.device, len(items))
        use_pool = workers and self.tokenizer.backend
        self.cfg["pool"] = tokenizing.tokenizer_pool(self.tokenizer, workers) if use_pool else None
        self.tokenize_workers = workers if self.cfg["pool"] is not None else 0
        self.cfg["bounds"] = _chunk_bounds(len(items), self.cfg["chunk"], ramp=self.device.type == "cuda")
        self.show_progress = show_progress
        self.desc = desc
        self.attention = attention

    def _forward(self, batch: _Batch) -> torch.Tensor:
        """The model on one batch. Fused GELU GEMMs that fail (on a shape their check did not try) are undone for
        good, and the batch runs again with separate GELUs (and eager layers: compiled ones were traced with the
        fused GEMMs). Any other failure (out of memory, a bad input) is the caller's, as it would be unfused."""
        try:
            return self._forward_layers(batch)
        except Exception as exc:
            prep = self.prep
            if not prep.fused_gelu or not _raised_in_fused_gemm(exc):
                raise
            log.warning("engine: a fused GELU GEMM failed (%s: %s); computing the GELUs separately",
                        type(exc).__name__, exc)
            rewrites.unfuse_gelu_epilogues(prep.hf)
            prep.fused_gelu = 0
            if prep.compiled:
                _use_compiled(prep, False)
                prep.compiled = []
            return self._forward_layers(batch)

    def _forward_layers(self, batch: _Batch) -> torch.Tensor:
        """The model on one batch; compiled layers that fail, or that disagree with the eager layers on their
        first batch, are switched off for good (eager results)."""
        prep = self.prep
        if not prep.compiled:
            return self.post(*_hf_forward(prep, batch, batch.tensors), batch)
        try:
            res = self.post(*_hf_forward(prep, batch, batch.tensors), batch)
        except Exception as exc:
            log.warning("engine: compiled layers failed (%s: %s); running them eagerly", type(exc).__name__, exc)
            _use_compiled(prep, False)
            prep.compiled = []
            return self.post(*_hf_forward(prep, batch, batch.tensors), batch)
        if not prep.compile_checked:
            _use_compiled(prep, False)
            eager = self.post(*_hf_forward(prep, batch, batch.tensors), batch)
            prep.compile_checked = True
            if not _close(res, eager):
                log.warning("engine: compiled layers disagree with the eager ones; running them eagerly")
                prep.compiled = []
                return eager
            _use_compiled(prep, True)
        return res

    def _verify_varlen(self, padded: _Batch, result: torch.Tensor) -> bool:
        """Compare the first packed batch with the padded path, once per prepared model."""
        _fallback_to_padded(self.prep)
        ref = self._forward(padded)
        if _close(result, ref):  # restore the varlen path
            _set_attn(self.prep.hf, varlen.VARLEN_ATTN_NAME)
            self.prep.attn = "varlen"
            self.prep.hook_handle = rewrites.find_encoder(self.prep.hf).register_forward_hook(_repad_hook(self.prep))
            return True
        log.warning("engine: packed varlen attention disagrees with padded attention; using padding")
        return False

    def _collating_thread(self) -> tuple[threading.Thread, "queue.Queue", threading.Event, dict]:
        """The (not yet started) thread that tokenises and collates the inputs into a queue of batches, with its
        queue, stop event and statistics."""
        q: "queue.Queue" = queue.Queue(maxsize=8)
        stop = threading.Event()
        stats = {"tokenize_s": 0.0, "tokens": 0, "padded_tokens": 0, "attn_tokens": 0.0}
        thread = threading.Thread(target=_producer, args=(self.items, self.tokenizer, self.prep, self.cfg, q, stop,
                                                          stats), daemon=True)
        return thread, q, stop, stats

    def _on_device(self, batch: _Batch) -> _Batch:
        """``batch`` copied to the device (asynchronously from pinned memory), re-padded where the packed path
        has been switched off since it was collated."""
        batch = _Batch(batch.local_idx, batch.chunk, batch.B, batch.L, batch.T, batch.packed,
                       _to_device(batch.tensors, self.device))
        if batch.packed and self.prep.attn != "varlen":
            batch = _packed_to_padded(batch, self.cfg["pad_id"])
        return batch

    def ceilings(self, device_batches: int = 64) -> dict:
        """Diagnostics (scripts/bench_gpu.py): each side of :meth:`run` without the other. Host: the collating
        thread (tokenise, sort, collate, pin) into a consumer that counts batches and, between its queue checks,
        does launch-like work (:func:`_launch_slice`) as the GPU-feeding thread would: ``launch_share`` is that
        work's rate over its rate alone (1.0: the host side leaves the GPU-feeding thread all it needs; lower: it
        holds the GIL or the cores that thread needs; on 2 CPU cores, session 7: about 0.5 while tokenising, 0.4-0.8
        while assembling from a token store). Device: the first ``device_batches`` batches copied to the device
        beforehand, then forwards only (no tokenising or collating beside them)."""
        alone = _launch_rate(0.3)
        producer, q, stop, stats = self._collating_thread()
        kept: list[_Batch] = []
        n_items = work = 0
        t0 = time.perf_counter()
        producer.start()
        try:
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    _launch_slice()
                    work += 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _Stop):
                    break
                if isinstance(item, _Batch):
                    n_items += item.B
                    if len(kept) < device_batches:
                        kept.append(item)
        finally:
            stop.set()
            producer.join(timeout=5)
        host_s = time.perf_counter() - t0
        cuda = self.device.type == "cuda"
        batches = [self._on_device(b) for b in kept]
        n_tokens = sum(b.T for b in batches)
        attn_sq = float(sum(float((b.tensors["lens"].double() ** 2).sum()) for b in batches))
        with torch.inference_mode():
            if batches:
                self._forward(batches[0])  # warm: kernels, the compiled layers' check
            if cuda:
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
            for b in batches:
                self._forward(b)
            if cuda:
                torch.cuda.synchronize(self.device)
            device_s = time.perf_counter() - t1
        n_dev = sum(b.B for b in batches)
        return {"host_items_per_s": n_items / host_s if host_s else 0.0, "host_s": host_s,
                "producer_cpu_s": stats.get("producer_cpu_s", 0.0), "tokenize_wait_s": stats["tokenize_s"],
                "launch_share": (work / host_s) / alone if host_s and alone else None,
                "device_items": n_dev, "device_s": device_s, "device_tokens": n_tokens,
                "device_attn_tokens_sq": attn_sq, "device_items_per_s": n_dev / device_s if device_s else 0.0}

    def run(self) -> np.ndarray:
        n = len(self.items)
        t_start = time.perf_counter()
        out: np.ndarray | None = None
        producer, q, stop, stats = self._collating_thread()
        bar = None
        if self.show_progress and n:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=n, desc=self.desc, unit="it", smoothing=0.05)
            except Exception:  # pragma: no cover
                bar = None
        cuda = self.device.type == "cuda"
        dev_buf: torch.Tensor | None = None
        pending: list = []  # (host pinned buffer, event, start, n)
        cur_chunk = -1
        first_packed_done = self.prep.verified
        autocast_cpu = (
            torch.autocast(device_type="cpu", dtype=self.dtype)
            if (self.prep.autocast and self.dtype is not None and not cuda)
            else contextlib.nullcontext()
        )
        producer.start()
        cpu0, waited = time.thread_time(), 0.0
        try:
            with torch.inference_mode(), autocast_cpu:
                while True:
                    t_get = time.perf_counter()
                    item = q.get()
                    waited += time.perf_counter() - t_get
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, _Stop):
                        break
                    if isinstance(item, _ChunkEnd):
                        if cuda and dev_buf is not None:
                            host = torch.empty(dev_buf.shape, dtype=dev_buf.dtype, pin_memory=True)
                            host.copy_(dev_buf, non_blocking=True)
                            ev = torch.cuda.Event()
                            # on this device's stream: a bare record() goes to the current device's, which for a
                            # model on another GPU would not wait for the copy above
                            ev.record(torch.cuda.current_stream(self.device))
                            pending.append((host, ev, item.start, item.n))
                            while len(pending) > 1:
                                h, e, s0, n0 = pending.pop(0)
                                e.synchronize()
                                out[s0 : s0 + n0] = h.numpy()
                            dev_buf = None
                        continue
                    batch = self._on_device(item)
                    try:
                        res = self._forward(batch)
                    except Exception as exc:
                        if not batch.packed:
                            raise
                        log.warning("engine: varlen attention failed (%s); falling back to padded SDPA", exc)
                        self.cfg["packed"] = False
                        _fallback_to_padded(self.prep)
                        batch = _packed_to_padded(batch, self.cfg["pad_id"])
                        res = self._forward(batch)
                    if batch.packed and not first_packed_done:
                        first_packed_done = True
                        if self.attention == "auto":
                            padded = _packed_to_padded(batch, self.cfg["pad_id"])
                            if not self._verify_varlen(padded, res):
                                self.cfg["packed"] = False
                                res = self._forward(padded)
                        self.prep.verified = True
                    res = res.float()
                    if out is None:
                        out = np.empty((n,) + tuple(res.shape[1:]), dtype=np.float32)
                    # batch_tokens/chunk bookkeeping
                    if batch.chunk != cur_chunk:
                        cur_chunk = batch.chunk
                        chunk_start, chunk_end = self.cfg["bounds"][cur_chunk]
                        if cuda:
                            dev_buf = torch.empty((chunk_end - chunk_start,) + tuple(res.shape[1:]),
                                                  dtype=torch.float32, device=self.device)
                    idx = batch.tensors["local_idx"]
                    if cuda:
                        dev_buf.index_copy_(0, idx, res)
                    else:
                        torch.from_numpy(out[chunk_start:chunk_end]).index_copy_(0, idx, res)
                    if bar is not None:
                        bar.update(batch.B)
            for h, e, s0, n0 in pending:
                e.synchronize()
                out[s0 : s0 + n0] = h.numpy()
            consumer_cpu = time.thread_time() - cpu0
        finally:
            stop.set()
            producer.join(timeout=5)
            if bar is not None:
                bar.close()
        if out is None:
            out = np.zeros((0, 0), dtype=np.float32)
        LAST_RUN.clear()
        LAST_RUN.update(
            kind=self.kind,
            n=n,
            device=str(self.device),
            dtype=dtype_name(self.dtype),
            attention=self.prep.attn,
            tokenizer=self.tokenizer.source,
            tokens=stats["tokens"],
            padded_tokens=stats["padded_tokens"] if self.prep.attn != "varlen" else stats["tokens"],
            attn_tokens_sq=stats["attn_tokens"],
            tokenize_s=stats["tokenize_s"],
            # where the host time went (which side waits for which): the GPU-feeding thread's CPU time and its
            # waits for batches, the collating thread's CPU time (tokenising in this process included; the Rust
            # tokenizer's own threads are not) and its waits for queue room
            consumer_cpu_s=consumer_cpu,
            consumer_wait_s=waited,
            producer_cpu_s=stats.get("producer_cpu_s", 0.0),
            producer_blocked_s=stats.get("producer_blocked_s", 0.0),
            tokenize_workers=self.tokenize_workers,
            compiled_layers=len(self.prep.compiled),
            fused_gelu=self.prep.fused_gelu,
            frozen_layers=bool(self.prep.freeze and self.prep.compiled),
            first_token_ffn=self.prep.first_token_ffn,
            wall_s=time.perf_counter() - t_start,
        )
        return out


def _as_items(items) -> Sequence:
    """Inputs as the runner takes them: a list, tuple or token-store view as it is, any other iterable listed."""
    return items if isinstance(items, (list, tuple, *tokens.TokenView)) else list(items)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a = a.float().reshape(a.shape[0], -1)
    b = b.float().reshape(b.shape[0], -1)
    if a.shape != b.shape:
        return False
    if a.shape[1] > 1:
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
        return bool((cos >= 0.995).all())
    # single scores (cross-encoder logits): within 5% of the largest, or 0.05 absolute. The floor keeps
    # near-zero logits (random heads: a session-6 bench model scored ~0.01 +- 0.001) from failing on rounding alone.
    scale = b.abs().max().clamp_min(1.0)
    return bool(((a - b).abs().max() / scale) < 0.05)


# ------------------------------------------------------------------------------------------ public API
def _st_post(model, prompt_length: int | None):
    modules = list(model)[1:] if tokenizing.transformer_module(model) is not None else []

    def post(hf_out, mask2d, batch: _Batch) -> torch.Tensor:
        te = hf_out["last_hidden_state"] if not isinstance(hf_out, tuple) else hf_out[0]
        features: dict[str, Any] = {
            "input_ids": batch.tensors["input_ids"],
            "attention_mask": mask2d.to(torch.int64),
            "token_embeddings": te.float(),
            "modality": "text",
        }
        if prompt_length is not None:
            features["prompt_length"] = prompt_length
        for mod in modules:
            features = mod(features)
        return features["sentence_embedding"]

    return post


def _ce_post(model):
    modules = list(model)[1:] if tokenizing.transformer_module(model) is not None else []

    def post(hf_out, mask2d, batch: _Batch) -> torch.Tensor:
        logits = hf_out["logits"] if not isinstance(hf_out, tuple) else hf_out[0]
        if modules:
            features = {"scores": logits.float(), "attention_mask": mask2d.to(torch.int64)}
            for mod in modules:
                features = mod(features)
            logits = features["scores"]
        return logits

    return post


def encode_texts(
    model: "SentenceTransformer",
    texts: Sequence[str],
    *,
    prompt: str | None = None,
    normalize: bool | None = None,
    batch_tokens: int | str = "auto",
    max_batch: int | None = None,
    precision: str = "auto",
    show_progress: bool = True,
    desc: str = "encode",
    attention: str = "auto",
    chunk_size: int = DEFAULT_CHUNK,
    devices: Sequence[str] | None = None,
    tokenize_workers: int | None = None,
    compile_layers: bool | None = None,
) -> np.ndarray:
    """Embed ``texts`` with a SentenceTransformer; float32 [n, dim] in input order.

    ``prompt`` is prepended like ``SentenceTransformer.encode(prompt=...)`` (prompt tokens are excluded from
    pooling when the model's Pooling says so). ``normalize``: None keeps what the model does (its Normalize
    module if it has one), True L2-normalises, False adds no normalisation. ``batch_tokens`` is the padded
    token budget per batch (packed tokens under varlen attention); "auto": see :func:`resolve_batch_tokens`.
    ``max_batch``: rows per batch at most (None: see :func:`resolve_max_batch`).
    ``attention``: "auto" (packed varlen on CUDA in half precision, checked once against padding),
    "varlen", or "padded". ``devices``: several devices -> one process per device (see encode_texts_multi_gpu).
    ``tokenize_workers``: tokeniser processes (None: auto, see :func:`tokenizing.resolve_tokenize_workers`; 0: in
    this process).
    ``compile_layers``: torch.compile the transformer layers (None: auto, on for CUDA jobs of 20k+ texts, see
    :func:`resolve_compile_layers` and :func:`_compile_layers`).
    """
    if devices is not None and len(devices) > 1:
        return encode_texts_multi_gpu(
            model, texts, devices=devices, prompt=prompt, normalize=normalize, batch_tokens=batch_tokens,
            max_batch=max_batch, precision=precision, show_progress=show_progress, desc=desc,
            attention=attention, chunk_size=chunk_size,
        )
    if devices is not None and len(devices) == 1 and torch.device(devices[0]) != model.device:
        model.to(devices[0])
    module = tokenizing.transformer_module(model)
    if module is None or not hasattr(module, "auto_model"):
        raise TypeError("encode_texts needs a SentenceTransformer whose first module is a Transformer")
    unusual = _unusual_transformer_output(model)
    if unusual:  # the embeddings would be silently wrong (cosine 0.3-0.5 to the library's on such models)
        raise TypeError(f"encode_texts hands the transformer's last hidden state on as token embeddings; this "
                        f"model's Transformer module {unusual}. Encode it with SentenceTransformer.encode")
    texts = _as_items(texts)
    prompt_length = None
    if prompt:
        getter = getattr(module, "_get_prompt_length", None)
        try:
            prompt_length = getter(prompt) if getter is not None else None
        except Exception:  # pragma: no cover
            prompt_length = None
    runner = _Runner(
        "texts", model, module.auto_model, texts, prompt=prompt, batch_tokens=batch_tokens, max_batch=max_batch,
        precision=precision, show_progress=show_progress, desc=desc, attention=attention, chunk=chunk_size,
        post=_st_post(model, prompt_length), tokenize_workers=tokenize_workers, compile_layers=compile_layers,
    )
    emb = runner.run()
    if len(texts) == 0:
        return np.zeros((0, embedding_dimension(model)), dtype=np.float32)
    truncate_dim = getattr(model, "truncate_dim", None)
    if truncate_dim:
        emb = np.ascontiguousarray(emb[:, :truncate_dim])
    if normalize:
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        np.divide(emb, np.maximum(norms, 1e-12), out=emb)
    return emb


def _keep_head_fp32(hf_model) -> None:
    """Run a sequence-classification head in float32 on float32 inputs. A bf16 head returns logits on a
    2^-8-relative grid: thresholds and margins (mine) then compare rounded values, and a small model's scores
    collapse onto a handful of levels. The head is a few thousand parameters; the body stays in bf16."""
    for name in ("pre_classifier", "classifier", "score"):
        head = getattr(hf_model, name, None)
        if not isinstance(head, torch.nn.Module) or getattr(head, "_fp32_head", False):
            continue
        head.float()
        original = head.forward

        def forward(*args, _original=original, **kwargs):
            args = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
            kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
            return _original(*args, **kwargs)

        head.forward = forward
        head._fp32_head = True


def score_pairs(
    model: "CrossEncoder",
    pairs: Sequence[tuple[str, str]],
    *,
    batch_tokens: int | str = "auto",
    max_batch: int | None = None,
    precision: str = "auto",
    show_progress: bool = True,
    desc: str = "score",
    attention: str = "auto",
    chunk_size: int = DEFAULT_CHUNK,
    devices: Sequence[str] | None = None,
    tokenize_workers: int | None = None,
    compile_layers: bool | None = None,
) -> np.ndarray:
    """Raw logits of a CrossEncoder for (query, passage) pairs: float32 [n] (``[n, num_labels]`` when the model
    has several labels), input order, NO activation (callers apply ``model.activation_fn`` when configured)."""
    if devices is not None and len(devices) > 1:
        return score_pairs_multi_gpu(
            model, pairs, devices=devices, batch_tokens=batch_tokens, max_batch=max_batch, precision=precision,
            show_progress=show_progress, desc=desc, attention=attention, chunk_size=chunk_size,
        )
    if devices is not None and len(devices) == 1 and torch.device(devices[0]) != model.device:
        model.to(devices[0])
    hf = getattr(model, "model", None)
    if hf is None:
        raise TypeError("score_pairs needs a CrossEncoder with a transformers model")
    pairs = _as_items(pairs)
    runner = _Runner(
        "pairs", model, hf, pairs, prompt=None, batch_tokens=batch_tokens, max_batch=max_batch,
        precision=precision, show_progress=show_progress, desc=desc, attention=attention, chunk=chunk_size,
        post=_ce_post(model), tokenize_workers=tokenize_workers, compile_layers=compile_layers,
    )
    scores = runner.run()
    if len(pairs) == 0:  # the shape a call with pairs gives: (n,) for one label, (n, labels) for several
        num_labels = int(getattr(model, "num_labels", 1) or 1)
        return np.zeros((0,) if num_labels == 1 else (0, num_labels), dtype=np.float32)
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0].copy()
    return scores


def ceilings(model, items: Sequence, *, pairs: bool = False, device_batches: int = 64, **kwargs) -> dict:
    """Each side of an :func:`encode_texts` (or, with ``pairs``, :func:`score_pairs`) call alone, in items/s: the
    host side (tokenise, sort, collate, pin, with nothing consuming) and the device side (forwards over batches
    already on the device). Which one the whole call runs at says where its time goes. Same keywords as those
    functions (``batch_tokens``, ``max_batch``, ``precision``, ``attention``, ``tokenize_workers``,
    ``compile_layers``, ``chunk_size``); a diagnostic for scripts/bench_gpu.py, not used by the stages."""
    if pairs:
        hf, post, kind = model.model, _ce_post(model), "pairs"
    else:
        module = tokenizing.transformer_module(model)
        if module is None:
            raise TypeError("ceilings needs a SentenceTransformer whose first module is a Transformer")
        hf, post, kind = module.auto_model, _st_post(model, None), "texts"
    runner = _Runner(
        kind, model, hf, _as_items(items), prompt=None, batch_tokens=kwargs.get("batch_tokens", "auto"),
        max_batch=kwargs.get("max_batch"), precision=kwargs.get("precision", "auto"), show_progress=False, desc="",
        attention=kwargs.get("attention", "auto"), chunk=kwargs.get("chunk_size", DEFAULT_CHUNK), post=post,
        tokenize_workers=kwargs.get("tokenize_workers"), compile_layers=kwargs.get("compile_layers"),
    )
    return runner.ceilings(device_batches)


# ----------------------------------------------------------------------------------------- multi-device
def device_worker_setup(device: str, processes: int) -> None:
    """In one of ``processes`` worker processes, one per device: its share of the CPU threads, and its GPU made
    current (the CUDA calls that name no device, such as events and streams, then go to it)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, processes)))
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))


def _mp_worker(rank, fn_name, model, items, start, end, device, out, kwargs):  # pragma: no cover - subprocess
    nprocs = max(1, kwargs.pop("_nprocs", 1))
    device_worker_setup(device, nprocs)
    kwargs["tokenize_workers"] = tokenizing.resolve_tokenize_workers(kwargs.get("tokenize_workers"),
                                                                     torch.device(device), len(items), processes=nprocs)
    model.to(device)
    fn = encode_texts if fn_name == "encode" else score_pairs
    res = fn(model, items, **kwargs)
    res_t = torch.from_numpy(res)
    out[start:end].copy_(res_t.reshape(out[start:end].shape))


def _multi(fn_name: str, model, items, devices: Sequence[str], out_shape_tail: tuple, **kwargs) -> np.ndarray:
    import torch.multiprocessing as mp

    items = items.texts() if isinstance(items, tokens.TokenView) else list(items)
    n = len(items)
    devices = list(devices)
    out = torch.empty((n,) + out_shape_tail, dtype=torch.float32).share_memory_()
    if n == 0:
        return out.numpy()
    bounds = np.linspace(0, n, len(devices) + 1).astype(int)
    ctx = mp.get_context("spawn")
    procs = []
    orig_device = model.device
    model.to("cpu")  # pickled once per worker; each worker moves its copy to its own device
    try:
        for r, dev in enumerate(devices):
            s, e = int(bounds[r]), int(bounds[r + 1])
            if e <= s:
                continue
            kw = dict(kwargs, show_progress=kwargs.get("show_progress", True) and r == 0, _nprocs=len(devices))
            p = ctx.Process(target=_mp_worker, args=(r, fn_name, model, items[s:e], s, e, dev, out, kw))
            p.start()
            procs.append(p)
        for p in procs:
            p.join()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"engine worker(s) failed with exit codes {bad}")
    finally:
        model.to(orig_device)
    return out.numpy()


def encode_texts_multi_gpu(model: "SentenceTransformer", texts: Sequence[str], *, devices: Sequence[str] | None = None,
                           **kwargs) -> np.ndarray:
    """encode_texts over several devices of one node, one process per device (contiguous shards).
    ``devices`` defaults to every visible GPU. Output as encode_texts."""
    if devices is None:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    if len(devices) == 1:
        return encode_texts(model, texts, devices=devices, **kwargs)
    dim = embedding_dimension(model)
    if getattr(model, "truncate_dim", None):
        dim = min(dim, model.truncate_dim)
    return _multi("encode", model, texts, devices, (dim,), **kwargs)


def score_pairs_multi_gpu(model: "CrossEncoder", pairs: Sequence[tuple[str, str]], *,
                          devices: Sequence[str] | None = None, **kwargs) -> np.ndarray:
    """score_pairs over several devices of one node, one process per device."""
    if devices is None:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    if len(devices) == 1:
        return score_pairs(model, pairs, devices=devices, **kwargs)
    num_labels = int(getattr(model, "num_labels", 1) or 1)
    tail = () if num_labels == 1 else (num_labels,)
    return _multi("score", model, pairs, devices, tail, **kwargs)
