"""The web view over HTTP, on a SQLite file (no services): credentials, CSRF refusals, 404s, keyset pages,
a 10,000-branch job's page, the event stream's polling path, and the `orchestrator web` refusals.

The app runs in uvicorn on a thread, on a free loopback port, and httpx talks to it as a browser would
(redirects, cookies, streaming). The browser tests, on PostgreSQL and real workers, are
tests/integration/test_web.py, which borrows the seeding helpers below.
"""

from __future__ import annotations

import fnmatch
import re
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from click.testing import CliRunner
from sqlalchemy import insert, update

from orchestrator import Orchestrator, Settings
from orchestrator.breaker import CircuitBreaker
from orchestrator.cli.commands import main
from orchestrator.database import get_engine
from orchestrator.models import Branch, BranchState, Job, JobState, utcnow
from orchestrator.web import WebConfig, create_app
from orchestrator.web.reads import Bucket, Cursor, Span
from orchestrator.web.security import CSRF_COOKIE
from orchestrator.web.timeline import layout

USER, PASSWORD = "ops", "a-real-password"
AUTH = (USER, PASSWORD)

# --- seeding, shared with the integration tests ----------------------------------------------------


def insert_job(
    database_url: str,
    *,
    name: str | None = "seeded",
    state: str = JobState.RUNNING,
    created_at: datetime | None = None,
    branches: int = 0,
    done: int | None = None,
) -> uuid.UUID:
    """A job row (and `branches` branch rows: mostly succeeded, some failed, the rest running) written
    straight to SQL, as the store would leave it; nothing is published."""
    job_id = uuid.uuid4()
    created = created_at or utcnow()
    finished = (
        (created + timedelta(seconds=5)) if state in ("succeeded", "partial", "failed", "cancelled") else None
    )
    rows: list[dict[str, Any]] = []
    for i in range(branches):
        state_i = BranchState.FAILED if i % 97 == 13 else BranchState.SUCCEEDED
        if done is not None and i >= done:
            state_i = BranchState.RUNNING
        started = created + timedelta(milliseconds=2 * i)
        final = state_i != BranchState.RUNNING
        rows.append(
            {
                "job_id": job_id,
                "index": i,
                "task": "jobs.io.sleep",
                "queue": "io",
                "args": {"args": [], "kwargs": {"seconds": 0.1}},
                "state": state_i,
                "attempts": 1,
                "celery_task_id": str(uuid.uuid4()),
                "started_at": started,
                "finished_at": started + timedelta(milliseconds=100 + i % 50) if final else None,
                "result": 0.1 if state_i == BranchState.SUCCEEDED else None,
                "error": f"RuntimeError: branch {i} said no" if state_i == BranchState.FAILED else None,
                "late": False,
            }
        )
    with get_engine(database_url).begin() as conn:
        conn.execute(
            insert(Job).values(
                id=job_id,
                name=name,
                state=state,
                fan_in="jobs.aggregate.collect",
                branch_total=branches,
                branch_done=branches if done is None else done,
                created_at=created,
                started_at=created,
                finished_at=finished,
            )
        )
        if rows:
            conn.execute(insert(Branch), rows)
    return job_id


def data_jobs(html: str) -> list[str]:
    """The job ids of a jobs page, in the order shown."""
    return re.findall(r'data-job="([0-9a-f-]{36})"', html)


def link(html: str, rel: str) -> str | None:
    found = re.search(rf'<a href="([^"]+)" rel="{rel}">', html)
    return None if found is None else found.group(1).replace("&amp;", "&")


def events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream, comments and retry lines skipped."""
    name, data = "message", ""
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]
        elif line == "" and data:
            yield name, data
            name, data = "message", ""


# --- the server on a thread -------------------------------------------------------------------------


@dataclass
class Site:
    url: str
    orc: Orchestrator

    @property
    def database_url(self) -> str:
        return self.orc.settings.database_url

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **kwargs)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    home = tmp_path_factory.mktemp("web")
    orc = Orchestrator(Settings.from_env({"ORCH_HOME": str(home)}))  # the embedded default, migrated
    config = WebConfig(credentials={USER: PASSWORD}, flower_url="http://flower.test:5555", live_interval=0.05)
    server = uvicorn.Server(
        uvicorn.Config(create_app(orc, config), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the web server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Site(f"http://127.0.0.1:{port}", orc)
    finally:
        server.should_exit = True
        thread.join(10)
        orc.app.close()


@pytest.fixture
def client(site: Site) -> Iterator[httpx.Client]:
    with site.client(auth=AUTH) as c:
        yield c


# --- credentials and headers ------------------------------------------------------------------------


def test_every_page_needs_credentials(site: Site) -> None:
    job = insert_job(site.database_url)
    with site.client() as anonymous:
        for path in ("/jobs", f"/jobs/{job}", f"/jobs/{job}/events", "/breakers", "/static/style.css"):
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith('Basic realm="orchestrator"')
        assert anonymous.get("/jobs", auth=(USER, "wrong")).status_code == 401
        assert anonymous.get("/jobs", auth=("nobody", PASSWORD)).status_code == 401
        for header in ("Bearer abc", "Basic !!!", "Basic " + "b3Bz"):  # not basic, not base64, no colon
            assert anonymous.get("/jobs", headers={"Authorization": header}).status_code == 401
        assert anonymous.post(f"/jobs/{job}/cancel").status_code == 401
        health = anonymous.get("/healthz")
        assert (health.status_code, health.text) == (200, "ok")  # the one open path says nothing else
    with site.client(auth=AUTH) as c:
        page = c.get("/jobs")
        assert page.status_code == 200 and str(job) in page.text


def test_pages_forbid_framing_foreign_scripts_and_caching(client: httpx.Client) -> None:
    headers = client.get("/jobs").headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"{CSRF_COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie


def test_user_text_is_escaped(site: Site, client: httpx.Client) -> None:
    job = insert_job(site.database_url, name="<script>alert(1)</script>")
    for path in ("/jobs", f"/jobs/{job}"):
        html = client.get(path).text
        assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


# --- CSRF --------------------------------------------------------------------------------------------


def _token(client: httpx.Client, path: str) -> str:
    """The CSRF token a page's forms carry (the cookie's, which the page sets on first visit)."""
    html = client.get(path).text
    token = client.cookies[CSRF_COOKIE]
    assert 'name="csrf"' not in html or f'name="csrf" value="{token}"' in html
    return token


def test_a_cancel_without_a_valid_csrf_token_or_from_another_origin_is_refused(site: Site) -> None:
    job = insert_job(site.database_url, branches=3, done=1)
    url = f"/jobs/{job}/cancel"
    with site.client(auth=AUTH) as c:
        token = _token(c, f"/jobs/{job}")
        origin = site.url
        refused = [
            c.post(url, data={}, headers={"Origin": origin}),  # no token in the form
            c.post(url, data={"csrf": token + "x"}, headers={"Origin": origin}),  # not the cookie's
            c.post(url, data={"csrf": token}, headers={"Origin": "https://evil.example"}),
            c.post(url, data={"csrf": token}, headers={"Origin": "null"}),
            c.post(url, data={"csrf": token}, headers={"Sec-Fetch-Site": "cross-site"}),
        ]
    with site.client(auth=AUTH) as fresh:  # the form's token, but not the cookie that goes with it
        refused.append(fresh.post(url, data={"csrf": token}))
    forged = "nonce.0123456789abcdef"  # a cookie the server did not sign
    with site.client(auth=AUTH, cookies={CSRF_COOKIE: forged}) as c:
        refused.append(c.post(url, data={"csrf": forged}))
    for response in refused:
        assert response.status_code == 403, response.text
        assert "refused" in response.text
    assert site.orc.get(str(job)).state == "running"  # nothing was cancelled


def test_a_breaker_reset_with_the_token_from_this_origin_works(site: Site) -> None:
    tripped = CircuitBreaker(
        "web-unit", failure_threshold=1, reset_timeout=60, database_url=site.database_url
    )
    with pytest.raises(ZeroDivisionError), tripped:
        _ = 1 / 0
    with site.client(auth=AUTH) as c:
        page = c.get("/breakers").text
        assert 'data-breaker="web-unit"' in page and "open" in page
        token = _token(c, "/breakers")
        done = c.post(
            "/breakers/reset", data={"csrf": token, "name": "web-unit"}, headers={"Origin": site.url}
        )
        assert done.status_code == 303 and done.headers["location"] == "/breakers"
        missing = c.post("/breakers/reset", data={"csrf": token, "name": "no-such-breaker"})
        assert missing.status_code == 404 and "no circuit breaker" in missing.text
    assert {b.name: b.state for b in site.orc.breakers()}["web-unit"] == "closed"


def test_retry_from_the_job_page_runs_the_failed_branches_again(site: Site) -> None:
    job = insert_job(site.database_url, branches=14, state="partial")  # branch 13 failed
    with site.client(auth=AUTH) as c:
        page = c.get(f"/jobs/{job}").text
        assert f'action="/jobs/{job}/retry"' in page
        token = _token(c, f"/jobs/{job}")
        refused = c.post(f"/jobs/{job}/retry", data={"csrf": "forged"}, headers={"Origin": site.url})
        assert refused.status_code == 403
        done = c.post(f"/jobs/{job}/retry", data={"csrf": token}, headers={"Origin": site.url})
        assert done.status_code == 303 and done.headers["location"] == f"/jobs/{job}"
        view = site.orc.get(str(job))
        assert (view.state, view.run, view.branches[13].state, view.branches[12].state) == (
            "running",
            2,
            "pending",
            "succeeded",
        )
        again = c.post(f"/jobs/{job}/retry", data={"csrf": token}, headers={"Origin": site.url})
        assert again.status_code == 409 and "only a succeeded, partial or failed job is retried" in again.text
        assert f'action="/jobs/{job}/retry"' not in c.get(f"/jobs/{job}").text
    clean = insert_job(site.database_url, branches=3, state="succeeded")  # nothing failed: no button
    with site.client(auth=AUTH) as c:
        assert f'action="/jobs/{clean}/retry"' not in c.get(f"/jobs/{clean}").text


def test_cancelling_a_job_that_already_ended_is_a_409_page(site: Site) -> None:
    job = insert_job(site.database_url, branches=2, state="succeeded")
    with site.client(auth=AUTH) as c:
        token = _token(c, f"/jobs/{job}")
        response = c.post(f"/jobs/{job}/cancel", data={"csrf": token}, headers={"Origin": site.url})
    assert response.status_code == 409
    assert "is already succeeded; nothing was cancelled" in response.text
    assert site.orc.get(str(job)).state == "succeeded"


# --- 404s and 400s ------------------------------------------------------------------------------------


def test_unknown_jobs_and_pages_are_404(client: httpx.Client) -> None:
    token = _token(client, "/jobs")
    for response in (
        client.get(f"/jobs/{uuid.uuid4()}"),
        client.get("/jobs/not-a-job-id"),
        client.get(f"/jobs/{uuid.uuid4()}/events"),
        client.post(f"/jobs/{uuid.uuid4()}/cancel", data={"csrf": token}),
        client.get("/no/such/page"),
        client.get("/static/nothing.js"),
    ):
        assert response.status_code == 404, (response.request.url, response.text)
    assert "Not found" in client.get(f"/jobs/{uuid.uuid4()}").text  # a page, not a traceback
    assert client.get("/jobs/x/cancel").status_code == 405


@pytest.mark.parametrize(
    "query",
    ["before=nonsense", "after=1.zz", "state=exploded", "limit=0", "limit=201", "before=1.1&after=1.1"],
)
def test_bad_jobs_page_parameters_are_400(client: httpx.Client, query: str) -> None:
    response = client.get(f"/jobs?{query}")
    assert response.status_code == 400, response.text


def test_bad_branch_parameters_are_400(site: Site, client: httpx.Client) -> None:
    job = insert_job(site.database_url, branches=2)
    for query in ("after=-1", "after=x", "branch_state=bogus"):
        assert client.get(f"/jobs/{job}?{query}").status_code == 400, query


# --- keyset pages ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_jobs(site: Site) -> list[tuple[datetime, uuid.UUID, str, str]]:
    """137 jobs in three states, 12 of them created in the same microsecond (ties broken by id)."""
    base = utcnow() - timedelta(days=400)  # older than anything another test writes
    seeded = []
    for i in range(137):
        created = base + timedelta(seconds=i if i >= 12 else 0)
        state = ("succeeded", "failed", "running")[i % 3]
        name = f"batch-{i % 5}_x"
        job_id = insert_job(site.database_url, name=name, state=state, created_at=created)
        seeded.append((created, job_id, state, name))
    return seeded


def _walk(client: httpx.Client, first: str, rel: str) -> tuple[list[str], list[str]]:
    """Follow `rel` links from `first`: the ids of every page, and the pages' URLs."""
    ids: list[str] = []
    urls = [first]
    url: str | None = first
    while url is not None:
        response = client.get(url)
        assert response.status_code == 200, response.text
        ids += data_jobs(response.text)
        url = link(response.text, rel)
        if url is not None:
            urls.append(url)
        assert len(urls) < 100
    return ids, urls


def test_keyset_pages_visit_every_job_once_newest_first(
    client: httpx.Client, many_jobs: list[tuple[datetime, uuid.UUID, str, str]]
) -> None:
    newest_first = sorted(many_jobs, key=lambda r: (r[0], r[1]), reverse=True)
    expected = [str(job) for _, job, state, _ in newest_first if state == "failed"]
    ids, urls = _walk(client, "/jobs?state=failed&limit=7", "next")
    assert ids == expected
    assert len(urls) == -(-len(expected) // 7)
    # And back with the "newer" links from the last page: the same pages, in reverse.
    pages = [data_jobs(client.get(u).text) for u in urls]
    back, _ = _walk(client, urls[-1], "prev")
    assert back == [i for page in reversed(pages) for i in page]


def test_the_unfiltered_pages_merge_every_state_in_order(
    site: Site, client: httpx.Client, many_jobs: list[tuple[datetime, uuid.UUID, str, str]]
) -> None:
    ids, _ = _walk(client, "/jobs?limit=20", "next")
    ours = {str(j) for _, j, _, _ in many_jobs}
    mine = [i for i in ids if i in ours]
    assert mine == [str(j) for _, j, _, _ in sorted(many_jobs, key=lambda r: (r[0], r[1]), reverse=True)]
    assert len(ids) == len(set(ids))  # no job twice, whatever else other tests added


def test_the_name_filter_is_a_literal_substring(
    client: httpx.Client, many_jobs: list[tuple[datetime, uuid.UUID, str, str]]
) -> None:
    ids, _ = _walk(client, "/jobs?name=BATCH-3_x&limit=10", "next")
    assert set(ids) == {str(j) for _, j, _, n in many_jobs if n == "batch-3_x"}
    # % and _ are matched as themselves, not as LIKE wildcards.
    assert data_jobs(client.get("/jobs?name=batch-%25").text) == []
    assert data_jobs(client.get("/jobs?name=batch_3").text) == []


def test_cursors_survive_the_round_trip() -> None:
    at = utcnow()
    cursor = Cursor(at, uuid.uuid4())
    assert Cursor.decode(cursor.encode()) == cursor


# --- a big job ----------------------------------------------------------------------------------------


def test_a_ten_thousand_branch_job_page_is_windowed_and_fast(site: Site, client: httpx.Client) -> None:
    job = insert_job(site.database_url, name="wide", branches=10_000, done=9_000)
    client.get(f"/jobs/{job}")  # templates compiled, connections open
    started = time.perf_counter()
    page = client.get(f"/jobs/{job}")
    elapsed = time.perf_counter() - started
    assert page.status_code == 200
    assert elapsed < 1.0, f"{elapsed:.3f}s"
    html = page.text
    assert html.count('<tr id="branch-') == 100  # one page of the branch table
    assert html.count('<g class="row">') == 100  # the timeline in 100 rows of 100 branches
    assert "10000 branches, 100 to a row" in html
    for state in ("succeeded", "failed", "running"):
        assert f'class="bar t-{state}"' in html
    assert "9000/10000" in html
    assert "RuntimeError: branch 13 said no" in html
    # The next page starts after the last branch shown; the state filter pages the same way.
    following = client.get(link(html, "next") or "").text
    assert re.findall(r'<tr id="branch-(\d+)"', following)[:2] == ["100", "101"]
    failed = client.get(f"/jobs/{job}?branch_state=failed").text
    indexes = [int(i) for i in re.findall(r'<tr id="branch-(\d+)"', failed)]
    assert indexes and all(i % 97 == 13 for i in indexes)


def test_the_timeline_draws_one_bar_per_branch_of_a_small_job() -> None:
    t0 = utcnow()
    buckets = [
        Bucket(0, 0, (Span("succeeded", 1, t0, t0 + timedelta(seconds=1)),)),
        Bucket(1, 1, (Span("failed", 1, t0 + timedelta(seconds=1), t0 + timedelta(seconds=2)),)),
        Bucket(2, 2, (Span("running", 1, t0, None),)),
        Bucket(3, 3, (Span("pending", 1, None, None),)),
        Bucket(4, 4, (Span("cancelled", 1, None, t0 + timedelta(seconds=3)),)),
    ]
    picture = layout(buckets, start=t0, end=t0 + timedelta(seconds=4), per_row=1)
    bars = [row.bars for row in picture.rows]
    assert [len(b) for b in bars] == [1, 1, 1, 0, 1]
    ok, failed, running, cancelled = bars[0][0], bars[1][0], bars[2][0], bars[4][0]
    assert ok.width == pytest.approx(failed.width) and failed.x == pytest.approx(ok.x + ok.width)
    assert running.x + running.width == pytest.approx(ok.x + 4 * ok.width)  # still running: up to now
    assert cancelled.width == 2.0  # never started: a mark where it was stopped
    assert [t.text for t in picture.ticks] == ["0 s", "1.00 s", "2.00 s", "3.00 s", "4.00 s"]
    assert picture.rows[3].title == "branch 3: 1 pending"


# --- live updates without PostgreSQL: the stream reads the row --------------------------------------


def test_the_event_stream_reports_progress_then_the_final_state(site: Site) -> None:
    job = insert_job(site.database_url, branches=4, done=1)
    engine = get_engine(site.database_url)
    seen: list[tuple[str, str]] = []
    with site.client(auth=AUTH) as c, c.stream("GET", f"/jobs/{job}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for name, data in events(stream.iter_lines()):
            seen.append((name, data))
            if len(seen) == 1:
                with engine.begin() as conn:
                    conn.execute(update(Job).where(Job.id == job).values(branch_done=3))
            elif len(seen) == 2:
                with engine.begin() as conn:
                    conn.execute(
                        update(Job)
                        .where(Job.id == job)
                        .values(state="succeeded", branch_done=4, finished_at=utcnow())
                    )
    assert seen == [
        ("progress", '{"state":"running","done":1,"total":4,"final":false}'),
        ("progress", '{"state":"running","done":3,"total":4,"final":false}'),
        ("final", '{"state":"succeeded","done":4,"total":4,"final":true}'),
    ]


def test_a_final_jobs_page_opens_no_stream_and_a_running_ones_does(site: Site, client: httpx.Client) -> None:
    running = insert_job(site.database_url, branches=2, done=1)
    over = insert_job(site.database_url, branches=2, state="succeeded")
    assert f'data-events="/jobs/{running}/events"' in client.get(f"/jobs/{running}").text
    assert "data-events" not in client.get(f"/jobs/{over}").text
    fragment = client.get(f"/jobs/{running}?fragment=1").text
    assert fragment.startswith('<section class="summary">') and "<html" not in fragment


# --- `orchestrator web` refuses to start unsafely --------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "set ORCH_WEB_BASIC_AUTH=user:password"),
        ([], {"ORCH_WEB_BASIC_AUTH": "admin:"}, "each with a user and a non-empty password"),
        ([], {"ORCH_WEB_BASIC_AUTH": "admin"}, "ORCH_WEB_BASIC_AUTH must be user:password"),
        ([], {"ORCH_WEB_BASIC_AUTH": "admin:change-me-web-password"}, "the .env.example placeholder"),
        (["--no-auth", "--address", "0.0.0.0"], {}, "only allowed on a loopback address"),
        (["--no-auth"], {"ORCH_WEB_BASIC_AUTH": "a:b"}, "choose one"),
        (["--flower-url", "javascript:alert(1)"], {"ORCH_WEB_BASIC_AUTH": "a:b"}, "is not an http(s) URL"),
    ],
)
def test_the_web_command_refuses_to_start_unsafely(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    environ = {"ORCH_HOME": str(tmp_path), "ORCH_WEB_BASIC_AUTH": "", "ORCH_FLOWER_URL": "", **env}
    result = CliRunner().invoke(main, ["web", *args], env=environ)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "change-me-web-password" not in result.output  # a refused password is not echoed


def test_every_template_and_asset_is_package_data() -> None:
    """A non-editable install ships only what pyproject's package-data names: a new asset must match."""
    root = Path(__file__).resolve().parents[2]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "orchestrator.web" in setuptools["packages"]
    patterns = setuptools["package-data"]["orchestrator.web"]
    package = root / "orchestrator" / "web"
    assets = [
        p.relative_to(package)
        for d in ("templates", "static")
        for p in (package / d).rglob("*")
        if p.is_file()
    ]
    assert len(assets) >= 9
    for asset in assets:
        assert any(fnmatch.fnmatch(str(asset), pattern) for pattern in patterns), asset
