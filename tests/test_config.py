"""Config files: loading, typed overrides, misspelt keys, validation, CLI helper, config.json."""
import argparse
import json
import textwrap

import ml_collections
import pytest

from research.runs.config import config_from_cli, load_config, save_config

CONFIG_SRC = textwrap.dedent('''
    """Test config."""
    import ml_collections
    from research.runs.config import check_choice, check_positive, check_range


    def get_config():
        c = ml_collections.ConfigDict()
        c.seed = 0
        c.name = "demo"
        c.optim = ml_collections.ConfigDict()
        c.optim.learning_rate = 1e-3
        c.optim.warmup_steps = 10
        c.optim.decay_mask = "default"
        c.model = ml_collections.ConfigDict()
        c.model.hidden_size = 64
        c.model.qk_norm = True
        c.model.channels = (32, 64)
        c.model.attn_impl = "xla"
        c.eval_every = None
        return c


    def validate(c):
        check_positive(c, "optim.learning_rate", "model.hidden_size")
        check_positive(c, "optim.warmup_steps", allow_zero=True)
        check_choice(c, "model.attn_impl", ["xla", "pallas", "cudnn"])
        check_range(c, "seed", 0, 2**31 - 1)
''')


@pytest.fixture
def cfg_path(tmp_path):
    path = tmp_path / "my_config.py"
    path.write_text(CONFIG_SRC)
    return path


def test_load_without_overrides_is_locked(cfg_path):
    cfg = load_config(cfg_path)
    assert cfg.optim.learning_rate == 1e-3 and cfg.model.channels == (32, 64)
    assert cfg.is_locked
    with pytest.raises(AttributeError):
        cfg.new_field = 1
    with pytest.raises(AttributeError):
        cfg.optim.lrate = 1


@pytest.mark.parametrize("override, key, value", [
    ("optim.learning_rate=3e-4", "optim.learning_rate", 3e-4),
    ("optim.learning_rate=1", "optim.learning_rate", 1.0),
    ("optim.warmup_steps=0", "optim.warmup_steps", 0),
    ("model.qk_norm=false", "model.qk_norm", False),
    ("model.qk_norm=True", "model.qk_norm", True),
    ("name=run with spaces=ok", "name", "run with spaces=ok"),
    ("model.channels=(8, 16, 32)", "model.channels", (8, 16, 32)),
    ("model.channels=4,8", "model.channels", (4, 8)),
    ("eval_every=100", "eval_every", 100),
    ("eval_every=None", "eval_every", None),
    ("model.attn_impl=pallas", "model.attn_impl", "pallas"),
])
def test_typed_overrides(cfg_path, override, key, value):
    cfg = load_config(cfg_path, [override])
    got = cfg
    for part in key.split("."):
        got = got[part]
    assert got == value and type(got) is type(value)


def test_overrides_apply_in_order(cfg_path):
    cfg = load_config(cfg_path, ["seed=1", "seed=2"])
    assert cfg.seed == 2


@pytest.mark.parametrize("override, match", [
    ("optim.learnig_rate=1e-3", r"unknown config key 'optim.learnig_rate'; did you mean 'optim.learning_rate'"),
    ("optm.learning_rate=1e-3", r"unknown config key 'optm.learning_rate'; did you mean 'optim.learning_rate'"),
    ("hidden_size=3", r"unknown config key 'hidden_size'; did you mean 'model.hidden_size'"),
    ("zzzz=3", r"unknown config key 'zzzz'$"),
    ("model.hidden_size.x=3", r"unknown config key 'model.hidden_size.x'"),
])
def test_misspelt_keys_are_rejected_with_suggestions(cfg_path, override, match):
    with pytest.raises(ValueError, match=match):
        load_config(cfg_path, [override])


@pytest.mark.parametrize("override, match", [
    ("optim.warmup_steps=1.5", r"'optim.warmup_steps' expects an int, got '1.5'"),
    ("optim.learning_rate=fast", r"'optim.learning_rate' expects a float"),
    ("optim.learning_rate=nan", r"expects a finite float"),
    ("model.qk_norm=maybe", r"'model.qk_norm' expects a bool"),
    ("model.channels=(8, x)", r"'model.channels\[1\]' expects an int"),
    ("model=3", r"'model' is a group"),
    ("seed", r"must have the form key=value"),
])
def test_badly_typed_overrides_are_rejected(cfg_path, override, match):
    with pytest.raises(ValueError, match=match):
        load_config(cfg_path, [override])


@pytest.mark.parametrize("override, match", [
    ("optim.learning_rate=-1e-3", r"invalid config .*optim.learning_rate must be > 0, got -0.001"),
    ("optim.warmup_steps=-1", r"optim.warmup_steps must be >= 0"),
    ("model.attn_impl=palas", r"model.attn_impl must be one of \['xla', 'pallas', 'cudnn'\], got 'palas'; "
                              r"did you mean 'pallas'"),
    ("seed=-3", r"seed must be in \[0, 2147483647\]"),
])
def test_invalid_values_are_rejected_by_validate(cfg_path, override, match):
    with pytest.raises(ValueError, match=match):
        load_config(cfg_path, [override])


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.py")
    bad = tmp_path / "no_get.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="does not define get_config"):
        load_config(bad)
    wrong = tmp_path / "wrong_type.py"
    wrong.write_text("def get_config():\n    return {'a': 1}\n")
    with pytest.raises(TypeError, match="must return an ml_collections.ConfigDict"):
        load_config(wrong)
    good = tmp_path / "good.py"
    good.write_text(CONFIG_SRC)
    with pytest.raises(TypeError, match="not one string"):
        load_config(good, "seed=1")


def test_cli_helper(cfg_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="runs/x")
    cfg, args = config_from_cli(["--config", str(cfg_path), "--set", "seed=5", "--set", "optim.learning_rate=2e-3",
                                 "model.hidden_size=32", "--workdir", "runs/y"], parser=parser)
    assert (cfg.seed, cfg.optim.learning_rate, cfg.model.hidden_size) == (5, 2e-3, 32)
    assert args.workdir == "runs/y" and cfg.is_locked
    cfg, _ = config_from_cli([], default_config=str(cfg_path))
    assert cfg.seed == 0


@pytest.mark.parametrize("argv, message", [
    (["--set", "optim.learnig_rate=1"], "did you mean 'optim.learning_rate'"),
    (["--set", "optim.learning_rate=-1"], "must be > 0"),
])
def test_cli_errors_exit_with_message(cfg_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        config_from_cli(["--config", str(cfg_path)] + argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_save_config_roundtrip(cfg_path, tmp_path):
    cfg = load_config(cfg_path, ["model.channels=(1, 2)"])
    path = save_config(cfg, tmp_path / "run")
    data = json.load(open(path))
    assert path.endswith("config.json")
    assert data["optim"]["learning_rate"] == 1e-3 and data["model"]["channels"] == [1, 2]
    assert data["eval_every"] is None
    # the saved values reload into an equal ConfigDict
    assert ml_collections.ConfigDict(data).to_dict() == {**cfg.to_dict(), "model": {**cfg.model.to_dict(),
                                                                                     "channels": [1, 2]}}


@pytest.mark.parametrize("path, override, needle", [
    ("experiments/configs/digits_sde.py", "method=edm,sample.sampler=euler_maruyama", "needs a score SDE"),
    ("experiments/configs/digits_sde.py", "eval.bpd_rtol=0.0", "eval.bpd_rtol"),
    ("experiments/configs/digits_sde.py", "sde.sigma_data=-1.0", "sde.sigma_data"),
    ("experiments/configs/digits_sde.py", "model.class_dropout_prob=1.5", "model.class_dropout_prob"),
    ("experiments/configs/digits_sde.py", "method=ddpm", "method"),
    ("experiments/configs/digits_rf.py", "sample.sampler=dpmpp_9m", "sample.sampler"),
    ("experiments/configs/digits_rf.py", "sample.sampler=ddim", "needs a score SDE"),
    ("experiments/configs/digits_rf.py", "resume=sometimes", "resume"),
    ("experiments/configs/bench_2d.py", "methods=vp,ddpm", "ddpm"),
    ("experiments/configs/bench_2d.py", "datasets=mnist", "mnist"),
    ("experiments/configs/bench_2d.py", "train.warmup_steps=5000", "warmup_steps"),
    ("experiments/configs/packed_lm.py", "mode=zipped", "mode"),
    ("experiments/configs/packed_lm.py", "model.heads=3", "model.heads"),
    ("experiments/configs/nfe_frontier.py", "samplers=heun,ode:midpoint", "ode:midpoint"),
    ("experiments/configs/nfe_frontier.py", "budgets=5,x", "budgets"),
])
def test_experiment_configs_reject_bad_values_before_anything_is_built(path, override, needle):
    """Issue 17 item 5: each config's validate rejects these in one ValueError (no arrays built)."""
    from research.runs.config import load_config

    with pytest.raises(ValueError, match="invalid config") as e:
        load_config(path, override.split(",") if "sampler=" in override and "method=" in override else [override])
    assert needle in str(e.value)


def test_config_presets():
    from research.runs.config import load_config

    assert load_config("experiments/configs/bench_2d.py:quick").train.num_steps == 60
    with pytest.raises(ValueError, match="no preset 'huge'"):
        load_config("experiments/configs/bench_2d.py:huge")
    with pytest.raises(ValueError, match="no preset"):
        load_config("experiments/configs/digits_rf.py:quick")
