"""The study's live line (tuning.progress) and the Tune callback that feeds it."""
from __future__ import annotations

import io
import logging
import pickle
from types import SimpleNamespace

import pytest

from tuning.progress import StudyProgress, clock


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def progress(total: int = 4, **kw) -> tuple[StudyProgress, Terminal, Clock]:
    stream, now = Terminal(), Clock()
    return StudyProgress("S", total, stream=stream, now=now, **kw), stream, now


def shown(stream: io.StringIO) -> str:
    """What the terminal shows last: the text after the last carriage return."""
    return stream.getvalue().rstrip("\n").split("\r")[-1].strip()


def test_the_line_counts_finished_trials_by_state_and_the_running_ones():
    p, stream, _ = progress(total=5)
    for number, trial in enumerate("abcd", start=1):
        p.trial_started(trial, number)
    p.trial_finished("a", "completed", {"val_accuracy": 0.8})
    p.trial_finished("b", "pruned", {"val_accuracy": 0.5, "epoch": 2.0})
    p.trial_finished("c", "error")
    assert shown(stream).startswith("study S: 3/5 done (1 completed, 1 pruned, 1 errored), "
                                    "1 running | best val 0.8000 (S-t001)")


def test_best_so_far_is_the_best_completed_trial_and_names_it():
    p, stream, _ = progress(total=4)
    for number, trial in enumerate("abcd", start=1):
        p.trial_started(trial, number)
    p.trial_finished("a", "completed", {"val_accuracy": 0.7})
    p.trial_finished("b", "pruned", {"val_accuracy": 0.95})  # stopped early: not a result
    p.trial_finished("c", "completed", {"val_accuracy": 0.9})
    p.trial_finished("d", "completed", {"val_accuracy": 0.8})
    assert p.best == (0.9, "S-t003")
    assert "best val 0.9000 (S-t003)" in shown(stream)


def test_time_left_is_unknown_until_a_trial_finishes_then_counts_down():
    p, stream, now = progress(total=4, concurrency=2)
    p.trial_started("a", 1)
    p.trial_started("b", 2)
    now.t = 10
    p.trial_result("a", {"val_accuracy": 0.5})
    assert shown(stream).endswith("0:10 elapsed, ? left")
    p.trial_finished("a", "completed", {"val_accuracy": 0.8})
    # mean 10 s; b owes 10 - 10 = 0, two trials not started owe 10 each; two slots
    assert p.eta() == pytest.approx(10)
    assert shown(stream).endswith("0:10 elapsed, ~0:10 left")
    p.trial_started("c", 3)
    now.t = 14
    assert p.eta() == pytest.approx((6 + 10) / 2)  # c owes 6, d 10


def test_verbose_prints_one_line_per_finished_trial_above_the_live_line():
    p, stream, now = progress(total=3, verbose=True)
    p.trial_started("a", 4)
    p.trial_started("b", 5)
    now.t = 12.3
    p.trial_finished("a", "completed", {"val_accuracy": 0.8712, "test_accuracy": 0.865})
    p.trial_finished("b", "pruned", {"val_accuracy": 0.61, "epoch": 3.0})
    p.trial_finished("c", "error", {}, error="ValueError: no layer 99\n  more detail", number=6)
    lines = [line.split("\r")[-1] for line in stream.getvalue().split("\n")]
    assert "S-t004 completed val 0.8712 test 0.8650 12.3 s" in lines
    assert "S-t005 pruned after epoch 3 (val 0.6100)" in lines
    assert "S-t006 error: ValueError: no layer 99" in lines


def test_without_verbose_finished_trials_print_no_line_of_their_own():
    p, stream, _ = progress(total=1)
    p.trial_started("a", 1)
    p.trial_finished("a", "completed", {"val_accuracy": 0.8})
    p.close()
    assert "completed val" not in stream.getvalue()


def test_a_resumed_study_starts_from_the_counts_and_best_it_already_has():
    p, stream, _ = progress(total=12, completed=3, pruned=1, errored=1, best=(0.85, "S-t002"))
    p.start()
    assert shown(stream).startswith(
        "study S: 5/12 done (3 completed, 1 pruned, 1 errored), 0 running "
        "| best val 0.8500 (S-t002)")
    p.trial_started("x", 6)
    p.trial_finished("x", "completed", {"val_accuracy": 0.8})
    assert p.best == (0.85, "S-t002") and p.done == 6


@pytest.mark.parametrize("stream, enabled", [(io.StringIO(), True), (Terminal(), False)],
                         ids=["not a terminal", "disabled"])
def test_it_prints_nothing_off_a_terminal_or_when_disabled(stream, enabled):
    p = StudyProgress("S", 2, stream=stream, enabled=enabled, verbose=True)
    p.start()
    p.trial_started("a", 1)
    p.trial_result("a", {"val_accuracy": 0.5})
    p.trial_finished("a", "completed", {"val_accuracy": 0.8})
    p.trial_finished("b", "error", error="boom")
    p.close()
    assert stream.getvalue() == ""


def test_closing_leaves_the_last_line_and_stops_drawing():
    p, stream, _ = progress(total=2)
    p.trial_started("a", 1)
    p.close()
    p.close()
    after = stream.getvalue()
    assert after.endswith("\n")
    p.trial_finished("a", "completed", {"val_accuracy": 0.8})
    assert stream.getvalue() == after


def test_a_line_wider_than_the_terminal_is_cut_to_fit(monkeypatch):
    monkeypatch.setattr("tuning.progress._width", lambda stream: 40)
    p, stream, _ = progress()
    p.start()
    assert shown(stream) == "study S: 0/4 done (0 completed, 0 pr..."


def test_a_resume_counts_what_its_finished_trials_were():
    from tuning.progress import resumed

    start = resumed([("completed", 0.7, "S-t001"), ("pruned", 0.9, "S-t002"),
                     ("completed", 0.8, "S-t003"), ("error", None, "S-t004"),
                     ("lost", 0.99, "S-t005"), (None, None, "S-t006")])
    assert start == {"completed": 2, "pruned": 1, "errored": 1, "best": (0.8, "S-t003")}


def test_clock_reads_minutes_then_hours():
    assert [clock(5), clock(83), clock(3723)] == ["0:05", "1:23", "1:02:03"]


def test_trial_names_match_the_mlflow_run_names():
    from tuning.progress import trial_name
    from tuning.tracking import trial_run_name

    assert trial_name("S", 7, "ab12") == trial_run_name("S", 7, "ab12") == "S-t007"
    assert trial_name("S", None, "ab12") == trial_run_name("S", None, "ab12")


# -- the Tune callback ------------------------------------------------------------------
def trial(trial_id: str, tag: str, last_result: dict | None = None, **files):
    """A stand-in for Tune's Trial: what the callback reads of it."""
    return SimpleNamespace(trial_id=trial_id, experiment_tag=tag, last_result=last_result or {},
                           pickled_error_file=files.get("pickled"), error_file=files.get("text"))


def test_the_callback_maps_tune_events_to_trial_states(tmp_path):
    from tuning.ray_tune import DONE_KEY, ProgressCallback

    p, stream, now = progress(total=5, verbose=True)
    callback = ProgressCallback(p, trial_offset=10)
    done = trial("a1", "1_lr=0.1", {"val_accuracy": 0.9, "test_accuracy": 0.8, DONE_KEY: True})
    stopped = trial("b2", "2_lr=0.2", {"val_accuracy": 0.4, "epoch": 3.0})
    # Ray pickles a RayTaskError whose `cause` is what the trial raised
    error = tmp_path / "error.pkl"
    error.write_bytes(pickle.dumps(SimpleNamespace(cause=ValueError("trainable_layers 99 > 6"))))
    failed = trial("c3", "3_lr=0.3", pickled=str(error))
    callback.setup(total_num_samples=5)
    for t in (done, stopped, failed):
        callback.on_trial_start(0, [], t)
    callback.on_trial_result(0, [], done, {"val_accuracy": 0.5})
    now.t = 2
    callback.on_trial_complete(0, [], done)
    callback.on_trial_complete(0, [], stopped)
    callback.on_trial_error(0, [], failed)
    assert p.counts == {"completed": 1, "pruned": 1, "error": 1}
    assert p.best == (0.9, "S-t011")
    text = stream.getvalue()
    assert "S-t012 pruned after epoch 3 (val 0.4000)" in text
    assert "S-t013 error: ValueError: trainable_layers 99 > 6" in text
    callback.on_experiment_end([])
    closed = stream.getvalue()
    callback.on_trial_start(0, [], trial("d4", "4_lr=0.4"))
    assert stream.getvalue() == closed


def test_an_error_without_its_pickle_reads_the_last_line_of_the_error_text(tmp_path):
    from tuning.ray_tune import ProgressCallback

    text = tmp_path / "error.txt"
    text.write_text("Failure # 1 (occurred at ...)\nray::ImplicitFunc.train()\n  File ...\n"
                    "hpn.errors.ConfigError: encoder.trainable_layers: got 99\n\n")
    assert (ProgressCallback.error_line(trial("a", "1", text=str(text)))
            == "hpn.errors.ConfigError: encoder.trainable_layers: got 99")
    assert ProgressCallback.error_line(trial("a", "1", text=str(tmp_path / "none"))) == ""


def test_a_pickled_callback_is_inert_and_install_puts_the_live_one_back():
    from tuning.ray_tune import ProgressCallback

    p, stream, _ = progress()
    live = ProgressCallback(p, trial_offset=3)
    restored = pickle.loads(pickle.dumps(live))  # as Tuner.restore brings it back
    assert restored.progress is None and restored.trial_offset == 3
    restored.on_trial_start(0, [], trial("a1", "1_x"))
    restored.close()
    assert stream.getvalue() == ""
    other = object()
    config = SimpleNamespace(callbacks=[other, restored])
    tuner = SimpleNamespace(_local_tuner=SimpleNamespace(get_run_config=lambda: config))
    assert live.install(tuner) is tuner
    assert config.callbacks == [other, live]


def test_quieting_drops_only_the_named_messages(monkeypatch):
    from tuning.ray_tune import quiet_libraries

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    names = ("mlflow", "ray.tune", "ray.tune.analysis.experiment_analysis")
    levels = {name: logging.getLogger(name).level for name in names}
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    tune = logging.getLogger("ray.tune.tune")
    try:
        quiet_libraries()
        quiet_libraries()  # twice: one filter each, not two
        for log in (auth, tune):
            log.addHandler(handler)
        auth.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=...")
        auth.warning("Token authentication is disabled for this Ray cluster. Anyone with ...")
        tune.warning("Experiment has been interrupted, but the most recent state was saved.\n"
                     "Resume experiment with: Tuner.restore(path=..., trainable=...)")
        tune.warning("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run.")
        tune.warning("Trial task failed for trial trial_fn_0123")  # a real failure stays
        assert seen == ["Token authentication is disabled for this Ray cluster. Anyone with ...",
                        "Trial task failed for trial trial_fn_0123"]
        assert len(auth.filters) == 1
        assert not logging.getLogger("mlflow").isEnabledFor(logging.INFO)
        assert logging.getLogger("mlflow").isEnabledFor(logging.WARNING)
    finally:
        for log in (auth, tune):
            log.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
