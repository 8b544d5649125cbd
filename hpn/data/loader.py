"""`load_corpus(cfg, task)`: the one entry point from a DataConfig to a validated Corpus."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpn.data.corpus import Corpus
from hpn.data.files import corpus_from_file
from hpn.data.personahub import load_personahub
from hpn.data.synthetic import synthetic_corpus
from hpn.errors import DataError
from hpn.tasks import CLASSIFICATION, task_spec

if TYPE_CHECKING:
    from hpn.config import DataConfig


def load_corpus(cfg: DataConfig, task: str = CLASSIFICATION) -> Corpus:
    """Dispatch on `data.source`, then keep the view `task` (`model.task`) trains on; every
    failure is a one-line DataError naming the fix."""
    task_spec(task)  # an unknown task is a ConfigError before any file is read
    try:
        return _load(cfg, task).for_task(task)
    except DataError as exc:
        if cfg.path and cfg.source != "synthetic" and str(cfg.path) not in str(exc):
            raise DataError(f"data.path={cfg.path!r}: {exc}") from None  # say which file
        raise


def _load(cfg: DataConfig, task: str) -> Corpus:
    if cfg.source == "synthetic":
        target = task_spec(task).uses_target
        return synthetic_corpus(cfg.size, seed=cfg.seed, noise=cfg.noise, target=target)
    if cfg.source == "file":
        if not cfg.path:
            raise DataError(
                "data.path: required when data.source=file; set it to a JSONL, CSV or Parquet file"
            )
        if cfg.labels != "column":  # keywords / elite_domain derive labels as for PersonaHub
            return load_personahub(cfg, task)
        return corpus_from_file(
            cfg.path, cfg.text_column, cfg.label_column, cfg.size, cfg.seed, task=task,
            target_column=cfg.target_column, label_separator=cfg.label_separator,
        )
    if cfg.source == "personahub":
        return load_personahub(cfg, task)
    raise DataError(
        f"data.source: unknown value {cfg.source!r}; choose one of synthetic, file, personahub"
    )
