"""`hpn-tune export`: a logged or registered model as one ONNX graph, checked, logged, served.

The model loads through `tuning.serving.load_model` (the verified loader `predict` and `serve`
use). Its whole-model graph (hpn/export.py) must predict what the model's pyfunc predicts on
fixed sample texts (identical with fp32; at least 99% with int8) before anything is written:
then the graph goes to --output and, as `export/model[-int8].onnx` with its agreement, to the
model's run. `--register` logs an MLflow LoggedModel from the same run whose `hpn` artifact
carries the graph and registers it as a new version, tagged `hpn.serving_format`; `predict`,
`serve` and the registration check then run the graph (tuning.pyfunc's load_context).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hpn.errors import HPNInputError

FORMATS = ("onnx",)
EXPORT_ARTIFACT_DIR = "export"  # on the model's run: export/model.onnx, export/model-int8.onnx


def check_output(path: str) -> Path:
    """--output must be a new or replaceable file in an existing, writable folder."""
    out = Path(path)
    if out.is_dir():
        raise HPNInputError(f"--output: {path!r} is a folder; give a file path such as model.onnx")
    if not out.parent.resolve().is_dir():
        raise HPNInputError(f"--output: folder {str(out.parent)!r} does not exist")
    if not os.access(out.parent.resolve(), os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise HPNInputError(f"--output: {path!r} is not writable; choose another path")
    return out


def frame_prediction(frame: pd.DataFrame, model: Any) -> Any:
    """The pyfunc's answer (its predictions frame) as an `hpn.model.Prediction`."""
    from hpn.model import Prediction
    from tuning.pyfunc import (
        LABEL_COLUMN,
        LABELS_COLUMN,
        PREDICTION_COLUMN,
        SCORE_PREFIX,
        model_task,
    )

    scores = (frame[[SCORE_PREFIX + c for c in model.label_names]].to_numpy(np.float64)
              if model.head is not None else None)
    labels = frame[LABEL_COLUMN].tolist() if LABEL_COLUMN in frame else None
    sets = [list(x) for x in frame[LABELS_COLUMN]] if LABELS_COLUMN in frame else None
    values = frame[PREDICTION_COLUMN].to_numpy(np.float64) if PREDICTION_COLUMN in frame else None
    return Prediction(model_task(model), list(model.label_names), scores, labels, sets, values)


def _write(path: Path, data: bytes) -> None:
    """Atomically (a temp file beside it, then a rename): a reader never sees half a graph."""
    from hpn.runtimes import _write_atomic

    try:
        _write_atomic(path, data)
    except OSError as exc:
        raise HPNInputError(f"--output: cannot write {str(path)!r} ({exc.strerror})") from None


def _registered_name(model_uri: str) -> str | None:
    """`hpn-persona` of models:/hpn-persona@champion or models:/hpn-persona/3; None for a
    models:/<model_id>, runs:/ or a path."""
    if not model_uri.startswith("models:/"):
        return None
    rest = model_uri[len("models:/"):]
    if "@" in rest:
        return rest.split("@", 1)[0]
    name, _, version = rest.rpartition("/")
    return name if name and version.isdigit() else None


def export_command(model_uri: str, fmt: str, int8: bool, output: str,
                   tracking_uri: str | None = None, register: bool = False,
                   model_name: str | None = None, sample: int | None = None) -> dict[str, Any]:
    """Export, check, write, log (and with `register`, register); returns what --json prints."""
    from mlflow.tracking import MlflowClient

    from hpn.export import SAMPLE_SIZE, check_graph, export_model, graph_sha256, sample_texts
    from hpn.export import serving_format as format_of
    from tuning.pyfunc import TEXT_COLUMN, log_pyfunc, served_model
    from tuning.serving import load_model
    from tuning.tracking import resolve_tracking_uri

    if fmt not in FORMATS:
        raise HPNInputError(f"--format: unknown format {fmt!r}; the one there is: onnx "
                            "(add --int8 for int8 weights)")
    if sample is not None and sample < 50:
        raise HPNInputError(f"--sample: {sample} texts are too few to check an export; give >= 50")
    out = check_output(output)
    serving_format = format_of(int8)
    name = model_name or _registered_name(model_uri)
    if register and not name:
        raise HPNInputError(f"--model-name: {model_uri!r} is not a registered model's URI; name "
                            "the registered model the export joins")
    uri = resolve_tracking_uri(tracking_uri)
    loaded = load_model(model_uri, uri)
    model = served_model(loaded)
    if model.serves_graph:
        raise HPNInputError(f"--model: {model_uri!r} already serves an ONNX graph; export the "
                            "torch version it came from")
    if model.encoder_cfg.runtime == "onnx-int8" and not model.fine_tuned and not int8:
        raise HPNInputError(f"--int8: {model_uri!r} was trained on encoder.runtime=onnx-int8 "
                            "embeddings, which an fp32 graph does not reproduce; add --int8")
    run_id = loaded.metadata.run_id
    if register and run_id is None:
        raise HPNInputError(f"--register: {model_uri!r} has no MLflow run to register from")

    texts = sample_texts(sample or SAMPLE_SIZE)
    expected = frame_prediction(loaded.predict(pd.DataFrame({TEXT_COLUMN: texts})), model)
    graph = export_model(model, int8)
    agreement = check_graph(model, graph, int8, texts, expected)  # ExportMismatch: nothing written
    _write(out, graph)
    result: dict[str, Any] = {
        "model": model_uri, "format": serving_format, "output": str(out), "bytes": len(graph),
        "sha256": graph_sha256(graph), "agreement": agreement.to_dict(), "run_id": run_id}
    if run_id:
        client = MlflowClient(uri, uri)
        stem = "model-int8" if int8 else "model"
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / f"{stem}.onnx").write_bytes(graph)
            header = {k: result[k] for k in ("model", "format", "bytes", "sha256", "agreement")}
            (Path(tmp) / f"{stem}.json").write_text(json.dumps(header, indent=1))
            client.log_artifacts(run_id, tmp, EXPORT_ARTIFACT_DIR)
        result["artifact"] = f"runs:/{run_id}/{EXPORT_ARTIFACT_DIR}/{stem}.onnx"
        if register:
            from tuning.registry import register_export

            logged_uri = log_pyfunc(client, run_id, model, graph, serving_format)
            version = register_export(client, run_id, logged_uri[len("models:/"):], name,
                                      serving_format)
            result.update(model_name=name, version=version, logged_model=logged_uri)
    print(f"exported {model_uri} as {serving_format} ({len(graph) / 2**20:.1f} MiB) to {out}: "
          f"{agreement.summary()} against its pyfunc"
          + (f"; logged to run {run_id}" if run_id else "")
          + (f"; registered as {name} version {result['version']}" if register else ""))
    return result
