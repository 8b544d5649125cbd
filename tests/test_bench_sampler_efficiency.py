"""The trial counting of bench/sampler_efficiency.py, pinned on hand-made tables (no training)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import optuna
import pytest

from tuning.samplers import make_sampler
from tuning.spaces import load_space, resolve_space_path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("sampler_efficiency",
                                                  ROOT / "bench" / "sampler_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("sampler_efficiency", mod)
    spec.loader.exec_module(mod)
    return mod


se = _bench()
SEED = load_space(resolve_space_path("seed_grid"))
POINTS = SEED.grid()
CELLS = se.enumerate_cells(SEED, POINTS)
DIM, COUNT = "model.prototype_dim", "model.prototype_count"


def table(best: tuple[int, int], best_value: float = 0.90) -> dict:
    """9 cells at 0.80..0.88 (all more than 0.005 below the best), one best cell."""
    values = {c: 0.80 + 0.01 * i for i, c in enumerate(CELLS)}
    values[((DIM, best[0]), (COUNT, best[1]))] = best_value
    return values


class Scripted(optuna.samplers.BaseSampler):
    """Proposes the given cells in order (then the last one again)."""

    def __init__(self, cells: list) -> None:
        self.cells = cells

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, name, dist):
        return dict(self.cells[min(trial.number, len(self.cells) - 1)])[name]


def test_the_seed_grid_has_nine_cells_and_a_target_half_a_point_below_the_best():
    assert len(CELLS) == 9 and len(set(CELLS)) == 9
    values = table((256, 200))
    assert se.target_of(values) == pytest.approx(0.895)
    # a cell exactly 0.005 below the best counts as near-best
    assert 0.895 >= se.target_of(values)


def test_a_sampler_that_proposes_the_best_cell_first_needs_one_trial():
    best = ((DIM, 128), (COUNT, 50))
    r = se.replay(Scripted([best]), SEED, POINTS, table((128, 50)), se.target_of(table((128, 50))), 20)
    assert r.trials == 1 and r.proposed == [best]


def test_a_scripted_order_needs_the_position_of_the_first_near_best_cell():
    values = table((64, 200))
    values[((DIM, 256), (COUNT, 100))] = 0.896  # within 0.005 of 0.90: also a hit
    order = [c for c in CELLS if c not in (((DIM, 64), (COUNT, 200)), ((DIM, 256), (COUNT, 100)))]
    order = order[:4] + [((DIM, 256), (COUNT, 100))] + order[4:] + [((DIM, 64), (COUNT, 200))]
    r = se.replay(Scripted(order), SEED, POINTS, values, se.target_of(values), 20)
    assert r.trials == 5


def test_repeated_proposals_count_and_a_miss_is_none():
    values = table((256, 200))
    worst = CELLS[0]
    r = se.replay(Scripted([worst]), SEED, POINTS, values, se.target_of(values), 7)
    assert r.trials is None and r.proposed == [worst] * 7
    s = se.run_replays(se.SamplerSpec("x", "random"), SEED, POINTS, {c: 0.5 for c in CELLS},
                       range(3), 4)
    assert s.counts == [1.0, 1.0, 1.0] and s.missed == 0  # every cell is the best


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_grid_in_its_order_needs_exactly_the_position_of_the_best_cell(seed):
    # The order GridSampler walks for this seed, read from a study told nothing useful.
    study = optuna.create_study(direction="maximize", sampler=make_sampler("grid", seed, SEED))
    order = []
    for _ in range(9):
        t = study.ask()
        SEED.define_by_run()(t)
        order.append(se.snap(t.params, SEED, POINTS))
        study.tell(t, 0.0)
    assert sorted(order) == sorted(CELLS)
    for best in CELLS:
        values = table((dict(best)[DIM], dict(best)[COUNT]))
        r = se.replay(make_sampler("grid", seed, SEED), SEED, POINTS, values,
                      se.target_of(values), 30)
        assert r.trials == order.index(best) + 1


def test_summary_median_iqr_and_misses():
    s = se.Summary("x", [1, 2, 3, 4, 5, 6, 7, 8, 9, 11], 1, 10)
    assert (s.median, s.q25, s.q75) == (5.5, 3.25, 7.75)
    rows = se.summary_rows("sp", [s])
    assert rows[0][2] == "5.5" and rows[1][2].count("–") == 1
    assert rows[3][2] == "100%" and rows[4][2] == "1/10"
    assert se.fixed_summary("grid as run", 27, 10).median == 27


def test_snapping_uses_log_space_for_log_ranges():
    space = load_space(resolve_space_path("default"))
    specs = {p.key: p for p in space.params}
    dims = [8, 16, 32, 64, 128, 256]
    assert se.snap_value(45, specs[DIM], dims) == 32  # log2(45) = 5.49
    assert se.snap_value(46, specs[DIM], dims) == 64  # log2(46) = 5.52 (linear would say 32)
    lrs = se.log_points(1e-3, 0.5, 6)
    assert lrs[0] == 1e-3 and lrs[-1] == 0.5 and len(lrs) == 6
    assert se.snap_value(0.0075, specs["train.lr"], lrs) == lrs[2]  # 0.01202, not 0.00346
    assert se.snap_value(3, specs["model.prototypes_per_class"], [1, 2, 3, 4]) == 3


def test_default_fine_grid_has_separation_weight_for_learned_cells_only():
    space = load_space(resolve_space_path("default"))
    points = se.default_points(space)
    cells = se.enumerate_cells(space, points)
    assert len(cells) == 6 * 4 * 6 + 6 * 4 * 6 * 3  # fixed 144 + learned 432
    for cell in cells:
        d = dict(cell)
        assert ("train.separation_weight" in d) == (d["model.prototype_mode"] == "learned")
    values = {c: 0.5 for c in cells}
    best = cells[-1]
    values[best] = 0.9
    r = se.replay(Scripted([best]), space, points, values, se.target_of(values), 3)
    assert r.trials == 1
    # TPE replays on the conditional space run and only propose table cells.
    s = se.run_replays(se.SamplerSpec("t", "tpe", 3), space, points, values, [0], 15)
    assert s.counts[0] >= 1


def test_a_diverged_cell_is_told_as_failed_and_never_counts():
    values = table((256, 200))
    values[CELLS[0]] = math.nan
    r = se.replay(Scripted([CELLS[0], ((DIM, 256), (COUNT, 200))]), SEED, POINTS, values,
                  se.target_of(values), 5)
    assert r.trials == 2


def test_table_csv_round_trip(tmp_path):
    space = load_space(resolve_space_path("default"))
    points = se.default_points(space, 2, 1)
    cells = se.enumerate_cells(space, points)
    tab = {c: {"status": "ok", "val_accuracy": 0.5 + i / 1000, "test_accuracy": 0.4,
               "runtime_s": 1.5} for i, c in enumerate(cells)}
    tab[cells[3]] = {"status": "diverged", "val_accuracy": math.nan, "test_accuracy": math.nan,
                     "runtime_s": math.nan}
    path = tmp_path / "t.csv"
    se.write_table(path, space, tab)
    back = se.read_table(path, space)
    assert list(back) == cells
    assert back[cells[5]]["val_accuracy"] == tab[cells[5]]["val_accuracy"]
    assert back[cells[3]]["status"] == "diverged" and math.isnan(back[cells[3]]["val_accuracy"])


def test_cache_path_changes_with_the_config(tmp_path):
    args = se.parse_args(["--space-set", "seed", "--encoder-cache", str(tmp_path)])
    a = se.setups(args)[0].cache_path(tmp_path)
    b = se.setups(se.parse_args(["--space-set", "seed", "--epochs", "5",
                                 "--encoder-cache", str(tmp_path)]))[0].cache_path(tmp_path)
    assert a != b and a == se.setups(args)[0].cache_path(tmp_path)


def test_quick_mode_trains_tiny_tables_caches_them_and_replays(tmp_path, cache_dir, capsys):
    argv = ["--quick", "--cache", str(tmp_path / "tables"), "--encoder-cache", cache_dir]
    first = se.main(argv)
    out = capsys.readouterr().out
    assert set(first) == {"seed_grid", "default"}
    assert first["seed_grid"]["cells"] == 9 and first["default"]["cells"] == 2 * 2 * 2 + 2 * 2 * 2
    assert "| space | measure | tpe |" in out and "random/tpe" in out
    assert "training 9 of 9 cells" in out
    again = se.main(argv)  # the second run reads both tables from the cache, trains nothing
    out = capsys.readouterr().out
    assert "cells from cache" in out and "of 9 cells ->" not in out
    for space in ("seed_grid", "default"):
        assert again[space]["best_val"] == first[space]["best_val"]
