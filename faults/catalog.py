"""The branches and aggregators the fault suite submits (loaded by workers through ORCH_IMPORTS).

Every function appends a line to a file of its own process in FAULTS_MARK_DIR when it starts and when it
completes: a file append survives a database or broker fault that SQL or Redis would not, so the checker
counts exactly how many times each branch function and each aggregator ran to completion.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from orchestrator import BranchOutcome, aggregator, cpu_task, io_task

#: The directory workers append their marks to (one file per process).
MARK_DIR = "FAULTS_MARK_DIR"
#: The index an aggregator's marks carry (branches have 0 and up).
AGGREGATOR = -1
#: The token of an aggregator that saw no successful branch, so could not tell which job it aggregated.
UNKNOWN = "?"


def mark(what: str, token: str, index: int, run: str) -> None:
    """One line, one write with O_APPEND: atomic between the threads of an io worker."""
    folder = os.environ.get(MARK_DIR)
    if not folder:
        return
    line = f"{what} {token} {index} {run} {os.getpid()} {time.time():.6f}\n"
    fd = os.open(Path(folder) / f"{os.getpid()}.marks", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _started(token: str, index: int) -> str:
    run = uuid.uuid4().hex[:12]
    mark("S", token, index, run)
    return run


def _completed(token: str, index: int, run: str) -> dict[str, Any]:
    mark("C", token, index, run)
    return {"t": token, "i": index, "run": run, "pid": os.getpid()}


@io_task
def nap(token: str, index: int, seconds: float) -> dict[str, Any]:
    """An io branch: sleeps, as a call to a slow backend does."""
    run = _started(token, index)
    time.sleep(seconds)
    return _completed(token, index, run)


@cpu_task
def crunch(token: str, index: int, seconds: float) -> dict[str, Any]:
    """A cpu branch: burns CPU (no sleeping) for `seconds`, so it really holds a prefork child."""
    run = _started(token, index)
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return _completed(token, index, run)


@cpu_task
def poison(token: str, index: int) -> dict[str, Any]:
    """A cpu branch that kills its own process every time it runs: it can never complete."""
    _started(token, index)
    os._exit(1)


def _token(outcomes: list[BranchOutcome]) -> str:
    for o in outcomes:
        if isinstance(o.result, dict) and isinstance(o.result.get("t"), str):
            return str(o.result["t"])
    return UNKNOWN


def _gather(outcomes: list[BranchOutcome], seconds: float) -> dict[str, Any]:
    token = _token(outcomes)
    run = _started(token, AGGREGATOR)
    if seconds:
        time.sleep(seconds)
    # What this run saw of each branch, so the checker can tell that no outcome changed afterwards.
    seen = {str(o.index): (o.result.get("run") if isinstance(o.result, dict) else o.state) for o in outcomes}
    mark("C", token, AGGREGATOR, run)
    return {"t": token, "run": run, "pid": os.getpid(), "seen": seen}


@aggregator
def gather(outcomes: list[BranchOutcome]) -> dict[str, Any]:
    """The fan-in: says which run of each branch it aggregated."""
    return _gather(outcomes, 0.0)


@aggregator
def gather_slowly(outcomes: list[BranchOutcome]) -> dict[str, Any]:
    """The fan-in, holding its fanin worker for a second: a fan-in is then in flight to be killed."""
    return _gather(outcomes, 1.0)
