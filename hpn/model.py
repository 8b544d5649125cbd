"""The HPN: a projection head onto the unit hypersphere scored against class prototypes.

Prototypes are laid out class-major (`hpn.prototypes.prototype_classes` says which class
owns each; extra negatives own none); a class's score is its best prototype's cosine. A saved
model is a safetensors file plus a JSON file, so loading one never unpickles arbitrary objects.

Tasks (`model.task`, see hpn/tasks.py): classification and multilabel use the class head
(`PrototypeHead`; multilabel has one prototype or several per label and a decision rule);
regression has its own output space (`RegressionHead`: a projection and two opposite fixed
prototypes); joint has both on the same embedding. `predict_all` returns a `Prediction` for
any task; `predict` keeps returning (labels, scores) for the tasks with classes.
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
from hpn.losses import cosine_to_value
from hpn.prototypes import fixed_prototypes, prototype_classes
from hpn.runtimes import graph_digest, load_encoder
from hpn.sparse import projection
from hpn.task_metrics import DecisionRule
from hpn.tasks import CLASSIFICATION, JOINT, MULTILABEL, REGRESSION, TASKS

WEIGHTS_FILE = "model.safetensors"
META_FILE = "hpn_model.json"


def head_classes(num_classes: int, cfg: ModelConfig) -> np.ndarray:
    """(count,) class of each prototype for this config (NO_CLASS = extra negative)."""
    return prototype_classes(num_classes, cfg.prototypes_per_class, cfg.prototype_count,
                             cfg.prototype_assignment)


class PrototypeHead(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, cfg: ModelConfig, prototypes: np.ndarray,
                 mask_seed: int = 0) -> None:
        """`mask_seed` draws the projection's fixed mask when cfg.sparsity is not dense
        (hpn/sparse.py); a loaded model's mask comes from its weights file instead."""
        super().__init__()
        classes = head_classes(num_classes, cfg)
        self.num_classes = num_classes
        #: the seed's softmax runs over every prototype (extra negatives included)
        self.logits_over_prototypes = cfg.prototype_assignment == "extra_negatives"
        self.proj = projection(in_dim, cfg.prototype_dim, cfg.sparsity, cfg.density, mask_seed)
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


class RegressionHead(nn.Module):
    """A regression output space: its own projection onto the sphere and two opposite fixed
    prototypes (row 0 the upper end p, row 1 = -p); the output is the cosine with p."""

    def __init__(self, in_dim: int, dim: int, prototypes: np.ndarray, sparsity: str = "dense",
                 density: float = 1.0, mask_seed: int = 0) -> None:
        super().__init__()
        # stream 1: a joint model's class head (stream 0) has the same shape, not the same mask
        self.proj = projection(in_dim, dim, sparsity, density, mask_seed, stream=1)
        protos = F.normalize(torch.as_tensor(prototypes, dtype=torch.float32), dim=-1)
        self.register_buffer("prototypes", protos)  # fixed, as in the paper

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x).float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-> (batch,) cosine with the upper prototype, in [-1, 1]."""
        return self.embed(x) @ self.prototypes[0].float()


@dataclass
class Prediction:
    """What a model says about some texts, for any task (fields a task has no use for are None)."""

    task: str
    label_names: list[str]  # classes / labels; [] for regression
    scores: np.ndarray | None  # (n, C) cosine per class/label; None for regression
    labels: list[str] | None  # classification / joint: argmax class
    label_sets: list[list[str]] | None  # multilabel: chosen by the saved decision rule
    values: np.ndarray | None  # regression / joint: predicted target, (n,) float64


@dataclass
class ModelMeta:
    label_names: list[str]
    in_dim: int
    model: dict
    encoder: dict
    fine_tuned_encoder: bool
    # Added with tasks; a model saved before them has none of these and is a classifier.
    task: str = CLASSIFICATION
    target_low: float | None = None
    target_high: float | None = None
    target_name: str | None = None
    decision: dict | None = None  # {"kind": "threshold", "threshold": t} | {"kind": "top_k", "k": k}
    # xxh3 of the ONNX encoder graph the training embeddings came from (encoder.runtime onnx
    # or onnx-int8; hpn.runtimes.graph_digest): prediction refuses any other graph. None for
    # torch, a fine-tuned encoder, and models saved before it.
    encoder_graph_xxh3: str | None = None


#: What an untrained multilabel model (no rule chosen on validation yet) predicts with.
DEFAULT_DECISION = DecisionRule("top_k", k=1)


class HPNClassifier(nn.Module):
    """Head(s) plus what they need to predict from raw text: the encoder id (or fine-tuned
    encoder), the task, and for regression the target range, for multilabel the decision rule."""

    def __init__(
        self,
        head: PrototypeHead | None,
        label_names: list[str],
        model_cfg: ModelConfig,
        encoder_cfg: EncoderConfig,
        encoder: TextEncoder | None = None,
        *,
        task: str = CLASSIFICATION,
        regression_head: RegressionHead | None = None,
        target_range: tuple[float, float] | None = None,
        target_name: str | None = None,
        decision: DecisionRule | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
        if (head is None) != (task == REGRESSION):
            raise ValueError(f"task {task}: {'no' if task == REGRESSION else 'a'} class head expected")
        if (regression_head is None) == (task in (REGRESSION, JOINT)):
            raise ValueError(f"task {task}: regression head {'missing' if regression_head is None else 'unexpected'}")
        if regression_head is not None and target_range is None:
            raise ValueError(f"task {task}: the target range (low, high) is needed to predict values")
        self.head, self.encoder = head, encoder
        self.regression_head = regression_head
        self.task = task
        self.label_names = list(label_names)
        self.model_cfg, self.encoder_cfg = model_cfg, encoder_cfg
        self.target_range = None if target_range is None else (float(target_range[0]),
                                                               float(target_range[1]))
        self.target_name = target_name
        self.decision = decision
        self._frozen: list | None = None  # a list keeps it out of state_dict
        self.encoder_graph_xxh3: str | None = None  # set by load (ModelMeta), else at save
        self._graph: list | None = None  # [ORT session, tokenizer, output names]: use_graph

    @property
    def fine_tuned(self) -> bool:
        return self.encoder is not None

    @property
    def in_dim(self) -> int:
        return (self.head or self.regression_head).proj.in_features

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE))
        low, high = self.target_range if self.target_range is not None else (None, None)
        meta = ModelMeta(
            label_names=self.label_names,
            in_dim=self.in_dim,
            model=asdict(self.model_cfg),
            encoder=asdict(self.encoder_cfg),
            fine_tuned_encoder=self.fine_tuned,
            task=self.task,
            target_low=low,
            target_high=high,
            target_name=self.target_name,
            decision=self.decision.to_dict() if self.decision is not None else None,
            encoder_graph_xxh3=self._encoder_graph_digest(),
        )
        (out / META_FILE).write_text(json.dumps(asdict(meta), indent=2))
        return out

    def _encoder_graph_digest(self) -> str | None:
        """The digest a saved model records of its frozen encoder's ONNX graph: the loaded
        one's recorded digest, else this machine's graph (the one training embedded with)."""
        runtime = getattr(self.encoder_cfg, "runtime", "torch")
        if self.fine_tuned or runtime == "torch":
            return None
        return self.encoder_graph_xxh3 or graph_digest(self.encoder_cfg, runtime)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> HPNClassifier:
        src = Path(directory)
        meta = ModelMeta(**json.loads((src / META_FILE).read_text()))
        model_cfg, encoder_cfg = ModelConfig(**meta.model), EncoderConfig(**meta.encoder)
        task = meta.task or CLASSIFICATION
        head = regression_head = None
        if task != REGRESSION:
            count = len(head_classes(len(meta.label_names), model_cfg))
            head = PrototypeHead(
                meta.in_dim, len(meta.label_names), model_cfg, np.ones((count, model_cfg.prototype_dim))
            )
        # The prototypes, and a sparse projection's mask, come from the weights file; a model
        # saved before sparsity has no model.sparsity in its JSON and loads dense.
        if task in (REGRESSION, JOINT):
            regression_head = RegressionHead(meta.in_dim, model_cfg.prototype_dim,
                                             np.ones((2, model_cfg.prototype_dim)),
                                             model_cfg.sparsity, model_cfg.density)
        encoder = None
        if meta.fine_tuned_encoder:
            encoder = TextEncoder(encoder_cfg.name, encoder_cfg.pooling, encoder_cfg.max_length)
        target_range = None
        if meta.target_low is not None and meta.target_high is not None:
            target_range = (meta.target_low, meta.target_high)
        decision = DecisionRule.from_dict(meta.decision) if meta.decision else None
        model = cls(head, meta.label_names, model_cfg, encoder_cfg, encoder, task=task,
                    regression_head=regression_head, target_range=target_range,
                    target_name=meta.target_name, decision=decision)
        model.load_state_dict(load_file(str(src / WEIGHTS_FILE)))
        model.encoder_graph_xxh3 = meta.encoder_graph_xxh3
        return model.to(device).eval()

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def use_graph(self, graph: bytes, threads: int | None = None) -> HPNClassifier:
        """Predict through `graph` (hpn.export.export_model's whole-model ONNX bytes) on ONNX
        Runtime from now on: the same tokenizer and truncation, its `scores` and `cosine`
        outputs in place of the encoder and heads; everything after `predict_outputs`
        (labels, decision rule, values) is unchanged. Returns the model."""
        from transformers import AutoTokenizer

        from hpn.encode import resolve_encoder
        from hpn.runtimes import session

        tokenizer = (self.encoder.tokenizer if self.encoder is not None
                     else AutoTokenizer.from_pretrained(resolve_encoder(self.encoder_cfg.name)))
        ort = session(graph, threads)
        self._graph = [ort, tokenizer, [o.name for o in ort.get_outputs()]]
        return self

    @property
    def serves_graph(self) -> bool:
        return self._graph is not None

    def _graph_outputs(self, texts: list[str], batch_size: int
                       ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """predict_outputs through the graph: length-sorted batches (each pads only to its own
        longest text, as `hpn.encode.embed` does), outputs put back in the texts' order."""
        ort, tokenizer, names = self._graph
        n = len(texts)
        scores = (np.empty((n, len(self.label_names)), np.float32)
                  if self.head is not None else None)
        cos = np.empty(n, np.float32) if self.regression_head is not None else None
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                              max_length=self.encoder_cfg.max_length, return_tensors="np")
            feeds = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
            out = dict(zip(names, ort.run(None, feeds)))
            if scores is not None:
                scores[idx] = out["scores"]
            if cos is not None:
                cos[idx] = out["cosine"]
        return scores, cos

    @torch.inference_mode()
    def predict_outputs(self, texts: list[str], batch_size: int = 256
                        ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """-> ((n, C) class scores or None, (n,) regression cosines or None) for raw texts."""
        if self._graph is not None:
            return self._graph_outputs(list(texts), batch_size)
        device = self._device()
        heads = [h for h in (self.head, self.regression_head) if h is not None]
        if self.encoder is None:
            # Frozen encoder: same embedding function as training, but no disk cache (serving
            # sees new texts every call); the encoder is loaded once per process.
            if self._frozen is None:  # the runtime the training embeddings came from
                self._frozen = [load_encoder(self.encoder_cfg,
                                             graph_xxh3=self.encoder_graph_xxh3)]
            feats = torch.from_numpy(embed(self._frozen[0], list(texts), batch_size, device)).to(device)
            outs = [[self._output(h, feats)] for h in heads]
        else:
            self.encoder.eval()
            outs = [[] for _ in heads]
            for i in range(0, len(texts), batch_size):
                batch = self.encoder.tokenize(list(texts[i : i + batch_size]))
                z = self.encoder(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                for out, h in zip(outs, heads):
                    out.append(self._output(h, z))
        results = []
        for out, h in zip(outs, heads):
            if out:
                results.append(torch.cat(out).float().cpu().numpy())
            else:
                width = (len(self.label_names),) if h is self.head else ()
                results.append(np.empty((0, *width), dtype=np.float32))
        scores = results.pop(0) if self.head is not None else None
        cos = results.pop(0) if self.regression_head is not None else None
        return scores, cos

    def _output(self, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return head(x)[0] if isinstance(head, PrototypeHead) else head(x)

    def predict_scores(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """(n, C) class scores (cosines in [-1, 1]) for raw texts."""
        if self.head is None:
            raise ValueError("a regression model has no class scores; use predict_all(texts).values")
        return self.predict_outputs(texts, batch_size)[0]

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """(best class per text, (n, C) scores); for multilabel the best single label."""
        scores = self.predict_scores(texts)
        return [self.label_names[i] for i in scores.argmax(1)], scores

    def values_from_cosines(self, cos: np.ndarray) -> np.ndarray:
        """Regression cosines -> predicted target values in the training split's range."""
        low, high = self.target_range
        return cosine_to_value(np.asarray(cos, dtype=np.float64), low, high)

    def label_sets_from_scores(self, scores: np.ndarray) -> list[list[str]]:
        chosen = (self.decision or DEFAULT_DECISION).apply(scores)
        return [[self.label_names[j] for j in np.flatnonzero(row)] for row in chosen]

    def predict_all(self, texts: list[str], batch_size: int = 256) -> Prediction:
        """Everything the task predicts for `texts` (see `Prediction`)."""
        scores, cos = self.predict_outputs(texts, batch_size)
        labels = label_sets = values = None
        if self.task in (CLASSIFICATION, JOINT):
            labels = [self.label_names[i] for i in scores.argmax(1)] if len(scores) else []
        if self.task == MULTILABEL:
            label_sets = self.label_sets_from_scores(scores)
        if cos is not None:
            values = self.values_from_cosines(cos)
        return Prediction(self.task, list(self.label_names), scores, labels, label_sets, values)
