"""Summaries of repeated runs: the median as the figure, p5/p95/p99 and min/max as its spread."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), so small samples still give one."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p5: float
    p95: float
    p99: float
    min: float
    max: float
    mean: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(samples: Sequence[float]) -> Summary:
    return Summary(
        n=len(samples),
        median=statistics.median(samples),
        p5=percentile(samples, 5),
        p95=percentile(samples, 95),
        p99=percentile(samples, 99),
        min=min(samples),
        max=max(samples),
        mean=statistics.fmean(samples),
    )
