"""The train-step benchmark script: FLOP counter, records, table, and error reporting."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from experiments import bench_train_step as bench  # noqa: E402
from research.nn.dit import DiT, init_dit  # noqa: E402


def test_count_flops_matches_xla_cost_analysis():
    """The analytic matmul count agrees with XLA's count of the forward pass (XLA also counts the
    elementwise work, a few per cent here, so it may be slightly larger, never smaller)."""
    kw = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=128, depth=2, num_heads=4)
    batch = 4
    model = DiT(**kw, scan_blocks=False)  # XLA counts a scanned (while-loop) body only once
    params = init_dit(model, jax.random.key(0))
    x = jnp.zeros((batch, 8, 8, 4))
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, jnp.zeros(batch), jnp.zeros(batch, jnp.int32)))
    cost = fwd.lower(params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ours = bench.count_flops(kw, batch)
    assert ours["train_step"] == 3 * ours["forward"]
    ratio = float(cost["flops"]) / ours["forward"]
    assert 1.0 <= ratio < 1.15, ratio
    # doubling the batch doubles the count; tokens enter attention quadratically
    assert bench.count_flops(kw, 2 * batch)["forward"] == pytest.approx(2 * ours["forward"])


def test_bench_runs_records_and_reports_compile_errors(tmp_path, monkeypatch, capsys):
    """One tiny CPU run: JAX and eager produce records; a failing torch.compile is reported as an
    error row (not dropped)."""
    def broken_compile(*a, **k):
        raise RuntimeError("no C++ compiler (simulated)")

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "r.json"
    records = bench.main(["--cpu", "--configs", "tiny", "--repeats", "2", "--target-seconds", "0.2",
                          "--json", str(out)])
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert [r["impl"] for r in saved] == ["jax", "torch_eager", "torch_compile"]
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda k: init_dit(DiT(**bench.PRESETS["tiny"][0]), k), jax.random.key(0))))
    for r in saved[:2]:
        assert set(r) >= {"impl", "device", "config", "steps_per_s", "peak_bytes"}
        assert r["config"]["name"] == "tiny" and r["device"].startswith("CPU")
        assert r["steps_per_s"] > 0 and len(r["steps_per_s_repeats"]) == 2
        assert r["steps_per_s"] == pytest.approx(float(np.median(r["steps_per_s_repeats"])))
        # params, EMA and the two Adam moments are live throughout the step (float32)
        assert r["peak_bytes"] >= 4 * 4 * n_params
    err = saved[2]
    assert err["steps_per_s"] is None and "no C++ compiler" in err["error"]
    assert "error: RuntimeError: no C++ compiler (simulated)" in text
    assert "jax / torch_eager" in text and records[0]["impl"] == "jax"


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls", "jax,tensorflow"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "huge"])
