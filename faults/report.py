"""The report: every figure as JSON, and the same as Markdown (RELIABILITY.md), rendered from the JSON.

A run of the matrix and a soak each write their own section; writing one keeps the other section of the
JSON already there, so the committed RELIABILITY.md can hold the latest matrix and the latest soak.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.report import contention, machine_info, package_versions

from .runner import FAILED, NOT_RUN, SURVIVED, RunResult

SCHEMA = 1
JSON_NAME = "reliability.json"
MARKDOWN_NAME = "RELIABILITY.md"
SOAK_PLOT = "reliability-soak.png"


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance(command: str, busy_at_start: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": command,
        "commit": git_commit(),
        "machine": {**machine_info(), "contention_start": busy_at_start, "contention_end": contention()},
        "packages": package_versions(),
    }


def build_matrix(result: RunResult, command: str, busy_at_start: dict[str, Any]) -> dict[str, Any]:
    finished = result.finished_at or result.started_at
    return {
        **provenance(command, busy_at_start),
        "mode": result.sizes.name,
        "sizes": result.sizes.to_dict(),
        "settings": result.settings,
        "date": result.started_at.isoformat(timespec="seconds"),
        "duration_s": round((finished - result.started_at).total_seconds(), 1),
        "services": result.services,
        "scenarios": [s.to_dict() for s in result.scenarios],
        "errors": result.errors,
    }


def load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"schema": SCHEMA}
    return doc if isinstance(doc, dict) and doc.get("schema") == SCHEMA else {"schema": SCHEMA}


def _places() -> list[tuple[str, str]]:
    """This machine's paths as they may appear in error texts and the command, and what to write instead:
    a committed report says what happened, not where the checkout or the virtualenv lived."""
    root = str(Path(__file__).resolve().parents[1])
    places = [(root, "<repo>"), (sys.prefix, "<venv>"), (sys.base_prefix, "<python>")]
    places += [(tempfile.gettempdir(), "<tmp>"), (str(Path.home()), "~")]
    return sorted({p for p in places if len(p[0]) > 1}, key=lambda p: -len(p[0]))


def scrub(value: Any, places: list[tuple[str, str]] | None = None) -> Any:
    """`value` with every machine path in its strings replaced (see _places)."""
    places = _places() if places is None else places
    if isinstance(value, str):
        for path, name in places:
            value = value.replace(path, name)
        return value
    if isinstance(value, dict):
        return {k: scrub(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, places) for v in value]
    return value


def write(section: str, content: dict[str, Any], json_path: Path, markdown_path: Path) -> dict[str, Any]:
    """Put `section` ("matrix" or "soak") into the JSON at json_path (keeping the other) and render it."""
    doc = load(json_path)
    doc[section] = scrub(content)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(render_markdown(doc))
    return doc


# --- Markdown ------------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _verdict(verdict: str) -> str:
    return {SURVIVED: "survived", FAILED: "**failed**", NOT_RUN: "**not run**"}.get(verdict, verdict)


def _machine(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    start, end = m["contention_start"], m["contention_end"]
    return (
        f"Machine: {m['platform']}, {m['cpu_count']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, "
        f"Python {m['python']}; load average {start['load_average']} at start, {end['load_average']} at end."
    )


def render_matrix(doc: dict[str, Any]) -> list[str]:
    sizes = doc["sizes"]
    quick = doc["mode"] == "quick"
    settings = ", ".join(f"{k}={v}" for k, v in doc["settings"].items()) or "the product's defaults"
    lines = [
        "## Fault matrix",
        "",
        f"`{doc['command']}` on {doc['date']} ({doc['duration_s']} s), commit {doc['commit'] or 'unknown'}.",
        "",
    ]
    if quick:
        lines += [
            "**A quick round**: one round of each fault on small waves with a short stall timeout, as the "
            "test suite runs it. It shows what holds and what does not; the full command (`python -m "
            "faults`: 10 rounds, SIGKILLs 20, waves of 20, a 60 s SIGSTOP at the default stall timeout) "
            "gives the figures.",
            "",
        ]
    lines += [
        _machine(doc),
        "",
        "Services (private instances the suite starts, restarts and removes): "
        + "; ".join(f"{k} {v}" for k, v in doc["services"].items())
        + ".",
        "",
        "Workers: `orchestrator worker io|cpu|fanin` (io threads x64, cpu prefork x cores, fanin prefork "
        f"x2); worker settings: {settings}. Waves of {sizes['wave']} jobs of {sizes['io_branches']} io "
        f"branches ({sizes['io_seconds'][0]:g}-{sizes['io_seconds'][1]:g} s sleeps) + 1 cpu branch "
        f"({sizes['cpu_seconds']:g} s of CPU).",
        "",
        "| scenario | fault | rounds | jobs | stuck | lost | wrong | doubled (by the fault) | tracebacks "
        "| to final, worst | median | measured from | |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for sc in doc["scenarios"]:
        t = sc["time_to_final_s"]
        doubled = f"{sc['doubled']} ({sc['doubled_by_fault']})" + (" *" if sc["duplicates_by_design"] else "")
        lines.append(
            f"| {sc['scenario']} | {sc['title']} | {sc['rounds']} | {sc['jobs']} | {sc['stuck']} "
            f"| {sc['lost']} | {sc['wrong']} | {doubled} | {sc['tracebacks']} | {_s(t['worst'])} "
            f"| {_s(t['median'])} | {sc['measured_from']} | {_verdict(sc['verdict'])} |"
        )
    lines += [
        "",
        "- **stuck**: not final within the fault's end + "
        f"{sizes['job_timeout']:g} s + the stall timeout; **lost**: accepted but without a row, or final "
        "with a branch left without an outcome; **wrong**: final, but not as expected (a state, a poison "
        "branch not failed, an outcome that changed after the fan-in read it).",
        "- **doubled**: branch functions and aggregators that ran to completion more than once, counted from "
        "the marks every run appends to a file; in brackets those whose extra run was in a process the fault "
        "hit (SIGKILLed before its outcome was committed, or SIGSTOPped and taken over): at-least-once "
        "delivery, expected. * duplicate runs expected by design (a broker reconnect redelivers running "
        "messages), counted.",
        "- **to final**: seconds from the fault (see *measured from*) until the last job of a round was "
        "final (SQL `finished_at`); worst and median over rounds whose jobs all ended.",
        "- **tracebacks**: tracebacks in the workers' logs during the rounds.",
        "",
        "### Notes",
        "",
    ]
    for sc in doc["scenarios"]:
        notes = _notes(sc)
        if notes:
            lines.append(f"- **{sc['scenario']}**: " + " ".join(notes))
    if doc["errors"]:
        lines += ["", "Errors of the harness:", "", *[f"- {e}" for e in doc["errors"]]]
    return lines


def _notes(sc: dict[str, Any]) -> list[str]:
    notes = list(sc.get("notes", []))
    if sc["error"]:
        notes.append(f"could not run: {sc['error'].splitlines()[0]}.")
    details = sc["round_details"]
    faults = [r["fault"] for r in details if r.get("fault")]
    if sc["not_in_flight"]:
        notes.append(f"{sc['not_in_flight']} round(s) hit no running work (it had finished first).")
    for key, label in (
        ("restart_s", "restart took"),
        ("paused_s", "paused"),
        ("down_s", "down for"),
        ("submit_s", "submits took"),
        ("cut_s", "link cut for"),
        ("rejoined_s", "the healed host ran a probe job by itself (the local io pool stopped) within"),
        ("terminated_connections", "connections cut"),
    ):
        values = [f[key] for f in faults if key in f]
        if values:
            span = f"{min(values):g}" if min(values) == max(values) else f"{min(values):g}-{max(values):g}"
            notes.append(f"{label} {span}" + ("" if "connections" in label else " s") + ".")
    stayed_away = sum(1 for f in faults if f.get("rejoined") is False)
    if stayed_away:
        notes.append(f"**in {stayed_away} round(s) the healed host did not consume again** within 120 s.")
    if sc["pool_exits"]:
        notes.append(
            "**a pool exited on its own** ("
            + _md("; ".join(sc["pool_exits"][:2]))
            + "); the suite restarted "
            "it after the round, as a supervisor would."
        )
    silent = [f["silent_before_round_s"] for f in faults if f.get("silent_before_round_s")]
    if silent:
        which = ", ".join(f"{role} {secs:g} s" for role, secs in silent[0].items())
        notes.append(
            f"pools that had logged nothing since before the stuck round began ({which}): a pool that had "
            "stopped consuming before this fault hit would leave its work queued (see the scenario before)."
        )
    if any(f.get("pools_restarted_after_round") for f in faults):
        notes.append("the pools were restarted after a round that left jobs stuck or failed to run.")
    if sc["refused"]:
        notes.append(f"{sc['refused']} submit(s) refused (the client got the error; not jobs).")
    if sc["redeliveries"] or sc["reruns"]:
        notes.append(
            f"{sc['redeliveries']} extra branch attempts in SQL, {sc['reruns']} extra function starts."
        )
    if sc["jobs"]:
        notes.append(f"{sc['fan_in_runs']} aggregator runs completed for {sc['jobs']} jobs.")
    poison = [e for r in details for e in r.get("poison_errors", [])]
    if poison:
        notes.append(f'the poison branch\'s error: "{_md(poison[0][:200])}".')
    problems = [p for r in details for p in r.get("problems", [])]
    if problems:
        notes.append("first problem: " + _md(problems[0][:300]) + ".")
    if sc["exceptions"]:
        top = "; ".join(f"{_md(k[:120])} (x{v})" for k, v in list(sc["exceptions"].items())[:3])
        notes.append(f"logged: {top}.")
    return notes


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_soak(soak: dict[str, Any]) -> list[str]:
    t = soak["targets"]
    lines = [
        "## Soak",
        "",
        f"`{soak['command']}` on {soak['date']} ({soak['duration_s']:.0f} s), "
        f"commit {soak['commit'] or 'unknown'}; {soak['rate']:g} jobs/s offered, a random fault every "
        f"{soak['fault_every_s']:.0f} s after a {soak['baseline_s']:.0f} s baseline.",
        "",
        _machine(soak),
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
    ]
    for row in t:
        lines.append(f"| {row['target']} | {row['measured']} | {'met' if row['met'] else '**missed**'} |")
    lines += [
        "",
        f"Jobs: {soak['jobs']} accepted, {soak['refused']} submits refused (the client got the error), "
        f"{soak['doubled']} runs doubled ({soak['doubled_by_fault']} in a process the fault hit), "
        f"{soak['wrong']} wrong, {len(soak['pool_exits'])} pools exited on their own (restarted). While the "
        f"load ran, {soak['finished_per_s_under_load']:g} jobs/s ended; the "
        f"last job ended {_s(soak['drain_after_load_s'])} after the load stopped"
        + (
            " (the machine did not keep up with the offered rate: latency grew whatever the faults did)."
            if soak["finished_per_s_under_load"] < 0.9 * soak["rate"]
            else "."
        ),
        "",
        "| at (s) | fault | lasted (s) |",
        "| --- | --- | --- |",
        *[f"| {f['at_s']:.0f} | {f['scenario']} | {f['duration_s']:.1f} |" for f in soak["faults"]],
    ]
    if soak.get("plot"):
        lines += ["", f"![Resident memory and p99 over time]({soak['plot']})"]
    return lines


def render_markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Reliability",
        "",
        "Written by `python -m faults` (the fault suite: faults/README.md): real faults injected into real "
        "services and worker processes while jobs are in flight, every job checked.",
        "",
    ]
    if "matrix" in doc:
        lines += render_matrix(doc["matrix"])
    if "soak" in doc:
        lines += ["", *render_soak(doc["soak"])]
    return "\n".join(lines) + "\n"
