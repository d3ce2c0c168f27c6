"""Text that ships with installed packages (nothing is downloaded)."""
from __future__ import annotations

import glob
import os

import numpy as np


def load_documents(max_len: int) -> list[np.ndarray]:
    """Paragraphs of scikit-learn's dataset descriptions as uint8 arrays (chunked to max_len)."""
    import sklearn.datasets

    root = os.path.join(os.path.dirname(sklearn.datasets.__file__), "descr")
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "*.rst"))):
        with open(path, "rb") as f:
            for para in f.read().split(b"\n\n"):
                para = para.strip()
                for i in range(0, len(para), max_len):
                    if len(para[i:i + max_len]) >= 2:
                        docs.append(np.frombuffer(para[i:i + max_len], np.uint8).astype(np.int32))
    if not docs:
        raise FileNotFoundError(f"no .rst descriptions found under {root}")
    return docs
