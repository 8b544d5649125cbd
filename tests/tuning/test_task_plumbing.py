"""Each study's task, not val_accuracy-up, drives tuning/: the best trial, the registration
gate, promote's direction, the reports, the study commands. Fast: hand-made runs in a local
SQLite MLflow store and hand-made frames; no Ray cluster, no MLflow server, no training."""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from hpn import metrics as M
from hpn.errors import ConfigError, HPNInputError
from hpn.tasks import task_spec
from tuning import registry, tracking
from tuning.cli import main
from tuning.progress import StudyProgress, resumed
from tuning.registry import (
    CHAMPION,
    PromotionRefused,
    baseline_problem,
    card_metrics,
    metric_mode,
    model_card,
    promote,
)
from tuning.report import (
    best_config,
    draw_heatmap,
    edge_data,
    heatmap_data,
    write_optuna_plots,
    write_study_report,
)
from tuning.spaces import load_space

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- the best trial ----------------------------------------------------------------------------

def _trials(values: list[float], tests: list[float], groups: list[str] | None = None,
            metric: str = M.VAL_MAE, test: str = M.TEST_MAE) -> pd.DataFrame:
    n = len(values)
    return pd.DataFrame({
        "run_id": [f"r{i}" for i in range(n)], "trial_id": [f"t{i}" for i in range(n)],
        "config_group": groups or [f"t{i}" for i in range(n)], "state": ["completed"] * n,
        "order": range(n), metric: values, test: tests,
        "params.model.prototype_dim": [16, 32, 64, 16, 32, 64][:n],
        "params.train.lr": [0.01, 0.02, 0.03, 0.2, 0.3, 0.4][:n],
        M.NUM_PROTOTYPES: [2.0] * n,
    })


def test_best_config_with_mode_min_picks_the_lowest_and_reports_its_test_counterpart():
    trials = _trials([3.0, 2.1, 4.5], [3.2, 2.4, 4.0])
    best = best_config(trials, M.VAL_MAE, "min")
    assert best.run["run_id"] == "r1"
    assert (best.objective_mean, best.test_mean) == (2.1, 2.4)  # test_mae, found by its name
    # the same frame maximised picks the worst error: mode really decides
    assert best_config(trials, M.VAL_MAE, "max").run["run_id"] == "r2"


def test_best_config_with_mode_min_averages_repeats_and_takes_the_lowest_mean():
    # a: one lucky repeat (1.0) but mean 3.0; b: mean 2.0
    trials = _trials([1.0, 5.0, 2.1, 1.9], [9.0, 9.0, 2.0, 2.2], groups=["a", "a", "b", "b"])
    best = best_config(trials, M.VAL_MAE, "min")
    assert best.run["config_group"] == "b" and best.run["run_id"] == "r3"  # b's lowest repeat
    assert best.objective_mean == pytest.approx(2.0) and best.test_mean == pytest.approx(2.1)
    assert best.repeats == 2


def test_best_config_defaults_stay_val_accuracy_up():
    trials = _trials([0.7, 0.9], [0.6, 0.8], metric=M.VAL_ACCURACY, test=M.TEST_ACCURACY)
    best = best_config(trials)
    assert best.run["run_id"] == "r1" and best.test_mean == 0.8


# -- the registration gate -------------------------------------------------------------------

@pytest.mark.parametrize(("val", "base", "margin", "passes", "why"), [
    (3.0, 4.0, 0.02, True, None),
    (3.95, 4.0, 0.02, False, "--baseline-margin asks for more"),  # below, not by 2% of 4.0
    (3.95, 4.0, 0.0, True, None),
    (3.5, 4.0, 0.2, False, "--baseline-margin asks for more"),  # cut at 4.0 x 0.8 = 3.2
    (3.1, 4.0, 0.2, True, None),
    (4.5, 4.0, 0.02, False, "diverged or untrained"),
    (float("nan"), 4.0, 0.02, False, "diverged or untrained"),
])
def test_a_regression_model_must_be_below_the_mean_baseline_by_a_fraction_of_it(
        val, base, margin, passes, why):
    problem = baseline_problem({M.VAL_MAE: val, M.VAL_MEAN_BASELINE_MAE: base}, margin,
                               "regression")
    assert (problem is None) == passes, problem
    if not passes:
        assert "\n" not in problem and why in problem
        assert "val_mae" in problem and "mean-target baseline" in problem
        assert f"{base:.4f}" in problem and f"{base * (1 - margin):.4f}" in problem
        assert "fraction of the baseline" in problem


@pytest.mark.parametrize(("val", "base", "margin", "passes"), [
    (0.55, 0.30, 0.02, True),
    (0.31, 0.30, 0.02, False),  # above, but not by two points
    (0.20, 0.30, 0.0, False),
])
def test_a_multilabel_model_must_beat_the_most_frequent_label_by_points(val, base, margin, passes):
    problem = baseline_problem({M.VAL_MICRO_F1: val, M.VAL_MOST_FREQUENT_BASELINE_MICRO_F1: base},
                               margin, "multilabel")
    assert (problem is None) == passes
    if not passes:
        assert "val_micro_f1" in problem and "most-frequent-label baseline" in problem


def test_a_joint_model_must_pass_both_gates_and_the_refusal_names_the_failing_one():
    good = {M.VAL_ACCURACY: 0.8, M.VAL_MAJORITY_BASELINE_ACCURACY: 0.2,
            M.VAL_MAE: 2.0, M.VAL_MEAN_BASELINE_MAE: 4.0}
    assert baseline_problem(good, 0.02, "joint") is None
    problem = baseline_problem({**good, M.VAL_MAE: 4.1}, 0.02, "joint")
    assert "val_mae" in problem and "val_accuracy" not in problem
    both = baseline_problem({**good, M.VAL_MAE: 4.1, M.VAL_ACCURACY: 0.1}, 0.02, "joint")
    assert "val_mae" in both and "val_accuracy" in both and "\n" not in both
    # a missing baseline is named, never taken from test
    assert M.VAL_MEAN_BASELINE_MAE in baseline_problem(
        {M.VAL_MAE: 1.0, M.MEAN_BASELINE_MAE: 9.0}, 0.02, "regression")


def test_the_classification_gate_reads_as_it_always_did():
    problem = baseline_problem({M.VAL_ACCURACY: 0.044, M.VAL_MAJORITY_BASELINE_ACCURACY: 0.189},
                               0.02)
    assert problem == ("its val_accuracy 0.0440 does not beat the majority-class baseline "
                       "0.1890 by more than 0.02 (diverged or untrained)")


def test_each_gate_is_the_tasks_own():
    for task in ("classification", "regression", "multilabel", "joint"):
        for gate in task_spec(task).gates:
            assert gate.metric.startswith("val_") and gate.baseline.startswith("val_")
    assert [g.mode for g in task_spec("joint").gates] == ["max", "min"]


def test_metric_direction_follows_the_task_then_the_name():
    assert metric_mode(M.VAL_MAE, "regression") == "min"
    assert metric_mode(M.VAL_MAE, "joint") == "min"  # a gate of joint
    assert metric_mode(M.VAL_ACCURACY, "joint") == "max"
    assert metric_mode(M.VAL_MICRO_F1, "multilabel") == "max"
    assert metric_mode(M.VAL_LOSS, "classification") == "min"
    assert metric_mode(M.VAL_RMSE, "regression") == "min"
    assert metric_mode(M.VAL_MACRO_F1, "multilabel") == "max"


# -- promote: the metric's direction ----------------------------------------------------------

@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One SQLite MLflow store for the module's promote tests (making one costs seconds)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("artifact_path: model\n")
    return SimpleNamespace(uri=uri, client=client, model_dir=model_dir,
                           experiment=tracking.ensure_experiment(client, "hpn-tune", uri))


@pytest.fixture
def registry_store(sqlite_store: SimpleNamespace, request: pytest.FixtureRequest,
                   monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A registered model of its own (hand-made trial runs and versions) in the module's
    store. No model files are loaded: the fresh-process check is what test_registry covers,
    so it passes here."""
    uri, client, exp = sqlite_store.uri, sqlite_store.client, sqlite_store.experiment
    model_dir = sqlite_store.model_dir
    monkeypatch.setattr(registry, "_version_problem", lambda *a, **k: None)
    name = f"hpn-task-{request.node.name[5:40]}"
    client.create_registered_model(name)

    def version(study: str, task: str | None, metrics: dict[str, float],
                tag_task: bool = True) -> str:
        tags = {tracking.ROLE_TAG: "trial", tracking.STUDY_TAG: study,
                tracking.STATE_TAG: "completed"}
        if task is not None:
            tags[tracking.TASK_TAG] = task
        run = client.create_run(exp, run_name=f"{study}-t001", tags=tags).info.run_id
        for key, value in metrics.items():
            client.log_metric(run, key, value)
        client.set_terminated(run, "FINISHED")
        vtags = {"study": study, "dataset_fingerprint": "f" * 64}
        if tag_task and task is not None:
            vtags["task"] = task
        return str(client.create_model_version(name, model_dir.as_uri(), run_id=run,
                                               tags=vtags).version)

    return SimpleNamespace(uri=uri, client=client, name=name, version=version)


def test_each_task_registers_under_its_own_default_name():
    from tuning.registry import default_model_name

    assert [default_model_name(t) for t in (None, "classification", "regression", "multilabel",
                                            "joint")] == [
        "hpn-persona", "hpn-persona", "hpn-persona-regression", "hpn-persona-multilabel",
        "hpn-persona-joint"]


def test_a_model_of_another_task_is_not_registered_under_a_name_holding_one_task(registry_store):
    """models:/<name>@champion must keep answering in one shape: a regression run is refused
    under a registered model of classification versions, registering nothing."""
    from tuning.registry import RegistrationRefused, register_run

    s = registry_store
    s.version("cls", None, {M.VAL_ACCURACY: 0.9})  # untagged: registered before tasks
    s.version("reg", "regression", _regression(2.0, 2.1))  # made by hand, as an old registry
    runs = {v.tags["study"]: v.run_id for v in s.client.search_model_versions(f"name = '{s.name}'")}
    run, reg_run = runs["cls"], runs["reg"]
    other = f"{s.name}-cls-only"
    s.client.create_registered_model(other)
    s.client.create_model_version(other, "file:///nowhere", run_id=run, tags={"study": "cls"})

    with pytest.raises(RegistrationRefused) as refused:
        register_run(s.client, reg_run, other)

    text = str(refused.value)
    assert "\n" not in text and f"{other!r} holds classification models" in text
    assert "a regression one" in text and "--model-name" in text
    assert len(s.client.search_model_versions(f"name = '{other}'")) == 1  # nothing registered


def test_promote_finds_the_registered_model_of_the_study_or_run(registry_store):
    from tuning.registry import promote_model_name

    s = registry_store
    s.version("found-study", "regression", _regression(2.0, 2.1))
    run = next(v.run_id for v in s.client.search_model_versions(f"name = '{s.name}'")
               if v.tags.get("study") == "found-study")
    assert promote_model_name(s.client, "found-study", None) == s.name
    assert promote_model_name(s.client, None, run) == s.name
    assert promote_model_name(s.client, None, None) == "hpn-persona"
    # registered under a second name too: the task's own default name is the one promoted
    s.client.create_registered_model("hpn-persona-regression")
    s.client.create_model_version("hpn-persona-regression", "file:///nowhere", run_id=run,
                                  tags={"study": "found-study", "task": "regression"})
    assert promote_model_name(s.client, "found-study", None) == "hpn-persona-regression"
    # a run never registered: its task's default name (promote registers it there)
    loose = s.client.create_run(s.client.get_run(run).info.experiment_id,
                                tags={tracking.TASK_TAG: "multilabel"}).info.run_id
    assert promote_model_name(s.client, None, loose) == "hpn-persona-multilabel"


def _regression(mae: float, test: float) -> dict[str, float]:
    return {M.VAL_MAE: mae, M.TEST_MAE: test, M.VAL_MEAN_BASELINE_MAE: 6.0}


def test_promote_defaults_to_the_tasks_metric_and_a_lower_error_wins(registry_store):
    s = registry_store
    first = s.version("reg-a", "regression", _regression(3.0, 3.3))
    s.client.set_registered_model_alias(s.name, CHAMPION, first)
    second = s.version("reg-b", "regression", _regression(2.5, 2.7), tag_task=False)  # run tag

    result = promote(s.client, s.name, study="reg-b")

    assert result["promoted"] and result["metric"] == M.VAL_MAE and result["mode"] == "min"
    assert (result["candidate_value"], result["champion_value"]) == (2.5, 3.0)
    assert (result["candidate_test_value"], result["champion_test_value"]) == (2.7, 3.3)
    assert result["candidate_test_accuracy"] is None  # a regression run has no accuracy
    assert str(s.client.get_model_version_by_alias(s.name, CHAMPION).version) == second


def test_promote_refuses_a_higher_error_naming_metric_values_and_champion(registry_store):
    s = registry_store
    best = s.version("reg-a", "regression", _regression(2.5, 2.7))
    s.client.set_registered_model_alias(s.name, CHAMPION, best)
    s.version("reg-b", "regression", _regression(3.0, 3.1))

    with pytest.raises(PromotionRefused) as refused:
        promote(s.client, s.name, study="reg-b")

    text = str(refused.value)
    assert "val_mae 3.0000, test_mae 3.1000, not below champion version" in text
    assert f"champion version {best} at 2.5000, test_mae 2.7000" in text
    assert str(s.client.get_model_version_by_alias(s.name, CHAMPION).version) == best
    # the CLI: one line, exit 1
    assert main(["promote", "--study", "reg-b", "--model-name", s.name,
                 "--tracking-uri", s.uri]) == 1


def test_promote_on_the_cli_prints_the_tasks_metric(registry_store, capsys):
    s = registry_store
    first = s.version("ml-a", "multilabel", {M.VAL_MICRO_F1: 0.5, M.TEST_MICRO_F1: 0.45})
    s.client.set_registered_model_alias(s.name, CHAMPION, first)
    second = s.version("ml-b", "multilabel", {M.VAL_MICRO_F1: 0.6, M.TEST_MICRO_F1: 0.55})
    capsys.readouterr()

    code = main(["promote", "--study", "ml-b", "--model-name", s.name, "--tracking-uri", s.uri,
                 "--json"])

    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out[0] == (f"{s.name}@champion -> version {second} (val_micro_f1 0.6000, "
                      f"test_micro_f1 0.5500) (was version {first} at 0.5000, "
                      "test_micro_f1 0.4500)")
    assert json.loads(out[-1])["metric"] == M.VAL_MICRO_F1


def test_a_champion_of_another_task_is_not_compared_unless_forced(registry_store):
    s = registry_store
    champion = s.version("cls", None, {M.VAL_ACCURACY: 0.9, M.TEST_ACCURACY: 0.88})  # untagged
    s.client.set_registered_model_alias(s.name, CHAMPION, champion)
    candidate = s.version("reg", "regression", _regression(2.0, 2.1))

    with pytest.raises(PromotionRefused, match="is a regression model and champion version "
                                               f"{champion} a classification one"):
        promote(s.client, s.name, study="reg")
    result = promote(s.client, s.name, study="reg", force=True)
    assert result["promoted"] and result["champion_value"] is None
    assert str(s.client.get_model_version_by_alias(s.name, CHAMPION).version) == candidate


def test_a_baseline_is_no_metric_to_promote_on():
    client = SimpleNamespace()  # refused before the store is read
    with pytest.raises(HPNInputError, match="--metric val_mean_baseline_mae"):
        promote(client, metric=M.VAL_MEAN_BASELINE_MAE)


# -- the model card and the version's tags ------------------------------------------------------

def _run(task: str, metrics: dict[str, float], source: str = "synthetic") -> SimpleNamespace:
    params = {"data.source": source, "data.target_column": "years", "model.task": task,
              "encoder.name": "enc", "model.prototype_mode": "fixed"}
    return SimpleNamespace(
        data=SimpleNamespace(params=params, metrics=metrics, tags={tracking.TASK_TAG: task}),
        info=SimpleNamespace(run_name="s-t001", run_id="abc"))


def test_the_regression_card_shows_mae_rmse_r2_and_the_mean_baseline():
    card = model_card(_run("regression", {
        M.VAL_MAE: 3.1, M.TEST_MAE: 3.2, M.VAL_RMSE: 4.0, M.TEST_RMSE: 4.1, M.VAL_R2: 0.6,
        M.TEST_R2: 0.58, M.MEAN_BASELINE_MAE: 9.5, M.VAL_MEAN_BASELINE_MAE: 9.4,
        M.TARGET_LOW: 18.0, M.TARGET_HIGH: 80.0}), {"name": "synthetic-600"}, "models:/m/1")
    assert "HPN persona regressor" in card and "predicting age" in card
    for row in ("| MAE | 3.1000 | 3.2000 |", "| RMSE | 4.0000 | 4.1000 |", "| R2 | 0.6000 | 0.5800 |",
                "| MAE of the mean-target baseline | 9.4000 | 9.5000 |"):
        assert row in card
    assert "validation MAE (lower is better)" in card and "[18.00, 80.00]" in card
    assert "`prediction`" in card and "| accuracy |" not in card


def test_the_multilabel_card_shows_f1_precision_recall_hamming_and_the_baselines():
    metrics = {M.VAL_MICRO_F1: 0.7, M.TEST_MICRO_F1: 0.69, M.VAL_MACRO_F1: 0.6,
               M.TEST_MACRO_F1: 0.58, M.TEST_MICRO_PRECISION: 0.8, M.TEST_MICRO_RECALL: 0.6,
               M.TEST_MACRO_PRECISION: 0.7, M.TEST_MACRO_RECALL: 0.5, M.TEST_HAMMING_LOSS: 0.05,
               M.TEST_SUBSET_ACCURACY: 0.4, M.TEST_PRED_CARDINALITY: 1.1,
               M.TEST_TRUE_CARDINALITY: 1.3, M.MOST_FREQUENT_BASELINE_MICRO_F1: 0.2,
               M.VAL_MOST_FREQUENT_BASELINE_MICRO_F1: 0.21, M.ALL_NEGATIVE_BASELINE_MICRO_F1: 0.0,
               M.ALL_NEGATIVE_BASELINE_HAMMING_LOSS: 0.09, M.DECISION_TOP_K: 2.0}
    card = model_card(_run("multilabel", metrics), {"name": "x"}, "models:/m/2")
    for row in ("| micro F1 | 0.7000 | 0.6900 |", "| macro F1 | 0.6000 | 0.5800 |",
                "| micro precision | | 0.8000 |", "| macro recall | | 0.5000 |",
                "| Hamming loss | | 0.0500 |", "| subset accuracy | | 0.4000 |",
                "| labels per text | | 1.10 predicted / 1.30 true |",
                "| micro F1 of the most-frequent-label baseline | 0.2100 | 0.2000 |",
                "| micro F1 of predicting no label | | 0.0000 |",
                "| Hamming loss of predicting no label | | 0.0900 |"):
        assert row in card, row
    assert "top 2 labels per text" in card and "`labels`" in card


def test_the_classification_card_keeps_its_rows_and_a_joint_card_adds_the_regression_ones():
    cls = {M.VAL_ACCURACY: 0.8, M.TEST_ACCURACY: 0.79, M.TEST_MACRO_F1: 0.7}
    card = model_card(_run("classification", cls), {"name": "x"}, "models:/m/3")
    assert "| accuracy | 0.8000 | 0.7900 |" in card and "| MAE |" not in card
    assert "HPN persona classifier\n" in card
    joint = model_card(_run("joint", {**cls, M.VAL_MAE: 2.0, M.TEST_MAE: 2.1}), {"name": "x"},
                       "models:/m/4")
    assert "| accuracy | 0.8000 | 0.7900 |" in joint and "| MAE | 2.0000 | 2.1000 |" in joint
    assert "mean-target baseline" in joint
    assert set(card_metrics("joint")) >= {M.VAL_ACCURACY, M.VAL_MAE, M.VAL_MEAN_BASELINE_MAE}
    assert card_metrics("classification") == registry.CARD_METRICS


# -- search spaces ---------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["{type: categorical, choices: [classification, regression]}",
                                  "[classification, regression]"])
def test_a_searched_model_task_is_refused_in_one_line(tmp_path, task):
    path = tmp_path / "space.yaml"
    path.write_text(f"model.task: {task}\ntrain.lr: {{type: float, low: 0.01, high: 0.1}}\n")
    with pytest.raises(ConfigError) as refused:
        load_space(path)
    text = str(refused.value)
    assert "\n" not in text and "model.task" in text and "one task" in text
    assert "--set model.task=" in text


def test_a_space_searching_a_loss_its_task_cannot_use_is_refused_at_load(tmp_path):
    """Not in trial after trial: the space's load checks each choice against its task."""
    path = tmp_path / "space.yaml"
    path.write_text("model.task: regression\n"
                    "model.loss: {type: categorical, choices: [squared_cosine, cross_entropy]}\n")
    with pytest.raises(HPNInputError) as refused:
        load_space(path)
    text = str(refused.value)
    assert "\n" not in text and "model.loss=cross_entropy" in text and "regression" in text


def test_a_study_searching_a_key_its_task_ignores_is_refused_before_anything_runs(tmp_path, capsys):
    """The default space searches the class head's prototype_mode: with model.task=regression
    its trials would differ only by noise."""
    store = tmp_path / "mlflow.db"
    code = main(["run", "--space", "default", "--set", "model.task=regression", "--trials", "2",
                 "--tracking-uri", f"sqlite:///{store}", "--storage-path", str(tmp_path / "ray")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "model.prototype_mode changes nothing for model.task=regression" in err
    assert "search_spaces/regression.yaml" in err
    assert not (tmp_path / "ray").exists()  # refused before Ray or a run started


def test_a_space_loss_the_set_task_cannot_use_is_refused_before_anything_runs(tmp_path, capsys):
    """The task comes from --set, not the space: its losses are checked against that task."""
    space = tmp_path / "space.yaml"
    space.write_text("model.loss: {type: categorical, choices: [auto, cross_entropy]}\n")
    code = main(["run", "--space", str(space), "--set", "model.task=multilabel", "--trials", "2",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                 "--storage-path", str(tmp_path / "ray")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "model.loss=cross_entropy: model.task=multilabel cannot train with it" in err
    assert not (tmp_path / "ray").exists()


def test_model_task_as_a_constant_of_a_space_is_fine(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("model.task: regression\ntrain.lr: {type: float, low: 0.01, high: 0.1}\n")
    space = load_space(path)
    assert space.constants["model.task"] == "regression" and space.keys() == ["train.lr"]


def test_the_study_claims_its_optuna_study_in_the_tasks_direction(tmp_path):
    import optuna

    from hpn.config import Config
    from tuning.study import _claim_name, study_spec

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for name, task, sampler, want in (
            ("r", "regression", "tpe", [optuna.study.StudyDirection.MINIMIZE]),
            ("c", "classification", "tpe", [optuna.study.StudyDirection.MAXIMIZE]),
            ("m", "multilabel", "nsga2", [optuna.study.StudyDirection.MAXIMIZE,
                                          optuna.study.StudyDirection.MINIMIZE])):
        base = Config().with_updates({"model.task": task})
        assert study_spec(base).name == task
        _claim_name(SimpleNamespace(optuna_storage=storage, base=base, sampler=sampler), name)
        assert optuna.load_study(study_name=name, storage=storage).directions == want


# -- reports ---------------------------------------------------------------------------------

def test_the_study_report_for_a_min_objective_ranks_and_colours_lower_as_better(tmp_path):
    trials = _trials([3.0, 2.1, 4.5, 2.0, 2.2, 5.0], [3.2, 2.4, 4.0, 2.1, 2.3, 5.1])
    ranges = {"params.train.lr": (0.01, 0.4)}

    written = write_study_report(trials, tmp_path, M.VAL_MAE, ranges, mode="min")

    assert {p.name for p in written} == {"trials.csv", "edge_report.json", "val_mae_heatmap.png"}
    assert (tmp_path / "val_mae_heatmap.png").read_bytes()[:8] == PNG_MAGIC
    # the best 20% (2 of 6 rounds up to 2) are the lowest: lr 0.2 (2.0) and 0.02 (2.1)
    assert edge_data(trials, M.VAL_MAE, ranges, "min")["train.lr"]["n_best"] == 2
    fig = draw_heatmap(heatmap_data(trials, M.VAL_MAE), M.VAL_MAE, "min")
    ax = fig.axes[0]
    assert ax.images[0].get_cmap().name == "viridis_r"
    assert "val_mae" in ax.get_title() and "lower is better" in ax.get_title()
    assert fig.axes[1].get_ylabel() == M.VAL_MAE  # the colour bar names the metric


def test_the_seed_report_tables_carry_the_tasks_metrics_best_cell_first(tmp_path):
    from tuning.seed_report import write_seed_report

    trials = _trials([3.0, 2.1, 4.5], [3.2, 2.4, 4.0])
    write_seed_report(trials, ["train.lr"], tmp_path, task="regression")

    summary = pd.read_csv(tmp_path / "cell_summary.csv")
    assert list(summary["val_mae_mean"]) == [2.1, 3.0, 4.5]  # lowest error first
    assert "test_mae_mean" in summary.columns
    assert {M.VAL_MAE, M.TEST_MAE} <= set(pd.read_csv(tmp_path / "runs.csv").columns)


@pytest.mark.parametrize("task", ["regression", "multilabel"])
def test_the_seed_report_of_a_study_searching_the_dimension_skips_the_accuracy_plots(tmp_path, task):
    """The shipped regression and multi-label spaces search model.prototype_dim: the seed's
    accuracy-vs-dimension plots have no test_accuracy to draw, and the report is written
    without them (it crashed the study's end before)."""
    from tuning.seed_report import write_seed_report

    trials = _trials([3.0, 2.1, 4.5], [3.2, 2.4, 4.0])
    written = write_seed_report(trials, ["model.prototype_dim", "train.lr"], tmp_path, task=task)

    names = {p.name for p in written}
    assert {"runs.csv", "cell_summary.csv"} <= names
    assert not any(n.startswith("test_accuracy") for n in names)


def test_optunas_plots_draw_a_minimised_objective(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    rng = np.random.default_rng(0)
    for _ in range(6):
        trial = study.ask()
        x, y = trial.suggest_float("x", 0, 1), trial.suggest_int("y", 1, 4)
        for epoch in range(3):
            trial.report(float(3 - epoch + x + y + rng.random()), epoch)
        study.tell(trial, float(x + y))

    done = write_optuna_plots(study, tmp_path, M.VAL_MAE)

    for name in ("optimization_history.png", "intermediate_values.png", "slice.png"):
        assert done[name] == "written", done
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


# -- the live line ---------------------------------------------------------------------------

class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_live_line_keeps_the_lowest_error_as_best_and_names_the_metric():
    stream = _Tty()
    progress = StudyProgress("S", 3, stream=stream, task="regression", verbose=True)
    progress.trial_started("a", 1)
    progress.trial_finished("a", "completed", {M.VAL_MAE: 3.0, M.TEST_MAE: 3.3})
    progress.trial_started("b", 2)
    progress.trial_finished("b", "completed", {M.VAL_MAE: 4.0, M.TEST_MAE: 4.1})
    assert progress.best == (3.0, "S-t001")
    assert "best val_mae 3.0000 (S-t001)" in progress.line()
    progress.close()
    assert "S-t001 completed val_mae 3.0000 test_mae 3.3000" in stream.getvalue()


def test_a_resumed_regression_study_starts_from_its_lowest_error():
    start = resumed([("completed", 3.0, "S-t001"), ("completed", 2.0, "S-t002"),
                     ("pruned", 1.0, "S-t003")], mode="min")
    assert start["best"] == (2.0, "S-t002") and start["pruned"] == 1
    assert resumed([("completed", 3.0, "a"), ("completed", 2.0, "b")])["best"] == (3.0, "a")


def test_a_pruned_trial_names_the_metric_asha_ranked_it_by():
    from tuning.ray_tune import StudyContext, pruned_reason

    assert "its val_mae was above the cut-off" in pruned_reason(3, M.VAL_MAE, "min")
    assert "its val_accuracy was below the cut-off" in pruned_reason(3)
    ctx = StudyContext("s", "uri", "0", "p", {"model": {"task": "regression"}}, 0.0, ())
    assert ctx.task == "regression"
    assert StudyContext("s", "uri", "0", "p", {"model": {}}, 0.0, ()).task == "classification"


# -- studies / show / compare ----------------------------------------------------------------

STUDIES: dict[str, tuple[str | None, list[float]]] = {
    "cls": (None, [0.7, 0.8]), "reg": ("regression", [3.0, 2.0, 4.0]),
    "reg2": ("regression", [2.5, 2.6]), "old": (None, [0.6, 0.9]),
}


@pytest.fixture(scope="module")
def study_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """STUDIES, finished, as the driver leaves them: a parent run tagged with its task (None:
    a study from before tasks) and completed trial runs with the task's primary metric."""
    tmp_path = tmp_path_factory.mktemp("studies")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = tracking.ensure_experiment(client, "hpn-tune", uri)
    for name, (task, values) in STUDIES.items():
        spec = task_spec(task)
        tags = {tracking.STUDY_TAG: name, tracking.ROLE_TAG: "study", tracking.TRIALS_TAG:
                str(len(values)), tracking.SPACE_FILE_TAG: str(tmp_path / "gone.yaml")}
        if task is not None:
            tags[tracking.TASK_TAG] = task
        parent = client.create_run(exp, run_name=name, tags=tags).info.run_id
        for i, value in enumerate(values):
            run = client.create_run(exp, run_name=f"{name}-t{i + 1:03d}", tags={
                tracking.PARENT_TAG: parent, tracking.ROLE_TAG: "trial", tracking.STUDY_TAG: name,
                tracking.TRIAL_ID_TAG: f"{name}{i}", tracking.STATE_TAG: "completed"}).info.run_id
            client.log_param(run, "train.lr", 0.01 * (i + 1))
            client.log_metric(run, spec.primary, value)
            client.log_metric(run, spec.test_primary, value + 0.5)
            client.log_metric(run, M.RUNTIME_S, 1.0)
        client.set_terminated(parent, "FINISHED")
    return uri


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_compare_refuses_studies_of_different_tasks_in_one_line(study_uri, capsys):
    capsys.readouterr()  # MLflow's own lines while the store was made

    code = main(["compare", "cls", "reg", "--tracking-uri", study_uri])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "cls (classification)" in err and "reg (regression)" in err


def test_compare_of_regression_studies_ranks_by_the_lowest_mae(study_uri, tmp_path, capsys):
    plot = tmp_path / "compare.png"

    code = main(["compare", "reg", "reg2", "--tracking-uri", study_uri, "--output", str(plot),
                 "--json"])

    out = capsys.readouterr().out
    rows = {r["study"]: r for r in _last_json(out)["studies"]}
    assert code == 0 and plot.read_bytes()[:8] == PNG_MAGIC
    assert (rows["reg"]["best_metric"], rows["reg"]["best_value"]) == (M.VAL_MAE, 2.0)
    assert rows["reg"]["best_test_value"] == 2.5 and rows["reg"]["best_val_accuracy"] is None
    assert rows["reg2"]["median_value"] == pytest.approx(2.55)
    assert "best val_mae" in out and "test_mae of best" in out
    assert "(best is chosen on val_mae, lower is better;" in out


def test_show_and_studies_read_each_study_by_its_task(study_uri, capsys):
    uri = study_uri

    assert main(["show", "reg", "--tracking-uri", uri, "--json"]) == 0
    out = capsys.readouterr().out
    shown = _last_json(out)
    assert [t["val_mae"] for t in shown["trials"]] == [2.0, 3.0, 4.0]  # best (lowest) first
    assert shown["trial_metrics"] == [M.VAL_MAE, M.TEST_MAE, M.RUNTIME_S]
    assert (shown["task"], shown["best_metric"], shown["best_value"]) == ("regression", M.VAL_MAE, 2.0)
    assert "VAL_MAE" in out and "TEST_MAE" in out
    assert "best val_mae 2.0000 (test_mae 2.5000); promote it:" in out

    assert main(["show", "old", "--tracking-uri", uri, "--json"]) == 0
    out = capsys.readouterr().out
    old = _last_json(out)
    assert old["task"] == "classification" and old["best_val_accuracy"] == 0.9
    assert "VAL_ACC" in out and "best val_accuracy 0.9000 (test_accuracy 1.4000)" in out

    assert main(["studies", "--tracking-uri", uri, "--json"]) == 0
    out = capsys.readouterr().out
    rows = {r["study"]: r for r in _last_json(out)["studies"]}
    assert rows["reg"]["best_value"] == 2.0 and rows["reg"]["best_val_accuracy"] is None
    assert rows["old"]["best_val_accuracy"] == 0.9 and rows["old"]["task"] == "classification"
    assert "2.0000 val_mae" in out


def test_a_run_without_a_task_tag_is_classification_and_a_trial_param_is_read():
    run = SimpleNamespace(data=SimpleNamespace(tags={}, params={}))
    assert tracking.run_task(run) == "classification"
    run.data.params["model.task"] = "multilabel"
    assert tracking.run_task(run) == "multilabel"
    run.data.tags[tracking.TASK_TAG] = "joint"
    assert tracking.run_task(run) == "joint"
    assert not task_spec(tracking.run_task(run)).gates[1].passes(1.0, 2.0, 0.5)  # 1.0 is not < 1.0


@pytest.mark.parametrize("task, name, columns", [
    ("classification", "synthetic-300", [("text", "string"), ("label", "string")]),
    ("regression", "synthetic-age-300", [("text", "string"), ("target", "double")]),
    ("multilabel", "synthetic-300", [("text", "string"), ("labels", "array")]),
    ("joint", "synthetic-age-300", [("text", "string"), ("label", "string"), ("target", "double")]),
])
def test_the_dataset_input_describes_what_the_task_trains_on(task, name, columns):
    """MLflow's dataset input names the columns of the task's view; the synthetic corpus with
    ages written into its texts is another dataset than the plain one."""
    import json
    from types import SimpleNamespace

    from hpn.config import load_config
    from hpn.data import load_corpus

    cfg = load_config(None, [f"model.task={task}", "data.size=300"])
    corpus = load_corpus(cfg.data, task)
    data = SimpleNamespace(corpus=corpus, split=corpus.split(0.15, 0.15, 0),
                           fingerprint=corpus.fingerprint())
    dataset = tracking.corpus_dataset(cfg.data, data)
    schema = json.loads(tracking.dataset_input(dataset).dataset.schema)["mlflow_colspec"]
    assert dataset.name == name
    assert [(c["name"], c["type"]) for c in schema] == columns
