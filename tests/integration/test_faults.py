"""The fault suite's quick round: one round of every fault of the matrix but the partition (see SUITE) on
small waves, on private PostgreSQL, Redis and RabbitMQ instances and real worker processes
(`python -m faults --quick`).

Every job must end, as expected, with every outcome written once. Time to final is a figure of the
report, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from faults.checker import JobCheck, Mark, Tracked, check_job
from faults.scenarios import SCENARIOS
from faults.soak import SoakPlan, memory_growth, parse_duration
from tests.harness import run_module

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


#: Where a branch function or aggregator may run to completion twice, and why (by design, and counted in
#: the report). Everywhere else a second completed run is a defect, unless it ran in a process the fault
#: itself hit: a run SIGKILLed after its function returned but before its outcome was committed runs
#: again (at-least-once), and so does the run of a SIGSTOPped worker whose branch was taken over.
DUPLICATES_BY_DESIGN = {
    # A broker connection lost while branches run: the messages are delivered again after the reconnect
    # and run a second time (worker_cancel_long_running_tasks_on_connection_loss is off); the store
    # records one outcome.
    "rabbitmq-outage": "broker reconnect",
    "redis-restart": "broker reconnect",
    "redis-restart-empty": "broker reconnect",
    # An outcome that could not be written while the database was restarting or cut off is not recorded;
    # Celery retries the task and the function runs again.
    "pg-restart-fast": "database retry",
    "pg-restart-immediate": "database retry",
    "pg-terminate": "database retry",
}


#: The rows the suite's quick round runs: all but the partition (half a minute more), which
#: tests/integration/test_partition.py covers on its own; `python -m faults --quick` and the full matrix
#: run it. The race it found (a healed host's late write counting its message while the taker still ran
#: a sibling branch) has its regression test in test_rescue.py.
SUITE = [s for s in SCENARIOS if s.name != "partition"]


def run_quick(out: Path, timeout: float = 840) -> subprocess.CompletedProcess[str]:
    """`python -m faults --quick` on the SUITE's rows."""
    rows = [arg for s in SUITE for arg in ("--scenario", s.name)]
    return run_module(["faults", "--quick", *rows, "--out", str(out), "-q"], timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("faults")
    done = run_quick(out)
    report = out / "reliability.json"
    assert report.exists(), f"no report (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return out, json.loads(report.read_text())["matrix"]


def test_every_matrix_row_ran_once(quick: tuple[Path, dict[str, Any]]) -> None:
    out, matrix = quick
    assert matrix["mode"] == "quick" and matrix["errors"] == [], matrix["errors"]
    assert [s["scenario"] for s in matrix["scenarios"]] == [s.name for s in SUITE]
    assert {s["scenario"] for s in matrix["scenarios"] if s["duplicates_by_design"]} == set(
        DUPLICATES_BY_DESIGN
    )
    table = (out / "RELIABILITY.md").read_text()
    assert all(f"| {s.name} |" in table for s in SUITE)
    assert set(matrix["services"]) == {"postgresql", "redis", "rabbitmq"}


@pytest.mark.parametrize("name", [s.name for s in SUITE])
def test_the_fault_loses_and_doubles_nothing(quick: tuple[Path, dict[str, Any]], name: str) -> None:
    _, matrix = quick
    sc = next(s for s in matrix["scenarios"] if s["scenario"] == name)
    details = [{k: r[k] for k in ("fault", "problems", "error")} for r in sc["round_details"]]
    assert sc["error"] is None and sc["rounds"] == 1 and sc["jobs"] > 0, details
    assert (sc["stuck"], sc["lost"], sc["wrong"]) == (0, 0, 0), details
    assert sc["fan_in_runs"] >= sc["jobs"], details
    if name not in DUPLICATES_BY_DESIGN:
        assert sc["doubled"] == sc["doubled_by_fault"], details
    assert sc["pool_exits"] == [], "a worker pool exited on its own (the suite had to restart it)"
    assert sc["verdict"] == "survived"


# --- the checker and the soak's arithmetic, on made-up marks and rows ----------------------------------


class _Row:
    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


def _job(state: str, branches: int, result: Any) -> Any:
    now = datetime.now(UTC)
    return _Row(
        state=state, result=result, created_at=now, finished_at=now, branch_total=branches, error=None
    )


def _marks(*runs: tuple[str, int, str, int]) -> list[Mark]:
    return [Mark(what, "t", index, run, pid, 0.0) for what, index, run, pid in runs]


def test_a_run_twice_is_doubled_unless_the_fault_hit_its_process() -> None:
    branch = _Row(index=0, queue="io", state="succeeded", attempts=2, result={"run": "b"}, error=None)
    job = _job("succeeded", 1, {"run": "agg", "seen": {"0": "b"}})
    marks = _marks(("S", 0, "a", 10), ("C", 0, "a", 10), ("S", 0, "b", 11), ("C", 0, "b", 11))
    marks += _marks(("S", -1, "agg", 12), ("C", -1, "agg", 12))
    killed: JobCheck = check_job(Tracked("t", "x", 0.0), job, [branch], marks, 0.0, hit_pids={10})
    assert (killed.doubled, killed.doubled_by_fault, killed.fan_in_runs, killed.wrong) == (1, 1, 1, None)
    duplicate = check_job(Tracked("t", "x", 0.0), job, [branch], marks, 0.0, hit_pids=set())
    assert (duplicate.doubled, duplicate.doubled_by_fault) == (1, 0)


def test_an_outcome_that_changed_after_the_fan_in_read_it_is_wrong() -> None:
    branch = _Row(index=0, queue="io", state="succeeded", attempts=1, result={"run": "b"}, error=None)
    job = _job("succeeded", 1, {"run": "agg", "seen": {"0": "a"}})
    marks = _marks(("C", 0, "a", 10), ("C", 0, "b", 10), ("C", -1, "agg", 12))
    check = check_job(Tracked("t", "x", 0.0), job, [branch], marks, 0.0, hit_pids=set())
    assert check.wrong is not None and "changed after the fan-in read them" in check.wrong


def test_memory_growth_is_measured_per_incarnation() -> None:
    flat = [{"at_s": t, "role": "io", "pid": 1, "pss": 100 * 2**20} for t in range(0, 600, 10)]
    growing = [{"at_s": t, "role": "cpu", "pid": 2, "pss": (100 + t / 36) * 2**20} for t in range(0, 600, 10)]
    short = [{"at_s": t, "role": "cpu", "pid": 3, "pss": 2**20 * t} for t in range(600, 620, 10)]
    growth = memory_growth(flat + growing + short, min_span=300)
    assert growth["io"] == 0.0
    assert growth["cpu"] is not None and 80 < growth["cpu"] < 110  # 100 MiB/h on ~110 MiB


def test_soak_durations_and_a_short_plan() -> None:
    assert [parse_duration(t) for t in ("30m", "90s", "1h", "45")] == [1800, 90, 3600, 45]
    plan = SoakPlan.for_duration(120, 20, None)
    assert plan.baseline < plan.duration and plan.fault_every <= 60 and plan.window <= 60
    assert SoakPlan.for_duration(1800, 20, None).fault_every == 180
