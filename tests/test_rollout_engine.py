"""Tests for the token-level rollout engine (pipeline/rollout.py RolloutEngine) and the HF backend.

A tiny random Llama with a byte-level tokenizer stands in for a model: these tests check token
bookkeeping, not text quality. The environment is a small scripted one whose length we control.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.backends import GenerationRequest, HFBackend
from pipeline.envs import Task
from pipeline.envs.base import Outcome, Step
from pipeline.models import load_model
from pipeline.rollout import RolloutEngine, TemplateError


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


def tasks(n: int) -> list[Task]:
    return [Task(id=f"t{i}" * (i + 1), domain="echo", split="test", intents=["echo"], payload={}) for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    model.eval()
    return model, tokenizer


def engine(tiny, temperature=1.0, reuse_cache=True, **kwargs) -> RolloutEngine:
    model, tokenizer = tiny
    backend = HFBackend(model, tokenizer, temperature=temperature, seed=0, reuse_cache=reuse_cache)
    return RolloutEngine(backend, tokenizer, **{"max_new_tokens": 12, **kwargs})


def test_trained_ids_are_the_sampled_ids_across_a_five_turn_episode(tiny):
    """Each turn's span in the token sequence holds exactly the ids the backend sampled, the mask marks
    exactly those spans, and the sequence decodes to the conversation as the chat template renders it."""
    model, tokenizer = tiny
    [traj] = engine(tiny).run(lambda t: EchoEnv(5), tasks(1))
    data = traj.tokens
    assert len(traj.turns) == 5 and len(data.turn_spans) == 5
    assert len(data.input_ids) == len(data.assistant_mask) == len(data.logprobs)
    on = set()
    for turn, (start, end) in zip(traj.turns, data.turn_spans):
        assert data.input_ids[start:end] == turn.completion_ids
        assert data.logprobs[start:end] == turn.logprobs
        on.update(range(start, end))
    assert [i for i, m in enumerate(data.assistant_mask) if m] == sorted(on)
    # The environment's tokens are the template's rendering of its messages, and nothing was re-tokenised.
    last_env = len(traj.turns[-1].env_messages)
    rendered = tokenizer.apply_chat_template(traj.messages[: len(traj.messages) - last_env], tokenize=False)
    decoded = tokenizer.decode(data.input_ids)
    assert rendered.startswith(decoded)
    assert len(rendered) - len(decoded) <= len(tokenizer.eos_token + "\n")  # only the last turn's closing is left
    assert tokenizer.decode(data.input_ids[: data.turn_spans[0][0]]) == tokenizer.apply_chat_template(
        traj.messages[:2], tokenize=False, add_generation_prompt=True)


def test_sampling_logprobs_match_a_full_forward_pass(tiny):
    """Logprobs recorded while decoding with reused KV caches equal those of one forward pass over the
    whole sequence: the cache, padding and position ids did not change what the model computed."""
    model, _ = tiny
    [traj] = engine(tiny).run(lambda t: EchoEnv(4), tasks(1))
    ids = torch.tensor([traj.tokens.input_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
    for start, end in traj.tokens.turn_spans:
        expected = [float(logps[i - 1, traj.tokens.input_ids[i]]) for i in range(start, end)]
        assert traj.tokens.logprobs[start:end] == pytest.approx(expected, abs=1e-4)


def test_cache_reuse_and_batching_do_not_change_greedy_tokens(tiny):
    """Greedy rollouts are identical with and without KV-cache reuse, and batched or one at a time."""
    batch = engine(tiny, temperature=0).run(lambda t: EchoEnv(4), tasks(3))
    fresh = engine(tiny, temperature=0, reuse_cache=False).run(lambda t: EchoEnv(4), tasks(3))
    single = [engine(tiny, temperature=0).run(lambda t: EchoEnv(4), [t])[0] for t in tasks(3)]
    for a, b, c in zip(batch, fresh, single):
        assert a.tokens.input_ids == b.tokens.input_ids == c.tokens.input_ids
        assert a.tokens.logprobs == pytest.approx(c.tokens.logprobs, abs=1e-4)


def test_cache_reuse_prefills_only_new_tokens(tiny):
    """With reuse, later turns prefill the environment's reply, not the whole conversation."""
    model, tokenizer = tiny
    reuse = HFBackend(model, tokenizer, temperature=0.0)
    none = HFBackend(model, tokenizer, temperature=0.0, reuse_cache=False)
    [traj] = RolloutEngine(reuse, tokenizer, max_new_tokens=8).run(lambda t: EchoEnv(4), tasks(1))
    RolloutEngine(none, tokenizer, max_new_tokens=8).run(lambda t: EchoEnv(4), tasks(1))
    env_tokens = len(traj.tokens.input_ids) - sum(traj.tokens.assistant_mask)
    assert reuse.prefill_tokens <= env_tokens + len(traj.turns)
    assert none.prefill_tokens > 2 * reuse.prefill_tokens


def test_max_new_tokens_truncates_turns(tiny):
    [traj] = engine(tiny, max_new_tokens=3).run(lambda t: EchoEnv(3), tasks(1))
    for turn in traj.turns:
        assert len(turn.completion_ids) <= 3
        assert turn.truncated == (len(turn.completion_ids) == 3 and turn.completion_ids[-1] != tiny[1].eos_token_id)


def test_total_token_budget_ends_the_episode_as_max_tokens(tiny):
    """When the sequence reaches max_total_tokens the episode stops, reported as incomplete, and no turn
    samples past the budget."""
    [probe] = engine(tiny, max_new_tokens=8).run(lambda t: EchoEnv(1), tasks(1))
    prompt_len = probe.tokens.turn_spans[0][0]
    budget = prompt_len + 150  # room for two or three turns: 8 sampled + ~50 byte-level env tokens each
    [traj] = engine(tiny, max_new_tokens=8, max_total_tokens=budget).run(lambda t: EchoEnv(50), tasks(1))
    assert (traj.outcome.stop_reason, traj.outcome.completed) == ("max_tokens", False)
    assert 1 < len(traj.turns) < 50
    assert all(end <= budget for _, end in traj.tokens.turn_spans)


def test_a_template_that_rewrites_history_is_refused(tiny):
    """Incremental tokenisation needs a prefix-preserving template; anything else is a clear error."""
    model, tokenizer = tiny
    rewriting = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    rewriting.chat_template = ("{% for m in messages %}{% if loop.last or m.role != 'assistant' %}<|im_start|>"
                               "{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    backend = HFBackend(model, rewriting, temperature=0.0)
    with pytest.raises(TemplateError, match="prefix"):
        RolloutEngine(backend, rewriting, max_new_tokens=4).run(lambda t: EchoEnv(3), tasks(1))


def test_backend_honours_per_request_token_limits(tiny):
    model, tokenizer = tiny
    backend = HFBackend(model, tokenizer, temperature=1.0, seed=3)
    out = backend.generate([GenerationRequest("a", [1, 2, 3], 2), GenerationRequest("b", [4, 5], 5)])
    assert len(out[0].token_ids) <= 2 and len(out[1].token_ids) <= 5
    assert all(len(g.token_ids) == len(g.logprobs) for g in out)


def test_new_episodes_share_the_cached_system_prompt(tiny):
    """The first turn prefills the common prompt prefix once, not once per episode, and the result is
    the same as prefilling every episode on its own."""
    model, tokenizer = tiny
    shared = HFBackend(model, tokenizer, temperature=0.0)
    alone = HFBackend(model, tokenizer, temperature=0.0, reuse_cache=False)
    common = list(range(60, 120))  # 60 shared tokens
    prompts = [common + [200 + i, 201 + i] for i in range(4)]
    a = shared.generate([GenerationRequest(i, p, 5) for i, p in enumerate(prompts)])
    b = alone.generate([GenerationRequest(i, p, 5) for i, p in enumerate(prompts)])
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert shared.prefill_tokens == 60 + 4 * 2
    assert alone.prefill_tokens == 4 * 62


class LongPromptEnv(EchoEnv):
    """EchoEnv behind a long system prompt that every episode shares, as real domains have."""

    def reset(self, task: Task, seed: int = 0) -> list[dict]:
        messages = super().reset(task, seed)
        messages[0]["content"] = "You are a careful support agent. Follow the policy. " * 4
        return messages


def test_shared_prefix_attention_matches_a_full_forward_pass(tiny):
    """Episodes that share a long system prompt attend to one stored copy of it across every turn, and
    what they sample is what the model gives on the whole sequence: logprobs match a full forward pass
    and greedy tokens match rollouts without any cache reuse."""
    model, tokenizer = tiny
    eng = engine(tiny)
    trajs = eng.run(lambda t: LongPromptEnv(4), tasks(3))
    assert eng.backend._prefix is not None and len(eng.backend._prefix.ids) > 100
    for traj in trajs:
        ids = torch.tensor([traj.tokens.input_ids])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
        for start, end in traj.tokens.turn_spans:
            expected = [float(logps[i - 1, traj.tokens.input_ids[i]]) for i in range(start, end)]
            assert traj.tokens.logprobs[start:end] == pytest.approx(expected, abs=1e-4)
    greedy = engine(tiny, temperature=0).run(lambda t: LongPromptEnv(4), tasks(3))
    fresh = engine(tiny, temperature=0, reuse_cache=False).run(lambda t: LongPromptEnv(4), tasks(3))
    assert [t.tokens.input_ids for t in greedy] == [t.tokens.input_ids for t in fresh]


def test_episodes_on_different_shared_prefixes_can_share_a_batch(tiny):
    """A call that mixes an episode cached on one shared prefix with new episodes on another still
    samples what an uncached backend samples."""
    model, tokenizer = tiny
    cached = HFBackend(model, tokenizer, temperature=0.0)
    plain = HFBackend(model, tokenizer, temperature=0.0, reuse_cache=False)
    first = [list(range(60, 120)) + [200 + i] for i in range(2)]
    second = [list(range(130, 190)) + [210 + i] for i in range(2)]
    turn1 = cached.generate([GenerationRequest(i, p, 4) for i, p in enumerate(first)])
    follow = first[0] + turn1[0].token_ids + [7, 8]
    mixed = [GenerationRequest(0, follow, 4)] + [GenerationRequest(10 + i, p, 4) for i, p in enumerate(second)]
    expected = plain.generate([GenerationRequest(r.key, r.prompt_ids, 4) for r in mixed])
    assert [g.token_ids for g in cached.generate(mixed)] == [g.token_ids for g in expected]


def test_rows_of_very_different_lengths_prefill_in_separate_passes(tiny):
    """A long prompt and short ones in one call prefill in separate passes (no padding of the short rows
    to the long one), write into one decode batch, and sample what each samples alone, in request order."""
    from pipeline.backends import _prefill_chunks

    model, tokenizer = tiny
    prompts = [[5 + i for i in range(4)], [7 + i % 90 for i in range(300)], [9, 10, 11]]
    assert len(_prefill_chunks(sorted(map(len, prompts)))) == 2
    together = HFBackend(model, tokenizer, temperature=0.0).generate(
        [GenerationRequest(i, p, 5) for i, p in enumerate(prompts)])
    alone = [HFBackend(model, tokenizer, temperature=0.0).generate([GenerationRequest(0, p, 5)])[0] for p in prompts]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    for a, b in zip(together, alone):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
