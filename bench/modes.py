"""How big and how often: one frozen set of sizes per mode (smoke < quick < full).

Every scenario reads its sizes from here, so a mode is changed in one place and the report can state
exactly what was run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Mode:
    name: str
    warmup: int  # runs per system and scenario that are discarded
    p1_runs: int  # latency samples per system
    p1_runs_polling: int  # ... for the chord_unlock system, whose every run costs ~1.5 s
    p2_jobs: int  # jobs per throughput run
    p2_jobs_polling: int
    p2_runs: int
    p3_width: int  # branches of the wide job
    p3_runs: int
    p4_branches: int  # cpu branches per job
    p4_runs: int
    p4_branch_seconds: float  # calibrated cpu work per branch
    p7_runs: int
    p8_jobs: int = 1000  # jobs of 8 branches per bulk submit
    p8_runs: int = 1
    p5_jobs: int = 50  # jobs with a stuck branch, each timed from its deadline to its final state
    p6_rejections: int = 2000  # open-breaker refusals timed (cached); a tenth of that uncached
    p6_calls: int = 100  # breaker-guarded vs unguarded branches, per side
    skip_systems: tuple[str, ...] = ()  # systems left out of this mode altogether
    p9_jobs_per_host: int = 40  # io jobs submitted per worker host and run (P9)
    p9_runs: int = 2
    p10_jobs: int = 300  # jobs timed per variant (P10)
    p11_branches: int = 1_000_000  # branches recorded before pruning (P11)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MODES: dict[str, Mode] = {
    # The test's mode: every system and scenario once or twice, tiny sizes; numbers mean nothing.
    "smoke": Mode(
        name="smoke",
        warmup=1,
        p1_runs=2,
        p1_runs_polling=1,
        p2_jobs=5,
        p2_jobs_polling=2,
        p2_runs=1,
        p3_width=50,
        p3_runs=1,
        p4_branches=2,
        p4_runs=1,
        p4_branch_seconds=0.05,
        p7_runs=5,
        p8_jobs=20,
        p5_jobs=4,
        p6_rejections=200,
        p6_calls=8,
        p9_jobs_per_host=4,
        p9_runs=1,
        p10_jobs=20,
        p11_branches=8_000,
    ),
    # Under a minute on two cores: the real sizes, few repetitions.
    "quick": Mode(
        name="quick",
        warmup=1,
        p1_runs=6,
        p1_runs_polling=2,
        p2_jobs=24,
        p2_jobs_polling=4,
        p2_runs=1,
        p3_width=1000,
        p3_runs=1,
        p4_branches=4,
        p4_runs=1,
        p4_branch_seconds=0.3,
        p7_runs=15,
        p5_jobs=50,
        p6_rejections=2000,
        p6_calls=40,
        p9_jobs_per_host=24,
        p9_runs=1,
        p10_jobs=150,
        p11_branches=100_000,
        # Optional in the issue, and ~15 s of P3 on two cores: only the full mode runs it.
        skip_systems=("celery-redis-gevent",),
    ),
    "full": Mode(
        name="full",
        warmup=2,
        p1_runs=40,
        p1_runs_polling=15,
        p2_jobs=200,
        p2_jobs_polling=50,  # ~2 jobs/s: 200 jobs x 3 runs would be five minutes of chord_unlock
        p2_runs=3,
        p3_width=1000,
        p3_runs=5,
        p4_branches=8,
        p4_runs=5,
        p4_branch_seconds=0.3,
        p5_jobs=100,
        p6_rejections=20000,
        p6_calls=200,
        p7_runs=200,
        p8_runs=3,
    ),
}
