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
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import TRIAL_INDEX

from hpn import metrics as M
from hpn.config import from_dict
from hpn.errors import HPNInputError
from hpn.encode import pick_device
from hpn.memory import PeakMemory, cap_cuda_share
from hpn.train import NonFiniteLossError, PreparedData, train
from tuning.tracking import (
    CONFIG_GROUP_TAG,
    NODE_IP_TAG,
    close_trial_run,
    RAY_NODE_ID_TAG,
    REPEAT_TAG,
    STATE_TAG,
    TrialRun,
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


GROUP_KEY = "__config_group__"  # the first trial id of a config's repeats


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
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False}
    if address:
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
        ray.init(**kwargs)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


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
    repeat = int(config.get(TRIAL_INDEX, 0))
    cfg.train.seed += repeat  # repeats of one config: the study's train.seed, +1, +2, ...
    tags = {**node_tags(), REPEAT_TAG: str(repeat),
            CONFIG_GROUP_TAG: str(config.get(GROUP_KEY, trial_id))}
    run = TrialRun(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, trial_id, ctx.study,
                   {**cfg.to_flat(), "trial_id": trial_id}, tags, trial_number(trial_id))
    if run.finished_metrics is not None:
        # Finished before the driver was killed, but after Ray last saved its state: the
        # MLflow run is the record, so replay it instead of training again.
        tune.report({**run.finished_metrics, DONE_KEY: True})
        return
    started = time.time()
    pending: list[dict[str, float]] = []
    trained = [0]  # epochs done, for the reason a stopped trial gives

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        # Report one epoch late, so the last epoch's report carries the final test metrics
        # and ASHA sees exactly `epochs` iterations.
        trained[0] = epoch
        run.log_metrics({k: row[k] for k in M.EPOCH_METRICS}, step=epoch)
        if pending:
            tune.report(pending.pop())
        pending.append(row)

    # The trial's own window around train(): a trial stopped early, failed or pruned, still
    # logs how long it ran and its peak memory (its last val_accuracy is logged per epoch).
    with PeakMemory(pick_device(cfg.train.device)) as memory:
        try:
            result = train(cfg, data, on_epoch)
        except torch.OutOfMemoryError as exc:
            run.log_metrics(memory.usage())
            run.end("error", f"CUDA out of memory: {exc}")
            raise
        except NonFiniteLossError as exc:
            run.log_metrics(memory.usage())
            run.end("error", str(exc))
            raise
        except SystemExit:  # Ray stopped the trial at a report (ASHA)
            run.log_metrics(memory.usage())
            run.end("pruned", pruned_reason(trained[0]))
            raise
        except Exception as exc:
            run.log_metrics(memory.usage())
            run.end("error", f"{type(exc).__name__}: {exc}")
            raise
    final = {**result.metrics, NUM_CLASSES_KEY: data.corpus.num_classes,
             "trial_started_at": started, "trial_ended_at": time.time()}
    run.log_metrics({**{k: v for k, v in result.metrics.items()
                        if k not in M.EPOCH_METRICS and k != M.EPOCH},
                     NUM_CLASSES_KEY: data.corpus.num_classes}, step=cfg.train.epochs)
    from tuning.pyfunc import log_pyfunc

    log_pyfunc(run.client, run.run_id, result.model)
    run.end("completed")
    tune.report({**final, DONE_KEY: True})


def trial_number(trial_id: str) -> int | None:
    """The study's count of this trial (1, 2, ...): Tune's search generator numbers trials
    in its experiment tag (saved across a resume), which starts the trial's directory name
    after the id: `trial_fn_03b9977f_26_config...`."""
    name = Path(tune.get_context().get_trial_dir() or "").name
    match = re.search(rf"_{re.escape(trial_id)}_(\d+)", name)
    return int(match.group(1)) if match else None


def pruned_reason(epoch: float | None) -> str:
    after = f" after epoch {int(epoch)}" if epoch else ""
    return (f"Stopped early by the ASHA scheduler{after}: its val_accuracy was below the cut-off "
            "of that rung, where only the best third of trials go on. Not a failure.")


class FinalizeTrialRuns(tune.Callback):
    """Close child runs a trial could not close itself (pruned or killed trials)."""

    def __init__(self, ctx: StudyContext) -> None:
        self.ctx = ctx

    def _close(self, trial: Any, state: str, reason: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        from tuning.tracking import PARENT_TAG, TRIAL_ID_TAG

        client = MlflowClient(self.ctx.tracking_uri)
        runs = client.search_runs(
            [self.ctx.experiment_id],
            f"tags.`{PARENT_TAG}` = '{self.ctx.parent_run_id}' AND tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}'",
            max_results=1,
        )
        if not runs or runs[0].data.tags.get(STATE_TAG):
            return
        close_trial_run(client, runs[0].info.run_id, state, reason)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not (trial.last_result or {}).get(DONE_KEY):
            self._close(trial, "pruned", pruned_reason((trial.last_result or {}).get(M.EPOCH)))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "error", str(getattr(trial, "error_msg", "") or "trial raised"))


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


def _quiet_libraries() -> None:
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def trial_statuses(experiment_path: str) -> dict[str, str]:
    """{trial id: Ray status} from the study's saved state (what a resume would run)."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.status for t in ExperimentAnalysis(experiment_path).trials}


def can_restore(experiment_path: str) -> bool:
    return tune.Tuner.can_restore(experiment_path)


def experiment_path(storage_path: str, study: str) -> str:
    if "://" in storage_path:
        return f"{storage_path.rstrip('/')}/{study}"
    return str(Path(storage_path) / study)


def run_tuner(define_by_run: Any, sampler: Any, data: PreparedData, ctx: StudyContext,
              settings: TuneSettings, resume: bool) -> Any:
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
    _quiet_libraries()
    if resume:
        exp_path = experiment_path(settings.storage_path, ctx.study)
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False).fit()
    multi = isinstance(settings.metric, list)
    searcher = OptunaSearch(space=define_by_run, sampler=sampler, metric=settings.metric,
                            mode=settings.mode)
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
            name=ctx.study, storage_path=settings.storage_path,
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[FinalizeTrialRuns(ctx)], verbose=0,
        ),
    )
    return tuner.fit()
