"""Flow control on real workers: backpressure bounds admitted work across producers, an urgent job
overtakes queued bulk, and a final job's failed branches are driven again with their history kept."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from orchestrator import JobNotFinal, JobSpec, NothingToRetry, Orchestrator, branch
from orchestrator.cli.processes import start_pools, stop_all
from orchestrator.models import FINAL_JOB_STATES
from tests.conftest import Stack, stack_services
from tests.integration.test_cli import Cli

pytestmark = pytest.mark.integration


@contextmanager
def _stack(
    home: Path, concurrency: dict[str, int], name: str = "postgres-rabbitmq", **extra: str
) -> Iterator[Stack]:
    """A deployment whose pools have the sizes given (small pools make queues form)."""
    with stack_services(name, home) as env:
        env.pop("ORCH_RESULT_BACKEND", None)
        stack = Stack(name, {**env, **extra}, home)
        assert stack.orc.settings.database_url  # migrated before the workers start
        workers = start_pools(env=stack.env, log_dir=home / "logs", concurrency=concurrency)
        stack.workers.update({w.kind: w for w in workers})
        try:
            yield stack
        finally:
            stop_all(workers, timeout=20)


def test_backpressure_bounds_what_concurrent_producers_admit_and_loses_nothing(tmp_path: Path) -> None:
    bound = 12
    with _stack(tmp_path, {"io": 4, "cpu": 1, "fanin": 2}, ORCH_MAX_ACTIVE_BRANCHES=str(bound)) as stack:
        producers = [Orchestrator(stack.settings) for _ in range(4)]
        seen: list[int] = []
        done = threading.Event()

        def watch() -> None:  # the unfinished branches as SQL has them, not the counter
            orc = producers[0]
            while not done.is_set():
                jobs = orc.list(limit=1000)
                seen.append(sum(j.branch_total for j in jobs if j.state not in FINAL_JOB_STATES))
                time.sleep(0.01)

        def produce(orc: Orchestrator) -> list[str]:
            return [
                orc.submit([branch("jobs.io.sleep", 0.1)] * 4, "jobs.aggregate.collect", block_timeout=120).id
                for _ in range(6)
            ]

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with ThreadPoolExecutor(4) as pool:
                ids = [i for batch in pool.map(produce, producers) for i in batch]
        finally:
            done.set()
            watcher.join()
        orc = stack.orc
        assert [orc.wait(i, timeout=120).state for i in ids] == ["succeeded"] * 24, stack.logs()
        assert max(seen) <= bound and max(seen) >= bound - 4  # the bound was reached, and held
        assert orc.store.admitted() == 0  # every job gave its branches back


def test_an_urgent_job_overtakes_queued_bulk_jobs(tmp_path: Path) -> None:
    with _stack(tmp_path, {"io": 2, "cpu": 1, "fanin": 1}) as stack:
        orc = stack.orc
        # 150 jobs of one branch each at priority 0: 150 io messages, then 150 fan-ins, two at a time.
        bulk = orc.submit_many([JobSpec([branch("jobs.io.sleep", 0.05)], "jobs.aggregate.collect")] * 150)
        urgent = orc.submit([branch("jobs.io.sleep", 0.05)], "jobs.aggregate.collect", priority=9)
        assert orc.wait(urgent.id, timeout=120).state == "succeeded", stack.logs()
        unfinished = sum(orc.get(j.id).state not in FINAL_JOB_STATES for j in bulk)
        assert unfinished >= 100, f"only {unfinished} of 150 bulk jobs were still queued"
        assert all(orc.wait(j.id, timeout=120).state == "succeeded" for j in bulk)


def test_retry_runs_the_failed_branches_again_and_keeps_their_history(tmp_path: Path) -> None:
    with _stack(tmp_path, {"io": 8, "cpu": 1, "fanin": 2}) as stack:
        orc = stack.orc
        gate = Path(stack.env["TEST_MARK_DIR"]) / "backend-fixed"
        job = orc.submit(
            [branch("tests.catalog.gated", str(gate)), branch("jobs.io.sleep", 0.01)],
            fan_in="tests.catalog.outcomes",
        )
        first = orc.wait(job.id, timeout=60)
        assert first.state == "partial", stack.logs()
        with pytest.raises(NothingToRetry, match=r"no branch of job .* is timed_out"):
            orc.retry(job.id, states=["timed_out"])

        gate.touch()  # the operator fixed the backend
        with ThreadPoolExecutor(8) as pool:  # eight operators press retry at once: one wins
            outcomes = list(pool.map(lambda _: _try_retry(orc, job.id), range(8)))
        assert sorted(outcomes) == ["JobNotFinal"] * 7 + ["retried"]
        with pytest.raises(JobNotFinal):
            orc.retry(job.id)  # running now

        second = orc.wait(job.id, timeout=60)
        assert (second.state, second.run) == ("succeeded", 2), stack.logs()
        gated, slept = second.branches
        assert (gated.state, gated.run, gated.attempts, gated.result) == ("succeeded", 2, 1, "through")
        assert (slept.run, slept.started_at) == (1, first.branches[1].started_at)  # kept, not run again
        assert [o["state"] for o in second.result] == ["succeeded", "succeeded"]  # the latest fan-in

        history = orc.history(job.id)
        (run,) = history.runs
        assert (run.run, run.state, run.result) == (1, "partial", first.result)
        (before,) = history.branches
        assert (before.index, before.run, before.state) == (0, 1, "failed")
        assert before.error == first.branches[0].error and "is down" in (before.error or "")
        with pytest.raises(NothingToRetry):
            orc.retry(job.id)  # nothing failed any more
        assert orc.store.admitted() == 0

        # The operator's loop from the command line: list what needs attention, inspect, retry.
        cli = Cli(cwd=tmp_path, env=stack.env)
        assert job.id not in cli("list", "--state", "partial").stdout
        shown = json.loads(cli("status", job.id, "--history", "--json").stdout)
        assert (shown["run"], shown["history"]["runs"][0]["state"]) == (2, "partial")
        assert "no branch of job" in cli("retry", job.id, code=1).stderr


def _try_retry(orc: Orchestrator, job_id: str) -> str:
    try:
        orc.retry(job_id)
    except JobNotFinal:
        return "JobNotFinal"
    return "retried"
