"""The retail customer-service environment.

Task: a simulated customer contacts support with one or two requests (order status, cancellation,
refunds, returns, address change, exchange, lost package, ...). The agent must verify the customer,
look up the right order, follow the SOP in ``data/customer_service/sop.md``, get the customer's yes
before any change, make the change with the tools, and tell the customer what they need to know.

Strict success (``Outcome.success``) needs all three of:

1. the sandbox's final state equals the task's expected end state (any action path that gets there
   passes, and anything else that changed fails it);
2. every fact the task requires was told to the customer (a status, a tracking number, a refund
   amount, a ticket id, the reason for a refusal), in a message sent after a tool showed the goal's
   order: a status guessed after failed lookups is not told, it is invented;
3. no SOP rule was violated.

``completed`` is whether the conversation ended properly (the customer was satisfied, or gave up)
rather than by running out of turns or tokens; it is reported apart from success, because a policy
that ends conversations early is not a policy that solves them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from pipeline.budgets import MAX_TURNS
from pipeline.chat import ToolCall, ToolError
from pipeline.envs.base import BUDGET_STOPS, Outcome, Task, Tool, ToolEnvironment, collect_tools, episode_rng
from pipeline.envs.customer_service.db import Database, state_changes
from pipeline.envs.customer_service.policy import CONFIRMABLE_ACTIONS, Session
from pipeline.envs.customer_service.tools import RetailTools
from pipeline.simulators.base import UserSimulator
from pipeline.envs.customer_service.customer import ScriptedCustomer

DATA_DIR = Path(__file__).resolve().parents[3] / "data" / "customer_service"

INSTRUCTIONS = (
    "You are a customer-service agent for an online retail store. Help the customer by following the "
    "policy below exactly. Use the tools to look things up and to make changes; never invent order "
    "details. Ask the customer for any information you need. Be brief and polite."
)


@lru_cache(maxsize=1)
def sop_text() -> str:
    """The policy the agent reads (``data/customer_service/sop.md``)."""
    return (DATA_DIR / "sop.md").read_text()


class CustomerServiceEnv(ToolEnvironment):
    """Retail support episodes over a per-episode sandbox database (see module docstring)."""

    name = "customer_service"

    def __init__(self, max_turns: int = MAX_TURNS, customer: Callable[..., UserSimulator] | None = None) -> None:
        """``customer``: a factory ``(customer, goals, rng) -> UserSimulator`` that plays the customer
        (default: :class:`ScriptedCustomer`; an LLM one: :class:`pipeline.envs.customer_service.llm_customer.LLMCustomerFactory`)."""
        super().__init__(max_turns=max_turns)
        self.customer_factory = customer or ScriptedCustomer

    def _setup(self, task: Task, seed: int) -> list[dict]:
        payload = task.payload
        self.db = Database(payload["db"])
        self.initial_state = self.db.state()
        self.session = Session()
        self.customer = self.customer_factory(payload["customer"], payload["goals"], episode_rng(task.id, seed, "customer"))
        self.agent_messages: list[str] = []
        return [{"role": "user", "content": self.customer.start()}]

    def _tools(self) -> dict[str, Tool]:
        return collect_tools(RetailTools(self.db, self.session))

    def _system_prompt(self) -> str:
        return "\n\n".join(part for part in (INSTRUCTIONS, sop_text().strip(), self.tools_section()) if part)

    def _before_tool(self, call: ToolCall, spec: Tool, turn: int) -> None:
        self.session.turn = turn
        self.session.told = len(self.agent_messages)
        action = CONFIRMABLE_ACTIONS.get(call.name)
        if action is None or self.session.verified_customer is None:
            return  # unverified calls are refused (and recorded) by the tool itself
        order = self.db.orders.get(str(call.arguments.get("order_id", "")).strip().lstrip("#"))
        if order is not None and order["customer_id"] != self.session.verified_customer:
            return  # another customer's order: the tool records it as an identity violation
        if self.session.confirmed_action != action:
            self.session.violate("confirm_before_change", f"{call.name} without the customer's yes")
            raise ToolError(f"The customer has not agreed to this. Explain the {action} and ask for an explicit "
                            "yes before calling the tool.")

    def _on_message(self, text: str) -> tuple[list[dict], str | None]:
        self.agent_messages.append(text)
        reply = self.customer.respond(text, self.db.state())
        self.session.confirmed_action = reply.confirmed_action
        return [{"role": "user", "content": reply.text}], reply.stop

    def expected_state(self) -> dict[str, Any]:
        expected = dict(self.initial_state)
        expected.update(self.task.payload["expected_changes"])
        return {k: v for k, v in expected.items() if v is not None}

    def _judge(self, stop_reason: str | None) -> Outcome:
        final = self.db.state()
        expected = self.expected_state()
        diff = state_changes(expected, final)
        missing_facts, ungrounded = [], []
        said = " \n".join(self.agent_messages).lower()
        for goal in self.task.payload["goals"]:
            after = self.session.seen_orders.get(goal["order_id"])
            told = " \n".join(self.agent_messages[after:] if after is not None else []).lower()
            for alternatives in goal["facts"]:
                if not any(a.lower() in told for a in alternatives):
                    missing_facts.append(alternatives[0])
                    if any(a.lower() in said for a in alternatives):
                        ungrounded.append(alternatives[0])
        violations = [str(v) for v in self.session.violations]
        expected_changes = self.task.payload["expected_changes"]
        made = sum(final.get(k) == v for k, v in expected_changes.items())
        return Outcome(
            success=not diff and not missing_facts and not violations,
            completed=stop_reason is not None and stop_reason not in BUDGET_STOPS,
            stop_reason=stop_reason,
            violations=violations,
            details={
                "state_match": not diff,
                "state_diff": diff,
                "changes_made": made,
                "changes_expected": len(expected_changes),
                "missing_facts": missing_facts,
                "ungrounded_facts": ungrounded,  # said, but not after a tool showed the order: a guess
                "violation_records": [vars(v) for v in self.session.violations],
                "goals_met": self.customer.goal_index + int(self.customer.goal_met(final)),
                "goals": len(self.task.payload["goals"]),
                "frustration": self.customer.frustration,
            },
        )
