"""Data: a persona Corpus (labels, a target, label sets), its seeded stratified split and the
loaders behind it.

`load_corpus(cfg.data, cfg.model.task)` is the entry point: the built-in synthetic corpus, a local
JSONL / CSV / Parquet file, or PersonaHub (hub or local copy) with derived labels.
`corpus_summary` / `write_labels_jsonl` show a corpus before tuning on it (`hpn-tune data`).
"""

from __future__ import annotations

from hpn.data.corpus import MIN_CLASS_SIZE, Corpus, Split
from hpn.data.files import corpus_from_file, read_table
from hpn.data.loader import load_corpus
from hpn.data.personahub import (
    KEYWORD_PATTERNS,
    keyword_label,
    keyword_labels,
    load_personahub,
)
from hpn.data.summary import (
    check_output_file,
    corpus_summary,
    format_summary,
    label_counts,
    write_labels_jsonl,
)
from hpn.data.synthetic import DOMAINS, synthetic_corpus

__all__ = [
    "DOMAINS",
    "KEYWORD_PATTERNS",
    "MIN_CLASS_SIZE",
    "Corpus",
    "Split",
    "check_output_file",
    "corpus_from_file",
    "corpus_summary",
    "format_summary",
    "keyword_label",
    "keyword_labels",
    "label_counts",
    "load_corpus",
    "load_personahub",
    "read_table",
    "synthetic_corpus",
    "write_labels_jsonl",
]
