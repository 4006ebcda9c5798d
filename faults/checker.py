"""The checker: for every job of a round, did it reach its final state, was every branch outcome written
once, how many times did each branch function and the aggregator run to completion, and how long after
the fault was it final.

Two sources, read after the fact: SQL (the job and branch rows, what the orchestrator says happened) and
the marks the catalog's functions append to files (what really ran, and in which process). A run that
completed in a process the fault hit (SIGKILLed before its outcome was committed, or SIGSTOPped while the
rescuer gave its branch to another worker) is counted apart: at-least-once delivery reruns it by design.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from orchestrator.models import FINAL_JOB_STATES, Branch, Job

from .catalog import AGGREGATOR, UNKNOWN


@dataclass(frozen=True)
class Mark:
    """One line of a mark file: a function started (S) or completed (C) one run."""

    what: str
    token: str
    index: int
    run: str
    pid: int
    at: float


class Marks:
    """Every process's mark file in one directory, read incrementally (only whole lines)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._offsets: dict[Path, int] = {}
        self.by_token: dict[str, list[Mark]] = defaultdict(list)
        self._open: dict[str, Mark] = {}  # runs started and not completed, by run id

    def refresh(self) -> None:
        for path in self.folder.glob("*.marks"):
            offset = self._offsets.get(path, 0)
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1
            if not end:
                continue
            self._offsets[path] = offset + end
            for line in chunk[:end].decode(errors="replace").splitlines():
                parts = line.split()
                if len(parts) != 6:
                    continue
                m = Mark(parts[0], parts[1], int(parts[2]), parts[3], int(parts[4]), float(parts[5]))
                self.by_token[m.token].append(m)
                if m.what == "S":
                    self._open[m.run] = m
                else:
                    self._open.pop(m.run, None)

    def running(self, pids: set[int] | None = None, tokens: set[str] | None = None) -> list[Mark]:
        """Runs started and not completed (so far), in these processes and for these jobs."""
        self.refresh()
        return [
            m
            for m in self._open.values()
            if (pids is None or m.pid in pids) and (tokens is None or m.token in tokens)
        ]

    def forget(self, tokens: Iterable[str]) -> None:
        """Drop checked jobs' marks (a soak checks tens of thousands of jobs)."""
        for token in tokens:
            for m in self.by_token.pop(token, []):
                self._open.pop(m.run, None)


@dataclass
class Tracked:
    """A job the suite submitted: its token (the functions' argument and the idempotency key), its id
    once known, what it should end as."""

    token: str
    job_id: str | None
    submitted_at: float
    expect: str = "succeeded"
    poison_index: int | None = None
    refused: str | None = None  # the submit failed and no job was recorded: the client was told
    timed: bool = True  # counted in the round's time to final (not a probe submitted after the fault)


@dataclass
class JobCheck:
    token: str
    job_id: str | None
    state: str | None
    final: bool = False
    lost: str | None = None  # accepted but gone, or final with a branch left without an outcome
    wrong: str | None = None  # final, but not as expected
    doubled: int = 0  # runs completed beyond the one recorded (branches and the aggregator)
    doubled_by_fault: int = 0  # ... of which ran in a process the fault hit
    fan_in_runs: int = 0  # aggregator runs completed
    reruns: int = 0  # function starts beyond one per branch (killed runs included)
    redeliveries: int = 0  # SQL attempts beyond one per branch
    to_final: float | None = None  # seconds from the fault to the job's final state (0: final before)
    latency: float | None = None  # seconds from the job's creation to its final state
    finished_at: float | None = None
    created_at: float | None = None
    poison_error: str | None = None
    stuck_at: str | None = None  # for a job not final: where its branches were (queue:state counts)
    stuck_queues: frozenset[str] = frozenset()  # ... and the queues its unfinished work waits on
    timed: bool = True


def _chunks(items: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _rows(
    engine: Engine, ids: Sequence[uuid.UUID]
) -> tuple[dict[uuid.UUID, Any], dict[uuid.UUID, list[Any]]]:
    jobs: dict[uuid.UUID, Any] = {}
    branches: dict[uuid.UUID, list[Any]] = defaultdict(list)
    with engine.connect() as conn:
        for chunk in _chunks(ids):
            for row in conn.execute(select(Job.__table__).where(Job.id.in_(chunk))):
                jobs[row.id] = row
            query = select(Branch.__table__).where(Branch.job_id.in_(chunk)).order_by(Branch.index)
            for row in conn.execute(query):
                branches[row.job_id].append(row)
    return jobs, branches


def _run_of(value: Any) -> str | None:
    return value.get("run") if isinstance(value, dict) and isinstance(value.get("run"), str) else None


def _extras(completions: list[Mark], recorded: str | None) -> list[Mark]:
    """The completed runs beyond the one that counts: all but the recorded one (or but the first)."""
    if recorded is not None and any(m.run == recorded for m in completions):
        return [m for m in completions if m.run != recorded]
    return completions[1:]


def check_job(
    tracked: Tracked,
    job: Any,
    branches: list[Any],
    marks: list[Mark],
    measured_from: float,
    hit_pids: set[int],
) -> JobCheck:
    out = JobCheck(tracked.token, tracked.job_id, job.state if job is not None else None)
    out.timed = tracked.timed
    if job is None:
        out.lost = "accepted, but there is no job row"
        return out
    out.created_at = job.created_at.timestamp()
    out.final = job.state in FINAL_JOB_STATES
    starts: dict[int, list[Mark]] = defaultdict(list)
    completions: dict[int, list[Mark]] = defaultdict(list)
    for m in marks:
        (starts if m.what == "S" else completions)[m.index].append(m)
    out.reruns = sum(max(0, len(v) - 1) for i, v in starts.items() if i != AGGREGATOR)
    out.fan_in_runs = len(completions.get(AGGREGATOR, []))
    out.redeliveries = sum(max(0, b.attempts - 1) for b in branches)
    recorded = {b.index: _run_of(b.result) for b in branches}
    recorded[AGGREGATOR] = _run_of(job.result)
    for index, done in completions.items():
        extras = _extras(done, recorded.get(index))
        out.doubled += len(extras)
        out.doubled_by_fault += sum(1 for m in extras if m.pid in hit_pids)
    if not out.final:
        where = Counter(f"{b.queue} {b.state}" for b in branches)
        out.stuck_at = ", ".join(f"{k} x{v}" for k, v in sorted(where.items()))
        active = {b.queue for b in branches if b.state in ("pending", "running")}
        out.stuck_queues = frozenset(active or {"fanin"})  # every branch ended: the fan-in is what waits
        return out
    finished = job.finished_at.timestamp()
    out.finished_at = finished
    out.latency = finished - out.created_at
    out.to_final = max(0.0, finished - measured_from)
    open_branches = [b.index for b in branches if b.state in ("pending", "running")]
    if open_branches or len(branches) != job.branch_total:
        out.lost = f"final {job.state} with branches {open_branches} left without an outcome"
        return out
    problems = []
    if job.state != tracked.expect:
        bad = Counter(
            f"{b.queue} {b.state}: {(b.error or '')[:160]}" for b in branches if b.state != "succeeded"
        )
        why = job.error or "; ".join(f"{n} x {what}" for what, n in bad.items())
        problems.append(f"ended {job.state} (expected {tracked.expect}): {why}")
    if tracked.poison_index is not None:
        poisoned = next((b for b in branches if b.index == tracked.poison_index), None)
        if poisoned is not None:
            out.poison_error = poisoned.error
            if poisoned.state != "failed":
                problems.append(f"the poison branch ended {poisoned.state}")
    for b in branches:
        run = recorded[b.index]
        if run is not None and not any(m.run == run for m in completions.get(b.index, [])):
            problems.append(f"branch {b.index} recorded run {run}, which never completed")
    seen = job.result.get("seen") if isinstance(job.result, dict) else None
    if isinstance(seen, dict):
        now = {str(b.index): (recorded[b.index] if b.state == "succeeded" else b.state) for b in branches}
        changed = sorted(k for k in now if seen.get(k) != now[k])
        if changed:
            problems.append(f"branch outcomes {changed} changed after the fan-in read them")
    if problems:
        out.wrong = "; ".join(problems)
    return out


def check_jobs(
    engine: Engine, tracked: Sequence[Tracked], marks: Marks, measured_from: float, hit_pids: set[int]
) -> list[JobCheck]:
    """Check every tracked job against its rows and its marks."""
    marks.refresh()
    ids = [uuid.UUID(t.job_id) for t in tracked if t.job_id]
    jobs, branches = _rows(engine, ids)
    out = []
    anonymous = {m.run for m in marks.by_token.get(UNKNOWN, [])}
    for t in tracked:
        uid = uuid.UUID(t.job_id) if t.job_id else None
        job = jobs.get(uid) if uid is not None else None
        own = marks.by_token.get(t.token, [])
        # An aggregator that saw no successful branch could not name its job: its recorded run is its own.
        run = _run_of(job.result) if job is not None else None
        if run is not None and run in anonymous:
            own = [*own, *(m for m in marks.by_token[UNKNOWN] if m.run == run)]
        out.append(check_job(t, job, branches.get(uid, []) if uid else [], own, measured_from, hit_pids))
    return out


_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Lost|Interrupt|Timeout)\b.*)$")


def tracebacks(log: str) -> tuple[int, Counter[str]]:
    """How many tracebacks a log holds, and the exception line each ends with (counted)."""
    lines = log.splitlines()
    count = 0
    kinds: Counter[str] = Counter()
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        count += 1
        for after in lines[i + 1 : i + 200]:
            if after.startswith((" ", "\t", "Traceback", "During handling", "The above exception")):
                continue
            if match := _EXCEPTION.match(after.strip()):
                kinds[match.group(1)[:160]] += 1
                break
    return count, kinds


@dataclass
class RoundResult:
    """One round of one scenario: its jobs' checks summed, and the fault's own timing."""

    number: int
    jobs: int = 0
    stuck: int = 0
    lost: int = 0
    wrong: int = 0
    refused: int = 0  # submits that failed (the client was told), not jobs
    doubled: int = 0
    doubled_by_fault: int = 0
    fan_in_runs: int = 0
    reruns: int = 0
    redeliveries: int = 0
    to_final: float | None = None  # the last job's time to final, when every job was final
    fault: dict[str, Any] = field(default_factory=dict)
    tracebacks: int = 0
    exceptions: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    poison_errors: list[str] = field(default_factory=list)
    error: str | None = None  # the round could not run (the harness failed)
    pool_exits: list[str] = field(default_factory=list)  # pools that exited on their own (not the fault)
    stuck_queues: set[str] = field(default_factory=set)  # queues the stuck jobs' work waited on

    def add(self, checks: Sequence[JobCheck]) -> None:
        self.jobs += len(checks)
        for c in checks:
            self.stuck += not c.final and c.lost is None
            self.lost += c.lost is not None
            self.wrong += c.wrong is not None
            self.doubled += c.doubled
            self.doubled_by_fault += c.doubled_by_fault
            self.fan_in_runs += c.fan_in_runs
            self.reruns += c.reruns
            self.redeliveries += c.redeliveries
            self.stuck_queues |= c.stuck_queues
            if c.poison_error and len(self.poison_errors) < 2:
                self.poison_errors.append(c.poison_error[:300])
            why = c.lost or c.wrong or (None if c.final else f"still {c.state} (branches: {c.stuck_at})")
            if why and len(self.problems) < 3:
                self.problems.append(f"job {c.job_id}: {why}"[:400])
        timed = [c for c in checks if c.timed]
        finals = [c.to_final for c in timed if c.to_final is not None]
        if finals and len(finals) == len(timed) and all(c.final for c in checks):
            self.to_final = max(finals)

    def to_dict(self) -> dict[str, Any]:
        return {k: sorted(v) if isinstance(v, set) else v for k, v in self.__dict__.items()}
