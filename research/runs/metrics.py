"""Metrics logging: JSONL file, optional TensorBoard, and a tqdm progress bar.

Only process 0 (`jax.process_index() == 0`) writes; other processes get no-op loggers.
The JSONL file `<run_dir>/metrics.jsonl` holds one object per `log` call:
`{"step": int, "<name>": float, ...}` (sits next to the run's `config.json`).

`plot_curves(run_dir)` draws `<run_dir>/curves.png` from that file: loss, learning rate and gradient
norm over steps (one panel each; multi-model metrics such as `generator/loss` share their panel;
absent metrics are skipped). `MetricsLogger.close()` calls it, so every run that logs has the plot.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import warnings

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# panel title -> metric-name suffixes it shows ("loss" matches "loss" and "<model>/loss")
_PANELS = (("loss", ("loss", "loss_mean")), ("learning rate", ("lr",)), ("grad norm", ("grad_norm",)))


def _to_python(value: Any) -> Any:
    arr = np.asarray(value)
    if arr.ndim == 0:
        v = arr.item()
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)  # JSON has no NaN/Inf literals; keep them readable
        return v
    return arr.tolist()


class MetricsLogger:
    """Appends metrics to `<run_dir>/metrics.jsonl` (and TensorBoard event files if `tensorboard=True`);
    `close()` writes `<run_dir>/curves.png` (unless `curves=False`)."""

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = False, curves: bool = True):
        self.run_dir = os.fspath(run_dir)
        self.curves = curves
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
        wrote = self._file is not None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if wrote and self.curves:
            try:
                plot_curves(self.run_dir)
            except Exception as e:  # a plot must never lose a finished run; say why it is missing
                warnings.warn(f"could not write {os.path.join(self.run_dir, CURVES_FILE)}: {type(e).__name__}: {e}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Reads back `<run_dir>/metrics.jsonl` as a list of dicts."""
    with open(os.path.join(os.fspath(run_dir), METRICS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(records: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[name]) for r in records if name in r]
    steps = np.asarray([p[0] for p in pts], np.float64)
    vals = np.asarray([float(p[1]) if isinstance(p[1], (int, float, str)) else np.nan for p in pts], np.float64)
    return steps, vals  # "nan"/"inf" strings (how the JSONL keeps them) parse back to floats


def plot_curves(run_dir: str | os.PathLike, *, path: str | os.PathLike | None = None) -> str | None:
    """Writes `<run_dir>/curves.png` (or `path`): loss, learning rate and grad norm over steps.

    Panels whose metrics are absent are skipped; returns the PNG path, or None when there is nothing to
    plot (no metrics file or none of the metrics). Only process 0 writes. Uses matplotlib's Agg backend.
    """
    run_dir = os.fspath(run_dir)
    if jax.process_index() != 0 or not os.path.exists(os.path.join(run_dir, METRICS_FILE)):
        return None
    records = [r for r in read_metrics(run_dir) if isinstance(r.get("step"), int)]
    names = sorted({k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float, str))})
    panels = []
    for title, suffixes in _PANELS:
        shown = [n for n in names if n in suffixes or (n.rsplit("/", 1)[-1] in suffixes and "/" in n
                                                       and not n.startswith("eval/"))]
        if shown:
            panels.append((title, shown))
    if not panels:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    fig = Figure(figsize=(4.2 * len(panels), 3.4), dpi=100)
    for i, (title, shown) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for n in shown:
            x, y = _series(records, n)
            ax.plot(x, y, label=n, marker="." if len(x) < 30 else None)
        positive = all(np.nanmin(_series(records, n)[1], initial=np.inf) > 0 for n in shown)
        if title != "learning rate" and positive:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.fspath(path) if path is not None else os.path.join(run_dir, CURVES_FILE)
    fig.savefig(out)
    return out


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
