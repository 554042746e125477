"""`stage=all` (the default): the whole recipe, each step skipped when its artifact is complete for this config.

    (teacher, when no cross-encoder is given) retrieve -> score -> mine -> train -> evaluate (v2, v3, BM25)

The teacher needs retrieve's candidates, so the order is retrieve -> teacher -> score -> mine -> train.
`iterations=N` repeats retrieve -> score -> mine -> train with the model just trained as the bi-encoder
(v3 -> v4 ...), keeping the first round's cross-encoder so the score stage's pair cache answers every pair
already scored. Every stage's own run() decides whether to skip; this module only orders them, reports
"skipped (complete)" or "ran in X s" per stage, and ends with the results table and the mining report plot.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import validate
from pipeline.artifacts import StageError, read_manifest
from pipeline.stages import common

log = logging.getLogger(__name__)


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The chain's result is the train stage's (the last artifact every later step reads)."""
    return common.stage_module("train").identity(cfg)


def label(cfg: DictConfig) -> str:
    return common.stage_module("train").label(cfg)


def iteration_config(cfg: DictConfig, k: int, bi_encoder: str, cross_encoder: str) -> DictConfig:
    """Round k's config: the previous round's model as the bi-encoder, the first round's cross-encoder,
    and a model name that keeps the rounds' folders and table rows apart."""
    from pipeline.stages import mine

    derived = copy.deepcopy(cfg)
    base = str(cfg.model.name)
    OmegaConf.set_readonly(derived, False)
    OmegaConf.set_struct(derived, False)
    derived.model.bi_encoder = str(bi_encoder)
    derived.model.name = f"{base}-it{k}"
    derived.model.cross_encoder = str(cross_encoder)
    derived.teacher.enabled = False  # the first round's judge, whether given or trained, judges every round
    derived.mine.systems = mine.fixed_systems(cfg)  # the extra systems' round-1 results, not ones under this name
    OmegaConf.set_struct(derived, True)
    return derived


class _Chain:
    def __init__(self, cfg: DictConfig, tracker):
        self.cfg, self.tracker = cfg, tracker
        self.steps: list[dict[str, Any]] = []

    def stage(self, cfg: DictConfig, stage: str, what: str | None = None) -> Path:
        started_unix, started = time.time(), time.perf_counter()
        path = Path(common.stage_module(stage).run(cfg))
        self._record(what or stage, path, started_unix, time.perf_counter() - started)
        from pipeline import tracking

        tracking.log_stage(self.tracker, what or stage, path)
        return path

    def evaluation(self, cfg: DictConfig, name: str, spec: str) -> dict[str, Any]:
        from pipeline.stages import evaluate

        started_unix, started = time.time(), time.perf_counter()
        row = evaluate.evaluate_system(cfg, name, spec)
        self._record(f"evaluate {name}", Path(row["path"]), started_unix, time.perf_counter() - started)
        return row

    def _record(self, what: str, path: Path, started_unix: float, seconds: float) -> None:
        try:
            finished = float(read_manifest(path).get("finished_unix", 0.0))
        except (OSError, ValueError):
            finished = started_unix
        skipped = finished < started_unix  # the stage found a complete result made before this call
        self.steps.append({"stage": what, "skipped": skipped, "seconds": round(seconds, 2), "path": str(path)})
        status = "skipped (complete)" if skipped else f"ran in {seconds:.1f} s"
        log.info("%-18s %s  %s", what, status, path)


@validate.checked
def run(cfg: DictConfig) -> Path:
    from pipeline import tracking
    from pipeline.stages import evaluate, score, teacher, train

    if int(cfg.shard.count) > 1:
        # one shard of retrieve returns its part, not the merged result, so the chain's next step stopped with "run
        # that stage first" (or, once another shard had merged, scored one part of a score that no shard merged)
        raise StageError(f"stage=all does not run sharded (shard.count={cfg.shard.count}): shard.count/shard.index "
                         f"split stage=retrieve and stage=score only. Run those two as arrays, then the chain without "
                         f"shard settings, which finds them complete (docs/scale-out.md)")
    iterations = int(cfg.iterations)
    started = time.perf_counter()
    with tracking.track(cfg, "all") as tracker:
        chain = _Chain(cfg, tracker)
        rounds: list[DictConfig] = []
        round_cfg = cfg
        mine_dir = train_dir = None
        for k in range(1, iterations + 1):
            tag = "" if k == 1 else f" (round {k})"
            chain.stage(round_cfg, "retrieve", "retrieve" + tag)
            if k == 1 and teacher.needed(round_cfg):
                chain.stage(round_cfg, "teacher")
            chain.stage(round_cfg, "score", "score" + tag)
            mine_dir = chain.stage(round_cfg, "mine", "mine" + tag)
            train_dir = chain.stage(round_cfg, "train", "train" + tag)
            rounds.append(round_cfg)
            if k < iterations:
                cross_encoder = str(score.cross_encoder_spec(cfg))
                round_cfg = iteration_config(cfg, k + 1, str(train_dir / "model"), cross_encoder)

        rows = [chain.evaluation(cfg, "v2", str(cfg.model.bi_encoder))]
        for k, rc in enumerate(rounds, start=1):
            rows.append(chain.evaluation(cfg, train.version_names(rc)[1], str(common.completed(rc, "train") / "model")))
        if cfg.evaluate.bm25:
            rows.append(chain.evaluation(cfg, "BM25", evaluate.BM25))
        table = evaluate.results_table(rows, cfg)
        out = common.artifacts_root(cfg) / "results" / f"{cfg.data.name}-{cfg.model.name}-{evaluate.rows_key(rows)}.md"
        plot = Path(mine_dir) / "report.png"
        written = evaluate.write_results(
            out, f"# {cfg.data.name}: {cfg.model.name} (v2) and its fine-tuned versions\n\n{table}\n"
                 f"Mining report plot: {plot}\n")
        tracker.log({"results": {r["name"]: r["metrics"] for r in rows}})

    total = time.perf_counter() - started
    if all(s["skipped"] for s in chain.steps):
        log.info("nothing to do: every stage was complete")
    summary = "\n".join(f"  {s['stage']:<18} {'skipped (complete)' if s['skipped'] else 'ran in %.1f s' % s['seconds']}"
                        for s in chain.steps)
    print(f"\nstages:\n{summary}\n", flush=True)
    if all(s["skipped"] for s in chain.steps):
        print("nothing to do: every stage was complete\n", flush=True)
    print(table, flush=True)
    print(f"results table: {out}" + ("" if written else " (not written)"), flush=True)
    print(f"mining report plot: {plot}" + ("" if plot.is_file() else " (not written)"), flush=True)
    print(f"total: {total:.1f} s", flush=True)
    return Path(train_dir)
