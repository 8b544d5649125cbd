"""Regression and multi-label metrics (scikit-learn), their trivial baselines, and the
multi-label decision rule chosen on validation.

The metric names are `hpn.metrics`'. scikit-learn is imported inside the functions, so
`hpn.model` (which needs `DecisionRule` to predict) stays cheap to import for serving.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpn import metrics as M
from hpn.errors import ConfigError

__all__ = ["DECISION_KINDS", "THRESHOLDS", "TOP_KS", "DecisionRule", "fit_decision",
           "multilabel_baselines", "multilabel_metrics", "regression_baselines",
           "regression_metrics"]

DECISION_KINDS = ("auto", "threshold", "top_k")
#: Cosine thresholds tried on validation: every 0.01 over the whole cosine range.
THRESHOLDS = np.round(np.linspace(-1.0, 1.0, 201), 2)
TOP_KS = (1, 2, 3)


@dataclass(frozen=True)
class DecisionRule:
    """Which labels a multi-label model predicts from its per-label cosines."""

    kind: str  # "threshold": every label scoring >= threshold; "top_k": the k best labels
    threshold: float | None = None
    k: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "threshold" and self.threshold is None:
            raise ValueError("a threshold rule needs a threshold")
        if self.kind == "top_k" and (self.k is None or self.k < 1):
            raise ValueError("a top_k rule needs k >= 1")
        if self.kind not in ("threshold", "top_k"):
            raise ValueError(f"unknown decision rule kind {self.kind!r}")

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """(n, C) scores -> (n, C) bool: the predicted label sets."""
        scores = np.asarray(scores, dtype=np.float64)  # as fit_decision compared them
        if self.kind == "threshold":
            return scores >= self.threshold
        k = min(self.k, scores.shape[1])
        out = np.zeros(scores.shape, dtype=bool)
        if len(scores) and k:
            # stable sort of -scores: ties go to the lower label index, deterministically
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            np.put_along_axis(out, top, True, axis=1)
        return out

    def to_dict(self) -> dict:
        return ({"kind": "threshold", "threshold": float(self.threshold)} if self.kind == "threshold"
                else {"kind": "top_k", "k": int(self.k)})

    @classmethod
    def from_dict(cls, data: dict) -> DecisionRule:
        if data.get("kind") == "threshold":
            return cls("threshold", threshold=float(data["threshold"]))
        return cls("top_k", k=int(data["k"]))

    def metrics(self) -> dict[str, float]:
        """The rule as logged: decision_threshold or decision_top_k (only the chosen one)."""
        if self.kind == "threshold":
            return {M.DECISION_THRESHOLD: float(self.threshold)}
        return {M.DECISION_TOP_K: float(self.k)}


def _micro_f1_many(truth: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Micro-F1 of each of several (m, n, C) predictions: 2 TP / (2 TP + FP + FN), 0 when
    the denominator is 0 (sklearn's zero_division=0). Vectorised for the validation search."""
    t = truth[None]
    tp = (preds & t).sum(axis=(1, 2))
    fp = (preds & ~t).sum(axis=(1, 2))
    fn = (~preds & t).sum(axis=(1, 2))
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def _threshold_micro_f1(scores: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Micro-F1 of `scores >= t` for each t, from sorted scores: TP(t) is the count of positive
    pairs scoring >= t, FP(t) of negative ones, FN = positives - TP (O(n C log n C))."""
    pos, neg = np.sort(scores[truth]), np.sort(scores[~truth])
    tp = len(pos) - np.searchsorted(pos, thresholds, side="left")
    fp = len(neg) - np.searchsorted(neg, thresholds, side="left")
    fn = len(pos) - tp
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def fit_decision(scores: np.ndarray, truth: np.ndarray, mode: str = "auto") -> DecisionRule:
    """The decision rule with the best micro-F1 on these (VALIDATION) scores and label sets.

    `mode` is `model.decision`: "threshold" searches the cosine thresholds THRESHOLDS, "top_k"
    k in TOP_KS, "auto" both (a tie goes to the threshold rule). Within a kind, a tie goes to
    the first candidate (lowest threshold, smallest k).
    """
    if mode not in DECISION_KINDS:
        raise ConfigError(f"model.decision: unknown value {mode!r}; choose one of "
                          f"{', '.join(DECISION_KINDS)}")
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    candidates: list[tuple[float, DecisionRule]] = []
    if mode in ("auto", "threshold"):
        f1 = _threshold_micro_f1(scores, truth, THRESHOLDS)
        best = int(np.argmax(f1))
        candidates.append((float(f1[best]), DecisionRule("threshold", threshold=float(THRESHOLDS[best]))))
    if mode in ("auto", "top_k"):
        rules = [DecisionRule("top_k", k=k) for k in TOP_KS]
        f1 = _micro_f1_many(truth, np.stack([r.apply(scores) for r in rules]))
        best = int(np.argmax(f1))
        candidates.append((float(f1[best]), rules[best]))
    return max(candidates, key=lambda c: c[0])[1]  # max keeps the first of equals


def joint_score(accuracy: float, mae: float, baseline_mae: float) -> float:
    """(accuracy + MAE skill) / 2, the skill being 1 - mae / baseline_mae: 1 is perfect on
    both halves, 0.5 a perfect classifier that regresses no better than the mean. A baseline
    MAE of 0 (every target of the split equals the training mean) leaves nothing to beat:
    skill 0."""
    skill = 1.0 - mae / baseline_mae if baseline_mae > 0 else 0.0
    return (accuracy + skill) / 2.0


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, prefix: str) -> dict[str, float]:
    """{prefix}_mae, {prefix}_rmse, {prefix}_r2 (prefix "val" or "test")."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    return {
        f"{prefix}_mae": float(mean_absolute_error(y_true, y_pred)),
        f"{prefix}_rmse": float(np.sqrt(mean_squared_error(y_true, y_pred))),
        f"{prefix}_r2": float(r2_score(y_true, y_pred)) if len(y_true) > 1 else float("nan"),
    }


def regression_baselines(train_y: np.ndarray, val_y: np.ndarray, test_y: np.ndarray) -> dict[str, float]:
    """MAE of always predicting the training split's mean target, on test and on validation."""
    from sklearn.metrics import mean_absolute_error

    mean = float(np.mean(train_y))
    return {
        M.MEAN_BASELINE_MAE: float(mean_absolute_error(test_y, np.full(len(test_y), mean))),
        M.VAL_MEAN_BASELINE_MAE: float(mean_absolute_error(val_y, np.full(len(val_y), mean))),
    }


def multilabel_metrics(truth: np.ndarray, pred: np.ndarray, prefix: str) -> dict[str, float]:
    """Micro/macro F1, precision, recall, Hamming loss, subset accuracy and the label
    cardinality of prediction and truth, for (n, C) bool indicator matrices.

    Named `{prefix}_micro_f1` etc. (`hpn.metrics`: test_micro_f1, test_hamming_loss,
    test_pred_label_cardinality ...).
    """
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        hamming_loss,
        precision_score,
        recall_score,
    )

    truth, pred = np.asarray(truth, dtype=bool), np.asarray(pred, dtype=bool)
    t, p = truth.astype(np.int64), pred.astype(np.int64)
    out: dict[str, float] = {}
    for average in ("micro", "macro"):
        out[f"{prefix}_{average}_f1"] = float(f1_score(t, p, average=average, zero_division=0))
        out[f"{prefix}_{average}_precision"] = float(
            precision_score(t, p, average=average, zero_division=0))
        out[f"{prefix}_{average}_recall"] = float(recall_score(t, p, average=average, zero_division=0))
    out[f"{prefix}_hamming_loss"] = float(hamming_loss(t, p))
    out[f"{prefix}_subset_accuracy"] = float(accuracy_score(t, p))
    out[f"{prefix}_pred_label_cardinality"] = float(p.sum(1).mean()) if len(p) else 0.0
    out[f"{prefix}_true_label_cardinality"] = float(t.sum(1).mean()) if len(t) else 0.0
    return out


def _micro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(truth.astype(np.int64), pred.astype(np.int64), average="micro",
                          zero_division=0))


def multilabel_baselines(train_sets: np.ndarray, val_sets: np.ndarray,
                         test_sets: np.ndarray) -> dict[str, float]:
    """The trivial predictors a multi-label model must beat: the training split's most
    frequent label for every text (micro-F1 on test and on validation), and no label at all
    (micro-F1 0 on test, its Hamming loss the test's label density)."""
    from sklearn.metrics import hamming_loss

    train_sets, val_sets, test_sets = (np.asarray(a, dtype=bool) for a in
                                       (train_sets, val_sets, test_sets))
    top = int(np.argmax(train_sets.sum(0)))

    def most_frequent(sets: np.ndarray) -> np.ndarray:
        pred = np.zeros(sets.shape, dtype=bool)
        pred[:, top] = True
        return pred

    none = np.zeros(test_sets.shape, dtype=bool)
    return {
        M.MOST_FREQUENT_BASELINE_MICRO_F1: _micro_f1(test_sets, most_frequent(test_sets)),
        M.VAL_MOST_FREQUENT_BASELINE_MICRO_F1: _micro_f1(val_sets, most_frequent(val_sets)),
        M.ALL_NEGATIVE_BASELINE_MICRO_F1: _micro_f1(test_sets, none),
        M.ALL_NEGATIVE_BASELINE_HAMMING_LOSS: float(hamming_loss(test_sets.astype(np.int64),
                                                                 none.astype(np.int64))),
    }
