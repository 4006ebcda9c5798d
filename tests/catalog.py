"""A catalog used only by the tests, loaded through ORCH_IMPORTS exactly as user code would be."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
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


@io_task
def stubborn_sleep(seconds: float, token: str | None = None) -> dict[str, Any]:
    """An io branch that ignores its deadline (declares no `deadline`), so its result arrives late."""
    time.sleep(seconds)
    return {"slept": seconds, "token": token}


@io_task(retries=3, backoff=0.05)
def flaky(marker_dir: str, fail_times: int) -> int:
    """Fails its first `fail_times` attempts (counted in a file, since attempts may land anywhere)."""
    marker = Path(marker_dir) / "flaky-attempts"
    with marker.open("a") as f:
        f.write("x")
    attempts = len(marker.read_text())
    if attempts <= fail_times:
        raise ConnectionError(f"attempt {attempts} failed")
    return attempts


@io_task(retries=20, backoff=0.2)
def always_fails() -> None:
    raise ConnectionError("the backend is down")


@aggregator
def slow_aggregate(outcomes: list[BranchOutcome]) -> int:
    time.sleep(30)
    return len(outcomes)


@aggregator
def record_calls(outcomes: list[BranchOutcome]) -> dict[str, Any]:
    """Appends one line per call to $TEST_MARK_DIR/aggregations and returns the same call id, so a test
    can match every job's result to exactly one recorded run."""
    call = uuid.uuid4().hex
    with open(Path(os.environ["TEST_MARK_DIR"]) / "aggregations", "a") as f:
        f.write(call + "\n")
    return {"call": call, "branches": len(outcomes)}


@io_task
def timed_sleep(seconds: float) -> dict[str, float]:
    """Sleeps and says when it ran (wall clock), so a test can count how many branches overlapped."""
    started = time.time()
    time.sleep(seconds)
    return {"started": started, "finished": time.time()}


@io_task
def echo(value: Any) -> Any:
    """Returns its argument: what a branch received is what it was submitted with."""
    return value


@cpu_task
def die(exit_code: int = 3) -> None:
    """Ends its own process mid-branch, as a crashing extension or the kernel's OOM killer would."""
    os._exit(exit_code)


@io_task
def gated(gate: str) -> str:
    """Fails until the file `gate` exists: a backend that is down until an operator fixes it."""
    if not Path(gate).exists():
        raise ConnectionError(f"the backend behind {Path(gate).name} is down")
    return "through"
