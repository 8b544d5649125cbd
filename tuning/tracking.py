"""MLflow bookkeeping: the study's parent run and each trial's child run.

All calls go through `MlflowClient` with explicit run ids (no fluent "active run"), because
trials log from Ray actors, possibly on other nodes, where no active run exists.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from hpn.errors import HPNInputError

if TYPE_CHECKING:
    import pandas as pd

    from hpn.config import DataConfig
    from hpn.train import PreparedData

TRIAL_ID_TAG = "hpn.trial_id"
STUDY_TAG = "hpn.study"
STATE_TAG = "hpn.trial_state"  # completed | pruned | error | interrupted | lost
ERROR_TAG = "hpn.error"  # why a trial failed
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI
#: MLflow status per trial state: a pruned trial did what the scheduler asked, so it is
#: FINISHED (its state tag says pruned) and only real failures show as failed in the UI.
RUN_STATUS = {"completed": "FINISHED", "pruned": "FINISHED", "interrupted": "KILLED"}
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
#: The study's `model.task` (on its parent run and on every trial run): which metric is
#: primary and in which direction (`hpn.tasks.task_spec`). A run without it predates tasks
#: and is classification (`run_task`).
TASK_TAG = "hpn.task"
#: which encoder runtime (torch | onnx | onnx-int8) produced the embeddings a trial trained on
ENCODER_RUNTIME_TAG = "hpn.encoder_runtime"
# What a study was started with, so `--resume --name S` continues it as it was.
#: a multi-objective study's objectives beside the task's primary (--objectives: memory,latency,...)
OBJECTIVES_TAG = "hpn.objectives"
TRIALS_TAG = "hpn.trials"
MAX_CONCURRENT_TAG = "hpn.max_concurrent"
CPUS_PER_TRIAL_TAG = "hpn.cpus_per_trial"
GPUS_PER_TRIAL_TAG = "hpn.gpus_per_trial"
# The study's Optuna trials (tuning.optuna_store): storage URL without password, study name.
OPTUNA_STORAGE_TAG = "hpn.optuna_storage"
OPTUNA_STUDY_TAG = "hpn.optuna_study"
OPTUNA_TRIAL_TAG = "hpn.optuna_trial"  # on a trial run: its Optuna trial number
# Ray experiments of the study, in order, as JSON [{"name": ..., "trials": ...}]: the first is
# the study's name; `--resume --trials N` beyond the recorded count adds one (`<study>-x2`, ...).
RAY_EXPERIMENTS_TAG = "hpn.ray_experiments"
WALL_METRIC = "study_wall_s"  # the study's own wall time, summed over its sessions
# Where a trial ran. The hostname alone cannot tell apart two Ray nodes on one machine (or
# two containers sharing a host name), so the Ray node id and node IP go beside it.
NODE_TAG = "hpn.node"
RAY_NODE_ID_TAG = "hpn.ray_node_id"
NODE_IP_TAG = "hpn.node_ip"
# The experiment type MLflow 3's UI records (its experiment-type selector writes this tag):
# model training, not GenAI. MLflow 3.17's UI follows its per-browser GenAI / Model training
# switch instead, so the links we print name the mode too (`runs_view_url`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# The corpus as an MLflow dataset input (`log_dataset`): on the study's run and on each trial's.
DATASET_CONTEXT_TAG = "mlflow.data.context"
STUDY_DATASET_CONTEXT, TRIAL_DATASET_CONTEXT = "tuning", "training"
#: MLflow keeps at most 36 characters of a dataset digest: the fingerprint's first 32 hex
#: digits (128 bits) are the digest, the whole fingerprint is in the dataset's profile.
DATASET_DIGEST_CHARS = 32


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else a SQLite file in the working directory,
    without credentials (`move_credentials_to_env`).

    Made absolute because Ray trials run with another working directory.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a bare path means a file store directory
        return str(Path(uri).resolve())
    return move_credentials_to_env(uri)


#: Where a credential taken out of a tracking URI goes: the environment variables MLflow's
#: HTTP client (basic auth) and libpq (a PostgreSQL backend store) read.
CREDENTIAL_ENV = {"http": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
                  "postgresql": (None, "PGPASSWORD")}


def move_credentials_to_env(uri: str) -> str:
    """The URI without its password, which goes to this process's environment instead.

    Why: a URI is copied everywhere (run tags, printed commands, `--json`, Ray's pickled
    trial context under the storage path, worker logs); an environment variable is not, and
    local Ray workers inherit it. An http(s) URI loses `user:password@` to
    MLFLOW_TRACKING_USERNAME/PASSWORD; a postgresql one keeps its user and loses its
    password to PGPASSWORD. Nodes of a remote Ray cluster need these variables set
    themselves, like RAY_AUTH_TOKEN.
    """
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    family = "http" if scheme in ("http", "https") else scheme
    if parts.password is None:
        return uri
    if family not in CREDENTIAL_ENV:
        raise HPNInputError(
            f"--tracking-uri: a password in a {scheme}:// URI would be copied into every run and "
            "Ray's state; give it to the database driver instead (e.g. MySQL's ~/.my.cnf) and "
            "drop it from the URI")
    user_var, password_var = CREDENTIAL_ENV[family]
    host = parts.netloc.rsplit("@", 1)[1]
    if user_var is not None:
        os.environ[user_var] = unquote(parts.username or "")
        netloc = host
    else:
        netloc = f"{parts.username}@{host}" if parts.username else host
    if unquote(parts.password) != "***":  # a command copied from a tag or a printed line
        os.environ[password_var] = unquote(parts.password)
    return urlunsplit(parts._replace(netloc=netloc))


# -- the tracking server being unreachable ---------------------------------------------------

#: MLflow's HTTP client retries a failed call with exponential backoff: by default 7 retries,
#: about 250 s of silence per call while a server is down (and 120 s per attempt while one
#: hangs). hpn-tune bounds it to 5 retries (backoff 0+4+8+16+32 s: about 60 s), which still
#: rides out a 30 s restart, and to 15 s of silence per attempt (a model upload that is
#: moving is not silent), so a hung server costs at most about 60 + 6 x 15 s per call. Set
#: the variables yourself to choose otherwise.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def bound_http_retries() -> float:
    """Apply HTTP_RETRY_DEFAULTS where the user set nothing (in this process, and so in the
    local Ray workers it starts); returns how long one call may retry, in seconds."""
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    retries = int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    factor = float(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    return sum(factor * 2 ** (n - 1) for n in range(2, retries + 1))


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` (from an MLflow call) means the tracking server did not answer, after
    MLflow's retries: connection refused or reset, a timeout, or only 5xx answers. Other
    errors (a bad request, a missing run) are real and are raised as they are."""
    import requests
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # MLflow wraps requests' errors
        seen.add(id(exc))
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, MlflowException):
            text = str(exc)  # MLflow 3.17 keeps only the text of what it caught
            if text.startswith("API request to") and (
                    "failed with exception" in text or "failed with timeout exception" in text
                    or "Max retries exceeded" in text):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def server_answers(uri: str, timeout: float = 5.0) -> str | None:
    """None when the MLflow server at `uri` answers its /health page (or the store is not a
    server); else why not, in a few words. One try through MLflow's own HTTP client, so its
    TLS, token and basic-auth settings apply; no retries."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    if not uri.startswith(("http://", "https://")):
        return None
    try:
        response = http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0,
                                timeout=timeout, raise_on_status=False)
    except MlflowException as exc:
        text = str(exc).lower()
        if "timeout" in text:
            return f"no answer within {timeout:.0f} s"
        if "ssl" in text or "certificate" in text:
            return ("TLS failed; see MLFLOW_TRACKING_SERVER_CERT_PATH or "
                    "MLFLOW_TRACKING_INSECURE_TLS")
        return "connection refused" if "refused" in text else "cannot connect"
    if response.status_code in (401, 403):
        return (f"HTTP {response.status_code}: credentials refused; set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    return None  # any other answer: the server is up (a proxy may not route /health)


def check_server(uri: str) -> None:
    """Fail in seconds, before anything starts, when the MLflow server does not answer."""
    reason = server_answers(uri)
    if reason is not None:
        fix = ("" if reason.startswith(("HTTP", "TLS")) else
               "; start it or fix --tracking-uri (or MLFLOW_TRACKING_URI)")
        raise HPNInputError(f"--tracking-uri: the MLflow server at {uri} does not answer "
                            f"({reason}){fix}")


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise HPNInputError(f"--experiment: {name!r} is deleted in MLflow; restore it or pick another name")
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made before hpn-tune set it (or by hand)
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:"):
        # A SQLite store has no artifact root of its own: keep artifacts beside the database.
        db = Path(tracking_uri[len("sqlite:///"):])
        location = (db.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})


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


@dataclass(frozen=True)
class CorpusDataset:
    """The study's corpus as MLflow shows a dataset, in plain values: computed once by the
    driver (`corpus_dataset`) and logged on the study's run and every trial's (`log_dataset`)."""

    name: str  # synthetic-3000, personas.jsonl, personahub-keywords-3000
    fingerprint: str  # PreparedData.fingerprint: sha256 of label names, texts and labels
    source_type: str  # MLflow's: code (the generator) | local (a file) | hugging_face
    source: dict[str, Any]  # MLflow's source JSON for that type
    size: int
    label_counts: dict[str, int]  # most frequent first
    split: dict[str, int] = field(default_factory=dict)  # train / val / test sizes
    #: (column, MLflow type) of what the task trains on: text and label, labels (a list) or
    #: target; a context pickled by an older study has the classification pair
    columns: tuple[tuple[str, str], ...] = (("text", "string"), ("label", "string"))

    @property
    def digest(self) -> str:
        return self.fingerprint[:DATASET_DIGEST_CHARS]


def corpus_dataset(cfg: DataConfig, data: PreparedData) -> CorpusDataset:
    """Name, source and profile of the corpus `prepare_data(cfg)` made (no text leaves here)."""
    from hpn.data import label_counts
    from hpn.data.personahub import DATASET_ID, SUBSETS

    corpus = data.corpus
    size = len(corpus)
    labels = "" if cfg.labels == "column" else f"-{cfg.labels}"
    columns = [("text", "string")]
    if corpus.label_sets is not None:
        columns.append(("labels", "list"))
    elif corpus.labels is not None:
        columns.append(("label", "string"))
    if corpus.targets is not None:
        columns.append(("target", "double"))
    if cfg.source == "synthetic":
        # with a target its texts carry the age: another corpus than synthetic-<size>
        name = f"synthetic-age-{size}" if corpus.targets is not None else f"synthetic-{size}"
        kind = "code"
        source: dict[str, Any] = {"tags": {"generator": "hpn.data.synthetic_corpus",
                                           "seed": str(cfg.seed), "noise": str(cfg.noise)}}
    elif cfg.path:  # a file, or a local copy of PersonaHub
        path = Path(cfg.path).expanduser().resolve()
        name, kind, source = f"{path.name}{labels}", "local", {"uri": str(path)}
    else:
        name, kind = f"personahub{labels}-{size}", "hugging_face"
        source = {"path": DATASET_ID, "config_name": SUBSETS.get(cfg.labels), "split": "train"}
    split = {"train": len(data.split.train), "val": len(data.split.val), "test": len(data.split.test)}
    return CorpusDataset(name, data.fingerprint, kind, source, size, label_counts(corpus), split,
                         tuple(columns))


def dataset_input(dataset: CorpusDataset, context: str = TRIAL_DATASET_CONTEXT) -> DatasetInput:
    """The corpus as an MLflow dataset input: its schema and profile, never its texts."""
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    schema = Schema([ColSpec(Array("string") if kind == "list" else kind, column)
                     for column, kind in dataset.columns])
    profile = {"num_rows": dataset.size, "num_classes": len(dataset.label_counts),
               "label_counts": dataset.label_counts, "split": dataset.split,
               "fingerprint": dataset.fingerprint}
    entity = Dataset(
        name=dataset.name, digest=dataset.digest, source_type=dataset.source_type,
        source=json.dumps(dataset.source), schema=json.dumps({"mlflow_colspec": schema.to_dict()}),
        profile=json.dumps(profile),
    )
    return DatasetInput(entity, tags=[InputTag(DATASET_CONTEXT_TAG, context)])


def log_dataset(client: MlflowClient, run_id: str, dataset: CorpusDataset,
                context: str = TRIAL_DATASET_CONTEXT) -> None:
    """Log the corpus as the run's dataset input (again on a resumed run: MLflow keeps one)."""
    client.log_inputs(run_id, datasets=[dataset_input(dataset, context)])


def runs_view_url(base_url: str, experiment_id: str | None) -> str:
    """The MLflow UI's runs table of an experiment, in its model-training mode (MLflow 3
    opens on GenAI pages otherwise); the UI's front page when there is no experiment yet."""
    base = base_url.rstrip("/")
    if experiment_id is None:
        return base
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def experiment_id_if_any(tracking_uri: str, name: str) -> str | None:
    """The experiment's id, or None when the store does not hold it (yet). Creates nothing:
    a SQLite file that is not there is not made just to look."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return None
    try:
        exp = MlflowClient(tracking_uri, tracking_uri).get_experiment_by_name(name)
    except Exception:  # noqa: BLE001 (an unreachable or outdated store: the UI will say why)
        return None
    return exp.experiment_id if exp is not None and exp.lifecycle_stage == "active" else None


def config_task(cfg: Any) -> str:
    """A Config's `model.task`; a config from before tasks existed is classification."""
    return getattr(getattr(cfg, "model", None), "task", None) or "classification"


def run_task(run: Any) -> str:
    """The task a run trained (a trial) or studied (a study's run): its `hpn.task` tag, else
    a trial's `model.task` param, else classification (logged before tasks existed). Read
    wherever a run's metrics are judged, so each is judged by its own task's metric."""
    tags = run.data.tags or {}
    params = getattr(run.data, "params", None) or {}
    return tags.get(TASK_TAG) or params.get("model.task") or "classification"


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


def close_unclosed_trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str,
                             trial_id: str, state: str, reason: str | None = None,
                             metrics: dict[str, float] | None = None) -> None:
    """Close a trial's run that its trial could not close itself (stopped by the scheduler,
    or failed), from the driver, with `metrics` it lacks (time and peak memory from its last
    report); a run the trial already closed is left as it is."""
    client = MlflowClient(tracking_uri, tracking_uri)
    run = find_trial_run(client, experiment_id, parent_run_id, trial_id)
    if run is not None and not run.data.tags.get(STATE_TAG):
        missing = {k: v for k, v in (metrics or {}).items() if k not in run.data.metrics}
        if missing:
            now = int(time.time() * 1000)
            client.log_batch(run.info.run_id,
                             metrics=[Metric(k, float(v), now, 0) for k, v in missing.items()])
        close_trial_run(client, run.info.run_id, state, reason)


def find_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str,
                   trial_id: str) -> Any | None:
    """The run of the study's Ray trial `trial_id`, or None before the trial made it."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{PARENT_TAG}` = '{parent_run_id}' AND tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
        max_results=1,
    )
    return runs[0] if runs else None


def close_interrupted_trial_runs(client: MlflowClient, experiment_id: str, parent: str,
                                 resume: str) -> int:
    """After a Ctrl-C: the runs of trials stopped mid-training (still RUNNING, no state)
    end KILLED as `interrupted`, saying how they go on; returns how many."""
    closed = 0
    for run in trial_runs(client, experiment_id, parent):
        if run.info.status == "RUNNING" and not run.data.tags.get(STATE_TAG):
            close_trial_run(client, run.info.run_id, "interrupted",
                            f"Interrupted with the study before it finished; {resume} trains it again.")
            closed += 1
    return closed


def close_left_open_trial_runs(client: MlflowClient, experiment_id: str, parent: str,
                               statuses: dict[str, str]) -> int:
    """Runs still open although Ray holds their trial as ended: closed, as an error, when
    neither the trial nor the driver could reach the MLflow server to close them (a study
    never leaves a run RUNNING once it finished). Returns how many."""
    closed = 0
    for run in trial_runs(client, experiment_id, parent):
        status = statuses.get(run.data.tags.get(TRIAL_ID_TAG, ""))
        if run.info.status == "RUNNING" and not run.data.tags.get(STATE_TAG) \
                and status in ("TERMINATED", "ERROR"):
            close_trial_run(client, run.info.run_id, "error",
                            f"Ray ended this trial ({status}) while the MLflow server did not "
                            "answer, and nothing recorded how; closed by the study afterwards.")
            closed += 1
    return closed


def _param_value(value: Any) -> str:
    return str(value)[:6000]


class TrialRun:
    """One trial's child run. Re-opened (never duplicated) when a resumed study re-runs it."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                 study: str, params: dict[str, Any], tags: dict[str, str] | None = None,
                 number: int | None = None) -> None:
        self.client = MlflowClient(tracking_uri, tracking_uri)
        self.unsent = []
        where = {NODE_TAG: socket.gethostname(), **(tags or {})}  # node and repeat tags
        existing = find_trial_run(self.client, experiment_id, parent_run_id, trial_id)
        #: final metrics when this trial already finished (a resumed study replays them)
        self.finished_metrics: dict[str, float] | None = None
        if existing is not None:
            self.run_id = existing.info.run_id
            if existing.data.tags.get(STATE_TAG) == "completed":
                self.finished_metrics = dict(existing.data.metrics)
                return
            self.client.update_run(self.run_id, status="RUNNING")
            for stale in (STATE_TAG, ERROR_TAG, NOTE_TAG):  # from the interrupted attempt
                if stale in existing.data.tags:
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

    #: metric points not yet accepted by the server (it was unreachable): sent with the
    #: next call, or kept in the outbox (`tuning.outbox`) with the trial's final record
    unsent: list[Metric]

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log (with any points the server missed before); while the server is unreachable
        the points wait for the next call instead of failing the trial."""
        import math
        import time

        now = int(time.time() * 1000)
        self.unsent += [Metric(k, float(v), now, step) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and math.isfinite(v)]
        try:
            self.flush()
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            print(f"hpn-tune: trial run {self.run_id}: the MLflow server does not answer; "
                  f"{len(self.unsent)} metric points wait for it", flush=True)

    def flush(self) -> None:
        """Send the points waiting for the server (MLflow takes at most 1000 per call)."""
        while self.unsent:
            self.client.log_batch(self.run_id, metrics=self.unsent[:1000])
            del self.unsent[:1000]

    def end(self, state: str, reason: str | None = None) -> None:
        """Close the run; when the server does not answer, the driver closes it after the
        study (`close_left_open_trial_runs`) and this trial's own error stays the one seen."""
        try:
            self.flush()
            close_trial_run(self.client, self.run_id, state, reason)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            print(f"hpn-tune: trial run {self.run_id}: the MLflow server does not answer; "
                  f"the study closes this run as {state} when it is back", flush=True)


# -- the study's parent run -----------------------------------------------------------------

def create_study_run(client: MlflowClient, experiment_id: str, study: str, tags: dict[str, str],
                     fixed_params: dict[str, Any], space_file: str | Path) -> str:
    """The study's parent run: its tags, the settings it fixed as params (the best trial's
    values are added as `best.<key>` when it finishes) and its space file as an artifact."""
    parent = client.create_run(experiment_id, run_name=study,
                               tags={**tags, STUDY_TAG: study, ROLE_TAG: "study"}).info.run_id
    client.log_batch(parent, params=[Param(k, _param_value(v)) for k, v in sorted(fixed_params.items())])
    client.log_artifact(parent, str(space_file), "space")
    return parent


def trials_frame(client: Any, experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    """One row per trial child run: params.<key>, metrics, state, order."""
    import numpy as np
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for run in trial_runs(client, experiment_id, parent_run_id):
        tags = run.data.tags
        row: dict[str, Any] = {
            "trial_id": tags.get(TRIAL_ID_TAG),
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,  # <study>-t007
            "state": tags.get(STATE_TAG, "running"),
            "start_time": run.info.start_time,
            # a study from before --repeats: every trial is its own config
            "config_group": tags.get(CONFIG_GROUP_TAG, tags.get(TRIAL_ID_TAG)),
            "repeat": int(tags.get(REPEAT_TAG, 0)),
        }
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update(run.data.metrics)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    for col in frame.columns:
        if col.startswith("params."):
            converted = pd.to_numeric(frame[col], errors="coerce")
            if converted.notna().all():
                frame[col] = converted
    frame = frame.sort_values("start_time").reset_index(drop=True)
    frame["order"] = np.arange(len(frame))
    return frame


def mark_lost_trials(client: Any, experiment_id: str, parent: str, known: set[str]) -> None:
    """Child runs of trials that Ray's saved state does not hold (the driver was killed
    after they finished but before Ray saved): kept, but tagged `lost` so no trial counts
    twice and reports skip them."""
    for run in trial_runs(client, experiment_id, parent):
        if run.data.tags.get(TRIAL_ID_TAG) not in known and run.data.tags.get(STATE_TAG) != "lost":
            client.set_tag(run.info.run_id, STATE_TAG, "lost")
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")


def log_best_params(client: Any, parent: str, best: dict[str, Any]) -> None:
    """The best config's values as `best.<key>` params of the parent run. MLflow params
    cannot change, so when an extension finds a better config the new values go to
    `best.<key>` tags (mutable) and the `hpn.best_run_id` tag names the new best trial."""
    params = {f"best.{k}": str(v) for k, v in best.items()}
    logged = client.get_run(parent).data.params
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    if new:
        client.log_batch(parent, params=new)
    if any(logged.get(k, v) != v for k, v in params.items()):
        client.log_batch(parent, tags=[RunTag(k, v) for k, v in params.items()])


def log_study_wall(client: Any, parent: str, session_started: float) -> float:
    """Add this session's wall time (encode, trials, report) to the study's own, which a
    resumed study carries across its interruptions; returns the study's total."""
    history = client.get_metric_history(parent, WALL_METRIC)
    before = max((m.value for m in history), default=0.0)
    total = before + time.time() - session_started
    client.log_metric(parent, WALL_METRIC, total, step=len(history))
    return total


_DOWNLOAD_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_download_bar_lock = threading.Lock()
#: open no_download_bar blocks (all threads), and whether the variable is ours to take away
_download_bar = {"open": 0, "ours": False}


@contextmanager
def no_download_bar() -> Iterator[None]:
    """MLflow draws a download bar on stderr for every artifact download; our commands answer
    in their own lines (`predict`, `promote`, a study's report). MLflow reads the variable per
    download, so the first block to open sets it and the last to close takes it away again;
    the lock guards only that count, so blocks nest and threads do not wait on each other's
    downloads. A user who set the variable keeps their setting."""
    with _download_bar_lock:
        _download_bar["open"] += 1
        if _download_bar["open"] == 1 and _DOWNLOAD_BAR not in os.environ:
            os.environ[_DOWNLOAD_BAR] = "false"
            _download_bar["ours"] = True
    try:
        yield
    finally:
        with _download_bar_lock:
            _download_bar["open"] -= 1
            if _download_bar["open"] == 0 and _download_bar["ours"]:
                os.environ.pop(_DOWNLOAD_BAR, None)
                _download_bar["ours"] = False
