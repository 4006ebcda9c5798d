"""docker-compose.yml, the Dockerfile and .env.example, kept honest without a Docker engine.

The compose file is validated against the official Compose Specification schema, vendored in
tests/schemas/compose-spec.json (Apache-2.0, from compose-spec/compose-spec, schema/compose-spec.json on
master, as vendored by check-jsonschema 0.39.0; sha256 d549057e...ed10e64). Then its services are run
as local processes, from exactly the commands and environment the file gives them, against a fresh
PostgreSQL database and RabbitMQ vhost, and a job goes through them: that half lives in test_flower.py,
which shares one running stack between it and the Flower checks.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest

from orchestrator import Settings
from orchestrator.cli import processes
from orchestrator.cli.processes import KINDS, worker_argv
from tests.compose import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    FLOWER_SERVICE,
    MIGRATE_SERVICE,
    ROOT,
    WORKER_SERVICES,
    ComposeError,
    compose_service,
    interpolate,
    load_compose,
    read_env_file,
    required_variables,
)

pytestmark = pytest.mark.integration

SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
WEB_SERVICE = "web"
PROJECT_SERVICES = {MIGRATE_SERVICE, *WORKER_SERVICES.values(), FLOWER_SERVICE, WEB_SERVICE}
PROJECT_COMMANDS = {
    MIGRATE_SERVICE: ["orchestrator", "db", "upgrade"],
    "worker-io": ["orchestrator", "worker", "io", "--hostname", "io@%h"],
    "worker-cpu": ["orchestrator", "worker", "cpu", "--hostname", "cpu@%h"],
    "worker-fanin": ["orchestrator", "worker", "fanin", "--hostname", "fanin@%h"],
    FLOWER_SERVICE: ["orchestrator", "flower"],
    WEB_SERVICE: ["orchestrator", "web"],
}
SECRET_KEY = re.compile(r"PASS|PASSWORD|SECRET|TOKEN|BASIC_AUTH", re.IGNORECASE)
REQUIRED_VARIABLE = re.compile(r"\$\{[A-Z_][A-Z0-9_]*:\?[^}]+\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = compose["services"]
    return result


# --- the file itself ------------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    text = SCHEMA.read_bytes()
    assert hashlib.sha256(text).hexdigest() == SCHEMA_SHA256, "the vendored schema was changed"
    schema = json.loads(text)
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    assert "version" not in compose, "the Compose Specification has no version key"


def test_the_schema_rejects_what_compose_would_reject(compose: dict[str, Any]) -> None:
    """The validation has teeth: a misspelled key and a bad depends_on condition are errors."""
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker-io"]["comand"] = ["orchestrator"]
    broken["services"]["worker-cpu"]["depends_on"]["migrate"]["condition"] = "service_done"
    paths = {"/".join(map(str, e.absolute_path)) for e in validator.iter_errors(broken)}
    assert "services/worker-io" in paths and "services/worker-cpu/depends_on" in paths


def test_every_project_service_is_the_same_image_with_its_own_command(services: dict[str, Any]) -> None:
    project = {n for n, s in services.items() if "build" in s}
    assert project == PROJECT_SERVICES
    builds = {json.dumps([services[n]["build"], services[n].get("image")]) for n in project}
    assert len(builds) == 1, f"project services differ in build/image: {builds}"
    assert services["worker-io"]["build"] == "."
    for name, command in PROJECT_COMMANDS.items():
        assert services[name]["command"] == command, name
    assert services["postgres"]["image"] == "postgres:16"
    assert services["rabbitmq"]["image"] == "rabbitmq:3-management"
    assert services["redis"]["profiles"] == ["redis"]


def test_worker_commands_are_what_the_tests_start(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The suite's workers (tests/conftest.py, via orchestrator.cli.processes.start_worker) run exactly the
    compose command, and each healthcheck pings the node name that command gives its worker."""
    started: list[list[str]] = []

    class Recorder:
        def __init__(self, argv: list[str], **_: Any) -> None:
            started.append(argv)
            self.pid = 0

    monkeypatch.setattr(subprocess, "Popen", Recorder)  # start_worker records instead of starting
    settings = Settings.from_env({})
    prefix = processes.orchestrator_executable()
    for kind in KINDS:
        service = services[WORKER_SERVICES[kind]]
        # One pool per container, so the compose command names its node KIND@%h (outside a container
        # `orchestrator worker` defaults to KIND-PID@%h, so that two pools of a kind can share a host).
        name = f"{kind}@%h"  # %h is the host name, $HOSTNAME in a container
        processes.start_worker(kind, env={}, log_dir=tmp_path, hostname=name)._log.close()
        argv = started.pop()
        assert argv[: len(prefix)] == prefix
        assert ["orchestrator", *argv[len(prefix) :]] == service["command"]
        node = worker_argv(kind, settings, hostname=name)
        assert node[node.index("-n") + 1] == name
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL" and "inspect ping" in test[1]
        assert f"-d {name.replace('%h', '$$HOSTNAME')} " in test[1] + " "


def test_workers_wait_for_a_healthy_database_and_broker_and_a_finished_migration(
    services: dict[str, Any],
) -> None:
    for name in WORKER_SERVICES.values():
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["rabbitmq"]["condition"] == "service_healthy", name
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps.get("redis", {}).get("required", True) is False, "redis is an optional profile"
        assert "container_name" not in services[name], f"{name} could not be scaled"
        assert services[name]["restart"] == "unless-stopped"
        assert services[name]["healthcheck"]["test"]
    assert services[MIGRATE_SERVICE]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services[MIGRATE_SERVICE]["restart"] == "no"
    assert services[FLOWER_SERVICE]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    web_deps = services[WEB_SERVICE]["depends_on"]
    assert web_deps["migrate"]["condition"] == "service_completed_successfully"
    assert web_deps["rabbitmq"]["condition"] == "service_healthy"  # a cancel revokes through the broker
    for name in ("postgres", "rabbitmq", "redis", FLOWER_SERVICE, WEB_SERVICE):
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] == "unless-stopped", name
    io_env = services["worker-io"]["environment"]
    assert io_env["ORCH_IO_CONCURRENCY"].startswith("${ORCH_IO_CONCURRENCY")


def test_no_secret_is_written_in_the_compose_file(services: dict[str, Any]) -> None:
    text = COMPOSE_FILE.read_text()
    required = required_variables(text)
    assert required == {"POSTGRES_PASSWORD", "RABBITMQ_PASSWORD", "FLOWER_BASIC_AUTH", "ORCH_WEB_BASIC_AUTH"}
    # With each required variable standing for itself, every password in a URL must be one of them.
    markers = {name: f"<{name}>" for name in required}
    for name, service in services.items():
        assert "env_file" not in service, f"{name}: variables come from interpolation only"
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            if SECRET_KEY.search(key):
                assert REQUIRED_VARIABLE.fullmatch(value), f"{name}: {key} must be ${{VAR:?message}}"
            url = urlsplit(interpolate(value, markers))
            if url.scheme and url.password is not None:
                assert url.password in markers.values(), f"{name}: {key} has a literal password"
    for value in read_env_file().values():  # the example's placeholders are not in the file either
        assert not value or value not in text
    with pytest.raises(ComposeError, match="POSTGRES_PASSWORD"):
        compose_service("worker-io", database_url="x", broker_url="y", variables={})


def test_env_example_documents_every_required_variable_with_a_placeholder() -> None:
    required = required_variables(COMPOSE_FILE.read_text())
    example = read_env_file(ENV_EXAMPLE)
    assert required <= example.keys()
    assert all("change-me" in example[name] for name in required)
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert ".env" in gitignore, ".env holds the real passwords"
    # Every variable the compose file interpolates is mentioned in the example.
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    assert used <= set(re.findall(r"\b([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text()))


def test_interpolation_follows_compose() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("a$$b ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d}", env) == "a$b v v d d "
    assert interpolate("${SET:+alt}${UNSET:+alt}", env) == "alt"
    with pytest.raises(ComposeError, match="needed"):
        interpolate("${EMPTY:?needed}", env)


def test_container_hosts_become_the_local_services() -> None:
    variables = {**read_env_file(), "FLOWER_BASIC_AUTH": "u:p"}
    service = compose_service(
        "worker-io", database_url="postgresql://local/db", broker_url="amqp://local//", variables=variables
    )
    assert service.command == ["orchestrator", "worker", "io", "--hostname", "io@%h"]
    assert service.environment["ORCH_DATABASE_URL"] == "postgresql://local/db"
    assert service.environment["ORCH_BROKER_URL"] == "amqp://local//"
    assert service.environment["ORCH_IO_CONCURRENCY"] == "64"
    assert service.environment["ORCH_RESULT_BACKEND"] == "sql"
    with pytest.raises(ComposeError, match="redis"):
        compose_service(
            "worker-io",
            database_url="x",
            broker_url="y",
            variables={**variables, "ORCH_RESULT_BACKEND": "redis://redis:6379/0"},
        )


# --- the Dockerfile and its build context ---------------------------------------------------------


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """moby's patternmatcher, for the patterns used here: last match wins, a match on a parent counts."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = regex.replace(r"\[", "[").replace(r"\]", "]")  # character classes, as in filepath.Match
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_the_image_is_built_from_the_project_alone() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [
        line.strip() for line in re.sub(r"\\\n", " ", dockerfile).splitlines() if line.strip()[:1] != "#"
    ]
    instructions = [i for i in instructions if i]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in instructions
    assert not any(i.startswith("ENTRYPOINT") for i in instructions), "compose commands are whole argvs"
    users = [i.split()[1] for i in instructions if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (install,) = [i for i in instructions if "pip install" in i]
    assert re.search(r'pip install "\.(\$\{EXTRAS:\+\[\$EXTRAS\]\})?"', install), install
    assert not re.search(r"\[test\]|pip install -e|--editable|pytest|ruff|mypy", dockerfile)

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = " ".join(pyproject["project"]["dependencies"])
    assert "flower" in declared or "flower" in install, "`orchestrator flower` needs Flower in the image"
    sources = [s for i in instructions if i.startswith("COPY ") and "--" not in i for s in i.split()[1:-1]]
    setuptools = pyproject["tool"]["setuptools"]
    package_dirs = setuptools.get("package-dir", {})
    # A package maps onto its own directory, or onto the one package-dir names (the Alembic scripts).
    needed = {package_dirs.get(p, p.replace(".", "/")).split("/")[0] for p in setuptools["packages"]}
    needed |= {"pyproject.toml", pyproject["project"]["readme"]}
    assert needed <= set(sources), f"not copied into the build: {needed - set(sources)}"

    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *sources],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert tracked
    shipped = [p for p in tracked if not _dockerignored(p, patterns)]
    packaged = {"alembic/env.py", "alembic/script.py.mako", "alembic/versions/0001_initial.py", "jobs/io.py"}
    assert packaged <= set(shipped), packaged - set(shipped)
    assert set(tracked) - set(shipped) <= {p for p in tracked if "__pycache__" in p}
    private = (
        ".env",
        ".git/config",
        ".venv/bin/python",
        "tests/conftest.py",
        "jobs/__pycache__/io.cpython-311.pyc",
        "orchestrator/cli/commands.pyc",
    )
    for path in private:
        assert _dockerignored(path, patterns), path
