"""Stopping worker processes: one SIGTERM each, then the wait, then SIGKILL only for what hangs."""

from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.cli.processes import spawn, stop_all

# A stand-in for a worker's warm shutdown: it notes every SIGTERM and exits 0 argv[1] seconds after the
# first (a worker still finishing its tasks when stop_all has finished waiting for the one before it).
_WARM_SHUTDOWN = """
import signal, sys, time
lasts = float(sys.argv[1])
stopping = []
def on_term(signum, frame):
    print("TERM", flush=True)
    stopping.append(time.monotonic())
signal.signal(signal.SIGTERM, on_term)
print("ready.", flush=True)
while not stopping or time.monotonic() - stopping[0] < lasts:
    time.sleep(0.01)
sys.exit(0)
"""


def test_stop_all_sends_each_worker_one_sigterm_and_lets_it_exit_cleanly(tmp_path: Path) -> None:
    workers = [
        spawn([sys.executable, "-c", _WARM_SHUTDOWN, str(lasts)], name=f"w{i}", log_dir=tmp_path)
        for i, lasts in enumerate((0.2, 2.0))
    ]
    for w in workers:
        w.wait_for_log("ready.", timeout=30)
    codes = stop_all(workers, timeout=10)
    assert codes == [0, 0], [w.log() for w in workers]
    assert [w.log().count("TERM") for w in workers] == [1, 1]
