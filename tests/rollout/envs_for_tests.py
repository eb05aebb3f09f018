"""Small scripted environments and builders shared by the rollout tests.

A tiny random Llama with a byte-level tokenizer (``tiny_model_dir`` in tests/conftest.py) stands in for a
model: these tests check token bookkeeping, not text quality. The environments are scripted ones whose
length we control.
"""

from __future__ import annotations

from pipeline.envs import Task
from pipeline.envs.base import Outcome, Step
from pipeline.rollout import RolloutEngine
from pipeline.rollout.backends.hf import HFBackend


class EchoEnv:
    """Answers every assistant message with a user message; ends after ``turns`` assistant turns."""

    def __init__(self, turns: int = 5) -> None:
        self.turns = turns

    def reset(self, task: Task, seed: int = 0) -> list[dict]:
        self.n, self.stop = 0, None
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"hello {task.id}"}]

    def step(self, assistant_text: str) -> Step:
        self.n += 1
        reply = [{"role": "user", "content": f"turn {self.n}: you wrote {len(assistant_text)} chars"}]
        if self.n % 2 == 0:  # tool messages too, so both roles go through incremental rendering
            reply.insert(0, {"role": "tool", "content": '{"ok": true}'})
        if self.n >= self.turns:
            self.stop = "resolved"
        return Step(reply, self.stop is not None, {"turn": self.n - 1})

    def outcome(self) -> Outcome:
        return Outcome(success=False, completed=self.stop == "resolved", stop_reason=self.stop)

    def mark_truncated(self) -> None:
        self.stop = "max_tokens"


class LongPromptEnv(EchoEnv):
    """EchoEnv behind a long system prompt that every episode shares, as real domains have."""

    def reset(self, task: Task, seed: int = 0) -> list[dict]:
        messages = super().reset(task, seed)
        messages[0]["content"] = "You are a careful support agent. Follow the policy. " * 4
        return messages


def tasks(n: int) -> list[Task]:
    return [Task(id=f"t{i}" * (i + 1), domain="echo", split="test", intents=["echo"], payload={}) for i in range(n)]


def engine(tiny, temperature=1.0, reuse_cache=True, **kwargs) -> RolloutEngine:
    model, tokenizer = tiny
    backend = HFBackend(model, tokenizer, temperature=temperature, seed=0, reuse_cache=reuse_cache)
    return RolloutEngine(backend, tokenizer, **{"max_new_tokens": 12, **kwargs})
