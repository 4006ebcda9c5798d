"""`python -m faults [--quick] [--rounds N] [--scenario NAME ...] [--soak 30m] [--out DIR] [--markdown PATH]`.

Writes reliability.json and RELIABILITY.md to --out (faults/results/ by default, git-ignored) and, with
--markdown PATH, the same Markdown to PATH and its JSON beside it (PATH with .json; the soak's plot too).
Exits 1 when a fault could not be injected or a scenario did not survive (a soak: when a target was
missed), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.report import contention
from orchestrator.testing import ServiceError

from . import plot, report
from .checker import RoundResult
from .modes import MODES
from .runner import SURVIVED, ScenarioResult, rounds_for, run
from .scenarios import BY_NAME, SCENARIOS
from .soak import SoakPlan, parse_duration, run_soak

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m faults", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="one round of each, small waves (the test's round)"
    )
    parser.add_argument("--rounds", type=int, help="rounds per fault (default 10, SIGKILLs 20; --quick: 1)")
    parser.add_argument(
        "--scenario", action="append", default=[], metavar="NAME", help="run only this one (repeatable)"
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--soak", metavar="DURATION", help="soak for this long (30m, 2h, 90s) instead")
    parser.add_argument("--rate", type=float, default=20.0, help="soak: jobs a second (%(default)s)")
    parser.add_argument("--fault-every", metavar="DURATION", help="soak: time between faults (default 3m)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report directory (%(default)s)")
    parser.add_argument("--markdown", type=Path, help="also write the Markdown here, its JSON beside it")
    parser.add_argument("--no-plot", action="store_true", help="skip the soak's PNG")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if unknown := [n for n in args.scenario if n not in BY_NAME]:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        args.soak_seconds = parse_duration(args.soak) if args.soak else None
        args.fault_every_seconds = parse_duration(args.fault_every) if args.fault_every else None
    except ValueError:
        parser.error("a duration is a number with s, m or h (30m, 90s, 1h)")
    if args.soak_seconds is not None and (args.soak_seconds <= 0 or args.rate <= 0):
        parser.error("--soak and --rate must be positive")
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # SystemExit unwinds the runner's ExitStack: workers stopped, private services stopped and removed.
    raise SystemExit(128 + signum)


@contextmanager
def progress_bar(enabled: bool, total: int, what: str) -> Iterator[Callable[[int, str], None]]:
    """A rich progress bar on stderr (nothing when quiet or not a terminal); yields advance(n, label)."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda n, label: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n, label: bar.update(task, advance=n, description=label)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for sc in SCENARIOS:
            print(f"{sc.name:22} {sc.deployment:9} {sc.rounds:3} rounds  {sc.title}")
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()

    def say(message: str) -> None:
        if not args.quiet:
            print(f"[faults {time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    out: Path = args.out
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in [*log_dir.glob("*.log"), *(out / "marks").glob("*.marks")]:
        old.unlink()
    command = "python -m faults " + shlex.join(argv if argv is not None else sys.argv[1:])
    sizes = MODES["quick" if args.quick else "full"]
    busy = contention()
    json_path, md_path = out / report.JSON_NAME, out / report.MARKDOWN_NAME
    try:
        if args.soak_seconds is not None:
            plan = SoakPlan.for_duration(args.soak_seconds, args.rate, args.fault_every_seconds)
            with progress_bar(not args.quiet, int(plan.duration), "soak") as advance:
                done = [0]

                def tick(elapsed: float) -> None:
                    advance(int(elapsed) - done[0], "soak")
                    done[0] = int(elapsed)

                soak = run_soak(sizes, plan, out, say, tick)
            soak.update(report.provenance(command.strip(), busy))
            soak["plot"] = None
            if not args.no_plot and plot.available():
                plot.render_soak(soak, out / report.SOAK_PLOT)
                soak["plot"] = report.SOAK_PLOT
            section, content = "soak", soak
            ok = all(t["met"] for t in soak["targets"])
        else:
            chosen = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
            total = sum(rounds_for(s, sizes, args.rounds) for s in chosen)
            with progress_bar(not args.quiet, total, "faults") as advance:

                def advanced(sc: ScenarioResult, rr: RoundResult) -> None:
                    advance(1, f"{sc.name} round {rr.number}")

                result = run(sizes, chosen, out, say, rounds=args.rounds, advance=advanced)
            section, content = "matrix", report.build_matrix(result, command.strip(), busy)
            ok = not result.errors and all(s.verdict == SURVIVED for s in result.scenarios)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    doc = report.write(section, content, json_path, md_path)
    if args.markdown:
        target: Path = args.markdown
        report.write(section, content, target.with_suffix(".json"), target)
        if section == "soak" and content.get("plot"):
            shutil.copyfile(out / report.SOAK_PLOT, target.parent / report.SOAK_PLOT)
    say(f"wrote {json_path}, {md_path}" + (f" and {args.markdown}" if args.markdown else ""))
    if not args.quiet:
        print(report.render_markdown(doc))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
