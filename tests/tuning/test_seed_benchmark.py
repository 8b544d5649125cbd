"""The seed project's benchmark as one study: grid x repeats, its outputs, nothing pruned."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from hpn import metrics as M
from tuning.study import StudyOptions, run_study
from tuning.tracking import CONFIG_GROUP_TAG, REPEAT_TAG, STATE_TAG, trials_frame

pytestmark = pytest.mark.usefixtures("ray_runtime")

WORDS = {  # one trigger word of each of the seed's ten patterns, and none for `other`
    "educator": "teacher", "healthcare": "nurse", "tech": "programmer", "creative": "painter",
    "writer": "poet", "scientist": "analyst", "business": "entrepreneur", "legal": "attorney",
    "student": "learner", "parent": "caregiver", "other": "gardener",
}
PLACES = ["in Lisbon", "from a small town", "who loves hiking", "with two dogs", "in Osaka",
          "who collects stamps", "on a night shift", "who bakes bread"]


def write_persona_copy(path: Path, n_per_class: int = 30) -> Path:
    """A local copy in PersonaHub's `persona` schema: one `persona` column of text."""
    rng = random.Random(0)
    rows = [f"A {rng.choice(['young', 'retired', 'busy', 'curious'])} {word} "
            f"{rng.choice(PLACES)} {i}" for word in WORDS.values() for i in range(n_per_class)]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps({"persona": r}) + "\n" for r in rows))
    return path


def test_the_seed_grid_with_three_repeats_trains_all_27_runs_and_leaves_the_seeds_outputs(
        tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    copy = write_persona_copy(tmp_path / "persona.jsonl")
    summary = run_study(StudyOptions(
        space="seed_grid", sampler="grid", repeats=3, name="seed-bench", tracking_uri=uri,
        storage_path=str(tmp_path / "ray"), max_concurrent=3, register=False,
        overrides=["data.source=personahub", f"data.path={copy}", "data.labels=keywords",
                   "data.size=0", "train.epochs=4", f"encoder.cache_dir={cache_dir}"]))
    assert summary["trials_completed"] == 27 and summary["trials_pruned"] == 0
    assert summary["repeats"] == 3

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("hpn-tune").experiment_id
    frame = trials_frame(client, exp, summary["parent_run_id"])
    assert (frame["state"] == "completed").all() and len(frame) == 27
    assert (frame[M.NUM_PROTOTYPES].value_counts().sort_index() == 9).all()
    cells = frame.groupby(["params.model.prototype_dim", "params.model.prototype_count"])
    assert cells.ngroups == 9
    assert set(cells.size()) == {3}
    for _, cell in cells:  # a config's repeats: one group, indices 0-2, seeds 42-44
        assert cell["config_group"].nunique() == 1
        assert sorted(cell["repeat"]) == [0, 1, 2]
        assert sorted(cell["params.train.seed"]) == [42, 43, 44]
    # every run trained to the end: 4 epochs, past the first ASHA rung (3) a grid never uses
    for run_id in frame["run_id"]:
        assert len(client.get_metric_history(run_id, M.VAL_ACCURACY)) == 4

    # the seed's 11 keyword classes
    assert set(frame["num_classes"]) == {11}

    parent = summary["parent_run_id"]
    assert client.get_run(parent).data.tags["hpn.seed"] == str(summary["seed"])  # replayable
    seed_files = {Path(f.path).name for f in client.list_artifacts(parent, "report/seed")}
    assert seed_files >= {"runs.csv", "cell_summary.csv", "test_accuracy_vs_dimension.png",
                          "test_accuracy_vs_prototype_count.png", "runtime_per_configuration.png",
                          "test_accuracy_heatmap.png", "test_accuracy_distribution.png",
                          "tsne_best_model.png"}
    local = client.download_artifacts(parent, "report/seed", str(tmp_path / "out"))
    runs_csv = pd.read_csv(Path(local) / "runs.csv")
    assert len(runs_csv) == 27 and set(runs_csv["run_id"]) == set(frame["run_id"])

    # The summary is exactly a pandas groupby of the child runs, read back from MLflow.
    summary_csv = pd.read_csv(Path(local) / "cell_summary.csv")
    keys = ["params.model.prototype_dim", "params.model.prototype_count"]
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    children = pd.DataFrame([{
        "params.model.prototype_dim": int(r.data.params["model.prototype_dim"]),
        "params.model.prototype_count": int(r.data.params["model.prototype_count"]),
        **{m: r.data.metrics[m] for m in (M.VAL_ACCURACY, M.TEST_ACCURACY, M.RUNTIME_S)},
    } for r in runs])
    expected = children.groupby(keys).agg(["mean", "std", "min", "max"])
    expected.columns = [f"{m}_{s}" for m, s in expected.columns]
    got = summary_csv.set_index(keys).sort_index()
    pd.testing.assert_frame_equal(got[expected.columns], expected.sort_index(), check_dtype=False)
    assert (got["n"] == 3).all()

    # The best config is chosen on the mean validation accuracy of its repeats.
    best = expected[f"{M.VAL_ACCURACY}_mean"].idxmax()
    assert (summary["best_config"]["model.prototype_dim"],
            summary["best_config"]["model.prototype_count"]) == best
    assert summary["best_val_accuracy"] == pytest.approx(expected[f"{M.VAL_ACCURACY}_mean"].max())
    assert summary["best_test_accuracy"] == pytest.approx(expected.loc[best, f"{M.TEST_ACCURACY}_mean"])
    tags = client.get_run(summary["best_run_id"]).data.tags
    assert tags[STATE_TAG] == "completed" and tags[REPEAT_TAG] in {"0", "1", "2"}
    assert tags[CONFIG_GROUP_TAG]


def test_asha_prunes_bad_trials_and_they_keep_what_they_reached(tmp_path, cache_dir):
    space = tmp_path / "lr.yaml"
    # lr 1e-7 learns nothing: ASHA stops those trials at its first rung (3 epochs)
    space.write_text("train.lr: {type: categorical, choices: [1.0e-7, 0.3]}\n"
                     "train.optimizer: adam\ntrain.epochs: 9\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_study(StudyOptions(
        space=str(space), trials=8, sampler="random", seed=3, name="pruning", tracking_uri=uri,
        storage_path=str(tmp_path / "ray"), max_concurrent=1, register=False,
        overrides=["data.size=600", f"encoder.cache_dir={cache_dir}"]))
    assert summary["trials_pruned"] >= 1
    client = MlflowClient(uri)
    frame = trials_frame(client, client.get_experiment_by_name("hpn-tune").experiment_id,
                         summary["parent_run_id"])
    pruned = frame[frame["state"] == "pruned"]
    assert len(pruned) == summary["trials_pruned"]
    for run_id in pruned["run_id"]:
        run = client.get_run(run_id)
        assert {M.RUNTIME_S, M.PEAK_RSS_MB, M.VAL_ACCURACY} <= set(run.data.metrics)
        assert 0 < run.data.metrics[M.RUNTIME_S] and run.data.metrics[M.PEAK_RSS_MB] > 0
        assert len(client.get_metric_history(run_id, M.VAL_ACCURACY)) < 9
        # shown as what it is: finished early on purpose, not failed, with the reason
        assert run.info.status == "FINISHED"
        assert "Stopped early by the ASHA scheduler after epoch" in run.data.tags["mlflow.note.content"]
        assert "hpn.error" not in run.data.tags
    names = [client.get_run(r).info.run_name for r in frame["run_id"]]
    assert sorted(names) == [f"pruning-t{i:03d}" for i in range(1, 9)]  # readable, in order
    # The searcher saw them as pruned: Optuna's own record (beside mlflow.db) says PRUNED,
    # with the epochs they reached as intermediate values; the rest COMPLETE.
    import optuna

    trials = {t.number: t for t in optuna.load_study(
        study_name="pruning", storage=f"sqlite:///{tmp_path / 'optuna.db'}").get_trials()}
    for _, row in frame.iterrows():
        trial = trials[int(client.get_run(row["run_id"]).data.tags["hpn.optuna_trial"])]
        assert trial.state.name == ("PRUNED" if row["state"] == "pruned" else "COMPLETE")
        if row["state"] == "pruned":
            assert 1 <= len(trial.intermediate_values) < 9
