"""The CLI finds catalog modules where the workers do (the current directory), and only `submit`, which
checks task names against the catalog, needs it at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.test_cli import Cli

pytestmark = pytest.mark.integration

CATALOG = """
from orchestrator import aggregator, io_task


@io_task
def double(x: int) -> int:
    return 2 * x


@aggregator
def first(outcomes):
    return outcomes[0].result
"""


def test_submit_imports_a_catalog_module_from_the_current_directory(tmp_path: Path) -> None:
    work = tmp_path / "project"
    work.mkdir()
    (work / "mycatalog.py").write_text(CATALOG)
    run = Cli.on(tmp_path / "home", ORCH_IMPORTS="mycatalog")
    run.cwd = work
    # As a user has it: the project directory is not on PYTHONPATH (an empty entry would mean cwd).
    entries = run.env["PYTHONPATH"].split(os.pathsep)
    assert str(work) not in entries and "" not in entries and "." not in entries

    job_id = run("submit", "-b", "mycatalog.double x=21", "--fan-in", "mycatalog.first").stdout.strip()
    status = json.loads(run("status", job_id, "--json").stdout)
    assert status["fan_in"] == "mycatalog.first"
    assert [(b["task"], b["args"]["kwargs"]) for b in status["branches"]] == [("mycatalog.double", {"x": 21})]
    # Still checked against the catalog: a typo in the module's task is refused as before.
    typo = run("submit", "-b", "mycatalog.dubble x=1", code=1)
    assert "error: unknown task 'mycatalog.dubble'" in typo.stderr


def test_only_submit_needs_the_catalog(tmp_path: Path) -> None:
    good = Cli.on(tmp_path)
    job_id = good("submit", "-b", "jobs.io.sleep seconds=5", "--name", "no-catalog").stdout.strip()
    good("breakers")  # creates nothing, but the table must render

    run = Cli.on(tmp_path, ORCH_IMPORTS="no_such_catalog_module")
    refused = run("submit", "-b", "jobs.io.sleep seconds=1", code=1)
    assert "error: cannot import catalog module 'no_such_catalog_module'" in refused.stderr
    assert job_id in run("list").stdout
    assert [j["id"] for j in json.loads(run("list", "--json").stdout)] == [job_id]
    assert json.loads(run("status", job_id, "--json").stdout)["name"] == "no-catalog"
    assert "jobs.io.sleep" in run("status", job_id).stdout
    assert run("cancel", job_id).stdout.strip() == f"job {job_id} cancelled (cancelled=1)"
    assert "cancelled" in run("watch", job_id, code=4).stdout
    assert json.loads(run("breakers", "--json").stdout) == []
