"""The tracking server as a real deployment has it: behind a password, and sometimes down.

Secrets given in a URI never reach a tag, a printed line, Ray's state or its logs; a server
that does not answer fails a study in seconds before it starts; one killed mid-study loses
no finished trial and leaves no run open once it is back.
"""
from __future__ import annotations

import json
import os
import pickle
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, start_mlflow_server, stop_process_group
from mlflow.tracking import MlflowClient

from tuning import optuna_store, tracking
from tuning.pyfunc import run_model
from tuning.study import StudyOptions, resume_command, run_study
from tuning.tracking import STATE_TAG, trial_runs


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and needle in path.read_bytes():
                hits.append(str(path))
        except OSError:  # a socket or a file Ray removed meanwhile
            continue
    return hits


def test_credentials_in_a_tracking_uri_move_to_the_environment(monkeypatch):
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD"):
        monkeypatch.setenv(var, "before")
    assert tracking.resolve_tracking_uri("http://ann:p%40ss@mlflow:5000/x") == "http://mlflow:5000/x"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ann"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
    assert tracking.resolve_tracking_uri("postgresql+psycopg2://ann:pw@db:5432/mlflow") \
        == "postgresql+psycopg2://ann@db:5432/mlflow"
    assert os.environ["PGPASSWORD"] == "pw"
    assert tracking.resolve_tracking_uri("https://mlflow.example.org") == "https://mlflow.example.org"
    # A command copied from a tag or a printed line: the environment's password stays.
    assert tracking.resolve_tracking_uri("http://ann:***@mlflow:5000") == "http://mlflow:5000"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"


def test_a_pickled_optuna_storage_holds_no_password(tmp_path, monkeypatch):
    """Ray pickles the searcher, storage included, into tuner.pkl and its checkpoints; a
    process that was given the URL (a resumed study) gets the password back on unpickling."""
    import optuna

    # Unpickled, Optuna's storage connects at once; here only the URL it would use matters.
    monkeypatch.setattr(optuna.storages.RDBStorage, "__setstate__",
                        lambda self, state: self.__dict__.update(state))
    storage = optuna_store.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    storage.url = "postgresql+psycopg2://hpn:TopSecret@db/optuna"  # as if opened with a password
    blob = pickle.dumps(storage)
    assert b"TopSecret" not in blob and b"postgresql+psycopg2://hpn@db/optuna" in blob
    assert pickle.loads(blob).url == "postgresql+psycopg2://hpn@db/optuna"  # not given: the driver's own
    optuna_store.remember("postgresql+psycopg2://hpn:TopSecret@db/optuna")
    assert pickle.loads(blob).url == "postgresql+psycopg2://hpn:TopSecret@db/optuna"


def test_a_server_that_accepts_but_never_answers_counts_as_unreachable(monkeypatch):
    """A hung server (not one refusing connections) must also send results to the outbox."""
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        assert tracking.server_answers(uri, timeout=1) == "no answer within 1 s"
        with pytest.raises(Exception) as caught:
            MlflowClient(uri).search_experiments()
        assert tracking.is_unreachable(caught.value)
    with pytest.raises(Exception) as refused:
        MlflowClient(uri).search_experiments()  # the port is closed now
    assert tracking.is_unreachable(refused.value)
    assert not tracking.is_unreachable(ValueError("a real bug"))


def test_a_password_in_a_uri_scheme_without_a_safe_place_for_it_is_refused():
    from hpn.errors import HPNInputError

    with pytest.raises(HPNInputError, match="--tracking-uri: a password in a mysql:// URI"):
        tracking.resolve_tracking_uri("mysql+pymysql://ann:pw@db/mlflow")


@pytest.mark.usefixtures("ray_runtime")
def test_a_password_in_the_tracking_uri_lands_nowhere_a_study_writes(
        tmp_path, cache_dir, mlflow_server, monkeypatch, capsys, tmp_path_factory):
    secret = f"Pw-{secrets.token_hex(8)}"
    uri = mlflow_server.replace("http://", f"http://hpnuser:{secret}@")
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "restored-after-the-test")
    monkeypatch.setattr(sys, "argv", ["hpn-tune", "run", "--tracking-uri", uri, "--name", "secret"])
    monkeypatch.chdir(tmp_path)
    opts = StudyOptions(space="quick", trials=2, name="secret", tracking_uri=uri,
                        storage_path=str(tmp_path / "ray"), max_concurrent=2, scheduler="fifo",
                        overrides=["data.size=600", f"encoder.cache_dir={cache_dir}",
                                   "train.epochs=3"])
    summary = run_study(opts)
    assert summary["trials_completed"] == 2
    out = capsys.readouterr()
    printed = out.out + out.err + json.dumps(summary, default=str) + resume_command(opts, "secret")
    assert secret not in printed
    assert summary["tracking_uri"] == mlflow_server

    client = MlflowClient(mlflow_server)
    parent = client.get_run(summary["parent_run_id"])
    assert "hpnuser:***@" in parent.data.tags["hpn.command"]
    for run in [parent, *trial_runs(client, parent.info.experiment_id, parent.info.run_id)]:
        assert secret not in json.dumps([run.data.tags, run.data.params])
    # Everything on disk: Ray's state (tuner.pkl, searcher checkpoints), optuna.db, the
    # server's store and artifacts, and this Ray session's logs.
    server_roots = list(tmp_path_factory.getbasetemp().glob("mlflow_server*"))
    ray_logs = Path("/tmp/ray/session_latest/logs")
    assert (tmp_path / "ray" / "secret").is_dir() and server_roots
    for root in [tmp_path, *server_roots, ray_logs]:
        assert _files_holding(root, secret.encode()) == [], root


def test_a_tracking_server_that_does_not_answer_fails_the_study_in_seconds(tmp_path):
    uri = f"http://ann:Sekr3t@127.0.0.1:{free_port()}"
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "tuning.cli", "run", "--space", "quick", "--trials", "1",
         "--name", "nobody-home", "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert time.time() - started < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tracking-uri" in lines[0] and "does not answer" in lines[0]
    assert "Sekr3t" not in proc.stderr + proc.stdout
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


def _wait_for_a_trained_epoch(client: MlflowClient, study: subprocess.Popen) -> None:
    """Until a trial of the study has logged an epoch: the moment to pull the server."""
    deadline = time.time() + 240
    while time.time() < deadline and study.poll() is None:
        exp = client.get_experiment_by_name("hpn-tune")
        runs = exp and client.search_runs([exp.experiment_id], "tags.`hpn.role` = 'trial'")
        if runs and client.get_metric_history(runs[0].info.run_id, "val_accuracy"):
            return
        time.sleep(0.5)
    raise AssertionError("no trial trained an epoch: " + (study.stderr.read() if study.poll() else ""))


def _kill(server: subprocess.Popen) -> None:
    stop_process_group(server, signal.SIGKILL)


def test_a_server_killed_mid_study_loses_no_finished_trial_and_leaves_no_run_open(
        tmp_path, cache_dir, ray_runtime):
    """Killed while a trial trains and down until the study has nothing left to run: the
    trial that finished meanwhile keeps its model and metrics in the outbox, the study says
    so and stops; once the server is back, the printed command delivers them and finishes."""
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    storage = tmp_path / "ray"
    # Short retries, so the outage outlasts them in seconds (the default bound is ~60 s).
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    study = subprocess.Popen(
        [sys.executable, "-m", "tuning.cli", "run", "--space", "quick", "--trials", "3",
         "--max-concurrent", "1", "--scheduler", "fifo", "--name", "outage", "--no-register",
         "--tracking-uri", uri, "--storage-path", str(storage), "--address", ray_runtime,
         "--set", "data.size=600", "--set", f"encoder.cache_dir={cache_dir}",
         "--set", "train.epochs=8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        client = MlflowClient(uri)
        _wait_for_a_trained_epoch(client, study)
        _kill(server)
        out, err = study.communicate(timeout=400)
    finally:
        if study.poll() is None:
            study.kill()
        _kill(server)

    assert study.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert f"the MLflow server at {uri} stopped answering" in last
    outbox = storage / "outage.outbox"
    assert len(list(outbox.glob("*.trial.json"))) == 1, last  # the trial that finished
    assert f"wait in {outbox}" in last

    server = start_mlflow_server(root, port)
    try:
        printed = shlex.split(last.split("When it is back, ", 1)[1].split(" uploads what")[0])
        resumed = subprocess.run([sys.executable, "-m", "tuning.cli", *printed[1:]],
                                 capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
        assert resumed.returncode == 0, resumed.stderr
        assert "recorded late, from the study's outbox" in resumed.stdout
        exp = client.get_experiment_by_name("hpn-tune")
        runs = client.search_runs([exp.experiment_id])
        assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
        completed = [r for r in runs if r.data.tags.get(STATE_TAG) == "completed"]
        assert len(completed) == 1, [r.data.tags.get(STATE_TAG) for r in runs]
        assert run_model(client, completed[0].info.run_id) is not None
        assert "test_accuracy" in completed[0].data.metrics
        history = client.get_metric_history(completed[0].info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == list(range(1, 9))  # epochs logged late too
        assert not outbox.exists()
    finally:
        _kill(server)


def test_a_server_restart_within_the_retry_window_goes_unnoticed(tmp_path, cache_dir, ray_runtime):
    """What a 30 s restart is to the default ~60 s of retries, in test time: a server down
    for several seconds with ~28 s of retries (4 retries, backoff factor 2): no outbox, no
    error, every trial completed with its whole epoch history."""
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2"}
    study = subprocess.Popen(
        [sys.executable, "-m", "tuning.cli", "run", "--space", "quick", "--trials", "2",
         "--max-concurrent", "1", "--scheduler", "fifo", "--name", "blip", "--no-register",
         "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray"), "--address", ray_runtime,
         "--set", "data.size=600", "--set", f"encoder.cache_dir={cache_dir}",
         "--set", "train.epochs=6", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    client = MlflowClient(uri)
    try:
        _wait_for_a_trained_epoch(client, study)
        _kill(server)
        down = time.time()
        time.sleep(3)
        server = start_mlflow_server(root, port)
        outage = time.time() - down
        out, err = study.communicate(timeout=400)
        assert study.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["trials_completed"] == 2 and summary["delivered_after_outage"] == 0
        assert not (tmp_path / "ray" / "blip.outbox").exists()
        assert "does not answer" not in out + err, f"a {outage:.0f} s outage was noticed"
        for run in trial_runs(client, client.get_experiment_by_name("hpn-tune").experiment_id,
                              summary["parent_run_id"]):
            history = client.get_metric_history(run.info.run_id, "val_accuracy")
            assert sorted(m.step for m in history) == list(range(1, 7))
    finally:
        if study.poll() is None:
            study.kill()
        _kill(server)
