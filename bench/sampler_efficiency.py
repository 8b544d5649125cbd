"""How many trials each Optuna sampler needs to find a near-best config, replayed on a table.

Every cell of a space is trained ONCE on cached embeddings (hpn.train directly: no Ray, no
MLflow) into a table cell -> val_accuracy, test_accuracy, runtime_s, cached as CSV. Each
sampler is then replayed over many seeds against that table with Optuna's ask/tell and the
space's own define-by-run function (`SearchSpace.define_by_run()`, which calls
trial.suggest_*): the proposed point is snapped to the nearest table cell (in log space for
log ranges) and the sampler is told that cell's val_accuracy. A replay counts the trials until
the first one whose cell is within --tolerance (0.005 = half an accuracy point) of the best
cell's val_accuracy. Selection is on validation only; test accuracy is in the table, never used.

Spaces:
  seed     search_spaces/seed_grid.yaml on presets/seed.yaml (3 x 3 = 9 categorical cells).
           "grid as the seed ran it" is 9 cells x 3 repeats = 27 runs.
  default  search_spaces/default.yaml enumerated on a fine grid (mode x dim x prototypes per
           class x lr x separation weight for learned prototypes only).

    .venv/bin/python bench/sampler_efficiency.py [--space-set seed|default|both] [--seeds 20]
        [--epochs N] [--default-epochs N] [--size N] [--cache DIR] [--quick]
        [--tpe-variant SPEC ...] [--variants-only] [--seed-start N] [--json PATH]

Tables live under .hpn_cache/sampler_efficiency/ (git-ignored; --cache), named by a hash of
the space file, the grid and the fixed config; a matching table is re-used (or completed after
an interruption), so replays re-run without training. Where every cell is within the tolerance
(the seed grid), a supplementary table also counts trials to the exact best (tolerance 0).

Samplers: hpn-tune's own (`tuning.samplers.make_sampler`: tpe, random, cmaes, grid) plus, as
extra rows, hpn-tune's TPE with fewer random start-up trials (n_startup_trials 5 and 3;
Optuna's default, used by hpn-tune, is 10).

Extra TPE variants (not in the default output): `--tpe-variant SPEC`, repeatable, replays
hpn-tune's TPE (multivariate=True, group=<space is conditional>, seed) with the keys in SPEC
changed, e.g. "mv=0", "group=0", "startup=5,ei=64", "endpoints=1", "prior=2",
"gamma=0.25" (min(ceil(0.25 n), 25) good trials; "hyperopt": min(ceil(0.25 sqrt n), 25)).
mv=0 implies group=0 (Optuna allows group only with multivariate). `--variants-only` replays
just tpe, random and the variants; `--seed-start N` uses seeds N..N+seeds-1 (a disjoint set);
`--json PATH` writes the per-seed counts.
"""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np
import optuna

from hpn.errors import HPNInputError
from tuning.samplers import make_sampler
from tuning.spaces import ParamSpec, SearchSpace, load_space, resolve_space_path

optuna.logging.set_verbosity(optuna.logging.ERROR)

TABLE_VERSION = 1
SEED_GRID_REPEATS = 3  # the seed project ran each of its 9 cells with seeds 42, 43, 44
TOLERANCE = 0.005
METRICS = ("val_accuracy", "test_accuracy", "runtime_s")
AS_RUN = "grid as the seed ran it (9 x 3)"

Cell = tuple  # ((key, value), ...) for the keys active in that cell, in space order


# -- the grid ------------------------------------------------------------------------------

def log_points(low: float, high: float, n: int) -> list[float]:
    """n values evenly spaced in log space from low to high, rounded to 4 significant digits."""
    if n == 1:
        return [float(low)]
    return [float(f"{v:.4g}") for v in np.exp(np.linspace(math.log(low), math.log(high), n))]


def default_points(space: SearchSpace, n_lr: int = 6, n_sep: int = 3) -> dict[str, list]:
    """The fine grid for search_spaces/default.yaml (and a fallback for any other space)."""
    points: dict[str, list] = {}
    for p in space.params:
        if p.type == "categorical":
            points[p.key] = list(p.choices)
        elif p.type == "int" and p.log:  # powers of two inside the range (8..256 -> 6 values)
            lo, hi = math.ceil(math.log2(p.low)), math.floor(math.log2(p.high))
            points[p.key] = [2 ** e for e in range(lo, hi + 1)]
        elif p.type == "int":
            points[p.key] = list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
        else:
            n = n_sep if p.when else n_lr
            points[p.key] = (log_points(p.low, p.high, n) if p.log
                             else [float(v) for v in np.linspace(p.low, p.high, n)])
    return points


def enumerate_cells(space: SearchSpace, points: dict[str, list]) -> list[Cell]:
    """Every combination of grid points, with a `when` key present only where it applies."""
    cells: list[Cell] = [()]
    for p in space.params:
        grown = []
        for cell in cells:
            chosen = dict(cell)
            active = not p.when or all(chosen.get(k) in v for k, v in p.when.items())
            grown.extend([cell + ((p.key, v),) for v in points[p.key]] if active else [cell])
        cells = grown
    return cells


def snap_value(value: Any, spec: ParamSpec, grid: Sequence) -> Any:
    """The grid point nearest `value`: exact match for categoricals, in log space for log
    ranges, linear otherwise (ties go to the lower point)."""
    if spec.type == "categorical":
        return value
    if spec.log:
        return min(grid, key=lambda g: abs(math.log(g) - math.log(value)))
    return min(grid, key=lambda g: abs(g - value))


def snap(params: dict[str, Any], space: SearchSpace, points: dict[str, list]) -> Cell:
    return tuple((p.key, snap_value(params[p.key], p, points[p.key]))
                 for p in space.params if p.key in params)


# -- the table -----------------------------------------------------------------------------

@dataclass
class SpaceSetup:
    """What a space's table is trained from; `signature()` decides whether a cache matches."""

    name: str  # label in the output
    space: SearchSpace
    points: dict[str, list]
    overrides: dict[str, Any]  # on top of the space's constants (size, epochs, cache dir)
    note: str = ""

    def cells(self) -> list[Cell]:
        return enumerate_cells(self.space, self.points)

    def config_for(self, cell: Cell):
        from hpn.config import load_config

        return load_config(base={**self.space.constants, **self.overrides, **dict(cell)})

    def signature(self) -> dict[str, Any]:
        flat = self.config_for(self.cells()[0]).to_flat()
        for key in [*self.space.keys(), "encoder.cache_dir", "train.device"]:
            flat.pop(key, None)
        return {"version": TABLE_VERSION, "space": Path(self.space.path).name,
                "space_text": Path(self.space.path).read_text(), "points": self.points,
                "fixed_config": flat}

    def cache_path(self, cache_dir: Path) -> Path:
        digest = hashlib.sha256(json.dumps(self.signature(), sort_keys=True, default=str)
                                .encode()).hexdigest()[:12]
        return cache_dir / f"{self.name}_{digest}.csv"


def _parse(text: str, spec: ParamSpec) -> Any:
    if spec.type == "categorical":
        return next(c for c in spec.choices if str(c) == text)
    return int(text) if spec.type == "int" else float(text)


def write_table(path: Path, space: SearchSpace, table: dict[Cell, dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        keys = [p.key for p in space.params]
        w.writerow([*keys, "status", *METRICS])
        for cell, row in table.items():
            chosen = dict(cell)
            w.writerow([repr(chosen[k]) if isinstance(chosen.get(k), float) else chosen.get(k, "")
                        for k in keys]
                       + [row.get("status", "ok")] + [repr(float(row[m])) for m in METRICS])
    tmp.replace(path)


def read_table(path: Path, space: SearchSpace) -> dict[Cell, dict[str, Any]]:
    table: dict[Cell, dict[str, Any]] = {}
    with path.open(newline="") as f:
        for rec in csv.DictReader(f):
            cell = tuple((p.key, _parse(rec[p.key], p)) for p in space.params if rec[p.key] != "")
            table[cell] = {"status": rec["status"], **{m: float(rec[m]) for m in METRICS}}
    return table


def _log(line: str) -> None:
    print(line, flush=True)


def build_table(setup: SpaceSetup, cache_dir: Path, log: Callable[[str], None] = _log,
                ) -> tuple[dict[Cell, dict[str, Any]], Path, float]:
    """Train every missing cell once (rewriting the CSV after each, so an interrupted run
    resumes); return the table, its path and the seconds spent training now."""
    from hpn.train import NonFiniteLossError, prepare_data, train

    path = setup.cache_path(cache_dir)
    cells = setup.cells()
    table = read_table(path, setup.space) if path.is_file() else {}
    todo = [c for c in cells if c not in table]
    if not todo:
        log(f"[{setup.name}] table: {len(cells)} cells from cache {path}")
        return {c: table[c] for c in cells}, path, 0.0
    log(f"[{setup.name}] table: training {len(todo)} of {len(cells)} cells -> {path}")
    base = setup.config_for(cells[0])
    for key in (p.key for p in setup.space.params):  # one prepare_data per space must serve every cell
        if key.startswith(("data.", "encoder.")):
            raise SystemExit(f"{key} is searched: each cell would need its own embeddings")
    t0 = time.perf_counter()
    data = prepare_data(base)
    log(f"[{setup.name}] data: {len(data.corpus.texts)} texts, {data.features.shape[1]}-d "
        f"embeddings, split {len(data.split.train)}/{len(data.split.val)}/{len(data.split.test)} "
        f"({time.perf_counter() - t0:.1f} s incl. encode or cache hit)")
    started = time.perf_counter()
    for i, cell in enumerate(todo, 1):
        try:
            m = train(setup.config_for(cell), data).metrics
            table[cell] = {"status": "ok", **{k: float(m[k]) for k in METRICS}}
        except NonFiniteLossError:  # a real study records the trial as errored
            table[cell] = {"status": "diverged", "val_accuracy": math.nan,
                           "test_accuracy": math.nan, "runtime_s": math.nan}
        write_table(path, setup.space, table)
        spent = time.perf_counter() - started
        if i in (1, 5) or i % 25 == 0 or i == len(todo):
            log(f"[{setup.name}]   {i}/{len(todo)} cells, {spent:.0f} s, "
                f"~{spent / i * (len(todo) - i):.0f} s left")
    return {c: table[c] for c in cells}, path, time.perf_counter() - started


# -- replay --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerSpec:
    label: str  # column name in the output
    name: str  # tuning.samplers name
    n_startup_trials: int | None = None  # TPE variants only
    tpe_kwargs: tuple = ()  # (key, value) pairs for --tpe-variant (TPESampler arguments)


class CellOrderSampler(optuna.samplers.BaseSampler):
    """Walks given cells in a seeded random order, each once (then from the start again):
    what optuna's GridSampler does, for a fine grid it cannot hold (a conditional key)."""

    def __init__(self, cells: Sequence[Cell], seed: int) -> None:
        order = np.random.default_rng(seed).permutation(len(cells))
        self.cells = [dict(cells[i]) for i in order]

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, name, param_distribution):
        return self.cells[trial.number % len(self.cells)][name]


def sampler_for(spec: SamplerSpec, seed: int, space: SearchSpace,
                cells: Sequence[Cell] = ()) -> optuna.samplers.BaseSampler:
    if spec.name == "cells":
        return CellOrderSampler(cells, seed)
    if spec.tpe_kwargs:
        kwargs: dict[str, Any] = {"multivariate": True, "group": space.conditional,
                                  **dict(spec.tpe_kwargs)}
        if not kwargs["multivariate"] and "group" not in dict(spec.tpe_kwargs):
            kwargs["group"] = False
        with warnings.catch_warnings():  # group is experimental; prior_weight, gamma, ...
            warnings.simplefilter("ignore")  # are deprecated in optuna 4.9+ (still honoured)
            return optuna.samplers.TPESampler(seed=seed, **kwargs)
    if spec.n_startup_trials is None:
        return make_sampler(spec.name, seed, space)
    # hpn-tune's TPE (same arguments as tuning.samplers.make_sampler) with fewer start-up trials.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=space.conditional,
                                          n_startup_trials=spec.n_startup_trials)


def _gamma_fraction(fraction: float, n: int) -> int:
    return min(math.ceil(fraction * n), 25)


_TPE_KEYS = {"mv": ("multivariate", lambda v: bool(int(v))),
             "group": ("group", lambda v: bool(int(v))),
             "startup": ("n_startup_trials", int),
             "ei": ("n_ei_candidates", int),
             "endpoints": ("consider_endpoints", lambda v: bool(int(v))),
             "prior": ("prior_weight", float),
             "gamma": ("gamma", lambda v: optuna.samplers._tpe.sampler.hyperopt_default_gamma
                       if v == "hyperopt" else functools.partial(_gamma_fraction, float(v)))}


def tpe_variant(text: str) -> SamplerSpec:
    """'startup=5,ei=64' -> hpn-tune's TPE with those arguments changed (see the docstring)."""
    pairs = []
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = part.partition("=")
        if key not in _TPE_KEYS or not value:
            raise SystemExit(f"--tpe-variant {text!r}: {part!r}; keys: {', '.join(_TPE_KEYS)}")
        name, conv = _TPE_KEYS[key]
        pairs.append((name, conv(value)))
    if not pairs:
        raise SystemExit(f"--tpe-variant {text!r}: empty")
    return SamplerSpec(f"tpe[{text}]", "tpe", tpe_kwargs=tuple(pairs))


def default_samplers(space: SearchSpace, variants: Sequence[SamplerSpec] = (),
                     variants_only: bool = False) -> list[SamplerSpec]:
    if variants_only:
        return [SamplerSpec("tpe", "tpe"), *variants, SamplerSpec("random", "random")]
    out = [SamplerSpec("tpe", "tpe"), SamplerSpec("tpe startup=5", "tpe", 5),
           SamplerSpec("tpe startup=3", "tpe", 3), SamplerSpec("random", "random"),
           SamplerSpec("cmaes", "cmaes")]
    try:
        space.grid()
        out.append(SamplerSpec("grid (its order)", "grid"))
    except HPNInputError:  # a continuous or conditional space has no optuna grid: walk the fine
        out.append(SamplerSpec("grid (its order)", "cells"))  # grid in a seeded order instead
    return out[:3] + list(variants) + out[3:]


@dataclass
class Replay:
    trials: int | None  # trials until the first near-best cell; None: not within max_trials
    proposed: list[Cell] = field(default_factory=list)


def replay(sampler: optuna.samplers.BaseSampler, space: SearchSpace, points: dict[str, list],
           values: dict[Cell, float], target: float, max_trials: int) -> Replay:
    """Ask/tell one study against the table until a cell with value >= target is proposed.
    A cell without a finite value (diverged) is told as a failed trial, as Ray reports it."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    suggest = space.define_by_run()
    out = Replay(None)
    for n in range(1, max_trials + 1):
        trial = study.ask()
        suggest(trial)
        cell = snap(trial.params, space, points)
        out.proposed.append(cell)
        value = values[cell]
        if math.isfinite(value):
            study.tell(trial, value)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if math.isfinite(value) and value >= target:
            out.trials = n
            return out
    return out


def random_hit_rate(space: SearchSpace, points: dict[str, list], values: dict[Cell, float],
                    target: float, draws: int, seed: int = 12345) -> float:
    """Share of random proposals (the space's own distributions, snapped) that are near-best:
    not 1 / cells, since e.g. each prototype_mode gets half the draws whatever its cell count."""
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    suggest, hits = space.define_by_run(), 0
    for _ in range(draws):
        trial = study.ask()
        suggest(trial)
        v = values[snap(trial.params, space, points)]
        hits += math.isfinite(v) and v >= target
        study.tell(trial, 0.0)
    return hits / draws


def _geo_median(p: float) -> int | float:
    """Median trials to the first hit when each trial hits independently with probability p."""
    if p >= 1:
        return 1
    return math.ceil(math.log(0.5) / math.log(1 - p)) if p > 0 else math.inf


def target_of(values: dict[Cell, float], tolerance: float = TOLERANCE) -> float:
    """Within `tolerance` of the best cell; the epsilon keeps 0.86 - 0.005 from excluding 0.855."""
    return max(v for v in values.values() if math.isfinite(v)) - tolerance - 1e-9


@dataclass
class Summary:
    label: str
    counts: list[float]  # one per seed; max_trials + 1 where not reached
    missed: int
    max_trials: int

    @property
    def median(self) -> float:
        return float(np.median(self.counts))

    @property
    def q25(self) -> float:
        return float(np.percentile(self.counts, 25))

    @property
    def q75(self) -> float:
        return float(np.percentile(self.counts, 75))


def run_replays(spec: SamplerSpec, space: SearchSpace, points: dict[str, list],
                values: dict[Cell, float], seeds: Sequence[int], max_trials: int,
                tolerance: float = TOLERANCE) -> Summary:
    target = target_of(values, tolerance)
    counts, missed = [], 0
    for seed in seeds:
        r = replay(sampler_for(spec, seed, space, list(values)), space, points, values, target,
                   max_trials)
        counts.append(float(r.trials if r.trials is not None else max_trials + 1))
        missed += r.trials is None
    return Summary(spec.label, counts, missed, max_trials)


def fixed_summary(label: str, runs: int, n_seeds: int) -> Summary:
    """A count that does not depend on the seed (the grid study as the seed project ran it)."""
    return Summary(label, [float(runs)] * n_seeds, 0, runs)


# -- output --------------------------------------------------------------------------------

def fmt(x: float, missed_cap: int | None = None) -> str:
    s = f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"
    return f">{missed_cap}" if missed_cap is not None and x > missed_cap else s


def summary_rows(name: str, summaries: list[Summary], within: int = 27) -> list[list[str]]:
    med, iqr, mean, miss, share = [], [], [], [], []
    for s in summaries:
        share.append(f"{sum(c <= within for c in s.counts) / len(s.counts):.0%}")
        cap = s.max_trials
        med.append(fmt(s.median, cap))
        iqr.append(f"{fmt(s.q25, cap)}–{fmt(s.q75, cap)}")
        mean.append(fmt(round(float(np.mean(s.counts)), 1)) + ("" if not s.missed else "*"))
        miss.append(f"{s.missed}/{len(s.counts)}")
    return [[name, "median trials", *med], [name, "IQR (25th–75th)", *iqr],
            [name, "mean", *mean], [name, f"seeds reaching it in <= {within} trials", *share],
            [name, f"not reached in {summaries[0].max_trials}", *miss]]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def ratio(a: Summary, b: Summary) -> str:
    return f"{a.median / b.median:.2f}x"


def cell_label(cell: Cell) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else
                     f"{k.split('.')[-1]}={v}" for k, v in cell)


# -- main ----------------------------------------------------------------------------------

def setups(args: argparse.Namespace) -> list[SpaceSetup]:
    enc_cache = str(Path(args.encoder_cache).resolve())
    out = []
    if args.space_set in ("seed", "both"):
        space = load_space(resolve_space_path("seed_grid"))
        over: dict[str, Any] = {"encoder.cache_dir": enc_cache}
        if args.size:
            over["data.size"] = args.size
        if args.epochs:
            over["train.epochs"] = args.epochs
        out.append(SpaceSetup("seed_grid", space, space.grid(), over,
                              "9 cells of search_spaces/seed_grid.yaml"))
    if args.space_set in ("default", "both"):
        space = load_space(resolve_space_path("default"))
        points = default_points(space, args.lr_points, args.sep_points)
        if args.quick:
            points["model.prototype_dim"] = [8, 32]
            points["model.prototypes_per_class"] = [1, 2]
        over = {"encoder.cache_dir": enc_cache}
        if args.size:
            over["data.size"] = args.size
        epochs = args.default_epochs or args.epochs
        if epochs:
            over["train.epochs"] = epochs
        out.append(SpaceSetup("default", space, points, over,
                              "search_spaces/default.yaml on a fine grid"))
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--space-set", choices=("seed", "default", "both"), default="both")
    ap.add_argument("--seeds", type=int, default=20, help="replays per sampler (seeds 0..N-1)")
    ap.add_argument("--epochs", type=int, help="override train.epochs in every space")
    ap.add_argument("--default-epochs", type=int, help="override train.epochs in the default space")
    ap.add_argument("--size", type=int, help="override data.size in every space")
    ap.add_argument("--lr-points", type=int, default=6, help="log-spaced train.lr grid points")
    ap.add_argument("--sep-points", type=int, default=3, help="log-spaced separation_weight points")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    ap.add_argument("--max-trials", type=int, help="cap per replay (default: 10 x cells, <= 600)")
    ap.add_argument("--cache", default=str(REPO / ".hpn_cache" / "sampler_efficiency"),
                    help="where the cell tables (CSV) are kept and re-used")
    ap.add_argument("--encoder-cache", default=str(REPO / ".hpn_cache"),
                    help="encoder.cache_dir: the embedding cache, re-used between runs")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes for a smoke test: 300 texts, 2 epochs, coarse grid, 3 seeds")
    ap.add_argument("--tpe-variant", action="append", default=[], type=tpe_variant,
                    metavar="SPEC", help="extra TPE row, e.g. 'startup=5,ei=64' (repeatable)")
    ap.add_argument("--variants-only", action="store_true",
                    help="replay only tpe, random and the --tpe-variant rows")
    ap.add_argument("--seed-start", type=int, default=0, help="first replay seed")
    ap.add_argument("--json", help="write the per-seed counts to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.size = args.size or 300
        args.epochs = args.epochs or 2
        args.lr_points, args.sep_points = min(args.lr_points, 2), min(args.sep_points, 1)
        args.seeds = min(args.seeds, 3)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    header: list[str] = []
    rows: list[list[str]] = []
    notes: list[str] = []
    extra_rows: list[list[str]] = []
    extra_notes: list[str] = []
    results: dict[str, Any] = {}
    for setup in setups(args):
        table, path, trained_s = build_table(setup, Path(args.cache))
        values = {c: r["val_accuracy"] for c, r in table.items()}
        target = target_of(values, args.tolerance)
        ok = {c: v for c, v in values.items() if math.isfinite(v)}
        best = max(ok, key=ok.get)
        near = [c for c, v in ok.items() if v >= target]
        cfg = setup.config_for(best)
        n = len(table)
        runtime = [r["runtime_s"] for r in table.values() if math.isfinite(r["runtime_s"])]
        print(f"\n[{setup.name}] {setup.note}: {n} cells, data.size {cfg.data.size}, "
              f"train.epochs {cfg.train.epochs}, batch {cfg.train.batch_size}; "
              f"training {sum(runtime):.0f} s summed (this run trained for {trained_s:.0f} s)")
        print(f"[{setup.name}] best val_accuracy {ok[best]:.4f} ({cell_label(best)}; its test "
              f"{table[best]['test_accuracy']:.4f}); {len(near)}/{n} cells within "
              f"{args.tolerance} of it; diverged {n - len(ok)}; "
              f"val range {min(ok.values()):.4f}..{ok[best]:.4f}")
        if n <= 12:
            print(markdown(["cell", "val_accuracy", "test_accuracy", "runtime_s"],
                           [[cell_label(c), f"{r['val_accuracy']:.4f}", f"{r['test_accuracy']:.4f}",
                             f"{r['runtime_s']:.1f}"] for c, r in table.items()]))
        max_trials = args.max_trials or min(10 * n, 600)
        p_hit = len(near) / n
        geo_median = _geo_median(p_hit)
        draws = 200 if args.quick else 4000
        rate = random_hit_rate(setup.space, setup.points, values, target, draws)
        print(f"[{setup.name}] {len(near)} near-best of {n} cells: a uniform draw over the cells "
              f"would need mean {1 / p_hit:.1f}, median {geo_median} trials; a random proposal "
              f"from the space's own distributions hits with p = {rate:.3f} ({draws} draws: mean "
              f"{1 / rate if rate else math.inf:.1f}, median {_geo_median(rate)}); replays capped "
              f"at {max_trials}")
        tols = [(args.tolerance, rows, notes)]
        if len(near) == len(ok):  # every cell is near-best: the main count is 1 for everyone
            exact = [c for c, v in ok.items() if v >= target_of(values, 0.0)]
            print(f"[{setup.name}] every cell is within {args.tolerance} of the best, so every "
                  f"sampler needs 1 trial; supplementary: the exact best val_accuracy "
                  f"(tolerance 0, {len(exact)} of {n} cells)")
            tols.append((0.0, extra_rows, extra_notes))
        results[setup.name] = {"cells": n, "table": str(path), "best_val": ok[best],
                               "near_best": len(near), "epochs": cfg.train.epochs,
                               "size": cfg.data.size}
        for tol, out_rows, out_notes in tols:
            by = compare(setup, values, seeds, max_trials, tol,
                         default_samplers(setup.space, args.tpe_variant, args.variants_only))
            labels = list(by)
            if not header:
                header[:] = ["space", "measure", *labels]
            for lab in labels:
                if lab not in header:
                    header.append(lab)
            name = f"{setup.name} ({n} cells)" + ("" if tol == args.tolerance else f", tol {tol:g}")
            out_rows += _rows_with_gaps(name, [by.get(lab) for lab in header[2:]])
            out_notes += ratio_notes(name, by)
            results[setup.name][f"tolerance {tol:g}"] = {
                lab: {"median": s.median, "q25": s.q25, "q75": s.q75, "missed": s.missed,
                      "counts": s.counts} for lab, s in by.items()}
    print(f"\nTrials to come within {args.tolerance} of the best cell's val_accuracy, "
          f"{len(seeds)} seeds per sampler (a repeated cell counts as a trial):\n")
    print(markdown(header, [r + ["–"] * (len(header) - len(r)) for r in rows]))
    print("\nRatios of medians:")
    for line in notes:
        print(f"- {line}")
    if extra_rows:
        print("\nSupplementary: trials to propose a cell with the exact best val_accuracy "
              "(tolerance 0), for spaces where every cell is within the tolerance:\n")
        print(markdown(header, [r + ["–"] * (len(header) - len(r)) for r in extra_rows]))
        print("\nRatios of medians:")
        for line in extra_notes:
            print(f"- {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": seeds, **results}, indent=1))
    return results


def compare(setup: SpaceSetup, values: dict[Cell, float], seeds: Sequence[int],
            max_trials: int, tolerance: float,
            specs: Sequence[SamplerSpec] | None = None) -> dict[str, Summary]:
    """Every sampler's replays on one table, plus the seed grid as the seed ran it."""
    by: dict[str, Summary] = {}
    for spec in default_samplers(setup.space) if specs is None else specs:
        t0 = time.perf_counter()
        by[spec.label] = run_replays(spec, setup.space, setup.points, values, seeds, max_trials,
                                     tolerance)
        print(f"[{setup.name}] tol {tolerance:g}: replayed {spec.label:<16} x {len(seeds)} "
              f"seeds: median {by[spec.label].median:g} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    if setup.name == "seed_grid":
        by[AS_RUN] = fixed_summary(AS_RUN, len(values) * SEED_GRID_REPEATS, len(seeds))
    return by


def ratio_notes(name: str, by: dict[str, Summary]) -> list[str]:
    out = []
    tpe_labels = [lab for lab in by if lab == "tpe" or lab.startswith(("tpe startup=", "tpe["))]
    for tpe_label in tpe_labels:
        t = by[tpe_label]
        parts = [f"random/{tpe_label} {ratio(by['random'], t)}"]
        parts += [f"{g}/{tpe_label} {ratio(by[g], t)}" for g in ("grid (its order)", AS_RUN)
                  if g in by]
        out.append(f"{name}: " + ", ".join(parts))
    return out


def _rows_with_gaps(name: str, summaries: list[Summary | None]) -> list[list[str]]:
    present = [s for s in summaries if s is not None]
    full = summary_rows(name, present)
    out = []
    for row in full:
        vals = iter(row[2:])
        out.append(row[:2] + [next(vals) if s is not None else "–" for s in summaries])
    return out


if __name__ == "__main__":
    main()
