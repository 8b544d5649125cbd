"""The MLflow Model Registry: register a trial's model, promote behind a gate, roll back.

Aliases, not the deprecated stages: `champion` is what `models:/<name>@champion` serves,
`previous` keeps the champion before it reachable for rollback.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hpn import metrics as M
from hpn.errors import HPNInputError
from tuning.pyfunc import MODEL_ARTIFACT
from tuning.tracking import FINGERPRINT_TAG, STUDY_TAG, TRIAL_ID_TAG

CHAMPION, PREVIOUS = "champion", "previous"
DEFAULT_MODEL_NAME = "hpn-persona"
CARD_METRICS = (M.TEST_ACCURACY, M.TEST_MACRO_F1, M.VAL_ACCURACY, M.SEPARATION_MIN_ANGLE_DEG)


class PromotionRefused(RuntimeError):
    """The candidate does not beat the champion: nothing was changed."""

    exit_code, label = 1, "refused"


def _model_card(run: Any, study: str | None, fingerprint: str) -> str:
    params = run.data.params
    lines = [
        f"HPN persona classifier from study `{study}`, trial `{run.data.tags.get(TRIAL_ID_TAG)}`.",
        f"Encoder: {params.get('encoder.name')} ({params.get('encoder.pooling')} pooling, "
        f"{params.get('encoder.trainable_layers', '0')} fine-tuned layers); "
        f"{params.get('model.prototype_mode')} prototypes in dimension {params.get('model.prototype_dim')}, "
        f"count {_count(run)} ({params.get('model.prototype_assignment', 'per_class')}).",
        "Metrics: " + ", ".join(f"{k} {run.data.metrics[k]:.4f}" for k in CARD_METRICS if k in run.data.metrics),
        f"Data: {params.get('data.source')} (fingerprint {fingerprint[:12] or '?'}).",
        "Input: a column `text` of raw persona descriptions. Output: `label`, `score`, `score_<class>`.",
    ]
    return "\n".join(lines)


def _count(run: Any) -> str:
    """The model's number of prototypes, however its config gave it."""
    if M.NUM_PROTOTYPES in run.data.metrics:
        return f"{run.data.metrics[M.NUM_PROTOTYPES]:.0f}"
    return f"{run.data.params.get('model.prototypes_per_class')} per class"


def register_run(client: MlflowClient, run_id: str, model_name: str = DEFAULT_MODEL_NAME) -> str:
    """Register the run's `model` artifact as a new version; returns the version number.
    A run already registered under `model_name` keeps its version (a resumed study's end)."""
    try:
        for version in client.search_model_versions(f"name = '{model_name}' AND run_id = '{run_id}'"):
            return str(version.version)
    except MlflowException:
        pass  # no such registered model yet
    run = client.get_run(run_id)
    study = run.data.tags.get(STUDY_TAG)
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        try:
            client.create_registered_model(
                model_name, description="Hyperspherical Prototype Networks classifying persona text.")
        except MlflowException:
            pass  # created concurrently by another study
    parent = run.data.tags.get("mlflow.parentRunId")
    fingerprint = client.get_run(parent).data.tags.get(FINGERPRINT_TAG, "") if parent else ""
    tags = {
        "study": study or "", "trial": run.data.tags.get(TRIAL_ID_TAG, ""),
        "dataset_fingerprint": fingerprint,
        "config": json.dumps(run.data.params, sort_keys=True)[:5000],
    }
    tags.update({f"metric.{k}": f"{v:.6f}" for k, v in run.data.metrics.items() if k in CARD_METRICS})
    version = client.create_model_version(
        model_name, source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id,
        tags=tags, description=_model_card(run, study, fingerprint),
    )
    return str(version.version)


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
