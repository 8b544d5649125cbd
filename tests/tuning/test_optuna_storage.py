"""The study's Optuna storage as Ray's searcher uses it: real RDB storage, no Ray runtime."""
from __future__ import annotations

import logging

import optuna
import pytest

from hpn import metrics as M
from tuning.optuna_store import ORPHAN_ATTR, mark_orphans, open_storage, redact, resolve_storage
from tuning.ray_tune import DONE_KEY, OPTUNA_TRIAL_KEY, StudySearch


def _space(trial):
    trial.suggest_float("train.lr", 1e-3, 1e-1, log=True)


def _searcher(url: str) -> StudySearch:
    return StudySearch(space=_space, metric=M.VAL_ACCURACY, mode="max",
                       sampler=optuna.samplers.RandomSampler(seed=0),
                       storage=open_storage(url), study_name="s")


def _trials(url: str) -> dict[int, optuna.trial.FrozenTrial]:
    return {t.number: t for t in optuna.load_study(study_name="s", storage=url).get_trials()}


def test_each_ray_trial_is_one_optuna_trial_told_as_it_ended(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = _searcher(url)
    configs = {tid: search.suggest(tid) for tid in ("a", "b", "c")}
    assert [configs[t][OPTUNA_TRIAL_KEY] for t in "abc"] == [0, 1, 2]
    for tid in "abc":
        search.on_trial_result(tid, {M.VAL_ACCURACY: 0.5, "training_iteration": 1, M.EPOCH: 1})
    search.on_trial_complete("a", {M.VAL_ACCURACY: 0.8, M.EPOCH: 3, DONE_KEY: True})
    # ASHA stopped b at epoch 1: Tune hands over its last result, which is not a finish.
    search.on_trial_complete("b", {M.VAL_ACCURACY: 0.5, M.EPOCH: 1})
    search.on_trial_complete("c", None, error=True)
    trials = _trials(url)
    assert [trials[n].state.name for n in range(3)] == ["COMPLETE", "PRUNED", "FAIL"]
    assert trials[0].value == 0.8 and trials[1].intermediate_values == {1: 0.5}
    assert [trials[n].user_attrs["ray_trial_id"] for n in range(3)] == ["a", "b", "c"]


def test_a_trial_replayed_after_a_resume_leaves_its_finished_optuna_trial_alone(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = _searcher(url)
    search.suggest("a")
    state = dict(search.__dict__)  # what Ray saved before the trial finished
    search.on_trial_complete("a", {M.VAL_ACCURACY: 0.8, M.EPOCH: 3, DONE_KEY: True})
    restored = _searcher(url)
    restored.__dict__.update(state)  # the resumed searcher: it does not know "a" finished
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        restored.on_trial_result("a", {M.VAL_ACCURACY: 0.6, "training_iteration": 1, M.EPOCH: 1})
        restored.on_trial_complete("a", {M.VAL_ACCURACY: 0.8, M.EPOCH: 3, DONE_KEY: True})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    (trial,) = _trials(url).values()
    assert trial.state.name == "COMPLETE" and trial.value == 0.8


def test_trials_asked_but_never_run_by_ray_are_failed_and_marked(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = _searcher(url)
    for tid in ("a", "b", "c"):
        search.suggest(tid)
    assert mark_orphans(open_storage(url), "s", known_ray_trials={"a", "b"}) == 1
    trials = _trials(url)
    assert [trials[n].state.name for n in range(3)] == ["RUNNING", "RUNNING", "FAIL"]
    assert ORPHAN_ATTR in trials[2].user_attrs and ORPHAN_ATTR not in trials[0].user_attrs


def test_storage_urls_are_resolved_and_printed_without_a_password(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage(None, f"sqlite:///{tmp_path}/x/mlflow.db") == \
        f"sqlite:///{tmp_path}/x/optuna.db"
    assert resolve_storage(None, "http://127.0.0.1:5000") == f"sqlite:///{tmp_path}/optuna.db"
    assert resolve_storage("sqlite:///rel.db", "") == f"sqlite:///{tmp_path}/rel.db"
    assert redact("postgresql://hpn:s3cret@db:5432/optuna") == "postgresql://hpn:***@db:5432/optuna"
    from hpn.errors import HPNInputError

    with pytest.raises(HPNInputError, match="--optuna-storage: 'optuna.db' is not a database URL"):
        resolve_storage("optuna.db", "")
    with pytest.raises(HPNInputError, match="--optuna-storage: folder .* does not exist"):
        open_storage(f"sqlite:///{tmp_path}/missing/optuna.db")


def test_a_multi_objective_trial_without_every_objective_is_failed_not_left_running(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = StudySearch(space=_space, metric=[M.VAL_ACCURACY, M.PEAK_VRAM_MB], mode=["max", "min"],
                         storage=open_storage(url), study_name="s")
    search.suggest("a")
    search.on_trial_complete("a", {M.VAL_ACCURACY: 0.8, M.EPOCH: 3, DONE_KEY: True})  # no VRAM
    assert [t.state.name for t in _trials(url).values()] == ["FAIL"]


def test_redacted_urls_keep_everything_but_the_password():
    assert redact("postgresql://u:a/b@h/db") == "postgresql://u:***@h/db"
    assert redact("postgresql://u@h/db?password=pw&x=1") == "postgresql://u@h/db?password=***&x=1"
    assert redact("http://user:secret@host:5000") == "http://user:***@host:5000"
    assert redact("--trials") == "--trials" and redact("sqlite:////tmp/o.db") == "sqlite:////tmp/o.db"


def test_the_resume_command_locates_the_study_without_its_password():
    from tuning.study import StudyOptions, resume_command

    opts = StudyOptions(name="s", optuna_storage="postgresql://hpn:s3cret@db/optuna",
                        storage_path="/shared/ray")
    assert resume_command(opts, "s", extend_to=20) == (
        "hpn-tune run --name s --resume --trials 20 --storage-path /shared/ray "
        "--optuna-storage 'postgresql://hpn:***@db/optuna'")


def test_an_extension_stopped_before_ray_saved_anything_starts_over(tmp_path):
    from hpn.errors import HPNInputError
    from tuning.study import Leg, StudyPlan, _legs_to_run

    def plan(*legs: Leg, trials: int) -> StudyPlan:
        return StudyPlan(None, None, "tpe", "fifo", 0, 1, trials, 1, 1.0, None, None, legs)

    legs = (Leg("s", 3), Leg("s-x2", 2))
    assert _legs_to_run(plan(*legs, trials=5), "s", str(tmp_path), "KILLED") == [(legs[1], "again")]
    assert _legs_to_run(plan(*legs, trials=7), "s", str(tmp_path), "KILLED") == [
        (legs[1], "again"), (Leg("s-x3", 2), "new")]
    assert _legs_to_run(plan(*legs, trials=5), "s", str(tmp_path), "FINISHED") == []
    with pytest.raises(HPNInputError, match="--resume: no saved Ray state for 's'"):
        _legs_to_run(plan(legs[0], trials=3), "s", str(tmp_path), "KILLED")


def test_two_new_studies_claiming_one_name_at_once_leave_one_winner(tmp_path):
    """Both are past the MLflow check (neither has its parent run yet): the claim decides."""
    import threading

    from hpn.errors import HPNInputError
    from tuning.study import StudyOptions, _claim_name, _new_plan

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    plan = _new_plan(StudyOptions(space="quick", name="race", optuna_storage=url), "", "race")
    start = threading.Barrier(2)
    outcomes: list[object] = []

    def new_study() -> None:
        start.wait()
        try:
            outcomes.append(_claim_name(plan, "race"))
        except HPNInputError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=new_study) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o for o in outcomes if isinstance(o, HPNInputError)]
    assert len(outcomes) == 2 and len(errors) == 1
    assert str(errors[0]).startswith("--name: study name 'race' is taken in the Optuna storage")
    assert "\n" not in str(errors[0])
    assert optuna.get_all_study_names(url) == ["race"]


@pytest.mark.parametrize("sampler,mode", [("tpe", "max"), ("nsga2", ["max", "min"])])
def test_the_claimed_study_is_the_one_the_searcher_opens_with_its_directions(
        tmp_path, sampler, mode):
    from tuning.study import StudyOptions, _claim_name, _new_plan

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    _claim_name(_new_plan(StudyOptions(space="quick", name="s", optuna_storage=url,
                                       sampler=sampler), "", "s"), "s")
    claimed = optuna.load_study(study_name="s", storage=url)
    metric = [M.VAL_ACCURACY, M.PEAK_RSS_MB] if isinstance(mode, list) else M.VAL_ACCURACY
    search = StudySearch(space=_space, metric=metric, mode=mode, storage=open_storage(url),
                         sampler=optuna.samplers.RandomSampler(seed=0), study_name="s")
    assert search._ot_study._study_id == claimed._study_id
    modes = mode if isinstance(mode, list) else [mode]
    wanted = [optuna.study.StudyDirection.MAXIMIZE if m == "max" else
              optuna.study.StudyDirection.MINIMIZE for m in modes]
    assert claimed.directions == wanted
    assert optuna.get_all_study_names(url) == ["s"]


def test_a_released_claim_frees_the_name_but_a_study_with_trials_is_never_deleted(tmp_path):
    from tuning.optuna_store import claim_study, release_study, study_exists

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert claim_study(storage, "a", ["maximize"])
    assert not claim_study(storage, "a", ["maximize"])
    release_study(storage, "a")
    assert claim_study(storage, "a", ["maximize"])  # free again
    optuna.load_study(study_name="a", storage=storage).ask()
    release_study(storage, "a")
    assert study_exists(storage, "a")
