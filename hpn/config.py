"""One run's configuration: dataclasses with commented defaults, dotted keys, validation.

A YAML file gives the defaults a user wants, `--set key=value` goes on top, and the
resolved config is saved beside results. Every check names the dotted key, so a user can
fix it from the one-line error alone.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from hpn.errors import ConfigError
from hpn.tasks import TASKS, loss_problem

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | file | personahub
    path: str | None = None  # local JSONL / CSV / Parquet for source=file (or a PersonaHub copy)
    text_column: str = "text"  # PersonaHub's persona subset calls it "persona"
    label_column: str = "label"
    target_column: str = "target"  # numeric target of a local file (regression, joint)
    label_separator: str = "|"  # multilabel: a text label cell is split on it (a list cell is not)
    labels: str = "column"  # column | keywords | elite_domain (how labels are derived)
    size: int = 3000  # synthetic corpus size, or a cap on rows read (0 = all)
    seed: int = 0  # corpus generation and split seed
    noise: float = 0.05  # synthetic label noise: fraction of labels flipped
    val_fraction: float = 0.15
    test_fraction: float = 0.15


@dataclass
class EncoderConfig:
    name: str = DEFAULT_ENCODER  # any HF id or local path; the default is bundled offline
    max_length: int = 128
    pooling: str = "mean"  # mean | cls
    trainable_layers: int = 0  # > 0 fine-tunes the top k layers (no embedding cache)
    batch_size: int = 128  # encoding batch size
    cache_dir: str = ".hpn_cache"
    runtime: str = "torch"  # torch | onnx | onnx-int8 (ONNX Runtime on the CPU; frozen encoder only)


@dataclass
class ModelConfig:
    task: str = "classification"  # classification | regression | multilabel | joint
    prototype_dim: int = 64
    prototypes_per_class: int = 1
    prototype_count: int = 0  # total prototypes (the seed's num_prototypes); 0 = classes x per class
    prototype_assignment: str = "per_class"  # per_class | extra_negatives (the seed: C + rest)
    prototype_mode: str = "fixed"  # fixed (the paper) | learned (the seed project)
    loss: str = "auto"  # auto (per task) | squared_cosine | cross_entropy | binary_cross_entropy
    temperature: float = 0.1  # cosine scale for cross-entropy
    decision: str = "auto"  # multilabel: auto | threshold | top_k, chosen on validation
    sparsity: str = "dense"  # dense | block | random: fixed mask on the heads' projection (hpn/sparse.py)
    density: float = 1.0  # fraction kept: of 4x4 weight blocks (block) or of weights (random)


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9
    weight_decay: float = 0.0
    separation_weight: float = 0.1  # learned prototypes only
    regression_weight: float = 1.0  # joint: loss = classification + weight x regression
    amp: bool = True  # fp16 + GradScaler on CUDA, bf16 autocast on CPU
    seed: int = 0
    class_weights: bool = True  # inverse-frequency weights against class imbalance
    device: str = "auto"  # auto | cpu | cuda
    max_steps: int = 0  # > 0 caps optimiser steps per epoch (smoke tests, fine-tuning)
    measure_latency: bool = True  # time the trained model's CPU predictions (hpn/latency.py)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_flat(self) -> dict[str, Any]:
        """Dotted keys -> values: what MLflow logs as params and Tune searches over."""
        return {
            f"{section.name}.{f.name}": getattr(getattr(self, section.name), f.name)
            for section in dataclasses.fields(self)
            for f in dataclasses.fields(getattr(self, section.name))
        }

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def with_updates(self, updates: dict[str, Any]) -> Config:
        """A copy with dotted-key updates applied (values coerced to the field's type)."""
        cfg = from_dict(self.to_dict())
        for key, value in updates.items():
            _set(cfg, key, value)
        validate(cfg)
        return cfg


CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("synthetic", "file", "personahub"),
    "data.labels": ("column", "keywords", "elite_domain"),
    "encoder.pooling": ("mean", "cls"),
    "encoder.runtime": ("torch", "onnx", "onnx-int8"),  # hpn.runtimes.RUNTIMES
    "model.prototype_mode": ("fixed", "learned"),
    "model.prototype_assignment": ("per_class", "extra_negatives"),
    "model.task": TASKS,
    "model.loss": ("auto", "squared_cosine", "cross_entropy", "binary_cross_entropy"),
    "model.decision": ("auto", "threshold", "top_k"),
    "model.sparsity": ("dense", "block", "random"),  # hpn.sparse.SPARSITIES
    "train.optimizer": ("sgd", "adam"),
    "train.device": ("auto", "cpu", "cuda"),
}

#: (key, lowest allowed, strictly greater?) for numeric bounds.
BOUNDS: tuple[tuple[str, float, bool], ...] = (
    ("data.size", 0, False),
    ("data.seed", 0, False),
    ("train.seed", 0, False),
    ("data.noise", 0, False),
    ("data.val_fraction", 0, True),
    ("data.test_fraction", 0, True),
    ("encoder.max_length", 8, False),
    ("encoder.trainable_layers", 0, False),
    ("encoder.batch_size", 1, False),
    ("model.prototype_dim", 2, False),
    ("model.prototypes_per_class", 1, False),
    ("model.prototype_count", 0, False),
    ("model.temperature", 0, True),
    ("model.density", 0, True),
    ("train.epochs", 1, False),
    ("train.batch_size", 1, False),
    ("train.lr", 0, True),
    ("train.momentum", 0, False),
    ("train.weight_decay", 0, False),
    ("train.separation_weight", 0, False),
    ("train.regression_weight", 0, False),
    ("train.max_steps", 0, False),
)


def known_keys() -> list[str]:
    return sorted(Config().to_flat())


def _coerce(key: str, value: Any, default: Any) -> Any:
    """`value` as the type of the field's default (a None default takes text or None)."""
    kind = type(default) if default is not None else str
    if value is None:
        if default is None:
            return None
        raise ConfigError(f"{key}: needs a value, got null; give one or drop the key "
                          "for its default")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind in (int, float):
        number = _number(value)
        what = "an integer" if kind is int else "a number"
        if number is None:
            raise ConfigError(f"{key}: expected {what}, got {value!r}")
        if kind is float:
            try:
                number = float(number)
            except OverflowError:  # an int past float's range
                number = math.inf
        if isinstance(number, float) and not math.isfinite(number):
            # inf and nan would pass every bound in validate (nan <= 0 is False)
            raise ConfigError(f"{key}: must be a finite number, got {value!r}; give {what} "
                              f"(its default is {default})")
        if isinstance(number, float) and kind is int and not number.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return kind(number)
    return str(value)


def _number(value: Any) -> int | float | None:
    """An int or float from a number or its text ("1e-3", which YAML 1.1 reads as text);
    None for anything else, a bool included. Ints stay exact: a seed past 2**53 would not
    survive float()."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _set(cfg: Config, key: str, value: Any) -> None:
    section_name, _, name = key.partition(".")
    section = getattr(cfg, section_name, None) if name else None
    if section is None or not dataclasses.is_dataclass(section) or not hasattr(section, name):
        close = difflib.get_close_matches(key, known_keys(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see README's config key table"
        raise ConfigError(f"unknown config key {key!r}; {hint}")
    setattr(section, name, _coerce(key, value, getattr(type(section)(), name)))


def from_dict(tree: dict[str, Any]) -> Config:
    """Build a Config from nested sections ({'train': {'lr': 0.1}}) or dotted keys."""
    cfg = Config()
    for key, value in _flatten(tree):
        _set(cfg, key, value)
    return cfg


def _flatten(tree: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and "." not in str(key) and not prefix:
            yield from _flatten(value, f"{dotted}.")
        else:
            yield dotted, value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.1` -> ('train.lr', 0.1); the value is read as YAML so 1e-3 is a float."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


def available_presets() -> list[str]:
    return sorted(f.stem for f in PRESETS_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file, or a preset's bare name (`seed` -> presets/seed.yaml)."""
    p = Path(path).expanduser()
    if p.is_file() or len(p.parts) > 1 or p.suffix in (".yaml", ".yml"):
        return p
    preset = PRESETS_DIR / f"{p.name}.yaml"
    return preset if preset.is_file() else p


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file (or preset name) as {dotted key: value} (sections or dotted keys)."""
    p = resolve_config_path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; pass an existing YAML file or a "
                          f"preset ({', '.join(available_presets())})")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections/keys")
    return dict(_flatten(tree))


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                base: dict[str, Any] | None = None) -> Config:
    """Defaults, then `base` (e.g. a study's fixed keys), the YAML file, `--set`; validated."""
    cfg = Config()
    layers = [base or {}, read_config_file(path) if path is not None else {},
              dict(parse_override(item) for item in overrides)]
    for layer in layers:
        for key, value in layer.items():
            _set(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first bad key and what would be accepted."""
    flat = cfg.to_flat()
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}: unknown value {flat[key]!r}; choose one of {', '.join(choices)}")
    for key, low, strict in BOUNDS:
        value = flat[key]
        if (value <= low) if strict else (value < low):
            op = ">" if strict else ">="
            raise ConfigError(f"{key}: must be {op} {low:g}, got {value!r}")
    if flat["data.val_fraction"] + flat["data.test_fraction"] >= 0.9:
        raise ConfigError("data.val_fraction + data.test_fraction: must be < 0.9 to leave a training split")
    if flat["data.noise"] >= 1:
        raise ConfigError(f"data.noise: must be < 1, got {flat['data.noise']!r}")
    if flat["train.momentum"] >= 1:
        raise ConfigError(f"train.momentum: must be < 1 (SGD's steps grow without bound), "
                          f"got {flat['train.momentum']!r}")
    for key in ("data.seed", "train.seed"):  # the study's --seed range (torch's ends at 2**64)
        if flat[key] >= 2**32:
            raise ConfigError(f"{key}: must be between 0 and 2**32 - 1, got {flat[key]}")
    if flat["model.prototype_count"] > 0 and flat["model.prototypes_per_class"] != 1:
        raise ConfigError(
            "model.prototype_count: set either the total count or model.prototypes_per_class, "
            f"not both (got {flat['model.prototype_count']} and {flat['model.prototypes_per_class']})")
    if flat["model.prototype_assignment"] == "extra_negatives" and flat["model.prototype_count"] == 0:
        raise ConfigError("model.prototype_assignment=extra_negatives: needs model.prototype_count "
                          "(the total, e.g. 100); set it")
    if flat["model.prototype_assignment"] == "extra_negatives" and flat["model.loss"] == "squared_cosine":
        raise ConfigError("model.loss=squared_cosine: pulls each text to its class's prototype only, "
                          "so extra negatives would never train; use model.loss=cross_entropy")
    if flat["model.density"] > 1:
        raise ConfigError(f"model.density: must be <= 1 (the fraction of weights or blocks kept), "
                          f"got {flat['model.density']!r}")
    if flat["model.sparsity"] == "dense" and flat["model.density"] < 1:
        # Silently dense would report a sparse run that never was. The converse (block or
        # random at density 1, an all-ones mask) is allowed: a search can reach 1 and a space
        # that searches the sparsity alone still validates at the default density.
        raise ConfigError(f"model.density={flat['model.density']:g}: has no effect with "
                          "model.sparsity=dense; set model.sparsity=block or random, or density 1")
    if problem := loss_problem(flat["model.task"], flat["model.loss"]):
        raise ConfigError(problem)
    if flat["encoder.runtime"] != "torch" and flat["encoder.trainable_layers"] > 0:
        raise ConfigError(
            f"encoder.runtime={flat['encoder.runtime']}: runs a frozen encoder, but "
            f"encoder.trainable_layers={flat['encoder.trainable_layers']} fine-tunes it; set "
            "encoder.runtime=torch (and export the trained model: hpn-tune export --format onnx)")
    if not flat["data.label_separator"]:
        raise ConfigError("data.label_separator: must not be empty; give the text between labels "
                          "in a label cell, e.g. '|'")
    if not flat["data.target_column"].strip():
        raise ConfigError("data.target_column: must not be empty; name the file's numeric column")
    if flat["data.source"] == "file" and not flat["data.path"]:
        raise ConfigError("data.path: required when data.source=file; set it to a JSONL, CSV or Parquet file")
    if flat["data.source"] == "synthetic" and flat["data.size"] < 100:
        raise ConfigError(f"data.size: the synthetic corpus needs >= 100 texts, got {flat['data.size']}")
