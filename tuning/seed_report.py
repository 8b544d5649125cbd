"""The seed project's benchmark outputs, for any study: its table, summary, plots and t-SNE.

The seed's benchmark script wrote one row per run, a summary per cell (mean / std / min / max
of accuracy and runtime over its repeated seeds), five plots and a t-SNE picture per run.
A study writes the same onto its parent run (`report/seed/`), so a user who switches from the
seed gets their experiment back. A *cell* is one value of the searched keys; its repeats
(`--repeats`) are the runs that share it. The seed's "accuracy" is test accuracy on its
held-out split, so the plots show `test_accuracy` (the seed's number) beside the summary's
`val_accuracy`; choosing the best cell is done on validation elsewhere, never here.

As in `tuning.report`, each plot is a `*_data` function returning a NamedTuple the tests
check, and a `_draw_*` function. std is pandas' sample standard deviation (NaN for n = 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from hpn import metrics as M
from hpn.tasks import task_spec
from tuning.report import PARAM_PREFIX, HeatmapData, draw_heatmap, heatmap_data

SUMMARY_METRICS = (M.VAL_ACCURACY, M.TEST_ACCURACY, M.RUNTIME_S)
STATS = ("mean", "std", "min", "max")
ACCURACY = M.TEST_ACCURACY  # the seed's "accuracy"
DIM = PARAM_PREFIX + "model.prototype_dim"
RUN_COLUMNS = ("run_id", "trial_id", "config_group", "repeat", "state",
               PARAM_PREFIX + "train.seed", M.NUM_PROTOTYPES, M.VAL_ACCURACY, M.TEST_ACCURACY,
               M.TEST_MACRO_F1, M.RUNTIME_S)


def _task_metrics(task: str | None) -> list[str]:
    """A non-classification study's own val/test metrics (val_mae, test_mae, ...), which the
    seed's accuracy columns do not cover; none for classification (its table as always)."""
    return [m for m in task_spec(task).headline() if m not in RUN_COLUMNS]


def runs_table(trials: pd.DataFrame, searched: list[str], task: str | None = None) -> pd.DataFrame:
    """One row per trial run: its cell (the searched keys), seed, accuracy (or the task's
    metrics) and runtime."""
    cols = [f"{PARAM_PREFIX}{k}" for k in searched] + list(RUN_COLUMNS) + _task_metrics(task)
    table = trials[[c for c in cols if c in trials.columns]].copy()
    return table.sort_values([c for c in ("config_group", "repeat") if c in table.columns],
                             kind="stable").reset_index(drop=True)


def cell_summary(runs: pd.DataFrame, searched: list[str], task: str | None = None) -> pd.DataFrame:
    """Per cell, over its completed runs: n, and mean / std / min / max of each metric; best
    cell first by the task's primary metric in its direction (val_accuracy: highest)."""
    keys = [f"{PARAM_PREFIX}{k}" for k in searched if f"{PARAM_PREFIX}{k}" in runs.columns]
    done = _completed(runs)
    spec = task_spec(task)
    wanted = dict.fromkeys([spec.primary, *SUMMARY_METRICS, *_task_metrics(task)])
    metrics = [m for m in wanted if m in done.columns]
    if done.empty or not keys or not metrics:
        return pd.DataFrame()
    # dropna=False: a conditional key absent from a cell is part of that cell's identity
    grouped = done.groupby(keys, dropna=False)[metrics]
    summary = grouped.agg(list(STATS))
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary.insert(0, "n", grouped.size())
    return summary.reset_index().sort_values(f"{metrics[0]}_mean",
                                             ascending=metrics[0] == spec.primary
                                             and spec.mode == "min", ignore_index=True)


class LinesData(NamedTuple):
    x_label: str
    x: list[float]
    series: dict[str, list[float]]  # legend label -> mean accuracy at each x (NaN: no cell)


class BarsData(NamedTuple):
    labels: list[str]  # one per cell
    means: list[float]
    stds: list[float]


class BoxData(NamedTuple):
    labels: list[str]
    values: list[list[float]]  # each cell's accuracies, one per repeat


class TsneData(NamedTuple):
    points: np.ndarray  # (n, 2) test embeddings
    labels: list[int]  # class id of each point
    prototypes: np.ndarray  # (count, 2)
    prototype_classes: list[int]  # class of each prototype, -1 for an extra negative
    label_names: list[str]


def _completed(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["state"] == "completed"] if "state" in runs.columns else runs


def _cell_label(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{k.removeprefix(PARAM_PREFIX).split('.')[-1]}={_short(row[k])}" for k in keys)


def _short(value: object) -> str:
    return f"{value:g}" if isinstance(value, (int, float, np.number)) else str(value)


def accuracy_lines(runs: pd.DataFrame, x: str, series: str) -> LinesData:
    """Mean accuracy against column `x`, one line per value of column `series`."""
    done = _completed(runs)
    if done.empty or ACCURACY not in done.columns or x not in done.columns \
            or series not in done.columns:  # a regression or multi-label study: no accuracy
        return LinesData(x, [], {})
    means = done.groupby([series, x])[ACCURACY].mean().unstack(x)
    xs = [float(v) for v in means.columns]
    return LinesData(x.removeprefix(PARAM_PREFIX), xs, {
        f"{series.removeprefix(PARAM_PREFIX)}={_short(s)}": means.loc[s].astype(float).tolist()
        for s in means.index})


def runtime_bars(summary: pd.DataFrame, searched: list[str]) -> BarsData:
    keys = [f"{PARAM_PREFIX}{k}" for k in searched if f"{PARAM_PREFIX}{k}" in summary.columns]
    if summary.empty or f"{M.RUNTIME_S}_mean" not in summary.columns:
        return BarsData([], [], [])
    ordered = summary.sort_values(keys, kind="stable")
    return BarsData([_cell_label(r, keys) for _, r in ordered.iterrows()],
                    ordered[f"{M.RUNTIME_S}_mean"].astype(float).tolist(),
                    ordered[f"{M.RUNTIME_S}_std"].fillna(0.0).astype(float).tolist())


def accuracy_boxes(runs: pd.DataFrame, searched: list[str]) -> BoxData:
    keys = [f"{PARAM_PREFIX}{k}" for k in searched if f"{PARAM_PREFIX}{k}" in runs.columns]
    done = _completed(runs)
    if done.empty or not keys or ACCURACY not in done.columns:
        return BoxData([], [])
    labels, values = [], []
    for _, cell in done.groupby(keys, dropna=False, sort=True):
        labels.append(_cell_label(cell.iloc[0], keys))
        values.append(cell[ACCURACY].astype(float).tolist())
    return BoxData(labels, values)


def tsne_data(embeddings: np.ndarray, labels: np.ndarray, prototypes: np.ndarray,
              prototype_classes: np.ndarray, label_names: list[str], seed: int = 0,
              max_points: int = 2000) -> TsneData:
    """t-SNE of test embeddings and the prototypes in one map (they share the sphere).

    At most `max_points` embeddings (a seeded sample) and 500 iterations (sklearn's default
    is 1,000; the map has settled by then): 2,000 points + 200 prototypes took 24 s on a busy
    2-core machine, against 48 s with the default iterations (see README).
    """
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(len(embeddings))[:max_points])
    both = np.concatenate([embeddings[keep], prototypes]).astype(np.float64)
    perplexity = float(min(30.0, max(2.0, (len(both) - 1) / 3)))
    mapped = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity,
                  metric="cosine", max_iter=500).fit_transform(both)
    n = len(keep)
    return TsneData(mapped[:n], labels[keep].astype(int).tolist(), mapped[n:],
                    prototype_classes.astype(int).tolist(), list(label_names))


def _draw_lines(d: LinesData, title: str) -> Figure:
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for name, ys in d.series.items():
        ax.plot(d.x, ys, "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(d.x, [_short(v) for v in d.x])
    ax.set(xlabel=d.x_label, ylabel=f"{ACCURACY} (mean over repeats)", title=title)
    ax.legend(fontsize=8)
    return fig


def _draw_bars(d: BarsData) -> Figure:
    fig = Figure(figsize=(max(6.0, 0.55 * len(d.labels) + 2), 4.5))
    ax = fig.add_subplot()
    ax.bar(range(len(d.labels)), d.means, yerr=d.stds, capsize=3)
    ax.set_xticks(range(len(d.labels)), d.labels, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel=f"{M.RUNTIME_S} (mean, std over repeats)", title="Runtime per configuration")
    return fig  # no tight_layout: long config labels made it warn; savefig crops to fit


def _draw_boxes(d: BoxData) -> Figure:
    fig = Figure(figsize=(max(6.0, 0.55 * len(d.labels) + 2), 4.5))
    ax = fig.add_subplot()
    ax.boxplot(d.values)
    ax.set_xticks(range(1, len(d.labels) + 1), d.labels, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel=ACCURACY, title="Accuracy distribution per configuration")
    return fig  # no tight_layout: long config labels made it warn; savefig crops to fit


def _draw_tsne(d: TsneData) -> Figure:
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.add_subplot()
    cmap = "tab20" if len(d.label_names) > 10 else "tab10"
    ax.scatter(d.points[:, 0], d.points[:, 1], c=d.labels, cmap=cmap, s=6, alpha=0.6,
               vmin=0, vmax=max(len(d.label_names) - 1, 1))
    classes = np.array(d.prototype_classes)
    owned = classes >= 0
    ax.scatter(d.prototypes[owned, 0], d.prototypes[owned, 1], c=classes[owned], cmap=cmap,
               vmin=0, vmax=max(len(d.label_names) - 1, 1), marker="*", s=220,
               edgecolors="black", linewidths=0.8, label="class prototypes")
    if (~owned).any():
        ax.scatter(d.prototypes[~owned, 0], d.prototypes[~owned, 1], marker="x", s=30,
                   color="black", alpha=0.6, label="extra negatives")
    for c, name in enumerate(d.label_names):
        mine = d.prototypes[classes == c]
        if len(mine):
            ax.annotate(name, mine[0], fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(title="t-SNE of test embeddings and prototypes (best model)", xticks=[], yticks=[])
    ax.legend(loc="best", fontsize=8)
    return fig


def write_seed_report(trials: pd.DataFrame, searched: list[str], out_dir: str | Path,
                      tsne: TsneData | None = None, task: str | None = None) -> list[Path]:
    """runs.csv, cell_summary.csv and the seed's plots (those the study has data for; the
    seed's accuracy plots need test_accuracy, which a regression or multi-label study has not:
    its tables carry its own metrics)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_table(trials, searched, task)
    summary = cell_summary(runs, searched, task)
    runs.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "cell_summary.csv", index=False)
    written = [out / "runs.csv", out / "cell_summary.csv"]

    figures: dict[str, Figure] = {}
    count = M.NUM_PROTOTYPES
    if (lines := accuracy_lines(runs, DIM, count)).series:
        figures["test_accuracy_vs_dimension.png"] = _draw_lines(lines, "Accuracy vs prototype dimension")
    if (lines := accuracy_lines(runs, count, DIM)).series:
        figures["test_accuracy_vs_prototype_count.png"] = _draw_lines(lines, "Accuracy vs prototype count")
    if (bars := runtime_bars(summary, searched)).labels:
        figures["runtime_per_configuration.png"] = _draw_bars(bars)
    done = _completed(runs)
    heat: HeatmapData = heatmap_data(done.assign(order=range(len(done))), ACCURACY)
    if heat.dims:
        figures["test_accuracy_heatmap.png"] = draw_heatmap(heat, ACCURACY)
    if (boxes := accuracy_boxes(runs, searched)).labels:
        figures["test_accuracy_distribution.png"] = _draw_boxes(boxes)
    if tsne is not None and len(tsne.points):
        figures["tsne_best_model.png"] = _draw_tsne(tsne)
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        written.append(out / name)
    return written
