"""What a study could not tell the MLflow server while it was unreachable, kept on disk.

Why: a trial that trained for minutes must not lose its model and final metrics because the
tracking server was restarting (MLflow retries each call for about a minute:
`tracking.HTTP_RETRY_DEFAULTS`), and a run must not stay RUNNING because the call that
closes it failed. The trial (or the driver, for runs it closes) writes an entry here instead;
the study delivers the entries when it finishes, or when `hpn-tune run --resume` continues
it after a failure, and deletes each one that the server took.

One folder per study beside its Ray experiments (`<storage>/<study>.outbox`): local trials
and the driver share it; on a multi-node cluster it lies on the shared --storage-path. Each
entry is `<trial_id>.<who>.json` (who: `trial`, whose word wins, or `driver`, applied only to
a run still open) and, for a completed trial, its weights in `<trial_id>.hpn/` (safetensors
and JSON, as `HPNClassifier.save` writes them; no pickle). Writes go to a temporary name and
are renamed, so a reader never sees half an entry.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.entities import Metric

    from hpn.model import HPNClassifier

SUFFIX = ".outbox"
TRIAL_ID = re.compile(r"[A-Za-z0-9_]{1,64}")  # Ray's trial ids: hex, maybe with `_00001`


def _skip(path: Path, why: str) -> None:
    """An entry left where it is, said once per delivery: it may belong to a study of the
    same name in another MLflow store; delete it by hand if not."""
    warnings.warn(f"outbox entry {path} left undelivered: {why}", stacklevel=3)


def outbox_dir(storage_path: str, study: str) -> str | None:
    """The study's outbox folder; None when Ray's storage is a URI (s3://...), where no
    plain folder is shared: a trial then ends as an error when the server is unreachable."""
    if "://" in storage_path:
        return None
    return str(Path(storage_path) / f"{study}{SUFFIX}")


class Outbox:
    def __init__(self, folder: str | None) -> None:
        self.folder = Path(folder) if folder else None

    def __bool__(self) -> bool:
        return self.folder is not None

    def keep(self, trial_id: str, who: str, state: str, reason: str | None = None,
             run_id: str | None = None, metrics: list[Metric] | None = None,
             model: HPNClassifier | None = None) -> Path:
        """Write one entry: the run's end (`state`, `reason`), the metric points the server
        has not got, and a completed trial's model."""
        if self.folder is None:
            raise RuntimeError("no outbox for a study whose --storage-path is a URI")
        self.folder.mkdir(parents=True, exist_ok=True)
        if model is not None:
            weights = self.folder / f"{trial_id}.hpn"
            tmp = Path(tempfile.mkdtemp(dir=self.folder, prefix=".tmp-"))
            model.save(tmp)
            shutil.rmtree(weights, ignore_errors=True)
            os.replace(tmp, weights)
        entry = {"trial_id": trial_id, "run_id": run_id, "state": state, "reason": reason,
                 "model": model is not None, "written_at": time.time(),
                 "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics or []]}
        path = self.folder / f"{trial_id}.{who}.json"
        fd, tmp_name = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp_name, path)
        return path

    def entries(self) -> list[Path]:
        if self.folder is None or not self.folder.is_dir():
            return []
        # The trial's own entries first: a driver entry only closes a run still open.
        return sorted(self.folder.glob("*.trial.json")) + sorted(self.folder.glob("*.driver.json"))

    def deliver(self, client: Any, experiment_id: str, parent_run_id: str) -> int:
        """Send every entry to the server (it must answer: the caller checked); returns how
        many runs it closed. An entry is deleted once delivered, so a failure part-way
        leaves the rest for the next try."""
        from mlflow.entities import Metric

        from hpn.model import HPNClassifier
        from tuning.pyfunc import log_pyfunc
        from tuning.tracking import STATE_TAG, close_trial_run, find_trial_run

        closed = 0
        for path in self.entries():
            entry = json.loads(path.read_text())
            if not TRIAL_ID.fullmatch(str(entry.get("trial_id"))):
                _skip(path, "its trial id is not one Ray makes")
                continue
            run = find_trial_run(client, experiment_id, parent_run_id, entry["trial_id"])
            if run is None and entry["run_id"]:  # not this study's run: another store's?
                _skip(path, f"run {entry['run_id']} is not a trial run of this study here")
                continue
            if run is not None and (path.name.endswith(".trial.json")
                                    or not run.data.tags.get(STATE_TAG)):
                points = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in entry["metrics"]]
                for start in range(0, len(points), 1000):
                    client.log_batch(run.info.run_id, metrics=points[start:start + 1000])
                weights = self.folder / f"{entry['trial_id']}.hpn"  # type: ignore[operator]
                if entry["model"]:
                    log_pyfunc(client, run.info.run_id, HPNClassifier.load(weights))
                close_trial_run(client, run.info.run_id, entry["state"], entry["reason"])
                closed += 1
                shutil.rmtree(weights, ignore_errors=True)
            path.unlink()
        if self.folder is not None and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()
        return closed
