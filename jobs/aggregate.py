"""Stock fan-ins. Each receives the branch outcomes in submission order and returns a JSON value."""

from __future__ import annotations

from collections import Counter
from typing import Any

from orchestrator import BranchOutcome, aggregator


@aggregator
def collect(outcomes: list[BranchOutcome]) -> dict[str, Any]:
    """Results of the branches that succeeded, keyed by branch index."""
    return {str(o.index): o.result for o in outcomes if o.ok}


@aggregator
def total(outcomes: list[BranchOutcome]) -> float:
    """Sum of the numeric results of the branches that succeeded."""
    bad = [o.index for o in outcomes if o.ok and not isinstance(o.result, (int, float))]
    if bad:
        raise TypeError(f"branches {bad} returned non-numeric results")
    return float(sum(o.result for o in outcomes if o.ok))


@aggregator
def summary(outcomes: list[BranchOutcome]) -> dict[str, Any]:
    """Branch counts per state, the slowest branch, and the errors of those that did not succeed."""
    states = Counter(o.state for o in outcomes)
    timed = [o for o in outcomes if o.duration is not None]
    slowest = max(timed, key=lambda o: o.duration or 0.0, default=None)
    return {
        "branches": len(outcomes),
        "states": dict(sorted(states.items())),
        "slowest": None
        if slowest is None
        else {"index": slowest.index, "task": slowest.task, "seconds": round(slowest.duration or 0.0, 6)},
        "errors": {str(o.index): o.error for o in outcomes if o.error},
    }
