"""--repeats: Ray's Repeater over OptunaSearch, with its bookkeeping saved for a resume."""
from __future__ import annotations

import optuna
import pytest
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import TRIAL_INDEX

from hpn.errors import HPNInputError
from tuning.ray_tune import GROUP_KEY, SeedRepeats
from tuning.samplers import make_sampler
from tuning.spaces import load_space, resolve_space_path
from tuning.study import StudyOptions, _new_plan, resolve_scheduler

optuna.logging.set_verbosity(optuna.logging.WARNING)


def repeats(n: int = 3) -> SeedRepeats:
    space = load_space(resolve_space_path("seed_grid"))
    inner = OptunaSearch(space=space.define_by_run(), metric="val_accuracy", mode="max",
                         sampler=make_sampler("grid", 0, space))
    return SeedRepeats(inner, repeat=n)


def test_each_config_is_proposed_once_per_repeat_with_its_index_and_group():
    search = repeats(3)
    configs = [search.suggest(f"t{i}") for i in range(6)]
    assert [c[TRIAL_INDEX] for c in configs] == [0, 1, 2, 0, 1, 2]
    assert [c[GROUP_KEY] for c in configs] == ["t0"] * 3 + ["t3"] * 3
    cell = lambda c: (c["model.prototype_dim"], c["model.prototype_count"])  # noqa: E731
    assert cell(configs[0]) == cell(configs[1]) == cell(configs[2]) != cell(configs[3])


def test_the_sampler_is_told_the_mean_of_the_repeats_once_all_have_finished():
    search = repeats(3)
    for i in range(3):
        search.suggest(f"t{i}")
    search.on_trial_complete("t0", {"val_accuracy": 0.5})
    search.on_trial_complete("t1", {"val_accuracy": 0.6})
    study = search.searcher._ot_study
    assert not [t for t in study.trials if t.state.is_finished()]
    search.on_trial_complete("t2", {"val_accuracy": 0.7})
    (done,) = [t for t in study.trials if t.state.is_finished()]
    assert done.value == pytest.approx(0.6)


def tune_wrapped(search: SeedRepeats) -> SearchGenerator:
    """What Tune builds around our searcher: max_concurrent_trials adds a ConcurrencyLimiter."""
    return SearchGenerator(ConcurrencyLimiter(search, max_concurrent=3))


def test_a_resumed_study_still_groups_the_repeats_of_a_config(tmp_path):
    # Saved and restored the way Tune does it at each experiment checkpoint and on resume.
    search = repeats(3)
    gen = tune_wrapped(search)
    for i in range(3):
        search.suggest(f"t{i}")
    search.on_trial_complete("t0", {"val_accuracy": 0.5})
    gen.save_to_dir(str(tmp_path), session_str="s")

    restored = repeats(3)
    tune_wrapped(restored).restore_from_dir(str(tmp_path))
    restored.on_trial_complete("t1", {"val_accuracy": 0.6})
    restored.on_trial_complete("t2", {"val_accuracy": 0.7})
    (done,) = [t for t in restored.searcher._ot_study.trials if t.state.is_finished()]
    assert done.value == pytest.approx(0.6)
    nxt = restored.suggest("t3")
    assert nxt[TRIAL_INDEX] == 0 and nxt[GROUP_KEY] == "t3"


@pytest.mark.parametrize("sampler, repeats_, expected", [
    ("tpe", 1, "asha"), ("grid", 1, "fifo"), ("tpe", 3, "fifo"), ("nsga2", 1, "fifo"),
])
def test_early_stopping_is_off_where_it_would_break_the_study(sampler, repeats_, expected):
    assert resolve_scheduler(None, sampler, repeats_) == expected
    assert resolve_scheduler("fifo", sampler, repeats_) == "fifo"


@pytest.mark.parametrize("sampler, repeats_, why", [
    ("grid", 1, "grid study trains every cell"), ("tpe", 3, "repeats are averaged"),
])
def test_asking_for_asha_on_a_grid_or_repeated_study_is_refused(sampler, repeats_, why):
    with pytest.raises(HPNInputError, match=f"--scheduler asha: a? ?{why}"):
        resolve_scheduler("asha", sampler, repeats_)


def test_each_study_draws_its_own_sampler_seed_unless_one_is_given(tmp_path):
    # One fixed default seed made short TPE, random and CMA-ES studies start from the same
    # random configs and report the same best config.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seeds = {_new_plan(StudyOptions(space="quick"), uri, "s").seed for _ in range(5)}
    assert len(seeds) == 5
    assert _new_plan(StudyOptions(space="quick", seed=7), uri, "s").seed == 7
