"""Every Ray call of hpn-tune lives here: Ray's API names moved between versions.

Tested with ray 2.60 (constraints.txt). A trial is a function trainable that trains one
HPN with `hpn.train.train` and reports each epoch through `tune.report`.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.entities import Metric
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import TRIAL_INDEX

from hpn import metrics as M
from hpn.config import from_dict
from hpn.encode import pick_device
from hpn.errors import HPNInputError
from hpn.latency import frozen_encoder, measure_latency
from hpn.memory import PeakMemory, cap_cuda_share
from hpn.tasks import task_spec
from hpn.train import NonFiniteLossError, PreparedData, train
from tuning.optuna_store import RAY_TRIAL_ATTR
from tuning.outbox import Outbox
from tuning.progress import StudyProgress
from tuning.tracking import (
    CONFIG_GROUP_TAG,
    ENCODER_RUNTIME_TAG,
    NODE_IP_TAG,
    OPTUNA_TRIAL_TAG,
    RAY_NODE_ID_TAG,
    REPEAT_TAG,
    TASK_TAG,
    CorpusDataset,
    TrialRun,
    close_trial_run,
    close_unclosed_trial_run,
    is_unreachable,
    log_dataset,
)

DONE_KEY = "hpn_finished"  # set only on the last report of a trial that trained to the end
NUM_CLASSES_KEY = "num_classes"


@dataclass(frozen=True)
class StudyContext:
    """What every trial needs besides its data: where to log and the base config."""

    study: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    base_config: dict[str, Any]
    gpu_fraction: float
    searched_keys: tuple[str, ...]  # the rest of Tune's config is the space's constants,
    # already in base_config with --set applied on top
    trial_offset: int = 0  # trials of the study's earlier Ray experiments (an extended study)
    dataset: CorpusDataset | None = None  # the corpus as an MLflow dataset input
    outbox: str | None = None  # where results wait while the MLflow server is unreachable
    http_retries: tuple[tuple[str, str], ...] = ()  # the driver's MLFLOW_HTTP_REQUEST_* bounds,
    # for trials on any node (tracking.bound_http_retries)
    final_only: tuple[str, ...] = ()  # searcher objectives only the final report carries
    # (latency_p50_ms, model_size_mb): NaN in epoch reports, see trial_fn

    @property
    def task(self) -> str:
        """The study's `model.task`, read from the base config (one task per study: a space
        cannot search it). A property, not a field: a context pickled into Ray's state by a
        study from before tasks still answers (classification) when the study resumes."""
        return (self.base_config.get("model") or {}).get("task") or "classification"


GROUP_KEY = "__config_group__"  # the first trial id of a config's repeats
OPTUNA_TRIAL_KEY = "__optuna_trial__"  # the Optuna trial number behind a Tune trial


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch, on the study's Optuna storage, tying both ids together: each
    Optuna trial records the Ray trial that runs it (so orphans can be told apart after a
    kill) and each Tune config carries its Optuna trial number (an MLflow tag of the run)."""

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if isinstance(config, dict) and ot_trial is not None:
            if self._storage is not None:
                ot_trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
            config[OPTUNA_TRIAL_KEY] = ot_trial.number
        return config

    def _told(self, trial_id: str) -> bool:
        """Whether the study's storage already holds this trial as finished: a trial that
        finished after Ray last saved its state is run again on resume (it replays its MLflow
        record), and Optuna refuses to update a finished trial."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or self._storage is None:
            return False
        return self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        import warnings

        if self._told(trial_id):
            return
        with warnings.catch_warnings():
            # A trial restarted by a resume reports its first epochs again; Optuna keeps the
            # first report of each step and warns about the repeat, which says nothing.
            warnings.filterwarnings("ignore", "The reported value is ignored because", UserWarning)
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if self._told(trial_id):
            self._completed_trials.add(trial_id)
            return
        # Tune ends a trial that ASHA stopped with its last epoch's result, which OptunaSearch
        # would tell as COMPLETE: tell it as PRUNED (its epochs are already reported as
        # intermediate values). A trial's own results carry the epoch; a Repeater's mean
        # over repeats does not, and is complete.
        if result and not error and M.EPOCH in result and not result.get(DONE_KEY):
            result = None
        elif result and not error and not _all_finite(result, self.metric):
            # An objective missing or NaN (a multi-objective trial without peak_vram_mb or
            # latency_p50_ms, a Repeater mean over failed repeats): Optuna would refuse the
            # values and leave the trial RUNNING; it failed.
            result, error = None, True
        super().on_trial_complete(trial_id, result, error)


def _all_finite(result: dict, metric: str | list[str]) -> bool:
    import math

    values = [result.get(m) for m in (metric if isinstance(metric, list) else [metric])]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


class SeedRepeats(Repeater):
    """Ray's Repeater: each proposed config runs `repeat` times and the searcher is told the
    mean. Every repeat's config also names its group (its first trial's id), which becomes an
    MLflow tag. Resume needs nothing more: Tune's SearchGenerator saves each wrapper's
    `get_state()` (the Repeater's groups) beside the inner searcher's checkpoint."""

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            config[GROUP_KEY] = self._trial_id_to_group[trial_id].primary_trial_id
        return config


def init_ray(address: str | None) -> None:
    """Join the Ray cluster at `address`, or start Ray on this machine for this machine only.

    ray.init replaces the process's SIGTERM handler with its own, under which a SIGTERM
    exits the driver mid-study and ends in a native abort (SIGABRT), the study's run not
    closed as interrupted; a handler the caller set (the CLI's, which turns SIGTERM into a
    Ctrl-C) is put back."""
    import signal
    import threading

    if ray.is_initialized():
        return
    quiet_libraries()  # before ray.init, which prints the token-auth notice dropped there
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False}
    sigterm = signal.getsignal(signal.SIGTERM)
    if not address and not os.environ.get("RAY_ADDRESS"):
        # A local study needs no caller from outside, yet Ray binds its GCS, raylet and
        # workers to every interface unless the node's address is 127.0.0.1, and turns a
        # given 127.0.0.1 into the machine's outward address unless Ray runs single-machine
        # (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the macOS/Windows default, read once when ray
        # is imported; it only decides that address). So run single-machine for this call.
        from ray._private import ray_constants

        cluster, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
        try:
            ray.init(_node_ip_address="127.0.0.1", **kwargs)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster
    elif address:
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:  # no cluster there, or it refused our token
            if "InvalidAuthToken" in str(exc.__cause__):
                raise HPNInputError(
                    f"--address: the Ray cluster at {address} refused this process's token; set "
                    "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token") from exc
            raise HPNInputError(
                f"--address: cannot join the Ray cluster at {address} "
                f"({str(exc).strip().splitlines()[0][:160]}): check that it runs "
                "and that RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH holds its token") from exc
    else:
        ray.init(**kwargs)  # RAY_ADDRESS names the cluster to join
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def check_trial_fits(cpus: float, gpus: float) -> None:
    """Refuse a trial that no node of the cluster can hold: Ray would queue it forever,
    saying so only in an autoscaler warning each minute. (On an autoscaling cluster, a node
    type that is not up yet is not seen here.) Needs Ray initialised."""
    from collections import Counter

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    def num(x: float) -> str:
        return f"{x:g}"

    def many(x: float, key: str) -> str:
        return f"{num(x)} {key}" + ("" if x == 1 else "s")

    kinds = Counter(f"{num(r.get('CPU', 0))} CPU/{num(r.get('GPU', 0))} GPU" for r in nodes)
    shown = ", ".join(k if n == 1 else f"{n} x {k}" for k, n in kinds.items())
    for flag, key, need in (("--cpus-per-trial", "CPU", cpus), ("--gpus-per-trial", "GPU", gpus)):
        most = max((r.get(key, 0) for r in nodes), default=0)
        if need > most:
            raise HPNInputError(f"{flag}: {many(need, key)} per trial, but the largest Ray "
                                f"node has {num(most)} (nodes: {shown}); give {flag} "
                                f"{num(most)} or less")
    if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        raise HPNInputError(f"--cpus-per-trial, --gpus-per-trial: {many(cpus, 'CPU')} and "
                            f"{many(gpus, 'GPU')} per trial, but no Ray node has both "
                            f"(nodes: {shown}); ask for what one node has")


def is_multi_node() -> bool:
    return len([n for n in ray.nodes() if n.get("Alive")]) > 1


def node_tags() -> dict[str, str]:
    """The Ray node this process runs on, as MLflow tags (called inside a trial)."""
    return {RAY_NODE_ID_TAG: ray.get_runtime_context().get_node_id(),
            NODE_IP_TAG: ray.util.get_node_ip_address()}


def _trial_device(fraction: float, requested: str) -> str:
    """CUDA only when Ray gave this trial a GPU share; then hold it to that share
    (`hpn.memory.cap_cuda_share`), so one trial cannot starve the others."""
    import torch

    if requested == "cpu" or fraction <= 0 or not ray.get_gpu_ids() or not torch.cuda.is_available():
        return "cpu"
    if fraction < 1:
        # Ray's CUDA_VISIBLE_DEVICES shows a trial only its own card, as device 0.
        cap_cuda_share(fraction, 0)
    return "cuda"


def trial_fn(config: dict[str, Any], data: PreparedData, ctx: StudyContext) -> None:
    import torch

    cfg = from_dict(ctx.base_config).with_updates(
        {k: v for k, v in config.items() if k in ctx.searched_keys})
    trial_id = tune.get_context().get_trial_id()
    cfg.train.device = _trial_device(ctx.gpu_fraction, cfg.train.device)
    data = data.for_runtime(cfg.encoder.runtime)  # a study searching the runtime encoded each
    repeat = int(config.get(TRIAL_INDEX, 0))
    cfg.train.seed += repeat  # repeats of one config: the study's train.seed, +1, +2, ...
    tags = {**node_tags(), REPEAT_TAG: str(repeat),
            CONFIG_GROUP_TAG: str(config.get(GROUP_KEY, trial_id)),
            TASK_TAG: getattr(cfg.model, "task", None) or "classification",
            ENCODER_RUNTIME_TAG: cfg.encoder.runtime}
    if OPTUNA_TRIAL_KEY in config:
        tags[OPTUNA_TRIAL_TAG] = str(config[OPTUNA_TRIAL_KEY])
    number = trial_number(trial_id)
    os.environ.update(dict(ctx.http_retries))  # on a remote node too: no 4-minute silences
    run = TrialRun(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, trial_id, ctx.study,
                   {**cfg.to_flat(), "trial_id": trial_id}, tags,
                   None if number is None else number + ctx.trial_offset)
    if run.finished_metrics is not None:
        # Finished before the driver was killed, but after Ray last saved its state: the
        # MLflow run is the record, so replay it instead of training again.
        tune.report({**run.finished_metrics, DONE_KEY: True})
        return
    if ctx.dataset is not None:
        # Before training: the run shows its corpus while it trains, and log_pyfunc links
        # the final metrics to it.
        log_dataset(run.client, run.run_id, ctx.dataset)
    started = time.time()
    pending: list[dict[str, float]] = []
    nan_objectives = dict.fromkeys(ctx.final_only, float("nan"))
    trained = [0]  # epochs done, for the reason a stopped trial gives
    per_epoch: set[str] = set()  # metric keys logged with step = epoch

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        # Report one epoch late, so the last epoch's report carries the final test metrics
        # and ASHA sees exactly `epochs` iterations.
        trained[0] = epoch
        # Whatever the trainer reports per epoch (each task has its own: val_accuracy,
        # val_mae, val_micro_f1, ...), not a fixed list that would miss another task's.
        epoch_row = {k: v for k, v in row.items() if k != M.EPOCH}
        per_epoch.update(epoch_row)
        run.log_metrics(epoch_row, step=epoch)
        if pending:
            # With the time and peak memory so far: if the scheduler stops the trial at this
            # report, the driver closes its run with them (tracking.close_unclosed_trial_run).
            # Ray refuses a report without each of the searcher's metrics; an objective known
            # only at the end is NaN until then (a multi-objective searcher reads only the
            # final report, and a trial ending without it fails: StudySearch).
            tune.report({**nan_objectives, **pending.pop(), **memory.usage()})
        pending.append(row)

    measure = cfg.train.measure_latency
    serving: dict[str, float] = {}
    # The trial's own window around train(): a trial stopped early, failed or pruned, still
    # logs how long it ran and its peak memory (its validation metrics are logged per epoch).
    with PeakMemory(pick_device(cfg.train.device)) as memory:
        try:
            if measure and cfg.encoder.trainable_layers == 0:
                # Loaded once per process, before train(): every trial's peak then holds its
                # runtime's encoder alike, a process's first trial as the later ones.
                frozen_encoder(cfg.encoder)
            result = train(cfg, data, on_epoch)
        except torch.OutOfMemoryError as exc:
            run.log_metrics(memory.usage())
            run.end("error", f"CUDA out of memory: {exc}")
            raise
        except NonFiniteLossError as exc:
            run.log_metrics(memory.usage())
            run.end("error", str(exc))
            raise
        except SystemExit:  # Ray stopped the trial: ASHA at a report, or the study's Ctrl-C
            # Which of the two only the driver knows: it closes the run as pruned
            # (FinalizeTrialRuns) or as interrupted (tracking.close_interrupted_trial_runs).
            run.log_metrics(memory.usage())
            raise
        except Exception as exc:
            run.log_metrics(memory.usage())
            run.end("error", f"{type(exc).__name__}: {exc}")
            raise
    if measure:
        # Its own model on the champion path, on the CPU (hpn/latency.py), after the memory
        # window: the peaks are training's. Moved, not copied: a copy of a CUDA model would
        # double it on the card first; the model is only logged from here on.
        serving = measure_latency(result.model.cpu())
    final = {**result.metrics, **serving, NUM_CLASSES_KEY: data.corpus.num_classes,
             "trial_started_at": started, "trial_ended_at": time.time()}
    # Every final metric the trainer returns (the task decides which), but those already
    # logged per epoch: the last epoch's point is their final value.
    run.log_metrics({**{k: v for k, v in result.metrics.items()
                        if k not in per_epoch and k != M.EPOCH}, **serving,
                     NUM_CLASSES_KEY: data.corpus.num_classes}, step=cfg.train.epochs)
    _record_completed(run, trial_id, result.model, Outbox(ctx.outbox))
    tune.report({**final, DONE_KEY: True})


def _record_completed(run: TrialRun, trial_id: str, model: Any, outbox: Outbox) -> None:
    """Log the model and close the run; when the MLflow server does not answer, keep both
    in the study's outbox (delivered when the study finishes) so the trial still counts."""
    from tuning.pyfunc import log_pyfunc

    try:
        run.flush()
        log_pyfunc(run.client, run.run_id, model)
        close_trial_run(run.client, run.run_id, "completed")
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        if not outbox:
            raise RuntimeError(f"the MLflow server does not answer and the study has no local "
                               f"outbox (its --storage-path is a URI), so this trial's model "
                               f"is lost: {exc}") from exc
        outbox.keep(trial_id, "trial", "completed", run_id=run.run_id, metrics=run.unsent,
                    model=model)
        print(f"hpn-tune: trial {trial_id}: the MLflow server does not answer; its model and "
              f"final metrics wait in {outbox.folder}", flush=True)


def trial_number(trial_id: str) -> int | None:
    """The study's count of this trial (1, 2, ...): Tune's search generator numbers trials
    in its experiment tag (saved across a resume), which starts the trial's directory name
    after the id: `trial_fn_03b9977f_26_config...`."""
    name = Path(tune.get_context().get_trial_dir() or "").name
    match = re.search(rf"_{re.escape(trial_id)}_(\d+)", name)
    return int(match.group(1)) if match else None


def pruned_reason(epoch: float | None, metric: str = M.VAL_ACCURACY, mode: str = "max") -> str:
    """Why ASHA stopped a trial, naming the metric it ranks trials by (the task's primary)."""
    after = f" after epoch {int(epoch)}" if epoch else ""
    worse = "below" if mode == "max" else "above"
    return (f"Stopped early by the ASHA scheduler{after}: its {metric} was {worse} the cut-off "
            "of that rung, where only the best third of trials go on. Not a failure.")


class FinalizeTrialRuns(tune.Callback):
    """Close the runs of trials the scheduler stopped (pruned) or that failed, from the driver:
    only the driver knows that a stopped trial was pruned rather than interrupted."""

    def __init__(self, ctx: StudyContext) -> None:
        self.ctx = ctx

    def _close(self, trial: Any, state: str, reason: str,
               metrics: dict[str, float] | None = None) -> None:
        """Close the trial's run if it is still open; while the MLflow server does not answer,
        an outbox entry closes it when the study finishes (a raise here would end Tune)."""
        try:
            close_unclosed_trial_run(self.ctx.tracking_uri, self.ctx.experiment_id,
                                     self.ctx.parent_run_id, trial.trial_id, state, reason, metrics)
        except Exception as exc:
            outbox = Outbox(self.ctx.outbox)
            if not is_unreachable(exc):
                raise
            if not outbox:  # the study closes it when it ends (close_left_open_trial_runs)
                print(f"hpn-tune: the MLflow server does not answer; trial {trial.trial_id}'s "
                      f"run stays open until the study ends", flush=True)
                return
            now = int(time.time() * 1000)
            outbox.keep(trial.trial_id, "driver", state, reason,
                        metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if not last.get(DONE_KEY):
            spec = task_spec(self.ctx.task)
            self._close(trial, "pruned", pruned_reason(last.get(M.EPOCH), spec.primary, spec.mode),
                        {k: last[k] for k in (M.RUNTIME_S, M.PEAK_RSS_MB, M.PEAK_VRAM_MB,
                                              M.PEAK_VRAM_PROCESS_MB) if k in last})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "error", ProgressCallback.error_line(trial) or "the trial raised an error")


class ProgressCallback(tune.Callback):
    """Tune's trial events as `tuning.progress.StudyProgress` events: the study's live line.

    Tune calls these on its driver thread. A trial that completes without `DONE_KEY` in its
    last report was stopped by the scheduler (pruned). Tune closes the line when the
    experiment ends; the caller closes it (`close()`) when fit() raises or is interrupted.

    The Tuner pickles its callbacks into the study's saved state and `Tuner.restore` brings
    that copy back. A pickled copy leaves the live line behind and does nothing, so a resumed
    study puts this session's callback in with `install(tuner)`. Under Ray Client (ray://)
    Tune runs on the cluster with such a copy: no live line there.
    """

    def __init__(self, progress: StudyProgress | None, trial_offset: int = 0) -> None:
        self.progress = progress
        self.trial_offset = trial_offset  # trials of the study's earlier Ray experiments

    def __getstate__(self) -> dict[str, Any]:
        return {"progress": None, "trial_offset": self.trial_offset}

    def install(self, tuner: Any) -> Any:
        """Replace the restored (inert) copy in a `Tuner.restore`d tuner's callbacks by this
        one. Ray has no public way to add callbacks on restore; `_local_tuner` is None under
        Ray Client."""
        local = getattr(tuner, "_local_tuner", None)
        if local is not None:
            config = local.get_run_config()
            config.callbacks = [c for c in config.callbacks or []
                                if not isinstance(c, ProgressCallback)] + [self]
        return tuner

    def number(self, trial: Any) -> int | None:
        """The study's count of the trial: Tune's search generator starts the experiment tag
        with it (`26_lr=...`), as `trial_number` reads it from the trial's directory name."""
        head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
        return int(head) + self.trial_offset if head.isdigit() else None

    @staticmethod
    def error_line(trial: Any) -> str:
        """The trial's own exception, not Ray's wrapper and traceback around it. Read from
        the driver's copy of the trial's error files (written just before on_trial_error;
        the copy under storage_path comes later)."""
        try:
            if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
                with open(trial.pickled_error_file, "rb") as f:
                    exc = ray.cloudpickle.load(f)  # a RayTaskError; its cause the trial's own
                cause = getattr(exc, "cause", None) or exc
                return f"{type(cause).__name__}: {cause}"
            if trial.error_file and os.path.exists(trial.error_file):
                lines = [line for line in Path(trial.error_file).read_text().splitlines()
                         if line.strip()]
                return lines[-1] if lines else ""
        except Exception:  # noqa: BLE001 (a progress line must not fail the study)
            return ""
        return ""

    def setup(self, **info: Any) -> None:
        if self.progress is not None:
            self.progress.start()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.progress is not None:
            self.progress.refresh()  # the clock moves between trial events

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.trial_started(trial.trial_id, self.number(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        if self.progress is not None:
            self.progress.trial_result(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.progress is not None:
            last = trial.last_result or {}
            self.progress.trial_finished(trial.trial_id,
                                         "completed" if last.get(DONE_KEY) else "pruned", last,
                                         number=self.number(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.trial_finished(trial.trial_id, "error", trial.last_result or {},
                                         error=self.error_line(trial), number=self.number(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


@dataclass
class TuneSettings:
    trials: int
    max_concurrent: int
    cpus_per_trial: float
    gpus_per_trial: float
    scheduler: str  # asha | fifo
    storage_path: str
    metric: str | list[str]
    mode: str | list[str]
    epochs: int
    repeats: int = 1  # runs of each proposed config (train.seed, +1, ...); the searcher sees the mean
    experiment: str = ""  # Ray's experiment folder under storage_path (the study, or an extension)
    optuna_storage: str | None = None  # RDB URL of the study's Optuna trials (None: in memory)
    optuna_study: str = ""


def quiet_libraries() -> None:
    """Silence what contradicts our own output or tells the user nothing; real warnings stay.
    Safe to call more than once (init_ray and run_tuner both do)."""
    import logging

    import optuna

    def drop(logger: str, *starts: str) -> None:
        """Drop one logger's messages that start so, and only those (its others stay)."""
        log = logging.getLogger(logger)
        if not any(getattr(f, "drops", None) == starts for f in log.filters):
            def keep(record: logging.LogRecord) -> bool:
                return not record.getMessage().startswith(starts)

            keep.drops = starts  # type: ignore[attr-defined]
            log.addFilter(keep)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # MLflow's INFO lines ("Creating initial MLflow database tables...", "Updating database
    # tables" when a study opens a new SQLite store): bookkeeping, not progress.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # MLflow prints "🏃 View run <name> at: <url>" and "🧪 View experiment at: <url>" to stdout
    # each time the driver ends a run on a tracking server (every pruned or killed trial that
    # FinalizeTrialRuns closes, and the study's run): two lines per trial through the live
    # line. `hpn-tune run` ends with its own "browse it: hpn-tune ui ..." instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    # ray.init: "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=
    # disabled to opt out. ...", on every ray.init that starts (or finds) a local cluster. It
    # asks users to turn off the protection that our --address errors ask them to set up;
    # auth stays as Ray chose. Dropped by its text: the same logger's warning that auth is
    # *disabled* is a real one and stays. (RAY_AUTH_MODE=token would also silence it, but
    # refuses a local cluster started without auth, which ray.init() may find and join.)
    drop("ray._private.authentication.authentication_token_setup",
         "Token authentication is enabled for this Ray cluster")
    # Ray Tune after a Ctrl-C: "Experiment has been interrupted, but the most recent state
    # was saved. Resume experiment with: Tuner.restore(path=..., trainable=...)". Not how a
    # study resumes: run_study prints our own `hpn-tune run --name S --resume` command.
    # And, at the Ctrl-C, "Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune
    # run. ... Press CTRL+C ... to skip": it landed glued to the live line and invites a
    # second Ctrl-C; the study says "interrupted" and how to resume once it has stopped.
    # Same logger, when fit() ends with trials not TERMINATED: "Trials did not complete:
    # [trial_fn_5736c061, ...]", Ray's ids of the errored (or, after a Ctrl-C, unfinished)
    # trials, which our summary counts and the live line and MLflow name as <study>-tNNN.
    drop("ray.tune.tune", "Experiment has been interrupted", "Training has been interrupted",
         "Trials did not complete", "Stop signal received")
    # "Failed to fetch metrics for N trial(s): - trial_fn_...: FileNotFoundError('Could not
    # fetch metrics for ...: both result.json and progress.csv were not found at ...')", each
    # time Ray loads the study's state (fit()'s result grid, Tuner.restore, trial_statuses)
    # for every trial that never reported: not started before a Ctrl-C, or failed in its
    # first epoch (Ray's Trial.last_result is never None, so it looks for their files). We
    # read trial metrics from MLflow, never from these files.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


def trial_statuses(experiment_path: str) -> dict[str, str]:
    """{trial id: Ray status} from the study's saved state (what a resume would run)."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.status for t in ExperimentAnalysis(experiment_path).trials}


def can_restore(experiment_path: str) -> bool:
    """Whether Ray saved the experiment's state. Tuner.can_restore looks only for tuner.pkl,
    which Tuner() writes before fit() saves any state: a driver killed in between leaves a
    folder that Tuner.restore and ExperimentAnalysis both refuse."""
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint

    return (tune.Tuner.can_restore(experiment_path)
            and _find_newest_experiment_checkpoint(experiment_path) is not None)


def experiment_path(storage_path: str, study: str) -> str:
    if "://" in storage_path:
        return f"{storage_path.rstrip('/')}/{study}"
    return str(Path(storage_path) / study)


def run_tuner(define_by_run: Any, sampler: Any, data: PreparedData, ctx: StudyContext,
              settings: TuneSettings, resume: bool,
              progress: ProgressCallback | None = None) -> Any:
    """Run (or resume) the study; returns Ray's ResultGrid."""
    trainable = tune.with_parameters(trial_fn, data=data, ctx=ctx)  # data goes to the object store once
    resources = {"cpu": settings.cpus_per_trial}
    if settings.gpus_per_trial > 0:
        resources["gpu"] = settings.gpus_per_trial
    trainable = tune.with_resources(trainable, resources)
    # Ray saves the study state (trials, searcher) at most this often; a driver killed
    # between saves loses trials that finished since (see tuning.study's lost trials).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Our own summary is the study's output; Ray's console tables would bury it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    quiet_libraries()
    if resume:
        exp_path = experiment_path(settings.storage_path, settings.experiment)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        if progress is not None:
            progress.install(tuner)  # restored callbacks are the pickled, inert copy
        return _fit(tuner)
    multi = isinstance(settings.metric, list)
    storage = None
    if settings.optuna_storage:
        from tuning.optuna_store import open_storage

        storage = open_storage(settings.optuna_storage)
    searcher = StudySearch(space=define_by_run, sampler=sampler, metric=settings.metric,
                           mode=settings.mode, storage=storage,
                           study_name=settings.optuna_study or None)
    if settings.repeats > 1:
        searcher = SeedRepeats(searcher, repeat=settings.repeats)
    if settings.scheduler == "asha" and not multi:
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=settings.epochs,
                                  grace_period=min(3, settings.epochs), reduction_factor=3)
    else:
        scheduler = FIFOScheduler()
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler,
            num_samples=settings.trials * settings.repeats,  # Repeater counts every repeat
            max_concurrent_trials=settings.max_concurrent,
            # Each trial measures its own peak (hpn.memory), so reused actors are safe.
            reuse_actors=True,
            metric=None if multi else settings.metric, mode=None if multi else settings.mode,
        ),
        run_config=tune.RunConfig(
            name=settings.experiment, storage_path=settings.storage_path,
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[FinalizeTrialRuns(ctx), *([progress] if progress else [])], verbose=0,
        ),
    )
    return _fit(tuner)


def _fit(tuner: Any) -> Any:
    """`tuner.fit()`, then the SIGINT handler from before it: Tune installs its own graceful
    stop for the run and never puts the previous one back, so a Ctrl-C (or the SIGTERM that
    `hpn-tune run` turns into one) while the report is written would be swallowed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()
    previous = signal.getsignal(signal.SIGINT)
    try:
        return tuner.fit()
    finally:
        signal.signal(signal.SIGINT, previous)
