"""A batch's budget: reserve each job's estimated cost before it is submitted, settle it with
the cost the API reports, and refuse a job that would take the total past the budget."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from avatarflow.contract import PRICE_PER_SECOND
from avatarflow.spec import VideoRequest

WORDS_PER_SECOND = 2.5
AUDIO_ESTIMATE_S = 30.0


def estimate_seconds(request: VideoRequest) -> float:
    """Expected output length: the script at 150 words a minute; a recording counts 30 s."""
    if request.audio:
        return AUDIO_ESTIMATE_S
    return 1.0 + len(request.voice_script.split()) / WORDS_PER_SECOND


def estimate_cost(request: VideoRequest) -> float:
    return round(estimate_seconds(request) * PRICE_PER_SECOND[request.resolution], 6)


@dataclass
class Budget:
    """USD limit (None: no limit); `spent` is settled cost, `reserved` is in flight."""

    limit: float | None
    spent: float = 0.0
    reserved: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reserve(self, amount: float) -> bool:
        with self._lock:
            if self.limit is not None and self.spent + self.reserved + amount > self.limit + 1e-9:
                return False
            self.reserved += amount
            return True

    def settle(self, reserved: float, actual: float | None) -> None:
        """Replace a reservation by what the job cost (the estimate when none was reported)."""
        with self._lock:
            self.reserved -= reserved
            self.spent += reserved if actual is None else actual
