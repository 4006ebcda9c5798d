"""The time budget handed to branches that declare a keyword-only `deadline` parameter.

Thread and gevent pools ignore Celery's soft time limits, so an io branch must pass its remaining time
on as its own timeouts (``httpx.get(url, timeout=deadline.remaining(default=10))``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Deadline:
    at: float | None  # epoch seconds; None when the job has no deadline

    @classmethod
    def from_datetime(cls, at: datetime | None) -> Deadline:
        return cls(None if at is None else at.timestamp())

    def remaining(self, default: float | None = None) -> float | None:
        """Seconds left (never negative), or `default` when the job has no deadline."""
        if self.at is None:
            return default
        return max(0.0, self.at - time.time())

    def expired(self) -> bool:
        return self.at is not None and time.time() >= self.at


#: The default for a branch function's `deadline` parameter, so it can also be called directly.
NO_DEADLINE = Deadline(None)
