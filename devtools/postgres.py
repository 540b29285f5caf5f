"""A PostgreSQL server for the local stack and the tests (Debian's postgresql-15 binaries).

initdb refuses to run as root: as root the cluster belongs to the `postgres` user (the Debian
package creates it), and since the run directory may sit under a root-only directory (pytest's
/tmp/pytest-of-root is 0700) the data directory is made under /tmp and linked from the run
directory. The server listens on 127.0.0.1 and a free port, with its socket in the data directory;
`stop` runs `pg_ctl stop -m fast` and removes a data directory it made under /tmp.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from devtools.procs import Proc, StackError, free_port, start_ticks
from xdc.io.state import postgres as state_pg

DB_USER = "xdc"


def pg_bin(name: str) -> str:
    """The newest PostgreSQL server binary `name` (initdb, pg_ctl) on this machine."""
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True):
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        raise StackError(f"PostgreSQL's {name} not found: install Debian's postgresql-15 (scripts/setup.sh does)")
    return found


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _data_dir(run_dir: Path) -> Path:
    link = run_dir / "postgres"
    if link.is_symlink():
        return link.resolve()
    if os.geteuid() != 0:
        link.mkdir(parents=True, exist_ok=True)
        return link
    data = Path(tempfile.mkdtemp(prefix="xdc-pg-"))
    pw = pwd.getpwnam("postgres")
    os.chown(data, pw.pw_uid, pw.pw_gid)
    link.symlink_to(data)
    return data


def start_postgres(run_dir: Path, *, port: int | None = None, timeout_s: float = 60) -> Proc:
    """initdb (once) and start the server; returns its Proc (stop_cmd set)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    data = _data_dir(run_dir)
    db = data / "db"
    if not (db / "PG_VERSION").exists():
        subprocess.run(_as_owner([pg_bin("initdb"), "-D", str(db), "-A", "trust", "-U", DB_USER, "--no-sync",
                                  "-E", "UTF8", "--locale=C"]), check=True, capture_output=True, timeout=timeout_s)
    port = port or free_port()
    log = db / "server.log"
    ctl = pg_bin("pg_ctl")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {db} -c max_connections=200"
    cp = subprocess.run(_as_owner([ctl, "-D", str(db), "-o", opts, "-l", str(log), "-w", "-t", str(int(timeout_s)),
                                   "start"]), capture_output=True, text=True, timeout=timeout_s + 10)
    if cp.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else cp.stderr
        raise StackError(f"postgres did not start (exit {cp.returncode}): {tail}")
    pid = int((db / "postmaster.pid").read_text().split()[0])
    stop = _as_owner([ctl, "-D", str(db), "-m", "fast", "-w", "stop"])
    return Proc("postgres", pid, start_ticks(pid), [ctl, "start", opts], str(log), port, stop_cmd=stop,
                owned_dir=str(data) if (run_dir / "postgres").is_symlink() else None)


def url(port: int, database: str, *, schema: str | None = None) -> str:
    u = f"postgresql://{DB_USER}@127.0.0.1:{port}/{database}"
    return u + (f"?options=-csearch_path%3D{schema}" if schema else "")


def create_database(port: int, name: str) -> None:
    state_pg.create_database(url(port, "postgres"), name)


def create_schema(port: int, database: str, schema: str) -> None:
    state_pg.create_schema(url(port, database), schema)
