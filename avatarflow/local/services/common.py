"""What the local services' launchers share: the home directory and its private files, free
loopback ports, detached processes (start, find, stop, signal), and waiting for an answer."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from avatarflow.errors import AvatarflowError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SECRETS_FILE = "secrets.json"
STATE_DIRS = ("", "s3", "s3/data", "logs", "logs/weed", "api")


class ServiceError(AvatarflowError, RuntimeError):
    """A local service could not be started, reached or stopped."""


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


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600 from the first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_private_json(path: Path, obj: Any) -> None:
    write_private(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} if there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ServiceError(f"{path} is not valid JSON: {exc}") from exc


@contextlib.contextmanager
def locked(home: Path) -> Iterator[None]:
    """Serialise starts and stops of one home across processes (services.lock)."""
    with open(home / "services.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stored_secret(home: Path, name: str, factory: Callable[[], str]) -> str:
    """A generated secret persisted in ``secrets.json`` so that a restart keeps it."""
    path = home / SECRETS_FILE
    data = read_json(path)
    if not data.get(name):
        data[name] = factory()
        write_private_json(path, data)
    return data[name]


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------------------------
# ports


def port_free(port: int) -> bool:
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


# --------------------------------------------------------------------------------------------
# processes

# Popen objects of children this process started, so that their exit can be reaped.
_CHILDREN: dict[int, subprocess.Popen] = {}


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None and proc.poll() is not None:
        _CHILDREN.pop(pid, None)


def forget(proc: subprocess.Popen) -> None:
    """Drop a child that exited from the children to reap."""
    _CHILDREN.pop(proc.pid, None)


def live_process(pid: int | None, marker: str) -> psutil.Process | None:
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


def pdeathsig_preexec():
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


def spawn(cmd: list[str], log_path: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None,
          die_with_parent: bool = False) -> subprocess.Popen:
    """Start ``cmd`` detached (own session and process group), its output appended to ``log_path``."""
    preexec = pdeathsig_preexec() if die_with_parent else None
    with open(log_path, "ab") as log_f:
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
    _CHILDREN[proc.pid] = proc
    return proc


def stop_group(pid: int, marker: str, *, timeout: float = 15.0) -> bool:
    """SIGTERM the process group of ``pid`` (its own session), wait, then SIGKILL."""
    proc = live_process(pid, marker)
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
        if live_process(pid, marker) is None:
            break
        time.sleep(0.1)
    else:
        log.warning("process %s did not stop on SIGTERM within %.0fs: SIGKILL", pid, timeout)
        send(signal.SIGKILL)
        end = time.monotonic() + 5
        while time.monotonic() < end and live_process(pid, marker) is not None:
            time.sleep(0.05)
    # members of the group that outlived the leader
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    _reap(pid)
    return True


def signal_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, *, wait: float = 10.0) -> bool:
    """Send ``sig`` to the process group ``proc`` leads and wait up to ``wait`` s for ``proc``
    to exit; False if the group was already gone."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return False
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(wait)
    return True


def wait_until(answers: Callable[[], bool], proc: subprocess.Popen | None, timeout: float) -> bool:
    """Until ``answers()``, or ``proc`` exits, or the timeout passes; backing off to 1 s."""
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
