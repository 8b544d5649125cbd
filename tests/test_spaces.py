"""Search-space files: the shipped ones keep their contract, bad ones fail in one line."""
from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest

from hpn.config import Config, known_keys
from hpn.errors import HPNInputError
from tuning.spaces import SPACES_DIR, load_space, resolve_space_path

optuna.logging.set_verbosity(optuna.logging.WARNING)
SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def sample(space, n: int = 20, seed: int = 0) -> list[dict]:
    """Run the define-by-run function on in-memory trials: suggested params + constants."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = space.define_by_run()(trial)
        out.append({**trial.params, **constants})
        study.tell(trial, 0.5)
    return out


def test_the_repository_ships_the_default_seed_grid_and_quick_spaces():
    assert {p.stem for p in SHIPPED} >= {"default", "seed_grid", "quick"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_space_suggests_only_configs_that_validate(path):
    space = load_space(path)
    assert set(space.keys()) | set(space.constants) <= set(known_keys())
    for config in sample(space):
        assert set(config) <= set(known_keys())
        assert set(space.constants.items()) <= set(config.items())
        Config().with_updates(config)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_space_says_what_is_scientific_nuisance_and_fixed(path):
    summary = load_space(path).summary.lower()
    for word in ("scientific", "nuisance", "fixed"):
        assert word in summary


def test_conditional_key_is_suggested_only_when_its_condition_holds():
    configs = sample(load_space(SPACES_DIR / "default.yaml"), n=40)
    modes = {c["model.prototype_mode"] for c in configs}
    assert modes == {"fixed", "learned"}
    for c in configs:
        assert ("train.separation_weight" in c) == (c["model.prototype_mode"] == "learned")


def test_a_when_list_enables_the_key_for_any_of_its_values(tmp_path):
    space = load_space(write(tmp_path, (
        "model.loss: {type: categorical, choices: [auto, squared_cosine, cross_entropy]}\n"
        "model.temperature: {type: float, low: 0.01, high: 1, log: true,"
        " when: {model.loss: [auto, cross_entropy]}}\n")))
    for c in sample(space, n=30):
        assert ("model.temperature" in c) == (c["model.loss"] != "squared_cosine")


def test_a_conditional_range_is_checked_with_the_key_it_depends_on_enabling_it(tmp_path):
    """model.density < 1 is refused with model.sparsity=dense (the first choice), but it is
    only ever suggested with block or random: the space is valid."""
    space = load_space(write(tmp_path, (
        "model.sparsity: {type: categorical, choices: [dense, block]}\n"
        "model.density: {type: float, low: 0.1, high: 1, when: {model.sparsity: block}}\n")))
    for c in sample(space, n=20):
        assert ("model.density" in c) == (c["model.sparsity"] == "block")


def test_keys_are_suggested_in_file_order_and_constants_are_not_suggested():
    space = load_space(SPACES_DIR / "default.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    assert space.define_by_run()(trial) == {"train.optimizer": "sgd", "train.epochs": 20}
    order = space.keys()
    assert [k for k in order if k in trial.params] == list(trial.params)
    assert not set(space.constants) & set(trial.params)


def test_int_float_and_log_ranges_stay_inside_their_bounds():
    for c in sample(load_space(SPACES_DIR / "default.yaml"), n=50):
        assert isinstance(c["model.prototype_dim"], int) and 8 <= c["model.prototype_dim"] <= 256
        assert 1 <= c["model.prototypes_per_class"] <= 4
        assert 1e-3 <= c["train.lr"] <= 0.5


def test_define_by_run_survives_pickling_as_rays_searcher_checkpoint_needs():
    space = load_space(SPACES_DIR / "default.yaml")
    clone = pickle.loads(pickle.dumps(space.define_by_run()))
    study = optuna.create_study()
    assert clone(study.ask()) == space.constants


def test_seed_grid_is_the_seed_projects_grid_with_its_literal_counts_on_the_seed_preset():
    space = load_space(resolve_space_path("seed_grid"))
    assert space.grid() == {"model.prototype_dim": [64, 128, 256],
                            "model.prototype_count": [50, 100, 200]}
    seed = {"model.prototype_mode": "learned", "model.prototype_assignment": "extra_negatives",
            "model.loss": "cross_entropy", "model.temperature": 0.1,
            "train.optimizer": "sgd", "train.lr": 0.001, "train.momentum": 0.9,
            "train.weight_decay": 1e-4, "train.batch_size": 64, "train.epochs": 30,
            "train.separation_weight": 0.1, "train.seed": 42, "train.class_weights": False,
            "data.size": 10000, "data.seed": 42, "data.test_fraction": 0.2}
    assert {k: space.constants[k] for k in seed} == seed
    # the searched keys are not constants, whatever the preset fixed
    assert not set(space.keys()) & set(space.constants)


def test_a_space_takes_a_presets_keys_under_its_own(tmp_path):
    space = load_space(write(tmp_path, "preset: seed\ntrain.epochs: 3\n"
                                       "train.lr: {type: float, low: 0.01, high: 0.1}\n"))
    assert space.constants["train.epochs"] == 3 and "train.lr" not in space.constants
    assert space.constants["model.prototype_count"] == 100


def test_an_unknown_preset_names_the_space_and_the_presets(tmp_path):
    path = write(tmp_path, "preset: nope\ntrain.lr: {type: float, low: 0.01, high: 0.1}\n")
    with pytest.raises(HPNInputError, match="preset.*nope.*seed"):
        load_space(path)


def test_grid_enumerates_int_and_float_ranges_with_a_step(tmp_path):
    space = load_space(write(tmp_path, (
        "model.prototype_dim: {type: int, low: 16, high: 64, step: 16}\n"
        "train.lr: {type: float, low: 0.1, high: 0.3, step: 0.1}\n")))
    assert space.grid() == {"model.prototype_dim": [16, 32, 48, 64], "train.lr": [0.1, 0.2, 0.3]}


CONDITIONAL_GRID = ("model.prototype_mode: {type: categorical, choices: [fixed, learned]}\n"
                    "train.separation_weight: {type: float, low: 0.1, high: 1, step: 0.1,"
                    " when: {model.prototype_mode: learned}}\n")


@pytest.mark.parametrize("text, key, phrase", [
    ("train.lr: {type: float, low: 0.001, high: 0.5}\n", "train.lr", "without `step`"),
    (CONDITIONAL_GRID, "train.separation_weight", "conditional"),
])
def test_grid_refuses_what_it_cannot_enumerate_naming_the_file_and_key(tmp_path, text, key, phrase):
    with pytest.raises(HPNInputError) as err:
        load_space(write(tmp_path, text)).grid()
    assert "space.yaml" in str(err.value) and key in str(err.value) and phrase in str(err.value)


def test_resolve_space_path_finds_the_default_a_bare_name_and_keeps_a_path(tmp_path):
    assert resolve_space_path(None) == SPACES_DIR / "default.yaml"
    assert resolve_space_path("seed_grid") == SPACES_DIR / "seed_grid.yaml"
    assert resolve_space_path("quick.yaml") == SPACES_DIR / "quick.yaml"
    mine = write(tmp_path, "train.lr: {type: float, low: 0.01, high: 0.1}\n")
    assert resolve_space_path(str(mine)) == mine


def test_unknown_key_error_names_the_file_and_suggests_the_closest_key(tmp_path):
    path = write(tmp_path, "model.prototype_dimension: {type: int, low: 8, high: 64}\n")
    with pytest.raises(HPNInputError) as err:
        load_space(path)
    message = str(err.value)
    assert str(path) in message and "model.prototype_dimension" in message
    assert "did you mean 'model.prototype_dim'" in message


def test_missing_file_error_lists_the_shipped_spaces(tmp_path):
    with pytest.raises(HPNInputError) as err:
        load_space(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err.value) and "not found" in str(err.value)
    assert "seed_grid" in str(err.value)


MODE = "model.prototype_mode: {type: categorical, choices: [fixed, learned]}\n"
SEPARATION = ("train.separation_weight: {{type: float, low: 0.1, high: 1,"
              " when: {{model.prototype_mode: {mode}}}}}\n")
BAD_SPACES = [
    # (file text, words the one-line message must hold besides the file name)
    ("train.lr: {type: float, low: 0.1\n", ["not valid YAML"]),
    ("", ["empty"]),
    ("- train.lr\n", ["mapping"]),
    ("train.epochs: 3\n", ["searches nothing"]),
    ("train.lr: {type: real, low: 0.1, high: 1}\n", ["train.lr", "unknown type 'real'"]),
    ("train.lr: {type: float, lo: 0.1, high: 1}\n", ["train.lr", "unknown field 'lo'"]),
    ("train.lr: {type: float, low: 0.5, high: 0.1}\n", ["train.lr", "must be < high"]),
    ("train.lr: {type: float, low: 0, high: 0.1, log: true}\n", ["train.lr", "low > 0"]),
    ("train.lr: {type: float, low: 0.01, high: 0.1, log: true, step: 0.01}\n",
     ["train.lr", "cannot be combined"]),
    ("model.prototype_dim: {type: float, low: 8, high: 64}\n",
     ["model.prototype_dim", "use type: int"]),
    ("model.prototype_dim: {type: int, low: 8.5, high: 64}\n", ["model.prototype_dim", "integer"]),
    ("model.prototype_mode: {type: int, low: 1, high: 2}\n",
     ["model.prototype_mode", "type: categorical"]),
    ("model.prototype_mode: {type: categorical, choices: []}\n",
     ["model.prototype_mode", "non-empty list"]),
    ("model.prototype_mode: {type: categorical, choices: [fixed, bogus]}\n",
     ["model.prototype_mode", "choice 'bogus'", "fixed, learned"]),
    ("model.prototype_dim: {type: int, low: 1, high: 64}\n",
     ["model.prototype_dim", "low 1", ">= 2"]),
    (SEPARATION.format(mode="learned") + MODE,
     ["train.separation_weight", "model.prototype_mode", "before"]),
    (SEPARATION.replace("prototype_mode", "prototype_mod").format(mode="learned"),
     ["train.separation_weight", "'model.prototype_mod'", "did you mean 'model.prototype_mode'"]),
    (MODE + SEPARATION.format(mode="learnd"),
     ["train.separation_weight", "'learnd' is not one of ['fixed', 'learned']"]),
    ("train.lr: {type: float, low: 0.01, high: 0.1}\ntrain.epochs: 0\n",
     ["train.epochs", "must be >= 1", "constant"]),
    ("train.lr: {type: float, low: 0.01, high: 0.1}\nmodel.prototype_mode: [fixed, learned]\n",
     ["model.prototype_mode", "type: categorical"]),
    # non-finite numbers: nan passes every comparison, and inf overflowed only once Ray ran
    ("train.lr: {type: float, low: .inf, high: .inf}\n",
     ["train.lr: low is .inf; bounds must be finite numbers"]),
    ("train.lr: {type: float, low: -.inf, high: 0.5}\n", ["train.lr: low is -.inf"]),
    ("train.lr: {type: float, low: .nan, high: 0.5}\n", ["train.lr: low is .nan"]),
    ("train.lr: {type: float, low: 0.01, high: .inf, log: true}\n", ["train.lr: high is .inf"]),
    ("train.lr: {type: float, low: 0.01, high: 1e400}\n", ["train.lr: high is .inf"]),
    ("model.prototype_dim: {type: int, low: 8, high: .inf}\n",
     ["model.prototype_dim: high is .inf", "finite"]),
    ("model.prototype_dim: {type: int, low: 8, high: 1" + "0" * 400 + "}\n",
     ["model.prototype_dim: high is an integer of 401 digits", "finite"]),
    ("train.lr: {type: float, low: 0.1, high: 0.5, step: .nan}\n",
     ["train.lr: step is .nan; step must be a finite number > 0"]),
    ("train.lr: {type: float, low: 0.1, high: 0.5, step: .inf}\n", ["train.lr: step is .inf"]),
    ("train.lr: {type: categorical, choices: [0.1, .nan]}\n",
     ["train.lr: choice .nan is not a finite number"]),
    ("model.prototype_dim: {type: categorical, choices: [32, .inf]}\n",
     ["model.prototype_dim: choice .inf"]),
    ("train.lr: {type: float, low: 0.01, high: 0.1}\ntrain.momentum: .nan\n",
     ["train.momentum: must be a finite number", "constant"]),
    # the other numeric traps of a range
    ("train.lr: {type: float, low: -0.1, high: 0.1}\n", ["train.lr", "low -0.1", "> 0"]),
    ("train.lr: {type: float, low: -1, high: 0.1, log: true}\n", ["train.lr", "low > 0"]),
    ("train.lr: {type: float, low: 0.1, high: 0.5, step: 0}\n", ["train.lr", "step must be > 0"]),
    ("train.lr: {type: float, low: 0.1, high: 0.2, step: 0.5}\n",
     ["train.lr", "step (0.5) is wider than the range"]),
    ("model.prototype_dim: {type: int, low: 8, high: 64, step: 0.5}\n",
     ["model.prototype_dim", "step must be an integer"]),
    ("model.prototype_dim: {type: int, low: 8, high: 64.5}\n",
     ["model.prototype_dim", "high must be an integer"]),
    ("train.lr: {type: float, low: 0.01, high: 0.1}\ntrain.momentum: 1\n",
     ["train.momentum", "must be < 1", "constant"]),
]


@pytest.mark.parametrize("text, words", BAD_SPACES, ids=[w[-1] for _, w in BAD_SPACES])
def test_a_bad_space_fails_with_one_line_naming_the_file_the_key_and_the_fix(tmp_path, text, words):
    path = write(tmp_path, text, name="bad_space.yaml")
    with pytest.raises(HPNInputError) as err:
        load_space(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message


def test_an_exponent_without_a_dot_is_a_number_though_yaml_reads_it_as_text(tmp_path):
    text = "train.lr: {type: float, low: 1e-3, high: 1e-1, log: true}\n"
    space = load_space(write(tmp_path, text))
    assert (space.params[0].low, space.params[0].high) == (1e-3, 1e-1)
