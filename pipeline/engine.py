"""Fast inference for bi-encoders (``encode_texts``) and cross-encoders (``score_pairs``).

Used by the retrieve, score and evaluate stages and by ``scripts/bench_gpu.py``. Module level imports are
restricted to torch, numpy, transformers and sentence-transformers (see docs/architecture.md).

What it does differently from ``SentenceTransformer.encode`` / ``CrossEncoder.predict``:

* tokenises once per chunk of inputs (default 65,536) with the model's own fast tokenizer, in a background
  thread (or, opt-in, in worker processes: ``tokenize_workers``), into flat token arrays (no padded tensors, no per-item Python objects kept around); the first chunk
  is cross-checked against the model's own ``preprocess`` (prompt, lower-casing, truncation, special tokens);
  any difference switches to the model's own ``preprocess``. Inputs may instead be views over a corpus token store
  (``pipeline.tokens.TextTokens`` / ``PairTokens``: the stages pass these for large corpora), which are turned into
  model inputs with array operations instead of tokenised, checked the same way on the first chunk;
* sorts every chunk by token length and cuts it into token-budget batches (``batch_tokens`` padded tokens, at
  most ``max_batch`` rows), so padding is small and batches are as large as memory allows;
* on CUDA with a half-precision model, removes padding entirely: the batch is one packed sequence
  (``input_ids`` [1, T] with per-sequence ``position_ids``) and attention is PyTorch's built-in FlashAttention
  variable-length kernel (``torch.nn.attention.varlen.varlen_attn``, else ``aten._flash_attention_forward``),
  registered with transformers' ``AttentionInterface`` as ``"engine_varlen"`` and fed ``cu_seq_lens``; a forward
  hook re-pads the encoder output so the model's own heads (BERT pooler, ELECTRA/DistilBERT classification
  heads) and the SentenceTransformer's own Pooling/Dense/Normalize modules run unchanged. Elsewhere (CPU, fp32,
  models without the attention interface) batches are padded and attention is SDPA with a prebuilt 4-D mask
  (no host synchronisation in mask creation). The first packed batch of a model is checked against the padded
  path once; a failure or a mismatch falls back to padding. Packed *training* batches (pipeline/packing.py) also
  run on the CPU: there ``engine_varlen`` is SDPA over buckets of similar-length sequences
  (:func:`_segmented_sdpa`), so only attention sees (a little) padding;
* bf16: on CUDA a bf16 copy of the transformer (cached while the weights are unchanged); on CPUs with
  AVX512-BF16/AMX the same (2-3x faster than fp32 here); pooling and the rest of the SentenceTransformer run in
  fp32 on the transformer's output;
* on CUDA, for jobs of 20k+ inputs, each transformer layer runs through ``torch.compile`` (one graph for all
  layers: fused LayerNorms, GELUs and residual adds), checked against the eager layers on the first batch;
* the collation thread produces pinned tensors that are copied with ``non_blocking=True``; results stay on the
  device and are copied to the host once per chunk, asynchronously; nothing in the loop synchronises with the
  host (no ``.item()``, no ``.cpu()`` per batch).

Multi-GPU on one node: ``devices=["cuda:0", "cuda:1", ...]`` (or :func:`encode_texts_multi_gpu`) runs one
process per device over contiguous shards and writes into one shared-memory output.

Measured figures (H200 and CPU) are in the docstring of ``scripts/bench_gpu.py``. ``LAST_RUN`` records, per call,
which attention path ran ("varlen", "sdpa" or "model"), the dtype, real and padded token counts and timings.
"""

from __future__ import annotations

import atexit
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

from pipeline import tokenize_worker, tokens

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
    "varlen_available",
    "token_budget_batches",
    "LAST_RUN",
]

VARLEN_ATTN_NAME = "engine_varlen"
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


# ------------------------------------------------------------------------------------- variable-length attn
_VARLEN_FN: Callable | None = None
_VARLEN_TRAIN_FN: Callable | None = None
_VARLEN_REGISTERED = False


def _resolve_varlen_fn() -> Callable | None:
    global _VARLEN_FN
    if _VARLEN_FN is not None:
        return _VARLEN_FN
    fn = None
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.9

        has_scale = "scale" in inspect.signature(varlen_attn).parameters

        def fn(q, k, v, cu, max_len, scale):  # noqa: F811
            if has_scale:
                return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale)
            if scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
                raise RuntimeError("varlen_attn without a scale argument cannot apply a custom scale")
            return varlen_attn(q, k, v, cu, cu, max_len, max_len)

    except Exception:
        op = getattr(torch.ops.aten, "_flash_attention_forward", None)
        if op is not None:

            def fn(q, k, v, cu, max_len, scale):  # noqa: F811
                return op(q, k, v, cu, cu, max_len, max_len, 0.0, False, False, scale=scale)[0]

    _VARLEN_FN = fn
    return fn


def _resolve_varlen_train_fn() -> Callable | None:
    """Varlen attention for training: aten's flash-attention op, which has a registered backward and takes the
    attention-dropout probability (``varlen_attn`` has neither dropout nor, in older torch, a backward)."""
    global _VARLEN_TRAIN_FN
    if _VARLEN_TRAIN_FN is not None:
        return _VARLEN_TRAIN_FN
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if op is None:
        return None

    def fn(q, k, v, cu, max_len, scale, dropout):
        return op(q, k, v, cu, cu, max_len, max_len, float(dropout), False, False, scale=scale)[0]

    _VARLEN_TRAIN_FN = fn
    return fn


#: lengths within this factor (or within SEGMENT_SLACK tokens: short texts cost calls, not FLOPs) share one padded
#: SDPA call in :func:`_segmented_sdpa`; the attention work wasted on padding stays under 1.25^2 - 1 = 56% of a
#: bucket's, while the projections and feed-forward layers around it see no padding at all
SEGMENT_LENGTH_RATIO = 1.25
SEGMENT_SLACK = 16
_SEGMENT_PLAN: dict[tuple, list] = {}


def _segment_plan(bounds: tuple[int, ...], device) -> list:
    """Buckets of sequences of similar length for :func:`_segmented_sdpa`, from the packed batch's cu_seq_lens:
    [(token index [n, L] into the packed batch, key mask [n, 1, 1, L] or None, valid [n, L]), ..., inverse]
    where ``inverse`` maps the buckets' concatenated valid rows back to packed order. The model's layers all
    share one cu_seq_lens, so the plan is built once per batch."""
    key = (bounds, str(device))
    plan = _SEGMENT_PLAN.get(key)
    if plan is not None:
        return plan
    starts = np.asarray(bounds[:-1], np.int64)
    lens = np.diff(np.asarray(bounds, np.int64))
    order = np.argsort(lens, kind="stable")
    buckets, cur = [], []
    for i in order:
        if cur and lens[i] > max(SEGMENT_LENGTH_RATIO * lens[cur[0]], lens[cur[0]] + SEGMENT_SLACK):
            buckets.append(cur)
            cur = []
        cur.append(int(i))
    if cur:
        buckets.append(cur)
    plan, positions = [], []
    for members in buckets:
        m_lens = lens[members]
        width = int(m_lens.max())
        offs = np.arange(width)
        valid = offs[None, :] < m_lens[:, None]
        idx = np.where(valid, starts[members][:, None] + offs[None, :], starts[members][:, None])
        positions.append(idx[valid])
        mask = None if int(m_lens.min()) == width else torch.from_numpy(valid[:, None, None, :]).to(device)
        plan.append((torch.from_numpy(idx).to(device), mask, torch.from_numpy(valid).to(device)))
    flat = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    inverse = np.empty_like(flat)
    inverse[flat] = np.arange(len(flat))
    plan.append(torch.from_numpy(inverse).to(device))
    _SEGMENT_PLAN.clear()  # one batch at a time: the cache only serves the layers of the current forward
    _SEGMENT_PLAN[key] = plan
    return plan


def _segmented_sdpa(q, k, v, cu, max_len, scale, dropout=0.0):
    """Variable-length attention without a flash kernel (the CPU): packed [T, H, D] tensors, sequences bucketed by
    length, one key-masked SDPA call per bucket, differentiable, with attention dropout. Only attention is padded
    (within a bucket); the projections and feed-forward layers around it run on the packed tokens."""
    bounds = tuple(int(x) for x in cu.tolist())
    *buckets, inverse = _segment_plan(bounds, q.device)
    outs = []
    for idx, mask, valid in buckets:
        qb, kb, vb = (x[idx].transpose(1, 2) for x in (q, k, v))  # [n, H, L, D]
        o = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout,
                                                             scale=scale)
        outs.append(o.transpose(1, 2)[valid])
    return torch.cat(outs)[inverse]


def _flash_device(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where FlashAttention's varlen kernels run (a seam for the CPU tests of that path)."""
    return t.device.type == "cuda"


def _varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function over a packed batch: query/key/value [1, H, T, D]. With
    gradients (pipeline/packing.py's training) the differentiable op, with the module's attention dropout. Off
    CUDA, bucketed SDPA (:func:`_segmented_sdpa`)."""
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None or max_len is None:
        raise RuntimeError("engine_varlen attention needs cu_seq_lens_q/max_length_q (packed inputs)")
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if not _flash_device(q):
        out = _segmented_sdpa(q, k, v, cu, int(max_len), scaling, dropout or 0.0)
    elif (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)) or dropout:
        fn = _resolve_varlen_train_fn()
        if fn is None:
            raise RuntimeError("no differentiable variable-length attention in this torch")
        out = fn(q, k, v, cu, int(max_len), scaling, dropout or 0.0)
    else:
        out = _resolve_varlen_fn()(q, k, v, cu, int(max_len), scaling)
    return out.unsqueeze(0), None


def _register_varlen() -> bool:
    global _VARLEN_REGISTERED
    if _VARLEN_REGISTERED:
        return True
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(VARLEN_ATTN_NAME, _varlen_attention_forward)
        _VARLEN_REGISTERED = True
    except Exception as exc:  # pragma: no cover - transformers without the attention interface
        log.debug("cannot register varlen attention: %s", exc)
    return _VARLEN_REGISTERED


def varlen_available(device) -> bool:
    """Whether the flash variable-length kernel (packed inference batches) runs on ``device`` with this torch."""
    dev = torch.device(device)
    return dev.type == "cuda" and _resolve_varlen_fn() is not None and _register_varlen()


def packed_training_available(device) -> bool:
    """Whether packed training batches can run on ``device``: the differentiable flash kernel on CUDA, bucketed
    SDPA (:func:`_segmented_sdpa`) elsewhere."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return varlen_available(dev) and _resolve_varlen_train_fn() is not None
    return _register_varlen()


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
    fused_gelu: int = 0  # feed-forward GELUs computed in their GEMM's epilogue (fuse_gelu_epilogues)
    freeze: bool = False  # the compiled layers fold the weights in as constants (resolve_compile_freeze)
    first_token_ffn: bool = False  # the last layer's feed-forward runs on each text's first token only


_PREPARED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _fingerprint(m: torch.nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, str(p.device)) for p in m.parameters())


def _find_encoder(hf: torch.nn.Module) -> torch.nn.Module | None:
    base = getattr(hf, "base_model", hf)
    for name in ("encoder", "transformer", "layers"):
        mod = getattr(base, name, None)
        if isinstance(mod, torch.nn.Module) and not isinstance(mod, torch.nn.ModuleList):
            return mod
    return None


def _pos_offset(hf: torch.nn.Module) -> int:
    # RoBERTa-family embeddings count positions from padding_idx + 1 (as sentence-transformers does).
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
    fuse_gelu = resolve_fuse_gelu()
    freeze = bool(compile_layers) and resolve_compile_freeze()
    first_token = bool(first_token_head) and resolve_first_token_ffn()
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

    want_varlen = attention in ("auto", "varlen") and dtype in (torch.float16, torch.bfloat16) and varlen_available(device)
    if attention == "varlen" and not want_varlen:
        log.warning("varlen attention requested but unavailable on %s/%s; using padded SDPA", device, dtype)
    encoder = _find_encoder(hf_model)
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
    pruned = first_token and not use_autocast and prune_last_feed_forward(work, ctx, device)
    attn = "model"
    if want_varlen and _set_attn(work, VARLEN_ATTN_NAME):
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
        pos_offset=_pos_offset(work),
        fingerprint=fp,
        ctx=ctx,
        first_token_ffn=pruned,
    )
    if attn == "varlen":
        prep.hook_handle = _find_encoder(work).register_forward_hook(_repad_hook(prep))
    if fuse_gelu and not use_autocast:  # before compiling: the compiled layers then call the fused GEMMs
        prep.fused_gelu = fuse_gelu_epilogues(work, device, dtype)
    if compile_layers and not use_autocast:
        _compile_layers(prep, freeze)
        prep.freeze = freeze and bool(prep.compiled)
    cache[key] = prep
    return prep


def _encoder_layers(hf: torch.nn.Module) -> list[torch.nn.Module]:
    encoder = _find_encoder(hf)
    for name in ("layer", "layers"):
        layers = getattr(encoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return []


def compile_encoder_layers(hf: torch.nn.Module, backend: str | Callable = "inductor", options: dict | None = None
                           ) -> list:
    """torch.compile each transformer layer of ``hf`` in place (dynamic shapes: one graph for every batch size and
    length; compiled lazily by the first call). Returns the layers' compiled call functions, [] where no layer can
    be compiled (nothing is changed then). Used for inference (:func:`_compile_layers`) and training
    (pipeline/packing.py). ``options``: Inductor options; graphs compiled with other options are not reused."""
    layers = _encoder_layers(hf)
    if not layers or not all(hasattr(layer, "_compiled_call_impl") for layer in layers):
        return []
    for layer in layers:
        layer.compile(dynamic=True, backend=backend, **({"options": options} if options else {}))
    return [layer._compiled_call_impl for layer in layers]


def _compile_layers(prep: _Prepared, freeze: bool = False) -> None:
    """Compiled transformer layers (:func:`compile_encoder_layers`), so the residual adds, LayerNorms, bias adds
    and GELUs between the matmuls run fused instead of as separate passes over the activations (29% of encode time
    on an H200, scripts/profile_gpu.py); checked against the eager layers on the first batch (see
    _Runner._forward)."""
    # frozen graphs under options of their own: dynamo reuses a layer's graph for another copy of the layer
    # (the weights are inputs) when the compile options agree, so a process that compiled the layers unfrozen
    # would otherwise keep running those graphs (the freezing switch itself is _frozen_compiles)
    compiled = compile_encoder_layers(prep.hf, options={"freezing": True} if freeze else None)
    if not compiled:
        log.warning("engine: compile_layers: no transformer layers found to compile; running eagerly")
        return
    prep.compiled = compiled


#: (linear, activation) attribute pairs of the feed-forward blocks whose activation takes the linear's output
#: directly: BERT, RoBERTa, ELECTRA, MPNet (their "intermediate" module) and DistilBERT (its "ffn")
_FFN_PAIRS = (("dense", "intermediate_act_fn"), ("lin1", "activation"))


class _LinearGELU(torch.nn.Module):
    """A Linear and the GELU after it as one GEMM with the GELU in its epilogue (``torch._addmm_activation``:
    cuBLASLt's GELU epilogue on CUDA, which computes the tanh approximation; addmm and the exact GELU on the CPU).
    The feed-forward block's [tokens, 4 x hidden] activations are then written once, instead of written, read
    and written again by a separate GELU pass (11% of an eager encode on an H200, scripts/profile_gpu.py; compiled
    layers keep one fused bias + GELU pass). Inference only: the op has no backward."""

    def __init__(self, linear: torch.nn.Linear, act: Any):
        super().__init__()
        self.linear = linear
        self.replaced_act = act  # what unfuse_gelu_epilogues puts back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.linear
        y = torch._addmm_activation(lin.bias, x.reshape(-1, lin.in_features), lin.weight.t(), use_gelu=True)
        return y.view(*x.shape[:-1], lin.out_features)


def _is_gelu(act: Any) -> bool:
    """Whether ``act`` computes GELU (exact or tanh-approximated; they differ by at most 5e-4): checked on values,
    not class names, so any module or function that is GELU qualifies and nothing else does."""
    if not callable(act) or (isinstance(act, torch.nn.Module) and any(True for _ in act.parameters())):
        return False
    x = torch.linspace(-8, 8, 1601)
    try:
        with torch.no_grad():
            y = act(x)
    except Exception:
        return False
    return isinstance(y, torch.Tensor) and y.shape == x.shape and \
        float((y - torch.nn.functional.gelu(x)).abs().max()) < 1e-3


def fuse_gelu_epilogues(hf: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> int:
    """Replace, in place, every feed-forward Linear + GELU of ``hf`` (see ``_FFN_PAIRS``) by :class:`_LinearGELU`,
    each checked on a random batch against the pair it replaces (cosine >= 0.9999; a failing or disagreeing
    module is left as it was). Only for a working copy used for inference. Returns how many were fused."""
    fused = 0
    for module in list(hf.modules()):
        for lin_name, act_name in _FFN_PAIRS:
            lin, act = getattr(module, lin_name, None), getattr(module, act_name, None)
            if not isinstance(lin, torch.nn.Linear) or lin.bias is None or not _is_gelu(act):
                continue
            candidate = _LinearGELU(lin, act)
            x = torch.randn(64, lin.in_features, generator=torch.Generator().manual_seed(0)).to(device, dtype or
                                                                                            lin.weight.dtype)
            try:
                with torch.inference_mode():
                    got, ref = candidate(x).float(), act(lin(x)).float()
                ok = bool((torch.nn.functional.cosine_similarity(got, ref, dim=1) >= 0.9999).all())
            except Exception as exc:
                log.debug("engine: cannot fuse %s.%s with its GELU: %s", type(module).__name__, lin_name, exc)
                ok = False
            if ok:
                setattr(module, lin_name, candidate)
                setattr(module, act_name, torch.nn.Identity())
                fused += 1
    return fused


def unfuse_gelu_epilogues(hf: torch.nn.Module) -> int:
    """Undo :func:`fuse_gelu_epilogues` (each Linear and its GELU back in place); returns how many were undone."""
    undone = 0
    for module in list(hf.modules()):
        for lin_name, act_name in _FFN_PAIRS:
            fused = getattr(module, lin_name, None)
            if isinstance(fused, _LinearGELU):
                setattr(module, lin_name, fused.linear)
                setattr(module, act_name, fused.replaced_act)
                undone += 1
    return undone


def resolve_first_token_ffn() -> bool:
    """Whether a cross-encoder's (or [CLS]-pooled bi-encoder's) last layer runs its feed-forward block on each
    text's first token only (:func:`prune_last_feed_forward`): the PIPELINE_FIRST_TOKEN_FFN environment variable
    (1/true: on, 0/false: off) where set, else on."""
    setting = _env_switch("PIPELINE_FIRST_TOKEN_FFN")
    return True if setting is None else setting


def _first_token_feed_forward(ctx: dict, original: Callable) -> Callable:
    """The last layer's feed-forward applied to the first token of each text only, the other rows passed through
    unchanged: packed batches [1, T, H] by the starts of the texts (``ctx["first"]``, set per batch by
    :func:`_hf_forward`), padded [B, L, H] by column 0."""

    def feed_forward(attention_output: torch.Tensor) -> torch.Tensor:
        if ctx.get("packed"):
            first = ctx["first"]
            return attention_output.index_copy(1, first, original(attention_output.index_select(1, first)))
        return torch.cat([original(attention_output[:, :1]), attention_output[:, 1:]], dim=1)

    return feed_forward


def _pools_first_token_only(model) -> bool:
    """Whether a SentenceTransformer's pooling reads only the first token ([CLS] pooling alone: ANCE, BGE,
    msmarco-bert-base-dot-v5), under the pooling_mode of sentence-transformers 6.x or the older boolean flags."""
    for module in list(model)[1:] if _transformer_module(model) is not None else []:
        modes = getattr(module, "pooling_mode", None)
        if isinstance(modes, (str, tuple, list)):
            return tuple([modes] if isinstance(modes, str) else modes) == ("cls",)
        if hasattr(module, "pooling_mode_cls_token"):
            flags = [bool(getattr(module, name)) for name in dir(module) if name.startswith("pooling_mode_")
                     and not callable(getattr(module, name))]
            return bool(module.pooling_mode_cls_token) and sum(flags) == 1
    return False


def prune_last_feed_forward(hf: torch.nn.Module, ctx: dict, device: torch.device) -> bool:
    """For a model whose head reads only each text's first token (the sequence-classification heads of BERT,
    ELECTRA, RoBERTa and MiniLM cross-encoders; a bi-encoder pooled by [CLS] alone), run the last transformer
    layer's feed-forward block (its two largest GEMMs, two thirds of the layer's matmul work) on that token only:
    the other tokens' outputs of the last layer feed nothing. Saves ~5.5% of electra-base's matmul work (12
    layers), ~11% of a 6-layer MiniLM's. Only for layers that apply their feed-forward through an unchunked
    ``feed_forward_chunk`` (BERT-family layers); checked on random texts of several lengths against the unpruned
    model (logits within 1e-3 of their largest, else undone). ``ctx``: the prepared model's per-batch context
    (packed batches' first-token positions). Returns whether the last layer was pruned."""
    layers = _encoder_layers(hf)
    last = layers[-1] if layers else None
    if last is None or not callable(getattr(last, "feed_forward_chunk", None)) or \
            getattr(last, "chunk_size_feed_forward", 0) or "feed_forward_chunk" in vars(last):
        return False
    cfg = getattr(hf, "config", None)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    if vocab < 10:
        return False
    gen = torch.Generator().manual_seed(0)
    lens = torch.tensor([16, 9, 5, 12])
    ids = torch.randint(5, vocab, (4, 16), generator=gen)
    mask = (torch.arange(16)[None, :] < lens[:, None]).to(torch.int64)

    def logits() -> torch.Tensor:  # a head's logits, or a body's first-token states (a CLS-pooled bi-encoder)
        with torch.inference_mode():
            out = hf(input_ids=ids.to(device), attention_mask=mask.to(device), return_dict=True)
        return (out["logits"] if "logits" in out else out["last_hidden_state"][:, 0]).float()

    try:
        ref = logits()
        last.feed_forward_chunk = _first_token_feed_forward(ctx, last.feed_forward_chunk)
        got = logits()
        ok = bool((got - ref).abs().max() <= 1e-3 * max(float(ref.abs().max()), 1.0))
    except Exception as exc:
        log.debug("engine: cannot prune the last feed-forward: %s", exc)
        ok = False
    if not ok and "feed_forward_chunk" in vars(last):
        del last.feed_forward_chunk  # back to the class's method
    return ok


def resolve_fuse_gelu() -> bool:
    """Whether the inference copy fuses each feed-forward GELU into its GEMM (:func:`fuse_gelu_epilogues`): the
    PIPELINE_FUSE_GELU environment variable (1/true: on, 0/false: off) where set, else on. On this project's CPU VM
    it gave 5-8% on an all-MiniLM-L6-v2 encode (bf16; scoring even within the VM's noise) with the same outputs
    (the CPU computes the exact GELU); on CUDA it moves the GELU into cuBLASLt's epilogue (not yet measured there)."""
    setting = _env_switch("PIPELINE_FUSE_GELU")
    return True if setting is None else setting


def resolve_compile_freeze() -> bool:
    """Whether compiled inference layers are compiled with Inductor's freezing (the PIPELINE_COMPILE_FREEZE
    environment variable, 1/true: on; off by default until a GPU run shows a gain): the weights become constants of
    the graph, so Inductor folds them and concatenates the query, key and value projections, which read the same
    input, into one GEMM of three times the width (one read of the activations instead of three, one launch
    instead of three). Only graphs compiled without gradients freeze (training is untouched); each layer keeps its
    own graph (dynamo guards on the weights), and the engine's first-batch check against the eager layers still
    applies. Measured as a variant by scripts/bench_gpu.py."""
    return bool(_env_switch("PIPELINE_COMPILE_FREEZE"))


def _frozen_compiles(prep: "_Prepared"):
    """The context of a forward that may compile a layer: Inductor's freezing switched on for it where
    ``prep.freeze`` (a compile option does not reach that switch, which Inductor reads before applying options);
    otherwise nothing."""
    if prep.freeze and prep.compiled:
        import torch._inductor.config as inductor_config

        return inductor_config.patch(freezing=True)
    return contextlib.nullcontext()


def _env_switch(name: str) -> bool | None:
    """An on/off environment variable: 1/true/yes/on -> True, any other value -> False, unset or empty -> None."""
    value = os.environ.get(name, "").strip().lower()
    return value in ("1", "true", "yes", "on") if value else None


def _use_compiled(prep: _Prepared, on: bool) -> None:
    for layer, impl in zip(_encoder_layers(prep.hf), prep.compiled):
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
        setting = _env_switch("PIPELINE_COMPILE_LAYERS")
        if setting is not None:
            return setting
        return device is not None and device.type == "cuda" and n >= COMPILE_MIN_ITEMS
    return bool(compile_layers)


def _fallback_to_padded(prep: _Prepared) -> None:
    if prep.attn != "varlen":
        return
    if prep.hook_handle is not None:
        prep.hook_handle.remove()
        prep.hook_handle = None
    prep.attn = "sdpa" if getattr(prep.hf, "_supports_sdpa", False) and _set_attn(prep.hf, "sdpa") else "model"
    if prep.attn == "model":
        _set_attn(prep.hf, "eager")


# ------------------------------------------------------------------------------------------ tokenisation
@dataclass
class _Tokens:
    """Flat (CSR) token storage for a chunk: row i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray
    offsets: np.ndarray
    type_ids: np.ndarray | None = None

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _transformer_module(model):
    try:
        first = model[0]
    except Exception:
        first = None
    if first is not None and (hasattr(first, "auto_model") or hasattr(first, "tokenizer")):
        return first
    return None


def _csr_from_padded(features: dict) -> _Tokens:
    ids = features["input_ids"]
    if "cu_seq_lens_q" in features:  # the model's own preprocess flattened the batch (FA2 installs)
        cu = features["cu_seq_lens_q"].to(torch.int64).cpu().numpy()
        flat = ids.reshape(-1).cpu().numpy().astype(np.int32)
        tt = features.get("token_type_ids")
        return _Tokens(flat, cu, None if tt is None else tt.reshape(-1).cpu().numpy().astype(np.int8))
    ids = torch.as_tensor(ids)
    mask = features.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    lengths = mask.sum(1).numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = ids[mask].numpy().astype(np.int32)
    tt = features.get("token_type_ids")
    tt_flat = None if tt is None else torch.as_tensor(tt)[mask].numpy().astype(np.int8)
    return _Tokens(flat, offsets, tt_flat)


class _Tokenizer:
    """Tokenises inputs exactly like the model's own ``preprocess`` but without padding, through the fast
    (Rust) tokenizer in batch; verified against ``preprocess`` on the first chunk."""

    def __init__(self, model, kind: str, prompt: str | None, want_type_ids: bool, max_positions: int | None):
        self.model = model
        self.kind = kind
        self.prompt = prompt
        self.want_type_ids = want_type_ids
        self.module = _transformer_module(model)
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

    def _fast(self, items: Sequence) -> _Tokens:
        return _Tokens(*tokenize_worker.encode_csr(self._encode, self._prep_inputs(items), self.want_type_ids))

    def _slow(self, items: Sequence, step: int = 1024) -> _Tokens:
        parts = []
        for s in range(0, len(items), step):
            sub = list(items[s : s + step])
            if self.kind == "pairs":
                sub = [(a, b) for a, b in sub]
                feats = self.model.preprocess(sub, prompt=self.prompt) if self.prompt else self.model.preprocess(sub)
            else:
                feats = self.model.preprocess(sub, prompt=self.prompt) if self.prompt else self.model.preprocess(sub)
            parts.append(_csr_from_padded(feats))
        t = _Tokens(*tokenize_worker.join_csr([(p.ids, p.offsets, p.type_ids) for p in parts]))
        if not self.want_type_ids:
            t.type_ids = None
        elif t.type_ids is None:
            t.type_ids = np.zeros_like(t.ids, dtype=np.int8)
        return t

    def _verify(self, items: Sequence, fast: _Tokens, fetch: Callable[[list[int]], list] | None = None) -> bool:
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

    def result(self, items: Sequence, handle: list | None) -> _Tokens:
        """The tokens of ``items``, from the futures :meth:`submit` returned (checked like the in-thread path)."""
        if handle is None or self.backend is None:
            return self(items)
        try:
            parts = [f.result(timeout=RESULT_TIMEOUT_S) for f in handle]
        except Exception as exc:  # a worker died, failed or stalled: this chunk and the rest are tokenised here
            log.warning("engine: tokeniser process failed (%s: %s); tokenising in this process", type(exc).__name__, exc)
            self.pool_broken = True
            _close_pools()
            return self(items)
        return self._checked(items, _Tokens(*tokenize_worker.join_csr(parts)))

    def _checked(self, items: Sequence, toks: _Tokens) -> _Tokens:
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

    def __call__(self, items: Sequence) -> _Tokens:
        if self.backend is not None:
            return self._checked(items, self._fast(items))
        return self._slow(items)


class _FromStore:
    """Inputs that arrive as tokens (a :mod:`pipeline.tokens` view over a token store): the model's special tokens
    and truncation are added by a :class:`tokens.Template` read off its tokenizer, and the first chunk is checked
    against the model's own preprocess of the same texts. A store the model cannot use (another tokenizer, a
    prompt, left truncation, a limit above the store's cap) or any difference: the view's texts are tokenised
    instead, as if they had been passed as texts."""

    backend = None  # nothing to hand to tokeniser processes

    def __init__(self, inner: _Tokenizer, view):
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
    def _unusable(inner: _Tokenizer, view) -> str | None:
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

    def result(self, items, handle=None) -> _Tokens:
        return self(items)

    def __call__(self, items) -> _Tokens:
        if self.template is None:
            return self.inner(items.texts())
        toks = _Tokens(*items.assemble(self.template, self.inner.want_type_ids))
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


def _tokenizer_pool(tok: _Tokenizer, workers: int):
    """Tokeniser processes holding ``tok``'s tokenizer, kept for later calls with the same tokenizer; None (with a
    warning) where they cannot start."""
    key = (tok.tokenizer_json, tok.max_len, tok.direction, tok.want_type_ids, workers)
    pool = _POOLS.get(key)
    if pool is None:
        _close_pools()
        try:
            pool = TokenizerProcesses(workers, (tok.tokenizer_json, tok.max_len, tok.direction, tok.want_type_ids))
        except Exception as exc:
            log.warning("engine: tokeniser processes unavailable (%s: %s); tokenising in this process",
                        type(exc).__name__, exc)
            return None
        _POOLS[key] = pool
    return pool


def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


atexit.register(_close_pools)


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


def _collate(toks: _Tokens, order: np.ndarray, pos_offset: int, packed: bool, pad_id: int, want_tt: bool, pin: bool):
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


def _producer(items, tokenizer: _Tokenizer, prep: _Prepared, cfg: dict, q: "queue.Queue", stop: threading.Event, stats):
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
                B, L, T, tensors = _collate(toks, sel, prep.pos_offset, packed, pad_id, cfg["want_tt"], cfg["pin"])
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
                             first_token_head=kind == "pairs" or _pools_first_token_only(model))
        cfg_max_pos = getattr(getattr(hf_model, "config", None), "max_position_embeddings", None)
        max_positions = (cfg_max_pos - self.prep.pos_offset) if cfg_max_pos else None
        tok = getattr(_transformer_module(model), "tokenizer", None) or getattr(model, "tokenizer", None)
        want_tt = self.prep.accepts_token_type_ids and "token_type_ids" in (getattr(tok, "model_input_names", None) or [])
        self.tokenizer = _Tokenizer(model, kind, prompt, want_tt, max_positions)
        if isinstance(items, tokens.TokenView):
            self.tokenizer = _FromStore(self.tokenizer, items)
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
        workers = resolve_tokenize_workers(tokenize_workers, self.device, len(items))
        self.cfg["pool"] = _tokenizer_pool(self.tokenizer, workers) if workers and self.tokenizer.backend else None
        self.tokenize_workers = workers if self.cfg["pool"] is not None else 0
        self.cfg["bounds"] = _chunk_bounds(len(items), self.cfg["chunk"], ramp=self.device.type == "cuda")
        self.show_progress = show_progress
        self.desc = desc
        self.attention = attention

    def _forward(self, batch: _Batch) -> torch.Tensor:
        """The model on one batch. Fused GELU GEMMs that fail (on a shape their check did not try) are undone for
        good, and the batch runs again with separate GELUs (and eager layers: compiled ones were traced with the
        fused GEMMs)."""
        try:
            return self._forward_layers(batch)
        except Exception as exc:
            prep = self.prep
            if not prep.fused_gelu:
                raise
            log.warning("engine: a fused GELU GEMM failed (%s: %s); computing the GELUs separately",
                        type(exc).__name__, exc)
            unfuse_gelu_epilogues(prep.hf)
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
            _set_attn(self.prep.hf, VARLEN_ATTN_NAME)
            self.prep.attn = "varlen"
            self.prep.hook_handle = _find_encoder(self.prep.hf).register_forward_hook(_repad_hook(self.prep))
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
                "device_items": n_dev, "device_s": device_s, "device_tokens": n_tokens, "device_attn_tokens_sq": attn_sq,
                "device_items_per_s": n_dev / device_s if device_s else 0.0}

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
            dtype=str(self.dtype).replace("torch.", "") if self.dtype is not None else "float32",
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
    modules = list(model)[1:] if _transformer_module(model) is not None else []

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
    modules = list(model)[1:] if _transformer_module(model) is not None else []

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
    ``tokenize_workers``: tokeniser processes (None: auto, see :func:`resolve_tokenize_workers`; 0: in this process).
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
    module = _transformer_module(model)
    if module is None or not hasattr(module, "auto_model"):
        raise TypeError("encode_texts needs a SentenceTransformer whose first module is a Transformer")
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
        dim = model.get_sentence_embedding_dimension() if hasattr(model, "get_sentence_embedding_dimension") else 0
        return np.zeros((0, dim or 0), dtype=np.float32)
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
    if len(pairs) == 0:
        return np.zeros((0,), dtype=np.float32)
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
        module = _transformer_module(model)
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
    kwargs["tokenize_workers"] = resolve_tokenize_workers(kwargs.get("tokenize_workers"), torch.device(device),
                                                          len(items), processes=nprocs)
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
    dim = model.get_sentence_embedding_dimension()
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
