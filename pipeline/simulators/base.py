"""The simulator protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass
class SimulatorReply:
    """The simulated user's answer to one agent message.

    ``stop`` is ``None`` while the conversation goes on, else the stop reason (``resolved`` when the
    user is satisfied, ``user_left`` when patience ran out). ``confirmed_action`` names the action the
    user just agreed to (``"cancel"``, ``"refund"``, ...), which the environment's policy requires
    before any change.
    """

    text: str
    stop: str | None = None
    confirmed_action: str | None = None


@runtime_checkable
class UserSimulator(Protocol):
    def start(self) -> str:
        """The user's opening message."""
        ...

    def respond(self, agent_text: str, state: dict[str, Any]) -> SimulatorReply:
        """Answer an agent message. ``state`` is the sandbox's judged state, so the user can tell when
        what it asked for has actually been done."""
        ...

    @property
    def frustration(self) -> int: ...
