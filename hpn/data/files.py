"""Local JSONL / CSV / Parquet files, read through `datasets`, into a Corpus.

A file carries a text column and, by task, a label column (one name per row, or for
multilabel a list / a delimited string) and a numeric target column. Every failure is one
line naming the file, the column, the row and the config key that fixes it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpn.data.corpus import Corpus, check_texts
from hpn.errors import DataError
from hpn.tasks import CLASSIFICATION, task_spec

if TYPE_CHECKING:
    import datasets

#: File extension -> the `datasets` builder that reads it.
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DEFAULT_TEXT_COLUMN = "text"
PERSONA_TEXT_COLUMN = "persona"  # PersonaHub's name for the text


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def read_table(path: str | Path) -> datasets.Dataset:
    """The file as a `datasets.Dataset`, the builder chosen by its extension."""
    import datasets  # heavy import, only when a file is actually read

    p = Path(path)
    builder = FORMATS.get(p.suffix.lower())
    if builder is None:
        raise DataError(
            f"data.path={str(p)!r}: unknown file type {p.suffix!r}; use one of {', '.join(FORMATS)}"
        )
    if not p.is_file():
        raise DataError(
            f"data.path={str(p)!r}: file not found; point data.path at an existing file"
        )
    datasets.disable_progress_bars()  # a small local file: the bar is noise on stderr
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as exc:  # noqa: BLE001 (datasets raises many types for a bad file)
        raise DataError(
            f"data.path={str(p)!r}: could not read it as {builder} ({one_line(exc)})"
        ) from None


def sample_rows(num_rows: int, size: int, seed: int) -> np.ndarray:
    """Row ids of at most `size` rows (0 = all): the first of a seeded shuffle, in file order."""
    if size <= 0 or size >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).permutation(num_rows)[:size])


def column(table: datasets.Dataset, name: str) -> list:
    return table.data.column(name).to_pylist()  # via arrow: much faster than row by row


def resolve_text_column(columns: Sequence[str], text_column: str, path: str | Path) -> str:
    """`text_column`, falling back from the default "text" to PersonaHub's "persona"."""
    if (
        text_column not in columns
        and text_column == DEFAULT_TEXT_COLUMN
        and PERSONA_TEXT_COLUMN in columns
    ):
        return PERSONA_TEXT_COLUMN
    require_column(columns, text_column, "data.text_column", path)
    return text_column


def require_column(columns: Sequence[str], name: str, key: str, path: str | Path) -> None:
    if name not in columns:
        raise DataError(
            f"{str(path)!r} has no column {name!r}; available columns: "
            f"{', '.join(columns)}; set {key} to one of them"
        )


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _unjson(value: object) -> object:
    """A JSONL column that mixes types (lists and text, numbers and text) reaches us as JSON
    text ('["a", "b"]', '"old"'): decode such a cell back to its value."""
    if isinstance(value, str) and len(value) >= 2 and (value[0], value[-1]) in (
        ("[", "]"), ('"', '"')
    ):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def check_labels(values: Sequence[object], label_column: str) -> None:
    """One label per row (classification): none missing, no list of several."""
    for row, value in enumerate(values):
        if isinstance(value, (list, tuple)):
            raise DataError(
                f"column {label_column!r}, row {row}: holds a list of labels; set "
                "model.task=multilabel, or give one label per row"
            )
        if _missing(value) or not str(value).strip():
            raise DataError(
                f"column {label_column!r}, row {row}: missing label; drop the row or fill it in"
            )


def label_set(value: object, separator: str) -> list[str]:
    """A multilabel cell as label names, in order, once each: a list (JSONL array, Parquet
    list) as is, a text split on `separator`; parts stripped, empty parts dropped."""
    value = _unjson(value)
    if _missing(value):
        return []
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value if not _missing(v)]
    elif isinstance(value, str):
        parts = value.split(separator)
    else:  # a number: one label, named as classification names it
        parts = [str(value)]
    return list(dict.fromkeys(p.strip() for p in parts if p.strip()))


def label_sets_of(
    values: Sequence[object], label_column: str, separator: str
) -> list[list[str]]:
    """Every row's label set; a row with none is a DataError naming row and column."""
    sets = []
    for row, value in enumerate(values):
        names = label_set(value, separator)
        if not names:
            raise DataError(
                f"column {label_column!r}, row {row}: no label; give at least one (a list, or "
                f"names separated by data.label_separator={separator!r}) or drop the row"
            )
        sets.append(names)
    return sets


def targets_of(
    values: Sequence[object], target_column: str, rows: Sequence[int] | None = None
) -> np.ndarray:
    """A numeric target per row as float64 (numbers, or text that reads as one, as CSV gives);
    a missing, empty, non-numeric or non-finite cell, or a constant column, is a DataError
    naming the column (and the row: `rows` gives file row numbers when values are a subset)."""
    out = np.empty(len(values), dtype=np.float64)
    for i, value in enumerate(values):
        row = rows[i] if rows is not None else i
        value = _unjson(value)
        if _missing(value) or (isinstance(value, str) and not value.strip()):
            raise DataError(
                f"column {target_column!r}, row {row}: missing target; fill in a number or "
                "drop the row"
            )
        try:
            if isinstance(value, (bool, list, tuple, dict)):
                raise TypeError
            number = float(value.strip() if isinstance(value, str) else value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise DataError(
                f"column {target_column!r}, row {row}: target {value!r} is not a number; fix "
                "it or drop the row (data.target_column names the numeric column)"
            ) from None
        if not np.isfinite(number):
            raise DataError(
                f"column {target_column!r}, row {row}: target {value!r} is not a finite "
                "number; fix it or drop the row"
            )
        out[i] = number
    if len(out) and out.min() == out.max():
        raise DataError(
            f"column {target_column!r}: every row has the same target ({out[0]:g}); a regression "
            "target must vary, point data.target_column at another column"
        )
    return out


def corpus_from_labels(
    texts: Sequence[str], raw_labels: Sequence[object], targets: np.ndarray | None = None
) -> Corpus:
    """Label values become sorted unique string names -> ids."""
    names = [str(v) for v in raw_labels]
    label_names = sorted(set(names))
    ids = {name: i for i, name in enumerate(label_names)}
    labels = np.array([ids[name] for name in names], dtype=np.int64)
    return Corpus(texts=list(texts), labels=labels, label_names=label_names, targets=targets)


def corpus_from_label_sets(
    texts: Sequence[str], sets: Sequence[Sequence[str]], targets: np.ndarray | None = None
) -> Corpus:
    """Label names: the sorted union; each text's main label is the first of its set."""
    label_names = sorted({name for names in sets for name in names})
    ids = {name: i for i, name in enumerate(label_names)}
    matrix = np.zeros((len(sets), len(label_names)), dtype=np.bool_)
    for row, names in enumerate(sets):
        matrix[row, [ids[name] for name in names]] = True
    labels = np.array([ids[names[0]] for names in sets], dtype=np.int64)
    return Corpus(list(texts), labels, label_names, targets=targets, label_sets=matrix)


def corpus_from_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    size: int = 0,
    seed: int = 0,
    *,
    task: str = CLASSIFICATION,
    target_column: str = "target",
    label_separator: str = "|",
) -> Corpus:
    """A Corpus from a local file: a text column, and what `task` learns: a label column
    (classification, joint; multilabel: label sets) and/or a numeric target (regression, joint).
    Columns a task does not use are not read, so they cannot fail it."""
    spec = task_spec(task)
    table = read_table(path)
    columns = table.column_names
    text_column = resolve_text_column(columns, text_column, path)
    if spec.uses_labels or spec.multilabel:
        require_column(columns, label_column, "data.label_column", path)
    if spec.uses_target:
        require_column(columns, target_column, "data.target_column", path)
    # Each check runs on every row, before sampling, so the row numbers are the file's.
    texts = column(table, text_column)
    check_texts(texts, text_column)
    targets = targets_of(column(table, target_column), target_column) if spec.uses_target else None
    sets: list[list[str]] | None = None
    labels: list | None = None
    if spec.multilabel:
        sets = label_sets_of(column(table, label_column), label_column, label_separator)
    elif spec.uses_labels:
        labels = column(table, label_column)
        check_labels(labels, label_column)
    rows = sample_rows(len(texts), size, seed)
    texts = [texts[i] for i in rows]
    targets = targets[rows] if targets is not None else None
    if sets is not None:
        return corpus_from_label_sets(texts, [sets[i] for i in rows], targets)
    if labels is not None:
        return corpus_from_labels(texts, [labels[i] for i in rows], targets)
    return Corpus(texts, None, [], targets=targets)
