"""Language models. Today: ``ByteLM`` (byte-level causal transformer over packed rows)."""
from research.lm.byte_lm import ByteLM, byte_lm_loss

__all__ = ["ByteLM", "byte_lm_loss"]
