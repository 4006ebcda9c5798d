"""The benchmark harness: the orchestrator against plain Celery chords and an asyncio ideal, same run.

Run it with ``python -m bench`` (see bench/README.md). Timings live here, as ratios against baselines
measured in the same run, so that the test suite can assert behaviour and never speed.
"""
