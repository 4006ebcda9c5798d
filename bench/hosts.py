"""Worker hosts on this machine (scripts/hosts.sh): network namespaces on a bridge, each its own address,
reaching the local PostgreSQL, RabbitMQ and Redis at the bridge's address through forwarders.

The benchmark's scaling scenario (P9) and tests/integration/test_hosts.py start worker pools on them with
`orchestrator worker`, as on any other host: only the URLs (the gateway instead of 127.0.0.1) and the
node names (the namespaces share the machine's host name) differ.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from orchestrator.cli.processes import WorkerProcess, orchestrator_executable, spawn

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "hosts.sh"


class HostsError(RuntimeError):
    """The hosts could not be made (not root, no socat, ...): the script's own words."""


@dataclass(frozen=True)
class WorkerHosts:
    """A set of hosts made by `scripts/hosts.sh up`: NAME-1 .. NAME-N, and the gateway they reach us at."""

    name: str
    gateway: str
    addresses: tuple[str, ...]  # host i's address is addresses[i - 1]

    def __len__(self) -> int:
        return len(self.addresses)

    def node(self, kind: str, index: int) -> str:
        """A Celery node name of its own per pool and host: the namespaces share the machine's name."""
        return f"{kind}@{self.name}-{index}"

    def url(self, url: str) -> str:
        """`url` (a local service at 127.0.0.1 or localhost) as the hosts reach it: at the gateway."""
        parsed = make_url(url)
        if parsed.host not in ("127.0.0.1", "localhost", None):
            raise HostsError(f"only local services are forwarded to the hosts, not {parsed.host}")
        return parsed.set(host=self.gateway).render_as_string(hide_password=False)

    def argv(self, index: int, argv: Sequence[str]) -> list[str]:
        """`argv` run on host `index` (the script execs it there, so its pid is the command's)."""
        if not 1 <= index <= len(self):
            raise HostsError(f"no host {index} among {len(self)}")
        return [str(SCRIPT), "exec", "-n", self.name, str(index), *argv]

    def cut(self, index: int) -> None:
        """Partition host `index`: its link goes down, its packets are dropped (no reset: connections
        hang, as across a real partition) until `heal`."""
        _script("cut", "-n", self.name, str(index))

    def heal(self, index: int) -> None:
        _script("heal", "-n", self.name, str(index))

    def start_worker(
        self,
        index: int,
        kind: str,
        *,
        env: Mapping[str, str],
        log_dir: Path,
        concurrency: int | None = None,
    ) -> WorkerProcess:
        """`orchestrator worker KIND` on host `index`, named KIND@NAME-INDEX (wait_ready() it)."""
        argv = [*orchestrator_executable(), "worker", kind, "--hostname", self.node(kind, index)]
        if concurrency is not None:
            argv += ["--concurrency", str(concurrency)]
        return spawn(self.argv(index, argv), name=f"{kind}-{self.name}-{index}", log_dir=log_dir, env=env)


def _script(*args: str) -> str:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise HostsError(f"scripts/hosts.sh {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@contextmanager
def worker_hosts(count: int, name: str | None = None, ports: Sequence[int] = ()) -> Iterator[WorkerHosts]:
    """`count` hosts for the block, then every process left on them stopped and everything removed.
    `ports`: the local ports forwarded to the hosts (default: PostgreSQL's, RabbitMQ's and Redis's)."""
    name = name or f"o{uuid.uuid4().hex[:7]}"
    forwarded = ["-p", " ".join(map(str, ports))] if ports else []
    try:
        info = dict(line.split("=", 1) for line in _script("up", "-n", name, *forwarded, str(count)).split())
        yield WorkerHosts(name, info["GATEWAY"], tuple(info[f"HOST_{i}"] for i in range(1, count + 1)))
    finally:
        _script("down", "-n", name)  # also after a failed `up`: it is idempotent
