"""Beyond one machine: a study on a two-node Ray cluster, logged to MLflow on PostgreSQL.

Everything is real and on loopback: a PostgreSQL server, MLflow's server on it (started by
docker/mlflow-server.sh, the compose file's entry point), and a Ray cluster of two `ray
start` nodes, the head on 127.0.0.2 and a worker on 127.0.0.3, with their own temp dir and
their own token (Ray 2.60 token auth). Studies run as separate `hpn-tune run` drivers;
nothing here touches the pytest process's own Ray runtime.
"""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tuning.tracking import NODE_IP_TAG, NODE_TAG, RAY_NODE_ID_TAG, trial_runs

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # ray, mlflow and hpn-tune of this environment
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"  # Ray maps 127.0.0.1 to the LAN address
STUDY = ["--space", "quick", "--trials", "4", "--max-concurrent", "4",
         "--set", "data.size=300", "--set", "train.epochs=3"]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="loopback aliases need Linux")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, ready, timeout: float, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} did not come up in {timeout:.0f} s\n{tail}")
        time.sleep(0.5)


def _stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process (each was started as a group leader), then SIGKILL its group."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # the leader is gone; its children may not be
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- PostgreSQL --------------------------------------------------------------------------

def _postgres_bin() -> Path | None:
    """Debian's layout (/usr/lib/postgresql/<major>/bin) first, then PATH."""
    dirs = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if (d / "initdb").is_file()]
    if dirs:
        return max(dirs, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and (Path(found).parent / "initdb").is_file() else None


@dataclass
class Postgres:
    port: int
    user: str
    password: str
    db: str

    def query(self, sql: str, *args: object) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user,
                              password=self.password, dbname=self.db) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 with password (scram) authentication.
    PostgreSQL refuses to run as root: then it runs as the `postgres` user of Debian's package."""
    import psycopg2

    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (.ci/run installs Debian's postgresql)")
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="hpn-pg-"))  # not under pytest's root-only temp dir
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` user to run PostgreSQL as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    pg = Postgres(port=_free_port(), user="mlflow", password=secrets.token_hex(12), db="mlflow")
    pwfile = root / "pwfile"
    pwfile.write_text(pg.password + "\n")
    if prefix:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], cwd=root, check=True, capture_output=True, text=True)

    run(str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", pg.user, "-E", "UTF8",
        "--auth=scram-sha-256", f"--pwfile={pwfile}")
    run(str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"), "-w",
        "-t", "60", "-o", f"-p {pg.port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user,
                                password=pg.password, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {pg.db}")
        conn.close()
        yield pg
    finally:
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast",
                        "-w", "stop"], cwd=root, check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory):
    """MLflow's tracking server and registry on the PostgreSQL above, started exactly as the
    compose file starts it (docker/mlflow-server.sh), artifacts proxied to a folder."""
    root = tmp_path_factory.mktemp("mlflow_pg")
    port = _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(postgres.port),
           "POSTGRES_USER": postgres.user, "POSTGRES_DB": postgres.db,
           "POSTGRES_PASSWORD": postgres.password, "MLFLOW_HOST": "127.0.0.1",
           "MLFLOW_PORT": str(port), "MLFLOW_ARTIFACTS_DESTINATION": str(root / "artifacts")}
    log = root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["sh", str(REPO / "docker" / "mlflow-server.sh"), "--workers", "1"],
                                env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited\n{log.read_text()[-3000:]}")
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        _wait("mlflow server", healthy, 180, log)
        yield url, root / "artifacts"
    finally:
        _stop_group(proc, timeout=5)  # what it holds is in PostgreSQL; no need to linger


# -- Ray cluster ---------------------------------------------------------------------------

@dataclass
class RayCluster:
    address: str  # GCS, host:port
    client_address: str  # ray://host:port
    env: dict[str, str]  # what a process needs to join: the token


def _ray_env(token_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    return env


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    out = subprocess.run([str(BIN / "ray"), "status", "--address", address], env=env,
                         check=False, capture_output=True, text=True, timeout=60).stdout
    active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
    return sum(1 for line in active.splitlines() if "node_" in line)


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and a worker node, each its own `ray start --block` process group. One CPU
    each: Tune places trials one at a time and reuses actors, so with room for two trials on
    the head, short trials could all run there; with one, the second runs on the worker."""
    root = Path(tempfile.mkdtemp(prefix="hpnray-"))  # short: Ray's socket paths must fit
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = _ray_env(token)
    port, client_port = _free_port(), _free_port()
    common = ["--block", "--num-cpus", "1", "--object-store-memory", str(200 * 2**20),
              "--temp-dir", str(root / "tmp"), "--disable-usage-stats",
              "--min-worker-port", "0", "--max-worker-port", "0",
              "--dashboard-agent-listen-port", "0"]
    nodes = [
        ("head", [str(BIN / "ray"), "start", "--head", "--port", str(port),
                  "--ray-client-server-port", str(client_port), "--node-ip-address", HEAD_IP,
                  "--include-dashboard", "false", *common]),
        ("worker", [str(BIN / "ray"), "start", "--address", f"{HEAD_IP}:{port}",
                    "--node-ip-address", WORKER_IP, *common]),
    ]
    procs: list[subprocess.Popen] = []
    try:
        for name, cmd in nodes:
            log = root / f"{name}.log"
            with open(log, "w") as out:
                procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))

            def started(proc=procs[-1], log=log) -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"ray start exited\n{log.read_text()[-3000:]}")
                return "Ray runtime started" in log.read_text()

            _wait(f"ray {name} node", started, 180, log)
        address = f"{HEAD_IP}:{port}"
        _wait("two alive Ray nodes", lambda: _alive_nodes(address, env) == 2, 120)
        yield RayCluster(address, f"ray://{HEAD_IP}:{client_port}", env)
    finally:
        for proc in reversed(procs):
            _stop_group(proc)
        shutil.rmtree(root, ignore_errors=True)


def hpn_tune(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "tuning.cli", "run", *args], env=env, cwd=cwd,
                          check=False, capture_output=True, text=True, timeout=timeout)


# -- Tests -----------------------------------------------------------------------------------

def test_a_study_on_two_nodes_logs_every_trial_and_the_model_to_postgresql(
        ray_cluster, mlflow_on_postgres, postgres, tmp_path):
    url, artifacts = mlflow_on_postgres
    proc = hpn_tune(["--address", ray_cluster.address, "--tracking-uri", url,
                     "--storage-path", str(tmp_path / "ray_results"), "--name", "two-nodes",
                     "--experiment", "cluster", "--set", f"encoder.cache_dir={tmp_path / 'cache'}",
                     *STUDY, "--json"], ray_cluster.env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["trials_completed"] == 4 and summary["trials_errored"] == 0

    # Every trial's run says where it ran: one host name, but two Ray nodes and node IPs.
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("cluster")
    runs = trial_runs(client, exp.experiment_id, summary["parent_run_id"])
    assert len(runs) == 4
    assert {r.data.tags[NODE_TAG] for r in runs} == {socket.gethostname()}
    assert len({r.data.tags[RAY_NODE_ID_TAG] for r in runs}) == 2
    assert {r.data.tags[NODE_IP_TAG] for r in runs} == {HEAD_IP, WORKER_IP}

    # The records are in PostgreSQL itself, and the models went through the server's
    # artifact proxy from both nodes into its artifact store.
    assert postgres.query(
        "SELECT count(*) FROM runs JOIN experiments USING (experiment_id) WHERE experiments.name = %s",
        "cluster") == [(5,)]  # the study's parent run and its four trials
    assert len(postgres.query(
        "SELECT DISTINCT value FROM tags WHERE key = %s", RAY_NODE_ID_TAG)) == 2
    assert postgres.query("SELECT count(*) FROM model_versions WHERE name = %s AND run_id = %s",
                          "hpn-persona", summary["best_run_id"]) == [(1,)]
    assert len(list(artifacts.rglob("MLmodel"))) >= 4


def _refusals(cases: dict[str, tuple[list[str], dict[str, str]]], cwd: Path) -> None:
    """Run `hpn-tune run` for each case side by side; each must be refused with exit code 2
    and one line on stderr naming the flag of its key."""
    procs = {flag: subprocess.Popen([sys.executable, "-m", "tuning.cli", "run", *args, *STUDY],
                                    env=env, cwd=cwd, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for flag, (args, env) in cases.items()}
    for flag, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (flag, err[-3000:])
        assert "Traceback" not in err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"hpn-tune run: error: {flag}:"), (flag, err[-3000:])
        if flag == "--address":  # Ray logs each refused retry before giving up
            assert "refused this process's token" in line
        else:
            assert err.strip() == line


def test_joining_a_multi_node_cluster_refuses_what_other_nodes_cannot_reach(
        ray_cluster, mlflow_on_postgres, tmp_path):
    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # By the head's GCS address. (Through Ray Client, ray://, the same check applies, but the
    # client server Ray starts per client failed to start in time on a loaded CI machine.)
    _refusals({"--storage-path": (["--address", ray_cluster.address,
                                   "--tracking-uri", mlflow_on_postgres[0]], ray_cluster.env)},
              tmp_path)
    wrong_token = {**{k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_TOKEN_PATH"},
                   "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    _refusals({
        "--tracking-uri": (["--address", ray_cluster.address, "--tracking-uri", sqlite],
                           ray_cluster.env),
        # token auth is on: a driver without the cluster's token is turned away
        "--address": (["--address", ray_cluster.address, "--tracking-uri", sqlite,
                       "--storage-path", str(tmp_path)], wrong_token),
    }, tmp_path)
    assert not (tmp_path / "mlflow.db").exists()  # refused before a local store was made


def test_the_compose_healthcheck_of_the_ray_head_passes_on_a_live_head(ray_cluster):
    import yaml

    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    check = compose["services"]["ray-head"]["healthcheck"]["test"]
    assert check[0] == "CMD"
    cmd = [a.replace("127.0.0.1:6379", ray_cluster.address) for a in check[1:]]
    proc = subprocess.run(cmd, env=ray_cluster.env, check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
