"""Whether a logged model would serve: load it in a fresh process and predict a few texts.

`python -m tuning.model_check MODEL_URI` (the store from MLFLOW_TRACKING_URI) prints one line
and exits 0 when the model loads and answers sanely, 1 with the reason otherwise. The registry
runs it in a new process so that nothing the registering process has imported or cached (a
class a pickle names, the encoder, a module on its path) can make a broken model look loadable.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from typing import Any

import pandas as pd

from tuning.pyfunc import INPUT_EXAMPLE

#: Enough to exercise the encoder and every column of the output; short so the check is quick.
TEXTS = [*INPUT_EXAMPLE, "A retired carpenter who restores old furniture and teaches woodworking."]
TIMEOUT_S = 300.0  # importing torch and loading the encoder takes ~10 s on two cores
FAILED = "model check failed: "  # how the fresh process starts its one-line verdict


def output_problem(frame: Any, texts: list[str], classes: set[str]) -> str | None:
    """Why `frame` is not a usable answer to `texts` (one label per text, each one of the
    model's `classes`, finite scores); None when it is."""
    if not isinstance(frame, pd.DataFrame):
        return f"predict returned a {type(frame).__name__}, not a DataFrame"
    missing = [c for c in ("label", "score") if c not in frame.columns]
    if missing:
        return f"its predictions have no {' or '.join(missing)} column"
    if len(frame) != len(texts):
        return f"it gave {len(frame)} predictions for {len(texts)} texts"
    if not classes:
        return "it names no classes (no score_<class> outputs)"
    strange = sorted({str(x) for x in frame["label"] if x not in classes})
    if strange:
        return f"it predicted labels that are not its classes: {', '.join(strange[:3])}"
    scores = frame[["score", *(c for c in frame.columns if str(c).startswith("score_"))]]
    try:
        finite = all(math.isfinite(float(v)) for v in scores.to_numpy().ravel())
    except (TypeError, ValueError):
        finite = False
    return None if finite else "its scores are not all finite numbers"


def _classes(model: Any, frame: Any) -> set[str]:
    """The model's classes: its signature's `score_<class>` outputs, else the frame's."""
    signature = getattr(getattr(model, "metadata", None), "signature", None)
    outputs = signature.outputs.input_names() if signature is not None and signature.outputs else []
    if not outputs and isinstance(frame, pd.DataFrame):
        outputs = list(frame.columns)
    return {str(c)[len("score_"):] for c in outputs if str(c).startswith("score_")}


def check(model_uri: str, tracking_uri: str | None = None) -> str | None:
    """Load `model_uri` here and predict TEXTS: None when it works, else why not (one line)."""
    from tuning.serving import load_model

    model = load_model(model_uri, tracking_uri)
    frame = model.predict(pd.DataFrame({"text": TEXTS}))
    return output_problem(frame, TEXTS, _classes(model, frame))


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
