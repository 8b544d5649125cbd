from __future__ import annotations

import json

import numpy as np
import pytest

from hpn import metrics as M
from hpn.model import WEIGHTS_FILE, HPNClassifier
from hpn.train import prepare_data, resolve_loss, train


def test_training_on_the_synthetic_corpus_clearly_beats_the_majority_baseline(small_config):
    metrics = train(small_config).metrics
    assert metrics[M.TEST_ACCURACY] > metrics[M.MAJORITY_BASELINE_ACCURACY] + 0.2
    assert 0 < metrics[M.TEST_MACRO_F1] <= 1


def test_the_same_seed_gives_the_same_metrics_on_cpu(small_config):
    data = prepare_data(small_config)
    first, second = train(small_config, data).metrics, train(small_config, data).metrics
    for key in (M.VAL_ACCURACY, M.TEST_ACCURACY, M.TEST_MACRO_F1, M.TRAIN_LOSS):
        assert first[key] == second[key]
    other = train(small_config.with_updates({"train.seed": 7}), data).metrics
    assert other[M.TRAIN_LOSS] != first[M.TRAIN_LOSS]


def test_on_epoch_reports_every_epoch_with_the_stable_metric_names(small_config):
    seen: list[tuple[int, dict]] = []
    result = train(small_config, on_epoch=lambda epoch, row: seen.append((epoch, row)))
    assert [e for e, _ in seen] == list(range(1, small_config.train.epochs + 1))
    assert all(set(M.EPOCH_METRICS) <= set(row) for _, row in seen)
    assert set(M.FINAL_METRICS) <= set(result.metrics)


def test_a_cpu_run_reports_peak_rss_and_no_vram_figure(small_config):
    metrics = train(small_config.with_updates({"train.epochs": 1})).metrics
    assert metrics[M.PEAK_RSS_MB] > 0
    assert M.PEAK_VRAM_MB not in metrics


def test_fixed_single_prototypes_use_the_papers_loss_and_others_cross_entropy(small_config):
    assert resolve_loss(small_config) == "squared_cosine"
    assert resolve_loss(small_config.with_updates({"model.prototypes_per_class": 3})) == "cross_entropy"
    assert resolve_loss(small_config.with_updates({"model.prototype_mode": "learned"})) == "cross_entropy"


def test_fixed_prototypes_keep_their_separation_during_training(small_config):
    result = train(small_config)
    angles = [row[M.SEPARATION_MIN_ANGLE_DEG] for row in result.history]
    # 32 dims hold every class on a regular simplex: more than 90 degrees apart.
    assert min(angles) == max(angles) > 90


def test_learned_prototypes_are_pushed_apart_by_the_separation_loss(small_config):
    cfg = small_config.with_updates({
        "model.prototype_mode": "learned", "train.separation_weight": 1.0, "train.epochs": 8,
    })
    history = train(cfg).history
    assert history[-1][M.SEPARATION_MIN_ANGLE_DEG] > history[0][M.SEPARATION_MIN_ANGLE_DEG]


def test_several_prototypes_per_class_train_and_beat_the_baseline(small_config):
    cfg = small_config.with_updates({"model.prototypes_per_class": 3, "train.optimizer": "adam",
                                     "train.lr": 0.01})
    metrics = train(cfg).metrics
    assert metrics[M.TEST_ACCURACY] > metrics[M.MAJORITY_BASELINE_ACCURACY] + 0.2


def test_a_saved_model_loads_without_pickle_and_predicts_the_same_labels(small_config, tmp_path):
    data = prepare_data(small_config)
    result = train(small_config, data)
    result.model.save(tmp_path / "m")
    assert (tmp_path / "m" / WEIGHTS_FILE).is_file()
    meta = json.loads((tmp_path / "m" / "hpn_model.json").read_text())
    assert meta["label_names"] == data.corpus.label_names
    loaded = HPNClassifier.load(tmp_path / "m")
    texts = [data.corpus.texts[i] for i in data.split.test[:20]]
    labels, scores = loaded.predict(texts)
    expected, _ = result.model.predict(texts)
    assert labels == expected
    assert scores.shape == (20, data.corpus.num_classes)


def test_fine_tuning_the_top_layer_trains_the_encoder_with_amp(cache_dir):
    from hpn.config import load_config

    cfg = load_config(None, [
        "data.size=120", "train.epochs=1", "train.max_steps=2", "train.batch_size=8",
        "encoder.trainable_layers=1", "encoder.max_length=32", f"encoder.cache_dir={cache_dir}",
    ])
    data = prepare_data(cfg)
    assert data.features is None  # no cache when the encoder trains
    result = train(cfg, data)
    encoder = result.model.encoder
    assert encoder is not None
    top = [p for n, p in encoder.model.named_parameters() if n.startswith("encoder.layer.5.")]
    low = [p for n, p in encoder.model.named_parameters() if n.startswith("encoder.layer.0.")]
    assert all(p.requires_grad for p in top) and not any(p.requires_grad for p in low)
    from hpn.encode import TextEncoder

    fresh = TextEncoder(cfg.encoder.name)
    fresh_top = dict(fresh.model.named_parameters())
    changed = [not np.allclose(p.detach().numpy(), fresh_top[n].detach().numpy())
               for n, p in encoder.model.named_parameters() if n.startswith("encoder.layer.5.")]
    assert any(changed)
    assert np.isfinite(result.metrics[M.TEST_ACCURACY])


def test_a_non_finite_loss_stops_the_run_with_a_clear_error(small_config):
    from hpn.train import NonFiniteLossError, PreparedData

    data = prepare_data(small_config)
    broken = data.features.copy()
    broken[data.split.train[:5]] = 3e38  # finite, but overflows the projection: the loss turns NaN
    with pytest.raises(NonFiniteLossError, match="train.lr"):
        train(small_config, PreparedData(data.corpus, data.split, broken))
