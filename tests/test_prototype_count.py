"""A total prototype count (the seed's `num_prototypes`) and how prototypes map to classes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hpn import metrics as M
from hpn.config import ModelConfig, load_config
from hpn.errors import ConfigError
from hpn.model import HPNClassifier, PrototypeHead
from hpn.prototypes import NO_CLASS, prototype_classes
from hpn.train import compute_loss, resolve_loss, train


@pytest.mark.parametrize("count, classes", [(50, 11), (100, 11), (200, 11), (50, 14), (100, 14),
                                            (200, 14)])
def test_per_class_splits_a_total_count_evenly_and_gives_the_remainder_to_the_first_classes(
        count, classes):
    owner = prototype_classes(classes, count=count, assignment="per_class")
    assert len(owner) == count
    sizes = np.bincount(owner, minlength=classes)
    base, extra = divmod(count, classes)
    assert sizes.tolist() == [base + 1] * extra + [base] * (classes - extra)
    assert (np.diff(owner) >= 0).all()  # class-major: a class's prototypes are contiguous


def test_the_seed_grids_fifty_over_fourteen_classes_is_eight_fours_and_six_threes():
    assert np.bincount(prototype_classes(14, count=50)).tolist() == [4] * 8 + [3] * 6


@pytest.mark.parametrize("count, classes", [(50, 11), (200, 14)])
def test_extra_negatives_give_prototype_c_to_class_c_and_no_class_to_the_rest(count, classes):
    owner = prototype_classes(classes, count=count, assignment="extra_negatives")
    assert owner[:classes].tolist() == list(range(classes))
    assert (owner[classes:] == NO_CLASS).all() and len(owner) == count


def test_without_a_total_the_count_is_classes_times_per_class():
    assert prototype_classes(3, per_class=2).tolist() == [0, 0, 1, 1, 2, 2]


def test_a_count_below_the_number_of_classes_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="model.prototype_count=5.*11 classes"):
        prototype_classes(11, count=5)


@pytest.mark.parametrize("sets, key", [
    (["model.prototype_count=100", "model.prototypes_per_class=2"], "model.prototype_count"),
    (["model.prototype_assignment=extra_negatives"], "model.prototype_count"),
    (["model.prototype_count=100", "model.prototype_assignment=extra_negatives",
      "model.loss=squared_cosine"], "model.loss"),
    (["model.prototype_assignment=first"], "model.prototype_assignment"),
])
def test_contradicting_count_settings_are_refused_naming_the_key(sets, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, sets)


def _head(classes: int, cfg: ModelConfig, protos: np.ndarray) -> PrototypeHead:
    head = PrototypeHead(protos.shape[1], classes, cfg, protos)
    with torch.no_grad():  # identity projection: an input is its own embedding
        head.proj.weight.copy_(torch.eye(protos.shape[1]))
        head.proj.bias.zero_()
    return head


def test_a_class_scores_its_best_prototype_with_uneven_counts():
    # 3 classes, 5 prototypes: class 0 owns 0-1, class 1 owns 2-3, class 2 owns 4.
    protos = np.eye(5, dtype=np.float32)
    head = _head(3, ModelConfig(prototype_dim=5, prototype_count=5), protos)
    scores, cos = head(torch.eye(5))
    assert cos.shape == (5, 5)
    assert scores.argmax(1).tolist() == [0, 0, 1, 1, 2]


def test_the_seeds_softmax_runs_over_every_prototype_with_the_class_index_as_target():
    cfg = ModelConfig(prototype_dim=4, prototype_count=4, prototype_assignment="extra_negatives",
                      prototype_mode="learned", temperature=0.1)
    head = _head(2, cfg, np.eye(4, dtype=np.float32))
    x = torch.tensor([[0.0, 0.0, 1.0, 0.0]])  # on an extra negative: a wrong answer to class 0
    scores, cos = head(x)
    y = torch.tensor([0])
    seed = torch.nn.functional.cross_entropy(10 * cos, y)  # the seed's logits = 10 x cosine
    assert torch.isclose(compute_loss("cross_entropy", scores, cos, y, head, None, 0.1), seed)
    # extra negatives raise the loss; class scores alone would not see them
    only_classes = torch.nn.functional.cross_entropy(10 * scores, y)
    assert seed > only_classes
    assert scores.shape == (1, 2)


def test_the_squared_cosine_loss_pulls_to_the_nearest_prototype_of_the_class():
    # Class 0 owns prototypes 0 and 1, class 1 owns 2 and 3 (learned, so gradients show).
    cfg = ModelConfig(prototype_dim=4, prototypes_per_class=2, prototype_mode="learned")
    head = _head(2, cfg, np.eye(4, dtype=np.float32))
    x = torch.tensor([[0.1, 1.0, 0.0, 0.0], [1.0, 0.2, 0.0, 0.0]])  # near prototype 1, then 0
    scores, cos = head(x)
    loss = compute_loss("squared_cosine", scores, cos, torch.tensor([0, 0]), head, None, 0.1)
    nearest = cos[:, :2].amax(1)
    assert torch.isclose(loss, ((1 - nearest) ** 2).mean())
    loss.backward()
    grad = head.prototypes.grad.norm(dim=1)
    assert grad[0] > 0 and grad[1] > 0  # both prototypes of class 0 are reached
    assert grad[2] == 0 and grad[3] == 0


def test_squared_cosine_training_moves_the_second_prototype_of_most_classes(small_config):
    cfg = small_config.with_updates({"model.prototypes_per_class": 2, "model.loss": "squared_cosine",
                                     "model.prototype_mode": "learned",
                                     "train.separation_weight": 0.0, "train.epochs": 1})
    start = train(cfg.with_updates({"train.lr": 1e-12})).model.head.prototypes.detach().clone()
    moved = (train(cfg).model.head.prototypes.detach() - start).norm(dim=1).view(-1, 2) > 1e-4
    # Before the fix only the first prototype of each class moved and the second stayed dead;
    # now each text pulls its nearest one (a prototype nearest to no text still rests).
    assert moved[:, 1].float().mean() > 0.5, moved


def test_auto_loss_is_the_papers_for_exactly_one_fixed_prototype_per_class(small_config):
    assert resolve_loss(small_config.with_updates({"model.prototype_count": 14}), 14) == "squared_cosine"
    assert resolve_loss(small_config.with_updates({"model.prototype_count": 50}), 14) == "cross_entropy"


@pytest.mark.parametrize("assignment", ["per_class", "extra_negatives"])
def test_a_total_count_trains_saves_and_loads_with_its_prototypes(small_config, tmp_path, assignment):
    cfg = small_config.with_updates({"model.prototype_count": 50, "model.prototype_mode": "learned",
                                     "model.prototype_assignment": assignment,
                                     "model.loss": "cross_entropy", "train.optimizer": "adam",
                                     "train.lr": 0.01})
    result = train(cfg)
    assert result.metrics[M.TEST_ACCURACY] > result.metrics[M.MAJORITY_BASELINE_ACCURACY] + 0.2
    protos = result.model.head.prototypes.detach()
    assert protos.shape == (50, 32)
    assert torch.allclose(protos.norm(dim=1), torch.ones(50), atol=1e-5)  # renormalised each step
    result.model.save(tmp_path / "m")
    loaded = HPNClassifier.load(tmp_path / "m")
    assert torch.equal(loaded.head.prototypes, protos)
    assert loaded.head.groups.tolist() == result.model.head.groups.tolist()


def test_a_model_saved_before_prototype_counts_existed_still_loads(small_config, tmp_path):
    result = train(small_config.with_updates({"train.epochs": 1}))
    out = result.model.save(tmp_path / "old")
    meta = json.loads((out / "hpn_model.json").read_text())
    for key in ("prototype_count", "prototype_assignment"):  # what an older version wrote
        del meta["model"][key]
    (out / "hpn_model.json").write_text(json.dumps(meta))
    loaded = HPNClassifier.load(out)
    texts = ["A nurse who loves hiking.", "A tax lawyer in Lyon."]
    assert loaded.predict(texts)[0] == result.model.predict(texts)[0]


def test_a_count_below_the_corpus_classes_fails_before_the_encoder_runs(small_config, monkeypatch):
    import hpn.train

    def no_encode(*args, **kwargs):
        raise AssertionError("encoded before checking the prototype count")

    monkeypatch.setattr(hpn.train, "encode_texts", no_encode)
    with pytest.raises(ConfigError, match="model.prototype_count=5 is below the corpus's 14 classes"):
        hpn.train.prepare_data(small_config.with_updates({"model.prototype_count": 5}))
