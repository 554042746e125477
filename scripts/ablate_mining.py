#!/usr/bin/env python
"""Ablation of the mining rules: the same chain with the cross-encoder filter off, an absolute ceiling, the
published margin and NV-Retriever's relative margin. Shared stages (retrieve, teacher, score) run once: only
mine -> train -> evaluate differ between variants.

    python scripts/ablate_mining.py experiment=cranfield [more overrides] [--out docs/ablation-cranfield] [--jobs 2]

--jobs N runs the variants as N parallel `python -m pipeline` processes once the shared stages are complete (on a
2-core machine, two single-threaded variants at once: add cpu_threads=1).

Writes <out>.md (table of the headline metric of every eval set per variant, v2 and BM25 beside them),
<out>.json and <out>.png (metric per configuration).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from pipeline.config import compose, plain

OFF = ["mine.ce_score_margin=null", "mine.ce_max_score=null", "mine.relative_margin=null"]
VARIANTS = {
    "no CE filter": OFF,
    "absolute ceiling (p < 0.1)": [*OFF[:1], "mine.ce_max_score=0.1", "mine.ce_max_score_scale=probability",
                                   OFF[2]],
    "margin 3.0 logits": ["mine.ce_score_margin=3.0", *OFF[1:]],
    "margin 0 (below the weakest positive)": ["mine.ce_score_margin=0.0", *OFF[1:]],
    "relative 95%": [*OFF[:2], "mine.relative_margin=0.05"],
    "experiment's own rule": [],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=cranfield")
    parser.add_argument("--out", default=None, help="output prefix (default docs/ablation-<data>)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once, as separate processes")
    args = parser.parse_args()

    from pipeline.cli import run as run_stage
    from pipeline.stages import common

    from pipeline.artifacts import StageError

    rows, timings, skipped = [], {}, {}
    base_cfg = compose([*args.overrides, "stage=all"])
    headline = {name: (str(ev.headline), str(ev.title)) for name, ev in base_cfg.data.evals.items()}
    variants = args.variants.split(",")
    if args.jobs > 1:  # shared stages first, in this process; then the variants side by side
        from pipeline.stages import teacher

        shared = ["retrieve", "teacher", "score"] if teacher.needed(base_cfg) else ["retrieve", "score"]
        for stage in shared:
            run_stage(compose([*args.overrides, f"stage={stage}"]))
        # variants share the v2 evaluation folder: the first one writes it, the others wait for its lock
        timings = _run_parallel({v: [*args.overrides, *VARIANTS[v], "stage=all", "evaluate.bm25=false",
                                     "lock_wait_s=86400"] for v in variants}, args.jobs)
    for variant in variants:
        cfg = compose([*args.overrides, *VARIANTS[variant], "stage=all", "evaluate.bm25=false"])
        start = time.perf_counter()
        try:
            run_stage(cfg)  # after --jobs: finds the complete stages (and redoes what a failed process left)
        except StageError as exc:  # e.g. a ceiling no candidate passes: a result of the ablation, not a crash
            print(f"{variant}: {exc}")
            skipped[variant] = str(exc).split(";")[0]
            continue
        finally:
            timings.setdefault(variant, round(time.perf_counter() - start, 1))
        metrics = json.loads((common.completed(cfg, "train") / "metrics.json").read_text())
        mine_report = json.loads((common.completed(cfg, "mine") / "report.json").read_text())
        if not rows:
            rows.append({"name": "v2 (before training)", "metrics": metrics["before"]["metrics"]})
        rows.append({"name": f"v3, {variant}", "metrics": metrics["after"]["metrics"], "mine": plain(cfg.mine),
                     "kept_queries": mine_report.get("queries", {}).get("kept"),
                     "negatives": mine_report.get("negatives", {}).get("total"),
                     "seconds": {s: _stage_seconds(cfg, s) for s in ("mine", "train")}})
    bm25 = __import__("pipeline.stages.evaluate", fromlist=["x"])
    bm25_row = bm25.evaluate_system(base_cfg, "BM25", "bm25")
    rows.append({"name": "BM25", "metrics": bm25_row["metrics"]})

    out = Path(args.out or f"docs/ablation-{base_cfg.data.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    titles = [title if m.lower() in title.lower() else f"{title} ({m})" for m, title in headline.values()]
    lines = ["| configuration | " + " | ".join(titles) + " | queries kept | negatives | mine + train (s) |",
             "|---|" + "---|" * (len(headline) + 3)]
    for row in rows:
        cells = [f"{100 * row['metrics'][ev][m]:.2f}" for ev, (m, _) in headline.items()]
        seconds = " + ".join(f"{v:.0f}" for v in row.get("seconds", {}).values() if v is not None)
        extra = [str(row["kept_queries"]), str(row["negatives"]), seconds] if "seconds" in row else ["", "", ""]
        lines.append(f"| {row['name']} | " + " | ".join(cells + extra) + " |")
    shared = {s: _stage_seconds(base_cfg, s) for s in ("retrieve", "teacher", "score")}
    command = "python scripts/ablate_mining.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines += [f"| v3, {v} | " + " | ".join("no negative survived" for _ in headline) + " | 0 | 0 | |" for v in skipped]
    text = (f"# Mining-rule ablation: data={base_cfg.data.name}, model={base_cfg.model.name}\n\n" + "\n".join(lines)
            + "\n\nStage seconds from the manifests (this machine), shared by every variant: "
            + ", ".join(f"{k} {v:.0f}" for k, v in shared.items() if v is not None)
            + "\n\nWall time per variant (s, this run; a variant whose stages were already complete only finds them): "
            + f"{timings}\n\nCommand: `{command}`\n")
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "timings_s": timings, "stage_seconds": shared,
                                                    "command": command},
                                                   indent=2, default=str))
    _plot(rows, headline, out.with_suffix(".png"), base_cfg)
    print(text)
    return 0


def _stage_seconds(cfg, stage: str) -> float | None:
    """The stage's own total time, from its manifest (None when the stage did not run, e.g. no teacher)."""
    from pipeline.artifacts import StageError, read_manifest
    from pipeline.stages import common

    try:
        return float(read_manifest(common.stage_dir(cfg, stage))["timings_s"]["total"])
    except (OSError, KeyError, ValueError, StageError):
        return None


def _run_parallel(commands: dict[str, list[str]], jobs: int) -> dict[str, float]:
    """Each variant's chain as `python -m pipeline <overrides>`, at most `jobs` at once; their wall times. A variant
    that exits with 2 (a StageError such as "no negative survived") is reported by the in-process pass after."""
    import subprocess
    import tempfile

    pending, running, timings = list(commands), {}, {}
    logs = Path(tempfile.mkdtemp(prefix="ablate-"))
    while pending or running:
        while pending and len(running) < jobs:
            variant = pending.pop(0)
            log = (logs / f"{len(running) + len(timings)}.log").open("w")
            running[variant] = (subprocess.Popen([sys.executable, "-m", "pipeline", *commands[variant]],
                                                 stdout=log, stderr=subprocess.STDOUT), time.perf_counter(), log)
        time.sleep(2)
        for variant, (proc, start, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            timings[variant] = round(time.perf_counter() - start, 1)
            if proc.returncode not in (0, 2):
                raise SystemExit(f"{variant}: the chain crashed (exit {proc.returncode}), see {log.name}")
            del running[variant]
            print(f"{variant}: exit {proc.returncode} after {timings[variant]} s ({log.name})")
    return timings


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
