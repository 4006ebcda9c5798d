"""Fresh, private namespaces on the local services for one run: PostgreSQL databases, a vhost, a Redis DB.

Every run starts empty, so rows or queued messages left by an earlier run (or a test running at the same
time) cannot feed our workers or skew a figure, and every run removes what it created (see
orchestrator.testing, which the integration tests use too). BENCH_PG_ADMIN_URL, BENCH_REDIS_URL and
BENCH_AMQP_URL point elsewhere.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from orchestrator.testing import LocalServices

SERVICES = LocalServices.from_env("BENCH", prefix="bench")

# Redis databases the harness may claim; the integration tests use lower numbers.
REDIS_DBS = tuple(range(15, 7, -1))
_CLAIM_KEY = "bench:claimed-by"

postgres_database = SERVICES.postgres_database
rabbitmq_vhost = SERVICES.rabbitmq_vhost
postgres_version = SERVICES.postgres_version
redis_version = SERVICES.redis_version
rabbitmq_version = SERVICES.rabbitmq_version


def redis_database() -> AbstractContextManager[str]:
    """An empty Redis database among REDIS_DBS, claimed so that two runs never share one."""
    return SERVICES.claim_redis_database(REDIS_DBS, _CLAIM_KEY)
