"""Encoder runtimes: the frozen encoder run by PyTorch, by ONNX Runtime, or by ONNX Runtime
with int8 weights (`encoder.runtime`: torch | onnx | onnx-int8).

Why: the frozen encoder is most of the cost of a first study (the one-off encode) and of a
served prediction. ONNX Runtime runs the same graph faster on a CPU with the same embeddings
(fp32), and dynamic int8 quantisation of its weights faster again, with embeddings that are
close but not equal (a model trained on them is its own model: the embedding cache key and
the saved model both carry the runtime, so one is never scored on the other's embeddings).

The ONNX graph of an encoder (transformer + pooling, token ids -> sentence embedding) is
exported once with `torch.onnx.export`, checked against PyTorch on sample texts, and cached
under `<encoder.cache_dir>/onnx/`. Like the embedding cache it verifies what it loads: a
graph whose bytes no longer match the checksum written beside it is exported again, with a
warning. ONNX Runtime's CPU build runs it (on a CUDA machine too: these runtimes are for CPU
deployment; `torch` stays the runtime for GPU encodes).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from hpn.cache_files import CacheRebuiltWarning
from hpn.config import EncoderConfig
from hpn.errors import ConfigError

TORCH, ONNX, ONNX_INT8 = "torch", "onnx", "onnx-int8"
RUNTIMES = (TORCH, ONNX, ONNX_INT8)
OPSET = 17
_FORMAT = 2  # bump when the exported graph changes (its inputs, outputs or export options)

#: Fixed texts a fresh export is checked on against PyTorch: short, long (truncated at
#: max_length), punctuation and non-ASCII, so padding, truncation and pooling are all exercised.
CHECK_TEXTS = (
    "A retired nurse who volunteers at the local library.",
    "Software engineer",
    "An economist studying how small-town credit unions priced loans during the 1970s oil "
    "shocks, who writes long, footnoted essays and argues with everyone about inflation. " * 6,
    "Chef — spécialiste de la cuisine provençale; 42 ans.",
    "a",
    "A 27-year-old data scientist who trains models on hospital records and runs marathons.",
)
#: The export must match PyTorch this closely: fp32 exactly up to float rounding; int8 is
#: lossy by design and held to a mean cosine with PyTorch's embeddings.
FP32_MAX_ABS_DIFF = 1e-4
INT8_MIN_MEAN_COSINE = 0.97


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ConfigError(f"encoder.runtime: unknown value {runtime!r}; choose one of "
                          f"{', '.join(RUNTIMES)}")
    return runtime


def runtime_versions() -> dict[str, str]:
    """The versions an exported graph depends on (part of its cache key)."""
    import onnxruntime
    import torch

    return {"torch": torch.__version__.split("+")[0], "onnxruntime": onnxruntime.__version__}


def graph_key(cfg: EncoderConfig, runtime: str) -> str:
    """sha256 of what the graph is made from: the encoder (name and where its weights lie),
    pooling, max_length, runtime, export format and the exporting versions."""
    from hpn.encode import resolve_encoder

    ident = [cfg.name, resolve_encoder(cfg.name), cfg.pooling, cfg.max_length, runtime, OPSET,
             _FORMAT, runtime_versions()]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def graph_path(cfg: EncoderConfig, runtime: str) -> Path:
    return Path(cfg.cache_dir) / "onnx" / f"{graph_key(cfg, runtime)}.onnx"


def _digest(data: bytes) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _load_verified(path: Path, key: str) -> bytes | None:
    """The cached graph's bytes when they match the checksum beside them, else None (with a
    warning when a file was there but failed its check)."""
    if not path.exists():
        return None
    try:
        header = json.loads(_sidecar(path).read_text())
        data = path.read_bytes()
    except (OSError, ValueError) as exc:
        reason = f"unreadable ({type(exc).__name__})"
    else:
        if header.get("key") != key:
            reason = "written for another encoder or version"
        elif header.get("xxh3_128") != _digest(data) or header.get("bytes") != len(data):
            reason = "its bytes changed since it was written"
        else:
            return data
    warnings.warn(f"{path}: cached ONNX graph {reason}; exporting it again", CacheRebuiltWarning,
                  stacklevel=3)
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a fresh temp file beside `path`, then rename it over `path`: a reader
    sees the old file or the new one, never half of one. The temp file is created with the
    umask's mode (not mkstemp's 0600), so an exported graph is as readable as any file."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _store(path: Path, key: str, data: bytes, **fields: Any) -> None:
    """Graph first, then its checksum: a reader that finds the old checksum with the new graph
    (or no checksum) rejects it and exports again; it never runs an unchecked graph."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, data)
    header = {"key": key, "xxh3_128": _digest(data), "bytes": len(data), **fields}
    _write_atomic(_sidecar(path), json.dumps(header, indent=1).encode())


def export_torch_module(module: Any, inputs: tuple, input_names: list[str],
                        output_names: list[str], dynamic: dict[str, dict[int, str]]) -> bytes:
    """A torch module -> ONNX bytes (TorchScript exporter, dynamic batch and sequence axes).

    The TorchScript exporter, not dynamo: it needs no onnxscript and exports BERT-like
    encoders with dynamic axes reliably; its deprecation warning is not for our users.
    """
    import io

    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, buffer, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic,
                          opset_version=OPSET, dynamo=False)
    return buffer.getvalue()


def quantize(graph: bytes, **options: Any) -> bytes:
    """Dynamic int8 quantisation of a graph's weights (int8 weights, activations quantised on
    the fly): onnxruntime.quantization.quantize_dynamic on `graph` with `options` (its keyword
    arguments, e.g. per_channel, op_types_to_quantize, nodes_to_exclude). One scaffold for the
    encoder graphs here and the whole-model exports (hpn.export.quantize_whole): it works on
    files only, and logs a pre-processing hint on every call that is not for our users."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="hpn-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(graph)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # "Please consider to run pre-processing" on every call
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, **options)
        finally:
            root.setLevel(level)
        return dst.read_bytes()


def quantize_int8(graph: bytes) -> bytes:
    """Dynamic int8 quantisation of an encoder graph's weights (MatMul/Gemm, per output
    channel). Per-channel scales: embeddings at mean cosine 0.99 to fp32 on persona texts,
    against 0.96 with one scale per tensor, at the same speed."""
    return quantize(graph, per_channel=True)


def session(graph: bytes, threads: int | None = None, spinning: bool = False) -> Any:
    """An ONNX Runtime CPU session on graph bytes; `threads` intra-op threads (None: as many
    as torch uses in this process, so a Ray trial keeps to its CPUs).

    `spinning` (off by default): busy-wait between runs. A spinning pool holds the cores for a
    while after each call, which on a small CPU slows whatever runs next: served one-text
    calls went from 15 to 10 ms (bare int8 encoder, 2 cores) without it. Bulk work with
    nothing else to run (the one-off encode) turns it on."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no per-session initializer warnings
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _export_encoder(cfg: EncoderConfig, runtime: str) -> bytes:
    """Export the encoder, check it on CHECK_TEXTS against PyTorch, quantise for int8."""
    import torch

    from hpn.encode import TextEncoder

    torch_encoder = TextEncoder(cfg.name, cfg.pooling, cfg.max_length).eval()
    sample = torch_encoder.tokenize(list(CHECK_TEXTS[:2]))
    graph = export_torch_module(
        torch_encoder, (sample["input_ids"], sample["attention_mask"]),
        ["input_ids", "attention_mask"], ["embedding"],
        {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
         "embedding": {0: "batch"}})
    if runtime == ONNX_INT8:
        graph = quantize_int8(graph)
    batch = torch_encoder.tokenize(list(CHECK_TEXTS))
    with torch.inference_mode():
        expected = torch_encoder(batch["input_ids"], batch["attention_mask"]).numpy()
    got = session(graph).run(None, {"input_ids": batch["input_ids"].numpy(),
                                    "attention_mask": batch["attention_mask"].numpy()})[0]
    problem = compare_embeddings(expected, got, runtime)
    if problem:
        raise ConfigError(f"encoder.runtime={runtime}: the ONNX export of {cfg.name!r} does not "
                          f"match PyTorch ({problem}); use encoder.runtime=torch for this encoder")
    return graph


def compare_embeddings(expected: np.ndarray, got: np.ndarray, runtime: str) -> str | None:
    """Why `got` (from the ONNX runtime) does not stand in for `expected` (PyTorch), or None."""
    if got.shape != expected.shape or not np.isfinite(got).all():
        return f"shape {got.shape} or non-finite values, expected {expected.shape}"
    if runtime == ONNX:
        diff = float(np.abs(got - expected).max())
        return None if diff <= FP32_MAX_ABS_DIFF else f"largest difference {diff:.2g}"
    cos = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    mean = float(cos.mean())
    return None if mean >= INT8_MIN_MEAN_COSINE else f"mean cosine {mean:.3f}"


def encoder_graph(cfg: EncoderConfig, runtime: str) -> bytes:
    """The encoder's ONNX graph for `runtime` (onnx | onnx-int8), from the verified cache or
    exported, checked and cached now (a few seconds, once per encoder and runtime)."""
    if check_runtime(runtime) == TORCH:
        raise ValueError("the torch runtime has no ONNX graph")
    path, key = graph_path(cfg, runtime), graph_key(cfg, runtime)
    data = _load_verified(path, key)
    if data is None:
        data = _export_encoder(cfg, runtime)
        _store(path, key, data, encoder=cfg.name, runtime=runtime)
    return data


def usable_cache_dir(cfg: EncoderConfig) -> EncoderConfig:
    """`cfg`, or a copy with the default cache_dir (`.hpn_cache` under the working directory)
    when its cache_dir is not a writable folder here: a saved model carries the absolute
    cache_dir of the machine it was trained on, which a serving machine may lack or not
    write to. The graph exported there is still checked against the model's recorded digest."""
    import dataclasses

    folder = Path(cfg.cache_dir)
    if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
        return cfg
    return dataclasses.replace(cfg, cache_dir=EncoderConfig().cache_dir)


def graph_digest(cfg: EncoderConfig, runtime: str) -> str:
    """xxh3 of the encoder graph `runtime` runs for `cfg` (what a model saved with onnx or
    onnx-int8 embeddings records, so it never predicts on another graph's embeddings)."""
    return _digest(encoder_graph(usable_cache_dir(cfg), runtime))


class OnnxTextEncoder:
    """The frozen encoder on ONNX Runtime: texts -> (batch, width) float32 embeddings, with
    the same tokenizer, truncation and pooling as `hpn.encode.TextEncoder`. `graph_xxh3`: the
    digest the graph must have (a saved model's: the graph its training embeddings came from)."""

    def __init__(self, cfg: EncoderConfig, runtime: str = ONNX, threads: int | None = None,
                 graph_xxh3: str | None = None, spinning: bool = False) -> None:
        from transformers import AutoTokenizer

        from hpn.encode import encoder_width, resolve_encoder

        self.name, self.pooling, self.max_length = cfg.name, cfg.pooling, cfg.max_length
        self.runtime = runtime
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_encoder(cfg.name))
        graph = encoder_graph(cfg, runtime)
        if graph_xxh3 is not None and (got := _digest(graph)) != graph_xxh3:
            versions = ", ".join(f"{k} {v}" for k, v in runtime_versions().items())
            raise ConfigError(
                f"encoder.runtime={runtime}: this model was trained on an encoder graph (xxh3 "
                f"{graph_xxh3[:16]}) that this machine does not reproduce (it exported xxh3 "
                f"{got[:16]} with {versions}); use the torch/onnxruntime versions it was trained "
                "with, or `hpn-tune export` the whole model")
        self._session = session(graph, threads, spinning)
        width = self._session.get_outputs()[0].shape[-1]
        self.width = width if isinstance(width, int) else encoder_width(cfg.name)

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="np")
        return {"input_ids": batch["input_ids"].astype(np.int64),
                "attention_mask": batch["attention_mask"].astype(np.int64)}

    def embed_batch(self, texts: list[str], device: Any = None) -> np.ndarray:
        return self._session.run(None, self.tokenize(texts))[0]


def load_encoder(cfg: EncoderConfig, threads: int | None = None,
                 graph_xxh3: str | None = None, spinning: bool = False) -> Any:
    """The frozen encoder `cfg.runtime` names: a TextEncoder (torch) or an OnnxTextEncoder
    (its graph under `usable_cache_dir(cfg)`, checked against `graph_xxh3` when given)."""
    from hpn.encode import TextEncoder

    runtime = check_runtime(getattr(cfg, "runtime", TORCH))
    if runtime == TORCH:
        return TextEncoder(cfg.name, cfg.pooling, cfg.max_length)
    return OnnxTextEncoder(usable_cache_dir(cfg), runtime, threads, graph_xxh3, spinning)
