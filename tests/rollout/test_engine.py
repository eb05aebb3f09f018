"""Tests for pipeline/rollout/engine.py: the token-level RolloutEngine's bookkeeping over whole episodes.

Generation runs on the HF backend with the tiny model; what is checked is the engine's token sequence
(sampled ids kept exactly, the assistant mask, turn spans), its budgets and its template check.
"""

from __future__ import annotations

import pytest

from pipeline.rollout import RolloutEngine, TemplateError
from pipeline.rollout.backends.hf import HFBackend
from tests.rollout.envs_for_tests import EchoEnv, engine, tasks


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
