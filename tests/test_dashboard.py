"""`hpn-tune dashboard`: optuna-dashboard for real, on an Optuna RDB storage beside the MLflow store."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import optuna
from conftest import free_port


def _study_in(path, name: str, n: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}", direction="maximize")
    study.optimize(lambda t: -(t.suggest_float("x", -1, 1) ** 2), n_trials=n)


def _get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.load(r)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuning.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_the_dashboard_serves_the_study_beside_the_mlflow_store_on_localhost(tmp_path):
    _study_in(tmp_path / "optuna.db", "demo", 3)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuning.cli", "dashboard", "--tracking-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}", "--study", "demo", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()
        assert f"on sqlite:///{tmp_path / 'optuna.db'}" in first
        assert f"at http://127.0.0.1:{port}/dashboard/studies/1" in first
        deadline = time.time() + 60
        while True:
            try:
                studies = _get(port, "/api/studies")["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
                time.sleep(0.3)
        assert [(s["study_id"], s["study_name"]) for s in studies] == [(1, "demo")]
        assert len(_get(port, "/api/studies/1")["trials"]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_dashboard_refuses_a_missing_storage_or_study_in_one_line(tmp_path):
    missing = _cli("dashboard", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"hpn-tune dashboard: error: --optuna-storage: no Optuna storage at "
        f"sqlite:///{tmp_path / 'optuna.db'}; run a study first (hpn-tune run) or pass the "
        "storage it used")
    _study_in(tmp_path / "elsewhere.db", "demo", 1)
    unknown = _cli("dashboard", "--optuna-storage", f"sqlite:///{tmp_path / 'elsewhere.db'}",
                   "--study", "nope")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().endswith("--study: no study 'nope' in "
                                           f"sqlite:///{tmp_path / 'elsewhere.db'}; it holds: demo")
