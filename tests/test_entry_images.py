"""Entry smoke tests of experiments/train_images.py: each CIFAR-10 config's smoke preset end to end on
tiny CIFAR-10 pickles written here, the Grain iterator state checkpointed with the train state, a
bitwise resume (params and batches), the embedded digits through the same pipeline, one-line errors."""
import json
import os

import numpy as np
import pytest

from experiments import train_images as exp
from tests.test_datasets import _write_cifar10

pytestmark = pytest.mark.entry

CONFIGS = {name: f"experiments/configs/{name}.py:smoke" for name in ("cifar10_rf_dit", "cifar10_edm", "cifar10_vp")}
FAST = ["train.progress=false", "sample.num_images=10", "data.record_batches=true"]


def _args(config, run_dir, *extra, root=None):
    args = ["--config", config, "--set", f"run_dir={run_dir}"]
    if root is not None:
        args += ["--set", f"data.root={root}"]
    for o in FAST + list(extra):
        args += ["--set", o]
    return args


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module: each script run builds fresh jitted closures, so the
    resume test's two runs of the rf program would otherwise compile it twice more (minutes on 2 cores)."""
    import jax

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    _write_cifar10(root, n_per=8)  # 5 batches x 8 = 40 training images, 32x32x3 uint8
    return root


@pytest.fixture(scope="module")
def smoke_runs(cifar_root, tmp_path_factory):
    out = {}
    for name, config in CONFIGS.items():
        run_dir = tmp_path_factory.mktemp(name)
        out[name] = run_dir, exp.main(_args(config, run_dir, root=cifar_root))
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_smoke_artefacts(smoke_runs, name):
    run_dir, m = smoke_runs[name]
    for f in ["samples.png", "samples.npz", "metrics.json", "config.json", "metrics.jsonl", "train.log"]:
        assert os.path.isfile(run_dir / f), f
    assert m["steps"] == 6 and np.isfinite(m["final_loss"]) and m["num_train_images"] == 40
    assert all(np.isfinite(r["loss"]) for r in _lines(run_dir / "metrics.jsonl") if "loss" in r)
    # checkpoints at step 3 (mid-way) and 6, each with its data state in the same step directory
    ckpts = run_dir / "checkpoints"
    assert sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) == [3, 6]
    for step in (3, 6):
        assert {"digest.json", "data_state.json"} <= set(os.listdir(ckpts / str(step)))
    with np.load(run_dir / "samples.npz") as z:
        assert z["images"].shape == (10, 32, 32, 3) and z["images"].dtype == np.uint8
    assert [r["step"] for r in _lines(run_dir / "batches.jsonl")] == list(range(1, 7))
    with open(run_dir / "config.json") as f:
        assert json.load(f)["preset"] == "smoke"


def test_resume_is_bitwise_identical(smoke_runs, cifar_root, tmp_path):
    full_dir, full = smoke_runs["cifar10_rf_dit"]
    config, split_dir = CONFIGS["cifar10_rf_dit"], tmp_path / "split"
    first = exp.main(_args(config, split_dir, "train.stop_at_step=4", root=cifar_root))
    assert first["stopped_at_step"] == 4 and not os.path.exists(split_dir / "samples.npz")
    # the data state of step 4 matches the uninterrupted run's position after 4 batches
    assert os.path.isfile(split_dir / "checkpoints" / "4" / "data_state.json")
    second = exp.main(_args(config, split_dir, root=cifar_root))  # resumes from step 4
    assert second["resumed_from_step"] == 4 and second["steps"] == 6
    assert second["state_sha256"] == full["state_sha256"]  # params, EMA and optimiser state, bitwise
    digests = []
    for d in (full_dir, split_dir):
        with open(d / "checkpoints" / "6" / "digest.json") as f:
            digests.append(json.load(f)["arrays"])  # per-array sha256 of the final checkpoint
    assert digests[0] == digests[1]
    assert _lines(split_dir / "batches.jsonl") == _lines(full_dir / "batches.jsonl")  # the same batches, in order
    with np.load(full_dir / "samples.npz") as za, np.load(split_dir / "samples.npz") as zb:
        np.testing.assert_array_equal(za["images"], zb["images"])


def test_digits_through_the_same_pipeline_and_fid_samples(tmp_path):
    """The embedded digits through the Grain loader; the FID sample shards (12 samples in shards of 8:
    sizes 8 + 4) are written once, and a rerun (training already done) resumes them instead of
    regenerating: same files, no shard generated."""
    args = _args(CONFIGS["cifar10_edm"], tmp_path, "data.name=digits", "data.augment=()", "train.num_steps=3",
                 "model.patch_size=2", "eval.fid_num_samples=12", "eval.fid_batch_size=8")
    m = exp.main(args)
    assert m["dataset"] == "digits" and m["steps"] == 3 and np.isfinite(m["final_loss"])
    with np.load(tmp_path / "samples.npz") as z:
        assert z["images"].shape == (10, 8, 8, 1)
    assert os.path.isfile(tmp_path / "checkpoints" / "3" / "data_state.json")
    from research.eval.fid_sampling import load_samples

    assert (m["fid_shards_generated"], m["fid_shards_resumed"]) == (2, 0)
    first = load_samples(m["fid_samples_dir"])
    assert first.shape == (12, 8, 8, 1) and first.dtype == np.uint8 and first.std() > 0
    os.remove(os.path.join(m["fid_samples_dir"], "samples_000001.npz"))   # an interrupted FID stage
    m2 = exp.main(args)
    assert (m2["fid_shards_generated"], m2["fid_shards_resumed"]) == (1, 1) and m2["resumed_from_step"] == 3
    np.testing.assert_array_equal(load_samples(m2["fid_samples_dir"]), first)


def test_missing_data_root_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        exp.main(_args(CONFIGS["cifar10_edm"], tmp_path))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "data.root is not set" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:
        exp.main(_args(CONFIGS["cifar10_vp"], tmp_path, root=tmp_path / "nowhere"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 5 and "does not exist" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "checkpoints")


def test_gpu_presets_load_with_the_documented_sizes():
    from research.runs.config import load_config

    for name in CONFIGS:
        c = load_config(f"experiments/configs/{name}.py", ["data.root=/data/cifar10"])
        assert (c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.patch_size) == (768, 12, 12, 2)
        assert c.train.precision == "bf16" and c.model.attn_impl == "pallas" and c.eval.fid_num_samples == 0
    # the expected-hours arithmetic in each docstring is what gpu_hours_estimate gives for the preset
    import importlib

    from experiments.configs.images_common import gpu_hours_estimate

    for name in CONFIGS:
        c = load_config(f"experiments/configs/{name}.py", ["data.root=/x"])
        est = gpu_hours_estimate(batch_size=c.train.batch_size, num_steps=c.train.num_steps, mfu=0.30)
        doc = " ".join(importlib.import_module(f"experiments.configs.{name}").__doc__.split())
        flops = f"{est['flops_per_step']:.2e}".replace("e+", "e")
        assert f"{flops} FLOP per step" in doc and f"~ {est['hours']:.1f} h" in doc, name
    edm = load_config("experiments/configs/cifar10_edm.py", ["data.root=/x"])
    assert (edm.method.sigma_data, edm.method.P_mean, edm.method.P_std, edm.sample.num_steps) == (0.5, -1.2, 1.2, 18)
