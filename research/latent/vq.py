"""Vector quantisation (VQ-VAE, van den Oord et al. 2017) with an EMA codebook and dead-code restart.

Quantiser (pure functions over a codebook e [K, D]):
  ``nearest_codes(z, e)``    argmin_k ||z - e_k||^2 over the last axis of z [..., D] -> int32 [...]
  ``straight_through(z, q)`` z + stop_gradient(q - z): forward value q, gradient w.r.t. z the identity
  ``quantize(z, e)``         (straight-through output, codes, e[codes])
  ``vq_losses(z, q)``        codebook loss ||sg(z) - q||^2 and commitment loss ||z - sg(q)||^2 (means)

EMA codebook (van den Oord et al. 2017, appendix A.1; Razavi et al. 2019), the non-gradient state
``{"codebook" [K, D], "cluster_size" [K], "embed_sum" [K, D]}`` kept in the train state's
``model_state`` (``make_train_step(..., stateful=True)``): with n_k the number of batch vectors
assigned to code k and s_k their sum,

    N_k <- g N_k + (1 - g) n_k,   m_k <- g m_k + (1 - g) s_k,
    e_k  = m_k / N~_k,   N~_k = (N_k + eps) / (n + K eps) * n,   n = sum_k N_k     (Laplace smoothing)

(a code with N~_k = 0, possible only with eps = 0, keeps its vector). The codebook loss is then
not used; the encoder still gets the commitment loss beta * ||z - sg(e)||^2.

Dead-code restart (as in Jukebox, Dhariwal et al. 2020): after the EMA update every code whose
usage N_k is below ``threshold`` is set to a random encoder output of the current batch (distinct
rows when the batch has at least K vectors), with N_k = 1 and m_k = that vector; the others are
untouched. The initial state (``init_ema_state``) has N_k = 1, so with threshold 1 the first step
replaces every code that the first batch does not use (a data-dependent initialisation).

Usage statistics of a set of codes (e.g. all codes of the train split): ``codebook_usage``
(perplexity exp(H(p)) of the code frequencies: K for uniform usage, 1 for a single code; and the
fraction of codes used).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from research.latent.nets import Decoder, Encoder, count_params, init_module, latent_size

EMA_KEYS = ("codebook", "cluster_size", "embed_sum")


def _check_codebook(z, codebook):
    if codebook.ndim != 2 or z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"need z [..., D] and codebook [K, D]; got {z.shape} and {codebook.shape}")


def nearest_codes(z, codebook):
    """Index of the nearest code (squared Euclidean) for each vector of z [..., D]: int32 [...]."""
    _check_codebook(z, codebook)
    d = (jnp.sum(jnp.square(z), -1, keepdims=True) - 2.0 * jnp.einsum("...d,kd->...k", z, codebook)
         + jnp.sum(jnp.square(codebook), -1))
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


def lookup(codebook, codes):
    """Code vectors e[codes]: [..., D] for int codes [...]."""
    return jnp.take(codebook, codes, axis=0)


def straight_through(z, q):
    """Value q, gradient w.r.t. z the identity (none w.r.t. q)."""
    return z + jax.lax.stop_gradient(q - z)


def quantize(z, codebook):
    """(straight-through quantised z, codes int32 [...], code vectors e[codes]) for z [..., D]."""
    codes = nearest_codes(z, codebook)
    q = lookup(codebook, codes)
    return straight_through(z, q), codes, q


def vq_losses(z, q):
    """(codebook loss mean ||sg(z) - q||^2, commitment loss mean ||z - sg(q)||^2), means over all entries."""
    sg = jax.lax.stop_gradient
    return jnp.mean(jnp.square(sg(z) - q)), jnp.mean(jnp.square(z - sg(q)))


def init_ema_state(codebook) -> dict:
    """EMA state for an initial codebook [K, D]: cluster sizes 1, sums = the codes."""
    codebook = jnp.asarray(codebook)
    # separate buffers (a donated train state must not hold one array twice)
    return {"codebook": jnp.array(codebook, copy=True), "cluster_size": jnp.ones(codebook.shape[:1], codebook.dtype),
            "embed_sum": jnp.array(codebook, copy=True)}


def ema_update(state: dict, z_flat, codes, *, decay: float, eps: float = 1e-5) -> dict:
    """One EMA codebook update from vectors z_flat [N, D] assigned to ``codes`` [N] (module docstring).
    No gradient flows into the state."""
    z_flat = jax.lax.stop_gradient(z_flat)
    k = state["codebook"].shape[0]
    onehot = jax.nn.one_hot(codes, k, dtype=z_flat.dtype)  # [N, K]
    cluster_size = decay * state["cluster_size"] + (1.0 - decay) * jnp.sum(onehot, axis=0)
    embed_sum = decay * state["embed_sum"] + (1.0 - decay) * (onehot.T @ z_flat)
    n = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    ok = smoothed > 0
    codebook = jnp.where(ok[:, None], embed_sum / jnp.where(ok, smoothed, 1.0)[:, None], state["codebook"])
    return {"codebook": codebook, "cluster_size": cluster_size, "embed_sum": embed_sum}


def restart_dead_codes(state: dict, z_flat, key, *, threshold: float):
    """Replaces the codes with ``cluster_size < threshold`` by random rows of z_flat [N, D] (distinct
    rows when N >= K); their cluster size becomes 1 and their sum the new vector.
    Returns (new state, number of restarted codes)."""
    z_flat = jax.lax.stop_gradient(z_flat)
    k, n = state["codebook"].shape[0], z_flat.shape[0]
    if n >= k:
        rows = jax.random.permutation(key, n)[:k]
    else:
        rows = jax.random.randint(key, (k,), 0, n)
    fresh = z_flat[rows].astype(state["codebook"].dtype)
    dead = state["cluster_size"] < threshold
    new = {"codebook": jnp.where(dead[:, None], fresh, state["codebook"]),
           "cluster_size": jnp.where(dead, jnp.ones_like(state["cluster_size"]), state["cluster_size"]),
           "embed_sum": jnp.where(dead[:, None], fresh, state["embed_sum"])}
    return new, jnp.sum(dead.astype(jnp.int32))


def perplexity(counts):
    """exp(entropy) of the frequencies ``counts`` [K] (0 log 0 = 0): K for uniform, 1 for one code."""
    counts = jnp.asarray(counts)
    p = counts / jnp.sum(counts)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def codebook_usage(codes, num_codes: int) -> dict:
    """Usage of the codes (any int array, e.g. every code of the train split): perplexity, fraction
    of the ``num_codes`` used at least once, and the counts per code."""
    codes = np.asarray(codes).reshape(-1)
    if codes.size == 0 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codebook_usage: need a non-empty integer array of codes, got {codes.dtype} {codes.shape}")
    if codes.min() < 0 or codes.max() >= num_codes:
        raise ValueError(f"codebook_usage: codes must be in [0, {num_codes - 1}], got range "
                         f"[{codes.min()}, {codes.max()}]")
    counts = np.bincount(codes, minlength=num_codes)
    return {"perplexity": float(perplexity(counts.astype(np.float64))),
            "utilisation": float(np.mean(counts > 0)), "num_used": int(np.sum(counts > 0)),
            "counts": counts.tolist()}


@dataclasses.dataclass(frozen=True)
class VQVAE:
    """Unconditional VQ-VAE on 8x8x1 images in [-1, 1]: encoder -> [s, s, code_dim] -> nearest of
    ``num_codes`` codes -> decoder -> [8, 8, 1]; params {"encoder", "decoder"}, the codebook in the
    EMA state. Reconstruction loss: mean squared error."""

    features: tuple = (32, 64)
    code_dim: int = 16
    num_codes: int = 64

    def __post_init__(self):
        latent_size(self.features)
        for name in ("code_dim", "num_codes"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    @property
    def code_shape(self) -> tuple:
        s = latent_size(self.features)
        return (s, s)

    @property
    def encoder(self) -> Encoder:
        return Encoder(tuple(self.features), self.code_dim)

    @property
    def decoder(self) -> Decoder:
        return Decoder(tuple(self.features), 1)

    def init(self, key) -> tuple[dict, dict]:
        """(params, EMA state); the initial codebook is N(0, 1) (replaced by dead-code restart)."""
        k_enc, k_dec, k_code = jax.random.split(key, 3)
        params = {"encoder": init_module(self.encoder, k_enc, (1, 8, 8, 1), conditional=False),
                  "decoder": init_module(self.decoder, k_dec, (1, *self.code_shape, self.code_dim), conditional=False)}
        return params, init_ema_state(jax.random.normal(k_code, (self.num_codes, self.code_dim), jnp.float32))

    def num_params(self, params) -> int:
        """Encoder + decoder parameters plus the codebook entries."""
        return count_params(params) + self.num_codes * self.code_dim

    def encode(self, params, x):
        return self.encoder.apply({"params": params["encoder"]}, x)

    def decode(self, params, q):
        return self.decoder.apply({"params": params["decoder"]}, q)

    def codes(self, params, codebook, x):
        """Code indices int32 [B, s, s] of images x [B, 8, 8, 1]."""
        return nearest_codes(self.encode(params, x), codebook)

    def decode_codes(self, params, codebook, codes):
        """Images [B, 8, 8, 1] (decoder output clipped to [-1, 1]) of codes int32 [B, s, s]."""
        return jnp.clip(self.decode(params, lookup(codebook, codes)), -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class VQObjective:
    """The stateful VQ-VAE loss for ``make_train_step(..., stateful=True)``: reconstruction MSE +
    beta * commitment, then the EMA update and dead-code restart of the state."""

    beta: float = 0.25
    decay: float = 0.99
    eps: float = 1e-5
    dead_threshold: float = 1.0

    def make_loss_fn(self, model: VQVAE, image_key: str = "image"):
        """``loss_fn(params, model_state, batch, key) -> (loss, (aux, new_model_state))``."""

        def loss_fn(params, model_state, batch, key):
            x = batch[image_key]
            z = model.encode(params, x)
            z_st, codes, q = quantize(z, model_state["codebook"])
            x_hat = model.decode(params, z_st)
            recon = jnp.mean(jnp.square(x_hat - x))
            _, commit = vq_losses(z, q)
            z_flat, codes_flat = z.reshape(-1, z.shape[-1]), codes.reshape(-1)
            new_state = ema_update(model_state, z_flat, codes_flat, decay=self.decay, eps=self.eps)
            new_state, restarted = restart_dead_codes(new_state, z_flat, key, threshold=self.dead_threshold)
            counts = jnp.sum(jax.nn.one_hot(codes_flat, model.num_codes, dtype=jnp.float32), axis=0)
            aux = {"recon_mse": recon, "commitment": commit, "batch_perplexity": perplexity(counts),
                   "restarted_codes": restarted.astype(jnp.float32)}
            return recon + self.beta * commit, (aux, new_state)

        return loss_fn

