"""MLflow bookkeeping: the study's parent run and each trial's child run.

All calls go through `MlflowClient` with explicit run ids (no fluent "active run"), because
trials log from Ray actors, possibly on other nodes, where no active run exists.
"""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from hpn.errors import HPNInputError

TRIAL_ID_TAG = "hpn.trial_id"
STUDY_TAG = "hpn.study"
STATE_TAG = "hpn.trial_state"  # completed | pruned | error | lost
ERROR_TAG = "hpn.error"  # why a trial failed
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI
#: MLflow status per trial state: a pruned trial did what the scheduler asked, so it is
#: FINISHED (its state tag says pruned) and only real failures show as failed in the UI.
RUN_STATUS = {"completed": "FINISHED", "pruned": "FINISHED"}
PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "hpn.role"  # study | trial
# With --repeats N, one proposed config runs N times (train.seed, +1, +2, ...): each repeat is
# its own trial run, tagged with its index and the id of its config's first trial.
REPEAT_TAG = "hpn.repeat"
CONFIG_GROUP_TAG = "hpn.config_group"
SEED_TAG = "hpn.seed"  # the study's sampler seed (replayable)
REPEATS_TAG = "hpn.repeats"
# The study's parent run: what it searched and on which data, and how it was run.
SPACE_FILE_TAG = "hpn.space_file"
SAMPLER_TAG = "hpn.sampler"
SCHEDULER_TAG = "hpn.scheduler"
FINGERPRINT_TAG = "hpn.dataset_fingerprint"
CODE_VERSION_TAG = "hpn.code_version"
COMMAND_TAG = "hpn.command"
BASE_CONFIG_TAG = "hpn.base_config"  # the resolved config a resumed study must reuse
BEST_RUN_TAG = "hpn.best_run_id"
# What a study was started with, so `--resume --name S` continues it as it was.
TRIALS_TAG = "hpn.trials"
MAX_CONCURRENT_TAG = "hpn.max_concurrent"
CPUS_PER_TRIAL_TAG = "hpn.cpus_per_trial"
GPUS_PER_TRIAL_TAG = "hpn.gpus_per_trial"
WALL_METRIC = "study_wall_s"  # the study's own wall time, summed over its sessions
# Where a trial ran. The hostname alone cannot tell apart two Ray nodes on one machine (or
# two containers sharing a host name), so the Ray node id and node IP go beside it.
NODE_TAG = "hpn.node"
RAY_NODE_ID_TAG = "hpn.ray_node_id"
NODE_IP_TAG = "hpn.node_ip"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else a SQLite file in the working directory.

    Made absolute because Ray trials run with another working directory.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a bare path means a file store directory
        return str(Path(uri).resolve())
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise HPNInputError(f"--experiment: {name!r} is deleted in MLflow; restore it or pick another name")
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:"):
        # A SQLite store has no artifact root of its own: keep artifacts beside the database.
        db = Path(tracking_uri[len("sqlite:///"):])
        location = (db.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def code_version() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return f"hpn-tune=={version('hpn-tune')}"


def find_study_run(client: MlflowClient, experiment_id: str, study: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{STUDY_TAG}` = '{study}' AND tags.`{ROLE_TAG}` = 'study'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Any]:
    return client.search_runs(
        [experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=50_000
    )


def trial_run_name(study: str, number: int | None, trial_id: str) -> str:
    """`<study>-t007` for the study's 7th trial: readable in the UI's run list (Ray's hex
    trial id stays the `hpn.trial_id` tag); the id itself when the number is unknown."""
    return f"{study}-t{number:03d}" if number else trial_id


def close_trial_run(client: MlflowClient, run_id: str, state: str, reason: str | None = None) -> None:
    """End a trial's run in `state`, with the reason as its description (and, for a failure,
    as the `hpn.error` tag). The one place a trial run is closed, by the trial or for it."""
    tags = [RunTag(STATE_TAG, state)]
    if reason:
        tags.append(RunTag(NOTE_TAG, reason[:5000]))
        if state == "error":
            tags.append(RunTag(ERROR_TAG, reason[:5000]))
    client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, status=RUN_STATUS.get(state, "FAILED"))


def _param_value(value: Any) -> str:
    return str(value)[:6000]


class TrialRun:
    """One trial's child run. Re-opened (never duplicated) when a resumed study re-runs it."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                 study: str, params: dict[str, Any], tags: dict[str, str] | None = None,
                 number: int | None = None) -> None:
        self.client = MlflowClient(tracking_uri)
        where = {NODE_TAG: socket.gethostname(), **(tags or {})}  # node and repeat tags
        existing = self.client.search_runs(
            [experiment_id],
            f"tags.`{PARENT_TAG}` = '{parent_run_id}' AND tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
            max_results=1,
        )
        #: final metrics when this trial already finished (a resumed study replays them)
        self.finished_metrics: dict[str, float] | None = None
        if existing:
            self.run_id = existing[0].info.run_id
            if existing[0].data.tags.get(STATE_TAG) == "completed":
                self.finished_metrics = dict(existing[0].data.metrics)
                return
            self.client.update_run(self.run_id, status="RUNNING")
            for stale in (STATE_TAG, ERROR_TAG, NOTE_TAG):  # from the interrupted attempt
                if stale in existing[0].data.tags:
                    self.client.delete_tag(self.run_id, stale)
            # A resumed trial may run on another node than its first attempt did.
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in where.items()])
        else:
            run = self.client.create_run(
                experiment_id,
                run_name=trial_run_name(study, number, trial_id),
                tags={PARENT_TAG: parent_run_id, TRIAL_ID_TAG: trial_id, STUDY_TAG: study,
                      ROLE_TAG: "trial", **where},
            )
            self.run_id = run.info.run_id
            self.client.log_batch(
                self.run_id, params=[Param(k, _param_value(v)) for k, v in sorted(params.items())]
            )

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        import math
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def end(self, state: str, reason: str | None = None) -> None:
        close_trial_run(self.client, self.run_id, state, reason)
