"""How fast and how large a trained model is where it is served: the champion path on a CPU.

Why: a study that only ranks accuracy promotes whichever model scores best, however slow its
runtime or large its weights. Each trial measures its own model the way `serve` runs it
(raw text -> `HPNClassifier.predict_all`, the call the pyfunc makes), so a multi-objective
study can trade accuracy against latency and size, and every trial run shows the numbers.

What is held fixed, so trials compare with each other and not with the box's mood:
- the texts: SAMPLE_SIZE personas of the synthetic corpus at SAMPLE_SEED, whatever the study's
  data (`sample_texts()`); one-text calls cycle through them, the batch is all of them;
- the threads: one intra-op thread for PyTorch and for ONNX Runtime (a Ray trial has one CPU
  by default, and one thread is how a serving replica per core runs); PyTorch's previous
  thread count is put back after;
- the encoder: loaded once per process for its runtime (`frozen_encoder`) and reused by every
  measurement there, so a measurement times predictions, not a load.

Metrics (names in hpn/metrics.py): p50 and p95 milliseconds of one text over `calls` calls
after `warmup` calls; texts per second for batches of BATCH_SIZE; the served model's size in
MiB (encoder weights in its runtime's form plus the head's state) and the head's nonzero
trainable parameters. Cost measured on a busy 2-core box: 0.55 s (onnx-int8), 0.8 s (onnx),
1.1 s (torch) per measurement, most of it the one batch of 64, plus one encoder load per
process (0.3 s int8 to 4 s torch). The held encoder stays resident: a trial's peak_rss_mb
includes it (trial_fn loads it before training, so every trial's peak does alike); the
measurement itself runs after the trial's memory window.
"""
from __future__ import annotations

import copy
import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hpn import metrics as M
from hpn.config import EncoderConfig
from hpn.sparse import head_parameter_count

if TYPE_CHECKING:
    from hpn.model import HPNClassifier

SAMPLE_SEED = 20240613  # any fixed seed: only that it never changes matters
SAMPLE_SIZE = 64
BATCH_SIZE = 64  # the throughput batch (the "throughput at batch 64")
CALLS = 20  # one-text calls timed: enough for a p95 (the 19th of 20) at ~10-40 ms each
WARMUP = 3  # untimed one-text calls first: lazy allocations, ORT's first-run planning
BATCHES = 1  # timed batches of BATCH_SIZE; one keeps a torch trial's measurement under ~2 s
THREADS = 1
_MIB = 2**20

_encoders: dict[tuple, Any] = {}  # one frozen encoder per process: key -> encoder


def sample_texts() -> list[str]:
    """The fixed texts every measurement uses (the same list in every process and trial)."""
    return list(_sample())


@functools.lru_cache(maxsize=1)
def _sample() -> tuple[str, ...]:
    from hpn.data.synthetic import synthetic_corpus

    return tuple(synthetic_corpus(SAMPLE_SIZE, seed=SAMPLE_SEED).texts[:SAMPLE_SIZE])


def _key(cfg: EncoderConfig, threads: int) -> tuple:
    return (cfg.name, cfg.pooling, cfg.max_length, cfg.runtime, cfg.cache_dir, threads)


def frozen_encoder(cfg: EncoderConfig, threads: int = THREADS) -> Any:
    """The frozen encoder `cfg` names on `threads` threads, loaded once per process. Only the
    latest is kept: a process that measured another runtime before drops that one, so a
    trial's memory holds its own runtime's encoder, not every runtime a study searched.
    A trial calls this before its memory window (tuning.ray_tune.trial_fn), so its first
    trial in a process measures the same resident encoder as the later ones."""
    from hpn.runtimes import load_encoder

    key = _key(cfg, threads)
    if key not in _encoders:
        _encoders.clear()
        _encoders[key] = load_encoder(cfg, threads)
    return _encoders[key]


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def encoder_bytes(cfg: EncoderConfig, encoder: Any) -> int:
    """The frozen encoder's weights in the form its runtime serves: the cached ONNX graph
    file (fp32 or int8) for onnx / onnx-int8; for torch the fp32 tensors as loaded (what
    the fp32 safetensors file holds, less its header)."""
    from hpn.runtimes import TORCH, graph_path

    if cfg.runtime == TORCH:
        return _state_bytes(encoder.model)
    return graph_path(cfg, cfg.runtime).stat().st_size


def _sparse_savings(model: HPNClassifier) -> int:
    """Bytes a sparse projection saves when stored sparse (BSR for block, CSR for random):
    its dense weight and bool mask out of the state, its sparse storage in."""
    from hpn.sparse import MaskedLinear, sparse_layout, storage_bytes

    saved = 0
    for layer in model.modules():
        if isinstance(layer, MaskedLinear):
            dense = layer.weight.numel() * layer.weight.element_size() + layer.mask.numel() * layer.mask.element_size()
            saved += dense - storage_bytes(layer.mask, sparse_layout(model.model_cfg.sparsity),
                                           value_bytes=layer.weight.element_size())
    return saved


def model_size(model: HPNClassifier, encoder: Any | None = None) -> dict[str, float]:
    """{model_size_mb, head_params}: MiB the served model needs (the model's own state: the
    head(s), a sparse projection as stored sparse, and a fine-tuned encoder's weights; plus a
    frozen encoder's in its runtime)."""
    size = _state_bytes(model) - _sparse_savings(model)
    if not model.fine_tuned:
        size += encoder_bytes(model.encoder_cfg, encoder or frozen_encoder(model.encoder_cfg))
    return {M.MODEL_SIZE_MB: size / _MIB, M.HEAD_PARAMS: float(head_parameter_count(model))}


def _on_cpu(model: HPNClassifier) -> HPNClassifier:
    """The model itself on a CPU, else a CPU copy (served on a CPU; the trial's stays put)."""
    if next(model.parameters()).device.type == "cpu":
        return model
    held, model._frozen = model._frozen, None  # a copy must not deep-copy a loaded encoder
    try:
        return copy.deepcopy(model).cpu()
    finally:
        model._frozen = held


def measure_latency(model: HPNClassifier, *, calls: int = CALLS, warmup: int = WARMUP,
                    batches: int = BATCHES, threads: int = THREADS,
                    texts: list[str] | None = None) -> dict[str, float]:
    """Time `model.predict_all` on the CPU: {latency_p50_ms, latency_p95_ms, throughput_b64,
    model_size_mb, head_params}. The model is left as it was (its device, its encoder)."""
    if calls < 1 or batches < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"calls, batches, threads must be >= 1 and warmup >= 0; got {calls}, "
                         f"{batches}, {threads}, {warmup}")
    texts = list(texts or sample_texts())
    model = _on_cpu(model)
    encoder = None if model.fine_tuned else frozen_encoder(model.encoder_cfg, threads)
    held = model._frozen
    model._frozen = None if encoder is None else [encoder]
    try:
        with _torch_threads(threads):
            for i in range(warmup):
                model.predict_all([texts[i % len(texts)]])
            one = np.empty(calls)
            for i in range(calls):
                started = time.perf_counter()
                model.predict_all([texts[i % len(texts)]])
                one[i] = time.perf_counter() - started
            batch = (texts * (BATCH_SIZE // len(texts) + 1))[:BATCH_SIZE]
            started = time.perf_counter()
            for _ in range(batches):
                model.predict_all(batch, batch_size=BATCH_SIZE)
            batch_s = time.perf_counter() - started
    finally:
        model._frozen = held
    return {M.LATENCY_P50_MS: float(np.percentile(one, 50) * 1e3),
            M.LATENCY_P95_MS: float(np.percentile(one, 95) * 1e3),
            M.THROUGHPUT_B64: BATCH_SIZE * batches / batch_s,
            **model_size(model, encoder)}
