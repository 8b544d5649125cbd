"""Export a whole HPN as one ONNX graph: token ids in, the model's outputs out.

Why: a served model is mostly its encoder, and ONNX Runtime runs it faster on a CPU
(hpn/runtimes.py). One graph holding the encoder, pooling, head(s) and prototypes needs
nothing but a tokenizer and ONNX Runtime to answer: no PyTorch model to build, no per-head
Python. Inputs `input_ids` and `attention_mask` (int64, dynamic batch and sequence); outputs
`scores` (n, C): each class's best prototype cosine, for the tasks with classes, and/or
`cosine` (n,): the regression output's cosine with its upper prototype (regression, joint).
`HPNClassifier.use_graph` makes a model predict through such a graph, so its decision rule,
value mapping and everything after `predict_outputs` stay one code path.

An export is trusted only once checked (`check_graph`): on fixed sample texts the graph must
predict what the PyTorch model predicts, exactly for fp32 and within INT8 tolerances for a
dynamically quantised graph (int8 is lossy by design).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hpn.runtimes import export_torch_module, quantize

if TYPE_CHECKING:
    from hpn.model import HPNClassifier, Prediction

INPUTS = ("input_ids", "attention_mask")
SCORES, COSINE = "scores", "cosine"
ONNX, ONNX_INT8 = "onnx", "onnx-int8"  # the serving formats of an export (torch: no graph)
#: fp32: the same labels (or label sets) on every sample text, scores and regression cosines
#: within float rounding of PyTorch's (the encoder check's bound, hpn.runtimes).
FP32_MAX_SCORE_DIFF = 1e-4
#: int8: at least this fraction of sample texts keep their label (label set); a regression
#: value may move by at most INT8_MAX_VALUE_SHIFT of the target range (high - low) on that
#: fraction of texts (a cosine error of 2 x 0.02 = 0.04).
INT8_MIN_AGREEMENT = 0.99
INT8_MAX_VALUE_SHIFT = 0.02
#: The sample the check predicts: synthetic personas (ages written in, so every task's
#: output is exercised), a seed other than the corpus default, so texts no model trained on.
SAMPLE_SIZE, SAMPLE_SEED = 300, 13


class ExportMismatch(RuntimeError):
    """The exported graph does not predict what the model predicts: nothing was written."""

    exit_code, label = 1, "refused"


def serving_format(int8: bool) -> str:
    return ONNX_INT8 if int8 else ONNX


class _WholeModel(nn.Module):
    """Encoder -> pooled embedding -> head(s), as one traceable module.

    Class scores take each class's best prototype with a masked max instead of the head's
    scatter_reduce (which opset 17 cannot express): the same maximum of the same cosines.
    """

    def __init__(self, model: HPNClassifier, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head, self.regression_head = encoder, model.head, model.regression_head
        if self.head is not None:
            groups = self.head.groups.cpu()
            owned = groups.unsqueeze(0) == torch.arange(self.head.num_classes).unsqueeze(1)
            # (C, count): 0 where the prototype is the class's, -inf elsewhere
            mask = torch.zeros(owned.shape).masked_fill(~owned, float("-inf"))
            self.register_buffer("class_mask", mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        feats = self.encoder(input_ids, attention_mask)  # (n, width)
        outs = []
        if self.head is not None:
            cos = self.head.cosines(self.head.embed(feats))  # (n, count)
            outs.append((cos.unsqueeze(1) + self.class_mask).amax(-1))  # (n, C)
        if self.regression_head is not None:
            outs.append(self.regression_head(feats))  # (n,)
        return tuple(outs)


def output_names(model: HPNClassifier) -> list[str]:
    return ([SCORES] if model.head is not None else []) + (
        [COSINE] if model.regression_head is not None else [])


def export_model(model: HPNClassifier, int8: bool) -> bytes:
    """`model` (encoder included) as ONNX bytes: the fine-tuned encoder when it has one, else
    its encoder config's PyTorch weights in fp32; `int8` quantises its weights
    (ORT dynamic int8, `quantize_whole`). Not checked here: `check_graph` says whether it may be used."""
    from hpn.encode import TextEncoder

    cfg = model.encoder_cfg
    encoder = model.encoder or TextEncoder(cfg.name, cfg.pooling, cfg.max_length)
    whole = _WholeModel(model, encoder).cpu().float().eval()
    sample = encoder.tokenize(["A retired nurse who volunteers.", "Software engineer"])
    names = output_names(model)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    dynamic.update({name: {0: "batch"} for name in names})
    was_training = model.training
    try:
        graph = export_torch_module(whole, (sample["input_ids"], sample["attention_mask"]),
                                    list(INPUTS), names, dynamic)
    finally:
        model.train(was_training)
    if not int8:
        return graph
    return quantize_whole(graph, like_runtime=cfg.runtime == ONNX_INT8 and model.encoder is None)


def quantize_whole(graph: bytes, like_runtime: bool = False) -> bytes:
    """Dynamic int8 for a whole-model graph: the encoder's MatMul and embedding-table weights
    quantised, except the feed-forward down-projections (their inputs are the post-GELU
    activations, whose outliers per-tensor int8 clips) and the head. Measured on a 600-persona
    classifier: all MatMul/Gather quantised kept the label of 95.7% of the 300 sample texts,
    this 99.7% at 34 MB (fp32 90 MB); hpn.runtimes.quantize_int8 quantises every weight.
    `like_runtime`: quantise the encoder as the onnx-int8 runtime does (below)."""
    import onnx

    proto = onnx.load_from_string(graph)
    if like_runtime:
        # A model trained on encoder.runtime=onnx-int8 embeddings: its encoder quantised
        # exactly as hpn.runtimes.quantize_int8 quantises the encoder alone (every weight,
        # per output channel), so the export computes the embeddings the head was trained
        # on; the head stays fp32.
        head = [n.name for n in proto.graph.node if not n.name.startswith("/encoder/")]
        return quantize(graph, per_channel=True, nodes_to_exclude=head)
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    keep = []
    for node in proto.graph.node:
        weight = shapes.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        down = weight is not None and len(weight) == 2 and weight[0] > weight[1]  # (4h, h)
        if down or not node.name.startswith("/encoder/"):
            keep.append(node.name)
    return quantize(graph, op_types_to_quantize=["MatMul", "Gather"], nodes_to_exclude=keep)


def graph_sha256(graph: bytes) -> str:
    return hashlib.sha256(graph).hexdigest()


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph or function: initializers (sparse ones' values and
    indices too) and node attributes (Constant values, tensor lists), subgraphs included."""
    yield from getattr(graph, "initializer", ())
    for sparse in getattr(graph, "sparse_initializer", ()):
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(
                    attr.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def _external_tensors(proto: Any) -> Iterator[Any]:
    """The model's tensors whose data lies in external files, in one pass over the model
    (its graph, subgraphs and functions): ONNX Runtime would read those files."""
    from onnx.external_data_helper import uses_external_data

    for graph in [proto.graph, *proto.functions]:
        yield from (t for t in _tensors(graph) if uses_external_data(t))


def graph_problem(graph: bytes) -> str | None:
    """Why these bytes are not a graph hpn-tune runs (None when they are): not ONNX, or
    tensors whose data lies in external files (a graph could name any file on the machine)."""
    import onnx

    try:
        proto = onnx.load_from_string(graph)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the answer
        return f"not an ONNX model ({type(exc).__name__})"
    external = next(_external_tensors(proto), None)
    if external is not None:
        return f"its tensor {external.name!r} refers to an external data file"
    inputs = [i.name for i in proto.graph.input]
    if inputs != list(INPUTS):
        return f"its inputs are {inputs}, not {list(INPUTS)}"
    return None


@dataclass
class Agreement:
    """How closely a graph's predictions follow the model's on the sample texts."""

    texts: int
    same_labels: float | None  # fraction with the same label (classification, joint)
    same_label_sets: float | None  # fraction with the same label set (multilabel)
    max_score_diff: float | None  # largest |score difference| over every class
    max_value_diff: float | None  # largest |predicted value difference| (regression, joint)
    value_span: float | None  # the target range high - low, what value tolerances scale by
    within_value_tolerance: float | None  # fraction of values within the int8 tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = []
        if self.same_labels is not None:
            parts.append(f"same labels {self.same_labels:.2%}")
        if self.same_label_sets is not None:
            parts.append(f"same label sets {self.same_label_sets:.2%}")
        if self.max_score_diff is not None:
            parts.append(f"max score diff {self.max_score_diff:.2g}")
        if self.max_value_diff is not None:
            parts.append(f"max value diff {self.max_value_diff:.3g} (range {self.value_span:.3g})")
        return f"{self.texts} texts: " + ", ".join(parts)


def compare_predictions(expected: Prediction, got: Prediction,
                        target_range: tuple[float, float] | None) -> Agreement:
    """Agreement of `got` (the graph's) with `expected` (the model's) on the same texts."""
    n = len(expected.labels if expected.labels is not None else (
        expected.label_sets if expected.label_sets is not None else expected.values))
    same_labels = same_sets = score_diff = value_diff = span = within = None
    if expected.labels is not None:
        same_labels = float(np.mean([a == b for a, b in zip(expected.labels, got.labels)])) if n else 1.0
    if expected.label_sets is not None:
        same_sets = float(np.mean([sorted(a) == sorted(b) for a, b in
                                   zip(expected.label_sets, got.label_sets)])) if n else 1.0
    if expected.scores is not None:
        diff = np.abs(np.asarray(expected.scores, np.float64) - np.asarray(got.scores, np.float64))
        score_diff = float(diff.max()) if diff.size else 0.0
    if expected.values is not None and target_range is not None:
        span = float(target_range[1] - target_range[0]) or 1.0
        diff = np.abs(np.asarray(expected.values, np.float64) - np.asarray(got.values, np.float64))
        value_diff = float(diff.max()) if diff.size else 0.0
        within = float(np.mean(diff <= INT8_MAX_VALUE_SHIFT * span)) if diff.size else 1.0
    return Agreement(n, same_labels, same_sets, score_diff, value_diff, span, within)


def agreement_problem(a: Agreement, int8: bool) -> str | None:
    """Why this agreement is not good enough for the format (None when it is): fp32 identical
    labels and label sets, scores and values within float rounding; int8 the same labels
    (sets) and values within INT8_MAX_VALUE_SHIFT of the range on INT8_MIN_AGREEMENT of texts."""
    need = INT8_MIN_AGREEMENT if int8 else 1.0
    if a.same_labels is not None and a.same_labels < need:
        return f"same labels on {a.same_labels:.2%} of {a.texts} texts, needs {need:.0%}"
    if a.same_label_sets is not None and a.same_label_sets < need:
        return f"same label sets on {a.same_label_sets:.2%} of {a.texts} texts, needs {need:.0%}"
    if not int8:
        if a.max_score_diff is not None and not a.max_score_diff <= FP32_MAX_SCORE_DIFF:
            return f"scores differ by up to {a.max_score_diff:.2g} (fp32 allows {FP32_MAX_SCORE_DIFF:g})"
        if a.max_value_diff is not None and not a.max_value_diff <= FP32_MAX_SCORE_DIFF * a.value_span:
            return (f"predicted values differ by up to {a.max_value_diff:.3g} (fp32 allows "
                    f"{FP32_MAX_SCORE_DIFF:g} of the range {a.value_span:.3g})")
    elif a.within_value_tolerance is not None and a.within_value_tolerance < need:
        return (f"predicted values within {INT8_MAX_VALUE_SHIFT:.0%} of the target range on "
                f"{a.within_value_tolerance:.2%} of {a.texts} texts, needs {need:.0%}")
    return None


def sample_texts(size: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED) -> list[str]:
    """The fixed texts an export is checked on (synthetic personas, deterministic)."""
    from hpn.data.synthetic import synthetic_corpus

    return list(synthetic_corpus(size, seed=seed, target=True).texts)


def check_graph(model: HPNClassifier, graph: bytes, int8: bool, texts: list[str] | None = None,
                expected: Prediction | None = None) -> Agreement:
    """Predict `texts` (default `sample_texts()`) with the graph and compare with `expected`
    (default: the model's own predictions); raises ExportMismatch when they disagree more than
    the format allows (`agreement_problem`)."""
    texts = sample_texts() if texts is None else list(texts)
    if expected is None:
        expected = model.predict_all(texts)
    got = graph_twin(model, graph).predict_all(texts)
    agreement = compare_predictions(expected, got, model.target_range)
    problem = agreement_problem(agreement, int8)
    if problem:
        fmt = serving_format(int8)
        hint = (" (a model trained on int8 embeddings: try --int8)"
                if getattr(model.encoder_cfg, "runtime", "torch") == ONNX_INT8 and not int8 else "")
        raise ExportMismatch(f"the {fmt} export does not predict what the model predicts: "
                             f"{problem}{hint}; nothing was written")
    return agreement


def graph_twin(model: HPNClassifier, graph: bytes) -> HPNClassifier:
    """A model that shares `model`'s weights and settings but predicts through `graph`."""
    import copy

    twin = copy.copy(model)  # shallow: modules shared, nothing trained twice
    twin.__dict__ = dict(model.__dict__)
    twin.use_graph(graph)
    return twin
