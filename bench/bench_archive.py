"""Memory and throughput of archiving a large video into S3 (a real local SeaweedFS).

    .venv/bin/python -m bench.bench_archive [--size-mb 200] [--part-mb 8]

1. Generates an MP4-like file (an ``ftyp`` box, then random bytes) in a temporary directory.
2. Serves it from a separate loopback HTTP server process (``http.server``, streamed from disk).
3. Starts SeaweedFS in a temporary AVATARFLOW_HOME (``avatarflow.local.services.seaweed.start_s3``).
4. **streaming**: ``s3io.archive_url`` (httpx stream -> multipart upload), then ``verify``.
5. **baseline**: reads the whole body into memory first, then uploads it.

For each it prints the peak RSS growth of this process (psutil, sampled every 5 ms in a
thread, against the RSS right before the step, after a warm-up upload has loaded boto3 and
httpx) and the throughput. Acceptance: streaming 200 MB grows the process by at most 64 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from avatarflow import s3io
from avatarflow.s3io import MiB
from avatarflow.local.services import seaweed, stack

LIMIT_MB = 64


class PeakRSS:
    """Samples this process's RSS in a thread; ``growth_mb`` is peak minus the start value."""

    def __init__(self, interval: float = 0.005) -> None:
        self.proc = psutil.Process()
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 1e6


def make_video(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    ftyp = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41"
    with open(path, "wb") as f:
        f.write(ftyp)
        digest.update(ftyp)
        left = size - len(ftyp)
        while left > 0:
            block = os.urandom(min(MiB, left))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.head(url, trust_env=False, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"HTTP server at {url} did not come up")


async def run(size_mb: int, part_mb: int) -> int:
    size = size_mb * 1_000_000
    part = part_mb * MiB
    with tempfile.TemporaryDirectory(prefix="avatarflow-bench-") as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "www").mkdir()
        video = tmpdir / "www" / "out.mp4"
        t = time.perf_counter()
        sha = make_video(video, size)
        print(f"generated {size / 1e6:.0f} MB MP4-like file in {time.perf_counter() - t:.1f}s")

        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
             "--directory", str(tmpdir / "www")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        home = tmpdir / "home"
        try:
            url = f"http://127.0.0.1:{port}/out.mp4"
            wait_http(url)
            svc = seaweed.start_s3(home)
            s3 = svc.client()
            bucket = svc.bucket
            async with httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(60.0, connect=10.0)) as client:
                # warm-up: loads botocore models, thread pool, connection pools
                warm = await s3io.archive_stream(
                    _chunks(os.urandom(part + 1)), s3=s3, bucket=bucket, key="bench/warmup.bin", part_size=part
                )
                s3io.verify(s3, warm)

                # streaming
                with PeakRSS() as m:
                    t = time.perf_counter()
                    stored = await s3io.archive_url(
                        url, s3=s3, bucket=bucket, key="bench/stream/video.mp4", client=client, part_size=part
                    )
                    stream_s = time.perf_counter() - t
                assert stored.sha256 == sha and stored.size == size, "streamed object differs from source"
                with PeakRSS() as mv:
                    t = time.perf_counter()
                    s3io.verify(s3, stored)
                    verify_s = time.perf_counter() - t

                # baseline: whole body in memory first, then the same upload
                with PeakRSS() as b:
                    t = time.perf_counter()
                    body = (await client.get(url)).content
                    base = await s3io.archive_stream(
                        _chunks(body, 256 * 1024), s3=s3, bucket=bucket, key="bench/baseline/video.mp4",
                        part_size=part,
                    )
                    base_s = time.perf_counter() - t
                    del body
                assert base.sha256 == sha
            s3.close()
        finally:
            server.terminate()
            server.wait(10)
            stack.down(home)

    ok = m.growth_mb <= LIMIT_MB
    print(f"part size {part_mb} MiB, {stored.parts} parts")
    print(f"streaming : RSS growth {m.growth_mb:7.1f} MB, {stream_s:5.2f} s, {size / 1e6 / stream_s:6.1f} MB/s")
    print(f"verify    : RSS growth {mv.growth_mb:7.1f} MB, {verify_s:5.2f} s, {size / 1e6 / verify_s:6.1f} MB/s")
    print(f"in-memory : RSS growth {b.growth_mb:7.1f} MB, {base_s:5.2f} s, {size / 1e6 / base_s:6.1f} MB/s (baseline)")
    print(f"acceptance: streaming growth {m.growth_mb:.1f} MB <= {LIMIT_MB} MB: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


async def _chunks(data: bytes, size: int = 256 * 1024):
    view = memoryview(data)
    for i in range(0, len(data), size):
        yield bytes(view[i : i + size])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--part-mb", type=int, default=8)
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args.size_mb, args.part_mb)))


if __name__ == "__main__":
    main()
