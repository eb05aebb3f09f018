"""The token-level rollout engine: batched multi-turn episodes with exact token bookkeeping.

:class:`RolloutEngine` is the model path of :mod:`pipeline.rollout`. At each turn it sends every live
episode's prompt to a generation backend (:mod:`pipeline.rollout.backends`) in one batch, and keeps
each episode as one growing token sequence. Training scores exactly those ids, so nothing is ever
re-tokenised: the sampled ids are appended as sampled, and the environment's reply is appended as the
chat template renders it, by tokenising only the text the template adds after the assistant message.
The engine records what training needs: the sampled ids, their sampling-time logprobs, the assistant
mask and each turn's token span (a :class:`~pipeline.trajectory.TokenData`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from pipeline.budgets import MAX_NEW_TOKENS, MAX_TOTAL_TOKENS
from pipeline.envs.base import Environment, Task
from pipeline.rollout.backends import Generation, GenerationRequest
from pipeline.trajectory import TokenData, Trajectory, Turn


class TemplateError(ValueError):
    """The chat template is not prefix-preserving, so incremental tokenisation cannot be exact."""


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
                 batch_size: int = 32) -> None:
        self.backend, self.tokenizer = backend, tokenizer
        self.max_new_tokens, self.max_total_tokens = max_new_tokens, max_total_tokens
        self.batch_size = batch_size
        eos = tokenizer.eos_token
        self.end_of_turn = eos if isinstance(eos, str) else ""

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def run(self, env_factory: Callable[[Task], Environment], tasks: Sequence[Task], seeds: Sequence[int] | int = 0,
            on_turn: Callable[[int, int], None] | None = None) -> list[Trajectory]:
        seeds = [seeds] * len(tasks) if isinstance(seeds, int) else list(seeds)
        trajectories: list[Trajectory] = []
        for lo in range(0, len(tasks), self.batch_size):
            trajectories += self._run_batch(env_factory, tasks[lo : lo + self.batch_size], seeds[lo : lo + self.batch_size],
                                            on_turn)
        return trajectories

    def _run_batch(self, env_factory, tasks, seeds, on_turn) -> list[Trajectory]:
        episodes = []
        for task, seed in zip(tasks, seeds):
            env = env_factory(task)
            messages = env.reset(task, seed=seed)
            rendered = self._render(messages, True)
            ids = self._encode(rendered)
            episodes.append(_Episode(task, seed, env, messages, rendered, ids, [0] * len(ids), [0.0] * len(ids)))
        keys = [object() for _ in episodes]
        while True:
            live = [i for i, e in enumerate(episodes) if not e.done]
            if not live:
                break
            requests = []
            for i in list(live):
                room = self.max_total_tokens - len(episodes[i].ids)
                if room <= 0:
                    self._finish(episodes[i], keys[i], truncated=True)
                    live.remove(i)
                    continue
                requests.append(GenerationRequest(keys[i], episodes[i].ids, min(self.max_new_tokens, room)))
            generations = self.backend.generate(requests)
            for i, gen in zip(live, generations):
                self._advance(episodes[i], keys[i], gen)
            if on_turn is not None:
                on_turn(sum(not e.done for e in episodes), sum(e.done for e in episodes))
        return [
            Trajectory(task_id=e.task.id, messages=e.messages, turns=e.turns, outcome=e.env.outcome(), seed=e.seed,
                       tokens=TokenData(e.ids, e.mask, e.logprobs, e.spans))
            for e in episodes
        ]

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
        step = episode.env.step(text)
        episode.turns.append(Turn(index=len(episode.turns), assistant=text, env_messages=step.messages,
                                  info=step.info, completion_ids=list(sampled), logprobs=list(gen.logprobs),
                                  truncated=gen.truncated))
        episode.messages = [*episode.messages, {"role": "assistant", "content": text}, *step.messages]
        if step.done:
            self._finish(episode, key)
            return
        # Text the template puts after the sampled tokens: the end of the assistant message (minus the
        # end-of-turn token when the model sampled it), the environment's messages and the next
        # generation prompt. Only this text is tokenised.
        with_assistant = self._render(episode.messages[: len(episode.messages) - len(step.messages)], False)
        after = self._render(episode.messages, True)
        head = episode.rendered + text
        if not with_assistant.startswith(head) or not after.startswith(with_assistant):
            raise TemplateError(
                "The chat template does not render conversations prefix-preservingly (a later message changes "
                "how earlier ones are rendered), so sampled tokens cannot be kept exactly. Use a template "
                "without such rewriting (for example, one that does not strip or rewrite past assistant turns)."
            )
        tail = with_assistant[len(head) :]
        if stopped and self.end_of_turn and tail.startswith(self.end_of_turn):
            tail = tail[len(self.end_of_turn) :]
        added = self._encode(tail + after[len(with_assistant) :])
        episode.ids = episode.ids + added
        episode.mask = episode.mask + [0] * len(added)
        episode.logprobs = episode.logprobs + [0.0] * len(added)
        episode.rendered = after

    def _finish(self, episode: _Episode, key, truncated: bool = False) -> None:
        if truncated and hasattr(episode.env, "mark_truncated"):
            episode.env.mark_truncated()
        episode.done = True
        self.backend.release(key)
