"""Precision policy: parsing, casting, the compute dtype really used by the forward pass, float32
master weights through the train step, and a bf16 vs fp32 flagship (DiT + rectified flow) run
whose loss curves agree."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.train.optim import adamw
from research.train.precision import Policy, cast_floating, get_policy, needs_loss_scaling
from research.train.state import create_train_state
from research.train.step import make_train_step

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


@pytest.mark.parametrize("spec, expected", [
    ("fp32", (F32, F32, F32)),
    ("bf16", (F32, BF16, F32)),
    ("float16", (F32, F16, F32)),
    ("params=float32,compute=bfloat16,output=bfloat16", (F32, BF16, BF16)),
    (" Params = f32 , compute = half ", (F32, F16, F32)),
])
def test_parse(spec, expected):
    p = get_policy(spec)
    assert (p.param_dtype, p.compute_dtype, p.output_dtype) == expected
    assert get_policy(str(p)) == p  # round trip
    assert needs_loss_scaling(p) == (expected[1] == F16)


@pytest.mark.parametrize("spec, err", [("fp8", ValueError), ("params=float32,kompute=bf16", ValueError),
                                       ("params", ValueError), (3, TypeError)])
def test_parse_errors(spec, err):
    with pytest.raises(err):
        get_policy(spec)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        Policy(compute_dtype=jnp.int32)


def test_cast_floating_leaves_others_alone():
    tree = {"w": jnp.ones(2), "i": jnp.arange(3), "k": jax.random.key(0), "h": jnp.ones(1, F16)}
    out = cast_floating(tree, BF16)
    assert out["w"].dtype == BF16 and out["h"].dtype == BF16
    assert out["i"].dtype == tree["i"].dtype and out["k"] is tree["k"]


class _MLP(nn.Module):  # dtype=None layers: compute in the promoted dtype of inputs and params
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.gelu(nn.Dense(16)(x)))


def _dot_dtypes(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    out = []

    def walk(j):
        for e in j.eqns:
            if e.primitive.name == "dot_general":
                out.append(tuple(v.aval.dtype for v in e.invars))
            for sub in jax.core.subjaxprs(e) if hasattr(jax.core, "subjaxprs") else []:
                walk(sub)
            for p in e.params.values():
                if hasattr(p, "jaxpr"):
                    walk(p.jaxpr)
    walk(jaxpr.jaxpr)
    return out


@pytest.mark.parametrize("compute", [F32, BF16, F16])
def test_wrap_model_fn_computes_in_policy_dtype(compute):
    model = _MLP()
    x = jax.random.normal(jax.random.key(1), (4, 5))
    params = model.init(jax.random.key(0), x)["params"]
    pol = Policy(F32, compute, F32)
    fn = pol.wrap_model_fn(lambda p, x: model.apply({"params": p}, x))
    y = fn(params, x)
    assert y.dtype == F32
    dots = _dot_dtypes(fn, params, x)
    assert len(dots) >= 2 and all(d == (jnp.dtype(compute),) * 2 for d in dots), dots
    # gradients w.r.t. the float32 master weights are float32 and close to the fp32 ones
    loss = lambda f: lambda p: jnp.sum(f(p, x) ** 2)  # noqa: E731
    g = jax.grad(loss(fn))(params)
    g32 = jax.grad(loss(lambda p, x: model.apply({"params": p}, x)))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g32)):
        assert a.dtype == F32
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05 * float(jnp.abs(b).max()))


def test_train_step_keeps_float32_master_weights():
    model = _MLP()
    x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
    params = model.init(jax.random.key(0), x)["params"]

    # the step casts the params; the inputs are cast by the wrapped model function (a model with
    # a `dtype` attribute, like the DiT, would do that itself)
    apply = get_policy("bf16").wrap_model_fn(lambda p, x: model.apply({"params": p}, x))

    def loss_fn(p, batch, key):
        del key
        assert jax.tree.leaves(p)[0].dtype == BF16  # the step handed over compute-dtype params
        return jnp.mean(apply(p, batch["x"]) ** 2), {}

    opt = adamw(1e-2)
    step = make_train_step(loss_fn, opt, precision="bf16", jit=False)
    state = create_train_state(params, opt, jax.random.key(0), ema=False)
    dots = _dot_dtypes(step, state, {"x": x})
    assert any(d == (jnp.dtype(BF16),) * 2 for d in dots), dots  # forward/backward matmuls in bf16
    new, m = jax.jit(step)(state, {"x": x})
    assert m["loss"].dtype == F32
    for leaf in jax.tree.leaves(new.params) + jax.tree.leaves(new.opt_state):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == F32
    assert not np.array_equal(new.params["Dense_0"]["kernel"], params["Dense_0"]["kernel"])


@pytest.mark.slow
def test_bf16_and_fp32_flagship_loss_curves_agree():
    from research.data.digits import load_digits
    from research.data.iterators import batch_iterator
    from research.generative.losses import rectified_flow_loss
    from research.nn.dit import DiT, init_dit, make_model_fn

    images, labels = load_digits("train")
    cfg = dict(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2)
    curves = {}
    for name, dtype, precision in (("fp32", F32, None), ("bf16", BF16, "bf16")):
        model = DiT(**cfg, dtype=dtype)
        model_fn = make_model_fn(model)

        def loss_fn(p, batch, key, model_fn=model_fn):
            return rectified_flow_loss(model_fn, p, batch["x"], key, cond=batch["y"])

        opt = adamw(2e-3)
        params = init_dit(DiT(**cfg), jax.random.key(0))  # same float32 init for both runs
        state = create_train_state(params, opt, jax.random.key(1), ema=False)
        step = make_train_step(loss_fn, opt, precision=precision)
        it = batch_iterator({"x": images, "y": labels}, 64, key=jax.random.key(2))
        losses = []
        for _ in range(40):
            state, m = step(state, next(it))
            losses.append(float(m["loss"]))
        curves[name] = np.asarray(losses)
    a, b = curves["fp32"], curves["bf16"]
    assert np.all(np.isfinite(b))
    assert a[-10:].mean() < 0.85 * a[:3].mean()  # it learns
    rel = np.abs(a - b) / a
    assert rel.max() < 0.02, rel  # per-step losses within 2% (same data, noise and timesteps)
    assert abs(a[-10:].mean() - b[-10:].mean()) / a[-10:].mean() < 0.02
