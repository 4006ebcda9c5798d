"""podman and podman-compose, driven as an operator drives them, for the container tests.

scripts/containers.sh installs and configures podman and makes the local base image; this module finds
what it wrote (ORCH_PODMAN_CONFIG, default ~/.config/celery-orchestrator/podman) and runs
``podman-compose -f docker-compose.yml -f compose.test.yml ...`` and ``podman ...`` with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness import poll

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = (ROOT / "docker-compose.yml", ROOT / "compose.test.yml")
SETUP_HINT = (
    "run scripts/containers.sh first (as root): it installs podman, runc and debootstrap, writes podman's "
    "configuration, makes the local base image and builds the project's image (.ci/run does)"
)
#: Variables of this environment that would change what the compose files say (podman-compose lets the
#: environment win over --env-file): a container stack under test takes its variables from its env file.
_COMPOSE_VARIABLES = ("ORCH_", "FLOWER_", "POSTGRES_", "RABBITMQ_", "HOST_", "COMPOSE_", "PYTHON_IMAGE")

Completed = subprocess.CompletedProcess[str]


class PodmanMissing(RuntimeError):
    """podman, its configuration or podman-compose is not there: the message says how to get them."""


def config_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where scripts/containers.sh writes podman's configuration (the same default as the script)."""
    if environ.get("ORCH_PODMAN_CONFIG"):
        return Path(environ["ORCH_PODMAN_CONFIG"])
    base = Path(environ["XDG_CONFIG_HOME"]) if environ.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "celery-orchestrator" / "podman"


def podman_variables(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """CONTAINERS_CONF, CONTAINERS_STORAGE_CONF and PYTHON_IMAGE, as `scripts/containers.sh env` prints
    them; PodmanMissing, naming the script, when podman or the script's output is not there."""
    if shutil.which("podman") is None:
        raise PodmanMissing(f"podman is not installed: {SETUP_HINT}")
    env_file = config_dir(environ) / "podman.env"
    if not env_file.exists():
        raise PodmanMissing(f"no {env_file}: {SETUP_HINT}")
    values = {}
    for line in env_file.read_text().splitlines():
        key, sep, value = line.removeprefix("export ").partition("=")
        if sep:
            values[key.strip()] = value.strip()
    missing = {"CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF", "PYTHON_IMAGE"} - values.keys()
    if missing:
        raise PodmanMissing(f"{env_file} lacks {', '.join(sorted(missing))}: {SETUP_HINT}")
    return values


def podman_compose_executable() -> str:
    """The podman-compose of this interpreter's environment (the test extras install it)."""
    beside = Path(sys.executable).with_name("podman-compose")
    found = str(beside) if beside.exists() else shutil.which("podman-compose")
    if found is None:
        raise PodmanMissing('podman-compose is not installed: pip install -e ".[test]"')
    return found


@dataclass(frozen=True)
class Project:
    """One compose project (its own container names, pod and image tag) under podman-compose."""

    name: str
    env_file: Path  # the variables the compose files interpolate, in place of .env
    env: dict[str, str]  # the environment podman and podman-compose run in

    @classmethod
    def create(cls, name: str, env_file: Path, environ: Mapping[str, str] = os.environ) -> Project:
        env = {k: v for k, v in environ.items() if not k.startswith(_COMPOSE_VARIABLES)}
        env.update(podman_variables(environ))
        del env["PYTHON_IMAGE"]  # it goes through the env file, with the other compose variables
        return cls(name=name, env_file=env_file, env=env)

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> Completed:
        return self._run(["podman", *args], timeout=timeout, check=check)

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> Completed:
        """`podman-compose --env-file F -p NAME -f docker-compose.yml -f compose.test.yml ARGS...`."""
        files = [a for f in COMPOSE_FILES for a in ("-f", str(f))]
        argv = [podman_compose_executable(), "--env-file", str(self.env_file), "-p", self.name, *files]
        return self._run([*argv, *args], timeout=timeout, check=check)

    def _run(self, argv: Sequence[str], *, timeout: float, check: bool) -> Completed:
        done = subprocess.run(
            list(argv), cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            output = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            raise AssertionError(f"{' '.join(argv)} exited with {done.returncode}:\n{output}")
        return done

    def containers(self, service: str) -> list[str]:
        """The service's containers (every replica, running or not), in replica order."""
        listed = self.podman(
            *("ps", "--all", "--format", "{{.Names}}"),
            *("--filter", f"label=io.podman.compose.project={self.name}"),
            *("--filter", f"label=io.podman.compose.service={service}"),
        ).stdout.split()
        return sorted(listed, key=lambda n: int(n.rsplit("_", 1)[1]))

    def inspect(self, container: str, template: str) -> str:
        return self.podman("inspect", "--format", template, container).stdout.strip()

    def hostname(self, container: str) -> str:
        return self.inspect(container, "{{.Config.Hostname}}")

    def logs(self, container: str) -> str:
        done = self.podman("logs", container, check=False)
        return done.stdout + done.stderr

    def all_logs(self) -> str:
        project = f"label=io.podman.compose.project={self.name}"
        names = self.podman("ps", "--all", "--format", "{{.Names}}", "--filter", project).stdout.split()
        return "\n".join(f"--- {n}\n{self.logs(n)[-3000:]}" for n in names)

    def healthcheck(self, container: str) -> Completed:
        """The container's own healthcheck, run once now (podman runs it on a timer only with systemd)."""
        return self.podman("healthcheck", "run", container, check=False)

    def ready_count(self, container: str) -> int:
        """How many times the container's worker said it was ready (its log spans restarts)."""
        return self.logs(container).count(" ready.")

    def wait_ready(self, container: str, *, readied_before: int = 0, timeout: float = 90) -> None:
        """Until the worker says it is ready, once more than `readied_before` times."""
        poll(
            lambda: True if self.ready_count(container) > readied_before else None,
            timeout,
            f"{container} ready",
            lambda: self.logs(container)[-3000:],
        )

    def wait_healthy(self, container: str, *, readied_before: int = 0, timeout: float = 90) -> None:
        """Until the worker is ready, then until its healthcheck passes: a few tries, as the broker may
        take a moment to route a ping to a consumer that just started."""
        self.wait_ready(container, readied_before=readied_before, timeout=timeout)
        poll(
            lambda: True if self.healthcheck(container).returncode == 0 else None,
            timeout,
            f"{container} healthy",
            lambda: self.logs(container)[-3000:],
        )
