"""Lost work, in SQL: who may start, finish and take over a branch or a fan-in, and what the rescuer's
sweeps find, on PostgreSQL and SQLite, with the database's own clock."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Connection, select

from orchestrator.database import upgrade
from orchestrator.models import BranchState, Job, JobState
from orchestrator.rescue import Rescue
from orchestrator.store import Finished, NewBranch, NewJob, SentAs, Store
from tests.services import postgres_database

TASK = "jobs.io.sleep"
# Workers on two other hosts: only their heartbeats tell whether they live.
A = f"{socket.gethostname()}-a:101:aaaa"
B = f"{socket.gethostname()}-b:202:bbbb"
STALL = 0.3


@pytest.fixture
def store(database_url: str) -> Store:
    return Store(database_url, stall_timeout=STALL, max_deliveries=2)


def _job(store: Store, n: int = 1) -> tuple[uuid.UUID, str]:
    """A running job of `n` io branches in one message; returns its id and the message's task id."""
    task_id = str(uuid.uuid4())
    branches = [NewBranch(TASK, "io", [0.1], {}, task_id) for _ in range(n)]
    ((job_id, _),) = store.create_jobs(
        [NewJob(uuid.uuid4(), "lost", "jobs.aggregate.collect", branches)], running=True
    )
    return job_id, task_id


def _done(index: int, attempts: int) -> Finished:
    return Finished(index, attempts, BranchState.SUCCEEDED, index)


class Counted:
    """An `also` that records whether it ran (the chord count of a message)."""

    def __init__(self) -> None:
        self.ran = 0

    def __call__(self, conn: Connection) -> None:
        self.ran += 1


def test_a_duplicate_delivery_starts_nothing_while_its_runner_lives(store: Store) -> None:
    job_id, tid = _job(store, 2)
    assert store.start_branches(job_id, [0, 1], SentAs(tid, TASK, A)).attempts == {0: 1, 1: 1}
    # The same message again (a broker redelivery after a connection loss), on another worker.
    again = store.start_branches(job_id, [0, 1], SentAs(tid, TASK, B))
    assert again.attempts == {} and again.poisoned == ()
    branches = store.get(job_id).branches
    assert [(b.state, b.attempts) for b in branches] == [("running", 1), ("running", 1)]


def test_a_silent_run_is_taken_over_and_its_late_finish_records_nothing(store: Store) -> None:
    """A worker paused past the stall timeout (SIGSTOP) loses its branch to the message's next run;
    when it resumes, its outcome is not written, and it does not count the message's chord part."""
    job_id, tid = _job(store)
    paused, taker = SentAs(tid, TASK, A), SentAs(tid, TASK, B)
    assert store.start_branch(job_id, 0, paused).attempts == {0: 1}
    time.sleep(STALL + 0.2)
    assert store.start_branch(job_id, 0, taker).attempts == {0: 2}

    counted = Counted()
    won, _ = store.finish_branch(job_id, paused, _done(0, 1), also=counted)
    assert not won and counted.ran == 0
    store.finish_branches(job_id, paused, [_done(0, 1)], also=counted)
    assert counted.ran == 0
    view = store.get(job_id)
    assert (view.branches[0].state, view.branch_done) == ("running", 0)

    store.finish_branches(job_id, taker, [_done(0, 2)], also=counted)
    assert counted.ran == 1
    branch = store.get(job_id).branches[0]
    assert (branch.state, branch.attempts, branch.result) == ("succeeded", 2, 0)


def test_a_silent_runs_last_write_does_not_count_its_message_while_the_taker_runs_a_sibling(
    store: Store,
) -> None:
    """The partition race the fault suite found: a batch's run, cut off past the stall timeout, loses
    both branches to the message's next run; the taker writes one of them, and the healed run's last write
    (the other branch, lost) must not count the message while the taker still runs the first. Counting
    it would complete the chord and run the fan-in with a branch still running."""
    job_id, tid = _job(store, 2)
    paused, taker = SentAs(tid, TASK, A), SentAs(tid, TASK, B)
    assert store.start_branches(job_id, [0, 1], paused).attempts == {0: 1, 1: 1}
    time.sleep(STALL + 0.2)
    assert store.start_branches(job_id, [0, 1], taker).attempts == {0: 2, 1: 2}
    store.finish_branches(job_id, taker, [_done(1, 2)], message=[0, 1])

    counted = Counted()
    store.finish_branches(job_id, paused, [_done(0, 1)], message=[0, 1])
    store.finish_branches(job_id, paused, [_done(1, 1)], also=counted, message=[0, 1])
    assert counted.ran == 0
    assert store.still_active(job_id, [0, 1])

    store.finish_branches(job_id, taker, [_done(0, 2)], also=counted, message=[0, 1])
    assert counted.ran == 1
    assert [(b.state, b.attempts) for b in store.get(job_id).branches] == [("succeeded", 2), ("succeeded", 2)]


def test_a_poisoned_branch_does_not_count_its_message_while_a_live_run_holds_a_sibling(store: Store) -> None:
    """A delivery that only records a branch that died too often must leave the message's count to the
    live run that still holds its sibling."""
    job_id, tid = _job(store, 2)
    reason = "Worker exited prematurely: signal 9 (SIGKILL) Job: 3."
    for run in range(1, 4):
        assert store.start_branches(job_id, [0], SentAs(tid, TASK, f"{A}{run}")).attempts == {0: run}
        store.mark_lost(job_id, [0], tid, reason)
    live = SentAs(tid, TASK, B)
    assert store.start_branches(job_id, [1], live).attempts == {1: 1}

    again = SentAs(tid, TASK, f"{socket.gethostname()}-c:303:cccc")
    started = store.start_branches(job_id, [0, 1], again)
    assert started.attempts == {} and [p.index for p in started.poisoned] == [0]
    counted = Counted()
    store.finish_branches(job_id, again, started.poisoned, also=counted, message=[0, 1])
    assert counted.ran == 0 and store.get(job_id).branches[0].state == "failed"

    store.finish_branches(job_id, live, [_done(1, 1)], also=counted, message=[0, 1])
    assert counted.ran == 1


def test_a_run_marked_lost_is_taken_at_once_and_too_many_losses_fail_it(store: Store) -> None:
    """What the prefork pool reports when a child dies: the branch is free for the redelivery at once;
    after ORCH_MAX_DELIVERIES (2 here) runs lost, the next delivery records it failed, saying why."""
    job_id, tid = _job(store)
    reason = "Worker exited prematurely: signal 9 (SIGKILL) Job: 3."
    for run in range(1, 4):
        started = store.start_branch(job_id, 0, SentAs(tid, TASK, f"{A}{run}"))
        assert started.attempts == {0: run}, run
        assert store.mark_lost(job_id, [0], tid, reason) == 1
    started = store.start_branch(job_id, 0, SentAs(tid, TASK, B))
    assert started.attempts == {}
    (poisoned,) = started.poisoned
    assert poisoned.state == BranchState.FAILED
    assert poisoned.error == (
        "the branch's worker died while running it 3 times (last: Worker exited prematurely: signal 9 "
        "(SIGKILL) Job: 3.); not run again (ORCH_MAX_DELIVERIES=2)"
    )
    store.finish_branch(job_id, SentAs(tid, TASK, B), poisoned)
    view = store.get(job_id)
    assert (view.branches[0].state, view.branches[0].error, view.branch_done) == ("failed", poisoned.error, 1)
    assert store.mark_lost(job_id, [0], tid, reason) == 0  # final: nothing to free


def test_a_runner_gone_from_this_host_is_taken_over_without_waiting(database_url: str) -> None:
    """A worker killed and restarted on the same host: RabbitMQ hands its messages out again at once, and
    the new worker sees the old process is gone, so it need not wait for the heartbeat to age."""
    store = Store(database_url, stall_timeout=3600)
    job_id, tid = _job(store)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid is free
    gone = f"{socket.gethostname()}:{dead.pid}:old"
    assert store.start_branch(job_id, 0, SentAs(tid, TASK, gone)).attempts == {0: 1}
    live = f"{socket.gethostname()}:1:init"  # pid 1 lives: a live worker's branch is never taken
    assert store.start_branch(job_id, 0, SentAs(tid, TASK, live)).attempts == {0: 2}
    here = SentAs(tid, TASK, f"{socket.gethostname()}:999999:new")
    assert store.start_branch(job_id, 0, here).attempts == {}


def test_a_queued_retry_starts_again_only_through_its_own_delivery(store: Store) -> None:
    """A cpu retry goes back through the broker: the branch is queued again, not left to a live runner."""
    job_id, tid = _job(store)
    sent = SentAs(tid, TASK, A)
    assert store.start_branch(job_id, 0, sent).attempts == {0: 1}
    assert store.requeue_branch(job_id, 0, SentAs(tid, TASK, B)) is False  # not the runner: no move
    assert store.requeue_branch(job_id, 0, sent) is True
    assert store.start_branch(job_id, 0, SentAs(tid, TASK, B)).attempts == {0: 2}
    assert store.get(job_id).branches[0].lost_runs == 0  # a retry is not a lost run


def test_a_retried_message_takes_its_own_running_branches_back(store: Store) -> None:
    """Celery retried the message after its run failed on the database before recording anything: the
    retry's delivery, wherever it lands, takes the branches back at once, and that is no lost run."""
    job_id, tid = _job(store, 2)
    assert store.start_branches(job_id, [0, 1], SentAs(tid, TASK, A)).attempts == {0: 1, 1: 1}
    assert store.start_branches(job_id, [0, 1], SentAs(tid, TASK, B)).attempts == {}  # a duplicate
    retried = SentAs(tid, TASK, B, retried=True)
    assert store.start_branches(job_id, [0, 1], retried).attempts == {0: 2, 1: 2}
    assert store.start_branch(job_id, 0, SentAs(str(uuid.uuid4()), TASK, B, retried=True)).attempts == {}
    store.finish_branches(job_id, retried, [_done(0, 2), _done(1, 2)])
    view = store.get(job_id)
    assert [(b.state, b.lost_runs) for b in view.branches] == [("succeeded", 0)] * 2
    assert store.start_branches(job_id, [0, 1], retried).attempts == {}  # final: nothing to take


def test_heartbeats_keep_runs_and_the_sweep_takes_silent_ones_once(store: Store) -> None:
    job_id, tid = _job(store, 3)
    assert store.start_branches(job_id, [0, 1, 2], SentAs(tid, TASK, A)).attempts == {0: 1, 1: 1, 2: 1}
    store.finish_branches(job_id, SentAs(tid, TASK, A), [_done(0, 1)])
    rescue = Rescue(store.engine, STALL)
    for _ in range(4):  # a live runner's heartbeat: never silent
        rescue.beat(A, [job_id], [])
        time.sleep(STALL / 2)
        assert rescue.silent_branches() == []

    time.sleep(STALL + 0.2)  # A fell silent: of eight racing sweeps, one takes its branches
    with ThreadPoolExecutor(8) as pool:
        found = [m for ms in pool.map(lambda _: rescue.silent_branches(), range(8)) for m in ms]
    (message,) = found
    assert (message.job_id, message.task, message.queue, message.task_id) == (job_id, TASK, "io", tid)
    assert message.branches == [[1, [0.1], {}], [2, [0.1], {}]]  # the finished one is not run again
    assert message.chord is None  # no join recorded for this job (the publisher records one)
    assert rescue.silent_branches() == []  # taken: not again before another stall timeout
    branches = store.get(job_id).branches
    assert branches[1].error is not None and branches[1].error.startswith(f"no heartbeat from its worker {A}")

    # The message published again starts them at once, counting the lost run.
    started = store.start_branches(job_id, [1, 2], SentAs(tid, TASK, B))
    assert started.attempts == {1: 2, 2: 2}
    assert [b.lost_runs for b in store.get(job_id).branches] == [0, 1, 1]


def test_the_sweep_finds_fan_ins_that_never_ran_and_aggregations_that_were_lost(store: Store) -> None:
    job_id, tid = _job(store)
    queued, _ = _job(store)
    assert store.start_branch(job_id, 0, SentAs(tid, TASK, A)).attempts == {0: 1}
    store.finish_branch(job_id, SentAs(tid, TASK, A), _done(0, 1))
    rescue = Rescue(store.engine, STALL)
    time.sleep(STALL + 0.2)
    (complete,) = rescue.due_jobs()  # the queues are busy: a queued job is not looked at
    assert (complete.id, complete.complete, complete.state) == (job_id, True, "running")  # no fan-in came
    # Another queue idle: not taken either, so not put off for a stall timeout while io drains.
    assert rescue.due_jobs(idle_queues=["cpu"]) == []
    (waiting,) = rescue.due_jobs(idle_queues=["io"])  # its queue is idle: is the branch's message gone?
    assert (waiting.id, waiting.complete) == (queued, False)
    assert [m.branches for m in rescue.queued_branches([queued])] == [[[0, [0.1], {}]]]
    assert rescue.due_jobs(idle_queues=["io"]) == []  # each looked at: not again before a stall timeout

    claim = store.claim_fan_in(job_id, A)
    assert claim is not None
    assert store.claim_fan_in(job_id, B) is None  # A aggregates, and is alive
    time.sleep(STALL + 0.2)  # A fell silent while aggregating
    (lost,) = [d for d in rescue.due_jobs() if d.id == job_id]
    assert lost.state == "aggregating"
    again = store.claim_fan_in(job_id, B)
    assert again is not None and again.lost is None
    assert not store.finalize(job_id, JobState.SUCCEEDED, "from A", None, A)  # A came back: too late
    assert store.finalize(job_id, JobState.SUCCEEDED, "from B", None, B)
    view = store.get(job_id)
    assert (view.state, view.result) == ("succeeded", "from B")


def test_after_a_broker_loss_queued_jobs_from_before_it_are_taken_once_without_a_stall_timeout(
    store: Store,
) -> None:
    before, _ = _job(store)  # its message was published before the connection was lost
    running, tid = _job(store)
    assert store.start_branch(running, 0, SentAs(tid, TASK, A)).attempts == {0: 1}  # ran: not stranded
    time.sleep(0.4)
    lost_at = time.monotonic()
    time.sleep(0.2)
    _job(store)  # published after the broker was back: its message is there
    rescue = Rescue(store.engine, 600.0)  # the regular sweep would wait ten minutes
    assert rescue.due_jobs(idle_queues=["io"]) == []
    assert rescue.stranded_jobs(time.monotonic() - lost_at, idle_queues=["cpu"]) == []  # io is busy
    assert rescue.stranded_jobs(time.monotonic() - lost_at, idle_queues=["io"]) == [before]
    # Of the workers that reconnect, one takes it: not again for the next, nor the second look.
    assert rescue.stranded_jobs(time.monotonic() - lost_at, idle_queues=["io"]) == []
    assert [m.branches for m in rescue.queued_branches([before])] == [[[0, [0.1], {}]]]


def test_a_fan_in_retried_after_a_database_error_takes_back_its_own_claim(store: Store) -> None:
    """A fan-in whose run claimed the job and then failed on the database (PostgreSQL restarting) is
    retried by Celery: the retry takes its own claim back at once, without counting a lost run, where it
    used to find the job held and leave it to the sweep a stall timeout later. No other runner may."""
    job_id, tid = _job(store)
    store.start_branch(job_id, 0, SentAs(tid, TASK, A))
    store.finish_branch(job_id, SentAs(tid, TASK, A), _done(0, 1))
    assert store.claim_fan_in(job_id, A) is not None
    assert store.claim_fan_in(job_id, A) is None  # a duplicate delivery while A aggregates: nothing
    assert store.claim_fan_in(job_id, B, retried=True) is None  # not B's claim
    again = store.claim_fan_in(job_id, A, retried=True)
    assert again is not None and again.lost is None and [o.state for o in again.outcomes] == ["succeeded"]
    assert store.finalize(job_id, JobState.SUCCEEDED, "once", None, A)
    view = store.get(job_id)
    assert (view.state, view.result) == ("succeeded", "once")
    with store.engine.connect() as conn:
        assert conn.execute(select(Job.lost_runs).where(Job.id == job_id)).scalar_one() == 0
    assert store.claim_fan_in(job_id, A, retried=True) is None  # final: nothing to take back


def test_a_fan_in_lost_too_often_fails_the_job(store: Store) -> None:
    job_id, _ = _job(store)
    for run in range(3):
        assert store.claim_fan_in(job_id, f"{A}{run}") is not None
        assert store.mark_fan_in_lost(job_id, "Worker exited prematurely: exitcode 1 Job: 7.")
    claim = store.claim_fan_in(job_id, B)
    assert claim is not None and claim.lost == (
        "the fan-in's worker died while running it 3 times (last: Worker exited prematurely: exitcode 1 "
        "Job: 7.); not run again (ORCH_MAX_DELIVERIES=2)"
    )


def test_outcomes_and_errors_keep_a_bounded_size(store: Store) -> None:
    job_id, tid = _job(store)
    sent = SentAs(tid, TASK, A)
    store.start_branch(job_id, 0, sent)
    huge = "x" * 50_000
    store.finish_branch(job_id, sent, Finished(0, 1, BranchState.FAILED, None, huge))
    error = store.get(job_id).branches[0].error
    assert error is not None and error == "x" * 4096 + "... [45904 more characters cut]"


def _runs_in(threads: int, fn: Any) -> list[Any]:
    results: list[Any] = []
    lock = threading.Lock()

    def run() -> None:
        value = fn()
        with lock:
            results.append(value)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return results


def test_racing_takeovers_of_one_silent_branch_have_one_winner(store: Store) -> None:
    job_id, tid = _job(store)
    assert store.start_branch(job_id, 0, SentAs(tid, TASK, A)).attempts == {0: 1}
    time.sleep(STALL + 0.2)
    starts = _runs_in(8, lambda: store.start_branch(job_id, 0, SentAs(tid, TASK, B)).attempts)
    assert sorted(map(len, starts)) == [0] * 7 + [1]


PAUSED_MID_TRANSACTION = """
import os, signal, sys, uuid
from sqlalchemy import update
from orchestrator import database
from orchestrator.database import ConnectionOptions
from orchestrator.models import Job

url, job = sys.argv[1], uuid.UUID(sys.argv[2])
database.set_options(url, ConnectionOptions(idle_in_transaction_timeout=float(sys.argv[3])))
with database.get_engine(url).begin() as conn:
    conn.execute(update(Job).where(Job.id == job).values(branch_done=Job.branch_done))  # the row's lock
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # paused mid-transaction, as the fault suite's SIGSTOP does
"""


def test_a_process_paused_mid_transaction_does_not_hold_its_jobs_row_past_the_idle_timeout() -> None:
    """A worker paused (SIGSTOP) inside one of our transactions held the job's row lock, and with it every
    other run's finish and every rescue sweep of that job, for its whole pause. PostgreSQL now ends such
    a session (idle_in_transaction_session_timeout, set at connect), which frees the row."""
    with postgres_database() as url:
        upgrade(url)
        store = Store(url, stall_timeout=STALL)
        job_id, tid = _job(store)
        sent = SentAs(tid, TASK, B)
        assert store.start_branch(job_id, 0, sent).attempts == {0: 1}
        paused = subprocess.Popen(
            [sys.executable, "-c", PAUSED_MID_TRANSACTION, url, str(job_id), "1.0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert paused.stdout is not None and paused.stdout.readline().strip() == "locked"
            finished = threading.Event()

            def finish() -> None:
                store.finish_branch(job_id, sent, _done(0, 1))
                finished.set()

            threading.Thread(target=finish, daemon=True).start()
            # Ended by the server after 1 s idle; with the session kept, this waits for the paused process.
            assert finished.wait(30), "the paused process's transaction still holds the job's row"
            assert store.get(job_id).branches[0].state == "succeeded"
        finally:
            paused.kill()
            paused.wait()
