"""MetricsLogger (JSONL, TensorBoard, process 0 only), ProgressBar, and train_loop's logging,
NaN detection, eval hook and final checkpoint."""
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.runs import metrics as tlog
from research.train.checkpoint import Checkpointer
from research.runs.metrics import MetricsLogger, ProgressBar, read_metrics
from research.train.loop import train_loop
from research.train.optim import adamw
from research.train.state import create_train_state
from research.train.step import make_train_step


def test_metrics_logger_writes_jsonl(tmp_path):
    with MetricsLogger(tmp_path / "run") as logger:
        logger.log(1, {"loss": jnp.float32(0.5), "lr": np.float64(1e-3), "count": jnp.int32(3)})
        logger.log(2, {"loss": jnp.float32(np.nan), "vec": jnp.arange(2)})
    lines = open(tmp_path / "run" / "metrics.jsonl").read().splitlines()
    assert [json.loads(l) for l in lines] == [{"step": 1, "loss": 0.5, "lr": 1e-3, "count": 3},
                                              {"step": 2, "loss": "nan", "vec": [0, 1]}]
    assert read_metrics(tmp_path / "run")[0]["loss"] == 0.5
    with MetricsLogger(tmp_path / "run") as logger:  # appends on restart
        logger.log(3, {"loss": 0.25})
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    with pytest.raises(ValueError, match="reserved key 'step'"):
        MetricsLogger(tmp_path / "run").log(4, {"step": 1})


def test_metrics_logger_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        logger.log(1, {"loss": 0.5})
    files = os.listdir(tmp_path / "tensorboard")
    assert any(f.startswith("events.out.tfevents") for f in files)


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(tlog.jax, "process_index", lambda: 1)
    logger = MetricsLogger(tmp_path / "run")
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not os.path.exists(tmp_path / "run")


def test_progress_bar_reports_steps_per_sec():
    out = io.StringIO()
    bar = ProgressBar(10, initial=2, file=out)
    bar.update(6, loss=0.5)
    assert bar.steps_per_sec is not None and bar.steps_per_sec > 0
    bar.close()
    text = out.getvalue()
    assert "6/10" in text and "loss=0.5" in text and "steps/s=" in text


# ---------------------------------------------------------------- train_loop
def _loss(params, batch, key):
    del key
    loss = jnp.mean((batch["x"] * params["w"] - 1.0) ** 2)
    return loss, {}


def _state_and_step():
    opt = adamw(1e-2, weight_decay=0.0)
    return create_train_state({"w": jnp.ones(())}, opt, jax.random.key(0), ema=False), make_train_step(_loss, opt)


def _batches(start, nan_at=None):
    i = start
    while True:
        x = np.full((4,), 0.5, np.float32)
        if nan_at is not None and i == nan_at:
            x[0] = np.nan
        yield {"x": x}
        i += 1


def test_loop_logs_every_k_steps_without_implicit_transfers(tmp_path):
    state, step = _state_and_step()
    with jax.transfer_guard_device_to_host("disallow"):  # only the explicit fetches at log steps
        state = train_loop(state, step, _batches, num_steps=12, run_dir=tmp_path, log_every=5, progress=False)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [5, 10, 12]
    assert set(records[0]) == {"step", "loss", "grad_norm", "lr", "loss_mean", "steps_per_sec"}
    assert int(state.step) == 12


def test_loop_raises_on_nan_with_step_range(tmp_path):
    state, step = _state_and_step()
    ck = Checkpointer(tmp_path / "ckpt", save_every=5)
    # batch index 7 (0-based) is consumed by step 8
    with pytest.raises(FloatingPointError, match=r"non-finite loss between step 6 and 10 \(first at step 8"):
        train_loop(state, step, lambda s: _batches(s, nan_at=7), num_steps=20, run_dir=tmp_path,
                   checkpointer=ck, log_every=5, progress=False)
    assert ck.all_steps() == [5]  # nothing non-finite was saved
    assert [r["step"] for r in read_metrics(tmp_path)] == [5]
    ck.close()


def test_loop_checks_finiteness_before_checkpointing(tmp_path):
    # log_every larger than save_every: the window is flushed (and checked) at each checkpoint step
    state, step = _state_and_step()
    ck = Checkpointer(tmp_path / "ckpt", save_every=3)
    with pytest.raises(FloatingPointError, match=r"between step 7 and 9 \(first at step 8"):
        train_loop(state, step, lambda s: _batches(s, nan_at=7), num_steps=20, run_dir=tmp_path,
                   checkpointer=ck, log_every=100, progress=False)
    assert ck.all_steps() == [3, 6]
    ck.close()


def test_loop_eval_hook_and_final_checkpoint(tmp_path):
    state, step = _state_and_step()
    calls = []

    def eval_fn(st, s):
        calls.append((s, int(st.step)))
        return {"w": st.params["w"]}

    ck = Checkpointer(tmp_path / "ckpt", save_every=4)
    state = train_loop(state, step, _batches, num_steps=10, run_dir=tmp_path, checkpointer=ck,
                       log_every=100, eval_fn=eval_fn, eval_every=3, progress=False)
    assert calls == [(3, 3), (6, 6), (9, 9), (10, 10)]
    evals = [r for r in read_metrics(tmp_path) if "eval/w" in r]
    assert [r["step"] for r in evals] == [3, 6, 9, 10]
    assert evals[-1]["eval/w"] == pytest.approx(float(state.params["w"]))
    assert ck.all_steps() == [4, 8, 10]
    ck.close()


def test_loop_accepts_positioned_iterable_and_checks_arguments(tmp_path):
    state, step = _state_and_step()
    state = train_loop(state, step, [{"x": np.ones(4, np.float32)}] * 3, num_steps=3, run_dir=tmp_path,
                       progress=False)
    assert int(state.step) == 3
    with pytest.raises(ValueError, match="ran out after step 4"):
        train_loop(state, step, [{"x": np.ones(4, np.float32)}], num_steps=5, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="beyond num_steps"):
        train_loop(state, step, _batches, num_steps=2, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="eval_every"):
        train_loop(state, step, _batches, num_steps=5, run_dir=tmp_path, eval_fn=lambda s, i: {}, progress=False)
    with pytest.raises(TypeError, match="batch_iter"):
        train_loop(state, step, 3, num_steps=5, run_dir=tmp_path, progress=False)


# ---------------------------------------------------------------- curves.png
def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", head
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_loop_writes_curves_png(tmp_path):
    state, step = _state_and_step()
    train_loop(state, step, _batches, num_steps=12, run_dir=tmp_path, log_every=3, progress=False)
    w, h = _png_size(tmp_path / "curves.png")
    assert w > 3 * 300 and h > 200  # three panels: loss, learning rate, grad norm


def test_plot_curves_skips_absent_metrics_and_handles_model_prefixes(tmp_path):
    with MetricsLogger(tmp_path / "a", curves=False) as logger:
        for s in (1, 2, 3):
            logger.log(s, {"generator/loss": 1.0 / s, "discriminator/loss": float("nan") if s == 2 else 0.5,
                           "eval/loss": 3.0})
    assert not (tmp_path / "a" / "curves.png").exists()  # curves=False
    out = tlog.plot_curves(tmp_path / "a")
    w, _ = _png_size(out)
    assert out == str(tmp_path / "a" / "curves.png") and w < 2 * 420  # only the loss panel
    with MetricsLogger(tmp_path / "b") as logger:
        logger.log(1, {"something_else": 1.0})
    assert tlog.plot_curves(tmp_path / "b") is None and not (tmp_path / "b" / "curves.png").exists()
    assert tlog.plot_curves(tmp_path / "missing") is None


def test_loop_watches_a_named_metric(tmp_path):
    state, step = _state_and_step()

    def renamed(st, b):
        st, m = step(st, b)
        return st, {"generator/loss": m["loss"]}

    with pytest.raises(KeyError, match="watched metric 'loss'"):
        train_loop(state, renamed, _batches, num_steps=2, run_dir=tmp_path, progress=False)
    state, step = _state_and_step()
    with pytest.raises(FloatingPointError, match=r"non-finite generator/loss between step 1 and 3 \(first at step 2"):
        train_loop(state, renamed, lambda s: _batches(s, nan_at=1), num_steps=6, run_dir=tmp_path / "w",
                   log_every=3, progress=False, watch="generator/loss")
    state, step = _state_and_step()
    train_loop(state, renamed, _batches, num_steps=4, run_dir=tmp_path / "ok", log_every=2, progress=False,
               watch="generator/loss")
    assert "generator/loss_mean" in read_metrics(tmp_path / "ok")[0]
