"""What a model of each task answers, wherever it answers: in process, `hpn-tune predict`
(table, --json, --output CSV and JSONL), the scoring server, and the registration check.

classification: label, score, score_<class>...; regression: prediction (the target in its
units); multilabel: labels (a list of label names; "|"-joined in a CSV cell) and
score_<label>...; joint: the classification columns plus prediction. Each task's model is
trained for real (tiny: 300 texts, 2 epochs), saved as every trial saves it, and loaded
through the checked loader.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import test_model_safety as safety
from conftest import restored_mlflow_uris, served_in_thread

from hpn.config import load_config
from hpn.tasks import CLASSIFICATION, JOINT, MULTILABEL, REGRESSION, TASKS
from hpn.train import train
from tuning import model_check
from tuning.cli import main
from tuning.pyfunc import (
    LABEL_SET_SEPARATOR,
    TARGET_METADATA,
    TARGET_RANGE_METADATA,
    TASK_METADATA,
    output_columns,
    predictions_frame,
    save_pyfunc,
    signature_for,
    task_of_columns,
)
from tuning.serving import _check_csv_label_sets, load_model, scoring_app

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "A pediatric nurse in her forties who volunteers at a rural clinic.",
    "A 27-year-old software engineer who maintains open-source compilers.",
    "A history teacher nearing retirement who restores old furniture.",
]
tracking_uri = safety.tracking_uri  # a store of the test's own, MLflow's globals restored

COLUMNS = {  # the columns before the per-class / per-label scores, and after them
    CLASSIFICATION: (["label", "score"], []),
    REGRESSION: ([], ["prediction"]),
    MULTILABEL: (["labels"], []),
    JOINT: (["label", "score"], ["prediction"]),
}


def _expected_columns(task: str, label_names: list[str]) -> list[str]:
    before, after = COLUMNS[task]
    scores = [] if task == REGRESSION else [f"score_{n}" for n in label_names]
    return [*before, *scores, *after]


@pytest.fixture(scope="module", params=TASKS)
def trained(request, cache_dir, tmp_path_factory):
    """(task, the trained model, its pyfunc directory): trained as a trial trains, saved as a
    trial saves its model."""
    task = request.param
    cfg = load_config(None, [
        f"model.task={task}", "data.size=300", "train.epochs=2", f"encoder.cache_dir={cache_dir}",
        "model.prototype_dim=16", "train.batch_size=64",
    ])
    model = train(cfg).model.cpu().eval()
    assert model.task == task
    return task, model, save_pyfunc(model, tmp_path_factory.mktemp(f"model-{task}") / "model")


@pytest.fixture(scope="module", autouse=True)
def _restore_mlflow_uris():
    """`load_model` sets MLflow's global tracking and registry URIs (and the env vars MLflow
    mirrors them to): put them back, so later modules' clients see a clean process."""
    with restored_mlflow_uris():
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _assert_well_formed(frame: pd.DataFrame, task: str, label_names: list[str], n: int) -> None:
    assert list(frame.columns) == _expected_columns(task, label_names)
    assert len(frame) == n
    if task in (CLASSIFICATION, JOINT):
        assert all(isinstance(x, str) and x in label_names for x in frame["label"])
        assert frame["score"].dtype == np.float64
    if task == MULTILABEL:
        for chosen in frame["labels"]:
            assert isinstance(chosen, list) and all(isinstance(x, str) for x in chosen)
            assert set(chosen) <= set(label_names) and len(set(chosen)) == len(chosen)
    if task in (REGRESSION, JOINT):
        assert frame["prediction"].dtype == np.float64
        assert np.isfinite(frame["prediction"]).all()
    scores = frame[[c for c in frame.columns if c.startswith("score")]]
    assert all(dtype == np.float64 for dtype in scores.dtypes)
    assert np.isfinite(scores.to_numpy()).all() and (abs(scores.to_numpy()) <= 1 + 1e-5).all()


# -- in process: the checked loader, the frame, the signature --------------------------------

def test_the_loaded_model_answers_the_tasks_columns_as_the_trained_model_predicts(
        trained, tracking_uri):
    task, model, model_dir = trained
    truth = model.predict_all(TEXTS)

    frame = load_model(str(model_dir), tracking_uri).predict(pd.DataFrame({"text": TEXTS}))

    _assert_well_formed(frame, task, model.label_names, len(TEXTS))
    if task in (CLASSIFICATION, JOINT):
        assert frame["label"].tolist() == truth.labels
        assert frame["score"].to_numpy() == pytest.approx(truth.scores.max(1), abs=1e-5)
    if task == MULTILABEL:
        assert frame["labels"].tolist() == truth.label_sets
        # The set is the saved decision rule applied to these very scores.
        assert any(frame["labels"].map(len) > 0)
    if task != REGRESSION:
        for j, name in enumerate(model.label_names):
            assert frame[f"score_{name}"].to_numpy() == pytest.approx(truth.scores[:, j], abs=1e-5)
    if task in (REGRESSION, JOINT):
        assert frame["prediction"].to_numpy() == pytest.approx(truth.values, rel=1e-5)
        low, high = model.target_range
        assert ((frame["prediction"] >= low - 1e-3) & (frame["prediction"] <= high + 1e-3)).all()


def test_the_signature_and_metadata_describe_the_frame(trained):
    from mlflow.models import Model
    from mlflow.types.utils import _infer_schema

    task, model, model_dir = trained
    frame = predictions_frame(model, TEXTS)
    meta = Model.load(str(model_dir))

    outputs = meta.signature.outputs
    assert outputs.input_names() == list(frame.columns)
    assert outputs.input_types() == _infer_schema(frame).input_types()
    assert meta.signature.inputs.input_names() == ["text"]
    assert task_of_columns(outputs.input_names()) == task
    assert meta.metadata[TASK_METADATA] == task
    if task in (REGRESSION, JOINT):
        assert meta.metadata[TARGET_RANGE_METADATA] == list(model.target_range)
        assert meta.metadata.get(TARGET_METADATA) == model.target_name
    else:
        assert TARGET_METADATA not in meta.metadata and TARGET_RANGE_METADATA not in meta.metadata


def test_no_texts_is_an_empty_frame_with_the_tasks_columns(trained):
    task, model, _ = trained
    frame = predictions_frame(model, [])
    assert list(frame.columns) == _expected_columns(task, model.label_names) and frame.empty


@pytest.mark.parametrize("task", TASKS)
def test_the_signature_of_each_task_names_its_columns_and_types(task):
    names = ["law", "health"]
    outputs = signature_for(names, task).outputs
    assert outputs.input_names() == _expected_columns(task, names)
    assert task_of_columns(outputs.input_names()) == task
    kinds = {c["name"]: c["type"] for c in outputs.to_dict()}
    assert kinds == {k: {"label": "string", "labels": "array"}.get(k, "double") for k in kinds}
    if task == MULTILABEL:
        assert outputs.to_dict()[0]["items"] == {"type": "string"}
    assert [name for name, _ in output_columns(task, names)] == outputs.input_names()


def test_a_classification_signature_is_what_it_was_before_tasks():
    assert signature_for(["a", "b"]).outputs.to_dict() == [
        {"type": "string", "name": "label", "required": True},
        {"type": "double", "name": "score", "required": True},
        {"type": "double", "name": "score_a", "required": True},
        {"type": "double", "name": "score_b", "required": True},
    ]
    assert task_of_columns(["label", "score", "score_a"]) == CLASSIFICATION


# -- the registration check -------------------------------------------------------------------

def test_the_registration_check_passes_a_good_model_of_every_task(trained, tracking_uri):
    assert model_check.check(str(trained[2]), tracking_uri) is None


def test_the_fresh_process_check_passes_the_new_output_types(trained, store):
    if trained[0] not in (REGRESSION, MULTILABEL):  # a fresh process costs ~15 s a model
        pytest.skip("its columns are checked in process above, and in test_registry.py")
    assert model_check.check_in_fresh_process(str(trained[2]), store) is None


def _good_frame(task: str) -> pd.DataFrame:
    frame = pd.DataFrame({"label": ["law", "health"], "score": [0.9, 0.8],
                          "labels": [["law"], ["health", "law"]],
                          "score_law": [0.9, 0.3], "score_health": [0.1, 0.8],
                          "prediction": [41.5, 63.0]})
    return frame[_expected_columns(task, ["law", "health"])]


@pytest.mark.parametrize(("task", "broken", "why"), [
    (REGRESSION, lambda f: f.assign(prediction=[1.0, float("nan")]), "predicted values are not all finite"),
    (REGRESSION, lambda f: f.assign(prediction=[1.0, float("inf")]), "predicted values are not all finite"),
    (REGRESSION, lambda f: f.assign(prediction=["41", "63"]), "predicted values are not all finite"),
    (REGRESSION, lambda f: f.assign(prediction=[41.5, 99.0]), "outside its target range"),
    (REGRESSION, lambda f: f.drop(columns="prediction"), "no prediction column"),
    (JOINT, lambda f: f.drop(columns="prediction"), "no prediction column"),
    (JOINT, lambda f: f.assign(label=["law", "chef"]), "not its classes: chef"),
    (JOINT, lambda f: f.assign(prediction=[float("nan"), 1.0]), "not all finite"),
    (MULTILABEL, lambda f: f.assign(labels=[["law"], ["chef", "law"]]), "not its labels: chef"),
    (MULTILABEL, lambda f: f.assign(labels=["law", "health|law"]), "text 0 is a str, not a list"),
    (MULTILABEL, lambda f: f.assign(labels=[["law", "law"], []]), "names a label twice"),
    (MULTILABEL, lambda f: f.assign(score_law=[0.2, float("nan")]), "scores are not all finite"),
    (MULTILABEL, lambda f: f.drop(columns="labels"), "no labels column"),
    (MULTILABEL, lambda f: f.drop(columns="score_law"), "no score_law column"),
    (MULTILABEL, lambda f: f.head(1), "1 predictions for 2 texts"),
    (CLASSIFICATION, lambda f: f.assign(extra=[1, 2]), "signature does not declare: extra"),
    (CLASSIFICATION, lambda f: f[["score", "label", "score_law", "score_health"]], "order"),
])
def test_the_registration_check_names_what_is_wrong_with_an_answer(task, broken, why):
    texts, classes = ["a", "b"], {"law", "health"}
    declared = _expected_columns(task, ["law", "health"])
    target_range = [20.0, 80.0] if task in (REGRESSION, JOINT) else None
    good = _good_frame(task)
    assert model_check.output_problem(good, texts, classes, task, declared, target_range) is None
    problem = model_check.output_problem(broken(good), texts, classes, task, declared, target_range)
    assert problem is not None and why in problem, problem


def test_an_empty_label_set_is_a_valid_multilabel_answer():
    frame = _good_frame(MULTILABEL).assign(labels=[[], ["law"]])
    assert model_check.output_problem(frame, ["a", "b"], {"law", "health"}, MULTILABEL) is None


# -- hpn-tune predict -------------------------------------------------------------------------

def test_hpn_tune_predict_json_gives_the_tasks_answer(trained, store):
    task, model, model_dir = trained
    proc = subprocess.run(
        [sys.executable, "-m", "tuning.cli", "predict", "--model", str(model_dir), *TEXTS[:2],
         "--tracking-uri", store, "--json"],
        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300, check=False)

    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    truth = model.predict_all(TEXTS[:2])
    assert result["task"] == task and result["count"] == 2
    keys = {CLASSIFICATION: ["label", "score"], REGRESSION: ["prediction"],
            MULTILABEL: ["labels", *(f"score_{n}" for n in model.label_names)],
            JOINT: ["label", "score", "prediction"]}[task]
    assert all(list(p) == keys for p in result["predictions"])
    table = "\n".join(lines[:-1])
    if task in (CLASSIFICATION, JOINT):
        assert [p["label"] for p in result["predictions"]] == truth.labels
        assert all(p["label"] in table for p in result["predictions"])
    if task == MULTILABEL:
        assert [p["labels"] for p in result["predictions"]] == truth.label_sets
        assert all(isinstance(p["labels"], list) for p in result["predictions"])
    if task in (REGRESSION, JOINT):
        values = [p["prediction"] for p in result["predictions"]]
        assert all(isinstance(v, float) and math.isfinite(v) for v in values)
        assert values == pytest.approx(truth.values, rel=1e-5)
        assert f"{values[0]:.2f}" in table
        if model.target_name:
            assert result["target"] == model.target_name and model.target_name in table
    else:
        assert "target" not in result
    assert TEXTS[0][:60] in table


def test_predict_output_files_hold_every_column_and_label_sets_survive_both(
        trained, tmp_path, tracking_uri, capsys):
    task, model, model_dir = trained
    csv_out, jsonl_out = tmp_path / "out.csv", tmp_path / "out.jsonl"
    for out in (csv_out, jsonl_out):
        code = main(["predict", "--model", str(model_dir), *TEXTS, "--tracking-uri", tracking_uri,
                     "--output", str(out)])
        assert code == 0, capsys.readouterr().err
    columns = ["text", *_expected_columns(task, model.label_names)]
    truth = model.predict_all(TEXTS)

    from_csv = pd.read_csv(csv_out, dtype={"label": str, "labels": str}, keep_default_na=False)
    from_jsonl = pd.read_json(jsonl_out, lines=True)
    assert list(from_csv.columns) == columns and list(from_jsonl.columns) == columns
    assert from_csv["text"].tolist() == TEXTS == from_jsonl["text"].tolist()
    if task == MULTILABEL:
        # CSV: one cell joined on "|" (the default data.label_separator, so the file reads
        # back as multi-label data); JSONL: a JSON array.
        split = [cell.split(LABEL_SET_SEPARATOR) if cell else [] for cell in from_csv["labels"]]
        assert split == truth.label_sets == from_jsonl["labels"].tolist()
    if task in (REGRESSION, JOINT):
        assert from_csv["prediction"].to_numpy() == pytest.approx(truth.values, rel=1e-5)
        assert from_jsonl["prediction"].to_numpy() == pytest.approx(truth.values, rel=1e-5)


def test_a_csv_of_label_sets_is_refused_when_a_label_holds_the_separator():
    from hpn.errors import HPNInputError

    def loaded(names: list[str], task: str) -> SimpleNamespace:
        return SimpleNamespace(metadata=SimpleNamespace(signature=signature_for(names, task)))

    with pytest.raises(HPNInputError, match=r"label 'a\|b' contains '\|'.*write \.jsonl"):
        _check_csv_label_sets(loaded(["a|b", "c"], MULTILABEL))
    _check_csv_label_sets(loaded(["a|b", "c"], CLASSIFICATION))  # one label per cell: fine
    _check_csv_label_sets(loaded(["a", "c"], MULTILABEL))


# -- the scoring server -----------------------------------------------------------------------

def _post(port: int, body: str, content_type: str = "application/json",
          path: str = "/invocations") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, body, {"Content-Type": content_type})
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def test_the_scoring_server_answers_the_tasks_columns_as_json(trained, tracking_uri):
    """`hpn-tune serve`'s app (MLflow's scoring server and /predict behind our guard) on each task's model,
    served by uvicorn in a thread; tests/tuning/test_serving.py runs the command itself."""
    task, model, model_dir = trained
    app = scoring_app(load_model(str(model_dir), tracking_uri), 100_000)
    with served_in_thread(app) as port:
        status, answer = _post(port, json.dumps({"inputs": {"text": TEXTS}}))
        csv_status, csv_answer = _post(port, pd.DataFrame({"text": TEXTS}).to_csv(index=False),
                                       "text/csv")
        fast_status, fast_answer = _post(port, json.dumps({"inputs": {"text": TEXTS}}),
                                         path="/predict")

    assert status == 200 and csv_status == 200 and fast_status == 200, (answer, csv_answer)
    rows = answer["predictions"]
    assert csv_answer["predictions"] == rows
    assert fast_answer == answer  # /predict: the same JSON without MLflow's DataFrame round trip
    assert [list(r) for r in rows] == [_expected_columns(task, model.label_names)] * len(TEXTS)
    truth = model.predict_all(TEXTS)
    if task in (CLASSIFICATION, JOINT):
        assert [r["label"] for r in rows] == truth.labels
    if task == MULTILABEL:
        assert [r["labels"] for r in rows] == truth.label_sets  # JSON arrays of label names
    if task in (REGRESSION, JOINT):
        assert [r["prediction"] for r in rows] == pytest.approx(truth.values, rel=1e-5)
    if task != REGRESSION:
        first = [r[f"score_{model.label_names[0]}"] for r in rows]
        assert first == pytest.approx(truth.scores[:, 0], abs=1e-5)


# -- a trial's LoggedModel ------------------------------------------------------------------------

def test_a_trials_logged_model_is_described_by_its_tasks_metrics_and_passes_the_check(
        trained, tracking_uri):
    """As a trial logs its model: the description and the first linked metrics are the
    task's primary (validation, then test) ones, and `models:/<id>` passes the check."""
    from mlflow.tracking import MlflowClient

    from tuning.pyfunc import log_pyfunc
    from tuning.tracking import NOTE_TAG

    task, model, _ = trained
    if task == CLASSIFICATION:
        pytest.skip("tests/tuning/test_mlflow_ui.py covers a classifier's LoggedModel")
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("outputs")
    run = client.create_run(experiment, run_name="trial-0")
    metrics = {REGRESSION: {"val_mae": 3.5, "test_mae": 3.75, "val_loss": 0.2},
               MULTILABEL: {"val_micro_f1": 0.5, "test_micro_f1": 0.25, "val_loss": 0.2},
               JOINT: {"val_accuracy": 0.5, "test_accuracy": 0.25, "val_mae": 3.5,
                       "test_mae": 3.75, "val_loss": 0.2}}[task]
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value, step=2)
    client.set_terminated(run.info.run_id)

    uri = log_pyfunc(client, run.info.run_id, model)

    logged = client.get_logged_model(uri.removeprefix("models:/"))
    note = logged.tags[NOTE_TAG]
    assert note.startswith(f"HPN persona {task} model from trial run `trial-0`")
    headline = [k for k in metrics if k != "val_loss"]
    assert note.split(": ", 1)[1].startswith(", ".join(f"{k} {metrics[k]:.4f}" for k in headline))
    assert [m.key for m in logged.metrics][:len(headline)] == headline
    assert model_check.check(uri, tracking_uri) is None
