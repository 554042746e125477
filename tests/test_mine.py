"""Mining rules one by one and combined, on inline scores whose expected negatives are worked out by hand; and
the mine stage end to end (demo corpus, tiny models) down to one training step on its triplets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.stages.mine import Rules, build_pool, hash_strings, normalised_text_hash, rank_in_group, select

# --------------------------------------------------------------------------------------------- inline data
#
# q1: positives p1 (5.0) and p2 (3.0) -> lowest positive 3.0, margin threshold 3.0 - 3.0 = 0.0
#     system A, ranks 1..8: p1 (the positive itself), d1 (p2's text in other case/spacing, 2.0), n1 4.0,
#     n2 0.5, n3 -1.0, n4 0.0 (exactly on the threshold), n5 -4.0, n6 -2.0
# q2: positive p3 (-1.0, a negative logit) -> threshold -4.0; ranks: m1 -3.0, m2 -5.0, m3 -2.0
# q3: no positive (x1)          q4: a positive but no candidate
TEXT = {"p1": "Alpha passage", "p2": "The  Beta\tpassage ", "d1": "the beta passage", "p3": "gamma", "p4": "delta"}

A_ROWS = [("q1", "p1", 5.0, True, 1), ("q1", "d1", 2.0, False, 2), ("q1", "n1", 4.0, False, 3),
          ("q1", "n2", 0.5, False, 4), ("q1", "n3", -1.0, False, 5), ("q1", "n4", 0.0, False, 6),
          ("q1", "n5", -4.0, False, 7), ("q1", "n6", -2.0, False, 8), ("q1", "p2", 3.0, True, None),
          ("q2", "m1", -3.0, False, 1), ("q2", "m2", -5.0, False, 2), ("q2", "m3", -2.0, False, 3),
          ("q2", "p3", -1.0, True, None), ("q3", "x1", -9.0, False, 1), ("q4", "p4", 2.0, True, None)]
# a second system for q1: n3 again (taken by A already), then n6, n7, n8
B_ROWS = [("q1", "n3", -1.0, False, 1), ("q1", "n6", -2.0, False, 2), ("q1", "n7", -3.0, False, 3),
          ("q1", "n8", -0.5, False, 4), ("q1", "p1", 5.0, True, None), ("q1", "p2", 3.0, True, None)]
QUERIES = ["q1", "q2", "q3", "q4"]


def _table(rows):
    q, p, ce, pos, rank = zip(*rows)
    return pa.table({"qid": list(q), "pid": list(p), "ce_score": pa.array(ce, pa.float32()),
                     "is_positive": list(pos), "rank": pa.array(rank, pa.int32())})


def _hash(vocab):
    return normalised_text_hash(pa.array([TEXT.get(p, f"text of {p}") for p in vocab.to_pylist()]))


def mined(rules: Rules, systems=(A_ROWS,)):
    """{qid: [pid, ...]} in pooled order, plus the selection and pool."""
    pool, vocab = build_pool([_table(rows) for rows in systems], QUERIES, _hash)
    sel = select(pool, rules)
    pids = vocab.to_pylist()
    out: dict[str, list[str]] = {}
    for i in sel.neg:
        out.setdefault(QUERIES[pool.cand_q[i]], []).append(pids[pool.cand_p[i]])
    return out, sel, pool


def test_default_rules_published_margin():
    got, sel, _ = mined(Rules())
    # q1: p1 positive, d1 duplicate of p2's text, n1/n2 above 0.0; n4 sits on the threshold and stays
    assert got == {"q1": ["n3", "n4", "n5", "n6"], "q2": ["m2"]}
    assert sel.reasons == {"no_positive": 1, "no_candidates": 1, "no_negative_left": 0}
    assert sel.kept.tolist() == [True, True, False, False]
    assert sel.removed["positive"] == {"first": 1, "alone": 1}
    assert sel.removed["duplicate_text"] == {"first": 1, "alone": 1}
    # on its own the margin rejects p1, d1, n1, n2 (q1) and m1, m3 (q2); first in order only n1, n2, m1, m3
    assert sel.removed["ce_score_margin"] == {"first": 4, "alone": 6}
    assert sel.likely_false_negatives == 1 and sel.likely_false_negative_queries == 1  # n1: 4.0 >= 3.0


def test_a_negative_tied_with_the_weakest_positive_counts_as_a_likely_false_negative():
    # the report's likely false negatives are the candidates the cross-encoder scores at least as high as a
    # query's weakest positive: a tie is one (the cross-encoder cannot tell it from a positive)
    rows = [("q1", "p1", 2.0, True, 3), ("q1", "p2", 4.0, True, None), ("q1", "t", 2.0, False, 1),
            ("q1", "u", 1.999, False, 2), ("q2", "m1", 0.5, True, 1), ("q2", "m2", 0.5, False, 2)]
    _, sel, _ = mined(Rules(), systems=(rows,))
    assert (sel.likely_false_negatives, sel.likely_false_negative_queries) == (2, 2)


def test_each_rule_alone():
    off = {"exclude_positives": False, "exclude_duplicate_text": False, "ce_score_margin": None,
           "num_negatives_per_system": None}
    got, _, _ = mined(Rules(**off))
    assert got["q1"] == ["p1", "d1", "n1", "n2", "n3", "n4", "n5", "n6"]  # everything retrieved, positive included
    got, _, _ = mined(Rules(**{**off, "exclude_positives": True}))
    assert got["q1"] == ["d1", "n1", "n2", "n3", "n4", "n5", "n6"]
    got, _, _ = mined(Rules(**{**off, "exclude_duplicate_text": True}))
    assert got["q1"] == ["p1", "n1", "n2", "n3", "n4", "n5", "n6"]  # only the non-positive duplicate goes
    got, _, _ = mined(Rules(**{**off, "rank_min": 3, "rank_max": 6}))
    assert got == {"q1": ["n1", "n2", "n3", "n4"], "q2": ["m3"]}
    # probability ceiling 0.5 == logit <= 0 (sigmoid(0) = 0.5 is kept)
    got, _, _ = mined(Rules(**{**off, "ce_max_score": 0.5}))
    assert got == {"q1": ["n3", "n4", "n5", "n6"], "q2": ["m1", "m2", "m3"]}
    got, _, _ = mined(Rules(**{**off, "ce_max_score": -1.5, "ce_max_score_scale": "logit"}))
    assert got == {"q1": ["n5", "n6"], "q2": ["m1", "m2", "m3"]}
    got, _, _ = mined(Rules(**{**off, "ce_score_margin": 3.0}))
    assert got == {"q1": ["n3", "n4", "n5", "n6"], "q2": ["m2"]}
    # relative 0.5 on probabilities (at most (1 - 0.5) of the positive):
    # q1 keeps sigmoid(ce) <= 0.5 * sigmoid(3.0) = 0.476
    # (logit < -0.095);
    # q2 keeps sigmoid(ce) < 0.5 * sigmoid(-1.0) = 0.134 (logit < -1.86)
    got, _, _ = mined(Rules(**{**off, "relative_margin": 0.5}))
    assert got == {"q1": ["n3", "n5", "n6"], "q2": ["m1", "m2", "m3"]}
    got, sel, _ = mined(Rules(**{**off, "num_negatives_per_system": 2}))
    assert got == {"q1": ["p1", "d1"], "q2": ["m1", "m2"]}
    assert sel.removed["per_system_cap"] == {"first": 7}
    got, sel, _ = mined(Rules(**{**off, "max_negatives": 3}))
    assert got == {"q1": ["p1", "d1", "n1"], "q2": ["m1", "m2", "m3"]}
    assert sel.removed["max_negatives"] == {"first": 5}


def test_rules_combined():
    got, sel, _ = mined(Rules(rank_max=7, num_negatives_per_system=2))
    assert got == {"q1": ["n3", "n4"], "q2": ["m2"]}
    assert sel.removed["rank_window"]["first"] == 1  # n6 at rank 8
    assert sel.removed["per_system_cap"] == {"first": 1}  # n5
    got, _, _ = mined(Rules(ce_max_score=0.3, ce_score_margin=None, relative_margin=0.8))
    # q1: sigmoid <= 0.3 (logit <= -0.85) and sigmoid < 0.2 * 0.953 = 0.19 (logit < -1.45): n5, n6
    # q2: sigmoid < 0.2 * 0.269 = 0.054 (logit < -2.87): m1, m2
    assert got == {"q1": ["n5", "n6"], "q2": ["m1", "m2"]}


def test_systems_pool_in_order_without_duplicates():
    got, sel, pool = mined(Rules(num_negatives_per_system=2), systems=(A_ROWS, B_ROWS))
    # A gives n3, n4 (n5, n6 capped); B skips n3 (already taken by A, not counted) and gives n6, n7
    assert got == {"q1": ["n3", "n4", "n6", "n7"], "q2": ["m2"]}
    assert sel.removed["cross_system_duplicate"] == {"first": 1}
    assert pool.cand_sys[sel.neg].tolist() == [0, 0, 1, 1, 0]
    got, _, _ = mined(Rules(num_negatives_per_system=2, max_negatives=3), systems=(A_ROWS, B_ROWS))
    assert got == {"q1": ["n3", "n4", "n6"], "q2": ["m2"]}


def test_input_order_does_not_matter():
    shuffled = [A_ROWS[i] for i in np.random.default_rng(0).permutation(len(A_ROWS))]
    assert mined(Rules(), systems=(shuffled,))[0] == mined(Rules())[0]


def test_relative_margin_keeps_a_negative_on_the_threshold_as_sentence_transformers_does():
    # mine_hard_negatives removes a score above the threshold, not one equal to it; margin 0 makes the threshold
    # the weakest positive's own probability, reached exactly by a negative of the same logit
    rows = [("q1", "p1", 1.5, True, None), ("q1", "e1", 1.5, False, 1), ("q1", "e2", 1.5001, False, 2),
            ("q1", "e3", -2.0, False, 3)]
    off = {"exclude_positives": True, "exclude_duplicate_text": False, "ce_score_margin": None,
           "num_negatives_per_system": None}
    got, _, _ = mined(Rules(**off, relative_margin=0.0), systems=(rows,))
    assert got == {"q1": ["e1", "e3"]}


def test_scores_of_queries_outside_the_training_order_are_ignored():
    # a score table from a wider run (another query file, a larger max_queries) must not leak into the last query
    stray = [("q9", "z1", 9.0, True, None), ("q9", "z2", -9.0, False, 1), ("q9", "z3", -8.0, False, 2)]
    got, sel, pool = mined(Rules(), systems=(A_ROWS + stray,))
    assert got == mined(Rules())[0] and sel.reasons == mined(Rules())[1].reasons
    assert sorted(pool.pos_q.tolist()) == [0, 0, 1, 3] and sorted(set(pool.cand_q.tolist())) == [0, 1, 2]


def test_written_triplets_pools_and_ranks_follow_the_pooled_order(tmp_path):
    import datasets
    import pyarrow.parquet as pq

    from pipeline.stages.mine import write_outputs

    # system B retrieved the positive p1 at rank 4: pools.parquet keeps A's (the first system's) rank 1
    b_rows = [("q1", "p1", 5.0, True, 4), *B_ROWS[:4]]
    pool, vocab = build_pool([_table(A_ROWS), _table(b_rows)], QUERIES, _hash)
    sel = select(pool, Rules(num_negatives_per_system=2))
    names = vocab.to_pylist()
    write_outputs(tmp_path, pool, sel, QUERIES, vocab, ["A", "B"], Rules(num_negatives_per_system=2),
                  texts=(lambda qcodes: [f"query {QUERIES[i]}" for i in qcodes],
                         lambda pcodes: [f"text of {names[i]}" for i in pcodes]))
    # one row per kept query: its first positive and its best (first pooled) negative, never a positive
    triplets = datasets.load_from_disk(str(tmp_path / "triplets")).to_list()
    assert triplets == [{"query": "query q1", "positive": "text of p1", "negative": "text of n3"},
                        {"query": "query q2", "positive": "text of p3", "negative": "text of m2"}]
    pools = pq.read_table(tmp_path / "pools.parquet").to_pylist()
    ranks = {(r["qid"], r["pid"], r["role"]): r["rank"] for r in pools}
    assert ranks[("q1", "p1", "pos")] == 1 and ranks[("q1", "p2", "pos")] is None  # p2 was never retrieved
    assert [r["pid"] for r in pools if r["qid"] == "q1" and r["role"] == "neg"] == ["n3", "n4", "n6", "n7"]
    assert ranks[("q1", "n6", "neg")] == 2 and ranks[("q1", "n4", "neg")] == 6  # each system's own rank


def test_bad_rules_are_clear():
    with pytest.raises(ValueError, match="ce_max_score_scale"):
        Rules(ce_max_score_scale="percent")
    with pytest.raises(ValueError, match="probability"):
        Rules(ce_max_score=2.0)
    with pytest.raises(ValueError, match="rank_max"):
        Rules(rank_min=5, rank_max=2)
    with pytest.raises(ValueError, match="relative_margin"):
        Rules(relative_margin=5)
    with pytest.raises(ValueError, match="relative_margin"):
        Rules(relative_margin=1.0)  # below 0% of the positive: nothing could be kept


def test_helpers():
    assert rank_in_group(np.array([1, 1, 2, 5, 5, 5])).tolist() == [0, 1, 0, 0, 1, 2]
    h = hash_strings(pa.array(["", "a", "ab", "ba", None, "a"]))
    assert h[1] == h[5] and len(set(h[:4].tolist())) == 4 and h[0] == h[4]
    # slices (non-zero array offsets) hash like fresh arrays
    arr = pa.array(["x", "hello", "world"])
    assert hash_strings(arr.slice(1)).tolist() == hash_strings(pa.array(["hello", "world"])).tolist()
    n = normalised_text_hash(pa.array(["Hello  World", " hello world", "hello\nworld", "hello worlds"]))
    assert n[0] == n[1] == n[2] != n[3]


# --------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def chain(request, tmp_path_factory):
    """retrieve -> score -> mine on the demo corpus with the tiny models (24 training queries)."""
    from pipeline.config import compose
    from pipeline.stages import mine, retrieve, score

    root = tmp_path_factory.mktemp("mine_chain")
    overrides = [f"artifacts_root={root}", *request.getfixturevalue("demo_stage_overrides")(max_queries=24, top_k=12),
                 "score.chunk_pairs=100",
                 # an untrained cross-encoder scores everything alike: no margin, the rest of the rules on
                 "mine.ce_score_margin=null", "mine.num_negatives_per_system=3"]
    cfg = compose(overrides)
    retrieve.run(cfg)
    score.run(cfg)
    return {"cfg": cfg, "overrides": overrides, "folder": mine.run(cfg), "root": root}


def test_stage_outputs(chain):
    import datasets
    import pyarrow.parquet as pq

    from pipeline.artifacts import read_manifest, verify_folder

    folder = chain["folder"]
    assert verify_folder(folder) == []
    lines = [json.loads(x) for x in (folder / "hard_negatives.jsonl").read_text().splitlines()]
    assert len(lines) == 24
    system = chain["cfg"].model.name
    for line in lines:
        assert set(line) == {"qid", "pos", "neg", "ce_scores"}
        assert line["pos"] and 1 <= len(line["neg"][system]) <= 3
        assert not set(line["pos"]) & set(line["neg"][system])
        # the demo's ids are MS MARCO's decimal integers: JSON integers, as the published file and its training
        # script (corpus[int(pid)]) have them; the score map's keys are strings
        assert all(isinstance(x, int) for x in [line["qid"], *line["pos"], *line["neg"][system]])
        assert set(line["ce_scores"]) == {str(x) for x in line["pos"] + line["neg"][system]}
    pools = pq.read_table(folder / "pools.parquet")
    assert pools.column_names == ["qid", "pid", "role", "ce_score", "system", "rank"]
    negs = pools.filter(pa.compute.equal(pools.column("role"), "neg"))
    assert negs.num_rows == sum(len(x["neg"][system]) for x in lines)
    assert set(negs.column("system").to_pylist()) == {system}
    assert min(negs.column("rank").to_pylist()) >= 1
    triplets = datasets.load_from_disk(str(folder / "triplets"))
    assert triplets.column_names == ["query", "positive", "negative"] and len(triplets) == 24
    report = json.loads((folder / "report.json").read_text())
    assert report["queries"]["kept"] == 24 and report["negatives"]["total"] == negs.num_rows
    assert set(report["ce_scores"]) == {"positives", "kept", "rejected"}
    assert (folder / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert read_manifest(folder)["counts"]["triplets"] == 24
    # the negatives' scores are the score stage's logits
    scores = pq.read_table(next((chain["root"] / "score").glob("*/scores.parquet"))).to_pydict()
    logit = {(q, p): s for q, p, s in zip(scores["qid"], scores["pid"], scores["ce_score"])}
    first = lines[0]
    for pid, value in first["ce_scores"].items():
        assert value == pytest.approx(logit[(str(first["qid"]), pid)], abs=0)


def test_triplets_train_one_step(chain, tmp_path):
    import datasets
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # older layout
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    triplets = datasets.load_from_disk(str(chain["folder"] / "triplets"))
    model = SentenceTransformer(str(chain["cfg"].model.bi_encoder), device="cpu")
    before = next(model.parameters()).detach().clone()
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1,
                                                per_device_train_batch_size=8, learning_rate=1e-3, use_cpu=True,
                                                report_to="none", save_strategy="no", logging_strategy="no")
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=triplets,
                                         loss=MultipleNegativesRankingLoss(model))
    trainer.train()
    assert trainer.state.global_step == 1
    assert not np.allclose(before.numpy(), next(model.parameters()).detach().numpy())


def test_extra_system_from_a_retrieve_folder(chain):
    """A second retrieval (another top_k, so another key) as an extra system: its pairs are scored through
    score.candidates, reusing the pair cache for every pair the first system already had."""
    from pipeline.artifacts import read_manifest
    from pipeline.config import compose
    from pipeline.stages import mine, retrieve, score

    other = compose([*chain["overrides"], "retrieve.top_k=15", "retrieve.query_block=7"])
    other_dir = retrieve.run(other)
    cfg = compose([*chain["overrides"], f"score.candidates={other_dir}"])
    sdir = score.run(cfg)
    counts = read_manifest(sdir)["counts"]
    assert counts["pairs_scored"] < counts["pairs"] and counts["pairs_from_cache"] > 0
    folder = mine.run(compose([*chain["overrides"], f"mine.systems=['second={other_dir}']"]))
    lines = [json.loads(x) for x in (folder / "hard_negatives.jsonl").read_text().splitlines()]
    first_sys = chain["cfg"].model.name
    for line in lines:
        a, b = line["neg"].get(first_sys, []), line["neg"].get("second", [])
        assert len(a) == 3 and len(b) <= 3 and not set(a) & set(b)


def test_a_later_round_of_the_chain_finds_the_extra_systems_of_the_first(chain):
    """iterations=2 with a bi-encoder spec in mine.systems: round 2 runs under model.name <name>-it2, which the
    extra system's score key held (through its retrieve folder's name), so round 2's mine asked for results no
    command makes (its message named the ones that made round 1's). Each round now pools the same extra results."""
    from pipeline.config import compose
    from pipeline.stages import all as chain_stage
    from pipeline.stages import mine

    spec = str(chain["cfg"].model.bi_encoder) + "/"  # the same model under another spelling: its results exist
    cfg = compose([*chain["overrides"], f"mine.systems=['second={spec}']"])
    first = mine.systems(cfg)[1]
    assert first.score_dir is not None
    round2 = chain_stage.iteration_config(cfg, 2, "round1/model", str(cfg.model.cross_encoder))
    again = mine.systems(round2, strict=False)[1]
    assert (again.name, again.score_key, again.score_dir) == ("second", first.score_key, first.score_dir)


def test_an_extra_system_is_judged_by_the_teacher_that_judges_the_first(tmp_path, demo_stage_overrides):
    """Without a given cross-encoder, an extra system's score key (and the message naming the commands to make it)
    asked for a teacher of its own, trained on its own candidates: two judges whose logits the rules compared."""
    from pipeline.artifacts import MANIFEST, MARKER
    from pipeline.config import compose
    from pipeline.stages import common, mine, score

    cfg = compose([f"artifacts_root={tmp_path}", *demo_stage_overrides(max_queries=4, top_k=5, cross_encoder=False),
                   "mine.systems=['second=owner/other']"])
    teacher = common.stage_dir(cfg, "teacher")  # a complete teacher, as the chain leaves it before mine
    (teacher / "model").mkdir(parents=True)
    (teacher / "model" / "config.json").write_text("{}")
    (teacher / MANIFEST).write_text("{}")
    (teacher / MARKER).write_text("done\n")
    ((name, extra, how),) = mine._extra_entries(cfg)
    assert score.identity(extra)["cross_encoder"] == score.identity(cfg)["cross_encoder"]
    assert how.endswith(f"stage=score model.bi_encoder=owner/other model.cross_encoder={teacher / 'model'} "
                        "teacher.enabled=false")


def test_only_decimal_integer_ids_become_json_integers():
    from pipeline.stages import mine

    assert mine._decimal_ids(pa.array(["0", "7349777", "571018"]))
    for other in (["1", "doc1"], ["1", "007"], ["1", "-3"], ["1", "1e3"], ["1", "99999999999999999999"]):
        assert not mine._decimal_ids(pa.array(other)), other  # BEIR ids, or ones int() would not write back


def test_missing_extra_system_is_clear(chain):
    from pipeline.artifacts import StageError
    from pipeline.config import compose
    from pipeline.stages import mine

    with pytest.raises(StageError, match="run stage=retrieve model.bi_encoder=nowhere/model"):
        mine.run(compose([*chain["overrides"], "mine.systems=[nowhere/model]"]))


@pytest.mark.skipif(os.environ.get("PIPELINE_SKIP_CLI_TESTS") == "1", reason="CLI tests disabled")
def test_no_query_kept_is_a_clear_cli_error(chain):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipeline", "stage=mine", *chain["overrides"],
                           "mine.rank_min=1", "mine.rank_max=1", "mine.exclude_positives=true",
                           "mine.ce_max_score=0.0"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
                          check=False)
    assert proc.returncode == 2
    assert "no query kept any negative" in proc.stderr + proc.stdout
    # the hint names the rule that rejects the most on its own (a ceiling of 0 rejects all), not a fixed one
    assert "Loosen mine.ce_max_score (it alone rejects" in proc.stderr + proc.stdout


def test_whole_corpus_text_hashes_are_cached(chain):
    from pipeline.stages import common
    from pipeline.stages.mine import corpus_text_hashes, passage_text_hashes

    cfg = chain["cfg"]
    corpus = common.load_corpus(cfg)
    rows = np.arange(len(corpus) - 1, -1, -1)
    got = passage_text_hashes(cfg, corpus, rows)  # most of the corpus: hashed whole, once, then cached
    cached = list((Path(str(cfg.cache_root)) / "text_hash").glob(f"{corpus.fingerprint}-*.npy"))
    assert len(cached) == 1
    assert np.array_equal(got, corpus_text_hashes(corpus, rows))
    assert np.array_equal(passage_text_hashes(cfg, corpus, rows[:5]), got[:5])


def test_the_mine_key_follows_the_scores_it_reads(tmp_path):
    # re-scoring (another cross-encoder length, another v2) under the same names must not return the old negatives
    from pipeline.artifacts import config_key
    from pipeline.config import compose
    from pipeline.stages import mine

    def key(*overrides):
        return config_key(mine.identity(compose(["experiment=demo", f"artifacts_root={tmp_path}", *overrides])))

    assert key() == key()
    assert key("score.max_length=32") != key() and key("retrieve.top_k=7") != key()
