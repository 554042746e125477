"""The real config composes for every data/model/experiment option, rejects unknown keys, and the plan and
verify stages work from it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from pipeline.artifacts import StageError, config_key, open_stage
from pipeline.config import CONF_DIR, REPO_ROOT, compose

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose([f"experiment={experiment}", f"artifacts_root={tmp_path}"])
    if OmegaConf.is_missing(cfg.data, "root"):  # a generic experiment (beir_minilm) names its folder on the CLI
        cfg = compose([f"experiment={experiment}", f"artifacts_root={tmp_path}", f"data.root={tmp_path / 'scifact'}"])
        assert cfg.data.name == "scifact"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["data"]["name"] and resolved["model"]["bi_encoder"]
    from pipeline import validate

    assert validate.problems(cfg) == []  # every shipped setting passes the checks the CLI runs first


def test_msmarco_experiments_print_the_published_row_beside_their_own():
    # the BM25-only experiment too: its table row is compared with the published ElasticSearch BM25
    from pipeline.stages.evaluate import results_table

    row = {"name": "BM25", "metrics": {"trec_dl19": {"nDCG@10": 0.48}, "dev": {"RR@10": 0.18}}}
    for experiment in ("bm25", "eval_published"):
        table = results_table([row], compose([f"experiment={experiment}"]))
        assert "48.00 (published 45.46)" in table and "18.00 (published 17.29)" in table, (experiment, table)


@pytest.mark.parametrize("group,option", [("data", d) for d in DATA if d != "beir"] + [("model", m) for m in MODELS])
def test_every_group_option_composes(group, option, tmp_path):
    cfg = compose([f"{group}={option}", f"artifacts_root={tmp_path}"])
    assert cfg[group].name


@pytest.mark.parametrize("override,named", [
    ("teacher.pos_weight=-1", "teacher.pos_weight=-1: must be a number > 0"),  # trained an inverted judge
    ("teacher.epochs=0", "teacher.epochs=0: must be an integer >= 1"),  # an untrained teacher marked complete
    ("score.use_cache=no", "score.use_cache='no': must be true or false"),  # a string: truthy
    ("evaluate.search_backend=faiss_flt", "must be one of torch, faiss_flat, faiss_ivf"),  # after the encode
    ("retrieve.max_seq_length=0", "must be an integer >= 1 (or null)"),  # 0 meant the model's own limit
    ("data.train.max_queries=-5", "data.train.max_queries=-5"),  # dropped the last five queries
    ("train.max_steps=-5", "train.max_steps=-5"),  # switched the warm-up off
    ("teacher.precision=bf61", "teacher.precision='bf61': must be auto, fp32, bf16 or fp16"),
    ("device=gpu", "device='gpu'"), ("plan.chain=evaluat", "plan.chain='evaluat'"),
    ("mine.rank_min=9", "mine.rank_max=5 is below mine.rank_min=9"),
    # checked deep in a stage before: after the corpus encode (eval sets, systems) or in the job's tracker
    ("shard.index=2", "shard.index=2 must be below shard.count=2"),
    ("tracking.mode=ofline", "tracking.mode='ofline': must be one of auto, offline, online, disabled"),
    ("evaluate.systems=[{name: x, model: y, colour: red}]", "evaluate.systems: entry 0: unknown keys ['colour']"),
    ("evaluate.systems=[{name: x, model: y, similarity: euclid}]", "similarity 'euclid' must be one of"),
    ("evaluate.devices=cpu", "evaluate.devices='cpu': must be auto or a list of devices"),
    ("data.evals.dev.kind=retreival", "data.evals: dev: kind must be one of retrieval, rerank"),
    ("data.evals.dev.headline=MRR@10", "data.evals: dev: headline 'MRR@10' is not among its metrics"),
    ("data.evals.trec_dl.metrics=[nDGC@10]", "data.evals: trec_dl: unknown measure 'nDGC@10'"),
    ("mine.relative_margin=1", "mine.relative_margin=1: must be a number >= 0 and < 1"),  # kept no negative
    ("train.packing=1", "train.packing=1: must be one of auto, true, false"),  # a number is no switch
    ("teacher.epochs=true", "teacher.epochs=True: must be an integer >= 1"),
    ("retrieve.batch_tokens=0", "retrieve.batch_tokens=0: must be auto or a number of tokens >= 1"),
    ("device=cuda:0x", "device='cuda:0x'"), ("token_cache=2", "token_cache=2"),
    ("evaluate.systems=[{name: x}]", "evaluate.systems: entry 0 must be a mapping with at least name and model"),
    ("evaluate.devices=[auto]", "evaluate.devices: must be auto or a list of devices"),
    ("data.evals.dev.kind=rerank", "data.evals: dev is a rerank set: it needs candidates"),
])
def test_invalid_values_are_named_before_anything_runs(override, named):
    from pipeline import validate

    extra = {"mine": ["mine.rank_max=5"], "shard": ["shard.count=2"], "tracking": ["tracking=wandb"]}.get(
        override.split(".")[0], [])
    found = validate.problems(compose(["experiment=demo", override, *extra]))
    assert len(found) == 1 and named in found[0], found


@pytest.mark.parametrize("override", ["train.max_grad_norm=0", "token_cache=null", "token_cache=1", "lock_wait_s=inf",
                                      "cpu_threads=0", "train.precision=float32", "retrieve.precision=BF16",
                                      "train.lr=1", "evaluate.bm25_params.k1=1", "data.max_missing_qrels=0",
                                      "teacher.neg_rank_min=30"])  # the demo's neg_rank_max: a single rank
def test_values_the_stages_accept_pass(override):
    # transformers reads max_grad_norm 0 as no clipping; 0/1 and null are how token_cache and cpu_threads were set
    from pipeline import validate

    assert validate.problems(compose(["experiment=demo", override])) == []


def test_a_null_precision_is_refused_not_read_two_ways():
    from pipeline import validate

    assert validate.problems(compose(["experiment=demo", "score.precision=null"])) == [
        "score.precision=None: must be auto, fp32, bf16 or fp16"]


def test_jobs_submitit_launched_wait_for_a_stage_in_progress(monkeypatch):
    # a sweep's jobs share their upstream stages: one that finds a stage being computed waits for it; by hand, a
    # second command on an artifact in progress is refused at once
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert compose(["experiment=demo"]).lock_wait_s == 0
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert compose(["experiment=demo"]).lock_wait_s == 86400


def test_a_key_added_with_a_plus_must_be_one_a_stage_reads():
    # Hydra's hint for a mistyped key is to add it with +: +retrieve.topk=5 then ran at the default top_k
    from pipeline.validate import added_keys

    assert added_keys(["+retrieve.topk=5", "retrieve.top_k=5", "++train.lr=1"]) == [
        "+retrieve.topk=5: adds 'retrieve.topk', a key no stage reads (a typo of a known key? drop the +)"]
    assert added_keys(["+experiment=demo", "+hydra/launcher=local", "+model.published.dev=33.1",
                       "+data.evals.mine={kind: rerank}", "+hydra.launcher.additional_parameters.x=1"]) == []
    # with the composed config the known key it most looks like is named (the + override is in it by then)
    cfg = compose(["+retrieve.topk=5", "+train.learning_rate=1", "+zzz=1"])
    assert added_keys(["+retrieve.topk=5", "+train.learning_rate=1", "+zzz=1"], cfg) == [
        "+retrieve.topk=5: adds 'retrieve.topk', a key no stage reads (did you mean retrieve.top_k? drop the +)",
        "+train.learning_rate=1: adds 'train.learning_rate', a key no stage reads (a typo of a known key? drop the +)",
        "+zzz=1: adds 'zzz', a key no stage reads (a typo of a known key? drop the +)"]


def test_a_mistyped_key_is_one_line_naming_the_nearest_known_key(tmp_path):
    """Hydra's own refusal of retrieve.topk=5 is five lines whose hint (add it with +) leads to a second refusal;
    the keys come from the groups chosen on the same command line (an experiment's, a data config's)."""
    from pipeline.validate import unknown_keys

    assert unknown_keys(["-m", "retrieve.topk=5,6", "retreive.top_k=5", "sed=1", "retrieve.top_k=5", "seed=2"]) == [
        "retrieve.topk=5,6: 'retrieve.topk' is no setting (did you mean retrieve.top_k?)",
        "retreive.top_k=5: 'retreive' is no setting (did you mean retrieve?)",
        "sed=1: 'sed' is no setting (did you mean seed?)"]
    # what Hydra judges: additions, deletions, its own settings, groups, open mappings, flags, a group it cannot find
    assert unknown_keys(["+retrieve.topk=5", "~train.lr", "hydra.verbose=true", "hydra/launcher=local",
                         "experiment=demo", "data.evals.x.kind=rerank", "model.published.dev=1", "--cfg", "job"]) == []
    assert unknown_keys(["experiment=nosuch", "retrieve.topk=1"]) == []
    # a sweep over a group: every choice is a config of its own, a key must be in each
    assert unknown_keys(["-m", "data=demo,cisi", "retrieve.topk=5", "data.root=x"]) == [
        "retrieve.topk=5: 'retrieve.topk' is no setting (did you mean retrieve.top_k?) with data=demo",
        "data.root=x: 'data.root' is no setting with data=demo"]
    assert unknown_keys(["-m", "data=cisi,beir", "data.root=x", "seed=1,2"]) == []
    assert unknown_keys(["-m", "data=choice(demo,cisi)", "retrieve.topk=5"]) == []  # Hydra's sweep functions
    assert unknown_keys(["--config-dir", "/my/conf", "retrieve.topk=1"]) == []  # keys of another config
    # keys a chosen group brings (the default data has no root), a required ??? one included
    assert unknown_keys(["data=beir", "data.root=x"]) == unknown_keys(["experiment=beir_minilm", "data.root=x"]) == []
    assert unknown_keys(["data=cisi", "data.root=x", "data.rot=x"]) == [
        "data.rot=x: 'data.rot' is no setting (did you mean data.root?)"]
    proc = subprocess.run([sys.executable, "-m", "pipeline", "experiment=demo", "retrieve.topk=5",
                           f"artifacts_root={tmp_path}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and not list(tmp_path.iterdir())
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "invalid settings (nothing was run): retrieve.topk=5: 'retrieve.topk' is no setting (did you mean "
        "retrieve.top_k?)")


@pytest.mark.parametrize("group", ["experiment", "data", "model", "tracking"])
def test_every_key_of_every_choice_passes_the_key_check(group):
    """The key check must never refuse what Hydra accepts: each key of every option of the groups that change the
    keys (a required ??? one, an interpolated one, a nested one) set on the command line beside that choice."""
    from omegaconf import OmegaConf

    from pipeline.config import CONF_DIR
    from pipeline.validate import unknown_keys

    def leaves(node, prefix=""):
        for key in node.keys():
            child = node._get_node(key)
            if OmegaConf.is_dict(child) and not child._is_none() and not OmegaConf.is_interpolation(node, key):
                yield from leaves(child, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    for option in sorted(f.stem for f in (CONF_DIR / group).glob("*.yaml")):
        choice = f"{group}={option}"
        keys = [k for k in leaves(compose([choice])) if not k.startswith("hydra")]
        assert len(keys) > 20 and unknown_keys([choice, *(f"{k}=1" for k in keys)]) == [], choice


def test_a_required_value_left_unset_is_named_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "data=beir", "stage=evaluate",
                           f"artifacts_root={tmp_path}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-2000:]
    assert "data.root is required: give it on the command line (data.root=...)" in out


def test_a_stage_called_directly_checks_its_settings_first(tmp_path):
    # scripts and tests call a stage's run without the CLI: the same checks, before anything is built
    from pipeline.stages import evaluate, retrieve
    from pipeline.validate import ConfigError

    with pytest.raises(ConfigError, match="retrieve.top_k=0: must be an integer >= 1"):
        retrieve.run(compose(["experiment=demo", f"artifacts_root={tmp_path}", "retrieve.top_k=0"]))
    with pytest.raises(ValueError, match="unknown keys"):  # a ValueError too, for callers that catch those
        evaluate.run(compose(["experiment=demo", f"artifacts_root={tmp_path}",
                              "evaluate.systems=[{name: x, model: y, colour: red}]"]))
    assert not list(tmp_path.iterdir())  # no stage folder, no demo model


def test_the_cli_refuses_invalid_values_in_one_line_without_running(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "experiment=demo", f"artifacts_root={tmp_path}",
                           "train.lr=0", "score.use_cache=no"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-2000:]
    assert "train.lr=0: must be a number > 0" in out and "score.use_cache='no'" in out
    assert not [p for p in tmp_path.iterdir() if p.name != "logs"]  # no stage started, no demo model built


def test_the_cli_refuses_a_key_added_with_a_plus_without_running(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "experiment=demo", "stage=plan",
                           f"artifacts_root={tmp_path}", "+retrieve.topk=5"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-2000:]
    assert "invalid settings (nothing was run): +retrieve.topk=5: adds 'retrieve.topk'" in out
    assert not [p for p in tmp_path.iterdir() if p.name != "logs"]


def test_cpu_threads_sets_the_threads_a_stage_computes_with(tmp_path):
    import torch

    from pipeline.cli import run as run_stage

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_stage(compose(["experiment=demo", "stage=plan", f"artifacts_root={tmp_path}", "cpu_threads=1"]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_every_precision_spelling_reads_the_same_in_training():
    from pipeline.stages.train import resolve_precision

    assert resolve_precision("float32", "cpu") == resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("half", "cuda") == "fp16"


def test_a_precision_may_be_left_unset_or_spelled_as_torch_names_it():
    from pipeline.models import precision_name

    assert precision_name(None) == precision_name("auto") == "auto"
    assert precision_name("torch.float16") == precision_name("Half") == "fp16"
    assert precision_name("torch.bfloat16") == "bf16"


def test_every_yaml_key_says_what_it_is_for():
    """The convention: each key line of conf/ carries a comment (list items under a commented key excepted)."""
    import re

    missing = [f"{path.relative_to(CONF_DIR)}:{n}: {line.strip()}" for path in sorted(CONF_DIR.rglob("*.yaml"))
               for n, line in enumerate(path.read_text().splitlines(), 1)
               if re.match(r"^\s*(- )?[\w./@-]+:(\s|$)", line) and " #" not in line]
    assert missing == []


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigCompositionException):
        compose(["train.no_such_key=1"])
    with pytest.raises(ConfigCompositionException):
        compose(["no_such_top_level_key=1"])


def test_plan_says_how_deep_each_search_goes():
    """The searches line said (top-100), retrieve's depth, also for the evaluation-only plan, whose dev queries are
    searched to evaluate.k (1000)."""
    from pipeline.stages import plan

    lines = {e: next(line for line in plan.format_plan(plan.estimate(compose([f"experiment={e}"]))).splitlines()
                     if "queries to search" in line) for e in ("eval_published", "v3_distilbert")}
    assert lines["eval_published"].endswith("41,880  (evaluation top-1000)")
    assert lines["v3_distilbert"].endswith("516,899  (training top-100, evaluation top-1000)")


def test_beir_requires_a_root():
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    cfg = compose(["data=beir"])
    with pytest.raises((MissingMandatoryValue, InterpolationToMissingValueError)):
        _ = cfg.data.corpus


def test_plan_counts_msmarco_without_data_or_models(tmp_path, capsys):
    from pipeline.stages import plan

    cfg = compose(["data=msmarco", "model=msmarco_distilbert_v2", f"artifacts_root={tmp_path}", "stage=plan"])
    out = plan.run(cfg)
    printed = capsys.readouterr().out
    assert "8,841,823" in printed and "502,939" in printed
    estimate = json.loads(Path(out).read_text())
    assert estimate["work"]["pairs_scored"] == 502939 * (cfg.retrieve.top_k + 1)
    assert estimate["gpu_hours"]["baseline"]["this_run"]["total"] > 0
    ref = estimate["gpu_hours"]["baseline"]["reference_job"]["total"]
    assert 6 < ref < 8  # the brief: about 7 hours at sentence-transformers defaults on one H200
    # the train stage's host RAM follows the mined pools: 20 negatives per query from two systems = 41 rows a query
    pooled = plan.estimate(compose(["data=msmarco", "model=msmarco_distilbert_v2", "mine.num_negatives_per_system=20",
                                    "mine.systems=['bm25=/elsewhere']"]))["peak_host_ram_gb"]["train"]
    assert pooled == pytest.approx(estimate["peak_host_ram_gb"]["train"] + 502939 * (41 - 6) * 160 / 1e9, abs=0.1)


def test_plan_says_first_what_it_could_not_count(tmp_path, capsys):
    """A mistyped corpus path used to plan a 0-passage corpus, said only in the last line; a gzipped corpus is
    counted by its lines (the magic bytes decide, not the name)."""
    import gzip

    from pipeline import validate
    from pipeline.stages import plan

    corpus = tmp_path / "corpus.tsv.bin"
    with gzip.open(corpus, "wt") as fh:
        fh.write("".join(f"{i}\tpassage {i}\n" for i in range(7)))
    base = ["experiment=demo", f"artifacts_root={tmp_path}", "stage=plan"]
    assert plan.estimate(compose([*base, f"data.corpus={corpus}"]))["work"]["corpus_passages"] == 7
    plan.run(compose([*base, f"data.corpus={tmp_path}/colection.tsv"]))
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (f"  NOT COUNTED (taken as 0 below): corpus passages (data.corpus={tmp_path}/colection.tsv "
                        f"does not exist; to plan before fetching give data.sizes.corpus=N (+data.sizes.corpus=N "
                        f"where the data config has no sizes))")
    # a BEIR folder without its corpus file: it exists, so "does not exist" sent the user to the wrong fix
    assert plan.estimate(compose([*base, f"data.corpus={tmp_path}"]))["unknown"][0].startswith(
        f"corpus passages (data.corpus={tmp_path} holds no corpus.jsonl[.gz];")
    sized = compose([*base, f"data.corpus={tmp_path}/colection.tsv", "+data.sizes.corpus=9"])
    assert validate.added_keys(["+data.sizes.corpus=9"]) == [] and validate.problems(sized) == []
    assert plan.estimate(sized)["unknown"] == [] and plan.estimate(sized)["work"]["corpus_passages"] == 9
    # the demo's rerank candidates are encoded too, and a rerank set the plan cannot count is named
    demo = plan.estimate(compose(base))["work"]
    assert demo["passages_encoded"]["evaluate"] == 2 * (2989 + 1531)  # 1,531 distinct candidates of judged queries
    unknown = plan.estimate(compose([*base, f"data.evals.trec_dl.candidates={tmp_path}/top1000.tsv"]))["unknown"]
    assert unknown == [f"trec_dl rerank passages (data.evals.trec_dl.candidates={tmp_path}/top1000.tsv does not "
                       f"exist; to plan before fetching give data.sizes.rerank_passages.trec_dl=N "
                       f"(+data.sizes.rerank_passages.trec_dl=N where the data config has no sizes))"]
    assert validate.problems(compose([*base, "+data.sizes.corpsu=9"])) == [
        "data.sizes: unknown key 'corpsu' (known: corpus, train_queries, tokens_per_passage, eval_queries, "
        "rerank_passages)"]
    assert validate.problems(compose([*base, "+data.sizes.eval_queries.dev=0"])) == [
        "data.sizes: eval_queries.dev=0 must be a number > 0"]


def test_plan_reads_its_figures_from_a_bench_output(tmp_path):
    """plan.bench_json: the figures of a scripts/bench_gpu.py --out file, the token-store rows where the stages would
    use a store (MS MARCO: token_cache auto), the texts rows where they would not; a file lacking a row is refused."""
    from pipeline.stages import plan

    def rec(system, tput):
        return {"system": system, "throughput": tput}

    store = "ours, inputs from the token store (token store)"
    rows = {"encode": [rec("ours (stage defaults: ...)", 36000.0), rec(store, 50000.0),
                       rec("token store build (once per corpus+tokenizer)", 40000.0),
                       rec("token store build, 14 tokeniser processes", 400000.0),
                       rec("ST encode fp32 default (batch 32)", 2000.0),
                       rec("ours fp32 (evaluate.precision=fp32, eager layers)", 5000.0)],
            "score": [rec("ours (stage defaults: ...)", 20000.0), rec(store, 25000.0),
                      rec("CE predict fp32 default (batch 32)", 1500.0)],
            "search": [rec("ours exact_search (float16)", 30000.0), rec("ST util.semantic_search (defaults)", 600.0)],
            "train": [rec("baseline (SentenceTransformerTrainer bf16)", 250.0),
                      rec("ours (train stage make_trainer)", 2000.0)]}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": rows, "env": {"device": "NVIDIA H200", "torch": "2.x"}}))
    base = ["data=msmarco", "model=msmarco_distilbert_v2", f"artifacts_root={tmp_path}", f"plan.bench_json={bench}",
            "train.compile_layers=false"]
    est = plan.estimate(compose(base))
    ref = est["gpu_hours"]["pipeline"]["reference_job"]
    assert ref["encode"] == pytest.approx(17683646 / 50000 / 3600, abs=1e-3)
    assert ref["score"] == pytest.approx(25e6 / 25000 / 3600, abs=1e-3)
    assert ref["train"] == pytest.approx(502939 / 2000 / 3600, abs=1e-3)
    assert ref["tokenise"] > 0 and ref["tokenise"] == pytest.approx(8841823 / 400000 / 3600, abs=1e-3)  # built once
    assert ref["total"] == pytest.approx(sum(v for k, v in ref.items() if k != "total"), abs=1e-3)
    assert est["gpu_hours"]["baseline"]["reference_job"]["encode"] == pytest.approx(17683646 / 2000 / 3600, abs=1e-3)
    assert "NVIDIA H200" in est["throughput_source"] and "token store: encode, score" in est["throughput_source"]
    assert est["work"]["passages_encoded"]["evaluate"] > 0  # data=msmarco evaluates in fp32: at ours fp32's rate
    fp32_hours = est["gpu_hours"]["pipeline"]["this_run"]["encode"] - 8841823 / 50000 / 3600
    assert fp32_hours == pytest.approx(est["work"]["passages_encoded"]["evaluate"] / 5000 / 3600, abs=1e-3)
    texts = plan.estimate(compose([*base, "token_cache=false"]))["gpu_hours"]["pipeline"]["reference_job"]
    assert texts["encode"] == pytest.approx(17683646 / 36000 / 3600, abs=1e-3) and "tokenise" not in texts
    # train.compile_layers: its own row where the file has one, else the eager row's figure, said in the source line
    eager = plan.estimate(compose([*base, "train.compile_layers=true"]))
    assert eager["gpu_hours"]["pipeline"]["reference_job"]["train"] == ref["train"]
    assert "no compiled-layers row" in eager["throughput_source"]
    rows["train"].append(rec("ours_compiled (train stage make_trainer (packing auto, compile_layers))", 3000.0))
    bench.write_text(json.dumps({"rows": rows, "env": {"device": "NVIDIA H200", "torch": "2.x"}}))
    compiled_est = plan.estimate(compose([*base, "train.compile_layers=true"]))
    compiled = compiled_est["gpu_hours"]["pipeline"]["reference_job"]
    assert compiled["train"] == pytest.approx(502939 / 3000 / 3600, abs=1e-3)
    assert "token store: encode, score)" in compiled_est["throughput_source"]  # nothing said of training
    assert plan.estimate(compose(base))["gpu_hours"]["pipeline"]["reference_job"]["train"] == ref["train"]
    # a file without the store's build rows: its from-texts rows, said so (store rates leave the tokenising out)
    unbuilt = dict(rows, encode=[r for r in rows["encode"] if not r["system"].startswith("token store build")])
    bench.write_text(json.dumps({"rows": unbuilt}))
    est_unbuilt = plan.estimate(compose(base))
    assert est_unbuilt["gpu_hours"]["pipeline"]["reference_job"]["encode"] == pytest.approx(texts["encode"], abs=1e-6)
    assert "no token-store build figure" in est_unbuilt["throughput_source"]
    del rows["search"][0]
    bench.write_text(json.dumps({"rows": rows}))
    with pytest.raises(StageError, match="search: ours exact_search"):
        plan.estimate(compose(base))


def test_plan_counts_the_evaluations_encodes_at_their_precision(tmp_path):
    """The v3 experiment evaluates in bf16 on a GPU, as retrieve encodes: the v2 evaluation links retrieve's corpus
    embeddings, so the chain encodes the corpus twice, as the reference job does. At evaluate.precision=fp32 both
    evaluations encode it, at the fp32 rate (ours from a bench file, else the library's fp32 encode)."""
    from pipeline.stages import plan

    corpus, rerank = 8841823, 41042
    base = ["experiment=v3_distilbert", f"artifacts_root={tmp_path}"]
    fast = plan.estimate(compose(base))
    assert fast["work"]["passages_encoded"] == {"retrieve": corpus, "evaluate": corpus + 2 * rerank}
    hours = fast["gpu_hours"]["pipeline"]["this_run"]
    figures = compose(base).plan.pipeline
    rate = figures.encode_passages_store  # MS MARCO: 100k+ passages, so the stages read a token store
    assert hours["encode"] == pytest.approx((2 * corpus + 2 * rerank) / rate / 3600, abs=1e-3)
    assert hours["tokenise"] == pytest.approx(corpus / figures.tokenise_passages / 3600, abs=1e-3)
    # a roberta bi-encoder and the electra cross-encoder read the corpus with two tokenizers: two stores
    roberta = plan.estimate(compose(["experiment=v3_roberta", f"artifacts_root={tmp_path}"]))
    assert roberta["gpu_hours"]["pipeline"]["this_run"]["tokenise"] == pytest.approx(2 * hours["tokenise"], abs=2e-3)
    texts = plan.estimate(compose([*base, "token_cache=false", "train.compile_layers=false"]))
    texts_hours = texts["gpu_hours"]["pipeline"]["this_run"]
    assert texts_hours["encode"] == pytest.approx((2 * corpus + 2 * rerank) / figures.encode_passages / 3600, abs=1e-3)
    assert "tokenise" not in texts_hours and "token store" not in texts["throughput_source"]
    # store figures without the store's build rate: costed from texts (the tokenising is not free), and said so
    nobuild = plan.estimate(compose([*base, "plan.pipeline.tokenise_passages=null"]))
    nobuild_hours = nobuild["gpu_hours"]["pipeline"]["this_run"]
    assert nobuild_hours["encode"] == pytest.approx(texts_hours["encode"], abs=1e-6) and "tokenise" not in nobuild_hours
    assert "no token-store build figure" in nobuild["throughput_source"]
    assert texts_hours["train"] == pytest.approx(hours["train"] * figures.train_triplets / figures.train_triplets_eager,
                                                 rel=1e-2)
    exact = plan.estimate(compose([*base, "evaluate.precision=fp32"]))
    assert exact["work"]["passages_encoded"]["evaluate"] == 2 * (corpus + rerank)
    assert fast["fp32_stages"] == [] and exact["fp32_stages"] == ["evaluate"]
    assert "in fp32 (precision=fp32, the exact path" in plan.format_plan(exact)
    ours_fp32 = figures.encode_passages_fp32
    assert exact["gpu_hours"]["pipeline"]["this_run"]["encode"] == pytest.approx(
        corpus / rate / 3600 + 2 * (corpus + rerank) / ours_fp32 / 3600, abs=1e-3)
    st_fp32 = compose(base).plan.baseline.encode_passages  # where ours is not measured: the library's fp32 rate
    unmeasured = plan.estimate(compose([*base, "evaluate.precision=fp32", "plan.pipeline.encode_passages_fp32=null"]))
    assert unmeasured["gpu_hours"]["pipeline"]["this_run"]["encode"] == pytest.approx(
        corpus / rate / 3600 + 2 * (corpus + rerank) / st_fp32 / 3600, abs=1e-3)
    measured = plan.estimate(compose([*base, "evaluate.precision=fp32", "plan.pipeline.encode_passages_fp32=6000"]))
    assert measured["gpu_hours"]["pipeline"]["this_run"]["encode"] == pytest.approx(
        corpus / rate / 3600 + 2 * (corpus + rerank) / 6000 / 3600, abs=1e-3)
    # every stage at fp32 is costed at fp32 rates (ours for encode, the library's for the cross-encoder)
    all_fp32 = plan.estimate(compose([*base, "retrieve.precision=fp32", "score.precision=fp32",
                                      "evaluate.precision=fp32"]))
    assert all_fp32["work"]["passages_encoded"]["evaluate"] == corpus + 2 * rerank  # same dtype again: linked
    assert all_fp32["gpu_hours"]["pipeline"]["this_run"]["encode"] == pytest.approx(
        (2 * corpus + 2 * rerank) / ours_fp32 / 3600, abs=1e-3)
    assert all_fp32["gpu_hours"]["pipeline"]["this_run"]["score"] == pytest.approx(
        all_fp32["work"]["pairs_scored"] / compose(base).plan.baseline.score_pairs / 3600, abs=1e-3)
    # another truncation than retrieve's: nothing to link
    other = plan.estimate(compose([*base, "evaluate.max_seq_length=128"]))
    assert other["work"]["passages_encoded"]["evaluate"] == 2 * (corpus + rerank)


def test_verify_reports_an_altered_artifact(tmp_path):
    from pipeline.artifacts import StageError
    from pipeline.stages import verify

    with open_stage("toy", {"x": 1}, root=tmp_path) as st:
        (st.path / "out.txt").write_text("hello\n")
    cfg = compose([f"artifacts_root={tmp_path}", "stage=verify"])
    (tmp_path / "cache" / "digests").mkdir(parents=True)
    (tmp_path / "cache" / "digests" / ".lock").write_text("")  # the cache's locks are no stage folders
    assert verify.stage_folders(tmp_path, skip=(tmp_path / "cache",)) == [st.path]
    verify.run(cfg)  # intact: no error
    (st.path / "out.txt").write_text("tampered\n")
    with pytest.raises(StageError, match="problems"):
        verify.run(cfg)


def test_verify_counts_each_kind_of_folder_and_names_each_problem(tmp_path, capsys):
    from pipeline.stages import verify

    with pytest.raises(StageError, match="no artifacts under"):
        verify.run(compose([f"artifacts_root={tmp_path / 'none'}", "stage=verify"]))
    root = tmp_path / "art"
    with open_stage("toy", {"x": 1}, root=root):
        pass
    with open_stage("toy", {"x": 2}, root=root) as damaged:
        (damaged.path / "out.txt").write_text("hello\n")
    (damaged.path / "out.txt").write_text("tampered\n")
    killed = root / "toy" / "killed-0123"  # a stage killed before it wrote anything but its lock
    killed.mkdir()
    (killed / ".lock").write_text("")
    with open_stage("toy", {"x": 3}, root=root) as unmarked:
        pass
    (unmarked.path / "_COMPLETE").unlink()  # a manifest without its marker
    with pytest.raises(StageError, match="^2 problems found"):
        verify.run(compose([f"artifacts_root={root}", "stage=verify"]))
    out = capsys.readouterr().out
    assert f"verify: 4 artifact folders under {root}: 1 intact, 2 with problems, 1 incomplete\n" in out
    assert f"  {damaged.path}/out.txt: altered (sha256 differs from the manifest)\n" in out
    assert f"  {unmarked.path}: no _COMPLETE marker (incomplete)\n" in out
    # a sharded stage's parts carry manifests of their own
    (tmp_path / "sharded" / "retrieve" / "r-1" / "parts" / "0").mkdir(parents=True)
    (tmp_path / "sharded" / "retrieve" / "r-1" / "parts" / "0" / "manifest.json").write_text("{}")
    assert verify.stage_folders(tmp_path / "sharded") == [tmp_path / "sharded" / "retrieve" / "r-1" / "parts" / "0"]


@pytest.mark.parametrize("stage, root, message", [
    ("nope", "", "unknown stage 'nope'"),
    # Hydra makes <artifacts_root>/logs before the stage runs, so a mistyped root existed by then: verify printed
    # "0 artifact folders ... 0 with problems" and exited 0, a pass for an archive it never saw
    ("verify", "typo", "no artifacts under"),
])
def test_cli_refusals_exit_2_in_one_line(tmp_path, stage, root, message):
    proc = subprocess.run([sys.executable, "-m", "pipeline", f"stage={stage}", f"artifacts_root={tmp_path / root}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_plan_counts_every_round_of_iterations(tmp_path):
    """iterations=2 retrieves, scores and trains twice and evaluates three models (v2, v3, v4); each round's
    retrieve shares its corpus encode with the evaluation of the model it retrieves with."""
    from pipeline.stages import plan

    corpus, rerank = 8841823, 41042
    base = ["experiment=v3_distilbert", f"artifacts_root={tmp_path}"]
    one, two = (plan.estimate(compose([*base, f"iterations={n}"]))["work"] for n in (1, 2))
    assert two["passages_encoded"] == {"retrieve": 2 * corpus, "evaluate": corpus + 3 * rerank}
    assert one["passages_encoded"] == {"retrieve": corpus, "evaluate": corpus + 2 * rerank}
    assert two["pairs_scored"] == 2 * one["pairs_scored"] and two["training_triplets"] == 2 * one["training_triplets"]


@pytest.mark.skipif(not (REPO_ROOT.parent / "shared" / "data" / "cranfield").is_dir(),
                    reason="shared Cranfield data not present")
def test_plan_costs_the_teacher_and_every_judged_positive(tmp_path):
    """Cranfield: 135 training queries judge 983 positives, all scored beside the top-30 (4,050 + 983 pairs, the
    score stage's own count being at most that); the teacher the chain trains first is costed too."""
    from pipeline.stages import plan

    est = plan.estimate(compose(["experiment=cranfield", f"artifacts_root={tmp_path}"]))
    work = est["work"]
    assert work["training_queries"] == 135 and work["pairs_scored"] == 135 * 30 + 983
    assert work["teacher_pairs_trained"] == (983 + 135 * 8) * 4  # every positive and 8 negatives a query, 4 epochs
    assert est["gpu_hours"]["baseline"]["this_run"]["teacher"] > 0
    given = plan.estimate(compose(["experiment=v3_distilbert", f"artifacts_root={tmp_path}"]))
    assert given["work"]["teacher_pairs_trained"] == 0  # a published cross-encoder: no teacher


def test_plan_counts_triplets_per_query_capped_by_each_querys_positives(tmp_path):
    from pipeline.stages.plan import _positives_per_query, _triplets_per_epoch

    qrels = tmp_path / "qrels.tsv"  # q1: 3 positives (and a grade-0 judgement), q2: 1, q3: 12
    rows = ["q1 0 a 1", "q1 0 b 2", "q1 0 c 1", "q1 0 d 0", "q2 0 e 1"] + [f"q3 0 p{i} 1" for i in range(12)]
    qrels.write_text("\n".join(rows) + "\n")
    grade1, grade2 = _positives_per_query(str(qrels), 1), _positives_per_query(str(qrels), 2)
    assert _triplets_per_epoch(grade1, 1, 3) == 3          # the published rotation: one per query
    assert _triplets_per_epoch(grade1, 8, 3) == 3 + 1 + 8   # capped at 8, and at each query's positives
    assert _triplets_per_epoch(grade1, None, 3) == 3 + 1 + 12
    assert _triplets_per_epoch(grade2, None, 3) == 1        # only q1's grade-2 passage is a positive
    assert _triplets_per_epoch(None, 8, 500) == 4000        # sizes from the config, no qrels to read


def test_plan_follows_the_settings_that_set_the_work(tmp_path):
    """Each count and cost of the plan moves with the setting that drives it (MS MARCO sizes, no files): every
    round searches the training queries again, score.depth bounds the pairs, data.train.max_queries caps the
    queries, a last partial batch is a step, bi_encoder_cost_factor slows what the bi-encoder does, and a larger
    cross-encoder needs its weights' memory."""
    from pipeline.stages import plan

    base = ["data=msmarco", "model=msmarco_distilbert_v2", f"artifacts_root={tmp_path}"]
    train_q, dev_q = 502939, 6980
    one = plan.estimate(compose(base))
    # each round retrieves for every training query; dev is searched for v2 and each round's model
    assert one["work"]["queries_searched"] == train_q + 2 * dev_q
    assert plan.estimate(compose([*base, "iterations=2"]))["work"]["queries_searched"] == 2 * train_q + 3 * dev_q
    capped = plan.estimate(compose([*base, "data.train.max_queries=1000", "score.depth=10", "train.batch_size=64"]))
    work = capped["work"]
    assert work["training_queries"] == 1000 and work["pairs_scored"] == 1000 * (10 + 1)
    assert one["disk_gb"]["candidates"] > 1 > capped["disk_gb"]["candidates"]  # 100 candidates a query
    steps = work["training_steps"]  # a last, partial batch is a step
    assert work["training_triplets"] % 64 and (steps - 1) * 64 < work["training_triplets"] <= steps * 64
    # a bi-encoder twice distilbert-base's cost: encoding and training take twice as long, scoring as long; and
    # 890M more cross-encoder parameters: at least their bf16 weights more GPU memory to score, none to retrieve
    slow = plan.estimate(compose([*base, "plan.bi_encoder_cost_factor=2", "plan.params_m.cross_encoder=1000"]))
    for which in ("pipeline", "baseline"):
        h1, h2 = one["gpu_hours"][which]["this_run"], slow["gpu_hours"][which]["this_run"]
        assert h2["encode"] == pytest.approx(2 * h1["encode"], rel=1e-2)
        assert h2["train"] == pytest.approx(2 * h1["train"], rel=1e-2)
        assert h2["score"] == h1["score"]
    big, small = slow["peak_gpu_memory_gb"], one["peak_gpu_memory_gb"]
    assert big["score"] - small["score"] >= 890e6 * 2 / 1e9 - 0.1 and big["retrieve"] == small["retrieve"]


def test_an_evaluation_only_plan_encodes_the_corpus_once_per_system(tmp_path):
    from pipeline.stages import plan

    cfg = compose(["experiment=eval_published", f"artifacts_root={tmp_path}"])
    systems, corpus, rerank = len(cfg.evaluate.systems), 8841823, 41042
    assert systems > 1
    work = plan.estimate(cfg)["work"]
    assert work["passages_encoded"] == {"retrieve": 0, "evaluate": systems * (corpus + rerank)}
    assert work["queries_searched"] == systems * 6980 and work["pairs_scored"] == work["training_triplets"] == 0


def test_plan_costs_a_teacher_pair_as_three_scored_pairs(tmp_path):
    """The teacher trains on at most teacher.positives_per_query positives a query (here 3 and 1 judged) and
    teacher.negatives_per_query negatives, each pair costed as three scored pairs (forward and backward)."""
    from pipeline.stages import plan

    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("q1 0 a 1\nq1 0 b 1\nq1 0 c 1\nq2 0 d 1\n")
    base = ["experiment=demo", f"artifacts_root={tmp_path}", f"data.train.qrels={qrels}", "data.train.max_queries=null",
            "teacher.enabled=true", "teacher.epochs=1", "teacher.negatives_per_query=8"]
    work = plan.estimate(compose(base))["work"]
    assert work["training_queries"] == 2 and work["teacher_pairs_trained"] == (3 + 1) + 2 * 8
    one_each = plan.estimate(compose([*base, "teacher.positives_per_query=1"]))["work"]
    assert one_each["teacher_pairs_trained"] == 2 * (1 + 8)
    # the hours: MS MARCO, whose figures are large enough for the rounded hours to compare
    ms = plan.estimate(compose(["data=msmarco", "model=msmarco_distilbert_v2", f"artifacts_root={tmp_path}",
                                "teacher.enabled=true"]))
    hours, work = ms["gpu_hours"]["pipeline"]["this_run"], ms["work"]
    assert hours["teacher"] == pytest.approx(hours["score"] * 3 * work["teacher_pairs_trained"] / work["pairs_scored"],
                                             rel=1e-2)


def test_stage_keys_do_not_follow_where_the_data_lies(tmp_path):
    """The demo data copied elsewhere (node-local scratch, another checkout) keys the same artifacts; a changed
    training file changes the keys of the stages that read it, a changed eval file only evaluate's."""
    import os
    import shutil

    from pipeline.stages import evaluate, retrieve, train

    here = Path(compose(["experiment=demo"]).data.corpus).parent
    there = tmp_path / "copy"
    shutil.copytree(here, there)
    paths = ["corpus=collection.tsv", "train.queries=queries.train.tsv", "train.qrels=qrels.train.tsv",
             "evals.trec_dl.queries=queries.dl.tsv", "evals.trec_dl.qrels=qrels.dl.txt",
             "evals.trec_dl.candidates=top100.dl.tsv", "evals.dev.queries=queries.dev.tsv",
             "evals.dev.qrels=qrels.dev.tsv"]
    base = ["experiment=demo", f"artifacts_root={tmp_path / 'artifacts'}"]
    moved = [*base, *(f"data.{key}={there / name}" for key, name in (p.split("=") for p in paths))]
    assert str(there) in str(compose(moved).data.evals.dev.qrels)

    def keys(overrides):
        cfg = compose(overrides)
        return [config_key(m.identity(cfg)) for m in (retrieve, train, evaluate)]

    assert keys(moved) == keys(base)
    os.utime(there / "qrels.dev.tsv", ns=(1, 1))  # touched: same bytes, another mtime
    assert keys(moved) == keys(base)
    dev = (there / "qrels.dev.tsv").read_text().splitlines()
    (there / "qrels.dev.tsv").write_text("\n".join(dev[:-1]) + "\n")
    changed = keys(moved)
    assert changed[:2] == keys(base)[:2] and changed[2] != keys(base)[2]
    train_qrels = (there / "qrels.train.tsv").read_text().splitlines()
    (there / "qrels.train.tsv").write_text("\n".join(train_qrels[:-1]) + "\n")
    assert all(a != b for a, b in zip(keys(moved), keys(base)))


def test_bookkeeping_settings_change_no_key(tmp_path):
    """How often a run logs or checkpoints, how many checkpoints it keeps, or how strict the judged-passage check
    is change no weight and no retrieved candidate: they must not retrain or re-retrieve. Settings that do (a
    learning rate) still re-key."""
    from pipeline.stages import retrieve, teacher, train

    base = ["experiment=demo", f"artifacts_root={tmp_path}"]

    def keys(*overrides):
        cfg = compose([*base, *overrides])
        return [config_key(m.identity(cfg)) for m in (retrieve, teacher, train)]

    same = keys()
    for bookkeeping in ("train.logging_steps=7", "train.save_steps=3", "train.save_total_limit=5",
                        "train.keep_checkpoints=true", "train.dataloader_workers=2", "teacher.logging_steps=7",
                        "teacher.save_steps=3", "data.max_missing_qrels=0.05"):
        assert keys(bookkeeping) == same, bookkeeping
    assert keys("train.lr=1e-4")[2] != same[2] and keys("teacher.lr=1e-4")[1] != same[1]


@pytest.mark.parametrize("stage,override", [
    ("train", "mine.ce_score_margin=2.0"), ("train", "model.query_prompt='query: '"), ("train", "seed=7"),
    ("train", "train.scale=10"), ("teacher", "model.teacher_base=demo:bi_encoder"), ("teacher", "retrieve.top_k=7"),
    ("teacher", "seed=7"), ("teacher", "teacher.head_lr=0.01"),
])
def test_a_setting_that_changes_the_weights_changes_the_stage_key(stage, override, tmp_path):
    # a key that missed one of these found the old weights complete and reused them
    import importlib

    module = importlib.import_module(f"pipeline.stages.{stage}")
    base = ["experiment=demo", f"artifacts_root={tmp_path}"]
    assert config_key(module.identity(compose([*base, override]))) != config_key(module.identity(compose(base)))


def test_an_evaluation_key_follows_the_model_its_prompts_and_its_length(tmp_path):
    # two models (or prompts, or lengths) sharing one evaluate folder report the first one's figures
    from pipeline.stages import evaluate

    cfg = compose(["experiment=demo", f"artifacts_root={tmp_path}"])
    system = {"name": "v3", "model": "demo:bi_encoder", "similarity": "auto", "query_prompt": None,
              "corpus_prompt": None}
    key = config_key(evaluate.system_identity(cfg, system))
    assert config_key(evaluate.system_identity(cfg, {**system, "model": "demo:cross_encoder_base"})) != key
    assert config_key(evaluate.system_identity(cfg, {**system, "query_prompt": "query: "})) != key
    longer = compose(["experiment=demo", f"artifacts_root={tmp_path}", "evaluate.max_seq_length=32"])
    assert config_key(evaluate.system_identity(longer, system)) != key


def test_ungathered_negatives_under_several_ranks_have_their_own_key(tmp_path):
    # each rank then ranks only its share of the batch: other weights than one process or gathered negatives
    from pipeline.stages import train

    gathered = compose(["experiment=demo", f"artifacts_root={tmp_path}"])
    alone = compose(["experiment=demo", f"artifacts_root={tmp_path}", "train.gather_across_devices=false"])
    assert train.train_identity(gathered, world=4) == train.train_identity(gathered, world=1)
    assert train.train_identity(alone, world=4)["in_batch_group"] == int(alone.train.batch_size) // 4
    assert "in_batch_group" not in train.train_identity(alone, world=1)


def test_plan_counts_a_sample_folder_rather_than_the_sizes_of_the_full_dataset(tmp_path, caplog):
    """data=msmarco pointed at a folder holding a sample (data.root / MSMARCO_DIR) was costed as 8.8M passages and
    502,939 training queries; the files' sizes now tell the sample apart, and a file as large as the sizes say is
    not counted (that takes a minute on MS MARCO's collection)."""
    import gzip
    import random

    from pipeline.stages import plan

    rng = random.Random(0)
    passages = [" ".join(rng.choices(["a", "bb", "ccc", "dddd"], k=rng.randint(20, 60))) for _ in range(97)]
    text = "".join(f"{i}\t{passages[i % 97]}\n" for i in range(100_000))  # ~12 MB, past the 8 MiB sample
    (tmp_path / "collection.tsv").write_text(text)
    (tmp_path / "qrels.train.tsv").write_text("".join(f"{q}\t0\t{q}\t1\n" for q in range(300)))
    (tmp_path / "qrels.dev.small.tsv").write_text("".join(f"{q}\t0\t{q}\t1\n" for q in range(40)))
    base = ["data=msmarco", "model=msmarco_distilbert_v2", f"data.root={tmp_path}"]
    with caplog.at_level("WARNING"):
        work = plan.estimate(compose(base))["work"]
    assert (work["corpus_passages"], work["training_queries"]) == (100_000, 300)
    assert re.search(re.escape(f"data.corpus={tmp_path}/collection.tsv has about ") + r"(99,\d{3}|100,\d{3})"
                     + re.escape(" lines where data.sizes.corpus=8,841,823: counted from the file"), caplog.text)
    assert work["eval_queries"]["dev"]["queries"] == 40  # data.sizes' 6,980 dev queries: the sample's qrels hold 40
    # TREC-DL 2019 in the sample: 5 judged queries of the 6 the top-1000 file ranks, 4 candidates each
    (tmp_path / "2019qrels-pass.txt").write_text("".join(f"{q} 0 {q}0 {q % 4}\n" for q in range(5)))
    (tmp_path / "msmarco-passagetest2019-top1000.tsv").write_text(
        "".join(f"{q}\t{q}{p}\tquery {q}\tpassage {p}\n" for q in range(6) for p in range(4)))
    work = plan.estimate(compose(base))["work"]
    assert work["eval_queries"]["trec_dl19"]["queries"] == 3  # judged with a positive (grade >= 1): 1, 2, 3
    retrieval, rerank = 2 * 100_000, 2 * 5 * 4  # v2 and v3 each encode the corpus and the judged queries' candidates
    assert work["passages_encoded"]["evaluate"] == retrieval + rerank  # data.sizes' 41,042 rerank passages: 20 here
    for sized in (95_000, 110_000):  # within the estimate's error: the data config's count stands, the file unread
        assert plan.estimate(compose([*base, f"data.sizes.corpus={sized}"]))["work"]["corpus_passages"] == sized
    with gzip.open(tmp_path / "collection.tsv.gz", "wt") as fh:
        fh.write(text)
    for name in ("collection.tsv", "collection.tsv.gz"):
        assert plan._estimate_lines(str(tmp_path / name)) == pytest.approx(100_000, rel=0.05)


def test_plan_estimates_a_gzipped_file_from_the_compressed_bytes_its_sample_took(tmp_path):
    """The compressed bytes behind the sampled text were read off the file's position, which gzip's read-ahead moves
    past them (8 KiB on Python 3.11, 128 KiB from 3.12: the sample folder above was estimated at 70,125 lines for
    100,000 there); a well-compressed file was then estimated far short of its lines."""
    import gzip

    from pipeline.stages import plan

    with gzip.open(tmp_path / "collection.tsv.gz", "wt") as fh:  # ~19 MB of text, past the 8 MiB sample
        fh.writelines(f"{i % 10}\t{'x' * 60}\n" for i in range(300_000))
    assert plan._estimate_lines(str(tmp_path / "collection.tsv.gz")) == pytest.approx(300_000, rel=0.01)


def test_plan_refuses_a_bench_file_that_is_not_its_json_in_one_line(tmp_path):
    # the plan names the bench's .txt report as its figures' source; given as plan.bench_json it was a
    # JSONDecodeError traceback (a JSON list: an AttributeError one)
    from pipeline.stages import plan

    for name, text in (("report.txt", "encode  ours  36000 passages/s\n"), ("list.json", "[]")):
        bench = tmp_path / name
        bench.write_text(text)
        cfg = compose(["data=msmarco", f"artifacts_root={tmp_path}", f"plan.bench_json={bench}"])
        with pytest.raises(StageError, match=re.escape(f"plan.bench_json={bench} is not") + ".*bench_gpu.py --out"):
            plan.estimate(cfg)
