"""The PNG: latency distributions per system, drawn from the JSON report (Agg backend, no display).

A median hides the tail that users feel; the plot shows every kept sample of P1 (job latency) and P7
(submit latency), with the floor each should be compared to.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

# One colour per system in every panel.
COLOURS = {
    "orchestrator": "C0",
    "celery-redis": "C1",
    "celery-rabbitmq": "C2",
    "celery-redis-gevent": "C4",
    "celery-db": "C3",
}
PANELS = (
    # scenario, y label, scale to display unit, floor line (display unit) and its label
    ("P1", "job latency, submit to final (s)", 1.0, 0.2, "slowest branch (200 ms)"),
    ("P7", "submit latency (ms)", 1000.0, None, ""),
    ("P3", "wide job wall time (s)", 1.0, None, ""),
)


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_id = {sc["id"]: sc for sc in report["scenarios"]}
    panels = [p for p in PANELS if p[0] in by_id and by_id[p[0]]["measurements"]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.8), squeeze=False)
    jitter = random.Random(0)
    for ax, (sid, ylabel, scale, floor, floor_label) in zip(axes[0], panels, strict=True):
        measurements = by_id[sid]["measurements"]
        data = [[v * scale for v in m["samples"]] for m in measurements]
        labels = [m["system"].replace("celery-", "celery-\n") for m in measurements]
        positions = list(range(1, len(data) + 1))
        ax.boxplot(data, positions=positions, widths=0.5, showfliers=False)
        for pos, values, m in zip(positions, data, measurements, strict=True):
            xs = [pos + jitter.uniform(-0.15, 0.15) for _ in values]
            ax.scatter(xs, values, s=10, alpha=0.55, zorder=3, color=COLOURS.get(m["system"], "C2"))
        ax.set_xticks(positions, labels, fontsize=8)
        if floor is not None:
            ax.axhline(floor, linestyle="--", color="grey", linewidth=1, label=floor_label)
            ax.legend(fontsize=8, loc="upper left")
        values = [v for vs in data for v in vs]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_title(f"{sid}: {by_id[sid]['title']}", fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"python -m bench --{report['mode']}, {report['date']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
