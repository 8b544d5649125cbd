"""Hyperspherical Prototype Networks (Mettes et al., NeurIPS 2019) for persona text.

`hpn` holds the model only: data, encoder, prototypes, head, training. It never imports
ray, optuna or mlflow; the `tuning` package wires it to those.
"""
from __future__ import annotations

from hpn.errors import ConfigError, DataError

__all__ = ["ConfigError", "DataError"]
