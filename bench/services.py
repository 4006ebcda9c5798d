"""Fresh, private namespaces on the local services for one run: PostgreSQL databases, a vhost, a Redis DB.

Every run starts empty, so rows or queued messages left by an earlier run (or a test running at the same
time) cannot feed our workers or skew a figure, and every run removes what it created.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import psycopg
import redis

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")

# Redis databases the harness may claim; the integration tests use lower numbers.
REDIS_DBS = tuple(range(15, 7, -1))
_CLAIM_KEY = "bench:claimed-by"


class ServiceError(RuntimeError):
    """A local service is missing or refused us; the message says which and how to point elsewhere."""


def _with_db(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


@contextmanager
def postgres_database(label: str) -> Iterator[str]:
    """A new empty database (SQLAlchemy psycopg URL), dropped afterwards with its connections forced."""
    name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise ServiceError(f"PostgreSQL at {PG_ADMIN} (set BENCH_PG_ADMIN_URL): {exc}") from exc
    try:
        yield _with_db(PG_ADMIN, name).replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_version() -> str:
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


@contextmanager
def redis_database() -> Iterator[str]:
    """An empty Redis database claimed with SET NX (so two runs never share one), flushed afterwards."""
    token = uuid.uuid4().hex
    for index in REDIS_DBS:
        client = redis.Redis.from_url(f"{REDIS_URL}/{index}")
        try:
            claimed = client.dbsize() == 0 and bool(client.set(_CLAIM_KEY, token, nx=True))
        except redis.RedisError as exc:
            client.close()
            raise ServiceError(f"Redis at {REDIS_URL} (set BENCH_REDIS_URL): {exc}") from exc
        if claimed:
            break
        client.close()
    else:
        raise ServiceError(f"no empty Redis database among {REDIS_DBS} at {REDIS_URL}")
    try:
        yield f"{REDIS_URL}/{index}"
    finally:
        client.flushdb()
        client.close()


def redis_version() -> str:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()


@contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A vhost of our own (deleted afterwards), so no queue left by another run can feed our workers."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:  # a remote broker: share its default vhost
        yield AMQP_URL + "//"
        return
    vhost = f"bench-{uuid.uuid4().hex[:8]}"
    user = urlsplit(AMQP_URL).username or "guest"
    for argv in (["add_vhost", vhost], ["set_permissions", "-p", vhost, user, ".*", ".*", ".*"]):
        done = subprocess.run([ctl, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run([ctl, "delete_vhost", vhost], capture_output=True)
            raise ServiceError(f"rabbitmqctl {' '.join(argv)} failed: {done.stderr.strip()}")
    try:
        yield f"{AMQP_URL}/{vhost}"
    finally:
        subprocess.run([ctl, "delete_vhost", vhost], capture_output=True)


def rabbitmq_version(url: str = AMQP_URL + "//") -> str:
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        conn.connect()
        props = getattr(conn.connection, "server_properties", {}) or {}
    version = props.get("version", "?")
    return version.decode() if isinstance(version, bytes) else str(version)
