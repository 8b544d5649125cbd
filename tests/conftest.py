"""Shared fixtures: one embedding cache per test session, offline Hugging Face."""
from __future__ import annotations

import contextlib
import os

import pytest

# Nothing may reach a model hub during tests: the default encoder ships in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hpn.config import Config, load_config  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Shared so each small corpus is encoded once per session, as a study would."""
    return str(tmp_path_factory.mktemp("hpn_cache"))


@pytest.fixture
def small_config(cache_dir: str) -> Config:
    return load_config(None, [
        "data.size=600", "train.epochs=6", f"encoder.cache_dir={cache_dir}",
        "model.prototype_dim=32", "train.batch_size=64",
    ])


@contextlib.contextmanager
def restored_mlflow_uris():
    """Put MLflow's global tracking and registry URIs back as they were on entry.

    Loading a model in-process (`tuning.serving.load_model`, `mlflow.pyfunc.load_model`) goes
    through `mlflow.set_tracking_uri` / `set_registry_uri`, which set process-wide globals and
    mirror them into MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI in os.environ. Left behind, they
    point later tests' clients and subprocesses at a store that is gone: reset both the globals
    and the env vars (removed again where they were unset). A context manager so fixtures of
    any scope can use it; `restore_mlflow_uris` is the per-test fixture."""
    import mlflow

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def restore_mlflow_uris():
    """For a test that loads a model in-process: MLflow's global URIs (and their env vars)
    are put back after it (see `restored_mlflow_uris`)."""
    with restored_mlflow_uris():
        yield


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_in_thread(app):
    """An ASGI app (`tuning.serving.scoring_app`) served by uvicorn in a daemon thread on a
    free port, as `hpn-tune serve` serves it: yields the port once uvicorn is accepting, and
    stops it after. For the request contract; `hpn-tune serve` itself runs in a subprocess."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started:
            assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
            time.sleep(0.1)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="session")
def ray_runtime():
    """One Ray runtime per test session. It declares one GPU (Ray allows that on a CPU
    machine) so studies request fractional GPUs as on a real card; trials fall back to CPU."""
    import ray

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def start_mlflow_server(root, port: int):
    """A real MLflow tracking server and registry on 127.0.0.1:`port`, its store and
    artifacts under `root` (started again on the same root, it serves what it had), once it
    answers. Its own process group, so a test can kill it outright."""
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop_process_group(proc)
                raise RuntimeError((root / "server.log").read_text()[-2000:]) from None
            time.sleep(0.5)


def stop_process_group(proc, sig: int | None = None) -> None:
    """Stop a server started in its own process group, workers included (SIGTERM, SIGKILL
    after 20 s; `sig=SIGKILL` for a crash), and whatever of the group outlived its parent."""
    import contextlib
    import os
    import signal
    import subprocess

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig or signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow tracking server and registry on 127.0.0.1, stopped at the end."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    proc = start_mlflow_server(root, port)
    yield f"http://127.0.0.1:{port}"
    stop_process_group(proc)
