"""research.lm.speculative.tree: tree topology (the verification rules are in test_tree_rules.py).

``Tree.from_choices`` numbers nodes breadth first with siblings by rank (checked against an explicit
BFS queue), rejects non-prefix-closed / gapped / negative / empty choice lists; ``mask()`` is
ancestor-or-self (checked against rank-path prefixes); ``children_table``, ``depths``,
``level_nodes``, ``chain(g)``; hashability (a static jit argument) and input checks.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.lm.speculative.tree import MEDUSA_CHOICES_SMALL, Tree, verify_tree, verify_tree_greedy, verify_tree_typical

MIXED_CHOICES = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
TREES = {
    "mixed": Tree.from_choices(MIXED_CHOICES),                                # widths 3, 2, 1; depth 3
    "full2": Tree.from_choices([(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]),  # width 2, depth 2
    "chain3": Tree.chain(3),
}
VOCAB = {"mixed": 4, "full2": 4, "chain3": 5}
START = -1          # the context before the text: index -1 == V of the [V+1, V+1, V] tables


def _rank_paths(tree):
    paths = [()]
    for i in range(1, tree.num_nodes):
        paths.append(paths[tree.parents[i]] + (tree.ranks[i],))
    return paths


def _node_path(tree, e):
    """Node ids root..e."""
    out = [e]
    while out[-1] != 0:
        out.append(tree.parents[out[-1]])
    return out[::-1]


# ============================================================================ 1. structure


def test_from_choices_numbering_is_bfs_with_siblings_by_rank():
    rng = np.random.default_rng(0)
    shuffled = [MIXED_CHOICES[i] for i in rng.permutation(len(MIXED_CHOICES))] + [(0, 1)]   # order free, dups ok
    t = Tree.from_choices(shuffled)
    assert t == TREES["mixed"] and hash(t) == hash(TREES["mixed"])
    assert t.parents == (-1, 0, 0, 0, 1, 1, 2, 4)
    assert t.ranks == (0, 0, 1, 2, 0, 1, 0, 0)
    assert t.depths == (0, 1, 1, 1, 2, 2, 2, 3)
    assert (t.num_nodes, t.max_depth, t.max_children) == (8, 3, 3)
    assert t.children == ((1, 2, 3), (4, 5), (6,), (), (7,), (), (), ())
    np.testing.assert_array_equal(t.children_table(), [[1, 2, 3], [4, 5, -1], [6, -1, -1], [-1] * 3,
                                                       [7, -1, -1], [-1] * 3, [-1] * 3, [-1] * 3])
    assert t.children_table().dtype == np.int32
    assert [t.level_nodes(d) for d in range(5)] == [(0,), (1, 2, 3), (4, 5, 6), (7,), ()]


def _bfs_reference(choices):
    """Independent numbering: an explicit BFS queue over the rank-path set."""
    present = {tuple(c) for c in choices}
    order, queue = [], [()]
    while queue:
        node = queue.pop(0)
        order.append(node)
        r = 0
        while node + (r,) in present:
            queue.append(node + (r,))
            r += 1
    return order


def _random_choices(rng, max_nodes=12, max_width=3, max_depth=4):
    paths, frontier = [], [()]
    while frontier and len(paths) < max_nodes:
        node = frontier.pop(int(rng.integers(len(frontier))))
        if len(node) >= max_depth:
            continue
        for r in range(int(rng.integers(1, max_width + 1))):
            paths.append(node + (r,))
            frontier.append(node + (r,))
    return paths


@pytest.mark.parametrize("seed", range(6))
def test_numbering_mask_and_tables_against_independent_computation(seed):
    rng = np.random.default_rng(seed)
    choices = _random_choices(rng) if seed else list(MEDUSA_CHOICES_SMALL)
    t = Tree.from_choices(choices)
    order = _bfs_reference(choices)
    assert _rank_paths(t) == order                     # node i is the i-th node of the BFS
    assert t.num_nodes == len(order)
    assert t.depths == tuple(len(c) for c in order)
    m = t.mask()
    assert m.dtype == bool and m.shape == (t.num_nodes, t.num_nodes)
    want = np.asarray([[order[i][:len(order[j])] == order[j] for j in range(len(order))] for i in range(len(order))])
    np.testing.assert_array_equal(m, want)             # ancestor-or-self == rank-path prefix
    table = t.children_table()
    for j, pj in enumerate(order):
        kids = [order.index(pj + (r,)) for r in range(len(order)) if pj + (r,) in order]
        assert table[j, :len(kids)].tolist() == kids and (table[j, len(kids):] == -1).all()
    if not seed:
        assert (t.num_nodes, t.max_depth, t.max_children) == (27, 5, 4)


@pytest.mark.parametrize("g", [1, 2, 5])
def test_chain(g):
    t = Tree.chain(g)
    assert t.parents == (-1,) + tuple(range(g)) and t.ranks == (0,) * (g + 1)
    assert t.depths == tuple(range(g + 1)) and t.max_depth == g and t.max_children == 1
    np.testing.assert_array_equal(t.mask(), np.tril(np.ones((g + 1, g + 1), bool)))
    assert t == Tree.from_choices([(0,) * d for d in range(1, g + 1)])


@pytest.mark.parametrize("bad, match", [
    ([(0, 0)], "prefix-closed"),
    ([(0,), (1, 1)], "prefix-closed"),
    ([(0,), (0, 0, 0)], "prefix-closed"),
    ([(1,)], "sibling ranks"),                         # gap: rank 1 without rank 0
    ([(0,), (0, 1)], "sibling ranks"),
    ([(0,), (2,)], "sibling ranks"),
    ([(0,), (-1,)], "negative"),
    ([], "non-empty"),
    ([()], "non-empty"),
])
def test_from_choices_rejects_bad_lists(bad, match):
    with pytest.raises(ValueError, match=match):
        Tree.from_choices(bad)


def test_tree_constructor_and_chain_validation():
    with pytest.raises(ValueError, match="parents"):
        Tree((0,), (0,))
    with pytest.raises(ValueError, match="one length"):
        Tree((-1, 0), (0,))
    with pytest.raises(ValueError, match="earlier node"):
        Tree((-1, 1), (0, 0))
    with pytest.raises(ValueError, match="sibling ranks"):
        Tree((-1, 0, 0), (0, 0, 0))
    for g in (0, -1, 2.0):
        with pytest.raises(ValueError, match="chain length"):
            Tree.chain(g)


def test_tree_is_a_static_jit_argument_and_inputs_are_checked():
    t = TREES["mixed"]
    f = jax.jit(verify_tree_greedy, static_argnums=0)
    tok = jnp.zeros((2, t.num_nodes), jnp.int32)
    path, num, nxt = f(Tree.from_choices(MIXED_CHOICES), tok, jnp.zeros((2, t.num_nodes, 4)))
    assert path.shape == (2, 4) and num.shape == (2,) and nxt.shape == (2,)
    probs = jnp.full((2, t.num_nodes, 4), 0.25)
    with pytest.raises(ValueError, match="tokens must be"):
        verify_tree(t, tok[:, :-1], probs[:, :-1], probs[:, :-1], jax.random.key(0))
    with pytest.raises(ValueError, match="draft_probs"):
        verify_tree(t, tok, probs[..., :3], probs, jax.random.key(0))
    with pytest.raises(ValueError, match="target values"):
        verify_tree_typical(t, tok, probs[0], jax.random.key(0))
