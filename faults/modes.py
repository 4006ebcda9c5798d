"""How big and how long: one frozen set of sizes per mode, so the report can state exactly what ran."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: The product's default ORCH_STALL_TIMEOUT, used for waiting when the suite does not set it.
DEFAULT_STALL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Sizes:
    name: str
    rounds: int | None  # rounds per fault; None: each fault's own (10, SIGKILLs 20)
    wave: int  # jobs in flight when a fault hits, each 8 io branches + 1 cpu branch
    stall_timeout: float | None  # ORCH_STALL_TIMEOUT given to the workers; None: the product's default
    sigstop_seconds: float  # how long a SIGSTOPped worker stays stopped
    terminate_seconds: float  # how long pg_terminate_backend keeps cutting connections
    terminate_every: float  # ... every this many seconds
    outage_seconds: float  # RabbitMQ between stop_app and start_app
    partition_seconds: float  # how long a worker host's link stays cut
    burst_jobs: int  # jobs of the burst, from burst_threads client threads
    job_timeout: float  # seconds every job gets, after the fault is over (and a stall timeout), to be final
    burst_threads: int = 4
    io_branches: int = 8
    io_seconds: tuple[float, float] = (0.3, 0.8)  # each io branch sleeps a random time in this range
    cpu_seconds: float = 0.3  # CPU time of the cpu branch
    in_flight_timeout: float = 20.0  # how long a fault waits for the work it targets to be running

    @property
    def stall(self) -> float:
        return self.stall_timeout or DEFAULT_STALL_TIMEOUT

    def settings(self) -> dict[str, str]:
        """The ORCH_* settings the workers get beyond the deployment's own (none: the product's defaults)."""
        return {} if self.stall_timeout is None else {"ORCH_STALL_TIMEOUT": f"{self.stall_timeout:g}"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MODES: dict[str, Sizes] = {
    # The figures: waves of 20, a 60 s SIGSTOP at the default stall timeout, a minute of
    # pg_terminate_backend, 2,000 jobs from 4 threads.
    "full": Sizes(
        name="full",
        rounds=None,
        wave=20,
        stall_timeout=None,
        sigstop_seconds=60.0,
        terminate_seconds=60.0,
        terminate_every=3.0,
        outage_seconds=5.0,
        partition_seconds=90.0,
        burst_jobs=2000,
        job_timeout=120.0,
    ),
    # One round of each, small waves, a short stall timeout: the round the test suite runs (~2 minutes).
    "quick": Sizes(
        name="quick",
        rounds=1,
        wave=4,
        stall_timeout=5.0,
        sigstop_seconds=10.0,
        terminate_seconds=8.0,
        terminate_every=2.0,
        outage_seconds=5.0,
        partition_seconds=15.0,
        burst_jobs=100,
        job_timeout=25.0,
        io_seconds=(0.3, 0.6),
        cpu_seconds=0.2,
    ),
}
