"""The README's first command: `orchestrator demo` on a fresh embedded home, as a new user runs it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator.cli.processes import orchestrator_executable
from tests.conftest import base_env

pytestmark = pytest.mark.integration


def test_the_demo_runs_its_job_and_the_breaker_and_stops_its_workers(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    env.pop("ORCH_IMPORTS")  # the demo needs nothing but the bundled catalog
    done = subprocess.run(
        [*orchestrator_executable(), "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "succeeded  16/16 branches" in out  # the mixed io + cpu job, every branch succeeded
    assert "-> open" in out and "short_circuited=5" in out and "-> closed" in out
    assert "workers stopped (exit codes [0, 0, 0])" in out
