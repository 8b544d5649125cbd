"""Using a model: `predict` on texts or files, `serve` over HTTP, and the MLflow `ui`.

Serving and the UI are MLflow's own servers (`mlflow models serve`, `mlflow ui`), started
with our tracking URI so `models:/<name>@champion` resolves against the study's registry.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from hpn.errors import HPNInputError
from tuning.tracking import resolve_tracking_uri


def read_texts(path: str | Path) -> list[str]:
    """Texts from JSONL / CSV (column `text`, else the first column) or plain lines."""
    p = Path(path)
    if not p.is_file():
        raise HPNInputError(f"--input: file {str(p)!r} not found")
    if p.suffix in (".jsonl", ".json"):
        frame = pd.read_json(p, lines=True)
    elif p.suffix == ".csv":
        frame = pd.read_csv(p)
    else:
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if frame.empty:
        raise HPNInputError(f"--input: file {str(p)!r} has no rows")
    column = "text" if "text" in frame.columns else frame.columns[0]
    return [str(t) for t in frame[column].tolist()]


def load_model(model_uri: str, tracking_uri: str | None = None) -> Any:
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise HPNInputError(f"--model: cannot load {model_uri!r} from {uri} ({first})") from None


def predict_command(model_uri: str, texts: list[str], input_path: str | None,
                    output_path: str | None, tracking_uri: str | None) -> dict[str, Any]:
    if input_path:
        texts = list(texts) + read_texts(input_path)
    if not texts:
        raise HPNInputError("predict: give texts as arguments or --input FILE")
    frame = load_model(model_uri, tracking_uri).predict(pd.DataFrame({"text": texts}))
    frame.insert(0, "text", texts)
    if output_path:
        out = Path(output_path)
        if out.suffix == ".csv":
            frame.to_csv(out, index=False)
        elif out.suffix in (".jsonl", ".json"):
            frame.to_json(out, orient="records", lines=True)
        else:
            raise HPNInputError(f"--output: {str(out)!r} must end in .jsonl or .csv")
        print(f"wrote {len(frame)} predictions to {out}")
    for row in frame.head(20).itertuples():
        print(f"  {row.label:<16} {row.score:.3f}  {row.text[:70]}")
    return {"count": len(frame), "predictions": frame[["label", "score"]].to_dict("records")}


def serve_command(model_uri: str, port: int, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--host", host, "--port", str(port), "--env-manager", "local"]


def serve(model_uri: str, port: int, tracking_uri: str | None, host: str = "127.0.0.1") -> None:
    uri = resolve_tracking_uri(tracking_uri)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    # MLflow starts the scoring server as `bash -c "exec uvicorn ..."`: put our interpreter's
    # bin first on PATH so a venv that was never activated still finds its own uvicorn.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    print(f"serving {model_uri} at http://{host}:{port}/invocations", flush=True)
    os.execvpe(sys.executable, serve_command(model_uri, port, host), env)


def ui(tracking_uri: str | None, port: int, host: str = "127.0.0.1",
       experiment: str = "hpn-tune") -> None:
    """`mlflow ui` on the store, printing the page of the experiment's runs (in the UI's model
    training mode; MLflow 3 opens on GenAI pages otherwise), or the front page before the
    first study made the experiment."""
    from tuning.tracking import experiment_id_if_any, runs_view_url

    uri = resolve_tracking_uri(tracking_uri)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # where a browser here finds it
    url = runs_view_url(f"http://{shown}:{port}", experiment_id_if_any(uri, experiment))
    print(f"MLflow UI for {uri} at {url}", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--registry-store-uri", uri, "--host", host, "--port", str(port),
           # One local user: one worker answers in about a third of the time on 2 cores.
           "--workers", "1", "--uvicorn-opts", "--log-level warning --no-access-log"]
    # Nor does a local browse need MLflow's GenAI job runner (seven more processes), or
    # Starlette's deprecation warnings about MLflow's own server code.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PYTHONWARNINGS": "ignore:starlette.middleware.wsgi is deprecated", **os.environ}
    os.execvpe(sys.executable, cmd, env)


def dashboard(optuna_storage: str | None, tracking_uri: str | None, study: str | None,
              port: int, host: str = "127.0.0.1", experiment: str = "hpn-tune") -> None:
    """optuna-dashboard on the studies' Optuna storage, in this process (a storage URL with
    a password is never handed to another process's command line). Which storage: --optuna-storage, else the
    one --study recorded, else the default beside the MLflow store."""
    from optuna_dashboard import run_server

    from tuning import optuna_store

    uri = resolve_tracking_uri(tracking_uri)
    url = optuna_store.resolve_storage(optuna_storage, uri) if optuna_storage else None
    if url is None and study:
        url = _study_storage(uri, experiment, study)
    url = url or optuna_store.default_storage(uri)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise HPNInputError(f"--optuna-storage: no Optuna storage at {url}; run a study first "
                            "(hpn-tune run) or pass the storage it used")
    storage = optuna_store.open_storage(url)
    names = sorted(s.study_name for s in storage.get_all_studies())
    if study and study not in names:
        raise HPNInputError(f"--study: no study {study!r} in {optuna_store.redact(url)}; it holds: "
                            f"{', '.join(names) or 'none'}")
    page = f"http://{host}:{port}/dashboard"
    if study:
        page += f"/studies/{storage.get_study_id_from_name(study)}"
    print(f"optuna-dashboard on {optuna_store.redact(url)} ({len(names)} studies: "
          f"{', '.join(names) or 'none yet'}) at {page}", flush=True)
    run_server(storage, host=host, port=port)


def _study_storage(tracking_uri: str, experiment: str, study: str) -> str | None:
    """The Optuna storage a study recorded: None when it recorded none (or there is no store
    yet); refused in one line when its URL needs a password the tag does not hold."""
    from mlflow.tracking import MlflowClient

    from tuning.tracking import OPTUNA_STORAGE_TAG, find_study_run

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return None  # no MLflow store there yet: do not create one just to look
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    run_id = find_study_run(client, exp.experiment_id, study) if exp else None
    stored = client.get_run(run_id).data.tags.get(OPTUNA_STORAGE_TAG) if run_id else None
    if stored and "***" in stored:
        raise HPNInputError(f"--optuna-storage: study {study!r}'s storage {stored} needs its "
                            "password; pass the full URL with --optuna-storage")
    return stored
