"""Fresh, private namespaces on local services for tests and benchmarks (cf. celery.contrib.testing).

Each context manager creates a PostgreSQL database, a Redis database or a RabbitMQ vhost of its own and
removes it afterwards, so rows or queued messages left by an earlier run (or by one running at the same
time) cannot feed its workers or skew a figure. Where the services are is the caller's to say:
``LocalServices.from_env("TEST", prefix="orch_test")`` reads TEST_PG_ADMIN_URL, TEST_REDIS_URL and
TEST_AMQP_URL, and falls back on the local defaults below.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg
import redis
from kombu import Connection
from psycopg import sql
from psycopg.abc import Query
from sqlalchemy.engine import make_url

from . import database

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672"


class ServiceError(RuntimeError):
    """A local service is missing or refused us; the message says which and how to point elsewhere."""


@dataclass(frozen=True)
class LocalServices:
    """The PostgreSQL, Redis and RabbitMQ a caller uses, and the prefix of the names it creates there."""

    prefix: str  # "orch_test": databases orch_test_<label>_<hex>, vhosts orch-test-<hex>
    pg_admin_url: str = PG_ADMIN_URL  # a database to connect to for CREATE and DROP DATABASE
    redis_url: str = REDIS_URL  # without a database index
    amqp_url: str = AMQP_URL  # without a vhost
    env_prefix: str = ""  # where the URLs came from, named in error messages: "set BENCH_REDIS_URL"

    @classmethod
    def from_env(cls, env_prefix: str, prefix: str, environ: Mapping[str, str] = os.environ) -> LocalServices:
        """The services named by <env_prefix>_PG_ADMIN_URL, _REDIS_URL and _AMQP_URL, else the defaults."""
        return cls(
            prefix=prefix,
            pg_admin_url=environ.get(f"{env_prefix}_PG_ADMIN_URL", PG_ADMIN_URL),
            redis_url=environ.get(f"{env_prefix}_REDIS_URL", REDIS_URL),
            amqp_url=environ.get(f"{env_prefix}_AMQP_URL", AMQP_URL),
            env_prefix=env_prefix,
        )

    def _refused(self, service: str, url: str, variable: str, exc: Exception) -> ServiceError:
        hint = f" (set {self.env_prefix}_{variable})" if self.env_prefix else ""
        return ServiceError(database.redact(f"{service} at {url}{hint}: {exc}", url))

    # --- PostgreSQL -------------------------------------------------------------------------------------

    def _pg_admin(self, query: Query) -> str:
        """Run one statement as the admin (outside a transaction); its first value, if it returns rows."""
        try:
            with psycopg.connect(self.pg_admin_url, autocommit=True, connect_timeout=5) as conn:
                cursor = conn.execute(query)
                row = cursor.fetchone() if cursor.description else None
        except psycopg.Error as exc:
            raise self._refused("PostgreSQL", self.pg_admin_url, "PG_ADMIN_URL", exc) from exc
        return str(row[0]) if row else ""

    @contextmanager
    def postgres_database(self, label: str = "") -> Iterator[str]:
        """A new empty database (SQLAlchemy psycopg URL), dropped afterwards with its connections forced.

        Engines this process opened on it are disposed of first, so none is left pointing at nothing."""
        name = "_".join(filter(None, [self.prefix, label, uuid.uuid4().hex[:10]]))
        self._pg_admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            url = make_url(self.pg_admin_url).set(drivername="postgresql+psycopg", database=name)
            yield url.render_as_string(hide_password=False)
        finally:
            for key in [k for k in database._engines if make_url(k).database == name]:
                database._engines.pop(key).dispose()
            self._pg_admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def postgres_version(self) -> str:
        return self._pg_admin("SHOW server_version") or "?"

    # --- Redis ------------------------------------------------------------------------------------------

    def _redis(self, index: int | None = None) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url if index is None else f"{self.redis_url}/{index}")

    @contextmanager
    def redis_database(self, index: int) -> Iterator[str]:
        """Redis database `index`, emptied before and after: for a caller that owns that index."""
        client = self._redis(index)
        try:
            client.flushdb()
        except redis.RedisError as exc:
            client.close()
            raise self._refused("Redis", self.redis_url, "REDIS_URL", exc) from exc
        with _emptied_afterwards(client):
            yield f"{self.redis_url}/{index}"

    @contextmanager
    def claim_redis_database(self, indexes: Sequence[int], claim_key: str) -> Iterator[str]:
        """The first empty database among `indexes`, claimed by setting `claim_key` with NX (so two runs
        never share one), emptied afterwards."""
        token = uuid.uuid4().hex
        for index in indexes:
            client = self._redis(index)
            try:
                claimed = client.dbsize() == 0 and bool(client.set(claim_key, token, nx=True))
            except redis.RedisError as exc:
                client.close()
                raise self._refused("Redis", self.redis_url, "REDIS_URL", exc) from exc
            if claimed:
                break
            client.close()
        else:
            message = f"no empty Redis database among {tuple(indexes)} at {self.redis_url}"
            raise ServiceError(database.redact(message, self.redis_url))
        with _emptied_afterwards(client):
            yield f"{self.redis_url}/{index}"

    def redis_version(self) -> str:
        client = self._redis()
        try:
            return str(client.info("server").get("redis_version", "?"))
        finally:
            client.close()

    # --- RabbitMQ ---------------------------------------------------------------------------------------

    @contextmanager
    def rabbitmq_vhost(self) -> Iterator[str]:
        """A vhost of our own (deleted afterwards), so no queue left by another run can feed our workers."""
        ctl = shutil.which("rabbitmqctl")
        if ctl is None:  # a remote broker: share its default vhost
            yield self.amqp_url + "//"
            return
        vhost = f"{self.prefix.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
        user = urlsplit(self.amqp_url).username or "guest"
        for argv in (["add_vhost", vhost], ["set_permissions", "-p", vhost, user, ".*", ".*", ".*"]):
            done = subprocess.run([ctl, *argv], capture_output=True, text=True)
            if done.returncode != 0:
                subprocess.run([ctl, "delete_vhost", vhost], capture_output=True)
                raise ServiceError(f"rabbitmqctl {' '.join(argv)} failed: {done.stderr.strip()}")
        try:
            yield f"{self.amqp_url}/{vhost}"
        finally:
            subprocess.run([ctl, "delete_vhost", vhost], capture_output=True)

    def rabbitmq_version(self) -> str:
        with Connection(self.amqp_url + "//", connect_timeout=5) as conn:
            conn.connect()
            props = getattr(conn.connection, "server_properties", {}) or {}
        version = props.get("version", "?")
        return version.decode() if isinstance(version, bytes) else str(version)


@contextmanager
def _emptied_afterwards(client: redis.Redis) -> Iterator[None]:
    try:
        yield
    finally:
        client.flushdb()
        client.close()
