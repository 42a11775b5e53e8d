"""Prefect set-up for avatarflow (what `avatarflow deploy` does), through the Prefect client:

1. the global concurrency limit ``avatarflow-api`` with slot decay: the account's requests per
   minute, held across every worker (avatarflow.request_limit);
2. the process work pool ``avatarflow-process`` (:func:`ensure_work_pool`);
3. the automations of avatarflow.automations: runs whose worker died are CRASHED and put back in
   the queue, and so are runs a dead worker took and never started;
4. the deployments of deployments/prefect.yaml (``prefect deploy --all``), then read back through
   the client and checked against the file (entrypoint, work pool, parameters, schedules,
   triggers): :func:`deploy_all` raises :class:`DeployError` naming what is missing or different.

The Prefect server is the one of PREFECT_API_URL, else the local one of `avatarflow local
prefect-up` (:func:`api_url`)."""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from avatarflow import automations
from avatarflow.errors import DeployError
from avatarflow.request_limit import REQUESTS_PER_MINUTE, ensure_concurrency_limit

WORK_POOL = "avatarflow-process"
# The content-calendar deployment's queue, first in the pool: a batch run put back in the queue
# (its worker died) is taken before the rows it dispatched, as soon as a worker has a free slot.
BATCH_QUEUE = "batch"
# prefect.yaml ships in the package (the repository's deployments/ is avatarflow.deployments).
PREFECT_FILE = Path(str(importlib.resources.files("avatarflow.deployments") / "prefect.yaml"))


def api_url() -> str:
    """PREFECT_API_URL, else the running local server of `avatarflow local prefect-up`."""
    from avatarflow.config import prefect_api_url

    url = prefect_api_url()
    if url:
        return url
    from avatarflow.local.services.prefect_server import prefect_status

    server, alive = prefect_status()
    if not alive or server is None:
        raise DeployError("no Prefect server: set PREFECT_API_URL, or start one with `avatarflow local prefect-up`")
    return server.api_url


def client_settings(url: str) -> dict[Any, str]:
    """Prefect settings of a client of the server at `url`: the URL and, for the local server
    (or from PREFECT_API_AUTH_STRING), its auth string."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    from avatarflow.local.services.prefect_server import client_auth

    auth = client_auth(url)
    return {PREFECT_API_URL: url, **({PREFECT_API_AUTH_STRING: auth} if auth else {})}


async def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """The process work pool, with the queue :data:`BATCH_QUEUE` at priority 1 (workers poll a
    pool's queues in priority order); True when the pool was created now."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            created = True
        except ObjectAlreadyExists:
            created = False
        try:
            await client.create_work_queue(name=BATCH_QUEUE, work_pool_name=name, priority=1)
        except ObjectAlreadyExists:
            await client.update_work_queue(next(q.id for q in await client.read_work_queues(name)
                                                if q.name == BATCH_QUEUE), priority=1)
    return created


def _expected(prefect_file: Path) -> list[dict[str, Any]]:
    import yaml

    return list(yaml.safe_load(prefect_file.read_text()).get("deployments") or [])


async def check_deployments(prefect_file: Path = PREFECT_FILE) -> list[str]:
    """Read each deployment of `prefect_file` back from the server and compare; their names."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    problems, names = [], []
    async with get_client() as client:
        for want in _expected(prefect_file):
            flow_name = want["entrypoint"].rsplit(":", 1)[1]
            full = f"{flow_name}/{want['name']}"
            try:
                got = await client.read_deployment_by_name(full)
            except ObjectNotFound:
                problems.append(f"{full}: not on the server")
                continue
            names.append(full)
            if got.entrypoint != want["entrypoint"]:
                problems.append(f"{full}: entrypoint {got.entrypoint!r}, want {want['entrypoint']!r}")
            for field, attr in (("name", "work_pool_name"), ("work_queue_name", "work_queue_name")):
                want_value, got_value = (want.get("work_pool") or {}).get(field), getattr(got, attr)
                if want_value and got_value != want_value:
                    problems.append(f"{full}: {attr} {got_value!r}, want {want_value!r}")
            for k, v in (want.get("parameters") or {}).items():
                if (got.parameters or {}).get(k) != v:
                    problems.append(f"{full}: parameter {k}={(got.parameters or {}).get(k)!r}, want {v!r}")
            if len(got.schedules or []) != len(want.get("schedules") or []):
                problems.append(f"{full}: {len(got.schedules or [])} schedules, want {len(want.get('schedules') or [])}")
            if want.get("triggers"):
                autos = await client.read_resource_related_automations(f"prefect.deployment.{got.id}")
                if len(autos) < len(want["triggers"]):
                    problems.append(f"{full}: {len(autos)} trigger automations, want {len(want['triggers'])}")
    if problems:
        raise DeployError("deployments not as prefect.yaml says:\n  " + "\n  ".join(problems))
    return names


async def deploy_all(url: str, prefect_file: Path = PREFECT_FILE) -> list[str]:
    """`prefect --no-prompt deploy --all` over `prefect_file` (Prefect's
    own reading of prefect.yaml: pull steps, triggers, schedules), then every deployment read
    back and checked through the client; the deployments' names."""
    import anyio

    env = {**os.environ, **{s.name: v for s, v in client_settings(url).items()}, "COLUMNS": "200"}
    prefect = str(Path(sys.executable).with_name("prefect"))
    proc = await anyio.to_thread.run_sync(lambda: subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
        env=env, capture_output=True, text=True, timeout=600))
    try:
        return await check_deployments(prefect_file)
    except DeployError as e:
        raise DeployError(f"{e}\nprefect deploy exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                          f"{proc.stderr[-2000:]}") from None


async def setup(url: str, *, requests_per_minute: int = REQUESTS_PER_MINUTE, burst: float | None = None,
                register_blocks: Any = None, log: Any = print) -> dict[str, Any]:
    """Everything `avatarflow deploy` does, in order, against the server at `url`.
    `register_blocks()`: registers the blocks and returns their names (the CLI passes
    blocks.register's; the library does not import blocks/)."""
    from prefect.settings import temporary_settings

    out: dict[str, Any] = {"blocks": []}
    with temporary_settings(updates=client_settings(url)):
        if register_blocks is not None:
            out["blocks"] = list(register_blocks())
            for name in out["blocks"]:
                log(f"block       {name}")
        out["limit"] = await ensure_concurrency_limit(requests_per_minute, burst)
        lim = out["limit"]
        log(f"limit       {lim['name']}: {lim['requests_per_minute']}/min in any minute "
            f"(burst {lim['limit']:g}, then {lim['slot_decay_per_second']:.3f}/s; "
            f"{lim['slots_per_request']} slots a request)")
        out["work_pool_created"] = await ensure_work_pool()
        log(f"work pool   {WORK_POOL}{' (created)' if out['work_pool_created'] else ''}")
        out["automations"] = await automations.install()
        for name in out["automations"]:
            log(f"automation  {name}")
        out["deployments"] = await deploy_all(url)
        for name in out["deployments"]:
            log(f"deployment  {name}")
    return out


def main(argv: list[str] | None = None) -> None:  # `python -m avatarflow.deploy`: no blocks (the CLI's `deploy` registers them)
    import argparse
    import asyncio

    ap = argparse.ArgumentParser(description="The concurrency limit, work pool, crash automation and deployments.")
    ap.add_argument("--requests-per-minute", type=int, default=REQUESTS_PER_MINUTE)
    ap.add_argument("--burst", type=float, default=None)
    args = ap.parse_args(argv)
    asyncio.run(setup(api_url(), requests_per_minute=args.requests_per_minute, burst=args.burst))


if __name__ == "__main__":
    main()
