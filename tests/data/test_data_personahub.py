"""PersonaHub label sources, exercised on local copies in PersonaHub's schema (no download)."""

from __future__ import annotations

import json

import pytest

from hpn.config import DataConfig
from hpn.data import KEYWORD_PATTERNS, keyword_label, load_corpus
from hpn.data.personahub import GENERAL_DOMAIN_COLUMN, SPECIFIC_DOMAIN_COLUMN, TEXT_COLUMN
from hpn.errors import DataError

PERSONAS = [
    "A pediatric nurse who volunteers at a rural clinic.",
    "A retired high school teacher who tutors kids in maths.",
    "A software developer passionate about open source.",
    "A family lawyer who handles custody cases.",
    "A farmer who grows heirloom tomatoes.",
]
PERSONA_LABELS = ["healthcare", "educator", "tech", "legal", "other"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


#: issue 9: the seed project's labels, in its order; nothing else.
SEED_LABELS = [
    "educator", "healthcare", "tech", "creative", "writer",
    "scientist", "business", "legal", "student", "parent",
]


def test_keyword_patterns_are_the_seed_projects_ten_in_its_order():
    assert [label for label, _ in KEYWORD_PATTERNS] == SEED_LABELS
    assert dict(KEYWORD_PATTERNS)["healthcare"] == "(doctor|physician|surgeon|nurse|healthcare)"


@pytest.mark.parametrize(
    "text, label",
    [
        # the examples issue 9 pins
        ("A graduate student in physics", "student"),
        ("A mother of three who runs a bakery", "parent"),
        ("A doctor who is also a teacher", "educator"),  # pattern order, not text order
        ("A surgeon", "healthcare"),
        ("A software developer and part-time poet", "tech"),
        ("An urban gardener", "other"),
        # one per label, case folded by lower-casing
        ("A university PROFESSOR of history.", "educator"),
        ("A pediatric Nurse in a busy ward.", "healthcare"),
        ("A game programmer.", "tech"),
        ("A jazz musician.", "creative"),
        ("A freelance journalist.", "writer"),
        ("A data analyst at a bank.", "scientist"),
        ("A startup entrepreneur.", "business"),
        ("An immigration attorney.", "legal"),
        ("A lifelong learner.", "student"),
        ("A caregiver for her grandmother.", "parent"),
        # substring match, no word boundaries: the seed's quirks are kept
        ("A transparent window cleaner.", "parent"),
        ("A video encoder hobbyist.", "tech"),
        ("A business analyst.", "scientist"),
        # patterns the seed project did not have
        ("A pastry chef.", "other"),
        ("A fitness coach.", "other"),
        ("A marine biologist.", "other"),
    ],
)
def test_keywords_labels_match_the_seed_projects_patterns(text, label):
    assert keyword_label(text) == label


def test_keywords_labels_from_a_local_persona_subset(tmp_path):
    path = write_jsonl(tmp_path / "persona.jsonl", [{TEXT_COLUMN: p} for p in PERSONAS * 3])
    corpus = load_corpus(DataConfig(source="personahub", path=path, labels="keywords"))
    assert corpus.label_names == ["educator", "healthcare", "legal", "other", "tech"]
    assert corpus.texts == PERSONAS * 3
    assert [corpus.label_names[y] for y in corpus.labels[:5]] == PERSONA_LABELS


@pytest.mark.parametrize("seed", [0, 7])
def test_a_local_persona_copy_gives_its_first_size_rows_like_the_seed(tmp_path, seed):
    rows = [f"{p} ({i})" for i, p in enumerate(PERSONAS * 6)]
    path = write_jsonl(tmp_path / "persona.jsonl", [{TEXT_COLUMN: t} for t in rows])
    cfg = DataConfig(source="personahub", path=path, labels="keywords", size=15, seed=seed)
    corpus = load_corpus(cfg)
    assert corpus.texts == rows[:15]  # file order, not a seeded sample
    assert [corpus.label_names[y] for y in corpus.labels] == PERSONA_LABELS * 3


def test_elite_domain_takes_the_first_size_rows_that_have_a_domain(tmp_path):
    domains = ["Medicine", "Education", "Computer Science", "Law", "None"]
    rows = [
        {TEXT_COLUMN: f"{p} ({i})", GENERAL_DOMAIN_COLUMN: d}
        for i, (p, d) in enumerate(zip(PERSONAS * 5, domains * 5))
    ]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    corpus = load_corpus(DataConfig(source="personahub", path=path, labels="elite_domain", size=12))
    labelled = [r[TEXT_COLUMN] for r in rows if r[GENERAL_DOMAIN_COLUMN] != "None"]
    assert corpus.texts == labelled[:12]


def _fake_hub(monkeypatch, rows):
    """PersonaHub's stream, served from memory: what `_download` sees, without the network."""
    import datasets

    def load_dataset(*args, **kwargs):
        assert kwargs.get("streaming") is True
        return datasets.Dataset.from_list(rows).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_the_hub_persona_subset_gives_its_first_size_rows(monkeypatch):
    rows = [{TEXT_COLUMN: f"{p} ({i})"} for i, p in enumerate(PERSONAS * 6)]
    _fake_hub(monkeypatch, rows)
    corpus = load_corpus(DataConfig(source="personahub", labels="keywords", size=15))
    assert corpus.texts == [r[TEXT_COLUMN] for r in rows[:15]]


def test_the_hub_elite_subset_streams_until_size_rows_have_a_domain(monkeypatch):
    domains = ["Medicine", "None", "Law", "None", "Education"]
    rows = [
        {TEXT_COLUMN: f"persona {i}", GENERAL_DOMAIN_COLUMN: d}
        for i, d in enumerate(domains * 6)
    ]
    _fake_hub(monkeypatch, rows)
    corpus = load_corpus(DataConfig(source="personahub", labels="elite_domain", size=9))
    labelled = [r[TEXT_COLUMN] for r in rows if r[GENERAL_DOMAIN_COLUMN] != "None"]
    assert corpus.texts == labelled[:9]
    assert corpus.label_names == ["Education", "Law", "Medicine"]


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
    assert corpus.texts == (PERSONAS * 12)[:50] and "other" in corpus.label_names


def test_column_labels_without_a_local_file_are_rejected_before_any_download():
    with pytest.raises(DataError, match="data.labels=column.*keywords or elite_domain"):
        load_corpus(DataConfig(source="personahub", labels="column"))


def test_a_rare_keyword_class_is_rejected_with_a_fix(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{TEXT_COLUMN: p} for p in PERSONAS * 3 + ["A jazz musician."]]
    )
    with pytest.raises(DataError, match=r"class 'creative' has 1 example\(s\)"):
        load_corpus(DataConfig(source="personahub", path=path, labels="keywords"))
