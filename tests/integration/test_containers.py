"""docker-compose.yml for real: the image built from the Dockerfile, the stack run by podman-compose.

scripts/containers.sh (run by .ci/run before the tests) installs and configures podman and makes a local
Debian base image with Debian's Python, since no image registry is reachable here; compose.test.yml runs
the project's own services (commands, environment, healthchecks, restart policies, stop grace periods all
docker-compose.yml's) against this machine's PostgreSQL and RabbitMQ: a fresh database and vhost for the
module. The tests operate the stack from the outside, as an operator would: podman-compose and podman,
the Python API from the host, Flower over its published port.

How the stack comes up: podman-compose turns `depends_on` into podman's `--requires`, and podman applies
no restart policy to a container whose required container is not running. Every worker requires
`migrate`, which has exited once it is done, so a crashed worker would never come back. The stack is
brought up as the README tells podman users: `up -d --no-deps migrate`, wait for it to exit, then
`up -d --no-deps` the workers and Flower. Restarts are podman's own (conmon runs `podman container
cleanup`, which applies the policy): no systemd and no helper. Healthchecks run on demand (`podman
healthcheck run`): podman schedules them only through systemd timers, and there is no systemd here.

The io pools are 4 threads (ORCH_IO_CONCURRENCY, a .env setting) so that a few branches fill them.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from orchestrator import Orchestrator, Settings, branch
from orchestrator.database import alembic_config, get_engine
from orchestrator.models import Base
from tests.compose import WORKER_SERVICES, free_port, load_compose
from tests.harness import poll
from tests.podman import ROOT, PodmanMissing, Project, podman_compose_executable, podman_variables
from tests.services import postgres_database, rabbitmq_vhost

# Building the image on a machine whose build cache is cold takes a minute or more before the first test.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

IO_CONCURRENCY = 4
# Seconds an io branch sleeps where the stack is stopped or killed under it: long enough that it still
# runs when the signal arrives, however busy the machine.
SLOW = 6
LOOPBACK = {"127.0.0.1", "localhost"}  # slirp4netns forwards 10.0.2.2 to the host's 127.0.0.1
# The probe the image's own Python runs: who it runs as, where the package and its migrations are.
IMAGE_PROBE = """
import importlib.metadata, importlib.util, json, os, orchestrator
from orchestrator.database import migrations_location
dist = importlib.metadata.distribution("celery-orchestrator")
print(json.dumps({
    "uid": os.getuid(),
    "package": orchestrator.__file__,
    "direct_url": json.loads(dist.read_text("direct_url.json") or "{}"),
    "migrations": str(migrations_location()),
    "versions": sorted(p.name for p in (migrations_location() / "versions").glob("*.py")),
    "tests": importlib.util.find_spec("tests") is not None,
    "sources": os.path.exists("/src"),
}))
"""


@dataclass
class ContainerStack:
    """The compose project under test, and how the host reaches what its containers use."""

    project: Project
    image: str
    migrate_exit_code: int
    database_url: str  # the host's view of the database the containers use
    broker_url: str  # likewise for the vhost
    flower_url: str
    flower_auth: tuple[str, str]
    home: Path

    def container(self, service: str) -> str:
        (name, *_) = self.project.containers(service)
        return name

    def node(self, kind: str, container: str) -> str:
        """The Celery node a worker container runs: KIND@%h, %h its hostname."""
        return f"{kind}@{self.project.hostname(container)}"

    @contextmanager
    def client(self, **extra: str) -> Iterator[Orchestrator]:
        """The Python API on the host, on the stack's database and vhost (no migration of its own)."""
        env = {
            "ORCH_DATABASE_URL": self.database_url,
            "ORCH_BROKER_URL": self.broker_url,
            "ORCH_HOME": str(self.home),
            **extra,
        }
        orc = Orchestrator(Settings.from_env(env))
        try:
            yield orc
        finally:
            orc.app.close()

    def logs(self) -> str:
        return self.project.all_logs()


def _compose_variables(database_url: str, broker_url: str) -> dict[str, str]:
    """The .env of the stack: the compose file's own URLs (…@postgres:5432/DB, …@rabbitmq:5672/VHOST)
    then name this machine's database and vhost, postgres and rabbitmq resolving to its loopback."""
    db = make_url(database_url)
    amqp = urlsplit(broker_url)
    if db.host not in LOOPBACK or (db.port or 5432) != 5432:
        pytest.fail(f"the containers reach PostgreSQL at the host's 127.0.0.1:5432, not {db.host}:{db.port}")
    if amqp.hostname not in LOOPBACK or (amqp.port or 5672) != 5672:
        pytest.fail(f"the containers reach RabbitMQ at the host's 127.0.0.1:5672, not {amqp.hostname}")
    return {
        "POSTGRES_USER": db.username or "postgres",
        # Required by the compose file; the local server's trust authentication does not look at it.
        "POSTGRES_PASSWORD": db.password or "unused-trust-auth",
        "POSTGRES_DB": str(db.database),
        "RABBITMQ_USER": unquote(amqp.username or "guest"),
        "RABBITMQ_PASSWORD": unquote(amqp.password or "guest"),
        "RABBITMQ_VHOST": unquote(amqp.path[1:]) or "/",
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerStack]:
    try:
        base_image = podman_variables()["PYTHON_IMAGE"]
        podman_compose_executable()
    except PodmanMissing as exc:
        pytest.fail(str(exc))
    home = tmp_path_factory.mktemp("containers")
    run = uuid.uuid4().hex[:8]
    image = f"localhost/celery-orchestrator:test-{run}"
    flower_auth = ("ops", secrets.token_urlsafe(12))
    flower_port = free_port()
    with postgres_database() as database_url, rabbitmq_vhost() as broker_url:
        variables = {
            **_compose_variables(database_url, broker_url),
            "FLOWER_BASIC_AUTH": ":".join(flower_auth),
            "ORCH_WEB_BASIC_AUTH": f"ops:{secrets.token_urlsafe(12)}",  # required by the file; web is not run
            "HOST_FLOWER_ADDRESS": f"127.0.0.1:{flower_port}",
            "HOST_WEB_ADDRESS": f"127.0.0.1:{free_port()}",
            "ORCH_IO_CONCURRENCY": str(IO_CONCURRENCY),
            "ORCH_IMAGE": image,
            "PYTHON_IMAGE": base_image,
        }
        env_file = home / "compose.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in variables.items()))
        project = Project.create(f"orch-test-{run}", env_file)
        if project.podman("image", "exists", base_image, check=False).returncode != 0:
            pytest.fail(f"no base image {base_image}: run scripts/containers.sh (as root) to make it")
        try:
            project.compose("build", "migrate", timeout=900)
            project.compose("up", "-d", "--no-deps", "migrate")
            (migrate,) = project.containers("migrate")
            exit_code = int(project.podman("wait", migrate, timeout=180).stdout.strip())
            project.compose("up", "-d", "--no-deps", *WORKER_SERVICES.values(), "flower")
            running = ContainerStack(
                project=project,
                image=image,
                migrate_exit_code=exit_code,
                database_url=database_url,
                broker_url=broker_url,
                flower_url=f"http://127.0.0.1:{flower_port}",
                flower_auth=flower_auth,
                home=home,
            )
            for service in WORKER_SERVICES.values():
                project.wait_ready(running.container(service), timeout=120)
            yield running
        finally:
            project.compose("down", timeout=300, check=False)
            leftovers = project.podman(
                "ps", "-aq", "--filter", f"label=io.podman.compose.project={project.name}", check=False
            ).stdout.split()
            if leftovers:
                project.podman("rm", "-f", *leftovers, check=False)
            project.podman("pod", "rm", "-f", "--ignore", f"pod_{project.name}", check=False)
            project.podman("rmi", image, check=False)  # the tag; the layers stay cached for the next build


# --- the image --------------------------------------------------------------------------------------


def test_the_image_is_built_from_the_dockerfile_non_root_with_its_migrations(stack: ContainerStack) -> None:
    (info,) = json.loads(stack.project.podman("image", "inspect", stack.image).stdout)
    config = info["Config"]
    assert config["User"] == "orchestrator:orchestrator"
    assert config["Cmd"] == ["orchestrator", "--help"] and not config.get("Entrypoint")
    probe = json.loads(stack.project.podman("run", "--rm", stack.image, "python", "-c", IMAGE_PROBE).stdout)
    assert probe["uid"] == 10001
    # Installed, not editable, from a build stage whose sources the image does not carry.
    assert probe["package"].startswith("/opt/orchestrator/lib/") and "site-packages" in probe["package"]
    assert not probe["direct_url"].get("dir_info", {}).get("editable", False), probe["direct_url"]
    assert not probe["sources"] and not probe["tests"]
    # The migrations ship in the package, where `orchestrator db upgrade` finds them.
    assert probe["migrations"].startswith("/opt/orchestrator/lib/") and probe["migrations"].endswith(
        "/orchestrator/migrations"
    )
    assert probe["versions"] == sorted(p.name for p in (ROOT / "alembic" / "versions").glob("*.py"))


def test_migrate_exits_0_and_the_schema_is_there(stack: ContainerStack) -> None:
    migrate = stack.container("migrate")
    assert stack.migrate_exit_code == 0, stack.project.logs(migrate)
    assert stack.project.inspect(migrate, "{{.HostConfig.RestartPolicy.Name}}") in ("no", "")
    assert " is at head" in stack.project.logs(migrate)
    engine = get_engine(stack.database_url)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    head = ScriptDirectory.from_config(alembic_config(stack.database_url)).get_current_head()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == head


# --- the running stack ------------------------------------------------------------------------------


def test_each_worker_container_passes_its_own_healthcheck(stack: ContainerStack) -> None:
    services = load_compose()["services"]
    for kind, service in WORKER_SERVICES.items():
        container = stack.container(service)
        # The check podman holds is the compose file's, `$$` unescaped: it pings this container's node.
        check = json.loads(stack.project.inspect(container, "{{json .Config.Healthcheck.Test}}"))
        assert check == [part.replace("$$", "$") for part in services[service]["healthcheck"]["test"]]
        stack.project.wait_healthy(container, readied_before=0)
        done = stack.project.healthcheck(container)
        assert done.returncode == 0, f"{service}: {done.stdout}{done.stderr}\n{stack.project.logs(container)}"
        assert stack.node(kind, container) in stack.project.logs(container)  # "io@<hostname> ready."
        # init: true, so PID 1 is the init and Celery gets the SIGTERM it forwards.
        assert stack.project.inspect(container, "{{.HostConfig.Init}}") == "true"
    flower = stack.container("flower")
    poll(
        lambda: True if stack.project.healthcheck(flower).returncode == 0 else None,
        60,
        "flower healthy",
        lambda: stack.project.logs(flower)[-3000:],
    )


def test_a_mixed_job_submitted_from_the_host_runs_in_the_containers(stack: ContainerStack) -> None:
    with stack.client() as orc:
        job = orc.submit(
            [branch("jobs.io.sleep", seconds=0.2) for _ in range(8)]
            + [branch("jobs.cpu.count_primes", limit=20_000)],
            fan_in="jobs.aggregate.collect",
            name="containers",
        )
        view = orc.wait(job.id, timeout=90)
    assert view.state == "succeeded", stack.logs()
    assert view.result == {**{str(i): 0.2 for i in range(8)}, "8": 2262}
    # Each branch's Celery task was received and run by the container of its pool (no worker runs on
    # the host for this vhost).
    logs = {kind: stack.project.logs(stack.container(s)) for kind, s in WORKER_SERVICES.items()}
    for b in view.branches:
        assert b.queue in ("io", "cpu") and b.celery_task_id
        assert f"[{b.celery_task_id}] received" in logs[b.queue], (b, logs[b.queue][-3000:])
        assert f"[{b.celery_task_id}]" not in logs["io" if b.queue == "cpu" else "cpu"]
    assert "orchestrator.fan_in[" in logs["fanin"]


def test_flower_in_its_container_wants_credentials_and_lists_the_three_pools(stack: ContainerStack) -> None:
    for path in ("/", "/api/workers", "/api/tasks"):
        assert httpx.get(f"{stack.flower_url}{path}", timeout=10).status_code == 401, path
    wrong = httpx.get(f"{stack.flower_url}/api/workers", auth=("ops", "wrong"), timeout=10)
    assert wrong.status_code == 401
    expected = {
        stack.node(kind, c): kind for kind, s in WORKER_SERVICES.items() for c in stack.project.containers(s)
    }

    def pools() -> dict[str, Any] | None:
        response = httpx.get(
            f"{stack.flower_url}/api/workers", params={"refresh": 1}, auth=stack.flower_auth, timeout=30
        )
        response.raise_for_status()
        workers: dict[str, Any] = {n: w for n, w in response.json().items() if w.get("active_queues")}
        return workers if workers.keys() == expected.keys() else None

    workers = poll(pools, 60, f"Flower listing {sorted(expected)}", stack.logs)
    for name, kind in expected.items():
        assert [q["name"] for q in workers[name]["active_queues"]] == [kind], name
    assert (
        workers[stack.node("io", stack.container("worker-io"))]["stats"]["pool"]["max-concurrency"]
        == IO_CONCURRENCY
    )


# --- operating it -----------------------------------------------------------------------------------


def test_scale_worker_io_to_two_and_both_take_branches(stack: ContainerStack) -> None:
    stack.project.compose("up", "-d", "--no-deps", "--scale", "worker-io=2", "worker-io")
    replicas = stack.project.containers("worker-io")
    assert len(replicas) == 2, replicas
    for container in replicas:
        stack.project.wait_healthy(container)
    nodes = {stack.node("io", c) for c in replicas}
    assert len(nodes) == 2, f"the replicas must be distinct Celery nodes: {nodes}"

    took: Counter[str] = Counter()
    with stack.client(ORCH_IO_CHUNK_SIZE="1") as orc:  # one message per io branch
        for _ in range(5):  # the broker hands messages round the consumers; a few jobs at most
            job = orc.submit(
                [branch("jobs.io.sleep", seconds=0.5) for _ in range(4 * IO_CONCURRENCY)],
                fan_in="jobs.aggregate.total",
                name="scaled",
            )
            view = orc.wait(job.id, timeout=90)
            assert view.state == "succeeded", stack.logs()
            assert view.result == 0.5 * 4 * IO_CONCURRENCY
            logs = {c: stack.project.logs(c) for c in replicas}
            for b in view.branches:
                ran_in = [c for c, log in logs.items() if f"[{b.celery_task_id}] received" in log]
                assert len(ran_in) == 1, (b, ran_in)
                took[ran_in[0]] += 1
            if len(took) == 2:
                break
    assert set(took) == set(replicas), f"branches per replica: {dict(took)}"


def branches_running_in(orc: Orchestrator, job_id: str, project: Project, container: str) -> set[str] | None:
    """Task ids of the job's branches that run now and were received by `container`'s worker."""
    view = orc.get(job_id)
    log = project.logs(container)
    ids = {str(b.celery_task_id) for b in view.branches if b.state == "running"}
    return {i for i in ids if f"[{i}] received" in log} or None


def test_stopping_an_io_worker_while_branches_run_loses_and_doubles_nothing(stack: ContainerStack) -> None:
    replicas = stack.project.containers("worker-io")
    # podman-compose knows a service's replicas only from the --scale of the command at hand: `stop
    # worker-io` stops the first container, `start worker-io` starts it again, any others run on.
    stopped = replicas[0]
    readied = stack.project.ready_count(stopped)
    count = IO_CONCURRENCY * len(replicas) + IO_CONCURRENCY  # every pool full, and some branches queued
    with stack.client(ORCH_IO_CHUNK_SIZE="1") as orc:
        job = orc.submit(
            [branch("jobs.io.sleep", seconds=SLOW) for _ in range(count)], fan_in="jobs.aggregate.collect"
        )
        running = poll(
            lambda: branches_running_in(orc, job.id, stack.project, stopped),
            60,
            f"branches running in {stopped}",
            stack.logs,
        )
        # SIGTERM through the init, then up to stop_grace_period (1m) for Celery's warm shutdown.
        stack.project.compose("stop", "worker-io", timeout=240)
        state = stack.project.inspect(stopped, "{{.State.Status}} {{.State.ExitCode}}")
        assert state == "exited 0", f"{stopped}: {state}, not a warm shutdown\n{stack.project.logs(stopped)}"
        for other in replicas[1:]:
            assert stack.project.inspect(other, "{{.State.Status}}") == "running", other
        # The branches it was running finished before it exited, after the SIGTERM: none was cut off.
        at_stop = {b.celery_task_id: b for b in orc.get(job.id).branches}
        assert all(at_stop[i].state == "succeeded" for i in running), [at_stop[i] for i in running]
        log = stack.project.logs(stopped)
        warm = log.index("Warm shutdown")
        assert any(log.find(f"[{i}] succeeded", warm) > warm for i in running), log[-3000:]
        if len(replicas) == 1:  # nobody else consumes: what had not started waits, queued, for the pool
            assert {b.state for b in at_stop.values()} <= {"succeeded", "pending"}
        stack.project.compose("start", "worker-io")
        stack.project.wait_healthy(stopped, readied_before=readied)
        view = orc.wait(job.id, timeout=120)
    assert view.state == "succeeded", stack.logs()
    assert view.result == {str(i): SLOW for i in range(count)}  # nothing lost
    assert [b.attempts for b in view.branches] == [1] * count  # nothing run twice


def test_a_container_killed_with_sigkill_is_restarted_by_its_policy_and_the_job_ends(
    stack: ContainerStack,
) -> None:
    replicas = stack.project.containers("worker-io")
    victim = replicas[-1]  # a replica made by --scale has the service's restart policy too
    assert stack.project.inspect(victim, "{{.HostConfig.RestartPolicy.Name}}") == "unless-stopped"
    restarts = int(stack.project.inspect(victim, "{{.RestartCount}}"))
    pid = int(stack.project.inspect(victim, "{{.State.Pid}}"))
    readied = stack.project.ready_count(victim)
    count = IO_CONCURRENCY * len(replicas)
    with stack.client(ORCH_IO_CHUNK_SIZE="1") as orc:
        job = orc.submit(
            [branch("jobs.io.sleep", seconds=SLOW) for _ in range(count)], fan_in="jobs.aggregate.collect"
        )
        killed = poll(
            lambda: branches_running_in(orc, job.id, stack.project, victim),
            60,
            f"branches running in {victim}",
            stack.logs,
        )
        # The container's PID 1 (its init), from the host, as the OOM killer or a crash would: the kernel
        # kills everything in the container with it. `podman kill` would count as stopped by the user.
        os.kill(pid, signal.SIGKILL)

        def restarted() -> bool | None:
            now = stack.project.inspect(victim, "{{.RestartCount}} {{.State.Running}} {{.State.Pid}}").split()
            return True if int(now[0]) > restarts and now[1] == "true" and int(now[2]) != pid else None

        poll(restarted, 90, f"{victim} restarted by podman", stack.logs)
        stack.project.wait_healthy(victim, readied_before=readied)
        view = orc.wait(job.id, timeout=120)
    assert view.state == "succeeded", stack.logs()
    assert view.result == {str(i): SLOW for i in range(count)}  # each outcome recorded, once
    # What the kill cut off ran again (RabbitMQ hands back the unacknowledged messages); a branch ran twice
    # only if the killed container had received it.
    twice = {str(b.celery_task_id) for b in view.branches if b.attempts == 2}
    assert killed <= twice, [(b.index, b.attempts) for b in view.branches]
    received = stack.project.logs(victim)
    assert all(f"[{i}] received" in received for i in twice)
    assert {b.attempts for b in view.branches} <= {1, 2}


# --- the file ---------------------------------------------------------------------------------------


def test_the_test_stack_moves_the_services_and_changes_nothing_else() -> None:
    """compose.test.yml only says where the project's services run (the network, the names of this
    machine's servers, the base image to build on) and leaves postgres and rabbitmq out: commands,
    environment, healthchecks, restart policies and stop grace periods stay docker-compose.yml's."""
    base = load_compose()["services"]
    override = load_compose(ROOT / "compose.test.yml")["services"]
    project = {name for name, service in base.items() if "build" in service}
    assert set(override) == project | {"postgres", "rabbitmq"}
    for name in project:
        assert set(override[name]) == {"network_mode", "extra_hosts", "build"}, name
        assert override[name]["build"]["context"] == base[name]["build"] == "."
        assert set(override[name]["build"]["args"]) == {"PYTHON_IMAGE"}
        assert {h.split(":")[0] for h in override[name]["extra_hosts"]} <= {"postgres", "rabbitmq", "redis"}
    for name in ("postgres", "rabbitmq"):
        assert set(override[name]) == {"profiles"}, name
