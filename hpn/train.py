"""Train and evaluate one HPN from one config.

`train(config, data, on_epoch)` is a plain function so Ray can call it and tests can too;
only `tuning/` turns `on_epoch` into a Tune report.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from hpn import metrics as M
from hpn.config import Config
from hpn.data import Corpus, Split, load_corpus
from hpn.encode import TextEncoder, check_embeddings, encode_texts, pick_device
from hpn.memory import PeakMemory
from hpn.model import HPNClassifier, PrototypeHead, head_classes, initial_prototypes
from hpn.prototypes import separation, separation_loss

EpochCallback = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(RuntimeError):
    """Training diverged (NaN/inf loss): the config is bad, not the code."""


@dataclass
class PreparedData:
    """A corpus, its split and (for a frozen encoder) its cached embeddings."""

    corpus: Corpus
    split: Split
    features: np.ndarray | None  # (n, width) float32; None when the encoder is fine-tuned

    @property
    def fingerprint(self) -> str:
        return self.corpus.fingerprint()


@dataclass
class TrainResult:
    metrics: dict[str, float]
    model: HPNClassifier
    history: list[dict[str, float]] = field(default_factory=list)


def prepare_data(cfg: Config, progress: bool = False) -> PreparedData:
    corpus = load_corpus(cfg.data)
    head_classes(corpus.num_classes, cfg.model)  # a count the corpus cannot use fails before the encode
    split = corpus.split(cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.seed)
    features = None
    if cfg.encoder.trainable_layers == 0:
        features = encode_texts(corpus.texts, cfg.encoder, pick_device(cfg.train.device), progress)
    return PreparedData(corpus, split, features)


def resolve_loss(cfg: Config, num_classes: int | None = None) -> str:
    if cfg.model.loss != "auto":
        return cfg.model.loss
    # The paper's squared-cosine loss is defined for one fixed prototype per class.
    count = cfg.model.prototype_count
    one_each = (cfg.model.prototype_assignment == "per_class" and cfg.model.prototypes_per_class == 1
                and (count == 0 or count == num_classes))
    return "squared_cosine" if cfg.model.prototype_mode == "fixed" and one_each else "cross_entropy"


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def compute_loss(
    kind: str, scores: torch.Tensor, cos: torch.Tensor, y: torch.Tensor, head: PrototypeHead,
    weights: torch.Tensor | None, temperature: float,
) -> torch.Tensor:
    if kind == "squared_cosine":
        # Pull each text to its class's nearest prototype (the class score), so that with
        # several prototypes per class each one can win texts; pulling to a fixed one would
        # leave the others dead.
        target_cos = scores.gather(1, y.unsqueeze(1)).squeeze(1)  # (batch,)
        per_sample = (1 - target_cos) ** 2
        w = weights[y] if weights is not None else torch.ones_like(per_sample)
        return (per_sample * w).sum() / w.sum()
    if head.logits_over_prototypes:
        # The seed's softmax: every prototype is a logit, class c's prototype is index c and
        # the rest are extra negatives that are never a target.
        if weights is not None:
            weights = torch.cat([weights, weights.new_ones(cos.shape[1] - len(weights))])
        return F.cross_entropy(cos / temperature, y, weight=weights)
    return F.cross_entropy(scores / temperature, y, weight=weights)


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    f1s = []
    for c in range(num_classes):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp, fn = np.sum((y_pred == c) & (y_true != c)), np.sum((y_pred != c) & (y_true == c))
        denom = 2 * tp + fp + fn
        if denom:
            f1s.append(2 * tp / denom)
    return float(np.mean(f1s)) if f1s else 0.0


class _Batches:
    """Model inputs for index batches: cached features, or tokens for a trainable encoder."""

    def __init__(self, data: PreparedData, encoder: TextEncoder | None, device: torch.device) -> None:
        self.data, self.encoder, self.device = data, encoder, device
        # A trainable encoder must see tokens even when cached features happen to exist.
        use_cache = encoder is None and data.features is not None
        self.features = torch.from_numpy(data.features).to(device) if use_cache else None
        self.labels = torch.tensor(data.corpus.labels, dtype=torch.long, device=device)

    def inputs(self, idx: np.ndarray) -> torch.Tensor:
        if self.features is not None:
            return self.features[torch.as_tensor(idx, device=self.device)]
        batch = self.encoder.tokenize([self.data.corpus.texts[i] for i in idx])
        return self.encoder(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))


@contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    cfg: Config, data: PreparedData | None = None, on_epoch: EpochCallback | None = None,
    progress: bool = False,
) -> TrainResult:
    device = pick_device(cfg.train.device)
    data = data or prepare_data(cfg, progress)
    # A head on cached embeddings is a few small matmuls per step: on CPU, thread
    # hand-offs cost more than they save (measured 0.21 s vs 5.9 s per 7,000-text epoch
    # with 1 vs 2 threads on a busy 2-core machine), so it trains on one thread.
    head_only_cpu = device.type == "cpu" and cfg.encoder.trainable_layers == 0
    # The peak is this run's own (Ray reuses trial processes; see hpn/memory.py). The `with`
    # ends the tracker, and its sampler thread if any, also when training raises (SystemExit
    # from a Ray report included); the window starts where _train starts, after data prep.
    with _cpu_threads(1 if head_only_cpu else None), PeakMemory(device) as memory:
        return _train(cfg, data, on_epoch, device, memory)


def _train(
    cfg: Config, data: PreparedData, on_epoch: EpochCallback | None, device: torch.device,
    memory: PeakMemory,
) -> TrainResult:
    started = time.perf_counter()
    corpus, split = data.corpus, data.split
    torch.manual_seed(cfg.train.seed)

    # -- model ------------------------------------------------------------------------------
    encoder = None
    if cfg.encoder.trainable_layers > 0:
        encoder = TextEncoder(cfg.encoder.name, cfg.encoder.pooling, cfg.encoder.max_length)
        encoder.freeze_except_top(cfg.encoder.trainable_layers)
        in_dim = encoder.width
    else:
        if data.features is None:
            data = PreparedData(data.corpus, data.split, encode_texts(
                data.corpus.texts, cfg.encoder, device))
        # Features may come from outside (a study's object store, a benchmark): a wrong width
        # or a NaN would train to chance and then fail every prediction, so refuse them here.
        check_embeddings(data.features, len(corpus.texts), cfg.encoder)
        in_dim = data.features.shape[1]
    protos = initial_prototypes(corpus.num_classes, cfg.model, cfg.train.seed, cfg.encoder.cache_dir)
    head = PrototypeHead(in_dim, corpus.num_classes, cfg.model, protos)
    model = HPNClassifier(head, corpus.label_names, cfg.model, cfg.encoder, encoder).to(device)
    batches = _Batches(data, encoder, device)

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
        )
    # AMP: fp16 + GradScaler on CUDA. On CPU a frozen-encoder head is a few small matmuls,
    # where bf16 autocast is slower than fp32, so bf16 is used only when the encoder trains.
    use_amp = cfg.train.amp and (device.type == "cuda" or encoder is not None)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if use_amp else nullcontext

    loss_kind = resolve_loss(cfg, corpus.num_classes)
    train_labels = corpus.labels[split.train]
    weights = class_weights(train_labels, corpus.num_classes).to(device) if cfg.train.class_weights else None
    rivals = head.rivals  # the pairs separation pushes apart
    learned = cfg.model.prototype_mode == "learned"

    def evaluate(idx: np.ndarray) -> tuple[float, float, np.ndarray]:
        model.eval()
        preds, total = [], 0.0
        with torch.no_grad(), autocast():
            for start in range(0, len(idx), cfg.train.batch_size):
                b = idx[start : start + cfg.train.batch_size]
                scores, cos = head(batches.inputs(b))
                y = batches.labels[torch.as_tensor(b, device=device)]
                total += float(compute_loss(loss_kind, scores, cos, y, head, weights, cfg.model.temperature)) * len(b)
                preds.append(scores.argmax(1).cpu().numpy())
        pred = np.concatenate(preds)
        return float(np.mean(pred == corpus.labels[idx])), total / len(idx), pred

    # -- epochs -----------------------------------------------------------------------------
    rng = np.random.default_rng(cfg.train.seed)
    history: list[dict[str, float]] = []
    seen, train_time = 0, 0.0
    for epoch in range(1, cfg.train.epochs + 1):
        model.train()
        if encoder is not None:
            encoder.model.eval()  # dropout off in the encoder: only its top layers adapt
        t0 = time.perf_counter()
        order = rng.permutation(split.train)
        # Summed on the device and read once per epoch: a per-step float() or isfinite()
        # is a host sync that made GPU head trials launch-bound.
        running, steps = torch.zeros((), device=device), 0
        for start in range(0, len(order), cfg.train.batch_size):
            if cfg.train.max_steps and steps >= cfg.train.max_steps:
                break
            b = order[start : start + cfg.train.batch_size]
            y = batches.labels[torch.as_tensor(b, device=device)]
            with autocast():
                scores, cos = head(batches.inputs(b))
                loss = compute_loss(loss_kind, scores, cos, y, head, weights, cfg.model.temperature)
                if learned and cfg.train.separation_weight > 0:
                    loss = loss + cfg.train.separation_weight * separation_loss(head.prototypes, rivals)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if learned:  # back onto the sphere after every step, as the seed project does
                with torch.no_grad():
                    head.prototypes.copy_(F.normalize(head.prototypes.float(), dim=-1))
            running += loss.detach().float()
            steps += 1
            seen += len(b)
        epoch_loss = float(running) / max(steps, 1)  # NaN anywhere in the epoch shows here
        train_time += time.perf_counter() - t0
        if not math.isfinite(epoch_loss):
            raise NonFiniteLossError(
                f"loss became {epoch_loss} in epoch {epoch} (diverged or non-finite inputs); "
                "lower train.lr")

        val_acc, val_loss, _ = evaluate(split.val)
        sep = separation(head.prototypes.detach().float().cpu().numpy(), rivals.cpu().numpy())
        row = {
            M.EPOCH: float(epoch),
            M.TRAIN_LOSS: epoch_loss,
            M.VAL_LOSS: val_loss,
            M.VAL_ACCURACY: val_acc,
            M.SEPARATION_MIN_ANGLE_DEG: sep["min_angle_deg"],
            M.SEPARATION_MAX_COSINE: sep["max_cosine"],
        }
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, dict(row))

    # -- final evaluation -------------------------------------------------------------------
    test_acc, _, test_pred = evaluate(split.test)
    majority = int(np.bincount(train_labels, minlength=corpus.num_classes).argmax())
    final = dict(history[-1])
    final.update({
        M.TEST_ACCURACY: test_acc,
        M.TEST_MACRO_F1: _macro_f1(corpus.labels[split.test], test_pred, corpus.num_classes),
        M.MAJORITY_BASELINE_ACCURACY: float(np.mean(corpus.labels[split.test] == majority)),
        M.VAL_MAJORITY_BASELINE_ACCURACY: float(np.mean(corpus.labels[split.val] == majority)),
        M.NUM_PROTOTYPES: float(len(head.groups)),
        M.RUNTIME_S: time.perf_counter() - started,
        M.TRAIN_SAMPLES_PER_S: seen / train_time if train_time > 0 else math.nan,
        **memory.stop(),
    })
    model.eval()
    return TrainResult(final, model, history)
