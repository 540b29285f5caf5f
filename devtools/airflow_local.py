"""Real Airflow on 127.0.0.1, as separate processes, for the end-to-end tests and the local demo.

Never `airflow standalone`: it binds serve-logs on 0.0.0.0:8793/8794. Here each component runs
in its own process group (api-server, scheduler, dag-processor, triggerer) with AIRFLOW_HOME in a
directory of the caller, and every process group is killed on exit, even on error. The metadata
database is SQLite by default; the end-to-end tests give a PostgreSQL database, as production
does: four processes writing one SQLite file under load meet "database is locked" (HTTP 500).

Also a one-broker context manager (devtools.stack's Apache Kafka) for tests that need only Kafka.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.procs import free_port, stop_proc
from devtools.stack import start_broker
from xdc.errors import AirflowError

__all__ = ["AirflowError", "AirflowProcesses", "airflow_env", "running_airflow", "running_kafka",
           "process_tree_pss_mb"]

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS: dict[str, list[str]] = {
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}
USER, PASSWORD_ROLE = "xdc", "admin"


def airflow_env(home: Path, dags_folder: Path, api_port: int | None = None,
                extra: Mapping[str, str] | None = None, *, parallelism: int = 2,
                database_url: str | None = None) -> dict[str, str]:
    """Environment for Airflow in `home` reading DAGs from `dags_folder`.

    `database_url` (postgresql://...): the metadata database, driven by psycopg 3 for both of
    Airflow's engines (sync and async); default a SQLite file in `home`.
    With `api_port`: also what separate processes need to find the API server on 127.0.0.1.
    `parallelism` is also the number of LocalExecutor workers the scheduler forks at start
    (~130 MB RSS each).
    """
    db = f"sqlite:///{home}/airflow.db"
    if database_url:
        db = database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:{PASSWORD_ROLE}",
        # 2 cores: few task slots, one API worker.
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__API__WORKERS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    if database_url:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] = db  # else Airflow wants asyncpg
    if api_port is not None:
        url = f"http://127.0.0.1:{api_port}"
        env |= {
            "AIRFLOW__API__BASE_URL": url,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
            # Every process must sign and check task tokens with the same secret; unset, each
            # process makes up its own and tasks are refused by the execution API.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            # Pick up the DAG folder and new runs quickly.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        }
    return env | dict(extra or {})


def process_tree_pss_mb(pids: list[int]) -> float:
    """Proportional set size (MiB) of the given processes and all their descendants (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    kb = 0
    for pid in seen:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    kb += int(line.split()[1])
        except OSError:
            continue
    return kb / 1024


@dataclass
class AirflowProcesses:
    """A running local Airflow: its home, API URL and processes, and a small REST client."""

    home: Path
    api_url: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started_s: float = 0.0  # seconds from the first process start to healthy
    _token: str | None = None

    # -- REST -------------------------------------------------------------------------------------
    def password(self) -> str:
        path = self.home / "simple_auth_manager_passwords.json.generated"
        return str(json.loads(path.read_text())[USER])

    def token(self) -> str:
        if self._token is None:
            body = {"username": USER, "password": self.password()}
            self._token = str(self._request("POST", "/auth/token", body, auth=False)["access_token"])
        return self._token

    def _request(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token()}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise AirflowError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc
        return json.loads(raw) if raw else None

    def health(self) -> dict[str, Any]:
        return dict(self._request("GET", "/api/v2/monitor/health", auth=False))

    def dag(self, dag_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/api/v2/dags/{dag_id}"))

    def trigger_dag(self, dag_id: str, conf: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body = {"logical_date": None, "conf": dict(conf or {})}
        return dict(self._request("POST", f"/api/v2/dags/{dag_id}/dagRuns", body))

    def list_runs(self, dag_id: str) -> list[dict[str, Any]]:
        return list(self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=-run_after")["dag_runs"])

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
        return self._request("GET", path + "?deserialize=true&stringify=false")["value"]

    def asset_events(self, asset_name: str | None = None) -> list[dict[str, Any]]:
        query = f"?name_pattern={asset_name}" if asset_name else ""
        return list(self._request("GET", f"/api/v2/assets/events{query}")["asset_events"])

    # -- waiting ----------------------------------------------------------------------------------
    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
        """Poll `probe` until it returns something truthy; AirflowError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                got = probe()
                if got:
                    return got
            except (AirflowError, OSError, ValueError, KeyError) as exc:
                last_exc = exc
            time.sleep(every)
        raise AirflowError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc!r})\n"
                           + self.log_tails())

    def wait_dag(self, dag_id: str, timeout: float = 60) -> dict[str, Any]:
        return dict(self.wait_for(f"DAG {dag_id} parsed", lambda: self.dag(dag_id), timeout))

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 120,
                 states: tuple[str, ...] = ("success", "failed")) -> dict[str, Any]:
        """Wait for a run to reach one of `states` (default: finished); return the run."""
        def probe() -> dict[str, Any] | None:
            run = dict(self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"))
            return run if run["state"] in states else None
        return dict(self.wait_for(f"run {dag_id}/{run_id} in {states}", probe, timeout))

    def wait_new_run(self, dag_id: str, known: set[str] | None = None, timeout: float = 120) -> dict[str, Any]:
        """Wait for a run of `dag_id` whose run_id is not in `known` (e.g. an asset-triggered run)."""
        known = known or set()
        def probe() -> dict[str, Any] | None:
            return next((r for r in self.list_runs(dag_id) if r["dag_run_id"] not in known), None)
        return dict(self.wait_for(f"a new run of {dag_id}", probe, timeout))

    # -- processes --------------------------------------------------------------------------------
    def start(self, name: str, args: list[str]) -> None:
        log = open(self.home / f"{name}.log", "ab")
        try:
            self.procs[name] = subprocess.Popen(
                [str(Path(sys.executable).parent / "airflow"), *args], env=self.env, cwd=self.home,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()  # the child holds its own descriptor

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise AirflowError(f"airflow component(s) exited: {dead}\n" + self.log_tails())

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for name in self.procs:
            path = self.home / f"{name}.log"
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            out.append(f"--- {name}.log (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(out)

    def pss_mb(self) -> float:
        return process_tree_pss_mb([p.pid for p in self.procs.values() if p.poll() is None])

    def stop(self, grace: float = 5) -> None:
        """SIGTERM every process group, then SIGKILL what is left after `grace` seconds.

        Measured exits after SIGTERM: dag-processor 1 s, scheduler 2.3 s, api-server 4.7 s,
        triggerer 8.1 s; so the triggerer usually gets the SIGKILL.
        """
        for p in self.procs.values():
            _killpg(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _killpg(p, signal.SIGKILL)  # also reaps children left in the group
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _killpg(p: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def running_airflow(home: Path, dags_folder: Path, *, extra_env: Mapping[str, str] | None = None,
                    timeout: float = 120, parallelism: int = 2,
                    database_url: str | None = None) -> Iterator[AirflowProcesses]:
    """Migrate the metadata DB, start the four components, wait until healthy, stop on exit.

    `extra_env` reaches every component (connections as AIRFLOW_CONN_*, XDC_CONFIG, ...);
    `database_url`: an empty PostgreSQL database for the metadata (default SQLite in `home`).
    """
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env |= airflow_env(home, dags_folder, port, extra_env, parallelism=parallelism, database_url=database_url)
    af = AirflowProcesses(home=home, api_url=f"http://127.0.0.1:{port}", env=env)
    t0 = time.monotonic()
    try:
        migrate = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env,
                                 cwd=home, capture_output=True, timeout=timeout)
        if migrate.returncode != 0:
            raise AirflowError(f"airflow db migrate failed: {migrate.stdout[-2000:]!r} {migrate.stderr[-2000:]!r}")
        af.start("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(port)])
        for name, args in COMPONENTS.items():
            af.start(name, args)

        def healthy() -> bool:
            h = af.health()
            parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
            return all((h.get(p) or {}).get("status") == "healthy" for p in parts)
        af.wait_for("airflow healthy", healthy, timeout)
        af.wait_for("simple auth passwords file", lambda: af.password(), timeout)
        af.started_s = time.monotonic() - t0
        yield af
    finally:
        af.stop()


# -- Kafka ----------------------------------------------------------------------------------------
@contextmanager
def running_kafka(run_dir: Path, name: str = "airflow", *, secure: Any = None,
                  users: dict[str, str] | None = None) -> Iterator[str]:
    """One Apache Kafka broker (devtools.stack's), stopped on exit; yields "127.0.0.1:port".

    For tests that need Kafka without the whole two-datacenter stack. Data: run_dir/<name>/kafka,
    log: run_dir/logs/. `secure` (devtools.kafka_broker.SecureListener) and `users` (SASL user ->
    password): a TLS (+ SASL) listener instead of PLAINTEXT.
    """
    proc = start_broker(run_dir, name, secure=secure, users=users)
    try:
        yield f"127.0.0.1:{proc.port}"
    finally:
        stop_proc(proc, timeout=5)


def task_instances(af: AirflowProcesses, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """The task instances of a run (every map index), oldest start first, over REST."""
    got = af._request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
    return sorted(got, key=lambda t: (t["start_date"] or "", t["task_id"], t["map_index"]))
