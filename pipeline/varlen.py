"""Variable-length (packed) attention for the engine's inference and pipeline/packing.py's training.

A packed batch is one sequence of all its texts' tokens ([1, T], per-text ``position_ids``), described by
``cu_seq_lens`` (each text's start, and the end). On CUDA attention is PyTorch's own FlashAttention varlen kernel
(``torch.nn.attention.varlen.varlen_attn``, else ``aten._flash_attention_forward``, which also has a backward and
attention dropout for training); elsewhere (the CPU) it is SDPA over buckets of similar-length texts
(:func:`_segmented_sdpa`), so only attention sees a little padding. Either is registered with transformers'
``AttentionInterface`` as ``VARLEN_ATTN_NAME`` and reads the ``cu_seq_lens_q``/``max_length_q`` keyword arguments
that transformers passes through to it.
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

#: the name the packed attention is registered under (``set_attn_implementation``)
VARLEN_ATTN_NAME = "engine_varlen"

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


def flash_device(t: torch.Tensor) -> bool:
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
    if not flash_device(q):
        out = _segmented_sdpa(q, k, v, cu, int(max_len), scaling, dropout or 0.0)
    elif (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)) or dropout:
        fn = _resolve_varlen_train_fn()
        if fn is None:
            raise RuntimeError("no differentiable variable-length attention in this torch")
        out = fn(q, k, v, cu, int(max_len), scaling, dropout or 0.0)
    else:
        out = _resolve_varlen_fn()(q, k, v, cu, int(max_len), scaling)
    return out.unsqueeze(0), None


def register_varlen() -> bool:
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
    return dev.type == "cuda" and _resolve_varlen_fn() is not None and register_varlen()


def packed_training_available(device) -> bool:
    """Whether packed training batches can run on ``device``: the differentiable flash kernel on CUDA, bucketed
    SDPA (:func:`_segmented_sdpa`) elsewhere."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return varlen_available(dev) and _resolve_varlen_train_fn() is not None
    return register_varlen()
