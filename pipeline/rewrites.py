"""Rewrites of an inference copy's transformer layers (never the caller's model): compiled layers, each
feed-forward GELU computed in its GEMM's epilogue, and the last layer's feed-forward on each text's first token
where the head reads nothing else. Each is checked against what it replaces where it is made, and each has an
environment switch (PIPELINE_FUSE_GELU, PIPELINE_FIRST_TOKEN_FFN, PIPELINE_COMPILE_FREEZE) for measuring it
against the plain layers (scripts/bench_gpu.py's variants). Used by pipeline/engine.py (inference) and, for
compiled layers, pipeline/packing.py (training).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


def find_encoder(hf: torch.nn.Module) -> torch.nn.Module | None:
    base = getattr(hf, "base_model", hf)
    for name in ("encoder", "transformer", "layers"):
        mod = getattr(base, name, None)
        if isinstance(mod, torch.nn.Module) and not isinstance(mod, torch.nn.ModuleList):
            return mod
    return None


def encoder_layers(hf: torch.nn.Module) -> list[torch.nn.Module]:
    encoder = find_encoder(hf)
    for name in ("layer", "layers"):
        layers = getattr(encoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return []


def compile_encoder_layers(hf: torch.nn.Module, backend: str | Callable = "inductor", options: dict | None = None
                           ) -> list:
    """torch.compile each transformer layer of ``hf`` in place (dynamic shapes: one graph for every batch size and
    length; compiled lazily by the first call). Returns the layers' compiled call functions, [] where no layer can
    be compiled (nothing is changed then). Used for inference (engine._compile_layers) and training
    (pipeline/packing.py). ``options``: Inductor options; graphs compiled with other options are not reused."""
    layers = encoder_layers(hf)
    if not layers or not all(hasattr(layer, "_compiled_call_impl") for layer in layers):
        return []
    _make_room_for_graphs(2 * len(layers) + 4)
    for layer in layers:
        layer.compile(dynamic=True, backend=backend, **({"options": options} if options else {}))
    return [layer._compiled_call_impl for layer in layers]


def _make_room_for_graphs(n: int) -> None:
    """Room for ``n`` more graphs in dynamo's cache of the layers' call function. Every BERT-family layer runs the
    same function (transformers' ``GradientCheckpointingLayer``), so all layers compiled in one process, of every
    model, share one cache of ``torch._dynamo.config.recompile_limit`` entries (8 by default), and past that
    limit dynamo runs the function eagerly from then on, for every model of the process, with only a warning.
    One model's layers share a graph while their weights are graph inputs; with Inductor's freezing (weights as
    constants, guarded by identity) each layer needs its own: of a 12-layer BERT (electra-base's depth) 8 layers
    compiled and 4 ran eagerly (tests/test_engine.py); and the engine's first packed batch, checked against a
    padded one, gives each frozen layer a second graph. Each model or setting compiled in a process (the bench's
    rows and variants, a chain of stages) takes further entries."""
    cfg = torch._dynamo.config
    per_function = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # older name
    for name in (per_function, "accumulated_recompile_limit"):
        if isinstance(getattr(cfg, name, None), int):
            setattr(cfg, name, getattr(cfg, name) + n)


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
    setting = env_switch("PIPELINE_FIRST_TOKEN_FFN")
    return True if setting is None else setting


def _first_token_feed_forward(ctx: dict, original: Callable) -> Callable:
    """The last layer's feed-forward applied to the first token of each text only, the other rows passed through
    unchanged: packed batches [1, T, H] by the starts of the texts (``ctx["first"]``, set per batch by
    engine._hf_forward), padded [B, L, H] by column 0."""

    def feed_forward(attention_output: torch.Tensor) -> torch.Tensor:
        if ctx.get("packed"):
            first = ctx["first"]
            return attention_output.index_copy(1, first, original(attention_output.index_select(1, first)))
        return torch.cat([original(attention_output[:, :1]), attention_output[:, 1:]], dim=1)

    return feed_forward


def prune_last_feed_forward(hf: torch.nn.Module, ctx: dict, device: torch.device, eager: bool = False) -> bool:
    """For a model whose head reads only each text's first token (the sequence-classification heads of BERT,
    ELECTRA, RoBERTa and MiniLM cross-encoders; a bi-encoder pooled by [CLS] alone), run the last transformer
    layer's feed-forward block (its two largest GEMMs, two thirds of the layer's matmul work) on that token only:
    the other tokens' outputs of the last layer feed nothing. Saves ~5.5% of electra-base's matmul work (12
    layers), ~11% of a 6-layer MiniLM's. Only for layers that apply their feed-forward through an unchunked
    ``feed_forward_chunk`` (BERT-family layers); checked on random texts of several lengths against the unpruned
    model (logits within 1e-3 of their largest, else undone). ``ctx``: the prepared model's per-batch context
    (packed batches' first-token positions). ``eager``: the pruned feed-forward runs outside compiled graphs, for
    layers compiled with Inductor's freezing, which takes every tensor a graph reads other than its inputs for a
    constant guarded by identity: the positions, a new tensor per batch, recompiled the last layer on every batch.
    Returns whether the last layer was pruned."""
    layers = encoder_layers(hf)
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
        pruned = _first_token_feed_forward(ctx, last.feed_forward_chunk)
        last.feed_forward_chunk = torch.compiler.disable(pruned) if eager else pruned
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
    setting = env_switch("PIPELINE_FUSE_GELU")
    return True if setting is None else setting


def resolve_compile_freeze() -> bool:
    """Whether compiled inference layers are compiled with Inductor's freezing (the PIPELINE_COMPILE_FREEZE
    environment variable, 1/true: on; off by default until a GPU run shows a gain): the weights become constants of
    the graph, so Inductor folds them and concatenates the query, key and value projections, which read the same
    input, into one GEMM of three times the width (one read of the activations instead of three, one launch
    instead of three). Only graphs compiled without gradients freeze (training is untouched); each layer keeps its
    own graph (dynamo guards on the weights), and the engine's first-batch check against the eager layers still
    applies. Measured as a variant by scripts/bench_gpu.py."""
    return bool(env_switch("PIPELINE_COMPILE_FREEZE"))

def env_switch(name: str) -> bool | None:
    """An on/off environment variable: 1/true/yes/on -> True, any other value -> False, unset or empty -> None."""
    value = os.environ.get(name, "").strip().lower()
    return value in ("1", "true", "yes", "on") if value else None
