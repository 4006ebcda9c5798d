"""The benchmark harness runs end to end in its smallest mode and writes a well-formed report.

Only structure and positivity are checked: timing belongs to the harness's own report, never to a test.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness import run_module

pytestmark = pytest.mark.integration

SCENARIOS = {"P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8"}
SYSTEMS = {"orchestrator", "celery-redis", "celery-rabbitmq", "celery-redis-gevent", "celery-db", "asyncio"}


def run_smoke(out: Path, markdown: Path, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    """`python -m bench --smoke`."""
    return run_module(["bench", "--smoke", "--out", str(out), "--markdown", str(markdown), "-q"], timeout, 30)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    done = run_smoke(out, out / "elsewhere" / "BENCHMARKS.md")
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{out / 'logs'}"
    return out, json.loads((out / "report.json").read_text())


def test_the_report_describes_the_run(smoke: tuple[Path, dict[str, Any]]) -> None:
    _, report = smoke
    assert report["schema"] == 1 and report["mode"] == "smoke" and report["errors"] == []
    assert report["date"] and report["duration_s"] > 0
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["python"]
    assert report["packages"]["celery"] and report["packages"]["celery-orchestrator"]
    assert set(report["services"]) == {"postgresql", "rabbitmq", "redis"}
    assert set(report["systems"]) | set(report["skipped_systems"]) == SYSTEMS
    assert report["systems"]["orchestrator"]["broker"] == "rabbitmq"


def test_every_scenario_has_positive_figures_and_spread(smoke: tuple[Path, dict[str, Any]]) -> None:
    _, report = smoke
    scenarios = {s["id"]: s for s in report["scenarios"]}
    assert set(scenarios) == SCENARIOS
    for sid, sc in scenarios.items():
        assert sc["error"] is None, sc["error"]
        assert sc["figures"] and sc["measurements"], sid
        assert all(f["value"] > 0 for f in sc["figures"]), sid
        for m in sc["measurements"]:
            s = m["summary"]
            assert s["n"] == len(m["samples"]) >= 1 and m["warmup_runs"] >= 1, (sid, m["system"])
            assert 0 < s["min"] <= s["p5"] <= s["median"] <= s["p95"] <= s["max"], (sid, m["system"])
    p1 = {m["system"] for m in scenarios["P1"]["measurements"]}
    assert p1 == {"orchestrator", "celery-redis", "celery-db", "asyncio"}
    assert {m["system"] for m in scenarios["P4"]["measurements"]} == {
        "orchestrator cpu x1",
        "orchestrator cpu x2",
    }
    targets = [f for sc in scenarios.values() for f in sc["figures"] if f["target"]]
    assert {f["system"] for f in targets} == {"orchestrator"}
    assert all(isinstance(f["met"], bool) for f in targets)


def test_markdown_and_plot_are_written(smoke: tuple[Path, dict[str, Any]]) -> None:
    out, report = smoke
    table = (out / "BENCHMARKS.md").read_text()
    assert (out / "elsewhere" / "BENCHMARKS.md").read_text() == table
    assert "| scenario | figure | system | value | target |" in table
    assert all(f"| {sid} |" in table for sid in SCENARIOS)
    if importlib.util.find_spec("matplotlib") is not None:
        assert report["plot"] == "latency.png"
        assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
