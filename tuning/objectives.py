"""What a multi-objective study optimises beside the task's primary metric (`--objectives`).

Apart from tuning/samplers.py so the study driver and `hpn-tune show` can read and check
objectives without importing Optuna (the CLI's refusals come before any heavy import).
`objectives_for` is the one place a study's objective metrics and directions are derived:
the Optuna study's directions, Ray Tune's metric and mode lists, the study summary and `show`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from hpn import metrics as M
from hpn.errors import HPNInputError
from hpn.tasks import TaskSpec

#: the `--sampler` names that optimise several metrics at once (a Pareto front)
MULTI_OBJECTIVE = frozenset({"nsga2"})

#: `--objectives`: what a multi-objective study optimises beside the task's primary metric,
#: each minimised. memory is the trial's peak (VRAM on a GPU study, else RSS: which one is
#: known once Ray says whether trials get a GPU); latency and size come from the trained
#: model's serving measurement (hpn/latency.py).
OBJECTIVES = ("memory", "latency", "size")
DEFAULT_OBJECTIVES = ("memory",)
_OBJECTIVE_METRICS = {"latency": M.LATENCY_P50_MS, "size": M.MODEL_SIZE_MB}
#: objectives whose metric a trial has only with train.measure_latency on
SERVING_OBJECTIVES = frozenset(_OBJECTIVE_METRICS)


def parse_objectives(text: str) -> tuple[str, ...]:
    """`--objectives latency,size` -> ("latency", "size"); a one-line error naming the flag."""
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise HPNInputError(f"--objectives: {text!r} has an empty name; give a comma list of "
                            f"{', '.join(OBJECTIVES)} (e.g. --objectives latency,size)")
    for name in names:
        if name not in OBJECTIVES:
            raise HPNInputError(f"--objectives: unknown objective {name!r}; choose from "
                                f"{', '.join(OBJECTIVES)} (e.g. --objectives latency,size)")
    if len(set(names)) < len(names):
        raise HPNInputError(f"--objectives: {text!r} names an objective twice; name each once")
    return names


def objective_metrics(objectives: Sequence[str], gpus: float) -> list[str]:
    """The metrics `objectives` stand for, in order (each minimised)."""
    memory = M.PEAK_VRAM_MB if gpus > 0 else M.PEAK_RSS_MB
    return [_OBJECTIVE_METRICS.get(name, memory) for name in objectives]


class Objectives(NamedTuple):
    """What a multi-objective study optimises, as its sampler sees it: the metrics, the task's
    primary first, and each one's direction ("max" or "min")."""

    metrics: list[str]
    modes: list[str]

    @property
    def directions(self) -> list[str]:
        """The modes in Optuna's words ("maximize", "minimize")."""
        return ["maximize" if mode == "max" else "minimize" for mode in self.modes]


def objectives_for(spec: TaskSpec, names: Sequence[str], gpus: float) -> Objectives:
    """A multi-objective study's objectives: the task's primary in its direction, then the
    metric of each of `names` (`--objectives`), minimised. `gpus`: the trials' GPUs, which
    say whether memory is peak VRAM (> 0) or peak RSS."""
    extra = objective_metrics(names, gpus)
    return Objectives([spec.primary, *extra], [spec.mode, *["min"] * len(extra)])
