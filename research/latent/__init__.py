"""Latent-variable autoencoders on 8x8 images: a Gaussian VAE with a discretised-logistic decoder
(``research.latent.vae``), a VQ-VAE with an EMA codebook and dead-code restart
(``research.latent.vq``) and their convolutional encoder / decoder (``research.latent.nets``)."""
from research.latent.nets import Decoder, Encoder, count_params, latent_size
from research.latent.vae import (
    VAE, VAEObjective, bound_bits_per_dim, bounds, class_marginal_bound, diag_gaussian_log_prob,
    discretized_logistic_log_prob, discretized_logistic_sample, gaussian_kl, reparameterize,
)
from research.latent.vq import (
    VQVAE, VQObjective, codebook_usage, ema_update, init_ema_state, nearest_codes, perplexity, quantize,
    restart_dead_codes, straight_through, vq_losses,
)

__all__ = [
    "VAE", "VAEObjective", "VQVAE", "VQObjective", "Decoder", "Encoder", "bound_bits_per_dim", "bounds",
    "class_marginal_bound", "codebook_usage", "count_params", "diag_gaussian_log_prob",
    "discretized_logistic_log_prob", "discretized_logistic_sample", "ema_update", "gaussian_kl",
    "init_ema_state", "latent_size", "nearest_codes", "perplexity", "quantize", "reparameterize",
    "restart_dead_codes", "straight_through", "vq_losses",
]
