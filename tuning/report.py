"""The study report: trials.csv, edge_report.json and PNG plots.

Where Optuna draws a plot (history, importances, parallel coordinates, contour, slice, Pareto
front), `write_optuna_plots` uses `optuna.visualization.matplotlib` on the study's own Optuna
study (tuning/optuna_store.py), so the plots match what optuna-dashboard shows. Ours are only
what Optuna has no plot for: the prototype dimension x count heatmap (the seed project's
view) and edge_report.json, which answers the tuning playbook's question: do the best trials
crowd the edge of a searched range? If they do, the range was wrong and the study should be
widened. The objective is the task's primary metric (`hpn.tasks.task_spec`) in its direction:
`mode` "max" (accuracy, F1) or "min" (an error such as val_mae), so "best" and every colour scale
follow it; a trial counts when it completed with a finite objective.
Our figures are built with `Figure`, never pyplot: no backend is chosen, no window can open.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from hpn.metrics import LATENCY_P50_MS, NUM_PROTOTYPES, VAL_ACCURACY
from tuning.objectives import Objectives

PARAM_PREFIX = "params."
BEST_FRACTION = 0.2  # "the best trials" = top 20% by objective (at least one)
EDGE_FRACTION = 0.1  # outer 10% of a range counts as its edge
CROWD_FRACTION = 0.5  # more than half of the best trials at one edge = crowding
LOG_SPAN = 10.0  # ranges wider than 10x are judged in log space
MAX_BINS = 8


class HeatmapData(NamedTuple):
    dims: list[float]
    counts: list[float]
    mean: np.ndarray  # (len(dims), len(counts)), NaN where no trial fell


def _finite(trials: pd.DataFrame, objective: str, states=("completed",)) -> pd.DataFrame:
    if objective not in trials.columns or "state" not in trials.columns:
        return trials.iloc[0:0]
    obj = pd.to_numeric(trials[objective], errors="coerce")
    keep = trials["state"].isin(states) & np.isfinite(obj.astype(float))
    out = trials[keep].copy()
    out[objective] = obj[keep].astype(float)
    return out.sort_values("order", kind="stable") if "order" in out.columns else out


def _is_numeric(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)


def _check_mode(mode: str) -> None:
    if mode not in ("max", "min"):
        raise ValueError(f"mode: expected 'max' or 'min', got {mode!r}")


def test_counterpart(objective: str) -> str:
    """The test metric reported beside a validation objective: val_mae -> test_mae."""
    return "test_" + objective[len("val_"):] if objective.startswith("val_") else objective


def direction_words(mode: str) -> str:
    """How a reader should read a metric's axis or colour: said only for an error metric
    (the unmarked reading of a score is higher-is-better)."""
    return " (lower is better)" if mode == "min" else ""


def _unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Position of values in [low, high] as a fraction, in log space for wide positive ranges."""
    if high <= low:
        return np.full(values.shape, 0.5)
    if low > 0 and high / low > LOG_SPAN:
        values, low, high = np.log(np.maximum(values, low)), math.log(low), math.log(high)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


class BestConfig(NamedTuple):
    run: pd.Series  # the run to register: the best on `objective` within the best config
    objective_mean: float  # over the config's completed repeats: what the sampler was told
    test_mean: float  # reported beside it, never used to choose
    repeats: int


def best_config(trials: pd.DataFrame, objective: str = VAL_ACCURACY, mode: str = "max",
                test_metric: str | None = None, tie_break: Sequence[str] = ()
                ) -> BestConfig | None:
    """The config with the best mean objective over its repeats (`config_group`), or the best
    trial when a study has no repeats; chosen on validation, never on test. Best is the
    highest with `mode` "max" and the lowest with "min" (an error: val_mae). `test_metric`
    (default: the objective's test counterpart) is only averaged to be reported. A config
    with a failed or stopped repeat is passed over while any config has all its repeats
    complete: its mean would rest on fewer, luckier runs. `tie_break`: metrics, lower wins,
    in order, that decide between configs equal on the objective (a multi-objective study's
    costs: of two trials at the same accuracy, the faster one; without it the first wins)."""
    _check_mode(mode)
    test_metric = test_metric or test_counterpart(objective)
    done = _finite(trials, objective)
    if done.empty:
        return None
    key = next(k for k in ("config_group", "run_id", "trial_id") if k in done.columns)
    failed = trials["state"].isin(("error", "pruned"))
    incomplete = set(trials.loc[failed, key]) if key in trials.columns else set()
    if not done[key].isin(incomplete).all():
        done = done[~done[key].isin(incomplete)]
    means = done.groupby(key, sort=False)[objective].mean()
    best = means.idxmax() if mode == "max" else means.idxmin()
    tied = means.index[means == means[best]]
    if len(tied) > 1 and tie_break:
        tied_rows = done[done[key].isin(tied)]
        costs = pd.DataFrame({
            m: pd.to_numeric(tied_rows[m], errors="coerce") if m in tied_rows.columns
            else math.nan for m in tie_break}, index=tied_rows.index)
        costs = costs.groupby(tied_rows[key], sort=False).mean()
        best = costs.fillna(math.inf).sort_values(list(tie_break), kind="stable").index[0]
    cell = done[done[key] == best]
    test = (pd.to_numeric(cell[test_metric], errors="coerce").astype(float).mean()
            if test_metric in cell.columns else math.nan)
    run = cell[objective].idxmax() if mode == "max" else cell[objective].idxmin()
    return BestConfig(cell.loc[run], float(means[best]), float(test), len(cell))


def _bins(values: np.ndarray) -> tuple[list[float], np.ndarray]:
    """Few distinct values keep their own rows; many share log-spaced bins (geometric centres)."""
    uniq = np.unique(values)
    if len(uniq) <= MAX_BINS:
        return uniq.tolist(), np.searchsorted(uniq, values)
    lo, hi = uniq[0], uniq[-1]
    edges = np.geomspace(lo, hi, MAX_BINS + 1) if lo > 0 else np.linspace(lo, hi, MAX_BINS + 1)
    centres = np.sqrt(edges[:-1] * edges[1:]) if lo > 0 else (edges[:-1] + edges[1:]) / 2
    return centres.tolist(), np.clip(np.digitize(values, edges[1:-1]), 0, MAX_BINS - 1)


def heatmap_data(trials: pd.DataFrame, objective: str = VAL_ACCURACY) -> HeatmapData:
    empty = HeatmapData([], [], np.empty((0, 0)))
    if objective not in trials.columns:  # e.g. the seed's test_accuracy in a regression study
        return empty
    done = _finite(trials, objective)
    dim_col, ppc_col = PARAM_PREFIX + "model.prototype_dim", PARAM_PREFIX + "model.prototypes_per_class"
    if dim_col not in done.columns:
        return empty
    if NUM_PROTOTYPES in done.columns:  # what the trial really had, however it was configured
        count = done[NUM_PROTOTYPES].astype(float)
    elif ppc_col in done.columns or "num_classes" in done.columns:
        ones = pd.Series(1.0, index=done.index)
        count = done.get(ppc_col, ones).astype(float) * done.get("num_classes", ones).astype(float)
    else:
        return empty
    frame = pd.DataFrame({"dim": done[dim_col].astype(float), "count": count,
                          "y": done[objective]}).dropna()
    if frame.empty:
        return empty
    dims, di = _bins(frame["dim"].to_numpy())
    counts, ci = _bins(frame["count"].to_numpy())
    total = np.zeros((len(dims), len(counts)))
    n = np.zeros_like(total)
    np.add.at(total, (di, ci), frame["y"].to_numpy())
    np.add.at(n, (di, ci), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return HeatmapData(dims, counts, np.where(n > 0, total / n, np.nan))


def edge_data(trials: pd.DataFrame, objective: str,
              space_ranges: dict[str, tuple[float, float]] | None,
              mode: str = "max") -> dict[str, dict]:
    """Per searched range: do the best trials (top BEST_FRACTION in the objective's
    direction) crowd one of its edges?"""
    _check_mode(mode)
    done = _finite(trials, objective)
    k = max(1, math.ceil(BEST_FRACTION * len(done)))
    if not len(done):
        best = done
    else:
        best = done.nlargest(k, objective) if mode == "max" else done.nsmallest(k, objective)
    report = {}
    for key, (low, high) in (space_ranges or {}).items():
        name = key.removeprefix(PARAM_PREFIX)
        col = best.get(PARAM_PREFIX + name)
        if col is None or not _is_numeric(col):
            continue
        pos = _unit(col.dropna().astype(float).to_numpy(), float(low), float(high))
        at_low = float(np.mean(pos <= EDGE_FRACTION)) if len(pos) else 0.0
        at_high = float(np.mean(pos >= 1 - EDGE_FRACTION)) if len(pos) else 0.0
        crowds = "low" if at_low > CROWD_FRACTION else "high" if at_high > CROWD_FRACTION else None
        report[name] = {"low": float(low), "high": float(high), "crowds": crowds, "n_best": len(pos),
                        "best_at_low": at_low, "best_at_high": at_high}
    return report


def draw_heatmap(d: HeatmapData, objective: str, mode: str = "max") -> Figure:
    """Mean objective per (dimension, count) cell. The bright end of the colour scale is
    always the better one: reversed for an error metric (`mode` "min"), whose title says so."""
    _check_mode(mode)
    fig = Figure(figsize=(1.5 + 0.8 * len(d.counts), 1.5 + 0.5 * len(d.dims)))
    ax = fig.add_subplot()
    image = ax.imshow(d.mean, origin="lower", aspect="auto",
                      cmap="viridis" if mode == "max" else "viridis_r")
    ax.set_xticks(range(len(d.counts)), [f"{c:g}" for c in d.counts])
    ax.set_yticks(range(len(d.dims)), [f"{v:.0f}" for v in d.dims])
    ax.set(xlabel="prototype count", ylabel="prototype_dim",
           title=f"Mean {objective}{direction_words(mode)}")
    for (i, j), value in np.ndenumerate(d.mean):  # annotated, as the seed project's heatmap
        if np.isfinite(value):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax, label=objective)
    fig.tight_layout()
    return fig


def heatmap_file(objective: str) -> str:
    """accuracy_heatmap.png for val_accuracy (the name studies have always written), else
    named after the metric it shows (val_mae_heatmap.png): an MAE map is no accuracy map."""
    return "accuracy_heatmap.png" if objective == VAL_ACCURACY else f"{objective}_heatmap.png"


def write_study_report(trials: pd.DataFrame, out_dir: str | Path, objective: str = VAL_ACCURACY,
                       space_ranges: dict[str, tuple[float, float]] | None = None,
                       mode: str = "max") -> list[Path]:
    """trials.csv, edge_report.json and the heatmap (when the study varied dimension and
    count) into out_dir, judged by `objective` in its direction `mode`; returns the files
    written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = trials.sort_values("order", kind="stable") if "order" in trials.columns else trials
    ordered.to_csv(out / "trials.csv", index=False)
    (out / "edge_report.json").write_text(
        json.dumps(edge_data(trials, objective, space_ranges, mode), indent=2))
    written = [out / "trials.csv", out / "edge_report.json"]
    if (m := heatmap_data(trials, objective)).dims:
        heatmap = out / heatmap_file(objective)
        draw_heatmap(m, objective, mode).savefig(heatmap, dpi=110, bbox_inches="tight")
        written.append(heatmap)
    return written


#: file -> Optuna's matplotlib plot; each gets `target`/`target_name` on a multi-objective study.
OPTUNA_PLOTS = {
    "optimization_history.png": "plot_optimization_history",
    "param_importances.png": "plot_param_importances",
    "parallel_coordinates.png": "plot_parallel_coordinate",
    "contour.png": "plot_contour",
    "slice.png": "plot_slice",
}


def write_optuna_plots(study: Any, out_dir: str | Path, objective: str = VAL_ACCURACY,
                       objectives: list[str] | None = None) -> dict[str, str]:
    """Optuna's own plots of the study into out_dir (with the per-epoch intermediate values,
    which show pruned trials; the history shows completed ones only). Returns {file:
    written | why skipped}:
    a plot Optuna cannot draw for this study (too few trials, one parameter, nothing that
    varied) is skipped with Optuna's reason, never failing the study. With several
    `objectives` (multi-objective: the metric names in the study's order, the primary
    first) the plots show the first and a Pareto front, its axes named by them, is added.
    The direction comes from the Optuna study itself (created "minimize" for an error
    metric), so the history's best-value line and the contour colours follow it; the
    objective's name labels the axes."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # Optuna draws with pyplot: never open a window
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm
    from optuna.exceptions import ExperimentalWarning

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    multi = bool(objectives) and len(objectives) > 1
    calls: dict[str, Any] = {}
    for name, plot in OPTUNA_PLOTS.items():
        kwargs: dict[str, Any] = {"target_name": objective}
        if multi:
            kwargs["target"] = lambda t: t.values[0]
        calls[name] = (getattr(ovm, plot), kwargs)
    if multi:
        # Optuna draws a front of 2 or 3 objectives: with more, the first three (the task's
        # primary and the first two --objectives), named so the axes say which.
        shown = list(objectives)[:3]
        front: dict[str, Any] = {"target_names": shown}
        if len(objectives) > 3:
            front["targets"] = lambda t: t.values[:3]
        calls["pareto_front.png"] = (ovm.plot_pareto_front, front)
    else:  # the per-epoch objective of every trial: where ASHA stopped the pruned ones
        calls["intermediate_values.png"] = (ovm.plot_intermediate_values, {})
    done: dict[str, str] = {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials": said below
    try:
        _draw_optuna_plots(study, calls, out, done, plt, ExperimentalWarning,
                           {"intermediate_values.png": f"{objective} per epoch"})
    finally:
        optuna.logging.set_verbosity(verbosity)
    return done


def _draw_optuna_plots(study: Any, calls: dict[str, Any], out: Path, done: dict[str, str],
                       plt: Any, experimental: type[Warning],
                       y_labels: dict[str, str] | None = None) -> None:
    """Draw each plot; `y_labels` names the y axis of plots Optuna labels generically
    (the intermediate values are the objective per epoch, not an anonymous value)."""
    import warnings

    for name, (plot, kwargs) in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", experimental)  # Optuna's matplotlib backend
            warnings.simplefilter("ignore", UserWarning)  # matplotlib on a one-point axis
            try:
                ax = plot(study, **kwargs)
            except Exception as exc:  # noqa: BLE001 (Optuna raises ValueError/RuntimeError)
                done[name] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                plt.close("all")
                continue
        axes = ax.flat if hasattr(ax, "flat") else [ax]
        if name in (y_labels or {}) and not hasattr(ax, "flat"):
            ax.set_ylabel(y_labels[name])
        figure = next(iter(axes)).figure
        if not any(a.has_data() for a in figure.axes):
            done[name] = "skipped: nothing to plot"
        else:
            figure.savefig(out / name, dpi=110, bbox_inches="tight")
            done[name] = "written"
        plt.close(figure)


# -- accuracy against latency, per encoder runtime -----------------------------------------
LATENCY_FRONT_FILE = "latency_front_by_runtime.png"
RUNTIME_PARAM = PARAM_PREFIX + "encoder.runtime"
#: one colour and marker per runtime (the same in every study's plot); others cycle after
RUNTIME_STYLES = {"torch": ("tab:blue", "o"), "onnx": ("tab:orange", "s"),
                  "onnx-int8": ("tab:green", "^")}
_MORE_STYLES = [("tab:purple", "D"), ("tab:brown", "v"), ("tab:pink", "P")]


class LatencyFrontData(NamedTuple):
    """Completed trials as (latency, objective) points, by the runtime they served on."""

    objective: str
    mode: str
    latency: np.ndarray  # (n,) latency_p50_ms
    value: np.ndarray  # (n,) the task's primary
    runtime: list[str]  # (n,) encoder.runtime of each trial
    run_name: list[str]  # (n,) <study>-t007
    pareto: np.ndarray  # (n,) bool: no other trial is at least as good on both and better on one
    runtime_pareto: np.ndarray  # (n,) bool: the same, among the trials of its own runtime


def pareto_front(values: np.ndarray, modes: list[str] | tuple[str, ...]) -> np.ndarray:
    """(n,) True where no other point is at least as good on every objective (column j in
    `modes[j]`, "max" or "min") and strictly better on one: the front of any number of
    objectives, one implementation for the plot and `hpn-tune show`. Equal points are all on
    it (neither beats the other). A point missing a value (NaN, inf) can be neither compared
    nor ranked: it is not on the front and puts no other point off it."""
    for mode in modes:
        _check_mode(mode)
    points = np.asarray(values, dtype=float)  # (n, k)
    if points.ndim != 2 or points.shape[1] != len(modes):
        raise ValueError(f"values: expected (n, {len(modes)}) for {len(modes)} modes, "
                         f"got shape {points.shape}")
    sign = np.array([1.0 if mode == "max" else -1.0 for mode in modes])
    better_up = points * sign  # every column higher is better
    finite = np.isfinite(points).all(axis=1)
    keep = finite.copy()
    rivals = better_up[finite]
    for i in np.flatnonzero(finite):
        no_worse = (rivals >= better_up[i]).all(axis=1)
        strictly = (rivals > better_up[i]).any(axis=1)
        keep[i] = not np.any(no_worse & strictly)
    return keep


def pareto_flags(frame: pd.DataFrame, objectives: Objectives) -> pd.Series:
    """Per trial, whether it is on the study's Pareto front (`pareto_front` over
    `objectives`): among the completed trials, no other is as good on every objective and
    better on one. A trial that did not complete, or lacks an objective's value, is neither
    on the front nor keeps another off it. One implementation for the study summary and
    `hpn-tune show`."""
    if frame.empty:  # no trial yet: no columns either
        return pd.Series(False, index=frame.index, dtype=bool)
    values = (frame.reindex(columns=list(objectives.metrics))  # a metric no trial logged: NaN
              .apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float, copy=True))
    values[~frame["state"].eq("completed").to_numpy()] = math.nan
    return pd.Series(pareto_front(values, objectives.modes), index=frame.index)


def pareto_mask(value: np.ndarray, latency: np.ndarray, mode: str = "max") -> np.ndarray:
    """(n,) True where no other point is at least as good in both (value in `mode`, latency
    lower) and strictly better in one: the 2-D Pareto front this plot draws."""
    return pareto_front(np.column_stack([np.asarray(value, dtype=float),
                                         np.asarray(latency, dtype=float)]), (mode, "min"))


def latency_front_data(trials: pd.DataFrame, objective: str, mode: str = "max",
                       latency: str = LATENCY_P50_MS) -> LatencyFrontData:
    """The plot's points: completed trials with a finite objective and latency. A study that
    did not search the runtime has every trial on its config's runtime (its param)."""
    _check_mode(mode)
    done = _finite(trials, objective)
    if latency in done.columns:
        lat = pd.to_numeric(done[latency], errors="coerce").astype(float)
        done = done[np.isfinite(lat)].assign(**{latency: lat[np.isfinite(lat)]})
    else:
        done = done.iloc[0:0]
    runtimes = (done[RUNTIME_PARAM].astype(str).tolist() if RUNTIME_PARAM in done.columns
                else ["torch"] * len(done))
    names = (done["run_name"].astype(str).tolist() if "run_name" in done.columns
             else [str(i) for i in range(len(done))])
    value = done[objective].to_numpy(dtype=float) if len(done) else np.empty(0)
    lat_v = done[latency].to_numpy(dtype=float) if len(done) else np.empty(0)
    own = np.zeros(len(done), dtype=bool)
    for rt in set(runtimes):
        idx = np.flatnonzero(np.array(runtimes) == rt)
        own[idx] = pareto_mask(value[idx], lat_v[idx], mode)
    return LatencyFrontData(objective, mode, lat_v, value, runtimes, names,
                            pareto_mask(value, lat_v, mode), own)


def _runtime_style(runtime: str, order: list[str]) -> tuple[str, str]:
    if runtime in RUNTIME_STYLES:
        return RUNTIME_STYLES[runtime]
    others = [r for r in order if r not in RUNTIME_STYLES]
    return _MORE_STYLES[others.index(runtime) % len(_MORE_STYLES)]


def draw_latency_front(d: LatencyFrontData) -> Figure:
    """The objective against one-text latency: each runtime its colour and marker, a dashed
    line through each runtime's own front (what that runtime can reach), and the study's
    Pareto-optimal trials ringed in black (the trade-offs worth choosing from)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    order = sorted(set(d.runtime), key=lambda r: (list(RUNTIME_STYLES).index(r)
                                                   if r in RUNTIME_STYLES else 99, r))
    runtimes = np.array(d.runtime)
    for rt in order:
        colour, marker = _runtime_style(rt, order)
        mine = runtimes == rt
        ax.scatter(d.latency[mine], d.value[mine], c=colour, marker=marker, s=36, alpha=0.8,
                   label=f"{rt} ({int(mine.sum())})")
        front = np.flatnonzero(mine & d.runtime_pareto)
        front = front[np.argsort(d.latency[front])]
        if len(front) > 1:
            ax.step(d.latency[front], d.value[front], where="post", color=colour,
                    linestyle="--", linewidth=1, alpha=0.7)
    if d.pareto.any():
        ax.scatter(d.latency[d.pareto], d.value[d.pareto], s=140, facecolors="none",
                   edgecolors="black", linewidths=1.2, label="Pareto-optimal")
    ax.set(xlabel="latency_p50_ms: one text, raw text -> prediction, CPU (lower is better)",
           ylabel=f"{d.objective}{direction_words(d.mode)}",
           title=f"{d.objective} against latency, by encoder runtime")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="encoder.runtime (trials)", title_fontsize=8)
    fig.tight_layout()
    return fig


def write_latency_front(trials: pd.DataFrame, out_dir: str | Path, objective: str,
                        mode: str = "max") -> dict[str, str]:
    """LATENCY_FRONT_FILE into out_dir; {file: written | why skipped} for plots.json."""
    d = latency_front_data(trials, objective, mode)
    if not len(d.value):
        return {LATENCY_FRONT_FILE: "skipped: no completed trial with a latency measurement"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    draw_latency_front(d).savefig(out / LATENCY_FRONT_FILE, dpi=110, bbox_inches="tight")
    return {LATENCY_FRONT_FILE: "written"}
