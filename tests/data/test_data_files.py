"""Local JSONL / CSV / Parquet files through `datasets`."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from hpn.config import DataConfig
from hpn.data import corpus_from_file, load_corpus
from hpn.errors import DataError

ROWS = [
    {"text": f"A {job} who likes topic {i}.", "label": job}
    for i, job in enumerate(["nurse", "farmer", "lawyer"] * 4)
]


def write(path, rows=ROWS):
    frame = pd.DataFrame(rows)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_format_loads_the_same_corpus(tmp_path, ext):
    corpus = load_corpus(DataConfig(source="file", path=str(write(tmp_path / f"d{ext}"))))
    assert corpus.label_names == ["farmer", "lawyer", "nurse"]  # sorted unique names
    assert corpus.texts == [r["text"] for r in ROWS]
    assert [corpus.label_names[y] for y in corpus.labels] == [r["label"] for r in ROWS]


def test_integer_labels_become_string_names(tmp_path):
    rows = [{"body": f"text {i}", "y": i % 2} for i in range(8)]
    corpus = corpus_from_file(write(tmp_path / "d.csv", rows), text_column="body", label_column="y")
    assert corpus.label_names == ["0", "1"] and corpus.labels.tolist() == [0, 1] * 4


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl.*not found"):
        load_corpus(DataConfig(source="file", path=str(tmp_path / "nope.jsonl")))


def test_unknown_extension_is_rejected(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unknown file type '\.txt'.*\.jsonl"):
        load_corpus(DataConfig(source="file", path=str(tmp_path / "d.txt")))


def test_missing_label_column_names_the_column_and_the_key(tmp_path):
    path = write(tmp_path / "d.jsonl")
    with pytest.raises(
        DataError, match=r"no column 'domain'.*text, label.*data\.label_column"
    ) as info:
        load_corpus(DataConfig(source="file", path=str(path), label_column="domain"))
    assert "\n" not in str(info.value)


def test_missing_text_column_names_the_column_and_the_key(tmp_path):
    path = write(tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"no column 'bio'.*data\.text_column"):
        load_corpus(DataConfig(source="file", path=str(path), text_column="bio"))


def test_empty_text_in_a_file_names_the_row_and_column(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[5]["text"] = ""
    with pytest.raises(DataError, match=r"column 'text', row 5: empty text"):
        load_corpus(DataConfig(source="file", path=str(write(tmp_path / "d.jsonl", rows))))


def test_missing_label_in_a_file_names_the_row_and_column(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[7]["label"] = None
    with pytest.raises(DataError, match=r"column 'label', row 7: missing label"):
        load_corpus(DataConfig(source="file", path=str(write(tmp_path / "d.jsonl", rows))))


def test_malformed_file_is_a_one_line_data_error(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": \n not json at all\n')
    with pytest.raises(DataError, match="could not read it as json") as info:
        load_corpus(DataConfig(source="file", path=str(tmp_path / "d.jsonl")))
    assert "\n" not in str(info.value)


def test_size_caps_rows_with_a_seeded_sample(tmp_path):
    rows = [{"text": f"persona {i}", "label": "ab"[i % 2]} for i in range(40)]
    path = str(write(tmp_path / "d.jsonl", rows))
    a = load_corpus(DataConfig(source="file", path=path, size=10, seed=1))
    b = load_corpus(DataConfig(source="file", path=path, size=10, seed=1))
    c = load_corpus(DataConfig(source="file", path=path, size=10, seed=2))
    assert len(a) == 10 and a.texts == b.texts and a.texts != c.texts


def test_file_source_without_a_path_is_rejected():
    with pytest.raises(DataError, match="data.path"):
        load_corpus(DataConfig(source="file"))
