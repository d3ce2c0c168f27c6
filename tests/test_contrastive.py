"""InfoNCE / NT-Xent (research.losses.contrastive) against independent references.

* NumPy float64 transcriptions written from the papers, with explicit loops: CPC (van den Oord et al.
  2018) eq. 4, ``L_N = -E log f(x_pos, c) / sum_{x_j in X} f(x_j, c)`` with ``f = exp(sim / T)``, and
  SimCLR (Chen et al. 2020) Algorithm 1 with its interleaved pair layout (2k-1, 2k),
  ``l(i, j) = -log exp(s_ij / T) / sum_{k != i} exp(s_ik / T)``; masked negatives are REMOVED from the
  sums rather than masked. Gradients of the NumPy forms by central finite differences (float64).
* torch: the logits built in torch (masked entries set to -inf, torch's own convention) and
  ``F.cross_entropy``; values and autograd gradients, float32 and float64.
* The cross-device versions on 8 simulated CPU devices (subprocess): equal to the single-device loss on
  the full batch for values and gradients (from outside the shard_map, inside it, and for a
  replicated parameter), and the gradient of all_gather is a reduce-scatter.
"""
import contextlib
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.losses import contrastive as C
from tests.subproc import REPO, xla_flags

DTYPES = ["float32", "float64"]
TOL = {"float32": dict(rtol=2e-5, atol=2e-6), "float64": dict(rtol=1e-10, atol=1e-12)}


def _x64(dtype):
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


# ---------------------------------------------------------------------------- NumPy references (float64)


def _np_sim(a, b, normalize):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if normalize:
        a = a / np.linalg.norm(a)
        b = b / np.linalg.norm(b)
    return float(np.dot(a, b))


def np_info_nce(q, k, pos, temperature, *, candidates=None, query_mask=None, normalize=True):
    """CPC eq. 4, one query at a time; ``candidates[i]`` = the list of key indices in query i's set X
    (the positive included), default all keys; mean over the queries with query_mask."""
    n, m = len(q), len(k)
    losses = []
    for i in range(n):
        if query_mask is not None and not query_mask[i]:
            continue
        cand = range(m) if candidates is None else candidates[i]
        f = {j: math.exp(_np_sim(q[i], k[j], normalize) / temperature) for j in cand}
        assert pos[i] in f
        losses.append(-math.log(f[pos[i]] / sum(f.values())))
    return float(np.mean(losses)) if losses else 0.0


def np_nt_xent(z1, z2, temperature, normalize=True):
    """SimCLR Algorithm 1: z_{2k-1} = view 1 of example k, z_{2k} = view 2 (here 0-based 2k, 2k+1)."""
    n = len(z1)
    z = [None] * (2 * n)
    for k in range(n):
        z[2 * k], z[2 * k + 1] = z1[k], z2[k]
    s = [[_np_sim(z[i], z[j], normalize) for j in range(2 * n)] for i in range(2 * n)]

    def ell(i, j):
        den = sum(math.exp(s[i][k] / temperature) for k in range(2 * n) if k != i)
        return -math.log(math.exp(s[i][j] / temperature) / den)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


def fd_grad(f, x, h=1e-6):
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def _data(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


# ---------------------------------------------------------------------------- torch reference


def torch_info_nce(q, k, pos, temperature, *, mask=None, query_mask=None, normalize=True, dtype="float64"):
    import torch
    import torch.nn.functional as F

    td = getattr(torch, dtype)
    qt = torch.tensor(np.asarray(q), dtype=td, requires_grad=True)
    kt = torch.tensor(np.asarray(k), dtype=td, requires_grad=True)
    a, b = (F.normalize(qt, dim=-1), F.normalize(kt, dim=-1)) if normalize else (qt, kt)
    logits = a @ b.T / temperature
    if mask is not None:
        keep = torch.tensor(np.asarray(mask)) | F.one_hot(torch.tensor(np.asarray(pos)), logits.shape[1]).bool()
        logits = logits.masked_fill(~keep, float("-inf"))
    rows = F.cross_entropy(logits, torch.tensor(np.asarray(pos), dtype=torch.long), reduction="none")
    if query_mask is not None:
        rows = rows[torch.tensor(np.asarray(query_mask))]
    loss = rows.mean()
    loss.backward()
    return loss.item(), qt.grad.numpy(), kt.grad.numpy()


def torch_nt_xent(z1, z2, temperature, dtype="float64"):
    """SimCLR's reference-code form: logits of [z1; z2] with the self-similarity set to -inf."""
    import torch
    import torch.nn.functional as F

    td = getattr(torch, dtype)
    a = torch.tensor(np.asarray(z1), dtype=td, requires_grad=True)
    b = torch.tensor(np.asarray(z2), dtype=td, requires_grad=True)
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=-1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    labels = torch.cat([torch.arange(n) + n, torch.arange(n)])
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.item(), a.grad.numpy(), b.grad.numpy()


# ---------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_info_nce_diagonal_matches_numpy_and_torch(dtype, normalize):
    q, k = _data(0, (6, 4), (6, 4))
    t = 0.3 if normalize else 2.0
    ref = np_info_nce(q, k, list(range(6)), t, normalize=normalize)
    tv, tgq, tgk = torch_info_nce(q, k, np.arange(6), t, normalize=normalize, dtype=dtype)
    with _x64(dtype):
        f = jax.jit(jax.value_and_grad(lambda a, b: C.info_nce(a, b, temperature=t, normalize=normalize), (0, 1)))
        v, (gq, gk) = f(jnp.asarray(q, dtype), jnp.asarray(k, dtype))
        assert v.dtype == jnp.dtype(dtype) and gq.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(float(v), ref, **TOL[dtype])
    np.testing.assert_allclose(float(v), tv, **TOL[dtype])
    np.testing.assert_allclose(np.asarray(gq), tgq, **TOL[dtype])
    np.testing.assert_allclose(np.asarray(gk), tgk, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_info_nce_positive_index_mask_query_mask_match_torch(dtype):
    # M != N keys, explicit positives, a random candidate mask (positive always kept) and a padded query
    q, k = _data(1, (5, 3), (9, 3))
    rng = np.random.default_rng(2)
    pos = np.array([3, 0, 8, 3, 5])
    mask = rng.random((5, 9)) < 0.6
    mask[1] = False  # row 1: only its positive remains
    mask[2, pos[2]] = False  # the positive's mask entry is ignored
    qmask = np.array([True, True, True, False, True])
    cands = [sorted(set(np.flatnonzero(mask[i])) | {pos[i]}) for i in range(5)]
    ref = np_info_nce(q, k, pos, 0.2, candidates=cands, query_mask=qmask)
    tv, tgq, tgk = torch_info_nce(q, k, pos, 0.2, mask=mask, query_mask=qmask, dtype=dtype)
    with _x64(dtype):
        f = jax.jit(jax.value_and_grad(lambda a, b: C.info_nce(a, b, jnp.asarray(pos), temperature=0.2, mask=mask,
                                                               query_mask=qmask), (0, 1)))
        v, (gq, gk) = f(jnp.asarray(q, dtype), jnp.asarray(k, dtype))
    np.testing.assert_allclose(float(v), ref, **TOL[dtype])
    np.testing.assert_allclose(float(v), tv, **TOL[dtype])
    np.testing.assert_allclose(np.asarray(gq), tgq, **TOL[dtype])
    np.testing.assert_allclose(np.asarray(gk), tgk, **TOL[dtype])
    assert np.all(np.asarray(gq)[3] == 0) and np.all(np.asarray(gq)[1] == 0)  # padded row; positive-only row


@pytest.mark.parametrize("dtype", DTYPES)
def test_nt_xent_matches_simclr_numpy_and_torch(dtype):
    z1, z2 = _data(3, (5, 4), (5, 4))
    ref = np_nt_xent(z1, z2, 0.5)
    tv, tg1, tg2 = torch_nt_xent(z1, z2, 0.5, dtype=dtype)
    with _x64(dtype):
        v, (g1, g2) = jax.jit(jax.value_and_grad(lambda a, b: C.nt_xent(a, b, temperature=0.5), (0, 1)))(
            jnp.asarray(z1, dtype), jnp.asarray(z2, dtype))
    np.testing.assert_allclose(float(v), ref, **TOL[dtype])
    np.testing.assert_allclose(float(v), tv, **TOL[dtype])
    np.testing.assert_allclose(np.asarray(g1), tg1, **TOL[dtype])
    np.testing.assert_allclose(np.asarray(g2), tg2, **TOL[dtype])


def test_gradients_match_finite_differences_of_the_paper_formulas():
    z1, z2 = _data(4, (3, 3), (3, 3))
    with jax.enable_x64(True):
        g1, g2 = jax.grad(lambda a, b: C.nt_xent(a, b, temperature=0.4), (0, 1))(jnp.asarray(z1), jnp.asarray(z2))
        gq = jax.grad(lambda a: C.info_nce(a, jnp.asarray(z2), temperature=0.4))(jnp.asarray(z1))
    np.testing.assert_allclose(np.asarray(g1), fd_grad(lambda a: np_nt_xent(a, z2, 0.4), z1), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(g2), fd_grad(lambda b: np_nt_xent(z1, b, 0.4), z2), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(gq), fd_grad(lambda a: np_info_nce(a, z2, [0, 1, 2], 0.4), z1),
                               rtol=1e-6, atol=1e-8)


def test_nt_xent_is_not_the_one_directional_info_nce():
    # NT-Xent averages both directions and has 2N - 1 candidates: it differs from InfoNCE(z1, z2)
    z1, z2 = _data(5, (4, 3), (4, 3))
    a, b = jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)
    assert abs(float(C.nt_xent(a, b, temperature=0.5)) - float(C.info_nce(a, b, temperature=0.5))) > 1e-3


# ---------------------------------------------------------------------------- masks


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_negatives_equal_removed_negatives(dtype):
    q, k = _data(6, (4, 3), (7, 3))
    pos = np.array([0, 2, 4, 6])
    mask = np.ones((4, 7), bool)
    mask[0, [1, 5]] = mask[1, [0]] = mask[3, [0, 1, 2, 3]] = False
    with _x64(dtype):
        qj, kj = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
        masked = jax.jit(jax.value_and_grad(
            lambda a, b, qm: C.info_nce(a, b, jnp.asarray(pos), temperature=0.05, mask=mask, query_mask=qm), (0, 1)))
        removed = jax.jit(jax.value_and_grad(lambda a, b, p: C.info_nce(a, b, p, temperature=0.05), (0, 1)))
        for i in range(4):
            keep = np.flatnonzero(mask[i])
            new_pos = int(np.searchsorted(keep, pos[i]))
            v, (gq, gk) = removed(qj[i:i + 1], kj[keep], jnp.asarray([new_pos]))
            mv, (mgq, mgk) = masked(qj, kj, np.arange(4) == i)
            np.testing.assert_allclose(float(mv), float(v), **TOL[dtype])
            np.testing.assert_allclose(np.asarray(mgq)[i], np.asarray(gq)[0], **TOL[dtype])
            np.testing.assert_allclose(np.asarray(mgk)[keep], np.asarray(gk), **TOL[dtype])
            assert np.all(np.asarray(mgk)[~mask[i]] == 0)  # removed negatives get no gradient


@pytest.mark.parametrize("dtype", DTYPES)
def test_nt_xent_example_mask_equals_the_unpadded_batch(dtype):
    z1, z2 = _data(7, (6, 4), (6, 4))
    valid = np.array([True, False, True, True, False, True])
    z1[~valid] = 0.0  # padding rows are zeros (the normalisation must stay finite)
    z2[~valid] = 1e30 if dtype == "float64" else 1e15  # or garbage
    with _x64(dtype):
        f = jax.jit(jax.value_and_grad(lambda a, b, m: C.nt_xent(a, b, temperature=0.1, example_mask=m), (0, 1)))
        v, (g1, g2) = f(jnp.asarray(z1, dtype), jnp.asarray(z2, dtype), valid)
        rv, (rg1, rg2) = f(jnp.asarray(z1[valid], dtype), jnp.asarray(z2[valid], dtype), np.ones(valid.sum(), bool))
    np.testing.assert_allclose(float(v), float(rv), **TOL[dtype])
    np.testing.assert_allclose(np.asarray(g1)[valid], np.asarray(rg1), **TOL[dtype])
    np.testing.assert_allclose(np.asarray(g2)[valid], np.asarray(rg2), **TOL[dtype])
    assert np.all(np.asarray(g1)[~valid] == 0) and np.all(np.asarray(g2)[~valid] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1e-3, 0.01, 1.0])
def test_all_but_positive_masked_and_padding_rows_are_finite(dtype, temperature):
    q, k = _data(8, (4, 3), (4, 3))
    q[3] = 0.0  # a padding query of zeros
    mask = np.ones((4, 4), bool)
    mask[0] = False  # row 0: only the positive (its diagonal) remains
    mask[3] = False  # row 3: padding query, every candidate masked
    mask[:, 3] = False  # key 3 is padding for everybody
    qmask = np.array([True, True, True, False])
    with _x64(dtype):
        def loss(a, b, t):
            return C.info_nce(a, b, temperature=t, mask=mask, query_mask=qmask, normalize=False)

        v, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(jnp.asarray(q * 50, dtype), jnp.asarray(k * 50, dtype),
                                                       jnp.asarray(temperature, dtype))
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g)))
        assert np.isfinite(float(v))
        assert np.all(np.asarray(grads[0])[[0, 3]] == 0)  # positive-only row: loss 0 and gradient 0
        rows, _ = C.info_nce_from_logits(C.similarity_logits(jnp.asarray(q, dtype), jnp.asarray(k, dtype),
                                                             temperature=temperature), jnp.arange(4), mask=mask)
        assert float(rows[0]) == 0.0 and np.all(np.isfinite(np.asarray(rows)))
        # every query padded: loss 0, gradients 0 (not NaN from 0 / 0)
        v0, g0 = jax.value_and_grad(lambda a: C.info_nce(a, jnp.asarray(k, dtype), query_mask=np.zeros(4, bool)))(
            jnp.asarray(q, dtype))
        assert float(v0) == 0.0 and np.all(np.asarray(g0) == 0)


# ---------------------------------------------------------------------------- temperature


def test_temperature_clamp_values_and_gradient_rule():
    lo, hi = 0.01, 1.0
    f = lambda lt: C.temperature_from_log(lt, lo, hi)  # noqa: E731
    for log_t, expected in [(-10.0, lo), (math.log(lo), lo), (math.log(0.07), 0.07), (0.0, hi), (3.0, hi)]:
        np.testing.assert_allclose(float(f(jnp.float32(log_t))), expected, rtol=1e-6)
    # inside and exactly at either bound: dT/dlog_t = T (jnp.clip would give T / 2 at a tie)
    for log_t in [math.log(lo), math.log(0.07), 0.0]:
        for sign in (1.0, -1.0):
            g = jax.grad(lambda lt: sign * f(lt))(jnp.float32(log_t))
            np.testing.assert_allclose(float(g), sign * float(f(jnp.float32(log_t))), rtol=1e-6)
    # beyond a bound: only the component pulling back inside passes (no stuck parameter)
    above, below = jnp.float32(2.0), jnp.float32(-8.0)
    assert float(jax.grad(lambda lt: f(lt))(above)) == pytest.approx(hi)  # descent lowers log_t: kept
    assert float(jax.grad(lambda lt: -f(lt))(above)) == 0.0  # would push further up: zeroed
    assert float(jax.grad(lambda lt: -f(lt))(below)) == pytest.approx(-lo)  # descent raises log_t: kept
    assert float(jax.grad(lambda lt: f(lt))(below)) == 0.0
    # through the loss: the temperature gradient of info_nce equals torch's (inside the bounds)
    import torch
    import torch.nn.functional as F

    q, k = _data(9, (5, 3), (5, 3))
    lt = torch.tensor(math.log(0.2), dtype=torch.float64, requires_grad=True)
    logits = F.normalize(torch.tensor(q), dim=-1) @ F.normalize(torch.tensor(k), dim=-1).T / lt.exp()
    F.cross_entropy(logits, torch.arange(5)).backward()
    with jax.enable_x64(True):
        g = jax.grad(lambda p: C.info_nce(jnp.asarray(q), jnp.asarray(k), temperature=C.temperature_from_log(p)))(
            jnp.float64(math.log(0.2)))
        g2 = jax.grad(lambda p: C.info_nce(jnp.asarray(q), jnp.asarray(k), log_temperature=p))(
            jnp.float64(math.log(0.2)))
    np.testing.assert_allclose(float(g), lt.grad.item(), rtol=1e-10)
    np.testing.assert_allclose(float(g2), lt.grad.item(), rtol=1e-10)
    with pytest.raises(ValueError, match="min_temperature"):
        C.temperature_from_log(0.0, 1.0, 0.5)


def test_learnable_temperature_module_and_dtypes():
    mod = C.LearnableTemperature(initial=0.07, min_temperature=0.05, max_temperature=0.5)
    params = mod.init(jax.random.key(0))
    assert set(params["params"]) == {"log_temperature"}
    np.testing.assert_allclose(float(mod.apply(params)), 0.07, rtol=1e-6)
    params = {"params": {"log_temperature": jnp.float32(-9.0)}}
    np.testing.assert_allclose(float(mod.apply(params)), 0.05, rtol=1e-6)
    q, k = _data(10, (4, 3), (4, 3))
    # low-precision embeddings: logits and loss in float32
    assert C.info_nce(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)).dtype == jnp.float32
    assert C.similarity_logits(jnp.asarray(q, jnp.float16), jnp.asarray(k, jnp.float16)).dtype == jnp.float32
    with jax.enable_x64(True):  # a Python-float temperature does not promote float32 embeddings to float64
        q32, k32 = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
        assert C.info_nce(q32, k32, temperature=0.1).dtype == jnp.float32
        assert C.nt_xent(jnp.asarray(q), jnp.asarray(k)).dtype == jnp.float64


def test_accuracy_mi_bound_and_errors():
    q = np.eye(4)[:, :3] + 0.0
    q[3] = [1.0, 1.0, 1.0]
    qj = jnp.asarray(q, jnp.float32)
    logits = C.similarity_logits(qj, qj, temperature=0.01)
    assert float(C.contrastive_accuracy(logits)) == 1.0
    assert float(C.contrastive_accuracy(logits, jnp.asarray([1, 0, 2, 3]))) == 0.5
    qmask = np.array([0, 0, 1, 1], bool)
    assert float(C.contrastive_accuracy(logits, jnp.asarray([1, 0, 2, 3]), query_mask=qmask)) == 1.0
    loss = C.info_nce(qj, qj, temperature=0.01)  # near-perfect retrieval: loss ~ 0, bound ~ log N
    np.testing.assert_allclose(float(C.mutual_information_lower_bound(loss, 4)), math.log(4), atol=1e-6)
    with pytest.raises(ValueError, match="positive_index is required"):
        C.info_nce(qj, jnp.zeros((5, 3)))
    with pytest.raises(ValueError, match="mask must be bool"):
        C.info_nce(qj, qj, mask=np.ones((4, 3), bool))
    with pytest.raises(ValueError, match="not both"):
        C.info_nce(qj, qj, temperature=0.1, log_temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        C.nt_xent(qj, qj[:3])


# ---------------------------------------------------------------------------- 8 simulated devices

SHARDED = textwrap.dedent(r"""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from research.losses import contrastive as C

    devs = jax.devices()
    assert len(devs) == 8, devs
    mesh = Mesh(np.array(devs), ("d",))
    rng = np.random.default_rng(0)
    N, D, T = 24, 5, 0.2  # 3 examples per device
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    z1, z2 = f32(rng.standard_normal((N, D))), f32(rng.standard_normal((N, D)))
    valid = rng.random(N) < 0.8
    valid[:3] = False  # device 0 holds only padding
    TOL = dict(rtol=2e-5, atol=2e-6)

    def close(a, b, what):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=what, **TOL)

    ref_v, ref_g = jax.value_and_grad(lambda a, b: C.nt_xent(a, b, temperature=T, example_mask=valid), (0, 1))(z1, z2)

    # 1. from outside the shard_map (both check_vma modes)
    for cv in (True, False):
        f = C.make_sharded_nt_xent(mesh, "d", temperature=T, check_vma=cv)
        v, g = jax.jit(jax.value_and_grad(lambda a, b: f(a, b, valid), (0, 1)))(z1, z2)
        close(v, ref_v, f"outside value {cv}"); close(g[0], ref_g[0], f"outside g1 {cv}"); close(g[1], ref_g[1], "g2")

    # 2. inside the body (check_vma=True): value on every device, gradients w.r.t. the local shards
    def body(a, b, m):
        v, g = jax.value_and_grad(lambda a, b: C.sharded_nt_xent(a, b, axis_name="d", temperature=T,
                                                                 example_mask=m), (0, 1))(a, b)
        return v[None], g[0], g[1]
    spec = (P("d"), P("d"), P("d"))
    v, g1, g2 = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))(z1, z2, valid)
    close(v, np.full(8, ref_v), "inside value"); close(g1, ref_g[0], "inside g1"); close(g2, ref_g[1], "inside g2")

    # 3. a replicated encoder weight and a learnable temperature (check_vma=True): summed over devices
    W = f32(rng.standard_normal((D, 3)))
    lt = jnp.float32(np.log(0.3))
    def full(W, lt):
        return C.nt_xent(z1 @ W, z2 @ W, temperature=C.temperature_from_log(lt), example_mask=valid)
    rgW, rgt = jax.grad(full, (0, 1))(W, lt)
    def bodyW(W, lt, a, b, m):
        return jax.grad(lambda W, lt: C.sharded_nt_xent(a @ W, b @ W, axis_name="d", example_mask=m,
                        temperature=C.temperature_from_log(lt)), (0, 1))(W, lt)
    gW, gt = jax.jit(jax.shard_map(bodyW, mesh=mesh, in_specs=(P(), P(), P("d"), P("d"), P("d")),
                                   out_specs=(P(), P())))(W, lt, z1, z2, valid)
    close(gW, rgW, "replicated W"); close(gt, rgt, "temperature")

    # 4. check_vma=False inside the body: reduction="per_device" + pmean of the gradients (the ring step)
    def bodyL(W, a, b, m):
        v, g = jax.value_and_grad(lambda W: C.sharded_nt_xent(a @ W, b @ W, axis_name="d", example_mask=m,
                                  temperature=T, reduction="per_device"))(W)
        return jax.lax.pmean(v, "d"), jax.lax.pmean(g, "d")
    v, gW = jax.jit(jax.shard_map(bodyL, mesh=mesh, in_specs=(P(), P("d"), P("d"), P("d")), out_specs=(P(), P()),
                                  check_vma=False))(W, z1, z2, valid)
    close(v, C.nt_xent(z1 @ W, z2 @ W, temperature=T, example_mask=valid), "per_device value")
    close(gW, jax.grad(lambda W: C.nt_xent(z1 @ W, z2 @ W, temperature=T, example_mask=valid))(W), "per_device W")

    # 5. sharded InfoNCE: default global diagonal, key / query masks, explicit global positives
    q, k = z1, z2
    kmask, qmask = valid, rng.random(N) < 0.7
    qmask[~kmask] = False
    full_mask = np.broadcast_to(kmask[None, :], (N, N))
    ref = jax.value_and_grad(lambda a, b: C.info_nce(a, b, temperature=T, mask=full_mask, query_mask=qmask), (0, 1))
    rv, rg = ref(q, k)
    def bodyI(a, b, km, qm):
        v, g = jax.value_and_grad(lambda a, b: C.sharded_info_nce(a, b, axis_name="d", temperature=T, key_mask=km,
                                                                  query_mask=qm), (0, 1))(a, b)
        return v[None], g[0], g[1]
    v, gq, gk = jax.jit(jax.shard_map(bodyI, mesh=mesh, in_specs=(P("d"),) * 4, out_specs=(P("d"),) * 3))(
        q, k, kmask, qmask)
    close(v, np.full(8, rv), "info_nce value"); close(gq, rg[0], "info_nce gq"); close(gk, rg[1], "info_nce gk")
    perm = rng.permutation(N).astype(np.int32)
    rv, rg = jax.value_and_grad(lambda a, b: C.info_nce(a, b, jnp.asarray(perm), temperature=T), (0, 1))(q, k)
    def bodyP(a, b, p):
        v, g = jax.value_and_grad(lambda a, b: C.sharded_info_nce(a, b, axis_name="d", temperature=T,
                                                                  positive_index=p), (0, 1))(a, b)
        return v[None], g[0], g[1]
    v, gq, gk = jax.jit(jax.shard_map(bodyP, mesh=mesh, in_specs=(P("d"),) * 3, out_specs=(P("d"),) * 3))(q, k, perm)
    close(v, np.full(8, rv), "perm value"); close(gq, rg[0], "perm gq"); close(gk, rg[1], "perm gk")

    # 5b. the outside-shard_map InfoNCE wrapper (both check_vma modes), masks included
    ref = jax.value_and_grad(lambda a, b: C.info_nce(a, b, temperature=T, mask=full_mask, query_mask=qmask), (0, 1))
    rv, rg = ref(q, k)
    for cv in (True, False):
        f = C.make_sharded_info_nce(mesh, "d", temperature=T, check_vma=cv)
        v, g = jax.jit(jax.value_and_grad(lambda a, b: f(a, b, kmask, qmask), (0, 1)))(q, k)
        close(v, rv, f"wrapper value {cv}"); close(g[0], rg[0], f"wrapper gq {cv}"); close(g[1], rg[1], f"gk {cv}")

    # 6. the gradient of all_gather is a reduce-scatter (psum_scatter)
    f = C.make_sharded_nt_xent(mesh, "d", temperature=T)
    text = str(jax.make_jaxpr(jax.grad(f, (0, 1)))(z1, z2))
    assert "all_gather" in text and "reduce_scatter" in text, text[-2000:]
    print("OK")
""")


def test_sharded_losses_equal_full_batch_on_8_devices():
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", SHARDED], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-4000:]


def test_sharded_on_one_device_equals_single_device():
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    z1, z2 = _data(11, (4, 3), (4, 3))
    f = jax.jit(C.make_sharded_nt_xent(mesh, "d", temperature=0.3))
    a, b = jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)
    np.testing.assert_allclose(float(f(a, b)), float(C.nt_xent(a, b, temperature=0.3)), rtol=1e-6)
    g = jax.jit(C.make_sharded_info_nce(mesh, "d", temperature=0.3))
    np.testing.assert_allclose(float(g(a, b)), float(C.info_nce(a, b, temperature=0.3)), rtol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        jax.shard_map(lambda x, y: C.sharded_nt_xent(x, y, axis_name="d", reduction="sum"), mesh=mesh,
                      in_specs=(jax.P("d"), jax.P("d")), out_specs=jax.P())(a, b)
