"""The soak's PNG, drawn from its JSON section (Agg backend, no display): each pool's resident memory and
the job latency p99 over time, fault windows shaded, the baseline and the 2x target drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"io": "C0", "cpu": "C1", "fanin": "C2"}


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render_soak(soak: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, lat) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    for f in soak["faults"]:
        start = f["at_s"] / 60
        end = (f["at_s"] + f["duration_s"] + soak["plan"]["settle"]) / 60
        for ax in (mem, lat):
            ax.axvspan(start, end, color="red", alpha=0.12, linewidth=0)
        lat.annotate(
            f["scenario"],
            (start, 0.02),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=7,
            va="bottom",
            ha="right",
            color="darkred",
        )
    for role in sorted({s["role"] for s in soak["memory_samples"]}):
        for pid in sorted({s["pid"] for s in soak["memory_samples"] if s["role"] == role}):
            points = [s for s in soak["memory_samples"] if s["role"] == role and s["pid"] == pid]
            first = pid == min(s["pid"] for s in soak["memory_samples"] if s["role"] == role)
            mem.plot(
                [p["at_s"] / 60 for p in points],
                [p["pss"] / 2**20 for p in points],
                color=COLOURS.get(role, "C3"),
                label=role if first else None,
                linewidth=1.2,
            )
    mem.set_ylabel("pool memory (MiB of PSS, the worker and its children)")
    mem.legend(fontsize=8, loc="upper left")
    mem.grid(alpha=0.3)
    windows = soak["latency_windows"]
    xs = [(w["at_s"] + soak["plan"]["window"] / 2) / 60 for w in windows]
    lat.plot(xs, [w["p99_s"] for w in windows], marker="o", markersize=3, label="p99, all jobs", color="C0")
    lat.plot(
        xs,
        [w["p99_outside_faults_s"] for w in windows],
        marker="s",
        markersize=3,
        label="p99, jobs outside fault windows",
        color="C2",
    )
    if soak["baseline_p99_s"]:
        lat.axhline(soak["baseline_p99_s"], color="grey", linestyle="--", linewidth=1, label="baseline p99")
        lat.axhline(2 * soak["baseline_p99_s"], color="red", linestyle=":", linewidth=1, label="2x baseline")
    values = [w["p99_s"] for w in windows if w["p99_s"]]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        lat.set_yscale("log")
    lat.set_ylabel("job latency p99 (s), submit to final")
    lat.set_xlabel("minutes (red: a fault and its settling time)")
    lat.legend(fontsize=8, loc="upper left")
    lat.grid(alpha=0.3)
    fig.suptitle(f"python -m faults --soak: {soak['rate']:g} jobs/s, {soak['date']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
