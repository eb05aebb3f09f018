"""Logged conversations as trajectories, and offline scoring of a JSONL file of them.

A logged conversation is one JSON object per line::

    {"messages": [{"role": "system", "content": ...}, {"role": "user", ...}, {"role": "assistant", ...}, ...],
     "task_id": "cs-0002",      # optional
     "seed": 0,                 # optional, the environment seed it was played with
     "outcome": {...}}          # optional, the strict Outcome recorded when it was played

:func:`from_chat` rebuilds a :class:`~pipeline.trajectory.Trajectory` from the messages alone: each
assistant message is a turn, and the messages up to the next assistant message are the environment's
answer to it. The strict outcome comes, in order of preference, from the line's ``outcome``, or from
replaying the assistant messages in the task's sandbox (:func:`replay`, when the task id is known: the
environment is deterministic, so this is the verdict the episode gets), or it stays unknown; then
``metadata["outcome_known"]`` is ``False`` and outcome scorers report "not applicable" rather than
guessing. Rule scorers need nothing but the messages, so a rule-only reward config needs no model.

Logs in OpenAI chat or Bedrock Converse format are read too: :mod:`pipeline.conversations` turns each line
into the shape above first (tool calls into the protocol's text, results into the environment's envelope),
so every check below applies to every format.

A logged file is untrusted input. :func:`load_conversations` checks each line before anything uses it
and raises ``ValueError`` naming the file, the line and the field: not UTF-8, not JSON, a field of the
wrong type (``"success": "false"`` is not a success; ``"seed": Infinity`` is not a seed), a message that
is not a chat message or holds text that is not valid Unicode (a lone surrogate), an assistant message
longer than :data:`pipeline.chat.MAX_MESSAGE_CHARS`, or a conversation without any assistant message
(there is nothing to score).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.budgets import MAX_TURNS
from pipeline.chat import MAX_MESSAGE_CHARS, has_tool_call_markup
from pipeline.envs.base import Outcome, RecordError, Task, check_type, json_kind
from pipeline.trajectory import Trajectory, Turn, check_seed

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


def from_chat(messages: Sequence[Mapping[str, Any]], task_id: str = "logged", outcome: Outcome | None = None,
              seed: int = 0, metadata: Mapping[str, Any] | None = None) -> Trajectory:
    """A trajectory from chat-format messages (see module docstring).

    >>> t = from_chat([{"role": "user", "content": "Where is my order?"},
    ...                {"role": "assistant", "content": "Could you share the order number?"},
    ...                {"role": "user", "content": "W1000001"}])
    >>> t.num_turns, t.turns[0].env_messages, t.metadata["outcome_known"]
    (1, [{'role': 'user', 'content': 'W1000001'}], False)
    """
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content", ""),
                                                                                      (str, type(None))):
            got = (f"role {json_kind(m.get('role'))} and content {json_kind(m.get('content'))}"
                   if isinstance(m, Mapping) else json_kind(m))
            raise RecordError(f"message {i} is not a chat message: expected {{'role': one of {', '.join(ROLES)}, "
                              f"'content': a string}}, got {got}.")
    messages = [dict(m) for m in messages]
    for m in messages:
        m["content"] = m.get("content") or ""
    turns: list[Turn] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            if turns:
                turns[-1].env_messages.append(m)
            continue
        kind = "tool_calls" if has_tool_call_markup(m["content"]) else "message"
        turns.append(Turn(index=len(turns), assistant=m["content"], env_messages=[], info={"kind": kind}))
    meta = {"outcome_known": outcome is not None, **(metadata or {})}
    return Trajectory(task_id=task_id, messages=messages, turns=turns,
                      outcome=outcome or Outcome(success=False, completed=False, stop_reason=None),
                      seed=seed, metadata=meta)


def replay(task: Task, assistant_texts: Sequence[str], seed: int = 0, max_turns: int = MAX_TURNS) -> Trajectory:
    """Play the logged assistant messages in the task's sandbox and return the resulting trajectory.

    The environment answers each message as it would have during the episode, so the trajectory carries
    the environment's turn info and strict outcome. Messages after the episode ended are dropped.
    """
    from pipeline.envs import make_env

    # The loop of pipeline.rollout.run_policy, written out so that scoring never imports torch.
    env = make_env(task, max_turns=max(max_turns, 1))
    messages = env.reset(task, seed=seed)
    turns: list[Turn] = []
    for text in assistant_texts:
        step = env.step(text)
        turns.append(Turn(index=len(turns), assistant=text, env_messages=step.messages, info=step.info))
        messages = [*messages, {"role": "assistant", "content": text}, *step.messages]
        if step.done:
            break
    texts = list(assistant_texts)
    trajectory = Trajectory(task_id=task.id, messages=messages, turns=turns, outcome=env.outcome(), seed=seed)
    if len(texts) > trajectory.num_turns:
        logger.warning("task %s: the episode ended after %d of %d logged assistant messages", task.id,
                       trajectory.num_turns, len(texts))
    trajectory.metadata["outcome_known"] = True
    trajectory.metadata["replayed"] = True
    return trajectory


@dataclass
class LoggedConversation:
    line: int
    trajectory: Trajectory
    outcome_source: str  # "logged", "replayed" or "unknown"
    warnings: list[str] = field(default_factory=list)


def load_conversations(path: Path | str, tasks: Mapping[str, Task] | None = None,
                       format: str | None = None) -> list[LoggedConversation]:
    """Read a JSONL file of logged conversations (or of full trajectory records) into trajectories.

    The file may be in turnwise's format, OpenAI chat or Bedrock Converse (:mod:`pipeline.conversations`),
    detected per file unless ``format`` names one. Every format gets the same checks. Raises ``ValueError``
    naming the file and line for a line that is not a conversation.
    """
    from pipeline.conversations import read_rows

    out: list[LoggedConversation] = []
    for lineno, row, fmt in read_rows(path, format):
        try:
            conversation = _conversation(row, lineno, tasks or {})
        except (KeyError, TypeError, ValueError) as exc:  # RecordError is a ValueError
            raise ValueError(f"{path}, line {lineno}: {exc}") from None
        conversation.trajectory.metadata.setdefault("format", fmt)
        out.append(conversation)
    return out


def check_logged_text(trajectory: Trajectory) -> None:
    """Refuse what no honest log holds: an over-long assistant message, or text that is not valid Unicode.

    Checks every message and every turn's assistant text; raises :class:`RecordError` naming the message.
    """
    texts = [(f"messages[{i}]", m["role"], m["content"]) for i, m in enumerate(trajectory.messages)]
    texts += [(f"turns[{t.index}].assistant", "assistant", t.assistant) for t in trajectory.turns]
    for where, role, text in texts:
        if role == "assistant" and len(text) > MAX_MESSAGE_CHARS:
            raise RecordError(f"{where}: an assistant message of {len(text):,} characters; an assistant message may "
                              f"have at most {MAX_MESSAGE_CHARS:,} (pipeline.chat.MAX_MESSAGE_CHARS). No honest model "
                              "turn is that long: drop the line or cut the message.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RecordError(f"{where}: not valid Unicode text (a lone surrogate {text[exc.start]!r} at character "
                              f"{exc.start}); write the log as UTF-8 text.") from None


def _conversation(row: Any, lineno: int, tasks: Mapping[str, Task]) -> LoggedConversation:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise RecordError('each line must be a JSON object with a "messages" list of chat messages.')
    if "turns" in row and "outcome" in row:  # a full trajectory record (pipeline.trajectory.save_jsonl)
        trajectory = Trajectory.from_dict(row)
        check_logged_text(trajectory)
        trajectory.metadata.setdefault("outcome_known", True)
        return LoggedConversation(lineno, trajectory, "logged")
    task_id = check_type(row.get("task_id"), (str, type(None)), "task_id")
    seed = check_seed(row.get("seed", 0))
    outcome = None if row.get("outcome") is None else Outcome.from_dict(row["outcome"], "outcome")
    metadata = {k: v for k, v in row.items() if k not in ("messages", "task_id", "seed", "outcome")}
    chat = from_chat(row["messages"], task_id or "logged", outcome, seed, metadata)
    check_logged_text(chat)
    if not chat.turns:
        raise RecordError('the conversation has no assistant message, so there is nothing to score; each line needs '
                          'at least one {"role": "assistant", "content": ...} message.')
    if outcome is not None:
        return LoggedConversation(lineno, chat, "logged")
    task = tasks.get(task_id) if task_id else None
    if task is None:
        warnings = [f"task {task_id!r} not found: outcome unknown"] if task_id else []
        return LoggedConversation(lineno, chat, "unknown", warnings)
    replayed = replay(task, [t.assistant for t in chat.turns], seed=seed)
    if [m["content"] for m in replayed.messages] == [m["content"] for m in chat.messages]:
        replayed.metadata.update(metadata)
        return LoggedConversation(lineno, replayed, "replayed")
    # Another simulator (or seed) answered the logged agent: score the conversation as logged, with the
    # strict verdict the same assistant messages get in the task's sandbox.
    chat.outcome = replayed.outcome
    chat.metadata["outcome_known"] = True
    warning = ("the replay differs from the logged conversation (another simulator or seed?): the messages are "
               "scored as logged, the outcome is the replay's")
    return LoggedConversation(lineno, chat, "replayed", [warning])


@dataclass
class ScoreReport:
    """Offline scores of logged conversations: one row per conversation and a summary."""

    reward: str
    source: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"reward": self.reward, "source": self.source, "summary": self.summary, "conversations": self.rows}

    def to_text(self, per_turn: bool = False) -> str:
        lines = [f"Scored {len(self.rows)} conversations from {self.source} with reward {self.reward!r}", "",
                 f"  {'line':>4}  {'task':<10} {'policy':<18} {'outcome':<9} {'success':>7} {'turns':>5} "
                 f"{'total':>7} {'terminal':>8}  notes"]
        for r in self.rows:
            success = "-" if r["success"] is None else ("yes" if r["success"] else "no")
            notes = []
            if r["failed"]:
                notes.append("FAILED: " + ", ".join(f"{k} ({v})" for k, v in r["failed"].items()))
            penalties = [k for k, v in r["components"].items() if (min(v, default=0.0) if isinstance(v, list) else v) < 0]
            if penalties:
                notes.append("penalties: " + ", ".join(penalties))
            lines.append(f"  {r['line']:>4}  {str(r['task_id'])[:10]:<10} {str(r.get('policy') or '-')[:18]:<18} "
                         f"{r['outcome_source']:<9} {success:>7} {r['turns']:>5} {r['total']:>+7.3f} "
                         f"{r['terminal']:>+8.3f}  {'; '.join(notes)}")
            if per_turn:
                lines.append("        per turn: " + " ".join(f"{x:+.3f}" for x in r["per_turn"]))
                for name, reasons in r["reasons"].items():
                    lines += [f"        {name}: {reason}" for reason in reasons]
        s = self.summary
        lines += ["", "Summary:", f"  conversations: {s['n']}   mean total: {s['mean_total']:+.3f}   "
                  f"min {s['min_total']:+.3f}   max {s['max_total']:+.3f}"]
        if s["success_rate"] is not None:
            lines.append(f"  strict success: {s['success_rate']:.3f} of {s['n_known']} with a known outcome; mean "
                         f"total on successes {_fmt(s['mean_total_success'])}, on failures {_fmt(s['mean_total_failure'])}")
        lines.append(f"  scorer failures: {s['failures']}   outcome unknown: {s['n'] - s['n_known']}")
        lines.append("  component means: " + ", ".join(f"{k} {v:+.3f}" for k, v in s["component_means"].items()))
        if s.get("by_policy"):
            lines.append("  mean total by policy: " + ", ".join(f"{k} {v:+.3f}" for k, v in s["by_policy"].items()))
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def score_conversations(reward: Any, conversations: Sequence[LoggedConversation], source: str = "") -> ScoreReport:
    """Score logged conversations with a reward function and summarise."""
    from rewards.base import mean

    rows = []
    for conv in conversations:
        t = conv.trajectory
        b = reward(t)
        known = t.metadata.get("outcome_known", True) is not False
        rows.append({"line": conv.line, "task_id": t.task_id, "policy": t.metadata.get("policy"),
                     "outcome_source": conv.outcome_source, "success": bool(t.outcome.success) if known else None,
                     "turns": t.num_turns, "warnings": conv.warnings, **b.to_dict()})
    totals = [r["total"] for r in rows]
    known_rows = [r for r in rows if r["success"] is not None]
    components: dict[str, list[float]] = {}
    for r in rows:
        for name, v in r["components"].items():
            components.setdefault(name, []).append(mean(v) if isinstance(v, list) else float(v))
    by_policy: dict[str, list[float]] = {}
    for r in rows:
        if r["policy"]:
            by_policy.setdefault(str(r["policy"]), []).append(r["total"])
    summary = {
        "n": len(rows), "mean_total": mean(totals), "min_total": min(totals, default=0.0),
        "max_total": max(totals, default=0.0), "n_known": len(known_rows),
        "success_rate": mean([float(r["success"]) for r in known_rows]) if known_rows else None,
        "mean_total_success": mean([r["total"] for r in known_rows if r["success"]]) if any(
            r["success"] for r in known_rows) else None,
        "mean_total_failure": mean([r["total"] for r in known_rows if not r["success"]]) if any(
            not r["success"] for r in known_rows) else None,
        "failures": sum(len(r["failed"]) for r in rows),
        "component_means": {k: mean(v) for k, v in components.items()},
        "by_policy": {k: mean(v) for k, v in by_policy.items()},
    }
    return ScoreReport(getattr(getattr(reward, "config", None), "name", "reward"), source, rows, summary)
