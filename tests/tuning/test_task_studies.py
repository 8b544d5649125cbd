"""One study per non-classification task, end to end: regression, multilabel and joint.

Each is a real (small) study on the synthetic corpus, through the session's Ray runtime and
MLflow server: its trials log the task's metrics and the per-epoch history of its primary
metric, the best trial is the one with the best primary metric in the task's direction, the
study's run carries the task and `best_<primary>`, the best model is registered, promoted to
champion by its own metric, and `models:/<name>@champion` served over HTTP answers with the
task's columns. The issue's quality bars are checked where a 600-text, few-epoch study can
show them: regression beats the training-mean baseline on test MAE, multi-label beats the
most-frequent-label and the all-negative baselines on test micro-F1.

Sizes: 600 texts, 3 trials (2 at a time, FIFO: every trial completes), 3-4 epochs, and a
fixed sampler seed so the proposed configs are the same on every run.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import time
import uuid
from dataclasses import dataclass

import pytest
from conftest import restored_mlflow_uris, served_in_thread
from mlflow.tracking import MlflowClient

from hpn import metrics as M
from hpn.config import load_config
from hpn.data import load_corpus
from hpn.tasks import JOINT, MULTILABEL, REGRESSION, TaskSpec, task_spec
from tuning.registry import CHAMPION, TASK_VERSION_TAG, promote
from tuning.serving import load_model, scoring_app
from tuning.study import StudyOptions, run_study
from tuning.tracking import STATE_TAG, STUDY_TAG, TASK_TAG, trial_runs

EXPERIMENT = "task-studies-test"  # its own experiment on the session's shared server
SIZE, TRIALS, SEED = 600, 3, 7

#: Epochs per task: regression's cosine-to-target loss needs a little longer than the others.
EPOCHS = {REGRESSION: 4, MULTILABEL: 3, JOINT: 4}

REGRESSION_METRICS = {M.VAL_MAE, M.TEST_MAE, M.TEST_RMSE, M.TEST_R2, M.MEAN_BASELINE_MAE,
                      M.VAL_RMSE, M.VAL_R2, M.VAL_MEAN_BASELINE_MAE, M.TARGET_LOW, M.TARGET_HIGH}
MULTILABEL_METRICS = {
    M.VAL_MICRO_F1, M.VAL_MACRO_F1, M.TEST_MICRO_F1, M.TEST_MACRO_F1,
    M.TEST_MICRO_PRECISION, M.TEST_MACRO_PRECISION, M.TEST_MICRO_RECALL, M.TEST_MACRO_RECALL,
    M.TEST_HAMMING_LOSS, M.TEST_SUBSET_ACCURACY, M.TEST_PRED_CARDINALITY,
    M.TEST_TRUE_CARDINALITY, M.MOST_FREQUENT_BASELINE_MICRO_F1,
    M.VAL_MOST_FREQUENT_BASELINE_MICRO_F1, M.ALL_NEGATIVE_BASELINE_MICRO_F1,
}
CLASSIFICATION_METRICS = {M.VAL_ACCURACY, M.TEST_ACCURACY, M.TEST_MACRO_F1}
TASK_METRICS = {
    REGRESSION: REGRESSION_METRICS,
    MULTILABEL: MULTILABEL_METRICS,
    JOINT: REGRESSION_METRICS | CLASSIFICATION_METRICS,  # both sets
}
#: Metrics the trainer reports every epoch (logged with step = epoch), beside the losses and
#: the task's primary metric (`per_epoch` adds it: whatever `task_spec` says it is).
PER_EPOCH = {
    REGRESSION: [M.VAL_MAE],
    MULTILABEL: [M.VAL_MICRO_F1, M.VAL_MACRO_F1],
    JOINT: [M.VAL_ACCURACY, M.VAL_MAE],
}


def per_epoch(task: str) -> list[str]:
    return list(dict.fromkeys([task_spec(task).primary, *PER_EPOCH[task]]))


def final_metrics(task: str) -> set[str]:
    """The task's metric set, with its primary and test primary whatever they are."""
    spec = task_spec(task)
    return TASK_METRICS[task] | {spec.primary, spec.test_primary}

# Personas with their age written the ways the synthetic corpus writes it (digits, a decade, a
# life stage, years of experience), from several domains.
PERSONAS = [
    "A 27-year-old software engineer who maintains open-source compilers.",
    "A pediatric nurse in her forties who volunteers at a rural clinic.",
    "A history teacher nearing retirement who restores old furniture.",
    "A family lawyer with twenty years of experience who offers pro bono legal advice.",
]


@dataclass
class Study:
    task: str
    spec: TaskSpec
    client: MlflowClient
    uri: str
    summary: dict
    parent: object  # mlflow Run
    trials: list  # completed trial runs
    model_name: str
    label_names: list[str]
    elapsed_s: float

    @property
    def best(self):
        return next(r for r in self.trials if r.info.run_id == self.summary["best_run_id"])


@pytest.fixture(scope="module", params=[REGRESSION, MULTILABEL, JOINT])
def study(request, tmp_path_factory, cache_dir, mlflow_server, ray_runtime) -> Study:
    task = request.param
    tmp = tmp_path_factory.mktemp(f"{task}_study")
    name = f"{task}-study-{uuid.uuid4().hex[:6]}"
    model_name = f"hpn-{task}-{uuid.uuid4().hex[:8]}"
    overrides = [f"data.size={SIZE}", f"train.epochs={EPOCHS[task]}",
                 f"encoder.cache_dir={cache_dir}"]
    started = time.time()
    # A registry URI left in the process (mlflow.set_registry_uri, as loading a model does, or
    # the env var) must not take the study's registrations away from its --tracking-uri.
    stray = tmp / "stray-registry.db"
    before = os.environ.get("MLFLOW_REGISTRY_URI")
    os.environ["MLFLOW_REGISTRY_URI"] = f"sqlite:///{stray}"
    try:
        summary = run_study(StudyOptions(
            space=task, trials=TRIALS, overrides=overrides, name=name,
            tracking_uri=mlflow_server, experiment=EXPERIMENT, storage_path=str(tmp / "ray"),
            optuna_storage=f"sqlite:///{tmp / 'optuna.db'}", max_concurrent=2, scheduler="fifo",
            seed=SEED, model_name=model_name,
        ))
    finally:
        if before is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)
        else:
            os.environ["MLFLOW_REGISTRY_URI"] = before
    assert not stray.exists()
    elapsed = time.time() - started
    client = MlflowClient(mlflow_server, mlflow_server)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = trial_runs(client, experiment_id, summary["parent_run_id"])
    completed = [r for r in runs if r.data.tags.get(STATE_TAG) == "completed"]
    assert len(completed) == summary["trials_completed"] == TRIALS, summary
    labels = load_corpus(load_config(None, overrides + [f"model.task={task}"]).data,
                         task).label_names
    print(f"\n[{task}] study {name}: {elapsed:.1f} s")
    return Study(task, task_spec(task), client, mlflow_server, summary,
                 client.get_run(summary["parent_run_id"]), completed, model_name,
                 list(labels), elapsed)


# -- the trials ----------------------------------------------------------------------------

def test_the_study_is_of_its_task_and_every_trial_trained_it(study):
    assert study.summary["task"] == study.task
    assert study.summary["best_metric"] == study.spec.primary
    assert study.summary["best_mode"] == study.spec.mode
    for run in study.trials:
        assert run.data.tags[TASK_TAG] == study.task
        assert run.data.params["model.task"] == study.task
        assert run.data.params["train.epochs"] == str(EPOCHS[study.task])


def test_every_completed_trial_logs_the_tasks_metrics(study):
    for run in study.trials:
        missing = final_metrics(study.task) - set(run.data.metrics)
        assert not missing, f"{run.info.run_name} lacks {sorted(missing)}"
        for key in final_metrics(study.task):
            assert math.isfinite(run.data.metrics[key]), (run.info.run_name, key)
        m = run.data.metrics
        if study.task == MULTILABEL:
            # the decision rule chosen on validation is logged: a threshold or a k, not both
            assert (M.DECISION_THRESHOLD in m) != (M.DECISION_TOP_K in m)
            assert m[M.ALL_NEGATIVE_BASELINE_MICRO_F1] == 0.0
            for key in (M.TEST_MICRO_F1, M.TEST_MACRO_F1, M.TEST_HAMMING_LOSS,
                        M.TEST_SUBSET_ACCURACY, M.TEST_MICRO_PRECISION, M.TEST_MICRO_RECALL):
                assert 0.0 <= m[key] <= 1.0, key
        if study.task in (REGRESSION, JOINT):
            assert m[M.TARGET_LOW] < m[M.TARGET_HIGH]
            assert m[M.TEST_RMSE] >= m[M.TEST_MAE] >= 0


def test_every_completed_trial_logs_its_primary_metric_per_epoch(study):
    epochs = list(range(1, EPOCHS[study.task] + 1))
    for run in study.trials:
        for key in per_epoch(study.task):
            history = study.client.get_metric_history(run.info.run_id, key)
            assert sorted(h.step for h in history) == epochs, (run.info.run_name, key)
            last = max(history, key=lambda h: h.step)
            assert last.value == pytest.approx(run.data.metrics[key])


# -- the best trial and the study's run --------------------------------------------------

def test_the_best_trial_has_the_best_primary_metric_in_the_tasks_direction(study):
    primary = study.spec.primary
    values = {r.info.run_id: r.data.metrics[primary] for r in study.trials}
    pick = min if study.spec.mode == "min" else max
    best = pick(values.values())
    tied = [run_id for run_id, v in values.items() if v == pytest.approx(best)]
    print(f"\n[{study.task}] {primary} per trial: "
          f"{sorted(round(v, 4) for v in values.values())}, best {best:.4f}")
    assert study.summary["best_run_id"] in tied
    assert study.summary["best_value"] == pytest.approx(best)
    assert study.summary["best_test_value"] == pytest.approx(
        study.best.data.metrics[study.spec.test_primary])


def test_the_study_run_carries_the_task_and_its_best_primary_metric(study):
    parent = study.parent
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[TASK_TAG] == study.task
    assert parent.data.tags[STUDY_TAG] == study.summary["study"]
    best = study.best.data.metrics
    assert parent.data.metrics[f"best_{study.spec.primary}"] == pytest.approx(
        best[study.spec.primary])
    assert parent.data.metrics[f"best_{study.spec.test_primary}"] == pytest.approx(
        best[study.spec.test_primary])
    if study.task == REGRESSION:
        assert M.VAL_ACCURACY not in {k[len("best_"):] for k in parent.data.metrics
                                      if k.startswith("best_")}
        assert study.summary["best_val_accuracy"] is None


# -- registered, promoted by its own metric ----------------------------------------------

def test_the_best_model_is_registered_with_its_task(study):
    assert study.summary["registration_refused"] is None, study.summary["registration_refused"]
    version = study.summary["registered_version"]
    assert version is not None
    mv = study.client.get_model_version(study.model_name, version)
    assert mv.run_id == study.summary["best_run_id"]
    assert mv.tags[TASK_VERSION_TAG] == study.task
    assert mv.tags["study"] == study.summary["study"]
    assert float(mv.tags[f"metric.{study.spec.primary}"]) == pytest.approx(
        study.best.data.metrics[study.spec.primary], abs=1e-6)


def test_promote_by_the_study_uses_the_tasks_primary_metric_and_makes_it_champion(study):
    result = promote(study.client, study.model_name, study=study.summary["study"])
    assert result["promoted"] is True, result
    assert result["task"] == study.task
    assert result["metric"] == study.spec.primary and result["mode"] == study.spec.mode
    assert result["test_metric"] == study.spec.test_primary
    assert result["version"] == str(study.summary["registered_version"])
    assert result["candidate_value"] == pytest.approx(
        study.best.data.metrics[study.spec.primary], abs=1e-6)
    champion = study.client.get_model_version_by_alias(study.model_name, CHAMPION)
    assert str(champion.version) == str(study.summary["registered_version"])
    assert champion.tags[TASK_VERSION_TAG] == study.task
    again = promote(study.client, study.model_name, study=study.summary["study"])
    assert again["promoted"] is False and "already champion" in again["reason"]


# -- the champion, served over HTTP ----------------------------------------------------------

@pytest.fixture(scope="module")
def served(study):
    """`models:/<name>@champion` through tuning.serving's loader and scoring app, served by
    uvicorn in a thread on a free port: (port, the loaded model). Needs the promote test to
    have run (it does: tests run in file order); promotes itself otherwise."""
    if study.client.get_registered_model(study.model_name).aliases.get(CHAMPION) is None:
        promote(study.client, study.model_name, study=study.summary["study"])
    with restored_mlflow_uris():  # load_model sets them globally
        model = load_model(f"models:/{study.model_name}@{CHAMPION}", study.uri)
        with served_in_thread(scoring_app(model, 100_000)) as port:
            yield port, model


def _post(port: int, payload: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/invocations", json.dumps(payload),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_the_served_champion_answers_with_the_tasks_output(study, served):
    import pandas as pd

    port, model = served
    status, answer = _post(port, {"inputs": {"text": PERSONAS}})
    assert status == 200, answer
    rows = answer["predictions"]
    assert len(rows) == len(PERSONAS)
    # what the server says is what the loaded champion predicts in process
    local = model.predict(pd.DataFrame({"text": PERSONAS}))
    best = study.best.data.metrics
    names = study.label_names
    scores = [f"score_{n}" for n in names]
    print(f"\n[{study.task}] served:")
    for text, row in zip(PERSONAS, rows):
        print(f"  {json.dumps(row)[:200]}  <- {text[:50]}")

    if study.task == REGRESSION:
        assert [set(r) for r in rows] == [{"prediction"}] * len(rows)
    if study.task in (REGRESSION, JOINT):
        low, high = best[M.TARGET_LOW], best[M.TARGET_HIGH]
        values = [r["prediction"] for r in rows]
        assert all(isinstance(v, float) and low - 1e-6 <= v <= high + 1e-6 for v in values), \
            (values, low, high)
        assert values == pytest.approx(local["prediction"].tolist(), rel=1e-6)
    if study.task == JOINT:
        assert [set(r) for r in rows] == [{"label", "score", "prediction", *scores}] * len(rows)
        assert all(r["label"] in names for r in rows)
        assert [r["label"] for r in rows] == local["label"].tolist()
        for r in rows:  # the label is the argmax class and its score the max
            assert r["score"] == pytest.approx(max(r[s] for s in scores), abs=1e-6)
            assert r["score"] == pytest.approx(r[f"score_{r['label']}"], abs=1e-6)
    if study.task == MULTILABEL:
        assert [set(r) for r in rows] == [{"labels", *scores}] * len(rows)
        assert [r["labels"] for r in rows] == [list(x) for x in local["labels"]]
        for r in rows:
            assert isinstance(r["labels"], list) and set(r["labels"]) <= set(names)
            assert len(set(r["labels"])) == len(r["labels"])
            chosen = [r[f"score_{n}"] for n in r["labels"]]
            others = [r[f"score_{n}"] for n in names if n not in r["labels"]]
            # either decision rule picks the highest-scoring labels
            if chosen and others:
                assert min(chosen) >= max(others) - 1e-9
            if M.DECISION_TOP_K in best:
                assert len(r["labels"]) == int(best[M.DECISION_TOP_K])
            else:
                t = best[M.DECISION_THRESHOLD]
                clear = [n for n in names if abs(r[f"score_{n}"] - t) > 1e-6]
                assert [n for n in clear if n in r["labels"]] == \
                    [n for n in clear if r[f"score_{n}"] >= t]


# -- the quality bars, on the best model ----------------------------------------------

def test_the_best_model_beats_the_tasks_trivial_baselines(study):
    m = study.best.data.metrics
    if study.task in (REGRESSION, JOINT):
        ratio = m[M.TEST_MAE] / m[M.MEAN_BASELINE_MAE]
        print(f"\n[{study.task}] best test_mae {m[M.TEST_MAE]:.3f} / mean_baseline_mae "
              f"{m[M.MEAN_BASELINE_MAE]:.3f} = {ratio:.3f} (issue's bar at full size: <= 0.7); "
              f"test_r2 {m[M.TEST_R2]:.3f}; val_mae {m[M.VAL_MAE]:.3f} / "
              f"{m[M.VAL_MEAN_BASELINE_MAE]:.3f}")
        assert m[M.TEST_MAE] < m[M.MEAN_BASELINE_MAE]
    if study.task == JOINT:
        print(f"[{study.task}] best test_accuracy {m[M.TEST_ACCURACY]:.3f}, val_accuracy "
              f"{m[M.VAL_ACCURACY]:.3f} (val majority baseline "
              f"{m.get(M.VAL_MAJORITY_BASELINE_ACCURACY, float('nan')):.3f})")
    if study.task == MULTILABEL:
        f1 = m[M.TEST_MICRO_F1]
        print(f"\n[{study.task}] best test_micro_f1 {f1:.3f} vs most_frequent_baseline_micro_f1 "
              f"{m[M.MOST_FREQUENT_BASELINE_MICRO_F1]:.3f} (ratio "
              f"{f1 / max(m[M.MOST_FREQUENT_BASELINE_MICRO_F1], 1e-12):.2f}) and all-negative "
              f"{m[M.ALL_NEGATIVE_BASELINE_MICRO_F1]:.3f}; macro_f1 {m[M.TEST_MACRO_F1]:.3f}, "
              f"micro P/R {m[M.TEST_MICRO_PRECISION]:.3f}/{m[M.TEST_MICRO_RECALL]:.3f}, hamming "
              f"{m[M.TEST_HAMMING_LOSS]:.4f}, subset acc {m[M.TEST_SUBSET_ACCURACY]:.3f}, "
              f"cardinality pred/true {m[M.TEST_PRED_CARDINALITY]:.2f}/"
              f"{m[M.TEST_TRUE_CARDINALITY]:.2f}")
        assert f1 > m[M.MOST_FREQUENT_BASELINE_MICRO_F1]
        assert f1 > m[M.ALL_NEGATIVE_BASELINE_MICRO_F1] and f1 > 0
        assert m[M.TEST_PRED_CARDINALITY] > 0  # it predicts labels, not (almost) nothing
