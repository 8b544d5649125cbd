"""The regression and multi-label losses, and the target <-> cosine map of a regression output.

Classification's losses (the paper's squared cosine, cross-entropy) stay in `hpn.train`.
Regression (Mettes et al. 2019): a target y in [lo, hi] (the training split's range) becomes
the cosine t = 2 (y - lo) / (hi - lo) - 1 with the upper prototype; the loss is the mean of
(cos - t)^2 and a prediction maps the cosine back, y = lo + (cos + 1) / 2 (hi - lo).
Multi-label: binary cross-entropy on each label's score (cosine) / temperature.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["cosine_to_value", "label_pos_weight", "multilabel_loss", "regression_loss",
           "value_to_cosine"]


def value_to_cosine(y, low: float, high: float):
    """Target values -> target cosines: low -> -1, high -> +1 (linear; outside the range
    goes past +-1). Works on numpy arrays, tensors and floats."""
    return 2.0 * (y - low) / (high - low) - 1.0


def cosine_to_value(cos, low: float, high: float):
    """Cosines with the upper prototype -> predicted target values in [low, high]."""
    return low + (cos + 1.0) / 2.0 * (high - low)


def regression_loss(cos: torch.Tensor, target_cos: torch.Tensor) -> torch.Tensor:
    """The paper's regression loss: mean over the batch of (cos(z, p_up) - t)^2."""
    with torch.autocast(device_type=cos.device.type, enabled=False):
        return ((cos.float() - target_cos.float()) ** 2).mean()


def multilabel_loss(
    scores: torch.Tensor, label_sets: torch.Tensor, temperature: float,
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy over every (text, label) pair: logits = cosine / temperature.

    `label_sets` is (batch, C) in {0, 1}; `pos_weight` (C,) scales each label's positive term
    (torch's BCEWithLogits convention), None weighs every pair alike. Averaged over all pairs.
    """
    with torch.autocast(device_type=scores.device.type, enabled=False):
        return F.binary_cross_entropy_with_logits(
            scores.float() / temperature, label_sets.float(), pos_weight=pos_weight)


def label_pos_weight(label_sets: np.ndarray) -> torch.Tensor:
    """(C,) negatives / positives per label on the given (training) rows: weighs each label's
    positives as much as its negatives in total. A label with no positive gets 1."""
    y = np.asarray(label_sets, dtype=bool)
    pos = y.sum(0).astype(np.float64)
    neg = len(y) - pos
    return torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)
