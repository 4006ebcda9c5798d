"""`orchestrator demo`: the three pools as subprocesses, one real mixed io+cpu job, then a clean stop."""

from __future__ import annotations

import http.server
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from rich.console import Console

from ..settings import Settings
from .processes import start_pools, stop_all


class _Handler(http.server.BaseHTTPRequestHandler):
    """A local stand-in for the shard services the io branches fetch from (no network needed)."""

    def do_GET(self) -> None:
        self.server.hits[self.path] += 1  # type: ignore[attr-defined]
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        path, _, query = self.path.partition("?")
        kind, _, arg = path.lstrip("/").partition("/")
        status, body = 200, b"hello, shard\n"
        if kind == "redirect":  # /redirect?to=URL: a 302 to URL
            self.send_response(302)
            self.send_header("Location", query.removeprefix("to="))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind == "bytes" and arg.isdigit():
            body = b"x" * int(arg)
        elif kind == "status" and arg.isdigit():
            status, body = int(arg), b""
        elif kind == "flaky":  # the shard API of the breaker demo: down while the server says so
            status = 503 if getattr(self.server, "failing", False) else 200
        time.sleep(0.05)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class LocalServer(http.server.ThreadingHTTPServer):
    failing = False  # what /flaky answers: 503 while True
    request_queue_size = 128  # socketserver's 5 makes concurrent branches wait on SYN retries

    def __init__(self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.hits: Counter[str] = Counter()  # requests per path, so tests can see who was called
        self.paths: list[str] = []  # every request's path, in order

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def local_http_server() -> Iterator[LocalServer]:
    server = LocalServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def breaker_demo(orc: Any, server: LocalServer, console: Console) -> None:
    """The shared circuit breaker in front of a failing API: it trips, refuses, then one probe closes it."""
    from jobs.io import shard_api

    from ..api import branch
    from .display import styled

    shard_api.reset()
    url = f"{server.url}/flaky"

    def run(step: str, n: int) -> None:
        view = orc.wait(
            orc.submit([branch("jobs.io.guarded_fetch", url)] * n, "jobs.aggregate.summary").id, 60
        )
        counts = "  ".join(f"{styled(k)}={v}" for k, v in sorted(view.counts().items()))
        console.print(f"  {step:<30} {counts}  -> {styled(shard_api.view().state)}", highlight=False)

    console.print(
        f"\n[bold]circuit breaker[/bold] shard-api (threshold {shard_api.failure_threshold}, reset "
        f"{shard_api.reset_timeout:g}s), one state in SQL for every worker"
    )
    server.failing = True
    run("API down, 3 calls:", 3)
    run("5 more calls, never sent:", 5)
    server.failing = False
    retry_at = shard_api.view().retry_at
    if retry_at is not None:
        time.sleep(max(0.0, (retry_at - datetime.now(UTC)).total_seconds()) + 0.05)
    run("API back, 5 calls, 1 probe:", 5)
    run("5 calls after the probe:", 5)


def run_demo(console: Console) -> int:
    from ..api import Orchestrator, branch
    from .display import print_job, watch_job

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
        with local_http_server() as server:
            base = server.url
            branches = (
                [branch("jobs.io.sleep", seconds=0.2) for _ in range(8)]
                + [branch("jobs.io.fetch_url", f"{base}/bytes/{1024 * (i + 1)}", timeout=5) for i in range(4)]
                + [branch("jobs.cpu.count_primes", limit=2_000_000) for _ in range(2)]
                + [branch("jobs.cpu.sha256_rounds", "demo", rounds=200_000)]
                + [branch("jobs.cpu.compress_ratio", "the quick brown fox ", repeat=50_000)]
            )
            job = orc.submit(branches, fan_in="jobs.aggregate.summary", name="demo")
            console.print(f"submitted job {job.id} with {len(branches)} branches")
            final = watch_job(orc, job.id, timeout=120)
            print_job(final)
            wall = final.duration or 0.0
            serial = sum(b.duration or 0.0 for b in final.branches)
            console.print(
                f"job wall time {wall:.3f}s for {serial:.3f}s of branch work "
                f"({serial / wall if wall else 0:.1f}x from fan-out)",
                highlight=False,
            )
            breaker_demo(orc, server, console)
        return 0 if final.state == "succeeded" else 1
    finally:
        with console.status("stopping the worker pools..."):
            codes = stop_all(workers)
        console.print(f"workers stopped (exit codes {codes})")
