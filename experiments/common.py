"""Helpers shared by the experiment scripts. Every script is

    config file -> validate -> run(config) -> the shared loop -> artefacts

with ``main(argv) = run_cli(run, argv, default_config=...)``: the config is loaded, overridden and
validated before anything is built, and every error a user can cause (config, checkpoint,
non-finite loss, missing data, a backend that cannot run) ends as one line on stderr and a
nonzero exit status (``--debug`` shows the traceback). Helpers below take explicit values, not
config groups.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time

import numpy as np

# exit statuses of run_cli
EXIT_CONFIG, EXIT_CHECKPOINT, EXIT_NONFINITE, EXIT_DATA, EXIT_BACKEND, EXIT_INTERRUPTED = 2, 3, 4, 5, 6, 130


def _classify(e: BaseException) -> int | None:
    """Exit status for an expected error, None for a bug (which keeps its traceback)."""
    from research.train.checkpoint import CheckpointError

    if isinstance(e, CheckpointError):
        return EXIT_CHECKPOINT
    if isinstance(e, FloatingPointError):
        return EXIT_NONFINITE
    if isinstance(e, (FileNotFoundError, NotADirectoryError, PermissionError)):
        return EXIT_DATA
    if isinstance(e, (ValueError, TypeError)):
        return EXIT_CONFIG
    if isinstance(e, (RuntimeError, NotImplementedError)):
        return EXIT_BACKEND
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def run_cli(run, argv=None, *, default_config: str, parser: argparse.ArgumentParser | None = None):
    """Parses ``--config PATH[:preset] [--set k=v ...] [--debug]``, loads and validates the config, calls
    ``run(cfg)`` and returns its result. Expected errors -> ``error: <message>`` on stderr and
    ``SystemExit`` with a nonzero status (2 config/value, 3 checkpoint, 4 non-finite loss, 5 missing
    file, 6 backend/runtime, 130 interrupted); ``--debug`` re-raises them with the traceback.

    From the command line (``argv is None``) glibc malloc is first set to keep freed memory
    (``research.runs.host.malloc_keep_freed_memory``: XLA:CPU's per-step temporaries are otherwise
    page-faulted in on every step; no numeric change); ``RESEARCH_MALLOC=default`` skips that.
    Calls with an explicit ``argv`` (tests, notebooks) leave the process's allocator alone."""
    from research.runs.config import add_config_args, load_config

    if argv is None and os.environ.get("RESEARCH_MALLOC", "reuse") != "default":
        from research.runs.host import malloc_keep_freed_memory

        malloc_keep_freed_memory()
    parser = parser or argparse.ArgumentParser(description=(run.__doc__ or "").split("\n")[0])
    add_config_args(parser, default_config=default_config)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(args.config, list(args.config_overrides) + list(args.overrides))
        return run(cfg)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:  # noqa: BLE001 - classified below, bugs re-raised
        code = _classify(e)
        if args.debug or code is None:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(code) from None


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
    close_text_log(logger)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(run_dir, filename))):
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


def close_text_log(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


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


def build_digits_dit(*, patch_size: int, hidden_size: int, depth: int, num_heads: int, mlp_ratio: float,
                     class_dropout_prob: float, qk_norm: bool, attn_impl: str, remat_policy: str,
                     scan_blocks: bool, scan_unroll: int = 0):
    """The class-conditional DiT for 8x8x1 digits (10 classes + the null label). ``scan_unroll=0``
    unrolls the scanned blocks fully (``depth``): same parameters and results as the while loop,
    ~20 % less CPU per step on these sizes (docs/benchmarks/train_step.md)."""
    from research.data.digits import NUM_CLASSES
    from research.nn.dit import DiT

    return DiT(input_size=8, in_channels=1, patch_size=patch_size, hidden_size=hidden_size, depth=depth,
               num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=NUM_CLASSES,
               class_dropout_prob=class_dropout_prob, qk_norm=qk_norm, attn_impl=attn_impl,
               remat_policy=remat_policy, scan_blocks=scan_blocks, scan_unroll=scan_unroll or depth)


def build_digits_method(name: str, *, beta_min: float, beta_max: float, ve_sigma_max: float,
                        likelihood_weighting: bool, sigma_data: float, precond: str, P_mean: float, P_std: float):
    """The registered method ``name`` with the hyper-parameters of a digits config's ``sde`` block."""
    from research.generative.methods import get_method

    if name in ("vp", "subvp"):
        return get_method(name, beta_min=beta_min, beta_max=beta_max, likelihood_weighting=likelihood_weighting,
                          sigma_data=sigma_data, precond=precond)
    if name == "ve":
        return get_method(name, sigma_max=ve_sigma_max, likelihood_weighting=likelihood_weighting,
                          sigma_data=sigma_data, precond=precond)
    if name == "edm":
        return get_method(name, sigma_data=sigma_data, P_mean=P_mean, P_std=P_std)
    return get_method(name)


def make_state(params, key, *, learning_rate: float, warmup_steps: int, total_steps: int, weight_decay: float,
               clip_norm: float, ema_half_life_images: float, batch_size: int):
    """``(optimizer, ema_decay, state)``: AdamW with warmup + cosine and clipping, EMA by half-life in
    images (``ema_decay`` is ``None`` when ``ema_half_life_images`` is 0)."""
    from research.train.ema import ema_decay_from_half_life
    from research.train.optim import make_optimizer
    from research.train.state import create_train_state

    optimizer = make_optimizer(learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps,
                               weight_decay=weight_decay, clip_norm=clip_norm or None)
    use_ema = ema_half_life_images > 0
    ema_decay = ema_decay_from_half_life(ema_half_life_images, batch_size) if use_ema else None
    return optimizer, ema_decay, create_train_state(params, optimizer, key, ema=use_ema)


def open_run(run_dir: str, cfg, log: logging.Logger, state, *, save_every: int, keep: int, resume: str = "auto",
             ignore_keys=("train.num_steps", "train.stop_at_step", "train.progress", "train.log_every",
                          "train.tensorboard", "run_dir", "resume")):
    """Opens ``<run_dir>/checkpoints`` and restores its newest intact checkpoint into ``state``.

    The checkpoint's stored config must equal ``cfg`` (apart from ``ignore_keys``); otherwise a
    ``ConfigMismatchError`` names the differing keys, unless ``resume == "force"``. Only after that
    check is ``<run_dir>/config.json`` (re)written. ``resume="never"`` refuses a directory that holds
    checkpoints. Returns ``(checkpointer, state)``.
    """
    from research.runs.config import config_to_dict, save_config
    from research.train.checkpoint import CheckpointError, Checkpointer

    if resume not in ("auto", "force", "never"):
        raise ValueError(f"resume must be 'auto', 'force' or 'never', got {resume!r}")
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=save_every, keep=keep,
                        config=config_to_dict(cfg), ignore_keys=tuple(ignore_keys))
    try:
        if resume == "never" and ckpt.all_steps():
            raise CheckpointError(f"{ckpt.directory} already holds checkpoints and resume='never'; "
                                  "use another run_dir or --set resume=auto")
        restored = ckpt.restore_latest(state, force=resume == "force")
    except BaseException:
        ckpt.close()
        raise
    if restored is not None:
        state = restored
        log.info(f"resumed from checkpoint at step {int(state.step)}")
    save_config(cfg, run_dir)
    return ckpt, state


NUM_DIGIT_CLASSES = 10
TRAIN_KEYS = ("learning_rate", "warmup_steps", "num_steps", "weight_decay", "clip_norm", "ema_half_life_images",
              "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "progress")


def train_digits(run_dir: str, log: logging.Logger, cfg, *, method, model_fn, params, arrays: dict, key_state, key_data,
                 resume: str, learning_rate: float, warmup_steps: int, num_steps: int, weight_decay: float,
                 clip_norm: float, ema_half_life_images: float, batch_size: int, checkpoint_every: int,
                 keep_checkpoints: int, log_every: int, progress: bool, stop_at_step: int = 0,
                 tensorboard: bool = False):
    """Trains ``method.loss`` on ``arrays["image"]`` given ``arrays["label"]`` with AdamW + EMA, resuming the
    newest intact checkpoint of ``run_dir`` (checked against ``cfg``, see ``open_run``), up to ``stop_at_step``
    (if > 0) or ``num_steps``. Pass the train values explicitly: ``**{k: cfg.train[k] for k in TRAIN_KEYS}``.

    Returns ``(state, ema_decay, start_step, train_time_s, final_loss)``."""
    from research.train.step import make_train_step

    optimizer, ema_decay, state = make_state(
        params, key_state, learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=num_steps,
        weight_decay=weight_decay, clip_norm=clip_norm, ema_half_life_images=ema_half_life_images,
        batch_size=batch_size)
    ckpt, state = open_run(run_dir, cfg, log, state, save_every=checkpoint_every, keep=keep_checkpoints,
                           resume=resume)

    def loss_fn(p, batch, key):
        return method.loss(model_fn, p, batch["image"], key, cond=batch["label"])

    step_fn = make_train_step(loss_fn, optimizer, ema_decay=ema_decay)
    state, start_step, train_time, final_loss = train_resumable(
        run_dir, log, state, step_fn, arrays, key_data, ckpt, num_steps=stop_at_step or num_steps,
        batch_size=batch_size, log_every=log_every, progress=progress, tensorboard=tensorboard,
        num_classes=NUM_DIGIT_CLASSES)
    return state, ema_decay, start_step, train_time, final_loss


def train_resumable(run_dir: str, log: logging.Logger, state, step_fn, arrays: dict, key, ckpt, *,
                    num_steps: int, batch_size: int, log_every: int, progress: bool, tensorboard: bool = False,
                    num_classes: int | None = None, label_key: str = "label", eval_fn=None, eval_every=None):
    """Trains to ``num_steps`` with the opened checkpointer ``ckpt`` (see ``open_run``); the data iterator
    skips to the restored step, so a resumed run is bit-identical. Writes ``metrics.jsonl`` and
    ``curves.png``; ``eval_fn(state, step) -> dict`` is logged under ``eval/`` every ``eval_every`` steps.
    Returns ``(state, start_step, train_time_s, final_loss)``."""
    from research.data.iterators import batch_iterator
    from research.runs.metrics import MetricsLogger, plot_curves
    from research.train.loop import train_loop

    start_step = int(state.step)
    logger = MetricsLogger(run_dir, tensorboard=tensorboard)
    t_train = time.perf_counter()
    try:
        state = train_loop(
            state, step_fn, lambda s: batch_iterator(arrays, batch_size, key=key, start_step=s,
                                                     num_classes=num_classes, label_key=label_key),
            num_steps=num_steps, run_dir=run_dir, checkpointer=ckpt, log_every=log_every, logger=logger,
            progress=progress, eval_fn=eval_fn, eval_every=eval_every)
    finally:
        logger.close()
        ckpt.close()
    train_time = time.perf_counter() - t_train
    plot_curves(run_dir)
    return state, start_step, train_time, last_logged_record(run_dir).get("loss_mean")


def last_logged_record(run_dir: str) -> dict:
    """The newest logging-window record of ``run_dir``'s metrics.jsonl (the one with ``loss_mean``), or {}."""
    from research.runs.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if "loss_mean" in r]
    return records[-1] if records else {}


def write_digit_samples_and_metrics(run_dir: str, x, labels, *, split_seed: int, test_fraction: float,
                                    pca_components: int, grid_columns: int, title: str):
    """Save model-space digit samples ``x [N, 8, 8, 1]`` (``samples.npz`` on the 0..16 scale,
    ``samples.png`` one row per class) and score them with the digits evaluator of that data split.

    Returns ``(images_0_16, labels, metrics)``.
    """
    from research.data.digits import to_0_16

    imgs = to_0_16(np.asarray(x)[..., 0])
    y = np.asarray(labels)
    if not np.all(np.isfinite(imgs)):
        raise FloatingPointError(f"{int(np.sum(~np.isfinite(imgs)))} non-finite sample values; the sampler "
                                 "diverged (try more steps or another sampler)")
    np.savez_compressed(os.path.join(run_dir, "samples.npz"), images=imgs.astype(np.float32), labels=y)
    save_image_grid(os.path.join(run_dir, "samples.png"), imgs, y, columns=grid_columns, title=title)
    evaluator = digits_evaluator(split_seed=split_seed, test_fraction=test_fraction, pca_components=pca_components)
    return imgs, y, evaluator.evaluate(imgs, y)


@functools.lru_cache(maxsize=4)
def digits_evaluator(*, split_seed: int, test_fraction: float, pca_components: int):
    """The fitted digits evaluator of a data split (cached: fitting the SVM and PCA takes seconds)."""
    from research.eval.digits import DigitsEvaluator

    return DigitsEvaluator.from_split(seed=split_seed, test_fraction=test_fraction, n_components=pca_components)


def sample_digits(method, model_fn, params, key, *, per_class: int, sampler: str, num_steps: int, guidance: float,
                  solver: str = "heun", schedule: str = ""):
    """Class-conditional samples with CFG, one jitted call: ``(x [10 * per_class, 8, 8, 1], labels, nfe)``.

    ``sampler`` is a registered name; ``solver`` applies to the time-space ``"ode"`` sampler only;
    an empty ``schedule`` is the family default. With guidance != 1 each NFE is one call on a doubled batch."""
    import jax
    import jax.numpy as jnp

    from research.data.digits import NUM_CLASSES
    from research.generative.guidance import guided_model_fn

    labels = jnp.repeat(jnp.arange(NUM_CLASSES, dtype=jnp.int32), per_class)
    g_model = guided_model_fn(model_fn, NUM_CLASSES, guidance)
    opts = {"solver": solver} if sampler == "ode" else {}
    if schedule:
        opts["schedule"] = schedule

    @jax.jit
    def run(p, k):
        return method.sample(g_model, p, k, (labels.shape[0], 8, 8, 1), sampler=sampler, num_steps=num_steps,
                             cond=labels, **opts)

    x, nfe = jax.block_until_ready(run(params, key))
    return x, labels, int(nfe)


def digits_bits_per_dim(method, model_fn, params, images, key, *, divergence: str, rtol: float):
    """Bits/dim of [-1, 1] digit images under the unconditional (null-label) model of a Gaussian-path method.

    Dequantises the 0..16 integers with uniform noise (bins of width 1/8 in model space), evaluates
    log p(z) by the PF-ODE and converts with the bin-width Jacobian (research/generative/likelihood.py).
    Returns ``(mean bits/dim, ODE function evaluations)``.
    """
    import jax
    import jax.numpy as jnp

    from research.data.digits import NUM_CLASSES, to_0_16
    from research.generative.likelihood import bits_per_dim, dequantize, digits_dequantization

    k_deq, k_probe = jax.random.split(key)
    ints = jnp.asarray(np.rint(to_0_16(images)), jnp.float32)
    bin_width, offset = digits_dequantization()
    z = dequantize(k_deq, ints, bin_width=bin_width, offset=offset)
    null = jnp.full((images.shape[0],), NUM_CLASSES, jnp.int32)
    f = jax.jit(lambda p, x, k: method.log_likelihood(model_fn, p, x, key=k, divergence=divergence, cond=null,
                                                      rtol=rtol, atol=rtol))
    logp, aux = f(params, z, k_probe)
    bpd = bits_per_dim(logp, int(np.prod(images.shape[1:])), bin_width=bin_width)
    return float(jnp.mean(bpd)), int(aux["nfe"])


def test_split_bits_per_dim(cfg, method, model_fn, params, key) -> dict:
    """The PF-ODE bits/dim metrics of ``cfg.eval.bpd_images`` test digits (empty dict when 0)."""
    if cfg.eval.bpd_images <= 0:
        return {"bpd_kind": "none"}
    from research.data.digits import load_digits

    test_images, _ = load_digits("test", seed=cfg.data.split_seed, test_fraction=cfg.data.test_fraction)
    bpd, bpd_nfe = digits_bits_per_dim(method, model_fn, params, test_images[:cfg.eval.bpd_images], key,
                                       divergence=cfg.eval.bpd_divergence, rtol=cfg.eval.bpd_rtol)
    return {"bits_per_dim": bpd, "bpd_kind": "pf_ode", "bpd_nfe": bpd_nfe,
            "bpd_images": int(min(cfg.eval.bpd_images, len(test_images))),
            "bpd_uniform_reference": float(np.log2(17.0))}
