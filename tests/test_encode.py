from __future__ import annotations

import numpy as np
import pytest

from hpn import encode
from hpn.config import EncoderConfig
from hpn.errors import ConfigError

TEXTS = [
    "A marine biologist who studies coral reefs.",
    "A tax lawyer who writes about corporate law.",
    "A retired teacher who volunteers at the library.",
]


def test_second_encode_loads_the_cache_and_not_the_model(cache_dir, monkeypatch):
    cfg = EncoderConfig(cache_dir=cache_dir)
    first = encode.encode_texts(TEXTS, cfg)
    assert first.shape == (3, 384) and first.dtype == np.float32

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the embeddings are cached")

    monkeypatch.setattr(encode, "TextEncoder", refuse)
    np.testing.assert_array_equal(encode.encode_texts(TEXTS, cfg), first)


def test_cache_key_depends_on_encoder_pooling_length_and_texts():
    base = EncoderConfig()
    key = encode.cache_key(base, TEXTS)
    assert key == encode.cache_key(EncoderConfig(), list(TEXTS))
    assert key != encode.cache_key(EncoderConfig(pooling="cls"), TEXTS)
    assert key != encode.cache_key(EncoderConfig(max_length=64), TEXTS)
    assert key != encode.cache_key(EncoderConfig(name="other/model"), TEXTS)
    assert key != encode.cache_key(base, TEXTS[:2] + ["changed"])


def test_length_sorted_batches_give_the_same_embeddings_as_one_batch():
    model = encode.TextEncoder(encode.EncoderConfig().name)
    batched = encode.embed(model, TEXTS, batch_size=1, device=encode.pick_device("cpu"))
    together = encode.embed(model, TEXTS, batch_size=8, device=encode.pick_device("cpu"))
    np.testing.assert_allclose(batched, together, atol=1e-4)


def test_mean_and_cls_pooling_give_different_sentence_vectors():
    mean = encode.TextEncoder(EncoderConfig().name, pooling="mean")
    cls = encode.TextEncoder(EncoderConfig().name, pooling="cls")
    cpu = encode.pick_device("cpu")
    assert not np.allclose(encode.embed(mean, TEXTS, 4, cpu), encode.embed(cls, TEXTS, 4, cpu))


def test_an_encoder_that_cannot_be_loaded_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="encoder.name"):
        encode.TextEncoder(str(tmp_path / "no-such-model"))


def test_top_layers_only_are_trainable():
    model = encode.TextEncoder(EncoderConfig().name)
    model.freeze_except_top(2)
    trainable = {n.split(".")[2] for n, p in model.model.named_parameters()
                 if p.requires_grad and n.startswith("encoder.layer.")}
    assert trainable == {"4", "5"}  # MiniLM-L6 has layers 0..5
    assert not model.model.embeddings.word_embeddings.weight.requires_grad
    with pytest.raises(ConfigError, match="trainable_layers"):
        model.freeze_except_top(7)


def test_an_encoder_with_only_a_pickled_bin_checkpoint_is_refused(tmp_path):
    """A saved model names its encoder; loading one must never unpickle a `.bin` checkpoint."""
    import torch

    from hpn.encode import DEFAULT_ENCODER, TextEncoder
    from hpn.errors import ConfigError

    encoder = TextEncoder(DEFAULT_ENCODER)
    encoder.model.config.save_pretrained(tmp_path)
    encoder.tokenizer.save_pretrained(tmp_path)
    torch.save(encoder.model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="does not load pickled .bin checkpoints"):
        TextEncoder(str(tmp_path))
