"""Dialog environments: ``load_tasks``, ``make_env`` and ``oracle_policy``, for any registered domain.

See ``shared`` architecture notes for the contract: ``reset(task, seed)`` gives the opening messages,
``step(text)`` answers one assistant message, ``outcome()`` is the strict verdict. The domains
themselves (the environment, its tasks, oracle, customer and reward) are packages that register a
:class:`Domain` record (:mod:`pipeline.envs.registry`); nothing here names one.
"""

from __future__ import annotations

from typing import Any, Callable

from pipeline.envs.base import Environment, Outcome, Step, Task, ToolEnvironment
from pipeline.envs.registry import (
    CUSTOMER_SPECS,
    Domain,
    EvidenceRules,
    UnknownDomainError,
    check_customer_spec,
    customer_factory,
    default_domain,
    domain_of,
    domains,
    get_domain,
    register_domain,
    resolve,
    unregister_domain,
)
from pipeline.envs.schema import TaskFileError
from pipeline.envs.tasks import load_tasks

__all__ = ["CUSTOMER_SPECS", "Domain", "Environment", "EvidenceRules", "Outcome", "Step", "Task", "TaskFileError",
           "ToolEnvironment", "UnknownDomainError", "check_customer_spec", "customer_factory", "default_domain",
           "domain_of", "domains", "get_domain", "load_tasks", "make_env", "oracle_policy", "register_domain",
           "unregister_domain"]


def make_env(name_or_task: str | Task | None = None, **kwargs: Any) -> Environment:
    """Build an environment for a task (its domain's), or by spec (``NAME``, ``NAME:ARGUMENT``, ``MODULE:ATTR``).

    ``None`` builds the default domain's environment. Keyword arguments go to the domain's
    environment (``max_turns``, ``customer``, ...). ``customer`` may be a spec string (``scripted``,
    ``llm:BACKEND``; :func:`~pipeline.envs.registry.customer_factory`), resolved through the domain, or
    ``None`` for the domain's default.
    """
    if isinstance(name_or_task, Task):
        domain, argument = get_domain(name_or_task.domain), name_or_task
    else:
        resolved = resolve(name_or_task)
        if resolved is None:
            raise ValueError(f"Unknown environment {name_or_task!r}. Available: {', '.join(sorted(domains()))} "
                             "(NAME:ARGUMENT for a domain that takes one, such as sop:PATH; MODULE:ATTR for a "
                             "third-party domain).")
        domain, argument = resolved
    customer = kwargs.pop("customer", None)
    if isinstance(customer, str):
        customer = customer_factory(domain, customer)
    if customer is not None:
        kwargs["customer"] = customer
    return domain.make_env(argument, **kwargs)


def oracle_policy(task: Task) -> Callable[[list[dict]], str]:
    """The scripted expert for a task's domain: a policy ``(messages) -> str`` that solves it."""
    domain = get_domain(task.domain)
    if domain.oracle_policy is None:
        raise ValueError(f"The domain {domain.name!r} has no oracle; register one as Domain.oracle_policy.")
    return domain.oracle_policy(task)
