"""Shared builders for reward tests: hand-written conversations and scripted rollouts (never models)."""

from __future__ import annotations

import json

import pytest

from pipeline.chat import format_tool_call, tool_result_message
from pipeline.envs import load_tasks, make_env, oracle_policy
from pipeline.envs.base import Outcome
from pipeline.rollout import run_policy
from rewards.logged import from_chat


def call(name: str, **arguments) -> str:
    return format_tool_call(name, arguments)


def result(name: str, value) -> dict:
    return tool_result_message(name, value)


def error(name: str | None, kind: str, message: str = "error") -> dict:
    return {"role": "tool", "content": json.dumps({"tool": name, "ok": False, "error": message, "error_type": kind})}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def chat(*messages: dict, outcome: Outcome | None = None, task_id: str = "t"):
    """A trajectory from hand-written messages (a system prompt is added)."""
    return from_chat([{"role": "system", "content": "You are a support agent. Refund limit $250."}, *messages],
                     task_id=task_id, outcome=outcome)


ORDER = {"order_id": "W1000001", "status": "delivered", "delivery_date": "2026-05-06", "payment_method": "paypal",
         "items": [{"item_id": "I1", "name": "yoga mat", "price": 28.0, "quantity": 1},
                   {"item_id": "I2", "name": "lamp", "price": 34.0, "quantity": 1}], "total": 62.0}


@pytest.fixture(scope="session")
def test_tasks():
    return load_tasks("customer_service", "test")


@pytest.fixture(scope="session")
def oracle_rollouts(test_tasks):
    tasks = test_tasks[:12]
    return [run_policy(make_env(t), t, oracle_policy(t)) for t in tasks]
