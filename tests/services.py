"""Real services for the integration tests: a fresh PostgreSQL database, Redis DB and RabbitMQ vhost each."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import redis

PG_ADMIN = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")


def _with_db(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new empty database, dropped afterwards (connections forced closed)."""
    name = f"orch_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(PG_ADMIN, name).replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        from orchestrator.database import _engines

        for url in [u for u in _engines if name in u]:
            _engines.pop(url).dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_database(index: int) -> Iterator[str]:
    url = f"{REDIS_URL}/{index}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A vhost of our own, so queues left by another run cannot feed our workers."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:  # a remote broker: share the default vhost
        yield AMQP_URL + "//"
        return
    vhost = f"orch-test-{uuid.uuid4().hex[:8]}"
    subprocess.run([ctl, "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        [ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True, capture_output=True
    )
    try:
        yield f"{AMQP_URL}/{vhost}"
    finally:
        subprocess.run([ctl, "delete_vhost", vhost], capture_output=True)
