"""Language-model corpora that ship with installed packages (nothing is downloaded).

Two small corpora, each a dict ``document name -> text``:

* ``"pydoc"``: the standard library's help topics (``pydoc_data.topics.topics``, ~79 topics,
  ~490k characters of Python reference-manual prose and code; ships with every CPython).
* ``"sklearn"``: scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``,
  ~14 files, ~43k characters).

Splits are **by document**: a topic (or file) is wholly in train or wholly in validation, so
validation text is unseen text, not a held-out tail of seen documents. The split is a fixed
function of ``(name, val_fraction, seed)``: the sorted document names are permuted with
``numpy.random.default_rng(seed).permutation``, the first ``max(1, round(val_fraction * n))``
(at most ``n - 1``) go to validation. Documents are returned in sorted-name order.

Typical use::

    docs = load_corpus("pydoc", split="train")
    tok = BPETokenizer.train(docs, vocab_size=1024)
    pieces = chunk_tokens([tok.encode(d) for d in docs], max_len=256)
    batch = pack_sequences(pieces, row_length=256)
"""
from __future__ import annotations

import glob
import os
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "CORPORA",
    "SPLITS",
    "pydoc_topics",
    "sklearn_descr",
    "corpus_documents",
    "split_names",
    "load_corpus",
    "corpus_stats",
    "chunk_tokens",
]

CORPORA = ("pydoc", "sklearn")
SPLITS = ("train", "val", "all")


def pydoc_topics() -> dict[str, str]:
    """The standard library's help topics: ``{topic name: text}`` (``pydoc_data.topics``)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distro builds strip pydoc_data
        raise ImportError("the 'pydoc' corpus needs the standard library's pydoc_data package "
                          "(pydoc_data.topics), which this Python build does not include; "
                          "use a full CPython build or the 'sklearn' corpus") from e
    if not topics:
        raise FileNotFoundError("pydoc_data.topics.topics is empty in this Python build")
    return {str(k): str(v) for k, v in topics.items()}


def sklearn_descr() -> dict[str, str]:
    """scikit-learn's dataset descriptions: ``{file stem: text}`` from ``datasets/descr/*.rst``."""
    try:
        import sklearn.datasets
    except ImportError as e:
        raise ImportError("the 'sklearn' corpus needs scikit-learn installed") from e
    root = os.path.join(os.path.dirname(sklearn.datasets.__file__), "descr")
    docs = {}
    for path in sorted(glob.glob(os.path.join(root, "*.rst"))):
        with open(path, encoding="utf-8") as f:
            docs[os.path.splitext(os.path.basename(path))[0]] = f.read()
    if not docs:
        raise FileNotFoundError(f"no .rst dataset descriptions found under {root}")
    return docs


_LOADERS: dict[str, Callable[[], dict[str, str]]] = {"pydoc": pydoc_topics,
                                                     "sklearn": sklearn_descr}


def corpus_documents(name: str) -> dict[str, str]:
    """All documents of corpus ``name`` (one of :data:`CORPORA`) as ``{name: text}``."""
    if name not in _LOADERS:
        raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA}")
    return _LOADERS[name]()


def _check_fraction(val_fraction: float) -> float:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.floating)):
        raise TypeError(f"val_fraction must be a float in (0, 1), got {val_fraction!r}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in the open interval (0, 1), got {val_fraction}")
    return float(val_fraction)


def _split(names: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    names = sorted(names)
    n = len(names)
    if n < 2:
        raise ValueError(f"need at least 2 documents to split into train and val, got {n}")
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    perm = np.random.default_rng(seed).permutation(n)
    val = sorted(names[i] for i in perm[:n_val])
    train = sorted(names[i] for i in perm[n_val:])
    return train, val


def split_names(name: str, val_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(train_names, val_names)``: the by-document split of corpus ``name``.

    Disjoint, together all documents, each non-empty, both sorted; a pure function of
    ``(name, val_fraction, seed)``.
    """
    val_fraction = _check_fraction(val_fraction)
    return _split(list(corpus_documents(name)), val_fraction, seed)


def load_corpus(name: str, *, split: str, val_fraction: float = 0.1, seed: int = 0) -> list[str]:
    """Texts of one split of corpus ``name``, in sorted document-name order.

    Args:
      name: ``"pydoc"`` or ``"sklearn"``.
      split: ``"train"``, ``"val"`` or ``"all"``.
      val_fraction: fraction of *documents* held out for validation, in ``(0, 1)``.
      seed: seed of the split permutation (the same seed always gives the same split).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    val_fraction = _check_fraction(val_fraction)
    docs = corpus_documents(name)
    if split == "all":
        return [docs[k] for k in sorted(docs)]
    train, val = _split(list(docs), val_fraction, seed)
    return [docs[k] for k in (train if split == "train" else val)]


def corpus_stats(name: str, *, val_fraction: float = 0.1, seed: int = 0) -> dict[str, dict[str, int]]:
    """``{split: {"documents", "characters", "bytes"}}`` for train, val and all (bytes = UTF-8)."""
    val_fraction = _check_fraction(val_fraction)
    docs = corpus_documents(name)
    train, val = _split(list(docs), val_fraction, seed)
    out = {}
    for split, names in (("train", train), ("val", val), ("all", sorted(docs))):
        texts = [docs[k] for k in names]
        out[split] = {"documents": len(texts),
                      "characters": sum(len(t) for t in texts),
                      "bytes": sum(len(t.encode("utf-8")) for t in texts)}
    return out


def chunk_tokens(docs_tokens: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Splits tokenised documents into pieces of ``2 <= len <= max_len`` tokens.

    Each document is cut into consecutive pieces of ``max_len`` tokens. If that would leave a
    final 1-token piece (which has no next-token target), the last two pieces are rebalanced to
    ``max_len - 1`` and ``2`` tokens instead, so **the pieces of a document concatenate back to
    the document exactly**. Documents with fewer than 2 tokens are dropped (nothing to
    predict). Pieces are int32 and in order (document by document), ready for
    :func:`research.data.packing.pack_sequences`; each piece is packed as its own document, so
    the one next-token pair across a cut is not trained on.

    Args:
      docs_tokens: list of 1-D integer token arrays, one per document.
      max_len: the longest piece (usually the packed row length); at least 3.

    Returns:
      list of 1-D int32 arrays.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)):
        raise TypeError(f"max_len must be an int, got {max_len!r}")
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 so every piece can hold >= 2 tokens and "
                         f"documents stay whole, got {max_len}")
    pieces = []
    for i, doc in enumerate(docs_tokens):
        a = np.asarray(doc)
        if a.ndim != 1:
            raise ValueError(f"document {i} must be a 1-D token array, got shape {a.shape}")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"document {i} must hold integer token ids, got dtype {a.dtype}")
        a = a.astype(np.int32, copy=False)
        n = a.size
        if n < 2:
            continue
        starts = list(range(0, n, max_len))
        if n - starts[-1] == 1:  # would leave a 1-token tail: move one token into it
            starts[-1] -= 1
        bounds = starts + [n]
        pieces.extend(a[s:e] for s, e in zip(bounds[:-1], bounds[1:]))
    return pieces
