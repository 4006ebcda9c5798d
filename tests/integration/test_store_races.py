"""Conditional UPDATEs under real contention: many threads and processes make the same move, one wins."""

from __future__ import annotations

import multiprocessing
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest

from orchestrator.models import BranchState, JobState
from orchestrator.store import Finished, NewBranch, NewJob, SentAs, Store


@pytest.fixture
def store(database_url: str) -> Store:
    return Store(database_url)


def _sent(index: int) -> SentAs:
    """The message branch `index` of a `_job` was published as."""
    return SentAs(f"task-{index}", "jobs.cpu.count_primes")


def _job(store: Store, n: int) -> uuid.UUID:
    """A running job of `n` cpu branches, recorded as `Orchestrator.submit` records one."""
    branches = [NewBranch("jobs.cpu.count_primes", "cpu", [0], {}, _sent(i).task_id) for i in range(n)]
    ((job_id, _),) = store.create_jobs(
        [NewJob(uuid.uuid4(), "race", "jobs.aggregate.collect", branches)], running=True
    )
    return job_id


def _finish(args: tuple[str, str, int]) -> bool:
    url, job_id, index = args
    outcome = Finished(index, 1, BranchState.SUCCEEDED, index)
    won, _ = Store(url).finish_branch(uuid.UUID(job_id), _sent(index), outcome)
    return won


@pytest.mark.integration
def test_one_outcome_per_branch_under_racing_threads_and_processes(store: Store) -> None:
    job_id = _job(store, 4)
    for i in range(4):
        assert store.start_branch(job_id, i, _sent(i)).attempts == {i: 1}
    work = [(store.database_url, str(job_id), i % 4) for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        thread_wins = list(pool.map(_finish, work[:32]))
    with multiprocessing.get_context("spawn").Pool(4) as procs:
        process_wins = procs.map(_finish, work[32:])
    assert sum(thread_wins) + sum(process_wins) == 4  # one winner per branch, across both
    view = store.get(job_id)
    assert view.branch_done == 4
    assert store.start_branch(job_id, 0, _sent(0)).attempts == {}


@pytest.mark.integration
def test_a_job_is_claimed_and_finalized_once(store: Store) -> None:
    job_id = _job(store, 1)
    with ThreadPoolExecutor(16) as pool:
        claims = list(pool.map(lambda _: store.claim_fan_in(job_id), range(16)))
    assert sum(c is not None for c in claims) == 1
    with ThreadPoolExecutor(16) as pool:
        finals = list(pool.map(lambda _: store.finalize(job_id, JobState.SUCCEEDED, 1, None), range(16)))
    assert sum(finals) == 1
    assert store.claim_fan_in(job_id) is None
    assert store.get(job_id).state == "succeeded"


def test_the_fan_in_claim_fails_branches_left_without_an_outcome(store: Store) -> None:
    """A branch task that died on an infrastructure error never recorded an outcome; the chord body still
    runs once every task ended, and its claim leaves no branch of the job pending or running."""
    job_id = _job(store, 3)
    assert store.start_branch(job_id, 0, _sent(0)).attempts == {0: 1}
    store.finish_branch(job_id, _sent(0), Finished(0, 1, BranchState.SUCCEEDED, 1))
    assert store.start_branch(job_id, 1, _sent(1)).attempts == {
        1: 1
    }  # its worker lost the database mid-branch
    claim = store.claim_fan_in(job_id)
    assert claim is not None
    assert [o.state for o in claim.outcomes] == ["succeeded", "failed", "failed"]  # what the fan-in sees
    view = store.get(job_id)
    assert [b.state for b in view.branches] == ["succeeded", "failed", "failed"]
    assert view.branches[1].error == "the branch's task ended without recording an outcome"
    assert view.branch_done == view.branch_total == 3


def test_a_fan_in_may_claim_a_job_still_pending(store: Store) -> None:
    """Earlier versions recorded a job pending and marked it running after publishing; its chord body
    could run before that mark committed. Such a job is claimed like a running one."""
    job_id, _ = store.create_job(
        name="fast", fan_in="jobs.aggregate.collect", branches=[NewBranch("jobs.io.sleep", "io", [0], {})]
    )
    assert store.get(job_id).state == "pending"
    assert store.claim_fan_in(job_id) is not None
    assert store.get(job_id).state == "aggregating"


@pytest.mark.integration
def test_final_moves_are_announced_on_postgresql(store: Store) -> None:
    finished, cancelled = _job(store, 1), _job(store, 1)
    with store.final_notifications(finished) as notified:
        if store.engine.dialect.name == "sqlite":
            assert notified is None and not store.notifies  # SQLite has no NOTIFY: wait() polls there
            return
        assert notified is not None
        assert notified(0.05) is False  # nothing final yet
        assert store.claim_fan_in(finished) is not None
        assert notified(0.05) is False  # aggregating is not final
        with ThreadPoolExecutor(1) as pool:  # another connection, another thread
            pool.submit(store.finalize, finished, JobState.SUCCEEDED, 1, None).result()
        assert notified(10.0) is True
    with store.final_notifications(cancelled) as notified:
        assert notified is not None
        assert store.cancel(cancelled) is not None
        assert notified(10.0) is True
    # At most LISTENERS waits hold a connection; the next one polls, and a freed slot is reused.
    with ExitStack() as stack:
        held = [stack.enter_context(store.final_notifications(finished)) for _ in range(Store.LISTENERS)]
        assert all(h is not None for h in held)
        with store.final_notifications(finished) as overflow:
            assert overflow is None
    with store.final_notifications(finished) as again:
        assert again is not None


@pytest.mark.integration
def test_only_the_message_a_branch_was_sent_as_moves_it(store: Store) -> None:
    """A stray or forged message naming another job's branch (right job id and index, wrong Celery task
    id or task name) neither starts nor finishes it, nor leaves a late result on it."""
    job_id = _job(store, 2)
    forged = [SentAs("another-task-id", _sent(0).task), SentAs(_sent(0).task_id, "jobs.cpu.sha256_rounds")]
    for sent in forged:
        assert store.start_branch(job_id, 0, sent).attempts == {}
        assert store.start_branches(job_id, [0, 1], sent).attempts == {}
    assert [b.state for b in store.get(job_id).branches] == ["pending", "pending"]

    assert store.start_branch(job_id, 0, _sent(0)).attempts == {0: 1}
    for sent in forged:
        won, _ = store.finish_branch(job_id, sent, Finished(0, 1, BranchState.SUCCEEDED, "forged"))
        assert not won
        store.finish_branches(job_id, sent, [Finished(0, 1, BranchState.SUCCEEDED, "forged")])
    branch = store.get(job_id).branches[0]
    assert (branch.state, branch.result, branch.late, branch.attempts) == ("running", None, False, 1)
    assert store.get(job_id).branch_done == 0

    won, _ = store.finish_branch(job_id, _sent(0), Finished(0, 1, BranchState.SUCCEEDED, "real"))
    assert won
    view = store.get(job_id)
    assert (view.branches[0].state, view.branches[0].result, view.branch_done) == ("succeeded", "real", 1)


@pytest.mark.integration
def test_concurrent_submits_with_one_idempotency_key_make_one_job(store: Store) -> None:
    """Racing past the existing-key check, the losers get the winner's job, not an IntegrityError."""

    def submit(_: int) -> tuple[uuid.UUID, bool]:
        job_id, created_at = store.create_job(
            name="once",
            fan_in="jobs.aggregate.collect",
            branches=[NewBranch("jobs.io.sleep", "io", [0], {}, "t")],
            idempotency_key="same-key",
        )
        return job_id, created_at is not None

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(submit, range(96)))
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(store.list(limit=10)) == 1
