"""The edges around the core: what a person at a terminal uses, kept apart so the core reads at a glance.

- `commands`: the `orchestrator` command (console script `orchestrator.cli:main`, `python -m orchestrator`)
- `display`: terminal rendering of jobs, tables and the live progress bar
- `demo`: `orchestrator demo`, one real mixed job on pools it starts and stops itself
- `processes`: worker pools as local subprocesses, for the demo, the tests and the bench
- `metrics`: the Prometheus collector `orchestrator metrics` serves

The core (`orchestrator.*` outside this package) never imports from here.
"""

from .commands import main

__all__ = ["main"]
