#!/usr/bin/env python
"""Is the cross-encoder good enough to filter negatives? Rerank the v2 bi-encoder's top-k on every eval set of
the data with the experiment's cross-encoder (the teacher the pipeline trained, or model.cross_encoder) and
compare with v2's own ranking. A filter driven by a cross-encoder that reranks worse than v2 removes candidates
at random; the mining-rule ablation then shows no gain from it.

    python scripts/eval_teacher.py experiment=cranfield [more overrides] [--depth 30]

Runs (or reuses) the v2 evaluation; needs the teacher stage complete when no cross-encoder is configured.
Prints one line per eval set and measure: v2 and "v2 top-k reranked by the cross-encoder".
"""

from __future__ import annotations

import argparse
import json

from pipeline.config import compose


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=cranfield")
    parser.add_argument("--depth", type=int, default=30, help="v2 candidates reranked per query")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    from pipeline import metrics
    from pipeline.cli import apply_cpu_threads
    from pipeline.engine import score_pairs
    from pipeline.models import load_cross_encoder, resolve_device
    from pipeline.readers import read_qrels, read_queries, read_run
    from pipeline.stages import common, evaluate, score

    cfg = compose([*args.overrides, "stage=evaluate"])
    apply_cpu_threads(cfg)
    v2 = evaluate.evaluate_system(cfg, "v2", str(cfg.model.bi_encoder), str(cfg.model.similarity))
    ce_spec = score.cross_encoder_spec(cfg)  # the cross-encoder the score stage uses
    ce = load_cross_encoder(ce_spec, device=resolve_device(str(cfg.device)),
                            artifacts_root=str(common.artifacts_root(cfg)), max_length=int(cfg.score.max_length))
    corpus = common.load_corpus(cfg)
    report = {"cross_encoder": ce_spec, "depth": args.depth, "evals": {}}
    for name, ev in cfg.data.evals.items():
        run = read_run(f"{v2['path']}/runs/{name}.trec")
        qrels = read_qrels(str(ev.qrels))
        queries = read_queries(str(ev.queries))
        top = {q: metrics.trec_order(ranked)[: args.depth] for q, ranked in run.items() if q in queries}
        keys = [(q, pid) for q, ranked in top.items() for pid, _ in ranked]
        texts = corpus.texts([pid for _, pid in keys])
        scores = score_pairs(ce, [(queries[q], t) for (q, _), t in zip(keys, texts)],
                             precision=str(cfg.score.precision), desc=f"rerank {name}")
        reranked: dict[str, dict[str, float]] = {}
        for (q, pid), s in zip(keys, scores):
            reranked.setdefault(q, {})[pid] = float(s)
        cut = {q: dict(ranked) for q, ranked in top.items()}
        measures = list(ev.metrics)
        report["evals"][name] = {
            f"v2 top-{args.depth}": metrics.evaluate_run(qrels, cut, measures),
            f"v2 top-{args.depth} reranked by the cross-encoder": metrics.evaluate_run(qrels, reranked, measures)}
        for system, values in report["evals"][name].items():
            print(f"{name:10s} {system:45s} " + "  ".join(f"{m}={v:.4f}" for m, v in values.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
