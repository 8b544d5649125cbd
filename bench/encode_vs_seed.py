"""One training epoch the seed project's way against ours, on the synthetic corpus.

Seed: every batch is padded to 128 tokens and run through the frozen encoder again, every
epoch. Ours: the corpus is encoded once (length-sorted batches, dynamic padding) and each
epoch trains the head on cached embeddings. Both sides train the same head config.

    .venv/bin/python bench/encode_vs_seed.py [--size 10000] [--seed-batches 12]

The seed epoch is timed over --seed-batches batches and extrapolated linearly to the
epoch (every batch has the same padded shape, so batch time is flat); the table says so.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hpn.config import load_config  # noqa: E402
from hpn.data import load_corpus  # noqa: E402
from hpn.encode import TextEncoder, embed  # noqa: E402
from hpn.model import PrototypeHead, initial_prototypes  # noqa: E402
from hpn.train import PreparedData, train  # noqa: E402


def seed_epoch_seconds(cfg, corpus, split, batches: int) -> tuple[float, int]:
    """Time `batches` seed-style steps; return (extrapolated epoch seconds, total batches)."""
    encoder = TextEncoder(cfg.encoder.name, cfg.encoder.pooling, 128).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    head = PrototypeHead(encoder.width, corpus.num_classes, cfg.model,
                         initial_prototypes(corpus.num_classes, cfg.model, 0, None))
    opt = torch.optim.SGD(head.parameters(), lr=cfg.train.lr, momentum=0.9)
    order = np.random.default_rng(0).permutation(split.train)
    bs = cfg.train.batch_size
    total = int(np.ceil(len(order) / bs))
    labels = torch.tensor(corpus.labels, dtype=torch.long)

    def step(idx: np.ndarray) -> None:
        tokens = encoder.tokenize([corpus.texts[i] for i in idx], pad_to_max=True)  # 128 tokens
        with torch.no_grad():
            feats = encoder(tokens["input_ids"], tokens["attention_mask"])
        scores, _ = head(feats)
        loss = torch.nn.functional.cross_entropy(scores / 0.1, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(order[:bs])  # warm-up
    t0 = time.perf_counter()
    for b in range(batches):
        step(order[b * bs:(b + 1) * bs])
    per_batch = (time.perf_counter() - t0) / batches
    return per_batch * total, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=10_000)
    ap.add_argument("--seed-batches", type=int, default=12)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config(None, [f"data.size={args.size}", f"encoder.cache_dir={cache}",
                                 "train.batch_size=32", "model.prototype_dim=64"])
        corpus = load_corpus(cfg.data)
        split = corpus.split(cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.seed)

        t0 = time.perf_counter()
        encoder = TextEncoder(cfg.encoder.name, cfg.encoder.pooling, cfg.encoder.max_length)
        features = embed(encoder, corpus.texts, cfg.encoder.batch_size, torch.device("cpu"))
        encode_s = time.perf_counter() - t0

        data = PreparedData(corpus, split, features)
        ours = train(cfg.with_updates({"train.epochs": 5}), data).metrics
        ours_epoch = len(split.train) / ours["train_samples_per_s"]

        seed_s, seed_batches = seed_epoch_seconds(cfg, corpus, split, args.seed_batches)

    rows = [
        ("seed epoch (pad 128, encoder every batch)", seed_s,
         f"timed {args.seed_batches}/{seed_batches} batches, extrapolated"),
        ("ours: one-off encode (sorted, dynamic pad)", encode_s, "includes model load"),
        ("ours: epoch on cached embeddings", ours_epoch, "mean of 5 epochs"),
    ]
    print(f"corpus: {args.size} synthetic personas, train split {len(split.train)}, "
          f"batch 32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"| {'what':<44} | {'seconds':>10} | note |")
    print(f"|{'-' * 46}|{'-' * 12}|------|")
    for what, sec, note in rows:
        print(f"| {what:<44} | {sec:>10.3f} | {note} |")
    print(f"| {'ratio: seed epoch / our epoch':<44} | {seed_s / ours_epoch:>9.0f}x | target >= 500x |")
    print(f"| {'ratio: seed epoch / our one-off encode':<44} | {seed_s / encode_s:>9.1f}x | target >= 10x |")


if __name__ == "__main__":
    main()
