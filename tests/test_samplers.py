"""Every sampler drives Ray's OptunaSearch over our spaces, without starting Ray."""
from __future__ import annotations

import logging
import pickle
import random

import optuna
import pytest
from ray.tune.search.optuna import OptunaSearch

from hpn.config import Config, known_keys
from hpn.errors import HPNInputError
from tuning.samplers import SAMPLERS, grid_size, is_multi_objective, make_sampler
from tuning.spaces import SPACES_DIR, load_space, resolve_space_path

optuna.logging.set_verbosity(optuna.logging.WARNING)
SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))


def searcher(name: str, space, seed: int | None = 0) -> OptunaSearch:
    """What the study wires up: metric and mode lists for a multi-objective sampler."""
    if is_multi_objective(name):
        metric, mode = ["val_accuracy", "peak_memory_mb"], ["max", "min"]
    else:
        metric, mode = "val_accuracy", "max"
    return OptunaSearch(space=space.define_by_run(), metric=metric, mode=mode,
                        sampler=make_sampler(name, seed, space))


def run(search: OptunaSearch, n: int, seed: int = 0) -> list[dict]:
    """Ask and tell like Tune does: suggest, then complete each trial with its metrics."""
    rng = random.Random(seed)
    configs = []
    for i in range(n):
        configs.append(search.suggest(f"trial_{i}"))
        search.on_trial_complete(f"trial_{i}", {"val_accuracy": rng.random(),
                                                "peak_memory_mb": rng.uniform(10, 500)})
    return configs


def combos() -> list[tuple[str, str]]:
    """Every sampler over every shipped space it can search (grid needs a gridable one)."""
    out = []
    for path in SHIPPED:
        space = load_space(path)
        for name in SAMPLERS:
            try:
                make_sampler(name, 0, space)
            except HPNInputError:
                continue
            out.append((name, path.stem))
    return out


@pytest.mark.parametrize("name, space_name", combos())
def test_every_sampler_proposes_valid_dotted_configs_through_rays_optuna_search(name, space_name):
    space = load_space(resolve_space_path(space_name))
    for config in run(searcher(name, space), n=15):
        assert isinstance(config, dict) and set(config) <= set(known_keys())
        conditional = {p.key for p in space.params if p.when}  # e.g. train.separation_weight
        assert set(space.keys()) - conditional <= set(config)
        assert set(space.constants.items()) <= set(config.items())
        Config().with_updates(config)


def test_every_sampler_can_search_some_shipped_space():
    assert {name for name, _ in combos()} == set(SAMPLERS)


@pytest.mark.parametrize("name", ["tpe", "random", "cmaes", "nsga2"])
def test_conditional_key_appears_only_when_its_condition_holds_for_every_sampler(name):
    # 30 trials: past TPE's 10 random start-up trials, so its model-based proposals count too.
    configs = run(searcher(name, load_space(SPACES_DIR / "default.yaml")), n=30)
    assert {c["model.prototype_mode"] for c in configs} == {"fixed", "learned"}
    for c in configs:
        assert ("train.separation_weight" in c) == (c["model.prototype_mode"] == "learned")


def test_grid_sampler_enumerates_the_nine_seed_grid_combinations_without_repeats():
    space = load_space(resolve_space_path("seed_grid"))
    assert grid_size(space) == 9
    search = searcher("grid", space)
    # Tune asks for several trials before any completes: all nine start at once here.
    configs = [search.suggest(f"trial_{i}") for i in range(9)]
    points = {(c["model.prototype_dim"], c["model.prototype_count"]) for c in configs}
    assert points == {(d, k) for d in (64, 128, 256) for k in (50, 100, 200)}
    assert all(c["model.prototype_mode"] == "learned" for c in configs)


def test_grid_sampler_finishing_the_grid_logs_no_warning(caplog):
    search = searcher("grid", load_space(resolve_space_path("seed_grid")))
    with caplog.at_level(logging.WARNING):
        run(search, n=9)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(t.state.is_finished() for t in search._ot_study.trials)


def test_grid_sampler_refuses_a_continuous_space_naming_the_key():
    with pytest.raises(HPNInputError, match="default.yaml.*model.prototype_dim"):
        make_sampler("grid", 0, load_space(SPACES_DIR / "default.yaml"))


def test_nsga2_and_only_nsga2_is_multi_objective():
    assert [name for name in SAMPLERS if is_multi_objective(name)] == ["nsga2"]


def test_nsga2_records_both_objectives_for_each_trial():
    search = searcher("nsga2", load_space(SPACES_DIR / "quick.yaml"))
    run(search, n=6)
    assert all(len(t.values) == 2 for t in search._ot_study.trials)


@pytest.mark.parametrize("name", SAMPLERS)
def test_the_same_seed_gives_the_same_suggestions(name):
    path = SPACES_DIR / ("seed_grid.yaml" if name == "grid" else "default.yaml")
    first = run(searcher(name, load_space(path), seed=7), n=12)
    again = run(searcher(name, load_space(path), seed=7), n=12)
    assert first == again


def test_a_searcher_checkpoint_pickles_and_resumes_the_study(tmp_path):
    search = searcher("tpe", load_space(SPACES_DIR / "default.yaml"))
    run(search, n=3)
    search.save(str(tmp_path / "searcher.pkl"))
    restored = searcher("tpe", load_space(SPACES_DIR / "default.yaml"))
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert len(restored._ot_study.trials) == 3
    assert "model.prototype_mode" in restored.suggest("trial_3")


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_pickles_as_rays_searcher_checkpoint_needs(name):
    space = load_space(resolve_space_path("seed_grid" if name == "grid" else "default"))
    assert type(pickle.loads(pickle.dumps(make_sampler(name, 0, space)))).__name__


def test_unknown_sampler_error_names_the_flag_and_lists_the_choices():
    with pytest.raises(HPNInputError) as err:
        make_sampler("bayes", 0, load_space(SPACES_DIR / "quick.yaml"))
    assert str(err.value) == ("--sampler: unknown sampler 'bayes'; "
                              "choose one of tpe, random, cmaes, nsga2, grid")
    with pytest.raises(HPNInputError, match="--sampler"):
        is_multi_objective("bayes")
