"""PyTorch twin of the flagship experiment: class-conditional rectified flow on the 8x8 digits.

Reads the same experiment config as the JAX run (``experiments/configs/digits_rf.py`` through
``research.runs.config``), the same data and batch order (``research.data``), and trains the torch
DiT with ``torch.optim.AdamW``, global-norm clipping, the same warmup + cosine schedule and decay
mask, and the EMA (half-life in images). At the end it draws ``sample.per_class`` samples per class
with the configured ODE method and guidance from the EMA weights.

Command:
    python -m experiments.torch_baselines.train --config experiments/configs/digits_rf.py \\
        --set train.num_steps=500
Writes ``<run_dir>/config.json``, ``metrics.jsonl`` (loss, grad_norm, lr, steps_per_s),
``model.pt`` (params + EMA state dicts), ``ema_flax_params.npz`` (the EMA weights converted to the
Flax layout, loadable into ``research.nn.dit.DiT``) and ``samples.npz`` (images [N, 8, 8, 1] in
[-1, 1], labels). Default run_dir: ``runs/<name>_torch``.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from experiments.torch_baselines import convert, flow
from experiments.torch_baselines.dit import DiT
from experiments.torch_baselines.optim import make_optimizer, train_step

DEFAULT_CONFIG = "experiments/configs/digits_rf.py"


def build_model(model_cfg, *, input_size: int = 8, in_channels: int = 1, num_classes: int = 10) -> DiT:
    """Torch DiT from the ``model`` section of the experiment config (explicit fields only)."""
    return DiT(input_size=input_size, in_channels=in_channels, patch_size=model_cfg.patch_size,
               hidden_size=model_cfg.hidden_size, depth=model_cfg.depth, num_heads=model_cfg.num_heads,
               mlp_ratio=model_cfg.mlp_ratio, num_classes=num_classes,
               class_dropout_prob=model_cfg.class_dropout_prob, qk_norm=model_cfg.qk_norm)


def ema_decay_from_half_life(half_life_images: float, batch_size: int) -> float:
    """``0.5 ** (batch_size / half_life_images)`` (same as ``research.train.ema``)."""
    if not half_life_images > 0:
        raise ValueError(f"half_life_images must be > 0, got {half_life_images}")
    return float(0.5 ** (batch_size / half_life_images))


@torch.no_grad()
def sample_per_class(model: DiT, *, per_class: int, num_steps: int, method: str, guidance: float,
                     num_classes: int, generator: torch.Generator, device) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` samples of each class: noise [N, H, W, C] at t=1 integrated to t=0 with CFG."""
    model.eval()
    y = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    s, c = model.input_size, model.in_channels
    x1 = torch.randn((y.shape[0], s, s, c), generator=generator, device=device)
    velocity = flow.guided(model, y, num_classes, 1 if guidance == 1 else guidance)
    x0 = flow.ode_sample(velocity, x1, num_steps=num_steps, method=method)
    return x0.cpu().numpy(), y.cpu().numpy().astype(np.int32)


def run(cfg, *, device: str | None = None, log=print) -> dict:
    """Trains per ``cfg`` (a loaded experiment config); returns a summary dict."""
    from research.data import batch_iterator, load_digits
    from research.runs.config import save_config
    from research.runs.metrics import MetricsLogger

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = cfg.run_dir or os.path.join("runs", f"{cfg.name}_torch")
    save_config(cfg, run_dir)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)

    images, labels = load_digits("train", seed=cfg.data.split_seed, test_fraction=cfg.data.test_fraction)
    tc = cfg.train
    # the same batch order as experiments/train_digits_rf.py: its data key is the third of
    # split(key(seed), 4) (init, train, data, sample)
    import jax

    k_data = jax.random.split(jax.random.key(cfg.seed), 4)[2]
    batches = batch_iterator({"x": images, "y": labels}, tc.batch_size, key=k_data)
    model = build_model(cfg.model).to(dev)
    params = list(model.parameters())
    opt, sched = make_optimizer(model, learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps,
                                total_steps=tc.num_steps, weight_decay=tc.weight_decay)
    ema_decay = ema_decay_from_half_life(tc.ema_half_life_images, tc.batch_size) if tc.ema_half_life_images else None
    ema = [p.detach().clone() for p in params] if ema_decay is not None else None
    last = tc.stop_at_step or tc.num_steps
    logger = MetricsLogger(run_dir)
    t_last, step_last = time.perf_counter(), 0
    model.train()
    for step in range(1, last + 1):
        batch = next(batches)
        x0 = torch.from_numpy(batch["x"]).to(dev)
        y = torch.from_numpy(batch["y"]).to(dev)

        def loss_fn():
            t, eps, drop = flow.draw_training_noise(
                x0, generator=gen, class_dropout_prob=cfg.model.class_dropout_prob,
                timestep_dist=tc.timestep_dist, loc=tc.timestep_loc, scale=tc.timestep_scale)
            return flow.rectified_flow_loss(model, x0, y, t=t, eps=eps, train=False, force_drop_ids=drop)

        metrics = train_step(loss_fn, params, opt, sched, clip_norm=tc.clip_norm or None, ema_params=ema,
                             ema_decay=ema_decay)
        if step % tc.log_every == 0 or step == last:
            m = {k: float(v) for k, v in metrics.items()}
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(f"non-finite loss {m['loss']} at step {step} (steps {step_last + 1}..{step})")
            now = time.perf_counter()
            m["steps_per_s"] = (step - step_last) / (now - t_last)
            t_last, step_last = now, step
            logger.log(step, m)
            log(f"step {step}/{last} loss {m['loss']:.4f} grad_norm {m['grad_norm']:.3f} lr {m['lr']:.2e} "
                f"{m['steps_per_s']:.1f} steps/s")
    logger.close()

    sd = model.state_dict()
    ema_sd = {n: e.detach().cpu() for (n, _), e in zip(model.named_parameters(), ema)} if ema else None
    torch.save({"params": sd, "ema": ema_sd, "step": last}, os.path.join(run_dir, "model.pt"))
    if ema_sd is not None:  # sample from the EMA weights, as the JAX run does
        model.load_state_dict(ema_sd, strict=True)
    flat = {"/".join(k): v for k, v in _flatten(convert.torch_to_flax(
        {n: p for n, p in model.state_dict().items()}, scan_blocks=cfg.model.scan_blocks)).items()}
    np.savez(os.path.join(run_dir, "ema_flax_params.npz"), **flat)
    sc = cfg.sample
    if sc.sampler != "ode":
        raise ValueError(f"the torch twin samples with the time-space PF-ODE only (sample.sampler='ode'), "
                         f"got sample.sampler={sc.sampler!r}")
    samples, sample_labels = sample_per_class(model, per_class=sc.per_class, num_steps=sc.num_steps,
                                              method=sc.solver, guidance=sc.guidance, num_classes=10,
                                              generator=gen, device=dev)
    np.savez(os.path.join(run_dir, "samples.npz"), images=samples, labels=sample_labels)
    summary = {"run_dir": run_dir, "steps": last, "final_loss": m["loss"], "samples": samples.shape}
    log(f"done: {summary}")
    return summary


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def main(argv=None):
    from research.runs.config import config_from_cli

    parser = argparse.ArgumentParser(description="PyTorch twin of the digits rectified-flow experiment")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads")
    cfg, args = config_from_cli(argv, parser=parser, default_config=DEFAULT_CONFIG)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    return run(cfg, device=args.device)


if __name__ == "__main__":
    main()
