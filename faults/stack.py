"""A deployment under fault: a database of its own in the private PostgreSQL, a broker (the private
RabbitMQ node or the private Redis), the three pools started exactly as `orchestrator worker io|cpu|fanin`
starts them (orchestrator.cli.processes), and a client.

Faults act on pools by role ("io", "cpu", "fanin", and standbys such as "io-2"): a pool is its process
group, so a SIGKILL or SIGSTOP reaches the main process and its prefork children at once, and the pids it
reached are returned, so the checker can tell the runs of a process the fault hit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url

from bench.hosts import WorkerHosts
from orchestrator import Orchestrator, Settings
from orchestrator.cli.processes import KINDS, WorkerProcess, start_pools, start_worker, stop_all

from .services import Services

ROOT = Path(__file__).resolve().parents[1]
#: Pool sizes: io and fanin at the product's defaults, cpu one process per core (its default too).
POOL_SIZES = {"io": 64, "cpu": os.cpu_count() or 1, "fanin": 2}
#: A worker host's pool (the partition's): a fixed size, as the scaling benchmark's hosts have.
HOST_POOL_SIZE = 8
RABBITMQ = "rabbitmq"
REDIS = "redis"


def worker_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Our environment minus the caller's own ORCH_* deployment, plus the repository for `faults`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def group_pids(pgid: int) -> set[int]:
    """Every live process of a process group (a pool: the worker and its prefork children)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            pids.add(int(entry.name))
    return pids


def last_error(log: str) -> str:
    """Why a worker exited: the last CRITICAL line of its log (Celery's "Unrecoverable error"), else the
    last ERROR line, cut short."""
    lines = log.splitlines()
    for level in ("CRITICAL/", "ERROR/"):
        for line in reversed(lines):
            if level in line:
                return line.split("] ", 1)[-1][:200]
    return "no error logged"


def thread_count(pids: set[int]) -> int:
    """Threads of these processes, summed (an io pool's thread pool starts threads as load needs them)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError):
            continue
    return total


def pss_bytes(pids: set[int]) -> int:
    """Resident memory of these processes with shared pages counted once (their PSS, from
    /proc/<pid>/smaps_rollup), summed. Summed VmRSS counts a prefork parent's pages once per child (a cpu
    pool of two: 272 MiB of RSS, 158 MiB of PSS), and a child forked after a poison branch killed one
    counts the parent's grown heap again: a step that is no growth."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            continue
    return total


@dataclass
class Deployment:
    """One deployment: its environment, its client, its pools by role, and every pool it ever ran."""

    name: str
    env: dict[str, str]
    log_dir: Path
    workers: dict[str, WorkerProcess] = field(default_factory=dict)
    retired: list[WorkerProcess] = field(default_factory=list)
    _orc: Orchestrator | None = None

    @property
    def orc(self) -> Orchestrator:
        if self._orc is None:
            # Migrate first: workers on PostgreSQL expect the schema and do not create it.
            self._orc = Orchestrator(Settings.from_env(self.env), migrate=True)
        return self._orc

    @property
    def database(self) -> str:
        return self.orc.store.engine.url.database or ""

    def start(self) -> None:
        assert self.orc is not None
        started = start_pools(KINDS, env=self.env, log_dir=self.log_dir, concurrency=POOL_SIZES, timeout=120)
        self.workers.update({w.kind: w for w in started})

    @staticmethod
    def kind(role: str) -> str:
        return role.split("-")[0]

    def pids(self, role: str) -> set[int]:
        worker = self.workers.get(role)
        return group_pids(worker.pid) if worker is not None and worker.process.poll() is None else set()

    def start_role(self, role: str) -> WorkerProcess:
        kind = self.kind(role)
        worker = start_worker(kind, env=self.env, log_dir=self.log_dir, concurrency=POOL_SIZES[kind])
        self.workers[role] = worker
        worker.wait_ready(120)
        return worker

    def start_on_host(self, role: str, hosts: WorkerHosts, index: int) -> WorkerProcess:
        """The pool `role` on worker host `index`, reaching the deployment's database and broker at the
        hosts' gateway, as a pool on another machine would."""
        kind = self.kind(role)
        env = {
            **self.env,
            "ORCH_DATABASE_URL": hosts.url(self.env["ORCH_DATABASE_URL"]),
            "ORCH_BROKER_URL": hosts.url(self.env["ORCH_BROKER_URL"]),
        }
        worker = hosts.start_worker(index, kind, env=env, log_dir=self.log_dir, concurrency=HOST_POOL_SIZE)
        self.workers[role] = worker
        worker.wait_ready(120)
        return worker

    def service_ports(self) -> tuple[int, int]:
        """The ports of the deployment's database and broker (what a worker host needs forwarded)."""
        db, broker = (make_url(self.env[k]) for k in ("ORCH_DATABASE_URL", "ORCH_BROKER_URL"))
        return db.port or 5432, broker.port or (5672 if broker.drivername == "amqp" else 6379)

    def kill(self, role: str) -> set[int]:
        """SIGKILL the pool's whole process group, as a crashed host would; the pids it reached."""
        worker = self.workers.pop(role)
        hit = group_pids(worker.pid)
        worker.kill()
        self.retired.append(worker)
        return hit

    def pause(self, role: str) -> set[int]:
        """SIGSTOP the pool's process group: alive, holding its messages and connections, doing nothing."""
        worker = self.workers[role]
        hit = group_pids(worker.pid)
        os.killpg(worker.pid, signal.SIGSTOP)
        return hit

    def resume(self, role: str) -> None:
        worker = self.workers.get(role)
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGCONT)

    def retire(self, role: str) -> None:
        """Stop a pool (a standby) with a warm shutdown, SIGKILL if it hangs."""
        worker = self.workers.pop(role, None)
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGCONT)
            worker.stop(timeout=20)
            self.retired.append(worker)

    def exited(self) -> list[str]:
        """The pools of the three kinds that exited on their own: "io: exit 1: <its last error line>"."""
        return [
            f"{kind}: exit {w.process.returncode}: {last_error(w.log())}"
            for kind in KINDS
            if (w := self.workers.get(kind)) is not None and w.process.poll() is not None
        ]

    def ensure_running(self) -> list[str]:
        """Every pool resumed, and any of the three that exited on its own restarted, as a supervisor
        would: the next round starts whole. Returns what exited (see `exited`)."""
        exited = self.exited()
        for role in list(self.workers):
            self.resume(role)
        for kind in KINDS:
            worker = self.workers.get(kind)
            if worker is not None and worker.process.poll() is not None:
                self.retired.append(self.workers.pop(kind))
            if kind not in self.workers:
                self.start_role(kind)
        return exited

    def silent_since(self, moment: float) -> dict[str, float]:
        """Pools whose log has not grown since before `moment` (wall clock): {role: seconds before it}. A
        pool with work queued that logs nothing has stopped consuming."""
        out = {}
        for role, worker in self.workers.items():
            with contextlib.suppress(OSError):
                last = worker.log_path.stat().st_mtime
                if last < moment:
                    out[role] = round(moment - last, 1)
        return out

    def restart_all(self) -> None:
        """Every pool stopped (standbys too) and the three started afresh: what a failed round left
        behind (a wedged consumer, a poison message looping) must not be judged as the next one."""
        for role in list(self.workers):
            self.resume(role)
        stop_all(self.workers.values(), timeout=20)
        self.retired.extend(self.workers.values())
        self.workers.clear()
        self.start()

    def all_workers(self) -> list[WorkerProcess]:
        return [*self.retired, *self.workers.values()]

    def log_offsets(self) -> dict[Path, int]:
        return {w.log_path: w.log_path.stat().st_size for w in self.all_workers() if w.log_path.exists()}

    def logs_since(self, offsets: Mapping[Path, int]) -> str:
        """What every pool (including those started since) logged after `offsets`."""
        parts = []
        for w in self.all_workers():
            if not w.log_path.exists():
                continue
            with w.log_path.open("rb") as f:
                f.seek(offsets.get(w.log_path, 0))
                parts.append(f.read().decode(errors="replace"))
        return "\n".join(parts)

    def memory(self) -> dict[str, tuple[int, int, int]]:
        """{role: (pid of the pool, PSS bytes and threads of its process group)} for the pools running now."""
        out = {}
        for role, worker in self.workers.items():
            if worker.process.poll() is None:
                group = group_pids(worker.pid)
                out[role] = (worker.pid, pss_bytes(group), thread_count(group))
        return out

    def stop(self) -> None:
        for role in list(self.workers):
            self.resume(role)
        stop_all(self.workers.values(), timeout=20)
        self.retired.extend(self.workers.values())
        self.workers.clear()
        if self._orc is not None:
            self._orc.app.close()
            self._orc.store.engine.dispose()


@contextmanager
def deployment(
    name: str, services: Services, log_dir: Path, mark_dir: Path, settings: Mapping[str, str]
) -> Iterator[Deployment]:
    """A running deployment on the private services (`rabbitmq`: PostgreSQL + RabbitMQ, the production
    stack; `redis`: PostgreSQL + Redis as broker at its default visibility timeout), removed afterwards."""
    broker = services.rabbit.vhost() if name == RABBITMQ else nullcontext(services.redis.url + "/0")
    home = log_dir.parent / f"home-{name}"
    home.mkdir(parents=True, exist_ok=True)
    with services.namespaces().postgres_database(name) as db, broker as broker_url:
        env = worker_env(
            {
                "ORCH_HOME": str(home),
                "ORCH_DATABASE_URL": db,
                "ORCH_BROKER_URL": broker_url,
                "ORCH_IMPORTS": "faults.catalog",
                "ORCH_LOG_LEVEL": "INFO",
                "FAULTS_MARK_DIR": str(mark_dir),
                **settings,
            }
        )
        dep = Deployment(name, env, log_dir)
        try:
            dep.start()
            yield dep
        finally:
            dep.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate()` until it is true or `timeout` passes; whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
