"""Packed (unpadded) MultipleNegativesRankingLoss training: every text of a batch in one forward pass.

SentenceTransformerTrainer's default path tokenises each column into its own padded batch and runs one forward
per column (anchor, then the candidates): a batch of 64 (query, positive, negative) triplets is three padded
forwards in which passages of ~83 tokens are padded to the batch's longest (~200), and the host waits on the
device once per step (the trainer's NaN filter). Here the DataLoader workers tokenise the three columns into one
packed sequence (``input_ids`` [1, T], per-text ``position_ids``, ``cu_seq_lens``), the transformer runs once
over it with FlashAttention's variable-length kernel on CUDA, or SDPA over buckets of similar-length texts on the
CPU (the engine's ``engine_varlen`` attention, with dropout and a backward pass when training), and the library's
own Pooling (its flattened path), Normalize and
MultipleNegativesRankingLoss.compute_loss_from_embeddings turn it into the same loss. The model is still called
through ``self.model`` (the DDP wrapper under torchrun), so gradient synchronisation and gathered in-batch
negatives work as before.

Checked, not assumed: the first batch is embedded both packed and padded (eval mode, no gradient); any error or a
cosine below 0.999 switches the loss to padded per-column forwards for the rest of the run (on the device, from the
same packed batch: exactly the padded inputs the library's collator would have built). Used where it can run
(CUDA at half precision, or the CPU; models with transformers' attention interface; see :func:`packing_plan`);
elsewhere the train stage keeps the library's collator and loss. On 2 EPYC cores all-MiniLM-L6-v2 trains 4x faster
packed than the library's trainer at the same precision (docs/results.md).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from pipeline import engine, rewrites, tokenize_worker, tokenizing, varlen

log = logging.getLogger(__name__)

PREFIX = "packed_"  # the trainer's collect_features groups every "packed_*" key into one feature dict
#: keys the model's forward (and its attention layers) receive; the rest is bookkeeping for the loss
_FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
_META_KEYS = ("rows", "columns", "column_tokens", "column_widths")
MIN_COSINE = 0.999  # packed vs padded embeddings of the first batch (bf16 rounding gives ~0.9999)
COMPILE_BACKEND = "inductor"  # torch.compile backend of train.compile_layers (the CPU tests use "aot_eager")


def _hf_model(model) -> torch.nn.Module | None:
    module = tokenizing.transformer_module(model)
    return getattr(module, "auto_model", None) if module is not None else None


def packing_plan(model, device: str, precision: str, setting: str | bool = "auto", prompted: bool = False
                 ) -> tuple[bool, str]:
    """(use packing, why). ``setting``: auto (on where it can run), true (on, or a clear error), false.
    ``prompted``: texts get a prompt (the packed pooling cannot leave it out: include_prompt=False is padded)."""
    setting = str(setting).lower()
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"train.packing must be auto, true or false, got {setting!r}")
    if setting == "false":
        return False, "train.packing=false"
    reason = ""
    hf = _hf_model(model)
    module = tokenizing.transformer_module(model)
    cuda = torch.device(device).type == "cuda"
    if cuda and precision not in ("bf16", "fp16"):
        reason = f"precision {precision} (the flash kernel needs bf16 or fp16)"
    elif not varlen.packed_training_available(device):
        reason = f"no variable-length attention on {device}"
    elif hf is None or not getattr(hf, "_supports_attention_backend", False):
        reason = "the model has no transformers attention interface"
    elif getattr(module, "tokenizer", None) is None or not getattr(module.tokenizer, "is_fast", False):
        reason = "the model has no fast tokenizer"
    elif len(model) < 2 or any(type(m).__name__ not in ("Transformer", "Pooling", "Normalize") for m in model):
        reason = "modules other than Transformer, Pooling and Normalize"
    elif not hasattr(model[1], "_forward_flattened"):
        reason = "this sentence-transformers' Pooling has no flattened (packed) path"
    elif prompted and getattr(model[1], "include_prompt", True) is False:
        reason = "a prompt that the pooling leaves out (include_prompt=False)"
    if reason and setting == "true":
        raise ValueError(f"train.packing=true but packed training cannot run here: {reason}")
    return (not reason), (reason or "packed varlen attention")


class PackedTripletCollator:
    """DataLoader collate function: rows of text columns -> one packed batch (``packed_*`` keys).

    Texts are concatenated column by column (all anchors, then all positives, then all negatives), tokenised
    without padding exactly as the model's own ``preprocess`` would (checked against it by :meth:`prime`)."""

    def __init__(self, model, columns: Sequence[str], prompts: dict[str, str] | None = None):
        module = tokenizing.transformer_module(model)
        hf = _hf_model(model)
        tok = module.tokenizer
        accepts_tt = "token_type_ids" in inspect.signature(hf.forward).parameters
        self.want_type_ids = accepts_tt and "token_type_ids" in (getattr(tok, "model_input_names", None) or [])
        max_pos = getattr(hf.config, "max_position_embeddings", None)
        self.pos_offset = engine.position_offset(hf)
        self._tokenizer = tokenizing.Tokenizer(model, "texts", None, self.want_type_ids,
                                               (max_pos - self.pos_offset) if max_pos else None)
        self.columns = list(columns)
        self.prompts = {c: str(p) for c, p in (prompts or {}).items() if p}  # column -> text put before each row's
        self.pad_id = int(getattr(tok, "pad_token_id", None) or 0)
        self.valid_label_columns: list[str] = []  # the trainer's samplers read this attribute of a collator
        self.backend = None

    def _texts(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        """Column by column, each text after its column's prompt (as the library's collator prepends them)."""
        return [self.prompts.get(c, "") + str(row[c]) for c in self.columns for row in rows]

    def prime(self, rows: Sequence[dict[str, Any]]) -> bool:
        """Check the fast tokenisation against the model's ``preprocess`` on these rows (in this process, before
        DataLoader workers start); False: it differs, do not pack."""
        toks = self._tokenizer(self._texts(rows))
        if self._tokenizer.backend is None or not self._tokenizer.verified:
            return False
        self.backend = self._tokenizer.backend
        self._tokenizer = None  # workers need only the Rust tokenizer, not the model it came with
        return toks.ids.size > 0

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if self.backend is None:
            raise RuntimeError("PackedTripletCollator.prime() must succeed before batches are collated")
        B, C = len(rows), len(self.columns)
        texts = self._texts(rows)
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        toks = tokenizing.Tokens(*tokenize_worker.encode_csr(encode, texts, self.want_type_ids))
        # the engine's packed collation: input_ids / position_ids [1, T], cu (int32), rows (text of each token)
        _, longest, T, t = engine.collate(toks, np.arange(len(texts)), self.pos_offset, True, self.pad_id,
                                          self.want_type_ids, False)
        lens = toks.lengths
        batch = {
            "input_ids": t["input_ids"],
            "position_ids": t["position_ids"],
            "cu_seq_lens_q": t["cu"],
            "max_length_q": longest,  # a Python int: the kernel needs it on the host, no device sync
            "seq_idx": t["rows"].view(1, T),
            "rows": B,
            "columns": C,
            "column_tokens": [int(toks.offsets[c * B]) for c in range(C + 1)],
            "column_widths": [int(lens[c * B:(c + 1) * B].max()) for c in range(C)],
        }
        if "token_type_ids" in t:
            batch["token_type_ids"] = t["token_type_ids"]
        return {PREFIX + k: v for k, v in batch.items()}


@contextlib.contextmanager
def _attention(hf: torch.nn.Module, name: str):
    """The HF model's attention implementation switched for one forward: its config (saved with every
    checkpoint) never keeps the engine's name."""
    config = hf.config
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def _mnrl_cls():
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # pragma: no cover - sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    return MultipleNegativesRankingLoss


class PackedMNRL(_mnrl_cls()):
    """MultipleNegativesRankingLoss whose forward takes the packed batch of :class:`PackedTripletCollator`.

    ``mode``: "unchecked" until the first batch, then "packed" or "padded" (the fallback) for the run. Feature
    lists in the library's own per-column format (e.g. from its evaluator) go to the parent class unchanged."""

    def __init__(self, model, *, pos_offset: int, pad_id: int, compile_layers: bool = False, **kwargs):
        super().__init__(model, **kwargs)
        self.pos_offset, self.pad_id = int(pos_offset), int(pad_id)
        self.mode = "unchecked"
        self.check: dict[str, Any] = {}
        # "off", "pending" (compiled once the packed path is chosen), "on", or why it fell back to eager layers
        self.compiled = "pending" if compile_layers else "off"
        module = tokenizing.transformer_module(model)
        params = getattr(module, "model_forward_params", None)
        if params is not None:  # a model forward without **kwargs: let the flash keys through ST's filter
            module.model_forward_params = set(params) | set(_FLASH_KEYS) | {"position_ids"}
        self._hf = _hf_model(model)
        varlen.register_varlen()

    def forward(self, sentence_features: Iterable[dict[str, Any]], labels: torch.Tensor | None) -> torch.Tensor:
        features = list(sentence_features)
        if len(features) != 1 or "cu_seq_lens_q" not in features[0]:
            return super().forward(features, labels)
        packed = dict(features[0])
        meta = {k: packed.pop(k) for k in _META_KEYS}
        packed["cu_seq_lens_k"] = packed["cu_seq_lens_q"]
        packed["max_length_k"] = packed["max_length_q"]
        if self.mode == "unchecked":
            self._check(packed, meta)
        if self.compiled == "pending":
            self._compile(packed)
        embeddings = self._embed_packed(packed) if self.mode == "packed" else self._embed_padded(packed, meta)
        return self.compute_loss_from_embeddings(list(embeddings.split(int(meta["rows"]))), labels)

    def _compile(self, packed: dict[str, Any]) -> None:
        """torch.compile each transformer layer (dynamic shapes: one graph for every packed length), so the
        LayerNorm, GELU, dropout and residual passes between the matmuls run fused, forward and backward. After the
        packed-vs-padded check (which runs eagerly: no graph is compiled for it) and only for the packed path
        (whose attention has no data-dependent host step). One trial step on this batch, forward and backward
        through ``torch.autograd.grad`` (no gradient is accumulated) of a local stand-in loss (the layers' backward
        graph does not depend on the loss; MNRL's would gather across ranks), compiles both directions here: any
        failure or a non-finite output or gradient puts the layers back to eager for the run, instead of failing
        inside the trainer's backward."""
        if self.mode != "packed":
            self.compiled = f"not compiled: {self.mode} forward"
            return
        if not varlen.flash_device(next(self._hf.parameters())):
            # the CPU's bucketed attention plans its buckets on the host: a graph break in every layer; a packed
            # forward + backward of all-MiniLM-L6-v2 ran 18% slower compiled than eager on 2 EPYC cores (session 8)
            self.compiled = "not compiled: the CPU's attention is not one kernel"
            return
        layers = rewrites.compile_encoder_layers(self._hf, COMPILE_BACKEND)
        if not layers:
            self.compiled = "not compiled: no transformer layers found"
            return
        try:
            model = getattr(self.model, "module", self.model)  # not through DDP: this step syncs no gradient
            with _attention(self._hf, varlen.VARLEN_ATTN_NAME):
                embeddings = model(dict(packed))["sentence_embedding"]
            loss = embeddings.float().sum()  # not a function of the norm alone: the embeddings may be unit vectors
            params = [p for p in model.parameters() if p.requires_grad]
            grads = [g for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None]
            finite = torch.stack([torch.isfinite(loss), *(torch.isfinite(g).all() for g in grads)]).all()
            if not bool(finite):
                raise FloatingPointError("non-finite loss or gradient")
            self.compiled = "on"
            log.info("train: compiled transformer layers (%d), trial step passed", len(layers))
        except Exception as exc:
            release_compiled(self.model)
            self.compiled = f"eager: {type(exc).__name__}: {exc}"[:500]
            log.warning("train: compiled layers failed their trial step (%s: %s); training with eager layers",
                        type(exc).__name__, exc)

    def _embed_packed(self, packed: dict[str, Any]) -> torch.Tensor:
        with _attention(self._hf, varlen.VARLEN_ATTN_NAME):
            return self.model(dict(packed))["sentence_embedding"]

    def _embed_padded(self, packed: dict[str, Any], meta: dict[str, Any]) -> torch.Tensor:
        """Per column, the right-padded batch the library's collator would have built, from the packed tensors."""
        ids = packed["input_ids"][0]
        tt = packed.get("token_type_ids")
        seq = packed["seq_idx"][0]
        pos = packed["position_ids"][0] - self.pos_offset
        B, bounds, widths = int(meta["rows"]), meta["column_tokens"], meta["column_widths"]
        out = []
        for c, width in enumerate(widths):
            a, b = bounds[c], bounds[c + 1]
            rows, cols = seq[a:b] - c * B, pos[a:b]
            feats = {"input_ids": ids.new_full((B, width), self.pad_id),
                     "attention_mask": ids.new_zeros((B, width))}
            feats["input_ids"][rows, cols] = ids[a:b]
            feats["attention_mask"][rows, cols] = 1
            if tt is not None:
                feats["token_type_ids"] = ids.new_zeros((B, width))
                feats["token_type_ids"][rows, cols] = tt[0, a:b]
            out.append(self.model(feats)["sentence_embedding"])
        return torch.cat(out)

    def _check(self, packed: dict[str, Any], meta: dict[str, Any]) -> None:
        """Packed vs padded embeddings of the first batch, dropout off and no gradient (one-time cost)."""
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                a = self._embed_packed(packed).float()
                b = self._embed_padded(packed, meta).float()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
            worst = float(cos.min())
            self.check = {"min_cosine": round(worst, 6), "texts": int(a.shape[0])}
            self.mode = "packed" if worst >= MIN_COSINE else "padded"
            if self.mode == "padded":
                log.warning("train: packed forward disagrees with the padded one (cosine %.5f < %.3f); training "
                            "with padded batches", worst, MIN_COSINE)
        except Exception as exc:  # the kernel or the model refused packed inputs
            self.check = {"error": f"{type(exc).__name__}: {exc}"}
            self.mode = "padded"
            log.warning("train: packed forward failed (%s: %s); training with padded batches", type(exc).__name__, exc)
        finally:
            self.model.train(training)
        if self.mode == "packed":
            log.info("train: packed batches (varlen attention), first batch cosine vs padded %.6f",
                     self.check["min_cosine"])


def release_compiled(model) -> None:
    """``model``'s (a SentenceTransformer, DDP-wrapped or not) transformer layers back to eager (after training:
    the trained model encodes in this process next, and a graph compiled for training would recompile for it)."""
    hf = _hf_model(getattr(model, "module", model))
    for layer in rewrites.encoder_layers(hf) if hf is not None else ():
        if getattr(layer, "_compiled_call_impl", None) is not None:
            layer._compiled_call_impl = None
