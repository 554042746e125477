"""pipeline.search: exact top-k against numpy brute force, memmaps, ties, faiss parity (CPU)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline import search as S  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _brute(q: np.ndarray, c: np.ndarray, k: int):
    """Reference: float64 scores, order by score desc then index asc."""
    sc = q.astype(np.float64) @ c.astype(np.float64).T
    k = min(k, c.shape[0])
    idx = np.lexsort((np.broadcast_to(np.arange(c.shape[0]), sc.shape), -sc), axis=1)[:, :k]
    return np.take_along_axis(sc, idx, 1), idx


def _unit(rng, n, d, dtype=np.float32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype)


@pytest.mark.parametrize("corpus_chunk,query_chunk", [(1000, 64), (97, 13), (30, 7)])
def test_exact_equals_bruteforce_across_chunk_boundaries(corpus_chunk, query_chunk):
    rng = np.random.default_rng(1)
    c = _unit(rng, 1000, 32)
    q = _unit(rng, 50, 32)
    ref_s, ref_i = _brute(q, c, 20)
    s, i = S.exact_search(q, c, 20, device="cpu", corpus_chunk=corpus_chunk, query_chunk=query_chunk,
                          show_progress=False)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == (50, 20)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    assert (np.diff(s, axis=1) <= 1e-7).all()


def test_k_larger_than_chunk_and_corpus():
    rng = np.random.default_rng(2)
    c = _unit(rng, 300, 16)
    q = _unit(rng, 9, 16)
    ref_s, ref_i = _brute(q, c, 120)
    s, i = S.exact_search(q, c, 120, device="cpu", corpus_chunk=50, query_chunk=4, show_progress=False)
    np.testing.assert_array_equal(i, ref_i)
    s, i = S.exact_search(q, c, 1000, device="cpu", corpus_chunk=64, show_progress=False)
    assert s.shape == (9, 300)  # k clamps to the corpus size
    np.testing.assert_array_equal(i, _brute(q, c, 300)[1])


def test_ties_break_by_lower_index():
    rng = np.random.default_rng(3)
    # small integers: every dot product is exact in fp32 whatever the GEMM blocking, so equal means equal
    base = rng.integers(-3, 4, size=(40, 8)).astype(np.float32)
    c = np.repeat(base, 5, axis=0)  # every vector five times: ties everywhere, across chunk boundaries
    rng.shuffle(c)
    q = rng.integers(-2, 3, size=(12, 8)).astype(np.float32)
    q[0] = 0.0  # all scores equal: must return indices 0..k-1
    for cc in (7, 33, 200):
        s, i = S.exact_search(q, c, 13, device="cpu", corpus_chunk=cc, query_chunk=5, show_progress=False)
        ref_s, ref_i = _brute(q, c, 13)
        # scores equal up to float rounding; indices must follow the (score desc, index asc) order of ties
        np.testing.assert_allclose(s, ref_s, atol=1e-5)
        np.testing.assert_array_equal(i[0], np.arange(13))
        np.testing.assert_array_equal(i, ref_i)  # the boundary cuts groups of duplicates: lowest indices kept
        for r in range(len(q)):
            same = s[r][1:] == s[r][:-1]  # among equal scores the indices ascend
            assert (np.diff(i[r])[same] > 0).all()


@pytest.mark.parametrize("group", [7, 64, 100])
def test_grouped_topk_is_exact(group):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 5000)).astype(np.float32)  # 5000 columns: a tail outside the groups too
    ng = 5000 // group
    x[0, np.arange(min(30, group)) * ng + 3] += 10.0  # row 0: as much of the top 30 as fits in one strided group
    x[1, -20:] += 10.0  # row 1: most of it in the tail
    x = torch.from_numpy(x)
    v, i = S._topk_grouped(x, 30, group=group)
    rv, ri = torch.topk(x, 30, dim=1)
    torch.testing.assert_close(v, rv)
    assert torch.equal(torch.sort(i, dim=1).values, torch.sort(ri, dim=1).values)
    torch.testing.assert_close(torch.gather(x, 1, i), v)  # the indices point at the values returned


def test_gpu_code_path_on_cpu():
    """The CUDA recipe (fp16 scores, grouped top-k, resident corpus, fp32 re-scoring) run on the CPU."""
    rng = np.random.default_rng(7)
    c = _unit(rng, 5000, 32, np.float16)
    q = _unit(rng, 40, 32)
    ref_s, ref_i = _brute(q, c.astype(np.float32), 10)
    s, i = S.exact_search(q, torch.from_numpy(c), 10, device="cpu", dtype="fp16", corpus_chunk=1500,
                          query_chunk=16, topk_method="grouped", rescore=True, show_progress=False)
    assert S.LAST_SEARCH["rescore"] and S.LAST_SEARCH["resident"]
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)


@pytest.mark.parametrize("method", ["grouped", "exact_ties"])
def test_merging_once_per_query_block_equals_merging_every_chunk(method):
    """The resident-corpus order (all chunks of a query block, one merge) gives the same top-k, ties included, as
    the running merge after every chunk, and both equal brute force."""
    rng = np.random.default_rng(11)
    c = _unit(rng, 3000, 16)
    c[1500:1510] = c[40]  # rows tied with row 40 in later chunks: the lower index must win in both orders
    q = np.concatenate([_unit(rng, 20, 16), c[40:41]])
    ref_s, ref_i = _brute(q, c, 15)
    out = {}
    for merge in ("once", "each"):
        out[merge] = S.exact_search(q, torch.from_numpy(c), 15, device="cpu", corpus_chunk=400, query_chunk=8,
                                    topk_method=method, merge=merge, show_progress=False)
        assert S.LAST_SEARCH["merge"] == merge and S.LAST_SEARCH["resident"]
        np.testing.assert_array_equal(out[merge][1], ref_i)
    np.testing.assert_array_equal(out["once"][0], out["each"][0])
    with pytest.raises(ValueError, match="merge"):
        S.exact_search(q, c, 3, device="cpu", merge="sometimes", show_progress=False)


@pytest.mark.parametrize("method", ["grouped", "exact_ties"])
def test_few_candidates_per_chunk_give_the_same_top_k(method):
    """chunk_keep: each chunk gives only its top 8; queries whose top k one chunk holds more of (a cluster of
    near copies in one chunk, ties across chunks) are searched again, so the result equals brute force and the
    full-keep search, scores and order included; queries spread over the chunks are not searched again."""
    rng = np.random.default_rng(12)
    c = _unit(rng, 4000, 16)
    c[900:912] = c[905] + 0.01 * _unit(rng, 12, 16)  # 12 near copies in the third 400-row chunk
    c[900:912] /= np.linalg.norm(c[900:912], axis=1, keepdims=True)
    c[2500:2509] = c[40]  # ties with row 40 in a later chunk: the lower index must win
    q = np.concatenate([_unit(rng, 30, 16), c[905:906], c[40:41]])
    ref_s, ref_i = _brute(q, c, 10)
    full = S.exact_search(q, torch.from_numpy(c), 10, device="cpu", corpus_chunk=400, query_chunk=8,
                          topk_method=method, merge="once", show_progress=False)
    assert S.LAST_SEARCH["queries_redone"] == 0
    s, i = S.exact_search(q, torch.from_numpy(c), 10, device="cpu", corpus_chunk=400, query_chunk=8,
                          topk_method=method, merge="once", chunk_keep=8, show_progress=False)
    assert S.LAST_SEARCH["chunk_keep"] == 8
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(i, full[1])
    np.testing.assert_array_equal(s, full[0])  # the re-search repeats the block's own GEMM: same rounding
    redone = S.LAST_SEARCH["queries_redone"]
    assert 2 <= redone < len(q) // 4  # the cluster's and the tie's queries at least; not every query
    # ten chunks cannot give the top 100 at 8 each: every chunk then keeps all it needs
    S.exact_search(q, torch.from_numpy(c), 100, device="cpu", corpus_chunk=400, topk_method=method, merge="once",
                   chunk_keep=8, show_progress=False)
    assert S.LAST_SEARCH["chunk_keep"] >= 100 and S.LAST_SEARCH["queries_redone"] == 0


def test_a_re_searched_query_keeps_the_order_of_equal_scores():
    """Rows 3 and 5 score the same for query 0 in exact arithmetic (one is a permutation of the other); a GEMM over
    a different number of queries sums in another order and can split them either way. The re-search that
    chunk_keep triggers must give the order of the search without it."""
    rng = np.random.default_rng(0)
    d = 64
    q = np.zeros((8, d), np.float32)
    q[0] = 1.0
    q[np.arange(1, 8), np.arange(1, 8)] = 1.0
    c = rng.standard_normal((64, d)).astype(np.float32) * 0.01
    a = np.abs(rng.standard_normal(d)).astype(np.float32)
    c[3], c[5], c[1] = a, a[rng.permutation(d)], 0.9 * a  # query 0's top 3 all in the first chunk: searched again
    for j in range(1, 8):  # queries 1-7 take their top 3 from three chunks: not searched again
        for m, r in enumerate((8 + j, 24 + j, 40 + j)):
            c[r, j], c[r, 0] = 100.0 + m, -(100.0 + m)
    kw = dict(device="cpu", corpus_chunk=8, query_chunk=8, merge="once", show_progress=False)
    full = S.exact_search(q, torch.from_numpy(c), 3, **kw)
    few = S.exact_search(q, torch.from_numpy(c), 3, chunk_keep=2, **kw)
    assert S.LAST_SEARCH["queries_redone"] == 1
    np.testing.assert_array_equal(few[1], full[1])
    np.testing.assert_array_equal(few[0], full[0])


def test_a_k_th_score_equal_to_a_chunk_cut_is_searched_again():
    """chunk_keep: chunk 0 ties four rows at 1.0 and keeps two; chunk 1 has one more 1.0 (row 4). The merged k-th
    score equals chunk 0's cut, so chunk 0 may hold more of the top k: the query must be searched again, or row 4
    takes the place of the lower row 2."""
    c = np.array([[1, 0]] * 4 + [[1, 0]] + [[0, 1]] * 3, np.float32)
    q = np.array([[1, 0]], np.float32)
    s, i = S.exact_search(q, torch.from_numpy(c), 3, device="cpu", corpus_chunk=4, merge="once", chunk_keep=2,
                          show_progress=False)
    assert S.LAST_SEARCH["merge"] == "once" and S.LAST_SEARCH["chunk_keep"] == 2
    assert S.LAST_SEARCH["queries_redone"] == 1
    assert i[0].tolist() == [0, 1, 2] and s[0].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("method", ["grouped", "pruned"])
def test_gpu_topk_methods_break_ties_at_rank_k_by_lower_index(method):
    """The per-chunk top-k of grouped/pruned picks an arbitrary subset of equal scores; keeping k + tie_margin
    candidates is what lets the merge choose the lower rows, as the CPU's exact top-k does. Each query has seven
    distinct top scores, then six rows tied at 3.0 inside one 1000-row chunk: rank k = 10 cuts through them."""
    rng = np.random.default_rng(10)
    n, nq, k = 3000, 6, 10
    c = rng.uniform(0, 2, (n, nq)).astype(np.float32)  # query j reads column j: every score is exact
    for j in range(nq):
        rows = 1000 * (j % 3) + rng.choice(1000, 13, replace=False)
        c[rows[:7], j] = np.arange(10, 3, -1)
        c[rows[7:], j] = 3.0
    q = np.eye(nq, dtype=np.float32)
    ref_s, ref_i = _brute(q, c, k)
    s, i = S.exact_search(q, c, k, device="cpu", corpus_chunk=1000, query_chunk=1, topk_method=method,
                          topk_group=8, show_progress=False)
    assert S.LAST_SEARCH["topk_method"] == method
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s.astype(np.float32))


def test_pruned_topk_falls_back_when_groups_outside_its_pick_beat_the_threshold():
    """_topk_pruned looks only at the kk groups with the largest maxima; when the kk-th maximum is above the running
    threshold, groups it skipped can still hold top-k rows and the row must be redone exactly. Here the first chunk
    scores low and the second holds 38 high rows, each in its own 8-column group (more than kk = 16 groups)."""
    rng = np.random.default_rng(13)
    c = (0.01 * rng.standard_normal((2000, 4))).astype(np.float32)
    c[1000 + 8 * np.arange(38), 0] = 1.0 + 0.01 * np.arange(38)
    q = np.array([[1, 0, 0, 0]], np.float32)
    thr = torch.full((1,), float(np.sort(c[:1000, 0])[-38]))  # what the running top-38 admits after chunk 0
    v, i = S._topk_pruned(torch.from_numpy(c[1000:] @ q[0])[None], 38, thr, group=8)
    assert sorted(i[0].tolist()) == (8 * np.arange(38)).tolist()
    ref_s, ref_i = _brute(q, c, 30)
    s, i = S.exact_search(q, c, 30, device="cpu", corpus_chunk=1000, topk_method="pruned", topk_group=8,
                          show_progress=False)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-6)


def test_fp16_resident_corpus_is_rescored_in_fp32_by_default():
    """rescore defaults on when the scores are computed in half precision over a resident corpus: the final
    candidates are scored again in fp32, so scores and order are those of an fp32 search of the same vectors (fp16
    scores are off by ~1e-4 and reorder near-equal neighbours). A streamed corpus is not rescored."""
    rng = np.random.default_rng(7)
    c = _unit(rng, 3000, 32, np.float16)
    q = _unit(rng, 40, 32)
    ref_s, ref_i = _brute(q, c.astype(np.float32), 10)
    s, i = S.exact_search(q, torch.from_numpy(c), 10, device="cpu", dtype="fp16", corpus_chunk=1000,
                          query_chunk=16, topk_method="grouped", show_progress=False)
    assert S.LAST_SEARCH["rescore"] and S.LAST_SEARCH["resident"] and S.LAST_SEARCH["dtype"] == "float16"
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-6)
    S.exact_search(q, c, 10, device="cpu", dtype="fp16", corpus_chunk=1000, topk_method="grouped",
                   show_progress=False)
    assert not S.LAST_SEARCH["rescore"] and not S.LAST_SEARCH["resident"]


def test_copy_on_write_memmap_is_searched_as_edited(tmp_path):
    """A corpus opened copy-on-write (mode "c") and edited in memory: releasing its pages after a chunk would
    discard the edits (the search would see the file, and so would the caller afterwards)."""
    np.save(tmp_path / "emb.npy", np.ones((4096, 64), np.float16))
    mm = np.load(tmp_path / "emb.npy", mmap_mode="c")
    mm[:] = 0
    mm[2000] = 1
    s, i = S.exact_search(np.ones((1, 64), np.float32), mm, 3, device="cpu", corpus_chunk=1024, show_progress=False)
    assert i[0].tolist() == [2000, 0, 1] and s[0].tolist() == [64.0, 0.0, 0.0]
    assert float(mm.astype(np.float32).sum()) == 64.0


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_a_memmap_slice_releases_its_own_pages(tmp_path):
    """A slice of a memmap carries its parent's ``offset``: the pages released after each chunk must be the
    slice's, or a corpus larger than RAM stays resident as it is read (here +25 MB of 25)."""
    n, d = 200_000, 64  # 25.6 MB of float16
    path = tmp_path / "big.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(n, d))
    mm[:] = 0.01
    mm.flush()
    del mm
    ro = np.memmap(path, dtype=np.float16, mode="r", shape=(n, d))
    before = _rss_file_kb()
    S.exact_search(np.ones((1, d), np.float32), ro[n // 2:], 3, device="cpu", show_progress=False)
    assert _rss_file_kb() - before < 4096


def test_a_failing_search_stops_its_reader_thread(monkeypatch):
    """The thread that reads a streamed corpus ahead must end when the search fails with its queue full, not
    stay blocked holding (on CUDA: pinned) chunks: four chunks, the second fails, the last two and the end mark
    are still to be queued."""
    import threading
    import time

    calls = []
    real = S._candidates

    def fail_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*a, **kw)

    monkeypatch.setattr(S, "_candidates", fail_second)
    c = np.random.default_rng(0).standard_normal((4000, 8)).astype(np.float32)
    threads = threading.active_count()
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="out of memory"):
        S.exact_search(np.ones((3, 8), np.float32), c, 3, device="cpu", corpus_chunk=1000, show_progress=False)
    assert time.perf_counter() - t0 < 2.0  # not the 5 s join timeout
    assert threading.active_count() == threads


@pytest.mark.parametrize("method", ["grouped", "pruned", "topk"])
def test_gpu_topk_methods_exact(monkeypatch, method):
    monkeypatch.setattr(S, "_GROUP", 8)
    rng = np.random.default_rng(8)
    c = _unit(rng, 6000, 16)
    q = _unit(rng, 33, 16)
    ref_s, ref_i = _brute(q, c, 12)
    s, i = S.exact_search(q, c, 12, device="cpu", corpus_chunk=1000, query_chunk=8, topk_method=method,
                          show_progress=False)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)


def test_pruned_search_uses_the_group_size_it_is_given(monkeypatch):
    """topk_group reaches the pruned method's selections (it once fell back to the module's default size)."""
    seen = []
    grouped, pruned = S._topk_grouped, S._topk_pruned
    monkeypatch.setattr(S, "_topk_grouped", lambda M, k, group=S._GROUP: seen.append(group) or grouped(M, k, group))
    monkeypatch.setattr(S, "_topk_pruned", lambda M, k, thr, group=None: seen.append(group) or pruned(M, k, thr, group))
    rng = np.random.default_rng(9)
    c, q = _unit(rng, 4000, 16), _unit(rng, 10, 16)
    s, i = S.exact_search(q, c, 5, device="cpu", corpus_chunk=1000, query_chunk=8, topk_method="pruned",
                          topk_group=7, show_progress=False)
    assert len(seen) >= 4 and set(seen) == {7}  # first chunk (grouped) and later chunks (pruned), every block
    np.testing.assert_array_equal(i, _brute(q, c, 5)[1])


def test_float16_memmap_and_torch_input(tmp_path):
    rng = np.random.default_rng(5)
    c = _unit(rng, 2000, 24, np.float16)
    path = tmp_path / "emb.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=c.shape)
    mm[:] = c
    mm.flush()
    ro = np.memmap(path, dtype=np.float16, mode="r", shape=c.shape)
    q = _unit(rng, 30, 24)
    ref_s, ref_i = _brute(q, c.astype(np.float32), 10)
    s, i = S.exact_search(q, ro, 10, device="cpu", corpus_chunk=300, show_progress=False)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    s2, i2 = S.search(torch.from_numpy(q), ro, 10, backend="torch", device="cpu", show_progress=False)
    np.testing.assert_array_equal(i2, ref_i)


def test_empty_inputs():
    s, i = S.exact_search(np.zeros((0, 4), np.float32), np.ones((5, 4), np.float32), 3, device="cpu",
                          show_progress=False)
    assert s.shape == (0, 3) and i.shape == (0, 3)


def test_faiss_flat_equals_torch():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(6)
    c = _unit(rng, 3000, 32)
    q = _unit(rng, 40, 32)
    s, i = S.exact_search(q, c, 15, device="cpu", corpus_chunk=700, show_progress=False)
    fs, fi = S.search(q, c, 15, backend="faiss_flat", use_gpu=False)
    np.testing.assert_array_equal(fi, i)
    np.testing.assert_allclose(fs, s, atol=1e-5)
    vs, vi = S.search(q, c, 15, backend="faiss_ivf", nlist=16, nprobe=16, use_gpu=False)  # all lists: exact
    np.testing.assert_array_equal(vi, i)


def test_faiss_flat_orders_tied_documents_like_torch():
    """Exact duplicate passages score the same: faiss returns them in its own order, and the run must not depend on
    the backend, so faiss_flat orders ties by lower corpus index as the torch backend does (k = the corpus size:
    every tie is inside the results)."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    base = rng.integers(-3, 4, size=(40, 8)).astype(np.float32)  # small integers: equal scores are exactly equal
    c = np.repeat(base, 5, axis=0)
    rng.shuffle(c)
    q = rng.integers(-2, 3, size=(30, 8)).astype(np.float32)
    s, i = S.exact_search(q, c, len(c), device="cpu", corpus_chunk=64, show_progress=False)
    fs, fi = S.search(q, c, len(c), backend="faiss_flat", use_gpu=False)
    np.testing.assert_array_equal(fs, s)
    np.testing.assert_array_equal(fi, i)
    lowest = float(np.finfo(np.float32).min)  # what faiss returns beside a missing result (-1)
    d, idx = S._sort_rows(np.array([[1.0, 2.0, lowest, 2.0, 1.0]], np.float32), np.array([[7, 9, -1, 4, 0]]))
    assert idx.tolist() == [[4, 9, 0, 7, -1]] and d.tolist() == [[2.0, 2.0, 1.0, 1.0, lowest]]


def test_faiss_flat_keeps_the_lower_rows_of_ties_at_rank_k():
    """faiss keeps an arbitrary subset of the documents tied at rank k (here the higher rows): faiss_flat must keep
    the same documents as the torch backend, or the run depends on the backend. Six rows tie at ranks 8-13, k = 10;
    24 queries take faiss's BLAS path, 6 its direct one."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(21)
    n, nq, k = 2000, 6, 10
    c = rng.uniform(0, 2, (n, nq)).astype(np.float32)  # query j reads column j: every score is exact
    for j in range(nq):
        rows = rng.choice(n, 13, replace=False)
        c[rows[:7], j] = np.arange(10, 3, -1)
        c[rows[7:], j] = 3.0
    for q in (np.eye(nq, dtype=np.float32), np.tile(np.eye(nq, dtype=np.float32), (4, 1))):
        s, i = S.exact_search(q, c, k, device="cpu", show_progress=False)
        fs, fi = S.search(q, c, k, backend="faiss_flat", use_gpu=False)
        assert fs.shape == (len(q), k)
        np.testing.assert_array_equal(fi, i)
        np.testing.assert_array_equal(fs, s)


def test_unknown_backend():
    with pytest.raises(ValueError):
        S.search(np.zeros((1, 2), np.float32), np.zeros((3, 2), np.float32), 1, backend="annoy")


@pytest.mark.slow
def test_memmap_1m_x_768_stays_under_4gb(tmp_path):
    """A 1M x 768 float16 memmap (1.5 GB) searched on the CPU keeps the process under 4 GB resident."""
    code = textwrap.dedent(
        f"""
        import resource, sys, numpy as np
        sys.path.insert(0, {str(REPO)!r})
        from pipeline.search import exact_search
        n, d = 1_000_000, 768
        mm = np.memmap({str(tmp_path / 'big.f16')!r}, dtype=np.float16, mode='w+', shape=(n, d))
        rng = np.random.default_rng(0)
        for a in range(0, n, 100_000):
            x = rng.standard_normal((100_000, d), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            mm[a:a + 100_000] = x
        mm.flush(); del mm
        ro = np.memmap({str(tmp_path / 'big.f16')!r}, dtype=np.float16, mode='r', shape=(n, d))
        q = np.asarray(ro[123_456:123_456 + 64], dtype=np.float32)
        s, i = exact_search(q, ro, 10, device='cpu', show_progress=False)
        assert (i[:, 0] == np.arange(123_456, 123_456 + 64)).all()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    maxrss_kb = int(proc.stdout.strip().splitlines()[-1])
    assert maxrss_kb < 4 * 2**20, maxrss_kb


def test_bench_probe_names_reach_exact_search():
    """scripts/bench_gpu.py's search probes are named; each name must mean the exact_search keywords it claims."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_gpu import topk_kw

    assert topk_kw("grouped32") == {"topk_method": "grouped", "topk_group": 32}
    assert topk_kw("grouped32-each") == {"topk_method": "grouped", "topk_group": 32, "merge": "each"}
    assert topk_kw("fused32/16@q8192") == {"topk_method": "fused", "topk_group": 32, "chunk_keep": 16,
                                           "query_chunk": 8192}
    assert topk_kw("grouped16/16@c524288") == {"topk_method": "grouped", "topk_group": 16, "chunk_keep": 16,
                                               "corpus_chunk": 524288}
    assert topk_kw("topk") == {"topk_method": "topk"}
    rng = np.random.default_rng(4)
    c, q = _unit(rng, 3000, 16), _unit(rng, 9, 16)
    s, i = S.exact_search(q, torch.from_numpy(c), 5, device="cpu", corpus_chunk=500, show_progress=False,
                          **topk_kw("grouped8/4"))
    assert S.LAST_SEARCH["chunk_keep"] == 4 and S.LAST_SEARCH["topk_method"] == "grouped"
    np.testing.assert_array_equal(i, _brute(q, c, 5)[1])
