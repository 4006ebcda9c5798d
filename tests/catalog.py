"""A catalog used only by the tests, loaded through ORCH_IMPORTS exactly as user code would be."""

from __future__ import annotations

import os
import time
from typing import Any

from orchestrator import BranchOutcome, aggregator, cpu_task, io_task


@io_task
def io_pid(seconds: float = 0.0) -> dict[str, Any]:
    time.sleep(seconds)
    return {"pid": os.getpid()}


@io_task
def boom(message: str = "backend said no") -> None:
    raise RuntimeError(message)


@io_task
def not_json() -> Any:
    return object()


@cpu_task
def spin(seconds: float) -> dict[str, Any]:
    """Burns CPU (no sleeping) for `seconds`, so it really occupies a prefork child."""
    end = time.process_time() + seconds
    n = 0
    while time.process_time() < end:
        n += 1
    return {"pid": os.getpid(), "loops": n}


@aggregator
def explode(outcomes: list[BranchOutcome]) -> None:
    raise ValueError(f"cannot aggregate {len(outcomes)} outcomes")


@aggregator
def outcomes(outcomes: list[BranchOutcome]) -> list[dict[str, Any]]:
    """Echo what the aggregator was given, so tests can check it."""
    return [o.to_dict() for o in outcomes]
