"""The MLflow UI shows a study as a study: one real study, then what its store holds.

Each completed trial's model is an MLflow 3 LoggedModel carrying the trial's params and final
metrics (the experiment's Models tab), the corpus is a dataset input of the study's run and of
every trial's, the registered version carries a model card instead of a config dump, and
`hpn-tune ui` prints the page of the experiment's runs. Through a real MLflow server, as a
study on a Ray cluster logs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from hpn import metrics as M
from tuning import serving
from tuning.pyfunc import MODEL_ARTIFACT, MODEL_TYPE, run_model
from tuning.registry import MODEL_CARD_FILE, promote
from tuning.study import StudyOptions, run_study
from tuning.tracking import (
    DATASET_CONTEXT_TAG,
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    NOTE_TAG,
    STATE_TAG,
    STUDY_DATASET_CONTEXT,
    STUDY_TAG,
    TRIAL_DATASET_CONTEXT,
    TRIAL_ID_TAG,
    ensure_experiment,
    experiment_id_if_any,
    runs_view_url,
    trial_runs,
)

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "mlflow-ui-test"  # its own experiment on the session's shared server
JS_BUNDLE = Path(mlflow.__file__).parent / "server/js/build"  # the UI `mlflow ui` serves


@dataclass
class Study:
    client: MlflowClient
    uri: str
    experiment_id: str
    summary: dict
    parent: object  # mlflow Run
    trials: list  # completed trial runs
    model_name: str


@pytest.fixture(scope="module")
def study(tmp_path_factory, cache_dir, mlflow_server, ray_runtime) -> Study:
    tmp = tmp_path_factory.mktemp("ui_study")
    model_name = f"hpn-ui-{uuid.uuid4().hex[:8]}"
    summary = run_study(StudyOptions(
        space="quick", trials=3, overrides=["data.size=600", f"encoder.cache_dir={cache_dir}"],
        name="ui-study", tracking_uri=mlflow_server, experiment=EXPERIMENT,
        storage_path=str(tmp / "ray"), optuna_storage=f"sqlite:///{tmp / 'optuna.db'}",
        max_concurrent=2, scheduler="fifo", model_name=model_name,
    ))
    client = MlflowClient(mlflow_server, mlflow_server)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = trial_runs(client, experiment_id, summary["parent_run_id"])
    completed = [r for r in runs if r.data.tags.get(STATE_TAG) == "completed"]
    assert len(completed) == summary["trials_completed"] == 3
    return Study(client, mlflow_server, experiment_id, summary,
                 client.get_run(summary["parent_run_id"]), completed, model_name)


# -- each trial's model is a LoggedModel ---------------------------------------------------

def test_each_completed_trial_has_one_logged_model_with_its_params(study):
    models = study.client.search_logged_models(experiment_ids=[study.experiment_id])
    by_run = {m.source_run_id: m for m in models}
    assert len(models) == len(by_run) == len(study.trials)
    for run in study.trials:
        model = by_run[run.info.run_id]
        assert model.name == MODEL_ARTIFACT and model.model_type == MODEL_TYPE
        assert model.status == LoggedModelStatus.READY
        assert model.params == run.data.params
        assert model.tags[STUDY_TAG] == "ui-study"
        assert model.tags[TRIAL_ID_TAG] == run.data.tags[TRIAL_ID_TAG]
        assert run.info.run_name in model.tags[NOTE_TAG]  # its description in the Models tab
        assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]


def test_the_final_metrics_are_linked_to_the_model_and_its_dataset(study):
    fingerprint = study.parent.data.tags["hpn.dataset_fingerprint"]
    for run in study.trials:
        model = run_model(study.client, run.info.run_id)
        linked = {m.key: m for m in model.metrics}
        assert {M.VAL_ACCURACY, M.TEST_ACCURACY, M.TEST_MACRO_F1} <= set(linked)
        for key in (M.VAL_ACCURACY, M.TEST_ACCURACY):
            assert linked[key].value == pytest.approx(run.data.metrics[key])
            assert linked[key].dataset_name == "synthetic-600"
            assert fingerprint.startswith(linked[key].dataset_digest)
        # linking logs the same points again: MLflow keeps one, the history does not grow
        history = study.client.get_metric_history(run.info.run_id, M.VAL_ACCURACY)
        assert sorted(m.step for m in history) == [1, 2, 3]


def test_the_models_tab_orders_models_by_validation_accuracy(study):
    best = study.client.search_logged_models(
        experiment_ids=[study.experiment_id],
        order_by=[{"field_name": f"metrics.{M.VAL_ACCURACY}", "ascending": False}])
    top = {m.key: m.value for m in best[0].metrics}[M.VAL_ACCURACY]
    assert top == pytest.approx(study.summary["best_val_accuracy"])
    # trials may tie on validation accuracy (3 epochs, ~90 validation texts): the study's best
    # is then one of the models at the top, whichever order the tab shows ties in
    tied = [m.source_run_id for m in best
            if {x.key: x.value for x in m.metrics}[M.VAL_ACCURACY] == pytest.approx(top)]
    assert study.summary["best_run_id"] in tied


# -- the corpus is a dataset input -----------------------------------------------------------

def test_the_study_and_every_trial_log_the_corpus_as_a_dataset_input(study):
    fingerprint = study.parent.data.tags["hpn.dataset_fingerprint"]
    for run, context in [(study.parent, STUDY_DATASET_CONTEXT),
                         *((t, TRIAL_DATASET_CONTEXT) for t in study.trials)]:
        (item,) = run.inputs.dataset_inputs
        dataset = item.dataset
        assert dataset.name == "synthetic-600" and dataset.source_type == "code"
        assert len(fingerprint) == 64 and fingerprint.startswith(dataset.digest)
        profile = json.loads(dataset.profile)
        assert profile["fingerprint"] == fingerprint
        assert profile["num_rows"] == sum(profile["label_counts"].values()) == 600
        assert sum(profile["split"].values()) == 600
        columns = json.loads(dataset.schema)["mlflow_colspec"]
        assert [c["name"] for c in columns] == ["text", "label"]
        assert {t.key: t.value for t in item.tags}[DATASET_CONTEXT_TAG] == context


# -- the registered version --------------------------------------------------------------------

def test_the_registered_version_has_a_model_card_and_no_config_tag(study):
    version = study.summary["registered_version"]
    mv = study.client.get_model_version(study.model_name, version)
    best = study.client.get_run(study.summary["best_run_id"])

    assert "config" not in mv.tags
    assert {"study", "trial", "dataset_fingerprint", f"metric.{M.VAL_ACCURACY}"} <= set(mv.tags)
    card = mv.description
    assert card.startswith(f"# `models:/{study.model_name}/{version}`")
    assert best.info.run_name in card and "synthetic-600" in card
    val, test = best.data.metrics[M.VAL_ACCURACY], best.data.metrics[M.TEST_ACCURACY]
    assert f"| accuracy | {val:.4f} | {test:.4f} |" in card  # validation first, test beside
    assert "`text`" in card and "score_<class>" in card and "hpn-tune predict --model" in card
    # the same card as a file beside the model, and inside the model's own files
    logged = run_model(study.client, best.info.run_id)
    assert mv.source == logged.artifact_location
    run_files = {f.path for f in study.client.list_artifacts(best.info.run_id)}
    model_files = {f.path for f in study.client.list_logged_model_artifacts(logged.model_id)}
    assert MODEL_CARD_FILE in run_files and {MODEL_CARD_FILE, "MLmodel"} <= model_files
    versions = json.loads(logged.tags["mlflow.modelVersions"])
    assert {(v["name"], str(v["version"])) for v in versions} == {(study.model_name, version)}


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_the_champion_predicts_like_the_trial_model_it_came_from(study, tmp_path):
    promote(study.client, study.model_name)
    texts = ["A pediatric nurse who volunteers at a rural clinic.",
             "A tax lawyer in Lyon who follows court rulings."]
    # `runs:/<run>/model` still loads: MLflow finds the run's LoggedModel by its name
    code = ("import sys, json, mlflow, pandas as pd; mlflow.set_tracking_uri(sys.argv[1]); "
            "m = mlflow.pyfunc.load_model(sys.argv[2]); "
            "print(json.dumps(m.predict(pd.DataFrame({'text': sys.argv[3:]}))['label'].tolist()))")
    trial = subprocess.run(
        [sys.executable, "-c", code, study.uri, f"runs:/{study.summary['best_run_id']}/model", *texts],
        capture_output=True, text=True, cwd=tmp_path, env=_subprocess_env(), timeout=300, check=False)
    assert trial.returncode == 0, trial.stderr[-2000:]

    champion = subprocess.run(
        [sys.executable, "-m", "tuning.cli", "predict", "--model", f"models:/{study.model_name}@champion",
         "--tracking-uri", study.uri, "--json", *texts],
        capture_output=True, text=True, cwd=ROOT, env=_subprocess_env(), timeout=300, check=False)
    assert champion.returncode == 0, champion.stderr[-2000:]

    expected = json.loads(trial.stdout.strip().splitlines()[-1])
    predictions = json.loads(champion.stdout.strip().splitlines()[-1])["predictions"]
    assert [p["label"] for p in predictions] == expected


# -- hpn-tune ui -------------------------------------------------------------------------------

def test_the_ui_url_lands_on_the_experiments_runs_in_model_training_mode():
    assert runs_view_url("http://127.0.0.1:5000/", "7") == \
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert runs_view_url("http://127.0.0.1:5000", None) == "http://127.0.0.1:5000"


def test_the_mlflow_ui_bundle_has_that_route_and_mode():
    bundle = "".join(p.read_text(errors="ignore") for p in (JS_BUNDLE / "static/js").glob("*.js"))
    assert '"/experiments/:experimentId/runs"' in bundle
    assert '"workflowType"' in bundle and 'MACHINE_LEARNING="machine_learning"' in bundle


def test_ui_prints_the_runs_page_of_the_experiment_or_the_front_page(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(serving.os, "execvpe", lambda exe, cmd, env: started.append((cmd, env)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    serving.ui(uri, 5999)  # no store yet: the front page, and no store made to look
    assert capsys.readouterr().out.strip().endswith("at http://127.0.0.1:5999")
    assert not (tmp_path / "mlflow.db").exists()

    experiment_id = ensure_experiment(MlflowClient(uri), "hpn-tune", uri)
    serving.ui(uri, 5999, host="0.0.0.0")
    assert capsys.readouterr().out.strip().endswith(
        f"at http://127.0.0.1:5999/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    cmd, env = started[-1]
    assert cmd[cmd.index("ui") + 1:] == [
        "--backend-store-uri", uri, "--registry-store-uri", uri, "--host", "0.0.0.0",
        "--port", "5999", "--workers", "1", "--uvicorn-opts", "--log-level warning --no-access-log"]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # no GenAI job runner
    assert experiment_id_if_any(uri, "no-such-experiment") is None


def test_a_new_experiment_is_marked_as_model_training(study):
    tags = study.client.get_experiment(study.experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND



def test_ui_on_a_tracking_server_prints_the_servers_own_page_and_starts_nothing(
        mlflow_server, monkeypatch, capsys):
    """`mlflow ui` cannot open an http:// store (it wants a database): the server is the UI."""
    from conftest import free_port

    from hpn.errors import HPNInputError

    started = []
    monkeypatch.setattr(serving.os, "execvpe", lambda *a: started.append(a))
    serving.ui(mlflow_server, 5999)
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"MLflow UI: the tracking server serves it at {mlflow_server}")
    assert started == []
    with pytest.raises(HPNInputError, match="--tracking-uri: the MLflow server at .* does not answer"):
        serving.ui(f"http://127.0.0.1:{free_port()}", 5999)
