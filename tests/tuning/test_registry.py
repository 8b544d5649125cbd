"""The model registry end to end: register, promote behind the gate, roll back, predict, serve.

Real objects throughout: models trained with `hpn.train.train`, logged as our pyfunc (an MLflow
LoggedModel) from a trial-like MLflow run, registered with `register_run`, and every contract
checked against both a SQLite store and a real MLflow server.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient

from hpn import metrics as M
from hpn.config import load_config
from hpn.errors import HPNInputError
from hpn.train import PreparedData, TrainResult, prepare_data, train
from tuning.cli import main
from tuning.pyfunc import MODEL_ARTIFACT, log_pyfunc, run_model, save_pyfunc
from tuning.registry import (
    CHAMPION,
    MODEL_CARD_FILE,
    PREVIOUS,
    PromotionRefused,
    promote,
    register_run,
    rollback,
)
from tuning.tracking import (
    PARENT_TAG,
    ROLE_TAG,
    STATE_TAG,
    STUDY_DATASET_CONTEXT,
    STUDY_TAG,
    TRIAL_ID_TAG,
    corpus_dataset,
    ensure_experiment,
    log_dataset,
)

ROOT = Path(__file__).resolve().parents[2]
STUDY = "registry-study"
#: Trials whose validation accuracy (what the gate compares) rises from `mid` to `best` on the
#: 600-persona synthetic corpus (the `trained` fixture asserts the order, so a changed corpus
#: fails loudly, not oddly).
TRIALS = {
    "mid": ["train.epochs=3", "train.lr=0.01"],
    "good": ["train.epochs=8", "train.optimizer=adam", "train.lr=0.005"],
    "best": ["train.epochs=6"],
}


@dataclass
class Trained:
    data: PreparedData
    results: dict[str, TrainResult]

    def accuracy(self, key: str) -> float:
        return self.results[key].metrics[M.VAL_ACCURACY]

    def test_texts(self, n: int = 6) -> list[str]:
        return [self.data.corpus.texts[i] for i in self.data.split.test[:n]]


@dataclass
class Store:
    """A tracking store holding one study run with one logged trial run per entry of TRIALS."""

    kind: str
    uri: str
    client: MlflowClient
    run_ids: dict[str, str] = field(default_factory=dict)

    def register(self, model_name: str, *keys: str) -> list[str]:
        return [register_run(self.client, self.run_ids[k], model_name) for k in keys]

    def alias(self, model_name: str, alias: str) -> str | None:
        return self.aliases(model_name).get(alias)

    def aliases(self, model_name: str) -> dict[str, str]:
        """Alias -> version; the stores differ in whether a version number is an int or a str."""
        return {a: str(v) for a, v in self.client.get_registered_model(model_name).aliases.items()}


@pytest.fixture(scope="module")
def trained(cache_dir: str) -> Trained:
    base = ["data.size=600", f"encoder.cache_dir={cache_dir}", "model.prototype_dim=32",
            "train.batch_size=64"]
    data = prepare_data(load_config(None, base))
    results = {key: train(load_config(None, base + extra), data) for key, extra in TRIALS.items()}
    accuracies = [results[k].metrics[M.VAL_ACCURACY] for k in TRIALS]
    assert accuracies == sorted(set(accuracies)), f"trials no longer rise in accuracy: {accuracies}"
    return Trained(data, results)


def _log_study(client: MlflowClient, uri: str, trained: Trained) -> dict[str, str]:
    """What `run_study` leaves behind: a study run, and trial runs carrying the corpus as their
    dataset input, params, metrics and the model."""
    experiment_id = ensure_experiment(client, "hpn-tune", uri)
    parent = client.create_run(experiment_id, run_name=STUDY, tags={
        STUDY_TAG: STUDY, ROLE_TAG: "study", "hpn.dataset_fingerprint": trained.data.fingerprint,
    }).info.run_id
    dataset = corpus_dataset(load_config(None, ["data.size=600"]).data, trained.data)
    log_dataset(client, parent, dataset, STUDY_DATASET_CONTEXT)
    run_ids = {}
    for key, result in trained.results.items():
        run = client.create_run(experiment_id, run_name=key, tags={
            PARENT_TAG: parent, TRIAL_ID_TAG: f"trial_{key}", STUDY_TAG: STUDY, ROLE_TAG: "trial",
            STATE_TAG: "completed",
        })
        run_id = run.info.run_id
        cfg = load_config(None, ["data.size=600", "model.prototype_dim=32", "train.batch_size=64",
                                 *TRIALS[key]])
        for name, value in sorted(cfg.to_flat().items()):
            client.log_param(run_id, name, str(value))
        log_dataset(client, run_id, dataset)
        for name, value in result.metrics.items():
            client.log_metric(run_id, name, float(value))
        log_pyfunc(client, run_id, result.model)
        client.set_terminated(run_id, "FINISHED")
        run_ids[key] = run_id
    client.set_terminated(parent, "FINISHED")
    return run_ids


@pytest.fixture(scope="module", params=["sqlite", "server"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          trained: Trained) -> Store:
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("mlflow_server")
    client = MlflowClient(uri, uri)
    return Store(request.param, uri, client, _log_study(client, uri, trained))


@pytest.fixture
def model_name() -> str:
    """A fresh registered model per test: the server fixture is shared by the whole session."""
    return f"hpn-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def restore_mlflow_uris():
    """`mlflow.pyfunc.load_model` in-process goes through `mlflow.set_tracking_uri`, which
    also writes MLFLOW_TRACKING_URI into os.environ: undo it so later tests see a clean env."""
    import mlflow

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- the gate ------------------------------------------------------------------------------

def test_the_gate_refuses_a_worse_model_and_leaves_the_champion_in_place(store, trained, model_name):
    good, _ = store.register(model_name, "good", "mid")
    assert promote(store.client, model_name, run_id=store.run_ids["good"])["promoted"]

    with pytest.raises(PromotionRefused) as refused:
        promote(store.client, model_name, run_id=store.run_ids["mid"])

    message = str(refused.value)
    assert "val_accuracy" in message
    assert f"{trained.accuracy('mid'):.4f}" in message and f"{trained.accuracy('good'):.4f}" in message
    # test accuracy is reported beside the validation numbers, never used to choose
    assert f"test_accuracy {trained.results['mid'].metrics[M.TEST_ACCURACY]:.4f}" in message
    assert store.alias(model_name, CHAMPION) == good
    assert store.alias(model_name, PREVIOUS) is None


def test_a_model_trained_on_other_data_is_not_compared_unless_forced(store, model_name):
    good, best = store.register(model_name, "good", "best")
    promote(store.client, model_name, run_id=store.run_ids["good"])
    store.client.set_model_version_tag(model_name, best, "dataset_fingerprint", "f" * 64)

    with pytest.raises(PromotionRefused, match="other data"):
        promote(store.client, model_name, run_id=store.run_ids["best"])
    assert store.alias(model_name, CHAMPION) == good

    assert promote(store.client, model_name, run_id=store.run_ids["best"], force=True)["promoted"]
    assert store.alias(model_name, CHAMPION) == best


def test_promotion_never_chooses_on_test_metrics(store, model_name):
    store.register(model_name, "good")
    with pytest.raises(HPNInputError, match="--metric test_accuracy.*validation"):
        promote(store.client, model_name, metric=M.TEST_ACCURACY)
    assert store.alias(model_name, CHAMPION) is None


def test_a_better_model_becomes_champion_and_the_old_champion_becomes_previous(store, model_name):
    mid, best = store.register(model_name, "mid", "best")
    promote(store.client, model_name, run_id=store.run_ids["mid"])

    result = promote(store.client, model_name)  # no --study/--run-id: the newest version

    assert result["promoted"] and result["version"] == best and result["champion_version"] == mid
    assert store.alias(model_name, CHAMPION) == best
    assert store.alias(model_name, PREVIOUS) == mid


def test_force_promotes_a_worse_model(store, model_name):
    best, mid = store.register(model_name, "best", "mid")
    promote(store.client, model_name, run_id=store.run_ids["best"])

    result = promote(store.client, model_name, run_id=store.run_ids["mid"], force=True)

    assert result["promoted"] and result["candidate_value"] < result["champion_value"]
    assert store.alias(model_name, CHAMPION) == mid
    assert store.alias(model_name, PREVIOUS) == best


def test_rollback_restores_the_previous_champion_and_a_second_rollback_undoes_it(store, model_name):
    mid, good = store.register(model_name, "mid", "good")
    promote(store.client, model_name, run_id=store.run_ids["mid"])
    promote(store.client, model_name, run_id=store.run_ids["good"])

    assert rollback(store.client, model_name) == {"model_name": model_name, "champion": mid,
                                                  "previous": good}
    assert (store.alias(model_name, CHAMPION), store.alias(model_name, PREVIOUS)) == (mid, good)
    rollback(store.client, model_name)
    assert (store.alias(model_name, CHAMPION), store.alias(model_name, PREVIOUS)) == (good, mid)


def _race(store: Store, model_name: str, keys: tuple[str, ...]) -> dict[str, object]:
    """Promote the trials' versions from one thread each, released at the same instant."""
    start = threading.Barrier(len(keys))
    outcomes: dict[str, object] = {}

    def promoter(key: str) -> None:
        client = MlflowClient(store.uri, store.uri)  # one client per promoter, as two CLIs would
        start.wait()
        try:
            outcomes[key] = promote(client, model_name, run_id=store.run_ids[key])["promoted"]
        except PromotionRefused as exc:  # lost to the better one that got there first
            outcomes[key] = exc
        except Exception as exc:  # noqa: BLE001 - reported by the caller's assertion
            outcomes[key] = f"crashed: {type(exc).__name__}: {str(exc)[:300]}"

    threads = [threading.Thread(target=promoter, args=(key,)) for key in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return outcomes


def test_two_racing_promotions_leave_exactly_one_of_the_candidates_as_champion(store, model_name):
    # A lost race shows only now and then, so race a few times, each on a fresh model.
    for round_ in range(4):
        name = f"{model_name}-{round_}"
        mid, good, best = store.register(name, "mid", "good", "best")
        promote(store.client, name, run_id=store.run_ids["mid"])

        outcomes = _race(store, name, ("good", "best"))

        assert all(v is True or isinstance(v, PromotionRefused) for v in outcomes.values()), outcomes
        aliases = store.aliases(name)
        assert aliases[CHAMPION] in {good, best}
        assert aliases[PREVIOUS] in {mid, good} and aliases[PREVIOUS] != aliases[CHAMPION]
        # The alias resolves to one whole version whose model is really there.
        champion = store.client.get_model_version_by_alias(name, CHAMPION)
        assert str(champion.version) == aliases[CHAMPION] and champion.status == "READY"
    files = store.client.list_logged_model_artifacts(run_model(store.client, champion.run_id).model_id)
    assert "MLmodel" in {f.path for f in files}


# -- what a version carries ------------------------------------------------------------------

def test_a_registered_version_carries_its_provenance_and_a_model_card(store, trained, model_name):
    (version,) = store.register(model_name, "good")

    mv = store.client.get_model_version(model_name, version)

    assert mv.tags["study"] == STUDY and mv.tags["trial"] == "trial_good"
    assert mv.tags["dataset_fingerprint"] == trained.data.fingerprint
    assert "config" not in mv.tags  # the params are the run's and the model's, the card says the rest
    test_accuracy = trained.results["good"].metrics[M.TEST_ACCURACY]
    assert float(mv.tags[f"metric.{M.TEST_ACCURACY}"]) == pytest.approx(test_accuracy, abs=1e-6)
    assert float(mv.tags[f"metric.{M.VAL_ACCURACY}"]) == pytest.approx(trained.accuracy("good"), abs=1e-6)
    assert mv.run_id == store.run_ids["good"]
    card = mv.description
    assert card.startswith(f"# `models:/{model_name}/{version}`: HPN persona classifier")
    assert "all-MiniLM-L6-v2" in card and "adam, lr 0.005" in card and "8 epochs" in card
    # validation first, test beside it
    assert f"| accuracy | {trained.accuracy('good'):.4f} | {test_accuracy:.4f} |" in card
    assert "`synthetic-600`, 600 texts" in card and trained.data.fingerprint in card
    assert f"hpn-tune predict --model models:/{model_name}/{version}" in card


def test_the_card_is_also_a_markdown_file_beside_the_model_and_in_it(store, model_name):
    (version,) = store.register(model_name, "good")
    run_id = store.run_ids["good"]
    logged = run_model(store.client, run_id)

    assert MODEL_CARD_FILE in {f.path for f in store.client.list_artifacts(run_id)}
    assert MODEL_CARD_FILE in {f.path for f in store.client.list_logged_model_artifacts(logged.model_id)}
    # the version is the run's LoggedModel, and the Models tab shows the version on it
    mv = store.client.get_model_version(model_name, version)
    assert mv.source == logged.artifact_location
    versions = json.loads(store.client.get_logged_model(logged.model_id).tags["mlflow.modelVersions"])
    assert (model_name, version) in {(v["name"], str(v["version"])) for v in versions}


def test_a_run_logged_before_logged_models_still_registers_and_loads(
        store, trained, model_name, tmp_path, restore_mlflow_uris):
    import mlflow

    experiment_id = store.client.get_experiment_by_name("hpn-tune").experiment_id
    run_id = store.client.create_run(experiment_id, run_name="old-style").info.run_id
    result = trained.results["good"]
    for name, value in result.metrics.items():
        store.client.log_metric(run_id, name, float(value))
    local = save_pyfunc(result.model, tmp_path / MODEL_ARTIFACT)  # as log_pyfunc once did
    store.client.log_artifacts(run_id, str(local), MODEL_ARTIFACT)
    store.client.set_terminated(run_id)

    version = register_run(store.client, run_id, model_name)

    mv = store.client.get_model_version(model_name, version)
    assert mv.source.endswith(f"/{MODEL_ARTIFACT}") and "config" not in mv.tags
    mlflow.set_tracking_uri(store.uri)
    mlflow.set_registry_uri(store.uri)
    texts = trained.test_texts(3)
    frame = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}").predict(pd.DataFrame({"text": texts}))
    assert frame["label"].tolist() == result.model.predict(texts)[0]


# -- using the champion ----------------------------------------------------------------------

def test_a_fresh_process_predicts_with_the_champion_like_the_trial_model(store, trained, model_name):
    store.register(model_name, "good")
    promote(store.client, model_name)
    texts = trained.test_texts()
    expected, _ = trained.results["good"].model.predict(texts)

    proc = subprocess.run(
        [sys.executable, "-m", "tuning.cli", "predict", "--model", f"models:/{model_name}@champion",
         "--tracking-uri", store.uri, "--json", *texts],
        capture_output=True, text=True, cwd=ROOT, env=_subprocess_env(), timeout=300, check=False,
    )

    assert proc.returncode == 0, proc.stderr[-2000:]
    predictions = json.loads(proc.stdout.strip().splitlines()[-1])["predictions"]
    assert [p["label"] for p in predictions] == expected


def test_predict_reads_jsonl_csv_and_text_files_and_writes_jsonl_and_csv(
        store, trained, model_name, tmp_path, restore_mlflow_uris, capsys):
    store.register(model_name, "good")
    promote(store.client, model_name)
    texts = trained.test_texts(5)
    expected, scores = trained.results["good"].model.predict(texts)
    classes = trained.data.corpus.label_names
    inputs = {
        "in.jsonl": "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)),
        "in.csv": pd.DataFrame({"id": range(len(texts)), "text": texts}).to_csv(index=False),
        "in.txt": "\n".join(texts) + "\n\n",  # blank lines are skipped
    }
    for (name, content), out_name in zip(inputs.items(), ["out.csv", "out.jsonl", "out2.csv"]):
        (tmp_path / name).write_text(content)
        out = tmp_path / out_name

        code = main(["predict", "--model", f"models:/{model_name}@champion", "--tracking-uri",
                     store.uri, "--input", str(tmp_path / name), "--output", str(out)])

        assert code == 0, capsys.readouterr().err
        frame = pd.read_csv(out) if out.suffix == ".csv" else pd.read_json(out, lines=True)
        assert list(frame.columns) == ["text", "label", "score", *(f"score_{c}" for c in classes)]
        assert frame["text"].tolist() == texts and frame["label"].tolist() == expected
        assert frame["score"].to_numpy() == pytest.approx(scores.max(1), abs=1e-5)
        assert frame[[f"score_{c}" for c in classes]].to_numpy() == pytest.approx(scores, abs=1e-5)


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"scoring server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    """`serve` execs MLflow's server, which may fork workers: end the whole process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
    try:  # workers that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_serve_answers_http_invocations_with_the_champions_predictions(
        store, trained, model_name, tmp_path):
    store.register(model_name, "good")
    promote(store.client, model_name)
    texts = trained.test_texts(4)
    expected, scores = trained.results["good"].model.predict(texts)
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"

    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuning.cli", "serve", "--model", f"models:/{model_name}@champion",
             "--tracking-uri", store.uri, "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_subprocess_env(),
            start_new_session=True,
        )
    try:
        _wait_until_up(url, proc, log)
        for body in ({"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}},
                     {"dataframe_records": [{"text": t} for t in texts]}):
            request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                predictions = json.load(response)["predictions"]
            assert [p["label"] for p in predictions] == expected
            assert [p["score"] for p in predictions] == pytest.approx(scores.max(1), abs=1e-5)
    finally:
        _stop(proc)
    assert proc.poll() is not None


# -- the CLI's contract ------------------------------------------------------------------------

def test_cli_promote_refusing_exits_1_with_a_refused_line_naming_both_numbers(
        store, trained, model_name, capsys):
    store.register(model_name, "good")
    assert main(["promote", "--model-name", model_name, "--tracking-uri", store.uri]) == 0
    store.register(model_name, "mid")
    capsys.readouterr()  # MLflow's own logging while registering

    code = main(["promote", "--model-name", model_name, "--tracking-uri", store.uri])

    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("hpn-tune promote: refused:")
    assert f"{trained.accuracy('mid'):.4f}" in err and f"{trained.accuracy('good'):.4f}" in err


def test_cli_promote_of_an_unknown_model_exits_2_with_one_line(store, model_name, capsys):
    code = main(["promote", "--model-name", model_name, "--tracking-uri", store.uri])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("hpn-tune promote: error: --model-name") and model_name in err


def test_cli_rollback_without_a_previous_champion_exits_2(store, model_name, capsys):
    store.register(model_name, "good")
    promote(store.client, model_name)
    capsys.readouterr()  # MLflow's own logging while registering

    code = main(["rollback", "--model-name", model_name, "--tracking-uri", store.uri])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "previous" in err
    assert store.alias(model_name, CHAMPION) == "1"
