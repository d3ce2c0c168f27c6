"""The shared training loop: drives a jitted `step_fn`, logs, checks for NaN/Inf, checkpoints."""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np

from research.train.checkpoint import Checkpointer
from research.runs.metrics import MetricsLogger, ProgressBar
from research.train.state import TrainState

PyTree = Any
StepFn = Callable[[TrainState, PyTree], tuple[TrainState, Mapping[str, jax.Array]]]
EvalFn = Callable[[TrainState, int], Mapping[str, Any]]


def _make_iterator(batch_iter, start_step: int) -> Iterator:
    if callable(batch_iter):
        return iter(batch_iter(start_step))
    if isinstance(batch_iter, Iterable):
        return iter(batch_iter)
    raise TypeError("batch_iter must be an iterable of batches or a callable start_step -> iterable, "
                    f"got {type(batch_iter).__name__}")


def train_loop(state: TrainState, step_fn: StepFn, batch_iter, *, num_steps: int, run_dir: str | os.PathLike,
               checkpointer: Checkpointer | None = None, log_every: int = 50, logger: MetricsLogger | None = None,
               eval_fn: EvalFn | None = None, eval_every: int | None = None, progress: bool = True,
               watch: str = "loss") -> TrainState:
    """Runs `step_fn` from `state.step` until `num_steps` total steps; returns the final state.

    Args:
      state: the (possibly restored) train state, any pytree with an int `step` (a `TrainState`, a
        `research.train.multi.MultiTrainState`); the loop resumes nothing by itself.
      step_fn: `step(state, batch) -> (state, metrics)` (see `make_train_step`, `make_multi_train_step`);
        metrics must contain the watched metric `watch`.
      batch_iter: either a callable `start_step -> iterable of batches`, called with `state.step` so a
        resumed run sees exactly the batches it would have seen (e.g.
        `lambda s: batch_iterator(arrays, bs, key=k, start_step=s)`), or an iterable already positioned
        at `state.step` (used as is).
      num_steps: total number of steps of the run (not the number still to do).
      run_dir: directory of the run; metrics go to `<run_dir>/metrics.jsonl` unless `logger` is given.
      checkpointer: saves every `checkpointer.save_every` steps and at the end.
      log_every: metrics are fetched to the host only every `log_every` steps (and at checkpoint/eval
        steps and the end); the logged record is the last step's metrics plus `loss_mean` over the window
        and `steps_per_sec` (`<watch>_mean` when `watch` is not "loss").
      eval_fn: `eval_fn(state, step) -> dict` called every `eval_every` steps and at the end; its dict is
        logged with an `eval/` prefix.
      watch: the metric checked for NaN/Inf and averaged over the window, e.g. "generator/loss" for a
        multi-model step.

    Raises:
      FloatingPointError: the watched metric became NaN/Inf; the message names the window of steps and
        the first bad step. Nothing after the last finite window is checkpointed.

    The logger (own or given) writes `<run_dir>/curves.png` when it is closed (`MetricsLogger.close`).
    """
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}")
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive int, got {log_every!r}")
    if eval_fn is not None and (not isinstance(eval_every, int) or eval_every < 1):
        raise ValueError(f"eval_fn needs eval_every to be a positive int, got {eval_every!r}")
    if not isinstance(watch, str) or not watch:
        raise ValueError(f"watch must be a metric name, got {watch!r}")
    start = int(jax.device_get(state.step))
    if start > num_steps:
        raise ValueError(f"state is at step {start}, beyond num_steps={num_steps}")
    own_logger = logger is None
    if own_logger:
        logger = MetricsLogger(run_dir)
    bar = ProgressBar(num_steps, initial=start, disable=not progress)
    batches = _make_iterator(batch_iter, start)

    window_losses: list[jax.Array] = []
    last_metrics: Mapping[str, jax.Array] = {}
    window_start, window_time = start + 1, time.perf_counter()

    def flush(step: int) -> None:
        nonlocal window_losses, window_start, window_time
        if not window_losses:
            return
        losses = np.asarray(jax.device_get(window_losses), dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            first = window_start + int(bad[0])
            raise FloatingPointError(
                f"non-finite {watch} between step {window_start} and {step} (first at step {first}: "
                f"{watch}={losses[bad[0]]}); stopping. The last checkpoint holds finite values.")
        now = time.perf_counter()
        record = dict(jax.device_get(dict(last_metrics)))
        record[f"{watch}_mean"] = float(losses.mean())
        record["steps_per_sec"] = len(losses) / max(now - window_time, 1e-9)
        logger.log(step, record)
        bar.update(step, loss=record[watch])
        window_losses, window_start, window_time = [], step + 1, now

    try:
        for i in range(start, num_steps):
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(f"batch_iter ran out after step {i} (num_steps={num_steps})") from None
            state, metrics = step_fn(state, batch)
            if watch not in metrics:
                raise KeyError(f"step_fn metrics must contain the watched metric {watch!r} (train_loop(watch=...)); "
                               f"got {sorted(metrics)}")
            window_losses.append(metrics[watch])
            last_metrics = metrics
            step = i + 1
            do_eval = eval_fn is not None and (step % eval_every == 0 or step == num_steps)
            do_ckpt = checkpointer is not None and (checkpointer.should_save(step) or step == num_steps)
            if step % log_every == 0 or step == num_steps or do_eval or do_ckpt:
                flush(step)  # checks finiteness before anything is saved
            if do_eval:
                logger.log(step, {f"eval/{k}": v for k, v in eval_fn(state, step).items()})
            if do_ckpt:
                checkpointer.save(step, state, force=step == num_steps)
        if checkpointer is not None:
            if start == num_steps and num_steps > 0:
                checkpointer.save(num_steps, state, force=True)
    finally:
        if checkpointer is not None:
            checkpointer.wait()
        bar.close()
        if own_logger:
            logger.close()
    return state
