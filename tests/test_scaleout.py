"""Scale-out: stop-on-signal at safe points, a sharded multirun through submitit's local launcher, torchrun.

Default suite: the signal machinery in-process, and a real `python -m pipeline stage=score` SIGTERMed between
chunks (it exits by the signal with committed chunks and no _COMPLETE; a rerun finishes with the bytes of an
uninterrupted run). Slow suite: two shards as a submitit-local array == one run; torchrun with two gloo CPU
processes trains and ends within tolerance of a one-process run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import signals
from pipeline.artifacts import MARKER, config_key, is_complete, read_manifest
from pipeline.config import REPO_ROOT, compose
from pipeline.stages import retrieve, score

N_QUERIES = 12
TOP_K = 6
CHUNK = 12


@pytest.fixture(scope="module")
def setup(demo_stage_overrides):
    return [*demo_stage_overrides(max_queries=N_QUERIES, top_k=TOP_K), "retrieve.query_block=4",
            f"score.chunk_pairs={CHUNK}", "tracking=none"]


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    """retrieve + score in this process: the reference for every scale-out path."""
    root = tmp_path_factory.mktemp("scaleout_single")
    r = retrieve.run(compose([*setup, f"artifacts_root={root}"]))
    s = score.run(compose([*setup, f"artifacts_root={root}"]))
    return SimpleNamespace(root=root, retrieve=r, score=s)


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------------------- signals in-process


def test_signal_is_deferred_to_the_safe_point_then_handed_to_the_previous_handler():
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))  # stands in for submitit's handler
    try:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGUSR1)
            assert seen == [] and signals.requested() == signal.SIGUSR1  # only recorded
            signals.stop_if_requested()
            assert seen == [signal.SIGUSR1]  # re-delivered to the previous handler
            # it returned (carry on): ours are installed again and the flag is cleared
            assert signals.requested() is None and signal.getsignal(signal.SIGUSR1) is signals._record
            os.kill(os.getpid(), signal.SIGUSR1)
            assert seen == [signal.SIGUSR1]
        # a signal recorded after the last safe point is re-delivered when the block is left
        assert seen == [signal.SIGUSR1, signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is not signals._record
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_nested_blocks_restore_only_at_the_outermost():
    before = signal.getsignal(signal.SIGTERM)
    with signals.deferred():
        with signals.deferred():
            assert signal.getsignal(signal.SIGTERM) is signals._record
        assert signal.getsignal(signal.SIGTERM) is signals._record
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_carried_on_signal_in_nested_blocks_keeps_them_deferred_until_the_outermost():
    """deferred() is re-entrant (a deferred function called inside another's block). A previous handler that lets the
    work go on (submitit's for SIGTERM) at a safe point in the inner block: leaving that block must not put the
    previous handlers back while the outer one still works, or a later signal would act mid-chunk there."""
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with signals.deferred():
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGUSR1)
                signals.stop_if_requested()
                assert seen == [signal.SIGUSR1]
            assert signal.getsignal(signal.SIGUSR1) is signals._record  # the outer block still defers
            os.kill(os.getpid(), signal.SIGUSR1)
            assert seen == [signal.SIGUSR1]
        assert seen == [signal.SIGUSR1, signal.SIGUSR1] and signal.getsignal(signal.SIGUSR1) is not signals._record
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_a_handler_python_cannot_see_is_put_back_as_the_default_action(monkeypatch):
    """signal.getsignal answers None for a handler installed outside Python (a launcher's C library): leaving the
    block sets the default action (the signal ends the process) rather than failing on signal.signal(sig, None)."""
    real = signal.getsignal
    before = {sig: real(sig) for sig in signals.SIGNALS}
    monkeypatch.setattr(signal, "getsignal", lambda sig: None)
    try:
        with signals.deferred():
            monkeypatch.setattr(signal, "getsignal", real)
        assert all(signal.getsignal(sig) is signal.SIG_DFL for sig in signals.SIGNALS)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_training_that_raises_puts_the_handlers_back(monkeypatch):
    """The stop callback installs the flag-setters at on_train_begin and removes them at on_train_end, which a
    training that raises never reaches: the handlers from before are back all the same, and a stop request recorded
    before the error is handed to them (a preemption that broke another rank's collective still requeues)."""
    received = []

    def mine(signum, frame):  # a handler to recognise, which lets the process live (as submitit's SIGTERM one)
        received.append(signum)

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            with signals.training():
                signals.stop_callback().on_train_begin(None, None, None)
                assert signal.getsignal(signal.SIGUSR1) is not mine
                os.kill(os.getpid(), signal.SIGUSR1)
                raise RuntimeError("out of memory")
        assert signal.getsignal(signal.SIGUSR1) is mine and received == [signal.SIGUSR1]
        assert signals.requested() is None
        with pytest.raises(RuntimeError):  # no request: nothing is sent
            with signals.training():
                signals.stop_callback().on_train_begin(None, None, None)
                raise RuntimeError("a bug")
        assert signal.getsignal(signal.SIGUSR1) is mine and received == [signal.SIGUSR1]
        with signals.training():  # a training that ends normally: on_train_end uninstalled, nothing is left to do
            callback = signals.stop_callback()
            callback.on_train_begin(None, None, None)
            callback.on_train_end(None, None, None)
        assert signal.getsignal(signal.SIGUSR1) is mine
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_signal_on_any_rank_stops_every_rank_at_the_same_step(monkeypatch):
    """Under torchrun a signal may reach some ranks only: the ranks agree through an all_reduce, so every rank saves
    and stops at the same step (one that trained on would hang in the next collective), and a rank that got none
    records a SIGTERM, so it ends by the signal like the others instead of carrying on."""
    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState

    from pipeline.artifacts import StageError

    other_rank = {"flag": 0}

    def all_reduce(tensor, op):  # two ranks: this one and one whose flag the test sets
        pair = [int(tensor.item()), other_rank["flag"]]
        tensor.fill_({dist.ReduceOp.MAX: max(pair), dist.ReduceOp.MIN: min(pair)}.get(op, sum(pair)))

    for name, fake in (("is_available", lambda: True), ("is_initialized", lambda: True),
                       ("get_world_size", lambda group=None: 2), ("get_backend", lambda group=None: "gloo"),
                       ("all_reduce", all_reduce)):
        monkeypatch.setattr(dist, name, fake)
    monkeypatch.setattr(signals, "_stopped_at", None)
    seen = []
    old = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))  # stands in for submitit's handler
    try:
        callback = signals.stop_callback()
        callback.on_train_begin(None, TrainerState(), TrainerControl())
        assert not callback.on_step_end(None, TrainerState(global_step=3), TrainerControl()).should_training_stop
        other_rank["flag"] = 1
        control = callback.on_step_end(None, TrainerState(global_step=4), TrainerControl())
        assert control.should_save and control.should_training_stop and signals.requested() == signal.SIGTERM
        callback.on_train_end(None, TrainerState(), TrainerControl())
        assert seen == [signal.SIGTERM]
        with pytest.raises(StageError, match="stopped by a signal at step 4"):
            signals.raise_if_training_stopped("train")
    finally:
        signal.signal(signal.SIGTERM, old)


def test_prepare_trainer_logs_effective_batch_and_gathers_only_with_several_ranks():
    loss = SimpleNamespace(gather_across_devices=False)
    callbacks = []
    trainer = SimpleNamespace(loss=loss, add_callback=callbacks.append,
                              args=SimpleNamespace(world_size=4, per_device_train_batch_size=16,
                                                   gradient_accumulation_steps=2))
    info = signals.prepare_trainer(trainer, gather_across_devices=True)
    assert info["effective_batch_size"] == 128 and loss.gather_across_devices is True
    assert info["in_batch_negatives_per_query"] == 2 * 16 * 4 - 1
    assert type(callbacks[0]).__name__ == "StopOnSignal"
    trainer.args.world_size = 1
    signals.prepare_trainer(trainer, gather_across_devices=True)
    assert loss.gather_across_devices is False  # one rank: nothing to gather (and no library warning)
    losses = {"a": SimpleNamespace(gather_across_devices=False), "b": SimpleNamespace(gather_across_devices=False)}
    trainer.loss, trainer.args.world_size = losses, 2  # a trainer given one loss per data set
    signals.prepare_trainer(trainer, gather_across_devices=True)
    assert all(one.gather_across_devices for one in losses.values())


def test_rank_0_failing_while_the_others_wait_tells_them(monkeypatch):
    """Under torchrun the other ranks wait for rank 0's word before training (its evaluation, up to hours) and
    after it (its save): a rank 0 that fails at either point tells them, so they stop with its error instead of
    waiting out CONTROL_TIMEOUT_S; while they train beside it there is nothing to tell (torchrun ends them)."""
    import torch.distributed as dist

    from pipeline import distributed

    sent: list[dict] = []
    for name, fake in (("is_initialized", lambda: True), ("get_rank", lambda group=None: 0),
                       ("get_world_size", lambda group=None: 2), ("new_group", lambda **kwargs: "control"),
                       ("barrier", lambda group=None: None), ("destroy_process_group", lambda: None)):
        monkeypatch.setattr(dist, name, fake)
    monkeypatch.setattr(distributed.Coordinator, "_broadcast", lambda self, message: sent.append(message) or message)

    def errors_told(steps: list[str]) -> list[dict]:
        sent.clear()
        with pytest.raises(RuntimeError, match="disk full"):
            with distributed.coordinator("cpu") as coord:
                for step in steps:
                    coord.training_done() if step == "training_done" else coord.tell(step)
                raise RuntimeError("disk full")
        return [m for m in sent if m["action"] == "error"]

    before = errors_told([])  # the evaluation before training failed
    assert len(before) == 1 and "RuntimeError: disk full" in before[0]["message"]
    assert errors_told(["train"]) == []  # during training the followers are not listening
    after = errors_told(["train", "training_done"])  # the save after training failed
    assert len(after) == 1 and "disk full" in after[0]["message"]
    assert errors_told(["skip"]) == []  # told already: the followers have left

    follower = distributed.Coordinator(rank=1, world=2, group="control")
    monkeypatch.setattr(distributed.Coordinator, "_broadcast",
                        lambda self, message: {"action": "error", "message": "disk full"})
    with pytest.raises(distributed.FollowerError, match="rank 0 failed, so rank 1 stops too: disk full"):
        follower.listen()


def test_rotation_sampler_gives_each_rank_its_slice_of_the_single_process_batches():
    """Through accelerate's own BatchSamplerShard (what the trainer wraps a batch sampler in under DDP): at every
    step rank r gets slice r of the batch one process would train on, equal slices, no row twice; a block's short
    last batch keeps its first len - len % world rows."""
    from accelerate.data_loader import BatchSamplerShard
    from datasets import Dataset

    from pipeline.stages.train import RotationBatchSampler

    n, blocks = 13, 2
    ds = Dataset.from_dict({"query": [f"q{i % n}" for i in range(n * blocks)],
                            "positive": [f"p{i % n}" for i in range(n * blocks)],
                            "negative": [f"n{i}" for i in range(n * blocks)]})
    one = list(RotationBatchSampler(ds, 8, False, seed=5, block_size=n))
    assert [len(b) for b in one] == [8, 5, 8, 5]
    two = RotationBatchSampler(ds, 8, False, seed=5, block_size=n, world_size=2)
    assert two.batch_size is None and len(two) == 2 * len(one)
    ranks = [list(BatchSamplerShard(two, num_processes=2, process_index=r, split_batches=False, even_batches=False))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for step, batch in enumerate(one):
        a, b = ranks[0][step], ranks[1][step]
        assert len(a) == len(b) == len(batch) // 2 and a + b == batch[:len(a) * 2]
    assert two.rows_left_out == 2  # the 5-row batches lose 1 row each


# --------------------------------------------------------------------------------------------- SIGTERM mid-stage


def test_shards_side_by_side_on_one_node_take_one_gpu_each(monkeypatch):
    """device auto (or cuda) in shard i of n on a node whose process sees g GPUs: cuda:(i mod g), made current;
    one GPU visible (a Slurm array task), an explicit index, or no sharding: unchanged."""
    import torch

    from pipeline.stages import common

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: current.append(i))
    gpus = {"n": 4}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus["n"])

    def device(**over):
        return common.stage_device(compose([f"{k.replace('_', '.', 1)}={v}" for k, v in over.items()]))

    assert [device(shard_count=8, shard_index=i) for i in range(8)] == [f"cuda:{i % 4}" for i in range(8)]
    assert current == [0, 1, 2, 3, 0, 1, 2, 3]
    assert device(shard_count=8, shard_index=5, device="cuda") == "cuda:1"
    current.clear()
    assert device(shard_count=8, shard_index=5, device="cuda:3") == "cuda:3"  # an explicit GPU is kept
    assert device(shard_count=1, shard_index=0) == "cuda" and device(device="cpu", shard_count=8) == "cpu"
    gpus["n"] = 1
    assert device(shard_count=8, shard_index=5) == "cuda" and current == []


def _score_past_its_first_chunk(setup, single, root: Path, **pipes) -> tuple[subprocess.Popen, Path, list[str]]:
    """A CLI score run on a copy of the retrieve result, once it has committed a chunk (and sleeps after it: 2 s,
    so that a test process the machine's load holds back still signals it before the next chunk; 0.5 s was not
    enough for the floors run of CI beside another test run, where the stage finished first)."""
    shutil.copytree(single.retrieve, root / "retrieve" / single.retrieve.name)
    overrides = [*setup, f"artifacts_root={root}"]
    key = config_key(score.identity(compose(overrides)))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "stage=score", *overrides, "score.debug_sleep_s=2"],
                            cwd=REPO_ROOT, env=_env(), **pipes)
    folder = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        folder = next(iter((root / "score").glob(f"*-{key}")), None)
        if folder is not None and any((folder / "blocks").glob("chunk-*.parquet")):
            break
        time.sleep(0.02)
    return proc, folder, overrides


def test_sigterm_commits_a_chunk_exits_and_the_rerun_finishes_identically(setup, single, tmp_path):
    proc, folder, overrides = _score_past_its_first_chunk(setup, single, tmp_path, stdout=subprocess.DEVNULL,
                                                          stderr=subprocess.PIPE)
    assert proc.poll() is None, f"score ended before the signal: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGTERM)  # lands in the debug sleep: after a commit, before the next chunk
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err.decode()[-2000:]
    assert "caught SIGTERM" in err.decode()
    committed = len(list((folder / "blocks").glob("chunk-*.parquet")))
    total = -(-read_manifest(single.score)["counts"]["pairs"] // CHUNK)
    assert 0 < committed < total and not (folder / MARKER).exists()
    assert not list(folder.rglob(".tmp-*")), "a half-written file was left behind"

    resumed = score.run(compose(overrides))
    assert resumed == folder and is_complete(resumed)
    assert (resumed / "scores.parquet").read_bytes() == (single.score / "scores.parquet").read_bytes()
    counts = read_manifest(resumed)["counts"]
    assert counts["pairs_scored"] + counts["pairs_from_cache"] == counts["pairs"] - committed * CHUNK


def test_ctrl_c_says_how_to_resume_without_a_traceback(setup, single, tmp_path):
    proc, folder, _ = _score_past_its_first_chunk(setup, single, tmp_path, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT)
    assert proc.poll() is None, f"score ended before the signal: {proc.stdout.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130 and "Traceback" not in out, out[-2000:]
    assert "interrupted: nothing was marked complete that had not finished; run the same command again" in out
    assert not (folder / MARKER).exists()


# --------------------------------------------------------------------------------------------- submitit local


def _stage_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.suffix in (".parquet", ".trec")}


@pytest.mark.slow
def test_two_shard_multirun_through_submitit_local_equals_one_run(setup, single, tmp_path):
    root = tmp_path
    for stage in ("retrieve", "score"):
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "-m", "hydra/launcher=local", f"stage={stage}", "shard.count=2",
             "shard.index=range(2)", *setup, f"artifacts_root={root}", "lock_wait_s=120",
             "hydra.launcher.timeout_min=10"],
            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        expected = single.retrieve if stage == "retrieve" else single.score
        merged = root / stage / expected.name
        assert is_complete(merged), f"{stage}: no merged result after the array ({proc.stderr[-2000:]})"
        assert _stage_files(merged) == _stage_files(expected)
        manifest = read_manifest(merged)
        assert manifest["extra"]["merged_parts"] == 2
        parts = sorted((merged / "parts").glob("shard-*"))
        assert [p.name.split("-")[1] for p in parts] == ["0", "1"] and all(is_complete(p) for p in parts)
    # both jobs ran through submitit (its per-job folders hold the logs)
    assert list((root / "logs" / "multirun").rglob(".submitit/*/*_log.out"))


def test_the_slurm_launcher_writes_the_sbatch_script_the_docs_promise(tmp_path):
    """hydra/launcher=slurm through the installed hydra-submitit-launcher and submitit, up to sbatch (a stand-in on
    PATH that keeps the script and refuses the job): what conf/hydra/launcher/slurm.yaml and docs/scale-out.md
    promise is in it (an array of shards at most array_parallelism at once, the signal before the time limit that
    commits the chunk in flight, --requeue, the setup lines), and overrides on the command line reach it. No test
    ran this launcher before: a key submitit did not take would have shown only on a cluster."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "sbatch-scripts"
    bin_dir.mkdir()
    kept.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {kept}/\necho "sbatch: error: stand-in" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit's test for a Slurm cluster
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(_env(), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "-m", "hydra/launcher=slurm", "stage=score", "experiment=demo",
         "shard.count=3", "shard.index=range(3)", f"artifacts_root={tmp_path / 'artifacts'}",
         f"hydra.sweep.dir={tmp_path / 'multirun'}", "hydra.launcher.partition=gpu-long",
         "hydra.launcher.array_parallelism=2", "+hydra.launcher.additional_parameters.constraint=h100",
         "hydra.launcher.setup=[module load cuda/12.4]"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "sbatch: error: stand-in" in proc.stderr, proc.stderr[-3000:]
    script = next(kept.iterdir()).read_text()
    sbatch = {line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH ")}
    assert {"--array=0-2%2", "--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=8", "--mem=64GB",
            "--time=240", "--signal=USR2@120", "--requeue", "--job-name=v3-score", "--partition=gpu-long",
            "--constraint=h100"} <= sbatch, script
    assert script.index("module load cuda/12.4") < script.index("srun ")


# --------------------------------------------------------------------------------------------- torchrun


@pytest.fixture(scope="module")
def no_dropout(setup, tmp_path_factory):
    """The chain up to mine with a dropout-free copy of the tiny bi-encoder, so that two runs on the same batches
    differ only by floating-point summation order (dropout masks would differ between one process and two)."""
    from pipeline.stages import mine

    src = Path(setup[4].split("=", 1)[1])
    model = tmp_path_factory.mktemp("no_dropout") / "model"
    shutil.copytree(src, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config, indent=2))
    overrides = [o if not o.startswith("model.bi_encoder=") else f"model.bi_encoder={model}" for o in setup]
    root = tmp_path_factory.mktemp("no_dropout_chain")
    stages = {s: m.run(compose([*overrides, f"artifacts_root={root}", "mine.ce_score_margin=null"]))
              for s, m in (("retrieve", retrieve), ("score", score), ("mine", mine))}
    return SimpleNamespace(overrides=overrides, model=model, stages=stages)


def _train_overrides(overrides, root: Path, batch: int, *extra: str) -> list[str]:
    # two epochs of the 12 queries (batches of 8 and 4 rows each) cut at 3 steps: max_steps never replays a pass
    return [*overrides, f"artifacts_root={root}", "mine.ce_score_margin=null", "stage=train", "train.epochs=2",
            f"train.batch_size={batch}", "train.max_steps=3", "train.save_steps=100", "train.evaluate=false",
            "train.precision=fp32", "train.lr=1e-3", "train.warmup_steps=0", "train.logging_steps=1",
            "cpu_threads=1", *extra]


def _torchrun(nproc: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
            "-m", "pipeline"]


def _train_in(root: Path, chain: SimpleNamespace, cmd: list[str], overrides: list[str]):
    for stage, src in chain.stages.items():
        if not (root / stage / src.name).exists():
            shutil.copytree(src, root / stage / src.name)
    return subprocess.run([*cmd, *overrides], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.slow  # 25 s (three CLI runs, two under torchrun): .ci/run runs it by name after the suite
def test_torchrun_two_gloo_processes_match_one_process(no_dropout, tmp_path):
    """`train.batch_size` is the batch of one optimizer step: two ranks take 4 rows each of the very 8-row
    no-duplicates batches one process trains on, gather each other's in-batch negatives and average their
    gradients, so both runs compute the same loss over the same 8 rows at every step. Without dropout they differ
    only by floating-point summation order. Measured on this setup before session 15, whose third step replayed
    the pass of one epoch (3 steps, embeddings of 3 texts; `moved` = how
    far training moved them, 0.194): this run 4e-6 (2e-5 x moved), loss curves equal to 6 digits; with the
    faults this test must catch -- both ranks on the same slice 0.90 x moved (first loss 2.773 vs 2.734),
    no gradient all-reduce 2.1 x moved (second loss 1.643 vs 1.952), ungathered negatives
    (gather_across_devices=false) 0.83 x moved (first loss 2.098). The tolerances (1% of moved, loss rtol 1e-3)
    sit 500x above the noise and 80x below the smallest fault. Both runs share one key (the world size is not
    part of it), rank 0 alone writes the folder, and a torchrun rerun skips on every rank."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from pipeline.artifacts import verify_folder

    out = {}
    for name, cmd in (("single", [sys.executable, "-m", "pipeline"]), ("ddp", _torchrun(2, 29531))):
        root = tmp_path / name
        proc = _train_in(root, no_dropout, cmd, _train_overrides(no_dropout.overrides, root, 8))
        assert proc.returncode == 0, proc.stderr[-4000:]
        folders = list((root / "train").iterdir())
        assert len(folders) == 1 and is_complete(folders[0]) and verify_folder(folders[0]) == []
        out[name] = SimpleNamespace(folder=folders[0], manifest=read_manifest(folders[0]),
                                    metrics=json.loads((folders[0] / "metrics.json").read_text()))
    assert out["ddp"].folder.name == out["single"].folder.name  # same config, same key, whatever the world size
    ddp = out["ddp"].manifest["extra"]["scale_out"]
    assert (ddp["world_size"], ddp["per_device_batch_size"], ddp["effective_batch_size"]) == (2, 4, 8)
    assert ddp["in_batch_negatives_per_query"] == 15  # 8 positives + 8 negatives gathered from both ranks, minus 1
    one = out["single"].manifest["extra"]["scale_out"]
    assert (one["world_size"], one["effective_batch_size"]) == (1, 8)
    assert out["ddp"].metrics["train"]["steps"] == out["single"].metrics["train"]["steps"] == 3
    assert out["ddp"].metrics["train"]["effective_batch_size"] == 8
    curves = [[h["loss"] for h in out[n].metrics["train"]["loss_curve"]] for n in ("single", "ddp")]
    assert len(curves[0]) == len(curves[1]) == 3
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-3, atol=1e-4)

    texts = ["how long do cats live", "what is the capital of france", "symptoms of flu"]
    a = SentenceTransformer(str(out["single"].folder / "model"), device="cpu").encode(texts)
    b = SentenceTransformer(str(out["ddp"].folder / "model"), device="cpu").encode(texts)
    base = SentenceTransformer(str(no_dropout.model), device="cpu").encode(texts)
    moved = float(np.abs(a - base).max())
    assert moved > 1e-3, "training did not change the model"
    assert float(np.abs(a - b).max()) < 0.01 * moved, (float(np.abs(a - b).max()), moved)

    # a rerun under torchrun finds the folder complete: every rank skips and exits 0
    again = _train_in(tmp_path / "ddp", no_dropout, _torchrun(2, 29532),
                      _train_overrides(no_dropout.overrides, tmp_path / "ddp", 8))
    assert again.returncode == 0, again.stderr[-4000:]
    assert "complete result found" in again.stdout + again.stderr
    assert read_manifest(out["ddp"].folder) == out["ddp"].manifest


def test_under_torchrun_other_stages_and_uneven_batches_are_refused_at_once(setup, tmp_path, monkeypatch):
    """With torchrun's environment (WORLD_SIZE > 1) every stage but train stops with one clear line before it
    touches a folder (instead of a lock refusal on rank 1), and a train batch that does not split evenly across
    the ranks is refused before any work."""
    from pipeline.artifacts import StageError
    from pipeline.cli import run as run_stage
    from pipeline.stages import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for stage in ("retrieve", "score", "mine", "evaluate", "all"):
        with pytest.raises(StageError, match=f"stage={stage} does not run under torchrun"):
            run_stage(compose([*setup, f"artifacts_root={tmp_path}", f"stage={stage}"]))
    with pytest.raises(StageError, match="must be a positive multiple of 2"):
        run_stage(compose([*setup, f"artifacts_root={tmp_path}", "stage=train", "train.batch_size=7"]))
    assert not any(tmp_path.iterdir())
    assert train.per_device_batch_size(64, 8) == 8 and train.per_device_batch_size(7, 1) == 7


@pytest.mark.slow
def test_sigterm_to_a_split_encode_stops_its_processes_at_a_chunk(tmp_path):
    """evaluate.devices=[cpu,cpu] with the signal sent to the parent alone (submitit's local executor, a kill by
    pid): the encoding processes commit their chunk in progress and stop, the parent exits by the signal without
    waiting for their whole ranges, and the rerun encodes only what is missing."""
    args = [sys.executable, "-m", "pipeline", "experiment=demo", "stage=evaluate", f"artifacts_root={tmp_path}",
            "evaluate.bm25=false", "evaluate.devices=[cpu,cpu]", "evaluate.corpus_chunk=8", "token_cache=false"]
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marks = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not marks:
        marks = list((tmp_path / "evaluate").glob("*/corpus_emb.chunks/rows-*.done"))
        time.sleep(0.05)
    assert proc.poll() is None and marks, f"no chunk committed before the end: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err.decode()[-2000:]
    folder = marks[0].parents[1]
    committed = len(list((folder / "corpus_emb.chunks").glob("rows-*.done")))
    # stopped well before the end of the ranges: the encode unfinished (a finished one renames its file and drops
    # its chunk markers), part of it committed
    assert 0 < committed < -(-2989 // 8) and not (folder / "corpus_emb.f16.npy").exists()
    assert not (folder / MARKER).exists()

    rerun = subprocess.run(args, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert is_complete(folder) and read_manifest(folder)["counts"]
