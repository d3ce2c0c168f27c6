"""Fault drills on the real flagship script (subprocesses, tiny sizes).

Each drill runs ``python -m experiments.train_digits_rf`` the way a user would and checks what the user
sees: SIGKILL during training and during a checkpoint write, then the same command again, ends with
samples bit-identical to an uninterrupted run (the same program runs twice, so bitwise equality is the
right test); a corrupted latest checkpoint is detected, named in a warning and skipped; a non-finite
loss, a bad key and a bad value each end with one ``error:`` line on stderr, a nonzero exit status and
no traceback.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.entry, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.hidden_size=16", "model.depth=1", "model.num_heads=2", "model.mlp_ratio=2.0",
    "train.batch_size=16", "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=2",
    "train.keep_checkpoints=5", "train.progress=false", "train.ema_half_life_images=100.0",
    "sample.per_class=2", "sample.num_steps=2", "sample.grid_columns=2", "train.num_steps=8", "eval.bpd_images=0",
]


def _cmd(run_dir, *extra):
    args = [sys.executable, "-m", "experiments.train_digits_rf", "--config", "experiments/configs/digits_rf.py",
            "--set", f"run_dir={run_dir}"]
    for o in TINY + list(extra):
        args += ["--set", o]
    return args


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="default")
    env.update(extra)
    return env


def _run(run_dir, *extra, env=None, check=True):
    p = subprocess.run(_cmd(run_dir, *extra), cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def _samples(run_dir):
    with np.load(os.path.join(run_dir, "samples.npz")) as z:
        return z["images"], z["labels"]


def _steps(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    _run(run_dir)
    return _samples(run_dir)


def _assert_same(run_dir, reference):
    images, labels = _samples(run_dir)
    np.testing.assert_array_equal(labels, reference[1])
    np.testing.assert_array_equal(images, reference[0])


def test_sigkill_during_training_then_resume_is_bit_identical(tmp_path, reference):
    # Kill as soon as the step-4 checkpoint is complete (training is then between steps 4 and 8).
    p = subprocess.Popen(_cmd(tmp_path), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if any(s >= 4 for s in _steps(tmp_path)):
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    assert not os.path.exists(tmp_path / "samples.npz")
    _run(tmp_path)
    _assert_same(tmp_path, reference)


def test_sigkill_during_checkpoint_write_then_resume_is_bit_identical(tmp_path, reference):
    # The fault hook kills the process after the step-6 checkpoint's arrays are written and before its
    # digest is: on restart that checkpoint must count as incomplete and the run resumes from step 4.
    p = _run(tmp_path, env=_env(RESEARCH_FAULT_KILL_IN_SAVE="6"), check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert 6 in _steps(tmp_path) or any("6" in n for n in os.listdir(tmp_path / "checkpoints"))
    q = _run(tmp_path)
    assert "incomplete" in q.stderr.lower() or "incomplete" in q.stdout.lower(), q.stderr[-2000:]
    _assert_same(tmp_path, reference)


def _largest_file(directory):
    best, size = None, -1
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            if os.path.getsize(path) > size:
                best, size = path, os.path.getsize(path)
    return best


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(tmp_path, reference):
    _run(tmp_path, "train.stop_at_step=6")
    assert _steps(tmp_path)[-1] == 6
    victim = _largest_file(tmp_path / "checkpoints" / "6")
    with open(victim, "r+b") as f:  # what the user did: 64 bytes flipped in the middle of the largest file
        f.seek(os.path.getsize(victim) // 2)
        chunk = f.read(64)
        f.seek(os.path.getsize(victim) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    q = _run(tmp_path)
    text = q.stderr + q.stdout
    assert os.path.join("checkpoints", "6") in text, text[-2000:]
    _assert_same(tmp_path, reference)
    # the corrupt step was moved aside (kept, not deleted) and written afresh by the resumed run
    assert os.listdir(tmp_path / "checkpoints.corrupt")
    assert 6 in _steps(tmp_path) and os.path.isfile(tmp_path / "checkpoints" / "6" / "digest.json")


def _one_line_error(p, *needles):
    assert p.returncode not in (0, None), p.stdout[-2000:]
    err = [line for line in p.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len([line for line in err if line.startswith("error:")]) == 1, p.stderr[-3000:]
    line = next(line for line in err if line.startswith("error:"))
    for n in needles:
        assert n in line, line


def test_nonfinite_loss_is_one_line(tmp_path):
    p = _run(tmp_path, "train.learning_rate=1e30", "train.clip_norm=0.0", check=False)
    _one_line_error(p, "non-finite loss")
    assert p.returncode == 4


def test_nan_learning_rate_is_rejected_before_training(tmp_path):
    p = _run(tmp_path, "train.learning_rate=nan", check=False)
    _one_line_error(p, "train.learning_rate")
    assert p.returncode == 2 and not os.path.exists(tmp_path / "checkpoints")


def test_bad_key_and_bad_value_are_one_line(tmp_path):
    p = _run(tmp_path, "train.num_stpes=3", check=False)
    _one_line_error(p, "train.num_steps")
    p = _run(tmp_path, "model.class_dropout_prob=1.5", check=False)
    _one_line_error(p, "model.class_dropout_prob")
    p = _run(tmp_path, "sample.sampler=midpoint", check=False)
    _one_line_error(p, "sample.sampler")
    assert not os.path.exists(tmp_path / "config.json")


def test_config_mismatch_is_refused_and_keeps_config_json(tmp_path):
    _run(tmp_path, "train.stop_at_step=2")
    before = open(tmp_path / "config.json").read()
    p = _run(tmp_path, "train.learning_rate=0.002", check=False)
    _one_line_error(p, "train.learning_rate")
    assert p.returncode == 3
    assert open(tmp_path / "config.json").read() == before
    _run(tmp_path, "train.learning_rate=0.002", "resume=force", "train.stop_at_step=4")
    assert _steps(tmp_path)[-1] == 4
