"""The MLflow Model Registry: register a trial's model, promote behind a gate, roll back.

Aliases, not the deprecated stages: `champion` is what `models:/<name>@champion` serves,
`previous` keeps the champion before it reachable for rollback.
"""
from __future__ import annotations

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
from tuning.pyfunc import MODEL_ARTIFACT, TEXT_COLUMN, run_model
from tuning.tracking import FINGERPRINT_TAG, PARENT_TAG, STUDY_TAG, TRIAL_ID_TAG

CHAMPION, PREVIOUS = "champion", "previous"
DEFAULT_MODEL_NAME = "hpn-persona"
CARD_METRICS = (M.TEST_ACCURACY, M.TEST_MACRO_F1, M.VAL_ACCURACY, M.SEPARATION_MIN_ANGLE_DEG)
MODEL_CARD_FILE = "model_card.md"
CARD_CLASSES = 20  # classes listed by name in a card


class PromotionRefused(RuntimeError):
    """The candidate does not beat the champion: nothing was changed."""

    exit_code, label = 1, "refused"


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
        f'mlflow.pyfunc.load_model("{model_uri}").predict(pd.DataFrame({{"text": [...]}}))',
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


def register_run(client: MlflowClient, run_id: str, model_name: str = DEFAULT_MODEL_NAME) -> str:
    """Register the run's model (its LoggedModel) as a new version with small tags and a model
    card; returns the version number. A run already registered under `model_name` keeps its
    version (a resumed study's end)."""
    try:
        for version in client.search_model_versions(f"name = '{model_name}' AND run_id = '{run_id}'"):
            return str(version.version)
    except MlflowException:
        pass  # no such registered model yet
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


def _version_metric(client: MlflowClient, version: Any, metric: str) -> float:
    tag = version.tags.get(f"metric.{metric}")
    if tag is not None:
        return float(tag)
    if version.run_id:
        value = client.get_run(version.run_id).data.metrics.get(metric)
        if value is not None:
            return float(value)
    raise HPNInputError(f"--metric: version {version.version} has no metric {metric!r}")


def _optional_metric(client: MlflowClient, version: Any, metric: str) -> float | None:
    try:
        return _version_metric(client, version, metric)
    except HPNInputError:
        return None


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


def _candidate(client: MlflowClient, name: str, study: str | None, run_id: str | None) -> Any:
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        versions = []
    if run_id:  # registered here if need be, so a --no-register study's run can be promoted
        matches = [v for v in versions if v.run_id == run_id]
        if not matches:
            try:
                return client.get_model_version(name, register_run(client, run_id, name))
            except MlflowException:
                raise HPNInputError(f"--run-id: no run {run_id!r} with a model in this store") from None
    elif not versions:
        raise HPNInputError(f"--model-name: no registered model {name!r}; run a study first")
    elif study:
        matches = [v for v in versions if v.tags.get("study") == study]
        if not matches:
            raise HPNInputError(f"--study: no version of {name!r} comes from study {study!r}")
    else:
        matches = versions
    return max(matches, key=lambda v: int(v.version))


def _test_note(client: MlflowClient, version: Any) -> str:
    """`, test_accuracy 0.7123`: reported beside the gate's number, never used to choose."""
    value = _optional_metric(client, version, M.TEST_ACCURACY)
    return f", {M.TEST_ACCURACY} {value:.4f}" if value is not None else ""


def promote(client: MlflowClient, model_name: str = DEFAULT_MODEL_NAME, study: str | None = None,
            run_id: str | None = None, metric: str = M.VAL_ACCURACY, force: bool = False) -> dict[str, Any]:
    """Move `champion` to the candidate if it beats the champion on `metric` (or `force`).

    The gate compares validation numbers: choosing on test would make the test number of the
    champion an optimistic, selected one. Test accuracy is reported beside it.
    """
    if metric.startswith("test_"):
        raise HPNInputError(f"--metric {metric}: promotion chooses on validation (e.g. "
                            f"{M.VAL_ACCURACY}); test numbers are reported beside it, never used to choose")
    candidate = _candidate(client, model_name, study, run_id)
    score = _version_metric(client, candidate, metric)
    champion = _alias(client, model_name, CHAMPION)
    # Version numbers are ints from a SQL store and strs over REST: report them as strs.
    result = {"model_name": model_name, "version": str(candidate.version), "metric": metric,
              "candidate_value": score, "champion_version": None, "champion_value": None,
              "candidate_test_accuracy": _optional_metric(client, candidate, M.TEST_ACCURACY),
              "champion_test_accuracy": None}
    if champion is not None:
        if champion.version == candidate.version:
            return {**result, "promoted": False, "reason": f"version {candidate.version} is already champion"}
        held = _version_metric(client, champion, metric)
        result.update(champion_version=str(champion.version), champion_value=held,
                      champion_test_accuracy=_optional_metric(client, champion, M.TEST_ACCURACY))
        mine, theirs = (v.tags.get("dataset_fingerprint") for v in (candidate, champion))
        if not force and mine and theirs and mine != theirs:
            raise PromotionRefused(
                f"version {candidate.version} was trained on other data than champion version "
                f"{champion.version} (dataset fingerprint {mine[:12]} vs {theirs[:12]}), so their "
                f"{metric} are not comparable; nothing changed (use --force to override)")
        if not force and not (math.isfinite(score) and score > held):
            raise PromotionRefused(
                f"version {candidate.version} has {metric} {score:.4f}{_test_note(client, candidate)}, "
                f"not above champion version {champion.version} at {held:.4f}"
                f"{_test_note(client, champion)}; nothing changed (use --force to override)")
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
