from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import ConfigurationError, Settings
from orchestrator.cli.processes import worker_argv


def test_nothing_set_means_the_embedded_default(tmp_path: Path) -> None:
    s = Settings.from_env({"ORCH_HOME": str(tmp_path)})
    assert s.embedded and s.is_sqlite
    assert s.database_url == f"sqlite:///{tmp_path / 'orchestrator.db'}"
    assert s.broker_url == "filesystem://"
    assert s.result_backend == f"orchestrator.backend:SQLBackend+{s.database_url}"
    assert s.imports == ("jobs",)
    assert (s.max_deliveries, s.stall_timeout) == (3, 30.0)
    assert s.max_args_bytes == s.max_result_bytes == 1 << 20
    assert (s.max_active_branches, s.block_timeout, s.max_priority, s.autoscale) == (100_000, 10.0, 9, ())
    scaled = Settings.from_env(
        {"ORCH_HOME": str(tmp_path), "ORCH_CPU_AUTOSCALE": "4", "ORCH_FANIN_AUTOSCALE": "3,2"}
    )
    assert (scaled.autoscale_for("cpu"), scaled.autoscale_for("fanin"), scaled.autoscale_for("io")) == (
        (4, 1),
        (3, 2),
        None,
    )


def test_production_urls_and_imports() -> None:
    s = Settings.from_env(
        {
            "ORCH_DATABASE_URL": "postgresql://app:secret@db/orch",
            "ORCH_BROKER_URL": "amqp://guest:guest@rabbit//",
            "ORCH_IMPORTS": "myjobs.io, myjobs.cpu,,jobs",
        }
    )
    assert s.database_url == "postgresql+psycopg://app:secret@db/orch"
    assert not s.embedded
    assert s.imports == ("jobs", "myjobs.io", "myjobs.cpu")
    assert s.queue_for("io") == "io" and s.queue_for("cpu") == "cpu" and s.queue_for("aggregator") == "fanin"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ORCH_SERIALIZER": "pickle"}, "JSON is the only accepted serializer"),
        ({"ORCH_IO_CONCURRENCY": "many"}, "ORCH_IO_CONCURRENCY must be an integer"),
        ({"ORCH_CPU_CONCURRENCY": "0"}, "ORCH_CPU_CONCURRENCY must be >= 1"),
        ({"ORCH_FAN_IN_TIMEOUT": "-1"}, "ORCH_FAN_IN_TIMEOUT must be positive"),
        ({"ORCH_IO_POOL": "prefork"}, "ORCH_IO_POOL must be threads or gevent"),
        ({"ORCH_MAX_DELIVERIES": "-1"}, "ORCH_MAX_DELIVERIES must be >= 0"),
        ({"ORCH_STALL_TIMEOUT": "0"}, "ORCH_STALL_TIMEOUT must be positive"),
        ({"ORCH_MAX_ARGS_BYTES": "1MB"}, "ORCH_MAX_ARGS_BYTES must be an integer"),
        ({"ORCH_MAX_ACTIVE_BRANCHES": "-1"}, "ORCH_MAX_ACTIVE_BRANCHES must be >= 0"),
        ({"ORCH_MAX_PRIORITY": "256"}, "ORCH_MAX_PRIORITY must be <= 255"),
        ({"ORCH_CPU_AUTOSCALE": "2,3"}, "ORCH_CPU_AUTOSCALE needs 1 <= MAX and 0 <= MIN <= MAX"),
    ],
)
def test_bad_settings_are_refused_clearly(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        ("api.example.com:0", "bad port"),
        ("host:", "bad port"),
        ("a:b:c", "bad IPv6 address"),
        ("*:443", "'\\*' allows every host and takes no port"),
        ("api.*.com", "bad host"),
        ("*.", "bad host"),
        ("127.1", "bad host"),
        ("http://api.example.com", "bad"),
    ],
)
def test_bad_fetch_allowed_hosts_are_refused_clearly(hosts: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^ORCH_FETCH_ALLOWED_HOSTS: {message}"):
        Settings.from_env({"ORCH_FETCH_ALLOWED_HOSTS": hosts})


def test_fetch_allowed_hosts_default_to_loopback() -> None:
    loopback = (("localhost", None), ("127.0.0.1", None), ("::1", None))
    assert Settings.from_env({}).fetch_allowed_hosts == loopback
    assert Settings.from_env({"ORCH_FETCH_ALLOWED_HOSTS": " , "}).fetch_allowed_hosts == loopback


def test_fetch_allowed_hosts_parse_names_ips_ports_and_subdomain_wildcards() -> None:
    raw = "API.example.com., api.example.com:8443, *.shards.internal, 10.0.0.7, [::1]:8080, 0:0::1, db:5432"
    assert Settings.from_env({"ORCH_FETCH_ALLOWED_HOSTS": raw}).fetch_allowed_hosts == (
        ("api.example.com", None),
        ("api.example.com", 8443),
        ("*.shards.internal", None),
        ("10.0.0.7", None),
        ("::1", 8080),
        ("::1", None),
        ("db", 5432),
    )
    assert Settings.from_env({"ORCH_FETCH_ALLOWED_HOSTS": "*"}).fetch_allowed_hosts == (("*", None),)


def test_worker_commands_are_the_documented_celery_commands(tmp_path: Path) -> None:
    s = Settings.from_env({"ORCH_HOME": str(tmp_path), "ORCH_CPU_CONCURRENCY": "2"})
    documented = {
        "io": "celery -A orchestrator.celery_app worker -Q io -P threads -c 64",
        "cpu": "celery -A orchestrator.celery_app worker -Q cpu -P prefork -c 2",
        "fanin": "celery -A orchestrator.celery_app worker -Q fanin -P prefork -c 2",
    }
    for kind, command in documented.items():
        assert " ".join(worker_argv(kind, s)).startswith(command + " ")
    gevent = Settings.from_env(
        {"ORCH_HOME": str(tmp_path), "ORCH_IO_POOL": "gevent", "ORCH_IO_CONCURRENCY": "500"}
    )
    assert worker_argv("io", gevent)[6:10] == ["-P", "gevent", "-c", "500"]
