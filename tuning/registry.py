"""The MLflow Model Registry: register a trial's model, promote behind a gate, roll back.

Aliases, not the deprecated stages: `champion` is what `models:/<name>@champion` serves,
`previous` keeps the champion before it reachable for rollback.

Nothing bad gets in: a model is registered, and a version aliased champion, only when its
val_accuracy beats the validation split's majority-class baseline by a margin (a diverged trial
does not) and it loads and predicts in a fresh process (tuning/model_check.py).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from hpn import metrics as M
from hpn.errors import HPNInputError
from tuning.model_check import TIMEOUT_S, check_in_fresh_process
from tuning.pyfunc import MODEL_ARTIFACT, TEXT_COLUMN, run_model
from tuning.tracking import FINGERPRINT_TAG, PARENT_TAG, ROLE_TAG, STUDY_TAG, TRIAL_ID_TAG

CHAMPION, PREVIOUS = "champion", "previous"
DEFAULT_MODEL_NAME = "hpn-persona"
CARD_METRICS = (M.TEST_ACCURACY, M.TEST_MACRO_F1, M.VAL_ACCURACY, M.SEPARATION_MIN_ANGLE_DEG,
                M.VAL_MAJORITY_BASELINE_ACCURACY)
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
    """A margin is accuracy points in [0, 1): a negative one would let a model worse than
    always answering the most frequent class through."""
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise HPNInputError(f"--baseline-margin: must be at least 0 and below 1 (accuracy "
                            f"points above the majority-class baseline), got {margin!r}")


def baseline_problem(metrics: dict[str, float], margin: float) -> str | None:
    """Why these final metrics do not beat the trivial baseline on validation by more than
    `margin`; None when they do. Never a test metric: the check chooses what gets served."""
    val = metrics.get(M.VAL_ACCURACY)
    base = metrics.get(M.VAL_MAJORITY_BASELINE_ACCURACY)
    if base is None:
        return (f"it has no {M.VAL_MAJORITY_BASELINE_ACCURACY} to check against (trained before "
                "hpn-tune logged it); train it again")
    if val is None or not math.isfinite(val) or val - base <= margin:
        shown = "none" if val is None else f"{val:.4f}"
        why = ("diverged or untrained" if val is None or not math.isfinite(val) or val <= base
               else "--baseline-margin asks for more")
        return (f"its {M.VAL_ACCURACY} {shown} does not beat the majority-class baseline "
                f"{base:.4f} by more than {margin:g} ({why})")
    return None


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


_QUIET = threading.Lock()
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow draws a download bar on stderr; promote's answer is one line. The variable is
    read per download, so it is set for this one and put back (locked: threads promote)."""
    with _QUIET:
        saved = os.environ.get(_PROGRESS_BAR)
        os.environ[_PROGRESS_BAR] = "false"
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop(_PROGRESS_BAR, None)
            else:
                os.environ[_PROGRESS_BAR] = saved


def _files_digest(client: MlflowClient, source: str) -> str:
    """sha256 over the model's files, but the model card: registering writes the card into
    them (a new one per version) and loading never reads it."""
    import mlflow.artifacts

    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
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
    return baseline_problem(run.data.metrics, margin) or load_problem(client, *location)


def _version_problem(client: MlflowClient, name: str, version: Any, margin: float) -> str | None:
    """The registration check again for a registered version, just before it is served: it
    may have been registered before the check existed, or its files changed since."""
    if not version.run_id:
        return "it has no run whose metrics could be checked against the baseline"
    metrics = client.get_run(version.run_id).data.metrics
    return (baseline_problem(metrics, margin)
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


def model_card(run: Any, dataset: dict[str, Any], model_uri: str) -> str:
    """A registered version's model card, in Markdown: what the model is, how it scored (val
    first, test beside), on which data, what goes in and out, how to use it."""
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
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
    selection = ("Promotion compares validation accuracy; the test numbers are reported beside "
                 "it, never used to choose. Majority-class baseline accuracy "
                 f"{_fmt(m.get(M.MAJORITY_BASELINE_ACCURACY))}; smallest angle between "
                 f"prototypes {_fmt(m.get(M.SEPARATION_MIN_ANGLE_DEG), 1)} degrees.")
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
    output = ("`label` (string), `score` (double: the best class's cosine in [-1, 1], not a "
              "probability) and `score_<class>` (double) for each class")
    lines = [
        f"# `{model_uri}`: HPN persona classifier",
        "",
        (f"A Hyperspherical Prototype Network classifying persona descriptions into {classes} "
         f"classes, from trial run `{run.info.run_name}` of study `{tags.get(STUDY_TAG, '?')}` "
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
        "| metric | validation | test |",
        "|---|---|---|",
        f"| accuracy | {_fmt(m.get(M.VAL_ACCURACY))} | {_fmt(m.get(M.TEST_ACCURACY))} |",
        f"| macro F1 | | {_fmt(m.get(M.TEST_MACRO_F1))} |",
        f"| loss | {_fmt(m.get(M.VAL_LOSS))} | |",
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
    """The run's version under `model_name`, if it was registered."""
    try:
        versions = client.search_model_versions(f"name = '{model_name}' AND run_id = '{run_id}'")
    except MlflowException:
        return None  # no such registered model yet
    return max(versions, key=lambda v: int(v.version), default=None)


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
    problem = registration_problem(client, run_id, margin)
    if problem:
        raise RegistrationRefused(f"run {run_id} not registered: {problem}")
    run = client.get_run(run_id)
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        try:
            client.create_registered_model(
                model_name, description="Hyperspherical Prototype Networks classifying persona text.")
        except MlflowException:
            pass  # created concurrently by another study
    dataset = _run_dataset(client, run)
    tags = {"study": run.data.tags.get(STUDY_TAG, ""), "trial": run.data.tags.get(TRIAL_ID_TAG, ""),
            "dataset_fingerprint": dataset.get("fingerprint") or ""}
    tags.update({f"metric.{k}": f"{v:.6f}" for k, v in run.data.metrics.items() if k in CARD_METRICS})
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
    champion's test number a selected, optimistic one, and a study's number (best_test_accuracy,
    best_val_accuracy on its run) belongs to no model."""
    if not metric.startswith("val_") or metric == M.VAL_MAJORITY_BASELINE_ACCURACY:
        raise HPNInputError(
            f"--metric {metric}: promotion compares a trial's own validation metric (e.g. "
            f"{M.VAL_ACCURACY}); test numbers are reported beside it, never used to choose")


def _trial_run(client: MlflowClient, run_id: str, metric: str) -> Any:
    """The run --run-id names, refused in one line unless it holds a model and `metric`."""
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
    if metric not in run.data.metrics:
        raise HPNInputError(f"--metric: run {run_id} has no metric {metric!r}")
    return run


def _candidate(client: MlflowClient, name: str, study: str | None) -> Any:
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


def _test_note(value: float | None) -> str:
    """`, test_accuracy 0.7123`: reported beside the gate's number, never used to choose."""
    return f", {M.TEST_ACCURACY} {value:.4f}" if value is not None else ""


def promote(client: MlflowClient, model_name: str = DEFAULT_MODEL_NAME, study: str | None = None,
            run_id: str | None = None, metric: str = M.VAL_ACCURACY, force: bool = False,
            margin: float = M.DEFAULT_BASELINE_MARGIN) -> dict[str, Any]:
    """Move `champion` to the candidate if it beats the champion on `metric` (or `force`).

    The gate compares validation numbers: choosing on test would make the test number of the
    champion an optimistic, selected one. Test accuracy is reported beside it. Whatever
    `force` says, the candidate must pass the registration check (`registration_problem`)
    before it is aliased; a --run-id not registered yet is weighed first and registered only
    once it will be promoted, so every refusal leaves the registry as it was.
    """
    _check_metric(metric)
    check_margin(margin)
    if run_id:
        run = _trial_run(client, run_id, metric)
        candidate = _registered(client, model_name, run_id)  # None: registered once it passes
        mine = (candidate.tags.get("dataset_fingerprint") if candidate is not None
                else _run_dataset(client, run).get("fingerprint"))
    else:
        candidate = _candidate(client, model_name, study)
        mine = candidate.tags.get("dataset_fingerprint")
    what = f"version {candidate.version}" if candidate is not None else f"run {run_id}"
    score = _version_metric(client, candidate, metric, run_id)
    champion = _alias(client, model_name, CHAMPION)
    # Version numbers are ints from a SQL store and strs over REST: report them as strs.
    result = {"model_name": model_name,
              "version": str(candidate.version) if candidate is not None else None,
              "metric": metric, "candidate_value": score, "champion_version": None,
              "champion_value": None, "champion_test_accuracy": None,
              "candidate_test_accuracy": _optional_metric(client, candidate, M.TEST_ACCURACY,
                                                          run_id)}
    if champion is not None:
        if candidate is not None and champion.version == candidate.version:
            return {**result, "promoted": False, "reason": f"version {candidate.version} is already champion"}
        held = _version_metric(client, champion, metric)
        result.update(champion_version=str(champion.version), champion_value=held,
                      champion_test_accuracy=_optional_metric(client, champion, M.TEST_ACCURACY))
        theirs = champion.tags.get("dataset_fingerprint")
        if not force and mine and theirs and mine != theirs:
            raise PromotionRefused(
                f"{what} was trained on other data than champion version "
                f"{champion.version} (dataset fingerprint {mine[:12]} vs {theirs[:12]}), so their "
                f"{metric} are not comparable; nothing changed (use --force to override)")
        lower = metric.endswith("_loss")  # val_loss: smaller is better
        better = score < held if lower else score > held
        if not force and not (math.isfinite(score) and better):
            raise PromotionRefused(
                f"{what} has {metric} {score:.4f}{_test_note(result['candidate_test_accuracy'])}, "
                f"not {'below' if lower else 'above'} champion version {champion.version} at "
                f"{held:.4f}{_test_note(result['champion_test_accuracy'])}; nothing changed "
                "(use --force to override)")
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
