"""Input-pipeline throughput vs the train step's consumption: does the Grain loader starve the step?

    python -m experiments.bench_input                      # digits + CIFAR-shaped, a few seconds each
    python -m experiments.bench_input --workers 0,2 --seconds 5 --json runs/bench_input.json
    python -m experiments.bench_input --cifar-root /data/cifar10   # real CIFAR-10 pickles instead

For each dataset it measures, in one process:

* ``loader``: batches/s of ``research.data.pipeline.make_grain_loader`` (seeded shuffle, the
  dataset's augmentation: none for digits, random flip + crop for CIFAR) drained on its own, per
  ``worker_count``;
* ``step``: steps/s of the jitted rectified-flow train step of a DiT on a device-resident batch
  (the consumer alone; digits: the flagship digits DiT; CIFAR: a small 32x32x3 DiT, patch 4);
* ``fed``: steps/s of the same step fed by the loader (host -> device copy and uint8 -> float
  conversion included), i.e. what a training run sees.

``headroom = loader / step`` (> 1: the input can keep up, with that margin) and
``fed / step`` (1.0: no starvation; below: the step waits for data). The CIFAR images are random
uint8 unless ``--cifar-root`` points at the real pickles (decoding cost is the same: they are
in-memory arrays either way). Timings are wall-clock medians of ``--repeats`` interleaved rounds;
the load average is printed with the table (run on an idle machine for absolute figures).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def _digits_arrays():
    from research.data.digits import load_digits, to_0_16
    x, y = load_digits("train", seed=0, test_fraction=0.2)
    # the loader carries what is on disk: uint8 pixels (0..16 rescaled to 0..255)
    img = np.round(to_0_16(x) * (255.0 / 16.0)).astype(np.uint8)
    return {"x": img, "y": y.astype(np.int32)}


def _cifar_arrays(root: str | None, n: int, seed: int):
    if root:
        from research.data.datasets import load_dataset
        ds = load_dataset("cifar10", root, "train")
        return {"x": np.asarray(ds.images), "y": np.asarray(ds.labels, np.int32)}
    rng = np.random.default_rng(seed)
    return {"x": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "y": rng.integers(0, 10, n, dtype=np.int32)}


DATASETS = {
    # name: (augment, DiT kwargs, batch size)
    "digits": (None, dict(input_size=8, in_channels=1, patch_size=2, hidden_size=64, depth=4, num_heads=4), 128),
    "cifar-shaped": (("flip", "crop"),
                     dict(input_size=32, in_channels=3, patch_size=4, hidden_size=128, depth=4, num_heads=4), 128),
}


def _to_model(batch):
    x = jnp.asarray(batch["x"], jnp.float32) * (2.0 / 255.0) - 1.0
    return {"image": x, "label": jnp.asarray(batch["y"], jnp.int32)}


def build_step(dit_kwargs: dict, batch_size: int, seed: int):
    """``(state, step)``: the jitted RF train step of a class-conditional DiT (10 classes)."""
    from experiments.common import make_state
    from research.generative.methods import get_method
    from research.nn.dit import DiT, init_dit, make_model_fn
    from research.train.step import make_train_step

    model = DiT(num_classes=10, mlp_ratio=4.0, class_dropout_prob=0.1, qk_norm=True, attn_impl="xla",
                remat_policy="none", scan_blocks=True, **dit_kwargs)
    model_fn = make_model_fn(model)
    k_init, k_state = jax.random.split(jax.random.key(seed))
    params = init_dit(model, k_init)
    optimizer, ema_decay, state = make_state(params, k_state, learning_rate=1e-4, warmup_steps=10,
                                             total_steps=10_000, weight_decay=0.0, clip_norm=1.0,
                                             ema_half_life_images=5000.0, batch_size=batch_size)
    method = get_method("rf")

    def loss_fn(p, batch, key):
        return method.loss(model_fn, p, batch["image"], key, cond=batch["label"])

    return state, make_train_step(loss_fn, optimizer, ema_decay=ema_decay)


def _rate(fn, seconds: float) -> float:
    """Calls/s of ``fn`` over about ``seconds`` (at least 3 calls)."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 3:
            return n / dt


def bench_dataset(name: str, arrays: dict, *, workers: list[int], seconds: float, repeats: int, seed: int,
                  batch_size: int | None = None, log=print) -> list[dict]:
    from research.data.pipeline import make_grain_loader

    augment, dit_kwargs, default_batch = DATASETS[name]
    bs = batch_size or default_batch
    state, step = build_step(dit_kwargs, bs, seed)
    loaders = {w: make_grain_loader(arrays, batch_size=bs, seed=seed, augment=augment, worker_count=w)
               for w in workers}
    fixed = _to_model(next(loaders[workers[0]]))
    holder = {"state": step(state, fixed)[0]}              # compile + first step
    jax.block_until_ready(holder["state"])

    def run_step(batch):
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    rates = {("step", None): []}
    for w in workers:
        next(loaders[w])                                    # workers started, first batch out
        rates[("loader", w)], rates[("fed", w)] = [], []
    for _ in range(repeats):                                # interleaved rounds
        rates[("step", None)].append(_rate(lambda: run_step(fixed), seconds))
        for w, it in loaders.items():
            rates[("loader", w)].append(_rate(lambda it=it: next(it), seconds))
            rates[("fed", w)].append(_rate(lambda it=it: run_step(_to_model(next(it))), seconds))
    step_rate = statistics.median(rates[("step", None)])
    rows = []
    for w in workers:
        loader_rate = statistics.median(rates[("loader", w)])
        fed_rate = statistics.median(rates[("fed", w)])
        rows.append({"dataset": name, "records": int(len(arrays["y"])), "image": list(arrays["x"].shape[1:]),
                     "batch_size": bs, "augment": ",".join(augment or ()) or "none", "workers": w,
                     "loader_batches_s": loader_rate, "step_steps_s": step_rate, "fed_steps_s": fed_rate,
                     "headroom": loader_rate / step_rate, "fed_over_step": fed_rate / step_rate,
                     "images_s_loader": loader_rate * bs})
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| dataset | image | batch | augment | workers | loader batches/s | step steps/s | fed steps/s "
            "| loader / step | fed / step |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {'x'.join(map(str, r['image']))} | {r['batch_size']} | {r['augment']} "
                     f"| {r['workers']} | {r['loader_batches_s']:.1f} | {r['step_steps_s']:.2f} "
                     f"| {r['fed_steps_s']:.2f} | {r['headroom']:.1f}x | {r['fed_over_step']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, from {list(DATASETS)}")
    p.add_argument("--workers", default="0", help="comma-separated worker_count values")
    p.add_argument("--seconds", type=float, default=2.0, help="length of one timed measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; rates are medians")
    p.add_argument("--batch-size", type=int, default=None, help="override every dataset's batch size")
    p.add_argument("--cifar-root", default=None, help="real CIFAR-10 pickles (default: random uint8 arrays)")
    p.add_argument("--cifar-records", type=int, default=10_000, help="records of the CIFAR-shaped arrays")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows to this file")
    a = p.parse_args(argv)
    names = [s for s in a.datasets.split(",") if s]
    bad = [s for s in names if s not in DATASETS]
    if bad:
        p.error(f"unknown dataset(s) {bad}; choose from {list(DATASETS)}")
    try:
        workers = [int(w) for w in a.workers.split(",") if w]
    except ValueError:
        p.error(f"--workers must be comma-separated ints, got {a.workers!r}")
    if not workers or min(workers) < 0:
        p.error(f"--workers must be ints >= 0, got {a.workers!r}")
    rows = []
    for name in names:
        arrays = _digits_arrays() if name == "digits" else _cifar_arrays(a.cifar_root, a.cifar_records, a.seed)
        rows += bench_dataset(name, arrays, workers=workers, seconds=a.seconds, repeats=a.repeats, seed=a.seed,
                              batch_size=a.batch_size)
    load = os.getloadavg()
    print(f"# bench_input: {jax.devices()[0].platform}, {os.cpu_count()} cores, jax {jax.__version__}; "
          f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; wall-clock medians of {a.repeats} rounds")
    print(format_table(rows))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"load_average": load, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
