"""Exact minibatch optimal transport on device: a jit-able Hungarian algorithm.

``linear_assignment(cost)`` solves min_perm sum_i cost[i, perm[i]] exactly for a square [n, n]
cost matrix with the shortest-augmenting-path Hungarian algorithm (Kuhn-Munkres with potentials,
O(n^3)): n augmentations (``lax.fori_loop``), each a Dijkstra-like search over columns
(``lax.while_loop``, at most n + 1 vectorised O(n) iterations). It runs inside ``jit`` with no
host round trip, so the OT-CFM train step stays one compiled program.

``ot_pairing(x0, x1)`` returns the permutation of x1 that minimises the summed squared Euclidean
distance to x0 -- the exact W2 minibatch coupling used by OT-CFM (Tong et al. 2023; with equal
batch sizes and uniform weights the optimal plan is a permutation matrix, Birkhoff).

Dtypes: the assignment runs in the cost's floating dtype (float32 at least; float64 costs under
``jax_enable_x64`` stay float64), ``squared_distances`` in the common dtype of its inputs.

Checks: a non-finite cost (NaN / inf, e.g. from a diverged model) has no meaningful assignment and
the algorithm then returns an arbitrary permutation. ``linear_assignment`` carries a
``jax.experimental.checkify`` debug check on it: plain (unchecked) code runs unchanged and pays
nothing; wrap the function (or the whole train step) to surface it::

    from jax.experimental import checkify
    err, perm = jax.jit(checkify.checkify(linear_assignment))(cost)
    err.throw()   # JaxRuntimeError: linear_assignment: cost has non-finite entries ...
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from research.generative._util import as_float, float_dtype


def _hungarian(cost):
    n = cost.shape[0]
    # 1-indexed rows/columns with a dummy row/column 0 (classic formulation).
    a = jnp.pad(cost, ((1, 0), (1, 0)))
    inf = jnp.array(jnp.inf, cost.dtype)
    idx = jnp.arange(n + 1)

    def augment(i, carry):
        u, v, p, way = carry
        p = p.at[0].set(i)
        minv = jnp.full((n + 1,), inf)
        used = jnp.zeros((n + 1,), bool)

        def cond(st):
            _, _, _, _, _, j0, _ = st
            return p_cur(st)[j0] != 0

        def p_cur(st):
            return st[2]

        def body(st):
            u, v, p, way, minv, j0, used = st
            used = used.at[j0].set(True)
            i0 = p[j0]
            cur = a[i0] - u[i0] - v
            free = (~used) & (idx > 0)
            better = free & (cur < minv)
            minv = jnp.where(better, cur, minv)
            way = jnp.where(better, j0, way)
            masked = jnp.where(free, minv, inf)
            j1 = jnp.argmin(masked).astype(jnp.int32)
            delta = masked[j1]
            u = u.at[p].add(jnp.where(used, delta, 0.0))
            v = jnp.where(used, v - delta, v)
            minv = jnp.where(used, minv, minv - delta)
            return u, v, p, way, minv, j1, used

        st = (u, v, p, way, minv, jnp.array(0, jnp.int32), used)
        st = body(st)  # do-while
        u, v, p, way, minv, j0, used = jax.lax.while_loop(cond, body, st)

        def acond(s):
            return s[1] != 0

        def abody(s):
            p, j0 = s
            j1 = way[j0]
            return p.at[j0].set(p[j1]), j1

        p, _ = jax.lax.while_loop(acond, abody, (p, j0))
        return u, v, p, way

    init = (jnp.zeros((n + 1,), cost.dtype), jnp.zeros((n + 1,), cost.dtype), jnp.zeros((n + 1,), jnp.int32),
            jnp.zeros((n + 1,), jnp.int32))
    _, _, p, _ = jax.lax.fori_loop(1, n + 1, augment, init)
    # p[j] = row assigned to column j (1-indexed); invert to col_of_row.
    col_of_row = jnp.zeros((n,), jnp.int32).at[p[1:] - 1].set(jnp.arange(n, dtype=jnp.int32))
    return col_of_row


def linear_assignment(cost: jax.Array) -> jax.Array:
    """Exact minimum-cost perfect matching: perm [n] int32 with row i matched to column perm[i].

    cost: [n, n] float (finite). Same optimum as scipy.optimize.linear_sum_assignment. Finiteness is
    a checkify debug check (see the module docstring): ``checkify.checkify(linear_assignment)``
    reports a NaN / inf cost, unchecked calls run as before.
    """
    cost = jnp.asarray(cost)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"linear_assignment: cost must be square [n, n], got shape {cost.shape}")
    cost = as_float(cost)
    checkify.debug_check(jnp.all(jnp.isfinite(cost)),
                         "linear_assignment: cost has {} non-finite entries (NaN or inf); the assignment "
                         "would be an arbitrary permutation", jnp.sum(~jnp.isfinite(cost)))
    # Shift so the smallest entry is 0 (the optimum is invariant; keeps potentials small).
    cost = cost - jnp.min(cost)
    return _hungarian(cost)


def squared_distances(x0, x1):
    """[n, m] squared Euclidean distances between flattened rows of x0 [n, ...] and x1 [m, ...]."""
    dtype = float_dtype(x0, x1)
    a = as_float(x0, dtype).reshape(x0.shape[0], -1)
    b = as_float(x1, dtype).reshape(x1.shape[0], -1)
    d = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    return jnp.maximum(d, 0.0)


def ot_pairing(x0, x1) -> jax.Array:
    """perm such that sum_i ||x0[i] - x1[perm[i]]||^2 is minimal (exact W2 minibatch coupling)."""
    if x0.shape[0] != x1.shape[0]:
        raise ValueError(f"ot_pairing: equal batch sizes needed, got {x0.shape[0]} and {x1.shape[0]}")
    return linear_assignment(squared_distances(x0, x1))
