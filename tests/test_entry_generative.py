"""Entry smoke tests: the generative experiment scripts run end to end on tiny settings."""
import json
import os

import numpy as np
import pytest

pytestmark = [pytest.mark.entry, pytest.mark.slow]


def test_bench_2d_quick(tmp_path):
    from experiments import bench_2d

    results = bench_2d.main(["--config", "experiments/configs/bench_2d.py:quick", "--set", f"run_dir={tmp_path}", "--set", "methods=vp,edm,otcfm",
                             "--set", "train.num_steps=20", "--set", "eval.nll_samples=16"])
    assert {r["method"] for r in results} == {"vp", "edm", "otcfm"}
    for r in results:
        assert np.isfinite(r["sw2"]) and np.isfinite(r["mmd"]) and np.isfinite(r["nll"]) and r["nfe"] > 0
    assert os.path.exists(tmp_path / "results.md")
    assert len(json.load(open(tmp_path / "results.json"))) == len(results)


@pytest.mark.parametrize("method", ["vp", "edm"])
def test_train_digits_sde_tiny(tmp_path, method):
    from experiments import train_digits_sde

    m = train_digits_sde.main([
        "--set", f"method={method}", "--set", f"run_dir={tmp_path}", "--set", "train.num_steps=3",
        "--set", "train.warmup_steps=1", "--set", "train.batch_size=16", "--set", "model.hidden_size=32",
        "--set", "model.depth=1", "--set", "model.num_heads=2", "--set", "sample.per_class=1",
        "--set", "sample.num_steps=2", "--set", "eval.bpd_images=4", "--set", "eval.bpd_rtol=1e-2",
        "--set", "train.progress=False", *(["--set", "sample.sampler=heun"] if method == "edm" else [])])
    assert m["steps"] == 3 and np.isfinite(m["bits_per_dim"]) and m["nfe"] == (4 if method == "vp" else 3)
    for f in ("samples.png", "samples.npz", "metrics.json", "config.json", "curves.png"):
        assert os.path.exists(tmp_path / f)


def test_nfe_frontier_tiny(tmp_path):
    """Trains a tiny VP run, then the frontier script restores it (verified checkpoint + config.json) and
    scores two samplers at two budgets; the step count per budget follows each sampler's NFE formula."""
    from experiments import nfe_frontier, train_digits_sde

    run = tmp_path / "vp"
    train_digits_sde.main([
        "--set", f"run_dir={run}", "--set", "train.num_steps=2", "--set", "train.warmup_steps=1",
        "--set", "train.batch_size=16", "--set", "model.hidden_size=16", "--set", "model.depth=1",
        "--set", "model.num_heads=2", "--set", "sample.per_class=1", "--set", "sample.num_steps=1",
        "--set", "eval.bpd_images=0", "--set", "train.progress=False", "--set", "train.checkpoint_every=2"])
    rows = nfe_frontier.main(["--set", f"run_dir={tmp_path / 'frontier'}", "--set", f"runs=vp:{run}",
                              "--set", "samplers=heun,dpmpp_2m,ode:euler", "--set", "budgets=3,5",
                              "--set", "per_class=2"])
    got = {(r["sampler"], r["budget"]): (r["steps"], r["nfe"]) for r in rows}
    assert got == {("heun", 3): (2, 3), ("heun", 5): (3, 5), ("dpmpp_2m", 3): (3, 3), ("dpmpp_2m", 5): (5, 5),
                   ("ode:euler", 3): (3, 3), ("ode:euler", 5): (5, 5)}
    for f in ("results.json", "results.md", "frontier.png"):
        assert os.path.exists(tmp_path / "frontier" / f)

