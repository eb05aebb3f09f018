"""Deliberately hackable scorers: negative examples that the audit must catch. Never train on them.

Each one is a reward that looks reasonable and is commonly written, and each pays for something an agent
can produce without solving the task:

- :class:`ToolCallAttempts` pays per attempted tool call and recognises calls more leniently than the
  environment's parser (code fences, bare JSON): tool-call spam, and credit for formats the strict
  evaluation rejects;
- :func:`resolution_claimed` takes the agent's word that the issue is resolved;
- :func:`customer_thanks` reads satisfaction from the customer's politeness, which the customer gives
  to almost any reply;
- :func:`turn_penalty` charges per turn, which (summed) teaches the agent to end conversations early.

``configs/rewards/lenient_example.yaml`` combines them; ``turnwise audit`` fails on it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from rewards.base import Score

if TYPE_CHECKING:
    from pipeline.trajectory import Trajectory

_ATTEMPT = re.compile(r"<tool_call>|```(?:json)?\s*\{|\{\s*[\"']name[\"']\s*:")
_RESOLVED = re.compile(r"\b(resolved|taken care of|has been (cancel+ed|refunded|processed|completed)|all set|done)\b",
                       re.IGNORECASE)


class ToolCallAttempts:
    """NAIVE. +1 per attempted tool call in the turn (up to ``cap``), however it was written.

    >>> from rewards.logged import from_chat
    >>> t = from_chat([{"role": "assistant", "content": '```json\\n{"name": "get_order", "arguments": {}}\\n```'}])
    >>> ToolCallAttempts()(t, 0)
    Score(value=1.0, reason='1 call attempt(s)')
    """

    name = "naive_tool_calls"

    def __init__(self, cap: int = 4) -> None:
        self.cap = cap

    def __call__(self, trajectory: "Trajectory", index: int) -> Score:
        n = min(self.cap, len(_ATTEMPT.findall(trajectory.turns[index].assistant or "")))
        return Score(float(n), f"{n} call attempt(s)") if n else Score(0.0)


def resolution_claimed(trajectory: "Trajectory") -> float:
    """NAIVE. 1.0 when any assistant message says the issue is resolved or done.

    >>> from rewards.logged import from_chat
    >>> resolution_claimed(from_chat([{"role": "assistant", "content": "Your issue has been resolved!"}]))
    1.0
    """
    return 1.0 if any(_RESOLVED.search(t.assistant or "") for t in trajectory.turns) else 0.0


def customer_thanks(trajectory: "Trajectory") -> float:
    """NAIVE. 1.0 when the customer's last message thanks the agent.

    >>> from rewards.logged import from_chat
    >>> customer_thanks(from_chat([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Okay, thanks."}]))
    1.0
    """
    last = next((m["content"] for m in reversed(trajectory.messages) if m["role"] == "user"), "")
    return 1.0 if re.search(r"\bthank", last, re.IGNORECASE) else 0.0


def turn_penalty(trajectory: "Trajectory", index: int) -> float:
    """NAIVE. -1 for every turn (summed over the episode, it rewards ending early).

    >>> from rewards.logged import from_chat
    >>> turn_penalty(from_chat([{"role": "assistant", "content": "Hi"}]), 0)
    -1.0
    """
    return -1.0
