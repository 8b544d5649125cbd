"""What serving a champion costs: the pyfunc in-process and over HTTP, against a bare encoder.

Self-contained: trains a small HPN on the synthetic corpus, logs it as our pyfunc to a
temporary SQLite store, registers and promotes it, then times three paths on the same texts:

  (a) pyfunc   `tuning.serving.load_model("models:/<name>@champion", uri).predict(frame)`
               (the verified loader every hpn-tune command uses; a PyFuncModel)
  (b) HTTP     `hpn-tune serve` (MLflow's scoring app in-process on that model, behind the
               body cap and text check), POST /invocations over keep-alive
  (c) bare     the same encoder as plain `transformers.AutoModel` + mean pooling +
               an (untrained) `torch.nn.Linear`: the floor any text classifier on this
               encoder pays, so (a) - (c) is our overhead and (b) - (a) the server's.

    .venv/bin/python bench/serving.py [--latency-reps 40] [--reps 40 6 2]

Latency is one text per call (p50 / p95 over --latency-reps calls after warm-up);
throughput is texts/s at batch 1, 32 and 256 (--reps calls each).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pandas as pd
import torch

from hpn.config import DEFAULT_ENCODER, load_config
from hpn.data import load_corpus
from hpn.encode import resolve_encoder
from hpn.train import train

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "hpn-bench"
BATCHES = (1, 32, 256)
Predict = Callable[[list[str]], list[str]]


# -- set-up: a champion in a temporary registry ----------------------------------------------

def make_champion(workdir: Path) -> tuple[str, list[str], int]:
    """Train, log, register and promote; returns (tracking URI, texts to score, classes)."""
    from mlflow.tracking import MlflowClient

    from tuning.pyfunc import log_pyfunc
    from tuning.registry import promote, register_run
    from tuning.tracking import ensure_experiment

    cfg = load_config(None, ["data.size=1200", f"encoder.cache_dir={workdir / 'cache'}",
                             "model.prototype_dim=32", "train.epochs=6"])
    result = train(cfg)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    run_id = client.create_run(ensure_experiment(client, "bench", uri)).info.run_id
    for key, value in cfg.to_flat().items():
        client.log_param(run_id, key, str(value))
    for key, value in result.metrics.items():
        client.log_metric(run_id, key, float(value))
    log_pyfunc(client, run_id, result.model)
    register_run(client, run_id, MODEL_NAME)
    promote(client, MODEL_NAME)
    texts = load_corpus(cfg.data).texts  # personas of every length, as requests would be
    return uri, texts, len(result.model.label_names)


# -- the three paths -------------------------------------------------------------------------

def pyfunc_path(uri: str) -> Predict:
    from tuning.serving import load_model

    model = load_model(f"models:/{MODEL_NAME}@champion", uri)
    return lambda texts: model.predict(pd.DataFrame({"text": texts}))["label"].tolist()


def bare_path(num_classes: int) -> Predict:
    from transformers import AutoModel, AutoTokenizer

    path = resolve_encoder(DEFAULT_ENCODER)
    tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    head = torch.nn.Linear(encoder.config.hidden_size, num_classes)

    @torch.inference_mode()
    def predict(texts: list[str]) -> list[str]:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = encoder(**batch).last_hidden_state  # (batch, seq, width)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # (batch, width)
        return [str(i) for i in head(pooled).argmax(1).tolist()]

    return predict


class Server:
    """`hpn-tune serve` in its own process group, so stopping it ends anything it started."""

    def __init__(self, uri: str, port: int, log: Path) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tuning.cli", "serve", "--model",
                 f"models:/{MODEL_NAME}@champion", "--tracking-uri", uri, "--port", str(port)],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        self.port, self.log = port, log

    def wait(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"scoring server did not start:\n{self.log.read_text()[-2000:]}")
                time.sleep(0.5)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue

    def predictor(self) -> Predict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)  # keep-alive

        def post(body: str) -> http.client.HTTPResponse:
            conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            return conn.getresponse()

        def predict(texts: list[str]) -> list[str]:
            body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}})
            try:
                response = post(body)
            except (ConnectionError, http.client.RemoteDisconnected):
                # uvicorn drops a keep-alive connection idle for 5 s (the other paths ran): reopen
                conn.close()
                response = post(body)
            payload = response.read()
            if response.status != 200:
                raise RuntimeError(f"/invocations answered {response.status}: {payload[:300]!r}")
            return [p["label"] for p in json.loads(payload)["predictions"]]

        return predict


# -- measuring -------------------------------------------------------------------------------

def measure(paths: dict[str, Predict], texts: list[str], latency_reps: int,
            reps: dict[int, int]) -> dict[str, dict[str, float]]:
    """Time every path on the same inputs, round-robin: on a shared machine a burst of load
    then hits all paths alike instead of whichever happened to run during it."""
    rng = np.random.default_rng(0)

    def sample(n: int) -> list[str]:
        return [texts[i] for i in rng.choice(len(texts), n, replace=False)]

    for predict in paths.values():  # warm-up: lazy encoder load, allocator, first request
        for _ in range(3):
            predict(sample(8))
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(latency_reps):
        one = sample(1)
        for name, predict in paths.items():
            t0 = time.perf_counter()
            predict(one)
            latencies[name].append(time.perf_counter() - t0)
    rows = {name: {"p50_ms": 1000 * float(np.percentile(lat, 50)),
                   "p95_ms": 1000 * float(np.percentile(lat, 95))} for name, lat in latencies.items()}
    for batch, n in reps.items():
        spent = dict.fromkeys(paths, 0.0)
        for _ in range(n):
            texts_b = sample(batch)
            for name, predict in paths.items():
                t0 = time.perf_counter()
                predict(texts_b)
                spent[name] += time.perf_counter() - t0
        for name in paths:
            rows[name][f"tps_{batch}"] = batch * n / spent[name]
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(latency_reps: int, reps: dict[int, int]) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        uri, texts, num_classes = make_champion(workdir)
        setup_s = time.perf_counter() - started

        server = Server(uri, _free_port(), workdir / "serve.log")
        try:
            t0 = time.perf_counter()
            server.wait()
            start_s = time.perf_counter() - t0
            pyfunc, http_predict = pyfunc_path(uri), server.predictor()
            probe = texts[:16]
            assert http_predict(probe) == pyfunc(probe), "HTTP and in-process labels differ"
            rows = measure({
                "(a) pyfunc load_model(...).predict": pyfunc,
                "(b) HTTP /invocations (hpn-tune serve)": http_predict,
                "(c) bare AutoModel + mean pool + Linear": bare_path(num_classes),
            }, texts, latency_reps, reps)
        finally:
            server.stop()

    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f} at the end; encoder all-MiniLM-L6-v2, max 128 tokens")
    print(f"set-up (train + log + register + promote) {setup_s:.0f} s; scoring server ready in "
          f"{start_s:.0f} s; paths timed round-robin; latency over {latency_reps} single-text calls; "
          "throughput over " + ", ".join(f"{n} x batch {b}" for b, n in reps.items()))
    print()
    print("| path | p50 ms (1 text) | p95 ms (1 text) | " + " | ".join(f"texts/s @{b}" for b in reps) + " |")
    print("|---|---:|---:|" + "---:|" * len(reps))
    for name, r in rows.items():
        print(f"| {name} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
              + " | ".join(f"{r[f'tps_{b}']:.1f}" for b in reps) + " |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-reps", type=int, default=40)
    ap.add_argument("--reps", type=int, nargs=3, default=[40, 6, 2], metavar=("B1", "B32", "B256"),
                    help="calls timed at batch 1, 32 and 256")
    args = ap.parse_args()
    run(args.latency_reps, dict(zip(BATCHES, args.reps)))
