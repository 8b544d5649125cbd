"""Latency and size as study objectives: a real nsga2 study trading accuracy against them,
searching the encoder runtime; `hpn-tune show` lists its objectives and marks its Pareto
front; its objectives survive a resume; bad flags exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from hpn import metrics as M
from hpn.errors import HPNInputError
from hpn.tasks import task_spec
from tuning.cli import main, run_front_line
from tuning.objectives import Objectives, objectives_for
from tuning.report import (
    LATENCY_FRONT_FILE,
    latency_front_data,
    pareto_flags,
    pareto_front,
    pareto_mask,
)
from tuning.studies import TRIAL_METRICS, study_objectives, trial_metrics
from tuning.study import StudyOptions, _resume_plan, run_study
from tuning.tracking import (
    ENCODER_RUNTIME_TAG,
    GPUS_PER_TRIAL_TAG,
    OBJECTIVES_TAG,
    SAMPLER_TAG,
    STATE_TAG,
    trial_runs,
)

OBJECTIVE_METRICS = [M.VAL_ACCURACY, M.LATENCY_P50_MS, M.MODEL_SIZE_MB]

SPACE = """\
# Accuracy against serving cost.
#
# Scientific: encoder.runtime (torch | onnx-int8).
# Nuisance: model.prototype_dim.
# Fixed: train.epochs 2.
encoder.runtime: {type: categorical, choices: [torch, onnx-int8]}
model.prototype_dim: {type: int, low: 8, high: 32, log: true}
train.epochs: 2
"""


def options(tmp_path, cache_dir, tracking_uri, **kw) -> StudyOptions:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return StudyOptions(
        space=str(space), trials=kw.pop("trials", 3), name="lat",
        overrides=["data.size=600", f"encoder.cache_dir={cache_dir}"],
        tracking_uri=tracking_uri, storage_path=str(tmp_path / "ray"),
        optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}", max_concurrent=2,
        sampler="nsga2", objectives="latency,size", register=False, **kw)


@pytest.fixture(scope="module")
def study(tmp_path_factory, cache_dir, mlflow_server, ray_runtime):
    tmp = tmp_path_factory.mktemp("latency_study")
    summary = run_study(options(tmp, cache_dir, mlflow_server, seed=0))
    return tmp, summary, MlflowClient(mlflow_server)


def test_each_completed_trial_logs_positive_latency_and_size_and_its_runtime(study):
    _, summary, client = study
    experiment = client.get_experiment_by_name("hpn-tune").experiment_id
    runs = trial_runs(client, experiment, summary["parent_run_id"])
    done = [r for r in runs if r.data.tags[STATE_TAG] == "completed"]
    assert len(done) == summary["trials_completed"] == 3
    for run in done:
        m = run.data.metrics
        assert m[M.LATENCY_P50_MS] > 0 and m[M.LATENCY_P95_MS] >= m[M.LATENCY_P50_MS]
        assert m[M.THROUGHPUT_B64] > 0 and m[M.MODEL_SIZE_MB] > 0 and m[M.HEAD_PARAMS] > 0
        runtime = run.data.params["encoder.runtime"]
        assert run.data.tags[ENCODER_RUNTIME_TAG] == runtime
        # int8 weights are about a quarter of the fp32 encoder's
        assert (m[M.MODEL_SIZE_MB] < 40) == (runtime == "onnx-int8")
    # NSGA-II's first generation is random: seed 0 draws onnx-int8, torch, onnx-int8 (seed 3
    # drew onnx-int8 three times), so the size check above compares both runtimes
    assert {r.data.params["encoder.runtime"] for r in done} == {"torch", "onnx-int8"}
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags[OBJECTIVES_TAG] == "latency,size"


def test_the_optuna_study_optimises_three_objectives_with_the_trials_values(study):
    tmp, summary, client = study
    ot = optuna.load_study(study_name="lat", storage=f"sqlite:///{tmp / 'optuna.db'}")
    D = optuna.study.StudyDirection
    assert ot.directions == [D.MAXIMIZE, D.MINIMIZE, D.MINIMIZE]
    complete = ot.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == summary["trials_completed"]
    experiment = client.get_experiment_by_name("hpn-tune").experiment_id
    by_number = {int(r.data.tags["hpn.optuna_trial"]): r.data.metrics
                 for r in trial_runs(client, experiment, summary["parent_run_id"])}
    for trial in complete:
        m = by_number[trial.number]
        assert trial.values == pytest.approx(
            [m[M.VAL_ACCURACY], m[M.LATENCY_P50_MS], m[M.MODEL_SIZE_MB]])


def test_the_report_has_the_pareto_front_and_the_latency_front_by_runtime(study):
    tmp, summary, client = study
    report = {f.path for f in client.list_artifacts(summary["parent_run_id"], "report")}
    assert {f"report/{LATENCY_FRONT_FILE}", "report/pareto_front.png"} <= report
    local = client.download_artifacts(summary["parent_run_id"], "report/plots.json", str(tmp))
    plots = json.loads(Path(local).read_text())
    assert plots[LATENCY_FRONT_FILE] == plots["pareto_front.png"] == "written"


def beats(a: list[float], b: list[float]) -> bool:
    """Does trial `a` dominate `b` on (val_accuracy max, latency min, size min)?"""
    up_a, up_b = [a[0], -a[1], -a[2]], [b[0], -b[1], -b[2]]
    return all(x >= y for x, y in zip(up_a, up_b)) and any(x > y for x, y in zip(up_a, up_b))


def test_show_lists_the_objectives_and_marks_the_pareto_front_over_all_three(
        study, mlflow_server, capsys):
    tmp, summary, _ = study
    assert main(["show", "lat", "--tracking-uri", mlflow_server, "--json"]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out.strip().splitlines()[-1])
    assert shown["objectives"] == summary["objectives"] == OBJECTIVE_METRICS
    assert shown["objective_modes"] == ["max", "min", "min"]
    assert shown["trial_metrics"] == [M.VAL_ACCURACY, M.TEST_ACCURACY, M.LATENCY_P50_MS,
                                      M.MODEL_SIZE_MB, M.RUNTIME_S]
    done = [t for t in shown["trials"] if t["state"] == "completed"]
    points = {t["run_id"]: [t[m] for m in OBJECTIVE_METRICS] for t in done}
    assert len(points) == 3 and all(v is not None for p in points.values() for v in p)
    # on the front exactly when no other completed trial beats it on all three at once
    front = {t["run_id"] for t in shown["trials"] if t["pareto"]}
    assert front == {r for r, p in points.items()
                     if not any(beats(q, p) for o, q in points.items() if o != r)}
    assert front and shown["trials_pareto"] == len(front)
    assert front == set(summary["pareto_run_ids"])  # the study's own summary agrees
    opts = options(tmp, None, mlflow_server)
    assert run_front_line(summary, opts) == (
        f"pareto front: {len(front)} trial{'' if len(front) == 1 else 's'} over val_accuracy, "
        "latency_p50_ms, model_size_mb; "
        f"list them with: hpn-tune show lat --tracking-uri {mlflow_server}")
    # ranked by the primary as before: the front does not reorder the trials
    vals = [t[M.VAL_ACCURACY] for t in done]
    assert vals == sorted(vals, reverse=True)

    assert main(["show", "lat", "--tracking-uri", mlflow_server]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("RUN "))
    assert header.split()[:10] == ["RUN", "RUN", "ID", "STATE", "PARETO", "VAL_ACC",
                                   "TEST_ACC", "LATENCY_P50_MS", "MODEL_SIZE_MB", "RUNTIME_S"]
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("lat-t")}
    assert {r for r, cells in rows.items() if cells[3] == "*"} == front
    assert (f"pareto front: {len(front)} of 3 completed trials (* in PARETO), over "
            "val_accuracy (max), latency_p50_ms (min), model_size_mb (min)") in out


def test_a_resume_keeps_the_studys_objectives_and_refuses_others(study, mlflow_server):
    tmp, summary, client = study
    parent = client.get_run(summary["parent_run_id"])
    plan = _resume_plan(StudyOptions(name="lat", resume=True, trials=5,
                                     optuna_storage=f"sqlite:///{tmp / 'optuna.db'}"), parent)
    assert plan.objectives == ("latency", "size") and plan.sampler == "nsga2"
    with pytest.raises(HPNInputError, match="--objectives memory differs from the study's latency,size"):
        _resume_plan(StudyOptions(name="lat", resume=True, trials=5, objectives="memory"), parent)


@pytest.mark.parametrize("argv,named", [
    (["--objectives", "latency"], "--objectives: the tpe sampler optimises the task's metric alone"),
    (["--sampler", "nsga2", "--objectives", "speed"], "--objectives: unknown objective 'speed'"),
    (["--sampler", "nsga2", "--objectives", "latency,latency"], "names an objective twice"),
    (["--sampler", "nsga2", "--objectives", "latency,"], "has an empty name"),
    (["--sampler", "nsga2", "--objectives", "size", "--set", "train.measure_latency=false"],
     "--objectives size: trials measure latency and size only with train.measure_latency=true"),
])
def test_bad_objectives_exit_2_with_one_line(tmp_path, capsys, argv, named):
    code = main(["run", "--space", "quick", "--name", "bad", "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage-path", str(tmp_path / "ray"),
                 *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and named in err
    assert not (tmp_path / "ray").exists()


def test_the_pareto_mask_keeps_trials_no_other_beats_on_both():
    value = np.array([0.9, 0.8, 0.85, 0.7, 0.9])
    lat = np.array([30.0, 10.0, 12.0, 11.0, 35.0])
    # 0.7 at 11 ms loses to 0.8 at 10 ms; 0.9 at 35 ms to 0.9 at 30 ms
    assert pareto_mask(value, lat).tolist() == [True, True, True, False, False]
    # an error metric, lower is better: 0.7 at 11 ms, and 0.8 at 10 ms (the fastest)
    assert pareto_mask(value, lat, "min").tolist() == [False, True, False, True, False]


def test_the_pareto_front_of_n_objectives_keeps_ties_and_drops_missing_values():
    modes = ["max", "min", "min"]  # accuracy, latency, size
    points = np.array([
        [0.9, 10.0, 5.0],   # 0: on the front
        [0.9, 10.0, 5.0],   # 1: equal to 0: neither beats the other, both stay
        [0.9, 10.0, 6.0],   # 2: as good as 0 but bigger: off
        [0.8, 5.0, 9.0],    # 3: the fastest, less accurate: on
        [0.95, np.nan, 1.0],  # 4: no latency: off, and keeps nothing else off
        [0.7, 12.0, 4.0],   # 5: the smallest: on, though worst on the other two
        [0.7, 12.0, 4.5],   # 6: beaten by 5 on size alone: off
    ])
    assert pareto_front(points, modes).tolist() == [True, True, False, True, False, True, False]
    # the primary's direction decides: as a score 0.9 beats 0.8 at equal cost, as an error
    # (val_mae, lower is better) 0.8 beats 0.9
    same_cost = np.array([[0.9, 10.0, 5.0], [0.8, 10.0, 5.0]])
    assert pareto_front(same_cost, modes).tolist() == [True, False]
    assert pareto_front(same_cost, ["min", "min", "min"]).tolist() == [False, True]
    # one objective: the best value, ties included
    assert pareto_front(np.array([[1.0], [3.0], [3.0]]), ["max"]).tolist() == [False, True, True]
    assert pareto_front(np.empty((0, 3)), modes).tolist() == []
    with pytest.raises(ValueError, match="mode"):
        pareto_front(points, ["max", "min", "up"])
    with pytest.raises(ValueError, match="values"):
        pareto_front(points, ["max", "min"])


def test_pareto_flags_count_completed_trials_with_every_objective_only():
    trials = pd.DataFrame({
        "state": ["completed", "completed", "pruned", "completed", "error"],
        M.VAL_ACCURACY: [0.8, 0.7, 0.99, 0.9, None],
        M.LATENCY_P50_MS: [10.0, 8.0, 1.0, None, 1.0],
    })
    objectives = Objectives([M.VAL_ACCURACY, M.LATENCY_P50_MS], ["max", "min"])
    # the pruned trial would beat both, and the 0.9 has no latency: neither counts
    assert pareto_flags(trials, objectives).tolist() == [True, True, False, False, False]
    assert pareto_flags(pd.DataFrame(), objectives).tolist() == []


def test_study_objectives_read_the_runs_tags_and_a_single_objective_study_has_none():
    spec = task_spec("classification")

    def run(**tags: str) -> SimpleNamespace:
        return SimpleNamespace(data=SimpleNamespace(tags=tags))

    assert study_objectives(run(**{SAMPLER_TAG: "tpe"}), spec) is None
    assert study_objectives(run(), spec) is None  # no sampler recorded
    assert trial_metrics(spec) == TRIAL_METRICS  # what `show` always listed
    got = study_objectives(run(**{SAMPLER_TAG: "nsga2", OBJECTIVES_TAG: "latency,size"}), spec)
    assert got == Objectives(OBJECTIVE_METRICS, ["max", "min", "min"])
    # before --objectives a multi-objective study optimised memory: VRAM when it had a GPU
    old = study_objectives(run(**{SAMPLER_TAG: "nsga2", GPUS_PER_TRIAL_TAG: "0.25"}), spec)
    assert old == Objectives([M.VAL_ACCURACY, M.PEAK_VRAM_MB], ["max", "min"])
    assert trial_metrics(spec, old) == (*TRIAL_METRICS[:2], M.PEAK_VRAM_MB, M.RUNTIME_S)


def test_objectives_for_gives_the_primary_in_its_direction_then_each_cost_minimised():
    classification, regression = task_spec("classification"), task_spec("regression")
    got = objectives_for(classification, ("latency", "size"), 0.0)
    assert got == Objectives(OBJECTIVE_METRICS, ["max", "min", "min"])
    assert got.directions == ["maximize", "minimize", "minimize"]  # Optuna's words
    # memory is VRAM when the trials have a GPU, else RSS
    assert objectives_for(classification, ["memory"], 0.25).metrics == [M.VAL_ACCURACY,
                                                                        M.PEAK_VRAM_MB]
    assert objectives_for(classification, ["memory"], 0).metrics == [M.VAL_ACCURACY,
                                                                     M.PEAK_RSS_MB]
    error = objectives_for(regression, ("memory",), 0)
    assert error.modes == [regression.mode, "min"] == ["min", "min"]
    assert error.directions == ["minimize", "minimize"]
    assert objectives_for(classification, (), 0) == Objectives([M.VAL_ACCURACY], ["max"])


def test_reading_a_studys_objectives_imports_no_optuna():
    code = ("import sys; from types import SimpleNamespace as N; from hpn.tasks import task_spec; "
            "from tuning.studies import study_objectives; "
            "run = N(data=N(tags={'hpn.sampler': 'nsga2'})); "
            "assert study_objectives(run, task_spec('classification')) is not None; "
            "assert 'optuna' not in sys.modules, 'optuna imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_the_latency_front_keeps_completed_trials_by_runtime_with_each_runtimes_front():
    trials = pd.DataFrame({
        "state": ["completed"] * 4 + ["pruned"],
        "params.encoder.runtime": ["torch", "torch", "onnx-int8", "onnx-int8", "torch"],
        M.VAL_ACCURACY: [0.9, 0.8, 0.85, 0.84, 0.99],
        M.LATENCY_P50_MS: [30.0, 32.0, 10.0, 11.0, 1.0],
        "run_name": ["t1", "t2", "t3", "t4", "t5"],
    })
    d = latency_front_data(trials, M.VAL_ACCURACY)
    assert d.run_name == ["t1", "t2", "t3", "t4"]  # the pruned trial is no point
    assert d.pareto.tolist() == [True, False, True, False]
    assert d.runtime_pareto.tolist() == [True, False, True, False]
