"""A labelled text corpus, its fingerprint and its stratified train/val/test split.

Every loader ends by building a `Corpus`, so the checks a user can trip over (empty texts,
a single class, a class too small to split) live here once, with one-line messages.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hpn.errors import DataError

#: Each class needs one example in each of train, val and test.
MIN_CLASS_SIZE = 3


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # (n_train,) int64 indices into the corpus
    val: np.ndarray
    test: np.ndarray


def check_texts(texts: Sequence[object], column: str = "texts") -> None:
    """Raise DataError at the first text that is not a non-empty string, naming row and column."""
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(
                f"column {column!r}, row {row}: expected text, got {type(text).__name__} "
                f"({text!r}); drop the row or fill it in"
            )
        if not text.strip():
            raise DataError(f"column {column!r}, row {row}: empty text; drop the row or fill it in")


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make `==` ambiguous
class Corpus:
    texts: list[str]
    labels: np.ndarray  # (n,) int64 in [0, len(label_names))
    label_names: list[str]

    def __post_init__(self) -> None:
        texts = list(self.texts)
        check_texts(texts)
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or len(labels) != len(texts):
            raise DataError(
                f"labels: expected {len(texts)} labels (one per text), got shape {labels.shape}"
            )
        if len(labels) and not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels: expected integer class ids, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
        names = [str(name) for name in self.label_names]
        if len(set(names)) != len(names):
            raise DataError(f"label_names: duplicate names in {names}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(
                f"labels: class ids must lie in [0, {len(names)}), "
                f"got {labels.min()}..{labels.max()}"
            )
        counts = np.bincount(labels, minlength=len(names))
        if np.count_nonzero(counts) < 2 or len(names) < 2:
            raise DataError(
                f"the corpus needs at least 2 classes, got {np.count_nonzero(counts)}; "
                "add data of another class"
            )
        small = int(np.argmin(counts))
        if counts[small] < MIN_CLASS_SIZE:
            raise DataError(
                f"class {names[small]!r} has {counts[small]} example(s) but the split needs >= "
                f"{MIN_CLASS_SIZE} (one each for train, val, test); drop that class or add data"
            )
        labels.setflags(write=False)
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", names)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def fingerprint(self) -> str:
        """sha256 over label names, texts and labels: stable across runs, processes, machines."""
        h = hashlib.sha256()
        h.update(json.dumps(self.label_names).encode("utf-8"))
        for text in self.texts:
            data = text.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab","c"] != ["a","bc"]
            h.update(data)
        h.update(self.labels.astype("<i8").tobytes())
        return h.hexdigest()

    def split(self, val_fraction: float, test_fraction: float, seed: int) -> Split:
        """Stratified and seeded: per class, shuffle, then test, val, and the rest for train."""
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise DataError(
                f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: "
                "each must be > 0 and their sum < 1"
            )
        rng = np.random.default_rng(seed)
        parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
        for c in range(self.num_classes):
            idx = rng.permutation(np.flatnonzero(self.labels == c))
            n = len(idx)
            n_test = max(1, int(n * test_fraction + 0.5))
            n_val = max(1, int(n * val_fraction + 0.5))
            while n - n_test - n_val < 1:  # large fractions on a small class: train keeps one
                if n_val >= n_test:
                    n_val -= 1
                else:
                    n_test -= 1
            parts["test"].append(idx[:n_test])
            parts["val"].append(idx[n_test : n_test + n_val])
            parts["train"].append(idx[n_test + n_val :])
        return Split(**{k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()})

    def majority_baseline(self, split_indices: np.ndarray) -> float:
        """Accuracy on `split_indices` of always predicting the corpus's most frequent class."""
        idx = np.asarray(split_indices, dtype=np.int64)
        if idx.size == 0:
            raise DataError("majority_baseline: no indices given; pass a non-empty split")
        majority = int(np.argmax(self.class_counts()))
        return float(np.mean(self.labels[idx] == majority))
