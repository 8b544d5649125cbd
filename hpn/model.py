"""The HPN: a projection head onto the unit hypersphere scored against class prototypes.

Prototypes are laid out class-major (`hpn.prototypes.prototype_classes` says which class
owns each; extra negatives own none); a class's score is its best prototype's cosine. A saved
model is a safetensors file plus a JSON file, so loading one never unpickles arbitrary objects.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from hpn.config import EncoderConfig, ModelConfig
from hpn.encode import TextEncoder, embed
from hpn.prototypes import fixed_prototypes, prototype_classes

WEIGHTS_FILE = "model.safetensors"
META_FILE = "hpn_model.json"


def head_classes(num_classes: int, cfg: ModelConfig) -> np.ndarray:
    """(count,) class of each prototype for this config (NO_CLASS = extra negative)."""
    return prototype_classes(num_classes, cfg.prototypes_per_class, cfg.prototype_count,
                             cfg.prototype_assignment)


class PrototypeHead(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, cfg: ModelConfig, prototypes: np.ndarray) -> None:
        super().__init__()
        classes = head_classes(num_classes, cfg)
        self.num_classes = num_classes
        #: the seed's softmax runs over every prototype (extra negatives included)
        self.logits_over_prototypes = cfg.prototype_assignment == "extra_negatives"
        self.proj = nn.Linear(in_dim, cfg.prototype_dim)
        protos = F.normalize(torch.as_tensor(prototypes, dtype=torch.float32), dim=-1)
        if cfg.prototype_mode == "learned":
            self.prototypes = nn.Parameter(protos)
        else:
            self.register_buffer("prototypes", protos)
        self.register_buffer("groups", torch.as_tensor(classes))
        # Which pairs separation pushes apart: prototypes of different classes; with extra
        # negatives (the seed's loss) every prototype is its own group. Derived from the
        # config, so not saved.
        rivals = np.arange(len(classes)) if self.logits_over_prototypes else classes
        self.register_buffer("rivals", torch.as_tensor(rivals), persistent=False)
        # Indices, not a boolean mask: masking a CUDA tensor syncs with the host every step.
        owned = torch.as_tensor(np.flatnonzero(classes >= 0))
        self.register_buffer("owned", owned, persistent=False)
        self.register_buffer("owned_classes", torch.as_tensor(classes[classes >= 0]),
                             persistent=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x).float(), dim=-1)  # (batch, d) on the sphere

    def cosines(self, z: torch.Tensor) -> torch.Tensor:
        return z @ F.normalize(self.prototypes.float(), dim=-1).T  # (batch, count)

    def class_scores(self, cos: torch.Tensor) -> torch.Tensor:
        """(batch, count) prototype cosines -> (batch, C): each class's best prototype."""
        owned = cos.index_select(1, self.owned)  # (batch, owned count)
        index = self.owned_classes.expand(len(cos), -1)
        scores = cos.new_full((len(cos), self.num_classes), float("-inf"))
        return scores.scatter_reduce(1, index, owned, reduce="amax", include_self=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (class scores (batch, C), prototype cosines (batch, count))."""
        cos = self.cosines(self.embed(x))
        return self.class_scores(cos), cos


def initial_prototypes(num_classes: int, cfg: ModelConfig, seed: int, cache_dir: str | None) -> np.ndarray:
    count = len(head_classes(num_classes, cfg))
    if cfg.prototype_mode == "fixed":
        return fixed_prototypes(count, cfg.prototype_dim, seed=seed, cache_dir=cache_dir)
    # The seed project's learned prototypes start random-normal and are pushed apart during
    # training (and put back on the sphere after every optimiser step).
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, cfg.prototype_dim)).astype(np.float32)


@dataclass
class ModelMeta:
    label_names: list[str]
    in_dim: int
    model: dict
    encoder: dict
    fine_tuned_encoder: bool


class HPNClassifier(nn.Module):
    """Head plus what it needs to classify raw text: the encoder id (or fine-tuned encoder)."""

    def __init__(
        self,
        head: PrototypeHead,
        label_names: list[str],
        model_cfg: ModelConfig,
        encoder_cfg: EncoderConfig,
        encoder: TextEncoder | None = None,
    ) -> None:
        super().__init__()
        self.head, self.encoder = head, encoder
        self.label_names = list(label_names)
        self.model_cfg, self.encoder_cfg = model_cfg, encoder_cfg
        self._frozen: list[TextEncoder] | None = None  # a list keeps it out of state_dict

    @property
    def fine_tuned(self) -> bool:
        return self.encoder is not None

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE))
        meta = ModelMeta(
            label_names=self.label_names,
            in_dim=self.head.proj.in_features,
            model=asdict(self.model_cfg),
            encoder=asdict(self.encoder_cfg),
            fine_tuned_encoder=self.fine_tuned,
        )
        (out / META_FILE).write_text(json.dumps(asdict(meta), indent=2))
        return out

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> HPNClassifier:
        src = Path(directory)
        meta = ModelMeta(**json.loads((src / META_FILE).read_text()))
        model_cfg, encoder_cfg = ModelConfig(**meta.model), EncoderConfig(**meta.encoder)
        count = len(head_classes(len(meta.label_names), model_cfg))
        head = PrototypeHead(
            meta.in_dim, len(meta.label_names), model_cfg, np.ones((count, model_cfg.prototype_dim))
        )
        encoder = None
        if meta.fine_tuned_encoder:
            encoder = TextEncoder(encoder_cfg.name, encoder_cfg.pooling, encoder_cfg.max_length)
        model = cls(head, meta.label_names, model_cfg, encoder_cfg, encoder)
        model.load_state_dict(load_file(str(src / WEIGHTS_FILE)))
        return model.to(device).eval()

    @torch.inference_mode()
    def predict_scores(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """(n, C) class scores (cosines in [-1, 1]) for raw texts."""
        device = next(self.head.parameters()).device
        if self.encoder is None:
            # Frozen encoder: same embedding function as training, but no disk cache (serving
            # sees new texts every call); the encoder is loaded once per process.
            if self._frozen is None:
                cfg = self.encoder_cfg
                self._frozen = [TextEncoder(cfg.name, cfg.pooling, cfg.max_length)]
            feats = torch.from_numpy(embed(self._frozen[0], list(texts), batch_size, device))
            return self.head(feats.to(device))[0].float().cpu().numpy()
        self.encoder.eval()
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.encoder.tokenize(list(texts[i : i + batch_size]))
            z = self.encoder(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            out.append(self.head(z)[0])
        return torch.cat(out).cpu().numpy() if out else np.empty((0, len(self.label_names)))

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        scores = self.predict_scores(texts)
        return [self.label_names[i] for i in scores.argmax(1)], scores
