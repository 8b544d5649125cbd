"""One training epoch the seed project's way against ours, on the synthetic corpus.

Seed: every batch is padded to 128 tokens and run through the frozen encoder again, every
epoch. Ours: the corpus is encoded once (length-sorted batches, dynamic padding) and each
epoch trains the head on cached embeddings. Both sides train the same head config.

    .venv/bin/python bench/encode_vs_seed.py [--size 10000] [--seed-batches 12]

The seed epoch is timed over --seed-batches batches and extrapolated linearly to the
epoch (every batch has the same padded shape, so batch time is flat); the table says so.
Our one-off encode runs in as many slices, interleaved with the seed's batches, so both
sides see the same machine load (this machine is often shared).
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


class SeedSteps:
    """The seed project's training step: pad to 128 tokens, frozen encoder, head update."""

    def __init__(self, cfg, corpus, split, encoder: TextEncoder) -> None:
        self.encoder, self.corpus = encoder, corpus
        self.head = PrototypeHead(encoder.width, corpus.num_classes, cfg.model,
                                  initial_prototypes(corpus.num_classes, cfg.model, 0, None))
        self.opt = torch.optim.SGD(self.head.parameters(), lr=cfg.train.lr, momentum=0.9)
        self.order = np.random.default_rng(0).permutation(split.train)
        self.bs = cfg.train.batch_size
        self.total = int(np.ceil(len(self.order) / self.bs))
        self.labels = torch.tensor(corpus.labels, dtype=torch.long)

    def step(self, b: int) -> float:
        idx = self.order[b * self.bs:(b + 1) * self.bs]
        t0 = time.perf_counter()
        tokens = self.encoder.tokenize([self.corpus.texts[i] for i in idx], pad_to_max=True)
        with torch.no_grad():
            feats = self.encoder(tokens["input_ids"], tokens["attention_mask"])
        scores, _ = self.head(feats)
        loss = torch.nn.functional.cross_entropy(scores / 0.1, self.labels[idx])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def seed_epoch_seconds(cfg, corpus, split, batches: int) -> tuple[float, int]:
    """Time `batches` seed-style steps; return (extrapolated epoch seconds, total batches)."""
    encoder = TextEncoder(cfg.encoder.name, cfg.encoder.pooling, 128).eval()
    seed = SeedSteps(cfg, corpus, split, encoder)
    seed.step(0)  # warm-up
    per_batch = sum(seed.step(b) for b in range(batches)) / batches
    return per_batch * seed.total, seed.total


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
        load_s = time.perf_counter() - t0
        seed = SeedSteps(cfg, corpus, split, TextEncoder(cfg.encoder.name, cfg.encoder.pooling, 128))
        seed.step(0)  # warm-up
        # Interleave: slice k of our (globally length-sorted) encode, then seed batch k.
        order = np.argsort([len(t) for t in corpus.texts], kind="stable")
        features = np.empty((len(corpus.texts), encoder.width), dtype=np.float32)
        encode_s = seed_total = 0.0
        for k, part in enumerate(np.array_split(order, args.seed_batches)):
            t0 = time.perf_counter()
            features[part] = embed(encoder, [corpus.texts[i] for i in part],
                                   cfg.encoder.batch_size, torch.device("cpu"))
            encode_s += time.perf_counter() - t0
            seed_total += seed.step(k + 1)
        seed_s, seed_batches = seed_total / args.seed_batches * seed.total, seed.total

        data = PreparedData(corpus, split, features)
        ours = train(cfg.with_updates({"train.epochs": 5}), data).metrics
        ours_epoch = len(split.train) / ours["train_samples_per_s"]

    rows = [
        ("seed epoch (pad 128, encoder every batch)", seed_s,
         f"timed {args.seed_batches}/{seed_batches} batches, extrapolated"),
        ("ours: one-off encode (sorted, dynamic pad)", encode_s,
         f"interleaved with the seed batches; + {load_s:.1f} s model load"),
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
