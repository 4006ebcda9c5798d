"""Worker pools as local subprocesses, started as `orchestrator worker` runs them.

Used by `orchestrator demo`, the integration tests and the bench, so what is demonstrated, tested and
measured is the command users and the compose file run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..errors import OrchestratorError
from ..settings import Settings

KINDS = ("io", "cpu", "fanin")


def default_hostname(kind: str) -> str:
    """`KIND-PID@%h`: unique per process, so two pools of one kind can share a host (the broker refuses a
    second consumer of a node's control queue), and still grouped by kind in Flower and `celery inspect`.
    `orchestrator worker` execs celery in place, so PID is the worker's own process id."""
    return f"{kind}-{os.getpid()}@%h"


def worker_argv(
    kind: str,
    settings: Settings,
    concurrency: int | None = None,
    hostname: str | None = None,
    autoscale: tuple[int, int] | None = None,
) -> list[str]:
    """The celery command line for one pool; `orchestrator worker KIND` prints and runs it. With
    `autoscale` (or ORCH_<KIND>_AUTOSCALE) Celery's autoscaler sizes the pool between MIN and MAX by its
    queue; the prefork and gevent pools can, Celery's thread pool cannot grow or shrink."""
    if kind == "io":
        queue, pool, default = settings.io_queue, settings.io_pool, settings.io_concurrency
    elif kind == "cpu":
        queue, pool, default = settings.cpu_queue, "prefork", settings.cpu_concurrency
    elif kind == "fanin":
        queue, pool, default = settings.fanin_queue, "prefork", settings.fanin_concurrency
    else:
        raise OrchestratorError(f"unknown worker kind {kind!r}: expected one of {', '.join(KINDS)}")
    scale = autoscale or settings.autoscale_for(kind)
    scaling: list[str] = []
    if scale is not None:
        if pool == "threads":
            raise OrchestratorError(
                "the io pool's threads cannot autoscale (Celery's thread pool cannot grow or shrink): set "
                "ORCH_IO_POOL=gevent to autoscale io, or give it a fixed --concurrency"
            )
        most, least = scale
        concurrency, scaling = most, [f"--autoscale={most},{least}"]
    return [
        *("celery", "-A", "orchestrator.celery_app", "worker"),
        *("-Q", queue, "-P", pool, "-c", str(concurrency or default), *scaling),
        *("-n", hostname or default_hostname(kind), "-l", settings.log_level),
        *("--without-mingle", "--without-gossip"),
    ]


#: Database connections an io worker keeps besides one per thread: its main thread's timers (the chord
#: recovery sweep, heartbeats) and a spare. A gevent pool's thousand greenlets share at most IO_POOL_CAP.
IO_POOL_EXTRA = 2
IO_POOL_CAP = 64


def pool_connections(kind: str, settings: Settings, concurrency: int | None = None) -> tuple[int, int]:
    """(kept, burst): the database connections each process of a pool keeps, and may open beyond them for
    a moment. An io worker's threads each run at most one transaction at a time; a prefork child runs one
    task at a time and its parent only timers, so one each. docs/scaling.md has the per-host formula."""
    if kind == "io":
        threads = concurrency or settings.io_concurrency
        return min(threads, IO_POOL_CAP) + IO_POOL_EXTRA, 2
    if kind in ("cpu", "fanin"):
        return 1, 1
    raise OrchestratorError(f"unknown worker kind {kind!r}: expected one of {', '.join(KINDS)}")


def pool_processes(kind: str, settings: Settings, concurrency: int | None = None) -> int:
    """Processes of one pool that connect to the database: an io worker is one (threads or greenlets),
    a prefork pool its parent and a child per slot."""
    if kind == "io":
        return 1
    default = settings.cpu_concurrency if kind == "cpu" else settings.fanin_concurrency
    return (concurrency or default) + 1


def connection_budget(kind: str, settings: Settings, concurrency: int | None = None) -> int:
    """The most connections one pool holds at once with the derived pools: processes x (kept + burst)."""
    kept, burst = pool_connections(kind, settings, concurrency)
    return pool_processes(kind, settings, concurrency) * (kept + burst)


def worker_environment(
    kind: str, settings: Settings, concurrency: int | None, environ: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The environment `orchestrator worker KIND` runs celery in, and what it added: the pool's database
    connections unless ORCH_DB_POOL_SIZE / ORCH_DB_MAX_OVERFLOW are set, and PGAPPNAME (unless set), so
    pg_stat_activity tells the pools' connections apart."""
    kept, burst = pool_connections(kind, settings, concurrency)
    added: dict[str, str] = {}
    if settings.db_pool_size is None:
        added["ORCH_DB_POOL_SIZE"] = str(kept)
    if settings.db_max_overflow is None:
        added["ORCH_DB_MAX_OVERFLOW"] = str(burst)
    if "PGAPPNAME" not in environ:
        added["PGAPPNAME"] = f"orchestrator-{kind}"
    return {**environ, **added}, added


def flower_argv(port: int = 5555, address: str = "127.0.0.1") -> list[str]:
    """Flower reads FLOWER_BASIC_AUTH (and every other FLOWER_* option) from the environment itself."""
    return ["celery", "-A", "orchestrator.celery_app", "flower", f"--port={port}", f"--address={address}"]


def celery_executable() -> str:
    """The `celery` script of this interpreter's environment, so a venv's workers run the venv's code."""
    beside = Path(sys.executable).with_name("celery")
    return str(beside) if beside.exists() else (shutil.which("celery") or "celery")


def orchestrator_executable() -> list[str]:
    beside = Path(sys.executable).with_name("orchestrator")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "orchestrator"]


@dataclass
class WorkerProcess:
    """One worker pool running as a child process in its own session (so it can be signalled whole)."""

    kind: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)
    _terminated: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def argv(self) -> list[str]:
        args = self.process.args
        if isinstance(args, (str, bytes, os.PathLike)):
            return [os.fsdecode(args)]
        return [os.fsdecode(a) for a in args]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise OrchestratorError(
                f"{self.kind} exited with {self.process.returncode}:\n{self.log()[-3000:]}"
            )

    def wait_for_log(self, marker: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log():
                return
            self.check_alive()
            time.sleep(0.05)
        raise OrchestratorError(f"{self.kind}: no {marker!r} after {timeout:g}s:\n{self.log()[-3000:]}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_for_log(" ready.", timeout)

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM, as `docker stop` sends): running tasks finish. Once only: a
        second SIGTERM that lands while the worker's interpreter is exiting (Python has put the default
        handler back by then) kills it with -15 instead of the clean exit it was making."""
        if not self._terminated and self.process.poll() is None:
            self._terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Warm shutdown; SIGKILL if it hangs; either way nothing of its process group outlives it."""
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self.kill()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the worker and its pool children at once, as a crashed host would."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


def spawn(
    argv: list[str],
    *,
    name: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> WorkerProcess:
    """Run `argv` in its own session (so it can be signalled whole), logging to `log_dir/NAME-*.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ if env is None else env),
        cwd=cwd,
        start_new_session=True,
    )
    return WorkerProcess(kind=name, process=process, log_path=log_path, _log=log)


def start_worker(
    kind: str,
    *,
    env: Mapping[str, str] | None = None,
    log_dir: Path,
    concurrency: int | None = None,
    cwd: str | os.PathLike[str] | None = None,
    hostname: str | None = None,
    autoscale: str | None = None,
) -> WorkerProcess:
    """Start `orchestrator worker KIND` as a child process (node name `KIND-PID@host` unless given)."""
    argv = [*orchestrator_executable(), "worker", kind]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    if hostname is not None:
        argv += ["--hostname", hostname]
    if autoscale is not None:
        argv += ["--autoscale", autoscale]
    return spawn(argv, name=kind, log_dir=log_dir, env=env, cwd=cwd)


def start_pools(
    kinds: Iterable[str] = KINDS,
    *,
    env: Mapping[str, str] | None = None,
    log_dir: Path,
    concurrency: Mapping[str, int] | None = None,
    timeout: float = 60.0,
) -> list[WorkerProcess]:
    """Start several pools in parallel and wait until each says it is ready; stop them all on failure."""
    workers = [
        start_worker(k, env=env, log_dir=log_dir, concurrency=(concurrency or {}).get(k)) for k in kinds
    ]
    try:
        for w in workers:
            w.wait_ready(timeout)
    except BaseException:
        stop_all(workers, timeout=5)
        raise
    return workers


def stop_all(workers: Iterable[WorkerProcess], timeout: float = 15.0) -> list[int | None]:
    """Signal every worker first, then wait: shutdowns overlap instead of adding up."""
    workers = list(workers)
    for w in workers:
        w.terminate()
    return [w.stop(timeout) for w in workers]
