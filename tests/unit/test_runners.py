"""Worker process identities, and telling a process on this host is gone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from orchestrator.runners import Runner, this_process


def test_a_runner_reads_back_from_its_text() -> None:
    me = Runner.here()
    assert Runner.parse(str(me)) == me
    assert Runner.parse("io-12@host.example:4711:ab12") == Runner("io-12@host.example", 4711, "ab12")
    for bad in (None, "", "host", "host:pid:token", ":12:tok", "host:12:"):
        assert Runner.parse(bad) is None, bad


def test_gone_means_a_free_pid_or_this_pid_with_another_token_on_this_host_only() -> None:
    me = Runner.here()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host = socket.gethostname()
    assert Runner(host, finished.pid, "t").is_gone(me)
    assert Runner(host, me.pid, "an-earlier-incarnation").is_gone(me)  # a restarted container's pid
    assert not Runner(host, me.pid, me.token).is_gone(me)
    assert not Runner(host, os.getppid(), "t").is_gone(me)  # alive
    assert not Runner(host + "-other", finished.pid, "t").is_gone(me)  # another host: never presumed


def test_a_killed_but_unreaped_process_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, and still a zombie
        assert Runner(socket.gethostname(), child.pid, "t").is_gone(Runner.here())
    finally:
        child.wait()


def test_this_process_is_one_runner_per_process() -> None:
    assert this_process() == this_process()
    assert Runner.parse(this_process()) is not None
