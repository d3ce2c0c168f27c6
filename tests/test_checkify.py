"""Traced-value checks through jax.experimental.checkify: inactive (and free) in plain code,
reported when the caller wraps the function with ``checkify.checkify``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from research.generative.losses import cfm_loss
from research.generative.ot import linear_assignment
from research.nn.dit import DiT, init_dit, make_model_fn


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_linear_assignment_reports_a_non_finite_cost(bad):
    c = np.random.default_rng(0).standard_normal((5, 5)).astype(np.float32)
    c[2, 3] = bad
    perm = jax.jit(linear_assignment)(c)  # unchecked: still runs (an arbitrary permutation)
    assert perm.shape == (5,)
    err, _ = jax.jit(checkify.checkify(linear_assignment))(c)
    with pytest.raises(checkify.JaxRuntimeError, match="non-finite"):
        err.throw()
    err, perm_ok = jax.jit(checkify.checkify(linear_assignment))(np.nan_to_num(c, posinf=1.0, neginf=-1.0, nan=0.0))
    err.throw()  # a finite cost passes
    assert sorted(np.asarray(perm_ok).tolist()) == list(range(5))


def test_ot_cfm_loss_surfaces_the_check_through_a_checkified_step():
    """A NaN in the data reaches the OT cost inside cfm_loss; checkifying the loss reports it."""
    x0 = jnp.ones((8, 2)).at[3, 0].set(jnp.nan)
    zero = lambda p, x, t, c, k: jnp.zeros_like(x)
    step = lambda x, k: cfm_loss(zero, None, x, k, coupling="ot")[0]
    jax.jit(step)(x0, jax.random.PRNGKey(0))  # unchecked: runs
    err, _ = jax.jit(checkify.checkify(step))(x0, jax.random.PRNGKey(0))
    with pytest.raises(checkify.JaxRuntimeError, match="linear_assignment"):
        err.throw()


@pytest.fixture(scope="module")
def dit():
    model = DiT(input_size=4, in_channels=1, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    return make_model_fn(model), init_dit(model, jax.random.PRNGKey(0))


@pytest.mark.parametrize("labels,ok", [([0, 1, 2, 3], True), ([0, 1, 2, 4], False), ([-1, 0, 1, 2], False)])
def test_dit_label_check(dit, labels, ok):
    """Labels in [0, num_classes] (3 = the null label) pass; 4 (NaN embedding) and -1 (silently the
    null label) are reported under checkify; unchecked code runs as before."""
    model_fn, params = dit
    x, t, y = jnp.zeros((4, 4, 4, 1)), jnp.full((4,), 0.5), jnp.asarray(labels, jnp.int32)
    out = jax.jit(lambda p, x, t, y: model_fn(p, x, t, y))(params, x, t, y)
    assert out.shape == x.shape
    err, out_c = jax.jit(checkify.checkify(lambda p, x, t, y: model_fn(p, x, t, y)))(params, x, t, y)
    if ok:
        err.throw()
        np.testing.assert_array_equal(np.asarray(out_c), np.asarray(out))
    else:
        with pytest.raises(checkify.JaxRuntimeError, match=r"class labels must be in \[0, 3\]"):
            err.throw()
        assert str(labels[0] if labels[0] < 0 else labels[-1]) in str(err.get())
