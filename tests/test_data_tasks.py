"""Data for every task (issue 12): targets, label sets, task views, their errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from hpn.config import DataConfig, load_config
from hpn.data import (
    Corpus,
    corpus_summary,
    format_summary,
    keyword_label,
    keyword_labels,
    load_corpus,
    synthetic_corpus,
    write_labels_jsonl,
)
from hpn.errors import ConfigError, DataError

#: synthetic_corpus(600, seed=0).fingerprint() as computed before tasks existed (HEAD of
#: issue 12): the classification view must keep it, so stored studies stay comparable.
SYNTHETIC_600_FINGERPRINT = "5b5d5333ceda5b1f1377482906b97bbff14a76a6851ee2a8629e812fb038324d"
#: synthetic_corpus(3000, seed=0), the default data.size, likewise.
SYNTHETIC_3000_FINGERPRINT = "b788cbcff77e56c52391911175ef96f5b41d285cb0c96552394451163631da13"

JOBS = ["nurse", "farmer", "lawyer"]


def write(path, rows):
    """rows as a JSONL, CSV or Parquet file (by the path's extension)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return str(path)


def regression_rows(n=12):
    return [{"text": f"A {JOBS[i % 3]} aged {20 + 3 * i}.", "label": JOBS[i % 3],
             "target": 20.0 + 3 * i} for i in range(n)]


def file_cfg(path, **kw) -> DataConfig:
    return DataConfig(source="file", path=path, **kw)


# -- Corpus and its task views ------------------------------------------------------------

def test_for_task_names_the_missing_field():
    labelled = Corpus([f"t{i}" for i in range(6)], np.array([0, 1] * 3), ["a", "b"])
    with pytest.raises(DataError, match=r"targets: .*model\.task=regression.*data\.target_column"):
        labelled.for_task("regression")
    with pytest.raises(DataError, match=r"targets: .*model\.task=joint.*data\.target_column"):
        labelled.for_task("joint")
    with pytest.raises(DataError, match=r"label_sets: .*model\.task=multilabel.*data\.label_column"):
        labelled.for_task("multilabel")
    target_only = Corpus([f"t{i}" for i in range(6)], None, [], targets=np.arange(6.0))
    with pytest.raises(DataError, match=r"labels: .*model\.task=classification.*data\.label_column"):
        target_only.for_task("classification")
    with pytest.raises(DataError, match=r"labels: .*model\.task=joint.*data\.label_column"):
        target_only.for_task("joint")
    with pytest.raises(ConfigError, match=r"model\.task: unknown value 'ranking'"):
        labelled.for_task("ranking")


def test_each_view_keeps_only_what_its_task_uses():
    corpus = synthetic_corpus(300, seed=0, target=True)
    cls, reg = corpus.for_task("classification"), corpus.for_task("regression")
    ml, joint = corpus.for_task("multilabel"), corpus.for_task("joint")
    assert cls.targets is None and cls.label_sets is None and cls.num_classes == 14
    assert reg.labels is None and reg.label_sets is None and reg.num_classes == 0
    assert reg.label_names == [] and np.array_equal(reg.targets, corpus.targets)
    assert ml.targets is None and ml.label_sets.shape == (300, 14)
    assert joint.label_sets is None and joint.targets is not None and joint.labels is not None
    assert len({v.fingerprint() for v in (cls, reg, ml, joint, corpus)}) == 5


def test_a_constant_target_is_rejected():
    with pytest.raises(DataError, match=r"targets: every row has the same target \(3\)"):
        Corpus([f"t{i}" for i in range(6)], None, [], targets=np.full(6, 3.0))


def test_a_non_finite_target_is_rejected_naming_the_row():
    targets = np.arange(6.0)
    targets[4] = np.nan
    with pytest.raises(DataError, match=r"targets: row 4 .*not a finite number"):
        Corpus([f"t{i}" for i in range(6)], None, [], targets=targets)


def test_a_label_set_without_labels_is_rejected_naming_the_row():
    sets = np.array([[1, 0], [0, 1], [0, 0], [1, 1]], dtype=bool)
    with pytest.raises(DataError, match=r"label_sets: row 2 has no label"):
        Corpus(["a", "b", "c", "d"], None, ["x", "y"], label_sets=sets)


def test_label_sets_give_main_labels_and_allow_rare_ones():
    sets = np.array([[1, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=bool)
    corpus = Corpus(["a", "b", "c", "d"], None, ["x", "y", "z"], label_sets=sets)
    assert corpus.labels.tolist() == [0, 1, 1, 0]  # the first label of each set
    assert corpus.label_set_counts().tolist() == [2, 2, 2]
    with pytest.raises(DataError, match=r"row 0's main label 'y' is not in its label set"):
        Corpus(["a", "b", "c", "d"], np.array([1, 1, 1, 0]), ["x", "y", "z"], label_sets=sets)


def test_split_without_labels_is_stratified_by_target_deciles():
    rng = np.random.default_rng(0)
    targets = rng.lognormal(3.0, 1.0, size=400)  # skewed: a random split would miss the tail
    corpus = Corpus([f"persona {i}" for i in range(400)], None, [], targets=targets)
    split = corpus.split(0.15, 0.15, seed=0)
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(range(400))
    edges = np.quantile(targets, np.linspace(0, 1, 11))
    for part, expected in ((split.test, 6), (split.val, 6)):
        per_decile = np.histogram(targets[part], bins=edges)[0]
        assert per_decile.tolist() == [expected] * 10  # round(40 * 0.15) from each decile
    again = corpus.split(0.15, 0.15, seed=0)
    assert np.array_equal(split.test, again.test)
    assert not np.array_equal(split.test, corpus.split(0.15, 0.15, seed=1).test)


def test_split_with_tied_targets_still_fills_every_part():
    corpus = Corpus([f"p{i}" for i in range(40)], None, [], targets=np.repeat([1.0, 2.0], 20))
    split = corpus.split(0.15, 0.15, seed=0)
    assert min(len(split.train), len(split.val), len(split.test)) >= 4
    assert set(corpus.targets[split.test].tolist()) == {1.0, 2.0}


# -- synthetic corpus ---------------------------------------------------------------------

def test_synthetic_classification_view_keeps_its_fingerprint_from_before_tasks():
    assert (synthetic_corpus(600, seed=0).for_task("classification").fingerprint()
            == SYNTHETIC_600_FINGERPRINT)
    assert load_corpus(DataConfig(size=600)).fingerprint() == SYNTHETIC_600_FINGERPRINT
    assert load_corpus(DataConfig()).fingerprint() == SYNTHETIC_3000_FINGERPRINT


def test_synthetic_label_sets_add_the_borrowed_domain_of_mixed_personas():
    corpus = synthetic_corpus(2000, seed=0, noise=0.0)
    sets = corpus.label_sets
    assert sets[np.arange(len(corpus)), corpus.labels].all()  # the main label is always in
    counts = sets.sum(axis=1)
    assert set(counts.tolist()) == {1, 2}
    assert 0.05 < np.mean(counts == 2) < 0.15  # ~15% mix; some templates skip the borrowed slots
    words = {name: {w for slot in parts for w in slot} for name, parts in
             __import__("hpn.data.synthetic", fromlist=["DOMAINS"]).DOMAINS.items()}
    for i in np.flatnonzero(counts == 2)[:50]:  # the second label's words are in the text
        other = [corpus.label_names[c] for c in np.flatnonzero(sets[i]) if c != corpus.labels[i]]
        assert any(w in corpus.texts[i] for w in words[other[0]])


def test_synthetic_target_varies_and_the_texts_say_the_age():
    plain = synthetic_corpus(600, seed=0)
    aged = synthetic_corpus(600, seed=0, target=True)
    assert np.array_equal(plain.labels, aged.labels)  # the age has its own random stream
    assert np.array_equal(plain.label_sets, aged.label_sets)
    ages = aged.targets
    assert ages.dtype == np.float64 and 19 <= ages.min() and ages.max() <= 85
    assert ages.std() > 10 and len(set(ages.tolist())) > 40
    assert all(a != p for a, p in zip(aged.texts, plain.texts))  # every text carries its age
    with_number = [str(int(y)) in t for t, y in zip(aged.texts, ages)]
    assert 0.3 < np.mean(with_number) < 0.8  # digits in some; a decade or life stage in others
    decade = re.compile(r"\b(early|mid|late) (teens|twenties|thirties|forties|fifties|sixties|"
                        r"seventies|eighties)\b")
    assert 0.2 < np.mean([bool(decade.search(t)) for t in aged.texts])
    assert any("retire" in t for t, y in zip(aged.texts, ages) if y >= 60)
    assert all(t[0].isupper() and t.endswith(".") and "  " not in t for t in aged.texts)
    assert np.array_equal(ages, synthetic_corpus(600, seed=0, target=True).targets)


def test_the_loader_gives_the_synthetic_corpus_a_target_only_when_the_task_needs_one():
    assert load_corpus(DataConfig(size=300), "regression").targets is not None
    assert load_corpus(DataConfig(size=300), "joint").targets is not None
    assert load_corpus(DataConfig(size=300), "multilabel").label_sets is not None
    # classification / multilabel texts are those of before (no age sentence)
    assert load_corpus(DataConfig(size=300), "multilabel").texts == synthetic_corpus(300).texts


# -- files --------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_a_regression_file_needs_no_label_column(tmp_path, ext):
    rows = [{k: v for k, v in r.items() if k != "label"} for r in regression_rows()]
    corpus = load_corpus(file_cfg(write(tmp_path / f"d{ext}", rows)), "regression")
    assert corpus.labels is None and corpus.num_classes == 0
    assert corpus.targets.tolist() == [r["target"] for r in rows]


def test_a_joint_file_reads_labels_and_target(tmp_path):
    path = write(tmp_path / "d.jsonl", regression_rows())
    corpus = load_corpus(file_cfg(path), "joint")
    assert corpus.label_names == ["farmer", "lawyer", "nurse"] and corpus.targets is not None


def test_a_missing_target_column_names_the_key(tmp_path):
    path = write(tmp_path / "d.jsonl", regression_rows())
    with pytest.raises(DataError, match=r"no column 'age'.*data\.target_column"):
        load_corpus(file_cfg(path, target_column="age"), "regression")


@pytest.mark.parametrize("ext", [".jsonl", ".csv"])
@pytest.mark.parametrize("bad, what", [(None, "missing target"), ("", "missing target"),
                                       ("old", "target 'old' is not a number")])
def test_a_bad_target_cell_names_the_column_and_row(tmp_path, ext, bad, what):
    rows = regression_rows()
    rows[7]["target"] = bad
    if ext == ".csv":
        rows = [{**r, "target": "" if r["target"] is None else r["target"]} for r in rows]
    with pytest.raises(DataError, match=rf"column 'target', row 7: {what}") as info:
        load_corpus(file_cfg(write(tmp_path / f"d{ext}", rows)), "regression")
    assert "\n" not in str(info.value)


def test_a_constant_target_column_is_rejected_naming_the_column(tmp_path):
    rows = [{**r, "target": 5} for r in regression_rows()]
    with pytest.raises(DataError, match=r"column 'target': every row has the same target \(5\)"):
        load_corpus(file_cfg(write(tmp_path / "d.jsonl", rows)), "regression")


def test_numeric_text_targets_are_read_as_numbers(tmp_path):
    rows = [{**r, "target": f" {r['target']} "} for r in regression_rows()]
    corpus = load_corpus(file_cfg(write(tmp_path / "d.jsonl", rows)), "regression")
    assert corpus.targets[:2].tolist() == [20.0, 23.0]


ML_SETS = [["nurse", "parent"], ["farmer"], ["lawyer", "writer"], ["nurse"],
           ["farmer", "parent"], ["lawyer"]] * 2


@pytest.mark.parametrize("ext, cell", [
    (".jsonl", lambda s: s),  # a JSON array
    (".parquet", lambda s: s),  # a Parquet list
    (".jsonl", lambda s: " | ".join(s)),  # delimited text, spaces stripped
    (".csv", lambda s: "|".join(s)),
])
def test_multilabel_cells_as_lists_or_delimited_text(tmp_path, ext, cell):
    rows = [{"text": f"persona {i}", "label": cell(s)} for i, s in enumerate(ML_SETS)]
    corpus = load_corpus(file_cfg(write(tmp_path / f"d{ext}", rows)), "multilabel")
    assert corpus.label_names == ["farmer", "lawyer", "nurse", "parent", "writer"]  # sorted union
    got = [[corpus.label_names[c] for c in np.flatnonzero(row)] for row in corpus.label_sets]
    assert got == [sorted(s) for s in ML_SETS]
    assert [corpus.label_names[c] for c in corpus.labels] == [s[0] for s in ML_SETS]


def test_another_label_separator_and_empty_parts(tmp_path):
    rows = [{"text": f"persona {i}", "label": ";".join(s) + ";;"} for i, s in enumerate(ML_SETS)]
    corpus = load_corpus(file_cfg(write(tmp_path / "d.csv", rows), label_separator=";"),
                         "multilabel")
    assert corpus.label_sets.sum() == sum(len(s) for s in ML_SETS)


@pytest.mark.parametrize("ext, empty", [(".jsonl", []), (".jsonl", " | "), (".jsonl", None),
                                        (".csv", "")])
def test_a_multilabel_row_with_no_label_names_the_row_and_column(tmp_path, ext, empty):
    rows = [{"text": f"persona {i}", "label": s} for i, s in enumerate(ML_SETS)]
    rows[4]["label"] = empty
    with pytest.raises(DataError, match=r"column 'label', row 4: no label.*data\.label_separator"):
        load_corpus(file_cfg(write(tmp_path / f"d{ext}", rows)), "multilabel")


def test_a_list_label_in_a_classification_file_points_at_multilabel(tmp_path):
    rows = [{"text": f"persona {i}", "label": s} for i, s in enumerate(ML_SETS)]
    with pytest.raises(DataError, match=r"row 0: holds a list of labels.*model\.task=multilabel"):
        load_corpus(file_cfg(write(tmp_path / "d.jsonl", rows)))


def test_a_jsonl_mixing_lists_and_text_labels(tmp_path):
    rows = [{"text": f"persona {i}", "label": s if i % 2 else "|".join(s)}
            for i, s in enumerate(ML_SETS)]
    corpus = load_corpus(file_cfg(write(tmp_path / "d.jsonl", rows)), "multilabel")
    assert corpus.label_sets.sum() == sum(len(s) for s in ML_SETS)


# -- PersonaHub keywords ------------------------------------------------------------------

def test_keywords_for_multilabel_are_every_pattern_that_matches():
    text = "A doctor who is also a teacher and a mother of two"
    assert keyword_labels(text) == ["educator", "healthcare", "parent"]  # pattern order
    assert keyword_label(text) == "educator"  # classification: the first, unchanged
    assert keyword_labels("An urban gardener") == ["other"]
    assert keyword_labels("A software developer and part-time poet") == ["tech", "writer"]


def test_keyword_label_sets_from_a_local_persona_file(tmp_path):
    personas = ["A nurse and mother.", "A teacher.", "A gardener.", "A poet and painter."] * 3
    path = write(tmp_path / "p.jsonl", [{"persona": p} for p in personas])
    corpus = load_corpus(DataConfig(source="personahub", path=path, labels="keywords"),
                         "multilabel")
    assert corpus.label_names == ["creative", "educator", "healthcare", "other", "parent",
                                  "writer"]
    first = [corpus.label_names[c] for c in np.flatnonzero(corpus.label_sets[0])]
    assert first == ["healthcare", "parent"]
    classification = load_corpus(DataConfig(source="personahub", path=path, labels="keywords"))
    assert classification.label_sets is None
    assert [classification.label_names[c] for c in classification.labels[:4]] == [
        "healthcare", "educator", "other", "creative"]


def test_keywords_with_a_target_column_for_regression(tmp_path):
    rows = [{"persona": f"A nurse number {i}.", "years": i} for i in range(10)]
    cfg = DataConfig(source="personahub", path=write(tmp_path / "p.jsonl", rows),
                     labels="keywords", target_column="years")
    assert load_corpus(cfg, "regression").targets.tolist() == list(map(float, range(10)))
    with pytest.raises(DataError, match=r"no column 'target'.*data\.target_column"):
        load_corpus(DataConfig(source="personahub", path=cfg.path, labels="keywords"),
                    "regression")


# -- summary and export ---------------------------------------------------------------------

def test_summary_shows_target_stats_and_label_cardinality():
    cfg = DataConfig(size=300)
    reg = corpus_summary(load_corpus(cfg, "regression"), cfg)
    assert reg["num_classes"] == 0 and reg["label_counts"] == {}
    assert reg["target"]["column"] == "age" and reg["target"]["min"] < reg["target"]["mean"]
    reg_lines = format_summary(reg)
    assert any(line.startswith("target       age: min") for line in reg_lines)
    # a regression corpus has no classes: no "classes 0" or label-source line to puzzle over
    assert not any(line.startswith(("classes", "labels")) for line in reg_lines)
    ml = corpus_summary(load_corpus(cfg, "multilabel"), cfg)
    assert 1.0 < ml["label_cardinality"] < 1.3
    assert sum(ml["label_counts"].values()) > 300  # a text counts once per label
    assert any(line.startswith("cardinality") for line in format_summary(ml))
    json.dumps([reg, ml])
    assert "target" not in corpus_summary(load_corpus(cfg), cfg)


@pytest.mark.parametrize("task", ["regression", "joint", "multilabel"])
def test_exported_jsonl_reads_back_as_the_same_corpus(tmp_path, task):
    corpus = load_corpus(DataConfig(size=200), task)
    out = tmp_path / "labels.jsonl"
    write_labels_jsonl(corpus, out)
    row = json.loads(out.read_text().splitlines()[0])
    assert ("target" in row) == (corpus.targets is not None)
    assert isinstance(row.get("label"), list) == (task == "multilabel")
    back = load_corpus(DataConfig(source="file", path=str(out)), task)
    assert back.texts == corpus.texts
    if corpus.targets is not None:
        assert np.array_equal(back.targets, corpus.targets)
    if corpus.labels is not None:  # names come back sorted: compare by name
        assert [back.label_names[c] for c in back.labels] == [
            corpus.label_names[c] for c in corpus.labels]
    if corpus.label_sets is not None:
        by_name = lambda c: [{c.label_names[j] for j in np.flatnonzero(r)} for r in c.label_sets]
        assert by_name(back) == by_name(corpus)


# -- config -------------------------------------------------------------------------------

def test_task_config_keys_and_their_checks():
    cfg = load_config(None, ["model.task=multilabel", "model.loss=binary_cross_entropy",
                             "model.decision=top_k", "train.regression_weight=0.5",
                             "data.label_separator=;", "data.target_column=age"])
    assert (cfg.model.task, cfg.model.decision, cfg.train.regression_weight) == (
        "multilabel", "top_k", 0.5)
    with pytest.raises(ConfigError, match=r"model\.task: unknown value 'ranking'; choose one of "
                                          r"classification, regression, multilabel, joint"):
        load_config(None, ["model.task=ranking"])
    with pytest.raises(ConfigError, match=r"model\.decision: unknown value"):
        load_config(None, ["model.decision=best"])
    with pytest.raises(ConfigError, match=r"train\.regression_weight: must be >= 0"):
        load_config(None, ["train.regression_weight=-1"])
    with pytest.raises(ConfigError, match=r"model\.loss=binary_cross_entropy: model\.task=classification cannot train with it"):
        load_config(None, ["model.loss=binary_cross_entropy"])
    with pytest.raises(ConfigError, match=r"data\.label_separator: must not be empty"):
        load_config(None, ["data.label_separator="])


def test_the_synthetic_target_is_learnable_from_the_words_alone():
    """A cheap stand-in for the encoder probe (Ridge on default-encoder embeddings: test MAE
    ~0.51-0.53 of the train-mean baseline's on 3000 texts): a TF-IDF Ridge must beat the
    mean baseline clearly, so the text carries a real, if noisy, age signal."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    corpus = load_corpus(DataConfig(size=3000), "regression")
    split = corpus.split(0.15, 0.15, seed=0)
    words = TfidfVectorizer(ngram_range=(1, 2), min_df=2)
    words.fit([corpus.texts[i] for i in split.train])
    x, y = words.transform(corpus.texts), corpus.targets
    ridge = Ridge(alpha=1.0).fit(x[split.train], y[split.train])
    mae = np.abs(ridge.predict(x[split.test]) - y[split.test]).mean()
    baseline = np.abs(y[split.train].mean() - y[split.test]).mean()
    assert mae < 0.6 * baseline
