"""`orchestrator demo`: the three pools as subprocesses, one real mixed io+cpu job, then a clean stop."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

from .embedded import start_pools, stop_all
from .settings import Settings


class _Handler(http.server.BaseHTTPRequestHandler):
    """A local stand-in for the shard services the io branches fetch from (no network needed)."""

    def do_GET(self) -> None:
        kind, _, arg = self.path.lstrip("/").partition("/")
        status, body = 200, b"hello, shard\n"
        if kind == "bytes" and arg.isdigit():
            body = b"x" * int(arg)
        elif kind == "status" and arg.isdigit():
            status, body = int(arg), b""
        time.sleep(0.05)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def local_http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_demo(console: Console) -> int:
    from .api import Orchestrator, branch
    from .cli import _print_job, _watch

    settings = Settings.from_env()
    where = "embedded (SQLite + file-system broker, no server)" if settings.embedded else settings.broker_url
    console.print(f"[bold]orchestrator demo[/bold] on {where}; state in {settings.home}")
    orc = Orchestrator(settings)
    started = time.perf_counter()
    with console.status("starting the io, cpu and fanin worker pools..."):
        workers = start_pools(env=None, log_dir=settings.home / "logs", concurrency={"io": 16})
    console.print(
        f"3 pools ready in {time.perf_counter() - started:.1f}s (pids "
        + ", ".join(f"{w.kind}={w.pid}" for w in workers)
        + ")"
    )
    try:
        with local_http_server() as base:
            branches = (
                [branch("jobs.io.sleep", seconds=0.2) for _ in range(8)]
                + [branch("jobs.io.fetch_url", f"{base}/bytes/{1024 * (i + 1)}", timeout=5) for i in range(4)]
                + [branch("jobs.cpu.count_primes", limit=2_000_000) for _ in range(2)]
                + [branch("jobs.cpu.sha256_rounds", "demo", rounds=200_000)]
                + [branch("jobs.cpu.compress_ratio", "the quick brown fox ", repeat=50_000)]
            )
            job = orc.submit(branches, fan_in="jobs.aggregate.summary", name="demo")
            console.print(f"submitted job {job.id} with {len(branches)} branches")
            final = _watch(orc, job.id, timeout=120)
        _print_job(final)
        wall = final.duration or 0.0
        serial = sum(b.duration or 0.0 for b in final.branches)
        console.print(
            f"job wall time {wall:.3f}s for {serial:.3f}s of branch work "
            f"({serial / wall if wall else 0:.1f}x from fan-out)",
            highlight=False,
        )
        return 0 if final.state == "succeeded" else 1
    finally:
        with console.status("stopping the worker pools..."):
            codes = stop_all(workers)
        console.print(f"workers stopped (exit codes {codes})")
