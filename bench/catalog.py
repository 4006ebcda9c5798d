"""Branches the benchmark needs that the bundled catalog deliberately lacks (loaded via ORCH_IMPORTS)."""

from __future__ import annotations

import time

from orchestrator import io_task


@io_task
def stuck(seconds: float) -> float:
    """A straggler that ignores its deadline (declares no `deadline`): only the watchdog can end its job."""
    time.sleep(seconds)
    return seconds
