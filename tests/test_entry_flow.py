"""Entry smoke tests: the digits flow script and the 2-D CNF script on tiny sizes, their artefacts,
metrics and bit-identical resumption after an interruption."""
import json
import os

import jax
import numpy as np
import pytest

from experiments import train_2d_cnf as cnf_exp
from experiments import train_digits_flow as exp
from experiments.common import make_state
from research.data.digits import load_digits
from research.runs.config import load_config
from research.train.checkpoint import Checkpointer

pytestmark = pytest.mark.entry

CONFIG = "experiments/configs/digits_flow.py"
TINY = [
    "flow.levels=1", "flow.steps=1", "flow.hidden=4", "flow.depth=1", "flow.embed_dim=4",
    "train.batch_size=16", "train.warmup_steps=1", "train.log_every=2", "train.checkpoint_every=2",
    "train.progress=false", "train.ema_half_life_images=100.0",
    "sample.per_class=50", "sample.grid_columns=4", "eval.temperatures=0.5",
]
CNF_CONFIG = "experiments/configs/cnf_2d.py"
CNF_TINY = [
    "data.num_train=256", "data.num_test=64", "model.hidden_size=8", "model.depth=1", "model.time_embed_dim=4",
    "cnf.num_steps=2", "cnf.solver=euler", "train.batch_size=32", "train.warmup_steps=1", "train.learning_rate=0.02",
    "train.log_every=3", "train.checkpoint_every=3", "train.progress=false", "eval.solver=euler",
    "eval.num_samples=50", "eval.sample_steps=4",
]
REQUIRED = ["classifier_accuracy", "frechet_distance", "frechet_floor_train_vs_test", "bits_per_dim", "bpd_kind",
            "nfe", "num_params", "train_time_s", "sample_time_s", "steps", "final_loss", "temperature"]


def _args(config, tiny, run_dir, *extra):
    args = ["--config", config, "--set", f"run_dir={run_dir}"]
    for o in tiny + list(extra):
        args += ["--set", o]
    return args


def _restore(run_dir, template):
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=1)
    try:
        return ck.restore_latest(template)
    finally:
        ck.close()


def _assert_same_state(a, b, steps):
    assert int(a.step) == int(b.step) == steps
    leaves_a = jax.tree.leaves((a.params, a.ema_params, a.opt_state))
    leaves_b = jax.tree.leaves((b.params, b.ema_params, b.opt_state))
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits_flow_smoke")
    metrics = exp.main(_args(CONFIG, TINY, run_dir, "train.num_steps=4"))
    return run_dir, metrics


def test_flow_smoke_artefacts_and_metrics(flow_run):
    run_dir, metrics = flow_run
    for name in ["samples.png", "samples.npz", "metrics.json", "config.json", "metrics.jsonl", "curves.png",
                 "train.log"]:
        assert os.path.isfile(os.path.join(run_dir, name)), name
    with np.load(os.path.join(run_dir, "samples.npz")) as z:
        images, labels = z["images"], z["labels"]
    assert images.shape == (500, 8, 8) and np.all((images >= 0) & (images <= 16))
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 50))
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    for key in REQUIRED:
        assert key in m, key
    assert m["bpd_kind"] == "exact" and m["nfe"] == 1 and m["steps"] == 4 and m["flow_kind"] == "glow"
    # bits/dim: finite, below the 8-bit ceiling; the marginal over classes is at most log2(10)/64 above
    # the conditional (log p(x) >= log p(x|y) - log 10)
    assert 0 < m["bits_per_dim"] < 8 and np.isfinite(m["bits_per_dim_conditional"])
    assert m["bits_per_dim"] <= m["bits_per_dim_conditional"] + np.log2(10) / 64 + 1e-5
    assert 0.0 <= m["classifier_accuracy"] <= 1.0 and m["classifier_accuracy"] == metrics["classifier_accuracy"]
    assert set(m["temperature_sweep"]) == {"0.5"}
    assert m["num_params"] > 0 and np.isfinite(m["final_loss"])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert 4 in [json.loads(line)["step"] for line in f if line.strip()]


def _flow_template(run_dir, extra):
    cfg = load_config(CONFIG, [f"run_dir={run_dir}", *TINY, *extra])
    images, labels = load_digits("train")
    arrays = {"image": exp.grid_values(images), "label": labels}
    _, params = exp.build(cfg, arrays, jax.random.key(5), jax.random.key(6))
    return make_state(params, jax.random.key(0), **exp.state_kwargs(cfg.train))[2]


def test_flow_resume_gives_identical_params(flow_run, tmp_path):
    full_dir, _ = flow_run  # 4 steps in one go
    split_dir = tmp_path / "split"
    n = ["train.num_steps=4"]
    assert exp.main(_args(CONFIG, TINY, split_dir, *n, "train.stop_at_step=2")) == {"stopped_at_step": 2}
    assert not os.path.exists(split_dir / "samples.npz")
    exp.main(_args(CONFIG, TINY, split_dir, *n))  # restarts from the checkpoint at step 2
    a, b = _restore(full_dir, _flow_template(full_dir, n)), _restore(split_dir, _flow_template(split_dir, n))
    _assert_same_state(a, b, 4)
    with open(split_dir / "metrics.json") as f:
        assert json.load(f)["resumed_from_step"] == 2
    with np.load(full_dir / "samples.npz") as za, np.load(split_dir / "samples.npz") as zb:
        np.testing.assert_array_equal(za["images"], zb["images"])


def test_bad_configs_rejected_before_building(tmp_path, capsys):
    cases = [(exp, CONFIG, TINY, o, needle) for o, needle in [
        ("flow.kind=maf", "flow.kind"), ("flow.levels=4", "even sizes"), ("sample.temperature=0.0",
                                                                           "sample.temperature"),
        ("flow.logit_alpha=0.5", "logit_alpha"), ("train.stop_at_step=9", "stop_at_step")]]
    cases += [(cnf_exp, CNF_CONFIG, CNF_TINY, o, needle) for o, needle in [
        ("data.dataset=mnist", "data.dataset"), ("cnf.solver=tsit5", "cnf.solver"),
        ("train.batch_size=512", "batch_size")]]
    for module, config, tiny, override, needle in cases:
        with pytest.raises(SystemExit):
            module.main(_args(config, tiny, tmp_path, "train.num_steps=4", override))
        assert needle in capsys.readouterr().err, override
    assert not os.path.exists(tmp_path / "config.json")


def _cnf_template(run_dir, extra):
    cfg = load_config(CNF_CONFIG, [f"run_dir={run_dir}", *CNF_TINY, *extra])
    _, params = cnf_exp.build(cfg, jax.random.key(5))
    return make_state(params, jax.random.key(0), **exp.state_kwargs(cfg.train))[2]


def test_cnf_script_trains_writes_artefacts_and_resumes_identically(tmp_path):
    n = ["train.num_steps=6"]
    full, split = tmp_path / "full", tmp_path / "split"
    m = cnf_exp.main(_args(CNF_CONFIG, CNF_TINY, full, *n))
    for name in ["samples.png", "samples.npz", "metrics.json", "config.json", "metrics.jsonl", "train.log"]:
        assert os.path.isfile(full / name), name
    for key in ["nll_init", "nll", "true_nll", "kl_estimate", "num_params", "nfe", "steps", "final_loss",
                "train_time_s", "sample_time_s", "bits_per_dim", "bpd_kind"]:
        assert key in m, key
    assert m["steps"] == 6 and m["bpd_kind"] == "none" and m["nfe"] == 8
    assert np.isfinite(m["nll"]) and m["nll"] < m["nll_init"]  # six large steps already help
    assert 1.0 < m["true_nll"] < 2.5  # the eight Gaussians' entropy (~1.70 nats) estimated on 64 points
    with np.load(full / "samples.npz") as z:
        assert z["samples"].shape == (50, 2) and np.all(np.isfinite(z["samples"]))
    assert cnf_exp.main(_args(CNF_CONFIG, CNF_TINY, split, *n, "train.stop_at_step=3")) == {"stopped_at_step": 3}
    m2 = cnf_exp.main(_args(CNF_CONFIG, CNF_TINY, split, *n))
    assert m2["resumed_from_step"] == 3 and m2["nll"] == m["nll"]
    _assert_same_state(_restore(full, _cnf_template(full, n)), _restore(split, _cnf_template(split, n)), 6)
