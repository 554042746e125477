"""The corpus token store (pipeline/tokens.py): tokens assembled from it equal the tokenizer's own output (special
tokens, type ids, truncation, the longest-first rule for pairs) for a WordPiece and a byte-level BPE tokenizer; the
engine gives identical embeddings and scores from it and falls back to texts when it cannot serve a model; the
stages give identical results with it; a build is keyed by tokenizer, reused, and resumes after a failure."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import tokens

TEXTS = ["the cat sat on the mat", "", "a b", "Hello, World! Unicode: naïve café", "word " * 700,
         "short", "x " * 40, "The Quick brown fox jumps over the lazy dog " * 3]
QUERIES = ["what is a cat", "", "q " * 600, "how long is a piece of string", "dog"]


@pytest.fixture(scope="module")
def wordpiece(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A RoBERTa-style tokenizer (byte-level BPE, <s> a </s></s> b </s>, no token type ids) trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 5 + QUERIES * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", pad_token="<pad>", unk_token="<unk>")


def _rows(ids, offsets):
    return [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


@pytest.mark.parametrize("which", ["wordpiece", "bpe"])
@pytest.mark.parametrize("max_len", [512, 24, 7])
def test_assembled_tokens_equal_the_tokenizer(request, which, max_len):
    hf = request.getfixturevalue(which)
    js = hf.backend_tokenizer.to_str()
    store, queries = tokens.TokenStore.from_texts(js, TEXTS), tokens.TokenStore.from_texts(js, QUERIES)
    assert store.lengths.max() > tokens.CAP and store.ids.size < store.lengths.sum()  # the long text was cut
    template = tokens.Template.probe(js, max_len)
    assert template is not None
    types = "token_type_ids" in hf.model_input_names

    ids, offsets, tt = template.texts(store, np.arange(len(TEXTS)), types)
    ref = hf(TEXTS, truncation=True, max_length=max_len)
    assert _rows(ids, offsets) == ref["input_ids"]

    rng = np.random.default_rng(0)
    qrows, prows = rng.integers(0, len(QUERIES), 300), rng.integers(0, len(TEXTS), 300)
    ids, offsets, tt = template.pairs(queries, qrows, store, prows, types)
    # the reference once per distinct pair (40 of them): the library's truncation of two long texts to 7 tokens
    # drops one token at a time (21 s for the 300 rows)
    combos = sorted(set(zip(qrows.tolist(), prows.tolist())))
    at = {c: k for k, c in enumerate(combos)}
    ref = hf([QUERIES[q] for q, _ in combos], [TEXTS[p] for _, p in combos], truncation=True, max_length=max_len)
    order = [at[c] for c in zip(qrows.tolist(), prows.tolist())]
    assert _rows(ids, offsets) == [ref["input_ids"][k] for k in order]
    if types:
        assert _rows(tt, offsets) == [ref["token_type_ids"][k] for k in order]


def test_longest_first_rule_on_every_length_combination():
    """The closed form of the pair truncation against the Rust tokenizer, every (n1, n2, room) up to 14 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {f"w{i}": i for i in range(40)} | {"[CLS]": 40, "[SEP]": 41, "[UNK]": 42}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.BertProcessing(("[SEP]", 41), ("[CLS]", 40))
    js = tok.to_str()
    a = [" ".join(f"w{i}" for i in range(n)) for n in range(15)]
    b = [" ".join(f"w{i + 20}" for i in range(n)) for n in range(15)]
    qs, ps = tokens.TokenStore.from_texts(js, a), tokens.TokenStore.from_texts(js, b)
    qrows, prows = np.repeat(np.arange(15), 15), np.tile(np.arange(15), 15)
    for max_len in range(3, 20):
        ids, offsets, _ = tokens.Template.probe(js, max_len).pairs(qs, qrows, ps, prows, False)
        tok.enable_truncation(max_length=max_len, strategy="longest_first")
        ref = [e.ids for e in tok.encode_batch(list(zip([a[i] for i in qrows], [b[i] for i in prows])))]
        assert _rows(ids, offsets) == ref, max_len


def test_tokeniser_processes_give_the_same_store(wordpiece, caplog):
    """A store built by two tokeniser processes equals the in-process one; a pool that fails mid-way (a worker
    killed) finishes in this process with the same result."""
    js = wordpiece.backend_tokenizer.to_str()
    texts = TEXTS * 300
    want = tokens.TokenStore.from_texts(js, texts)
    got = tokens.TokenStore.from_texts(js, texts, workers=2)
    for name in ("ids", "offsets", "lengths"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    with tokens.RawTokenizer(js, workers=2) as tokenize:
        assert tokenize.pool is not None
        tokenize.pool._procs[0].kill()
        ids, offsets, lengths = tokenize(texts)
        assert tokenize.pool is None and "tokeniser process failed" in caplog.text
    np.testing.assert_array_equal(ids, want.ids)
    np.testing.assert_array_equal(lengths, want.lengths)


def test_ragged_helpers_equal_their_repeat_forms():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(0, 12))
        lens, starts = rng.integers(0, 4, n), rng.integers(0, 50, n)  # zero-length rows included
        want = np.concatenate([np.arange(a, a + k) for a, k in zip(starts, lens)] + [np.zeros(0, np.int64)])
        np.testing.assert_array_equal(tokens.ragged_arange(starts, lens), want)
        np.testing.assert_array_equal(tokens.segment_ids(lens), np.repeat(np.arange(n), lens))


def test_wanted_and_key():
    assert tokens.wanted("auto", tokens.STORE_MIN_PASSAGES) and not tokens.wanted("auto", 10)
    assert tokens.wanted(True, 1) and not tokens.wanted(False, 10**9)
    with pytest.raises(ValueError, match="token_cache"):
        tokens.wanted("sometimes", 1)


def test_key_ignores_truncation_but_not_vocabulary(wordpiece, bpe):
    js = wordpiece.backend_tokenizer.to_str()
    spec = json.loads(js)
    spec["truncation"] = {"direction": "Right", "max_length": 7, "strategy": "LongestFirst", "stride": 0}
    assert tokens.tokenizer_key(json.dumps(spec)) == tokens.tokenizer_key(js)
    assert tokens.tokenizer_key(bpe.backend_tokenizer.to_str()) != tokens.tokenizer_key(js)
    vocab = spec["model"]["vocab"]  # the same normaliser and pre-tokeniser with two ids swapped: another store
    vocab["the"], vocab["of"] = vocab["of"], vocab["the"]
    assert tokens.tokenizer_key(json.dumps(spec)) != tokens.tokenizer_key(js)


# ------------------------------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def models(tiny_bi_encoder, tiny_cross_encoder):
    from sentence_transformers import CrossEncoder, SentenceTransformer

    return SentenceTransformer(str(tiny_bi_encoder), device="cpu"), CrossEncoder(str(tiny_cross_encoder), device="cpu")


@pytest.fixture(scope="module")
def passages(demo_data_dir):
    from pipeline.demo import read_tsv_pairs

    return list(read_tsv_pairs(demo_data_dir / "collection.tsv").values())[:300] + ["", "word " * 300]


def test_engine_from_store_equals_texts(models, passages):
    from pipeline import engine

    bi, ce = models
    js = tokens.fast_tokenizer_json(bi)
    store = tokens.TokenStore.from_texts(js, passages)
    view = tokens.TextTokens(store, np.arange(len(passages)), lambda rows: [passages[i] for i in rows])
    kw = dict(precision="fp32", show_progress=False, chunk_size=100)
    want = engine.encode_texts(bi, passages, **kw)
    got = engine.encode_texts(bi, view, **kw)
    assert engine.LAST_RUN["tokenizer"] == "token store"
    np.testing.assert_array_equal(got, want)
    part = engine.encode_texts(bi, view[50:120], **kw)  # other batches: the same values up to float rounding
    np.testing.assert_allclose(part, want[50:120], rtol=0, atol=1e-6)

    queries = ["what is the answer", "q " * 200, ""]
    cjs = tokens.fast_tokenizer_json(ce)
    qstore, cstore = tokens.TokenStore.from_texts(cjs, queries), tokens.TokenStore.from_texts(cjs, passages)
    rng = np.random.default_rng(1)
    qrows, prows = rng.integers(0, 3, 250), rng.integers(0, len(passages), 250)
    pairs = [(queries[q], passages[p]) for q, p in zip(qrows, prows)]
    want = engine.score_pairs(ce, pairs, **kw)
    got = engine.score_pairs(ce, tokens.PairTokens(qstore, queries, qrows, cstore, prows,
                                                   lambda rows: [passages[i] for i in rows]), **kw)
    assert engine.LAST_RUN["tokenizer"] == "token store"
    np.testing.assert_array_equal(got, want)


def test_engine_falls_back_to_texts(models, passages, bpe, caplog):
    """A store of another tokenizer, or one whose tokens are wrong, is not used: the texts are tokenised and the
    result is the same as from texts."""
    from pipeline import engine

    bi, _ = models
    texts_at = lambda rows: [passages[i] for i in rows]  # noqa: E731
    kw = dict(precision="fp32", show_progress=False)
    want = engine.encode_texts(bi, passages, **kw)

    other = tokens.TokenStore.from_texts(bpe.backend_tokenizer.to_str(), passages)
    got = engine.encode_texts(bi, tokens.TextTokens(other, np.arange(len(passages)), texts_at), **kw)
    assert engine.LAST_RUN["tokenizer"] == "texts, fast"
    np.testing.assert_array_equal(got, want)

    broken = tokens.TokenStore.from_texts(tokens.fast_tokenizer_json(bi), passages)
    broken.ids[broken.offsets[3]] += 1  # passage 3 (checked: among the first 32) no longer matches its text
    got = engine.encode_texts(bi, tokens.TextTokens(broken, np.arange(len(passages)), texts_at), **kw)
    assert engine.LAST_RUN["tokenizer"] == "texts, fast"
    assert "differ from the model's preprocess" in caplog.text
    np.testing.assert_array_equal(got, want)

    with_prompt = engine.encode_texts(bi, tokens.TextTokens(broken, np.arange(len(passages)), texts_at),
                                      prompt="query: ", **kw)
    np.testing.assert_array_equal(with_prompt, engine.encode_texts(bi, passages, prompt="query: ", **kw))


# ------------------------------------------------------------------------------------------------- stages


def test_store_build_is_keyed_reused_and_resumes(models, demo_data_dir, tmp_path, monkeypatch):
    from pipeline.readers import Corpus

    bi, _ = models
    corpus = Corpus.open(demo_data_dir / "collection.tsv", tmp_path / "cache")
    js = tokens.fast_tokenizer_json(bi)
    monkeypatch.setattr(tokens, "BUILD_BLOCK", 64)
    calls = []
    real = tokens.raw_tokens

    def failing_third_block(backend, texts):
        calls.append(len(texts))
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(backend, texts)

    monkeypatch.setattr(tokens, "raw_tokens", failing_third_block)
    with pytest.raises(RuntimeError, match="killed"):
        tokens.open_store(corpus, js, tmp_path / "cache")
    n_blocks = -(-len(corpus) // 64)
    calls.clear()
    monkeypatch.setattr(tokens, "raw_tokens", real)
    store = tokens.open_store(corpus, js, tmp_path / "cache")
    assert store.folder.name == f"{corpus.fingerprint}-{tokens.tokenizer_key(js)}"
    manifest = json.loads((store.folder / "manifest.json").read_text())
    assert manifest["tokenised_here"] == len(corpus) - 2 * 64 and manifest["passages"] == len(corpus) == len(store)
    assert n_blocks > 3 and not list((tmp_path / "cache" / "tokens").glob(".*.parts"))
    want = tokens.TokenStore.from_texts(js, corpus.texts_at(np.arange(len(corpus))))
    np.testing.assert_array_equal(store.offsets, want.offsets)
    np.testing.assert_array_equal(store.ids.astype(np.int32), want.ids)
    assert store.ids.dtype == np.uint16
    again = tokens.open_store(corpus, js, tmp_path / "cache")  # loaded, not rebuilt
    assert again.folder == store.folder and json.loads((again.folder / "manifest.json").read_text()) == manifest

    def replace(name, write):  # new files under the old names: the arrays mapped above keep their own
        part = store.folder / f"new-{name}"
        write(part)
        part.replace(store.folder / name)

    replace("offsets.npy", lambda p: np.save(p, np.asarray(store.offsets)[:-5]))  # a damaged store: a clear error
    with pytest.raises(ValueError, match="damaged.*delete the folder"):
        tokens.open_store(corpus, js, tmp_path / "cache")
    replace("ids.npy", lambda p: p.write_bytes(b"not an array"))
    with pytest.raises(ValueError, match="damaged.*delete the folder"):
        tokens.open_store(corpus, js, tmp_path / "cache")


def test_a_built_store_cuts_long_passages_at_the_cap(models, demo_data_dir, tmp_path, monkeypatch):
    """Passages longer than CAP keep their first CAP tokens and their full length (MS MARCO has a few; the demo
    passages are made long here by a CAP of 16), and a build killed between a block's two files (its ids written,
    its lengths not) redoes that block: the store holds what its passages tokenise to."""
    from pipeline.readers import Corpus

    monkeypatch.setattr(tokens, "CAP", 16)
    monkeypatch.setattr(tokens, "BUILD_BLOCK", 100)
    corpus = Corpus.open(demo_data_dir / "collection.tsv", tmp_path / "cache")
    js = tokens.fast_tokenizer_json(models[0])
    real_save = tokens._save

    def killed_before_the_lengths(path, array):
        if path.name.endswith(".lengths.npy"):
            raise RuntimeError("killed")
        real_save(path, array)

    monkeypatch.setattr(tokens, "_save", killed_before_the_lengths)
    with pytest.raises(RuntimeError, match="killed"):
        tokens.open_store(corpus, js, tmp_path / "cache")
    monkeypatch.setattr(tokens, "_save", real_save)
    store = tokens.open_store(corpus, js, tmp_path / "cache")
    texts = corpus.texts_at(np.arange(len(corpus)))
    raw = [e.ids for e in tokens._backend(js).encode_batch(texts, add_special_tokens=False)]
    assert sum(len(r) > 16 for r in raw) > len(raw) // 2
    np.testing.assert_array_equal(store.lengths, [len(r) for r in raw])
    np.testing.assert_array_equal(store.offsets, np.concatenate([[0], np.cumsum([min(len(r), 16) for r in raw])]))
    np.testing.assert_array_equal(store.ids.astype(np.int32), np.concatenate([r[:16] for r in raw]))


def test_a_stop_signal_during_the_store_build_is_taken_after_the_block(models, demo_data_dir, tmp_path, monkeypatch):
    """Slurm warns a job (SIGUSR2) a couple of minutes before its time limit; MS MARCO's store takes longer than
    that to build. The signal is taken once the block in progress is committed, not after the last block; the
    rerun builds only the blocks left, and removes what a killed assembly left."""
    import os
    import signal

    from pipeline import signals
    from pipeline.readers import Corpus

    class Requeued(Exception):
        pass

    def requeue(signum, frame):  # stands in for submitit's handler: requeue, leave
        raise Requeued()

    bi, _ = models
    corpus = Corpus.open(demo_data_dir / "collection.tsv", tmp_path / "cache")
    js = tokens.fast_tokenizer_json(bi)
    monkeypatch.setattr(tokens, "BUILD_BLOCK", 64)
    real = tokens.raw_tokens
    calls = []

    def warned_in_the_first_block(backend, texts):
        calls.append(len(texts))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
        return real(backend, texts)

    monkeypatch.setattr(tokens, "raw_tokens", warned_in_the_first_block)
    old = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(Requeued), signals.deferred():
            tokens.open_store(corpus, js, tmp_path / "cache")
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert len(calls) == 1  # stopped after the first block, of many
    # and an earlier assembly killed outright left its temporary store behind
    stale = tmp_path / "cache" / "tokens" / f".tmp-{corpus.fingerprint}-{tokens.tokenizer_key(js)}-1-2"
    stale.mkdir()
    (stale / "ids.npy").write_bytes(b"half")
    calls.clear()
    monkeypatch.setattr(tokens, "raw_tokens", lambda backend, texts: calls.append(len(texts)) or real(backend, texts))
    store = tokens.open_store(corpus, js, tmp_path / "cache")
    assert json.loads((store.folder / "manifest.json").read_text())["tokenised_here"] == len(corpus) - 64
    assert len(calls) == -(-len(corpus) // 64) - 1
    assert not stale.exists()


def test_build_blocks_bound_passages_and_bytes(demo_data_dir, tmp_path, monkeypatch):
    from pipeline.readers import Corpus

    corpus = Corpus.open(demo_data_dir / "collection.tsv", tmp_path / "cache")
    sizes = np.array([len(t.encode("utf-8")) for t in corpus.texts_at(np.arange(len(corpus)))])
    monkeypatch.setattr(tokens, "BUILD_BLOCK", 50)
    monkeypatch.setattr(tokens, "BUILD_BYTES", int(sizes.max()) * 4)
    blocks = tokens._build_blocks(corpus)
    assert blocks[0][0] == 0 and blocks[-1][1] == len(corpus)
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(0 < hi - lo <= 50 and sizes[lo:hi].sum() <= tokens.BUILD_BYTES for lo, hi in blocks)
    assert any(hi - lo < 50 for lo, hi in blocks[:-1])  # the byte bound cut some blocks
    monkeypatch.setattr(tokens, "BUILD_BYTES", 1)
    assert tokens._build_blocks(corpus) == [(i, i + 1) for i in range(len(corpus))]  # one oversize passage each


def test_concurrent_builders_build_once(models, demo_data_dir, tmp_path, monkeypatch):
    """Shards of one stage arriving together: one builds the store, the other waits for it and loads it."""
    import threading

    from pipeline.readers import Corpus

    corpus = Corpus.open(demo_data_dir / "collection.tsv", tmp_path / "cache")
    js = tokens.fast_tokenizer_json(models[0])
    tokenised: list[int] = []
    real = tokens.raw_tokens
    monkeypatch.setattr(tokens, "raw_tokens", lambda backend, texts: tokenised.append(len(texts)) or real(backend, texts))
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(tokens.open_store(corpus, js, tmp_path / "cache")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0].folder == got[1].folder
    assert sum(tokenised) == len(corpus)  # once, not twice
    np.testing.assert_array_equal(got[0].offsets, got[1].offsets)


def test_stages_give_identical_results_with_the_store(demo_stage_overrides, tmp_path):
    from pipeline.config import compose
    from pipeline.stages import retrieve, score

    base = [*demo_stage_overrides(max_queries=12, top_k=6), "score.chunk_pairs=30", "retrieve.encode_block=700"]
    results = {}
    for setting in ("false", "true"):
        root = tmp_path / setting
        cfg = compose([*base, f"artifacts_root={root}", f"token_cache={setting}"])
        r, s = retrieve.run(cfg), score.run(cfg)
        stores = list((root / "cache" / "tokens").glob("*/manifest.json")) if (root / "cache" / "tokens").exists() \
            else []
        results[setting] = (pq.read_table(r / "candidates.parquet"), np.load(r / "corpus_emb.f16.npy"),
                            pq.read_table(s / "scores.parquet"), len(stores))
    off, on = results["false"], results["true"]
    assert off[3] == 0 and on[3] == 1  # one store: the tiny bi-encoder and cross-encoder share their tokenizer
    assert on[0].equals(off[0]) and on[2].equals(off[2])
    np.testing.assert_array_equal(on[1], off[1])
