"""Metrics logging: JSONL file, optional TensorBoard, and a tqdm progress bar.

Only process 0 (`jax.process_index() == 0`) writes; other processes get no-op loggers.
The JSONL file `<run_dir>/metrics.jsonl` holds one object per `log` call:
`{"step": int, "<name>": float, ...}` (sits next to the run's `config.json`).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


def _to_python(value: Any) -> Any:
    arr = np.asarray(value)
    if arr.ndim == 0:
        v = arr.item()
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)  # JSON has no NaN/Inf literals; keep them readable
        return v
    return arr.tolist()


class MetricsLogger:
    """Appends metrics to `<run_dir>/metrics.jsonl` (and TensorBoard event files if `tensorboard=True`)."""

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = False):
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, METRICS_FILE)
        self.active = jax.process_index() == 0
        self._file = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # lazy: optional dependency
            except ImportError as e:
                raise ImportError("tensorboard=True needs the tensorboardX package (pip install tensorboardX)") from e
            self._tb = SummaryWriter(logdir=os.path.join(self.run_dir, "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes one record; values are fetched to the host (scalars -> float/int)."""
        if not self.active:
            return
        if "step" in metrics:
            raise ValueError("metrics must not contain the reserved key 'step'")
        record = {"step": int(step)}
        record.update({k: _to_python(v) for k, v in jax.device_get(dict(metrics)).items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, global_step=int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Reads back `<run_dir>/metrics.jsonl` as a list of dicts."""
    with open(os.path.join(os.fspath(run_dir), METRICS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """A tqdm bar over steps showing the loss and steps/s (disabled on processes other than 0).

    `update(step, loss=None)` moves the bar to `step` (absolute) and refreshes the postfix.
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str = "train", disable: bool = False, **tqdm_kwargs):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                         disable=disable or jax.process_index() != 0, dynamic_ncols=True, **tqdm_kwargs)
        self._last_step = initial
        self._last_time = time.perf_counter()
        self.steps_per_sec: float | None = None

    def update(self, step: int, loss: float | None = None) -> None:
        now = time.perf_counter()
        done = int(step) - self._last_step
        if done > 0:
            self.steps_per_sec = done / max(now - self._last_time, 1e-9)
            self._bar.update(done)
        self._last_step, self._last_time = int(step), now
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4g}"
        if self.steps_per_sec is not None:
            postfix["steps/s"] = f"{self.steps_per_sec:.2f}"
        self._bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        self._bar.close()
