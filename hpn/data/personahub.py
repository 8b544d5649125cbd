"""PersonaHub (proj-persona/PersonaHub) and the label sources the seed project used.

The `persona` subset holds text only, so its labels come from the seed project's ten
profession patterns (`keywords`); the `elite_persona` subset has a general-domain field
(`elite_domain`). With `data.path` set, a local copy in PersonaHub's schema is read instead
of the hub, which is also how the tests run (nothing is downloaded here).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from hpn.data.corpus import Corpus, check_texts
from hpn.data.files import (
    check_labels,
    column,
    corpus_from_label_sets,
    corpus_from_labels,
    label_sets_of,
    one_line,
    read_table,
    require_column,
    resolve_text_column,
    targets_of,
)
from hpn.errors import DataError
from hpn.tasks import CLASSIFICATION, task_spec

if TYPE_CHECKING:
    from hpn.config import DataConfig

DATASET_ID = "proj-persona/PersonaHub"
PERSONA_SUBSET = "persona"  # columns: persona
ELITE_SUBSET = "elite_persona"  # columns: persona, general/specific domain (top 1 / 0.1 percent)
TEXT_COLUMN = "persona"
GENERAL_DOMAIN_COLUMN = "general domain (top 1 percent)"
SPECIFIC_DOMAIN_COLUMN = "specific domain (top 1 percent)"
SUBSETS = {"keywords": PERSONA_SUBSET, "elite_domain": ELITE_SUBSET}

#: The seed project's patterns, in its order, exactly as it wrote them (issue 9): searched
#: with `re.search` in the lower-cased text (substring match, no word boundaries, so "coder"
#: also matches "encoder"); the first that matches gives the label, none gives "other"
#: (for model.task=multilabel, every pattern that matches gives one).
KEYWORD_PATTERNS: tuple[tuple[str, str], ...] = (
    ("educator", r"(professor|teacher|educator|instructor)"),
    ("healthcare", r"(doctor|physician|surgeon|nurse|healthcare)"),
    ("tech", r"(engineer|developer|programmer|coder)"),
    ("creative", r"(artist|painter|musician|composer|creative)"),
    ("writer", r"(writer|author|poet|journalist)"),
    ("scientist", r"(scientist|researcher|analyst)"),
    ("business", r"(business|entrepreneur|executive|manager)"),
    ("legal", r"(lawyer|attorney|legal)"),
    ("student", r"(student|learner|scholar)"),
    ("parent", r"(parent|mother|father|caregiver)"),
)
OTHER_LABEL = "other"
T = TypeVar("T")
_COMPILED = [(label, re.compile(pattern)) for label, pattern in KEYWORD_PATTERNS]


def keyword_label(text: str) -> str:
    """The seed project's label: it lower-cased the text (rather than re.IGNORECASE), then took
    the first pattern that matches."""
    lowered = text.lower()
    for label, pattern in _COMPILED:
        if pattern.search(lowered):
            return label
    return OTHER_LABEL


def keyword_labels(text: str) -> list[str]:
    """Multi-label: every pattern that matches, in pattern order ("other" only when none does),
    so "A doctor who is also a teacher" is both educator and healthcare."""
    lowered = text.lower()
    labels = [label for label, pattern in _COMPILED if pattern.search(lowered)]
    return labels or [OTHER_LABEL]


def _is_domain(value: object) -> bool:
    # elite_persona writes a missing domain as the string "None"
    return isinstance(value, str) and value.strip() not in ("", "None", "none")


def _has_domain(row: dict) -> bool:
    return _is_domain(row.get(GENERAL_DOMAIN_COLUMN))


def _first(values: Sequence[T], size: int) -> list[T]:
    """The first `size` values (0 = all): the seed project takes the first personas, in order."""
    return list(values if size <= 0 else values[:size])


def _download(
    subset: str, size: int, keep: Callable[[dict], bool] | None = None
) -> dict[str, list]:
    """The first `size` rows of a subset (those `keep` accepts), streamed: elite_persona alone
    holds ~370M rows, so it is never read whole."""
    import datasets

    if size <= 0:
        raise DataError(f"data.size: set a cap (e.g. 20000) to read PersonaHub's {subset!r} subset")
    try:
        stream = datasets.load_dataset(DATASET_ID, subset, split="train", streaming=True)
        if keep is not None:
            stream = stream.filter(keep)
        rows = list(stream.take(size))
    except Exception as exc:  # noqa: BLE001 (no network, hub or auth errors: one fix for all)
        raise DataError(
            f"PersonaHub ({DATASET_ID}, subset {subset!r}) could not be downloaded "
            f"({one_line(exc)}); "
            "set data.path to a local JSONL/Parquet copy or use data.source=synthetic"
        ) from None
    if not rows:
        raise DataError(f"PersonaHub ({DATASET_ID}, subset {subset!r}) returned no rows")
    return {name: [row.get(name) for row in rows] for name in rows[0]}


def load_personahub(cfg: DataConfig, task: str = CLASSIFICATION) -> Corpus:
    """PersonaHub from the hub, or any local file (`data.path`), with derived labels.

    Like the seed project, it keeps the first `data.size` rows in file order (the first that
    carry a label, for elite_domain), not a random sample. For `task`: multilabel reads label
    sets (all keyword matches; a list or delimited label cell); regression and joint read
    `data.target_column`, which only a local file can have.
    """
    spec = task_spec(task)
    if cfg.path:
        table = read_table(cfg.path)
        where, names = cfg.path, table.column_names
        get = lambda name: column(table, name)
    elif cfg.labels in SUBSETS:
        where = f"{DATASET_ID} ({SUBSETS[cfg.labels]})"
        keep = _has_domain if cfg.labels == "elite_domain" else None
        data = _download(SUBSETS[cfg.labels], cfg.size, keep)
        names, get = list(data), data.__getitem__
    else:
        raise DataError(
            f"data.labels={cfg.labels}: PersonaHub's persona subset has no label column; "
            "use data.labels=keywords or elite_domain, or set data.path to a labelled local file"
        )

    text_column = resolve_text_column(names, cfg.text_column, where)
    texts = get(text_column)
    check_texts(texts, text_column)
    if spec.uses_target:
        require_column(names, cfg.target_column, "data.target_column", where)
    rows = list(range(len(texts)))
    raw: Sequence[object] = []
    label_column = GENERAL_DOMAIN_COLUMN if cfg.labels == "elite_domain" else cfg.label_column
    if cfg.labels != "keywords":
        require_column(names, label_column, "data.label_column", where)
        raw = get(label_column)
        if cfg.labels == "elite_domain":  # personas without a domain carry no label: drop them
            rows = [i for i, value in enumerate(raw) if _is_domain(value)]
    rows = _first(rows, cfg.size)
    texts = [texts[i] for i in rows]
    targets = None
    if spec.uses_target:  # checked on the rows kept, named by their row in the file
        values = get(cfg.target_column)
        targets = targets_of([values[i] for i in rows], cfg.target_column, rows)
    if not (spec.uses_labels or spec.multilabel):  # regression: labels would only be checked
        return Corpus(texts, None, [], targets=targets)
    if cfg.labels == "keywords":
        if spec.multilabel:
            return corpus_from_label_sets(texts, [keyword_labels(t) for t in texts], targets)
        return corpus_from_labels(texts, [keyword_label(t) for t in texts], targets)
    raw = [raw[i] for i in rows]
    if spec.multilabel:
        return corpus_from_label_sets(
            texts, label_sets_of(raw, label_column, cfg.label_separator), targets
        )
    check_labels(raw, label_column)
    return corpus_from_labels(texts, raw, targets)
