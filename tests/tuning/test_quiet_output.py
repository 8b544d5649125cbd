"""What keeps MLflow's own noise out of our commands' output: its artifact download bar
(`tuning.tracking.no_download_bar`) and its "Validating input example" note on every saved
model (`tuning.pyfunc._quiet_save`), without taking a setting away from the user or from
another thread."""
from __future__ import annotations

import logging
import os
import threading

import pytest

from tuning.pyfunc import _quiet_save
from tuning.tracking import no_download_bar

BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@pytest.fixture
def no_bar_setting(monkeypatch):
    monkeypatch.delenv(BAR, raising=False)


def test_the_bar_is_off_inside_and_the_variable_gone_after(no_bar_setting):
    with no_download_bar():
        assert os.environ[BAR] == "false"
    assert BAR not in os.environ


def test_blocks_nest_and_the_outer_one_keeps_the_bar_off(no_bar_setting):
    with no_download_bar():
        with no_download_bar():  # a download inside a download: no deadlock
            assert os.environ[BAR] == "false"
        assert os.environ[BAR] == "false"
    assert BAR not in os.environ


def test_a_users_own_setting_is_kept(monkeypatch):
    monkeypatch.setenv(BAR, "true")
    with no_download_bar():
        assert os.environ[BAR] == "true"
    assert os.environ[BAR] == "true"


def test_threads_do_not_wait_for_each_others_downloads(no_bar_setting):
    inside, release = threading.Event(), threading.Event()

    def long_download() -> None:
        with no_download_bar():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=long_download)
    thread.start()
    assert inside.wait(10)
    done = threading.Event()

    def quick_download() -> None:
        with no_download_bar():
            done.set()

    other = threading.Thread(target=quick_download)
    other.start()
    assert done.wait(5), "a second download waited for the first to finish"
    assert os.environ[BAR] == "false"  # the first is still open
    release.set()
    thread.join(10)
    other.join(10)
    assert BAR not in os.environ


def test_saving_drops_only_the_input_example_note(caplog):
    log = logging.getLogger("mlflow.pyfunc")
    level = log.level
    with caplog.at_level(logging.INFO, logger="mlflow.pyfunc"), _quiet_save():
        log.info("Validating input example against model signature")
        log.info("something else MLflow says")
    assert [r.getMessage() for r in caplog.records] == ["something else MLflow says"]
    assert log.level == level  # no level is changed, so no thread is left with another's
