"""Whole-model ONNX export: one graph from token ids to the model's scores, checked against the
model (fp32 identical, int8 at least 99% of labels), written, logged to the model's run, and
registered as a version tagged with its serving format that `predict` and `serve` run.

One small classifier (600 synthetic personas) is trained and exported once per module; the CLI
runs against the session's real MLflow server.
"""
from __future__ import annotations

import os
import uuid

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from hpn.config import load_config
from hpn.errors import HPNInputError
from hpn.export import (
    FP32_MAX_SCORE_DIFF,
    INT8_MIN_AGREEMENT,
    ExportMismatch,
    check_graph,
    export_model,
    sample_texts,
)
from hpn.train import train
from tuning.cli import main
from tuning.pyfunc import (
    GRAPH_FILE,
    HPN_ARTIFACT,
    SERVING_FORMAT_TAG,
    log_pyfunc,
    save_pyfunc,
)
from tuning.registry import CHAMPION, PREVIOUS, promote
from tuning.serving import load_model
from tuning.tracking import ROLE_TAG, STUDY_TAG, TRIAL_ID_TAG, ensure_experiment

SAMPLE = 200  # sample texts per check here (the command's default is 300)


@pytest.fixture(scope="module")
def trained(cache_dir: str):
    cfg = load_config(None, ["data.size=600", "train.epochs=6", f"encoder.cache_dir={cache_dir}",
                             "model.prototype_dim=32", "train.batch_size=64"])
    result = train(cfg)
    return result.model, sample_texts(SAMPLE)


@pytest.fixture(scope="module")
def expected(trained):
    model, texts = trained
    return model.predict_all(texts)


@pytest.fixture(scope="module")
def fp32_graph(trained) -> bytes:
    return export_model(trained[0], int8=False)


def test_an_fp32_export_predicts_exactly_what_the_model_predicts(trained, expected, fp32_graph):
    model, texts = trained
    agreement = check_graph(model, fp32_graph, False, texts, expected)

    assert agreement.texts == SAMPLE and agreement.same_labels == 1.0
    assert agreement.max_score_diff <= FP32_MAX_SCORE_DIFF
    assert not model.serves_graph  # the check ran a twin; the model itself is untouched


def test_an_int8_export_keeps_the_label_of_at_least_99_percent_of_texts(trained, expected, fp32_graph):
    model, texts = trained
    graph = export_model(model, int8=True)

    agreement = check_graph(model, graph, True, texts, expected)

    assert agreement.same_labels >= INT8_MIN_AGREEMENT
    assert len(graph) < 0.5 * len(fp32_graph)
    with pytest.raises(ExportMismatch, match="the onnx export does not predict what the model predicts"):
        check_graph(model, graph, False, texts, expected)  # held to fp32's bound it fails


def test_a_model_serving_its_graph_answers_through_the_same_post_processing(trained, fp32_graph):
    from hpn.export import graph_twin

    model, texts = trained
    twin = graph_twin(model, fp32_graph)
    assert twin.serves_graph and twin.predict(texts[:5])[0] == model.predict(texts[:5])[0]
    assert twin.predict_all([]).labels == []


def test_a_saved_export_with_a_changed_graph_is_refused(trained, fp32_graph, tmp_path,
                                                        restore_mlflow_uris):
    model, _ = trained
    model_dir = save_pyfunc(model, tmp_path / "model", graph=fp32_graph, serving_format="onnx")
    graph = model_dir / "artifacts" / HPN_ARTIFACT / GRAPH_FILE
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))

    with pytest.raises(HPNInputError, match="refusing to load .*does not match the checksum"):
        load_model(str(model_dir), f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture(scope="module")
def registered(trained, mlflow_server):
    """A trial-like run with the model logged and registered as version 1, alias champion (the
    registration check is registry tests' business: created directly here)."""
    model, _ = trained
    client = MlflowClient(mlflow_server, mlflow_server)
    experiment_id = ensure_experiment(client, "hpn-tune", mlflow_server)
    run_id = client.create_run(experiment_id, run_name="export-trial", tags={
        STUDY_TAG: "export-study", TRIAL_ID_TAG: "trial_0", ROLE_TAG: "trial"}).info.run_id
    for name, value in result_metrics(model).items():
        client.log_metric(run_id, name, value)
    logged = log_pyfunc(client, run_id, model)
    client.set_terminated(run_id, "FINISHED")
    name = f"hpn-export-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    version = client.create_model_version(name, logged_location(client, logged), run_id=run_id,
                                          model_id=logged[len("models:/"):],
                                          tags={SERVING_FORMAT_TAG: "torch", "task": "classification"})
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return client, name, run_id


def result_metrics(model) -> dict[str, float]:
    """What the registration gate reads: a validation accuracy over its baseline."""
    return {"val_accuracy": 0.7, "val_majority_baseline_accuracy": 0.1, "test_accuracy": 0.7}


def logged_location(client: MlflowClient, uri: str) -> str:
    return client.get_logged_model(uri[len("models:/"):]).artifact_location


def test_export_writes_logs_and_registers_an_onnx_version_that_serves_like_the_torch_one(
        registered, trained, tmp_path, capsys, restore_mlflow_uris):
    client, name, run_id = registered
    _, texts = trained
    out = tmp_path / "champion.onnx"

    code = main(["export", "--model", f"models:/{name}@{CHAMPION}", "--format", "onnx",
                 "--output", str(out), "--register", "--sample", "100",
                 "--tracking-uri", client.tracking_uri])

    said = capsys.readouterr()
    assert code == 0, said.err
    # MLflow's "Validating input example" INFO line and artifact bar are not for the user
    assert "Validating input example" not in said.err and "Downloading artifacts" not in said.err
    line = [x for x in said.out.splitlines() if x.startswith("exported")]
    assert len(line) == 1 and "same labels 100.00%" in line[0] and "version 2" in line[0]
    assert out.stat().st_size > 1_000_000
    logged = {f.path for f in client.list_artifacts(run_id, "export")}
    assert logged == {"export/model.onnx", "export/model.json"}
    onnx_version = client.get_model_version(name, "2")
    assert onnx_version.tags[SERVING_FORMAT_TAG] == "onnx"
    assert client.get_model_version(name, "1").tags[SERVING_FORMAT_TAG] == "torch"

    frame = pd.DataFrame({"text": texts[:40]})
    torch_answer = load_model(f"models:/{name}/1", client.tracking_uri).predict(frame)
    onnx_model = load_model(f"models:/{name}/2", client.tracking_uri)
    onnx_answer = onnx_model.predict(frame)
    assert onnx_model.metadata.metadata["hpn_serving_format"] == "onnx"
    assert onnx_answer["label"].tolist() == torch_answer["label"].tolist()
    scores = [c for c in torch_answer.columns if c.startswith("score")]
    assert (onnx_answer[scores] - torch_answer[scores]).abs().max().max() <= FP32_MAX_SCORE_DIFF
    # the run's own model is still the torch one
    from tuning.pyfunc import run_model

    assert run_model(client, run_id).tags.get(SERVING_FORMAT_TAG) == "torch"


def test_promoting_the_champions_own_export_is_a_format_switch_not_a_contest(
        registered, capsys, restore_mlflow_uris):
    # After the export test: version 2 is the onnx export of champion version 1's run, with
    # the same validation metric, so "not above champion" would refuse it forever.
    client, name, _ = registered
    if len(client.search_model_versions(f"name = '{name}'")) < 2:
        pytest.skip("needs the registered export of the test above")

    code = main(["promote", "--study", "export-study", "--model-name", name,
                 "--tracking-uri", client.tracking_uri])

    said = capsys.readouterr()
    assert code == 0, said.err
    assert said.out.strip() == (f"{name}@champion -> version 2: format switch torch -> onnx of "
                                "version 1's run (same model, not compared)")
    assert client.get_model_version_by_alias(name, CHAMPION).version in (2, "2")
    assert client.get_model_version_by_alias(name, PREVIOUS).version in (1, "1")
    back = promote(client, name, run_id=registered[2])  # the run's torch version: switch back
    assert back["promoted"] and back["format_switch"] == "onnx -> torch"
    assert client.get_model_version_by_alias(name, CHAMPION).version in (1, "1")


@pytest.mark.parametrize(("args", "says"), [
    (["--format", "tflite"], "--format: unknown format 'tflite'"),
    (["--output", "/no/such/folder/m.onnx"], "--output: folder '/no/such/folder' does not exist"),
    (["--output", "."], "--output: '.' is a folder"),
    (["--model", "models:/no-such-model-xyz@champion"], "--model: cannot load"),
    (["--sample", "5"], "--sample: 5 texts are too few"),
])
def test_bad_export_input_is_one_line_and_exit_2(mlflow_server, tmp_path, capsys, args, says,
                                                 restore_mlflow_uris):
    base = {"--model": "models:/no-such-model-xyz@champion", "--output": str(tmp_path / "m.onnx")}
    flags = dict(zip(args[::2], args[1::2]))
    argv = ["export", "--tracking-uri", mlflow_server]
    for key, value in {**base, **flags}.items():
        argv += [key, value]

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_both_int8_quantisations_share_one_scaffold_with_their_own_options(fp32_graph, monkeypatch):
    from hpn import export, runtimes

    calls = []
    monkeypatch.setattr(runtimes, "quantize", lambda graph, **options: calls.append(options) or b"q")
    monkeypatch.setattr(export, "quantize", runtimes.quantize)
    assert runtimes.quantize_int8(b"g") == b"q" and calls.pop() == {"per_channel": True}
    assert export.quantize_whole(fp32_graph) == b"q"
    options = calls.pop()
    assert options["op_types_to_quantize"] == ["MatMul", "Gather"]
    kept = options["nodes_to_exclude"]  # the head and the feed-forward down-projections
    assert any(not n.startswith("/encoder/") for n in kept)
    assert any(n.startswith("/encoder/") and "MatMul" in n for n in kept)


def test_an_export_is_written_atomically_with_the_umask_mode(tmp_path):
    from tuning.export_model import _write

    out = tmp_path / "m.onnx"
    _write(out, b"graph")
    umask = os.umask(0)
    os.umask(umask)
    assert out.read_bytes() == b"graph" and (out.stat().st_mode & 0o777) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp file left
    with pytest.raises(HPNInputError, match="^--output: cannot write"):
        _write(tmp_path / "no-such-folder" / "m.onnx", b"graph")


def _external(name: str):
    """A one-float tensor whose data would be read from /etc/passwd."""
    from onnx import TensorProto, external_data_helper, helper

    tensor = helper.make_tensor(name, TensorProto.FLOAT, [1], b"\0\0\0\0", raw=True)
    external_data_helper.set_external_data(tensor, location="/etc/passwd")
    tensor.ClearField("raw_data")
    return tensor


@pytest.mark.parametrize("where", ["initializer", "constant", "subgraph"])
def test_a_graph_with_any_external_tensor_is_refused(where, fp32_graph):
    from onnx import TensorProto, helper

    from hpn.export import graph_problem
    from tuning.pyfunc import (
        artifact_graph_problem,  # the artifact check (renamed from graph_problem)
    )

    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"])
            for n in ("input_ids", "attention_mask")]
    out = [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])]
    const = helper.make_node("Constant", [], ["c"], value=_external("w"))
    init = []
    if where == "initializer":
        init, nodes = [_external("w")], [helper.make_node("Identity", ["w"], ["c"])]
    elif where == "constant":
        nodes = [const]
    else:
        branch = helper.make_graph([const], "branch", [], out)
        flag = helper.make_node("Constant", [], ["flag"], value=helper.make_tensor(
            "f", TensorProto.BOOL, [], [True]))
        nodes = [flag, helper.make_node("If", ["flag"], ["c"], then_branch=branch,
                                        else_branch=branch)]
    graph = helper.make_model(helper.make_graph(nodes, "g", ints, out, init)).SerializeToString()

    assert graph_problem(graph) == "its tensor 'w' refers to an external data file"
    assert graph_problem(fp32_graph) is None and callable(artifact_graph_problem)
