"""The retail customer-service domain: sandbox DB, tools, SOP policy, scripted customer, oracle and tasks.

Registers :data:`DOMAIN`, the default domain: ``make_env("customer_service")``, ``load_tasks("customer_service",
"test")`` (or a shipped variant such as ``customer_service/order_status``), the oracle, the default
reward, the evidence rules the reward's claim checks read, the domain's reward-hacking policies, and its
customers (the scripted one by default; the LLM one for ``--customer llm:BACKEND``).
"""

from __future__ import annotations

from typing import Any

from pipeline.envs.customer_service.customer import ScriptedCustomer
from pipeline.envs.customer_service.env import CustomerServiceEnv
from pipeline.envs.customer_service.evidence import EVIDENCE
from pipeline.envs.customer_service.hacks import HACKS
from pipeline.envs.customer_service.llm_customer import LLMCustomerFactory
from pipeline.envs.customer_service.oracle import oracle_policy
from pipeline.envs.customer_service.tasks import check_payload, load_tasks
from pipeline.envs.registry import Domain

__all__ = ["DOMAIN", "CustomerServiceEnv", "ScriptedCustomer", "oracle_policy"]


def make_env(source: Any = None, **kwargs: Any) -> CustomerServiceEnv:
    """A customer-service environment (every task carries its own sandbox, so ``source`` is not needed)."""
    return CustomerServiceEnv(**kwargs)


DOMAIN = Domain(
    name="customer_service",
    make_env=make_env,
    load_tasks=load_tasks,
    check_payload=check_payload,
    oracle_policy=oracle_policy,
    default_reward="default",
    evidence=EVIDENCE,
    default_customer=ScriptedCustomer,
    llm_customer=LLMCustomerFactory,
    hacks=HACKS,
    default=True,
    description="Retail support: a scripted customer with one or two requests, 11 tools over a sandboxed order "
                "database, and an SOP the agent must follow.",
)
