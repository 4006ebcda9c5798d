"""Branch tasks for the scaling tests (worker hosts, the connection budget), loaded through ORCH_IMPORTS."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from orchestrator import Settings, cpu_task, database, io_task


def _whereabouts(gateway: str) -> dict[str, Any]:
    """The address this host reaches `gateway` from, and its network namespace: which host ran it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((gateway, 9))  # UDP: nothing is sent, the kernel only picks the route
        address = probe.getsockname()[0]
    return {"address": address, "netns": os.readlink("/proc/self/ns/net"), "pid": os.getpid()}


@io_task
def where(gateway: str, seconds: float = 0.0) -> dict[str, Any]:
    time.sleep(seconds)
    return _whereabouts(gateway)


@cpu_task
def where_cpu(gateway: str) -> dict[str, Any]:
    return _whereabouts(gateway)


@io_task
def hold_connection(seconds: float) -> int:
    """Hold one of this worker's pooled database connections for `seconds`, as a long transaction would:
    a pool smaller than the branches running at once makes them wait for one."""
    with database.get_engine(Settings.from_env().database_url).connect() as conn:
        time.sleep(seconds)
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
