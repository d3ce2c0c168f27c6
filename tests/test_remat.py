"""Remat policies through the train step: every policy gives the same update as no remat, and
the compiled activation memory is ordered none > dots_saveable > full (blocks under nn.scan).

One ahead-of-time compile per policy serves both checks (compiles dominate the runtime)."""
import jax
import numpy as np
import optax
import pytest

from research.generative.losses import rectified_flow_loss
from research.nn.dit import DiT, init_dit, make_model_fn
from research.train.state import create_train_state
from research.train.step import make_train_step

pytestmark = pytest.mark.slow  # five DiT train-step compiles (~15-25 s each on a busy CPU)

POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
            "save_names:attn_out,mlp_hidden")
CFG = dict(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=3, num_heads=2)
BATCH = 16


@pytest.fixture(scope="module")
def results():
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((BATCH, 8, 8, 1)).astype(np.float32),
             "y": rng.integers(0, 10, size=BATCH).astype(np.int32)}
    params = init_dit(DiT(**CFG), jax.random.key(0))
    # make the zero-initialised adaLN/final layers non-zero so every block gets real gradients
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    params = jax.tree.unflatten(tdef, [p + 0.02 * jax.random.normal(k, p.shape)
                                       for p, k in zip(leaves, keys)])
    opt = optax.sgd(1.0)  # new params = params - grads: the update *is* the gradient
    out = {}
    for policy in POLICIES:
        model_fn = make_model_fn(DiT(**CFG, remat_policy=policy, scan_blocks=True))

        def loss_fn(p, b, key, model_fn=model_fn):
            return rectified_flow_loss(model_fn, p, b["x"], key, cond=b["y"])

        step = make_train_step(loss_fn, opt, donate=False)
        state = create_train_state(params, opt, jax.random.key(1), ema=False)
        compiled = step.lower(state, batch).compile()
        new, m = compiled(state, batch)
        grads = jax.tree.map(lambda a, b: a - b, state.params, new.params)
        out[policy] = dict(temp=compiled.memory_analysis().temp_size_in_bytes, grads=grads,
                           loss=float(m["loss"]))
    return out


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_policy_gradients_equal_no_remat(results, policy):
    ref, got = results["none"], results[policy]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref["grads"])
    flat_got = jax.tree.leaves(got["grads"])
    nonzero = 0
    for (path, a), b in zip(flat_ref, flat_got):
        scale = float(np.abs(a).max()) + 1e-12
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))
        nonzero += scale > 1e-6
    assert nonzero > 10  # the comparison is not between zero trees


def test_memory_ordering_under_scan(results):
    none, dots, full = (results[p]["temp"] for p in ("none", "dots_saveable", "full"))
    assert none > dots > full, (none, dots, full)
    assert results["dots_with_no_batch_dims_saveable"]["temp"] < none
    assert results["save_names:attn_out,mlp_hidden"]["temp"] < none


@pytest.mark.entry
def test_bench_memory_script_smoke(tmp_path):
    import json

    from experiments import bench_memory

    path = tmp_path / "rows.jsonl"
    bench_memory.main(["--depths", "1", "--widths", "16", "--policies", "none;full",
                       "--batch-size", "2", "--input-size", "4", "--num-heads", "2",
                       "--steps", "1", "--rounds", "1", "--json", str(path)])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["policy"] for r in rows] == ["none", "full"]
    for r in rows:
        assert {"policy", "depth", "width", "temp_bytes", "step_ms"} <= set(r)
        assert r["temp_bytes"] > 0 and r["step_ms"] > 0 and r["depth"] == 1 and r["width"] == 16
