"""Whether a logged model would serve: load it in a fresh process and predict a few texts.

`python -m tuning.model_check MODEL_URI` (the store from MLFLOW_TRACKING_URI) prints one line
and exits 0 when the model loads and answers sanely for its task (the columns its signature
declares; labels among its classes; finite scores and predicted values), 1 with the reason
otherwise. The registry runs it in a new process so that nothing the registering process has
imported or cached (a class a pickle names, the encoder, a module on its path) can make a broken
model look loadable.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
import pandas as pd

from hpn.tasks import CLASSIFICATION, task_spec
from tuning.pyfunc import (
    INPUT_EXAMPLE,
    LABEL_COLUMN,
    LABELS_COLUMN,
    PREDICTION_COLUMN,
    SCORE_COLUMN,
    SCORE_PREFIX,
    TARGET_RANGE_METADATA,
    TASK_METADATA,
    declared_metadata,
    declared_outputs,
    task_of_columns,
)

#: Enough to exercise the encoder and every column of the output; short so the check is quick.
TEXTS = [*INPUT_EXAMPLE, "A retired carpenter who restores old furniture and teaches woodworking."]
TIMEOUT_S = 300.0  # importing torch and loading the encoder takes ~10 s on two cores
FAILED = "model check failed: "  # how the fresh process starts its one-line verdict


def output_problem(frame: Any, texts: list[str], classes: set[str],
                   task: str = CLASSIFICATION, columns: list[str] | None = None,
                   target_range: Any = None) -> str | None:
    """Why `frame` is not a usable answer of a `task` model to `texts`; None when it is. One
    row per text; a label (classification, joint) one of the model's `classes`; a label set
    (multilabel) a list of distinct `classes`; finite scores and predicted values. `columns`:
    the output columns the model's signature declares, which the frame must have, in order;
    `target_range` [low, high]: where a predicted value must lie (the prediction maps a cosine
    in [-1, 1] onto it), when the model records it."""
    if not isinstance(frame, pd.DataFrame):
        return f"predict returned a {type(frame).__name__}, not a DataFrame"
    spec = task_spec(task)
    required = [LABEL_COLUMN, SCORE_COLUMN] if spec.uses_labels else []
    required += [LABELS_COLUMN] if spec.multilabel else []
    required += [PREDICTION_COLUMN] if spec.uses_target else []
    missing = [c for c in required if c not in frame.columns]
    if missing:
        return f"its predictions have no {' or '.join(missing)} column"
    if columns and [str(c) for c in frame.columns] != list(columns):
        got = [str(c) for c in frame.columns]
        missing = [c for c in columns if c not in got]
        extra = [c for c in got if c not in columns]
        if missing:
            return f"its predictions have no {missing[0]} column (its signature declares one)"
        if extra:
            return f"its predictions have a column its signature does not declare: {extra[0]}"
        return "its predictions' columns are not in the order its signature declares"
    if len(frame) != len(texts):
        return f"it gave {len(frame)} predictions for {len(texts)} texts"
    if spec.uses_labels or spec.multilabel:
        if not classes:
            return "it names no classes (no score_<class> outputs)"
        absent = [SCORE_PREFIX + c for c in sorted(classes) if SCORE_PREFIX + c not in frame.columns]
        if absent:
            return f"its predictions have no {absent[0]} column"
    if spec.uses_labels:
        strange = sorted({str(x) for x in frame[LABEL_COLUMN] if x not in classes})
        if strange:
            return f"it predicted labels that are not its classes: {', '.join(strange[:3])}"
    if spec.multilabel:
        for row, chosen in enumerate(frame[LABELS_COLUMN]):
            if not isinstance(chosen, (list, tuple, np.ndarray)):
                return (f"its label set for text {row} is a {type(chosen).__name__}, "
                        "not a list of labels")
            chosen = list(chosen)
            strange = sorted({str(x) for x in chosen if not isinstance(x, str) or x not in classes})
            if strange:
                return f"it predicted labels that are not its labels: {', '.join(strange[:3])}"
            if len(set(chosen)) != len(chosen):
                return f"its label set for text {row} names a label twice"
    numbers = [c for c in frame.columns if c in (SCORE_COLUMN, PREDICTION_COLUMN)
               or str(c).startswith(SCORE_PREFIX)]
    for column in numbers:
        if not _all_finite(frame[column]):
            what = "predicted values" if column == PREDICTION_COLUMN else "scores"
            return f"its {what} are not all finite numbers"
    if spec.uses_target and target_range is not None:
        low, high = (float(x) for x in target_range)
        slack = 1e-6 * max(abs(high - low), 1.0)  # float32 cosines just past +-1
        values = frame[PREDICTION_COLUMN].astype(float)
        outside = values[(values < low - slack) | (values > high + slack)]
        if len(outside):
            return (f"it predicted {outside.iloc[0]:.6g}, outside its target range "
                    f"[{low:.6g}, {high:.6g}]")
    return None


def _all_finite(values: Any) -> bool:
    try:
        return all(not isinstance(v, (bool, str)) and math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def _classes(model: Any, frame: Any) -> set[str]:
    """The model's classes (or labels): its signature's `score_<name>` outputs, else the
    frame's."""
    outputs = declared_outputs(model)
    if not outputs and isinstance(frame, pd.DataFrame):
        outputs = list(frame.columns)
    return {str(c)[len(SCORE_PREFIX):] for c in outputs if str(c).startswith(SCORE_PREFIX)}


def _task(model: Any, frame: Any) -> str:
    """The task the model's output is for: what its signature declares (else what it answered)."""
    outputs = declared_outputs(model)
    if not outputs and isinstance(frame, pd.DataFrame):
        outputs = list(frame.columns)
    return task_of_columns(outputs)


def check(model_uri: str, tracking_uri: str | None = None) -> str | None:
    """Load `model_uri` here and predict TEXTS: None when it works, else why not (one line)."""
    from tuning.serving import load_model

    model = load_model(model_uri, tracking_uri)
    frame = model.predict(pd.DataFrame({"text": TEXTS}))
    meta = declared_metadata(model)
    task = _task(model, frame)
    if meta.get(TASK_METADATA) and meta[TASK_METADATA] != task:
        return f"it is a {meta[TASK_METADATA]} model whose signature declares {task} outputs"
    return output_problem(frame, TEXTS, _classes(model, frame), task,
                          declared_outputs(model) or None, meta.get(TARGET_RANGE_METADATA))


def check_in_fresh_process(model_uri: str, tracking_uri: str,
                           timeout_s: float = TIMEOUT_S) -> str | None:
    """Run `check` in a new interpreter: None when the model loads and predicts, else why not.

    The store goes by environment, not argv, so a URI's credentials never show in `ps`.
    """
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    try:
        proc = subprocess.run([sys.executable, "-m", "tuning.model_check", model_uri], env=env,
                              cwd=tempfile.gettempdir(),  # `-m` puts cwd first on sys.path
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return f"it did not load and predict within {timeout_s:.0f} s in a fresh process"
    if proc.returncode == 0:
        return None
    lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith(FAILED)]
    why = said[-1][len(FAILED):] if said else (lines[-1] if lines else f"exit code {proc.returncode}")
    return f"it fails to load or predict in a fresh process: {why[:300]}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tuning.model_check MODEL_URI  (store: $MLFLOW_TRACKING_URI)",
              file=sys.stderr)
        return 2
    try:
        problem = check(args[0], os.environ.get("MLFLOW_TRACKING_URI"))
    except Exception as exc:  # noqa: BLE001 - any failure to load or predict is the verdict
        first = str(exc).splitlines()[0] if str(exc) else ""
        problem = f"{type(exc).__name__}: {first}"
    if problem:
        print(FAILED + problem, flush=True)
        return 1
    print(f"model check passed: {args[0]} predicted {len(TEXTS)} texts", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
