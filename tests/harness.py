"""Helpers the integration tests share for what runs outside the test process: polling for a state,
and running a harness (`python -m bench`, `python -m faults`) that must stop what it started."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]


def poll(
    probe: Callable[[], T | None], timeout: float, what: str, detail: Callable[[], str], every: float = 0.2
) -> T:
    """Call `probe` until it returns something other than None, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen after {timeout:g}s\n{detail()}")
        time.sleep(every)


def run_module(args: Sequence[str], timeout: float, grace: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m ARGS` from the repository root; on a hang, SIGTERM first, so the harness can stop its
    workers and services by pid, then SIGKILL after `grace` seconds."""
    argv = [sys.executable, "-m", *args]
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=grace)
            proc.kill()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
