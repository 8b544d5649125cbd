"""Each study's Optuna trials in an Optuna RDB storage, so Optuna's own tools can open it.

Why: inside Ray the Optuna study lived in the driver's memory (pickled into Ray's state), so
optuna-dashboard, `optuna.load_study` and Optuna's plots could not see it, and an extended
study had no sampler history to continue from. Ray's OptunaSearch takes `storage` and
`study_name` and calls `create_study(..., load_if_exists=True)`, so a resumed or extended study
asks its sampler with every earlier trial in view.

Default place: beside the MLflow store (`sqlite:///<dir>/optuna.db` next to `mlflow.db`, or
next to a file store's folder); with an MLflow server, `optuna.db` in the working directory.
On a Ray cluster the searcher runs in the driver (or, with `ray://`, on the head node), so
give a database URL that process reaches, e.g. the PostgreSQL database beside MLflow's.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hpn.errors import HPNInputError

STORAGE_FILE = "optuna.db"
#: Optuna trial user attribute naming the Ray trial that ran it (one Optuna trial per config;
#: with --repeats its repeats share it).
RAY_TRIAL_ATTR = "ray_trial_id"
ORPHAN_ATTR = "hpn_orphaned"
ORPHAN_REASON = ("asked by the sampler just before the study's driver was stopped; Ray never "
                 "ran it, so it is marked failed and samplers ignore it")


def default_storage(tracking_uri: str) -> str:
    """The Optuna storage URL beside the study's MLflow store (see the module docstring)."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).resolve().parent / STORAGE_FILE}"
    if tracking_uri.startswith("file:"):
        tracking_uri = tracking_uri[len("file://"):] if tracking_uri.startswith("file://") else tracking_uri[5:]
    if "://" not in tracking_uri:  # a file store folder
        return f"sqlite:///{Path(tracking_uri).resolve().parent / STORAGE_FILE}"
    return f"sqlite:///{Path.cwd() / STORAGE_FILE}"


def resolve_storage(url: str | None, tracking_uri: str) -> str:
    """--optuna-storage as given (a relative SQLite path made absolute), else the default."""
    if not url:
        return default_storage(tracking_uri)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return f"sqlite:///{Path(url[len('sqlite:///'):]).resolve()}"
    if "://" not in url:
        raise HPNInputError(f"--optuna-storage: {url!r} is not a database URL; give e.g. "
                            "sqlite:///optuna.db or postgresql://user@host/optuna")
    return url


def redact(url: str) -> str:
    """The text with any URL password shown as ***, for tags and printed lines (SQLAlchemy's
    own parsing of the netloc, plus `password=` query arguments); other text as it is."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url

    text = url
    try:
        parsed = make_url(url)
        if parsed.password is not None:
            text = parsed.render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (not a URL SQLAlchemy reads: fall back to the pattern)
        text = re.sub(r"://([^/@]*):[^/]*@", r"://\1:***@", url)
    return re.sub(r"(?i)([?&](?:password|passwd|pwd|token|secret|access_token)=)[^&]*", r"\1***", text)


def without_password(url: str) -> str:
    """The URL with no password at all (not even ***): what a pickled storage keeps, so a
    process that unpickles it and was not given the password falls back to the database
    driver's own sources (PGPASSWORD, ~/.pgpass) instead of trying the word `***`."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 (not a URL SQLAlchemy reads: nothing to take out)
        return url
    if parsed.password is None:
        return url
    return parsed._replace(password=None).render_as_string(hide_password=False)


#: full URL per password-less URL, for the storages this process opened (`SecretSafeStorage`)
_FULL_URLS: dict[str, str] = {}


def _storage_class() -> type:
    """Made on first use, so importing this module does not import Optuna."""
    import optuna

    if "SecretSafeStorage" in globals():
        return globals()["SecretSafeStorage"]

    class SecretSafeStorage(optuna.storages.RDBStorage):
        """Optuna's RDBStorage, pickled without its password. Ray pickles the study's searcher,
        storage included, into its saved state under --storage-path (`tuner.pkl`, the
        searcher checkpoint); there the password would lie in a file anyone who can read the
        results could open. Unpickled in this process (a resumed study was given the URL
        again), the storage gets its password back from `_FULL_URLS`."""

        def __getstate__(self) -> dict[Any, Any]:
            state = super().__getstate__()
            state["url"] = without_password(self.url)
            return state

        def __setstate__(self, state: dict[Any, Any]) -> None:
            state["url"] = _FULL_URLS.get(state["url"], state["url"])
            super().__setstate__(state)

    SecretSafeStorage.__module__ = __name__
    SecretSafeStorage.__qualname__ = "SecretSafeStorage"
    globals()["SecretSafeStorage"] = SecretSafeStorage
    return SecretSafeStorage


def __getattr__(name: str) -> Any:  # pickle finds the class by name here
    if name == "SecretSafeStorage":
        return _storage_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def remember(url: str) -> None:
    """Let a storage pickled without its password (`SecretSafeStorage`) get it back when this
    process unpickles it: called before Ray restores a study's searcher from its saved state."""
    _FULL_URLS[without_password(url)] = url


def open_storage(url: str) -> Any:
    """An RDBStorage on `url`; one line naming --optuna-storage when it cannot be opened."""
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise HPNInputError(f"--optuna-storage: folder {str(folder)!r} does not exist")
    remember(url)
    try:
        return _storage_class()(url, engine_kwargs={"pool_pre_ping": True})
    except Exception:  # noqa: BLE001 (tried once more, below)
        # Two studies started together on a new database both create its tables; the
        # slower one fails ("table studies already exists") and finds them a moment later.
        import time

        time.sleep(1.0)
    try:
        return _storage_class()(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as exc:  # sqlalchemy and driver errors vary by database
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise HPNInputError(f"--optuna-storage: cannot open {redact(url)} ({first})") from exc


def study_exists(storage: Any, name: str) -> bool:
    import optuna

    return name in optuna.get_all_study_names(storage)


def load_study(storage: Any, name: str) -> Any:
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def claim_study(storage: Any, name: str, directions: list[str]) -> bool:
    """Create the study's Optuna study before anything else of the study exists; False when
    the name is taken. Why: Optuna's study names are unique in its database, so creating one
    is an atomic claim on the name, where checking MLflow and creating the parent run seconds
    later let two `hpn-tune run --name X` started together both pass. Ray's OptunaSearch later
    opens this same study (`create_study(load_if_exists=True)`) and keeps the directions
    stored here, so give the ones the study's searcher optimises."""
    import optuna

    try:
        optuna.create_study(storage=storage, study_name=name, directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        return False
    return True


def release_study(storage: Any, name: str) -> None:
    """Give a claimed name back when the study stopped before its parent run existed: delete
    its Optuna study, but only while it has no trial, so no study's history can be lost."""
    if study_exists(storage, name):
        study_id = storage.get_study_id_from_name(name)
        if not storage.get_all_trials(study_id, deepcopy=False):
            storage.delete_study(study_id)


def ended_trials(storage: Any, name: str) -> int:
    """The study's trials that ran to an end (complete, pruned, failed; not the orphans a kill
    left). Ray saves a study's state in its first step, long before a trial can end, so a
    study with any has saved state somewhere, even where --storage-path does not find it."""
    if not study_exists(storage, name):
        return 0
    trials = storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False)
    return sum(t.state.is_finished() and ORPHAN_ATTR not in t.user_attrs for t in trials)


def mark_orphans(storage: Any, name: str, known_ray_trials: set[str]) -> int:
    """Fail the Optuna trials that no Ray trial owns: asked just before a kill, after Ray
    last saved its state. Left RUNNING they would sit in the dashboard forever and count as
    pending for the sampler; Ray's restored searcher never tells them. Returns how many."""
    from optuna.trial import TrialState

    if not study_exists(storage, name):
        return 0
    study_id = storage.get_study_id_from_name(name)
    marked = 0
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(RAY_TRIAL_ATTR) in known_ray_trials:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, ORPHAN_ATTR, ORPHAN_REASON)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        marked += 1
    return marked
