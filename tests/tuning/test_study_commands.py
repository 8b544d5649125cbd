"""`hpn-tune studies | show | compare` read what real studies left in the tracking store."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from hpn import metrics as M
from tuning import tracking
from tuning.cli import main
from tuning.spaces import load_space, resolve_space_path
from tuning.studies import open_store, searched_keys
from tuning.study import StudyOptions, run_study
from tuning.tracking import trials_frame

pytestmark = pytest.mark.usefixtures("ray_runtime")

QUICK_KEYS = load_space(resolve_space_path("quick")).keys()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, cache_dir: str, ray_runtime: str) -> dict:
    """Two small real studies in one SQLite store, run once for the module (~1 min each):
    `alpha` (tpe, 3 trials) then `beta` (random, 2 trials)."""
    root = tmp_path_factory.mktemp("study_commands")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    summaries = {}
    for name, sampler, trials, seed in (("alpha", "tpe", 3, 1), ("beta", "random", 2, 2)):
        summaries[name] = run_study(StudyOptions(
            space="quick", trials=trials, overrides=["data.size=600", f"encoder.cache_dir={cache_dir}"],
            name=name, tracking_uri=uri, storage_path=str(root / "ray"), max_concurrent=2,
            sampler=sampler, scheduler="fifo", seed=seed, register=False))
    return {"uri": uri, "root": root, **summaries}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_studies_lists_each_study_newest_first_with_its_trial_counts_and_best(capsys, store):
    code, out, _ = run_cli(capsys, "studies", "--tracking-uri", store["uri"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["STUDY", "STATE", "DONE"]
    assert [line.split()[:3] for line in lines[1:]] == [["beta", "finished", "2"],
                                                         ["alpha", "finished", "3"]]

    code, out, _ = run_cli(capsys, "studies", "--tracking-uri", store["uri"], "--json")
    rows = last_json(out)["studies"]
    assert [r["study"] for r in rows] == ["beta", "alpha"]
    for row in rows:
        summary = store[row["study"]]
        assert row["state"] == "finished"
        assert row["run_id"] == summary["parent_run_id"]
        assert (row["trials_completed"], row["trials_pruned"], row["trials_errored"]) == (
            summary["trials_completed"], 0, 0)
        assert row["trials_target"] == summary["trials_completed"]
        assert row["best_val_accuracy"] == pytest.approx(summary["best_val_accuracy"])
        assert row["wall_s"] == pytest.approx(summary["wall_s"])
        assert row["started"] and row["sampler"] in ("tpe", "random")


def test_studies_in_an_empty_experiment_says_so_and_exits_0(capsys, store):
    MlflowClient(store["uri"]).create_experiment("empty")
    code, out, _ = run_cli(capsys, "studies", "--tracking-uri", store["uri"], "--experiment", "empty")
    assert (code, out.strip()) == (0, "no studies in experiment empty")


@pytest.mark.parametrize("argv", [["studies"], ["show", "alpha"], ["compare", "alpha", "beta"]])
def test_an_unknown_experiment_exits_2_with_one_line_naming_the_flag(capsys, store, argv):
    code, _, err = run_cli(capsys, *argv, "--tracking-uri", store["uri"], "--experiment", "nope")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "--experiment" in err and "'nope'" in err and "hpn-tune" in err  # known ones listed


def test_a_store_that_does_not_exist_is_refused_not_created(capsys, tmp_path):
    missing = tmp_path / "none.db"
    code, _, err = run_cli(capsys, "studies", "--tracking-uri", f"sqlite:///{missing}")
    assert code == 2 and "--tracking-uri" in err
    assert not missing.exists()


def test_show_lists_the_trials_best_first_with_the_searched_params_report_and_promote(
        capsys, store):
    code, out, _ = run_cli(capsys, "show", "alpha", "--tracking-uri", store["uri"], "--json")
    assert code == 0
    shown = last_json(out)
    assert (shown["study"], shown["state"], shown["sampler"], shown["seed"]) == (
        "alpha", "finished", "tpe", 1)
    assert shown["searched"] == QUICK_KEYS and shown["searched_from"] == "space file"
    trials = shown["trials"]
    assert len(trials) == shown["trials_total"] == 3
    vals = [t["val_accuracy"] for t in trials]
    assert vals == sorted(vals, reverse=True)
    assert {t["run_name"] for t in trials} == {"alpha-t001", "alpha-t002", "alpha-t003"}
    assert all(set(t["params"]) == set(QUICK_KEYS) for t in trials)
    assert all(t["test_accuracy"] is not None and t["runtime_s"] > 0 for t in trials)
    # the best is the one run_study chose on validation, and the report is where it says
    assert shown["best_run_id"] == trials[0]["run_id"] == store["alpha"]["best_run_id"]
    assert shown["report_path"] == "report/"
    report_dir = Path(shown["report_uri"].removeprefix("file://"))
    assert (report_dir / "trials.csv").is_file()
    assert shown["promote_command"].startswith(f"hpn-tune promote --run-id {trials[0]['run_id']}")

    code, out, _ = run_cli(capsys, "show", "alpha", "--tracking-uri", store["uri"])
    assert "RUN ID" in out and "model.prototype_dim" in out
    table = [line for line in out.splitlines() if line.startswith("alpha-t")]
    assert table[0].split()[1] == trials[0]["run_id"]
    assert f"hpn-tune promote --run-id {trials[0]['run_id']}" in out
    assert shown["report_uri"] in out


def test_show_limit_keeps_the_best_trials_and_says_how_many_are_left(capsys, store):
    code, out, _ = run_cli(capsys, "show", "alpha", "--tracking-uri", store["uri"], "--limit", "1")
    assert code == 0 and "(2 more; --limit 0 lists all)" in out
    code, out, _ = run_cli(capsys, "show", "alpha", "--tracking-uri", store["uri"], "--limit", "1",
                           "--json")
    shown = last_json(out)
    assert [t["run_id"] for t in shown["trials"]] == [shown["best_run_id"]]
    assert shown["trials_total"] == 3


def test_searched_keys_come_from_the_logged_space_then_the_varying_params_when_the_file_is_gone(
        store):
    st = open_store(store["uri"], "hpn-tune")
    parent = store["alpha"]["parent_run_id"]
    frame = trials_frame(st.client, st.experiment_id, parent)
    gone = {tracking.SPACE_FILE_TAG: str(store["root"] / "moved.yaml")}
    logged = SimpleNamespace(info=SimpleNamespace(run_id=parent), data=SimpleNamespace(tags=gone))
    assert searched_keys(st, logged, frame) == (QUICK_KEYS, "logged space")
    # a run without the space artifact (a trial's): only the trials can tell
    bare = SimpleNamespace(info=SimpleNamespace(run_id=frame["run_id"][0]),
                           data=SimpleNamespace(tags=gone))
    keys, source = searched_keys(st, bare, frame)
    assert source == "varying params"
    assert "train.lr" in keys and set(keys) <= set(QUICK_KEYS)  # lr is continuous: it varies


@pytest.mark.parametrize("argv", [["show", "gamma"], ["compare", "alpha", "gamma"]])
def test_an_unknown_study_exits_2_naming_it_and_listing_the_known_ones(capsys, store, argv):
    code, _, err = run_cli(capsys, *argv, "--tracking-uri", store["uri"])
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "'gamma'" in err and "known studies: beta, alpha" in err


def test_compare_puts_the_studies_side_by_side_and_takes_test_from_the_best_val_trial(
        capsys, store):
    code, out, _ = run_cli(capsys, "compare", "alpha", "beta", "--tracking-uri", store["uri"],
                           "--json")
    assert code == 0
    rows = last_json(out)["studies"]
    assert [r["study"] for r in rows] == ["alpha", "beta"]
    client = MlflowClient(store["uri"])
    for row in rows:
        summary = store[row["study"]]
        assert row["trials_completed"] == summary["trials_completed"]
        assert row["best_val_accuracy"] == pytest.approx(summary["best_val_accuracy"])
        best = client.get_run(summary["best_run_id"]).data.metrics
        assert row["best_test_accuracy"] == pytest.approx(best[M.TEST_ACCURACY])
        assert row["median_val_accuracy"] <= row["best_val_accuracy"]
        assert row["median_runtime_s"] > 0 and row["wall_s"] == pytest.approx(summary["wall_s"])
    assert [r["sampler"] for r in rows] == ["tpe", "random"]

    code, out, _ = run_cli(capsys, "compare", "alpha", "beta", "--tracking-uri", store["uri"])
    header, *lines = out.splitlines()
    assert header.split() == ["alpha", "beta"]
    assert any(line.startswith("test_accuracy of best") for line in lines)
    assert any(line.split()[:2] == ["trials", "completed"] and line.split()[2:] == ["3", "2"]
               for line in lines)


def test_compare_output_writes_a_png_of_val_accuracy_per_study(capsys, store, tmp_path):
    plot = tmp_path / "compare.png"
    code, out, _ = run_cli(capsys, "compare", "alpha", "beta", "--tracking-uri", store["uri"],
                           "--output", str(plot))
    assert code == 0 and f"wrote {plot}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_an_unwritable_plot_path_before_reading_the_studies(capsys, store, tmp_path):
    code, _, err = run_cli(capsys, "compare", "alpha", "beta", "--tracking-uri", store["uri"],
                           "--output", str(tmp_path / "missing" / "compare.png"))
    assert code == 2 and "--output" in err


def _hand_made_store(tmp_path: Path) -> str:
    """States a real minute-long study cannot cheaply reach: an interrupted study whose best
    trial was `lost`, and a study still running. Runs written as the study driver writes them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = tracking.ensure_experiment(client, "hpn-tune", uri)
    for name, status in (("stopped", "KILLED"), ("live", "RUNNING")):
        parent = client.create_run(exp, run_name=name, tags={
            tracking.STUDY_TAG: name, tracking.ROLE_TAG: "study", tracking.TRIALS_TAG: "6",
            tracking.SPACE_FILE_TAG: str(tmp_path / "gone.yaml")}).info.run_id
        if status != "RUNNING":
            client.set_terminated(parent, status)
        for i, (state, val, lr) in enumerate([("error", None, 0.3), ("pruned", 0.4, 0.2),
                                              ("lost", 0.9, 0.1), ("completed", 0.5, 0.05)]):
            run = client.create_run(exp, run_name=f"{name}-t{i + 1:03d}", tags={
                tracking.PARENT_TAG: parent, tracking.ROLE_TAG: "trial", tracking.STUDY_TAG: name,
                tracking.TRIAL_ID_TAG: f"{name}{i}", tracking.STATE_TAG: state}).info.run_id
            client.log_param(run, "train.lr", lr)
            if val is not None:
                client.log_metric(run, M.VAL_ACCURACY, val)
    return uri


def test_an_interrupted_study_shows_its_trials_without_the_lost_one_and_no_report(
        capsys, tmp_path):
    uri = _hand_made_store(tmp_path)
    code, out, _ = run_cli(capsys, "studies", "--tracking-uri", uri, "--json")
    assert code == 0
    rows = {r["study"]: r for r in last_json(out)["studies"]}
    assert (rows["stopped"]["state"], rows["live"]["state"]) == ("interrupted", "running")
    stopped = rows["stopped"]
    assert (stopped["trials_completed"], stopped["trials_pruned"], stopped["trials_errored"]) == (1, 1, 1)
    assert stopped["best_val_accuracy"] == 0.5  # from its completed trial; the lost 0.9 is ignored

    code, out, _ = run_cli(capsys, "show", "stopped", "--tracking-uri", uri, "--json")
    shown = last_json(out)
    assert [t["state"] for t in shown["trials"]] == ["completed", "pruned", "error"]
    assert [t["run_name"] for t in shown["trials"]] == ["stopped-t004", "stopped-t002", "stopped-t001"]
    assert (shown["searched"], shown["searched_from"]) == (["train.lr"], "varying params")
    assert shown["report_path"] is None and shown["best_run_id"] == shown["trials"][0]["run_id"]
    code, out, _ = run_cli(capsys, "show", "stopped", "--tracking-uri", uri)
    assert code == 0 and "report: none yet" in out


@pytest.mark.parametrize("command", ["studies", "show", "compare"])
def test_help_shows_examples_and_defaults(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "examples:" in out and f"hpn-tune {command} " in out
    assert "(default: hpn-tune)" in out


def test_the_installed_hpn_tune_script_prints_the_studies_examples():
    script = Path(sys.executable).parent / "hpn-tune"  # pyproject's [project.scripts] entry
    out = subprocess.run([str(script), "studies", "--help"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "examples:\n  hpn-tune studies\n" in out
    assert "--experiment EXPERIMENT" in out
