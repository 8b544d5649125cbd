"""Train and evaluate one HPN from one config, for any task (`model.task`).

`train(config, data, on_epoch)` is a plain function so Ray can call it and tests can too;
only `tuning/` turns `on_epoch` into a Tune report. Classification runs exactly as before
tasks existed; regression, multilabel and joint add their losses (hpn/losses.py) and their
metrics and baselines (hpn/task_metrics.py), named in hpn/metrics.py.
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hpn import metrics as M
from hpn.config import Config
from hpn.data import Corpus, Split, load_corpus
from hpn.encode import TextEncoder, check_embeddings, encode_texts, pick_device
from hpn.errors import ConfigError, DataError
from hpn.losses import (
    cosine_to_value,
    label_pos_weight,
    multilabel_loss,
    regression_loss,
    value_to_cosine,
)
from hpn.memory import PeakMemory
from hpn.model import HPNClassifier, PrototypeHead, RegressionHead, head_classes, initial_prototypes
from hpn.prototypes import regression_prototypes, separation, separation_loss
from hpn.task_metrics import (
    DecisionRule,
    fit_decision,
    joint_score,
    multilabel_baselines,
    multilabel_metrics,
    regression_baselines,
    regression_metrics,
)
from hpn.tasks import (
    CLASSIFICATION,
    JOINT,
    MULTILABEL,
    REGRESSION,
    TASK_LOSSES,
    loss_problem,
    target_name,
    task_spec,
)

EpochCallback = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(RuntimeError):
    """Training diverged (NaN/inf loss): the config is bad, not the code."""


@dataclass
class PreparedData:
    """A corpus, its split and (for a frozen encoder) its cached embeddings."""

    corpus: Corpus
    split: Split
    features: np.ndarray | None  # (n, width) float32; None when the encoder is fine-tuned
    #: a study that searches encoder.runtime: each runtime's embeddings of the same texts
    by_runtime: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.corpus.fingerprint()

    def for_runtime(self, runtime: str) -> PreparedData:
        """This data with `runtime`'s embeddings as its features (itself when it has no
        embeddings by runtime: a study that does not search the runtime)."""
        if not self.by_runtime:
            return self
        if runtime not in self.by_runtime:
            raise ConfigError(f"encoder.runtime: {runtime!r} was not encoded for this study "
                              f"(encoded: {', '.join(self.by_runtime)})")
        return PreparedData(self.corpus, self.split, self.by_runtime[runtime], self.by_runtime)


@dataclass
class TrainResult:
    metrics: dict[str, float]
    model: HPNClassifier
    history: list[dict[str, float]] = field(default_factory=list)


def prepare_data(cfg: Config, progress: bool = False,
                 runtimes: Sequence[str] = ()) -> PreparedData:
    """Load, split and (frozen encoder) encode the corpus once. `runtimes`: encode it with
    each of these encoder runtimes too (a study searching encoder.runtime); `features` are
    those of cfg's own runtime."""
    task = task_spec(cfg.model.task).name
    corpus = load_corpus(cfg.data, task)  # the task's view: a missing target / label set fails here
    # A loss or a prototype count the task and corpus cannot use fails before the encode.
    resolve_loss(cfg, corpus.num_classes)
    if task != REGRESSION:
        head_classes(corpus.num_classes, cfg.model)
    split = corpus.split(cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.seed)
    features, by_runtime = None, {}
    if cfg.encoder.trainable_layers == 0:
        device = pick_device(cfg.train.device)
        for runtime in dict.fromkeys([cfg.encoder.runtime, *runtimes]):
            encoder_cfg = dataclasses.replace(cfg.encoder, runtime=runtime)
            by_runtime[runtime] = encode_texts(corpus.texts, encoder_cfg, device, progress)
        features = by_runtime[cfg.encoder.runtime]
        if len(by_runtime) == 1:
            by_runtime = {}
    return PreparedData(corpus, split, features, by_runtime)


def resolve_loss(cfg: Config, num_classes: int | None = None) -> str:
    """The loss `model.loss` means for `model.task`: auto resolved, one the task cannot use
    refused with a ConfigError naming model.loss. For joint: the classification half's loss
    (the regression half always uses the squared cosine to the target)."""
    task = task_spec(cfg.model.task).name
    if problem := loss_problem(task, cfg.model.loss):  # a Config built without validate()
        raise ConfigError(problem)
    if task in (REGRESSION, MULTILABEL):
        return TASK_LOSSES[task][0]
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


@dataclass
class TaskLoss:
    """One batch's loss for `task`, with the outputs it computed on the way.

    classification: `compute_loss(kind, ...)` (as before tasks existed); multilabel: binary
    cross-entropy on the class scores / temperature; regression: the squared cosine to the
    target's cosine; joint: classification loss + regression_weight x regression loss.
    """

    task: str
    kind: str  # resolve_loss's answer: the class half's loss
    temperature: float
    regression_weight: float = 1.0
    weights: torch.Tensor | None = None  # class weights (classification, joint)
    pos_weight: torch.Tensor | None = None  # per-label positive weights (multilabel)

    def __call__(
        self, head: PrototypeHead | None, reg_head: RegressionHead | None, x: torch.Tensor,
        labels: torch.Tensor | None = None, target_cos: torch.Tensor | None = None,
        label_sets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> (loss, (batch, C) class scores or None, (batch,) regression cosines or None)."""
        scores = cos = None
        if head is not None:
            scores, cos = head(x)
        if self.task == CLASSIFICATION:
            return compute_loss(self.kind, scores, cos, labels, head, self.weights,
                                self.temperature), scores, None
        if self.task == MULTILABEL:
            return multilabel_loss(scores, label_sets, self.temperature, self.pos_weight), scores, None
        reg = reg_head(x)
        loss = regression_loss(reg, target_cos)
        if self.task == JOINT:
            cls = compute_loss(self.kind, scores, cos, labels, head, self.weights, self.temperature)
            loss = cls + self.regression_weight * loss
        return loss, scores, reg


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

    def __init__(self, data: PreparedData, encoder: TextEncoder | None, device: torch.device,
                 task: str = CLASSIFICATION, target_range: tuple[float, float] | None = None) -> None:
        self.data, self.encoder, self.device = data, encoder, device
        corpus = data.corpus
        # A trainable encoder must see tokens even when cached features happen to exist.
        use_cache = encoder is None and data.features is not None
        self.features = torch.from_numpy(data.features).to(device) if use_cache else None
        self.labels = self.target_cos = self.label_sets = None
        if task in (CLASSIFICATION, JOINT):
            self.labels = torch.tensor(corpus.labels, dtype=torch.long, device=device)
        if task in (REGRESSION, JOINT):  # each target as its cosine with the upper prototype
            t = value_to_cosine(np.asarray(corpus.targets, np.float64), *target_range)
            self.target_cos = torch.tensor(t, dtype=torch.float32, device=device)
        if task == MULTILABEL:
            self.label_sets = torch.tensor(np.asarray(corpus.label_sets, bool), dtype=torch.float32,
                                           device=device)

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


def target_range(targets: np.ndarray, train_idx: np.ndarray, column: str) -> tuple[float, float]:
    """(low, high) of the TRAINING split's targets: the regression prototypes' two ends."""
    y = np.asarray(targets, dtype=np.float64)[train_idx]
    low, high = float(y.min()), float(y.max())
    if not high > low:
        raise DataError(f"data.target_column {column!r}: every target in the training split is "
                        f"{low:g}, so there is nothing to regress; use a column that varies")
    return low, high


def _target_name(cfg: Config) -> str:
    return target_name(cfg.data.source, cfg.data.target_column)


def _optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                           weight_decay=cfg.train.weight_decay)


class _Scorer:
    """A task's metrics from a split's model outputs: each epoch's on validation (the
    multi-label decision rule is chosen there, every epoch; the last one is the model's),
    and the final ones on validation and test with the trivial baselines. Every choice and
    range comes from the training or validation split, never test."""

    def __init__(self, task: str, corpus: Corpus, split: Split,
                 low_high: tuple[float, float] | None, decision_mode: str) -> None:
        self.task, self.corpus, self.split = task, corpus, split
        self.low_high, self.decision_mode = low_high, decision_mode
        self.decision: DecisionRule | None = None
        self.label_sets = (np.asarray(corpus.label_sets, dtype=bool) if task == MULTILABEL
                           else None)
        self.targets = (np.asarray(corpus.targets, dtype=np.float64) if low_high is not None
                        else None)
        self.baselines = (regression_baselines(*(self.targets[i] for i in self._splits()))
                          if self.targets is not None else {})  # joint's score divides by one

    def _splits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.split.train, self.split.val, self.split.test

    def _accuracy(self, scores: np.ndarray, idx: np.ndarray) -> float:
        return float(np.mean(scores.argmax(1) == self.corpus.labels[idx]))

    def _values(self, cos: np.ndarray) -> np.ndarray:
        return cosine_to_value(cos.astype(np.float64), *self.low_high)

    def epoch(self, scores: np.ndarray | None, cos: np.ndarray | None) -> dict[str, float]:
        """The validation metrics of one epoch (the task's primary among them)."""
        row: dict[str, float] = {}
        val = self.split.val
        if self.task in (CLASSIFICATION, JOINT):
            row[M.VAL_ACCURACY] = self._accuracy(scores, val)
        if self.targets is not None:
            row[M.VAL_MAE] = regression_metrics(self.targets[val], self._values(cos),
                                                "val")[M.VAL_MAE]
        if self.task == JOINT:
            row[M.VAL_JOINT_SCORE] = joint_score(row[M.VAL_ACCURACY], row[M.VAL_MAE],
                                                 self.baselines[M.VAL_MEAN_BASELINE_MAE])
        if self.task == MULTILABEL:
            self.decision = fit_decision(scores, self.label_sets[val], self.decision_mode)
            ml = multilabel_metrics(self.label_sets[val], self.decision.apply(scores), "val")
            row[M.VAL_MICRO_F1], row[M.VAL_MACRO_F1] = ml[M.VAL_MICRO_F1], ml[M.VAL_MACRO_F1]
        return row

    def final(self, val_cos: np.ndarray | None, test_scores: np.ndarray | None,
              test_cos: np.ndarray | None) -> dict[str, float]:
        """The final metrics beyond the last epoch's row: test, full validation, baselines."""
        out: dict[str, float] = {}
        train, val, test = self._splits()
        corpus = self.corpus
        if self.task in (CLASSIFICATION, JOINT):
            majority = int(np.bincount(corpus.labels[train], minlength=corpus.num_classes).argmax())
            out.update({
                M.TEST_ACCURACY: self._accuracy(test_scores, test),
                M.TEST_MACRO_F1: _macro_f1(corpus.labels[test], test_scores.argmax(1),
                                           corpus.num_classes),
                M.MAJORITY_BASELINE_ACCURACY: float(np.mean(corpus.labels[test] == majority)),
                M.VAL_MAJORITY_BASELINE_ACCURACY: float(np.mean(corpus.labels[val] == majority)),
            })
        if self.targets is not None:
            out.update(regression_metrics(self.targets[val], self._values(val_cos), "val"))
            out.update(regression_metrics(self.targets[test], self._values(test_cos), "test"))
            out.update(self.baselines)
            out.update({M.TARGET_LOW: self.low_high[0], M.TARGET_HIGH: self.low_high[1]})
        if self.task == JOINT:
            out[M.TEST_JOINT_SCORE] = joint_score(out[M.TEST_ACCURACY], out[M.TEST_MAE],
                                                  out[M.MEAN_BASELINE_MAE])
        if self.task == MULTILABEL:
            sets = self.label_sets
            out.update(multilabel_metrics(sets[test], self.decision.apply(test_scores), "test"))
            out.update(multilabel_baselines(sets[train], sets[val], sets[test]))
            out.update(self.decision.metrics())
        return out


def _train(
    cfg: Config, data: PreparedData, on_epoch: EpochCallback | None, device: torch.device,
    memory: PeakMemory,
) -> TrainResult:
    started = time.perf_counter()
    corpus, split = data.corpus, data.split
    task = task_spec(cfg.model.task).name
    has_classes = task != REGRESSION  # the class head: classification, multilabel, joint
    has_values = task in (REGRESSION, JOINT)  # the regression output space
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
    head = reg_head = None
    label_names: list[str] = []
    if has_classes:  # created first, so a joint model's class head starts as a classifier's
        protos = initial_prototypes(corpus.num_classes, cfg.model, cfg.train.seed, cfg.encoder.cache_dir)
        # model.sparsity's mask is drawn from the run's seed, so a trial is reproducible
        head = PrototypeHead(in_dim, corpus.num_classes, cfg.model, protos, mask_seed=cfg.train.seed)
        label_names = corpus.label_names
    low_high = None
    if has_values:
        low_high = target_range(corpus.targets, split.train, _target_name(cfg))
        reg_head = RegressionHead(in_dim, cfg.model.prototype_dim,
                                  regression_prototypes(cfg.model.prototype_dim, cfg.train.seed),
                                  cfg.model.sparsity, cfg.model.density, mask_seed=cfg.train.seed)
    model = HPNClassifier(head, label_names, cfg.model, cfg.encoder, encoder, task=task,
                          regression_head=reg_head, target_range=low_high,
                          target_name=_target_name(cfg) if has_values else None).to(device)
    batches = _Batches(data, encoder, device, task, low_high)

    opt = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    # AMP: fp16 + GradScaler on CUDA. On CPU a frozen-encoder head is a few small matmuls,
    # where bf16 autocast is slower than fp32, so bf16 is used only when the encoder trains.
    use_amp = cfg.train.amp and (device.type == "cuda" or encoder is not None)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if use_amp else nullcontext

    loss_kind = resolve_loss(cfg, corpus.num_classes)
    weights = pos_weight = None
    if task in (CLASSIFICATION, JOINT):
        train_labels = corpus.labels[split.train]
        if cfg.train.class_weights:
            weights = class_weights(train_labels, corpus.num_classes).to(device)
    if task == MULTILABEL and cfg.train.class_weights:
        pos_weight = label_pos_weight(np.asarray(corpus.label_sets)[split.train]).to(device)
    if head is not None:
        rivals = head.rivals  # the pairs separation pushes apart
        sep_protos, sep_groups = head.prototypes, rivals
    else:  # regression: its two prototypes, opposite by construction
        rivals, sep_protos, sep_groups = None, reg_head.prototypes, None
    learned = has_classes and cfg.model.prototype_mode == "learned"
    temperature = cfg.model.temperature

    loss_fn = TaskLoss(task, loss_kind, temperature, cfg.train.regression_weight, weights, pos_weight)

    def forward(x: torch.Tensor, bt: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return loss_fn(head, reg_head, x,
                       labels=None if batches.labels is None else batches.labels[bt],
                       target_cos=None if batches.target_cos is None else batches.target_cos[bt],
                       label_sets=None if batches.label_sets is None else batches.label_sets[bt])

    def evaluate(idx: np.ndarray) -> tuple[float, np.ndarray | None, np.ndarray | None]:
        """-> (mean loss, (n, C) class scores or None, (n,) regression cosines or None)."""
        model.eval()
        scores_out, cos_out, total = [], [], 0.0
        with torch.no_grad(), autocast():
            for start in range(0, len(idx), cfg.train.batch_size):
                b = idx[start : start + cfg.train.batch_size]
                loss, scores, reg = forward(batches.inputs(b), torch.as_tensor(b, device=device))
                total += float(loss) * len(b)
                if scores is not None:
                    scores_out.append(scores.float().cpu().numpy())
                if reg is not None:
                    cos_out.append(reg.float().cpu().numpy())
        scores = np.concatenate(scores_out) if head is not None else None
        cos = np.concatenate(cos_out) if reg_head is not None else None
        return total / len(idx), scores, cos

    scorer = _Scorer(task, corpus, split, low_high, cfg.model.decision)

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
            bt = torch.as_tensor(b, device=device)
            with autocast():
                loss = forward(batches.inputs(b), bt)[0]
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

        val_loss, val_scores, val_cos = evaluate(split.val)
        sep = separation(sep_protos.detach().float().cpu().numpy(),
                         None if sep_groups is None else sep_groups.cpu().numpy())
        row = {M.EPOCH: float(epoch), M.TRAIN_LOSS: epoch_loss, M.VAL_LOSS: val_loss,
               **scorer.epoch(val_scores, val_cos)}
        row[M.SEPARATION_MIN_ANGLE_DEG] = sep["min_angle_deg"]
        row[M.SEPARATION_MAX_COSINE] = sep["max_cosine"]
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, dict(row))

    # -- final evaluation -------------------------------------------------------------------
    _, test_scores, test_cos = evaluate(split.test)
    # val_cos: the last epoch's, i.e. the final model's
    final = {**history[-1], **scorer.final(val_cos, test_scores, test_cos)}
    if task == MULTILABEL:
        model.decision = scorer.decision
    count = (len(head.groups) if head is not None else 0) + (2 if reg_head is not None else 0)
    final.update({
        M.NUM_PROTOTYPES: float(count),
        M.RUNTIME_S: time.perf_counter() - started,
        M.TRAIN_SAMPLES_PER_S: seen / train_time if train_time > 0 else math.nan,
        **memory.stop(),
    })
    model.eval()
    return TrainResult(final, model, history)
