"""One training epoch the seed project's way against ours, and our one-off encode per
encoder runtime (torch, onnx, onnx-int8), on the synthetic corpus.

Seed: every batch is padded to 128 tokens and run through the frozen encoder again, every
epoch. Ours: the corpus is encoded once (length-sorted batches, dynamic padding) and each
epoch trains the head on cached embeddings. Both sides train the same head config.

    .venv/bin/python bench/encode_vs_seed.py [--size 10000] [--seed-batches 12]
        [--runtimes torch onnx onnx-int8] [--epochs 20]

The seed epoch is timed over --seed-batches batches and extrapolated linearly to the
epoch (every batch has the same padded shape, so batch time is flat); the table says so.
Each runtime's one-off encode runs in as many slices, interleaved with the seed's batches and
with each other, so all sides see the same machine load (this machine is often shared). The
ONNX graphs are exported (and int8-quantised) before timing; that one-off cost per encoder is
reported on its own line. Then a model is trained on each runtime's embeddings (same config,
same seed) and its test accuracy reported, with how many test predictions agree with the
torch model's.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from hpn.runtimes import RUNTIMES, encoder_graph, load_encoder  # noqa: E402
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
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    ap.add_argument("--epochs", type=int, default=20, help="epochs of each runtime's model")
    args = ap.parse_args()
    runtimes = list(dict.fromkeys(["torch", *args.runtimes]))  # torch: the reference
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config(None, [f"data.size={args.size}", f"encoder.cache_dir={cache}",
                                 "train.batch_size=32", "model.prototype_dim=64"])
        corpus = load_corpus(cfg.data)
        split = corpus.split(cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.seed)

        encoders, load_s, export_s = {}, {}, {}
        for runtime in runtimes:
            rt_cfg = dataclasses.replace(cfg.encoder, runtime=runtime)
            if runtime != "torch":
                t0 = time.perf_counter()
                encoder_graph(rt_cfg, runtime)  # export + check + quantise, cached
                export_s[runtime] = time.perf_counter() - t0
            t0 = time.perf_counter()
            encoders[runtime] = load_encoder(rt_cfg)
            load_s[runtime] = time.perf_counter() - t0
        seed = SeedSteps(cfg, corpus, split, TextEncoder(cfg.encoder.name, cfg.encoder.pooling, 128))
        seed.step(0)  # warm-up
        for encoder in encoders.values():  # warm-up: first-call allocations are not the encode
            embed(encoder, corpus.texts[:8], 8, torch.device("cpu"))
        # Interleave: slice k of each runtime's (globally length-sorted) encode, then seed batch k.
        order = np.argsort([len(t) for t in corpus.texts], kind="stable")
        features = {r: np.empty((len(corpus.texts), e.width), dtype=np.float32)
                    for r, e in encoders.items()}
        encode_s = dict.fromkeys(runtimes, 0.0)
        seed_total = 0.0
        for k, part in enumerate(np.array_split(order, args.seed_batches)):
            texts = [corpus.texts[i] for i in part]
            for runtime, encoder in encoders.items():
                t0 = time.perf_counter()
                features[runtime][part] = embed(encoder, texts, cfg.encoder.batch_size,
                                                torch.device("cpu"))
                encode_s[runtime] += time.perf_counter() - t0
            seed_total += seed.step(k + 1)
        seed_s, seed_batches = seed_total / args.seed_batches * seed.total, seed.total

        results = {}
        for runtime in runtimes:
            rt_cfg = cfg.with_updates({"train.epochs": args.epochs, "encoder.runtime": runtime})
            res = train(rt_cfg, PreparedData(corpus, split, features[runtime]))
            test_feats = torch.from_numpy(features[runtime][split.test])
            with torch.inference_mode():
                pred = res.model.head(test_feats)[0].argmax(1).numpy()
            results[runtime] = (res.metrics, pred)
        ours = results["torch"][0]
        ours_epoch = len(split.train) / ours["train_samples_per_s"]

    rows = [
        ("seed epoch (pad 128, encoder every batch)", seed_s,
         f"timed {args.seed_batches}/{seed_batches} batches, extrapolated"),
    ]
    for runtime in runtimes:
        note = f"interleaved with the seed batches; + {load_s[runtime]:.1f} s load"
        if runtime in export_s:
            note += f"; one-off export {export_s[runtime]:.1f} s (cached)"
        rows.append((f"ours: one-off encode, {runtime}", encode_s[runtime], note))
    rows.append(("ours: epoch on cached embeddings (torch)", ours_epoch, f"mean of {args.epochs} epochs"))
    print(f"corpus: {args.size} synthetic personas, train split {len(split.train)}, "
          f"batch 32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"| {'what':<44} | {'seconds':>10} | note |")
    print(f"|{'-' * 46}|{'-' * 12}|------|")
    for what, sec, note in rows:
        print(f"| {what:<44} | {sec:>10.3f} | {note} |")
    print(f"| {'ratio: seed epoch / our epoch':<44} | {seed_s / ours_epoch:>9.0f}x | target >= 500x |")
    for runtime in runtimes:
        print(f"| {'ratio: seed epoch / one-off encode, ' + runtime:<44} | "
              f"{seed_s / encode_s[runtime]:>9.1f}x | target >= 10x |")
    print()
    torch_acc, torch_pred = results["torch"][0]["test_accuracy"], results["torch"][1]
    print(f"| runtime | encode s | speed-up vs torch | test accuracy | vs torch (points) "
          f"| test predictions = torch's | target |")
    print("|---|---:|---:|---:|---:|---:|---|")
    targets = {"torch": "reference", "onnx": "identical predictions",
               "onnx-int8": ">= 2x faster, <= 0.5 points lost"}
    for runtime in runtimes:
        metrics, pred = results[runtime]
        acc = metrics["test_accuracy"]
        print(f"| {runtime} | {encode_s[runtime]:.1f} | {encode_s['torch'] / encode_s[runtime]:.2f}x "
              f"| {acc:.4f} | {100 * (acc - torch_acc):+.2f} | {(pred == torch_pred).mean():.2%} "
              f"| {targets[runtime]} |")


if __name__ == "__main__":
    main()
