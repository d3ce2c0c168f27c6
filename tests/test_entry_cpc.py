"""Entry smoke test: the digits contrastive (SimCLR-style) script on tiny sizes for both encoders, its
artefacts and metrics, an interrupted run resuming bit-identically, and one-line config errors."""
import json
import os

import jax
import numpy as np
import pytest

from experiments import train_digits_cpc as exp
from research.runs.config import load_config

pytestmark = pytest.mark.entry

CONFIG = "experiments/configs/digits_cpc.py"
TINY = [
    "model.hidden=(16,)", "model.channels=(4,4)", "model.feature_dim=8", "model.projection_hidden=8",
    "model.projection_dim=4", "train.batch_size=16", "train.num_steps=4", "train.warmup_steps=1", "train.log_every=2",
    "train.checkpoint_every=100", "train.progress=false", "probe.max_iter=50",
]


def _args(run_dir, *extra):
    args = ["--config", CONFIG, "--set", f"run_dir={run_dir}"]
    for o in TINY + list(extra):
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    out = {}
    for encoder in ("mlp", "conv"):
        run_dir = tmp_path_factory.mktemp(f"cpc_{encoder}")
        # the supervised baseline does not depend on the encoder kind: trained once (mlp), to save time
        extra = ["train.supervised=false"] if encoder == "conv" else []
        out[encoder] = (run_dir, exp.main(_args(run_dir, f"model.encoder={encoder}", *extra)))
    return out


@pytest.mark.parametrize("encoder", ["mlp", "conv"])
def test_smoke_artefacts_and_metrics(smoke_runs, encoder):
    run_dir, metrics = smoke_runs[encoder]
    for name in ["metrics.json", "config.json", "train.log"]:
        assert os.path.isfile(os.path.join(run_dir, name)), name
    phases = ("contrastive", "supervised") if encoder == "mlp" else ("contrastive",)
    for phase in phases:
        for name in ["config.json", "metrics.jsonl", "curves.png"]:
            assert os.path.isfile(os.path.join(run_dir, phase, name)), (phase, name)
        assert os.listdir(os.path.join(run_dir, phase, "checkpoints"))
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    keys = ["linear_probe_accuracy", "projection_probe_accuracy", "raw_pixel_probe_accuracy",
            "random_encoder_probe_accuracy"]
    if encoder == "mlp":
        keys += ["supervised_probe_accuracy", "supervised_classifier_accuracy"]
        assert np.isfinite(m["supervised_final_loss"])
    else:
        assert not os.path.exists(os.path.join(run_dir, "supervised"))
        assert m["supervised_probe_accuracy"] is None
    for key in keys:
        assert 0.0 <= m[key] <= 1.0, key
        assert m[key] == metrics[key]
    assert m["raw_pixel_probe_accuracy"] > 0.8  # 50 lbfgs iterations on the pixels: far above chance
    # at T ~ 0.1 one row loss is at most log(2N - 1) + 2 / T (cosines in [-1, 1])
    assert np.isfinite(m["final_loss"]) and 0 < m["final_loss"] < np.log(31) + 2 / 0.09
    assert 0.02 <= m["final_temperature"] <= 1.0 and m["final_temperature"] != pytest.approx(0.1, abs=1e-7)
    assert m["steps"] == 4 and m["encoder"] == encoder and m["resumed_from_step"] == 0
    assert m["contrastive_train_time_s"] > 0 and m["wall_time_s"] > 0
    if encoder == "mlp":  # 64 -> 16 -> 8 encoder, 8 -> 8 -> 4 head, the log-temperature
        assert m["encoder_num_params"] == 64 * 16 + 16 + 16 * 8 + 8
        assert m["num_params"] == m["encoder_num_params"] + 8 * 8 + 8 + 8 * 4 + 4 + 1
    with open(os.path.join(run_dir, "contrastive", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    last = records[-1]
    assert last["step"] == 4 and 0 <= last["pair_accuracy"] <= 1
    assert last["mi_lower_bound"] == pytest.approx(np.log(31) - last["loss"], rel=1e-5)


def _final_states(run_dir):
    """The latest checkpoint of each phase, restored into templates built from other keys."""
    from research.train.checkpoint import Checkpointer

    cfg = load_config(CONFIG, [f"run_dir={run_dir}", *TINY, "model.encoder=mlp"])
    out = {}
    for phase in exp.PHASES:
        template = exp.build(cfg, phase, jax.random.key(123), jax.random.key(7))["state"]
        ck = Checkpointer(os.path.join(run_dir, phase, "checkpoints"), save_every=cfg.train.checkpoint_every)
        try:
            out[phase] = ck.restore_latest(template)
        finally:
            ck.close()
    return out


def test_interrupted_run_resumes_bit_identically(smoke_runs, tmp_path):
    full_dir, _ = smoke_runs["mlp"]
    split_dir = tmp_path / "split"
    out = exp.main(_args(split_dir, "model.encoder=mlp", "train.stop_at_step=2"))
    assert out == {"stopped_at_step": 2}
    assert not os.path.exists(split_dir / "metrics.json")
    exp.main(_args(split_dir, "model.encoder=mlp"))
    a, b = _final_states(full_dir), _final_states(split_dir)
    for phase in exp.PHASES:
        assert int(a[phase].step) == int(b[phase].step) == 4
        la, lb = jax.tree.leaves(a[phase].params), jax.tree.leaves(b[phase].params)
        assert len(la) == len(lb) > 0
        for x, y in zip(la + jax.tree.leaves(a[phase].opt_state), lb + jax.tree.leaves(b[phase].opt_state)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # same program, same inputs: bitwise
        np.testing.assert_array_equal(jax.random.key_data(a[phase].key), jax.random.key_data(b[phase].key))
    with open(full_dir / "metrics.json") as f:
        ma = json.load(f)
    with open(split_dir / "metrics.json") as f:
        mb = json.load(f)
    assert mb["resumed_from_step"] == 2 and mb["supervised_resumed_from_step"] == 2
    for key in ["linear_probe_accuracy", "projection_probe_accuracy", "supervised_probe_accuracy",
                "final_temperature", "random_encoder_probe_accuracy"]:
        assert ma[key] == mb[key], key


@pytest.mark.parametrize("override, needle", [
    ("model.encoder=resnet", "model.encoder"),
    ("contrastive.temperature=5.0", "contrastive.temperature"),
    ("contrastive.min_temperature=0.0", "contrastive.min_temperature"),
    ("augment.cutout_prob=1.5", "augment.cutout_prob"),
    ("train.batch_size=1", "train.batch_size"),
    ("model.hidden=(0,)", "model.hidden"),
    ("train.stop_at_step=9", "train.stop_at_step"),
    ("probe.c=2.0", "probe.C"),
])
def test_bad_config_rejected_before_compiling(tmp_path, capsys, override, needle):
    with pytest.raises(SystemExit) as e:
        exp.main(_args(tmp_path, override))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not os.path.exists(tmp_path / "config.json")
