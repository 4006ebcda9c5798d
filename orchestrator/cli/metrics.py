"""Prometheus metrics read from SQL at scrape time, so they are right across every host and process;
`orchestrator metrics` serves them.

A collector, not counters in a process: no worker has the whole picture, the database does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from ..breaker import list_views
from ..database import dialect, get_engine
from ..models import Branch, BreakerState, Job, JobState
from ..settings import Settings

logger = logging.getLogger(__name__)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class SQLCollector(Collector):
    def __init__(self, settings: Settings, app: Any = None) -> None:
        self.settings = settings
        self.app = app

    def collect(self) -> Iterator[Any]:
        engine = get_engine(self.settings.database_url)
        with engine.connect() as conn:
            jobs = GaugeMetricFamily("orchestrator_jobs", "Jobs by state", labels=["state"])
            counts = dict(conn.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            for job_state in JobState:
                jobs.add_metric([job_state.value], counts.get(job_state.value, 0))
            yield jobs

            branches = GaugeMetricFamily(
                "orchestrator_branches", "Branches by task and state", labels=["task", "state"]
            )
            for row in conn.execute(
                select(Branch.task, Branch.state, func.count()).group_by(Branch.task, Branch.state)
            ).all():
                branches.add_metric([row[0], row[1]], row[2])
            yield branches

            seconds = dialect(engine).seconds_between(Branch.started_at, Branch.finished_at)
            columns = [func.sum(case((seconds <= b, 1), else_=0)) for b in BUCKETS]
            hist = HistogramMetricFamily(
                "orchestrator_branch_duration_seconds", "Branch run time, last attempt", labels=["task"]
            )
            rows = conn.execute(
                select(Branch.task, func.count(), func.sum(seconds), *columns)
                .where(Branch.started_at.is_not(None), Branch.finished_at.is_not(None))
                .group_by(Branch.task)
            ).all()
            for task, count, total, *cumulative in rows:
                buckets = [(str(b), int(c or 0)) for b, c in zip(BUCKETS, cumulative, strict=True)]
                hist.add_metric([task], [*buckets, ("+Inf", int(count))], sum_value=float(total or 0.0))
            yield hist

        breaker_state = GaugeMetricFamily(
            "orchestrator_breaker_state",
            "1 for the state each circuit breaker is in",
            labels=["name", "state"],
        )
        failures = GaugeMetricFamily(
            "orchestrator_breaker_failures", "Consecutive failures counted by a breaker", labels=["name"]
        )
        for b in list_views(self.settings.database_url):
            for state in BreakerState:
                breaker_state.add_metric([b.name, state.value], 1.0 if b.state == state.value else 0.0)
            failures.add_metric([b.name], b.failure_count)
        yield breaker_state
        yield failures
        yield from self._queue_depth()

    def _queue_depth(self) -> Iterator[Any]:
        if self.app is None:
            return
        depth = GaugeMetricFamily("orchestrator_queue_depth", "Messages waiting in a queue", labels=["queue"])
        s = self.settings
        try:
            with self.app.connection_for_read() as conn:
                channel = conn.default_channel
                for queue in (s.io_queue, s.cpu_queue, s.fanin_queue):
                    try:
                        depth.add_metric(
                            [queue], channel.queue_declare(queue=queue, passive=True).message_count
                        )
                    except Exception:  # a queue nobody declared yet holds nothing
                        depth.add_metric([queue], 0)
                        channel = conn.channel()
        except Exception:
            logger.exception("cannot read queue depths from the broker")
            return
        yield depth
