"""Sparse heads: fixed block / random masks on the projection, kept through training and saving."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from hpn import metrics as M
from hpn.config import Config, ModelConfig, load_config
from hpn.errors import ConfigError
from hpn.model import META_FILE, HPNClassifier, PrototypeHead
from hpn.sparse import (
    BLOCK,
    MaskedLinear,
    head_parameter_count,
    make_mask,
    projection,
    storage_bytes,
)
from hpn.train import prepare_data, train

SHAPES = [(64, 384), (10, 30), (3, 5)]  # divisible by 4, partial edge blocks, under one block


@pytest.fixture(scope="module")
def base(cache_dir: str) -> Config:
    return load_config(None, [
        "data.size=600", "train.epochs=4", f"encoder.cache_dir={cache_dir}",
        "model.prototype_dim=32", "train.batch_size=64",
    ])


@pytest.fixture(scope="module")
def data(base: Config):
    """The joint view of the corpus (labels and targets), encoded once for the module."""
    return prepare_data(base.with_updates({"model.task": "joint"}))


@pytest.fixture(scope="module")
def block_joint(base: Config, data):
    cfg = base.with_updates({"model.task": "joint", "model.sparsity": "block",
                             "model.density": 0.25, "train.epochs": 2})
    return cfg, train(cfg, data).model


# -- masks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.5, 0.25, 0.1])
def test_a_random_mask_keeps_the_density_of_weights_within_rounding(shape, density):
    mask = make_mask("random", shape, density, seed=0)
    assert mask.shape == shape and mask.dtype == torch.bool
    assert int(mask.sum()) == max(1, round(density * math.prod(shape)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.5, 0.25, 0.1])
def test_a_block_mask_is_whole_4x4_blocks_at_the_density_of_blocks(shape, density):
    mask = make_mask("block", shape, density, seed=0)
    rows, cols = math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)
    # Pad with each edge block's own value: a partial block must be all kept or all dropped.
    padded = np.pad(mask.numpy(), ((0, rows * BLOCK - shape[0]), (0, cols * BLOCK - shape[1])),
                    mode="edge")
    blocks = padded.reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3).reshape(rows, cols, -1)
    assert (blocks.all(-1) | ~blocks.any(-1)).all()  # every block whole or empty
    assert int(blocks.all(-1).sum()) == max(1, round(density * rows * cols))


def test_a_mask_is_fixed_by_shape_density_and_seed_and_differs_across_seeds_and_heads():
    first = make_mask("random", (32, 64), 0.3, seed=5)
    assert torch.equal(first, make_mask("random", (32, 64), 0.3, seed=5))
    assert not torch.equal(first, make_mask("random", (32, 64), 0.3, seed=6))
    assert not torch.equal(first, make_mask("random", (32, 64), 0.3, seed=5, stream=1))
    assert make_mask("block", (8, 8), 1.0, seed=0).all()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_masked_weights_stay_exactly_zero_and_the_mask_unchanged_through_training(optimizer):
    torch.manual_seed(0)
    layer = projection(16, 8, "random", 0.3, seed=1)
    assert isinstance(layer, MaskedLinear)
    mask = layer.mask.clone()
    assert (layer.weight[~mask] == 0).all()  # zeroed at init
    opt = (torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
           if optimizer == "sgd" else torch.optim.Adam(layer.parameters(), lr=0.1, weight_decay=1e-2))
    before = layer.weight.detach().clone()
    for _ in range(5):
        loss = layer(torch.randn(32, 16)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        assert (layer.weight.grad[~mask] == 0).all()
        opt.step()
    assert torch.equal(layer.mask, mask)
    assert (layer.weight[~mask] == 0).all()
    assert not torch.equal(layer.weight[mask], before[mask])  # the kept ones did train


def test_a_trained_sparse_model_keeps_the_mask_drawn_from_its_seed(block_joint):
    cfg, model = block_joint
    for head, stream in ((model.head, 0), (model.regression_head, 1)):
        proj = head.proj
        expected = make_mask("block", tuple(proj.weight.shape), 0.25, cfg.train.seed, stream)
        assert torch.equal(proj.mask.cpu(), expected)
        assert (proj.weight[~proj.mask] == 0).all()


def test_storage_bytes_match_torchs_own_csr_and_bsr_tensors():
    mask = make_mask("block", (64, 384), 0.25, seed=0)
    weight = torch.randn(64, 384) * mask

    def nbytes(t: torch.Tensor) -> int:
        return sum(x.numel() * x.element_size()
                   for x in (t.values(), t.crow_indices(), t.col_indices()))

    assert storage_bytes(mask, "csr", index_bytes=8) == nbytes(weight.to_sparse_csr())
    assert storage_bytes(mask, "bsr", index_bytes=8) == nbytes(weight.to_sparse_bsr((4, 4)))
    assert storage_bytes(mask, "dense") == 64 * 384 * 4
    assert storage_bytes(mask, "bsr") < storage_bytes(mask, "dense") / 3


# -- head_params ------------------------------------------------------------------------------

def _classifier(cfg: ModelConfig, in_dim: int = 40, classes: int = 3) -> HPNClassifier:
    head = PrototypeHead(in_dim, classes, cfg, np.eye(classes, cfg.prototype_dim, dtype=np.float32))
    return HPNClassifier(head, ["a", "b", "c"][:classes], cfg, load_config().encoder)


def test_head_params_count_kept_weights_biases_and_learned_prototypes_only():
    dense = _classifier(ModelConfig(prototype_dim=8))
    assert head_parameter_count(dense) == 8 * 40 + 8  # fixed prototypes are not trained
    learned = _classifier(ModelConfig(prototype_dim=8, prototype_mode="learned"))
    assert head_parameter_count(learned) == 8 * 40 + 8 + 3 * 8
    sparse = _classifier(ModelConfig(prototype_dim=8, sparsity="random", density=0.25))
    assert head_parameter_count(sparse) == 80 + 8


def test_head_params_of_a_joint_model_count_both_heads(block_joint):
    _, model = block_joint
    kept = sum(int(h.proj.mask.sum()) + h.proj.bias.numel()
               for h in (model.head, model.regression_head))
    assert head_parameter_count(model) == kept < 2 * (32 * 384 + 32) / 3


# -- saving and loading -----------------------------------------------------------------------

def test_a_saved_sparse_model_loads_with_its_mask_and_predicts_identically(block_joint, data,
                                                                           tmp_path):
    _, model = block_joint
    loaded = HPNClassifier.load(model.save(tmp_path / "m"))
    x = torch.from_numpy(data.features[:50])
    for a, b in ((model.head, loaded.head), (model.regression_head, loaded.regression_head)):
        assert isinstance(b.proj, MaskedLinear)
        assert torch.equal(a.proj.mask, b.proj.mask)
    with torch.no_grad():
        assert torch.equal(model.head(x)[0], loaded.head(x)[0])
        assert torch.equal(model.regression_head(x), loaded.regression_head(x))


def test_a_model_saved_before_sparsity_existed_loads_dense(tmp_path):
    model = _classifier(ModelConfig(prototype_dim=8))
    out = model.save(tmp_path / "old")
    meta = json.loads((out / META_FILE).read_text())
    for key in ("sparsity", "density"):
        del meta["model"][key]
    (out / META_FILE).write_text(json.dumps(meta))
    loaded = HPNClassifier.load(out)
    assert type(loaded.head.proj) is nn.Linear
    assert torch.equal(loaded.head.proj.weight, model.head.proj.weight)


# -- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sets,named", [
    (["model.sparsity=block", "model.density=0"], "model.density: must be > 0"),
    (["model.sparsity=random", "model.density=1.5"], "model.density: must be <= 1"),
    (["model.density=0.5"], "model.density=0.5: has no effect with model.sparsity=dense"),
    (["model.sparsity=sparse"], "model.sparsity: unknown value 'sparse'"),
])
def test_bad_sparsity_settings_fail_in_one_line_naming_the_key(sets, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, sets)
    assert str(err.value).startswith(named) and "\n" not in str(err.value)


def test_a_sparse_layer_at_density_1_is_allowed_and_keeps_every_weight():
    cfg = load_config(None, ["model.sparsity=block"])
    assert (cfg.model.sparsity, cfg.model.density) == ("block", 1.0)


def test_the_sparse_space_searches_density_only_for_sparse_heads():
    import optuna

    from tuning.spaces import load_space, resolve_space_path

    space = load_space(resolve_space_path("sparse"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        constants = space.define_by_run()(trial)
        config = {**trial.params, **constants}
        study.tell(trial, 0.5)
        seen.add(config["model.sparsity"])
        assert ("model.density" in config) == (config["model.sparsity"] != "dense")
        Config().with_updates(config)
    assert seen == {"dense", "block", "random"}


# -- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", ["block", "random"])
def test_a_sparse_head_trains_well_above_chance(base, data, sparsity):
    cfg = base.with_updates({"model.sparsity": sparsity, "model.density": 0.25})
    metrics = train(cfg, data).metrics  # the joint view's labels serve classification too
    assert metrics[M.TEST_ACCURACY] > metrics[M.MAJORITY_BASELINE_ACCURACY] + 0.2
