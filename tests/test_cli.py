"""The CLI contract: --json last line, exit 2 with one line naming the key or file."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tuning.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_json_prints_the_metrics_as_the_last_line(capsys, cache_dir, tmp_path):
    code, out, _ = run_cli(
        capsys, "train", "--set", "data.size=300", "--set", "train.epochs=2",
        "--set", f"encoder.cache_dir={cache_dir}", "--output", str(tmp_path / "out"), "--json",
    )
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("val_accuracy", "test_accuracy", "test_macro_f1", "separation_min_angle_deg",
                "separation_max_cosine", "runtime_s", "train_samples_per_s", "peak_rss_mb",
                "majority_baseline_accuracy"):
        assert key in result
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["metrics"]["test_accuracy"] == result["test_accuracy"]
    assert (tmp_path / "out" / "config.yaml").is_file()
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_prototypes_json_gives_count_dim_and_separation(capsys):
    code, out, _ = run_cli(capsys, "prototypes", "--count", "12", "--dim", "3", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    assert (result["count"], result["dim"]) == (12, 3)
    assert result["min_angle_deg"] == pytest.approx(63.435, abs=0.5)
    assert result["max_cosine"] == pytest.approx(0.4472, abs=0.01)


def _write(path, text):
    path.write_text(text)
    return str(path)


BAD_SETTINGS = [
    (["--set", "train.lrr=0.1"], "train.lrr"),
    (["--set", "model.prototype_dim=1"], "model.prototype_dim"),
    (["--set", "model.prototypes_per_class=0"], "model.prototypes_per_class"),
    (["--set", "train.lr=0"], "train.lr"),
    (["--set", "train.lr=-1"], "train.lr"),
    (["--set", "train.epochs=0"], "train.epochs"),
    (["--set", "model.prototype_mode=floating"], "model.prototype_mode"),
    (["--set", "model.loss=hinge"], "model.loss"),
    (["--set", "data.source=web"], "data.source"),
    (["--set", "train.epochs=two"], "train.epochs"),
    (["--set", "noequals"], "KEY=VALUE"),
    (["--config", "does-not-exist.yaml"], "does-not-exist.yaml"),
]


@pytest.mark.parametrize("argv,named", BAD_SETTINGS, ids=[n for _, n in BAD_SETTINGS])
def test_bad_settings_exit_2_with_one_line_naming_the_key(capsys, argv, named):
    code, out, err = run_cli(capsys, "train", *argv)
    assert code == 2
    assert named in err
    assert len(err.strip().splitlines()) == 1


def _bad_files(tmp_path):
    many = "".join(f'{{"text": "persona number {i}", "label": "{"a" if i % 2 else "b"}"}}\n' for i in range(20))
    return [
        (["--set", "data.source=file", "--set", f"data.path={tmp_path / 'missing.jsonl'}"], "missing.jsonl"),
        (["--set", "data.source=file", "--set", "data.path=" + _write(tmp_path / "nocol.jsonl", many),
          "--set", "data.label_column=profession"], "profession"),
        (["--set", "data.source=file", "--set", "data.path=" + _write(tmp_path / "nocol2.jsonl", many),
          "--set", "data.text_column=bio"], "bio"),
        (["--set", "data.source=file", "--set", "data.path=" + _write(
            tmp_path / "empty.jsonl", many + '{"text": "", "label": "a"}\n')], "empty.jsonl"),
        (["--set", "data.source=file", "--set", "data.path=" + _write(
            tmp_path / "nontext.jsonl", many + '{"text": null, "label": "a"}\n')], "nontext.jsonl"),
        (["--set", "data.source=file", "--set", "data.path=" + _write(
            tmp_path / "oneclass.jsonl", "".join(f'{{"text": "p {i}", "label": "a"}}\n' for i in range(20)))],
         "2 classes"),
        (["--set", "data.source=file", "--set", "data.path=" + _write(
            tmp_path / "small.jsonl", many + '{"text": "lonely", "label": "c"}\n')], "'c'"),
        (["--set", "data.source=file"], "data.path"),
    ]


def test_bad_data_exits_2_with_one_line_naming_the_file_or_column(capsys, tmp_path):
    for argv, named in _bad_files(tmp_path):
        code, out, err = run_cli(capsys, "train", *argv)
        assert code == 2, (argv, err)
        assert named in err, (named, err)
        assert len(err.strip().splitlines()) == 1, err


def test_the_installed_command_shows_no_traceback_on_bad_input():
    proc = subprocess.run(
        [sys.executable, "-m", "tuning.cli", "train", "--set", "train.lr=0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "hpn-tune train: error: train.lr: must be > 0, got 0.0"


def test_data_json_summarises_the_synthetic_corpus_without_an_encoder(capsys):
    from hpn.config import load_config
    from hpn.data import load_corpus

    code, out, err = run_cli(capsys, "data", "--set", "data.size=300", "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    corpus = load_corpus(load_config(None, ["data.size=300"]).data)
    assert (summary["source"], summary["labels"], summary["size"]) == ("synthetic", "synthetic", 300)
    assert sum(summary["label_counts"].values()) == summary["size"]
    assert summary["num_classes"] == corpus.num_classes
    assert summary["fingerprint"] == corpus.fingerprint()
    assert sum(summary["split"].values()) == 300
    assert f"fingerprint  {corpus.fingerprint()}" in out  # the human summary says it too


def test_data_output_writes_the_corpus_as_text_label_rows(capsys, tmp_path):
    from hpn.config import load_config
    from hpn.data import load_corpus

    out_file = tmp_path / "labels.jsonl"
    code, out, err = run_cli(capsys, "data", "--set", "data.size=200", "--output", str(out_file))
    assert code == 0, err
    assert str(out_file) in out
    corpus = load_corpus(load_config(None, ["data.size=200"]).data)
    rows = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"text": t, "label": corpus.label_names[y]}
                    for t, y in zip(corpus.texts, corpus.labels)]


def test_data_on_a_local_personahub_copy_gives_the_seed_projects_keyword_labels(capsys, tmp_path):
    personas = {
        "A graduate student in physics": "student",
        "A mother of three who runs a bakery": "parent",
        "A doctor who is also a teacher": "educator",
        "A surgeon": "healthcare",
        "A software developer and part-time poet": "tech",
        "An urban gardener": "other",
    }
    texts = [f"{t} ({i})" for i, t in enumerate(list(personas) * 4)]
    path = _write(tmp_path / "persona.jsonl",
                  "".join(json.dumps({"persona": t}) + "\n" for t in texts))
    out_file = tmp_path / "labels.jsonl"
    code, out, err = run_cli(
        capsys, "data", "--set", "data.source=personahub", "--set", f"data.path={path}",
        "--set", "data.labels=keywords", "--set", "data.size=18",
        "--output", str(out_file), "--json",
    )
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["source"], summary["labels"], summary["path"]) == ("personahub", "keywords", path)
    assert summary["label_counts"] == {label: 3 for label in personas.values()}
    rows = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == texts[:18]  # the first data.size, in file order
    assert [r["label"] for r in rows] == list(personas.values()) * 3


@pytest.mark.parametrize("argv,named", [
    (["--set", "data.source=file"], "data.path"),
    (["--set", "data.source=personahub", "--set", "data.path=no-such-persona.jsonl",
      "--set", "data.labels=keywords"], "no-such-persona.jsonl"),
    (["--output", "no-such-folder/labels.jsonl"], "--output"),
    (["--set", "data.labels=profession"], "data.labels"),
], ids=["no-path", "missing-file", "output-folder", "bad-labels"])
def test_data_bad_input_exits_2_with_one_line(capsys, argv, named):
    code, _, err = run_cli(capsys, "data", *argv)
    assert code == 2
    assert named in err and err.startswith("hpn-tune data: error: ")
    assert len(err.strip().splitlines()) == 1
