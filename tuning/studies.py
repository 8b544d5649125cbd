"""Study-level views of the MLflow tracking store: list the studies, show one, compare some.

Read-only: nothing here creates a run, an experiment or a database file, so pointing
`hpn-tune studies` at the wrong store says so instead of leaving an empty one behind. Each
function returns plain dicts (JSON-ready: NaN becomes None) that `hpn-tune studies | show |
compare` print; the comparison plot is data (`CompareData`) apart from its drawing.

Each study is read by its own task (its run's `hpn.task` tag; none: classification): its
primary metric and direction rank its trials and name its best, and studies of different
tasks are not compared on one axis. A multi-objective study (nsga2) is also shown by its other
objectives' metrics, with its Pareto front over all of them marked.
"""
from __future__ import annotations

import contextlib
import math
import shlex
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from hpn import metrics as M
from hpn.errors import HPNInputError
from hpn.tasks import TaskSpec, task_spec
from tuning import tracking
from tuning.objectives import DEFAULT_OBJECTIVES, MULTI_OBJECTIVE, Objectives, objectives_for
from tuning.report import best_config, pareto_flags
from tuning.tracking import trials_frame

#: The parent run's MLflow status in words: a study stopped by Ctrl-C or a killed driver is
#: KILLED in MLflow, which users know as interrupted (and can resume).
STATE_WORDS = {"RUNNING": "running", "SCHEDULED": "running", "FINISHED": "finished",
               "KILLED": "interrupted", "FAILED": "failed"}
#: Trial order in `show`: the ones that count first, then those that say what went wrong.
TRIAL_ORDER = {"completed": 0, "pruned": 1, "error": 2, "running": 3}
TRIAL_METRICS = (M.VAL_ACCURACY, M.TEST_ACCURACY, M.RUNTIME_S)


def study_spec(run: Any) -> TaskSpec:
    """The task a study's run records (`tuning.tracking.run_task`; none: classification)."""
    return task_spec(tracking.run_task(run))


def study_objectives(run: Any, spec: TaskSpec) -> Objectives | None:
    """A multi-objective study's objectives from its run's tags (None: one objective), as
    the study ran them (`tuning.objectives.objectives_for`): a study from before --objectives
    optimised memory, which is VRAM when its trials had a GPU."""
    tags = run.data.tags
    if tags.get(tracking.SAMPLER_TAG) not in MULTI_OBJECTIVE:
        return None
    names = tags.get(tracking.OBJECTIVES_TAG, ",".join(DEFAULT_OBJECTIVES)).split(",")
    return objectives_for(spec, names, float(tags.get(tracking.GPUS_PER_TRIAL_TAG) or 0))


def trial_metrics(spec: TaskSpec, objectives: Objectives | None = None) -> tuple[str, ...]:
    """The metrics `show` lists per trial: the primary and its test counterpart, each other
    gate's metric and its test counterpart (joint: val_mae, test_mae), a multi-objective
    study's other objectives (latency_p50_ms, ...), then the runtime. Classification:
    TRIAL_METRICS."""
    extra = objectives.metrics[1:] if objectives else []
    return tuple(dict.fromkeys((*spec.headline(), *extra, M.RUNTIME_S)))


def _best_fields(spec: TaskSpec, best: Any) -> dict[str, Any]:
    """A study's best, by name for every task (best_metric/best_value, best_test_metric/
    best_test_value), and as best_val_accuracy / best_test_accuracy where the primary is
    accuracy (classification; None for the others)."""
    value = _num(best.objective_mean) if best is not None else None
    test = _num(best.test_mean) if best is not None else None
    accuracy = spec.primary == M.VAL_ACCURACY
    return {"best_val_accuracy": value if accuracy else None,
            "best_test_accuracy": test if accuracy else None,
            "best_metric": spec.primary, "best_mode": spec.mode, "best_value": value,
            "best_test_metric": spec.test_primary, "best_test_value": test}


@dataclass(frozen=True)
class Store:
    """One experiment of one tracking store, opened once per command."""

    client: MlflowClient
    tracking_uri: str
    experiment: str
    experiment_id: str
    given_uri: str | None  # what the user typed, repeated in the commands we print


def open_store(tracking_uri: str | None, experiment: str) -> Store:
    """The experiment to read, or one line naming the flag to fix. A missing SQLite file is
    refused before MLflow would create an empty database there."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    local = (Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else
             Path(uri) if "://" not in uri else None)
    if local is not None and not local.exists():
        raise HPNInputError(f"--tracking-uri: no MLflow store at {local}; run a study first "
                            "or pass the --tracking-uri your studies used")
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        known = sorted(e.name for e in client.search_experiments())
        raise HPNInputError(f"--experiment: no experiment {experiment!r} in {uri}; "
                            f"known: {', '.join(known) or 'none'}")
    return Store(client, uri, experiment, exp.experiment_id, tracking_uri)


def _study_runs(store: Store) -> list[Any]:
    """Parent runs, newest first."""
    return store.client.search_runs(
        [store.experiment_id], f"tags.`{tracking.ROLE_TAG}` = 'study'",
        max_results=50_000, order_by=["attributes.start_time DESC"])


def _study_run(store: Store, name: str) -> Any:
    run_id = tracking.find_study_run(store.client, store.experiment_id, name)
    if run_id is None:
        known = [r.data.tags.get(tracking.STUDY_TAG, r.info.run_name) for r in _study_runs(store)]
        raise HPNInputError(f"study {name!r}: not in experiment {store.experiment!r}; known "
                            f"studies: {', '.join(known) or 'none'}")
    return store.client.get_run(run_id)


def _num(value: Any) -> float | None:
    """A JSON-safe number: NaN and missing become None."""
    if value is None or isinstance(value, str):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _column(frame: pd.DataFrame, metric: str) -> pd.Series:
    """A metric as floats, all NaN when no trial logged it (every trial failed early)."""
    if metric not in frame.columns:
        return pd.Series(math.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame[metric], errors="coerce").astype(float)


def _started(ms: int | None) -> str | None:
    """Local time, with its offset in JSON so a script elsewhere reads the same instant."""
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")


def _study_header(run: Any) -> dict[str, Any]:
    """What the parent run records about a study (its tags and summary metrics)."""
    tags, metrics = run.data.tags, run.data.metrics
    target = tags.get(tracking.TRIALS_TAG)
    return {
        "study": tags.get(tracking.STUDY_TAG, run.info.run_name),
        "run_id": run.info.run_id,
        "state": STATE_WORDS.get(run.info.status, run.info.status.lower()),
        "sampler": tags.get(tracking.SAMPLER_TAG),
        "scheduler": tags.get(tracking.SCHEDULER_TAG),
        "seed": int(tags[tracking.SEED_TAG]) if tracking.SEED_TAG in tags else None,
        "repeats": int(tags.get(tracking.REPEATS_TAG, 1)),
        "space_file": tags.get(tracking.SPACE_FILE_TAG),
        "trials_target": int(target) if target else None,
        "task": study_spec(run).name,
        "started": _started(run.info.start_time),
        "wall_s": _num(metrics.get(tracking.WALL_METRIC)),
    }


def _state_counts(states: Any) -> dict[str, int]:
    counts = pd.Series(list(states), dtype=object).value_counts()
    return {f"trials_{word}": int(counts.get(state, 0))
            for word, state in (("completed", "completed"), ("pruned", "pruned"),
                                ("errored", "error"))}


def list_studies(store: Store) -> list[dict[str, Any]]:
    """One row per study, newest first: state, trial counts, target, best val (its task's
    primary metric, best in its direction), wall time."""
    rows = []
    for run in _study_runs(store):
        spec = study_spec(run)
        trials = tracking.trial_runs(store.client, store.experiment_id, run.info.run_id)
        states = [t.data.tags.get(tracking.STATE_TAG, "running") for t in trials]
        best = run.data.metrics.get(f"best_{spec.primary}")
        if best is None:  # an interrupted study has no summary yet: its trials do
            done = [t.data.metrics[spec.primary] for t, s in zip(trials, states)
                    if s == "completed" and spec.primary in t.data.metrics]
            best = (max if spec.mode == "max" else min)(done, default=None)
        accuracy = spec.primary == M.VAL_ACCURACY
        rows.append({**_study_header(run), **_state_counts(states),
                     "best_val_accuracy": _num(best) if accuracy else None,
                     "best_metric": spec.primary, "best_mode": spec.mode,
                     "best_value": _num(best)})
    return rows


def _frame(store: Store, parent_run_id: str) -> pd.DataFrame:
    """The study's trials without the `lost` ones (a replacement trial counts instead)."""
    frame = trials_frame(store.client, store.experiment_id, parent_run_id)
    return frame if frame.empty else frame[frame["state"] != "lost"].reset_index(drop=True)


def searched_keys(store: Store, run: Any, frame: pd.DataFrame) -> tuple[list[str], str]:
    """The keys the study searched, and where they came from: its space file, else the copy
    logged with the study (the file moved), else the params that vary across its trials."""
    from hpn.config import known_keys
    from tuning.spaces import load_space

    path = run.data.tags.get(tracking.SPACE_FILE_TAG)
    if path and Path(path).is_file():
        try:
            return load_space(path).keys(), "space file"
        except HPNInputError:
            pass  # edited since into something else: the logged copy is what ran
    # No artifact, or unreadable: fall back to the trials.
    with contextlib.suppress(Exception), tempfile.TemporaryDirectory() as tmp, \
            tracking.no_download_bar():
        logged = Path(store.client.download_artifacts(run.info.run_id, "space", tmp))
        files = sorted(logged.glob("*.y*ml"))
        if files:
            return load_space(files[0]).keys(), "logged space"
    # Config keys only (a trial also logs its trial_id), and not the ones --repeats varies
    # inside one config (train.seed): those the sampler did not choose.
    config_keys = set(known_keys())
    cols = [c for c in frame.columns if c.startswith("params.") and c[len("params."):] in config_keys]
    varying = [c[len("params."):] for c in cols if frame[c].nunique(dropna=False) > 1
               and frame.groupby("config_group")[c].nunique(dropna=False).max() == 1]
    return varying, "varying params"


def _promote_command(store: Store, run_id: str) -> str:
    words = ["hpn-tune", "promote", "--run-id", run_id]
    if store.given_uri:
        words += ["--tracking-uri", store.given_uri]
    return " ".join(shlex.quote(w) for w in words)


def show_study(store: Store, name: str, limit: int | None = None) -> dict[str, Any]:
    """A study's header, its trials best first (completed, then pruned, then errored; by
    its task's primary metric in its direction), where its report is and the command that
    promotes its best trial. A multi-objective study's trials also carry its other
    objectives' metrics and whether each is on its Pareto front: the primary alone does not
    say which trade-offs the study found."""
    run = _study_run(store, name)
    spec = study_spec(run)
    objectives = study_objectives(run, spec)
    metrics = trial_metrics(spec, objectives)
    frame = _frame(store, run.info.run_id)
    keys, keys_from = searched_keys(store, run, frame)
    header = {**_study_header(run), **_state_counts(frame.get("state", [])),
              "searched": keys, "searched_from": keys_from, "trial_metrics": list(metrics)}
    trials: list[dict[str, Any]] = []
    costs = objectives.metrics[1:] if objectives else []  # break ties on the primary
    best = (best_config(frame, spec.primary, spec.mode, spec.test_primary, tie_break=costs)
            if not frame.empty else None)
    if not frame.empty:
        ranked = frame.assign(_rank=frame["state"].map(TRIAL_ORDER).fillna(len(TRIAL_ORDER)),
                              _val=_column(frame, spec.primary),
                              _pareto=pareto_flags(frame, objectives) if objectives else False,
                              **{f"_cost{i}": _column(frame, m) for i, m in enumerate(costs)})
        by = ["_rank", "_val", *(f"_cost{i}" for i in range(len(costs))), "order"]
        ascending = [True, spec.mode == "min", *[True] * len(costs), True]
        ranked = ranked.sort_values(by, ascending=ascending, na_position="last", kind="stable")
        for _, row in ranked.iterrows():
            trials.append({
                "run_name": row["run_name"], "run_id": row["run_id"],
                "state": row["state"],
                **({"pareto": bool(row["_pareto"])} if objectives else {}),
                **{m: _num(row.get(m)) for m in metrics},
                "params": {k: _plain(row.get(f"params.{k}")) for k in keys},
            })
    report = [f.path for f in store.client.list_artifacts(run.info.run_id, "report")]
    result = {
        **header,
        **(_front_fields(objectives, trials) if objectives else {}),
        "trials_total": len(trials),
        "trials": trials[:limit] if limit else trials,
        "best_run_id": best.run["run_id"] if best is not None else None,
        # with --repeats: means over the best config's repeats, as the sampler saw them
        **_best_fields(spec, best),
        "report_path": "report/" if report else None,
        "report_uri": f"{run.info.artifact_uri.rstrip('/')}/report" if report else None,
        "promote_command": _promote_command(store, best.run["run_id"]) if best is not None else None,
    }
    return result


def _front_fields(objectives: Objectives, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """A multi-objective study's objectives and how many trials are on its front (of all its
    trials, not only those --limit lists); a one-objective study has none of these keys."""
    return {"objectives": objectives.metrics, "objective_modes": objectives.modes,
            "trials_pareto": sum(t["pareto"] for t in trials)}


class CompareData(NamedTuple):
    """The primary metric (val_accuracy for classification) of each study's completed
    trials, in the order the studies were named; `mode` says which way is better."""

    studies: list[str]
    values: list[list[float]]
    metric: str = M.VAL_ACCURACY
    mode: str = "max"


def compare_studies(store: Store, names: list[str]) -> tuple[list[dict[str, Any]], CompareData]:
    """Per study, side by side: completed trials, best and median of the task's primary
    metric, the best trial's test counterpart (shown, never used to choose), median runtime,
    wall time, sampler. Every name is checked before any study is read, so a typo costs
    nothing; studies of different tasks are refused (no one metric ranks them)."""
    names = list(dict.fromkeys(names))
    runs = [_study_run(store, n) for n in names]
    specs = [study_spec(run) for run in runs]
    if len({spec.name for spec in specs}) > 1:
        shown = ", ".join(f"{n} ({spec.name})" for n, spec in zip(names, specs))
        raise HPNInputError(f"studies of different tasks cannot be compared on one metric: "
                            f"{shown}; compare studies of one task")
    spec = specs[0]
    accuracy = spec.primary == M.VAL_ACCURACY
    rows, values = [], []
    for name, run in zip(names, runs):
        frame = _frame(store, run.info.run_id)
        done = frame[frame["state"] == "completed"] if not frame.empty else frame
        val = _column(done, spec.primary).dropna()
        runtime = _column(done, M.RUNTIME_S).dropna()
        objectives = study_objectives(run, spec)
        best = (best_config(frame, spec.primary, spec.mode, spec.test_primary,
                            tie_break=objectives.metrics[1:] if objectives else ())
                if not frame.empty else None)
        header = _study_header(run)
        median = _num(val.median()) if len(val) else None
        rows.append({
            "study": name, "state": header["state"], "sampler": header["sampler"],
            "task": spec.name, "trials_completed": len(done),
            **_best_fields(spec, best),
            "median_val_accuracy": median if accuracy else None,
            "median_value": median,
            "best_run_id": best.run["run_id"] if best is not None else None,
            "median_runtime_s": _num(runtime.median()) if len(runtime) else None,
            "wall_s": header["wall_s"],
        })
        values.append([float(v) for v in val])
    return rows, CompareData(names, values, spec.primary, spec.mode)


def draw_compare(data: CompareData, path: str | Path) -> None:
    """Box plot of the studies' primary metric per study with each trial as a jittered dot
    on top; the axis names the metric and, for an error metric, that lower is better."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.6 * len(data.studies) + 2), 4.0))
    FigureCanvasAgg(fig)  # Agg, never pyplot: no window, no global backend choice
    ax = fig.add_subplot()
    positions = list(range(1, len(data.studies) + 1))
    drawn = [(p, v) for p, v in zip(positions, data.values) if v]
    if drawn:
        ax.boxplot([v for _, v in drawn], positions=[p for p, _ in drawn], widths=0.5,
                   showfliers=False)
    rng = np.random.default_rng(0)  # fixed jitter: the same data draws the same picture
    for pos, vals in zip(positions, data.values):
        ax.scatter(pos + rng.uniform(-0.12, 0.12, len(vals)), vals, s=18, alpha=0.7, zorder=3)
    ax.set_xticks(positions, data.studies)
    ax.set_xlim(0.4, len(positions) + 0.6)
    lower = "; lower is better" if data.mode == "min" else ""
    ax.set_ylabel(f"{data.metric} (completed trials{lower})")
    ax.set_title("Studies compared")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check_plot_path(path: str) -> None:
    """Refuse a plot path that cannot be written before any study is read."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    if not out.resolve().parent.is_dir():
        raise HPNInputError(f"--output: folder {str(out.parent)!r} does not exist")
    kinds = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in kinds:
        raise HPNInputError(f"--output: {path!r} needs one of the suffixes "
                            f"{', '.join('.' + k for k in sorted(kinds))}")
