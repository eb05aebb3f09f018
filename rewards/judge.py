"""LLM-as-judge: an episode scorer that grades a conversation against a rubric (Zheng et al., 2023).

The judge sees the conversation (system prompt left out, tool results shortened to their key fields,
as the reward model sees it: :func:`rewards.model.rm_messages`) and a rubric, and must answer with one
JSON object and nothing else::

    {"score": <integer from min_score to max_score>, "reason": "<one sentence>"}

The score maps linearly onto [-1, 1]. The verdict is parsed **strictly** (:func:`parse_verdict`): no
code fences, no prose around the object, no extra keys, no fractional or out-of-range scores. A
lenient parser that digs a number out of free text is itself a reward hack waiting to happen (it
credits answers the judge did not give, and a policy can learn to steer it); an unparseable verdict
raises :class:`JudgeVerdictError`, which the composite reward records as a failed scorer for that
trajectory (``RewardBreakdown.failed``), never as a score.

The model behind the judge is any :class:`pipeline.llm.LLMBackend`, named in the reward config by a
spec (``bedrock:...``, ``openai:MODEL@URL``, ``hf:MODEL``)::

    - {name: judge, scorer: judge, weight: 0.1, params: {backend: "bedrock:anthropic.claude-3-haiku-20240307-v1:0"}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rewards.base import Score

if TYPE_CHECKING:
    from pipeline.llm import LLMBackend
    from pipeline.trajectory import Trajectory

DEFAULT_RUBRIC = """\
You are grading a customer-service agent of an online retail store. Judge the AGENT only.
A good agent:
- verifies the customer's identity (email and zip code) before looking up or changing anything;
- uses the tools to look things up and to act, and states only facts the tool results support;
- explains an action and gets the customer's explicit yes before cancelling, refunding, exchanging or
  changing an address;
- actually calls the tool for what it says it did (no claimed refunds or cancellations without one);
- tells the customer what they need to know (status, amounts, tracking numbers, ticket ids);
- is brief and polite, and does not ask again for information already given.
Score 1 (fails the customer or breaks the policy) to 5 (fully correct, compliant and helpful)."""

ANSWER_FORMAT = ('Answer with exactly one JSON object and nothing else: {{"score": <integer from {lo} to {hi}>, '
                 '"reason": "<one sentence>"}}')


class JudgeVerdictError(ValueError):
    """The judge's answer is not a verdict in the required format (it is an error, never a score)."""


@dataclass(frozen=True)
class Verdict:
    score: int
    reason: str


def parse_verdict(text: str, min_score: int = 1, max_score: int = 5) -> Verdict:
    """The verdict in ``text``, which must be exactly ``{"score": int, "reason": str}`` (whitespace aside).

    >>> parse_verdict(' {"score": 4, "reason": "Verified first, but asked twice for the email."} ')
    Verdict(score=4, reason='Verified first, but asked twice for the email.')
    >>> parse_verdict('Score: 4/5. The agent was helpful.')
    Traceback (most recent call last):
    ...
    rewards.judge.JudgeVerdictError: judge verdict is not a JSON object (Expecting value at char 0): 'Score: 4/5. The agent was helpful.'
    >>> parse_verdict('{"score": 4.5, "reason": "between"}')
    Traceback (most recent call last):
    ...
    rewards.judge.JudgeVerdictError: judge score must be an integer from 1 to 5, got 4.5.
    """
    shown = text if len(text) <= 200 else text[:200] + "..."
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JudgeVerdictError(f"judge verdict is not a JSON object ({exc.msg} at char {exc.pos}): "
                                f"{shown!r}") from None
    if not isinstance(data, dict):
        raise JudgeVerdictError(f"judge verdict must be a JSON object, got {type(data).__name__}: {shown!r}")
    if set(data) != {"score", "reason"}:
        raise JudgeVerdictError(f"judge verdict must have exactly the keys 'score' and 'reason', got {sorted(data)}.")
    score, reason = data["score"], data["reason"]
    if isinstance(score, bool) or not isinstance(score, int) or not min_score <= score <= max_score:
        raise JudgeVerdictError(f"judge score must be an integer from {min_score} to {max_score}, got {score!r}.")
    if not isinstance(reason, str) or not reason.strip():
        raise JudgeVerdictError(f"judge reason must be a non-empty string, got {reason!r}.")
    return Verdict(score, reason.strip())


def render_transcript(messages: Sequence[dict]) -> str:
    """The conversation as the judge reads it: one ``ROLE: text`` block per message, no system prompt."""
    from rewards.model import rm_messages

    labels = {"user": "CUSTOMER", "assistant": "AGENT", "tool": "TOOL RESULT"}
    return "\n\n".join(f"{labels.get(m['role'], m['role'].upper())}: {m['content']}" for m in rm_messages(messages))


class JudgeScorer:
    """Episode score from an LLM judge: ``2 * (score - min) / (max - min) - 1``, in [-1, 1].

    ``backend`` is a spec for :func:`pipeline.llm.make_backend` or a backend object; ``rubric`` is
    the grading text (default :data:`DEFAULT_RUBRIC`), or ``rubric_file`` a path to one. Greedy
    (temperature 0) by default, so the same conversation gets the same verdict where the service allows.

    >>> from pipeline.llm import ScriptedBackend
    >>> from rewards.logged import from_chat
    >>> judge = JudgeScorer(ScriptedBackend(['{"score": 5, "reason": "Verified, refunded, told the amount."}']))
    >>> judge(from_chat([{"role": "user", "content": "Refund my mat."}, {"role": "assistant", "content": "Done."}]))
    Score(value=1.0, reason='judge 5/5: Verified, refunded, told the amount.')
    >>> JudgeScorer(ScriptedBackend(["Looks great, 5 stars!"]))(from_chat([{"role": "user", "content": "Hi"}]))
    Traceback (most recent call last):
    ...
    rewards.judge.JudgeVerdictError: judge verdict is not a JSON object (Expecting value at char 0): 'Looks great, 5 stars!'
    """

    name = "judge"

    def __init__(self, backend: "str | LLMBackend", rubric: str | None = None, rubric_file: str | None = None,
                 min_score: int = 1, max_score: int = 5, max_tokens: int = 200, temperature: float = 0.0) -> None:
        from pipeline.llm import make_backend

        if rubric is not None and rubric_file is not None:
            raise ValueError("give the judge either 'rubric' or 'rubric_file', not both.")
        if rubric_file is not None:
            path = Path(rubric_file)
            if not path.is_file():
                raise ValueError(f"judge rubric_file {path} not found.")
            rubric = path.read_text()
        if not (isinstance(min_score, int) and isinstance(max_score, int) and min_score < max_score):
            raise ValueError(f"judge needs integer min_score < max_score, got {min_score!r} and {max_score!r}.")
        self.backend = make_backend(backend)
        self.rubric = (rubric if rubric is not None else DEFAULT_RUBRIC).strip()
        if not self.rubric:
            raise ValueError("the judge's rubric is empty.")
        self.min_score, self.max_score = min_score, max_score
        self.max_tokens, self.temperature = max_tokens, temperature

    def prompt(self, messages: Sequence[dict]) -> list[dict]:
        """The chat sent to the judge model."""
        system = f"{self.rubric}\n\n{ANSWER_FORMAT.format(lo=self.min_score, hi=self.max_score)}"
        user = f"Conversation to grade:\n\n{render_transcript(messages)}\n\nYour verdict (JSON only):"
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def __call__(self, trajectory: "Trajectory") -> Score:
        reply = self.backend.chat(self.prompt(trajectory.messages), max_tokens=self.max_tokens,
                                  temperature=self.temperature)
        verdict = parse_verdict(reply, self.min_score, self.max_score)
        value = 2.0 * (verdict.score - self.min_score) / (self.max_score - self.min_score) - 1.0
        return Score(value, f"judge {verdict.score}/{self.max_score}: {verdict.reason}")

