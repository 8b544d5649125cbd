"""Local JSONL / CSV / Parquet files, read through `datasets`, into a Corpus.

Every failure is one line naming the file, the column and the config key that fixes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpn.data.corpus import Corpus, check_texts
from hpn.errors import DataError

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


def check_labels(values: Sequence[object], label_column: str) -> None:
    for row, value in enumerate(values):
        if (
            value is None
            or (isinstance(value, float) and np.isnan(value))
            or not str(value).strip()
        ):
            raise DataError(
                f"column {label_column!r}, row {row}: missing label; drop the row or fill it in"
            )


def corpus_from_labels(texts: Sequence[str], raw_labels: Sequence[object]) -> Corpus:
    """Label values become sorted unique string names -> ids."""
    names = [str(v) for v in raw_labels]
    label_names = sorted(set(names))
    ids = {name: i for i, name in enumerate(label_names)}
    labels = np.array([ids[name] for name in names], dtype=np.int64)
    return Corpus(texts=list(texts), labels=labels, label_names=label_names)


def corpus_from_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    size: int = 0,
    seed: int = 0,
) -> Corpus:
    """A Corpus from a local file with a text column and a label column."""
    table = read_table(path)
    text_column = resolve_text_column(table.column_names, text_column, path)
    require_column(table.column_names, label_column, "data.label_column", path)
    texts, labels = column(table, text_column), column(table, label_column)
    check_texts(texts, text_column)  # on every row, so the row numbers are the file's
    check_labels(labels, label_column)
    rows = sample_rows(len(texts), size, seed)
    return corpus_from_labels([texts[i] for i in rows], [labels[i] for i in rows])
