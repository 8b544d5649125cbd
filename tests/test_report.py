"""The study report: each plot's data is checked as numbers, then the files as files."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from tuning.report import (
    best_config,
    edge_data,
    heatmap_data,
    history_data,
    importance_data,
    parallel_data,
    pareto_data,
    write_study_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _trials(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["trial_id"] = [f"t{i}" for i in range(len(frame))]
    frame["order"] = range(len(frame))
    return frame


def _study(n: int = 20, seed: int = 0) -> pd.DataFrame:
    """A study where accuracy rises with log(lr) and dim; a few trials pruned or errored."""
    rng = np.random.default_rng(seed)
    lr = 10 ** rng.uniform(-4, -1, n)
    dim = rng.choice([16, 32, 64, 128, 256, 512], n)
    ppc = rng.choice([1, 2, 4], n)
    mode = rng.choice(["fixed", "learned"], n)
    acc = 0.5 + 0.1 * (np.log10(lr) + 4) + 0.02 * np.log2(dim / 16) + rng.normal(0, 0.01, n)
    state = np.array(["completed"] * n, dtype=object)
    state[3], state[7], state[11] = "pruned", "error", "pruned"
    frame = _trials([{
        "state": state[i], "params.train.lr": lr[i], "params.model.prototype_dim": int(dim[i]),
        "params.model.prototypes_per_class": int(ppc[i]), "params.model.prototype_mode": mode[i],
        "val_accuracy": np.nan if state[i] == "error" else acc[i],
        "test_accuracy": np.nan if state[i] == "error" else acc[i] - 0.01,
        "test_macro_f1": np.nan, "runtime_s": 1.0 + i,
        "peak_rss_mb": np.nan if state[i] == "error" else 100.0 + dim[i] * ppc[i],
        "num_classes": 11,
    } for i in range(n)])
    return frame


def test_best_trial_is_the_completed_trial_with_the_highest_objective():
    trials = _trials([
        {"state": "completed", "val_accuracy": 0.7},
        {"state": "pruned", "val_accuracy": 0.95},
        {"state": "error", "val_accuracy": np.nan},
        {"state": "completed", "val_accuracy": 0.8},
    ])
    assert best_config(trials, "val_accuracy").run["trial_id"] == "t3"


def test_best_trial_is_none_when_nothing_completed():
    trials = _trials([{"state": "error", "val_accuracy": np.nan}])
    assert best_config(trials, "val_accuracy") is None


def _repeats(rows: list[tuple[str, str, float, float]]) -> pd.DataFrame:
    return _trials([{"config_group": g, "state": s, "val_accuracy": v, "test_accuracy": t}
                    for g, s, v, t in rows])


def test_the_best_config_has_the_best_mean_validation_accuracy_over_its_repeats():
    trials = _repeats([
        ("a", "completed", 0.90, 0.60), ("a", "completed", 0.60, 0.95), ("a", "completed", 0.60, 0.9),
        ("b", "completed", 0.75, 0.70), ("b", "completed", 0.74, 0.71), ("b", "completed", 0.76, 0.72),
    ])
    best = best_config(trials, "val_accuracy")
    # a has the best single run (0.90) and the best test numbers; b the best validation mean
    assert best.run["config_group"] == "b" and best.run["val_accuracy"] == 0.76
    assert best.objective_mean == pytest.approx(0.75)
    assert best.test_mean == pytest.approx(0.71) and best.repeats == 3


def test_a_config_with_a_failed_repeat_is_passed_over_while_a_complete_one_exists():
    trials = _repeats([
        ("a", "completed", 0.90, 0.9), ("a", "error", np.nan, np.nan),
        ("b", "completed", 0.70, 0.7), ("b", "completed", 0.72, 0.7),
    ])
    assert best_config(trials, "val_accuracy").run["config_group"] == "b"
    only_partial = trials[trials["config_group"] == "a"]
    assert best_config(only_partial, "val_accuracy").run["config_group"] == "a"


def test_history_keeps_completion_order_and_a_running_best_over_completed_trials():
    trials = _trials([
        {"state": "completed", "val_accuracy": 0.6},
        {"state": "error", "val_accuracy": np.nan},
        {"state": "pruned", "val_accuracy": 0.9},
        {"state": "completed", "val_accuracy": 0.5},
        {"state": "completed", "val_accuracy": 0.7},
    ]).sample(frac=1.0, random_state=1)  # rows arrive shuffled; order decides
    data = history_data(trials, "val_accuracy")
    assert data.order == [0, 2, 3, 4]
    assert data.values == [0.6, 0.9, 0.5, 0.7]
    assert data.best_so_far == [0.6, 0.6, 0.6, 0.7]
    assert data.pruned == [False, True, False, False]


def test_importances_rank_the_parameter_that_drives_the_objective_first_and_sum_to_one():
    data = importance_data(_study(40), "val_accuracy")
    assert data.params[0] == "train.lr"
    assert set(data.params) == {"train.lr", "model.prototype_dim",
                                "model.prototypes_per_class", "model.prototype_mode"}
    assert math.isclose(sum(data.importances), 1.0)
    assert data.importances == sorted(data.importances, reverse=True)


@pytest.mark.parametrize("trials", [
    _trials([{"state": "completed", "val_accuracy": 0.5, "params.a": 1, "params.b": 2}] * 2),
    _trials([{"state": "completed", "val_accuracy": v, "params.a": v} for v in (0.1, 0.2, 0.3)]),
    _trials([{"state": "completed", "val_accuracy": 0.5, "params.a": a, "params.b": 1}
             for a in (1, 2, 3)]),
], ids=["too-few-trials", "single-param", "constant-objective"])
def test_importances_are_empty_when_they_cannot_be_decided(trials):
    assert importance_data(trials, "val_accuracy").params == []


def test_parallel_coordinates_place_every_param_in_the_unit_interval():
    data = parallel_data(_study(), "val_accuracy", {"train.lr": (1e-4, 1e-1)})
    assert data.positions.shape == (len(data.values), len(data.params))
    assert np.nanmin(data.positions) >= 0.0 and np.nanmax(data.positions) <= 1.0


def test_heatmap_averages_the_objective_per_dim_and_total_prototype_count():
    trials = _trials([
        {"state": "completed", "val_accuracy": 0.6, "params.model.prototype_dim": 16,
         "params.model.prototypes_per_class": 1, "num_classes": 4},
        {"state": "completed", "val_accuracy": 0.8, "params.model.prototype_dim": 16,
         "params.model.prototypes_per_class": 1, "num_classes": 4},
        {"state": "completed", "val_accuracy": 0.9, "params.model.prototype_dim": 64,
         "params.model.prototypes_per_class": 2, "num_classes": 4},
        {"state": "error", "val_accuracy": np.nan, "params.model.prototype_dim": 64,
         "params.model.prototypes_per_class": 1, "num_classes": 4},
    ])
    data = heatmap_data(trials, "val_accuracy")
    assert data.dims == [16, 64] and data.counts == [4, 8]
    np.testing.assert_allclose(data.mean, [[0.7, np.nan], [np.nan, 0.9]])


def test_heatmap_bins_many_dims_into_log_spaced_rows():
    dims = [2 ** k for k in range(3, 13)]  # 10 distinct dims, 8 .. 4096
    trials = _trials([{"state": "completed", "val_accuracy": 0.5,
                       "params.model.prototype_dim": d, "params.model.prototypes_per_class": 1}
                      for d in dims])
    data = heatmap_data(trials, "val_accuracy")
    assert len(data.dims) == 8 and data.counts == [1]
    ratios = np.array(data.dims[1:]) / np.array(data.dims[:-1])
    np.testing.assert_allclose(ratios, ratios[0])  # geometric spacing
    assert np.isfinite(data.mean).sum() >= 7


def test_pareto_front_keeps_exactly_the_undominated_trials():
    # (accuracy, memory): A and B trade off, E is the most accurate; C and D are dominated.
    points = {"A": (0.9, 100), "B": (0.8, 50), "C": (0.7, 200), "D": (0.8, 60), "E": (0.95, 300)}
    trials = _trials([{"state": "completed", "val_accuracy": a, "peak_vram_mb": m}
                      for a, m in points.values()]
                     + [{"state": "completed", "val_accuracy": 0.99, "peak_vram_mb": np.nan}])
    data = pareto_data(trials, "val_accuracy", "peak_vram_mb")
    assert len(data.values) == 5  # the trial without a memory figure is left out
    assert dict(zip(points, data.is_pareto)) == {"A": True, "B": True, "C": False, "D": False,
                                                 "E": True}


def test_edge_report_flags_a_range_whose_best_trials_sit_at_its_high_end():
    rows = [{"state": "completed", "val_accuracy": 0.5 + 0.01 * i, "params.train.lr": 1e-3,
             "params.train.momentum": 0.5} for i in range(8)]
    rows += [{"state": "completed", "val_accuracy": 0.9, "params.train.lr": lr,
              "params.train.momentum": 0.5} for lr in (0.08, 0.09)]
    report = edge_data(_trials(rows), "val_accuracy",
                       {"train.lr": (1e-4, 1e-1), "train.momentum": (0.0, 1.0)})
    assert report["train.lr"]["crowds"] == "high"
    assert report["train.lr"]["n_best"] == 2
    assert report["train.momentum"]["crowds"] is None


def test_edge_report_judges_ranges_wider_than_tenfold_in_log_space():
    # 0.01 is in the bottom 10% of [1e-4, 1e-1] linearly, but two thirds up it in log space.
    trials = _trials([{"state": "completed", "val_accuracy": 0.9, "params.train.lr": 0.01}])
    assert edge_data(trials, "val_accuracy", {"train.lr": (1e-4, 1e-1)})["train.lr"]["crowds"] is None
    narrow = _trials([{"state": "completed", "val_accuracy": 0.9, "params.train.lr": 0.0105}])
    assert edge_data(narrow, "val_accuracy", {"train.lr": (0.01, 0.02)})["train.lr"]["crowds"] == "low"


def test_study_report_writes_the_csv_the_edge_report_and_valid_pngs(tmp_path):
    trials = _study()
    paths = write_study_report(trials, tmp_path / "report", memory_metric="peak_rss_mb",
                               space_ranges={"train.lr": (1e-4, 1e-1),
                                             "model.prototype_dim": (16, 512)})
    names = {p.name for p in paths}
    assert names == {"trials.csv", "edge_report.json", "optimization_history.png",
                     "param_importances.png", "parallel_coordinates.png",
                     "accuracy_heatmap.png", "pareto_front.png"}
    for path in paths:
        assert path.is_file()
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC
    assert len(pd.read_csv(tmp_path / "report" / "trials.csv")) == len(trials)
    edges = json.loads((tmp_path / "report" / "edge_report.json").read_text())
    assert set(edges) == {"train.lr", "model.prototype_dim"}
    assert edges["train.lr"]["crowds"] in (None, "low", "high")


def test_study_report_skips_the_pareto_plot_without_a_memory_metric(tmp_path):
    names = {p.name for p in write_study_report(_study(), tmp_path)}
    assert "pareto_front.png" not in names and "optimization_history.png" in names


@pytest.mark.parametrize("trials", [
    pd.DataFrame(),
    _trials([{"state": "error", "val_accuracy": np.nan, "params.train.lr": 0.01}]),
    _trials([{"state": "completed", "val_accuracy": 0.5, "params.train.lr": 0.01,
              "params.model.prototype_dim": 32, "peak_vram_mb": np.nan}]),
], ids=["empty", "all-errored", "one-trial"])
def test_study_report_survives_degenerate_studies(tmp_path, trials):
    paths = write_study_report(trials, tmp_path, memory_metric="peak_vram_mb",
                               space_ranges={"train.lr": (1e-4, 1e-1)})
    assert {"trials.csv", "edge_report.json"} <= {p.name for p in paths}
    assert "param_importances.png" not in {p.name for p in paths}
    assert all(p.is_file() for p in paths)
