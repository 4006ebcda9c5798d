"""Fan-out/fan-in jobs on Celery, with every job and branch tracked in SQL.

from orchestrator import Orchestrator, branch
orc = Orchestrator()
job = orc.submit([branch("jobs.io.sleep", seconds=0.2)] * 8, fan_in="jobs.aggregate.collect")
print(orc.wait(job.id, timeout=30).state)
"""

from .aio import AsyncOrchestrator
from .api import BranchSpec, JobSpec, Orchestrator, branch
from .breaker import CircuitBreaker, circuit_breaker
from .deadline import NO_DEADLINE, Deadline
from .errors import (
    ArgumentsNotSerializable,
    BreakerNotFound,
    CircuitOpen,
    ConfigurationError,
    DeadlineExceeded,
    InvalidArgument,
    InvalidJobSpec,
    JobAlreadyFinal,
    JobNotFinal,
    JobNotFound,
    NothingToRetry,
    OrchestratorError,
    Overloaded,
    PublishError,
    SchemaNotReady,
    UnknownTask,
    WaitTimeout,
    WrongTaskKind,
)
from .models import BranchState, JobState
from .registry import aggregator, cpu_task, io_task
from .settings import Settings
from .views import BranchOutcome, BranchRunView, BranchView, BreakerView, HistoryView, JobView, RunView

__all__ = [
    "NO_DEADLINE",
    "ArgumentsNotSerializable",
    "AsyncOrchestrator",
    "BranchOutcome",
    "BranchRunView",
    "BranchSpec",
    "BranchState",
    "BranchView",
    "BreakerNotFound",
    "BreakerView",
    "CircuitBreaker",
    "CircuitOpen",
    "ConfigurationError",
    "Deadline",
    "DeadlineExceeded",
    "HistoryView",
    "InvalidArgument",
    "InvalidJobSpec",
    "JobAlreadyFinal",
    "JobNotFinal",
    "JobNotFound",
    "JobSpec",
    "JobState",
    "JobView",
    "NothingToRetry",
    "Orchestrator",
    "OrchestratorError",
    "Overloaded",
    "PublishError",
    "RunView",
    "SchemaNotReady",
    "Settings",
    "UnknownTask",
    "WaitTimeout",
    "WrongTaskKind",
    "aggregator",
    "branch",
    "circuit_breaker",
    "cpu_task",
    "io_task",
]
