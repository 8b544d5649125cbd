"""Studies end to end: real Ray runtime, real Optuna sampler, real MLflow server."""
from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hpn import metrics as M
from tuning.pyfunc import run_model
from tuning.study import StudyOptions, run_study
from tuning.tracking import STATE_TAG, TRIAL_ID_TAG, trial_runs, trials_frame

pytestmark = pytest.mark.usefixtures("ray_runtime")


def options(tmp_path: Path, cache_dir: str, tracking_uri: str, name: str, **kw) -> StudyOptions:
    overrides = ["data.size=600", f"encoder.cache_dir={cache_dir}"] + kw.pop("overrides", [])
    kw.setdefault("optuna_storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    return StudyOptions(
        space=kw.pop("space", "quick"), trials=kw.pop("trials", 4), overrides=overrides,
        name=name, tracking_uri=tracking_uri, storage_path=str(tmp_path / "ray"),
        max_concurrent=kw.pop("max_concurrent", 2), **kw,
    )


def test_a_small_study_logs_one_child_run_per_trial_with_params_and_metrics(
        tmp_path, cache_dir, mlflow_server):
    summary = run_study(options(tmp_path, cache_dir, mlflow_server, "small", scheduler="fifo"))
    client = MlflowClient(mlflow_server)
    runs = trial_runs(client, client.get_experiment_by_name("hpn-tune").experiment_id,
                      summary["parent_run_id"])
    assert len(runs) == 4 == summary["trials_completed"]
    for run in runs:
        assert {"model.prototype_dim", "model.prototype_mode", "train.lr"} <= set(run.data.params)
        assert {M.TEST_ACCURACY, M.TEST_MACRO_F1, M.RUNTIME_S, M.SEPARATION_MIN_ANGLE_DEG,
                M.SEPARATION_MAX_COSINE, M.PEAK_RSS_MB} <= set(run.data.metrics)
        history = client.get_metric_history(run.info.run_id, M.VAL_ACCURACY)
        assert sorted(m.step for m in history) == [1, 2, 3]
        assert run.data.tags[STATE_TAG] == "completed"
        model = run_model(client, run.info.run_id)  # the trial's LoggedModel
        assert "MLmodel" in {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["hpn.sampler"] == "tpe"
    assert len(parent.data.tags["hpn.dataset_fingerprint"]) == 64
    report = {f.path for f in client.list_artifacts(summary["parent_run_id"], "report")}
    assert {"report/trials.csv", "report/optimization_history.png"} <= report
    assert summary["best_val_accuracy"] == max(r.data.metrics[M.VAL_ACCURACY] for r in runs)
    assert set(summary["best_config"]) == {"model.prototype_dim", "model.prototype_mode", "train.lr"}


def test_a_failing_trial_ends_as_an_error_and_the_study_goes_on(tmp_path, cache_dir):
    space = tmp_path / "failing.yaml"
    # 99 fine-tuned layers do not exist in MiniLM: those trials fail inside the trial.
    space.write_text("encoder.trainable_layers: {type: categorical, choices: [0, 99]}\n"
                     "train.epochs: 2\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_study(options(tmp_path, cache_dir, uri, "failing", space=str(space),
                                trials=4, sampler="grid", register=False))
    assert summary["trials_completed"] == 1 and summary["trials_errored"] == 1
    client = MlflowClient(uri)
    frame = trials_frame(client, client.get_experiment_by_name("hpn-tune").experiment_id,
                         summary["parent_run_id"])
    failed = frame[frame["state"] == "error"]
    assert len(failed) == 1
    run = client.get_run(failed.iloc[0]["run_id"])
    assert "trainable_layers" in run.data.tags["hpn.error"]
    assert run.info.status == "FAILED"


def test_four_quarter_gpu_trials_run_at_once_on_one_declared_gpu(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_study(options(
        tmp_path, cache_dir, uri, "packed", trials=8, max_concurrent=8, scheduler="fifo",
        sampler="random", register=False, overrides=["train.epochs=200"], space=str(_fixed_space(tmp_path)),
    ))
    client = MlflowClient(uri)
    runs = trial_runs(client, client.get_experiment_by_name("hpn-tune").experiment_id,
                      summary["parent_run_id"])
    assert len(runs) == 8
    assert {r.data.params.get("train.device") for r in runs} == {"cpu"}  # fell back to CPU
    spans = [(r.info.start_time, r.info.end_time) for r in runs]
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most == 4  # 1 GPU / 0.25 per trial, though 4 CPUs and max_concurrent 8 allow more


def _fixed_space(tmp_path: Path) -> Path:
    path = tmp_path / "lr.yaml"
    path.write_text("train.lr: {type: float, low: 0.01, high: 0.1, log: true}\n")
    return path


def test_a_killed_study_resumes_without_running_or_logging_a_trial_twice(
        tmp_path, cache_dir, mlflow_server, ray_runtime):
    argv = [sys.executable, "-m", "tuning.cli", "run", "--space", "quick", "--trials", "6",
            "--max-concurrent", "1", "--name", "killed", "--tracking-uri", mlflow_server,
            "--experiment", "resume-test", "--storage-path", str(tmp_path / "ray"),
            "--address", ray_runtime, "--scheduler", "fifo", "--no-register",
            "--set", "data.size=600", "--set", f"encoder.cache_dir={cache_dir}",
            "--set", "train.epochs=20", "--optuna-storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    client = MlflowClient(mlflow_server)
    deadline = time.time() + 240
    finished: dict[str, int] = {}
    while time.time() < deadline and len(finished) < 2:
        time.sleep(1)
        exp = client.get_experiment_by_name("resume-test")
        if exp is None:
            continue
        runs = client.search_runs([exp.experiment_id], f"tags.`{STATE_TAG}` = 'completed'")
        # the state tag lands just before the run is closed: count closed runs only
        finished = {r.data.tags[TRIAL_ID_TAG]: r.info.end_time for r in runs if r.info.end_time}
    assert len(finished) >= 2, "the study did not get going"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    summary = run_study(StudyOptions(
        space="quick", trials=6, name="killed", tracking_uri=mlflow_server,
        experiment="resume-test", storage_path=str(tmp_path / "ray"), resume=True,
        scheduler="fifo", register=False, max_concurrent=1,
        overrides=["data.size=600", f"encoder.cache_dir={cache_dir}", "train.epochs=20"],
        optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}",
    ))
    exp_id = client.get_experiment_by_name("resume-test").experiment_id
    runs = trial_runs(client, exp_id, summary["parent_run_id"])
    # A trial that finished after Ray's last state save (every 2 s) is unknown to the resumed
    # study: its run is kept but tagged lost, and Ray runs a replacement.
    kept = [r for r in runs if r.data.tags[STATE_TAG] != "lost"]
    trial_ids = [r.data.tags[TRIAL_ID_TAG] for r in kept]
    assert len(trial_ids) == len(set(trial_ids)) == 6
    assert summary["trials_completed"] == 6
    assert summary["trials_lost"] == len(runs) - 6
    assert all(r.info.status != "RUNNING" for r in runs)
    by_id = {r.data.tags[TRIAL_ID_TAG]: r for r in kept}
    for trial_id, end_time in finished.items():  # finished before the kill: not run again
        if trial_id in by_id:
            assert by_id[trial_id].info.end_time == end_time
    assert len(set(finished) & set(by_id)) >= 1
    studies = client.search_runs([exp_id], "tags.`hpn.role` = 'study'")
    assert len(studies) == 1
    # The Optuna storage holds every trial exactly once: each kept run has its own COMPLETE
    # Optuna trial; a lost run's trial stays COMPLETE (a real result the sampler may use);
    # what was asked just before the kill but never run by Ray is failed and marked so.
    # (A lost run's trial is COMPLETE when the driver told it before the kill, else FAIL.)
    trials = {t.number: t for t in _optuna_trials(f"sqlite:///{tmp_path / 'optuna.db'}", "killed")}
    numbers = [int(r.data.tags["hpn.optuna_trial"]) for r in runs]
    assert len(numbers) == len(set(numbers))
    assert all(trials[int(r.data.tags["hpn.optuna_trial"])].state.name == "COMPLETE" for r in kept)
    assert not [t for t in trials.values() if t.state.name == "RUNNING"]
    orphans = [t for n, t in trials.items() if t.state.name == "FAIL"]
    assert all("hpn_orphaned" in t.user_attrs for t in orphans)
    assert sum(t.state.name == "COMPLETE" for t in trials.values()) >= 6


def test_a_set_on_a_searched_key_is_refused_before_anything_starts(tmp_path, cache_dir):
    from hpn.errors import HPNInputError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(HPNInputError, match="--set train.lr: the search space"):
        run_study(options(tmp_path, cache_dir, uri, "conflict", overrides=["train.lr=0.1"]))


def test_ctrl_c_stops_the_study_and_the_printed_command_resumes_it_to_the_end(
        tmp_path, cache_dir, ray_runtime):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # 7 trials, not the default 12: the resume must use the study's own count
    argv = [sys.executable, "-m", "tuning.cli", "run", "--space", "quick", "--trials", "7",
            "--max-concurrent", "1", "--name", "ctrl-c", "--tracking-uri", uri,
            "--storage-path", str(tmp_path / "ray"), "--address", ray_runtime,
            "--scheduler", "fifo", "--no-register", "--set", "data.size=600",
            "--set", f"encoder.cache_dir={cache_dir}", "--set", "train.epochs=30"]
    client = MlflowClient(uri)  # the store made before the driver starts: no two migrations
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(1)
        exp = client.get_experiment_by_name("hpn-tune")
        if exp and client.search_runs([exp.experiment_id], f"tags.`{STATE_TAG}` = 'completed'"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "continue it with: hpn-tune run --name ctrl-c --resume" in last
    study = client.search_runs([client.get_experiment_by_name("hpn-tune").experiment_id],
                               "tags.`hpn.role` = 'study'")[0]
    assert study.info.status == "KILLED"
    assert "best_val_accuracy" not in study.data.metrics  # no report, no registration
    first_session = study.data.metrics["study_wall_s"]

    # The command exactly as printed (with this interpreter) finishes the study.
    printed = shlex.split(last.split("continue it with: ", 1)[1])
    assert printed[:2] == ["hpn-tune", "run"]
    resumed = subprocess.run([sys.executable, "-m", "tuning.cli", *printed[1:], "--json"],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["trials_completed"] == 7
    assert summary["wall_s"] > first_session  # the study's own time, across both sessions
    assert client.get_run(study.info.run_id).info.status == "FINISHED"

    # Resuming a finished study is refused, and it stays FINISHED.
    again = subprocess.run([sys.executable, "-m", "tuning.cli", *printed[1:]],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 2 and "already finished" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert client.get_run(study.info.run_id).info.status == "FINISHED"


def test_a_resume_flag_that_contradicts_the_recorded_study_is_refused(tmp_path, cache_dir):
    from hpn.errors import HPNInputError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = options(tmp_path, cache_dir, uri, "recorded", trials=2, scheduler="fifo",
                    register=False)
    client = MlflowClient(uri)
    summary = run_study(first)
    parent = summary["parent_run_id"]
    tags = client.get_run(parent).data.tags
    assert (tags["hpn.trials"], tags["hpn.max_concurrent"], tags["hpn.cpus_per_trial"]) == \
        ("2", "2", "1.0")
    client.update_run(parent, status="KILLED")  # as if interrupted
    for flag, kw in (("--sampler", {"sampler": "random"}), ("--max-concurrent", {"max_concurrent": 1})):
        opts = options(tmp_path, cache_dir, uri, "recorded", resume=True, register=False, **{
            "trials": None, "max_concurrent": None, **kw})
        with pytest.raises(HPNInputError, match=f"{flag} .* differs from the study's"):
            run_study(opts)
    with pytest.raises(HPNInputError, match="--trials: 1 is fewer than the 2 trials of study 'recorded'"):
        run_study(options(tmp_path, cache_dir, uri, "recorded", resume=True, trials=1,
                          max_concurrent=None))
    assert client.get_run(parent).info.status == "KILLED"  # a refusal changes nothing


def _optuna_trials(storage: str, study: str) -> list:
    import optuna

    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def test_a_finished_study_extends_to_n_trials_with_its_sampler_history(tmp_path, cache_dir):
    from hpn.errors import HPNInputError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    first = run_study(options(tmp_path, cache_dir, uri, "grow", trials=3, scheduler="fifo",
                              register=False, optuna_storage=None))
    # By default the Optuna study sits beside the MLflow store, one Optuna trial per trial.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert first["optuna_storage"] == storage
    assert [t.state.name for t in _optuna_trials(storage, "grow")] == ["COMPLETE"] * 3
    parent = first["parent_run_id"]

    # Resuming a finished study without more trials, or with fewer, is refused; it stays FINISHED.
    for trials, message in ((None, "already finished its 3 trials; extend it with --trials N"),
                            (2, "--trials: 2 is fewer than")):
        with pytest.raises(HPNInputError, match=message):
            run_study(options(tmp_path, cache_dir, uri, "grow", resume=True, trials=trials,
                              max_concurrent=None, optuna_storage=None))
        assert client.get_run(parent).info.status == "FINISHED"

    summary = run_study(options(tmp_path, cache_dir, uri, "grow", resume=True, trials=5,
                                max_concurrent=None, register=False, optuna_storage=None))
    assert summary["parent_run_id"] == parent and summary["trials_completed"] == 5
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["hpn.trials"] == "5"
    assert json.loads(run.data.tags["hpn.ray_experiments"]) == [
        {"name": "grow", "trials": 3}, {"name": "grow-x2", "trials": 2}]
    # The same Optuna study went on (numbers 3 and 4, with the first three as its history).
    trials = _optuna_trials(storage, "grow")
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.state.name == "COMPLETE" for t in trials)
    runs = trial_runs(client, client.get_experiment_by_name("hpn-tune").experiment_id, parent)
    assert sorted(r.info.run_name for r in runs) == [f"grow-t{i:03d}" for i in range(1, 6)]
    assert sorted(int(r.data.tags["hpn.optuna_trial"]) for r in runs) == [0, 1, 2, 3, 4]
    by_number = {t.number: t for t in trials}
    for r in runs:  # each run and its Optuna trial: the same config, the same Ray trial
        t = by_number[int(r.data.tags["hpn.optuna_trial"])]
        assert t.user_attrs["ray_trial_id"] == r.data.tags[TRIAL_ID_TAG]
        assert t.value == pytest.approx(r.data.metrics[M.VAL_ACCURACY])
        assert float(r.data.params["train.lr"]) == pytest.approx(t.params["train.lr"])


def test_an_interrupted_extension_resumes_with_the_printed_command(tmp_path, cache_dir,
                                                                   ray_runtime):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--tracking-uri", uri, "--storage-path", str(tmp_path / "ray"),
              "--address", ray_runtime, "--no-register"]
    first = subprocess.run(
        [sys.executable, "-m", "tuning.cli", "run", "--space", "quick", "--trials", "2",
         "--max-concurrent", "1", "--name", "ext", "--scheduler", "fifo", *common,
         "--set", "data.size=600", "--set", f"encoder.cache_dir={cache_dir}",
         "--set", "train.epochs=30"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("hpn-tune").experiment_id
    proc = subprocess.Popen([sys.executable, "-m", "tuning.cli", "run", "--name", "ext",
                             "--resume", "--trials", "5", *common],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline:  # one trial of the extension done, then Ctrl-C
        time.sleep(1)
        done = client.search_runs([exp_id], f"tags.`{STATE_TAG}` = 'completed'")
        if len([r for r in done if r.info.end_time]) >= 3:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "continue it with: hpn-tune run --name ext --resume" in last and "--trials" not in last
    parent = client.search_runs([exp_id], "tags.`hpn.role` = 'study'")[0]
    assert parent.info.status == "KILLED" and parent.data.tags["hpn.trials"] == "5"

    printed = shlex.split(last.split("continue it with: ", 1)[1])
    resumed = subprocess.run([sys.executable, "-m", "tuning.cli", *printed[1:], "--json"],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["trials_completed"] == 5
    runs = [r for r in trial_runs(client, exp_id, parent.info.run_id)
            if r.data.tags[STATE_TAG] != "lost"]
    assert sorted(r.info.run_name for r in runs) == [f"ext-t{i:03d}" for i in range(1, 6)]
    trials = _optuna_trials(f"sqlite:///{tmp_path / 'optuna.db'}", "ext")
    numbers = sorted(int(r.data.tags["hpn.optuna_trial"]) for r in runs)
    assert len(set(numbers)) == 5
    assert [t.state.name for t in trials if t.number in numbers] == ["COMPLETE"] * 5
    assert not [t for t in trials if t.state.name == "RUNNING"]


def _local_env() -> dict[str, str]:
    """This environment without RAY_ADDRESS: the process starts its own local Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_sigterm_stops_a_local_study_like_ctrl_c_and_it_resumes_to_the_end(tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # No --address: the driver starts its own Ray, whose SIGTERM handler it must not keep.
    argv = [sys.executable, "-m", "tuning.cli", "run", "--space", "quick", "--trials", "3",
            "--max-concurrent", "1", "--name", "sigterm", "--tracking-uri", uri,
            "--storage-path", str(tmp_path / "ray"), "--scheduler", "fifo", "--no-register",
            "--set", "data.size=600", "--set", f"encoder.cache_dir={cache_dir}",
            "--set", "train.epochs=30"]
    client = MlflowClient(uri)  # the store made before the driver starts: no two migrations
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_local_env())
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(1)
        exp = client.get_experiment_by_name("hpn-tune")
        if exp and client.search_runs([exp.experiment_id], f"tags.`{STATE_TAG}` = 'completed'"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGABRT" not in err and "SIGTERM received" not in err and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("hpn-tune run: interrupted: study 'sigterm' stopped with ")
    assert "continue it with: hpn-tune run --name sigterm --resume" in last
    exp_id = client.get_experiment_by_name("hpn-tune").experiment_id
    study = client.search_runs([exp_id], "tags.`hpn.role` = 'study'")[0]
    assert study.info.status == "KILLED"
    runs = trial_runs(client, exp_id, study.info.run_id)
    assert runs and all(r.info.status != "RUNNING" for r in runs)

    summary = run_study(StudyOptions(name="sigterm", resume=True, tracking_uri=uri,
                                     storage_path=str(tmp_path / "ray"), register=False))
    assert summary["parent_run_id"] == study.info.run_id and summary["trials_completed"] == 3
    assert client.get_run(study.info.run_id).info.status == "FINISHED"


def test_a_study_killed_before_ray_saved_its_state_resumes_from_its_start(
        tmp_path, cache_dir, ray_runtime):
    import shutil

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    optuna_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    argv = [sys.executable, "-m", "tuning.cli", "run", "--space", "quick", "--trials", "3",
            "--max-concurrent", "1", "--name", "early", "--tracking-uri", uri,
            "--storage-path", str(tmp_path / "ray"), "--address", ray_runtime,
            "--scheduler", "fifo", "--no-register", "--optuna-storage", optuna_url,
            "--set", "data.size=600", "--set", f"encoder.cache_dir={cache_dir}",
            "--set", "train.epochs=3"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    parent = None
    while parent is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if not (tmp_path / "mlflow.db").exists():
            continue
        # Read-only SQL, not an MlflowClient: a client on a store the driver is still creating
        # runs MLflow's migrations too, and two at once break the store.
        try:
            with sqlite3.connect(f"file:{tmp_path / 'mlflow.db'}?mode=ro", uri=True) as db:
                row = db.execute("SELECT run_uuid FROM tags WHERE key = 'hpn.role' "
                                 "AND value = 'study'").fetchone()
        except sqlite3.Error:  # the driver is creating the store's tables
            continue
        parent = row[0] if row else None
    proc.kill()  # SIGKILL: nothing of the driver's runs after this
    proc.wait()
    assert parent is not None, "the study's parent run never appeared"
    # Whether or not Ray saved in that split second, the study is now one without Ray state.
    shutil.rmtree(tmp_path / "ray" / "early", ignore_errors=True)

    summary = run_study(StudyOptions(name="early", resume=True, tracking_uri=uri,
                                     storage_path=str(tmp_path / "ray"),
                                     optuna_storage=optuna_url, register=False))
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("hpn-tune").experiment_id
    assert summary["parent_run_id"] == parent and summary["trials_completed"] == 3
    studies = client.search_runs([exp_id], "tags.`hpn.role` = 'study'")
    assert [r.info.run_id for r in studies] == [parent]
    assert client.get_run(parent).info.status == "FINISHED"
    runs = trial_runs(client, exp_id, parent)
    assert all(r.info.status != "RUNNING" for r in runs)
    assert len([r for r in runs if r.data.tags[STATE_TAG] != "lost"]) == 3
    trials = _optuna_trials(optuna_url, "early")
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert sum(t.state.name == "COMPLETE" for t in trials) == 3
    assert all("hpn_orphaned" in t.user_attrs for t in trials if t.state.name == "FAIL")


def test_a_resume_without_ray_state_starts_over_only_when_no_trial_of_it_ended(tmp_path):
    import optuna

    from hpn.errors import HPNInputError
    from tuning.study import Leg, StudyPlan, _all_statuses, _legs_to_run

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    plan = StudyPlan(None, None, "tpe", "fifo", 0, 1, 3, 1, 1.0, None, url, (Leg("s", 3),))
    storage = str(tmp_path / "ray")
    # Killed after Tuner() wrote tuner.pkl, before fit() saved any state: not restorable.
    (tmp_path / "ray" / "s").mkdir(parents=True)
    (tmp_path / "ray" / "s" / "tuner.pkl").write_bytes(b"")
    assert _all_statuses(storage, list(plan.legs)) == {}
    study.ask()  # asked just before the kill, never run: no trial ended
    assert _legs_to_run(plan, "s", storage, "RUNNING") == [(Leg("s", 3), "again")]
    study.tell(study.ask(), 0.5)  # a trial ended: its Ray state is elsewhere (--storage-path)
    with pytest.raises(HPNInputError, match="--resume: no saved Ray state for 's'"):
        _legs_to_run(plan, "s", storage, "RUNNING")


def test_a_trial_larger_than_any_ray_node_is_refused_before_the_study_starts(tmp_path, cache_dir):
    from hpn.errors import HPNInputError
    from tuning.optuna_store import open_storage, study_exists

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the shared Ray runtime: one node, 4 CPUs and 1 GPU
    with pytest.raises(HPNInputError, match=r"^--cpus-per-trial: 8 CPUs per trial, but the "
                       r"largest Ray node has 4 \(nodes: 4 CPU/1 GPU\); give --cpus-per-trial 4 or less$"):
        run_study(options(tmp_path, cache_dir, uri, "too-big", cpus_per_trial=8))
    # the same name again: a refused study leaves its name free
    with pytest.raises(HPNInputError, match=r"^--gpus-per-trial: 2 GPUs per trial, but the "
                       r"largest Ray node has 1 \(nodes: 4 CPU/1 GPU\); give --gpus-per-trial 1 or less$"):
        run_study(options(tmp_path, cache_dir, uri, "too-big", gpus_per_trial=2))
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("hpn-tune").experiment_id
    assert not client.search_runs([exp_id], "tags.`hpn.role` = 'study'")
    assert not study_exists(open_storage(f"sqlite:///{tmp_path / 'optuna.db'}"), "too-big")


def test_a_trial_needing_cpus_of_one_node_and_the_gpu_of_another_is_refused(monkeypatch):
    from hpn.errors import HPNInputError
    from tuning import ray_tune

    nodes = [{"Alive": True, "Resources": {"CPU": 8.0}},
             {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 16.0, "GPU": 4.0}}]  # gone: not counted
    monkeypatch.setattr(ray_tune.ray, "nodes", lambda: nodes)
    ray_tune.check_trial_fits(8, 0)
    ray_tune.check_trial_fits(2, 1)
    with pytest.raises(HPNInputError, match=r"^--cpus-per-trial, --gpus-per-trial: 4 CPUs and "
                       r"1 GPU per trial, but no Ray node has both \(nodes: 8 CPU/0 GPU, "
                       r"2 CPU/1 GPU\); ask for what one node has$"):
        ray_tune.check_trial_fits(4, 1)


BIND_CHECK = """
import json, os, psutil, ray
from tuning.ray_tune import init_ray

init_ray(None)
ray.get([ray.remote(lambda: os.getpid()).remote() for _ in range(2)])  # workers listen too
tree = {p.pid: p.name() for p in [psutil.Process(), *psutil.Process().children(recursive=True)]}
print(json.dumps([[tree[c.pid], c.laddr.ip, c.laddr.port] for c in psutil.net_connections("inet")
                  if c.status == psutil.CONN_LISTEN and c.pid in tree]))
"""


def test_a_local_ray_listens_on_the_loopback_address_only():
    # A fresh process: this test session already runs a Ray of its own.
    done = subprocess.run([sys.executable, "-c", BIND_CHECK], capture_output=True, text=True,
                          timeout=240, env=_local_env(), cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    listening = json.loads(done.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # Ray's own servers, at least
    # IPv4 on an IPv6 socket shows as ::ffff:127.0.0.1; "::" or 0.0.0.0 would be every interface
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for _, ip, _ in listening), listening
