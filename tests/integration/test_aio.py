"""AsyncOrchestrator on real workers: it submits, waits and reads without ever blocking the event loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from orchestrator import AsyncOrchestrator, JobAlreadyFinal, JobSpec, Settings, WaitTimeout, branch
from tests.conftest import Stack, base_env

pytestmark = pytest.mark.integration


async def _lag_probe(stop: asyncio.Event, lags: list[float], every: float = 0.001) -> None:
    """How late the loop wakes a 1 ms sleep: a blocked loop shows up here as its whole blocking time."""
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(every)
        lags.append(time.perf_counter() - started - every)


def test_a_hundred_submits_and_waits_never_block_the_loop(pg_stack: Stack) -> None:
    async def main() -> tuple[list[str], list[float]]:
        orc = AsyncOrchestrator(pg_stack.settings)
        await orc.get(
            (await orc.submit([branch("jobs.io.sleep", 0.01)], "jobs.aggregate.total")).id
        )  # warm up
        stop, lags = asyncio.Event(), list[float]()
        probe = asyncio.create_task(_lag_probe(stop, lags))

        async def one(i: int) -> str:
            job = await orc.submit([branch("jobs.io.sleep", 0.05) for _ in range(4)], "jobs.aggregate.total")
            return (await orc.wait(job.id, timeout=60)).state

        states = await asyncio.gather(*(one(i) for i in range(100)))
        stop.set()
        await probe
        await orc.close()
        return states, lags

    states, lags = asyncio.run(main())
    assert states == ["succeeded"] * 100, pg_stack.logs()
    lags.sort()
    # The loop only awaits: what is left is the GIL handing the loop back from the client's threads.
    assert lags[len(lags) // 2] < 0.002 and lags[int(len(lags) * 0.99)] < 0.01, (lags[-10:], len(lags))


def test_the_async_client_covers_the_api(pg_stack: Stack) -> None:
    async def main() -> None:
        orc = AsyncOrchestrator(pg_stack.settings)
        jobs = await orc.submit_many(
            [
                JobSpec([branch("jobs.io.sleep", 0.05)], "jobs.aggregate.total", name=f"aio-{i}")
                for i in range(3)
            ]
        )
        finals = await asyncio.gather(*(orc.wait(j.id, timeout=30) for j in jobs))
        assert [f.state for f in finals] == ["succeeded"] * 3
        listed = {v.id for v in await orc.list(state="succeeded", limit=100)}
        assert {j.id for j in jobs} <= listed
        slow = await orc.submit([branch("tests.catalog.stubborn_sleep", 5)], "jobs.aggregate.total")
        with pytest.raises(WaitTimeout, match=r"still running after 0\.3s"):
            await orc.wait(slow.id, timeout=0.3)
        assert (await orc.cancel(slow.id)).state == "cancelled"
        with pytest.raises(JobAlreadyFinal):
            await orc.cancel(slow.id)
        assert (await orc.get(slow.id)).state == "cancelled"
        flaky = await orc.submit(
            [branch("tests.catalog.boom"), branch("jobs.io.sleep", 0.01)], "jobs.aggregate.total", priority=5
        )
        assert flaky.priority == 5 and (await orc.wait(flaky.id, timeout=30)).state == "partial"
        assert (await orc.retry(flaky.id)).run == 2
        final = await orc.wait(flaky.id, timeout=30)
        assert (final.state, final.run, final.branches[0].run, final.branches[1].run) == ("partial", 2, 2, 1)
        assert [r.state for r in (await orc.history(flaky.id)).runs] == ["partial"]
        await orc.close()

    asyncio.run(main())


def test_waiting_polls_where_the_database_cannot_announce(tmp_path: Path) -> None:
    """On SQLite (the embedded default) there is no NOTIFY: the async wait polls, still without blocking."""

    async def main() -> None:
        orc = AsyncOrchestrator(Settings.from_env(base_env(tmp_path)))
        job = await orc.submit([branch("jobs.io.sleep", 0.1)], "jobs.aggregate.total")
        with pytest.raises(WaitTimeout):  # no worker runs here
            await orc.wait(job.id, timeout=0.2)
        assert (await orc.cancel(job.id)).state == "cancelled"
        assert (await orc.wait(job.id, timeout=1)).state == "cancelled"
        await orc.close()

    asyncio.run(main())
