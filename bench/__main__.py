"""`python -m bench [--smoke | --quick | --full] [--out DIR] [--markdown PATH] [--only P1,P3]`.

Writes report.json, BENCHMARKS.md and latency.png to --out (bench/results/ by default, git-ignored)
and, with --markdown, BENCHMARKS.md to a path of your choice too. Exits 1 when a scenario failed to run
(a missed target is a finding in the report, not a failure of the harness), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from orchestrator.testing import ServiceError

from . import flow, plot, report, scaling  # noqa: F401 (scaling registers P9-P11, flow P12-P13)
from .modes import MODES
from .runner import SYSTEM_KEYS, run
from .scenarios import SCENARIOS

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", dest="mode", action="store_const", const="smoke", help="tiny (the test)")
    size.add_argument("--quick", dest="mode", action="store_const", const="quick", help="under a minute")
    size.add_argument("--full", dest="mode", action="store_const", const="full", help="the default")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report directory (%(default)s)")
    parser.add_argument("--markdown", type=Path, help="also write BENCHMARKS.md to this path")
    parser.add_argument("--only", help="comma-separated scenario ids, e.g. P1,P3")
    parser.add_argument("--systems", help=f"comma-separated subset of {','.join(SYSTEM_KEYS)}")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(mode="full")
    args = parser.parse_args(argv)
    known = [s.id for s in SCENARIOS]
    default = [s.id for s in SCENARIOS if args.mode in s.modes]
    args.scenario_ids = default if not args.only else [s.strip().upper() for s in args.only.split(",")]
    if unknown := [s for s in args.scenario_ids if s not in known]:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(known)}")
    args.system_keys = None if not args.systems else [s.strip() for s in args.systems.split(",")]
    if args.system_keys and (bad := [s for s in args.system_keys if s not in SYSTEM_KEYS]):
        parser.error(f"unknown system(s) {', '.join(bad)}; known: {', '.join(SYSTEM_KEYS)}")
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # SystemExit unwinds the runner's ExitStack: workers stopped, databases and vhosts dropped.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()

    def say(message: str) -> None:
        if not args.quiet:
            print(f"[bench {time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    out: Path = args.out
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("*.log"):
        old.unlink()
    busy_at_start = report.contention()
    scenarios = [s for s in SCENARIOS if s.id in args.scenario_ids]
    try:
        result = run(MODES[args.mode], scenarios, log_dir, say, args.system_keys)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    png = out / "latency.png"
    plot_name: str | None = None
    if not args.no_plot and plot.available():
        plot_name = png.name
    elif not args.no_plot:
        say("matplotlib is not installed: no plot (pip install matplotlib)")
    doc = report.build(result, busy_at_start, plot_name)
    if plot_name:
        plot.render(doc, png)
    report.write_json(doc, out / "report.json")
    report.write_markdown(doc, out / "BENCHMARKS.md")
    if args.markdown:
        report.write_markdown(doc, args.markdown)
    say(f"wrote {out / 'report.json'}, {out / 'BENCHMARKS.md'}" + (f", {png}" if plot_name else ""))
    if not args.quiet:
        print(report.render_markdown(doc))
    for error in result.errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
