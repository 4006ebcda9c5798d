"""The job catalog: decorators that declare io / cpu tasks and aggregators, and lookup by name.

The decorator, not the caller, decides where a task runs: io tasks go to the io queue, cpu tasks to the
cpu queue, aggregators run inside the fan-in on the fanin queue. Declaring records a spec and nothing
else; the app builder (`orchestrator.app`) registers each io/cpu task as a Celery task under its catalog
name, so Flower and `celery inspect` show `jobs.io.sleep`, not a wrapper.
"""

from __future__ import annotations

import enum
import functools
import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from .errors import ConfigurationError, UnknownTask, WrongTaskKind

F = TypeVar("F", bound=Callable[..., Any])


class TaskKind(enum.StrEnum):
    IO = "io"
    CPU = "cpu"
    AGGREGATOR = "aggregator"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: TaskKind
    fn: Callable[..., Any]
    retries: int = 0  # extra attempts after a failure, with exponential backoff and full jitter
    backoff: float = 1.0  # seconds: the first retry waits up to this, then 2x, 4x ... (capped at 60 s)
    breaker: str | None = None  # the circuit breaker every call goes through

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        """Read once: submit checks every branch's arguments against it."""
        return inspect.signature(self.fn)

    @functools.cached_property
    def accepts_deadline(self) -> bool:
        """True when the function declares a keyword-only `deadline` parameter to receive its budget."""
        param = self.signature.parameters.get("deadline")
        return param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY


_catalog: dict[str, TaskSpec] = {}
_loaded: set[str] = set()


def _declare(
    fn: Callable[..., Any],
    kind: TaskKind,
    name: str | None,
    retries: int,
    backoff: float,
    breaker: str | None,
) -> TaskSpec:
    if not isinstance(retries, int) or retries < 0:
        raise ConfigurationError(f"retries must be a non-negative integer, got {retries!r}")
    if not backoff > 0:
        raise ConfigurationError(f"backoff must be positive, got {backoff!r}")
    spec = TaskSpec(
        name=name or f"{fn.__module__}.{fn.__qualname__}",
        kind=kind,
        fn=fn,
        retries=retries,
        backoff=backoff,
        breaker=breaker,
    )
    existing = _catalog.get(spec.name)
    if existing is not None and existing.kind is not kind:
        raise ConfigurationError(f"task {spec.name!r} is declared twice with different kinds")
    _catalog[spec.name] = spec
    return spec


def _decorator(
    kind: TaskKind,
    fn: F | None,
    name: str | None,
    retries: int = 0,
    backoff: float = 1.0,
    breaker: str | None = None,
) -> F | Callable[[F], F]:
    def wrap(f: F) -> F:
        _declare(f, kind, name, retries, backoff, breaker)
        return f

    return wrap(fn) if fn is not None else wrap


@overload
def io_task(fn: F, /) -> F: ...
@overload
def io_task(
    *, name: str | None = None, retries: int = 0, backoff: float = 1.0, breaker: str | None = None
) -> Callable[[F], F]: ...
def io_task(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    backoff: float = 1.0,
    breaker: str | None = None,
) -> F | Callable[[F], F]:
    """Declare a branch that waits on the network: it runs on the io queue's thread or gevent pool."""
    return _decorator(TaskKind.IO, fn, name, retries, backoff, breaker)


@overload
def cpu_task(fn: F, /) -> F: ...
@overload
def cpu_task(
    *, name: str | None = None, retries: int = 0, backoff: float = 1.0, breaker: str | None = None
) -> Callable[[F], F]: ...
def cpu_task(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    backoff: float = 1.0,
    breaker: str | None = None,
) -> F | Callable[[F], F]:
    """Declare a branch that burns CPU: it runs on the cpu queue's prefork pool, one process per core."""
    return _decorator(TaskKind.CPU, fn, name, retries, backoff, breaker)


@overload
def aggregator(fn: F, /) -> F: ...
@overload
def aggregator(*, name: str | None = None) -> Callable[[F], F]: ...
def aggregator(fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
    """Declare a fan-in: it receives the branch outcomes in submission order and returns a JSON value."""
    return _decorator(TaskKind.AGGREGATOR, fn, name)


def load(modules: Iterable[str]) -> None:
    """Import catalog modules once; the same list is imported by every worker (ORCH_IMPORTS)."""
    for module in modules:
        if module in _loaded:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigurationError(f"cannot import catalog module {module!r}: {exc}") from exc
        _loaded.add(module)


def lookup(name: object, *, expect: Iterable[TaskKind]) -> TaskSpec:
    if not isinstance(name, str) or not name:
        raise UnknownTask(f"task name must be a non-empty string, got {name!r}")
    spec = _catalog.get(name)
    if spec is None:
        raise UnknownTask(f"unknown task {name!r}: no loaded catalog module declares it (see ORCH_IMPORTS)")
    allowed = tuple(expect)
    if spec.kind not in allowed:
        wanted = " or ".join(k.value for k in allowed)
        raise WrongTaskKind(f"task {name!r} is declared as {spec.kind.value}, but {wanted} is required here")
    return spec


def catalog() -> dict[str, TaskSpec]:
    return dict(_catalog)
