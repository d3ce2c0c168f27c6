"""Small helpers shared by experiment scripts: run directories, text logs, image grids, JSON."""
from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np


def resolve_run_dir(run_dir: str, name: str) -> str:
    """``run_dir`` if given, else ``runs/<name>``; created; returned as an absolute path."""
    path = os.path.abspath(run_dir or os.path.join("runs", name))
    os.makedirs(path, exist_ok=True)
    return path


def setup_text_log(run_dir: str, name: str = "experiment", filename: str = "train.log") -> logging.Logger:
    """A logger writing to stdout and (appending) to ``<run_dir>/<filename>``."""
    logger = logging.getLogger(f"{name}:{run_dir}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(run_dir, filename))):
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


def close_text_log(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def save_image_grid(path: str, images: np.ndarray, labels: np.ndarray, *, columns: int,
                    vmin: float = 0.0, vmax: float = 16.0, title: str | None = None) -> None:
    """Saves a grid PNG with one row per distinct label (ascending) and up to ``columns`` images each.

    images: [N, H, W] (grey); labels: [N] ints.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"need images [N, H, W] and labels [N], got {images.shape} and {labels.shape}")
    classes = np.unique(labels)
    fig, axes = plt.subplots(len(classes), columns, figsize=(columns * 0.6, len(classes) * 0.6 + 0.4),
                             squeeze=False)
    for r, c in enumerate(classes):
        row = images[labels == c][:columns]
        for j in range(columns):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(row):
                ax.imshow(row[j], cmap="gray_r", vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[r, 0].set_ylabel(str(c), rotation=0, labelpad=10, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path: str, obj) -> None:
    """Writes ``obj`` as indented JSON (numpy scalars converted)."""

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=default)
        f.write("\n")


def write_digit_samples_and_metrics(run_dir: str, x, labels, cfg, *, title: str):
    """Save model-space digit samples ``x [N, 8, 8, 1]`` (``samples.npz`` on the 0..16 scale,
    ``samples.png`` one row per class) and score them with the digits evaluator built from the
    config's data split (``cfg.data``, ``cfg.eval.pca_components``, ``cfg.sample.grid_columns``).

    Returns ``(images_0_16, labels, metrics)``.
    """
    from research.data.digits import to_0_16
    from research.eval.digits import DigitsEvaluator

    imgs = to_0_16(np.asarray(x)[..., 0])
    y = np.asarray(labels)
    np.savez_compressed(os.path.join(run_dir, "samples.npz"), images=imgs.astype(np.float32), labels=y)
    save_image_grid(os.path.join(run_dir, "samples.png"), imgs, y, columns=cfg.sample.grid_columns,
                    title=title)
    evaluator = DigitsEvaluator.from_split(seed=cfg.data.split_seed, test_fraction=cfg.data.test_fraction,
                                           n_components=cfg.eval.pca_components)
    return imgs, y, evaluator.evaluate(imgs, y)


def make_digits_state(tc, params, key):
    """``(optimizer, ema_decay, state)`` from a config's ``train`` block: AdamW with warmup +
    cosine and clipping, EMA by half-life in images (``ema_decay`` is ``None`` without EMA)."""
    from research.train.ema import ema_decay_from_half_life
    from research.train.optim import make_optimizer
    from research.train.state import create_train_state

    optimizer = make_optimizer(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps,
                               total_steps=tc.num_steps, weight_decay=tc.weight_decay, clip_norm=tc.clip_norm)
    use_ema = tc.ema_half_life_images > 0
    ema_decay = ema_decay_from_half_life(tc.ema_half_life_images, tc.batch_size) if use_ema else None
    return optimizer, ema_decay, create_train_state(params, optimizer, key, ema=use_ema)


def train_resumable(run_dir: str, log: logging.Logger, state, step_fn, arrays: dict, key, tc, *,
                    num_steps: int, tensorboard: bool = False):
    """Trains to ``num_steps`` with orbax checkpoints in ``run_dir/checkpoints``, resuming the latest
    one (the data iterator skips to the restored step, so a resumed run is bit-identical).

    Returns ``(state, start_step, train_time_s, final_loss)``.
    """
    import time

    from research.data.iterators import batch_iterator
    from research.train.checkpoint import Checkpointer
    from research.runs.metrics import MetricsLogger, read_metrics
    from research.train.loop import train_loop

    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=tc.checkpoint_every,
                        keep=tc.keep_checkpoints)
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state = restored
        log.info(f"resumed from checkpoint at step {int(state.step)}")
    start_step = int(state.step)
    logger = MetricsLogger(run_dir, tensorboard=tensorboard)
    t_train = time.perf_counter()
    try:
        state = train_loop(
            state, step_fn,
            lambda s: batch_iterator(arrays, tc.batch_size, key=key, start_step=s),
            num_steps=num_steps, run_dir=run_dir, checkpointer=ckpt, log_every=tc.log_every,
            logger=logger, progress=tc.progress,
        )
    finally:
        logger.close()
        ckpt.close()
    train_time = time.perf_counter() - t_train
    records = [r for r in read_metrics(run_dir) if "loss_mean" in r]
    return state, start_step, train_time, (records[-1]["loss_mean"] if records else None)
