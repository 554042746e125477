#!/usr/bin/env python
"""Where the time of encode / score / search / training goes on a GPU (issue 8): a diagnostic, not the benchmark.

For each engine row it separates the host side (tokenisation, collation) from the device side (forward passes over
pre-built device batches), and profiles one forward pass by kernel class (GEMM, attention, elementwise). For search
it times one score block's GEMM and each top-k strategy. For training it times steps of the stage's trainer.
Same requirements as ``scripts/bench_gpu.py`` (torch, transformers, sentence-transformers, numpy). Usage:

    python scripts/profile_gpu.py --data DIR --minilm DIR [--out profile.json] [--rows encode,score,search,train]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu as B  # noqa: E402  (same data readers, models and FLOP counts)

from pipeline import engine as E  # noqa: E402
from pipeline import search as S  # noqa: E402

log = B.log


def kernel_classes(prof) -> dict[str, float]:
    """CUDA time (ms) per kernel class from a torch.profiler run."""
    out: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0) or 0
        if not t or ev.key.startswith("aten::") or ev.key.startswith("cuda"):
            continue
        k = ev.key.lower()
        if any(s in k for s in ("gemm", "sm90_xmma", "cutlass", "cublas", "nvjet", "matmul")):
            cls = "gemm"
        elif "flash" in k or "fmha" in k or "attention" in k:
            cls = "attention"
        elif "layer_norm" in k or "layernorm" in k:
            cls = "layernorm"
        elif "gelu" in k:
            cls = "gelu"
        elif "index" in k or "scatter" in k or "gather" in k:
            cls = "index"
        elif "copy" in k or "memcpy" in k or "memset" in k or "fill" in k:
            cls = "copy/fill"
        else:
            cls = "elementwise/other"
        out[cls] += t / 1e3
    return dict(out)


def host_and_device(bench, kind: str, model, hf, items, post, flops_fn, bt: int, mb: int) -> dict:
    dev = bench.dev
    res: dict = {}
    # 1. tokenisation alone (the engine's own tokenizer, one chunk)
    runner = E._Runner(kind, model, hf, items, prompt=None, batch_tokens=bt, max_batch=mb, precision="auto",
                       show_progress=False, desc=kind, attention="auto", chunk=65536, post=post)
    tok = runner.tokenizer
    sample = items[:65536]
    t = time.perf_counter()
    toks = tok(sample)
    res["tokenize_items_per_s"] = len(sample) / (time.perf_counter() - t)
    if tok.backend is not None:
        prepped = tok._prep_inputs(sample)
        t = time.perf_counter()
        encs = tok._encode(prepped, add_special_tokens=True)
        res["rust_encode_items_per_s"] = len(sample) / (time.perf_counter() - t)
        del encs
    # 2. collation alone
    lens = toks.lengths
    order = np.argsort(-lens, kind="stable")
    packed = runner.cfg["packed"]
    bounds = E.token_budget_batches(lens[order], bt, mb, packed=packed)
    t = time.perf_counter()
    batches = []
    for a, b in bounds:
        sel = order[a:b]
        Bn, L, T, tensors = E.collate(toks, sel, runner.prep.pos_offset, packed, runner.cfg["pad_id"],
                                      runner.cfg["want_tt"], pin=runner.cfg["pin"])
        tensors["local_idx"] = torch.from_numpy(np.ascontiguousarray(sel))
        batches.append(E._Batch(sel, 0, Bn, L, T, packed, tensors))
    res["collate_items_per_s"] = len(sample) / (time.perf_counter() - t)
    res["batches"] = len(batches)
    res["packed"] = packed
    # 3. device only: batches already on the device
    dbatches = [E._Batch(b.local_idx, 0, b.B, b.L, b.T, b.packed, E._to_device(b.tensors, dev)) for b in batches]
    with torch.inference_mode():
        for b in dbatches[:3]:
            post(*E._hf_forward(runner.prep, b, b.tensors), b)
        B.sync(dev)
        t = time.perf_counter()
        for b in dbatches:
            post(*E._hf_forward(runner.prep, b, b.tensors), b)
        B.sync(dev)
        dt = time.perf_counter() - t
    res["device_only_items_per_s"] = len(sample) / dt
    res["device_only_mfu"] = flops_fn(toks) / dt / bench.peak if bench.peak else None
    # host overhead: the same loop without waiting for the device (launch-bound if close to device time)
    with torch.inference_mode():
        B.sync(dev)
        t = time.perf_counter()
        for b in dbatches:
            post(*E._hf_forward(runner.prep, b, b.tensors), b)
        res["launch_loop_s"] = time.perf_counter() - t
        B.sync(dev)
        res["device_loop_s"] = dt
    # 4. one forward pass by kernel class
    from torch.profiler import ProfilerActivity, profile

    if dev.type != "cuda":
        return res

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for b in dbatches[:4]:
            post(*E._hf_forward(runner.prep, b, b.tensors), b)
        B.sync(dev)
    res["kernel_ms_4_batches"] = kernel_classes(prof)
    res["top_kernels"] = [(ev.key[:90], round((getattr(ev, "device_time_total", 0) or 0) / 1e3, 3))
                          for ev in sorted(prof.key_averages(), key=lambda e: -(getattr(e, "device_time_total", 0) or 0))
                          if not ev.key.startswith("aten::")][:14]
    del dbatches, batches
    # 5. the whole engine call
    fn = E.encode_texts if kind == "texts" else E.score_pairs
    fn(model, items[:4096], batch_tokens=bt, max_batch=mb, show_progress=False)
    _, dt = B.timed(dev, fn, model, items, batch_tokens=bt, max_batch=mb, show_progress=False)
    res["engine_items_per_s"] = len(items) / dt
    res["engine_last_run"] = dict(E.LAST_RUN)
    return res


def row_encode(bench) -> dict:
    model, cfg = bench.build_distilbert()
    hf = model[0].auto_model
    P = B.nonemb_params(hf)
    items = bench.passages * 4

    def flops(toks):
        lens = toks.lengths.astype(np.float64)
        return B.model_flops(P, cfg.n_layers, cfg.dim, float(lens.sum()), float((lens**2).sum()))

    out = host_and_device(bench, "texts", model, hf, items, E._st_post(model, None), flops, 65536, 2048)
    del model
    bench.free()
    return out


def row_score(bench) -> dict:
    ce, cfg = bench.build_electra()
    P = B.nonemb_params(ce.model)
    items = bench.pairs(2 * len(bench.passages))

    def flops(toks):
        lens = toks.lengths.astype(np.float64)
        return B.model_flops(P, cfg.num_hidden_layers, cfg.hidden_size, float(lens.sum()), float((lens**2).sum()))

    out = host_and_device(bench, "pairs", ce, ce.model, items, E._ce_post(ce), flops, 65536, 2048)
    del ce
    bench.free()
    return out


def row_search(bench) -> dict:
    dev = bench.dev
    d, k = 768, 100
    res: dict = {}
    g = torch.Generator(device=dev).manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn((1 << 20, d), generator=g, device=dev), dim=1).half()
    for qb in (4096, 8192):
        Q = torch.nn.functional.normalize(torch.randn((qb, d), generator=g, device=dev), dim=1).half()
        C = corpus[: 262144]

        def t_of(fn, reps=5):
            fn()
            B.sync(dev)
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            B.sync(dev)
            return (time.perf_counter() - t) / reps * 1e3

        Sb = Q @ C.T
        r = {"gemm_ms": t_of(lambda: Q @ C.T)}
        for grp in (64, 128, 256):
            r[f"grouped{grp}_ms"] = t_of(lambda: S._topk_grouped(Sb, 108, grp))
        thr = S._topk_grouped(Sb, 108)[0][:, -1].float()
        for grp in (64, 128, 256):
            r[f"pruned{grp}_ms"] = t_of(lambda: S._topk_pruned(Sb, 108, thr, grp))
        r["amax64_ms"] = t_of(lambda: Sb.view(qb, -1, 64).amax(dim=2))
        r["topk_ms"] = t_of(lambda: torch.topk(Sb, 108, dim=1))
        bs = torch.full((qb, 108), float("-inf"), device=dev)
        bi = torch.zeros((qb, 108), dtype=torch.int64, device=dev)
        v, i = S._topk_grouped(Sb, 108)
        r["merge_ms"] = t_of(lambda: S._merge(bs, bi, v.float(), i, 108))
        res[f"qblock{qb}"] = r
        Sb = Q = None  # free the score block before the next size (lambdas above close over these names)
    # whole search over a 2M corpus, each method
    corpus2 = torch.cat([corpus, corpus.flip(0)])
    Q = torch.nn.functional.normalize(torch.randn((16384, d), generator=g, device=dev), dim=1)
    for meth in ("grouped", "pruned"):
        for qc in (4096, 8192):
            S.exact_search(Q[:1024], corpus2, k, show_progress=False, topk_method=meth, query_chunk=qc)
            _, dt = B.timed(dev, S.exact_search, Q, corpus2, k, show_progress=False, topk_method=meth, query_chunk=qc)
            res[f"search_2M_{meth}_q{qc}_qps"] = 16384 / dt * (corpus2.shape[0] / 8_841_823)
    return res


def row_train(bench) -> dict:
    import datasets
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    from pipeline.stages import train as T

    rng = np.random.default_rng(0)
    batch, steps = 64, 40
    n = batch * (steps + 4)
    ds = datasets.Dataset.from_dict({
        "query": [bench.queries[i % len(bench.queries)] + f" {i}" for i in range(n)],
        "positive": [bench.passages[j] for j in rng.integers(0, len(bench.passages), n)],
        "negative": [bench.passages[j] for j in rng.integers(0, len(bench.passages), n)],
    })
    res: dict = {}
    dev = bench.dev

    class Clock(TrainerCallback):
        def __init__(self):
            self.stamps = {}

        def on_step_end(self, args, state, control, **kw):
            B.sync(dev)
            self.stamps[state.global_step] = time.perf_counter()

    variants = ["st_default_bf16", "stage_make_trainer"]
    for name in variants:
        model, _ = bench.build_distilbert()
        out = bench.tmp / f"tr_{name}"
        if name == "stage_make_trainer":
            trainer = T.make_trainer(model, ds, block_size=len(ds), output_dir=str(out), batch_size=batch,
                                     warmup_steps=0, precision="bf16", device=str(dev), max_steps=steps,
                                     save_steps=10**9, logging_steps=10**9, dataloader_workers="auto")
        else:
            args = SentenceTransformerTrainingArguments(
                output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, bf16=True,
                report_to=[], save_strategy="no", logging_steps=10**9, learning_rate=2e-5, warmup_steps=0,
                batch_sampler="no_duplicates")
            trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=T.mnrl_loss(model))
        clock = Clock()
        trainer.add_callback(clock)
        t = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t
        st = clock.stamps
        w = 10
        res[name] = {"steady_triplets_per_s": batch * (max(st) - w) / (st[max(st)] - st[w]), "wall_s": wall}
        if name == "st_default_bf16":
            from torch.profiler import ProfilerActivity, profile

            loss = T.mnrl_loss(model)
            feats = []
            for col in ("query", "positive", "negative"):
                f = model.tokenize(ds[col][:batch])
                feats.append({k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in f.items()})
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    lv = loss(feats, None)
                lv.backward()
                opt.step()
                opt.zero_grad()

            for _ in range(3):
                step()
            B.sync(dev)
            t = time.perf_counter()
            for _ in range(10):
                step()
            B.sync(dev)
            res["bare_loop_triplets_per_s"] = 10 * batch / (time.perf_counter() - t)
            res["padded_tokens_per_step"] = sum(int(f["input_ids"].numel()) for f in feats)
            res["real_tokens_per_step"] = sum(int(f["attention_mask"].sum()) for f in feats)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                B.sync(dev)
            res["kernel_ms_1_step"] = kernel_classes(prof)
        log(f"  train {name}: {res[name]}")
        del model, trainer
        bench.free()
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--minilm", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", default="encode,score,search,train")
    ap.add_argument("--limit", type=int, default=None, help="use the first N passages only (smoke runs)")
    a = ap.parse_args()
    args = argparse.Namespace(quick=False, device="auto", data=a.data, minilm=a.minilm, budget_s=600.0)
    bench = B.Bench(args)
    if a.limit:
        bench.passages = bench.passages[: a.limit]
    try:
        return _rows(bench, a)
    finally:
        bench.close()


def _rows(bench, a) -> int:
    result: dict = {"env": bench.results["env"]}
    for row in a.rows.split(","):
        t = time.perf_counter()
        try:
            result[row] = {"encode": row_encode, "score": row_score, "search": row_search, "train": row_train}[row](bench)
        except Exception as exc:  # keep going
            import traceback

            traceback.print_exc()
            result[row] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"[{row}] {time.perf_counter() - t:.0f}s\n" + json.dumps(result[row], indent=1, default=str)[:4000])
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
