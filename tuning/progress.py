"""A study's live progress in the terminal: one line, fed by plain trial events.

    study S: 5/12 done (3 completed, 1 pruned, 1 errored), 2 running
      | best val 0.8712 (S-t004) | 1:23 elapsed, ~2:10 left          (on one line)

Free of Ray, Optuna and MLflow: `tuning.ray_tune.ProgressCallback` turns Tune's trial
callbacks into these events, and tests feed them by hand.
"""
from __future__ import annotations

import io
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from hpn import metrics as M
from hpn.tasks import is_better, task_spec

STATES = ("completed", "pruned", "error")
REFRESH_S = 1.0  # redraw at most this often between events (the clock and the ETA move)


def trial_name(study: str, number: int | None, trial_id: str) -> str:
    """`<study>-t007`, as `tuning.tracking.trial_run_name` names the trial's MLflow run."""
    return f"{study}-t{number:03d}" if number else trial_id


def clock(seconds: float) -> str:
    """1:23, or 1:02:03 past an hour."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class _Running:
    name: str
    started: float
    last: dict[str, Any] = field(default_factory=dict)  # its latest epoch's report


class StudyProgress:
    """The live line of one study, and with `verbose` one printed line per finished trial.

    `total` counts every trial of the study (with --repeats, every repeat); a resumed study
    starts from the counts and best trial it already has. "best val" is the best final
    val_accuracy of a completed trial (one run: with --repeats the summary's best is a mean);
    for another `task` it is that task's primary metric in its direction, named on the line
    ("best val_mae 3.1042": the lowest), and a finished trial's line shows it and its test
    counterpart.

    The time left is the work still owed, in finished-trial durations, spread over the
    concurrent slots: each running trial owes the mean duration of the trials finished in this
    session less its age (at least nothing), each trial not yet started owes the mean, and the
    sum is divided by `concurrency`. Pruned trials are short, so the mean carries the study's
    own mix of stopped and finished trials. '?' until a trial finishes in this session.

    Prints nothing when `enabled` is False (`--json`) or the stream is not a terminal. Tune
    calls back on its driver thread; a lock keeps a caller on another thread (close() after
    Ctrl-C) from drawing over it.
    """

    def __init__(self, study: str, total: int, *, concurrency: int = 1, completed: int = 0,
                 pruned: int = 0, errored: int = 0, best: tuple[float, str] | None = None,
                 verbose: bool = False, enabled: bool = True, stream: IO[str] | None = None,
                 now: Callable[[], float] = time.monotonic, task: str = "classification") -> None:
        self.study, self.total, self.verbose = study, total, verbose
        self.spec = task_spec(task)
        self.concurrency = max(concurrency, 1)
        self.counts = {"completed": completed, "pruned": pruned, "error": errored}
        self.best = best  # (the task's primary metric, trial name)
        self.stream = stream if stream is not None else sys.stderr
        self.active = enabled and _is_terminal(self.stream)
        self._now = now
        self._started_at = now()
        self._running: dict[str, _Running] = {}  # by trial id
        self._durations: list[float] = []  # of trials finished in this session
        self._bar: Any = None
        self._drawn_at = -math.inf
        self._closed = False
        self._lock = threading.RLock()

    # -- events --------------------------------------------------------------------------
    def trial_started(self, trial_id: str, number: int | None) -> None:
        with self._lock:
            self._running[trial_id] = _Running(trial_name(self.study, number, trial_id),
                                               self._now())
            self._draw()

    def trial_result(self, trial_id: str, metrics: dict[str, Any]) -> None:
        """One epoch's report: kept as the trial's last word, in case it finishes without
        one; the line redraws (the clock moves)."""
        with self._lock:
            if trial_id in self._running:
                self._running[trial_id].last = dict(metrics)
            self._draw(throttle=True)

    def trial_finished(self, trial_id: str, state: str, metrics: dict[str, Any] | None = None,
                       *, error: str | None = None, number: int | None = None) -> None:
        """`state` is completed, pruned or error; `metrics` the trial's last report (else its
        last epoch's); `number` names a trial that never started here (it failed to start)."""
        if state not in STATES:
            raise ValueError(f"trial state {state!r}: expected one of {', '.join(STATES)}")
        with self._lock:
            running = self._running.pop(trial_id, None)
            if running is None:
                name, took, metrics = trial_name(self.study, number, trial_id), None, metrics or {}
            else:
                name, took = running.name, self._now() - running.started
                metrics = metrics or running.last
                self._durations.append(took)
            self.counts[state] += 1
            val = _number(metrics.get(self.spec.primary))
            if state == "completed" and _beats(val, self.best, self.spec.mode):
                self.best = (val, name)
            self._draw()  # first, so the line printed above it redraws it with this trial in
            if self.verbose:
                self._print(_finished_line(name, state, metrics, took, error, self.spec.primary,
                                           self.spec.test_primary))

    # -- drawing -------------------------------------------------------------------------
    def start(self) -> None:
        """Show the line now (else the first event shows it)."""
        with self._lock:
            self._draw()

    def refresh(self) -> None:
        """Redraw if the line is older than REFRESH_S: call it often, it is cheap."""
        with self._lock:
            self._draw(throttle=True)

    def close(self) -> None:
        """Leave the last line on screen and stop drawing; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            if self._bar is not None:  # a line never shown is not shown now
                self._draw()
                self._bar.close()
            self._closed = True

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def eta(self) -> float | None:
        """Seconds left (see the class docstring); None before a trial finished here."""
        if not self._durations:
            return None
        mean = sum(self._durations) / len(self._durations)
        now = self._now()
        owed = sum(max(mean - (now - r.started), 0.0) for r in self._running.values())
        unstarted = max(self.total - self.done - len(self._running), 0)
        return (owed + unstarted * mean) / self.concurrency

    def line(self) -> str:
        c = self.counts
        text = (f"study {self.study}: {self.done}/{self.total} done ({c['completed']} completed, "
                f"{c['pruned']} pruned, {c['error']} errored), {len(self._running)} running")
        if self.best is not None:
            text += f" | best {_short(self.spec.primary)} {self.best[0]:.4f} ({self.best[1]})"
        eta = self.eta()
        left = "?" if eta is None else f"~{clock(eta)}"
        return text + f" | {clock(self._now() - self._started_at)} elapsed, {left} left"

    def _draw(self, throttle: bool = False) -> None:
        if not self.active or self._closed:
            return
        now = self._now()
        if throttle and now - self._drawn_at < REFRESH_S:
            return
        if self._bar is None:
            from tqdm import tqdm

            # No bar, only our text: tqdm redraws it in place and prints finished trials
            # (and any other tqdm.write) above it. The width is ours (ncols=0: no trim by
            # tqdm), as tqdm hides its line on a terminal that reports a 0x0 size.
            self._bar = tqdm(file=self.stream, bar_format="{desc}", ncols=0, nrows=20,
                             leave=True, mininterval=0)
        line, width = self.line(), _width(self.stream)
        if width > 1 and len(line) >= width:  # a wrapped line cannot be redrawn in place
            line = line[:width - 4] + "..."
        self._bar.set_description_str(line, refresh=True)
        self._drawn_at = now

    def _print(self, text: str) -> None:
        if not self.active or self._closed:
            return
        if self._bar is None:
            self.stream.write(text + "\n")
            return
        from tqdm import tqdm

        tqdm.write(text, file=self.stream)


def _short(metric: str) -> str:
    """How the line names a metric: `val`/`test` for accuracy (the line as it always read),
    else the metric's own name (val_mae, test_micro_f1)."""
    return {M.VAL_ACCURACY: "val", M.TEST_ACCURACY: "test"}.get(metric, metric)


def _finished_line(name: str, state: str, metrics: dict[str, Any], took: float | None,
                   error: str | None, metric: str = M.VAL_ACCURACY,
                   test_metric: str = M.TEST_ACCURACY) -> str:
    """`S-t004 completed val 0.8712 test 0.8650 12.3 s`, `S-t005 pruned after epoch 3 (val
    0.6100)`, `S-t006 error: <first line>`; with another task's metrics `S-t004 completed
    val_mae 3.1042 test_mae 3.2210 12.3 s`."""
    val, test = _number(metrics.get(metric)), _number(metrics.get(test_metric))
    v, t = _short(metric), _short(test_metric)
    if state == "error":
        first = (error or "").strip().splitlines()
        return f"{name} error: {first[0] if first else 'the trial raised'}"
    if state == "pruned":
        epoch = _number(metrics.get(M.EPOCH, metrics.get("training_iteration")))
        text = f"{name} pruned" + (f" after epoch {int(epoch)}" if epoch else "")
        return text + (f" ({v} {val:.4f})" if val is not None else "")
    parts = [f"{name} completed"]
    if val is not None:
        parts.append(f"{v} {val:.4f}")
    if test is not None:
        parts.append(f"{t} {test:.4f}")
    if took is not None:
        parts.append(f"{took:.1f} s")
    return " ".join(parts)


def _beats(val: float | None, best: tuple[float, str] | None, mode: str = "max") -> bool:
    """Is `val` a new best? Higher for a "max" metric, lower for a "min" one (an error)."""
    if val is None:
        return False
    return best is None or is_better(val, best[0], mode)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _width(stream: IO[str]) -> int:
    """The terminal's columns; 0 when unknown."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return 0


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def resumed(trials: Iterable[tuple[str | None, float | None, str]],
            mode: str = "max") -> dict[str, Any]:
    """StudyProgress's starting counts and best (keywords) from the trials a resumed study has
    already finished: (state, final primary metric, trial name) each, the best being the
    highest or, with `mode` "min", the lowest; other states are skipped."""
    counts = {"completed": 0, "pruned": 0, "error": 0}
    best: tuple[float, str] | None = None
    for state, val, name in trials:
        if state not in counts:
            continue
        counts[state] += 1
        val = _number(val)
        if state == "completed" and _beats(val, best, mode):
            best = (val, name)
    return {"completed": counts["completed"], "pruned": counts["pruned"],
            "errored": counts["error"], "best": best}
