"""Diffusion / flow training of a DiT on an image dataset from local files, through the Grain pipeline.

    python -m experiments.train_images --config experiments/configs/cifar10_edm.py --set data.root=/data/cifar10
    python -m experiments.train_images --config experiments/configs/cifar10_edm.py:smoke --set data.name=digits

Configs: experiments/configs/cifar10_{rf_dit,edm,vp}.py (``get_config(preset)``; presets "gpu" (the
default) and "smoke" through the loader's ``:preset`` suffix). Multi-host launch: docs/scaling.md.

Pipeline: ``research.data.datasets.load_dataset(name, root, split)`` (or the embedded digits, as uint8
0..16) -> ``research.data.pipeline.make_grain_loader`` (shuffle and augmentation seeded by the run
seed; each process reads its own shard, ``batch_size / process_count`` examples per step) ->
``shard_batch`` (global arrays over the ``data`` mesh axis) -> the jitted step, which converts the
uint8 images to float32 in [-1, 1] on device. The Grain iterator state is saved in the SAME checkpoint
step directory as the train state (``<run_dir>/checkpoints/<step>/data_state*.json``, after orbax has
finalised the step) and restored from the step actually restored, so a resumed run reads exactly
the batches an uninterrupted one would.

Writes to ``runs/<name>/`` (or ``run_dir``): checkpoints/, config.json, metrics.jsonl, curves.png,
train.log, and at the end samples.png (grid, one class per column cycle), samples.npz (uint8 images,
labels) and metrics.json. ``train.stop_at_step`` stops early (no samples); rerun to resume.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (
    close_text_log, last_logged_record, make_state, open_run, resolve_run_dir, run_cli, setup_text_log, write_json,
)

# config keys a resumed run may change (experiments/common.py: open_run); "sample" / "eval" cover their groups
IGNORE_ON_RESUME = ("train.num_steps", "train.stop_at_step", "train.progress", "train.log_every",
                    "train.tensorboard", "run_dir", "resume", "data.record_batches", "data.root",
                    "distributed_auto_detect", "sample", "eval")


# ------------------------------------------------------------------------------------------- data
def load_image_arrays(name: str, root: str, split: str, *, image_size: int, digits_split_seed: int,
                      digits_test_fraction: float):
    """``(images uint8 [N, H, W, C], labels int32 [N], num_classes, pixel_max)`` from local files, or the
    embedded digits (``name == "digits"``: 0..16 intensities, so ``pixel_max = 16``)."""
    if name == "digits":
        from research.data.digits import NUM_CLASSES, load_digits, to_0_16

        x, y = load_digits(split, seed=digits_split_seed, test_fraction=digits_test_fraction)
        return np.rint(to_0_16(x)).astype(np.uint8), np.asarray(y, np.int32), NUM_CLASSES, 16.0
    from research.data.datasets import load_dataset

    if not os.path.exists(root):
        raise FileNotFoundError(f"data.root {root!r} does not exist (the {name} files must be on every host)")
    kw = {"image_size": image_size} if name == "image_folder" else {}
    ds = load_dataset(name, root, split, **kw)
    images = ds.images if ds.images.ndim == 4 else ds.images[..., None]  # MNIST: [N, 28, 28] -> [N, 28, 28, 1]
    return np.ascontiguousarray(images, np.uint8), np.asarray(ds.labels, np.int32), len(ds.class_names), 255.0


class DataCheckpointer:
    """Wraps a ``research.train.checkpoint.Checkpointer`` for ``train_loop``: every train-state save also
    records the Grain iterator's state of that moment, written into the same step directory once orbax
    has finalised it (``research.data.pipeline.save_iterator_state``; async saves stay async)."""

    def __init__(self, ckpt, iterator):
        self.ckpt, self.iterator, self._pending = ckpt, iterator, []
        self.save_every = ckpt.save_every

    def should_save(self, step):
        return self.ckpt.should_save(step)

    def save(self, step, state, *, force=False):
        from research.data.pipeline import get_iterator_state

        data_state = get_iterator_state(self.iterator)  # the batches consumed up to `step`
        saved = self.ckpt.save(step, state, force=force)
        if saved:
            self._pending.append((int(step), data_state))
        return saved

    def wait(self):
        from research.data.pipeline import save_iterator_state

        self.ckpt.wait()
        pending, self._pending = self._pending, []
        for step, data_state in pending:
            if os.path.isdir(self.ckpt.step_path(step)):  # not pruned meanwhile
                save_iterator_state(self.ckpt.step_path(step), data_state)

    def close(self):
        self.wait()
        self.ckpt.close()


def restore_data_position(ckpt, it, step: int, log) -> None:
    """Positions the fresh iterator ``it`` at the restored ``step``: from that step's saved data state,
    or (a save interrupted between the train state and the data state) by reading ``step`` batches."""
    from research.data.pipeline import data_state_path, restore_iterator_state

    if step == 0:
        return
    path = ckpt.step_path(step)
    if os.path.exists(data_state_path(path)):
        restore_iterator_state(path, it)
        log.info(f"data iterator restored from {data_state_path(path)}")
        return
    warnings.warn(f"no data state in {path}; skipping {step} batches to reach the same position", stacklevel=2)
    for _ in range(step):
        next(it)


def device_batches(it, mesh, *, record_path: str | None, start_step: int):
    """The Grain batches as global arrays over the mesh; optionally appends each batch's sha256."""
    from research.parallel.sharding import shard_batch

    step = start_step
    for b in it:
        step += 1
        batch = {"image": np.asarray(b["image"]), "label": np.asarray(b["label"], np.int32)}
        if record_path:
            h = hashlib.sha256(batch["image"].tobytes() + batch["label"].tobytes()).hexdigest()
            with open(record_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "sha256": h}) + "\n")
        yield shard_batch(batch, mesh)


# ------------------------------------------------------------------------------------------ model
def build_dit(mc, *, image_size: int, channels: int, num_classes: int, dtype):
    from research.nn.dit import DiT

    return DiT(input_size=image_size, in_channels=channels, patch_size=mc.patch_size, hidden_size=mc.hidden_size,
               depth=mc.depth, num_heads=mc.num_heads, mlp_ratio=mc.mlp_ratio, num_classes=num_classes,
               class_dropout_prob=mc.class_dropout_prob, qk_norm=mc.qk_norm, attn_impl=mc.attn_impl,
               remat_policy=mc.remat_policy, scan_blocks=mc.scan_blocks, dtype=dtype)


def to_model_space(images_uint8, pixel_max: float):
    """uint8 0..pixel_max -> float32 in [-1, 1] (inside jit, on device)."""
    return images_uint8.astype(jnp.float32) / (pixel_max / 2.0) - 1.0


def save_rgb_grid(path: str, images_uint8: np.ndarray, *, columns: int) -> None:
    """Tiles ``[N, H, W, C]`` uint8 images (C = 1 or 3) into one PNG with ``columns`` per row."""
    from PIL import Image

    n, h, w, c = images_uint8.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.uint8)
    for i, img in enumerate(images_uint8):
        r, k = divmod(i, columns)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = img
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def params_sha256(tree) -> str:
    """One sha256 over every leaf's bytes (a fingerprint of params / EMA / optimiser state)."""
    from jax.experimental import multihost_utils

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- run
def run(cfg) -> dict:
    """Trains (resuming if a checkpoint exists), samples a grid; returns the metrics dict."""
    from research.parallel.distributed import initialize_from_env

    # no-op unless RESEARCH_* / JAX_* multi-process variables are set (or auto-detection is asked for: TPU pods)
    initialize_from_env(auto_detect=cfg.distributed_auto_detect)
    t_start = time.perf_counter()
    run_dir = resolve_run_dir(cfg.run_dir, cfg.name)
    i = jax.process_index()
    log = setup_text_log(run_dir, cfg.name, filename="train.log" if i == 0 else f"train.process{i}.log")
    try:
        return _run(cfg, run_dir, log, t_start)
    finally:
        close_text_log(log)


def _run(cfg, run_dir, log, t_start) -> dict:
    from research.data.pipeline import make_grain_loader
    from research.generative.guidance import guided_model_fn
    from research.generative.methods import get_method
    from research.nn.dit import make_model_fn
    from research.parallel.distributed import process_batch_slice
    from research.parallel.sharding import init_sharded, make_mesh
    from research.runs.metrics import MetricsLogger, plot_curves
    from research.train.loop import train_loop
    from research.train.precision import get_policy
    from research.train.step import make_train_step

    tc, dc, sc = cfg.train, cfg.data, cfg.sample
    log.info(f"run_dir={run_dir} process {jax.process_index()}/{jax.process_count()} devices={jax.devices()}")
    images, labels, num_classes, pixel_max = load_image_arrays(
        dc.name, dc.root, dc.split, image_size=dc.image_size, digits_split_seed=dc.digits_split_seed,
        digits_test_fraction=dc.digits_test_fraction)
    _, h, w, channels = images.shape
    if h != w:
        raise ValueError(f"the DiT needs square images, got {h}x{w}")
    if h % cfg.model.patch_size:
        raise ValueError(f"model.patch_size {cfg.model.patch_size} must divide the image size {h}")
    rows = process_batch_slice(tc.batch_size)
    local_batch = rows.stop - rows.start
    if local_batch % jax.local_device_count():
        raise ValueError(f"per-process batch {local_batch} (train.batch_size {tc.batch_size} / {jax.process_count()} "
                         f"processes) must be divisible by the {jax.local_device_count()} local devices")
    log.info(f"{dc.name}: {len(labels)} images {h}x{w}x{channels}, {num_classes} classes; per-process batch "
             f"{local_batch}")

    policy = get_policy(tc.precision)
    mesh = make_mesh({"data": -1})
    model = build_dit(cfg.model, image_size=h, channels=channels, num_classes=num_classes,
                      dtype=policy.compute_dtype)
    model_fn = make_model_fn(model)
    method = get_method(cfg.method.name, **{k: v for k, v in cfg.method.items() if k != "name"})
    k_init, k_train, k_sample = jax.random.split(jax.random.key(cfg.seed), 3)

    opt_kw = dict(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps, total_steps=tc.num_steps,
                  weight_decay=tc.weight_decay, clip_norm=tc.clip_norm,
                  ema_half_life_images=tc.ema_half_life_images, batch_size=tc.batch_size)
    built = {}

    def init_fn(k_params, k_state):
        x = jnp.zeros((1, h, w, channels), jnp.float32)
        params = model.init({"params": k_params}, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
        built["optimizer"], built["ema_decay"], state = make_state(params, k_state, **opt_kw)
        return state

    state, shardings = init_sharded(init_fn, k_init, k_train, mesh=mesh, mode=tc.sharding)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    log.info(f"DiT params: {n_params:,}; precision {policy}; sharding {tc.sharding} over {mesh.devices.size} devices")

    ckpt, state = open_run(run_dir, cfg, log, state, save_every=tc.checkpoint_every, keep=tc.keep_checkpoints,
                           resume=cfg.resume, ignore_keys=IGNORE_ON_RESUME)
    start_step = int(state.step)
    try:  # the Grain loader at the restored step's position (a bad data state: close the checkpointer, re-raise)
        it = make_grain_loader({"image": images, "label": labels}, batch_size=local_batch, seed=int(cfg.seed),
                               worker_count=dc.worker_count, augment=tuple(dc.augment) or None, image_key="image",
                               label_key="label", num_classes=num_classes)
        restore_data_position(ckpt, it, start_step, log)
    except BaseException:
        ckpt.close()
        raise
    suffix = "" if jax.process_count() == 1 else f".process{jax.process_index()}"
    record = os.path.join(run_dir, f"batches{suffix}.jsonl") if dc.record_batches else None

    null = jnp.int32(num_classes)
    conditional = bool(tc.conditional)

    def loss_fn(p, batch, key):
        y = batch["label"] if conditional else jnp.full_like(batch["label"], null)
        return method.loss(model_fn, p, to_model_space(batch["image"], pixel_max), key, cond=y)

    step_fn = make_train_step(loss_fn, built["optimizer"], ema_decay=built["ema_decay"], precision=policy,
                              mesh=mesh, state_sharding=shardings)
    data_ckpt = DataCheckpointer(ckpt, it)
    logger = MetricsLogger(run_dir, tensorboard=tc.tensorboard)
    t_train = time.perf_counter()
    try:
        state = train_loop(state, step_fn, device_batches(it, mesh, record_path=record, start_step=start_step),
                           num_steps=tc.stop_at_step or tc.num_steps, run_dir=run_dir, checkpointer=data_ckpt,
                           log_every=tc.log_every, logger=logger, progress=tc.progress)
    finally:
        logger.close()
        data_ckpt.close()
    train_time = time.perf_counter() - t_train
    plot_curves(run_dir)
    final_loss = last_logged_record(run_dir).get("loss_mean")
    log.info(f"trained steps {start_step} -> {int(state.step)} in {train_time:.1f}s; final loss {final_loss}")
    fingerprint = params_sha256((state.params, state.ema_params, state.opt_state))
    if int(state.step) < tc.num_steps:
        log.info(f"stopped at step {int(state.step)} (train.stop_at_step); rerun to resume. No samples written.")
        return {"stopped_at_step": int(state.step), "state_sha256": fingerprint}

    # ---- a sample grid from the EMA params (labels cycle through the classes; null label if unconditional)
    t_sample = time.perf_counter()
    ema = built["ema_decay"] is not None
    sample_params = state.ema_params if ema else state.params
    ys = jnp.arange(sc.num_images, dtype=jnp.int32) % num_classes if conditional else \
        jnp.full((sc.num_images,), num_classes, jnp.int32)
    g_model = guided_model_fn(model_fn, num_classes, sc.guidance if conditional else 1.0)
    opts = {"solver": sc.solver} if sc.sampler == "ode" else {}
    if sc.schedule:
        opts["schedule"] = sc.schedule

    @jax.jit
    def sample(p, k):
        return method.sample(g_model, p, k, (sc.num_images, h, w, channels), sampler=sc.sampler,
                             num_steps=sc.num_steps, cond=ys, **opts)

    x, nfe = sample(sample_params, k_sample)
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    x = np.asarray(x, np.float32)
    if not np.all(np.isfinite(x)):
        raise FloatingPointError(f"{int(np.sum(~np.isfinite(x)))} non-finite sample values; the sampler diverged")
    imgs = np.rint(np.clip((x + 1.0) * (pixel_max / 2.0), 0, pixel_max) * (255.0 / pixel_max)).astype(np.uint8)
    sample_time = time.perf_counter() - t_sample
    metrics = {
        "final_loss": final_loss, "steps": int(state.step), "batch_size": tc.batch_size, "num_params": n_params,
        "dataset": dc.name, "num_train_images": int(len(labels)), "method": cfg.method.name,
        "sampler": sc.sampler, "sample_steps": sc.num_steps, "nfe": int(nfe), "guidance": sc.guidance,
        "sampled_from": "ema_params" if ema else "params", "precision": str(policy), "sharding": tc.sharding,
        "num_devices": int(mesh.devices.size), "num_processes": jax.process_count(),
        "train_time_s": train_time, "sample_time_s": sample_time, "wall_time_s": time.perf_counter() - t_start,
        "resumed_from_step": start_step, "state_sha256": fingerprint,
    }
    if cfg.eval.fid_num_samples > 0:
        metrics.update(fid_stage(cfg, run_dir, log, method=method, model_fn=g_model, params=sample_params,
                                 shape=(h, w, channels), num_classes=num_classes, conditional=conditional,
                                 pixel_max=pixel_max, opts=opts))
    if jax.process_index() == 0:
        np.savez_compressed(os.path.join(run_dir, "samples.npz"), images=imgs, labels=np.asarray(ys))
        save_rgb_grid(os.path.join(run_dir, "samples.png"), imgs, columns=sc.grid_columns)
        write_json(os.path.join(run_dir, "metrics.json"), metrics)
    log.info(f"final loss {final_loss}; {sc.num_images} samples ({sc.sampler}, {int(nfe)} NFE) -> samples.png; "
             f"wall time {metrics['wall_time_s']:.1f}s")
    return metrics


def to_uint8(x, pixel_max: float):
    """Model-space samples in [-1, 1] -> uint8 pixels (0..255), on device."""
    x = jnp.clip((x.astype(jnp.float32) + 1.0) * (pixel_max / 2.0), 0.0, pixel_max) * (255.0 / pixel_max)
    return jnp.rint(x).astype(jnp.uint8)


def fid_stage(cfg, run_dir, log, *, method, model_fn, params, shape, num_classes: int, conditional: bool,
              pixel_max: float, opts: dict) -> dict:
    """``eval.fid_num_samples`` samples as resumable, device-sharded shards in ``<run_dir>/fid_samples``
    (a rerun after an interruption generates only the missing shards); with ``eval.inception_weights``
    and ``eval.fid_reference`` also their FID and Inception Score."""
    from research.eval.fid_sampling import generate_samples, load_samples

    ec, sc = cfg.eval, cfg.sample

    def sample_fn(key, n, p):
        k_y, k_x = jax.random.split(key)
        y = jax.random.randint(k_y, (n,), 0, num_classes) if conditional else jnp.full((n,), num_classes, jnp.int32)
        x, _ = method.sample(model_fn, p, k_x, (n, *shape), sampler=sc.sampler, num_steps=sc.num_steps, cond=y,
                             **opts)
        return to_uint8(x, pixel_max)

    out_dir = os.path.join(run_dir, "fid_samples")
    t0 = time.perf_counter()
    res = generate_samples(sample_fn, num_samples=int(ec.fid_num_samples), batch_size=int(ec.fid_batch_size),
                           out_dir=out_dir, seed=int(cfg.seed) + 1, args=(params,))
    out = {"fid_samples_dir": out_dir, "fid_num_samples": int(ec.fid_num_samples),
           "fid_shards_generated": len(res.generated), "fid_shards_resumed": len(res.skipped),
           "fid_sample_time_s": time.perf_counter() - t0}
    log.info(f"FID samples: {ec.fid_num_samples} in {len(res.paths)} shards under {out_dir} "
             f"({len(res.skipped)} already present)")
    if ec.inception_weights:
        from research.eval.fid import fid_from_images
        from research.eval.inception import load_weights

        r = fid_from_images(load_samples(out_dir), ec.fid_reference, load_weights(ec.inception_weights),
                            batch_size=int(ec.inception_batch_size))
        out.update({"fid": r["fid"], "inception_score": r["inception_score"],
                    "inception_score_std": r["inception_score_std"]})
        log.info(f"FID {r['fid']:.3f}, IS {r['inception_score']:.3f} +- {r['inception_score_std']:.3f} "
                 f"({r['num_images']} samples)")
    return out


def main(argv=None) -> dict:
    return run_cli(run, argv, default_config="experiments/configs/cifar10_rf_dit.py")


if __name__ == "__main__":
    main()
