"""The duration model every worker shares: one JSON document per service in the archive bucket,
read on refresh and merged into by conditional writes, so no observation is lost to a race."""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from avatarflow.duration import DurationModel, Observation, Prediction, Speech


class SharedDurationModel:
    """The model of every worker: one JSON document in the bucket (`Store`), read on `refresh`
    (at most every `refresh_s`), and each finished job merged in by a conditional write (create
    if absent, else replace if the ETag is unchanged; on a race re-read, merge, retry)."""

    def __init__(self, store: Any, key: str | None = None, *, refresh_s: float = 30.0, retries: int = 10):
        self.store = store
        self.key = key or store.key("models", "duration.json")
        self.refresh_s, self.retries = refresh_s, retries
        self.model = DurationModel()
        self._loaded_at = -math.inf

    async def refresh(self, *, force: bool = False) -> DurationModel:
        if force or time.monotonic() - self._loaded_at >= self.refresh_s:
            doc, _ = await self.store.read_json(self.key)
            self.model.merge(DurationModel.from_doc(doc).observations)
            self._loaded_at = time.monotonic()
        return self.model

    async def predict(self, resolution: str, speech: Speech) -> Prediction:
        return (await self.refresh()).predict(resolution, speech)

    def live(self, pred: Prediction) -> Callable[[], Prediction]:
        """The prediction re-read from the in-memory model (no I/O), for a wait that should use
        what jobs finishing meanwhile taught it; `pred` itself while the model is still cold."""

        def current() -> Prediction:
            fresh = self.model.predict(pred.resolution, pred.speech)
            return fresh if fresh.n else pred

        return current

    async def record(self, obs: Observation | None) -> bool:
        """Merge one observation into the shared document; False if it never got in."""
        if obs is None:
            return False
        self.model.add(obs)
        for attempt in range(self.retries):
            doc, etag = await self.store.read_json(self.key)
            merged = DurationModel.from_doc(doc)
            merged.merge([obs])
            if etag is None:
                written = await self.store.create_json(self.key, merged.to_doc())
            else:
                written = await self.store.replace_json(self.key, merged.to_doc(), etag)
            if written is not None:
                self.model.merge(merged.observations)
                self._loaded_at = time.monotonic()
                return True
            await asyncio.sleep(random.uniform(0, 0.05 * 2**attempt))
        return False


_SHARED: dict[tuple[str, str, str], SharedDurationModel] = {}


def service_name(backend: str, base_url: str | None = None) -> str:
    """What a model document is about: the backend and the API's host and port (a credentials
    block pointing the `segmind` backend at the local API gets the local API's own document)."""
    where = urlsplit(base_url).netloc if base_url else ""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{backend}-{where}" if where else backend).strip("-")


def model_key(store: Any, service: str) -> str:
    """The shared document of one service (the vendor's and the local API's times differ)."""
    return store.key("models", f"duration-{service}.json")


def shared_model(store: Any, service: str) -> SharedDurationModel:
    """One SharedDurationModel per bucket document in this process, so runs in one process learn
    from each other at once (and from other machines at each refresh)."""
    key = model_key(store, service)
    endpoint = str(getattr(getattr(getattr(store, "s3", None), "meta", None), "endpoint_url", ""))
    ident = (endpoint, str(getattr(store, "bucket", "")), key)
    shared = _SHARED.get(ident)
    if shared is None:
        shared = _SHARED[ident] = SharedDurationModel(store, key)
    else:
        shared.store = store
    return shared
