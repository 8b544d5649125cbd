"""Encoder runtimes (`encoder.runtime`): the ONNX graphs stand in for PyTorch, their cache
verifies what it loads, and a model predicts on the runtime its training embeddings came from."""
from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

from hpn import encode, runtimes
from hpn.cache_files import CacheRebuiltWarning
from hpn.config import EncoderConfig, load_config
from hpn.errors import ConfigError
from hpn.model import HPNClassifier
from hpn.train import prepare_data, train

TEXTS = [
    "A marine biologist who studies coral reefs and teaches diving on weekends.",
    "A tax lawyer who writes about corporate law.",
    "A retired teacher who volunteers at the library.",
    "Nurse",
]


@pytest.fixture(scope="module")
def torch_embeddings() -> np.ndarray:
    model = encode.TextEncoder(EncoderConfig().name)
    return encode.embed(model, TEXTS, 2, torch.device("cpu"))


def test_cache_key_carries_a_runtime_other_than_torch_and_keeps_torch_keys():
    # The key before runtimes existed: caches written then still load under runtime=torch.
    h = hashlib.sha256(json.dumps([EncoderConfig().name, "mean", 128]).encode())
    for text in TEXTS:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    assert encode.cache_key(EncoderConfig(), TEXTS) == h.hexdigest()
    keys = {rt: encode.cache_key(EncoderConfig(runtime=rt), TEXTS) for rt in runtimes.RUNTIMES}
    assert len(set(keys.values())) == 3


def test_onnx_embeddings_equal_pytorch_and_int8_stays_close(cache_dir, torch_embeddings):
    fp32 = encode.embed(runtimes.load_encoder(EncoderConfig(cache_dir=cache_dir, runtime="onnx")),
                        TEXTS, 2, torch.device("cpu"))
    np.testing.assert_allclose(fp32, torch_embeddings, atol=1e-4)
    int8 = encode.embed(runtimes.load_encoder(EncoderConfig(cache_dir=cache_dir, runtime="onnx-int8")),
                        TEXTS, 2, torch.device("cpu"))
    cos = (int8 * torch_embeddings).sum(1) / (
        np.linalg.norm(int8, axis=1) * np.linalg.norm(torch_embeddings, axis=1))
    assert cos.mean() >= runtimes.INT8_MIN_MEAN_COSINE and np.abs(int8 - torch_embeddings).max() > 1e-4


def test_a_cached_graph_is_reused_and_a_changed_one_is_exported_again(cache_dir, monkeypatch):
    cfg = EncoderConfig(cache_dir=cache_dir, runtime="onnx-int8")
    first = runtimes.encoder_graph(cfg, "onnx-int8")
    path = runtimes.graph_path(cfg, "onnx-int8")
    assert path.read_bytes() == first

    calls = []
    real = runtimes._export_encoder
    monkeypatch.setattr(runtimes, "_export_encoder", lambda *a: calls.append(a) or real(*a))
    assert runtimes.encoder_graph(cfg, "onnx-int8") == first and calls == []  # from the cache

    data = bytearray(first)
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    path.write_bytes(bytes(data))
    with pytest.warns(CacheRebuiltWarning, match="bytes changed"):
        again = runtimes.encoder_graph(cfg, "onnx-int8")
    assert len(calls) == 1 and runtimes._digest(again) == runtimes._digest(path.read_bytes())
    runtimes.session(again)  # a whole, loadable graph

    runtimes.graph_path(cfg, "onnx-int8").with_suffix(".json").unlink()  # checksum lost
    with pytest.warns(CacheRebuiltWarning, match="unreadable"):
        runtimes.encoder_graph(cfg, "onnx-int8")
    assert len(calls) == 2


def test_a_runtime_is_a_frozen_encoder_setting():
    with pytest.raises(ConfigError, match=r"^encoder\.runtime=onnx: runs a frozen encoder.*"
                                          r"encoder\.runtime=torch"):
        load_config(None, ["encoder.runtime=onnx", "encoder.trainable_layers=1"])
    with pytest.raises(ConfigError, match=r"^encoder\.runtime: unknown value 'tensorrt'; choose "
                                          r"one of torch, onnx, onnx-int8"):
        load_config(None, ["encoder.runtime=tensorrt"])


def test_a_study_searching_the_runtime_gets_each_runtimes_embeddings(small_config):
    data = prepare_data(small_config, runtimes=("torch", "onnx-int8"))
    assert set(data.by_runtime) == {"torch", "onnx-int8"}
    assert data.for_runtime("torch").features is data.features
    int8 = data.for_runtime("onnx-int8").features
    assert int8.shape == data.features.shape and not np.array_equal(int8, data.features)
    with pytest.raises(ConfigError, match=r"encoder\.runtime: 'onnx' was not encoded"):
        data.for_runtime("onnx")
    assert prepare_data(small_config).by_runtime == {}  # one runtime: nothing extra kept


def test_a_model_predicts_on_its_runtime_and_fp32_onnx_predicts_as_torch(small_config, tmp_path):
    """Raw-text predictions of an onnx-int8 model equal its head on the int8 embeddings it was
    trained on (not on PyTorch's); an fp32 ONNX model gives the torch model's predictions."""
    models, labels = {}, {}
    for runtime in ("torch", "onnx", "onnx-int8"):
        cfg = small_config.with_updates({"encoder.runtime": runtime, "train.epochs": 3})
        data = prepare_data(cfg)
        result = train(cfg, data)
        result.model.save(tmp_path / runtime)
        models[runtime] = HPNClassifier.load(tmp_path / runtime)
        texts = [data.corpus.texts[i] for i in data.split.test]
        labels[runtime], _ = models[runtime].predict(texts)
        assert isinstance(models[runtime]._frozen[0],
                          encode.TextEncoder if runtime == "torch" else runtimes.OnnxTextEncoder)
        with torch.inference_mode():
            head = models[runtime].head(torch.from_numpy(data.features[data.split.test]))[0]
        expected = [models[runtime].label_names[i] for i in head.argmax(1).numpy()]
        # int8: ONNX Runtime quantises activations with one scale per batch, so a text's int8
        # embedding depends a little on its batch (the cache: 128 length-sorted texts; here
        # 256 in order): close, not equal. fp32 and torch: equal up to float rounding.
        agree = np.mean(np.array(labels[runtime]) == np.array(expected))
        assert agree >= (0.9 if runtime == "onnx-int8" else 0.99), (runtime, agree)
    assert labels["onnx"] == labels["torch"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the saved runtime is read back, not defaulted
        assert models["onnx-int8"].encoder_cfg.runtime == "onnx-int8"


def test_a_saved_onnx_model_serves_its_recorded_graph_from_another_machines_cache_dir(
        small_config, cache_dir, tmp_path, monkeypatch):
    """A saved model's cache_dir is the training machine's: where it is missing the default
    .hpn_cache is used, and only a graph with the digest the model recorded is run."""
    import dataclasses

    cfg = small_config.with_updates({"encoder.runtime": "onnx-int8", "train.epochs": 1})
    model = train(cfg, prepare_data(cfg)).model
    model.save(tmp_path / "m")
    meta_path = tmp_path / "m" / "hpn_model.json"
    meta = json.loads(meta_path.read_text())
    graph = runtimes.encoder_graph(cfg.encoder, "onnx-int8")
    assert meta["encoder_graph_xxh3"] == runtimes._digest(graph)
    model.encoder_cfg = dataclasses.replace(cfg.encoder, runtime="torch")
    assert model._encoder_graph_digest() is None  # torch records none
    model.encoder_cfg = cfg.encoder

    meta["encoder"]["cache_dir"] = str(tmp_path / "training-machine-only")
    meta_path.write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".hpn_cache").symlink_to(cache_dir)  # this machine's default cache: same graph
    assert HPNClassifier.load(tmp_path / "m").predict(TEXTS)[0] == model.predict(TEXTS)[0]

    meta["encoder_graph_xxh3"] = "0" * 32  # a graph this machine does not reproduce
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"^encoder\.runtime=onnx-int8: this model was trained "
                       r"on an encoder graph \(xxh3 0{16}\) that this machine does not reproduce "
                       r"\(it exported xxh3 \w{16} with torch .*`hpn-tune export` the whole model$"):
        HPNClassifier.load(tmp_path / "m").predict(TEXTS)


def test_an_onnx_int8_models_int8_export_computes_the_embeddings_its_head_learnt(small_config):
    """The whole-model int8 export of a model trained on onnx-int8 embeddings quantises the
    encoder as the runtime does, so it predicts what the model predicts (its own recipe for
    torch-trained models kept the label of only 96% of texts of such a model)."""
    from hpn.export import check_graph, export_model

    cfg = small_config.with_updates({"encoder.runtime": "onnx-int8", "train.epochs": 3})
    model = train(cfg, prepare_data(cfg)).model
    agreement = check_graph(model, export_model(model, int8=True), True)
    assert agreement.same_labels >= 0.99, agreement
