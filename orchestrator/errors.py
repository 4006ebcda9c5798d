"""One exception hierarchy, so callers can catch everything the orchestrator raises with one clause."""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error the orchestrator raises on purpose."""


class ConfigurationError(OrchestratorError):
    """An ORCH_* setting is missing, malformed or refused (e.g. a pickle serializer)."""


class InvalidJobSpec(OrchestratorError, ValueError):
    """A submitted job is malformed; nothing was written and nothing was published."""


class UnknownTask(InvalidJobSpec):
    """A branch or fan-in names a task that no loaded catalog module declares."""


class WrongTaskKind(InvalidJobSpec):
    """An aggregator was used as a branch, or a branch task as the fan-in."""


class ArgumentsNotSerializable(InvalidJobSpec):
    """Branch arguments must survive a JSON round trip; pickle is never used."""


class InvalidArgument(OrchestratorError, ValueError):
    """An argument to an API call or command is out of range (e.g. a retention age that is not positive)."""


class JobNotFound(OrchestratorError, LookupError):
    """No job has that id."""


class WaitTimeout(OrchestratorError, TimeoutError):
    """`Orchestrator.wait` gave up before the job reached a final state."""

    def __init__(self, job_id: str, timeout: float, state: str) -> None:
        super().__init__(f"job {job_id} is still {state} after {timeout:g}s")
        self.job_id = job_id
        self.timeout = timeout
        self.state = state


class JobAlreadyFinal(OrchestratorError):
    """`cancel` of a job that already ended: nothing was changed."""


class DeadlineExceeded(OrchestratorError, TimeoutError):
    """Raised by a branch whose time budget ran out; its outcome is `timed_out`."""


class CircuitOpen(OrchestratorError):
    """The circuit breaker refused the call at once: the backend was not called."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class BreakerNotFound(OrchestratorError, LookupError):
    """No circuit breaker of that name has been used yet."""


class PublishError(OrchestratorError):
    """Jobs were recorded but their messages could not be sent; those jobs are marked failed.
    `published`: how many of the jobs submitted together went out whole before the failure."""

    def __init__(self, message: str, *, published: int = 0) -> None:
        super().__init__(message)
        self.published = published


class Overloaded(OrchestratorError):
    """Backpressure: admitting the job would pass ORCH_MAX_ACTIVE_BRANCHES, and no room came within the
    submit's block timeout (or it did not block). Nothing was written or published; retry after
    `retry_after` seconds (an estimate from how fast work drained while waiting)."""

    def __init__(self, *, active: int, limit: int, requested: int, waited: float, retry_after: float) -> None:
        super().__init__(
            f"overloaded: {active} of ORCH_MAX_ACTIVE_BRANCHES={limit} branches are admitted and "
            f"unfinished, and this submit needs {requested} more (waited {waited:.1f}s); retry in about "
            f"{retry_after:.1f}s"
        )
        self.active = active
        self.limit = limit
        self.requested = requested
        self.waited = waited
        self.retry_after = retry_after


class JobNotFinal(OrchestratorError):
    """`retry` of a job that is not final (still running, or another retry started it first)."""


class NothingToRetry(OrchestratorError):
    """`retry` found no branch of the job in the states asked for."""


class SchemaNotReady(OrchestratorError):
    """The database has no orchestrator tables yet: run `orchestrator db upgrade`."""
