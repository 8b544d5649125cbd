"""Sparse heads (the sparse-layers experiment): a fixed mask on the projection's weights.

`model.sparsity` picks the mask of a head's projection, an (out, in) weight:
  dense   no mask (a plain nn.Linear, as before sparsity existed)
  block   the weight cut into 4x4 blocks, a fraction `model.density` of the BLOCKS kept
  random  a fraction `model.density` of the single WEIGHTS kept
The mask is drawn once from (shape, density, seed) and never changes: it is a persistent
buffer of `MaskedLinear`, so a saved model carries it and loading restores it exactly, and
the forward pass multiplies by it, so masked weights get zero gradient and stay zero under
any optimiser (their momentum and Adam moments stay zero too, and weight decay of a zero is
zero). Biases stay dense.

Shapes not divisible by 4: the blocks at the right and bottom edges are partial (a 10-wide
weight has blocks of 4, 4 and 2 columns); a kept partial block keeps only the weights that
exist, so the kept fraction of weights can differ a little from `density` there. `density`
is the fraction of blocks (block) or weights (random) kept, rounded to a whole count and never
below one, so a tiny layer is never left without weights.

The training path stays dense-with-zeros: on a CPU a (64 x 384) projection is far too small
for sparse kernels to win, and dense kernels keep AMP, ONNX export and every device working.
What sparsity buys is counted apart: `head_parameter_count` (the metric `head_params`) and
`storage_bytes` (what the weight would take stored as BSR/CSR instead of dense).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from hpn.model import HPNClassifier

SPARSITIES = ("dense", "block", "random")  # config key model.sparsity (hpn/config.py CHOICES)
BLOCK = 4  # block side of `block` masks (the sparse-layers experiment's 4x4)


def _kept(total: int, density: float) -> int:
    """How many of `total` units a density keeps: rounded, at least one, at most all."""
    return min(total, max(1, round(density * total)))


def make_mask(sparsity: str, shape: tuple[int, int], density: float, seed: int,
              stream: int = 0) -> torch.Tensor:
    """(out, in) bool mask, the same for the same (sparsity, shape, density, seed, stream).

    `stream` separates masks drawn from one seed (a joint model's class and regression heads
    have the same shape and would otherwise get the same mask)."""
    if sparsity not in SPARSITIES:
        raise ValueError(f"unknown sparsity {sparsity!r}; one of {', '.join(SPARSITIES)}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    out_dim, in_dim = shape
    if sparsity == "dense":
        return torch.ones(shape, dtype=torch.bool)
    rng = np.random.default_rng([seed, stream])
    if sparsity == "random":
        flat = np.zeros(out_dim * in_dim, dtype=bool)
        flat[rng.permutation(flat.size)[: _kept(flat.size, density)]] = True
        return torch.from_numpy(flat.reshape(shape))
    rows, cols = math.ceil(out_dim / BLOCK), math.ceil(in_dim / BLOCK)
    blocks = np.zeros(rows * cols, dtype=bool)
    blocks[rng.permutation(blocks.size)[: _kept(blocks.size, density)]] = True
    # (rows, cols) -> each block repeated to 4x4, then the partial edge blocks cut off
    full = np.kron(blocks.reshape(rows, cols), np.ones((BLOCK, BLOCK), dtype=bool))
    return torch.from_numpy(np.ascontiguousarray(full[:out_dim, :in_dim]))


class MaskedLinear(nn.Linear):
    """nn.Linear whose weight is multiplied by a fixed bool mask (a persistent buffer)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor,
                 bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if tuple(mask.shape) != (out_features, in_features):
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape "
                             f"{(out_features, in_features)}")
        self.register_buffer("mask", mask.to(torch.bool).clone())
        with torch.no_grad():
            # nn.Linear's init assumes every input feeds every output; with a fraction d of
            # them the output's variance shrinks by d, so the kept weights are scaled by
            # 1/sqrt(d) to start where a dense head starts (same lr means the same step).
            kept = float(self.mask.float().mean())
            self.weight.mul_(self.mask / math.sqrt(kept))

    def masked_weight(self) -> torch.Tensor:
        """(out, in) weight with the masked entries exactly zero: what the layer computes with
        (an export can bake it in as a constant)."""
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The product, not the weight, is used: whatever an optimiser does to a masked entry,
        # it never reaches the output, and the product's gradient there is exactly zero.
        return F.linear(x, self.masked_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={float(self.mask.float().mean()):.3f}"


def projection(in_dim: int, out_dim: int, sparsity: str = "dense", density: float = 1.0,
               seed: int = 0, stream: int = 0) -> nn.Linear:
    """A head's projection: nn.Linear when dense (a model saved before sparsity loads as
    is), MaskedLinear with the (sparsity, density, seed, stream) mask otherwise."""
    if sparsity == "dense":
        return nn.Linear(in_dim, out_dim)
    return MaskedLinear(in_dim, out_dim, make_mask(sparsity, (out_dim, in_dim), density, seed,
                                                   stream))


def kept_weights(layer: nn.Linear) -> int:
    """Weights a projection can use: the mask's ones, or every weight of a dense layer."""
    mask = getattr(layer, "mask", None)
    return int(mask.sum()) if mask is not None else layer.weight.numel()


def head_parameter_count(model: HPNClassifier) -> int:
    """Trainable head parameters that can be nonzero (the metric `head_params`): kept
    projection weights + biases + learned prototypes, over the class and regression heads.

    Counted from the mask, not from the weights' values: a kept weight that happens to be 0
    is still a parameter the model stores and trains. A fine-tuned encoder is not counted."""
    total = 0
    for head in (model.head, model.regression_head):
        if head is None:
            continue
        total += kept_weights(head.proj)
        if head.proj.bias is not None:
            total += head.proj.bias.numel()
        protos = head.prototypes
        if isinstance(protos, nn.Parameter) and protos.requires_grad:
            total += protos.numel()
    return total


def storage_bytes(mask: torch.Tensor, layout: str, value_bytes: int = 4,
                  index_bytes: int = 4) -> int:
    """Bytes to store an (out, in) weight under `mask` in `layout`.

    dense: every weight. csr: kept values + a column index each + (rows + 1) row pointers.
    bsr (4x4 blocks): every block holding a kept weight, stored whole (a partial edge block as
    a full 4x4, as BSR pads it), + a block-column index per block + (block rows + 1) pointers.
    Indices default to int32 (4 bytes), what a served model would use; torch's own sparse
    tensors use int64 (index_bytes=8 reproduces their nbytes). Biases are not included."""
    out_dim, in_dim = mask.shape
    if layout == "dense":
        return out_dim * in_dim * value_bytes
    if layout == "csr":
        nnz = int(mask.sum())
        return nnz * (value_bytes + index_bytes) + (out_dim + 1) * index_bytes
    if layout == "bsr":
        rows, cols = math.ceil(out_dim / BLOCK), math.ceil(in_dim / BLOCK)
        padded = torch.zeros(rows * BLOCK, cols * BLOCK, dtype=torch.bool)
        padded[:out_dim, :in_dim] = mask
        nblocks = int(padded.reshape(rows, BLOCK, cols, BLOCK).any(dim=(1, 3)).sum())
        return nblocks * (BLOCK * BLOCK * value_bytes + index_bytes) + (rows + 1) * index_bytes
    raise ValueError(f"unknown layout {layout!r}; one of dense, csr, bsr")


def sparse_layout(sparsity: str) -> str:
    """The storage layout that suits a mask kind: block -> bsr, random -> csr."""
    return {"dense": "dense", "block": "bsr", "random": "csr"}[sparsity]
