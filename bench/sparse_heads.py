"""Sparse heads against the dense head (the sparse-layers experiment), on the synthetic corpus.

    .venv/bin/python bench/sparse_heads.py [--size 10000] [--epochs 20] [--prototype-dim 64]
        [--densities 0.5 0.25 0.1] [--threads 1] [--repeats 50] [--cache-dir .hpn_cache]
    .venv/bin/python bench/sparse_heads.py --quick   # 600 texts, 10 epochs, density 0.25

The corpus is encoded once by hpn.train.prepare_data (the embedding cache in --cache-dir, so a
rerun skips the encode); then one model per row trains on the same embeddings with the same
config and seed: dense, and block (4x4) and random masks at each density. Per row, one table:

- head params: `hpn.sparse.head_parameter_count` (kept projection weights + biases), the
  metric head_params.
- weight bytes: the projection weight stored dense (fp32) against stored sparse, block as BSR
  (4x4 blocks) and random as CSR, int32 indices (`hpn.sparse.storage_bytes`); the training
  and serving code keeps the dense-with-zeros weight, so this is what sparse storage WOULD take.
- epoch s: training time per epoch (the training loop only, no evaluation), from the run's
  train_samples_per_s; the head trains dense-with-zeros, so sparsity cannot speed it up and the
  mask multiply costs a little.
- head ms: median time of the whole class head (projection, normalise, cosines, class scores)
  on a batch of --batch test embeddings, as hpn runs it (dense-with-zeros).
- sparse-kernel ms: the projection alone with the weight stored sparse (torch BSR / CSR matmul)
  on the same batch: what a sparse kernel gives on this CPU; for dense, the dense matmul.
- test accuracy, and each ratio against the dense row beside it (accuracy as points).

Timings use --threads CPU threads (1 by default, as hpn trains a head on CPU) and the median
of --repeats runs; run it on a quiet machine, they move with load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hpn import metrics as M  # noqa: E402
from hpn.config import Config, load_config  # noqa: E402
from hpn.sparse import head_parameter_count, kept_weights, sparse_layout, storage_bytes  # noqa: E402
from hpn.train import PreparedData, prepare_data, train  # noqa: E402


@dataclass
class Row:
    sparsity: str
    density: float
    params: int
    dense_bytes: int
    stored_bytes: int
    epoch_s: float
    head_ms: float
    kernel_ms: float
    accuracy: float


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations are not the head
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(cfg: Config, data: PreparedData, batch: int, repeats: int) -> Row:
    result = train(cfg, data)
    model, metrics = result.model.cpu().eval(), result.metrics
    proj = model.head.proj
    weight = proj.weight.detach()
    mask = getattr(proj, "mask", torch.ones_like(weight, dtype=torch.bool))
    layout = sparse_layout(cfg.model.sparsity)
    x = torch.from_numpy(data.features[data.split.test[:batch]])  # (batch, in)
    with torch.inference_mode():
        head_ms = _median_ms(lambda: model.head(x), repeats)
        w = (weight * mask).contiguous()
        if layout == "dense":
            kernel_ms = _median_ms(lambda: x @ w.T, repeats)
        else:
            with warnings.catch_warnings():  # torch calls its sparse CSR/BSR support beta
                warnings.simplefilter("ignore", UserWarning)
                stored = w.to_sparse_bsr((4, 4)) if layout == "bsr" else w.to_sparse_csr()
                xt = x.T.contiguous()  # (in, batch): sparse @ dense is the supported order
                kernel_ms = _median_ms(lambda: stored @ xt, repeats)
    assert head_parameter_count(model) == kept_weights(proj) + proj.bias.numel()
    return Row(cfg.model.sparsity, cfg.model.density, head_parameter_count(model),
               storage_bytes(mask, "dense"), storage_bytes(mask, layout),
               len(data.split.train) / metrics[M.TRAIN_SAMPLES_PER_S], head_ms, kernel_ms,
               metrics[M.TEST_ACCURACY])


def table(rows: list[Row]) -> str:
    base = rows[0]
    lines = [
        ("| head | density | head params | x dense | weight bytes (stored) | x dense | epoch s "
         "| x dense | head ms | x dense | sparse-kernel ms | x dense | test acc | vs dense (pts) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.sparsity} | {r.density:g} | {r.params:,} | {r.params / base.params:.2f} "
            f"| {r.stored_bytes:,} | {r.stored_bytes / base.dense_bytes:.2f} "
            f"| {r.epoch_s:.3f} | {r.epoch_s / base.epoch_s:.2f} "
            f"| {r.head_ms:.3f} | {r.head_ms / base.head_ms:.2f} "
            f"| {r.kernel_ms:.3f} | {r.kernel_ms / base.kernel_ms:.2f} "
            f"| {r.accuracy:.4f} | {100 * (r.accuracy - base.accuracy):+.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--prototype-dim", type=int, default=64)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    ap.add_argument("--batch", type=int, default=256, help="texts per timed head call")
    ap.add_argument("--repeats", type=int, default=50, help="timed head calls (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="train.seed: init and masks")
    ap.add_argument("--cache-dir", default=".hpn_cache", help="embedding cache (reused)")
    ap.add_argument("--quick", action="store_true", help="600 texts, 10 epochs, density 0.25")
    args = ap.parse_args()
    if args.quick:
        args.size, args.epochs, args.densities, args.repeats = 600, 10, [0.25], 10
    cfg = load_config(None, [
        f"data.size={args.size}", f"train.epochs={args.epochs}", f"train.seed={args.seed}",
        f"model.prototype_dim={args.prototype_dim}", f"encoder.cache_dir={args.cache_dir}",
        "train.device=cpu",
    ])
    t0 = time.perf_counter()
    data = prepare_data(cfg, progress=True)
    prep_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    train(cfg.with_updates({"train.epochs": 1}), data)  # warm-up: the first run pays for it
    variants = [cfg] + [cfg.with_updates({"model.sparsity": s, "model.density": d})
                        for d in args.densities for s in ("block", "random")]
    rows = [measure(v, data, args.batch, args.repeats) for v in variants]
    print(f"\nSparse heads: {args.size:,} synthetic texts ({len(data.split.train):,} train), "
          f"{args.epochs} epochs, prototype_dim {args.prototype_dim}, frozen "
          f"{cfg.encoder.name.split('/')[-1]} embeddings (prepare {prep_s:.1f} s), "
          f"{args.threads} thread(s), head timed on {args.batch} texts, median of "
          f"{args.repeats}.\n")
    print(table(rows))
    print("\nweight bytes: the projection weight stored dense (fp32) for dense, BSR 4x4 for "
          "block, CSR for random (int32 indices); x dense divides by the dense weight's bytes. "
          "head ms runs hpn's dense-with-zeros head; sparse-kernel ms the projection alone "
          "as a torch sparse matmul.")


if __name__ == "__main__":
    main()
