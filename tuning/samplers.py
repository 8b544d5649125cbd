"""Optuna samplers by the name `--sampler` takes.

Ray's OptunaSearch hands the sampler to an Optuna study and hard-codes Optuna's NopPruner:
early stopping is ASHA's job, not the sampler's.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import optuna

from hpn.errors import HPNInputError
from tuning.objectives import MULTI_OBJECTIVE
from tuning.spaces import SearchSpace

SAMPLERS = ("tpe", "random", "cmaes", "nsga2", "grid")


def _check(name: str) -> str:
    if name not in SAMPLERS:
        raise HPNInputError(f"--sampler: unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return name


def is_multi_objective(name: str) -> bool:
    """True when the sampler optimises several metrics at once (a Pareto front)."""
    return _check(name) in MULTI_OBJECTIVE


def grid_size(space: SearchSpace) -> int:
    """How many trials exhaust the grid; GridSampler repeats points after that."""
    return math.prod(len(values) for values in space.grid().values())


def make_sampler(name: str, seed: int | None, space: SearchSpace) -> optuna.samplers.BaseSampler:
    name = _check(name)
    if name == "tpe":
        # Multivariate TPE models the keys jointly. Under a `when`, a key is missing from some
        # trials; `group` splits the space into the sets of keys that occur together so those
        # keys are modelled too instead of falling back to independent sampling.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=space.conditional)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        # optuna imports `cmaes` lazily, inside the first trial's suggest: it would fail only
        # there, and its 1 s import (scipy.stats) makes Ray warn about a slow define-by-run.
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise HPNInputError("--sampler cmaes: needs the `cmaes` package; pip install cmaes") from None
        # CMA-ES searches the int/float keys that every trial has; categorical and conditional
        # keys go to the independent sampler, which is expected, so no warning per trial.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.CmaEsSampler(
                seed=seed,
                independent_sampler=optuna.samplers.RandomSampler(seed=seed),
                warn_independent_sampling=False,
                # Most trials of an ASHA study are pruned (told PRUNED, with their last
                # epoch's value): without this, CMA-ES would learn from the few that finished.
                consider_pruned_trials=True,
            )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return _TuneGridSampler(space.grid(), seed=seed)


class _TuneGridSampler(optuna.samplers.GridSampler):
    """GridSampler without its study.stop() once the grid is done.

    Under Ray's ask/tell loop there is no optimize() to stop, so Optuna raises and Ray logs a
    warning at every trial from then on (the trial is still recorded). The caller caps the
    number of trials at grid_size() instead.
    """

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        pass
