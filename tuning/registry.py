"""The MLflow Model Registry: register a trial's model, promote behind a gate, roll back.

Aliases, not the deprecated stages: `champion` is what `models:/<name>@champion` serves,
`previous` keeps the champion before it reachable for rollback.

Nothing bad gets in: a model is registered, and a version aliased champion, only when it
beats its task's trivial baselines on the validation split by a margin (every `Gate` of
`hpn.tasks.task_spec(task)`: classification's val_accuracy over the majority class, regression's
val_mae under the training mean's, multi-label's val_micro_f1 over the most frequent label;
a diverged trial does not) and it loads and predicts in a fresh process
(tuning/model_check.py). A run's task is its `hpn.task` tag (`tuning.tracking.run_task`).
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from hpn import metrics as M
from hpn.errors import HPNInputError
from hpn.tasks import (
    CLASSIFICATION,
    JOINT,
    MULTILABEL,
    REGRESSION,
    Gate,
    is_better,
    target_name,
    task_spec,
)
from tuning.model_check import TIMEOUT_S, check_in_fresh_process
from tuning.pyfunc import (
    LABELS_COLUMN,
    MODEL_ARTIFACT,
    PREDICTION_COLUMN,
    SERVING_FORMAT_TAG,
    TEXT_COLUMN,
    TORCH_FORMAT,
    run_model,
)
from tuning.tracking import (
    FINGERPRINT_TAG,
    PARENT_TAG,
    ROLE_TAG,
    STUDY_TAG,
    TRIAL_ID_TAG,
    no_download_bar,
    run_task,
)

CHAMPION, PREVIOUS = "champion", "previous"
DEFAULT_MODEL_NAME = "hpn-persona"
#: The metrics a classification version carries as `metric.<name>` tags (and its card shows).
CARD_METRICS = (M.TEST_ACCURACY, M.TEST_MACRO_F1, M.VAL_ACCURACY, M.SEPARATION_MIN_ANGLE_DEG,
                M.VAL_MAJORITY_BASELINE_ACCURACY)
REGRESSION_CARD_METRICS = (M.TEST_MAE, M.TEST_RMSE, M.TEST_R2, M.VAL_MAE, M.VAL_RMSE, M.VAL_R2,
                           M.MEAN_BASELINE_MAE, M.VAL_MEAN_BASELINE_MAE, M.TARGET_LOW,
                           M.TARGET_HIGH)
MULTILABEL_CARD_METRICS = (
    M.TEST_MICRO_F1, M.TEST_MACRO_F1, M.VAL_MICRO_F1, M.VAL_MACRO_F1, M.TEST_MICRO_PRECISION,
    M.TEST_MACRO_PRECISION, M.TEST_MICRO_RECALL, M.TEST_MACRO_RECALL, M.TEST_HAMMING_LOSS,
    M.TEST_SUBSET_ACCURACY, M.TEST_PRED_CARDINALITY, M.TEST_TRUE_CARDINALITY,
    M.MOST_FREQUENT_BASELINE_MICRO_F1, M.VAL_MOST_FREQUENT_BASELINE_MICRO_F1,
    M.ALL_NEGATIVE_BASELINE_MICRO_F1, M.ALL_NEGATIVE_BASELINE_HAMMING_LOSS,
    M.DECISION_THRESHOLD, M.DECISION_TOP_K, M.SEPARATION_MIN_ANGLE_DEG)
#: A version's tag naming its task, so promote knows what it compares without the run.
TASK_VERSION_TAG = "task"
#: How a refusal names each gate's trivial predictor.
BASELINE_NAMES = {
    M.VAL_MAJORITY_BASELINE_ACCURACY: "majority-class baseline",
    M.VAL_MEAN_BASELINE_MAE: "mean-target baseline",
    M.VAL_MOST_FREQUENT_BASELINE_MICRO_F1: "most-frequent-label baseline",
}
#: Metrics other than a task's own where lower is better (promote --metric val_loss ...).
LOWER_IS_BETTER_SUFFIXES = ("_loss", "_mae", "_rmse")
#: On a study's run whose best trial failed the registration check: why, in one line.
NOT_REGISTERED_TAG = "hpn.not_registered"
MODEL_CARD_FILE = "model_card.md"
CARD_CLASSES = 20  # classes listed by name in a card


class PromotionRefused(RuntimeError):
    """The candidate does not beat the champion, or fails the registration check: nothing
    was changed."""

    exit_code, label = 1, "refused"


class RegistrationRefused(RuntimeError):
    """The run's model fails the registration check: nothing was registered."""

    exit_code, label = 1, "refused"


# -- the registration check ----------------------------------------------------------------

def check_margin(margin: float) -> None:
    """A margin is in [0, 1): points above the baseline for a score (accuracy, F1), a
    fraction of the baseline for an error (MAE). A negative one would let a model worse than
    the trivial predictor through; 1 or more would ask an error metric to go below zero."""
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise HPNInputError(f"--baseline-margin: must be at least 0 and below 1 (points above "
                            f"the baseline for a score such as accuracy; a fraction of the "
                            f"baseline for an error such as MAE), got {margin!r}")


def gate_problem(gate: Gate, metrics: dict[str, float], margin: float) -> str | None:
    """Why these final metrics fail one gate (`Gate.passes`: a score must beat its baseline
    by `margin` points, an error must be below baseline x (1 - margin)); None when they pass."""
    val = metrics.get(gate.metric)
    base = metrics.get(gate.baseline)
    if base is None or not math.isfinite(base):
        return (f"it has no {gate.baseline} to check against (trained before "
                "hpn-tune logged it); train it again")
    if val is not None and math.isfinite(val) and gate.passes(val, base, margin):
        return None
    shown = "none" if val is None else f"{val:.4f}"
    broken = val is None or not math.isfinite(val)
    name = BASELINE_NAMES.get(gate.baseline, gate.baseline)
    if gate.mode == "max":
        why = "diverged or untrained" if broken or val <= base else "--baseline-margin asks for more"
        return (f"its {gate.metric} {shown} does not beat the {name} {base:.4f} by more than "
                f"{margin:g} ({why})")
    why = "diverged or untrained" if broken or val >= base else "--baseline-margin asks for more"
    return (f"its {gate.metric} {shown} is not below the {name} {base:.4f} x (1 - {margin:g}) "
            f"= {base * (1 - margin):.4f} ({why}; for an error metric --baseline-margin is a "
            "fraction of the baseline)")


def baseline_problem(metrics: dict[str, float], margin: float,
                     task: str | None = None) -> str | None:
    """Why these final metrics do not beat the task's trivial baselines on validation by
    `margin` (every gate of the task: joint has two); None when they do. Never a test
    metric: the check chooses what gets served."""
    problems = [p for gate in task_spec(task).gates if (p := gate_problem(gate, metrics, margin))]
    return "; and ".join(problems) or None


def _model_location(client: MlflowClient, run: Any) -> tuple[str, str] | None:
    """The run's model as (URI to load it by, where its files are), or None: it has none."""
    logged = run_model(client, run.info.run_id)
    if logged is not None:
        return f"models:/{logged.model_id}", logged.artifact_location
    # A run logged before LoggedModels holds its model as its `model` artifact.
    run_id, files = run.info.run_id, client.list_artifacts(run.info.run_id, MODEL_ARTIFACT)
    if any(f.path == f"{MODEL_ARTIFACT}/MLmodel" for f in files):
        return f"runs:/{run_id}/{MODEL_ARTIFACT}", f"{run.info.artifact_uri}/{MODEL_ARTIFACT}"
    return None


#: Digests of model files that loaded and predicted in a fresh process: the verdict depends
#: only on the bytes (and this process's environment), so registering a run and then
#: promoting its version pays for one fresh process, while a file changed since is checked again.
_LOADABLE: set[str] = set()


def _files_digest(client: MlflowClient, source: str) -> str:
    """sha256 over the model's files, but the model card: registering writes the card into
    them (a new one per version) and loading never reads it."""
    import mlflow.artifacts

    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp, no_download_bar():
        root = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=tmp, tracking_uri=client.tracking_uri))
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            name = str(path.relative_to(root))
            if name != MODEL_CARD_FILE:
                digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def load_problem(client: MlflowClient, model_uri: str, source: str,
                 timeout_s: float = TIMEOUT_S) -> str | None:
    """Why the model at `model_uri` (files at `source`) would not serve; None when it loads
    and predicts in a fresh process."""
    try:
        digest = _files_digest(client, source)
    except Exception as exc:  # noqa: BLE001 - unreadable files are the verdict
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return f"its files cannot be read ({type(exc).__name__}: {first})"
    if digest in _LOADABLE:
        return None
    problem = check_in_fresh_process(model_uri, client.tracking_uri, timeout_s)
    if problem is None:
        _LOADABLE.add(digest)
    return problem


def registration_problem(client: MlflowClient, run_id: str,
                         margin: float = M.DEFAULT_BASELINE_MARGIN) -> str | None:
    """Why the run's model must not be registered (one line); None when it may: it has a
    model, beats the validation baseline by `margin`, and loads and predicts in a fresh process."""
    run = client.get_run(run_id)
    location = _model_location(client, run)
    if location is None:
        return "it holds no model"
    return (baseline_problem(run.data.metrics, margin, run_task(run))
            or load_problem(client, *location))


def _version_problem(client: MlflowClient, name: str, version: Any, margin: float) -> str | None:
    """The registration check again for a registered version, just before it is served: it
    may have been registered before the check existed, or its files changed since."""
    if not version.run_id:
        return "it has no run whose metrics could be checked against the baseline"
    run = client.get_run(version.run_id)
    return (baseline_problem(run.data.metrics, margin, run_task(run))
            or load_problem(client, f"models:/{name}/{version.version}", version.source))


def _run_dataset(client: MlflowClient, run: Any) -> dict[str, Any]:
    """The run's corpus: its dataset input's name and profile, else (a run logged before
    dataset inputs) the fingerprint its study's run was tagged with."""
    inputs = run.inputs.dataset_inputs if run.inputs else []
    if inputs:
        dataset = inputs[0].dataset
        profile = json.loads(dataset.profile) if dataset.profile else {}
        return {"name": dataset.name, "fingerprint": profile.get("fingerprint", dataset.digest),
                **profile}
    parent = run.data.tags.get(PARENT_TAG)
    fingerprint = client.get_run(parent).data.tags.get(FINGERPRINT_TAG, "") if parent else ""
    return {"name": run.data.params.get("data.source"), "fingerprint": fingerprint}


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _num(text: str | None) -> str:
    """A param as a person reads it: 0.117, not 0.11697913245959088."""
    try:
        return f"{float(text):.4g}" if text not in (None, "") else "?"
    except ValueError:
        return str(text)


def card_metrics(task: str | None) -> tuple[str, ...]:
    """The metrics a version of this task carries as `metric.<name>` tags: what its card
    shows and what promote reads first (each task's own; joint both halves')."""
    spec = task_spec(task)
    names: list[str] = []
    if spec.uses_labels:
        names += CARD_METRICS
    if spec.uses_target:
        names += REGRESSION_CARD_METRICS
    if spec.multilabel:
        names += MULTILABEL_CARD_METRICS
    # the task's own primary and its test counterpart (joint: val_/test_joint_score), which
    # promote compares
    return tuple(dict.fromkeys([*names, *spec.headline()]))


def _target_name(params: dict[str, str]) -> str:
    """What a regression model predicts, as its card names it (from the run's params)."""
    return target_name(params.get("data.source"), params.get("data.target_column"))


def _metric_rows(task: str, m: dict[str, float]) -> list[str]:
    """The card's metric table rows (validation, test) for the task's metrics."""
    spec = task_spec(task)

    def row(label: str, val: str | None, test: str | None, digits: int = 4) -> str:
        """`| label | 0.8000 | 0.7900 |`; a column the metric has no number for is `| |`."""
        cells = [f" {label} "] + [f" {_fmt(m.get(x), digits)} " if x else " " for x in (val, test)]
        return "|" + "|".join(cells) + "|"

    rows = ["| metric | validation | test |", "|---|---|---|"]
    if spec.name == JOINT:
        rows.append(row("joint score", M.VAL_JOINT_SCORE, M.TEST_JOINT_SCORE))
    if spec.uses_labels:
        rows += [row("accuracy", M.VAL_ACCURACY, M.TEST_ACCURACY),
                 row("macro F1", None, M.TEST_MACRO_F1)]
    if spec.uses_target:
        rows += [row("MAE", M.VAL_MAE, M.TEST_MAE), row("RMSE", M.VAL_RMSE, M.TEST_RMSE),
                 row("R2", M.VAL_R2, M.TEST_R2),
                 row("MAE of the mean-target baseline", M.VAL_MEAN_BASELINE_MAE,
                     M.MEAN_BASELINE_MAE)]
    if spec.multilabel:
        cardinality = (f"{_fmt(m.get(M.TEST_PRED_CARDINALITY), 2)} predicted / "
                       f"{_fmt(m.get(M.TEST_TRUE_CARDINALITY), 2)} true")
        rows += [row("micro F1", M.VAL_MICRO_F1, M.TEST_MICRO_F1),
                 row("macro F1", M.VAL_MACRO_F1, M.TEST_MACRO_F1),
                 row("micro precision", None, M.TEST_MICRO_PRECISION),
                 row("micro recall", None, M.TEST_MICRO_RECALL),
                 row("macro precision", None, M.TEST_MACRO_PRECISION),
                 row("macro recall", None, M.TEST_MACRO_RECALL),
                 row("Hamming loss", None, M.TEST_HAMMING_LOSS),
                 row("subset accuracy", None, M.TEST_SUBSET_ACCURACY),
                 f"| labels per text | | {cardinality} |",
                 row("micro F1 of the most-frequent-label baseline",
                     M.VAL_MOST_FREQUENT_BASELINE_MICRO_F1, M.MOST_FREQUENT_BASELINE_MICRO_F1),
                 row("micro F1 of predicting no label", None, M.ALL_NEGATIVE_BASELINE_MICRO_F1),
                 row("Hamming loss of predicting no label", None,
                     M.ALL_NEGATIVE_BASELINE_HAMMING_LOSS)]
    rows.append(row("loss", M.VAL_LOSS, None))
    return rows


def _selection(task: str, m: dict[str, float], params: dict[str, str]) -> str:
    """How versions of this task are chosen, and the trivial baselines they beat."""
    spec = task_spec(task)
    separation = (f"smallest angle between prototypes {_fmt(m.get(M.SEPARATION_MIN_ANGLE_DEG), 1)} "
                  "degrees.")
    if spec.name == REGRESSION:
        return ("Promotion compares validation MAE (lower is better); the test numbers are "
                "reported beside it, never used to choose. Mean-target baseline (always "
                "predicting the training split's mean) MAE "
                f"{_fmt(m.get(M.VAL_MEAN_BASELINE_MAE))} on validation, "
                f"{_fmt(m.get(M.MEAN_BASELINE_MAE))} on test; target range "
                f"[{_fmt(m.get(M.TARGET_LOW), 2)}, {_fmt(m.get(M.TARGET_HIGH), 2)}] "
                f"({_target_name(params)}), taken from the training split.")
    if spec.multilabel:
        if M.DECISION_TOP_K in m:
            rule = f"top {m[M.DECISION_TOP_K]:.0f} labels per text"
        elif M.DECISION_THRESHOLD in m:
            rule = f"every label whose cosine is at least {m[M.DECISION_THRESHOLD]:.4f}"
        else:
            rule = "not recorded"
        return ("Promotion compares validation micro-F1; the test numbers are reported beside "
                "it, never used to choose. Hamming loss and subset accuracy reward a model "
                "that predicts almost nothing, so read micro/macro F1 and recall first. "
                f"Decision rule, chosen on validation: {rule}; {separation}")
    compared = ("the validation joint score (the mean of accuracy and MAE skill, 1 - MAE / "
                "the mean-target baseline's MAE)" if spec.name == JOINT else "validation accuracy")
    text = (f"Promotion compares {compared}; the test numbers are reported beside "
            "it, never used to choose. Majority-class baseline accuracy "
            f"{_fmt(m.get(M.MAJORITY_BASELINE_ACCURACY))}; {separation}")
    if spec.name == JOINT:
        text += (" Registration also asks the regression half to beat the mean-target "
                 f"baseline: MAE {_fmt(m.get(M.VAL_MEAN_BASELINE_MAE))} on validation, "
                 f"{_fmt(m.get(M.MEAN_BASELINE_MAE))} on test; target range "
                 f"[{_fmt(m.get(M.TARGET_LOW), 2)}, {_fmt(m.get(M.TARGET_HIGH), 2)}] "
                 f"({_target_name(params)}), taken from the training split.")
    return text


def _what_it_does(task: str, classes: Any, params: dict[str, str]) -> tuple[str, str, str]:
    """(title noun, what the network does, its output columns) for the task."""
    spec = task_spec(task)
    target = _target_name(params)
    scores = "`score_<class>` (double) for each class"
    classify = ("`label` (string), `score` (double: the best class's cosine in [-1, 1], not a "
                f"probability) and {scores}")
    value = f"`{PREDICTION_COLUMN}` (double: the predicted {target}, in its own units)"
    if spec.name == REGRESSION:
        does = (f"predicting {target} from persona descriptions (two opposite prototypes: the "
                "output's cosine to the upper one maps onto the target's range)")
        return "regressor", does, value
    if spec.multilabel:
        out = (f"`{LABELS_COLUMN}` (list of strings: the predicted label set) and "
               "`score_<label>` (double: the label's cosine in [-1, 1]) for each label")
        return "multi-label tagger", f"tagging persona descriptions with any of {classes} labels", out
    if spec.name == JOINT:
        does = f"classifying persona descriptions into {classes} classes and predicting {target}"
        return "classifier and regressor", does, f"{classify}, and {value}"
    return ("classifier", f"classifying persona descriptions into {classes} classes", classify)


def model_card(run: Any, dataset: dict[str, Any], model_uri: str) -> str:
    """A registered version's model card, in Markdown: what the model is, how it scored (val
    first, test beside; the run's task's metrics and the trivial baselines it beat), on which
    data, what goes in and out, how to use it."""
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    task = task_spec(run_task(run)).name
    counts = dataset.get("label_counts") or {}
    classes = len(counts) or int(m.get("num_classes", 0)) or "?"
    layers = int(p.get("encoder.trainable_layers") or 0)
    tuning = f"top {layers} layers fine-tuned" if layers else "frozen (cached embeddings)"
    encoder = (f"`{p.get('encoder.name')}`, {p.get('encoder.pooling')} pooling, max length "
               f"{p.get('encoder.max_length')}, {tuning}")
    prototypes = (f"{_count(run)} {p.get('model.prototype_mode')} prototypes in dimension "
                  f"{p.get('model.prototype_dim')} ({p.get('model.prototype_assignment', 'per_class')}), "
                  f"loss {p.get('model.loss')}, temperature {_num(p.get('model.temperature'))}")
    training = (f"{p.get('train.optimizer')}, lr {_num(p.get('train.lr'))}, batch "
                f"{p.get('train.batch_size')}, {p.get('train.epochs')} epochs, separation weight "
                f"{_num(p.get('train.separation_weight'))}, seed {p.get('train.seed')}")
    selection = _selection(task, m, p)
    split = dataset.get("split") or {}
    data = f"`{dataset.get('name')}`"
    if "num_rows" in dataset:
        data += f", {dataset['num_rows']} texts"
    if split:
        data += f" (train {split.get('train')}, val {split.get('val')}, test {split.get('test')})"
    data += f"; dataset fingerprint `{dataset.get('fingerprint') or '?'}`."
    if counts:
        shown = list(counts.items())[:CARD_CLASSES]
        more = f", and {len(counts) - len(shown)} more" if len(counts) > len(shown) else ""
        data += "\nClasses (examples): " + ", ".join(f"{k} {v}" for k, v in shown) + more + "."
    noun, does, output = _what_it_does(task, classes, p)
    lines = [
        f"# `{model_uri}`: HPN persona {noun}",
        "",
        (f"A Hyperspherical Prototype Network {does}, "
         f"from trial run `{run.info.run_name}` of study `{tags.get(STUDY_TAG, '?')}` "
         f"(MLflow run `{run.info.run_id}`, Ray trial `{tags.get(TRIAL_ID_TAG, '?')}`)."),
        "",
        "## Model",
        "",
        f"- Encoder: {encoder}",
        f"- Prototypes: {prototypes}",
        f"- Training: {training}",
        "",
        "## Metrics",
        "",
        *_metric_rows(task, m),
        "",
        selection,
        "",
        "## Data",
        "",
        data,
        "",
        "## Input and output",
        "",
        f"- Input: a DataFrame with a string column `{TEXT_COLUMN}`, one persona description a row.",
        f"- Output: {output}.",
        "",
        "## Use",
        "",
        "```bash",
        f'hpn-tune predict --model {model_uri} "A pediatric nurse who volunteers at a rural clinic."',
        f"hpn-tune serve --model {model_uri} --port 5001",
        "```",
        "",
        "```python",
        "from tuning.serving import load_model  # checks the model first: no pickle, our code",
        f'load_model("{model_uri}", TRACKING_URI).predict(pd.DataFrame({{"text": [...]}}))',
        "```",
    ]
    return "\n".join(lines)


def _count(run: Any) -> str:
    """The model's number of prototypes, however its config gave it."""
    if M.NUM_PROTOTYPES in run.data.metrics:
        return f"{run.data.metrics[M.NUM_PROTOTYPES]:.0f}"
    return f"{run.data.params.get('model.prototypes_per_class')} per class"


def _log_card(client: MlflowClient, run_id: str, model_id: str | None, card: str) -> None:
    """The card as `model_card.md` on the trial's run, and inside the model's own files (so a
    downloaded or served model carries it)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_CARD_FILE
        path.write_text(card + "\n")
        client.log_artifact(run_id, str(path))
        if model_id:
            client.log_model_artifact(model_id, str(path))


def _link_version(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Record the version on its LoggedModel, which the Models tab shows in its registered
    models column. An MLflow server does it itself; a SQL store reached directly does not."""
    logged = client.get_logged_model(model_id)
    versions = json.loads(logged.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    if not any(v.get("name") == name and str(v.get("version")) == version for v in versions):
        versions.append({"name": name, "version": int(version)})  # as the server writes it
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})


def _registered(client: MlflowClient, model_name: str, run_id: str) -> Any | None:
    """The run's version under `model_name`, if it was registered: its torch one (an export
    registered from the same run is another version of it, not the run's registration)."""
    try:
        versions = client.search_model_versions(f"name = '{model_name}' AND run_id = '{run_id}'")
    except MlflowException:
        return None  # no such registered model yet
    versions = [v for v in versions if version_format(v) == TORCH_FORMAT]
    return max(versions, key=lambda v: int(v.version), default=None)


#: What a registered model of each task does, for its description.
MODEL_DOES = {CLASSIFICATION: "classification", REGRESSION: "regression",
              MULTILABEL: "multi-label tagging", JOINT: "classification and regression"}


def default_model_name(task: str | None) -> str:
    """Each task's models under their own registered name (hpn-persona for classification,
    hpn-persona-regression, ...): a registered model's versions should answer in one shape."""
    name = task_spec(task).name
    return DEFAULT_MODEL_NAME if name == CLASSIFICATION else f"{DEFAULT_MODEL_NAME}-{name}"


def promote_model_name(client: MlflowClient, study: str | None, run_id: str | None) -> str:
    """The registered model `promote` works on when --model-name is not given: the one the
    study's (or run's) versions are under; a run never registered: its task's default name."""
    if study is None and run_id is None:
        return DEFAULT_MODEL_NAME
    # the run, when both are given: promote acts on it
    where = f"run_id = '{run_id}'" if run_id else f"tags.study = '{study}'"
    try:
        versions = client.search_model_versions(where)
    except MlflowException:
        versions = []
    names = sorted({v.name for v in versions})
    if len(names) > 1:  # the task's own default name wins, as a study registers there
        defaults = {default_model_name(version_task(client, v)) for v in versions}
        names = sorted(defaults & set(names)) or names
    if len(names) > 1:
        what = f"study {study!r}" if study else f"run {run_id}"
        raise HPNInputError(f"--model-name: {what} has versions under {', '.join(names)}; "
                            "name the registered model to promote in")
    if names:
        return names[0]
    if run_id is not None:
        try:
            return default_model_name(run_task(client.get_run(run_id)))
        except MlflowException:
            pass  # promote says the run does not exist
    return DEFAULT_MODEL_NAME


def _task_mix_problem(client: MlflowClient, model_name: str, task: str) -> str | None:
    """Why a `task` model cannot join `model_name` (its versions are of another task), or None:
    `models:/<name>@champion` would change the columns it answers in under its users."""
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return None
    others = sorted({version_task(client, v) for v in versions} - {task})
    if not others:
        return None
    other_name = default_model_name(task)
    if other_name == model_name:
        other_name = f"{model_name}-{task}"
    return (f"the registered model {model_name!r} holds {' and '.join(others)} models and this "
            f"is a {task} one; register it under its own name with --model-name "
            f"(e.g. {other_name})")


def register_run(client: MlflowClient, run_id: str, model_name: str = DEFAULT_MODEL_NAME,
                 margin: float = M.DEFAULT_BASELINE_MARGIN) -> str:
    """Register the run's model (its LoggedModel) as a new version with small tags and a model
    card; returns the version number. A run already registered under `model_name` keeps its
    version (a resumed study's end). Raises RegistrationRefused, registering nothing, when the
    model fails the registration check (`registration_problem`)."""
    version = _registered(client, model_name, run_id)
    if version is not None:
        return str(version.version)
    check_margin(margin)
    try:  # first, as it costs no model load: one registered model, one task
        task = task_spec(run_task(client.get_run(run_id))).name
        problem = _task_mix_problem(client, model_name, task)
    except MlflowException:
        problem = None  # registration_problem names the missing run
    problem = problem or registration_problem(client, run_id, margin)
    if problem:
        raise RegistrationRefused(f"run {run_id} not registered: {problem}")
    run = client.get_run(run_id)
    task = task_spec(run_task(run)).name
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        try:
            client.create_registered_model(
                model_name, description=f"Hyperspherical Prototype Networks: persona text "
            f"{MODEL_DOES[task]}.")
        except MlflowException:
            pass  # created concurrently by another study
    dataset = _run_dataset(client, run)
    tags = _version_tags(run, dataset, task, TORCH_FORMAT)
    logged = run_model(client, run_id)
    # The LoggedModel's own location, not `models:/<model_id>`: a SQL registry resolves that
    # through the process's global tracking URI (see tuning.pyfunc.model_artifact_uri). A run
    # logged before LoggedModels holds its model as its `model` artifact.
    source = logged.artifact_location if logged else f"{run.info.artifact_uri}/{MODEL_ARTIFACT}"
    version = str(client.create_model_version(
        model_name, source=source, run_id=run_id, tags=tags,
        model_id=logged.model_id if logged else None,
    ).version)
    card = model_card(run, dataset, f"models:/{model_name}/{version}")
    client.update_model_version(model_name, version, description=card[:5000])
    _log_card(client, run_id, logged.model_id if logged else None, card)
    if logged:
        _link_version(client, logged.model_id, model_name, version)
    return version


def _version_tags(run: Any, dataset: dict[str, Any], task: str, serving_format: str) -> dict[str, str]:
    """A version's small tags: study, trial, data, task, headline metrics, serving format."""
    tags = {"study": run.data.tags.get(STUDY_TAG, ""), "trial": run.data.tags.get(TRIAL_ID_TAG, ""),
            "dataset_fingerprint": dataset.get("fingerprint") or "", TASK_VERSION_TAG: task,
            SERVING_FORMAT_TAG: serving_format}
    shown = card_metrics(task)
    tags.update({f"metric.{k}": f"{v:.6f}" for k, v in run.data.metrics.items() if k in shown})
    return tags


def version_format(version: Any) -> str:
    """What a version serves through: its SERVING_FORMAT_TAG (torch when registered before
    exports existed)."""
    return (version.tags or {}).get(SERVING_FORMAT_TAG) or TORCH_FORMAT


def register_export(client: MlflowClient, run_id: str, model_id: str, model_name: str,
                    serving_format: str, margin: float = M.DEFAULT_BASELINE_MARGIN) -> str:
    """Register an export of the run's model (the LoggedModel `model_id` that `log_pyfunc`
    made with the graph) as a new version of `model_name`, tagged with its serving format;
    returns the version number. The registration check applies as to any version: the run
    beats its baselines, and the export loads and predicts in a fresh process."""
    check_margin(margin)
    run = client.get_run(run_id)
    task = task_spec(run_task(run)).name
    logged = client.get_logged_model(model_id)
    problem = (_task_mix_problem(client, model_name, task)
               or baseline_problem(run.data.metrics, margin, task)
               or load_problem(client, f"models:/{model_id}", logged.artifact_location))
    if problem:
        raise RegistrationRefused(f"the {serving_format} export of run {run_id} not registered: "
                                  f"{problem}")
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(
            model_name, description=f"Hyperspherical Prototype Networks: persona text "
            f"{MODEL_DOES[task]}.")
    dataset = _run_dataset(client, run)
    version = str(client.create_model_version(
        model_name, source=logged.artifact_location, run_id=run_id, model_id=model_id,
        tags=_version_tags(run, dataset, task, serving_format)).version)
    card = model_card(run, dataset, f"models:/{model_name}/{version}")
    card += (f"\n\nServes through the whole-model ONNX graph ({serving_format}) exported from "
             "the run's model and checked against its predictions (`hpn-tune export`).")
    client.update_model_version(model_name, version, description=card[:5000])
    _link_version(client, model_id, model_name, version)
    return version


def _optional_metric(client: MlflowClient, version: Any, metric: str,
                     run_id: str | None = None) -> float | None:
    """A version's metric (its tag, else its run's), or, with no version, the run's."""
    if version is not None:
        tag = version.tags.get(f"metric.{metric}")
        if tag is not None:
            return float(tag)
        run_id = version.run_id
    value = client.get_run(run_id).data.metrics.get(metric) if run_id else None
    return None if value is None else float(value)


def _version_metric(client: MlflowClient, version: Any, metric: str,
                    run_id: str | None = None) -> float:
    value = _optional_metric(client, version, metric, run_id)
    if value is None:
        what = f"version {version.version}" if version is not None else f"run {run_id}"
        raise HPNInputError(f"--metric: {what} has no metric {metric!r}")
    return value


def _alias(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _set_alias(client: MlflowClient, name: str, alias: str, version: str, attempts: int = 5) -> None:
    """Point `alias` at `version`, retrying a lost race to create the alias row.

    MLflow's SQL store sets an alias by select-then-insert (`session.merge`), so two promoters
    setting a new alias at once can fail with a unique-constraint error; the retry updates
    the row the other one created.
    """
    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def _check_metric(metric: str) -> None:
    """The gate compares one trial's own validation number: a test metric would make the
    champion's test number a selected, optimistic one, a study's number (best_test_accuracy,
    best_val_accuracy on its run) belongs to no model, and a baseline's is no model's."""
    if not metric.startswith("val_") or "baseline" in metric:
        raise HPNInputError(
            f"--metric {metric}: promotion compares a trial's own validation metric (e.g. "
            f"{M.VAL_ACCURACY} or {M.VAL_MAE}; by default the task's primary metric); test "
            "numbers are reported beside it, never used to choose")


def metric_mode(metric: str, task: str | None = None) -> str:
    """Whether higher ("max") or lower ("min") `metric` is better: the task's own metrics
    (its primary, its gates) say so; any other is an error when named like one (val_loss,
    val_mae, val_rmse, *_hamming_loss) and a score otherwise."""
    spec = task_spec(task)
    if metric == spec.primary:
        return spec.mode
    for gate in spec.gates:
        if metric == gate.metric:
            return gate.mode
    return "min" if metric.endswith(LOWER_IS_BETTER_SUFFIXES) else "max"


def version_task(client: MlflowClient, version: Any) -> str:
    """A version's task: its `task` tag, else its run's (`run_task`), else classification
    (registered before tasks existed, or without a run)."""
    tagged = (version.tags or {}).get(TASK_VERSION_TAG)
    if tagged:
        return tagged
    if version.run_id:
        try:
            return run_task(client.get_run(version.run_id))
        except MlflowException:
            pass
    return task_spec(None).name


def _trial_run(client: MlflowClient, run_id: str, metric: str | None) -> Any:
    """The run --run-id names, refused in one line unless it holds a model and `metric`
    (None: its task's primary metric)."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise HPNInputError(f"--run-id: no run {run_id!r} in this store") from None
    if _model_location(client, run) is None:
        study = run.data.tags.get(STUDY_TAG)
        if run.data.tags.get(ROLE_TAG) == "study":
            raise HPNInputError(
                f"--run-id {run_id} is the run of study {study!r}, which holds no model; use "
                f"--study {study} or the run id of one of its trials (hpn-tune show {study})")
        raise HPNInputError(f"--run-id {run_id}: the run holds no model; give a trial's run id")
    metric = metric or task_spec(run_task(run)).primary
    if metric not in run.data.metrics:
        raise HPNInputError(f"--metric: run {run_id} has no metric {metric!r}")
    return run


def format_switch(candidate: Any, champion: Any) -> bool:
    """Whether `candidate` is the champion's own model in another serving format: another
    version registered from the champion's run (its `hpn-tune export --register`, or the
    torch version an export came from). Same model, same validation metric: promoting it
    switches the format, with nothing to compare (it could never be "above" itself)."""
    return (candidate is not None and champion is not None and bool(candidate.run_id)
            and candidate.run_id == champion.run_id
            and str(candidate.version) != str(champion.version))


def _candidate(client: MlflowClient, name: str, study: str | None) -> Any:
    """The newest version of `name` (of `study`), in any serving format: an export registered
    after its run's torch version is the newer one (a format switch when that run is the
    champion's, `format_switch`). `_registered` picks by run instead: the run's torch version."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        versions = []
    if not versions:
        raise HPNInputError(f"--model-name: no registered model {name!r}; run a study first")
    elif study:
        matches = [v for v in versions if v.tags.get("study") == study]
        if not matches:
            raise HPNInputError(f"--study: no version of {name!r} comes from study {study!r}")
    else:
        matches = versions
    return max(matches, key=lambda v: int(v.version))


def _test_note(value: float | None, metric: str = M.TEST_ACCURACY) -> str:
    """`, test_accuracy 0.7123`: reported beside the gate's number, never used to choose."""
    return f", {metric} {value:.4f}" if value is not None else ""


def promote(client: MlflowClient, model_name: str = DEFAULT_MODEL_NAME, study: str | None = None,
            run_id: str | None = None, metric: str | None = None, force: bool = False,
            margin: float = M.DEFAULT_BASELINE_MARGIN) -> dict[str, Any]:
    """Move `champion` to the candidate if it beats the champion on `metric` (or `force`).

    `metric` None is the candidate's task's primary metric (val_accuracy, val_mae,
    val_micro_f1), compared in its direction: for an error metric the lower wins. The gate
    compares validation numbers: choosing on test would make the test number of the champion
    an optimistic, selected one. The task's test metric is reported beside it. A champion of
    another task is refused (their metrics do not compare) unless `force`. Whatever `force`
    says, the candidate must pass the registration check (`registration_problem`) before it
    is aliased; a --run-id not registered yet is weighed first and registered only once it
    will be promoted, so every refusal leaves the registry as it was. A version of the
    champion's own run (`format_switch`: its export, or back to its torch version) is no
    contest: the alias moves without comparison and `format_switch` says from what to what.
    """
    if metric is not None:
        _check_metric(metric)
    check_margin(margin)
    if run_id:
        run = _trial_run(client, run_id, metric)
        task = task_spec(run_task(run)).name
        candidate = _registered(client, model_name, run_id)  # None: registered once it passes
        mine = (candidate.tags.get("dataset_fingerprint") if candidate is not None
                else _run_dataset(client, run).get("fingerprint"))
    else:
        candidate = _candidate(client, model_name, study)
        task = task_spec(version_task(client, candidate)).name
        mine = candidate.tags.get("dataset_fingerprint")
    spec = task_spec(task)
    metric = metric or spec.primary
    mode = metric_mode(metric, task)
    test_metric = spec.test_primary
    what = f"version {candidate.version}" if candidate is not None else f"run {run_id}"
    score = _version_metric(client, candidate, metric, run_id)
    champion = _alias(client, model_name, CHAMPION)
    # Version numbers are ints from a SQL store and strs over REST: report them as strs.
    result = {"model_name": model_name,
              "version": str(candidate.version) if candidate is not None else None,
              "task": task, "metric": metric, "mode": mode, "candidate_value": score,
              "champion_version": None, "champion_value": None, "champion_test_accuracy": None,
              "candidate_test_accuracy": _optional_metric(client, candidate, M.TEST_ACCURACY,
                                                          run_id),
              "test_metric": test_metric, "champion_test_value": None,
              "candidate_test_value": _optional_metric(client, candidate, test_metric, run_id)}
    switch = format_switch(candidate, champion)
    result["format_switch"] = (f"{version_format(champion)} -> {version_format(candidate)}"
                               if switch else None)
    if switch:  # the champion's own model in another format: the alias moves, no comparison
        result.update(champion_version=str(champion.version),
                      champion_value=_optional_metric(client, champion, metric),
                      champion_test_accuracy=_optional_metric(client, champion, M.TEST_ACCURACY),
                      champion_test_value=_optional_metric(client, champion, test_metric))
    elif champion is not None:
        if candidate is not None and champion.version == candidate.version:
            return {**result, "promoted": False, "reason": f"version {candidate.version} is already champion"}
        theirs_task = task_spec(version_task(client, champion)).name
        if theirs_task != task and not force:
            raise PromotionRefused(
                f"{what} is a {task} model and champion version {champion.version} a "
                f"{theirs_task} one, so their {metric} are not comparable; nothing changed "
                "(use --force to override)")
        held = (_version_metric(client, champion, metric) if theirs_task == task
                else _optional_metric(client, champion, metric))
        result.update(champion_version=str(champion.version), champion_value=held,
                      champion_test_accuracy=_optional_metric(client, champion, M.TEST_ACCURACY),
                      champion_test_value=_optional_metric(client, champion, test_metric))
        theirs = champion.tags.get("dataset_fingerprint")
        if not force and mine and theirs and mine != theirs:
            raise PromotionRefused(
                f"{what} was trained on other data than champion version "
                f"{champion.version} (dataset fingerprint {mine[:12]} vs {theirs[:12]}), so their "
                f"{metric} are not comparable; nothing changed (use --force to override)")
        lower = mode == "min"  # an error (val_mae, val_loss): smaller is better
        better = held is not None and is_better(score, held, mode)
        if not force and not (math.isfinite(score) and better):
            raise PromotionRefused(
                f"{what} has {metric} {score:.4f}"
                f"{_test_note(result['candidate_test_value'], test_metric)}, "
                f"not {'below' if lower else 'above'} champion version {champion.version} at "
                f"{held:.4f}{_test_note(result['champion_test_value'], test_metric)}; nothing "
                "changed (use --force to override)")
    problem = (registration_problem(client, run_id, margin) if candidate is None
               else _version_problem(client, model_name, candidate, margin))
    if problem:
        raise PromotionRefused(f"{what} fails the registration check: {problem}; nothing changed "
                               "(--force does not override it)")
    if candidate is None:  # the check above passed, so this registers (its result is cached)
        version = register_run(client, run_id, model_name, margin)
        candidate = client.get_model_version(model_name, version)
        result["version"] = str(candidate.version)
    if champion is not None:
        _set_alias(client, model_name, PREVIOUS, champion.version)
    _set_alias(client, model_name, CHAMPION, candidate.version)
    return {**result, "promoted": True}


def rollback(client: MlflowClient, model_name: str = DEFAULT_MODEL_NAME) -> dict[str, Any]:
    """Swap `champion` and `previous`, so a second rollback undoes the first."""
    previous = _alias(client, model_name, PREVIOUS)
    if previous is None:
        raise HPNInputError(f"--model-name: {model_name!r} has no 'previous' version to roll back to")
    champion = _alias(client, model_name, CHAMPION)
    _set_alias(client, model_name, CHAMPION, previous.version)
    if champion is not None:
        _set_alias(client, model_name, PREVIOUS, champion.version)
    return {"model_name": model_name, "champion": str(previous.version),
            "previous": str(champion.version) if champion is not None else None}
