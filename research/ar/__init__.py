"""Autoregressive models over token grids (pixels, VQ codes) on the decoder-only LM stack."""
from research.ar.pixels import (
    TokenGrid, bits_per_token, check_class_labels, check_grid_tokens, input_sequence, log_likelihood,
    make_lm_config, nll_loss, sample, token_logits,
)

__all__ = ["TokenGrid", "make_lm_config", "check_grid_tokens", "check_class_labels", "input_sequence",
           "token_logits", "log_likelihood", "nll_loss", "bits_per_token", "sample"]
