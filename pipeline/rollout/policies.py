"""Playing episodes with text policies: any ``(messages) -> str`` callable, one episode or a batch.

``run_policy`` plays one episode with a policy such as a scripted oracle or a model wrapper.
``run_batched`` plays many episodes at once with a *batch* policy ``(list of conversations) -> list of
replies``, asking it, at each turn, for every episode still active. Both hand the policy a copy of the
conversation, so a policy cannot corrupt what is recorded. Neither touches tokens: the token-level path
is :class:`~pipeline.rollout.engine.RolloutEngine`.
"""

from __future__ import annotations

from typing import Callable, Sequence

from pipeline.envs.base import Environment, Task
from pipeline.trajectory import Trajectory, Turn

Policy = Callable[[list[dict]], str]
BatchPolicy = Callable[[list[list[dict]]], list[str]]


def run_policy(env: Environment, task: Task, policy: Policy, seed: int = 0) -> Trajectory:
    """Play one episode of ``task`` in ``env`` with ``policy`` and return its trajectory."""
    messages = env.reset(task, seed=seed)
    turns: list[Turn] = []
    while True:
        text = policy(list(messages))
        step = env.step(text)
        turns.append(Turn(index=len(turns), assistant=text, env_messages=step.messages, info=step.info))
        messages = [*messages, {"role": "assistant", "content": text}, *step.messages]
        if step.done:
            break
    return Trajectory(task_id=task.id, messages=messages, turns=turns, outcome=env.outcome(), seed=seed)


def run_batched(
    env_factory: Callable[[Task], Environment],
    tasks: Sequence[Task],
    policy: BatchPolicy,
    seeds: Sequence[int] | int = 0,
    on_turn: Callable[[int, int], None] | None = None,
) -> list[Trajectory]:
    """Play one episode per task, batching the policy across every episode still running.

    ``seeds`` is one seed for all or one per task. ``on_turn(active, finished)`` is called after each
    batched turn (for progress bars). Results come back in task order.
    """
    seeds = [seeds] * len(tasks) if isinstance(seeds, int) else list(seeds)
    envs = [env_factory(task) for task in tasks]
    conversations = [env.reset(task, seed=seed) for env, task, seed in zip(envs, tasks, seeds)]
    turns: list[list[Turn]] = [[] for _ in tasks]
    active = list(range(len(tasks)))
    while active:
        replies = policy([list(conversations[i]) for i in active])
        if len(replies) != len(active):
            raise ValueError(f"batch policy returned {len(replies)} replies for {len(active)} conversations")
        still = []
        for i, text in zip(active, replies):
            step = envs[i].step(text)
            turns[i].append(Turn(index=len(turns[i]), assistant=text, env_messages=step.messages, info=step.info))
            conversations[i] = [*conversations[i], {"role": "assistant", "content": text}, *step.messages]
            if not step.done:
                still.append(i)
        active = still
        if on_turn is not None:
            on_turn(len(active), len(tasks) - len(active))
    return [
        Trajectory(task_id=task.id, messages=conversations[i], turns=turns[i], outcome=envs[i].outcome(), seed=seeds[i])
        for i, task in enumerate(tasks)
    ]
