"""Loading a model never unpickles or executes what the model directory holds.

A model is an MLflow pyfunc saved as models-from-code plus safetensors weights; every load goes
through `tuning.serving.load_model`, which checks the downloaded directory first. Each attack
below is live (a control shows its payload really runs when unpickled or executed) and leaves
its marker file uncreated when loaded through us.
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from hpn.config import EncoderConfig, ModelConfig
from hpn.errors import HPNInputError
from hpn.model import HPNClassifier, PrototypeHead
from hpn.prototypes import fixed_prototypes
from tuning.pyfunc import CODE_FILE, CODE_LOADER, save_pyfunc
from tuning.serving import load_model

LABELS = ["engineer", "nurse", "teacher"]
TEXTS = ["A pediatric nurse at a rural clinic.", "A compiler engineer who writes Rust."]


def tiny_model(seed: int = 0) -> HPNClassifier:
    """An untrained 3-class head on the bundled offline encoder: nothing to train, real I/O."""
    torch.manual_seed(seed)
    cfg = ModelConfig(prototype_dim=8)
    head = PrototypeHead(384, len(LABELS), cfg, fixed_prototypes(len(LABELS), 8, seed=seed))
    return HPNClassifier(head, LABELS, cfg, EncoderConfig()).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[HPNClassifier, Path]:
    """A tiny model and its pyfunc directory, as every trial saves it."""
    model = tiny_model()
    return model, save_pyfunc(model, tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture
def tracking_uri(tmp_path: Path, restore_mlflow_uris) -> str:
    """A store of the test's own; `load_model` sets MLflow's global URIs (and the env vars
    MLflow mirrors them to): `restore_mlflow_uris` puts them back afterwards."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _copy(saved_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved_dir, tmp_path / "model"))


def _edit_mlmodel(model_dir: Path, **changes) -> None:
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"].update(changes)
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))


class _CreatesFile:
    """Unpickling this opens (so creates) a file: the shape of any code-running pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_saved_model_is_models_from_code_with_safetensors_weights_and_no_pickle(saved):
    _, model_dir = saved
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]

    assert flavor["loader_module"] == CODE_LOADER and "python_model" not in flavor
    assert (model_dir / CODE_FILE.name).read_bytes() == CODE_FILE.read_bytes()
    assert {p.name for p in (model_dir / "artifacts" / "hpn").iterdir()} == {
        "model.safetensors", "hpn_model.json"}
    assert not [p for p in model_dir.rglob("*") if ".pkl" in p.suffixes]


def test_a_good_model_loads_and_predicts_like_the_model_it_saved(saved, tracking_uri):
    model, model_dir = saved
    expected, scores = model.predict(TEXTS)

    frame = load_model(str(model_dir), tracking_uri).predict(pd.DataFrame({"text": TEXTS}))

    assert frame["label"].tolist() == expected
    assert list(frame.columns) == ["label", "score", *(f"score_{c}" for c in LABELS)]
    assert frame["score"].to_numpy() == pytest.approx(scores.max(1), abs=1e-5)


def test_mlflows_own_loader_still_loads_it_through_our_code_file(saved, tmp_path):
    import mlflow.pyfunc

    model, model_dir = saved
    frame = mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame({"text": TEXTS}))
    assert frame["label"].tolist() == model.predict(TEXTS)[0]


@pytest.mark.parametrize("flavor", ["pickled pyfunc (MLflow's default)", "our flavor"])
def test_a_model_holding_a_pickle_is_refused_and_the_pickle_never_runs(
        saved, tmp_path, tracking_uri, flavor):
    control, marker = tmp_path / "control", tmp_path / "pwned"
    pickle.loads(pickle.dumps(_CreatesFile(control)))
    assert control.exists(), "the payload must really run when unpickled"
    model_dir = _copy(saved[1], tmp_path)
    (model_dir / "python_model.pkl").write_bytes(pickle.dumps(_CreatesFile(marker)))
    if flavor.startswith("pickled"):  # what `save_model(python_model=HPNPyfunc())` wrote
        _edit_mlmodel(model_dir, loader_module="mlflow.pyfunc.model",
                      python_model="python_model.pkl", model_code_path=None)

    with pytest.raises(HPNInputError, match="refusing to load .*pickle.*python_model.pkl") as err:
        load_model(str(model_dir), tracking_uri)

    assert not marker.exists()
    assert str(model_dir) in str(err.value) and "\n" not in str(err.value)


def test_a_tampered_code_file_is_refused_and_never_executed(saved, tmp_path, tracking_uri):
    marker = tmp_path / "pwned"
    model_dir = _copy(saved[1], tmp_path)
    code = model_dir / CODE_FILE.name
    code.write_text(code.read_text() + f"\nopen({str(marker)!r}, 'w')\n")

    with pytest.raises(HPNInputError, match=f"code file {CODE_FILE.name} differs"):
        load_model(str(model_dir), tracking_uri)

    assert not marker.exists()


@pytest.mark.parametrize(("change", "reason"), [
    ({"loader_module": "mlflow.sklearn"}, "loader is 'mlflow.sklearn'"),
    ({"python_model": "model.bin"}, "loads a serialized object"),
    ({"data": "model.bin"}, "loads a serialized object"),
    ({"code": "code"}, "code directory"),
    ({"model_code_path": "/elsewhere/evil.py"}, "code file is 'evil.py'"),
    ({"artifacts": {"hpn": {"path": "../../outside"}}}, "outside the model directory"),
])
def test_a_model_whose_mlmodel_would_load_anything_else_is_refused(
        saved, tmp_path, tracking_uri, change, reason):
    model_dir = _copy(saved[1], tmp_path)
    _edit_mlmodel(model_dir, **change)

    with pytest.raises(HPNInputError, match=reason):
        load_model(str(model_dir), tracking_uri)


def test_a_directory_that_is_no_model_is_refused_in_one_line(tmp_path, tracking_uri):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HPNInputError, match="no MLmodel"):
        load_model(str(tmp_path / "empty"), tracking_uri)
