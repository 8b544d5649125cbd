"""What a multi-objective study optimises beside the task's primary metric (`--objectives`).

Apart from tuning/samplers.py so the study driver can read and check objectives without
importing Optuna (the CLI's refusals come before any heavy import).
"""
from __future__ import annotations

from hpn import metrics as M
from hpn.errors import HPNInputError

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


def objective_metrics(objectives: tuple[str, ...], gpus: float) -> list[str]:
    """The metrics `objectives` stand for, in order (each minimised)."""
    memory = M.PEAK_VRAM_MB if gpus > 0 else M.PEAK_RSS_MB
    return [_OBJECTIVE_METRICS.get(name, memory) for name in objectives]
