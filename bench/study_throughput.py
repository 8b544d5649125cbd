"""Trials per hour of `hpn-tune run` against the seed project's approach, same corpus.

Seed: one subprocess per config, the frozen encoder re-run over every (128-token padded)
batch in every epoch. Its side is timed as the real subprocess start (imports + encoder
load) plus one epoch measured over a few batches, extrapolated linearly to the full trial
(every padded batch costs the same). Ours: a real study (Ray Tune + Optuna + MLflow on a
SQLite file) with FIFO scheduling, so every trial trains all its epochs like the seed's.

    .venv/bin/python bench/study_throughput.py [--size 10000] [--epochs 30] [--trials 12]
        [--runtime torch|onnx|onnx-int8] [--set KEY=VALUE ...]

--runtime is the study's `encoder.runtime`: its one-off encode (from a cold cache, the ONNX
export and int8 quantisation included) is what "trials per hour incl. the encode" counts.

Orchestration overhead = 1 - (sum of trial training time) / (study wall time x concurrency).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from encode_vs_seed import seed_epoch_seconds  # noqa: E402

from hpn.config import load_config  # noqa: E402
from hpn.data import load_corpus  # noqa: E402
from hpn.train import prepare_data  # noqa: E402

SEED_PROCESS = (
    "import time; t = time.perf_counter();"
    "from hpn.encode import TextEncoder; from hpn.config import DEFAULT_ENCODER;"
    "TextEncoder(DEFAULT_ENCODER, 'mean', 128); print(time.perf_counter() - t)"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--seed-batches", type=int, default=8)
    ap.add_argument("--runtime", default="torch", choices=("torch", "onnx", "onnx-int8"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="more config for the study, e.g. train.measure_latency=false")
    args = ap.parse_args()

    from mlflow.tracking import MlflowClient

    from tuning.study import StudyOptions, run_study
    from tuning.tracking import trials_frame

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        overrides = [f"data.size={args.size}", f"train.epochs={args.epochs}",
                     f"encoder.cache_dir={tmp}/cache", f"encoder.runtime={args.runtime}",
                     *args.overrides]
        cfg = load_config(None, overrides + ["train.batch_size=128"])
        t0 = time.perf_counter()
        prepare_data(cfg)  # the study's one-off encode; the study itself then hits the cache
        encode_s = time.perf_counter() - t0

        summary = run_study(StudyOptions(
            space="default", trials=args.trials, overrides=overrides, name="throughput",
            max_concurrent=args.concurrency, scheduler="fifo", register=False,
        ))
        client = MlflowClient(summary["tracking_uri"])
        exp = client.get_experiment_by_name("hpn-tune").experiment_id
        frame = trials_frame(client, exp, summary["parent_run_id"])
        train_s = float(frame["runtime_s"].sum())
        wall = summary["wall_s"]

        # Seed side: a real subprocess start per config, then its epochs.
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", SEED_PROCESS], capture_output=True,
                             text=True, check=True)
        process_s = time.perf_counter() - t0
        corpus = load_corpus(cfg.data)
        split = corpus.split(cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.seed)
        epoch_s, batches = seed_epoch_seconds(cfg, corpus, split, args.seed_batches)
    seed_trial_s = process_s + args.epochs * epoch_s

    ours_tph = summary["trials_completed"] / wall * 3600
    seed_tph = 3600 / seed_trial_s
    overhead = 1 - train_s / (wall * args.concurrency)
    print(f"corpus {args.size} synthetic personas, {args.epochs} epochs per trial, "
          f"{args.trials} trials, {args.concurrency} at a time, {os.cpu_count()} CPUs, "
          f"encoder.runtime={args.runtime}{''.join(' ' + o for o in args.overrides)}")
    print("| measure | value | note |")
    print("|---|---|---|")
    print(f"| seed: subprocess start + encoder load | {process_s:.1f} s | measured "
          f"(load alone {float(out.stdout.strip()):.1f} s) |")
    print(f"| seed: one epoch | {epoch_s:.1f} s | {args.seed_batches}/{batches} batches timed, "
          "extrapolated |")
    print(f"| seed: one trial | {seed_trial_s:.0f} s | start + {args.epochs} x epoch (extrapolated) |")
    print(f"| ours: one-off encode (per study, cold cache) | {encode_s:.1f} s | {args.runtime}; "
          "counted only in the last line |")
    print(f"| ours: study wall time | {wall:.1f} s | {summary['trials_completed']} trials completed |")
    print(f"| ours: summed trial training time | {train_s:.1f} s | runtime_s of every trial |")
    print(f"| seed trials per hour | {seed_tph:.2f} | |")
    print(f"| ours trials per hour | {ours_tph:.0f} | |")
    print(f"| ratio ours / seed | {ours_tph / seed_tph:.0f}x | target >= 1,000x |")
    print(f"| orchestration overhead | {overhead:.0%} | target <= 30% |")
    with_encode = summary["trials_completed"] / (wall + encode_s) * 3600
    print(f"| ours trials per hour incl. the encode | {with_encode:.0f} | "
          f"{with_encode / seed_tph:.0f}x the seed (target >= 1,500x) |")
    share = {"encode": encode_s, "trial compute": train_s / args.concurrency,
             "orchestration": wall - train_s / args.concurrency}
    print("| where the time goes (encode + wall) | " + ", ".join(
        f"{k} {v:.0f} s ({v / (encode_s + wall):.0%})" for k, v in share.items()) + " | "
        "trial compute: summed runtime_s / concurrency |")


if __name__ == "__main__":
    main()
