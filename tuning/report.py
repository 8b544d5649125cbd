"""The study report: trials.csv, a handful of PNG plots and edge_report.json.

Each plot is two functions, as in Optuna: `*_data` computes a NamedTuple the tests check,
`_draw_*` draws it. The objective is maximised. A trial counts when it completed with a
finite objective; the history also shows pruned trials (their last reported value).
edge_report.json answers the tuning playbook's question: do the best trials crowd the edge
of a searched range? If they do, the range was wrong and the study should be widened.
Figures are built with `Figure`, never pyplot: no backend is chosen and no window can open.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib import cm, colors
from matplotlib.figure import Figure

from hpn.metrics import NUM_PROTOTYPES, TEST_ACCURACY, VAL_ACCURACY

PARAM_PREFIX = "params."
BEST_FRACTION = 0.2  # "the best trials" = top 20% by objective (at least one)
EDGE_FRACTION = 0.1  # outer 10% of a range counts as its edge
CROWD_FRACTION = 0.5  # more than half of the best trials at one edge = crowding
LOG_SPAN = 10.0  # ranges wider than 10x are judged in log space
MAX_BINS = 8


class HistoryData(NamedTuple):
    order: list[int]
    values: list[float]
    best_so_far: list[float]  # running best over completed trials (NaN before the first)
    pruned: list[bool]


class ImportanceData(NamedTuple):
    params: list[str]
    importances: list[float]  # sorted descending, sum to 1; both empty when undecidable


class ParallelData(NamedTuple):
    params: list[str]
    positions: np.ndarray  # (trials, params), each axis normalised to [0, 1]
    values: list[float]


class HeatmapData(NamedTuple):
    dims: list[float]
    counts: list[float]
    mean: np.ndarray  # (len(dims), len(counts)), NaN where no trial fell


class ParetoData(NamedTuple):
    values: list[float]
    memory: list[float]
    is_pareto: list[bool]
    trial_ids: list[str]


def _finite(trials: pd.DataFrame, objective: str, states=("completed",)) -> pd.DataFrame:
    if objective not in trials.columns or "state" not in trials.columns:
        return trials.iloc[0:0]
    obj = pd.to_numeric(trials[objective], errors="coerce")
    keep = trials["state"].isin(states) & np.isfinite(obj.astype(float))
    out = trials[keep].copy()
    out[objective] = obj[keep].astype(float)
    return out.sort_values("order", kind="stable") if "order" in out.columns else out


def _param_columns(trials: pd.DataFrame) -> list[str]:
    return [c for c in trials.columns if c.startswith(PARAM_PREFIX) and trials[c].notna().any()]


def _is_numeric(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)


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


def best_config(trials: pd.DataFrame, objective: str = VAL_ACCURACY) -> BestConfig | None:
    """The config with the best mean objective over its repeats (`config_group`), or the best
    trial when a study has no repeats; chosen on validation, never on test. A config with a
    failed or stopped repeat is passed over while any config has all its repeats complete:
    its mean would rest on fewer, luckier runs."""
    done = _finite(trials, objective)
    if done.empty:
        return None
    key = next(k for k in ("config_group", "run_id", "trial_id") if k in done.columns)
    failed = trials["state"].isin(("error", "pruned"))
    incomplete = set(trials.loc[failed, key]) if key in trials.columns else set()
    if not done[key].isin(incomplete).all():
        done = done[~done[key].isin(incomplete)]
    means = done.groupby(key, sort=False)[objective].mean()
    cell = done[done[key] == means.idxmax()]
    test = cell[TEST_ACCURACY].astype(float).mean() if TEST_ACCURACY in cell.columns else math.nan
    return BestConfig(cell.loc[cell[objective].idxmax()], float(means.max()), float(test),
                      len(cell))


def history_data(trials: pd.DataFrame, objective: str = VAL_ACCURACY) -> HistoryData:
    rows = _finite(trials, objective, states=("completed", "pruned"))
    if rows.empty:
        return HistoryData([], [], [], [])
    order = rows["order"].astype(int).tolist() if "order" in rows.columns else list(range(len(rows)))
    values = rows[objective].tolist()
    # Best over completed trials only, so the last point is the best trial's value.
    completed = rows[objective].where(rows["state"] == "completed")
    return HistoryData(order, values, completed.cummax().ffill().tolist(),
                       (rows["state"] == "pruned").tolist())


def importance_data(trials: pd.DataFrame, objective: str = VAL_ACCURACY) -> ImportanceData:
    from sklearn.ensemble import RandomForestRegressor

    done = _finite(trials, objective)
    params = _param_columns(done)
    if len(done) < 3 or len(params) < 2 or done[objective].nunique() < 2:
        return ImportanceData([], [])
    features = []
    for c in params:
        col = done[c]
        if _is_numeric(col):
            x = col.astype(float)
            # An absent conditional value becomes its own level below the observed range.
            features.append(x.fillna(x.min() - (x.max() - x.min()) - 1.0).to_numpy())
        else:
            features.append(pd.factorize(col.astype("object"))[0].astype(float))  # NaN -> -1
    forest = RandomForestRegressor(n_estimators=200, random_state=0, min_samples_leaf=1)
    forest.fit(np.column_stack(features), done[objective].to_numpy())
    imp = forest.feature_importances_
    if not np.isfinite(imp).all() or imp.sum() <= 0:
        return ImportanceData([], [])
    ranked = sorted(zip(params, imp / imp.sum()), key=lambda t: -t[1])
    return ImportanceData([p[len(PARAM_PREFIX):] for p, _ in ranked], [float(v) for _, v in ranked])


def parallel_data(trials: pd.DataFrame, objective: str = VAL_ACCURACY,
                  space_ranges: dict[str, tuple[float, float]] | None = None) -> ParallelData:
    done = _finite(trials, objective)
    if done.empty:
        return ParallelData([], np.empty((0, 0)), [])
    params = _param_columns(done)
    ranges = {k.removeprefix(PARAM_PREFIX): v for k, v in (space_ranges or {}).items()}
    axes = []
    for c in params:
        col = done[c]
        if _is_numeric(col):
            x = col.astype(float).to_numpy()
            low, high = ranges.get(c[len(PARAM_PREFIX):], (np.nanmin(x), np.nanmax(x)))
            axes.append(_unit(x, float(low), float(high)))
        else:
            codes = pd.factorize(col.astype("object"), sort=True)[0].astype(float)
            codes[codes < 0] = np.nan
            axes.append(codes / max(np.nanmax(codes), 1.0))
    positions = np.column_stack(axes) if axes else np.empty((len(done), 0))
    return ParallelData([p[len(PARAM_PREFIX):] for p in params], positions, done[objective].tolist())


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


def pareto_data(trials: pd.DataFrame, objective: str, memory_metric: str) -> ParetoData:
    done = _finite(trials, objective)
    if memory_metric not in done.columns:
        return ParetoData([], [], [], [])
    mem = pd.to_numeric(done[memory_metric], errors="coerce").astype(float)
    done = done[np.isfinite(mem)]
    v, m = done[objective].to_numpy(), mem[np.isfinite(mem)].to_numpy()
    # Dominated: another trial is at least as accurate and as light, and strictly better in one.
    dominated = [bool(np.any((v >= v[i]) & (m <= m[i]) & ((v > v[i]) | (m < m[i]))))
                 for i in range(len(v))]
    ids = done["trial_id"].astype(str).tolist() if "trial_id" in done.columns else [""] * len(v)
    return ParetoData(v.tolist(), m.tolist(), [not d for d in dominated], ids)


def edge_data(trials: pd.DataFrame, objective: str,
              space_ranges: dict[str, tuple[float, float]] | None) -> dict[str, dict]:
    done = _finite(trials, objective)
    k = max(1, math.ceil(BEST_FRACTION * len(done)))
    best = done.nlargest(k, objective) if len(done) else done
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


def _draw_history(d: HistoryData, objective: str) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    kept = [not p for p in d.pruned]
    ax.scatter(np.array(d.order)[kept], np.array(d.values)[kept], s=14, label="completed")
    if any(d.pruned):
        ax.scatter(np.array(d.order)[d.pruned], np.array(d.values)[d.pruned], s=14,
                   marker="x", color="grey", label="pruned (last report)")
    ax.step(d.order, d.best_so_far, where="post", color="C3", label="best so far")
    ax.set(xlabel="trial (completion order)", ylabel=objective, title="Optimization history")
    ax.legend(loc="lower right")
    return fig


def _draw_importances(d: ImportanceData, objective: str) -> Figure:
    fig = Figure(figsize=(7, 1 + 0.4 * len(d.params)))
    ax = fig.add_subplot()
    ax.barh(d.params[::-1], d.importances[::-1])
    ax.set(xlabel=f"importance for {objective} (random forest)", title="Parameter importances")
    fig.tight_layout()
    return fig


def _draw_parallel(d: ParallelData, objective: str) -> Figure:
    fig = Figure(figsize=(max(6, 1.6 * len(d.params)), 4.5))
    ax = fig.add_subplot()
    values = np.array(d.values)
    lo, hi = values.min(), values.max()
    scale = cm.ScalarMappable(colors.Normalize(lo, hi if hi > lo else lo + 1e-9), "viridis")
    x = np.arange(len(d.params))
    for row, value in sorted(zip(d.positions, values), key=lambda t: t[1]):  # best on top
        ax.plot(x, row, color=scale.to_rgba(value), alpha=0.7, lw=1)
    ax.set_xticks(x, d.params, rotation=20, ha="right")
    ax.set(ylim=(-0.05, 1.05), ylabel="position in range", title="Parallel coordinates")
    fig.colorbar(scale, ax=ax, label=objective)
    fig.tight_layout()
    return fig


def draw_heatmap(d: HeatmapData, objective: str) -> Figure:
    fig = Figure(figsize=(1.5 + 0.8 * len(d.counts), 1.5 + 0.5 * len(d.dims)))
    ax = fig.add_subplot()
    image = ax.imshow(d.mean, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(d.counts)), [f"{c:g}" for c in d.counts])
    ax.set_yticks(range(len(d.dims)), [f"{v:.0f}" for v in d.dims])
    ax.set(xlabel="prototype count", ylabel="prototype_dim", title=f"Mean {objective}")
    for (i, j), value in np.ndenumerate(d.mean):  # annotated, as the seed project's heatmap
        if np.isfinite(value):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def _draw_pareto(d: ParetoData, objective: str, memory_metric: str) -> Figure:
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    front = sorted((m, v) for m, v, p in zip(d.memory, d.values, d.is_pareto) if p)
    ax.scatter(d.memory, d.values, s=14, color="lightgrey", label="trials")
    ax.plot(*zip(*front), "o-", color="C3", label="Pareto front")
    ax.set(xlabel=f"{memory_metric} (lower is better)", ylabel=objective, title="Pareto front")
    ax.legend(loc="lower right")
    return fig


def write_study_report(trials: pd.DataFrame, out_dir: str | Path, objective: str = VAL_ACCURACY,
                       memory_metric: str | None = None,
                       space_ranges: dict[str, tuple[float, float]] | None = None) -> list[Path]:
    """Write the report into out_dir; returns the files written (plots with no data are skipped)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = trials.sort_values("order", kind="stable") if "order" in trials.columns else trials
    ordered.to_csv(out / "trials.csv", index=False)
    (out / "edge_report.json").write_text(json.dumps(edge_data(trials, objective, space_ranges), indent=2))
    written = [out / "trials.csv", out / "edge_report.json"]

    figures: dict[str, Figure] = {}
    if (h := history_data(trials, objective)).values:
        figures["optimization_history.png"] = _draw_history(h, objective)
    if (i := importance_data(trials, objective)).params:
        figures["param_importances.png"] = _draw_importances(i, objective)
    if (p := parallel_data(trials, objective, space_ranges)).params and len(p.values) >= 2:
        figures["parallel_coordinates.png"] = _draw_parallel(p, objective)
    if (m := heatmap_data(trials, objective)).dims:
        figures["accuracy_heatmap.png"] = draw_heatmap(m, objective)
    if memory_metric and (f := pareto_data(trials, objective, memory_metric)).values:
        figures["pareto_front.png"] = _draw_pareto(f, objective, memory_metric)
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        written.append(out / name)
    return written
