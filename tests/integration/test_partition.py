"""A partition: a worker host's link is cut while its branches run. The rest of the deployment takes the
branches over once their heartbeat is older than ORCH_STALL_TIMEOUT, every job ends, nothing is written
twice when the host comes back, and the host's worker resumes consuming by itself."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.hosts import worker_hosts
from orchestrator import Orchestrator, Settings, branch
from orchestrator.cli.processes import WorkerProcess, start_pools, stop_all
from tests.conftest import base_env
from tests.services import postgres_database, rabbitmq_vhost

pytestmark = pytest.mark.integration

#: Kept short here (the fault suite's partition row cuts for 90 s with the default stall timeout).
STALL, CUT = 3.0, 15.0


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_partitioned_hosts_branches_are_taken_over_and_it_rejoins(tmp_path: Path) -> None:
    workers: list[WorkerProcess] = []
    with postgres_database("partition") as url, rabbitmq_vhost() as broker, worker_hosts(1) as hosts:
        env = base_env(tmp_path, ORCH_DATABASE_URL=url, ORCH_BROKER_URL=broker, ORCH_STALL_TIMEOUT=str(STALL))
        orc = Orchestrator(Settings.from_env(env), migrate=True)
        host_env = {**env, "ORCH_DATABASE_URL": hosts.url(url), "ORCH_BROKER_URL": hosts.url(broker)}
        try:
            remote = hosts.start_worker(1, "io", env=host_env, log_dir=tmp_path / "logs", concurrency=8)
            workers.append(remote)
            workers += start_pools(("cpu", "fanin"), env=env, log_dir=tmp_path / "logs")
            remote.wait_ready(60)
            job = orc.submit(
                [branch("tests.catalog.io_pid", 4.0) for _ in range(4)], "tests.catalog.outcomes"
            )
            _wait_for(lambda: {b.state for b in orc.get(job.id).branches} == {"running"}, 30, "the branches")
            (local,) = start_pools(("io",), env=env, log_dir=tmp_path / "logs", concurrency={"io": 8})
            workers.append(local)

            hosts.cut(1)
            cut_at = time.monotonic()
            try:
                view = orc.wait(job.id, timeout=CUT)  # taken over before the host comes back
            finally:
                time.sleep(max(CUT - (time.monotonic() - cut_at), 0))
                hosts.heal(1)
            assert view.state == "succeeded", "\n".join(w.log()[-3000:] for w in workers)
            assert {b.result["pid"] for b in view.branches} == {local.pid}
            assert [(b.attempts, b.lost_runs) for b in view.branches] == [(2, 1)] * 4
            assert [o["state"] for o in view.result] == ["succeeded"] * 4

            # The host is back: its late run records nothing, and its worker consumes again by itself.
            local.stop()
            after = orc.submit([branch("tests.catalog.io_pid", 0.01)], "tests.catalog.outcomes")
            again = orc.wait(after.id, timeout=120)
            assert again.state == "succeeded", remote.log()[-3000:]
            assert again.branches[0].result["pid"] == remote.pid
            final = orc.get(job.id)
            assert (final.result, final.branch_done, final.finished_at) == (
                view.result,
                4,
                view.finished_at,
            )
            assert [b.result for b in final.branches] == [b.result for b in view.branches]
            assert orc.breakers() == [] or {b.state for b in orc.breakers()} == {"closed"}
        finally:
            stop_all(workers, timeout=20)
