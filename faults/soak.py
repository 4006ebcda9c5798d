"""`python -m faults --soak 30m`: jobs at a steady rate for a long time, a random fault from the matrix
every few minutes, each pool's resident memory sampled, and every job checked at the end.

Targets (the issue's): 0 lost, 0 stuck, RSS growth under 10 %/h per pool (resident memory
measured as PSS, so a prefork pool's shared pages count once), and the job latency p99 outside
fault windows within 2x the baseline (the p99 before the first fault).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.stats import percentile

from .checker import JobCheck, Tracked, check_jobs
from .modes import Sizes
from .runner import cancel_unfinished
from .scenarios import (
    Context,
    Injected,
    captured_messages,
    duplicate,
    job_spec,
    kill_and_restart,
    pause,
    private_context,
    rabbitmq_outage,
    restart_postgres,
    submit_one,
    terminate_backends,
    token,
    wait_final,
)
from .stack import RABBITMQ, Deployment

#: Resident memory (PSS) growth the soak tolerates, per pool, in percent an hour.
RSS_GROWTH_TARGET = 10.0
#: How much worse than the baseline the p99 outside fault windows may be.
P99_TARGET = 2.0


def parse_duration(text: str) -> float:
    """'30m', '90s', '1h', '2.5m' or plain seconds."""
    text = text.strip().lower()
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


@dataclass(frozen=True)
class SoakPlan:
    duration: float
    rate: float
    fault_every: float
    baseline: float  # seconds before the first fault: the baseline p99 is measured here
    window: float  # latency p99 per window of this many seconds (by job creation)
    settle: float  # a fault's window lasts this long after it is over
    sample_every: float  # memory sampling interval

    @classmethod
    def for_duration(cls, duration: float, rate: float, fault_every: float | None) -> SoakPlan:
        """The issue's plan for a long soak (faults every 3 minutes after a 3-minute baseline), scaled
        down for a short one so that a 2-minute run still has a baseline and a few faults."""
        every = fault_every or min(180.0, max(20.0, duration / 4))
        return cls(
            duration=duration,
            rate=rate,
            fault_every=every,
            baseline=min(180.0, duration * 0.2),
            window=min(60.0, max(10.0, duration / 12)),
            settle=min(60.0, every / 2),
            sample_every=min(10.0, max(2.0, duration / 60)),
        )


Inject = Callable[[Context, Deployment, "Soak"], Injected]


def _poison(ctx: Context, dep: Deployment, soak: Soak) -> Injected:
    started = time.time()
    for _ in range(2):
        tok = token()
        tracked = Tracked(tok, None, time.time(), expect="partial", poison_index=ctx.sizes.io_branches)
        submit_one(dep, job_spec(ctx, tok, poison=True), tracked)
        soak.track(tracked)
    return Injected(started, started, started, set(), True, {"poisoned_jobs": 2})


def _duplicate(ctx: Context, dep: Deployment, soak: Soak) -> Injected:
    """The next few messages the steady stream publishes, published a second time."""
    with captured_messages(dep.orc.app) as messages:
        deadline = time.monotonic() + 10
        while len(messages) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    return duplicate(ctx, dep, list(messages[:4]))


SOAK_FAULTS: dict[str, Inject] = {
    "sigkill-io": lambda ctx, dep, soak: kill_and_restart(ctx, dep, "io", None),
    "sigkill-cpu": lambda ctx, dep, soak: kill_and_restart(ctx, dep, "cpu", None),
    "sigkill-fanin": lambda ctx, dep, soak: kill_and_restart(ctx, dep, "fanin", None),
    "sigstop": lambda ctx, dep, soak: pause(
        ctx, dep, soak.rng.choice(("io", "cpu", "fanin")), None, ctx.sizes.sigstop_seconds, keep_standby=False
    ),
    "poison": _poison,
    "pg-restart-fast": lambda ctx, dep, soak: restart_postgres(ctx, dep, None, "fast"),
    "pg-restart-immediate": lambda ctx, dep, soak: restart_postgres(ctx, dep, None, "immediate"),
    "pg-terminate": lambda ctx, dep, soak: terminate_backends(
        ctx, dep, ctx.sizes.terminate_seconds, ctx.sizes.terminate_every
    ),
    "rabbitmq-outage": lambda ctx, dep, soak: rabbitmq_outage(ctx, dep, None, ctx.sizes.outage_seconds),
    "duplicate-delivery": _duplicate,
}


@dataclass
class Soak:
    """The running soak: the jobs submitted, the faults injected, the memory samples."""

    plan: SoakPlan
    rng: random.Random = field(default_factory=lambda: random.Random(6))
    tracked: list[Tracked] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    hit_pids: set[int] = field(default_factory=set)
    pool_exits: list[dict[str, Any]] = field(default_factory=list)  # pools that exited on their own
    behind: int = 0  # ticks where the submitter fell more than a second behind the rate
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def track(self, tracked: Tracked) -> None:
        with self._lock:
            self.tracked.append(tracked)

    def submitter(self, ctx: Context, dep: Deployment) -> None:
        """Submit at the plan's rate, one job at a time; a refused submit is counted, not retried."""
        interval = 1.0 / self.plan.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now < next_at:
                time.sleep(min(next_at - now, 0.05))
                continue
            if now - next_at > 1.0:
                self.behind += 1
                next_at = now  # no catching up in a burst after a stall: the rate stays the rate
            tok = token()
            tracked = Tracked(tok, None, time.time())
            submit_one(dep, job_spec(ctx, tok, io_seconds=(0.1, 0.3), cpu_seconds=0.02), tracked)
            self.track(tracked)
            next_at += interval

    def sampler(self, dep: Deployment, started: float) -> None:
        while not self._stop.wait(self.plan.sample_every):
            at = time.time() - started
            for role, (pid, pss, threads) in dep.memory().items():
                if not role.endswith("-2"):  # standbys come and go with the SIGSTOP fault
                    sample = {"at_s": round(at, 1), "role": role, "pid": pid, "pss": pss, "threads": threads}
                    self.memory.append(sample)

    def stop(self) -> None:
        self._stop.set()


def memory_growth(samples: Sequence[dict[str, Any]], min_span: float) -> dict[str, Any]:
    """Per pool, the fastest resident memory (PSS) growth (%/h) of any incarnation (pid) that lived at
    least `min_span` seconds: the median of its last third against the median of its first third, its
    first fifth left out as warm-up. Medians, not a fitted line: prefork children that die and are
    replaced (a poison branch) dip the sum for a moment, which is not a trend."""
    out: dict[str, Any] = {}
    for role in sorted({s["role"] for s in samples}):
        best: float | None = None
        for pid in {s["pid"] for s in samples if s["role"] == role}:
            points = [(s["at_s"], s["pss"]) for s in samples if s["role"] == role and s["pid"] == pid]
            if len(points) < 6 or points[-1][0] - points[0][0] < min_span:
                continue
            skip = points[0][0] + (points[-1][0] - points[0][0]) / 5
            points = [p for p in points if p[0] >= skip]
            third = max(1, len(points) // 3)
            first, last = points[:third], points[-third:]
            hours = (statistics.median(p[0] for p in last) - statistics.median(p[0] for p in first)) / 3600
            base = statistics.median(p[1] for p in first)
            if hours <= 0 or base <= 0:
                continue
            growth = (statistics.median(p[1] for p in last) - base) / base * 100 / hours
            best = growth if best is None else max(best, growth)
        out[role] = None if best is None else round(best, 2)
    return out


def _in_fault(check: JobCheck, windows: Sequence[tuple[float, float]]) -> bool:
    assert check.created_at is not None and check.finished_at is not None
    return any(check.created_at < end and check.finished_at > start for start, end in windows)


def latency_windows(
    checks: Sequence[JobCheck], started: float, plan: SoakPlan, fault_windows: Sequence[tuple[float, float]]
) -> tuple[float | None, list[dict[str, Any]]]:
    """The baseline p99 (jobs created before the first fault, after a warm-up) and, per window of job
    creation, the p99 of all jobs and of those that overlap no fault window."""
    done = [
        c for c in checks if c.latency is not None and c.created_at is not None and c.finished_at is not None
    ]
    warmup = min(30.0, plan.baseline / 3)
    first_fault = min((s for s, _ in fault_windows), default=started + plan.duration)
    base = [
        c.latency
        for c in done
        if started + warmup <= (c.created_at or 0) < min(started + plan.baseline, first_fault)
        and not _in_fault(c, fault_windows)
        and c.latency is not None
    ]
    baseline = percentile(base, 99) if len(base) >= 10 else None
    windows = []
    at = started
    while at < started + plan.duration:
        inside = [c for c in done if at <= (c.created_at or 0) < at + plan.window]
        calm = [c.latency for c in inside if not _in_fault(c, fault_windows) and c.latency is not None]
        every = [c.latency for c in inside if c.latency is not None]
        windows.append(
            {
                "at_s": round(at - started, 1),
                "jobs": len(inside),
                "p99_s": percentile(every, 99) if every else None,
                "p99_outside_faults_s": percentile(calm, 99) if len(calm) >= 10 else None,
            }
        )
        at += plan.window
    return baseline, windows


def run_soak(
    sizes: Sizes, plan: SoakPlan, run_dir: Path, say: Callable[[str], None], tick: Callable[[float], None]
) -> dict[str, Any]:
    """The soak on the production deployment (PostgreSQL + RabbitMQ); returns the report section."""
    soak = Soak(plan)
    began = datetime.now(UTC)
    with ExitStack() as stack:
        ctx = stack.enter_context(private_context(sizes, run_dir, say))
        versions = ctx.services.versions()
        dep = ctx.deployment(RABBITMQ)
        started = time.time()
        threads = [
            threading.Thread(target=soak.submitter, args=(ctx, dep), daemon=True),
            threading.Thread(target=soak.sampler, args=(dep, started), daemon=True),
        ]
        for t in threads:
            t.start()
        stack.callback(soak.stop)
        next_fault = started + plan.baseline
        next_check = started
        say(f"soak: {plan.rate:g} jobs/s for {plan.duration:.0f} s, a fault every {plan.fault_every:.0f} s")
        while time.time() < started + plan.duration:
            tick(time.time() - started)
            if time.time() >= next_fault:
                name = soak.rng.choice(sorted(SOAK_FAULTS))
                say(f"soak {time.time() - started:.0f}s: {name}")
                try:
                    injected = SOAK_FAULTS[name](ctx, dep, soak)
                    soak.hit_pids |= injected.hit_pids
                    soak.faults.append(
                        {
                            "scenario": name,
                            "at_s": injected.started - started,
                            "ended_s": injected.ended - started,
                            "duration_s": injected.ended - injected.started,
                            **injected.to_dict(),
                        }
                    )
                except Exception as exc:
                    say(f"soak: {name} could not be injected: {type(exc).__name__}: {exc}")
                    soak.faults.append(
                        {
                            "scenario": name,
                            "at_s": time.time() - started,
                            "duration_s": 0.0,
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                    )
                next_fault = max(next_fault + plan.fault_every, time.time() + plan.settle)
            if time.time() >= next_check:  # a pool that exited on its own is restarted, and counted
                soak.pool_exits += [{"at_s": time.time() - started, "exit": e} for e in dep.ensure_running()]
                next_check = time.time() + 5
            time.sleep(0.2)
        soak.stop()
        for t in threads:
            t.join(30)
        say(f"soak: {len(soak.tracked)} jobs submitted; waiting for them to end")
        accepted = [t for t in soak.tracked if t.refused is None and t.job_id is not None]
        wait_final(dep, accepted, time.time() + sizes.job_timeout + sizes.stall)
        checks: list[JobCheck] = []
        for start in range(0, len(accepted), 2000):
            part = accepted[start : start + 2000]
            checks += check_jobs(dep.orc.store.engine, part, ctx.marks, started, soak.hit_pids)
            ctx.marks.forget(t.token for t in part)
        cancel_unfinished(dep, [t for t, c in zip(accepted, checks, strict=True) if not c.final])
    return summarize(soak, checks, started, began, versions, sizes)


def summarize(
    soak: Soak,
    checks: Sequence[JobCheck],
    started: float,
    began: datetime,
    versions: dict[str, str],
    sizes: Sizes,
) -> dict[str, Any]:
    plan = soak.plan
    fault_windows = [
        (started + f["at_s"], started + f["at_s"] + f["duration_s"] + plan.settle) for f in soak.faults
    ]
    baseline, windows = latency_windows(checks, started, plan, fault_windows)
    # Whether the machine kept up with the offered rate: if not, latency grows whatever the faults do.
    load_end = started + plan.duration
    finished = [c.finished_at for c in checks if c.finished_at is not None]
    in_load = len([f for f in finished if f <= load_end])
    drain = max(finished) - load_end if finished else None
    growth = memory_growth(soak.memory, min_span=max(30.0, plan.duration / 4))
    lost = sum(c.lost is not None for c in checks)
    stuck = sum(not c.final and c.lost is None for c in checks)
    calm = [w["p99_outside_faults_s"] for w in windows if w["p99_outside_faults_s"] is not None]
    worst_ratio = max(calm) / baseline if calm and baseline else None
    measured = [g for g in growth.values() if g is not None]
    worst_growth = max(measured) if measured else None
    growth_text = ", ".join(f"{k} {'n/a' if v is None else f'{v:+.1f} %/h'}" for k, v in growth.items())
    targets = [
        {"target": "0 lost", "measured": str(lost), "met": lost == 0},
        {"target": "0 stuck", "measured": str(stuck), "met": stuck == 0},
        {
            "target": f"RSS (PSS) growth < {RSS_GROWTH_TARGET:g} %/h per pool",
            "measured": growth_text or "no pool lived long enough",
            "met": worst_growth is not None and worst_growth < RSS_GROWTH_TARGET,
        },
        {
            "target": f"p99 outside fault windows <= {P99_TARGET:g}x the baseline",
            "measured": "-"
            if worst_ratio is None or baseline is None
            else f"worst window {worst_ratio:.2f}x (baseline p99 {baseline:.2f} s)",
            "met": worst_ratio is not None and worst_ratio <= P99_TARGET,
        },
    ]
    return {
        "date": began.isoformat(timespec="seconds"),
        "duration_s": plan.duration,
        "rate": plan.rate,
        "fault_every_s": plan.fault_every,
        "baseline_s": plan.baseline,
        "plan": plan.__dict__,
        "sizes": sizes.to_dict(),
        "services": versions,
        "jobs": len(checks),
        "refused": len([t for t in soak.tracked if t.refused is not None]),
        "submitter_fell_behind": soak.behind,
        "finished_per_s_under_load": round(in_load / plan.duration, 2),
        "drain_after_load_s": None if drain is None else round(max(0.0, drain), 1),
        "lost": lost,
        "stuck": stuck,
        "pool_exits": soak.pool_exits,
        "wrong": sum(c.wrong is not None for c in checks),
        "doubled": sum(c.doubled for c in checks),
        "doubled_by_fault": sum(c.doubled_by_fault for c in checks),
        "problems": [
            f"job {c.job_id}: {c.lost or c.wrong or c.state}"
            for c in checks
            if c.lost or c.wrong or not c.final
        ][:10],
        "baseline_p99_s": baseline,
        "memory_growth_pct_per_hour": growth,
        "targets": targets,
        "faults": soak.faults,
        "latency_windows": windows,
        "memory_samples": soak.memory,
    }
