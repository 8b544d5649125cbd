"""The built-in synthetic persona corpus."""

from __future__ import annotations

import time

import numpy as np

from hpn.config import DataConfig
from hpn.data import DOMAINS, load_corpus, synthetic_corpus


def test_synthetic_corpus_is_deterministic_for_a_seed():
    a, b = synthetic_corpus(500, seed=3), synthetic_corpus(500, seed=3)
    assert a.texts == b.texts and np.array_equal(a.labels, b.labels)
    assert a.fingerprint() == b.fingerprint()
    assert synthetic_corpus(500, seed=4).fingerprint() != a.fingerprint()


def test_synthetic_corpus_has_many_domains_and_imbalanced_classes():
    corpus = synthetic_corpus(3000, seed=0)
    counts = corpus.class_counts()
    assert len(corpus) == 3000 and corpus.num_classes == len(DOMAINS) >= 12
    assert 3.5 <= counts.max() / counts.min() <= 7


def test_synthetic_texts_are_varied_persona_sentences():
    corpus = synthetic_corpus(2000, seed=0)
    assert len(set(corpus.texts)) > 0.9 * len(corpus)
    assert all(t[0].isupper() and t.endswith(".") for t in corpus.texts)
    assert not any(" an u" in t or "  " in t for t in corpus.texts)


def test_label_noise_flips_about_the_requested_fraction():
    clean, noisy = (
        synthetic_corpus(2000, seed=1, noise=0.0),
        synthetic_corpus(2000, seed=1, noise=0.1),
    )
    assert clean.texts == noisy.texts  # noise touches labels only
    flipped = np.mean(clean.labels != noisy.labels)
    assert 0.08 <= flipped <= 0.1


def test_some_personas_mix_vocabulary_from_two_domains():
    corpus = synthetic_corpus(2000, seed=0, noise=0.0)
    vocab = {name: {w for slot in parts for w in slot} for name, parts in DOMAINS.items()}
    mixed = sum(
        any(
            w in text
            for other, words in vocab.items()
            if other != corpus.label_names[y]
            for w in words
        )
        for text, y in zip(corpus.texts, corpus.labels)
    )
    assert 0.05 * len(corpus) < mixed < 0.4 * len(corpus)


def test_small_synthetic_corpora_keep_every_class_splittable():
    corpus = synthetic_corpus(100, seed=0, noise=0.3)
    assert corpus.class_counts().min() >= 3
    split = corpus.split(0.15, 0.15, seed=0)
    assert len(set(corpus.labels[split.test].tolist())) == corpus.num_classes


def test_generating_ten_thousand_personas_is_fast():
    start = time.perf_counter()
    synthetic_corpus(10_000, seed=0)
    assert time.perf_counter() - start < 2.0


def test_load_corpus_defaults_to_the_synthetic_corpus():
    cfg = DataConfig()
    assert (
        load_corpus(cfg).fingerprint()
        == synthetic_corpus(cfg.size, cfg.seed, cfg.noise).for_task("classification").fingerprint()
    )
