"""The CLI contract: --json last line, exit 2 with one line naming the key or file."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from hpn.config import Config, load_config
from hpn.errors import ConfigError
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
    (["--set", "train.lr=.inf"], "train.lr: must be a finite number"),
    (["--set", "train.lr=.nan"], "train.lr: must be a finite number"),
    (["--set", "data.noise=.nan"], "data.noise: must be a finite number"),
    (["--set", "train.epochs=.inf"], "train.epochs: must be a finite number"),
    (["--set", "train.lr=null"], "train.lr: needs a value"),
    (["--set", "train.lr=true"], "train.lr: expected a number"),
    (["--set", "train.momentum=1"], "train.momentum: must be < 1"),
    (["--set", "train.seed=4294967296"], "train.seed: must be between 0 and 2**32 - 1"),
]


@pytest.mark.parametrize("argv,named", BAD_SETTINGS, ids=[n for _, n in BAD_SETTINGS])
def test_bad_settings_exit_2_with_one_line_naming_the_key(capsys, argv, named):
    code, out, err = run_cli(capsys, "train", *argv)
    assert code == 2
    assert named in err
    assert len(err.strip().splitlines()) == 1


NUMERIC_KEYS = [k for k, v in Config().to_flat().items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)]


@pytest.mark.parametrize("key", NUMERIC_KEYS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_every_numeric_key_refuses_inf_and_nan_by_name(key, value):
    # nan passes every bound (nan <= 0 is False) and inf passed train.lr > 0
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: must be a finite number, got "):
        load_config(None, [f"{key}={value}"])


def test_a_config_file_with_inf_names_the_key(tmp_path):
    path = _write(tmp_path / "c.yaml", "train:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match="^train.lr: must be a finite number"):
        load_config(path)


@pytest.mark.parametrize("value", ["null", "true", "[1]"])
def test_a_numeric_key_refuses_null_bools_and_lists_by_name(value):
    with pytest.raises(ConfigError, match="^train.lr: "):
        load_config(None, [f"train.lr={value}"])


def test_numbers_keep_their_value_an_exponent_without_a_dot_and_a_seed_past_2_53_included():
    cfg = load_config(None, ["train.lr=1e-3", "data.seed=4294967295", "train.epochs=3.0"])
    assert (cfg.train.lr, cfg.data.seed, cfg.train.epochs) == (1e-3, 4294967295, 3)
    assert load_config(None, ["data.path=null"]).data.path is None  # a None default takes null


def _bad_space_run(monkeypatch, capsys, tmp_path):
    """`hpn-tune run` on a space with an infinite bound, from an empty working directory."""
    from tuning import ray_tune

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a space that fails to load")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(ray_tune, "init_ray", no_ray)
    space = _write(tmp_path / "bad.yaml", "train.lr: {type: float, low: 0.01, high: .inf}\n")
    return run_cli(capsys, "run", "--space", space, "--trials", "1")


def test_run_with_a_non_finite_space_bound_exits_2_with_one_line_naming_file_and_key(
        monkeypatch, capsys, tmp_path):
    code, _, err = _bad_space_run(monkeypatch, capsys, tmp_path)
    assert code == 2, err
    line = (f"hpn-tune run: error: search space '{tmp_path / 'bad.yaml'}': "
            "train.lr: high is .inf; bounds must be finite numbers")
    assert err.strip().splitlines() == [line]


def test_run_with_a_bad_space_makes_no_mlflow_store_and_starts_no_ray(
        monkeypatch, capsys, tmp_path):
    code, _, err = _bad_space_run(monkeypatch, capsys, tmp_path)
    assert code == 2, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no mlflow.db, ray_results


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


UNSAFE_NAMES = [("quote", "it's"), ("dot-dot", "../x"), ("slash", "a/b"), ("empty", ""),
                ("too-long", "s" * 101)]


@pytest.mark.parametrize("name", [n for _, n in UNSAFE_NAMES], ids=[i for i, _ in UNSAFE_NAMES])
def test_run_refuses_an_unsafe_study_name_in_one_line_before_any_store_exists(
        monkeypatch, capsys, tmp_path, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = run_cli(capsys, "run", "--name", name, "--trials", "1")
    assert code == 2
    assert err.startswith("hpn-tune run: error: --name: ") and len(err.strip().splitlines()) == 1
    assert "[A-Za-z0-9][A-Za-z0-9._-]{0,99}" in err  # the allowed pattern, named
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, optuna.db or ray_results


def test_a_study_name_of_letters_digits_dots_dashes_and_underscores_is_accepted():
    from tuning.study import StudyOptions, _check

    for name in ("study-20260101-120000", "tpe_v2.1", "7x", "s" * 100):
        _check(StudyOptions(name=name))


def test_main_turns_sigterm_into_a_ctrl_c_and_gives_the_old_handler_back(monkeypatch, capsys):
    import signal

    from tuning import cli

    def killed(args):
        signal.raise_signal(signal.SIGTERM)  # `kill`, `docker stop` while the command runs
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(cli, "cmd_run", killed)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = run_cli(capsys, "run", "--space", "quick")
    assert (code, err) == (130, "hpn-tune run: interrupted\n")
    assert signal.getsignal(signal.SIGTERM) is before  # main() in-process leaves it as it was
