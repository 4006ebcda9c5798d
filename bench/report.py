"""The report: every figure and sample as JSON, and the same as a Markdown table (BENCHMARKS.md).

Both say where the numbers came from (machine, load, package and service versions, the date, the mode),
because a ratio measured on a loaded two-core box means little without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from .runner import RunResult
from .stats import summarize

SCHEMA = 1
PACKAGES = (
    "celery-orchestrator",
    "celery",
    "kombu",
    "billiard",
    "amqp",
    "redis",
    "SQLAlchemy",
    "psycopg",
    "alembic",
    "gevent",
    "matplotlib",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def contention() -> dict[str, Any]:
    """How busy the machine was: another test run on the same two cores skews every figure."""
    out: dict[str, Any] = {"load_average": None, "cpu_pressure": None}
    with contextlib.suppress(OSError):
        out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    try:
        # Linux PSI: the share of time some runnable task waited for a CPU (avg10, avg60, in %).
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        fields = dict(f.split("=") for f in some[1:])
        out["cpu_pressure"] = {"avg10": float(fields["avg10"]), "avg60": float(fields["avg60"])}
    except (OSError, IndexError, KeyError, ValueError):
        pass
    return out


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
    }


def build(result: RunResult, busy_at_start: dict[str, Any], plot: str | None) -> dict[str, Any]:
    """The JSON document; BENCHMARKS.md and the plot are rendered from it, never from live objects."""
    finished = result.finished_at or result.started_at
    return {
        "schema": SCHEMA,
        "mode": result.mode.name,
        "sizes": result.mode.to_dict(),
        "date": result.started_at.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "duration_s": round((finished - result.started_at).total_seconds(), 1),
        "commit": _git_commit(),
        "machine": {**machine_info(), "contention_start": busy_at_start, "contention_end": contention()},
        "packages": package_versions(),
        "services": result.services,
        "systems": result.systems,
        "skipped_systems": result.skipped_systems,
        "scenarios": [s.to_dict() for s in result.scenarios],
        "errors": result.errors,
        "plot": plot,
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


# --- Markdown ------------------------------------------------------------------------------------


def _value(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:,.1f} {unit}"


def _busy(start: dict[str, Any], end: dict[str, Any]) -> str:
    text = f"Load average {start['load_average']} at start, {end['load_average']} at end (1, 5, 15 min)"
    if end["cpu_pressure"]:
        text += f"; CPU pressure (PSI some, avg60) {end['cpu_pressure']['avg60']:.0f}% at end"
    return text + ": figures from a busy machine are inflated, ratios less so."


def _met(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "**missed**")


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"`python -m bench --{report['mode']}` on {report['date']} ({report['duration_s']} s), "
        f"commit {report['commit'] or 'unknown'}.",
        "",
        f"Machine: {m['platform']}, {m['cpu_count']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, "
        f"Python {m['python']}. {_busy(m['contention_start'], m['contention_end'])}",
        "",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in report["packages"].items() if v) + ".",
        "",
        "Services: " + ", ".join(f"{k} {v}" for k, v in report["services"].items()) + ".",
        "",
        "| system | what | broker | result backend |",
        "| --- | --- | --- | --- |",
    ]
    for key, s in report["systems"].items():
        lines.append(
            f"| {key} | {s['label']} | {s.get('broker') or '-'} | {s.get('result_backend') or '-'} |"
        )
    for key, why in report["skipped_systems"].items():
        lines.append(f"| {key} | skipped: {why} | | |")
    lines += [
        "",
        "## Headline figures",
        "",
        "Medians over the runs below; ratios are of medians measured in this same run.",
        "",
        "| scenario | figure | system | value | target | |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for sc in report["scenarios"]:
        for f in sc["figures"]:
            lines.append(
                f"| {sc['id']} | {f['name']} | {f['system']} | {_value(f['value'], f['unit'])} "
                f"| {f['target'] or ''} | {_met(f['met'])} |"
            )
        if sc["error"]:
            lines.append(f"| {sc['id']} | **error** | | {sc['error'].splitlines()[0]} | | |")
    lines += [
        "",
        "## Measurements",
        "",
        "Spread of the kept runs (warm-up runs are excluded from every number).",
        "",
        "| scenario | system | metric | median | p5 - p95 | min - max | runs (+warm-up) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for sc in report["scenarios"]:
        for ms in sc["measurements"]:
            s, u = ms["summary"], ms["unit"]
            lines.append(
                f"| {sc['id']} | {ms['system']} | {ms['metric']} | {_value(s['median'], u)} "
                f"| {_value(s['p5'], u)} - {_value(s['p95'], u)} | {_value(s['min'], u)} - "
                f"{_value(s['max'], u)} | {s['n']} (+{ms['warmup_runs']}) |"
            )
    phases = _phase_table(report)
    if phases:
        lines += ["", "## Where the orchestrator's P1 time goes", "", *phases]
    lines += ["", "## Scenarios", ""]
    for sc in report["scenarios"]:
        params = ", ".join(f"{k}={v}" for k, v in sc["params"].items())
        lines.append(f"- **{sc['id']}** {sc['title']} ({params}; {sc['seconds']:.1f} s)")
        lines += [f"  - {note}" for note in sc["notes"]]
    if report.get("plot"):
        lines += ["", f"Latency distributions: `{report['plot']}`."]
    return "\n".join(lines) + "\n"


PHASES = {
    "submit_s": "submit() call, in the client",
    "first_branch_start_s": "first branch started, since the job row was created",
    "last_branch_start_s": "last branch started, since creation",
    "median_branch_s": "median branch, its own duration",
    "slowest_branch_s": "slowest branch, its own duration",
    "last_branch_end_s": "last branch finished, since creation",
    "join_and_fan_in_s": "join and fan-in: last branch finished to job final",
    "server_total_s": "job final, since creation",
    "wait_lag_s": "wait() returned, after the job was final",
}


def _phase_table(report: dict[str, Any]) -> list[str]:
    """Median of each phase of a single P1 job, from the orchestrator's own SQL timestamps."""
    rows = []
    for sc in report["scenarios"]:
        if sc["id"] != "P1":
            continue
        for ms in sc["measurements"]:
            for key, label in PHASES.items():
                series = ms["extra"].get(f"phase_{key}")
                if series:
                    rows.append(f"| {label} | {_value(series['summary']['median'], 's')} |")
            if rows:
                client = summarize(ms["samples"]).median
                rows.append(f"| the client's latency (submit to wait() returning) | {_value(client, 's')} |")
                break
    if not rows:
        return []
    return ["| phase | median |", "| --- | --- |", *rows]


def write_markdown(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(report))
