"""docker-compose.yml, read the way `docker compose` reads it, so tests can run its services as processes.

There is no Docker engine on the test machines: the integration tests start each compose service's
command as a local process instead, with the service's environment from the compose file and the
container hostnames (``postgres``, ``rabbitmq``, ...) replaced by the local services under test.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from ruamel.yaml import YAML

from orchestrator.cli.processes import (
    WorkerProcess,
    celery_executable,
    orchestrator_executable,
    spawn,
    stop_all,
)

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

WORKER_SERVICES = {"io": "worker-io", "cpu": "worker-cpu", "fanin": "worker-fanin"}
MIGRATE_SERVICE = "migrate"
FLOWER_SERVICE = "flower"


class ComposeError(Exception):
    """The compose file cannot be turned into a local process (a missing variable, an unmapped host)."""


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as data, YAML anchors and merge keys resolved, nothing interpolated."""
    data = YAML(typ="safe", pure=True).load(path.read_text())
    if not isinstance(data, dict):
        raise ComposeError(f"{path.name}: expected a mapping at the top level")
    return data


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """KEY=VALUE lines of a compose env file (comments and blank lines skipped, one level of quotes)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ComposeError(f"{path.name}:{number}: not KEY=VALUE: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def required_variables(text: str) -> set[str]:
    """Names used as ``${NAME:?message}`` or ``${NAME?message}``: compose refuses to run without them."""
    return {m["braced"] for m in _VARIABLE.finditer(text) if m["op"] in (":?", "?")}


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation: $$, $NAME, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error},
    ${NAME?error}, ${NAME:+alternative}, ${NAME+alternative} (no nesting)."""

    def replace(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["plain"]
        value = variables.get(name)
        op, arg = m["op"], m["arg"] or ""
        empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if empty else str(value)
        if op in (":?", "?"):
            if empty:
                raise ComposeError(f"required variable {name} is missing a value: {arg}")
            return str(value)
        if op in (":+", "+"):
            return "" if empty else arg
        return "" if value is None else value

    if "${" in text and any("$" in (m["arg"] or "") for m in _VARIABLE.finditer(text)):
        raise ComposeError(f"nested interpolation is not supported here: {text!r}")
    return _VARIABLE.sub(replace, text)


def interpolate_tree(value: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate(value, variables)
    if isinstance(value, list):
        return [interpolate_tree(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: interpolate_tree(v, variables) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ComposeService:
    """One service of the compose file as a local process would run it."""

    name: str
    command: list[str]  # exactly as written in the compose file
    environment: dict[str, str]  # interpolated, container hostnames replaced by local services
    healthcheck: list[str] | None = None  # interpolated healthcheck test (["CMD", ...] or ["CMD-SHELL", ...])

    def local_argv(self, *extra: str) -> list[str]:
        """The command with its program resolved in this interpreter's environment (its venv scripts)."""
        program, *rest = self.command
        if program == "orchestrator":
            return [*orchestrator_executable(), *rest, *extra]
        if program == "celery":
            return [celery_executable(), *rest, *extra]
        raise ComposeError(f"{self.name}: no local counterpart for the program {program!r}")

    def healthcheck_argv(self) -> list[str]:
        if not self.healthcheck:
            raise ComposeError(f"{self.name} has no healthcheck")
        kind, *rest = self.healthcheck
        if kind == "CMD-SHELL":
            return ["/bin/sh", "-c", *rest]
        if kind == "CMD":
            return rest
        raise ComposeError(f"{self.name}: healthcheck test {self.healthcheck!r}")


def compose_service(
    name: str,
    *,
    database_url: str,
    broker_url: str,
    variables: Mapping[str, str] | None = None,
    redis_url: str | None = None,
    path: Path = COMPOSE_FILE,
) -> ComposeService:
    """The command argv and environment of one compose service, mapped onto local services.

    ``variables`` play the part of the .env file (default: .env.example). An environment value that is
    a URL to a container host becomes the given local URL: ``postgres`` -> ``database_url``,
    ``rabbitmq`` -> ``broker_url``, ``redis`` -> ``redis_url``; a URL to any other service of the
    file is an error, so a new dependency cannot silently point a test process at nothing.
    """
    compose = load_compose(path)
    services = compose.get("services") or {}
    if name not in services:
        raise ComposeError(f"{path.name} has no service {name!r}")
    spec = services[name]
    variables = read_env_file() if variables is None else variables
    command = spec.get("command")
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        raise ComposeError(f"{name}: command must be an argv list, got {command!r}")
    raw_env = spec.get("environment") or {}
    if not isinstance(raw_env, dict):
        raise ComposeError(f"{name}: environment must be a mapping")
    local = {"postgres": database_url, "rabbitmq": broker_url}
    if redis_url is not None:
        local["redis"] = redis_url
    environment: dict[str, str] = {}
    for key, raw in raw_env.items():
        if raw is None:
            raise ComposeError(f"{name}: {key} has no value (it would be copied from the host)")
        value = interpolate(str(raw).lower() if isinstance(raw, bool) else str(raw), variables)
        host = urlsplit(value).hostname if "://" in value else None
        if host in services:
            if host not in local:
                raise ComposeError(f"{name}: {key} points at container {host!r}, which has no local mapping")
            value = local[host]
        environment[key] = value
    check = (spec.get("healthcheck") or {}).get("test")
    healthcheck = None if check is None else [interpolate(str(a), variables) for a in check]
    return ComposeService(
        name=name,
        command=[interpolate(a, variables) for a in command],
        environment=environment,
        healthcheck=healthcheck,
    )


def local_environment(service: ComposeService, home: Path, **extra: str) -> dict[str, str]:
    """What a local process of `service` sees: this environment minus ORCH_*/FLOWER_* (a container
    starts clean), the service's environment, and a private ORCH_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "FLOWER_"))}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(filter(None, [bin_dir, env.get("PATH")]))
    env.update(service.environment)
    env["ORCH_HOME"] = str(home)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_service(service: ComposeService, *, env: Mapping[str, str], log_dir: Path) -> WorkerProcess:
    """Start the service's compose command as a child in a new session."""
    return spawn(service.local_argv(), name=service.name, env=env, log_dir=log_dir, cwd=log_dir)


def wait_http_ok(url: str, process: WorkerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        process.check_alive()
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return
            last = response.status_code
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.1)
    raise ComposeError(f"{url} not answering 200 after {timeout:g}s ({last!r}):\n{process.log()[-3000:]}")


@dataclass
class LocalStack:
    """The compose project's services as local processes on the test machine's PostgreSQL and RabbitMQ."""

    services: dict[str, ComposeService]
    env: dict[str, dict[str, str]]  # local environment per service
    processes: dict[str, WorkerProcess]
    flower_url: str
    flower_auth: tuple[str, str]
    migrate_output: str

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.log()[-4000:]}" for name, p in self.processes.items())


@contextlib.contextmanager
def local_stack(
    *,
    database_url: str,
    broker_url: str,
    home: Path,
    flower_auth: tuple[str, str] = ("user", "secret"),
    timeout: float = 60.0,
) -> Iterator[LocalStack]:
    """Run the compose project as `docker compose up` would, in dependency order: migrate to completion,
    then the three worker pools and Flower, each from its compose command and environment.

    Flower listens on a free local port (FLOWER_PORT) instead of the container's 0.0.0.0:5555.
    """
    variables = {**read_env_file(), "FLOWER_BASIC_AUTH": ":".join(flower_auth)}
    names = [MIGRATE_SERVICE, *WORKER_SERVICES.values(), FLOWER_SERVICE]
    services = {
        n: compose_service(n, database_url=database_url, broker_url=broker_url, variables=variables)
        for n in names
    }
    envs = {n: local_environment(s, home) for n, s in services.items()}
    migrate = subprocess.run(
        services[MIGRATE_SERVICE].local_argv(),
        env=envs[MIGRATE_SERVICE],
        cwd=home,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if migrate.returncode != 0:
        raise ComposeError(f"migrate exited with {migrate.returncode}:\n{migrate.stdout}{migrate.stderr}")
    log_dir = home / "logs"
    port = free_port()
    processes: dict[str, WorkerProcess] = {}
    try:
        for n in WORKER_SERVICES.values():
            processes[n] = start_service(services[n], env=envs[n], log_dir=log_dir)
        # `orchestrator flower` takes its port and address from the environment, so the compose command
        # runs unchanged; only where it listens differs from the container's 0.0.0.0:5555.
        flower_env = {**envs[FLOWER_SERVICE], "FLOWER_PORT": str(port), "FLOWER_ADDRESS": "127.0.0.1"}
        processes[FLOWER_SERVICE] = start_service(services[FLOWER_SERVICE], env=flower_env, log_dir=log_dir)
        for n in WORKER_SERVICES.values():
            processes[n].wait_ready(timeout)
        flower_url = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{flower_url}/healthcheck", processes[FLOWER_SERVICE], timeout)
        yield LocalStack(
            services=services,
            env=envs,
            processes=processes,
            flower_url=flower_url,
            flower_auth=flower_auth,
            migrate_output=migrate.stdout + migrate.stderr,
        )
    finally:
        stop_all(processes.values(), timeout=20)
