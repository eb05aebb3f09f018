"""Episode budgets: how long one episode may run, with each default in one place.

Three budgets bound every episode turnwise plays, in training, validation, evaluation, audits,
demonstrations and replays:

- ``max_turns``: assistant turns; running out ends the episode with stop reason ``max_turns``;
- ``max_new_tokens``: tokens a model may write in one turn; a longer reply is truncated;
- ``max_total_tokens``: tokens of the whole episode, prompt included; running out ends the episode
  with stop reason ``max_tokens``.

Watching them matters (an episode that hits a budget is neither a success nor a clean failure), so they
mean the same thing, and start from the same value, everywhere. :class:`EpisodeBudget` is the dataclass
that the option dataclasses extend (``RolloutConfig``, ``EvalArguments``, the audit's options), and the
constants are the defaults of every function and environment that takes a budget. A recipe or a flag sets
a budget for one run; nothing else in turnwise writes a default of its own.

This module imports nothing from turnwise, so any module may read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_TURNS = 20
"""Assistant-turn budget per episode."""

MAX_NEW_TOKENS = 128
"""Token budget per assistant turn: one tool call with its arguments, or one reply to the user."""

MAX_TOTAL_TOKENS = 8192
"""Token budget per episode, prompt included (the system prompt, with its SOP and tool list, is most of it)."""

LARGEST = 2**31 - 1
"""The largest budget accepted: token counts index tensors, and a bigger value is a typo, not a budget."""


def check_count(value: object, name: str, *, least: int = 1, largest: int = LARGEST, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is a whole number in ``[least, largest]`` (a bool is not one).

    ``name`` is how the user wrote the setting (``RolloutConfig.max_turns``, ``--limit``), so the message
    points at what to change; ``hint`` follows the value (what the setting means, what to give instead).

    >>> check_count(3, "max_turns")
    >>> check_count(3.7, "max_turns")
    Traceback (most recent call last):
    ValueError: max_turns must be a whole number, got 3.7.
    """
    hint = f"; {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}{hint}.")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, got {value}{hint}.")
    if value > largest:
        raise ValueError(f"{name} must be at most {largest}, got {value}{hint}.")


@dataclass
class EpisodeBudget:
    """The three budgets of an episode (see the module docstring); option dataclasses extend it."""

    max_turns: int = field(default=MAX_TURNS, metadata={"help": "Assistant-turn budget per episode."})
    max_new_tokens: int = field(default=MAX_NEW_TOKENS, metadata={"help": "Token budget per assistant turn."})
    max_total_tokens: int = field(default=MAX_TOTAL_TOKENS, metadata={
        "help": "Token budget per episode, prompt included."})

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_new_tokens", "max_total_tokens"):
            check_count(getattr(self, name), f"{type(self).__name__}.{name}")


__all__ = ["LARGEST", "MAX_NEW_TOKENS", "MAX_TOTAL_TOKENS", "MAX_TURNS", "EpisodeBudget", "check_count"]
