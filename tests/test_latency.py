"""Latency and size of a trained model on the champion path (hpn/latency.py)."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from hpn import latency
from hpn import metrics as M
from hpn.config import EncoderConfig, ModelConfig, load_config
from hpn.data.synthetic import synthetic_corpus
from hpn.errors import ConfigError
from hpn.model import HPNClassifier, PrototypeHead
from hpn.runtimes import graph_path
from hpn.sparse import head_parameter_count

FAST = {"calls": 4, "warmup": 1}  # the test checks the contract, not the box's speed


def make_model(cache_dir: str, **model_keys) -> HPNClassifier:
    """An untrained classifier over the default encoder: latency and size do not depend on
    what the head learned, so no corpus is encoded for them."""
    cfg = ModelConfig(prototype_dim=32, **model_keys)
    protos = np.random.default_rng(0).standard_normal((14, 32)).astype(np.float32)
    head = PrototypeHead(384, 14, cfg, protos)
    return HPNClassifier(head, [f"class{i}" for i in range(14)], cfg,
                         EncoderConfig(cache_dir=cache_dir)).eval()


@pytest.fixture(scope="module")
def model(cache_dir):
    return make_model(cache_dir)


def _state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def test_a_measurement_has_positive_latency_p95_at_least_p50_and_a_throughput(model):
    out = latency.measure_latency(model, **FAST)

    assert set(out) == set(M.LATENCY_METRICS)
    assert out[M.LATENCY_P50_MS] > 0 and out[M.LATENCY_P95_MS] >= out[M.LATENCY_P50_MS]
    assert out[M.THROUGHPUT_B64] > 0
    assert all(np.isfinite(v) for v in out.values())


def test_every_measurement_predicts_the_same_fixed_texts(model, monkeypatch):
    fixed = latency.sample_texts()
    assert fixed == list(synthetic_corpus(latency.SAMPLE_SIZE, seed=latency.SAMPLE_SEED).texts)
    assert len(fixed) == latency.SAMPLE_SIZE == latency.BATCH_SIZE
    seen: list[list[str]] = []
    predict = model.predict_all

    def spy(texts, batch_size=256):
        seen.append(list(texts))
        return predict(texts, batch_size)

    monkeypatch.setattr(model, "predict_all", spy)
    for _ in range(2):
        latency.measure_latency(model, calls=3, warmup=2)
    first, second = seen[:len(seen) // 2], seen[len(seen) // 2:]
    assert first == second  # warm-up, one-text calls, the batch: the same texts each time
    assert first == [[fixed[0]], [fixed[1]], [fixed[0]], [fixed[1]], [fixed[2]], fixed]


def test_threads_are_fixed_while_measuring_and_restored_after(model, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    during: list[int] = []
    predict = model.predict_all

    def spy(texts, batch_size=256):
        during.append(torch.get_num_threads())
        return predict(texts, batch_size)

    monkeypatch.setattr(model, "predict_all", spy)
    try:
        latency.measure_latency(model, **FAST)
        assert set(during) == {latency.THREADS}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_model_keeps_its_own_encoder_and_the_process_loads_one_once(model):
    held = model._frozen
    latency.measure_latency(model, **FAST)
    encoder = latency.frozen_encoder(model.encoder_cfg)
    latency.measure_latency(model, **FAST)
    assert model._frozen is held  # the measurement's one-thread encoder is not left on it
    assert latency.frozen_encoder(model.encoder_cfg) is encoder


def test_size_counts_the_encoder_in_its_runtimes_form_and_the_head(model):
    torch_size = latency.model_size(model)
    encoder = latency.frozen_encoder(model.encoder_cfg)
    head = _state_bytes(model)
    assert torch_size[M.MODEL_SIZE_MB] * 2**20 == head + _state_bytes(encoder.model)
    assert torch_size[M.HEAD_PARAMS] == 384 * 32 + 32  # projection weights and bias

    int8 = dataclasses.replace(model.encoder_cfg, runtime="onnx-int8")
    int8_size = latency.model_size(_with_encoder_cfg(model, int8))
    assert int8_size[M.MODEL_SIZE_MB] * 2**20 == head + graph_path(int8, "onnx-int8").stat().st_size
    # int8 weights: about a quarter of the fp32 encoder
    assert int8_size[M.MODEL_SIZE_MB] < 0.4 * torch_size[M.MODEL_SIZE_MB]
    # the ORT session runs on the measurement's fixed threads
    session = latency.frozen_encoder(int8)._session
    assert session.get_session_options().intra_op_num_threads == latency.THREADS


def _with_encoder_cfg(model: HPNClassifier, cfg: EncoderConfig) -> HPNClassifier:
    other = copy.deepcopy(model)
    other._frozen = None
    other.encoder_cfg = cfg
    return other


def test_head_params_count_what_a_sparse_heads_mask_keeps(model, cache_dir):
    sparse = make_model(cache_dir, sparsity="random", density=0.25)
    dense = latency.model_size(model)[M.HEAD_PARAMS]
    kept = latency.model_size(sparse)[M.HEAD_PARAMS]
    assert kept == head_parameter_count(sparse)
    assert kept == pytest.approx(0.25 * 384 * 32 + 32, rel=0.05) and kept < dense


def test_train_measure_latency_is_a_bool_key_on_by_default():
    assert load_config(None, []).train.measure_latency is True
    assert load_config(None, ["train.measure_latency=false"]).train.measure_latency is False
    with pytest.raises(ConfigError, match="train.measure_latency: expected true or false"):
        load_config(None, ["train.measure_latency=sometimes"])


def test_bad_measurement_counts_are_refused(model):
    with pytest.raises(ValueError, match="calls"):
        latency.measure_latency(model, calls=0)
