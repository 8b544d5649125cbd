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
    write_optuna_plots,
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


def test_a_tie_on_the_objective_goes_to_the_cheaper_trial_when_costs_are_given():
    """A multi-objective study's best: two trials at the same accuracy, the faster wins (the
    other is dominated); latency tied too, the smaller; without costs the first, as before."""
    trials = _trials([
        {"state": "completed", "val_accuracy": 0.8},
        {"state": "completed", "val_accuracy": 0.8},
        {"state": "completed", "val_accuracy": 0.8},
        {"state": "completed", "val_accuracy": 0.7},
    ])
    trials["latency_p50_ms"] = [16.3, 6.8, 6.8, 1.0]
    trials["model_size_mb"] = [86.0, 22.0, 21.0, 5.0]

    assert best_config(trials, "val_accuracy").run["trial_id"] == "t0"
    costs = ["latency_p50_ms", "model_size_mb"]
    assert best_config(trials, "val_accuracy", tie_break=costs).run["trial_id"] == "t2"
    trials.loc[2, "model_size_mb"] = np.nan  # a missing cost loses the tie
    assert best_config(trials, "val_accuracy", tie_break=costs).run["trial_id"] == "t1"


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


def test_study_report_writes_the_csv_the_edge_report_and_the_heatmap(tmp_path):
    trials = _study()
    paths = write_study_report(trials, tmp_path / "report",
                               space_ranges={"train.lr": (1e-4, 1e-1),
                                             "model.prototype_dim": (16, 512)})
    assert {p.name for p in paths} == {"trials.csv", "edge_report.json", "accuracy_heatmap.png"}
    assert (tmp_path / "report" / "accuracy_heatmap.png").read_bytes()[:8] == PNG_MAGIC
    assert len(pd.read_csv(tmp_path / "report" / "trials.csv")) == len(trials)
    edges = json.loads((tmp_path / "report" / "edge_report.json").read_text())
    assert set(edges) == {"train.lr", "model.prototype_dim"}
    assert edges["train.lr"]["crowds"] in (None, "low", "high")


@pytest.mark.parametrize("trials", [
    pd.DataFrame(),
    _trials([{"state": "error", "val_accuracy": np.nan, "params.train.lr": 0.01}]),
    _trials([{"state": "completed", "val_accuracy": 0.5, "params.train.lr": 0.01,
              "params.model.prototype_dim": 32, "peak_vram_mb": np.nan}]),
], ids=["empty", "all-errored", "one-trial"])
def test_study_report_survives_degenerate_studies(tmp_path, trials):
    paths = write_study_report(trials, tmp_path, space_ranges={"train.lr": (1e-4, 1e-1)})
    assert {"trials.csv", "edge_report.json"} <= {p.name for p in paths}
    assert all(p.is_file() for p in paths)


def _optuna_study(n: int, directions: list[str], prune_every: int = 0):
    """A real Optuna study as Ray's OptunaSearch leaves it: accuracy rises with log(lr)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(n):
        trial = study.ask()
        lr = trial.suggest_float("train.lr", 1e-4, 1e-1, log=True)
        dim = trial.suggest_categorical("model.prototype_dim", [16, 64, 256])
        acc = 0.5 + 0.1 * (math.log10(lr) + 4) + 0.01 * math.log2(dim / 16)
        if len(directions) == 1:
            trial.report(acc / 2, 1)  # an epoch's value, as OptunaSearch reports each result
        if prune_every and i % prune_every == 1 % prune_every:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, [acc, 100.0 + dim] if len(directions) > 1 else acc)
    return study


def test_the_study_plots_are_optunas_own_drawn_on_the_study(tmp_path):
    done = write_optuna_plots(_optuna_study(12, ["maximize"], prune_every=4), tmp_path)
    assert done == {name: "written" for name in (
        "optimization_history.png", "param_importances.png", "parallel_coordinates.png",
        "contour.png", "slice.png", "intermediate_values.png")}
    for name in done:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_a_multi_objective_study_adds_optunas_pareto_front(tmp_path):
    done = write_optuna_plots(_optuna_study(8, ["maximize", "minimize"]), tmp_path,
                              objectives=["val_accuracy", "peak_rss_mb"])
    assert done["pareto_front.png"] == "written"
    assert done["optimization_history.png"] == "written"  # of the first objective


def test_a_plot_optuna_cannot_draw_is_skipped_with_its_reason(tmp_path):
    one = write_optuna_plots(_optuna_study(1, ["maximize"]), tmp_path / "one")
    assert one["contour.png"] == "skipped: nothing to plot"  # one point has no contour
    assert one["optimization_history.png"] == "written"
    pruned = write_optuna_plots(_optuna_study(3, ["maximize"], prune_every=1), tmp_path / "none")
    assert pruned.pop("intermediate_values.png") == "written"  # the pruned trials' epochs
    assert set(pruned.values()) == {"skipped: nothing to plot"}
    assert [p.name for p in (tmp_path / "none").iterdir()] == ["intermediate_values.png"]
