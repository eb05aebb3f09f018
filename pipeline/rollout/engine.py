"""The token-level rollout engine: batched multi-turn episodes with exact token bookkeeping.

:class:`RolloutEngine` is the model path of :mod:`pipeline.rollout`. At each turn it sends every live
episode's prompt to a generation backend (:mod:`pipeline.rollout.backends`) in one batch, and keeps
each episode as one growing token sequence. Batches are filled continuously: up to ``batch_size``
episodes are live, and when one ends the next waiting episode takes its slot at the next turn. Training scores exactly those ids, so nothing is ever
re-tokenised: the sampled ids are appended as sampled, and the environment's reply is appended as the
chat template renders it, by tokenising only the text the template adds after the assistant message.
The engine records what training needs: the sampled ids, their sampling-time logprobs, the assistant
mask and each turn's token span (a :class:`~pipeline.trajectory.TokenData`).

Rendering and encoding go through :class:`~pipeline.templates.ChatTemplate`, in either tool protocol:

- **text** (turnwise's ``<tool_call>`` protocol, for templates without tool support such as the embedded
  SmolLM2's): the environment's system prompt lists the tools, and the messages are rendered as they are;
- **native** (``tool_calling="auto"`` on a template with tool support, or ``"native"``): the environment
  leaves the tools out of its prompt, the template gets them as ``tools=``, the sampled text is parsed in the
  template's format (:mod:`pipeline.native_tools`), and the conversation the template renders holds the
  calls as ``tool_calls`` and the results as ``tool`` messages answering them by id. The trajectory's
  ``messages`` stay in the protocol's canonical text, which rewards and evaluation read.

In both, environment text can never become a control token (a forged ``<|im_end|>`` is encoded as its
characters), and the trained ids are the sampled ids.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Sequence

from pipeline.budgets import MAX_NEW_TOKENS, MAX_TOTAL_TOKENS
from pipeline.envs.base import Environment, Task
from pipeline.native_tools import TEXT, NativeReply, ToolFormat, tool_call_entries
from pipeline.rollout.backends import Generation, GenerationRequest
from pipeline.templates import ChatTemplate, TemplateError
from pipeline.trajectory import TokenData, Trajectory, Turn


#: How :meth:`RolloutEngine.run` schedules episodes into batches.
SCHEDULES = ("continuous", "static")


@dataclass
class _Episode:
    task: Task
    seed: int
    env: Environment
    messages: list[dict]
    rendered: str  # the conversation rendered with the generation prompt: the text of ``ids``
    ids: list[int]
    mask: list[int]
    logprobs: list[float]
    spans: list[tuple[int, int]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    done: bool = False
    chat: list[dict] = field(default_factory=list)  # the conversation as the template renders it (native tool_calls)
    tools: list[dict] | None = None  # the tool specs the template is given (native tool calling)
    fmt: ToolFormat = TEXT  # the episode's tool protocol: the template's native format, or turnwise's text
    stream: int = 0  # the episode's sampling stream: its ordinal among the episodes the engine started


def _trajectory(e: _Episode) -> Trajectory:
    """The record of a finished episode."""
    return Trajectory(task_id=e.task.id, messages=e.messages, turns=e.turns, outcome=e.env.outcome(), seed=e.seed,
                      tokens=TokenData(e.ids, e.mask, e.logprobs, e.spans))


class RolloutEngine:
    """Batched multi-turn rollouts with exact token bookkeeping.

    At each turn every live episode's prompt goes to the backend in one batch. The engine keeps each
    episode as one growing token sequence: the sampled ids are appended as they were sampled (never
    re-tokenised), and the environment's reply is appended as the chat template renders it, by
    tokenising only the text the template adds after the assistant message. ``assistant_mask`` marks
    the sampled tokens; ``logprobs`` holds their sampling-time log-probabilities.

    Budgets: ``max_turns`` assistant turns (the environment's), ``max_new_tokens`` per turn, and
    ``max_total_tokens`` for the whole sequence; running out of the last ends the episode with stop
    reason ``max_tokens``.
    """

    def __init__(self, backend, tokenizer, max_new_tokens: int = MAX_NEW_TOKENS, max_total_tokens: int = MAX_TOTAL_TOKENS,
                 batch_size: int = 32, tool_calling: str = "auto") -> None:
        self.backend, self.tokenizer = backend, tokenizer
        self.max_new_tokens, self.max_total_tokens = max_new_tokens, max_total_tokens
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (episodes live at once), got {batch_size}.")
        self.batch_size = batch_size
        self._started = 0  # episodes started so far: the next episode's sampling stream
        self.template = ChatTemplate(tokenizer, tool_calling)
        self.tool_calling = tool_calling
        self.end_of_turn = self.template.end_of_turn

    def _render(self, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
        return self.template.render(messages, generation_prompt, tools)

    def _encode(self, text: str) -> list[int]:
        return self.template.encode(text)

    def _open(self, env_factory: Callable[[Task], Environment], task: Task, seed: int, stream: int) -> _Episode:
        """A new episode: its environment reset in the engine's tool protocol, its opening rendered and encoded."""
        env = env_factory(task)
        fmt = self.template.tool_format
        if fmt.native and not callable(getattr(env, "set_tool_protocol", None)):
            if self.tool_calling == "native":
                raise TypeError(f"{type(env).__name__} cannot leave its tool instructions to the chat template (it has "
                                "no set_tool_protocol); run this model with tool_calling='text' or 'auto'.")
            fmt = TEXT  # an environment that speaks only the text protocol (auto: the template's tools stay unused)
        if fmt.native:
            env.set_tool_protocol("native")
        messages = env.reset(task, seed=seed)
        tools = list(env.tool_schemas) if fmt.native else None
        rendered = self._render(messages, True, tools)
        ids = self._encode(rendered)
        return _Episode(task, seed, env, messages, rendered, ids, [0] * len(ids), [0.0] * len(ids),
                        chat=[dict(m) for m in messages], tools=tools, fmt=fmt, stream=stream)

    def run(self, env_factory: Callable[[Task], Environment], tasks: Sequence[Task], seeds: Sequence[int] | int = 0,
            on_turn: Callable[[int, int], None] | None = None, *, schedule: str = "continuous",
            on_episode: Callable[[int, Trajectory], None] | None = None) -> list[Trajectory]:
        """Play one episode per task (environment seed ``seeds[i]``, or one seed for all); results in task order.

        ``schedule="continuous"`` keeps up to ``batch_size`` episodes live: when one ends, the next waiting
        episode takes its place at the next turn, so no slot waits for the longest episode of a chunk.
        ``schedule="static"`` plays chunks of ``batch_size`` episodes, each chunk until its longest episode
        ends (the older scheduling, kept for comparison). Both give the same episodes: each episode's
        tokens depend on its own prompt and, when sampling, on its own random stream (``sampling_seed``:
        its ordinal among the episodes this engine has started), never on which episodes share its
        batch. ``on_turn(active, finished)`` is called after every batched turn, and ``on_episode(i, trajectory)``
        as soon as the episode of ``tasks[i]`` has ended (so that a caller can save finished work as it comes).
        """
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not a rollout schedule; use one of {', '.join(SCHEDULES)}.")
        seeds = [seeds] * len(tasks) if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(tasks):
            raise ValueError(f"got {len(seeds)} seeds for {len(tasks)} tasks; pass one seed per task, or one int.")
        first = self._started
        self._started += len(tasks)
        jobs = [(task, seed, first + i) for i, (task, seed) in enumerate(zip(tasks, seeds))]
        if schedule == "continuous":
            return self._run_slots(env_factory, jobs, self.batch_size, on_turn, on_episode)
        finished = [0]

        def chunk_turn(active: int, done: int) -> None:
            if on_turn is not None:
                on_turn(active, finished[0] + done)

        trajectories: list[Trajectory] = []
        for lo in range(0, len(jobs), self.batch_size):
            chunk = jobs[lo: lo + self.batch_size]
            chunk_episode = None if on_episode is None else (lambda i, t, lo=lo: on_episode(lo + i, t))
            trajectories += self._run_slots(env_factory, chunk, len(chunk), chunk_turn, chunk_episode)
            finished[0] += len(chunk)
        return trajectories

    def _run_slots(self, env_factory, jobs: Sequence[tuple[Task, int, int]], slots: int,
                   on_turn: Callable[[int, int], None] | None,
                   on_episode: Callable[[int, Trajectory], None] | None = None) -> list[Trajectory]:
        """Play ``jobs`` (task, environment seed, sampling stream) with at most ``slots`` episodes live at once,
        starting waiting episodes, in order, as live ones end."""
        waiting = collections.deque(range(len(jobs)))
        episodes: list[_Episode | None] = [None] * len(jobs)
        results: list[Trajectory | None] = [None] * len(jobs)
        keys = [object() for _ in jobs]
        live: list[int] = []
        finished = 0
        while waiting or live:
            while waiting and len(live) < slots:
                i = waiting.popleft()
                episodes[i] = self._open(env_factory, *jobs[i])
                live.append(i)
            requests, rows = [], []
            for i in live:
                episode = episodes[i]
                room = self.max_total_tokens - len(episode.ids)
                if room <= 0:
                    self._finish(episode, keys[i], truncated=True)
                    continue
                rows.append(i)
                requests.append(GenerationRequest(keys[i], episode.ids, min(self.max_new_tokens, room),
                                                  seed=episode.stream))
            for i, gen in zip(rows, self.backend.generate(requests)):
                self._advance(episodes[i], keys[i], gen)
            for i in live:
                if episodes[i].done:
                    results[i] = _trajectory(episodes[i])
                    if on_episode is not None:
                        on_episode(i, results[i])
            finished += sum(episodes[i].done for i in live)
            live = [i for i in live if not episodes[i].done]
            if on_turn is not None:
                on_turn(len(live), finished)
        return results

    def _advance(self, episode: _Episode, key, gen: Generation) -> None:
        tok = self.tokenizer
        sampled = gen.token_ids
        stopped = not gen.truncated
        text_ids = sampled[:-1] if stopped else sampled
        text = tok.decode(text_ids, skip_special_tokens=True)
        start = len(episode.ids)
        episode.ids = episode.ids + sampled
        episode.mask = episode.mask + [1] * len(sampled)
        episode.logprobs = episode.logprobs + list(gen.logprobs)
        episode.spans.append((start, len(episode.ids)))
        fmt = episode.fmt
        reply = fmt.parse(text)
        said = fmt.environment_text(text, reply)  # the protocol text the environment reads
        step = episode.env.step(said)
        episode.turns.append(Turn(index=len(episode.turns), assistant=said, env_messages=step.messages,
                                  info=step.info, completion_ids=list(sampled), logprobs=list(gen.logprobs),
                                  truncated=gen.truncated))
        episode.messages = [*episode.messages, {"role": "assistant", "content": said}, *step.messages]
        if step.done:
            self._finish(episode, key)
            return
        # Text the template puts after the sampled tokens: the end of the assistant message (minus the
        # end-of-turn token when the model sampled it), the environment's messages and the next
        # generation prompt. Only this text is tokenised.
        assistant, with_assistant, tail = self._assistant_message(episode, text, reply, len(step.messages))
        replies = [dict(m) for m in step.messages]
        if "tool_calls" in assistant:  # each result answers its call by id
            for message, entry in zip(replies, assistant["tool_calls"]):
                message["tool_call_id"] = entry["id"]
        episode.chat = [*episode.chat, assistant, *replies]
        after = self._render(episode.chat, True, episode.tools)
        if not after.startswith(with_assistant):
            raise TemplateError(
                "The chat template does not render conversations prefix-preservingly (a later message changes "
                "how earlier ones are rendered), so sampled tokens cannot be kept exactly. Use a template "
                "without such rewriting (for example, one that does not strip or rewrite past assistant turns)."
            )
        if stopped and self.end_of_turn and tail.startswith(self.end_of_turn):
            tail = tail[len(self.end_of_turn) :]
        added = self._encode(tail + after[len(with_assistant) :])
        episode.ids = episode.ids + added
        episode.mask = episode.mask + [0] * len(added)
        episode.logprobs = episode.logprobs + [0.0] * len(added)
        episode.rendered = after

    def _assistant_message(self, episode: _Episode, text: str, reply: NativeReply,
                           n_replies: int) -> tuple[dict, str, str]:
        """The sampled message as the template renders it, the conversation rendered up to it, and the tail.

        Natively, well-formed calls become a ``tool_calls`` message when the template writes them back exactly
        as sampled (and the environment answered each call with one message); otherwise, and in text mode,
        the message is the sampled text itself (see :meth:`ChatTemplate.continuation`).
        """
        template = self.template
        if reply.calls is not None and episode.fmt.native and episode.fmt.can_render(
                reply.content, reply.calls) and n_replies == len(reply.calls):
            native = {"role": "assistant", "content": reply.content,
                      "tool_calls": tool_call_entries(reply.calls, len(episode.turns) - 1)}
            rendered = self._render([*episode.chat, native], False, episode.tools)
            if rendered.startswith(episode.rendered + text):
                return native, rendered, rendered[len(episode.rendered + text):]
        plain = {"role": "assistant", "content": text}
        return (plain, *template.continuation(episode.chat, plain, episode.rendered, text, episode.tools))

    def _finish(self, episode: _Episode, key, truncated: bool = False) -> None:
        if truncated and hasattr(episode.env, "mark_truncated"):
            episode.env.mark_truncated()
        episode.done = True
        self.backend.release(key)
