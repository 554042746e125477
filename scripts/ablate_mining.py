#!/usr/bin/env python
"""Ablation of the mining rules: the same chain with the cross-encoder filter off, an absolute ceiling, the
published margin and NV-Retriever's relative margin. Shared stages (retrieve, teacher, score) run once: only
mine -> train -> evaluate differ between variants.

    python scripts/ablate_mining.py experiment=cranfield [more overrides] [--out docs/ablation-cranfield]

Writes <out>.md (table of the headline metric of every eval set per variant, v2 and BM25 beside them),
<out>.json and <out>.png (metric per configuration).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.config import compose, plain

OFF = ["mine.ce_score_margin=null", "mine.ce_max_score=null", "mine.relative_margin=null"]
VARIANTS = {
    "no CE filter": OFF,
    "absolute ceiling (p < 0.1)": [*OFF[:1], "mine.ce_max_score=0.1", "mine.ce_max_score_scale=probability",
                                   OFF[2]],
    "margin 3.0 logits": ["mine.ce_score_margin=3.0", *OFF[1:]],
    "relative 95%": [*OFF[:2], "mine.relative_margin=0.95"],
    "experiment's own rule": [],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=cranfield")
    parser.add_argument("--out", default=None, help="output prefix (default docs/ablation-<data>)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    args = parser.parse_args()

    from pipeline.cli import run as run_stage
    from pipeline.stages import common

    from pipeline.artifacts import StageError

    rows, timings, skipped = [], {}, {}
    base_cfg = compose([*args.overrides, "stage=all"])
    headline = {name: (str(ev.headline), str(ev.title)) for name, ev in base_cfg.data.evals.items()}
    for variant in args.variants.split(","):
        cfg = compose([*args.overrides, *VARIANTS[variant], "stage=all", "evaluate.bm25=false"])
        start = time.perf_counter()
        try:
            run_stage(cfg)
        except StageError as exc:  # e.g. a ceiling no candidate passes: a result of the ablation, not a crash
            print(f"{variant}: {exc}")
            skipped[variant] = str(exc).split(";")[0]
            continue
        finally:
            timings[variant] = round(time.perf_counter() - start, 1)
        metrics = json.loads((common.completed(cfg, "train") / "metrics.json").read_text())
        mine_report = json.loads((common.completed(cfg, "mine") / "report.json").read_text())
        if not rows:
            rows.append({"name": "v2 (before training)", "metrics": metrics["before"]["metrics"]})
        rows.append({"name": f"v3, {variant}", "metrics": metrics["after"]["metrics"], "mine": plain(cfg.mine),
                     "kept_queries": mine_report.get("queries", {}).get("kept")})
    bm25 = __import__("pipeline.stages.evaluate", fromlist=["x"])
    bm25_row = bm25.evaluate_system(base_cfg, "BM25", "bm25")
    rows.append({"name": "BM25", "metrics": bm25_row["metrics"]})

    out = Path(args.out or f"docs/ablation-{base_cfg.data.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"| configuration | " + " | ".join(f"{title} ({m})" for m, title in headline.values()) + " |",
             "|---|" + "---|" * len(headline)]
    for row in rows:
        cells = [f"{100 * row['metrics'][ev][m]:.2f}" for ev, (m, _) in headline.items()]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    command = "python scripts/ablate_mining.py " + " ".join(args.overrides)
    lines += [f"| v3, {v} | " + " | ".join("no negative survived" for _ in headline) + " |" for v in skipped]
    text = (f"# Mining-rule ablation: data={base_cfg.data.name}, model={base_cfg.model.name}\n\n" + "\n".join(lines)
            + f"\n\nWall time per variant (s, this machine): {timings}\n\nCommand: `{command}`\n")
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "timings_s": timings, "command": command},
                                                   indent=2, default=str))
    _plot(rows, headline, out.with_suffix(".png"), base_cfg)
    print(text)
    return 0


def _plot(rows, headline, path: Path, cfg) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(headline), figsize=(6 * len(headline), 4), squeeze=False)
    for ax, (ev, (metric, title)) in zip(axes[0], headline.items()):
        names = [r["name"] for r in rows]
        values = [100 * r["metrics"][ev][metric] for r in rows]
        ax.barh(names, values, color=["#999"] + ["#1f77b4"] * (len(rows) - 2) + ["#d62728"])
        ax.set_xlabel(f"{metric} x 100")
        ax.set_title(title)
        lo = min(values)
        ax.set_xlim(max(0, lo - 10), max(values) + 3)
        ax.invert_yaxis()
    fig.suptitle(f"mining rules on {cfg.data.name} ({cfg.model.name} as v2)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
