"""`python -m faults`: the fault suite. Real faults injected into real services and worker processes while
jobs are in flight, a checker per job (final, outcomes written once, runs counted, time to final), and a
report (RELIABILITY.md and JSON) the way `python -m bench` writes BENCHMARKS.md."""
