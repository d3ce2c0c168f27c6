"""The NFE frontier: classifier accuracy and Fréchet distance of every sampler at 5-50 NFE.

    python -m experiments.nfe_frontier --config experiments/configs/nfe_frontier.py [--set k=v ...]

See the config's docstring for what it loads and measures.
"""
from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np

from experiments.common import (
    build_digits_dit, build_digits_method, digits_evaluator, make_state, resolve_run_dir, run_cli, sample_digits,
    write_json,
)
from research.data.digits import to_0_16
from research.generative.methods import get_method
from research.generative.sampling import SAMPLERS
from research.nn.dit import init_dit, make_model_fn


def load_run(run_dir: str):
    """(config, method, model_fn, ema_params) of a finished digits run, from its config.json and its newest
    intact checkpoint (verified against the stored digests and config)."""
    from research.train.checkpoint import Checkpointer

    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: train that run first (README 'NFE frontier')")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    cfg = ml_collections.ConfigDict(raw)
    tc = cfg.train
    if "method" in cfg:
        method = build_digits_method(cfg.method, **cfg.sde.to_dict())
    else:
        method = get_method("rf", timestep_dist=tc.timestep_dist, loc=tc.timestep_loc, scale=tc.timestep_scale)
    model = build_digits_dit(**cfg.model.to_dict())
    params = init_dit(model, jax.random.key(0))
    _, _, template = make_state(
        params, jax.random.key(0), learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps,
        total_steps=tc.num_steps, weight_decay=tc.weight_decay, clip_norm=tc.clip_norm,
        ema_half_life_images=tc.ema_half_life_images, batch_size=tc.batch_size)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=tc.checkpoint_every, config=raw)
    try:
        state = ckpt.restore_latest(template)
    finally:
        ckpt.close()
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints")
    if int(state.step) < tc.num_steps:
        raise ValueError(f"{run_dir} stopped at step {int(state.step)} of {tc.num_steps}; finish training first")
    params = state.ema_params if state.ema_params is not None else state.params
    return cfg, method, make_model_fn(model), params


def steps_for_budget(spec, budget: int, options: dict) -> int | None:
    """The largest number of steps whose NFE fits ``budget`` (None if even one step does not)."""
    best = None
    for n in range(1, budget + 1):
        if spec.nfe(n, **options) <= budget:
            best = n
    return best


def format_table(rows, budgets) -> str:
    head = "| model | sampler | " + " | ".join(f"{b} NFE: acc / Fréchet" for b in budgets) + " |"
    lines = [head, "|---|---|" + "---:|" * len(budgets)]
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["sampler"]), {})[r["budget"]] = r
    for (model, sampler), cells in by.items():
        txt = []
        for b in budgets:
            r = cells.get(b)
            txt.append("-" if r is None else f"{r['accuracy']:.3f} / {r['frechet']:.1f} ({r['nfe']})")
        lines.append(f"| {model} | {sampler} | " + " | ".join(txt) + " |")
    return "\n".join(lines)


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for sampler in sorted({r["sampler"] for r in rows if r["model"] == model}):
            pts = sorted((r["nfe"], r["frechet"]) for r in rows if r["model"] == model and r["sampler"] == sampler)
            ax.plot(*zip(*pts), marker="o", label=sampler)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("Fréchet distance (PCA-16)")
        ax.set_title(model)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg) -> list[dict]:
    """Evaluates every (run, sampler, budget); prints and writes the table and the plot."""
    out_dir = resolve_run_dir(cfg.run_dir, cfg.name)
    budgets = [int(b) for b in cfg.budgets.split(",")]
    key = jax.random.key(cfg.seed)
    rows = []
    for label, run_dir in (r.split(":", 1) for r in cfg.runs.split(",")):
        rcfg, method, model_fn, params = load_run(run_dir)
        dc = rcfg.data
        evaluator = digits_evaluator(split_seed=dc.split_seed, test_fraction=dc.test_fraction,
                                     pca_components=rcfg.eval.pca_components)
        guidance = rcfg.sample.guidance if cfg.guidance < 0 else cfg.guidance
        for entry in cfg.samplers.split(","):
            name, _, solver = entry.partition(":")
            if not method.supports(name):
                continue
            spec = SAMPLERS[name]
            opts = {"solver": solver} if name == "ode" else {}
            for budget in budgets:
                steps = steps_for_budget(spec, budget, opts)
                if steps is None:
                    continue
                t0 = time.perf_counter()
                x, y, nfe = sample_digits(method, model_fn, params, key, per_class=cfg.per_class, sampler=name,
                                          solver=solver or "heun", schedule=cfg.schedule, num_steps=steps,
                                          guidance=guidance)
                imgs = to_0_16(np.asarray(x)[..., 0])
                if np.all(np.isfinite(imgs)):
                    m = evaluator.evaluate(imgs, np.asarray(y))
                    acc, fd = m["classifier_accuracy"], m["frechet_distance"]
                else:
                    acc, fd = float("nan"), float("nan")
                row = {"model": label, "sampler": entry, "budget": budget, "steps": steps, "nfe": nfe,
                       "accuracy": acc, "frechet": fd, "seconds": time.perf_counter() - t0}
                rows.append(row)
                print(f"{label:4s} {entry:16s} budget {budget:3d}: steps {steps:3d} nfe {nfe:3d} "
                      f"acc {acc:.3f} Fréchet {fd:.1f} ({row['seconds']:.0f}s)", flush=True)
    table = format_table(rows, budgets)
    print(table)
    write_json(os.path.join(out_dir, "results.json"), rows)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plot([r for r in rows if np.isfinite(r["frechet"])], os.path.join(out_dir, "frontier.png"))
    return rows


def main(argv=None):
    return run_cli(run, argv, default_config="experiments/configs/nfe_frontier.py")


if __name__ == "__main__":
    main()
