"""Every generative family on the 8x8 digits, one table: sample quality, likelihood, cost.

Each row is one family's own experiment script run with its own config (the same data split, the
same evaluator: an RBF-SVM fitted on the train split scores the class-conditional samples, and a
Fréchet distance in a PCA-16 feature space compares them with the test split next to the floor
Fréchet(train, test)). Bits/dim are of the same 17-level data for every family, with the kind of
number named: ``exact`` (autoregressive: a true discrete likelihood; flows: the exact density of
uniformly dequantised data, a bound on the discrete likelihood as in the RealNVP/Glow papers),
``elbo`` (VAE's variational bound), ``pf_ode`` (diffusion: the probability-flow ODE density of the
dequantised data, Hutchinson trace estimator), ``none`` (GANs, two-stage models).

A row whose run directory already holds a finished run of the SAME config (``config.json`` equal
apart from bookkeeping keys, ``metrics.json`` present) is read back, not retrained: the numbers in
it (train/sample time included) were measured by that run; ``--rerun`` retrains. Two-stage rows
first run their stage-1 autoencoder (``needs``), then the prior / latent model on its run.

Usage:
  python experiments/bench_families.py                       # full configs, runs/<family run dirs>
  python experiments/bench_families.py --quick --out /tmp/q  # tiny configs: the plumbing only
  python experiments/bench_families.py --families rf_dit,gan_ns --json families.jsonl

Writes a markdown table to stdout (and ``--markdown PATH``), one JSON record per family to
``--json PATH`` (keys: family, classifier_accuracy, frechet_distance, frechet_floor, bits_per_dim,
bpd_kind, nfe, params, train_s, sample_s, samples, plus the run's provenance), and copies each
family's ``samples.png`` grid (one row per class) to ``--grids DIR``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/bench_families.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BPD_KINDS = ("exact", "elbo", "pf_ode", "none")
# config keys that do not change what a run computes (compared away when reusing a finished run)
BOOKKEEPING = ("run_dir", "resume", "train.progress", "train.log_every", "train.tensorboard", "train.stop_at_step")


@dataclasses.dataclass(frozen=True)
class Family:
    """One table row: ``module.run(load_config(config, overrides))`` writes ``<out>/<run>/metrics.json``.

    ``overrides`` may name other stages' run directories as ``{run:<stage>}``; ``needs`` lists the
    stages (keys of STAGES) that must have run first; ``quick`` adds the tiny-size overrides."""

    label: str
    module: str
    config: str
    run: str
    bpd_kind: str
    overrides: tuple = ()
    quick: tuple = ()
    needs: tuple = ()
    row: bool = True


_TINY_DIT = ("model.hidden_size=16", "model.depth=1", "model.num_heads=2", "model.mlp_ratio=2.0",
             "train.batch_size=16", "train.warmup_steps=1", "train.num_steps=3", "train.checkpoint_every=3",
             "train.ema_half_life_images=100.0", "sample.per_class=20", "sample.num_steps=2", "eval.bpd_images=4",
             "eval.bpd_rtol=0.01")
_TINY_GAN = ("model.g_hidden=(16,)", "model.d_hidden=(16,)", "model.embed_dim=4", "gan.latent_dim=8",
             "train.batch_size=16", "train.checkpoint_every=100", "train.ema_half_life_images=100.0",
             "sample.per_class=20")
_TINY_FLOW = ("flow.levels=1", "flow.steps=1", "flow.hidden=4", "flow.depth=1", "flow.embed_dim=4",
              "train.batch_size=16", "train.warmup_steps=1", "train.num_steps=3", "train.checkpoint_every=3",
              "train.ema_half_life_images=100.0", "sample.per_class=20", "eval.temperatures=0.5")
_TINY_AR = ("model.dim=16", "model.depth=1", "model.num_heads=2", "model.num_kv_heads=2", "train.batch_size=16",
            "train.warmup_steps=1", "train.num_steps=3", "train.checkpoint_every=3",
            "train.ema_half_life_images=100.0", "sample.per_class=20", "sample.extra_temperatures=()")
_TINY_VAE = ("model.features=(8, 8)", "model.latent_channels=2", "train.num_steps=3", "train.batch_size=16",
             "train.warmup_steps=1", "train.checkpoint_every=3", "train.ema_half_life_images=100.0",
             "sample.per_class=20", "eval.bound_samples=2")
_TINY_VQ = ("model.features=(8, 8)", "model.code_dim=4", "model.num_codes=8", "train.num_steps=3",
            "train.batch_size=16", "train.warmup_steps=1", "train.checkpoint_every=3", "sample.per_class=2")

FAMILIES: dict[str, Family] = {
    "rf_dit": Family("rectified flow, DiT (SD3 recipe)", "experiments.train_digits_rf",
                     "experiments/configs/digits_rf.py", "digits_rf", "pf_ode", quick=_TINY_DIT),
    "edm": Family("EDM, DiT", "experiments.train_digits_sde", "experiments/configs/digits_sde.py", "digits_edm",
                   "pf_ode", overrides=("method=edm", "sample.sampler=heun", "train.num_steps=1500"),
                  quick=_TINY_DIT),
    "vp": Family("VP-SDE, DiT", "experiments.train_digits_sde", "experiments/configs/digits_sde.py", "digits_vp",
                 "pf_ode", overrides=("method=vp", "train.num_steps=1500"), quick=_TINY_DIT),
    "gan_ns": Family("non-saturating GAN, MLP + projection D", "experiments.train_digits_gan",
                     "experiments/configs/digits_gan.py:ns", "digits_gan_ns", "none",
                     quick=_TINY_GAN + ("train.num_steps=4",)),
    "wgan_gp": Family("WGAN-GP (n_critic 5), MLP + projection critic", "experiments.train_digits_gan",
                      "experiments/configs/digits_gan.py:wgan_gp", "digits_gan_wgan_gp", "none",
                      quick=_TINY_GAN + ("train.num_steps=6",)),
    "glow": Family("Glow (ActNorm, LU 1x1 conv, affine coupling)", "experiments.train_digits_flow",
                   "experiments/configs/digits_flow.py", "digits_flow", "exact", quick=_TINY_FLOW),
    "realnvp": Family("RealNVP (checkerboard/channel masks, multi-scale)", "experiments.train_digits_flow",
                      "experiments/configs/digits_flow.py", "digits_flow_realnvp", "exact",
                      overrides=("flow.kind=realnvp", "name=digits_flow_realnvp"), quick=_TINY_FLOW),
    "ar_pixels": Family("autoregressive Transformer over 64 pixels (LM stack)", "experiments.train_digits_ar",
                        "experiments/configs/digits_ar.py", "digits_ar", "exact", quick=_TINY_AR),
    "vae": Family("conditional VAE (discretised-logistic decoder)", "experiments.train_digits_vae",
                  "experiments/configs/digits_vae.py", "digits_vae", "elbo", quick=_TINY_VAE),
    "vq_ar": Family("VQ-VAE + autoregressive prior over codes (VQGAN recipe)", "experiments.train_digits_ar",
                    "experiments/configs/digits_ar.py:vq", "digits_vq_ar", "none",
                    overrides=("data.vq_run={run:vq}",), quick=_TINY_AR, needs=("vq",)),
    "ldm": Family("latent diffusion: rectified-flow DiT on VAE latents", "experiments.train_digits_ldm",
                  "experiments/configs/digits_ldm.py", "digits_ldm", "none",
                  overrides=("data.vae_run={run:vae_ldm}",), quick=_TINY_DIT[:-2], needs=("vae_ldm",)),
}
STAGES: dict[str, Family] = {
    "vq": Family("stage 1: VQ-VAE (EMA codebook)", "experiments.train_digits_vq", "experiments/configs/digits_vq.py",
                 "digits_vq", "none", quick=_TINY_VQ, row=False),
    "vae_ldm": Family("stage 1: VAE with a spatial latent", "experiments.train_digits_vae",
                      "experiments/configs/digits_vae.py:ldm", "digits_vae_ldm", "elbo", quick=_TINY_VAE, row=False),
}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _same_config(run_dir: str, cfg) -> bool:
    from research.runs.config import config_to_dict

    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        saved = _flat(json.load(f))
    want = _flat(json.loads(json.dumps(config_to_dict(cfg))))
    drop = lambda d: {k: v for k, v in d.items() if k not in BOOKKEEPING}  # noqa: E731
    return drop(saved) == drop(want)


def _finished(run_dir: str, cfg) -> bool:
    """A finished run of this config: metrics.json written after the last step of the same config."""
    path = os.path.join(run_dir, "metrics.json")
    if not (os.path.isfile(path) and _same_config(run_dir, cfg)):
        return False
    with open(path, encoding="utf-8") as f:
        steps = json.load(f).get("steps")
    return steps == cfg.train.num_steps


def _config_for(fam: Family, out: str, quick: bool):
    from research.runs.config import load_config

    overrides = []
    for o in fam.overrides:
        for n, stage in {**STAGES, **FAMILIES}.items():
            o = o.replace(f"{{run:{n}}}", os.path.join(out, stage.run))
        overrides.append(o)
    overrides += list(fam.quick) if quick else []
    if quick:
        overrides += ["train.progress=false"]
    overrides.append(f"run_dir={os.path.join(out, fam.run)}")
    return load_config(fam.config, overrides)


def run_family(name: str, *, out: str, quick: bool, rerun=frozenset(), done: set | None = None) -> dict:
    """Runs (or reads back) family/stage ``name`` and its stages; returns its metrics.json dict.
    ``rerun``: names (or "all") to retrain from scratch (their run directory is deleted first)."""
    import importlib

    done = set() if done is None else done
    fam = FAMILIES.get(name) or STAGES[name]
    for need in fam.needs:
        if need not in done:
            run_family(need, out=out, quick=quick, rerun=rerun, done=done)
    cfg = _config_for(fam, out, quick)
    run_dir = cfg.run_dir
    metrics_path = os.path.join(run_dir, "metrics.json")
    fresh = "all" in rerun or name in rerun
    if not fresh and _finished(run_dir, cfg):
        _log(f"[{name}] reusing the finished run in {run_dir}")
        with open(metrics_path, encoding="utf-8") as f:
            metrics = json.load(f)
        metrics["_reused"] = True
    else:
        if fresh and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)
        _log(f"[{name}] running {fam.module} -> {run_dir}")
        try:
            metrics = dict(importlib.import_module(fam.module).run(cfg))
        except Exception as e:
            raise RuntimeError(f"[{name}] {type(e).__name__}: {e} (run dir {run_dir}; retrain it from scratch "
                               f"with --rerun {name})") from e
        if "stopped_at_step" in metrics:
            raise RuntimeError(f"[{name}] the run stopped at step {metrics['stopped_at_step']}")
        metrics["_reused"] = False
    done.add(name)
    metrics["_run_dir"] = run_dir
    metrics["_measured"] = datetime.datetime.fromtimestamp(os.path.getmtime(metrics_path), datetime.timezone.utc
                                                           ).strftime("%Y-%m-%d %H:%M UTC")
    return metrics


def record(name: str, metrics: dict) -> dict:
    """The JSON record of one family row from its run's metrics.json."""
    fam = FAMILIES[name]
    kind = metrics.get("bpd_kind", fam.bpd_kind)
    if kind not in BPD_KINDS:
        raise ValueError(f"{name}: bpd_kind {kind!r} is not one of {BPD_KINDS}")
    bpd = metrics.get("bits_per_dim")
    if kind == "none":
        bpd = None
    elif bpd is None:
        raise ValueError(f"{name}: bpd_kind {kind!r} but the run reports no bits_per_dim")
    missing = [k for k in ("classifier_accuracy", "frechet_distance", "frechet_floor_train_vs_test", "nfe",
                           "num_params", "train_time_s", "sample_time_s") if metrics.get(k) is None]
    if missing:
        raise ValueError(f"{name}: the run's metrics.json lacks {missing} ({metrics['_run_dir']})")
    return {
        "family": name, "method": fam.label,
        "classifier_accuracy": float(metrics["classifier_accuracy"]),
        "frechet_distance": float(metrics["frechet_distance"]),
        "frechet_floor": float(metrics["frechet_floor_train_vs_test"]),
        "bits_per_dim": None if bpd is None else float(bpd), "bpd_kind": kind,
        "nfe": int(metrics["nfe"]), "params": int(metrics["num_params"]),
        "train_s": float(metrics["train_time_s"]), "sample_s": float(metrics["sample_time_s"]),
        "samples": os.path.join(metrics["_run_dir"], "samples.npz"),
        "steps": metrics.get("steps"), "resumed_from_step": metrics.get("resumed_from_step"),
        "reused_run": bool(metrics["_reused"]), "run_dir": metrics["_run_dir"], "measured": metrics["_measured"],
    }


def markdown(records: list[dict]) -> str:
    head = ("| family | method | class. acc. | Fréchet (floor) | bits/dim (kind) | NFE | params | train s | "
            "sample s |\n|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in records:
        bpd = "-" if r["bits_per_dim"] is None else f"{r['bits_per_dim']:.3f} ({r['bpd_kind']})"
        rows.append(f"| {r['family']} | {r['method']} | {r['classifier_accuracy']:.3f} | "
                    f"{r['frechet_distance']:.1f} ({r['frechet_floor']:.1f}) | {bpd} | {r['nfe']} | "
                    f"{r['params'] / 1e3:.0f}k | {r['train_s']:.0f} | {r['sample_s']:.1f} |")
    return "\n".join([head] + rows)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES),
                   help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument("--quick", action="store_true", help="tiny configs (seconds per family): checks the plumbing")
    p.add_argument("--out", default="", help="parent of the run dirs (default: runs, or runs/bench_families_quick)")
    p.add_argument("--rerun", nargs="?", const="all", default="",
                   help="retrain these families/stages (comma-separated; bare --rerun: all) from scratch")
    p.add_argument("--json", default="", help="write one JSON record per family to this path")
    p.add_argument("--markdown", default="", help="also write the markdown table to this path")
    p.add_argument("--grids", default="", help="copy each family's samples.png to DIR/<family>.png")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = _parse(argv)
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        print(f"error: unknown families {unknown}; choose from {', '.join(FAMILIES)}", file=sys.stderr)
        raise SystemExit(2)
    out = args.out or ("runs/bench_families_quick" if args.quick else "runs")
    rerun = {n.strip() for n in args.rerun.split(",") if n.strip()}
    load = [round(x, 2) for x in os.getloadavg()]
    records, done = [], set()
    for name in names:
        try:
            metrics = run_family(name, out=out, quick=args.quick, rerun=rerun, done=done)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        rec = record(name, metrics)
        rec.update({"quick": bool(args.quick), "date": _now(), "load_at_start": load})
        records.append(rec)
        if args.grids:
            os.makedirs(args.grids, exist_ok=True)
            shutil.copyfile(os.path.join(rec["run_dir"], "samples.png"), os.path.join(args.grids, f"{name}.png"))
    table = markdown(records)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
    return records


if __name__ == "__main__":
    main()
