"""Dialog environments: ``load_tasks``, ``make_env`` and ``oracle_policy``.

See ``shared`` architecture notes for the contract: ``reset(task, seed)`` gives the opening messages,
``step(text)`` answers one assistant message, ``outcome()`` is the strict verdict.
"""

from __future__ import annotations

from typing import Any, Callable

from pipeline.envs.base import Environment, Outcome, Step, Task, ToolEnvironment
from pipeline.envs.tasks import TaskFileError, load_tasks

__all__ = ["Environment", "Outcome", "Step", "Task", "TaskFileError", "ToolEnvironment", "load_tasks", "make_env",
           "oracle_policy", "ENVIRONMENTS"]


def _customer_service(**kwargs: Any) -> Environment:
    from pipeline.envs.customer_service import CustomerServiceEnv

    return CustomerServiceEnv(**kwargs)


def _sop(**kwargs: Any) -> Environment:
    from pipeline.envs.sop import SopEnv

    return SopEnv(**kwargs)


ENVIRONMENTS: dict[str, Callable[..., Environment]] = {"customer_service": _customer_service, "sop": _sop}


def make_env(name_or_task: str | Task, **kwargs: Any) -> Environment:
    """Build an environment by name (``"customer_service"``, ``"sop:PATH"``) or for a task's domain.

    An SOP environment checks its folder, and the trust its tools.py needs, when it is built
    (``trust_tools=True``, or ``TURNWISE_TRUST_TOOLS=1``; see :mod:`pipeline.envs.sop_folder`).
    """
    if isinstance(name_or_task, str) and name_or_task.startswith("sop:"):
        name_or_task, kwargs = "sop", {"folder": name_or_task, **kwargs}
    elif isinstance(name_or_task, Task) and name_or_task.domain == "sop":
        kwargs = {"folder": name_or_task.payload["folder"], **kwargs}
    name = name_or_task.domain if isinstance(name_or_task, Task) else name_or_task
    if name not in ENVIRONMENTS:
        raise ValueError(f"Unknown environment {name!r}. Available: {', '.join(sorted(ENVIRONMENTS))}.")
    return ENVIRONMENTS[name](**kwargs)


def oracle_policy(task: Task) -> Callable[[list[dict]], str]:
    """The scripted expert for a task's domain: a policy ``(messages) -> str`` that solves it."""
    if task.domain == "customer_service":
        from pipeline.envs.customer_service.oracle import oracle_policy as retail

        return retail(task)
    if task.domain == "sop":
        from pipeline.envs.sop_oracle import oracle_policy as sop

        return sop(task)
    raise ValueError(f"No oracle for domain {task.domain!r}.")
