"""PgBouncer (Debian's `pgbouncer` package) in front of the local PostgreSQL, started on a port of its own
and stopped by pid: for the tests that run the orchestrator through it, and for the benchmark, which
reads its counters (SHOW STATS: transactions and queries per database) to count round trips per job.

Every database of the PostgreSQL behind it is reachable under its own name (a `*` entry), as the user the
client names, with trust authentication as the local test PostgreSQL has it. PgBouncer refuses to run as
root; run as root, it runs as the `postgres` user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

INSTALL = "apt-get update && apt-get install -y pgbouncer"


class PgBouncerError(RuntimeError):
    """PgBouncer is missing or did not start; the message says why (and its log)."""


def executable() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise PgBouncerError(f"pgbouncer is not installed ({INSTALL}; .ci/run installs it)")
    return found


@dataclass
class PgBouncer:
    """A running PgBouncer: `url(direct)` is a database URL through it."""

    port: int
    pool_mode: str
    process: subprocess.Popen[bytes]
    directory: Path

    def url(self, direct_url: str) -> str:
        """`direct_url` (a database of the PostgreSQL behind us) through PgBouncer."""
        return (
            make_url(direct_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)
        )

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def show(self, what: str) -> list[dict[str, Any]]:
        """SHOW STATS, SHOW POOLS, ... on the admin console (simple query protocol only: ClientCursor)."""
        conninfo = f"postgresql://postgres@127.0.0.1:{self.port}/pgbouncer"
        with (
            psycopg.connect(conninfo, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn,
            conn.cursor() as cursor,
        ):
            cursor.execute(f"SHOW {what}")
            names = [c.name for c in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def stats(self, database: str) -> dict[str, int]:
        """Counters of one database since start: total_xact_count, total_query_count, ..."""
        for row in self.show("STATS"):
            if row.get("database") == database:
                return {k: int(v) for k, v in row.items() if k.startswith("total_")}
        return {}

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM); SIGKILL if it hangs. Its directory goes too."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(directory: Path, port: int, upstream: tuple[str, int], pool_mode: str, pool_size: int) -> str:
    host, upstream_port = upstream
    return f"""\
[databases]
* = host={host} port={upstream_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "users.txt"}
admin_users = postgres
stats_users = postgres
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_client_conn = 2000
ignore_startup_parameters = extra_float_digits
idle_transaction_timeout = 10
logfile = {directory / "pgbouncer.log"}
"""


def start(
    pg_admin_url: str = "postgresql://postgres@127.0.0.1:5432/postgres",
    *,
    pool_mode: str = "transaction",
    pool_size: int = 20,
    timeout: float = 15.0,
) -> PgBouncer:
    """Start PgBouncer in front of the PostgreSQL of `pg_admin_url` (its user must exist there)."""
    binary = executable()
    admin = make_url(pg_admin_url)
    # Not under the caller's temporary directory: it may be private to root, and we may run as postgres.
    directory = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    user = admin.username or "postgres"
    (directory / "users.txt").write_text(f'"{user}" ""\n"postgres" ""\n')
    as_user: str | None = None
    if os.geteuid() == 0:
        as_user = "postgres"
        entry = pwd.getpwnam(as_user)
        for path in (directory, *directory.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    for _ in range(3):  # a free port may be taken between looking and listening: try another
        port = _free_port()
        config = directory / "pgbouncer.ini"
        config.write_text(
            _config(directory, port, (admin.host or "127.0.0.1", admin.port or 5432), pool_mode, pool_size)
        )
        if as_user is not None:
            os.chown(config, pwd.getpwnam(as_user).pw_uid, pwd.getpwnam(as_user).pw_gid)
        process = subprocess.Popen(
            [binary, str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=as_user,
            start_new_session=True,
        )
        bouncer = PgBouncer(port, pool_mode, process, directory)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return bouncer
            time.sleep(0.05)
        log = bouncer.log()
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if "Address already in use" not in log:
            shutil.rmtree(directory, ignore_errors=True)
            raise PgBouncerError(f"pgbouncer did not start on port {port}:\n{log[-2000:]}")
    shutil.rmtree(directory, ignore_errors=True)
    raise PgBouncerError("pgbouncer found no free port")


@contextmanager
def running(
    pg_admin_url: str = "postgresql://postgres@127.0.0.1:5432/postgres",
    *,
    pool_mode: str = "transaction",
    pool_size: int = 20,
) -> Iterator[PgBouncer]:
    """PgBouncer for the block, stopped (by pid) afterwards."""
    bouncer = start(pg_admin_url, pool_mode=pool_mode, pool_size=pool_size)
    try:
        yield bouncer
    finally:
        bouncer.stop()
