"""Decoding acceleration, exact by construction: one jitted loop per method, batched, ragged.

* ``sampling``: speculative sampling with a separate draft model (Leviathan et al. 2023; Chen et
  al. 2023): the chain rule :func:`verify`, :func:`speculative_generate`.
* ``tree``: static draft trees (``Tree.from_choices``, Medusa-style choice lists), their
  attention masks, and the tree verification rules: greedy longest path, the multi-draft rule
  (exact at any temperature) and Medusa's typical acceptance (lossy, opt-in).
* ``tree_decode``: :func:`tree_generate`, the tree-verification loop over a pluggable drafter.
* ``medusa``: Medusa heads (Cai et al. 2024), Medusa-1 / Medusa-2 training, the drafter.
* ``eagle``: an EAGLE-style draft head (Li et al. 2024), training, the tree drafter.
* ``mtp``: DeepSeek-V3 multi-token prediction modules, joint training, the chain drafter.
"""
from research.lm.speculative.eagle import EagleDrafter, init_eagle, train_eagle
from research.lm.speculative.medusa import MedusaDrafter, init_medusa, train_medusa
from research.lm.speculative.mtp import MTPDrafter, init_mtp, train_mtp
from research.lm.speculative.sampling import (acceptance_probs, residual, speculative_generate, summarize_stats,
                                              verify, verify_greedy)
from research.lm.speculative.tree import Tree, verify_tree, verify_tree_greedy, verify_tree_typical
from research.lm.speculative.tree_decode import tree_generate

__all__ = ["acceptance_probs", "residual", "verify", "verify_greedy", "speculative_generate", "summarize_stats",
           "Tree", "verify_tree", "verify_tree_greedy", "verify_tree_typical", "tree_generate",
           "MedusaDrafter", "init_medusa", "train_medusa", "EagleDrafter", "init_eagle", "train_eagle",
           "MTPDrafter", "init_mtp", "train_mtp"]
