"""PersonaHub label sources, exercised on local copies in PersonaHub's schema (no download)."""

from __future__ import annotations

import json

import pytest

from hpn.config import DataConfig
from hpn.data import keyword_label, load_corpus
from hpn.data.personahub import GENERAL_DOMAIN_COLUMN, SPECIFIC_DOMAIN_COLUMN, TEXT_COLUMN
from hpn.errors import DataError

PERSONAS = [
    "A pediatric nurse who volunteers at a rural clinic.",
    "A retired high school teacher who tutors kids in maths.",
    "A software developer passionate about open source.",
    "A family lawyer who handles custody cases.",
    "A farmer who grows heirloom tomatoes.",
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "text, label",
    [
        ("A pediatric NURSE in a busy ward.", "medical"),
        ("A university professor of history.", "education"),
        ("A game programmer.", "technology"),
        ("An immigration attorney.", "legal"),
        ("A jazz musician.", "arts"),
        ("A marine biologist.", "science"),
        ("A freelance journalist.", "writing"),
        ("A startup entrepreneur.", "business"),
        ("A pastry chef.", "culinary"),
        ("A fitness coach.", "sports"),
        ("A beekeeper in the hills.", "other"),
        ("A doctor who is also a teacher.", "medical"),  # first match wins
        ("A lawyer turned software engineer.", "technology"),  # pattern order, not text order
    ],
)
def test_keywords_labels_match_the_seed_projects_patterns(text, label):
    assert keyword_label(text) == label


def test_keywords_labels_from_a_local_persona_subset(tmp_path):
    path = write_jsonl(tmp_path / "persona.jsonl", [{TEXT_COLUMN: p} for p in PERSONAS * 3])
    corpus = load_corpus(DataConfig(source="personahub", path=path, labels="keywords"))
    assert corpus.label_names == ["education", "legal", "medical", "other", "technology"]
    assert corpus.texts == PERSONAS * 3
    assert [corpus.label_names[y] for y in corpus.labels[:5]] == [
        "medical",
        "education",
        "technology",
        "legal",
        "other",
    ]


def test_elite_domain_labels_from_a_local_elite_persona_subset(tmp_path):
    domains = ["Medicine", "Education", "Computer Science", "Law", "None"]
    rows = [
        {TEXT_COLUMN: p, GENERAL_DOMAIN_COLUMN: d, SPECIFIC_DOMAIN_COLUMN: "x"}
        for p, d in zip(PERSONAS * 3, domains * 3)
    ]
    corpus = load_corpus(
        DataConfig(
            source="personahub", path=write_jsonl(tmp_path / "e.jsonl", rows), labels="elite_domain"
        )
    )
    assert corpus.label_names == ["Computer Science", "Education", "Law", "Medicine"]
    assert len(corpus) == 12  # personas whose domain is "None" carry no label and are dropped
    assert "A farmer who grows heirloom tomatoes." not in corpus.texts


def test_elite_domain_on_a_file_without_the_domain_column_names_it(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{TEXT_COLUMN: p} for p in PERSONAS * 3])
    with pytest.raises(DataError, match=r"no column 'general domain \(top 1 percent\)'.*persona"):
        load_corpus(DataConfig(source="personahub", path=path, labels="elite_domain"))


def test_keywords_also_label_a_plain_file_source(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": p} for p in PERSONAS * 12])
    corpus = load_corpus(DataConfig(source="file", path=path, labels="keywords", size=50, seed=0))
    assert len(corpus) == 50 and "other" in corpus.label_names


def test_column_labels_without_a_local_file_are_rejected_before_any_download():
    with pytest.raises(DataError, match="data.labels=column.*keywords or elite_domain"):
        load_corpus(DataConfig(source="personahub", labels="column"))


def test_a_rare_keyword_class_is_rejected_with_a_fix(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{TEXT_COLUMN: p} for p in PERSONAS * 3 + ["A pastry chef."]]
    )
    with pytest.raises(DataError, match=r"class 'culinary' has 1 example\(s\)"):
        load_corpus(DataConfig(source="personahub", path=path, labels="keywords"))
