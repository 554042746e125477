"""Packed MNRL training (pipeline/packing.py) on the CPU, with a per-sequence SDPA reference standing in for the
CUDA flash kernel: the collator's tokens are the library's own, the packed loss and its gradients equal the
library's MultipleNegativesRankingLoss, a broken kernel falls back to padded forwards, and the train stage's
trainer runs packed, leaving the saved config's attention implementation untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import packing, rewrites, varlen
from pipeline.stages import train as T

QUERIES = ["what is a packed batch", "how do cross encoders score pairs", "define hard negative", "bm25 weighting"]
POSITIVES = ["A packed batch concatenates sequences without padding tokens between them.",
             "A cross-encoder reads the query and the passage together and outputs one relevance score.",
             "A hard negative is a passage that looks relevant to the retriever but is not relevant.",
             "BM25 weights terms by inverse document frequency and saturating term frequency, with length norms."]
NEGATIVES = ["Bananas are rich in potassium.", "The river flows north for most of its length through the valley.",
             "Sourdough needs a starter.", "Chess openings have names like the Sicilian defence and the French."]


def _reference_train_varlen(q, k, v, cu, max_len, scale, dropout):
    """Differentiable per-sequence SDPA over packed [T, H, D] tensors, with attention dropout."""
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=scale, dropout_p=dropout)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture
def packed_on_cpu(monkeypatch):
    """Kernel calls counted: {"train": [dropout of each call], "inference": n}."""
    calls = {"train": [], "inference": 0}

    def inference(q, k, v, cu, max_len, scale):
        calls["inference"] += 1
        return _reference_train_varlen(q, k, v, cu, max_len, scale, 0.0)

    def train(q, k, v, cu, max_len, scale, dropout):
        calls["train"].append(dropout)
        return _reference_train_varlen(q, k, v, cu, max_len, scale, dropout)

    # opaque to torch.compile (traced, their per-sequence loops would recompile for every length), as the
    # flash kernels they stand for are single ops in the graph
    monkeypatch.setattr(varlen, "_VARLEN_FN", torch.compiler.disable(inference))
    monkeypatch.setattr(varlen, "_VARLEN_TRAIN_FN", torch.compiler.disable(train))
    monkeypatch.setattr(varlen, "varlen_available", lambda device: varlen.register_varlen())
    monkeypatch.setattr(varlen, "flash_device", lambda t: True)  # the CUDA kernels' code path, reference kernels
    return calls


@pytest.fixture
def bi_encoder(tiny_bi_encoder):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    return SentenceTransformer(str(tiny_bi_encoder), device="cpu")


def _rows():
    return [{"query": q, "positive": p, "negative": n} for q, p, n in zip(QUERIES, POSITIVES, NEGATIVES)]


def _primed(model):
    collator = packing.PackedTripletCollator(model, T.COLUMNS)
    assert collator.prime(_rows())
    return collator


def test_collator_packs_the_librarys_own_tokens(bi_encoder):
    model = bi_encoder
    model.max_seq_length = 12  # long passages are truncated as the library truncates them
    batch = _primed(model)(_rows())
    assert batch["packed_rows"] == 4 and batch["packed_columns"] == 3
    cu = batch["packed_cu_seq_lens_q"].numpy()
    ids = batch["packed_input_ids"][0].numpy()
    pos = batch["packed_position_ids"][0].numpy()
    seq = batch["packed_seq_idx"][0].numpy()
    texts = QUERIES + POSITIVES + NEGATIVES
    ref = model.preprocess(texts)
    mask = ref["attention_mask"].numpy().astype(bool)
    for i in range(len(texts)):
        a, b = cu[i], cu[i + 1]
        np.testing.assert_array_equal(ids[a:b], ref["input_ids"].numpy()[i][mask[i]])
        np.testing.assert_array_equal(pos[a:b], np.arange(b - a))
        assert (seq[a:b] == i).all()
    assert max(np.diff(cu)) == batch["packed_max_length_q"] == 12
    assert batch["packed_column_tokens"] == [int(cu[0]), int(cu[4]), int(cu[8]), int(cu[12])]
    assert batch["packed_column_widths"] == [int(np.diff(cu)[c * 4:(c + 1) * 4].max()) for c in range(3)]


def _losses(model, collator):
    """(library MNRL loss, packed loss) on the same batch, eval mode, with their gradients."""
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model.eval()
    rows = _rows()
    columns = [[r[c] for r in rows] for c in T.COLUMNS]
    ref_loss = MultipleNegativesRankingLoss(model, scale=20.0, similarity_fct=util.cos_sim)
    model.zero_grad()
    ref = ref_loss([model.preprocess(col) for col in columns], None)
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    packed_loss = packing.PackedMNRL(model, pos_offset=collator.pos_offset, pad_id=collator.pad_id, scale=20.0,
                                     similarity_fct=util.cos_sim)
    batch = collator(rows)
    features = {k[len(packing.PREFIX):]: v for k, v in batch.items()}
    model.zero_grad()
    ours = packed_loss([features], None)
    ours.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return ref, ours, ref_grads, grads, packed_loss


def test_packed_loss_and_gradients_equal_the_librarys(packed_on_cpu, bi_encoder):
    ref, ours, ref_grads, grads, loss = _losses(bi_encoder, _primed(bi_encoder))
    assert loss.mode == "packed" and loss.check["min_cosine"] > 0.9999
    layers = bi_encoder[0].auto_model.config.num_hidden_layers
    assert packed_on_cpu["inference"] == layers and packed_on_cpu["train"] == [0.0] * layers  # check, then loss
    assert abs(float(ref.detach()) - float(ours.detach())) < 1e-5
    assert len(grads) == len(ref_grads)
    for a, b in zip(ref_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert bi_encoder[0].auto_model.config._attn_implementation != varlen.VARLEN_ATTN_NAME


def test_a_wrong_kernel_falls_back_to_padded_forwards(monkeypatch, packed_on_cpu, bi_encoder):
    # a kernel that mixes the sequences of the pack (what a wrong cu_seq_lens would do)
    monkeypatch.setattr(varlen, "_VARLEN_FN", lambda q, k, v, cu, m, s: 10 * torch.flip(v, [0]))
    ref, ours, ref_grads, grads, loss = _losses(bi_encoder, _primed(bi_encoder))
    assert loss.mode == "padded" and loss.check["min_cosine"] < 0.999, loss.check
    assert abs(float(ref.detach()) - float(ours.detach())) < 1e-5  # the fallback is the library's padded computation
    for a, b in zip(ref_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packing_plan_rules(bi_encoder, monkeypatch):
    assert packing.packing_plan(bi_encoder, "cpu", "fp32", "auto") == (True, "packed varlen attention")
    use, why = packing.packing_plan(bi_encoder, "cuda", "fp32", "auto")  # the flash kernel needs half precision
    assert not use and "precision" in why
    assert packing.packing_plan(bi_encoder, "cuda", "bf16", "false") == (False, "train.packing=false")
    monkeypatch.setattr(bi_encoder[0].auto_model, "_supports_attention_backend", False)
    use, why = packing.packing_plan(bi_encoder, "cpu", "bf16", "auto")
    assert not use and "attention interface" in why
    with pytest.raises(ValueError, match="cannot run here"):
        packing.packing_plan(bi_encoder, "cpu", "bf16", "true")
    with pytest.raises(ValueError, match="auto, true or false"):
        packing.packing_plan(bi_encoder, "cpu", "bf16", "sometimes")


@pytest.fixture
def cpu_kernel_calls(monkeypatch):
    """The real CPU path (bucketed SDPA), its calls recorded as (dropout, gradient wanted)."""
    calls = []
    real = varlen._segmented_sdpa

    def recording(q, k, v, cu, max_len, scale, dropout=0.0):
        calls.append((dropout, torch.is_grad_enabled() and q.requires_grad))
        return real(q, k, v, cu, max_len, scale, dropout)

    monkeypatch.setattr(varlen, "_segmented_sdpa", recording)
    return calls


def test_cpu_packed_loss_and_gradients_equal_the_librarys(cpu_kernel_calls, bi_encoder):
    """No stand-in kernel: the CPU's own packed path against the library's padded MNRL."""
    ref, ours, ref_grads, grads, loss = _losses(bi_encoder, _primed(bi_encoder))
    assert loss.mode == "packed" and loss.check["min_cosine"] > 0.9999
    layers = bi_encoder[0].auto_model.config.num_hidden_layers
    assert cpu_kernel_calls == [(0.0, False)] * layers + [(0.0, True)] * layers  # the check, then the loss
    assert abs(float(ref.detach()) - float(ours.detach())) < 1e-5
    assert len(grads) == len(ref_grads)
    for a, b in zip(ref_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lengths", [[7, 300, 1, 64, 65, 80, 7, 7, 120, 2], [16] * 5])
def test_segmented_sdpa_equals_attention_per_sequence(lengths):
    torch.manual_seed(0)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), 4, 8, requires_grad=True) for _ in range(3))
    ours = varlen._segmented_sdpa(q, k, v, cu, max(lengths), None)
    ref = _reference_train_varlen(q, k, v, cu, max(lengths), None, 0.0)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    plan = varlen._segment_plan(tuple(cu.tolist()), q.device)
    widths = [idx.shape[1] for idx, _, _ in plan[:-1]]
    if len(set(lengths)) == 1:
        assert widths == [16] and plan[0][1] is None  # equal lengths: one unmasked call
    else:  # buckets of lengths within 1.25x or 16 tokens of their shortest: 1,2,7,7,7 | 64,65,80 | 120 | 300
        assert widths == [7, 80, 120, 300]
    # dropout reaches the kernel: p = 1 zeroes every attention output
    dropped = varlen._segmented_sdpa(q, k, v, cu, max(lengths), None, dropout=1.0)
    assert float(dropped.detach().abs().max()) == 0.0
    # and through the attention interface the model's layers call ([1, H, T, D]): their scaling and their attention
    # dropout reach it
    q, k, v = (x.detach() for x in (q, k, v))
    heads = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
    packed = dict(cu_seq_lens_q=cu, max_length_q=max(lengths))
    scaled, _ = varlen._varlen_attention_forward(None, *heads, None, scaling=0.3, **packed)
    torch.testing.assert_close(scaled[0], _reference_train_varlen(q, k, v, cu, max(lengths), 0.3, 0.0), atol=1e-5,
                               rtol=1e-5)
    dropped, _ = varlen._varlen_attention_forward(None, *heads, None, dropout=1.0, **packed)
    assert float(dropped.abs().max()) == 0.0


def test_stage_trainer_trains_packed_with_dropout(packed_on_cpu, bi_encoder, tmp_path):
    import datasets

    n = 48
    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict({
        "query": [f"{QUERIES[i % 4]} {i}" for i in range(n)],
        "positive": [f"{POSITIVES[i % 4]} item {i}" for i in range(n)],
        "negative": [f"{NEGATIVES[int(rng.integers(4))]} other {i}" for i in range(n)]})
    trainer = T.make_trainer(bi_encoder, ds, block_size=n, output_dir=tmp_path / "ckpt", batch_size=16, lr=1e-3,
                             warmup_steps=0, logging_steps=1, save_steps=1000, device="cpu", precision="bf16",
                             packing="true")
    assert isinstance(trainer.loss, packing.PackedMNRL)
    before = [p.detach().clone() for p in bi_encoder.parameters()]
    trainer.train()
    assert trainer.loss.mode == "packed"
    dropout = bi_encoder[0].auto_model.config.attention_probs_dropout_prob
    layers = bi_encoder[0].auto_model.config.num_hidden_layers
    assert dropout > 0 and packed_on_cpu["train"] == [dropout] * (3 * layers)  # 3 steps, attention dropout on
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, bi_encoder.parameters()))
    bi_encoder.save(str(tmp_path / "v3"), create_model_card=False)
    import json

    saved = json.loads((tmp_path / "v3" / "config.json").read_text())
    assert saved.get("_attn_implementation", "sdpa") != varlen.VARLEN_ATTN_NAME
    assert bi_encoder[0].auto_model.config._attn_implementation != varlen.VARLEN_ATTN_NAME


# ------------------------------------------------------------------------ compiled layers (train.compile_layers)
def _compiled_vs_eager(model, compile_layers: bool):
    """Loss and gradients of one packed batch (eval mode: no dropout, so compiled and eager must agree)."""
    from sentence_transformers import util

    collator = _primed(model)
    model.eval()
    loss = packing.PackedMNRL(model, pos_offset=collator.pos_offset, pad_id=collator.pad_id, scale=20.0,
                              similarity_fct=util.cos_sim, compile_layers=compile_layers)
    features = {k[len(packing.PREFIX):]: v for k, v in collator(_rows()).items()}
    model.zero_grad()
    value = loss([features], None)
    value.backward()
    return loss, float(value.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _layers_compiled(model) -> list[bool]:
    return [layer._compiled_call_impl is not None for layer in rewrites.encoder_layers(model[0].auto_model)]


def test_compiled_layers_give_the_eager_loss_and_gradients(monkeypatch, packed_on_cpu, bi_encoder):
    monkeypatch.setattr(packing, "COMPILE_BACKEND", "aot_eager")  # dynamo + AOTAutograd, without C++ codegen
    _, eager, eager_grads = _compiled_vs_eager(bi_encoder, False)
    assert not any(_layers_compiled(bi_encoder))
    loss, compiled, grads = _compiled_vs_eager(bi_encoder, True)
    assert loss.mode == "packed" and loss.compiled == "on" and all(_layers_compiled(bi_encoder))
    assert abs(compiled - eager) < 1e-6 and len(grads) == len(eager_grads)
    for a, b in zip(eager_grads, grads):  # the trial step accumulated no gradient of its own
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    packing.release_compiled(bi_encoder)
    assert not any(_layers_compiled(bi_encoder))


@pytest.mark.parametrize("fails_in", ["forward", "backward"])
def test_compiled_layers_that_fail_their_trial_step_train_eagerly(monkeypatch, packed_on_cpu, bi_encoder, fails_in,
                                                                   caplog):
    from torch._dynamo.backends.common import aot_autograd

    def broken(gm, example_inputs):
        raise RuntimeError(f"could not compile the {fails_in} graph")

    backend = aot_autograd(fw_compiler=broken if fails_in == "forward" else (lambda gm, ex: gm),
                           bw_compiler=broken if fails_in == "backward" else (lambda gm, ex: gm))
    _, eager, eager_grads = _compiled_vs_eager(bi_encoder, False)
    monkeypatch.setattr(packing, "COMPILE_BACKEND", backend)
    import torch._dynamo

    torch._dynamo.reset()  # no graph kept from another test
    loss, value, grads = _compiled_vs_eager(bi_encoder, True)
    assert loss.compiled.startswith("eager:") and f"the {fails_in} graph" in loss.compiled
    assert not any(_layers_compiled(bi_encoder)) and "training with eager layers" in caplog.text
    assert abs(value - eager) < 1e-6
    for a, b in zip(eager_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_stage_trainer_with_compiled_layers_releases_them_after_training(monkeypatch, packed_on_cpu, bi_encoder,
                                                                         tmp_path):
    import datasets

    monkeypatch.setattr(packing, "COMPILE_BACKEND", "aot_eager")
    n = 32
    ds = datasets.Dataset.from_dict({"query": [f"{QUERIES[i % 4]} {i}" for i in range(n)],
                                     "positive": [f"{POSITIVES[i % 4]} item {i}" for i in range(n)],
                                     "negative": [f"{NEGATIVES[(i + 1) % 4]} other {i}" for i in range(n)]})
    trainer = T.make_trainer(bi_encoder, ds, block_size=n, output_dir=tmp_path / "ckpt", batch_size=16, lr=1e-3,
                             warmup_steps=0, logging_steps=1, save_steps=1000, device="cpu", precision="fp32",
                             packing="true", compile_layers=True)
    before = [p.detach().clone() for p in bi_encoder.parameters()]
    trainer.train()
    assert trainer.loss.mode == "packed" and trainer.loss.compiled == "on"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, bi_encoder.parameters()))
    assert not any(_layers_compiled(bi_encoder))  # the trained model encodes eagerly in this process


# ------------------------------------------------------------------------ mutation review


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_mnrl_loss_uses_the_requested_similarity_and_scale(bi_encoder, similarity):
    # train.similarity / train.scale are in the train key: the loss must be built with them, padded or packed
    from sentence_transformers import util

    want = util.cos_sim if similarity == "cosine" else util.dot_score
    padded = T.mnrl_loss(bi_encoder, scale=7.0, similarity=similarity)
    assert not isinstance(padded, packing.PackedMNRL)
    assert padded.similarity_fct is want and padded.scale == 7.0
    packed = T.mnrl_loss(bi_encoder, scale=13.0, similarity=similarity, packed_by=_primed(bi_encoder))
    assert isinstance(packed, packing.PackedMNRL)
    assert packed.similarity_fct is want and packed.scale == 13.0


@pytest.fixture
def tiny_roberta(tiny_tokenizer_dir, tmp_path):
    """A tiny RobertaModel + mean pooling: positions counted from padding_idx + 1, as in the RoBERTa family."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer
    from transformers import BertTokenizerFast, RobertaConfig, RobertaModel

    tok = BertTokenizerFast.from_pretrained(str(tiny_tokenizer_dir))
    hf_dir = tmp_path / "roberta"
    tok.save_pretrained(str(hf_dir))
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=66 + tok.pad_token_id,
                           pad_token_id=tok.pad_token_id, type_vocab_size=1)
    RobertaModel(config).save_pretrained(str(hf_dir))
    transformer = Transformer(str(hf_dir), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="mean")], device="cpu")
    return model


def test_packed_training_of_a_roberta_model_subtracts_the_position_offset(cpu_kernel_calls, tiny_roberta,
                                                                          monkeypatch):
    # RoBERTa-family positions start at padding_idx + 1: the check and the padded fallback must undo that offset
    collator = _primed(tiny_roberta)
    assert collator.pos_offset > 0
    ref, ours, ref_grads, grads, loss = _losses(tiny_roberta, collator)
    assert loss.mode == "packed" and loss.check["min_cosine"] > 0.9999, loss.check
    assert abs(float(ref.detach()) - float(ours.detach())) < 1e-5
    # the padded fallback (a kernel that mixes the pack's sequences) rebuilds the library's batches exactly
    monkeypatch.setattr(varlen, "_segmented_sdpa", lambda q, k, v, cu, m, s, dropout=0.0: 10 * torch.flip(v, [0]))
    ref, ours, ref_grads, grads, loss = _losses(tiny_roberta, collator)
    assert loss.mode == "padded" and "min_cosine" in loss.check, loss.check
    assert abs(float(ref.detach()) - float(ours.detach())) < 1e-5
