"""What a task is to the rest of the system: its metrics, their direction, its baselines.

`model.task` picks one of these. The trainer computes the metrics; everything downstream
(Ray Tune's scheduler and searcher, the best-trial choice, the registration check, promote,
reports) asks the task which validation metric is primary and whether higher is better,
instead of assuming `val_accuracy` up. Kept free of torch so `tuning/` can import it cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass

from hpn import metrics as M
from hpn.errors import ConfigError

CLASSIFICATION, REGRESSION, MULTILABEL, JOINT = "classification", "regression", "multilabel", "joint"
TASKS = (CLASSIFICATION, REGRESSION, MULTILABEL, JOINT)


@dataclass(frozen=True)
class Gate:
    """One registration condition: `metric` must beat the trivial `baseline` on validation."""

    metric: str  # a validation metric of the trial
    baseline: str  # the trivial predictor's value of it, on the same validation split
    mode: str  # "max": higher is better; "min": lower is better

    def passes(self, value: float, baseline: float, margin: float) -> bool:
        """max: beat by `margin` points; min (an error): be at least `margin` x baseline lower."""
        if self.mode == "max":
            return value > baseline + margin
        return value < baseline * (1.0 - margin)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    #: The validation metric that drives the sampler, ASHA, the best trial and promote.
    primary: str
    mode: str  # "max" | "min" for `primary`
    #: Its test counterpart: reported beside it, never used to choose.
    test_primary: str
    #: What a model must beat before it is registered (all of them, for joint).
    gates: tuple[Gate, ...]
    uses_labels: bool  # class labels (classification, joint)
    uses_target: bool  # a numeric target (regression, joint)
    multilabel: bool  # label sets (multilabel)

    def headline(self) -> tuple[str, ...]:
        """The metrics a study or model of this task is shown by, validation before test: the
        primary and its test counterpart, then each gate's metric and its counterpart (joint:
        the score, accuracy, MAE)."""
        names = [self.primary, self.test_primary]
        for gate in self.gates:
            names += [gate.metric, "test_" + gate.metric.removeprefix("val_")]
        return tuple(dict.fromkeys(names))


def is_better(a: float, b: float, mode: str) -> bool:
    """Is `a` strictly better than `b` for a metric of this mode ("max": a score, "min": an
    error)? One place for the comparison the live line, studies and promote all make."""
    return a > b if mode == "max" else a < b


_ACCURACY_GATE = Gate(M.VAL_ACCURACY, M.VAL_MAJORITY_BASELINE_ACCURACY, "max")
_MAE_GATE = Gate(M.VAL_MAE, M.VAL_MEAN_BASELINE_MAE, "min")
_MICRO_F1_GATE = Gate(M.VAL_MICRO_F1, M.VAL_MOST_FREQUENT_BASELINE_MICRO_F1, "max")

SPECS: dict[str, TaskSpec] = {
    CLASSIFICATION: TaskSpec(CLASSIFICATION, M.VAL_ACCURACY, "max", M.TEST_ACCURACY,
                             (_ACCURACY_GATE,), True, False, False),
    REGRESSION: TaskSpec(REGRESSION, M.VAL_MAE, "min", M.TEST_MAE, (_MAE_GATE,),
                         False, True, False),
    MULTILABEL: TaskSpec(MULTILABEL, M.VAL_MICRO_F1, "max", M.TEST_MICRO_F1, (_MICRO_F1_GATE,),
                         False, False, True),
    # Joint: one number must choose, and both halves should move it (train.regression_weight
    # would otherwise be invisible to the sampler): the mean of accuracy and MAE skill. The
    # registration check asks each half to beat its own baseline.
    JOINT: TaskSpec(JOINT, M.VAL_JOINT_SCORE, "max", M.TEST_JOINT_SCORE,
                    (_ACCURACY_GATE, _MAE_GATE), True, True, False),
}


#: The losses each task can train with (`model.loss`; auto picks per task). Regression's is
#: the paper's squared cosine to the target's cosine; joint's model.loss is its class half's.
TASK_LOSSES: dict[str, tuple[str, ...]] = {
    CLASSIFICATION: ("squared_cosine", "cross_entropy"),
    JOINT: ("squared_cosine", "cross_entropy"),
    REGRESSION: ("squared_cosine",),
    MULTILABEL: ("binary_cross_entropy",),
}


def loss_problem(task: str, loss: str) -> str | None:
    """Why `model.loss` cannot train `model.task` (one line naming model.loss), or None."""
    allowed = TASK_LOSSES[task]
    if loss == "auto" or loss in allowed:
        return None
    return (f"model.loss={loss}: model.task={task} cannot train with it; use auto or "
            f"{' or '.join(allowed)}")


#: The class head's keys: a regression model has no class head (its two prototypes are fixed).
_CLASS_HEAD_KEYS = ("model.prototypes_per_class", "model.prototype_count",
                    "model.prototype_assignment", "model.prototype_mode", "model.temperature",
                    "train.separation_weight", "train.class_weights")
#: Keys that change nothing for a task: a study searching one spends its trials on noise.
UNUSED_KEYS: dict[str, tuple[str, ...]] = {
    CLASSIFICATION: ("train.regression_weight", "model.decision"),
    REGRESSION: (*_CLASS_HEAD_KEYS, "train.regression_weight", "model.decision"),
    MULTILABEL: ("train.regression_weight",),
    JOINT: ("model.decision",),
}


#: What the synthetic corpus's numeric attribute is (hpn.data.synthetic writes it into texts).
SYNTHETIC_TARGET = "age"


def target_name(source: str | None, target_column: str | None) -> str:
    """What a regression model predicts, as people read it: the synthetic corpus's age, or
    the file's `data.target_column`."""
    if source == "synthetic":
        return SYNTHETIC_TARGET
    return target_column or "target"


def task_spec(name: str | None) -> TaskSpec:
    """The spec for a `model.task` value; None (a run logged before tasks existed) is
    classification."""
    if name is None or name == "":
        return SPECS[CLASSIFICATION]
    try:
        return SPECS[name]
    except KeyError:
        raise ConfigError(f"model.task: unknown value {name!r}; choose one of "
                          f"{', '.join(TASKS)}") from None
