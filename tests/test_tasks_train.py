"""Regression, multi-label and joint training: losses on hand-computed cases, metrics against
scikit-learn, the decision rule chosen on validation only, and a short real run per task.

The real runs share one session-scoped encode per corpus view (tests/conftest.py's cache_dir)
and one trained model per task, so the whole file stays well under a minute on two CPU cores.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from hpn import metrics as M
from hpn.config import Config, EncoderConfig, ModelConfig, load_config
from hpn.errors import ConfigError, DataError
from hpn.losses import (
    cosine_to_value,
    label_pos_weight,
    multilabel_loss,
    regression_loss,
    value_to_cosine,
)
from hpn.model import META_FILE, HPNClassifier, PrototypeHead, RegressionHead
from hpn.prototypes import regression_prototypes
from hpn.task_metrics import (
    THRESHOLDS,
    DecisionRule,
    _threshold_micro_f1,
    fit_decision,
    multilabel_baselines,
    multilabel_metrics,
    regression_baselines,
    regression_metrics,
)
from hpn.tasks import task_spec
from hpn.train import TaskLoss, compute_loss, prepare_data, resolve_loss, target_range, train

# -- prototypes -------------------------------------------------------------------------------


def test_regression_prototypes_are_two_opposite_unit_vectors_fixed_by_the_seed():
    p = regression_prototypes(16, seed=3)
    assert p.shape == (2, 16) and p.dtype == np.float32
    assert np.allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-6)
    assert np.allclose(p[0], -p[1])
    assert np.array_equal(p, regression_prototypes(16, seed=3))
    assert not np.allclose(p, regression_prototypes(16, seed=4))
    with pytest.raises(ConfigError, match="model.prototype_dim"):
        regression_prototypes(1)


# -- losses on hand-computed cases --------------------------------------------------------------


def test_targets_map_to_cosines_linearly_and_back():
    y = np.array([10.0, 12.5, 15.0, 20.0])
    t = value_to_cosine(y, 10.0, 20.0)
    assert np.allclose(t, [-1.0, -0.5, 0.0, 1.0])
    assert np.allclose(cosine_to_value(t, 10.0, 20.0), y)
    assert value_to_cosine(25.0, 10.0, 20.0) == 2.0  # past the training range: past +1


def test_the_regression_loss_is_the_mean_squared_gap_to_the_target_cosine():
    cos = torch.tensor([0.5, -0.5, 1.0])
    target = torch.tensor([1.0, 0.0, 1.0])
    # (0.5^2 + 0.5^2 + 0) / 3
    assert torch.isclose(regression_loss(cos, target), torch.tensor(0.5 / 3))


def test_the_regression_head_outputs_the_cosine_with_the_upper_prototype():
    head = RegressionHead(2, 2, np.array([[1.0, 0.0], [-1.0, 0.0]], dtype=np.float32))
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(2))
        head.proj.bias.zero_()
    out = head(torch.tensor([[3.0, 4.0], [-1.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([0.6, -1.0]))


def test_the_multilabel_loss_is_binary_cross_entropy_on_cosines_over_temperature():
    scores = torch.tensor([[0.5, -0.5]])
    sets = torch.tensor([[1.0, 0.0]])
    # logits [1, -1]: both pairs are right with margin 1, each costs log(1 + e^-1)
    one = math.log(1 + math.exp(-1))
    assert math.isclose(float(multilabel_loss(scores, sets, 0.5)), one, rel_tol=1e-6)
    # a positive weight of 3 on label 0 triples its term: (3 one + one) / 2
    weighted = multilabel_loss(scores, sets, 0.5, pos_weight=torch.tensor([3.0, 1.0]))
    assert math.isclose(float(weighted), 2 * one, rel_tol=1e-6)
    # a wrong answer: label 1 scored high but absent costs log(1 + e^1)
    wrong = multilabel_loss(torch.tensor([[0.5, 0.5]]), sets, 0.5)
    assert math.isclose(float(wrong), (one + math.log(1 + math.e)) / 2, rel_tol=1e-6)


def test_label_positive_weights_are_negatives_over_positives():
    sets = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=bool)
    assert label_pos_weight(sets).tolist() == pytest.approx([1 / 3, 1.0, 1.0])  # none: weight 1


def _unit_heads() -> tuple[PrototypeHead, RegressionHead]:
    """2-d heads with identity projections: class prototypes e1, e2; regression p = e1."""
    head = PrototypeHead(2, 2, ModelConfig(prototype_dim=2), np.eye(2, dtype=np.float32))
    reg = RegressionHead(2, 2, np.array([[1.0, 0.0], [-1.0, 0.0]], dtype=np.float32))
    with torch.no_grad():
        for h in (head, reg):
            h.proj.weight.copy_(torch.eye(2))
            h.proj.bias.zero_()
    return head, reg


def test_the_joint_loss_is_the_class_loss_plus_the_weighted_regression_loss():
    head, reg = _unit_heads()
    x = torch.tensor([[0.0, 1.0]])  # on class 1's prototype, cosine 0 with p
    labels, target = torch.tensor([0]), torch.tensor([0.5])
    loss, scores, cos = TaskLoss("joint", "squared_cosine", 0.1, regression_weight=2.0)(
        head, reg, x, labels=labels, target_cos=target)
    # class 0 scores 0: (1 - 0)^2 = 1; regression (0 - 0.5)^2 = 0.25, times 2
    assert torch.isclose(loss, torch.tensor(1.5))
    assert torch.allclose(scores, torch.tensor([[0.0, 1.0]])) and torch.allclose(cos, torch.tensor([0.0]))
    only_cls = TaskLoss("classification", "squared_cosine", 0.1)(head, None, x, labels=labels)[0]
    assert torch.isclose(only_cls, compute_loss("squared_cosine", scores, scores, labels, head, None, 0.1))
    only_reg = TaskLoss("regression", "squared_cosine", 0.1)(None, reg, x, target_cos=target)[0]
    assert torch.isclose(only_reg, torch.tensor(0.25))
    multi = TaskLoss("multilabel", "binary_cross_entropy", 0.5)(
        head, None, x, label_sets=torch.tensor([[0.0, 1.0]]))[0]
    assert torch.isclose(multi, torch.tensor(math.log(1 + math.exp(-2)) / 2 + math.log(2) / 2))


def _cfg(task: str, loss: str = "auto", **model) -> Config:
    cfg = Config()  # not validated: resolve_loss must refuse on its own
    cfg.model.task, cfg.model.loss = task, loss
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def test_auto_loss_resolves_per_task_and_a_loss_the_task_cannot_use_names_model_loss():
    assert resolve_loss(_cfg("regression")) == "squared_cosine"
    assert resolve_loss(_cfg("multilabel")) == "binary_cross_entropy"
    assert resolve_loss(_cfg("multilabel", "binary_cross_entropy")) == "binary_cross_entropy"
    assert resolve_loss(_cfg("joint"), 14) == "squared_cosine"
    assert resolve_loss(_cfg("joint", prototypes_per_class=3), 14) == "cross_entropy"
    for task, loss in [("multilabel", "cross_entropy"), ("multilabel", "squared_cosine"),
                       ("regression", "cross_entropy"), ("regression", "binary_cross_entropy"),
                       ("classification", "binary_cross_entropy"), ("joint", "binary_cross_entropy")]:
        with pytest.raises(ConfigError, match=r"^model\.loss="):
            resolve_loss(_cfg(task, loss), 14)


def test_the_target_range_comes_from_the_training_rows_and_must_vary():
    targets = np.array([5.0, 30.0, 10.0, 99.0])
    assert target_range(targets, np.array([0, 2]), "age") == (5.0, 10.0)  # 99 is not train's
    with pytest.raises(DataError, match="data.target_column"):
        target_range(targets, np.array([1]), "age")


# -- metrics against scikit-learn ----------------------------------------------------------------


def test_regression_metrics_are_scikit_learns():
    y, p = np.array([1.0, 2.0, 4.0, 7.0]), np.array([1.5, 2.0, 3.0, 9.0])
    got = regression_metrics(y, p, "test")
    assert got[M.TEST_MAE] == pytest.approx(skm.mean_absolute_error(y, p)) == 3.5 / 4
    assert got[M.TEST_RMSE] == pytest.approx(math.sqrt(skm.mean_squared_error(y, p)))
    assert got[M.TEST_R2] == pytest.approx(skm.r2_score(y, p))
    base = regression_baselines(np.array([2.0, 4.0]), np.array([3.0, 5.0]), y)
    assert base[M.MEAN_BASELINE_MAE] == pytest.approx(np.mean(np.abs(y - 3.0)))
    assert base[M.VAL_MEAN_BASELINE_MAE] == pytest.approx(1.0)


TRUTH = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=bool)
PRED = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 1]], dtype=bool)


def test_multilabel_metrics_are_scikit_learns_on_indicator_matrices():
    got = multilabel_metrics(TRUTH, PRED, "test")
    t, p = TRUTH.astype(int), PRED.astype(int)
    for avg in ("micro", "macro"):
        assert got[f"test_{avg}_f1"] == pytest.approx(skm.f1_score(t, p, average=avg, zero_division=0))
        assert got[f"test_{avg}_precision"] == pytest.approx(
            skm.precision_score(t, p, average=avg, zero_division=0))
        assert got[f"test_{avg}_recall"] == pytest.approx(
            skm.recall_score(t, p, average=avg, zero_division=0))
    # by hand: TP 4, FP 2, FN 2 -> micro P = R = F1 = 2/3; 4 wrong cells of 15; 1 exact row of 5
    assert got[M.TEST_MICRO_F1] == pytest.approx(2 / 3)
    assert got[M.TEST_HAMMING_LOSS] == pytest.approx(4 / 15) == skm.hamming_loss(t, p)
    assert got[M.TEST_SUBSET_ACCURACY] == pytest.approx(1 / 5) == skm.accuracy_score(t, p)
    assert got[M.TEST_PRED_CARDINALITY] == pytest.approx(6 / 5)
    assert got[M.TEST_TRUE_CARDINALITY] == pytest.approx(6 / 5)
    assert set(got) >= {M.TEST_MICRO_F1, M.TEST_MACRO_F1, M.TEST_MICRO_PRECISION,
                        M.TEST_MACRO_PRECISION, M.TEST_MICRO_RECALL, M.TEST_MACRO_RECALL}


def test_multilabel_baselines_most_frequent_label_and_all_negative():
    train_sets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)  # label 0 most frequent
    got = multilabel_baselines(train_sets, TRUTH[:2], TRUTH)
    most = np.zeros_like(TRUTH)
    most[:, 0] = True
    assert got[M.MOST_FREQUENT_BASELINE_MICRO_F1] == pytest.approx(
        skm.f1_score(TRUTH.astype(int), most.astype(int), average="micro"))
    assert got[M.MOST_FREQUENT_BASELINE_MICRO_F1] == pytest.approx(2 * 3 / (2 * 3 + 2 + 3))
    assert got[M.VAL_MOST_FREQUENT_BASELINE_MICRO_F1] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert got[M.ALL_NEGATIVE_BASELINE_MICRO_F1] == 0.0
    assert got[M.ALL_NEGATIVE_BASELINE_HAMMING_LOSS] == pytest.approx(6 / 15)


def test_the_fast_threshold_search_scores_each_threshold_as_scikit_learn_does():
    rng = np.random.default_rng(0)
    scores = np.round(rng.uniform(-1, 1, (40, 5)), 2)  # rounded: some sit exactly on a threshold
    truth = rng.random((40, 5)) < 0.3
    fast = _threshold_micro_f1(scores, truth, THRESHOLDS)
    for i in range(0, len(THRESHOLDS), 7):
        pred = DecisionRule("threshold", threshold=float(THRESHOLDS[i])).apply(scores)
        assert fast[i] == pytest.approx(skm.f1_score(truth.astype(int), pred.astype(int),
                                                     average="micro", zero_division=0))


def test_decision_rules_apply_and_round_trip_through_json():
    scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.3, 0.2]])
    assert DecisionRule("threshold", threshold=0.25).apply(scores).tolist() == [
        [True, False, True], [False, True, False]]
    assert DecisionRule("top_k", k=2).apply(scores).tolist() == [
        [True, False, True], [False, True, True]]
    for rule in (DecisionRule("threshold", threshold=0.37), DecisionRule("top_k", k=3)):
        assert DecisionRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    assert DecisionRule("top_k", k=2).metrics() == {M.DECISION_TOP_K: 2.0}


def _separable(n: int, cut: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose positives all sit above `cut` and negatives below: `cut` is the best threshold."""
    truth = rng.random((n, 4)) < 0.3
    truth[np.arange(n), rng.integers(0, 4, n)] = True
    scores = np.where(truth, rng.uniform(cut + 0.005, 1.0, truth.shape),
                      rng.uniform(-1.0, cut - 0.005, truth.shape))
    return scores, truth


def test_the_threshold_is_chosen_on_validation_and_test_is_only_scored():
    rng = np.random.default_rng(1)
    val_scores, val_truth = _separable(60, 0.2, rng)
    test_scores, test_truth = _separable(60, 0.6, rng)  # test's own optimum is elsewhere
    rule = fit_decision(val_scores, val_truth, "threshold")
    test_best = fit_decision(test_scores, test_truth, "threshold")
    assert rule.threshold <= 0.2 and test_best.threshold > 0.2
    # scoring test with the validation rule costs F1 that choosing on test would have hidden
    kept = multilabel_metrics(test_truth, rule.apply(test_scores), "test")[M.TEST_MICRO_F1]
    assert kept < multilabel_metrics(test_truth, test_best.apply(test_scores), "test")[M.TEST_MICRO_F1]
    assert fit_decision(val_scores, val_truth, "top_k").kind == "top_k"
    assert fit_decision(val_scores, val_truth, "auto") == rule  # perfect on val: threshold wins
    with pytest.raises(ConfigError, match="model.decision"):
        fit_decision(val_scores, val_truth, "best")


# -- short real runs, one per task ----------------------------------------------------------------


@pytest.fixture(scope="session")
def task_runs(cache_dir):
    """task -> (config, prepared data, result): a short real train on 600 synthetic texts."""
    return {}


def _config(task: str, cache_dir: str, *extra: str) -> Config:
    return load_config(None, [
        f"model.task={task}", "data.size=600", "train.epochs=12", f"encoder.cache_dir={cache_dir}",
        "model.prototype_dim=32", "train.batch_size=64", "train.optimizer=adam", "train.lr=0.003",
        *extra])


def _run(task_runs: dict, cache_dir: str, task: str):
    if task not in task_runs:
        cfg = _config(task, cache_dir)
        data = prepare_data(cfg)
        rows: list[dict] = []
        result = train(cfg, data, on_epoch=lambda epoch, row: rows.append(row))
        task_runs[task] = (cfg, data, result, rows)
    return task_runs[task]


def test_regression_beats_the_mean_baseline_and_logs_its_metrics(task_runs, cache_dir):
    _, data, result, rows = _run(task_runs, cache_dir, "regression")
    m = result.metrics
    assert m[M.TEST_MAE] < 0.9 * m[M.MEAN_BASELINE_MAE]
    assert m[M.VAL_MAE] < m[M.VAL_MEAN_BASELINE_MAE]
    assert m[M.TEST_R2] > 0
    train_y = data.corpus.targets[data.split.train]
    assert (m[M.TARGET_LOW], m[M.TARGET_HIGH]) == (train_y.min(), train_y.max())
    assert m[M.NUM_PROTOTYPES] == 2 and m[M.SEPARATION_MIN_ANGLE_DEG] == pytest.approx(180)
    assert all({M.VAL_MAE, M.VAL_LOSS, M.TRAIN_LOSS} <= set(row) for row in rows)
    assert M.VAL_ACCURACY not in m
    with pytest.raises(ValueError, match="predict_all"):
        result.model.predict(["A nurse in her forties."])


def test_multilabel_beats_both_baselines_and_keeps_the_rule_chosen_on_validation(
        task_runs, cache_dir, monkeypatch):
    import hpn.train

    seen: list[np.ndarray] = []
    fit = hpn.train.fit_decision

    def spy(scores, truth, mode):
        seen.append(np.asarray(truth))
        return fit(scores, truth, mode)

    monkeypatch.setattr(hpn.train, "fit_decision", spy)
    task_runs.pop("multilabel", None)  # trained here, under the spy
    cfg, data, result, rows = _run(task_runs, cache_dir, "multilabel")
    m = result.metrics
    assert m[M.TEST_MICRO_F1] > m[M.MOST_FREQUENT_BASELINE_MICRO_F1] + 0.2
    assert m[M.TEST_MICRO_F1] > m[M.ALL_NEGATIVE_BASELINE_MICRO_F1] == 0
    assert m[M.VAL_MICRO_F1] > m[M.VAL_MOST_FREQUENT_BASELINE_MICRO_F1]
    assert m[M.TEST_HAMMING_LOSS] < m[M.ALL_NEGATIVE_BASELINE_HAMMING_LOSS]
    assert all({M.VAL_MICRO_F1, M.VAL_MACRO_F1} <= set(row) for row in rows)
    # the rule was fitted on validation label sets only, once per epoch, and the model keeps
    # the one fitted on the final model's validation scores
    val_sets = np.asarray(data.corpus.label_sets)[data.split.val]
    assert len(seen) == cfg.train.epochs and all(np.array_equal(t, val_sets) for t in seen)
    texts = [data.corpus.texts[i] for i in data.split.val]
    val_scores = result.model.predict_all(texts).scores
    assert result.model.decision == fit(val_scores, val_sets, cfg.model.decision)
    assert result.model.decision.metrics().items() <= m.items()


def test_the_joint_score_is_accuracy_and_mae_skill_averaged():
    from hpn.task_metrics import joint_score

    assert joint_score(0.8, 3.0, 12.0) == pytest.approx((0.8 + 0.75) / 2)
    assert joint_score(1.0, 12.0, 12.0) == pytest.approx(0.5)  # no better than the mean
    assert joint_score(0.6, 0.0, 0.0) == pytest.approx(0.3)  # nothing to beat: skill 0


def test_joint_logs_both_metric_sets(task_runs, cache_dir):
    _, data, result, rows = _run(task_runs, cache_dir, "joint")
    m = result.metrics
    assert m[M.TEST_ACCURACY] > m[M.MAJORITY_BASELINE_ACCURACY] + 0.2
    assert m[M.TEST_MAE] < m[M.MEAN_BASELINE_MAE]
    assert {M.TEST_MACRO_F1, M.VAL_MAJORITY_BASELINE_ACCURACY, M.TEST_RMSE, M.TEST_R2,
            M.VAL_MEAN_BASELINE_MAE, M.TARGET_LOW} <= set(m)
    assert all({M.VAL_ACCURACY, M.VAL_MAE, M.VAL_JOINT_SCORE} <= set(row) for row in rows)
    # the joint score (what chooses a joint trial) is the mean of accuracy and MAE skill
    assert m[M.TEST_JOINT_SCORE] == pytest.approx(
        (m[M.TEST_ACCURACY] + 1 - m[M.TEST_MAE] / m[M.MEAN_BASELINE_MAE]) / 2)
    assert m[M.VAL_JOINT_SCORE] == pytest.approx(
        (m[M.VAL_ACCURACY] + 1 - m[M.VAL_MAE] / m[M.VAL_MEAN_BASELINE_MAE]) / 2)
    assert m[M.NUM_PROTOTYPES] == data.corpus.num_classes + 2


@pytest.mark.parametrize("task", ["regression", "multilabel", "joint"])
def test_a_saved_model_of_each_task_loads_and_predicts_the_same(task_runs, cache_dir, tmp_path, task):
    _, data, result, _ = _run(task_runs, cache_dir, task)
    out = result.model.save(tmp_path / task)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["task"] == task
    loaded = HPNClassifier.load(out)
    texts = [data.corpus.texts[i] for i in data.split.test[:25]]
    want, got = result.model.predict_all(texts), loaded.predict_all(texts)
    assert got.task == want.task == task and got.label_names == want.label_names
    for field in ("scores", "values"):
        a, b = getattr(want, field), getattr(got, field)
        assert (a is None and b is None) or np.array_equal(a, b)
    assert got.labels == want.labels and got.label_sets == want.label_sets
    spec = task_spec(task)
    assert (got.values is not None) == spec.uses_target
    assert (got.labels is not None) == spec.uses_labels
    assert (got.label_sets is not None) == spec.multilabel
    if spec.uses_target:
        assert meta["target_name"] == "age"
        assert (meta["target_low"], meta["target_high"]) == loaded.target_range
        low, high = loaded.target_range
        assert np.all((got.values >= low) & (got.values <= high))
    if spec.multilabel:
        assert DecisionRule.from_dict(meta["decision"]) == loaded.decision == result.model.decision


def test_a_model_saved_before_tasks_existed_loads_as_a_classifier(cache_dir, tmp_path):
    cfg = _config("classification", cache_dir, "train.epochs=1")
    result = train(cfg)
    out = result.model.save(tmp_path / "old")
    meta = json.loads((out / META_FILE).read_text())
    for key in ("task", "target_low", "target_high", "target_name", "decision"):
        del meta[key]
    for key in ("task", "decision"):  # ModelConfig keys added with tasks
        del meta["model"][key]
    (out / META_FILE).write_text(json.dumps(meta))
    loaded = HPNClassifier.load(out)
    assert loaded.task == "classification"
    texts = ["A nurse who loves hiking.", "A tax lawyer in Lyon."]
    labels, scores = loaded.predict(texts)
    assert labels == result.model.predict(texts)[0]
    pred = loaded.predict_all(texts)
    assert pred.labels == labels and np.array_equal(pred.scores, scores)
    assert pred.values is None and pred.label_sets is None


def test_an_untrained_model_of_each_kind_is_built_consistently():
    head, reg = _unit_heads()
    cfg, enc = ModelConfig(prototype_dim=2), EncoderConfig()
    with pytest.raises(ValueError, match="regression head"):
        HPNClassifier(head, ["a", "b"], cfg, enc, task="joint")
    with pytest.raises(ValueError, match="target range"):
        HPNClassifier(None, [], cfg, enc, task="regression", regression_head=reg)
    model = HPNClassifier(None, [], cfg, enc, task="regression", regression_head=reg,
                          target_range=(20.0, 80.0))
    assert model.values_from_cosines(np.array([-1.0, 0.0, 1.0])).tolist() == [20.0, 50.0, 80.0]


@pytest.mark.parametrize("task,loss", [("multilabel", "cross_entropy"), ("regression", "cross_entropy")])
def test_a_loss_the_task_cannot_use_fails_before_the_encoder_runs(cache_dir, monkeypatch, task, loss):
    import hpn.train

    def no_encode(*args, **kwargs):
        raise AssertionError("encoded before checking model.loss")

    monkeypatch.setattr(hpn.train, "encode_texts", no_encode)
    with pytest.raises(ConfigError, match=f"model.loss={loss}: model.task={task}"):
        prepare_data(_config(task, cache_dir, f"model.loss={loss}"))
