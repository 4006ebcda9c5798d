"""Real services for the integration tests: a fresh PostgreSQL database, Redis DB and RabbitMQ vhost each.

Local by default; TEST_PG_ADMIN_URL, TEST_REDIS_URL and TEST_AMQP_URL point elsewhere. The benchmark
harness makes its namespaces the same way (orchestrator.testing), claiming Redis databases from 15 down.
"""

from __future__ import annotations

from orchestrator.testing import LocalServices

SERVICES = LocalServices.from_env("TEST", prefix="orch_test")
REDIS_URL = SERVICES.redis_url  # without a database index: tests that use a fixed one add "/<index>"

postgres_database = SERVICES.postgres_database
redis_database = SERVICES.redis_database
rabbitmq_vhost = SERVICES.rabbitmq_vhost
