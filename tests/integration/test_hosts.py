"""Worker hosts as network namespaces (scripts/hosts.sh): pools on two hosts reach PostgreSQL and RabbitMQ
over the bridge, share one job's branches, and nothing of the hosts is left once they are taken down."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench.hosts import SCRIPT, WorkerHosts, worker_hosts
from orchestrator import Orchestrator, Settings, branch
from orchestrator.cli.processes import WorkerProcess, stop_all
from tests.conftest import base_env
from tests.services import postgres_database, rabbitmq_vhost

pytestmark = pytest.mark.integration

CATALOG = "tests.catalog,tests.integration.scaling_catalog"


def _left_behind(hosts: WorkerHosts) -> list[str]:
    """Anything of `hosts` the machine still has: namespaces, links, forwarders, state."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    found = [line for line in netns.splitlines() if line.startswith(f"{hosts.name}-")]
    found += [line for line in links.splitlines() if f" {hosts.name}-" in line]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "socat" in cmdline and f"bind={hosts.gateway}," in cmdline:
            found.append(cmdline)
    return found


def test_pools_on_two_hosts_share_a_job_over_the_bridge(tmp_path: Path) -> None:
    workers: list[WorkerProcess] = []
    with postgres_database("hosts") as url, rabbitmq_vhost() as broker, worker_hosts(2) as hosts:
        # One message per io branch, so that both hosts' io pools take some of the job.
        client_env = base_env(
            tmp_path,
            ORCH_DATABASE_URL=url,
            ORCH_BROKER_URL=broker,
            ORCH_IMPORTS=CATALOG,
            ORCH_IO_CHUNK_SIZE="1",
        )
        orc = Orchestrator(Settings.from_env(client_env), migrate=True)
        host_env = {**client_env, "ORCH_DATABASE_URL": hosts.url(url), "ORCH_BROKER_URL": hosts.url(broker)}
        try:
            # Host 1 runs the three pools, host 2 only an io pool.
            for index, kind in [(1, "io"), (1, "cpu"), (1, "fanin"), (2, "io")]:
                workers.append(
                    hosts.start_worker(
                        index,
                        kind,
                        env=host_env,
                        log_dir=tmp_path / "logs",
                        concurrency=4 if kind == "io" else 1,
                    )
                )
            for worker in workers:
                worker.wait_ready(60)
            branches = [
                branch("tests.integration.scaling_catalog.where", hosts.gateway, 0.3) for _ in range(12)
            ]
            branches.append(branch("tests.integration.scaling_catalog.where_cpu", hosts.gateway))
            view = orc.wait(orc.submit(branches, "jobs.aggregate.collect").id, 60)
            assert view.state == "succeeded", "\n".join(w.log()[-2000:] for w in workers)
            io = [view.result[str(i)] for i in range(12)]
            assert {r["address"] for r in io} == set(hosts.addresses)  # both hosts, over the bridge
            assert view.result["12"]["address"] == hosts.addresses[0]  # the cpu pool is on host 1 only
            assert os.readlink("/proc/self/ns/net") not in {r["netns"] for r in io}
            assert len({r["netns"] for r in io}) == 2
            nodes = {node for reply in orc.app.control.ping(timeout=5) for node in reply}
            assert nodes == {
                "io@" + hosts.name + "-1",
                "cpu@" + hosts.name + "-1",
                "fanin@" + hosts.name + "-1",
                "io@" + hosts.name + "-2",
            }
        finally:
            stop_all(workers)
            orc.app.close()
    assert _left_behind(hosts) == []
    assert not (Path("/run/orchestrator-hosts") / hosts.name).exists()


def test_the_script_refuses_bad_input_clearly() -> None:
    done = subprocess.run([str(SCRIPT), "up", "-n", "Bad_Name", "1"], capture_output=True, text=True)
    assert done.returncode == 1 and "NAME must be 1-8 lowercase letters or digits" in done.stderr
    done = subprocess.run([str(SCRIPT), "exec", "-n", "nosuch", "1", "true"], capture_output=True, text=True)
    assert done.returncode == 1 and "no host nosuch-1" in done.stderr
