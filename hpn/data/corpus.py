"""A text corpus, the view one task trains on, its fingerprint and its stratified split.

Every loader ends by building a `Corpus`, so the checks a user can trip over (empty texts,
a single class, a class too small to split, a constant or non-finite target, a text with no
label) live here once, with one-line messages. A corpus may carry class labels, a numeric
target and label sets at once; `for_task` keeps only what one task trains on, so the
classification view fingerprints exactly as before tasks existed.
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
#: Without labels the split stratifies by target quantile bins: deciles (fewer on a tiny corpus).
TARGET_BINS = 10


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


def _check_labels(labels: np.ndarray, names: list[str], n: int, strict: bool) -> np.ndarray:
    """Class ids as int64. `strict` (single-label): >= 2 classes, each splittable in three.
    A multi-label corpus's main labels only stratify its split, so rare ones are allowed."""
    if labels.ndim != 1 or len(labels) != n:
        raise DataError(f"labels: expected {n} labels (one per text), got shape {labels.shape}")
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels: expected integer class ids, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(
            f"labels: class ids must lie in [0, {len(names)}), got {labels.min()}..{labels.max()}"
        )
    if strict:
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
    return labels


def _check_targets(targets: object, n: int) -> np.ndarray:
    """Finite float64 targets that vary: a constant target leaves nothing to learn."""
    try:
        values = np.asarray(targets, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(
            "targets: expected numbers; point data.target_column at a numeric column"
        ) from None
    if values.ndim != 1 or len(values) != n:
        raise DataError(f"targets: expected {n} targets (one per text), got shape {values.shape}")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise DataError(
            f"targets: row {int(bad[0])} is {values[bad[0]]!r}, not a finite number; "
            "fix the value or drop the row"
        )
    if n and values.min() == values.max():
        raise DataError(
            f"targets: every row has the same target ({values[0]:g}); a regression target must "
            "vary, point data.target_column at another column"
        )
    return values


def _check_label_sets(label_sets: object, names: list[str], n: int) -> np.ndarray:
    """(n, labels) bool, every text with at least one label and >= 2 labels in use."""
    sets = np.asarray(label_sets)
    if sets.shape != (n, len(names)):
        raise DataError(
            f"label_sets: expected shape ({n}, {len(names)}) (texts x label names), "
            f"got {sets.shape}"
        )
    if sets.dtype != np.bool_:
        if not (np.issubdtype(sets.dtype, np.integer) and np.isin(sets, (0, 1)).all()):
            raise DataError(f"label_sets: expected booleans, got dtype {sets.dtype}")
        sets = sets.astype(np.bool_)
    empty = np.flatnonzero(~sets.any(axis=1))
    if empty.size:
        raise DataError(
            f"label_sets: row {int(empty[0])} has no label; give it at least one or drop the row"
        )
    if np.count_nonzero(sets.any(axis=0)) < 2:
        raise DataError(
            f"the corpus needs at least 2 labels in use, got {np.count_nonzero(sets.any(axis=0))}; "
            "add data with another label"
        )
    return sets


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make `==` ambiguous
class Corpus:
    """Texts and what to learn about them: class ids, a numeric target, label sets.

    `labels` is None only for a corpus with a target and no classes (a regression file without
    a label column); with `label_sets`, `labels` is each text's main label (derived from the
    first label of its set when not given), which only stratifies the split.
    """

    texts: list[str]
    labels: np.ndarray | None  # (n,) int64 in [0, len(label_names)), or None
    label_names: list[str]
    targets: np.ndarray | None = None  # (n,) float64, finite, not constant
    label_sets: np.ndarray | None = None  # (n, len(label_names)) bool, >= 1 per row

    def __post_init__(self) -> None:
        texts = list(self.texts)
        check_texts(texts)
        n = len(texts)
        names = [str(name) for name in self.label_names]
        if len(set(names)) != len(names):
            raise DataError(f"label_names: duplicate names in {names}")
        label_sets = None
        if self.label_sets is not None:
            label_sets = _check_label_sets(self.label_sets, names, n)
            label_sets.setflags(write=False)
        labels = self.labels
        if labels is None and label_sets is not None:
            labels = np.argmax(label_sets, axis=1)  # the first label of each set
        if labels is not None:
            labels = _check_labels(np.asarray(labels), names, n, strict=label_sets is None)
            labels.setflags(write=False)
        elif names:
            raise DataError(f"label_names: {names} given without labels; pass labels or no names")
        if labels is not None and label_sets is not None:
            outside = np.flatnonzero(~label_sets[np.arange(n), labels])
            if outside.size:
                row = int(outside[0])
                raise DataError(
                    f"labels: row {row}'s main label {names[labels[row]]!r} is not in its label "
                    "set; a main label must be one of the text's labels"
                )
        targets = None
        if self.targets is not None:
            targets = _check_targets(self.targets, n)
            targets.setflags(write=False)
        if labels is None and targets is None:
            raise DataError(
                "the corpus has neither labels nor a target; set data.label_column or "
                "data.target_column to a column of the file"
            )
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", names)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "label_sets", label_sets)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        """Classes (or labels, for label sets); 0 for a corpus with a target only."""
        return len(self.label_names)

    def class_counts(self) -> np.ndarray:
        """Texts per class id (main label, for label sets); empty without labels."""
        if self.labels is None:
            return np.zeros(0, dtype=np.int64)
        return np.bincount(self.labels, minlength=self.num_classes)

    def label_set_counts(self) -> np.ndarray:
        """Texts carrying each label (a text counts once per label of its set)."""
        if self.label_sets is None:
            return self.class_counts()
        return self.label_sets.sum(axis=0).astype(np.int64)

    def for_task(self, task: str) -> Corpus:
        """The view `model.task` trains on: only the parts it uses, each required.

        Why a view: the classification view carries no target or label sets, so its
        fingerprint (and so every stored study's) stays what it was before tasks existed.
        """
        from hpn.tasks import task_spec  # hpn.tasks imports nothing from data; no cycle

        spec = task_spec(task)  # ConfigError naming model.task for an unknown name
        if spec.uses_target and self.targets is None:
            raise DataError(
                f"targets: missing, and model.task={spec.name} needs a numeric target; set "
                "data.target_column to a numeric column of the file (the synthetic corpus "
                "has one)"
            )
        if spec.uses_labels and self.labels is None:
            raise DataError(
                f"labels: missing, and model.task={spec.name} needs class labels; set "
                "data.label_column to the file's label column"
            )
        if spec.multilabel and self.label_sets is None:
            raise DataError(
                f"label_sets: missing, and model.task={spec.name} needs label sets; set "
                "data.label_column to a column of labels (a list, or names separated by "
                "data.label_separator)"
            )
        if spec.multilabel:
            return Corpus(self.texts, self.labels, self.label_names, label_sets=self.label_sets)
        labels = self.labels if spec.uses_labels else None
        names = self.label_names if spec.uses_labels else []
        targets = self.targets if spec.uses_target else None
        return Corpus(self.texts, labels, names, targets=targets)

    def fingerprint(self) -> str:
        """sha256 over label names, texts and labels (then targets / label sets, only when
        present): stable across runs, processes, machines; a labels-only corpus hashes as
        before tasks existed."""
        h = hashlib.sha256()
        h.update(json.dumps(self.label_names).encode("utf-8"))
        for text in self.texts:
            data = text.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab","c"] != ["a","bc"]
            h.update(data)
        if self.labels is not None:
            h.update(self.labels.astype("<i8").tobytes())
        if self.targets is not None:
            h.update(b"targets")
            h.update(self.targets.astype("<f8").tobytes())
        if self.label_sets is not None:
            h.update(b"label_sets")
            h.update(np.packbits(self.label_sets, axis=1).tobytes())
        return h.hexdigest()

    def strata(self) -> np.ndarray:
        """Group id per text for the split: the class (main label), else the target's
        quantile bin (by rank, so ties cannot empty a bin)."""
        if self.labels is not None:
            return self.labels
        assert self.targets is not None  # __post_init__: labels or targets
        n = len(self)
        bins = max(1, min(TARGET_BINS, n // MIN_CLASS_SIZE))
        order = np.argsort(self.targets, kind="stable")
        strata = np.empty(n, dtype=np.int64)
        strata[order] = np.arange(n) * bins // max(n, 1)
        return strata

    def split(self, val_fraction: float, test_fraction: float, seed: int) -> Split:
        """Stratified and seeded: per class (or target decile), shuffle, then test, val, and
        the rest for train."""
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise DataError(
                f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: "
                "each must be > 0 and their sum < 1"
            )
        if len(self) < MIN_CLASS_SIZE:
            raise DataError(
                f"the corpus has {len(self)} text(s) but the split needs >= {MIN_CLASS_SIZE} "
                "(one each for train, val, test); add data"
            )
        strata = self.strata()
        rng = np.random.default_rng(seed)
        parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
        for c in range(int(strata.max()) + 1):
            idx = rng.permutation(np.flatnonzero(strata == c))
            n = len(idx)
            if n == 0:  # a label that is never a main label (label sets)
                continue
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
        if self.labels is None:
            raise DataError("majority_baseline: the corpus has no class labels")
        majority = int(np.argmax(self.class_counts()))
        return float(np.mean(self.labels[idx] == majority))
