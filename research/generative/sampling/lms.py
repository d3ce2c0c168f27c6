"""Linear multistep (Adams-Bashforth in sigma, variable step) for dx/dsigma = d(x, sigma) = (x - D) / sigma.

x_{i+1} = x_i + sum_j c_ij d_{i-j},  c_ij = int_{sigma_i}^{sigma_{i+1}} L_j(tau) dtau,
L_j the Lagrange basis on the nodes sigma_i, ..., sigma_{i-k+1} (k = min(i + 1, order)). The integrals
of these degree < 4 polynomials are exact with 3-point Gauss-Legendre quadrature, so the
coefficients are computed in JAX from traced sigmas. NFE = N (d at sigma = 0 is never needed).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from research.generative.sampling._common import denoise_fn
from research.generative.sampling.registry import register

_GL_X, _GL_W = np.polynomial.legendre.leggauss(3)  # exact for degree <= 5


def lms_coefficients(nodes, a, b):
    """[k] integrals over [a, b] of the Lagrange basis polynomials on ``nodes`` [k]."""
    k = nodes.shape[0]
    mid, half = 0.5 * (a + b), 0.5 * (b - a)
    tau = mid + half * jnp.asarray(_GL_X, nodes.dtype)  # [q]
    coefs = []
    for j in range(k):
        lj = jnp.ones_like(tau)
        for m in range(k):
            if m != j:
                lj = lj * (tau - nodes[m]) / (nodes[j] - nodes[m])
        coefs.append(half * jnp.sum(jnp.asarray(_GL_W, nodes.dtype) * lj))
    return jnp.stack(coefs)


@register("lms", family="sigma", nfe=lambda n, **o: n, order="4 (multistep; warm-up steps of order 1..3)")
def lms(denoiser, x, sigmas, *, order=4):
    """Linear multistep of order ``order`` (1..4) with integrated Lagrange coefficients (1 NFE per step)."""
    if not isinstance(order, int) or not 1 <= order <= 4:
        raise ValueError(f"lms: order must be an int in 1..4, got {order!r}")
    D = denoise_fn(denoiser, x.dtype)
    n = sigmas.shape[0] - 1

    def step(x, ds, i, k):
        """ds: [k, ...] slopes at sigmas[i], sigmas[i-1], ...; i may be traced."""
        nodes = jax.lax.dynamic_slice(sigmas[::-1], (n - i,), (k,))  # sigmas[i], sigmas[i-1], ...
        c = lms_coefficients(nodes, sigmas[i], sigmas[i + 1])
        return x + jnp.tensordot(c, ds, axes=1)

    warm = min(order - 1, n)
    ds = None
    for i in range(warm):
        d = (x - D(x, sigmas[i])) / sigmas[i]
        ds = d[None] if ds is None else jnp.concatenate([d[None], ds], axis=0)
        x = step(x, ds, i, i + 1)
    if n > warm:
        def body(carry, i):
            x, ds = carry
            d = (x - D(x, sigmas[i])) / sigmas[i]
            ds_full = d[None] if ds is None else jnp.concatenate([d[None], ds], axis=0)
            x = step(x, ds_full, i, order)
            return (x, ds_full[:order - 1] if order > 1 else ds), None

        if ds is None and order > 1:  # unreachable: warm >= 1 when n >= 1 and order > 1
            raise AssertionError
        (x, _), _ = jax.lax.scan(body, (x, ds), jnp.arange(warm, n))
    return x
