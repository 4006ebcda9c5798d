"""The web view in a real browser, against real workers on PostgreSQL + RabbitMQ.

The server is the compose `web` service's exact command and environment (tests.compose), pointed at the
module's stack (conftest.pg_stack), so docker-compose.yml cannot drift from what is tested. The browser is
Debian's chromium driven by Playwright (one launch for the module; Playwright's own browser downloads are
never used). Set UPDATE_DOCS_SCREENSHOT=1 to write the job page's screenshot to docs/web-job.png.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from orchestrator import branch
from orchestrator.breaker import CircuitBreaker
from orchestrator.cli.processes import WorkerProcess
from orchestrator.store import Store
from orchestrator.web.live import Listeners, job_events, listen_conninfo
from orchestrator.web.reads import WebReads
from tests.compose import (
    compose_service,
    free_port,
    local_environment,
    read_env_file,
    start_service,
    wait_http_ok,
)
from tests.conftest import ROOT, Stack
from tests.unit.test_web import events, insert_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
USER, PASSWORD = "ops", "web-test-password"
FLOWER = "http://127.0.0.1:5555"  # the compose file's default ORCH_FLOWER_URL


@dataclass
class Web:
    url: str
    process: WorkerProcess
    stack: Stack

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **kwargs)


@pytest.fixture(scope="module")
def web(pg_stack: Stack) -> Iterator[Web]:
    service = compose_service(
        "web",
        database_url=pg_stack.env["ORCH_DATABASE_URL"],
        broker_url=pg_stack.env["ORCH_BROKER_URL"],
        variables={**read_env_file(), "ORCH_WEB_BASIC_AUTH": f"{USER}:{PASSWORD}"},
    )
    port = free_port()
    # Only where it listens differs from the container: a free local port, on loopback.
    env = local_environment(service, pg_stack.home, ORCH_WEB_PORT=str(port), ORCH_WEB_ADDRESS="127.0.0.1")
    process = start_service(service, env=env, log_dir=pg_stack.home / "logs")
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", process, 30)
        yield Web(f"http://127.0.0.1:{port}", process, pg_stack)
    finally:
        process.stop(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser, web: Web) -> Iterator[Page]:
    context = browser.new_context(
        base_url=web.url,
        http_credentials={"username": USER, "password": PASSWORD},
        viewport={"width": 1280, "height": 900},
    )
    context.set_default_timeout(15_000)
    try:
        yield context.new_page()
    finally:
        context.close()


# --- the server ------------------------------------------------------------------------------------


def test_the_web_service_runs_from_the_compose_command(web: Web) -> None:
    assert web.process.argv[-1] == "web"
    port = web.url.rsplit(":", 1)[1]
    web.process.wait_for_log(f"serving the web view on http://127.0.0.1:{port}/", timeout=5)


def test_without_credentials_the_server_answers_401(web: Web) -> None:
    with web.client() as anonymous:
        for path in ("/jobs", "/breakers", f"/jobs/{uuid.uuid4()}"):
            assert anonymous.get(path).status_code == 401, path
        assert anonymous.get("/jobs", auth=(USER, "wrong")).status_code == 401
        assert anonymous.get("/healthz").text == "ok"
    with web.client(auth=(USER, PASSWORD)) as c:
        assert c.get("/jobs").status_code == 200


# --- pages in the browser --------------------------------------------------------------------------


def test_the_jobs_page_lists_a_submitted_job(web: Web, page: Page) -> None:
    job = web.stack.orc.submit(
        [branch("jobs.io.sleep", seconds=0.1)] * 3, fan_in="jobs.aggregate.total", name="listed"
    )
    page.goto("/jobs")
    row = page.locator(f'tr[data-job="{job.id}"]')
    expect(row).to_be_visible()
    expect(row.locator("td.name")).to_have_text("listed")
    page.goto("/jobs?state=succeeded&name=listed")  # the state filter and the name filter
    web.stack.orc.wait(job.id, timeout=30)
    page.reload()
    expect(page.locator(f'tr[data-job="{job.id}"] .state')).to_have_text("succeeded")
    row.locator("a").click()
    expect(page).to_have_url(f"{web.url}/jobs/{job.id}")


def test_a_running_jobs_progress_bar_moves_without_a_reload(web: Web, page: Page) -> None:
    # Six io branches of one batch, finishing 0.4 s apart: the counter moves while the page watches.
    steps = [branch("jobs.io.sleep", seconds=0.4 * (i + 1)) for i in range(6)]
    job = web.stack.orc.submit(steps, fan_in="jobs.aggregate.total", name="moving")
    page.goto(f"/jobs/{job.id}")
    page.evaluate("window.__notReloaded = true; window.__seen = []")
    # Record every value the bar takes, from the page's own point of view.
    page.evaluate(
        """() => setInterval(() => {
             const bar = document.getElementById('job-progress');
             if (bar && !window.__seen.includes(bar.value)) window.__seen.push(bar.value);
           }, 20)"""
    )
    expect(page.locator("#job-state")).to_have_text("succeeded", timeout=20_000)
    values = page.evaluate("window.__seen")
    assert page.evaluate("window.__notReloaded") is True  # the same document all along
    assert any(0 < v < 6 for v in values), values  # it moved through intermediate values
    assert values[-1] == 6
    # The live part (timeline, branches, the fan-in's result) was fetched again, also without a reload.
    expect(page.locator("pre.result")).to_contain_text("8.4", timeout=5_000)  # 0.4+0.8+...+2.4
    expect(page.locator("svg.timeline rect.bar.t-succeeded")).to_have_count(6)


def test_the_job_page_shows_a_failed_branchs_error_and_the_timeline(web: Web, page: Page) -> None:
    branches = (
        [branch("jobs.io.sleep", seconds=0.05 * (i + 1)) for i in range(6)]
        + [branch("tests.catalog.boom", message="the payments backend said no")]
        + [branch("jobs.cpu.count_primes", limit=50_000 * (i + 1)) for i in range(3)]
        + [branch("tests.catalog.boom", message="shard 9 is down")]
        + [branch("jobs.io.sleep", seconds=0.5)]
    )
    job = web.stack.orc.submit(branches, fan_in="jobs.aggregate.summary", name="nightly-shards")
    view = web.stack.orc.wait(job.id, timeout=30)
    assert view.state == "partial"
    page.goto(f"/jobs/{job.id}")
    expect(page.locator("#job-state")).to_have_text("partial")
    failed = page.locator("#branch-6")
    expect(failed.locator(".state")).to_have_text("failed")
    expect(failed.locator("pre.error")).to_contain_text("RuntimeError: the payments backend said no")
    expect(page.locator("#branch-10 pre.error")).to_contain_text("shard 9 is down")
    # The timeline: one bar per branch, coloured by state.
    expect(page.locator("svg.timeline g.row")).to_have_count(len(branches))
    expect(page.locator("svg.timeline rect.bar.t-failed")).to_have_count(2)
    expect(page.locator("svg.timeline rect.bar.t-succeeded")).to_have_count(len(branches) - 2)
    # Each branch links to its task in Flower; the fan-in's result is shown.
    task_id = view.branches[6].celery_task_id
    expect(failed.locator("a")).to_have_attribute("href", f"{FLOWER}/task/{task_id}")
    expect(page.locator("pre.result")).to_contain_text('"failed": 2')  # jobs.aggregate.summary's counts
    shot = page.screenshot(full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        (ROOT / "docs" / "web-job.png").write_bytes(shot)


def test_cancel_with_credentials_ends_the_job_cancelled(web: Web, page: Page) -> None:
    job = web.stack.orc.submit(
        [branch("jobs.io.sleep", seconds=3)] * 2, fan_in="jobs.aggregate.total", name="to-cancel"
    )
    page.goto(f"/jobs/{job.id}")
    expect(page.locator("#job-state")).to_have_text("running")
    page.once("dialog", lambda dialog: dialog.accept())  # "Cancel this job?"
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-state")).to_have_text("cancelled")
    expect(page).to_have_url(f"{web.url}/jobs/{job.id}")  # redirected back (303) to the job
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    assert web.stack.orc.get(job.id).state == "cancelled"
    assert {b.state for b in web.stack.orc.get(job.id).branches} == {"cancelled"}


def test_a_breaker_is_shown_and_reset(web: Web, page: Page) -> None:
    tripped = CircuitBreaker(
        "web-payments", failure_threshold=1, reset_timeout=120, database_url=web.stack.settings.database_url
    )
    with pytest.raises(ConnectionError), tripped:
        raise ConnectionError("down")
    page.goto("/breakers")
    row = page.locator('tr[data-breaker="web-payments"]')
    expect(row.locator(".state")).to_have_text("open")
    expect(row).to_contain_text("1 / 1")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Reset").click()
    expect(row.locator(".state")).to_have_text("closed")


# --- live updates over PostgreSQL NOTIFY and scale --------------------------------------------------


def test_the_event_stream_ends_with_the_final_state(web: Web) -> None:
    job = web.stack.orc.submit([branch("jobs.io.sleep", seconds=0.3)] * 2, fan_in="jobs.aggregate.total")
    with web.client(auth=(USER, PASSWORD)) as c, c.stream("GET", f"/jobs/{job.id}/events") as stream:
        seen = list(events(stream.iter_lines()))
    assert seen[-1] == ("final", '{"state":"succeeded","done":2,"total":2,"final":true}')
    assert all(name == "progress" for name, _ in seen[:-1])


def test_the_final_move_reaches_the_stream_by_notify_not_by_the_next_read(web: Web) -> None:
    """With reads a minute apart, only the NOTIFY can bring the cancel within seconds."""
    url = web.stack.settings.database_url
    job_id = insert_job(url, branches=2, done=0)
    received: list[tuple[str, float]] = []

    async def watch() -> None:
        with anyio.fail_after(20):
            await read(
                job_events(
                    WebReads(url), job_id, conninfo=listen_conninfo(url), listeners=Listeners(), interval=60
                )
            )

    async def read(stream: AsyncIterator[str]) -> None:
        async for chunk in stream:
            if chunk.startswith("event: "):
                received.append((chunk.split("\n")[0][len("event: ") :], time.monotonic()))
                if received[-1][0] == "progress":
                    await anyio.sleep(0.3)  # the LISTEN is up before the first read: cancel now
                    await anyio.to_thread.run_sync(Store(url).cancel, job_id)
                    cancelled_at.append(time.monotonic())

    cancelled_at: list[float] = []
    # On a thread of its own: Playwright's sync API keeps an event loop on this one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(anyio.run, watch).result()
    assert [name for name, _ in received] == ["progress", "final"]
    assert received[1][1] - cancelled_at[0] < 2.0


def test_a_ten_thousand_branch_job_page_renders_in_under_a_second(web: Web) -> None:
    job_id = insert_job(web.stack.settings.database_url, name="ten-thousand", branches=10_000, done=9_500)
    with web.client(auth=(USER, PASSWORD)) as c:
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            response = c.get(f"/jobs/{job_id}")
            timings.append(time.perf_counter() - started)
            assert response.status_code == 200
    assert min(timings) < 1.0, timings
    html = response.text
    assert html.count('<tr id="branch-') == 100 and html.count('<g class="row">') == 100
    assert re.search(r"9500/10000", html)
