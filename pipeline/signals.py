"""Preemption and time limits: stop at a safe point, then let the scheduler's own handler decide.

Slurm (through submitit) warns a job with SIGUSR2 `signal_delay_s` before its time limit, and preemption or
`scancel` sends SIGTERM; torchrun forwards SIGTERM to its workers. Acting inside the handler would tear a
chunk in half, so the handlers here only record the signal. The stages call `stop_if_requested()` right after a
chunk or block is committed (score, retrieve) or after a checkpoint is saved (train). That puts back the
handlers that were there before (submitit's, which requeues the job and exits; or the default action, which
ends the process) and sends the signal again to this process, so the requeued job resumes from the committed
chunks and nothing is marked complete.

Usage in a stage::

    @signals.deferred()
    def _work(...):
        for chunk in todo:
            ...commit chunk...
            signals.stop_if_requested()

`deferred()` is re-entrant and puts the previous handlers back when it is left; a signal that arrived after the
last safe point is re-delivered then, so the process never swallows a stop request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))

_lock = threading.RLock()
_depth = 0
_previous: dict[int, Any] = {}
_requested: int | None = None


def _record(signum: int, frame: Any) -> None:
    global _requested
    _requested = signum
    # logging takes locks, which a handler interrupting a log call would deadlock on: stderr write only
    with contextlib.suppress(OSError):
        os.write(2, f"pipeline: caught {signal.Signals(signum).name}; stopping after the chunk in progress "
                    f"is committed\n".encode())


def requested() -> int | None:
    """The signal recorded since the handlers were installed (None: keep working)."""
    return _requested


def request(signum: int = signal.SIGTERM) -> None:
    """Record a stop as if `signum` had arrived (a rank told by another rank, say)."""
    global _requested
    _requested = int(signum)


def install() -> bool:
    """Replace the SIGTERM/SIGUSR1/SIGUSR2 handlers by flag-setters, remembering the current ones. Only the
    main thread may set handlers; elsewhere this does nothing and returns False."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        return False
    with _lock:
        if _depth == 0:
            for sig in SIGNALS:
                _previous[sig] = signal.getsignal(sig)
                signal.signal(sig, _record)
        _depth += 1
    return True


def uninstall() -> None:
    """Leave one `install()` level; the last one puts the previous handlers back and re-delivers a stop
    request that no safe point acted upon."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth:
            return
        _restore()
    if _requested is not None:
        _redeliver()


def _restore() -> None:
    for sig, handler in _previous.items():
        # None: a handler installed outside Python that cannot be put back; the default action is the safe stand-in
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _previous.clear()


def _redeliver() -> None:
    global _requested
    signum, _requested = _requested, None
    if signum is None:
        return
    log.warning("stopping at a safe point on %s: everything up to here is committed; a rerun (or the requeued "
                "job) resumes from it", signal.Signals(signum).name)
    # os.kill runs the Python handler before returning: submitit's raises SystemExit after requeueing, the default
    # action ends the process here. A handler that returns (submitit bypasses SIGTERM) lets the work go on.
    os.kill(os.getpid(), signum)


def stop_if_requested() -> None:
    """A safe point: when a signal was recorded, put back the previous handlers and send it again. If the
    previous handler lets the process live, our handlers are installed again and the work continues."""
    global _depth
    if _requested is None or threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        depth, _depth = _depth, 0
        if depth:
            _restore()
    _redeliver()
    if depth:  # still alive: the previous handler chose to carry on
        install()
        with _lock:
            _depth = depth


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Signals only recorded inside (also a decorator); the previous handlers are back when it is left."""
    installed = install()
    try:
        yield
    finally:
        if installed:
            uninstall()


# --------------------------------------------------------------------------------------------- training


def _world_size() -> int:
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    return 1


def _any_rank_requested() -> bool:
    """Whether any rank recorded a signal; every rank must stop at the same step or the collective ops hang."""
    local = _requested is not None
    if _world_size() == 1:
        return local
    import torch
    import torch.distributed as dist

    device = "cpu"
    if dist.get_backend() == "nccl":
        device = f"cuda:{torch.cuda.current_device()}"
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


_stopped_at: int | None = None


def raise_if_training_stopped(stage: str) -> None:
    """Training that a signal stopped (its checkpoint saved) is never saved as the final model, even when the
    signal's own handler let the process live (submitit logs and ignores SIGTERM): the next run resumes."""
    from pipeline.artifacts import StageError

    if _stopped_at is not None:
        raise StageError(f"{stage}: stopped by a signal at step {_stopped_at} (checkpoint saved); nothing was marked "
                         f"complete, the next run resumes from checkpoints/checkpoint-{_stopped_at}")


def stop_callback():
    """A transformers TrainerCallback: on a signal, save a checkpoint at the end of the current step and stop;
    when training ends that way the signal is re-delivered, so the stage is never marked complete and the
    next run (the requeued job) resumes from that checkpoint."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            global _stopped_at
            _stopped_at = None
            install()

        def on_step_end(self, args, state, control, **kwargs):
            global _stopped_at
            if _any_rank_requested():
                if _requested is None:
                    request(signal.SIGTERM)
                _stopped_at = int(state.global_step)
                log.warning("training: stop requested at step %d: saving a checkpoint, then stopping",
                            state.global_step)
                control.should_save = True
                control.should_training_stop = True
            if control.should_save:
                # the loss up to every checkpoint is in the log history it saves, so a resumed run's mean loss
                # can count the steps before the checkpoint (train.whole_run_loss)
                control.should_log = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            uninstall()  # re-delivers a recorded signal

    return StopOnSignal()


@contextlib.contextmanager
def training() -> Iterator[None]:
    """Around ``trainer.train()``: when training raises, the stop callback's on_train_end never runs, and the
    handlers its on_train_begin installed would stay for the rest of the process (a later run in it, a test, a
    notebook, would never get its signals). They are put back, and a stop request recorded before the error is
    handed on: a preemption that broke a collective on another rank still reaches submitit's requeue handler."""
    global _depth
    depth = _depth
    try:
        yield
    except BaseException as exc:
        if threading.current_thread() is threading.main_thread():
            with _lock:
                unwound = _depth > depth
                if unwound:
                    _depth = depth
                    if depth == 0:
                        _restore()
            if unwound and depth == 0 and _requested is not None:
                log.error("training stopped by an error after a stop request: %s", str(exc).splitlines()[0][:300]
                          if str(exc) else type(exc).__name__)
                _redeliver()
        raise


def prepare_trainer(trainer: Any, *, gather_across_devices: bool = True) -> dict[str, int]:
    """Scale-out settings of a SentenceTransformerTrainer built by the train stage: the stop-on-signal callback,
    in-batch negatives gathered across ranks (MultipleNegativesRankingLoss.gather_across_devices, only when
    there is more than one rank), and the effective batch size, logged and returned."""
    trainer.add_callback(stop_callback())
    args = trainer.args
    world = int(getattr(args, "world_size", 1) or 1)
    losses = trainer.loss.values() if isinstance(trainer.loss, dict) else [trainer.loss]
    gathered = bool(gather_across_devices) and world > 1
    for loss in losses:
        if hasattr(loss, "gather_across_devices"):
            loss.gather_across_devices = gathered
    per_device = int(args.per_device_train_batch_size)
    accum = int(args.gradient_accumulation_steps)
    info = {"per_device_batch_size": per_device, "world_size": world, "gradient_accumulation_steps": accum,
            "effective_batch_size": per_device * world * accum,
            "in_batch_negatives_per_query": (per_device * (world if gathered else 1)) * 2 - 1}
    log.info("train: effective batch %d = %d per device x %d ranks x %d accumulation; in-batch negatives "
             "gathered across ranks: %s (%d candidates per query)", info["effective_batch_size"], per_device, world,
             accum, gathered, info["in_batch_negatives_per_query"])
    return info
