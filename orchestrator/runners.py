"""Who runs a branch or a fan-in: a worker process's identity, `host:pid:token`, recorded on the rows it
runs, and whether such a process is gone.

The token tells incarnations apart where pids repeat (a container's worker is often pid 1 or 7 after
every restart). A process that finds a running row's runner on its own host and that process gone
takes the work over at once; anywhere else the heartbeat's age decides (`ORCH_STALL_TIMEOUT`).
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Runner:
    host: str
    pid: int
    token: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}"

    @classmethod
    def here(cls) -> Runner:
        """This process, as a new incarnation."""
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:12])

    @classmethod
    def parse(cls, text: str | None) -> Runner | None:
        """The runner recorded as `text`, or None when it is not one (an older row, another format)."""
        if not text:
            return None
        host, _, rest = text.rpartition(":")
        host, _, pid = host.rpartition(":")
        if not host or not pid.isdigit() or not rest:
            return None
        return cls(host, int(pid), rest)

    def is_gone(self, observer: Runner) -> bool:
        """True when `observer`, on the same host, can tell this process no longer exists: its pid is free,
        or the pid is the observer's own with another token (a restarted container's worker). A process
        on another host, or one that cannot be probed, is never presumed gone here."""
        if self.host != observer.host:
            return False
        if self.pid == observer.pid:
            return self.token != observer.token
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # exists, but not ours to signal
            return False
        return _is_zombie(self.pid)


_this_process: Runner | None = None


def this_process() -> str:
    """The runner of a process that was not named by a worker's start (a client, a script): one per
    process, a new one in a forked child."""
    global _this_process
    if _this_process is None or _this_process.pid != os.getpid():
        _this_process = Runner.here()
    return str(_this_process)


def _is_zombie(pid: int) -> bool:
    """A killed process its parent has not reaped yet still answers kill(pid, 0); Linux shows it as Z."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False
