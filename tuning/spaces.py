"""Search spaces: one YAML file per study, turned into an Optuna define-by-run function.

A key is a dotted config key; its value is a constant (fixed for the study) or a mapping:
`{type: int|float, low, high, step?, log?}` or `{type: categorical, choices}`, either with
`when: {earlier.categorical: value or [values]}`. Keys are suggested in file order. A top-level
`preset: NAME` (a file in presets/, e.g. `seed`) makes that preset's keys the space's constants,
under the space's own.  Every value
a space can produce is checked against the Config at load: a bad range fails now, not in trial 37.
`model.task` may be a constant but is never searched: a study has one task, whose primary
metric and direction drive its sampler, scheduler and best trial.
"""
from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hpn.config import Config, known_keys, read_config_file
from hpn.errors import ConfigError, HPNInputError

if TYPE_CHECKING:
    import optuna

SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
_FIELDS = {"int": ("low", "high", "step", "log"), "categorical": ("choices",)}
_FIELDS["float"] = _FIELDS["int"]
#: Config keys a space may set as a constant but never search (why, for the refusal).
UNSEARCHABLE = {
    "model.task": ("a study has one task (its primary metric and direction drive the sampler, "
                   "ASHA and the best trial); set it with --set model.task=... or as a constant "
                   "of the space (model.task: regression), and run one study per task"),
}


@dataclass(frozen=True)
class ParamSpec:
    key: str
    type: str  # int | float | categorical
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple | None = None
    when: dict[str, tuple] | None = None  # earlier categorical key -> values that enable this


@dataclass(frozen=True)
class SearchSpace:
    path: str
    params: tuple[ParamSpec, ...]
    constants: dict[str, Any]
    summary: str  # the file's leading comment: scientific / nuisance / fixed

    def define_by_run(self) -> Callable[[optuna.Trial], dict[str, Any]]:
        """For Ray's OptunaSearch: suggests the params, returns the constants. A partial, not
        a closure: OptunaSearch.save() pickles it with plain pickle at each checkpoint."""
        return functools.partial(_suggest_all, self.params, dict(self.constants))

    def grid(self) -> dict[str, list]:
        """Every value of every param, for optuna's GridSampler."""
        for p in self.params:
            why = ("a grid cannot hold a conditional key; drop `when`" if p.when else
                   f"a {p.type} range without `step` has no grid; add `step` or list `choices`"
                   if p.type != "categorical" and p.step is None else "")
            if why:
                raise HPNInputError(f"search space {self.path!r}: {p.key}: {why}, or use "
                                    "another --sampler")
        return {p.key: list(p.choices) if p.choices else _steps(p) for p in self.params}

    def base_values(self) -> dict[str, Any]:
        """The constants plus each unconditional searched key at its first value: a config
        that validates (extra negatives need a count even before a trial picks one). Every
        trial replaces those keys with its own; a conditional key keeps its default, which is
        what a trial without it runs with."""
        firsts = {p.key: _first_value(p) for p in self.params if not p.when}
        return {**firsts, **self.constants}

    def keys(self) -> list[str]:
        """The searched keys in suggestion order (the fixed ones are in `constants`)."""
        return [p.key for p in self.params]

    @property
    def conditional(self) -> bool:
        return any(p.when for p in self.params)


def _suggest(trial: Any, p: ParamSpec) -> Any:
    if p.type == "int":
        return trial.suggest_int(p.key, p.low, p.high, step=p.step or 1, log=p.log)
    if p.type == "float":
        return trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
    return trial.suggest_categorical(p.key, p.choices)


def _suggest_all(params: tuple[ParamSpec, ...], constants: dict[str, Any], trial: Any) -> dict:
    chosen: dict[str, Any] = {}
    for p in params:
        if not p.when or all(k in chosen and chosen[k] in v for k, v in p.when.items()):
            chosen[p.key] = _suggest(trial, p)
    return dict(constants)


def _steps(p: ParamSpec) -> list:
    n = int((p.high - p.low) / p.step + 1e-9)
    ints = p.type == "int"  # round floats so 0.1 + 2 * 0.1 reads 0.3, as the YAML meant
    return [p.low + i * p.step if ints else round(p.low + i * p.step, 12) for i in range(n + 1)]


def available_spaces() -> list[str]:
    return sorted(f.stem for f in SPACES_DIR.glob("*.yaml"))


def resolve_space_path(name_or_path: str | Path | None) -> Path:
    """None -> the default space; a bare name ("seed_grid") -> search_spaces/seed_grid.yaml."""
    if name_or_path is None:
        return SPACES_DIR / "default.yaml"
    p = Path(name_or_path).expanduser()
    if p.is_file() or len(p.parts) > 1:
        return p
    return SPACES_DIR / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")


def load_space(path: str | Path) -> SearchSpace:
    p = Path(path)

    def fail(msg: str) -> HPNInputError:
        return HPNInputError(f"search space {str(p)!r}: {msg}")

    if not p.is_file():
        raise fail(f"file not found; pass a YAML file or one of: {', '.join(available_spaces())}")
    try:
        tree = yaml.safe_load(text := p.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", -1) + 1
        raise fail(f"not valid YAML (near line {line}); fix the syntax") from None
    if not isinstance(tree, dict) or not tree:
        raise fail(f"{'is not a mapping' if tree else 'is empty'}; map dotted config keys to "
                   "constants or ranges, e.g. train.lr: {type: float, low: 0.001, high: 0.5}")
    known = known_keys()
    params: list[ParamSpec] = []
    constants: dict[str, Any] = {}
    if "preset" in tree:
        try:
            constants.update(read_config_file(str(tree.pop("preset"))))
        except ConfigError as exc:
            raise fail(f"preset: {exc}") from None
    for key, value in tree.items():
        key = str(key)
        if key in UNSEARCHABLE and isinstance(value, (dict, list)):
            raise ConfigError(f"search space {str(p)!r}: {key} cannot be searched: "
                              f"{UNSEARCHABLE[key]}")
        if key not in known:
            raise fail(f"unknown config key {key!r}; {_closest(key, known)}")
        if isinstance(value, dict):
            params.append(_param(fail, key, value, params))
            constants.pop(key, None)  # searched here, whatever the preset fixed
        elif isinstance(value, list):
            raise fail(f"{key}: a list is not a constant; to search it write "
                       f"{{type: categorical, choices: {value}}}")
        else:
            constants[key] = value
    if not params:
        raise fail("searches nothing (every key is a constant); make at least one key a "
                   "{type: int|float|categorical, ...} mapping")
    # Constants may need a searched key (extra negatives need a count): what fails alone is
    # tried again with every searched key at its first value.
    firsts = {**constants, **{p.key: _first_value(p) for p in params}}
    try:
        _validates(constants, firsts)
    except ConfigError as exc:
        raise fail(f"{exc} (a constant); fix its value") from None
    for spec in params:
        # A conditional key is only ever tried with the keys it depends on enabling it.
        enabled = {ref: values[0] for ref, values in (spec.when or {}).items()}
        _check_values(fail, spec, constants, {**firsts, **enabled})
    return SearchSpace(str(p), tuple(params), constants, _summary(text))


def _first_value(p: ParamSpec) -> Any:
    return p.choices[0] if p.choices else p.low


def _closest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else "use a dotted key such as model.prototype_dim"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(v: Any) -> Any:
    """A bound as a number: YAML 1.1 reads `1e-3` (no dot) as text; anything else as given."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def _finite(v: float) -> bool:
    """Not inf or nan, nor an int past float's range (Optuna keeps every value as a float)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _yaml(v: float) -> str:
    """A non-finite value as a YAML file spells it."""
    if isinstance(v, int):
        return f"an integer of {len(str(v))} digits"
    return ".nan" if math.isnan(v) else ".inf" if v > 0 else "-.inf"


def _param(fail: Callable, key: str, spec: dict, earlier: list[ParamSpec]) -> ParamSpec:
    kind = spec.get("type")
    if kind not in _FIELDS:
        got = "has no type" if kind is None else f"unknown type {kind!r}"
        raise fail(f"{key}: {got}; use type: int, float or categorical")
    extra = sorted(set(map(str, spec)) - set(_FIELDS[kind]) - {"type", "when"})
    if extra:
        takes = ", ".join(_FIELDS[kind])
        raise fail(f"{key}: unknown field {extra[0]!r}; type {kind} takes {takes}, when")
    when = _when(fail, key, spec.get("when"), earlier)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"{key}: choices must be a non-empty list, e.g. choices: [a, b]")
        plain = all(isinstance(c, (str, int, float, bool)) for c in choices)
        if not plain or len(set(choices)) != len(choices):
            raise fail(f"{key}: choices must be distinct strings or numbers, got {choices}")
        for c in choices:
            if _is_number(c) and not _finite(c):
                raise fail(f"{key}: choice {_yaml(c)} is not a finite number; choices must be "
                           "finite numbers or strings")
        return ParamSpec(key, kind, choices=tuple(choices), when=when)

    default = Config().to_flat()[key]
    if not _is_number(default):
        raise fail(f"{key} is not a number; search it with type: categorical")
    if isinstance(default, int) and kind == "float":
        raise fail(f"{key} is an integer setting; use type: int")
    low, high, step = (_number(spec.get(f)) for f in ("low", "high", "step"))
    log = spec.get("log")
    log = bool(log) if log is None else log
    for name, v in (("low", low), ("high", high), ("step", step)):
        if (v is not None or name != "step") and not _is_number(v):
            raise fail(f"{key}: {name} must be a number, got {spec.get(name)!r}")
        if v is not None and not _finite(v):  # nan passes every comparison below
            rule = "step must be a finite number > 0" if name == "step" else \
                "bounds must be finite numbers"
            raise fail(f"{key}: {name} is {_yaml(v)}; {rule}")
        if kind == "int" and isinstance(v, float) and not v.is_integer():
            raise fail(f"{key}: {name} must be an integer for type int, got {v!r}")
    for failed, msg in (
        (low >= high, f"low ({low}) must be < high ({high}); widen it or make the key a constant"),
        (not isinstance(log, bool), f"log must be true or false, got {log!r}"),
        (log is True and low <= 0, f"a log range needs low > 0, got {low}; raise low or drop log"),
        (step is not None and step <= 0, f"step must be > 0, got {step}"),
        (step is not None and log is True, "step and log: true cannot be combined; drop one"),
        (step is not None and step > high - low, (f"step ({step}) is wider than the range "
         f"{low}..{high}; only low would be tried, so shrink step or make the key a constant")),
    ):
        if failed:
            raise fail(f"{key}: {msg}")
    cast = int if kind == "int" else float
    return ParamSpec(key, kind, cast(low), cast(high), step and cast(step), log, when=when)


def _when(fail: Callable, key: str, when: Any, earlier: list[ParamSpec]) -> dict | None:
    if when is None:
        return None
    if not isinstance(when, dict) or not when:
        raise fail(f"{key}: when must map a categorical key above it to a value or list, "
                   "e.g. when: {model.prototype_mode: learned}")
    above = {p.key: p for p in earlier}
    out: dict[str, tuple] = {}
    for ref, values in when.items():
        ref = str(ref)
        if ref not in above:
            hint = (f"define {ref} as a categorical before {key}" if ref in known_keys()
                    else f"unknown key; {_closest(ref, known_keys())}")
            raise fail(f"{key}: when refers to {ref!r}, not a searched key above it; {hint}")
        target = above[ref]
        if target.type != "categorical":
            raise fail(f"{key}: when can only test a categorical key, and {ref} is {target.type}")
        values = tuple(values) if isinstance(values, list) else (values,)
        bad = [v for v in values if v not in target.choices]
        if bad:
            raise fail(f"{key}: when {ref}: {bad[0]!r} is not one of {list(target.choices)}")
        out[ref] = values
    return out


def _validates(updates: dict[str, Any], fallback: dict[str, Any]) -> None:
    """Raise the ConfigError of `updates` unless they or `fallback` (the same with the other
    searched keys at their first values) validate."""
    try:
        Config().with_updates(updates)
    except ConfigError:
        try:
            Config().with_updates(fallback)
        except ConfigError:
            pass
        else:
            return
        raise


def _check_values(fail: Callable, p: ParamSpec, constants: dict[str, Any],
                  firsts: dict[str, Any]) -> None:
    """Both ends of a range (config bounds are one-sided) and every choice must validate."""
    named = ([(f"choice {c!r}", c) for c in p.choices] if p.type == "categorical"
             else [(f"low {p.low!r}", p.low), (f"high {p.high!r}", p.high)])
    for what, value in named:
        try:
            _validates({**constants, p.key: value}, {**firsts, p.key: value})
        except ConfigError as exc:
            reason = str(exc).removeprefix(f"{p.key}: ")
            fix = "remove it from choices" if p.type == "categorical" else "narrow the range"
            raise fail(f"{p.key}: {what} is rejected by the config ({reason}); {fix}") from None


def _summary(text: str) -> str:
    lines: list[str] = []
    for line in map(str.strip, text.splitlines()):
        if line and not line.startswith("#") and line != "---":
            break
        lines.append(line[1:].removeprefix(" ").rstrip())
    return "\n".join(lines).strip()
