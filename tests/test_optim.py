"""AdamW against torch.optim.AdamW; schedule closed form; decay mask rule; clipping."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from research.train.optim import (adamw, current_learning_rate, default_decay_mask, is_decayed,
                                  make_optimizer, warmup_cosine_schedule)

NUM_STEPS = 120
SHAPES = {"a": (7, 5), "b": (5,), "c": (3, 2, 4)}


def _data(dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    # gradients of varying scale (incl. tiny ones, where eps matters) and sign
    grads = [{k: (rng.normal(size=s) * 10.0 ** rng.uniform(-6, 1)).astype(dtype) for k, s in SHAPES.items()}
             for _ in range(NUM_STEPS)]
    return params, grads


def _torch_run(params, grads, lrs, *, b1, b2, eps, wd, dtype):
    tparams = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.AdamW(list(tparams.values()), lr=lrs[0], betas=(b1, b2), eps=eps, weight_decay=wd,
                            amsgrad=False, foreach=False)
    out = []
    for t, g in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = lrs[t]
        for k, p in tparams.items():
            p.grad = torch.tensor(g[k], dtype=dtype)
        opt.step()
        out.append({k: p.detach().numpy().copy() for k, p in tparams.items()})
    return out


def _jax_run(opt, params, grads):
    params = jax.tree.map(jnp.asarray, params)
    state = opt.init(params)

    @jax.jit
    def update(params, state, g):
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    out = []
    for g in grads:
        params, state = update(params, state, jax.tree.map(jnp.asarray, g))
        out.append(jax.tree.map(np.asarray, params))
    return out, state


def _schedule_values(kind):
    if kind == "constant":
        return None, [1e-2] * NUM_STEPS
    sched = lambda s: 1e-2 * (0.5 + 0.5 * jnp.cos(jnp.pi * s / NUM_STEPS))  # noqa: E731
    return sched, [1e-2 * (0.5 + 0.5 * math.cos(math.pi * s / NUM_STEPS)) for s in range(NUM_STEPS)]


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["constant", "schedule"])
@pytest.mark.parametrize("betas_eps", [(0.9, 0.999, 1e-8), (0.8, 0.95, 1e-6)])
def test_adamw_matches_torch_float64(wd, kind, betas_eps):
    b1, b2, eps = betas_eps
    params, grads = _data(np.float64)
    sched, lrs = _schedule_values(kind)
    with jax.enable_x64(True):
        opt = adamw(sched if sched is not None else lrs[0], b1=b1, b2=b2, eps=eps, weight_decay=wd)
        ours, _ = _jax_run(opt, params, grads)
    ref = _torch_run(params, grads, lrs, b1=b1, b2=b2, eps=eps, wd=wd, dtype=torch.float64)
    for t in (0, 1, 9, NUM_STEPS - 1):
        for k in SHAPES:
            assert ours[t][k].dtype == np.float64
            np.testing.assert_allclose(ours[t][k], ref[t][k], rtol=1e-12, atol=1e-13, err_msg=f"step {t} leaf {k}")
    # the run actually moved the parameters (the test can fail)
    assert max(np.abs(ref[-1][k] - params[k]).max() for k in SHAPES) > 1e-2


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adamw_matches_torch_float32(wd):
    params, grads = _data(np.float32, seed=1)
    sched, lrs = _schedule_values("schedule")
    opt = adamw(sched, weight_decay=wd)
    ours, _ = _jax_run(opt, params, grads)
    ref = _torch_run(params, grads, lrs, b1=0.9, b2=0.999, eps=1e-8, wd=wd, dtype=torch.float32)
    for k in SHAPES:
        assert ours[-1][k].dtype == np.float32
        np.testing.assert_allclose(ours[-1][k], ref[-1][k], rtol=2e-5, atol=2e-6)


def test_adamw_weight_decay_is_decoupled_and_masked():
    # zero gradients: Adam part is exactly 0, so p_t = p_0 * (1 - lr*wd)^t on decayed leaves only
    params = {"w": jnp.full((3,), 2.0), "bias": jnp.full((2,), 2.0)}
    opt = adamw(0.1, weight_decay=0.5, mask=default_decay_mask)
    state = opt.init(params)
    p = params
    for _ in range(5):
        u, state = opt.update(jax.tree.map(jnp.zeros_like, p), state, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(p["w"], 2.0 * (1 - 0.05) ** 5, rtol=1e-6)
    np.testing.assert_allclose(p["bias"], 2.0)


def test_learning_rate_is_recorded():
    sched = lambda s: 0.1 / (1.0 + s)  # noqa: E731
    opt = optax.chain(optax.clip_by_global_norm(1.0), adamw(sched))
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    assert float(current_learning_rate(state)) == pytest.approx(0.1)
    for t in range(3):
        _, state = opt.update({"w": jnp.ones(3)}, state, params)
        assert float(current_learning_rate(state)) == pytest.approx(0.1 / (1 + t))  # rate used by update t
    assert current_learning_rate(optax.adam(0.1).init(params)) is None


def test_warmup_cosine_schedule_closed_form():
    peak, warm, total, frac = 3e-4, 10, 110, 0.1
    sched = warmup_cosine_schedule(peak, warmup_steps=warm, total_steps=total, end_lr_frac=frac)
    steps = np.arange(0, 130)
    got = np.array([float(sched(s)) for s in steps])
    end = peak * frac
    want = np.where(steps < warm, peak * steps / warm,
                    end + (peak - end) * 0.5 * (1 + np.cos(np.pi * np.clip((steps - warm) / (total - warm), 0, 1))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    assert got[0] == 0.0 and got[warm] == pytest.approx(peak) and got[total] == pytest.approx(end)
    assert np.all(np.diff(got[: warm + 1]) > 0) and np.all(np.diff(got[warm:total + 1]) < 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(peak_lr=-1.0, warmup_steps=1, total_steps=10), "peak_lr"),
    (dict(peak_lr=1.0, warmup_steps=11, total_steps=10), "warmup_steps"),
    (dict(peak_lr=1.0, warmup_steps=0, total_steps=0), "total_steps"),
    (dict(peak_lr=1.0, warmup_steps=1, total_steps=10, end_lr_frac=2.0), "end_lr_frac"),
])
def test_schedule_rejects_bad_arguments(kwargs, match):
    peak = kwargs.pop("peak_lr")
    with pytest.raises(ValueError, match=match):
        warmup_cosine_schedule(peak, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
])
def test_adamw_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adamw(1e-3, **kwargs)


def test_default_decay_mask_rule():
    params = {
        "Dense_0": {"kernel": 1, "bias": 2},
        "LayerNorm_0": {"scale": 3, "bias": 4},
        "RMSNorm_q": {"scale": 5},
        "Embed_0": {"embedding": 6},
        "pos_embed": 7,
        "blocks": {"attn": {"qkv": {"kernel": 8, "bias": 9}}, "adaLN_scale": 10},
        "x_embedder": {"proj": {"kernel": 11}},
        "final_layer": {"linear": {"kernel": 12}},
    }
    mask = default_decay_mask(params)
    decayed = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
    assert decayed == {"['Dense_0']['kernel']", "['blocks']['attn']['qkv']['kernel']",
                       "['x_embedder']['proj']['kernel']", "['final_layer']['linear']['kernel']"}
    assert is_decayed(("a", "kernel")) and not is_decayed(("a", "Bias"))


def _leaf_changes_with_zero_grads(decay_mask):
    # with zero gradients, only weight decay moves parameters
    params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)},
              "Embed_0": {"embedding": jnp.ones((3, 2))}}
    opt = make_optimizer(learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5, decay_mask=decay_mask)
    state = opt.init(params)
    u, _ = opt.update(jax.tree.map(jnp.zeros_like, params), state, params)
    return jax.tree.map(lambda x: bool(jnp.any(x != 0)), u)


def test_make_optimizer_decay_mask_options():
    assert _leaf_changes_with_zero_grads("default") == {
        "Dense_0": {"kernel": True, "bias": False}, "norm": {"scale": False}, "Embed_0": {"embedding": False}}
    assert all(jax.tree.leaves(_leaf_changes_with_zero_grads("all")))
    none = lambda p: jax.tree.map(lambda _: False, p)  # noqa: E731
    assert not any(jax.tree.leaves(_leaf_changes_with_zero_grads(none)))
    with pytest.raises(ValueError, match="decay_mask"):
        make_optimizer(learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.1, decay_mask="biases")


def test_make_optimizer_clips_global_norm():
    # clipped gradient g * c / ||g|| enters Adam; with one step Adam's update is sign-like, so check
    # through the first moment instead: mu_1 = (1 - b1) * clipped g.
    params = {"a": jnp.zeros(3), "b": jnp.zeros(4)}
    g = {"a": jnp.array([3.0, 0.0, 4.0]), "b": jnp.array([0.0, 12.0, 0.0, 0.0])}  # norm 13
    opt = make_optimizer(learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.0, clip_norm=1.0)
    _, state = opt.update(g, opt.init(params), params)
    adam_state = state[1][0]
    np.testing.assert_allclose(adam_state.mu["a"], 0.1 * np.array([3.0, 0.0, 4.0]) / 13, rtol=1e-6)
    np.testing.assert_allclose(adam_state.mu["b"], 0.1 * np.array([0.0, 12.0, 0.0, 0.0]) / 13, rtol=1e-6)
    opt_nc = make_optimizer(learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.0, clip_norm=None)
    _, state = opt_nc.update(g, opt_nc.init(params), params)
    np.testing.assert_allclose(state[0].mu["a"], 0.1 * np.array([3.0, 0.0, 4.0]), rtol=1e-6)


def test_schedule_indexing_matches_torch_lambdalr():
    # LambdaLR stepped after each optimizer.step(): update t uses base_lr * f(t), t = 0, 1, ...
    params, grads = _data(np.float64, seed=3)
    grads = grads[:30]
    base = 1e-2
    f = lambda s: 1.0 / (1.0 + 0.3 * s)  # noqa: E731
    tparams = [torch.tensor(params[k], dtype=torch.float64, requires_grad=True) for k in SHAPES]
    opt = torch.optim.AdamW(tparams, lr=base, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    for g in grads:
        for p, k in zip(tparams, SHAPES):
            p.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
        sched.step()
    with jax.enable_x64(True):
        ours, _ = _jax_run(adamw(lambda s: base * f(s), weight_decay=0.05), params, grads)
    for p, k in zip(tparams, SHAPES):
        np.testing.assert_allclose(ours[-1][k], p.detach().numpy(), rtol=1e-12, atol=1e-13)
