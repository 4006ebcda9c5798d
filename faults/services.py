"""Private instances of the services the suite restarts: a PostgreSQL cluster, a redis-server and a
RabbitMQ node of its own, each on free ports under a temporary directory, so that restarting, stopping or
terminating them never disturbs anyone else on the machine.

Binaries are found at run time (PATH, then the Debian layouts such as /usr/lib/postgresql/<version>/bin);
FAULTS_PG_BINDIR points at another PostgreSQL. PostgreSQL refuses to run as root, so a root caller runs
it as the `postgres` user. A RabbitMQ node that cannot start falls back on the shared server (the report
says so): its `stop_app` then stops that server for everyone for a few seconds.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psycopg
import redis
from kombu import Connection

from orchestrator.testing import AMQP_URL, LocalServices, ServiceError

#: How long a service may take to come up (two busy cores: RabbitMQ takes a few seconds).
START_TIMEOUT = 90.0


def free_port() -> int:
    """A port nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, ready: Callable[[], bool], timeout: float, log: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.1)
    raise ServiceError(f"{what} did not come up within {timeout:g}s\n{log()[-2000:]}")


def _tail(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _pg_bindir() -> Path:
    """Where initdb and pg_ctl are: FAULTS_PG_BINDIR, PATH, then the newest Debian/RPM-style install."""
    if env := os.environ.get("FAULTS_PG_BINDIR"):
        return Path(env)
    if on_path := shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin")

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)

    for found in sorted(candidates, key=version, reverse=True):
        if (Path(found) / "initdb").exists():
            return Path(found)
    raise ServiceError("PostgreSQL's initdb and pg_ctl were not found (set FAULTS_PG_BINDIR)")


def _unprivileged_user() -> str | None:
    """PostgreSQL will not run as root: a root caller runs it as `postgres` (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError("running as root, and there is no `postgres` user to run PostgreSQL") from None
    return "postgres"


@dataclass
class PrivatePostgres:
    """A throwaway PostgreSQL cluster: initdb into `root`, listening on 127.0.0.1:`port` only."""

    root: Path
    port: int = field(default_factory=free_port)
    bindir: Path = field(default_factory=_pg_bindir)
    user: str | None = field(default_factory=_unprivileged_user)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 120) -> None:
        """Run a PostgreSQL program; its output goes to a file, never a pipe: a postmaster started by
        `pg_ctl` inherits it and would hold a pipe open forever."""
        out = self.root / "pg_ctl.out"
        with out.open("wb") as sink:
            if self.user is not None:
                shutil.chown(out, self.user)
            done = subprocess.run(
                [str(self.bindir / argv[0]), *argv[1:]],
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                user=self.user,
                cwd=self.root,
            )
        if done.returncode != 0:
            raise ServiceError(f"{' '.join(argv[:2])} failed: {_tail(out).strip()[-2000:]}")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            shutil.chown(self.root, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
            # Three io pools and a client hold many pooled connections (64 per io worker at most).
            "-c max_connections=300"
        )
        self._run(
            *("pg_ctl", "start", "-w", "-t", "60"),
            *("-D", str(self.data), "-l", str(self.log_path), "-o", options),
        )
        self._check()

    def _check(self) -> None:
        _wait("private PostgreSQL", self.accepts, START_TIMEOUT, lambda: _tail(self.log_path))

    def accepts(self) -> bool:
        with psycopg.connect(self.admin_url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True

    def restart(self, mode: str) -> None:
        """`pg_ctl restart -m fast|immediate`: every connection is cut; returns once it accepts again."""
        self._run(
            *("pg_ctl", "restart", "-w", "-t", "60", "-m", mode),
            *("-D", str(self.data), "-l", str(self.log_path)),
        )
        self._check()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(ServiceError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "stop", "-w", "-t", "30", "-m", "fast", "-D", str(self.data), timeout=40)

    def terminate_backends(self, database: str) -> int:
        """pg_terminate_backend of every connection to `database`: how many were cut."""
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).fetchone()
        return int(row[0]) if row else 0

    def version(self) -> str:
        with psycopg.connect(self.admin_url, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"


@dataclass
class PrivateRedis:
    """A redis-server of our own on 127.0.0.1:`port`, a child process in its own session."""

    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "redis.log"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise ServiceError("redis-server is not on the PATH")
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        argv = [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.root), "--dbfilename", "dump.rdb"]
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        _wait("private Redis", self.accepts, START_TIMEOUT, lambda: _tail(self.log_path))

    def accepts(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def shutdown(self, save: bool) -> None:
        """SHUTDOWN SAVE (what a default-configured Redis does on restart: the dataset comes back from its
        RDB file) or SHUTDOWN NOSAVE (an instance without persistence: everything queued is gone)."""
        if self.process is None:
            return
        if not save:
            (self.root / "dump.rdb").unlink(missing_ok=True)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=2)
        with contextlib.suppress(redis.RedisError):
            client.shutdown(save=save, nosave=not save)
        client.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
        if self._log is not None:
            self._log.close()

    def restart(self, save: bool) -> None:
        self.shutdown(save)
        self.start()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        self.shutdown(save=False)
        self.kill()

    def version(self) -> str:
        client = redis.Redis.from_url(self.url)
        try:
            return str(client.info("server").get("redis_version", "?"))
        finally:
            client.close()


def _rabbit_scripts() -> Path | None:
    """The directory of the real rabbitmq-server and rabbitmqctl scripts (Debian puts a wrapper that
    switches to the rabbitmq user on the PATH; the scripts beside it run as anyone)."""
    found = shutil.which("rabbitmq-server")
    if found is None:
        return None
    real = Path(found).resolve()
    return real.parent if (real.parent / "rabbitmqctl").exists() else None


@dataclass
class RabbitNode:
    """A RabbitMQ node of our own (`private`), or the shared server when no private node can start.

    The private node has its own name, ports, database, logs, cookie (HOME) and no plugins; it runs in
    the foreground as our child, in its own session, and is stopped by its node name and then by pid."""

    root: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    private: bool = True
    why_shared: str = ""
    process: subprocess.Popen[bytes] | None = None
    scripts: Path | None = field(default_factory=_rabbit_scripts)
    _log: IO[bytes] | None = None

    @property
    def node(self) -> str:
        return f"faults{self.port}@localhost"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}" if self.private else AMQP_URL

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.root),  # the Erlang cookie of this node and its rabbitmqctl
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.root / "log"),
            RABBITMQ_PID_FILE=str(self.root / "rabbit.pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.root / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(self.root / "rabbitmq-env.conf"),
        )
        return env

    def ctl(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        if self.private and self.scripts is not None:
            cmd = [str(self.scripts / "rabbitmqctl"), "-n", self.node, *argv]
            return subprocess.run(cmd, capture_output=True, text=True, env=self.env(), timeout=timeout)
        shared = shutil.which("rabbitmqctl")
        if shared is None:
            raise ServiceError("rabbitmqctl is not on the PATH: cannot stop or start the broker")
        return subprocess.run([shared, *argv], capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        """Start a private node; when that fails, say why and use the shared server."""
        if self.scripts is None:
            self._use_shared("rabbitmq-server is not installed here")
            return
        try:
            self._start_private()
        except (ServiceError, OSError, subprocess.SubprocessError) as exc:
            self.stop()
            self._use_shared(f"a private node did not start: {str(exc).splitlines()[0]}")

    def _start_private(self) -> None:
        assert self.scripts is not None
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")
        self._log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen(
            [str(self.scripts / "rabbitmq-server")],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            cwd=self.root,
            start_new_session=True,
        )
        self.wait_ready()

    def _use_shared(self, why: str) -> None:
        self.private = False
        self.why_shared = why

    def accepts(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise ServiceError(f"the RabbitMQ node exited with {self.process.returncode}")
        with Connection(self.amqp_url + "//", connect_timeout=2) as conn:
            conn.connect()
        return True

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        _wait("RabbitMQ", self.accepts, timeout, lambda: _tail(self.root / "server.log"))

    def stop_app(self) -> None:
        done = self.ctl("stop_app")
        if done.returncode != 0:
            raise ServiceError(f"rabbitmqctl stop_app failed: {done.stderr.strip()}")

    def start_app(self) -> None:
        done = self.ctl("start_app")
        if done.returncode != 0:
            raise ServiceError(f"rabbitmqctl start_app failed: {done.stderr.strip()}")
        self.wait_ready()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.ctl("stop", timeout=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # its Erlang helpers share the session
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        if self._log is not None:
            self._log.close()
        self.process = None

    def version(self) -> str:
        with Connection(self.amqp_url + "//", connect_timeout=5) as conn:
            conn.connect()
            props = getattr(conn.connection, "server_properties", {}) or {}
        version = props.get("version", "?")
        return version.decode() if isinstance(version, bytes) else str(version)

    @contextlib.contextmanager
    def vhost(self) -> Iterator[str]:
        """The broker URL to use: the private node's default vhost (the node is ours), or a vhost of our own
        on the shared server."""
        if self.private:
            yield self.amqp_url + "//"
            return
        with LocalServices(prefix="faults", amqp_url=self.amqp_url).rabbitmq_vhost() as url:
            yield url

    def describe(self) -> str:
        if self.private:
            return f"private node {self.node} (port {self.port})"
        return f"the shared server ({self.why_shared})"


@dataclass
class Services:
    """The three private services of one run; `start` brings them up in parallel-ish order."""

    root: Path
    postgres: PrivatePostgres = field(init=False)
    redis: PrivateRedis = field(init=False)
    rabbit: RabbitNode = field(init=False)

    def __post_init__(self) -> None:
        self.postgres = PrivatePostgres(self.root / "postgres")
        self.redis = PrivateRedis(self.root / "redis")
        self.rabbit = RabbitNode(self.root / "rabbitmq")

    def start(self) -> None:
        # The PostgreSQL user must reach its data directory through ours (a temporary directory is 0700).
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        # RabbitMQ boots for seconds: start it first and bring the others up meanwhile.
        starting = _Background(self.rabbit.start)
        self.postgres.start()
        self.redis.start()
        starting.join()

    def stop(self) -> None:
        for stop in (self.rabbit.stop, self.redis.stop, self.postgres.stop):
            with contextlib.suppress(Exception):
                stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def namespaces(self) -> LocalServices:
        """Fresh databases in the private cluster (orchestrator.testing does the create and the drop)."""
        return LocalServices(prefix="faults", pg_admin_url=self.postgres.admin_url, redis_url=self.redis.url)

    def versions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        probes: dict[str, tuple[Callable[[], str], str]] = {
            "postgresql": (self.postgres.version, f"private cluster (port {self.postgres.port})"),
            "redis": (self.redis.version, f"private redis-server (port {self.redis.port}), no persistence"),
            "rabbitmq": (self.rabbit.version, self.rabbit.describe()),
        }
        for name, (probe, where) in probes.items():
            try:
                out[name] = f"{probe()}, {where}"
            except Exception as exc:  # a version is nice to have
                out[name] = f"unknown ({type(exc).__name__}), {where}"
        return out


class _Background:
    """Run one call on a thread and re-raise its exception on join."""

    def __init__(self, call: Callable[[], None]) -> None:
        self.error: BaseException | None = None

        def target() -> None:
            try:
                call()
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error
