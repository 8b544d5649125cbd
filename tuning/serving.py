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


def ui(tracking_uri: str | None, port: int, host: str = "127.0.0.1") -> None:
    uri = resolve_tracking_uri(tracking_uri)
    print(f"MLflow UI for {uri} at http://{host}:{port}", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", host, "--port", str(port)]
    os.execvp(sys.executable, cmd)
