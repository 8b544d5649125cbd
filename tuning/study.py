"""One tuning study: data once in the driver, trials through Ray Tune, results in MLflow.

`run_study(StudyOptions)` is what `hpn-tune run` calls and what the tests call directly.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from hpn import metrics as M
from hpn.config import load_config, parse_override
from hpn.errors import HPNInputError
from hpn.tasks import CLASSIFICATION, UNUSED_KEYS, TaskSpec, loss_problem, task_spec
from hpn.train import prepare_data
from tuning import optuna_store, tracking
from tuning.objectives import (
    DEFAULT_OBJECTIVES,
    MULTI_OBJECTIVE,
    Objectives,
    objectives_for,
    parse_objectives,
)
from tuning.spaces import load_space, resolve_space_path
from tuning.tracking import STATE_TAG, TRIAL_ID_TAG, trial_runs

DEFAULT_EXPERIMENT = "hpn-tune"
SCHEDULERS = ("asha", "fifo")


@dataclass
class StudyOptions:
    space: str | None = None
    trials: int | None = None  # None: 12 for a new study, the recorded number on resume
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    name: str | None = None
    tracking_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    gpus_per_trial: float | None = None  # None: 0.25 when the Ray cluster has a GPU, else 0
    cpus_per_trial: float | None = None  # None: 1, or the recorded number on resume
    max_concurrent: int | None = None  # None: 2, or the recorded number on resume
    sampler: str | None = None  # None: tpe, or the recorded sampler on resume
    objectives: str | None = None  # --objectives: a multi-objective sampler's objectives beside
    # the task's primary (memory, latency, size); None: memory, or the recorded ones on resume
    scheduler: str | None = None  # None: asha, but fifo for grid, repeated and multi-objective studies
    address: str | None = None
    storage_path: str | None = None
    optuna_storage: str | None = None  # None: sqlite optuna.db beside the MLflow store
    resume: bool = False
    seed: int | None = None  # sampler seed; None: a new one per study, recorded to replay it
    repeats: int | None = None  # runs of each config (train.seed, +1, ...; the sampler sees the
    # mean); None: 1 for a new study, the recorded number on resume
    register: bool = True
    model_name: str | None = None  # None: the task's default (tuning.registry.default_model_name)
    # each of the task's validation metrics must beat its trivial baseline by this to register
    # (a score: by more than this many points; an error: below baseline x (1 - this))
    baseline_margin: float = M.DEFAULT_BASELINE_MARGIN
    progress: bool = False  # the live line (only on a terminal)
    verbose: bool = False  # with progress, a line per finished trial


def _check(opts: StudyOptions) -> None:
    from tuning.samplers import SAMPLERS

    if opts.trials is not None and opts.trials < 1:
        raise HPNInputError(f"--trials: must be >= 1, got {opts.trials}")
    if opts.max_concurrent is not None and opts.max_concurrent < 1:
        raise HPNInputError(f"--max-concurrent: must be >= 1, got {opts.max_concurrent}")
    if opts.cpus_per_trial is not None and opts.cpus_per_trial <= 0:
        raise HPNInputError(f"--cpus-per-trial: must be > 0, got {opts.cpus_per_trial}")
    if opts.gpus_per_trial is not None and not 0 <= opts.gpus_per_trial <= 8:
        raise HPNInputError(f"--gpus-per-trial: must be between 0 and 8, got {opts.gpus_per_trial}")
    if opts.sampler is not None and opts.sampler not in SAMPLERS:
        raise HPNInputError(f"--sampler: unknown sampler {opts.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if opts.scheduler is not None and opts.scheduler not in SCHEDULERS:
        raise HPNInputError(f"--scheduler: unknown scheduler {opts.scheduler!r}; choose asha or fifo")
    if opts.repeats is not None and opts.repeats < 1:
        raise HPNInputError(f"--repeats: must be >= 1, got {opts.repeats}")
    if opts.seed is not None and not 0 <= opts.seed < 2**32:
        raise HPNInputError(f"--seed: must be between 0 and 2**32 - 1, got {opts.seed}")
    import re

    # The name becomes an MLflow filter value (a quote breaks it), a folder under
    # --storage-path (`../x` would leave it) and an Optuna study name.
    if opts.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", opts.name):
        raise HPNInputError(
            f"--name: {opts.name[:60]!r} is not a usable study name; use letters, digits, '.', "
            "'_' and '-', starting with a letter or digit, at most 100 characters "
            "([A-Za-z0-9][A-Za-z0-9._-]{0,99})")
    if opts.resume and not opts.name:
        raise HPNInputError("--resume: needs --name of the study to resume")
    if opts.objectives is not None:
        from tuning.samplers import is_multi_objective

        names = parse_objectives(opts.objectives)
        if not opts.resume and not is_multi_objective(opts.sampler or "tpe"):
            raise HPNInputError(
                f"--objectives: the {opts.sampler or 'tpe'} sampler optimises the task's metric "
                f"alone; add --sampler nsga2 to trade it against {', '.join(names)}")
    if not opts.resume:  # a bad space file is refused before any store or Ray exists
        load_space(resolve_space_path(opts.space))


def study_spec(base: Any) -> TaskSpec:
    """The study's task (its base config's `model.task`; a space cannot search it): which
    validation metric the sampler, ASHA, the best trial and registration go by, and whether
    higher or lower is better."""
    return task_spec(tracking.config_task(base))


def plan_objectives(plan: Any, gpus: float) -> Objectives | None:
    """What a multi-objective study's sampler optimises (`tuning.objectives.objectives_for`;
    None: one objective, the task's primary). `gpus`: per trial, which say whether its
    memory objective is VRAM or RSS."""
    if plan.sampler not in MULTI_OBJECTIVE:
        return None
    return objectives_for(study_spec(plan.base), getattr(plan, "objectives", DEFAULT_OBJECTIVES),
                          gpus)


def searched_runtimes(space: Any) -> tuple[str, ...]:
    """The encoder runtimes a space searches: each is encoded once before the trials."""
    for p in space.params:
        if p.key == "encoder.runtime":
            return tuple(p.choices or ())
    return ()


def _searched_ranges(space: Any) -> dict[str, tuple[float, float]]:
    return {f"params.{p.key}": (p.low, p.high) for p in space.params if p.low is not None}


class StudyInterrupted(RuntimeError):
    """The study stopped before all its trials finished (Ctrl-C): resume it by name."""

    exit_code, label = 130, "interrupted"


class TrackingServerLost(RuntimeError):
    """The MLflow server stopped answering and did not come back within MLflow's retries:
    the study stops, its results kept, and resumes by name once the server is back."""

    exit_code, label = 1, "failed"


def _lost_server_message(tracking_uri: str, storage: str, name: str, opts: StudyOptions) -> str:
    from tuning.outbox import Outbox, outbox_dir

    waiting = len(Outbox(outbox_dir(storage, name)).entries())
    kept = (f"; {waiting} trial records (models, metrics, run closes) wait in "
            f"{outbox_dir(storage, name)}" if waiting else "")
    return (f"the MLflow server at {tracking_uri} stopped answering (each call is retried for "
            f"about {tracking.bound_http_retries():.0f} s: MLFLOW_HTTP_REQUEST_MAX_RETRIES){kept}. "
            f"When it is back, {resume_command(opts, name, opts.trials)} uploads what waits, "
            "closes the runs left open and finishes the study")


def _study_config(opts: StudyOptions, space: Any) -> Any:
    """Defaults < the space's fixed keys < --config < --set (the user's explicit word wins)."""
    base = load_config(opts.config, opts.overrides, base=space.base_values())
    searched = set(space.keys())
    for item in opts.overrides:
        key = parse_override(item)[0]
        if key in searched:
            raise HPNInputError(f"--set {key}: the search space {space.path} searches this key; "
                                "fix it in the space file instead")
    task = base.model.task
    if idle := [k for k in space.keys() if k in UNUSED_KEYS[task]]:
        raise HPNInputError(
            f"search space {space.path}: {idle[0]} changes nothing for model.task={task}, so "
            f"its trials would differ only by noise; remove it from the space (or use "
            f"search_spaces/{'default' if task == CLASSIFICATION else task}.yaml)")
    # With the task from --set, the space's own load checked its losses against the default
    # task: check them against this one.
    losses = [c for p in space.params if p.key == "model.loss" for c in p.choices or ()]
    if problem := next(filter(None, (loss_problem(task, loss) for loss in losses)), None):
        raise HPNInputError(f"search space {space.path}: {problem}; remove it from the choices")
    name = base.encoder.name
    if Path(name).exists():  # a local encoder: trials run in another working directory
        base.encoder.name = str(Path(name).resolve())
    base.encoder.cache_dir = str(Path(base.encoder.cache_dir).resolve())
    return base


@dataclass(frozen=True)
class Leg:
    """One Ray Tune experiment of a study: the first is named after the study, each
    extension (`--resume --trials N` beyond the recorded count) adds `<study>-x2`, ..."""

    name: str
    trials: int  # configs this experiment proposes (each run `repeats` times)


@dataclass(frozen=True)
class StudyPlan:
    """What a study runs with; a resumed study takes it from its parent run's tags."""

    space: Any
    base: Any  # the resolved Config
    sampler: str
    scheduler: str
    seed: int
    repeats: int
    trials: int  # configs the sampler proposes (each run `repeats` times)
    max_concurrent: int
    cpus_per_trial: float
    gpus_per_trial: float | None  # None: decided once Ray is up (0.25 with a GPU, else 0)
    optuna_storage: str | None  # RDB URL (with its password, if any); None: a study from
    # before the storage, whose sampler lives only in Ray's state
    legs: tuple[Leg, ...] = ()  # Ray experiments so far (none for a new study)
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES  # a multi-objective sampler's, beside the
    # task's primary (tuning.objectives.OBJECTIVES); ignored by a single-objective one


def _new_plan(opts: StudyOptions, tracking_uri: str, name: str) -> StudyPlan:
    space = load_space(resolve_space_path(opts.space))
    # A seed per study: samplers with one fixed seed start from the same random configs, so
    # short studies would all report the same best config. Recorded, so it can be replayed.
    seed = opts.seed if opts.seed is not None else secrets.randbelow(2**31)
    repeats = opts.repeats or 1
    sampler = opts.sampler or "tpe"
    storage_url = optuna_store.resolve_storage(opts.optuna_storage, tracking_uri)
    if optuna_store.study_exists(optuna_store.open_storage(storage_url), name):
        # Early, before the encode; the atomic claim (_claim_name) still decides a race.
        raise HPNInputError(
            f"--name: the Optuna storage {optuna_store.redact(storage_url)} already holds a study "
            f"named {name!r} (from a deleted MLflow store?); pick another name or delete it "
            f"with: optuna delete-study --study-name {name} --storage {optuna_store.redact(storage_url)}")
    objectives = parse_objectives(opts.objectives) if opts.objectives else DEFAULT_OBJECTIVES
    plan = StudyPlan(space, _study_config(opts, space), sampler,
                     resolve_scheduler(opts.scheduler, sampler, repeats), seed, repeats,
                     opts.trials or 12, opts.max_concurrent or 2, opts.cpus_per_trial or 1.0,
                     opts.gpus_per_trial, storage_url, objectives=objectives)
    _check_objectives(plan)
    return plan


def _check_objectives(plan: StudyPlan) -> None:
    """Latency and size are measured only with train.measure_latency on: a study optimising
    them with it off would fail every trial (an objective missing) after training it."""
    from tuning.objectives import SERVING_OBJECTIVES
    from tuning.samplers import is_multi_objective

    served = [o for o in plan.objectives if o in SERVING_OBJECTIVES]
    if is_multi_objective(plan.sampler) and served and not plan.base.train.measure_latency:
        raise HPNInputError(f"--objectives {','.join(served)}: trials measure latency and size "
                            "only with train.measure_latency=true; drop --set "
                            "train.measure_latency=false (or those objectives)")


def _claim_name(plan: StudyPlan, name: str) -> None:
    """Claim the study's name by creating its Optuna study (atomic: Optuna's study names are
    unique in its database), just before the parent run is created, so two `hpn-tune run
    --name X` started together cannot both start it. Just before, not at the name check: a
    kill during the encode would otherwise leave a name claimed with no run to resume. The
    directions are the ones _run_leg's searcher optimises (Ray's OptunaSearch keeps what is
    stored): the task's primary metric in its direction (val_accuracy up, val_mae down) and,
    for a multi-objective sampler, each of its objectives (peak memory by default) down."""
    assert plan.optuna_storage is not None, "every new study has an Optuna storage"
    # one objective: the primary alone; the GPUs (memory as VRAM or RSS) change no direction
    objectives = plan_objectives(plan, 0.0) or objectives_for(study_spec(plan.base), (), 0.0)
    directions = objectives.directions
    if not optuna_store.claim_study(optuna_store.open_storage(plan.optuna_storage), name, directions):
        shown = optuna_store.redact(plan.optuna_storage)
        raise HPNInputError(
            f"--name: study name {name!r} is taken in the Optuna storage {shown} (by an "
            "`hpn-tune run` with this name started just now, or by a study of a deleted MLflow "
            "store); pick another name, or if no such study runs, free it with: optuna "
            f"delete-study --study-name {name} --storage {shown}")


def _resume_plan(opts: StudyOptions, parent_run: Any) -> StudyPlan:
    """A resumed study keeps its space, config, sampler, objectives, scheduler, seed and
    repeats; `--trials N` above its recorded count extends it to N trials in all."""
    from hpn.config import from_dict
    from tuning.samplers import is_multi_objective

    tags = parent_run.data.tags
    name = tags[tracking.STUDY_TAG]

    def recorded(tag: str, cast: type, fallback: Any) -> Any:
        # studies from before a setting was recorded: the flag, else the old default
        return cast(tags[tag]) if tag in tags else fallback

    trials = recorded(tracking.TRIALS_TAG, int, opts.trials or 12)
    if opts.trials is not None and opts.trials < trials:
        raise HPNInputError(f"--trials: {opts.trials} is fewer than the {trials} trials of study "
                            f"{name!r}; a study can only be extended (drop --trials to resume it)")
    extend = opts.trials is not None and opts.trials > trials
    if parent_run.info.status == "FINISHED" and not extend:
        raise HPNInputError(f"--resume: study {name!r} already finished its {trials} trials; "
                            f"extend it with --trials N (N > {trials}) or start a new study "
                            "with another --name")
    held = {
        "--seed": (opts.seed, recorded(tracking.SEED_TAG, int, 0)),
        "--repeats": (opts.repeats, recorded(tracking.REPEATS_TAG, int, 1)),
        "--max-concurrent": (opts.max_concurrent,
                             recorded(tracking.MAX_CONCURRENT_TAG, int, opts.max_concurrent or 2)),
        "--cpus-per-trial": (opts.cpus_per_trial,
                             recorded(tracking.CPUS_PER_TRIAL_TAG, float, opts.cpus_per_trial or 1.0)),
        "--gpus-per-trial": (opts.gpus_per_trial,
                             recorded(tracking.GPUS_PER_TRIAL_TAG, float, opts.gpus_per_trial)),
        "--sampler": (opts.sampler, tags[tracking.SAMPLER_TAG]),
        "--scheduler": (opts.scheduler, tags[tracking.SCHEDULER_TAG]),
        # a multi-objective study from before --objectives optimised memory
        "--objectives": (opts.objectives and ",".join(parse_objectives(opts.objectives)),
                         tags.get(tracking.OBJECTIVES_TAG, ",".join(DEFAULT_OBJECTIVES))
                         if is_multi_objective(tags[tracking.SAMPLER_TAG]) else None),
    }
    for flag, (given, study) in held.items():
        if given is not None and study is not None and given != study:
            raise HPNInputError(f"--resume: {flag} {given} differs from the study's {study}; "
                                f"drop {flag} to resume the study as it was")
    if opts.objectives and held["--objectives"][1] is None:
        raise HPNInputError(f"--objectives: study {name!r} optimises one metric (sampler "
                            f"{tags[tracking.SAMPLER_TAG]}); drop --objectives to resume it")
    space = load_space(tags[tracking.SPACE_FILE_TAG])
    base = from_dict(json.loads(tags[tracking.BASE_CONFIG_TAG]))
    if opts.space or opts.config or opts.overrides:
        given = _study_config(opts, load_space(resolve_space_path(opts.space)))
        same_space = not opts.space or (
            str(resolve_space_path(opts.space).resolve()) == tags[tracking.SPACE_FILE_TAG])
        if given.to_flat() != base.to_flat() or not same_space:
            diff = [k for k, v in given.to_flat().items() if base.to_flat()[k] != v]
            raise HPNInputError(
                f"--resume: the given --space/--config/--set differ from the study's "
                f"({', '.join(diff) or 'space file'}); drop them to resume the study as it was")
    storage_url = _recorded_storage(opts, tags)
    if extend and storage_url is None:
        raise HPNInputError(f"--trials: study {name!r} predates hpn-tune's Optuna storage, so its "
                            "sampler history cannot be reopened; resume it without --trials")
    if tracking.RAY_EXPERIMENTS_TAG in tags:
        legs = tuple(Leg(**leg) for leg in json.loads(tags[tracking.RAY_EXPERIMENTS_TAG]))
    else:  # a study from before extensions: one experiment, named after the study
        from tuning.samplers import grid_size

        grid = tags[tracking.SAMPLER_TAG] == "grid"
        legs = (Leg(name, min(trials, grid_size(space)) if grid else trials),)
    value = {flag: study for flag, (_, study) in held.items()}
    objectives = (parse_objectives(value["--objectives"]) if value["--objectives"]
                  else DEFAULT_OBJECTIVES)
    return StudyPlan(space, base, value["--sampler"], value["--scheduler"], value["--seed"],
                     value["--repeats"], opts.trials if extend else trials,
                     value["--max-concurrent"], value["--cpus-per-trial"],
                     value["--gpus-per-trial"], storage_url, legs, objectives)


def _recorded_storage(opts: StudyOptions, tags: dict[str, str]) -> str | None:
    """The study's Optuna storage: its tag holds the URL without a password, so a storage
    with one needs --optuna-storage again (checked against the tag)."""
    stored = tags.get(tracking.OPTUNA_STORAGE_TAG)
    if stored is None:
        if opts.optuna_storage:
            raise HPNInputError("--optuna-storage: this study predates hpn-tune's Optuna storage "
                                "and cannot be moved into one; drop the flag")
        return None
    if opts.optuna_storage:
        given = optuna_store.resolve_storage(opts.optuna_storage, "")
        if optuna_store.redact(given) != stored:
            raise HPNInputError(f"--optuna-storage: {optuna_store.redact(given)} differs from the "
                                f"study's {stored}; drop the flag to use the study's")
        return given
    if "***" in stored:
        raise HPNInputError(f"--optuna-storage: the study's storage {stored} needs its password; "
                            "pass the full URL with --optuna-storage")
    return stored


def _check_counts(space: Any, num_classes: int) -> None:
    """Every prototype count the space can propose must give each class a prototype."""
    for p in space.params:
        if p.key == "model.prototype_count":
            low = min(p.choices) if p.choices else p.low
            if low < num_classes:
                raise HPNInputError(
                    f"search space {space.path!r}: model.prototype_count can be {low}, below the "
                    f"corpus's {num_classes} classes; raise it to >= {num_classes}")


def resolve_scheduler(requested: str | None, sampler: str, repeats: int) -> str:
    """ASHA by default; FIFO where early stopping would break the study's promise: a grid
    trains every cell to the end, repeats are averaged over full runs, and ASHA stops on one
    metric only (multi-objective). Asking for ASHA there is refused rather than ignored."""
    from tuning.samplers import is_multi_objective

    why = ("a grid study trains every cell to the end" if sampler == "grid" else
           "repeats are averaged over complete runs" if repeats > 1 else
           "ASHA stops on one metric and this sampler optimises several"
           if is_multi_objective(sampler) else None)
    if why and requested == "asha":
        raise HPNInputError(f"--scheduler asha: {why}; drop --scheduler (FIFO is used)")
    return "fifo" if why else requested or "asha"


def _check_cluster_reach(opts: StudyOptions, tracking_uri: str) -> None:
    """On a Ray cluster trials run on other machines: they must reach the tracking store and
    the study's storage. Needs Ray initialised."""
    from tuning import ray_tune

    if not opts.address or not (opts.address.startswith("ray://") or ray_tune.is_multi_node()):
        return
    if tracking.is_local_store(tracking_uri):
        raise HPNInputError(
            f"--tracking-uri: {tracking_uri} is local to this machine, but trials run on a "
            "Ray cluster; give an MLflow server URI (http://host:5000)")
    if not opts.storage_path:
        raise HPNInputError(
            "--storage-path: trials run on a multi-node Ray cluster; give a path every node "
            "sees (e.g. /shared/ray_results on NFS) or a URI (s3://bucket/ray_results)")


def run_study(opts: StudyOptions) -> dict[str, Any]:
    """Check, plan, open the study's runs, run its Ray experiments, then report and register."""
    from mlflow.tracking import MlflowClient

    from tuning import ray_tune
    from tuning.samplers import is_multi_objective

    _check(opts)
    ray_tune.quiet_libraries()  # before the first MLflow call: its INFO lines on a new store
    session_started = time.time()
    name = opts.name or time.strftime("study-%Y%m%d-%H%M%S")
    tracking_uri = tracking.resolve_tracking_uri(opts.tracking_uri)  # credentials to the env
    tracking.bound_http_retries()  # before Ray starts: its local workers inherit it
    tracking.check_server(tracking_uri)  # seconds, not MLflow's minutes of retries
    storage = opts.storage_path or str(Path.cwd() / "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).resolve())

    if opts.address and tracking.is_local_store(tracking_uri):
        # Refuse before MLflow creates a local store that the cluster could not use anyway.
        ray_tune.init_ray(opts.address)
        _check_cluster_reach(opts, tracking_uri)
    # Cheap checks first: the study's name against MLflow and Ray's saved state.
    client = MlflowClient(tracking_uri, tracking_uri)
    experiment_id = tracking.ensure_experiment(client, opts.experiment, tracking_uri)
    parent = tracking.find_study_run(client, experiment_id, name)
    if opts.resume:
        if parent is None:
            raise HPNInputError(f"--resume: no study named {name!r} in experiment {opts.experiment!r}")
        plan = _resume_plan(opts, client.get_run(parent))
    else:
        if parent is not None:
            raise HPNInputError(f"--name: a study named {name!r} already exists; pass --resume or a new name")
        plan = _new_plan(opts, tracking_uri, name)
    claimed = False
    try:
        if is_multi_objective(plan.sampler) and plan.repeats > 1:
            raise HPNInputError(f"--repeats: the {plan.sampler} sampler optimises several "
                                "metrics and Ray's Repeater averages one; drop --repeats or use "
                                "another --sampler")
        if ((opts.address or "").startswith("ray://")
                and (plan.optuna_storage or "").startswith("sqlite:")):
            raise HPNInputError(
                "--optuna-storage: through ray:// the study's searcher runs on the Ray head node, "
                f"which cannot open this machine's {plan.optuna_storage}; give a database URL the "
                "head reaches (e.g. postgresql://user@db/optuna)")
        runs = _legs_to_run(plan, name, storage,
                            client.get_run(parent).info.status if parent else None)

        _say(opts, f"study {name}: starting Ray, then the data (the encode shows a bar; "
                   "cached after)")
        ray_tune.init_ray(opts.address)
        _check_cluster_reach(opts, tracking_uri)
        gpus = plan.gpus_per_trial
        if gpus is None:
            gpus = 0.25 if ray_tune.cluster_gpus() > 0 else 0.0
        elif gpus > 0 and ray_tune.cluster_gpus() == 0:
            raise HPNInputError("--gpus-per-trial: the Ray cluster has no GPU; drop the flag to "
                                "run on CPU")
        ray_tune.check_trial_fits(plan.cpus_per_trial, gpus)  # Ray would wait for it forever

        data = prepare_data(plan.base, progress=_on_terminal(opts),
                            runtimes=searched_runtimes(plan.space))
        _check_counts(plan.space, data.corpus.num_classes)
        if parent is None:
            _claim_name(plan, name)
            claimed = True
        parent = _open_parent(client, experiment_id, parent, name, plan, gpus, data)
    except BaseException:
        import contextlib

        with contextlib.suppress(Exception):  # what stopped the study is the error to show
            if claimed and tracking.find_study_run(client, experiment_id, name) is None:
                # stopped before its run existed: free the name
                optuna_store.release_study(optuna_store.open_storage(plan.optuna_storage), name)
        raise
    try:
        return _run_legs_and_finish(client, experiment_id, parent, name, tracking_uri, storage,
                                    plan, runs, gpus, data, opts, session_started)
    except StudyInterrupted:
        raise
    except BaseException as exc:
        if tracking.is_unreachable(exc):  # closing runs needs the server too: say what to do
            raise TrackingServerLost(_lost_server_message(tracking_uri, storage, name, opts)) from exc
        # Whatever stopped the study (Ctrl-C outside Tune, a failure between experiments or
        # in the report): its trials and its run end, and a FINISHED study stays FINISHED.
        tracking.close_interrupted_trial_runs(client, experiment_id, parent,
                                              resume_command(opts, name, opts.trials))
        if client.get_run(parent).info.status == "RUNNING":
            tracking.log_study_wall(client, parent, session_started)
            client.set_terminated(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def _run_legs_and_finish(client: Any, experiment_id: str, parent: str, name: str,
                         tracking_uri: str, storage: str, plan: StudyPlan,
                         runs: list[tuple[Leg, str]], gpus: float, data: Any,
                         opts: StudyOptions, session_started: float) -> dict[str, Any]:
    from tuning.outbox import Outbox, outbox_dir

    outbox = Outbox(outbox_dir(storage, name))
    delivered = outbox.deliver(client, experiment_id, parent)  # left by a lost server
    legs = list(plan.legs)
    total = (sum(x.trials for x in plan.legs)
             + sum(leg.trials for leg, mode in runs if mode == "new")) * plan.repeats
    for leg, mode in runs:
        if mode == "new":  # recorded before it runs, so an interrupted extension resumes
            legs.append(leg)
            client.set_tag(parent, tracking.RAY_EXPERIMENTS_TAG,
                           json.dumps([vars(x) for x in legs]))
            client.set_tag(parent, tracking.TRIALS_TAG, str(sum(x.trials for x in legs)))
        _run_leg(client, experiment_id, parent, name, tracking_uri, storage, plan, legs, leg,
                 mode, gpus, data, opts, total)
        if _finished(_all_statuses(storage, [leg])) < leg.trials * plan.repeats:
            break  # interrupted (Ctrl-C): no extension starts after it

    statuses = _all_statuses(storage, legs)
    delivered += outbox.deliver(client, experiment_id, parent)
    tracking.close_left_open_trial_runs(client, experiment_id, parent, statuses)
    tracking.mark_lost_trials(client, experiment_id, parent, set(statuses))
    wanted = sum(leg.trials for leg in legs) * plan.repeats
    finished = _finished(statuses)
    if finished < wanted:  # Ray's fit() returns normally after a Ctrl-C
        # An extension asked for but not started yet (Ctrl-C while the study finished what
        # it had) is not recorded: the command asks for it again.
        pending = plan.trials > sum(leg.trials for leg in legs)
        command = resume_command(opts, name, plan.trials if pending else None)
        tracking.close_interrupted_trial_runs(client, experiment_id, parent, command)
        tracking.log_study_wall(client, parent, session_started)
        client.set_terminated(parent, "KILLED")
        raise StudyInterrupted(
            f"study {name!r} stopped with {finished} of {wanted} trials finished; "
            f"continue it with: {command}")
    _say(opts, f"study {name}: all trials done; writing the report"
         + (" and registering the best model" if opts.register else ""))
    summary = _finish(client, experiment_id, parent, name, plan, data, tracking_uri, opts,
                      session_started)
    summary["delivered_after_outage"] = delivered
    return summary


def _on_terminal(opts: StudyOptions) -> bool:
    """Whether the study shows progress (its live line, steps, the encode's bar): asked to
    (not --json) and stderr is a terminal, never into a log file."""
    return opts.progress and sys.stderr.isatty()


def _say(opts: StudyOptions, line: str) -> None:
    """A step the user would otherwise wait through in silence (terminal only, like the
    live line: never with --json or into a file)."""
    if _on_terminal(opts):
        print(line, file=sys.stderr, flush=True)


def _legs_to_run(plan: StudyPlan, name: str, storage: str,
                 status: str | None) -> list[tuple[Leg, str]]:
    """(Ray experiment, how) in order, how being "restore" (from Ray's saved state), "new"
    (an experiment to add) or "again" (recorded, but stopped before Ray saved any state: it
    starts over under the same parent run; the Optuna trials its kill orphaned are failed
    and its runs left open closed as lost when that experiment ends). An interrupted study
    goes on with its last experiment; a study asked for more trials than it has adds one."""
    from tuning import ray_tune
    from tuning.samplers import grid_size

    if not plan.legs:  # a new study: one experiment, named after it
        trials = plan.trials
        if plan.sampler == "grid":
            trials = min(trials, grid_size(plan.space))  # past the grid, Optuna repeats points
        return [(Leg(name, trials), "new")]
    runs: list[tuple[Leg, str]] = []
    if status != "FINISHED":  # interrupted (or killed outright): its last experiment goes on
        last = plan.legs[-1]
        if ray_tune.can_restore(ray_tune.experiment_path(storage, last.name)):
            runs.append((last, "restore"))
        elif len(plan.legs) > 1 or (plan.optuna_storage and not optuna_store.ended_trials(
                optuna_store.open_storage(plan.optuna_storage), name)):
            # Stopped in its first seconds (an extension, or a new study killed between its
            # parent run's creation and Ray's first save): no trial of it ended, so starting
            # over loses nothing. A study with ended trials has saved state somewhere else.
            runs.append((last, "again"))
        else:
            raise HPNInputError(f"--resume: no saved Ray state for {name!r} under {storage}; "
                                "pass the --storage-path the study ran with")
    more = plan.trials - sum(leg.trials for leg in plan.legs)
    if more > 0 and plan.sampler == "grid":
        left = grid_size(plan.space) - sum(leg.trials for leg in plan.legs)
        if left <= 0 and not runs:
            raise HPNInputError(f"--trials: the grid has {grid_size(plan.space)} cells and "
                                f"study {name!r} has run them all; nothing to extend")
        more = min(more, left)
    if more > 0:
        runs.append((Leg(f"{name}-x{len(plan.legs) + 1}", more), "new"))
    return runs


def _open_parent(client: Any, experiment_id: str, parent: str | None, name: str,
                 plan: StudyPlan, gpus: float, data: Any) -> str:
    """The study's parent run: created with what the study runs with, or reopened after
    checking that the data did not change."""
    from tuning.samplers import is_multi_objective

    if parent is not None:
        stored = client.get_run(parent).data.tags.get(tracking.FINGERPRINT_TAG)
        if stored != data.fingerprint:
            raise HPNInputError(f"--resume: the data changed since study {name!r} started "
                                "(dataset fingerprint differs); start a new study")
        client.update_run(parent, status="RUNNING")
        return parent
    space, base = plan.space, plan.base
    tags = {
        tracking.STUDY_TAG: name, tracking.ROLE_TAG: "study",
        tracking.SPACE_FILE_TAG: str(Path(space.path).resolve()), tracking.SAMPLER_TAG: plan.sampler,
        tracking.SCHEDULER_TAG: plan.scheduler, tracking.FINGERPRINT_TAG: data.fingerprint,
        tracking.SEED_TAG: str(plan.seed), tracking.REPEATS_TAG: str(plan.repeats),
        tracking.TRIALS_TAG: str(plan.trials), tracking.MAX_CONCURRENT_TAG: str(plan.max_concurrent),
        tracking.CPUS_PER_TRIAL_TAG: str(plan.cpus_per_trial), tracking.GPUS_PER_TRIAL_TAG: str(gpus),
        tracking.CODE_VERSION_TAG: tracking.code_version(),
        tracking.COMMAND_TAG: " ".join(shlex.quote(optuna_store.redact(a)) for a in sys.argv),
        tracking.BASE_CONFIG_TAG: json.dumps(base.to_dict()),
        tracking.OPTUNA_STUDY_TAG: name,
        tracking.TASK_TAG: study_spec(base).name,
        "mlflow.note.content": space.summary,
    }
    if plan.optuna_storage:
        tags[tracking.OPTUNA_STORAGE_TAG] = optuna_store.redact(plan.optuna_storage)
    if is_multi_objective(plan.sampler):
        tags[tracking.OBJECTIVES_TAG] = ",".join(plan.objectives)
    parent = tracking.create_study_run(
        client, experiment_id, name, tags,
        # Only what the study fixed: a searched key's default would read as the study's value.
        {k: v for k, v in base.to_flat().items() if k not in set(space.keys())}, space.path)
    tracking.log_dataset(client, parent, tracking.corpus_dataset(base.data, data),
                         tracking.STUDY_DATASET_CONTEXT)
    return parent


def _run_leg(client: Any, experiment_id: str, parent: str, name: str, tracking_uri: str,
             storage: str, plan: StudyPlan, legs: list[Leg], leg: Leg, mode: str,
             gpus: float, data: Any, opts: StudyOptions, total: int) -> None:
    """Run one Ray experiment of the study: restore it from Ray's saved state, or start it
    (new, or again when it had not saved any state yet)."""
    from tuning import ray_tune
    from tuning.outbox import outbox_dir
    from tuning.samplers import make_sampler

    objectives = plan_objectives(plan, gpus)
    spec = study_spec(plan.base)
    index = legs.index(leg)
    # Each extension gets its own sampler seed: a seeded random sampler would otherwise
    # propose the first experiment's configs again.
    sampler = make_sampler(plan.sampler, plan.seed + index, plan.space)
    extra = objectives.metrics[1:] if objectives else []
    ctx = ray_tune.StudyContext(name, tracking_uri, experiment_id, parent, plan.base.to_dict(),
                                gpus, tuple(plan.space.keys()),
                                trial_offset=sum(x.trials for x in legs[:index]) * plan.repeats,
                                dataset=tracking.corpus_dataset(plan.base.data, data),
                                outbox=outbox_dir(storage, name),
                                http_retries=tuple((k, os.environ[k]) for k in tracking.HTTP_RETRY_DEFAULTS),
                                final_only=tuple(m for m in extra if m in M.LATENCY_METRICS))
    settings = ray_tune.TuneSettings(
        trials=leg.trials, max_concurrent=plan.max_concurrent, cpus_per_trial=plan.cpus_per_trial,
        gpus_per_trial=gpus, scheduler=plan.scheduler, storage_path=storage,
        metric=objectives.metrics if objectives else spec.primary,
        mode=objectives.modes if objectives else spec.mode,
        epochs=plan.base.train.epochs,
        repeats=plan.repeats, experiment=leg.name, optuna_storage=plan.optuna_storage,
        optuna_study=name,
    )
    from tuning.progress import StudyProgress, resumed

    # The live line starts from what Ray saved as finished (a trial finished in MLflow but
    # not yet saved by Ray is replayed, and counted when it finishes again).
    finished = {t for t, s in _all_statuses(storage, legs).items() if s in ("TERMINATED", "ERROR")}
    start = resumed(((r.data.tags.get(STATE_TAG), r.data.metrics.get(spec.primary), r.info.run_name)
                     for r in trial_runs(client, experiment_id, parent)
                     if r.data.tags.get(TRIAL_ID_TAG) in finished), spec.mode)
    progress = ray_tune.ProgressCallback(
        StudyProgress(name, total, concurrency=plan.max_concurrent, verbose=opts.verbose,
                      enabled=opts.progress, task=spec.name, **start),
        trial_offset=ctx.trial_offset)
    try:
        if plan.optuna_storage:  # Ray's restored searcher holds it without its password
            optuna_store.remember(plan.optuna_storage)
        ray_tune.run_tuner(plan.space.define_by_run(), sampler, data, ctx, settings,
                           mode == "restore", progress)
    except BaseException:
        progress.close()  # Tune closes it when the experiment ends, not when fit() raises
        raise
    finally:
        if plan.optuna_storage:
            optuna_store.mark_orphans(optuna_store.open_storage(plan.optuna_storage), name,
                                      set(_all_statuses(storage, legs)))


def _finished(statuses: dict[str, str]) -> int:
    return sum(s in ("TERMINATED", "ERROR") for s in statuses.values())


def _all_statuses(storage: str, legs: list[Leg]) -> dict[str, str]:
    """{trial id: Ray status} over the study's Ray experiments that have saved state."""
    from tuning import ray_tune

    statuses: dict[str, str] = {}
    for leg in legs:
        path = ray_tune.experiment_path(storage, leg.name)
        if ray_tune.can_restore(path):
            statuses.update(ray_tune.trial_statuses(path))
    return statuses


def _finish(client: Any, experiment_id: str, parent: str, name: str, plan: StudyPlan, data: Any,
            tracking_uri: str, opts: StudyOptions, session_started: float) -> dict[str, Any]:
    """Pick the best config, write the reports, close the parent run, register the best."""
    from tuning.report import best_config

    spec = study_spec(plan.base)
    trials_df = tracking.trials_frame(client, experiment_id, parent)
    gpus = float(client.get_run(parent).data.tags.get(tracking.GPUS_PER_TRIAL_TAG, "0") or 0)
    objectives = plan_objectives(plan, gpus)
    # a tie on the primary goes to the cheaper trial: the one on the front, not one it dominates
    best = best_config(trials_df, spec.primary, spec.mode, spec.test_primary,
                       tie_break=objectives.metrics[1:] if objectives else ())
    optuna_study = None
    if plan.optuna_storage:
        optuna_study = optuna_store.load_study(optuna_store.open_storage(plan.optuna_storage), name)
    _write_reports(client, parent, trials_df, plan.space, plan.base, data, best, tracking_uri,
                   objectives.metrics if objectives else None, optuna_study, spec)
    wall = tracking.log_study_wall(client, parent, session_started)
    states = trials_df["state"].value_counts().to_dict() if not trials_df.empty else {}
    summary: dict[str, Any] = {
        "study": name,
        "experiment": opts.experiment,
        "tracking_uri": tracking_uri,
        "optuna_storage": optuna_store.redact(plan.optuna_storage) if plan.optuna_storage else None,
        "parent_run_id": parent,
        "seed": plan.seed,
        "repeats": plan.repeats,
        "trials": plan.trials,
        "trials_completed": int(states.get("completed", 0)),
        "trials_pruned": int(states.get("pruned", 0)),
        "trials_errored": int(states.get("error", 0)),
        "trials_lost": int(states.get("lost", 0)),
        "wall_s": wall,
        "task": spec.name,
        # The task's primary metric (what chose the best) and its test counterpart, by name,
        # for every task; best_val_accuracy / best_test_accuracy stay for the tasks whose
        # primary is accuracy (classification) and are None for the others.
        "best_metric": spec.primary, "best_mode": spec.mode, "best_value": None,
        "best_test_metric": spec.test_primary, "best_test_value": None,
        "best_config": None, "best_val_accuracy": None, "best_test_accuracy": None,
        "best_run_id": None,
    }
    if best is not None:
        searched = [f"params.{k}" for k in plan.space.keys()]
        summary.update({
            "best_config": {k[len("params."):]: _plain(best.run[k]) for k in searched
                            if k in best.run.index and not pd.isna(best.run[k])},
            # with --repeats: means over the best config's repeats (what the sampler saw)
            "best_value": best.objective_mean,
            "best_test_value": best.test_mean,
            "best_run_id": best.run["run_id"],
        })
        if spec.primary == M.VAL_ACCURACY:
            summary.update(best_val_accuracy=best.objective_mean,
                           best_test_accuracy=best.test_mean)
        tracking.log_best_params(client, parent, summary["best_config"])
        # best_val_accuracy / best_test_accuracy for classification as always; best_val_mae
        # / best_test_mae for regression, ...: the parent run's number is named by its metric.
        client.log_metric(parent, f"best_{spec.primary}", best.objective_mean)
        client.log_metric(parent, f"best_{spec.test_primary}", best.test_mean)
        client.set_tag(parent, tracking.BEST_RUN_TAG, best.run["run_id"])
    if objectives:  # what the study traded against its primary, not only its best primary
        summary.update(_front_summary(trials_df, objectives))
    for key in ("trials_completed", "trials_pruned", "trials_errored", "trials_lost"):
        client.log_metric(parent, key, summary[key])
    client.set_terminated(parent, "FINISHED")
    if opts.register and best is not None:
        from tuning.registry import (
            NOT_REGISTERED_TAG,
            RegistrationRefused,
            default_model_name,
            register_run,
        )

        run_id = best.run["run_id"]
        model_name = summary["model_name"] = opts.model_name or default_model_name(spec.name)
        # An extension whose best trial did not change keeps the version it had.
        summary["registered_new"] = not (
            client.search_registered_models(f"name = '{model_name}'")
            and client.search_model_versions(f"name = '{model_name}' AND run_id = '{run_id}'"))
        summary["registration_refused"] = None
        try:
            summary["registered_version"] = register_run(client, run_id, model_name,
                                                         opts.baseline_margin)
        except RegistrationRefused as exc:  # the study still finished: say why, register nothing
            summary.update(registered_new=False, registered_version=None,
                           registration_refused=str(exc))
            client.set_tag(parent, NOT_REGISTERED_TAG, str(exc)[:5000])
    return summary


def _front_summary(trials_df: pd.DataFrame, objectives: Objectives) -> dict[str, Any]:
    """A multi-objective study's objectives (primary first) and its Pareto-optimal trials'
    run ids, as `hpn-tune show` marks them: its best primary is only one end of the front."""
    from tuning.report import pareto_flags

    front = pareto_flags(trials_df, objectives)
    ids = trials_df.loc[front, "run_id"].tolist() if front.any() else []
    return {"objectives": list(objectives.metrics), "pareto_run_ids": ids}


def resume_command(opts: StudyOptions, name: str, extend_to: int | None = None) -> str:
    """The command that continues this study, with whatever locates it (store, experiment,
    Ray state, cluster, Optuna storage; passwords shown as ***) and `--trials` when an
    extension asked for was not recorded yet; the study's own settings need no flags."""
    words = ["hpn-tune", "run", "--name", name, "--resume"]
    if extend_to is not None:
        words += ["--trials", str(extend_to)]
    for flag, value in (("--tracking-uri", opts.tracking_uri and optuna_store.redact(opts.tracking_uri)),
                        ("--experiment", None if opts.experiment == DEFAULT_EXPERIMENT else opts.experiment),
                        ("--storage-path", opts.storage_path),
                        ("--optuna-storage", opts.optuna_storage and optuna_store.redact(opts.optuna_storage)),
                        ("--address", opts.address)):
        if value:
            words += [flag, value]
    return " ".join(shlex.quote(w) for w in words)


def _write_reports(client: Any, parent: str, trials_df: pd.DataFrame, space: Any, base: Any,
                   data: Any, best: Any, tracking_uri: str, objectives: list[str] | None,
                   optuna_study: Any, spec: TaskSpec | None = None) -> None:
    """The study report (report/: Optuna's plots of the study, our heatmap and edge report,
    with latency as an objective the primary-vs-latency front per runtime, plots.json saying
    which plot was skipped and why), the seed project's outputs (report/seed/) and the
    resolved config, as artifacts of the parent run. `objectives`: a multi-objective study's
    metrics, its primary first (None: one objective)."""
    from tuning.report import write_latency_front, write_optuna_plots, write_study_report
    from tuning.seed_report import write_seed_report

    spec = spec or study_spec(base)
    searched = [f"params.{k}" for k in space.keys()]
    plotted = trials_df[[c for c in trials_df.columns if not c.startswith("params.") or c in searched]]
    tsne = None
    if best is not None:
        try:
            tsne = _best_model_tsne(best.run["run_id"], data, tracking_uri)
        except Exception as exc:  # noqa: BLE001 (a picture must not fail a finished study)
            warnings.warn(f"t-SNE of the best model skipped: {type(exc).__name__}: {exc}",
                          stacklevel=1)
    with tempfile.TemporaryDirectory() as tmp:
        write_study_report(plotted, tmp, spec.primary, _searched_ranges(space), spec.mode)
        plots: dict[str, str] = {}
        if optuna_study is not None:  # None: a study from before the Optuna storage
            plots = write_optuna_plots(optuna_study, tmp, spec.primary, objectives)
        if objectives and M.LATENCY_P50_MS in objectives:
            plots.update(write_latency_front(trials_df, tmp, spec.primary, spec.mode))
        if plots:
            (Path(tmp) / "plots.json").write_text(json.dumps(plots, indent=2))
        write_seed_report(trials_df, space.keys(), Path(tmp) / "seed", tsne, spec.name)
        client.log_artifacts(parent, tmp, "report")
        (Path(tmp) / "base_config.yaml").write_text(yaml.safe_dump(base.to_dict(), sort_keys=False))
        client.log_artifact(parent, str(Path(tmp) / "base_config.yaml"))


def _best_model_tsne(run_id: str, data: Any, tracking_uri: str) -> Any:
    """t-SNE of the best model's test embeddings and prototypes, from its logged weights (the
    safetensors file, no pickle) and the study's cached embeddings; None when the encoder was
    fine-tuned (no cached embeddings to project)."""
    import torch
    from mlflow.tracking import MlflowClient

    from hpn.model import HPNClassifier
    from tuning.pyfunc import download_hpn
    from tuning.seed_report import tsne_data

    if data.features is None or data.corpus.labels is None:
        return None  # no cached embeddings, or no classes to colour them by (regression)
    with tempfile.TemporaryDirectory() as tmp, tracking.no_download_bar():
        client = MlflowClient(tracking_uri, tracking_uri)
        head = HPNClassifier.load(download_hpn(client, run_id, tmp)).head
    test = data.split.test
    with torch.no_grad():
        z = head.embed(torch.from_numpy(data.features[test])).numpy()  # (n_test, d)
        protos = torch.nn.functional.normalize(head.prototypes.float(), dim=-1).numpy()
    return tsne_data(z, data.corpus.labels[test], protos, head.groups.numpy(),
                     data.corpus.label_names)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
