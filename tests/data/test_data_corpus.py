"""Corpus: validation, fingerprint, stratified split, majority baseline."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hpn.data import Corpus, Split
from hpn.errors import DataError


def make_corpus(counts=(10, 6, 3)) -> Corpus:
    labels = np.repeat(np.arange(len(counts)), counts)
    texts = [f"persona number {i} of class {c}" for i, c in enumerate(labels)]
    return Corpus(texts=texts, labels=labels, label_names=[f"c{k}" for k in range(len(counts))])


def test_corpus_normalises_labels_to_int64_and_counts_classes():
    corpus = make_corpus()
    assert corpus.labels.dtype == np.int64
    assert corpus.num_classes == 3 and len(corpus) == 19
    assert corpus.class_counts().tolist() == [10, 6, 3]


@pytest.mark.parametrize(
    "bad, what",
    [("", "empty text"), ("   ", "empty text"), (None, "expected text"), (3, "expected text")],
)
def test_empty_or_non_string_text_is_rejected_naming_the_row(bad, what):
    corpus = make_corpus()
    texts = list(corpus.texts)
    texts[4] = bad
    with pytest.raises(DataError, match=rf"row 4: {what}"):
        Corpus(texts=texts, labels=corpus.labels, label_names=corpus.label_names)


def test_a_single_class_is_rejected():
    with pytest.raises(DataError, match="needs at least 2 classes"):
        Corpus(texts=["a", "b", "c"], labels=np.zeros(3, dtype=np.int64), label_names=["x", "y"])


def test_class_too_small_for_the_split_is_rejected_naming_class_and_count():
    with pytest.raises(
        DataError, match=r"class 'c1' has 2 example\(s\).*drop that class or add data"
    ):
        make_corpus((5, 2))


def test_labels_out_of_range_or_of_the_wrong_length_are_rejected():
    with pytest.raises(DataError, match="one per text"):
        Corpus(texts=["a", "b"], labels=np.array([0]), label_names=["x", "y"])
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        Corpus(texts=["a"] * 6, labels=np.array([0, 0, 0, 1, 1, 2]), label_names=["x", "y"])


def test_split_is_stratified_and_covers_every_class():
    corpus = make_corpus((40, 20, 3, 7))
    split = corpus.split(val_fraction=0.15, test_fraction=0.15, seed=0)
    parts = [split.train, split.val, split.test]
    assert all(p.dtype == np.int64 for p in parts)
    everything = np.concatenate(parts)
    assert sorted(everything.tolist()) == list(range(len(corpus)))  # disjoint and complete
    for part in parts:
        assert set(corpus.labels[part].tolist()) == {0, 1, 2, 3}
    assert np.bincount(corpus.labels[split.test]).tolist() == [6, 3, 1, 1]  # round(n * 0.15), >= 1


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    corpus = make_corpus((40, 20, 10))
    a, b = corpus.split(0.2, 0.2, seed=1), corpus.split(0.2, 0.2, seed=1)
    c = corpus.split(0.2, 0.2, seed=2)
    assert isinstance(a, Split)
    assert all(
        np.array_equal(x, y) for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test))
    )
    assert not np.array_equal(a.test, c.test)


def test_large_fractions_still_leave_one_training_example_per_class():
    split = make_corpus((4, 4, 4)).split(val_fraction=0.45, test_fraction=0.44, seed=0)
    assert np.bincount(make_corpus((4, 4, 4)).labels[split.train]).min() >= 1


def test_invalid_fractions_are_rejected():
    with pytest.raises(DataError, match="data.val_fraction"):
        make_corpus().split(0.6, 0.5, seed=0)


def test_fingerprint_changes_when_a_label_changes():
    corpus = make_corpus()
    labels = corpus.labels.copy()
    labels[0] = 1
    changed = Corpus(texts=corpus.texts, labels=labels, label_names=corpus.label_names)
    assert corpus.fingerprint() != changed.fingerprint()
    assert corpus.fingerprint() == make_corpus().fingerprint()


def test_fingerprint_changes_with_texts_and_label_names():
    corpus = make_corpus()
    renamed = Corpus(texts=corpus.texts, labels=corpus.labels, label_names=["a", "b", "c"])
    edited = Corpus(
        texts=["x" + corpus.texts[0]] + corpus.texts[1:],
        labels=corpus.labels,
        label_names=corpus.label_names,
    )
    assert len({corpus.fingerprint(), renamed.fingerprint(), edited.fingerprint()}) == 3


def test_fingerprint_is_stable_across_processes():
    code = (
        "import numpy as np; from hpn.data import Corpus; "
        "print(Corpus(texts=['a b', 'c', 'd', 'e', 'f', 'g'], labels=np.array([0, 0, 0, 1, 1, 1]),"
        " label_names=['x', 'y']).fingerprint())"
    )
    here = Corpus(
        texts=["a b", "c", "d", "e", "f", "g"],
        labels=np.array([0, 0, 0, 1, 1, 1]),
        label_names=["x", "y"],
    ).fingerprint()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here
    assert len(here) == 64


def test_majority_baseline_predicts_the_corpus_most_frequent_class():
    corpus = make_corpus((10, 6, 3))
    assert corpus.majority_baseline(np.arange(len(corpus))) == pytest.approx(10 / 19)
    assert corpus.majority_baseline(np.array([0, 1, 10, 16])) == pytest.approx(0.5)
