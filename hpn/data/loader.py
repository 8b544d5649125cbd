"""`load_corpus(cfg)`: the one entry point from a DataConfig to a validated Corpus."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpn.data.corpus import Corpus
from hpn.data.files import corpus_from_file
from hpn.data.personahub import load_personahub
from hpn.data.synthetic import synthetic_corpus
from hpn.errors import DataError

if TYPE_CHECKING:
    from hpn.config import DataConfig


def load_corpus(cfg: DataConfig) -> Corpus:
    """Dispatch on `data.source`; every failure is a one-line DataError naming the fix."""
    try:
        return _load(cfg)
    except DataError as exc:
        if cfg.path and cfg.source != "synthetic" and str(cfg.path) not in str(exc):
            raise DataError(f"data.path={cfg.path!r}: {exc}") from None  # say which file
        raise


def _load(cfg: DataConfig) -> Corpus:
    if cfg.source == "synthetic":
        return synthetic_corpus(cfg.size, seed=cfg.seed, noise=cfg.noise)
    if cfg.source == "file":
        if not cfg.path:
            raise DataError(
                "data.path: required when data.source=file; set it to a JSONL, CSV or Parquet file"
            )
        if cfg.labels != "column":  # keywords / elite_domain derive labels as for PersonaHub
            return load_personahub(cfg)
        return corpus_from_file(cfg.path, cfg.text_column, cfg.label_column, cfg.size, cfg.seed)
    if cfg.source == "personahub":
        return load_personahub(cfg)
    raise DataError(
        f"data.source: unknown value {cfg.source!r}; choose one of synthetic, file, personahub"
    )
