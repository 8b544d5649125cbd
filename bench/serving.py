"""What serving a champion costs, per encoder runtime: pyfunc in-process and over HTTP, against a bare encoder.

Self-contained: trains a small HPN on the synthetic corpus for each encoder runtime
(`encoder.runtime` torch, onnx, onnx-int8: a model trained on that runtime's embeddings, which
it also predicts with), logs each as our pyfunc to a temporary SQLite store (the torch one
registered and promoted to @champion), exports the torch model as whole-model ONNX graphs
(`hpn.export.export_model`, fp32 and int8, checked against the model and logged as pyfuncs that
serve through the graph), then times three paths per model on the same texts:

  (a) pyfunc   `tuning.serving.load_model(uri).predict(frame)` (the verified loader every
               hpn-tune command uses; a PyFuncModel)
  (b) HTTP     `hpn-tune serve` (MLflow's scoring app in its own process on that model, behind
               the body cap and text check), POST /invocations over keep-alive
  (d) HTTP     the same server's POST /predict: the same body and answer, without MLflow's
               DataFrame round trip (`tuning.serving.PredictRoute`)
  (c) bare     the floor any text classifier on that encoder pays: tokenizer + the encoder
               (torch: plain `transformers.AutoModel` + mean pooling; onnx, onnx-int8: the
               same cached encoder graph on ONNX Runtime) + an untrained linear layer; for an
               exported graph, the graph itself on ONNX Runtime. So (a) - (c) is our overhead
               and (b) - (a) the server's; (d) - (c) is what the lean route adds to the floor.

    .venv/bin/python bench/serving.py [--runtimes torch onnx onnx-int8] [--exports onnx onnx-int8]
        [--latency-reps 40] [--reps 40 6 2] [--size 1200] [--epochs 6] [--json PATH]

Latency is one text per call (p50 / p95 over --latency-reps calls after warm-up); throughput
is texts/s at batch 1, 32 and 256 (--reps calls each). Every path of every model is timed
round-robin, so a burst of load on a shared machine hits all of them alike. The summary table
puts each model's numbers side by side with the issue's serving targets (HTTP p50 <= 10 ms
for one text, >= 600 texts/s at batch 256 over HTTP), on each HTTP route, and its ratios to
the torch model.
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
from dataclasses import dataclass, field
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
from hpn.runtimes import ONNX, ONNX_INT8, RUNTIMES, TORCH
from hpn.train import train

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "hpn-bench"
BATCHES = (1, 32, 256)
EXPORTS = (ONNX, ONNX_INT8)  # whole-model graph formats (hpn.export)
#: The issue's serving targets (issue 13): one text over HTTP, and throughput at batch 256.
TARGET_P50_MS, TARGET_TPS, TARGET_BATCH = 10.0, 600.0, 256
Predict = Callable[[list[str]], list[str]]


@dataclass
class Served:
    """One model the bench serves: how it was made, where it is, and its bare floor."""

    name: str  # the row: the encoder runtime, or "export onnx" / "export onnx-int8"
    uri: str  # what load_model and `serve --model` take
    floor: Callable[[], Predict]  # builds path (c)
    floor_name: str
    note: str = ""  # test accuracy, or an export's agreement with the model
    paths: dict[str, str] = field(default_factory=dict)  # (a), (b), (c) -> path name


# -- set-up: the models in a temporary registry ----------------------------------------------

def make_models(workdir: Path, runtimes: list[str], exports: list[str], size: int,
                epochs: int) -> tuple[str, list[str], list[Served]]:
    """Train (one model per runtime, and torch for the exports), log, register and promote
    the torch model, export; returns (tracking URI, texts to score, the models to serve)."""
    from mlflow.tracking import MlflowClient

    from tuning.pyfunc import log_pyfunc
    from tuning.registry import promote, register_run
    from tuning.tracking import ensure_experiment

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    experiment = ensure_experiment(client, "bench", uri)
    served, texts, trained = [], [], {}
    for runtime in dict.fromkeys([*runtimes, *([TORCH] if exports else [])]):
        cfg = load_config(None, [f"data.size={size}", f"encoder.cache_dir={workdir / 'cache'}",
                                 "model.prototype_dim=32", f"train.epochs={epochs}",
                                 f"encoder.runtime={runtime}"])
        result = train(cfg)
        run_id = client.create_run(experiment, run_name=f"bench-{runtime}").info.run_id
        for key, value in cfg.to_flat().items():
            client.log_param(run_id, key, str(value))
        for key, value in result.metrics.items():
            client.log_metric(run_id, key, float(value))
        model_uri = log_pyfunc(client, run_id, result.model)
        if runtime == TORCH:  # the registry path, as a promoted champion is served
            register_run(client, run_id, MODEL_NAME)
            promote(client, MODEL_NAME)
            model_uri = f"models:/{MODEL_NAME}@champion"
        texts = load_corpus(cfg.data).texts  # personas of every length, as requests would be
        trained[runtime] = (client, run_id, result.model)
        classes = len(result.model.label_names)
        if runtime in runtimes:
            accuracy = result.metrics.get("test_accuracy")
            served.append(Served(
                runtime, model_uri,
                (lambda c=classes: bare_path(c)) if runtime == TORCH
                else (lambda c=classes, e=cfg.encoder: bare_onnx_path(e, c)),
                "bare AutoModel + mean pool + Linear" if runtime == TORCH
                else f"bare {runtime} encoder graph (ORT) + Linear",
                f"test acc {accuracy:.3f}" if accuracy is not None else ""))
    for fmt in exports:
        from hpn.export import ExportMismatch, check_graph, export_model

        client, run_id, model = trained[TORCH]
        graph = export_model(model, int8=fmt == ONNX_INT8)
        try:  # `hpn-tune export` would refuse it; the bench still times it, saying so
            note = f"export of the torch model: {check_graph(model, graph, fmt == ONNX_INT8).summary()}"
        except ExportMismatch as exc:
            note = f"export of the torch model, FAILS its check: {str(exc).split(': ', 1)[-1]}"
        served.append(Served(
            f"export {fmt}", log_pyfunc(client, run_id, model, graph, fmt),
            lambda g=graph, e=model.encoder_cfg: bare_graph_path(g, e),
            "bare whole-model graph (ORT)", note))
    return uri, texts, served


# -- the three paths -------------------------------------------------------------------------

def pyfunc_path(uri: str, model_uri: str = f"models:/{MODEL_NAME}@champion") -> Predict:
    from tuning.serving import load_model

    model = load_model(model_uri, uri)
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


def bare_onnx_path(encoder_cfg, num_classes: int) -> Predict:
    """The runtime's cached encoder graph (transformer + mean pooling) on ONNX Runtime, as
    `hpn.runtimes.OnnxTextEncoder` runs it, and an untrained linear layer in numpy."""
    from hpn.runtimes import OnnxTextEncoder

    encoder = OnnxTextEncoder(encoder_cfg, encoder_cfg.runtime)
    weight = np.random.default_rng(0).standard_normal((encoder.width, num_classes)).astype(np.float32)
    return lambda texts: [str(i) for i in (encoder.embed_batch(texts) @ weight).argmax(1)]


def bare_graph_path(graph: bytes, encoder_cfg) -> Predict:
    """A whole-model graph on ONNX Runtime: tokenizer, `session.run`, argmax of `scores`."""
    from transformers import AutoTokenizer

    from hpn.runtimes import session

    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder(encoder_cfg.name))
    ort = session(graph)

    def predict(texts: list[str]) -> list[str]:
        batch = tokenizer(texts, padding=True, truncation=True,
                          max_length=encoder_cfg.max_length, return_tensors="np")
        feeds = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        return [str(i) for i in ort.run(["scores"], feeds)[0].argmax(1)]

    return predict


class Server:
    """`hpn-tune serve` in its own process group, so stopping it ends anything it started."""

    def __init__(self, uri: str, port: int, log: Path,
                 model_uri: str = f"models:/{MODEL_NAME}@champion") -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tuning.cli", "serve", "--model",
                 model_uri, "--tracking-uri", uri, "--port", str(port)],
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

    def predictor(self, route: str = "/invocations") -> Predict:
        """POST to `route` (/invocations or /predict, which take the same body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)  # keep-alive

        def post(body: str) -> http.client.HTTPResponse:
            conn.request("POST", route, body, {"Content-Type": "application/json"})
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
                raise RuntimeError(f"{route} answered {response.status}: {payload[:300]!r}")
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


def run(latency_reps: int, reps: dict[int, int], runtimes: list[str], exports: list[str],
        size: int, epochs: int, json_path: str | None = None) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        uri, texts, served = make_models(workdir, runtimes, exports, size, epochs)
        setup_s = time.perf_counter() - started

        servers = [Server(uri, _free_port(), workdir / f"serve-{i}.log", s.uri)
                   for i, s in enumerate(served)]
        try:
            t0 = time.perf_counter()
            for server in servers:  # started together: they load in parallel
                server.wait()
            start_s = time.perf_counter() - t0
            paths: dict[str, Predict] = {}
            probe = texts[:16]
            for s, server in zip(served, servers):
                pyfunc, http_predict = pyfunc_path(uri, s.uri), server.predictor()
                lean = server.predictor("/predict")
                assert http_predict(probe) == pyfunc(probe) == lean(probe), \
                    f"{s.name}: HTTP and in-process labels differ"
                s.paths = {"a": f"{s.name}: (a) pyfunc load_model(...).predict",
                           "b": f"{s.name}: (b) HTTP /invocations (hpn-tune serve)",
                           "c": f"{s.name}: (c) {s.floor_name}",
                           "d": f"{s.name}: (d) HTTP /predict (hpn-tune serve)"}
                paths.update({s.paths["a"]: pyfunc, s.paths["b"]: http_predict,
                              s.paths["c"]: s.floor(), s.paths["d"]: lean})
            rows = measure(paths, texts, latency_reps, reps)
        finally:
            for server in servers:
                server.stop()

    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads "
          f"(ONNX Runtime as many); load average {os.getloadavg()[0]:.1f} at the end; encoder "
          "all-MiniLM-L6-v2, max 128 tokens")
    print(f"set-up (train {size} texts x {epochs} epochs per runtime + log + register + promote "
          f"+ export) {setup_s:.0f} s; {len(servers)} scoring servers ready in {start_s:.0f} s; "
          f"paths timed round-robin; latency over {latency_reps} single-text calls; "
          "throughput over " + ", ".join(f"{n} x batch {b}" for b, n in reps.items()))
    print()
    print("| path | p50 ms (1 text) | p95 ms (1 text) | " + " | ".join(f"texts/s @{b}" for b in reps) + " |")
    print("|---|---:|---:|" + "---:|" * len(reps))
    for name, r in rows.items():
        print(f"| {name} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
              + " | ".join(f"{r[f'tps_{b}']:.1f}" for b in reps) + " |")
    print()
    summary = summarise(served, rows, reps)
    print_summary(summary, reps)
    if json_path:
        Path(json_path).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


def summarise(served: list[Served], rows: dict[str, dict[str, float]],
              reps: dict[int, int]) -> list[dict[str, object]]:
    """One entry per model: its three paths' numbers, overheads, ratios to the torch model
    (or the first served) and whether it meets the serving targets."""
    big = max(reps)
    out = []
    for s in served:
        a, b, c, d = (rows[s.paths[k]] for k in "abcd")
        out.append({
            "model": s.name, "note": s.note,
            "pyfunc_p50_ms": a["p50_ms"], "pyfunc_p95_ms": a["p95_ms"],
            "http_p50_ms": b["p50_ms"], "http_p95_ms": b["p95_ms"], "bare_p50_ms": c["p50_ms"],
            "ours_ms": a["p50_ms"] - c["p50_ms"], "server_ms": b["p50_ms"] - a["p50_ms"],
            f"pyfunc_tps_{big}": a[f"tps_{big}"], f"http_tps_{big}": b[f"tps_{big}"],
            f"bare_tps_{big}": c[f"tps_{big}"],
            "predict_p50_ms": d["p50_ms"], "predict_p95_ms": d["p95_ms"],
            "predict_over_bare_ms": d["p50_ms"] - c["p50_ms"], f"predict_tps_{big}": d[f"tps_{big}"]})
    base = next((e for e in out if e["model"] == TORCH), out[0] if out else None)
    for e in out:
        e["http_p50_speedup"] = base["http_p50_ms"] / e["http_p50_ms"]
        e[f"http_tps_{big}_ratio"] = e[f"http_tps_{big}"] / base[f"http_tps_{big}"]
        e["meets_p50"] = e["http_p50_ms"] <= TARGET_P50_MS
        e["meets_tps"] = big == TARGET_BATCH and e[f"http_tps_{big}"] >= TARGET_TPS
        e["predict_meets_p50"] = e["predict_p50_ms"] <= TARGET_P50_MS
        e["predict_meets_tps"] = big == TARGET_BATCH and e[f"predict_tps_{big}"] >= TARGET_TPS
    return out


def print_summary(summary: list[dict[str, object]], reps: dict[int, int]) -> None:
    big = max(reps)
    base = next((e["model"] for e in summary if e["model"] == TORCH), summary[0]["model"])
    mark = {True: "yes", False: "no"}
    print(f"| model | pyfunc p50 / p95 ms | HTTP p50 / p95 ms | bare p50 ms | ours (a-c) ms | "
          f"server (b-a) ms | texts/s @{big} pyfunc | HTTP | bare | HTTP p50 x vs {base} | "
          f"HTTP @{big} x vs {base} | HTTP p50 <= {TARGET_P50_MS:g} ms | HTTP >= {TARGET_TPS:g}/s "
          f"@{TARGET_BATCH} | |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|---|")
    for e in summary:
        print(f"| {e['model']} | {e['pyfunc_p50_ms']:.1f} / {e['pyfunc_p95_ms']:.1f} | "
              f"{e['http_p50_ms']:.1f} / {e['http_p95_ms']:.1f} | {e['bare_p50_ms']:.1f} | "
              f"{e['ours_ms']:+.1f} | {e['server_ms']:+.1f} | {e[f'pyfunc_tps_{big}']:.0f} | "
              f"{e[f'http_tps_{big}']:.0f} | {e[f'bare_tps_{big}']:.0f} | "
              f"{e['http_p50_speedup']:.2f} | {e[f'http_tps_{big}_ratio']:.2f} | "
              f"{mark[e['meets_p50']]} | {mark[e['meets_tps']]} | {e['note']} |")
    print()
    print(f"| model | /invocations p50 / p95 ms | /predict p50 / p95 ms | /predict - bare ms | "
          f"texts/s @{big} /invocations | /predict | p50 <= {TARGET_P50_MS:g} ms: /invocations | "
          f"/predict | >= {TARGET_TPS:g}/s @{TARGET_BATCH}: /invocations | /predict |")
    print("|---|---:|---:|---:|---:|---:|:-:|:-:|:-:|:-:|")
    for e in summary:
        print(f"| {e['model']} | {e['http_p50_ms']:.1f} / {e['http_p95_ms']:.1f} | "
              f"{e['predict_p50_ms']:.1f} / {e['predict_p95_ms']:.1f} | "
              f"{e['predict_over_bare_ms']:+.1f} | {e[f'http_tps_{big}']:.0f} | "
              f"{e[f'predict_tps_{big}']:.0f} | {mark[e['meets_p50']]} | "
              f"{mark[e['predict_meets_p50']]} | {mark[e['meets_tps']]} | "
              f"{mark[e['predict_meets_tps']]} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-reps", type=int, default=40)
    ap.add_argument("--reps", type=int, nargs=3, default=[40, 6, 2], metavar=("B1", "B32", "B256"),
                    help="calls timed at batch 1, 32 and 256")
    ap.add_argument("--runtimes", nargs="*", default=list(RUNTIMES), choices=RUNTIMES,
                    help="encoder runtimes to train a model on and serve (default: all)")
    ap.add_argument("--exports", nargs="*", default=None, choices=EXPORTS,
                    help="whole-model ONNX graphs of the torch model to serve (default: both "
                         "when hpn.export is installed; give none for none)")
    ap.add_argument("--size", type=int, default=1200, help="synthetic personas to train on")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--json", dest="json_path", help="also write every number to this file")
    args = ap.parse_args()
    if args.exports is None:
        try:
            import hpn.export  # noqa: F401
            args.exports = list(EXPORTS)
        except ImportError:
            args.exports = []
    if not args.runtimes and not args.exports:
        ap.error("--runtimes / --exports: give at least one model to serve")
    run(args.latency_reps, dict(zip(BATCHES, args.reps)), args.runtimes, args.exports,
        args.size, args.epochs, args.json_path)
