"""One run of the matrix: the private services started, each scenario's rounds played, every job checked,
everything stopped.

Everything started here is registered on one ExitStack as soon as it exists, so an error, Ctrl-C or
SIGTERM still stops every worker (by pid) and every private service, and removes their directories.
"""

from __future__ import annotations

import statistics
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.models import FINAL_JOB_STATES

from .checker import RoundResult, Tracked, check_jobs, tracebacks
from .modes import Sizes
from .scenarios import Context, Scenario, job_spec, private_context, submit_one, token, wait_final
from .stack import Deployment

SURVIVED = "survived"
FAILED = "failed"
NOT_RUN = "not run"


@dataclass
class ScenarioResult:
    name: str
    title: str
    deployment: str
    measured_from: str
    by_design: str
    rounds: list[RoundResult] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None  # it could not run at all (the harness failed)
    notes: list[str] = field(default_factory=list)

    def total(self, key: str) -> int:
        return sum(int(getattr(r, key)) for r in self.rounds)

    @property
    def doubled_unexplained(self) -> int:
        """Runs completed twice that neither a process the fault hit nor the scenario's design explains."""
        return 0 if self.by_design else self.total("doubled") - self.total("doubled_by_fault")

    @property
    def verdict(self) -> str:
        ran = [r for r in self.rounds if r.error is None]
        if not ran:
            return NOT_RUN
        bad = self.total("stuck") + self.total("lost") + self.total("wrong") + self.doubled_unexplained
        bad += sum(1 for r in self.rounds if r.fault.get("rejoined") is False)  # a host that stayed away
        exits = sum(len(r.pool_exits) for r in self.rounds)  # a pool must keep serving, not need a restart
        return FAILED if bad or exits or len(ran) < len(self.rounds) or self.error else SURVIVED

    def to_dict(self) -> dict[str, Any]:
        finals = [r.to_final for r in self.rounds if r.to_final is not None]
        exceptions: Counter[str] = Counter()
        for r in self.rounds:
            exceptions.update(r.exceptions)
        return {
            "scenario": self.name,
            "title": self.title,
            "deployment": self.deployment,
            "verdict": self.verdict,
            "rounds": len([r for r in self.rounds if r.error is None]),
            "rounds_failed_to_run": len([r for r in self.rounds if r.error is not None]),
            "jobs": self.total("jobs"),
            "stuck": self.total("stuck"),
            "lost": self.total("lost"),
            "wrong": self.total("wrong"),
            "refused": self.total("refused"),
            "doubled": self.total("doubled"),
            "doubled_by_fault": self.total("doubled_by_fault"),
            "doubled_unexplained": self.doubled_unexplained,
            "duplicates_by_design": self.by_design,
            "fan_in_runs": self.total("fan_in_runs"),
            "reruns": self.total("reruns"),
            "redeliveries": self.total("redeliveries"),
            "tracebacks": self.total("tracebacks"),
            "pool_exits": [e for r in self.rounds for e in r.pool_exits],
            "exceptions": dict(exceptions.most_common(8)),
            "not_in_flight": len([r for r in self.rounds if r.fault and not r.fault.get("in_flight", True)]),
            "time_to_final_s": {
                "worst": max(finals) if finals else None,
                "median": statistics.median(finals) if finals else None,
                "rounds_all_final": len(finals),
            },
            "measured_from": self.measured_from,
            "seconds": round(self.seconds, 1),
            "error": self.error,
            "notes": self.notes,
            "round_details": [r.to_dict() for r in self.rounds],
        }


@dataclass
class RunResult:
    sizes: Sizes
    started_at: datetime
    finished_at: datetime | None = None
    services: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    scenarios: list[ScenarioResult] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        out = [f"{s.name}: {s.error.splitlines()[0]}" for s in self.scenarios if s.error]
        for s in self.scenarios:
            out += [f"{s.name} round {r.number}: {r.error.splitlines()[0]}" for r in s.rounds if r.error]
        return out


def cancel_unfinished(dep: Deployment, wave: Sequence[Tracked]) -> int:
    """Cancel what a failed round left running, so it cannot feed the next round (a poison message
    looping forever, say); the checks were taken before."""
    cancelled = 0
    for t in wave:
        if t.job_id:
            with suppress(Exception):
                dep.orc.cancel(t.job_id)
                cancelled += 1
    return cancelled


def play_round(ctx: Context, sc: Scenario, dep: Deployment, number: int) -> RoundResult:
    result = RoundResult(number + 1)
    offsets = dep.log_offsets()
    began = time.time()
    wave: list[Tracked] = []
    try:
        injected = sc.play(ctx, dep, number, wave)
        result.fault = injected.to_dict()
        until = injected.ended + ctx.sizes.job_timeout + ctx.sizes.stall + sc.extra_timeout(ctx.sizes)
        accepted = [t for t in wave if t.refused is None and t.job_id is not None]
        result.refused = len(wave) - len(accepted)
        wait_final(dep, accepted, until)
        result.add(
            check_jobs(dep.orc.store.engine, accepted, ctx.marks, injected.measured_from, injected.hit_pids)
        )
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        ctx.say(f"{sc.name} round {number + 1} failed to run: {type(exc).__name__}: {str(exc)[:200]}")
    finally:
        with suppress(Exception):
            if result.stuck or result.error:
                # Whether a pool had stopped serving before this round's fault: silent since before it began.
                silent = dep.silent_since(began)
                if silent := {r: t for r, t in silent.items() if dep.kind(r) in result.stuck_queues}:
                    result.fault["silent_before_round_s"] = silent
                result.pool_exits = dep.exited()
                cancel_unfinished(dep, wave)
                dep.restart_all()
                result.fault["pools_restarted_after_round"] = "all"
            else:
                result.pool_exits = dep.ensure_running()
        count, kinds = tracebacks(dep.logs_since(offsets))
        result.tracebacks, result.exceptions = count, dict(kinds)
        ctx.marks.forget(t.token for t in wave)
    return result


def probe(ctx: Context, dep: Deployment, timeout: float = 20.0) -> bool:
    """One tiny job through every pool: does the deployment serve work before a scenario starts?"""
    tok = token()
    tracked = Tracked(tok, None, time.time())
    spec = job_spec(ctx, tok, io_seconds=(0.01, 0.01), cpu_seconds=0.001)
    if not submit_one(dep, spec, tracked, retry_for=5):
        return False
    wait_final(dep, [tracked], time.time() + timeout)
    ok = dep.orc.store.state(tracked.job_id or "") in FINAL_JOB_STATES
    if not ok:
        cancel_unfinished(dep, [tracked])
    ctx.marks.forget([tok])
    return ok


def healthy(ctx: Context, dep: Deployment) -> str | None:
    """Probe the deployment; when it serves nothing, restart its pools (and say so for the report)."""
    if probe(ctx, dep):
        return None
    ctx.say("the deployment served no probe job: restarting its pools")
    dep.restart_all()
    note = "a probe job did not end before the scenario (left so by the one before): pools restarted"
    return note if probe(ctx, dep) else note + ", and it still did not end"


def run_scenario(
    ctx: Context, sc: Scenario, rounds: int, advance: Callable[[ScenarioResult, RoundResult], None]
) -> ScenarioResult:
    out = ScenarioResult(sc.name, sc.title, sc.deployment, sc.measured_from, sc.by_design)
    started = time.perf_counter()
    try:
        dep = ctx.deployment(sc.deployment)
        if note := healthy(ctx, dep):
            out.notes.append(note)
        for number in range(rounds):
            out.rounds.append(play_round(ctx, sc, dep, number))
            advance(out, out.rounds[-1])
        if sc.teardown is not None:
            sc.teardown(ctx, dep)
    except Exception as exc:
        out.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        ctx.say(f"{sc.name} failed: {type(exc).__name__}: {str(exc)[:200]}")
    out.seconds = time.perf_counter() - started
    return out


def rounds_for(sc: Scenario, sizes: Sizes, override: int | None) -> int:
    return override or sizes.rounds or sc.rounds


def run(
    sizes: Sizes,
    scenarios: Sequence[Scenario],
    run_dir: Path,
    say: Callable[[str], None],
    *,
    rounds: int | None = None,
    advance: Callable[[ScenarioResult, RoundResult], None] = lambda s, r: None,
) -> RunResult:
    result = RunResult(sizes=sizes, started_at=datetime.now(UTC), settings=sizes.settings())
    with private_context(sizes, run_dir, say) as ctx:
        result.services = ctx.services.versions()
        # Scenarios of one deployment run together: each deployment starts once.
        order = sorted(scenarios, key=lambda s: [sc.deployment for sc in scenarios].index(s.deployment))
        for sc in order:
            n = rounds_for(sc, sizes, rounds)
            say(f"{sc.name}: {n} round(s) of {sc.title}")
            out = run_scenario(ctx, sc, n, advance)
            result.scenarios.append(out)
            d = out.to_dict()
            say(
                f"{sc.name}: {d['verdict']}; jobs {d['jobs']}, stuck {d['stuck']}, lost {d['lost']}, "
                f"wrong {d['wrong']}, doubled {d['doubled']} ({d['doubled_by_fault']} by the fault), "
                f"worst to final {_s(d['time_to_final_s']['worst'])}"
            )
        say("stopping")
    result.finished_at = datetime.now(UTC)
    return result


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"
