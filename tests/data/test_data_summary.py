"""`hpn.data.summary`: the corpus summary `hpn-tune data` prints, and its JSONL export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hpn.config import DataConfig
from hpn.data import (
    Corpus,
    check_output_file,
    corpus_summary,
    format_summary,
    label_counts,
    load_corpus,
    write_labels_jsonl,
)
from hpn.errors import DataError


def small_corpus() -> Corpus:
    texts = [f"persona {i} — café" for i in range(12)]
    labels = np.array([0] * 3 + [1] * 6 + [2] * 3)
    return Corpus(texts=texts, labels=labels, label_names=["b", "a", "c"])


def test_label_counts_are_largest_first_then_by_name():
    assert list(label_counts(small_corpus()).items()) == [("a", 6), ("b", 3), ("c", 3)]


def test_summary_of_the_synthetic_corpus_matches_the_corpus_and_its_split():
    cfg = DataConfig(size=400)
    corpus = load_corpus(cfg)
    summary = corpus_summary(corpus, cfg)
    split = corpus.split(cfg.val_fraction, cfg.test_fraction, cfg.seed)
    assert summary["source"] == "synthetic" and summary["labels"] == "synthetic"
    assert summary["path"] is None
    assert summary["size"] == len(corpus) == sum(summary["label_counts"].values())
    assert summary["num_classes"] == corpus.num_classes == len(summary["label_counts"])
    assert summary["fingerprint"] == corpus.fingerprint()
    assert summary["split"] == {"train": len(split.train), "val": len(split.val),
                                "test": len(split.test)}
    json.dumps(summary)  # plain types only: it is the CLI's --json line


def test_summary_names_the_file_and_the_label_source(tmp_path):
    cfg = DataConfig(source="file", path=str(tmp_path / "x.jsonl"), labels="keywords")
    summary = corpus_summary(small_corpus(), cfg)
    assert (summary["source"], summary["labels"], summary["path"]) == (
        "file", "keywords", str(tmp_path / "x.jsonl"))


def test_format_summary_shows_every_label_with_its_percent_and_the_fingerprint():
    corpus = small_corpus()
    lines = format_summary(corpus_summary(corpus, DataConfig(source="file", path="p.jsonl")))
    text = "\n".join(lines)
    assert "file (p.jsonl)" in text and corpus.fingerprint() in text
    rows = [line.split() for line in lines if line.startswith("  ")]
    assert rows == [["a", "6", "50.0%"], ["b", "3", "25.0%"], ["c", "3", "25.0%"]]
    assert any(line.startswith("split") and "train" in line for line in lines)


def test_jsonl_rows_are_the_corpus_in_order_with_label_names(tmp_path):
    corpus = small_corpus()
    out = tmp_path / "labels.jsonl"
    assert write_labels_jsonl(corpus, out) == len(corpus)
    raw = out.read_text(encoding="utf-8")
    assert "café" in raw  # readable UTF-8, not \u escapes
    rows = [json.loads(line) for line in raw.splitlines()]
    assert rows == [{"text": t, "label": corpus.label_names[y]}
                    for t, y in zip(corpus.texts, corpus.labels)]


def test_an_output_in_a_missing_folder_or_on_a_folder_is_refused(tmp_path):
    assert check_output_file(tmp_path / "ok.jsonl") == tmp_path / "ok.jsonl"
    with pytest.raises(DataError, match=r"--output=.*folder .* does not exist"):
        check_output_file(tmp_path / "nope" / "labels.jsonl")
    with pytest.raises(DataError, match=r"--output=.*is a folder"):
        check_output_file(tmp_path)
